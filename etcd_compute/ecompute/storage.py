"""Where an instance's root disk lives: on this host (local) or in a Ceph pool (rbd), so that it
outlives the host.

local: a qcow2 overlay of the cached image, through libvirt's storage pool over the instances
directory (driver.create_disk); it dies with the host, and an evacuated instance is rebuilt
from its image elsewhere.

rbd: each image is imported into the pool once (raw: RBD clones need a raw parent), under a name
derived from its cache name, snapshotted (@base) and protected; each instance's root disk is a
copy-on-write clone `vm-<uuid>` of that snapshot, grown to the instance's DISK_GB. Every host
of the pool can open it, so an evacuated instance starts on its new host from *the same* disk,
with what its guest wrote. Before a host opens a disk that already exists (it was somewhere
else), it blocklists every Ceph client that still has it open (`rbd status`): RBD's exclusive
lock does not fence (platform.md: a second writer got in within 0.11 s), a blocklist does, and
it also ends the ~30 s wait for a dead client's watch to time out. The fence (fence.py) has
stopped the old host's QEMU long before, unless that whole machine was frozen: then this is
what keeps it from writing when it wakes. The domain's disk has error_policy='stop': a
blocklisted guest pauses instead of seeing I/O errors.

Only the owner of an instance's request removes its disk: a DESTROY removes the clone; a
removal of an orphan (an instance moved away) removes the domain and local files only, never
the disk its new host runs on. Volumes (vol-<id>, made and removed by the user's side) are
taken over as root disks are before a host opens them, and never removed here: they outlive
instances. The Ceph tools run as subprocesses (the rbd CLI: Debian's Python
bindings import only under /usr/bin/python3); this module knows nothing of etcd or Placement.
"""

from __future__ import annotations

import json
import logging
import subprocess
import uuid as uuidlib
from typing import TYPE_CHECKING

from etcd_compute.ecompute.driver import DriverError, RbdDisk, VolumeDisk
from etcd_compute.rbd import CLI_TIMEOUT, RbdPool, disk_name

if TYPE_CHECKING:
    from etcd_compute.contract import VolumeRef
    from etcd_compute.ecompute.images import Image

LOG = logging.getLogger(__name__)
BLOCKLIST_FOR = 3600  # seconds a taken-over client stays blocklisted (a host that comes back cleanly ends it)


class RbdStorage(RbdPool):
    """Root disks as RBD clones in one pool (see the module docstring)."""

    error = DriverError

    def disk(self, uuid: str) -> RbdDisk:
        s = self.settings
        return RbdDisk(self.path(disk_name(uuid)), s.monitors, s.user, s.secret_uuid)

    def has_root_disk(self, uuid: str) -> bool:
        """Does the instance's disk exist in the pool (made by a host it was on before)?"""
        return self.exists(disk_name(uuid))

    def base(self, image: Image) -> str:
        """The image in the pool, as a protected snapshot to clone from; imported once (raw) under a
        temporary name and renamed into place, so hosts that import it at once never share a half."""
        name = f"img-{image.path.name}"
        if self.exists(name):
            return f"{name}@base"
        part = f"{name}.part-{uuidlib.uuid4().hex[:8]}"
        s = self.settings
        target = f"rbd:{self.path(part)}:id={s.user}:conf={s.conf}:keyring={s.keyring}"
        p = subprocess.run(["qemu-img", "convert", "-O", "raw", "-f", image.format, str(image.path), target],
                           capture_output=True, text=True, timeout=CLI_TIMEOUT, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            raise DriverError(f"import of {image.path.name} into {s.pool}: {p.stderr.strip()}")
        self.rbd("snap", "create", f"{self.path(part)}@base")
        self.rbd("snap", "protect", f"{self.path(part)}@base")
        try:
            self.rbd("rename", self.path(part), self.path(name))
            LOG.info("image %s imported into %s as %s", image.path.name, s.pool, name)
        except DriverError:
            self.remove(part)  # another host imported it meanwhile: theirs serves
            if not self.exists(name):
                raise
        return f"{name}@base"

    def root_disk(self, uuid: str, image: Image | None, size_bytes: int) -> tuple[RbdDisk, bool]:
        """The instance's disk: the one in the pool if it exists (taken over from whoever still has
        it open), else a clone of `image` grown to `size_bytes`. (disk, whether it was made now)."""
        name = disk_name(uuid)
        if self.exists(name):
            self.take_over(name)
            return self.disk(uuid), False
        if image is None:
            raise DriverError(f"{self.path(name)} does not exist and there is no image to make it from")
        self.rbd("clone", f"{self.settings.pool}/{self.base(image)}", self.path(name))
        if size_bytes > image.virtual_size:
            self.rbd("resize", "--size", f"{-(-size_bytes // 2**20)}M", self.path(name))
        LOG.info("root disk %s cloned from %s (%d GiB)", self.path(name), image.path.name, size_bytes >> 30)
        return self.disk(uuid), True

    def clone_disk(self, uuid: str, parent: str, size_bytes: int) -> tuple[RbdDisk, bool]:
        """The instance's disk as a clone of `parent` (an image@snapshot of the pool: a snapshot of
        another instance's disk), grown to `size_bytes`; (disk, whether it was made now)."""
        name = disk_name(uuid)
        if self.exists(name):
            return self.disk(uuid), False
        if not self.exists(parent.partition("@")[0]):
            raise DriverError(f"image {self.path(parent)} is not in the pool (deleted?)")
        self.rbd("clone", self.path(parent), self.path(name))
        size = int(json.loads(self.rbd("info", "--format", "json", self.path(name), timeout=60))["size"])
        if size_bytes > size:
            self.rbd("resize", "--size", f"{-(-size_bytes // 2**20)}M", self.path(name))
        LOG.info("root disk %s cloned from %s", self.path(name), self.path(parent))
        return self.disk(uuid), True

    def take_over(self, name: str) -> list[str]:
        """Blocklist every client that still has the image open: from the next OSD map on it can
        write nothing (its guest pauses), and this host's QEMU may open it. The addresses."""
        found = self.watchers(name)
        for address in found:
            p = self._tool("ceph", "osd", "blocklist", "add", address, str(BLOCKLIST_FOR), timeout=60)
            if p.returncode != 0:
                raise DriverError(f"cannot blocklist {address}, which still has {self.path(name)} open: "
                                  f"{p.stderr.strip()}")
            LOG.warning("%s was open by %s (a host that lost it): blocklisted for %ds", self.path(name), address,
                        BLOCKLIST_FOR)
        return found

    def remove_root_disk(self, uuid: str) -> bool:
        """Remove the instance's disk (its destroy); True if there was one."""
        return self.remove(disk_name(uuid))

    def volume(self, ref: VolumeRef, attached: bool) -> VolumeDisk:
        """A volume's image as its domain opens it, once no other client has it open (take_over:
        the host it was attached to before may still run it), unless this domain has it `attached`
        already (its own QEMU is the watcher). A missing image is an error that says which."""
        s, name = self.settings, ref["image"]
        if not attached:
            if not self.exists(name):
                raise DriverError(f"volume {ref['id']}: its image {self.path(name)} does not exist")
            self.take_over(name)
        return VolumeDisk(ref["id"], RbdDisk(self.path(name), s.monitors, s.user, s.secret_uuid))
