"""A Ceph pool through the rbd and ceph CLIs, as one Ceph client: what both sides need of it.

The host (ecompute/storage.py) clones root disks and attaches volumes; the user's side
(eschedule/volumes.py) creates and removes volumes, as Cinder's volume service does. The tools
run as subprocesses (Debian's Python bindings import only under /usr/bin/python3). This module
knows nothing of etcd, Placement or libvirt.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import uuid as uuidlib
from dataclasses import dataclass

LOG = logging.getLogger(__name__)
CLI_TIMEOUT = 300.0  # an import of a large image into the pool takes a while


SNAPSHOT = re.compile(r"rbd:([A-Za-z0-9_.-]+)/(img-snap-[0-9a-f]{12})")  # the images `eschedule snapshot` makes


def snapshot_image(url: str | None) -> tuple[str, str] | None:
    """(pool, image) of a catalogue image that is a snapshot in Ceph (`rbd:<pool>/img-snap-<id>`),
    else None: a host of that pool clones it directly."""
    found = SNAPSHOT.fullmatch(url or "")
    return (found.group(1), found.group(2)) if found else None


def disk_name(uuid: str) -> str:
    """An instance's root disk in the pool (the host clones it; a snapshot copies it)."""
    return f"vm-{uuidlib.UUID(uuid)}"


class RbdError(Exception):
    """A Ceph command failed; the message says which and why."""


@dataclass(frozen=True)
class RbdSettings:
    """A pool and the Ceph client that uses it (compute.yaml's storage.rbd, schedule.yaml's
    volumes), as plain data (it crosses a process boundary to the workers)."""

    pool: str
    conf: str
    cluster: str
    user: str  # the cephx id, without "client."
    keyring: str
    secret_uuid: str = ""  # the libvirt secret that holds the user's key (QEMU authenticates with it)
    monitors: tuple[tuple[str, int], ...] = ()  # for libvirt's <host>: QEMU reads no ceph.conf of a custom cluster


class RbdPool:
    """The images of one pool."""

    error: type[Exception] = RbdError  # what a failure raises (the host's storage raises DriverError)

    def __init__(self, settings: RbdSettings) -> None:
        self.settings = settings

    def _tool(self, tool: str, *args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        s = self.settings
        return subprocess.run([tool, "--cluster", s.cluster, "--conf", s.conf, "--id", s.user, "--keyring",
                               s.keyring, *args], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def rbd(self, *args: str, timeout: float = CLI_TIMEOUT) -> str:
        """The rbd CLI as this client; `error` with its message on failure."""
        try:
            p = self._tool("rbd", *args, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise self.error(f"rbd {' '.join(args[:2])}: no answer from Ceph within {timeout:.0f}s") from None
        except OSError as exc:
            raise self.error(f"rbd {' '.join(args[:2])}: {exc}") from None
        if p.returncode != 0:
            said = p.stderr.strip().splitlines()
            raise self.error(f"rbd {' '.join(args[:2])}: {said[-1] if said else f'exit {p.returncode}'}")
        return p.stdout

    def path(self, name: str) -> str:
        return f"{self.settings.pool}/{name}"

    def exists(self, name: str) -> bool:
        try:
            p = self._tool("rbd", "info", self.path(name), timeout=60)
        except (subprocess.TimeoutExpired, OSError) as exc:
            raise self.error(f"rbd info {self.path(name)}: {exc}") from None
        if p.returncode == 0:
            return True
        if "No such file" in p.stderr or "does not exist" in p.stderr or p.returncode == 2:
            return False
        raise self.error(f"rbd info {self.path(name)}: {p.stderr.strip()}")

    def create(self, name: str, size_gb: int) -> bool:
        """An empty image of `size_gb` GiB (a volume); False if it exists already (made before)."""
        if self.exists(name):
            return False
        self.rbd("create", "--size", f"{size_gb}G", self.path(name))
        LOG.info("created %s (%d GiB)", self.path(name), size_gb)
        return True

    def watchers(self, name: str) -> list[str]:
        """The Ceph client addresses that have the image open (a running QEMU is one)."""
        status = json.loads(self.rbd("status", "--format", "json", self.path(name), timeout=60) or "{}")
        return [w["address"] for w in status.get("watchers", [])]

    def remove(self, name: str) -> bool:
        """Remove an image and its snapshots; True if there was one."""
        if not self.exists(name):
            return False
        snaps = json.loads(self.rbd("snap", "ls", "--format", "json", self.path(name), timeout=60) or "[]")
        for snap in snaps:
            if snap.get("protected") == "true":
                self.rbd("snap", "unprotect", f"{self.path(name)}@{snap['name']}")
        if snaps:
            self.rbd("snap", "purge", self.path(name))
        self.rbd("rm", "--no-progress", self.path(name))
        LOG.info("removed %s", self.path(name))
        return True
