"""The hypervisor behind one small, idempotent interface: the Driver protocol and the values
that cross it, shared by the libvirt driver (libvirtdriver.py), the fake one (fakedriver.py)
and the worker that calls them.

The daemon's reconcile loop calls these methods over and over from long-lived pool
worker processes, so every method must be safe to repeat and safe to race with
itself: "already running", "already gone" and "not found" are outcomes, not errors.
Nothing here speaks libvirt, etcd or Placement: it imports no more than its values need.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from etcd_compute.guestdata import mac_address
from etcd_compute.states import Actual

if TYPE_CHECKING:
    from etcd_compute.contract import DomainRecord

NAME_PREFIX = "ec-"

# What each libvirt word means for the instance's actual state.
_ACTUAL = {"running": Actual.ACTIVE, "shutting-down": Actual.ACTIVE, "paused": Actual.SUSPENDED,
           "suspended": Actual.SUSPENDED, "shutoff": Actual.STOPPED, "crashed": Actual.STOPPED,
           "nostate": Actual.STOPPED}


class DriverError(Exception):
    """A hypervisor operation failed (never raised for "not found")."""


class HypervisorUnavailable(DriverError):
    """The hypervisor does not answer at all (libvirtd down): the host is unhealthy, the
    instance did nothing wrong."""


@dataclass(frozen=True)
class DomainInfo:
    uuid: str
    name: str
    state: str  # running, paused, shutoff, crashed, shutting-down, suspended, nostate
    vcpus: int
    memory_mb: int
    note: str | None = None  # how the last power change went, worth the instance's events
    crashed: bool = False  # off (or held) because the guest panicked: pvpanic told QEMU
    # Paused because a disk failed (error_policy stop): e.g. its Ceph client was blocklisted when
    # another host took the disk over. It can write nothing; resumed, it fails again.
    ioerror: bool = False
    # When this call started the domain (a new boot), epoch seconds: a fact of the call, not of
    # the domain, so two looks at one domain compare equal whichever of them started it.
    booted_at: float | None = field(default=None, compare=False)

    @property
    def power(self) -> Actual:
        """The instance's actual state as this domain's power state implies."""
        return _ACTUAL.get(self.state, Actual.STOPPED)

    @property
    def observed(self) -> Actual:
        """What this domain's state says happened: its power, or CRASHED (list_domains): a panic, or
        a disk that failed under it."""
        return Actual.CRASHED if self.crashed or self.ioerror else self.power

    def record(self) -> DomainRecord:
        return {"uuid": self.uuid, "name": self.name, "state": self.state, "vcpus": self.vcpus,
                "memory_mb": self.memory_mb}


@dataclass(frozen=True)
class DomainStats:
    """One running domain's counters from libvirt's bulk stats, in base units; None: not reported
    this time (a stat group libvirt skipped, e.g. under NOWAIT while the domain is busy)."""

    cpu_seconds: float | None = None  # vCPU and emulator time since the domain started
    memory_bytes: float | None = None  # the guest's memory (balloon), what its allocation gives it
    memory_rss_bytes: float | None = None  # what QEMU holds of the host's RAM
    network_receive_bytes: float | None = None  # summed over the domain's NICs
    network_transmit_bytes: float | None = None
    disk_read_bytes: float | None = None  # summed over its disks (the config drive too)
    disk_write_bytes: float | None = None

    def values(self) -> dict[str, float]:
        """The stats reported, by field name: plain data to cross a process boundary."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Shutdown:
    """How a stop or reboot takes the guest down: the ACPI power button and `timeout` seconds
    for the guest to power itself off, or at once (`force`); `hurry()` turning true while it
    waits (a `stop --force` that came meanwhile) pulls the plug then."""

    timeout: float
    force: bool = False
    hurry: Callable[[], bool] = lambda: False


class Driver(Protocol):
    def prepare(self, network: NetworkSpec | None) -> None: ...
    def create_disk(self, uuid: str, base: str, base_format: str, size_bytes: int) -> str: ...
    def ensure_running(self, spec: DomainSpec) -> DomainInfo: ...
    def wait_for_address(self, uuid: str, timeout: float) -> str | None: ...
    def set_power(self, uuid: str, target: Actual, shutdown: Shutdown) -> DomainInfo: ...
    def reboot(self, uuid: str, shutdown: Shutdown) -> DomainInfo: ...
    def reserve_address(self, uuid: str, network: str) -> str: ...
    def destroy(self, uuid: str, network: str | None = None) -> bool: ...
    def hard_stop(self, uuid: str, owner: str | None = None) -> bool: ...
    def lookup(self, uuid: str) -> DomainInfo | None: ...
    def list_uuids(self, owner: str | None = None) -> list[str]: ...
    def list_domains(self, owner: str | None = None) -> dict[str, DomainInfo]: ...
    def domain_stats(self, owner: str | None = None) -> dict[str, DomainStats]: ...
    def files(self, uuid: str) -> InstanceFiles: ...
    def volumes(self, uuid: str) -> dict[str, str]: ...
    def attach_volume(self, uuid: str, volume: VolumeDisk) -> str: ...
    def detach_volume(self, uuid: str, volume: str, timeout: float) -> bool: ...


@dataclass(frozen=True)
class RbdDisk:
    """A root disk in a Ceph pool (storage.py), as QEMU opens it: over the network, authenticated
    with the cephx key libvirt's secret holds."""

    name: str  # pool/image
    monitors: tuple[tuple[str, int], ...]
    user: str
    secret_uuid: str


@dataclass(frozen=True)
class VolumeDisk:
    """A volume as its domain has it: an RBD image, attached as a virtio disk (vdb, vdc, ...) whose
    serial is the volume's id (its first 20 characters: virtio's limit), so the guest finds it as
    /dev/disk/by-id/virtio-<serial>; the domain knows it by the alias ua-vol-<id>."""

    id: str
    rbd: RbdDisk

    @property
    def serial(self) -> str:
        return self.id[:20]

    @property
    def alias(self) -> str:
        return f"{VOLUME_ALIAS}{self.id}"


VOLUME_ALIAS = "ua-vol-"  # a user alias (libvirt keeps "ua-" ones): how a domain's disk names its volume


@dataclass(frozen=True)
class DomainSpec:
    """Everything the domain XML is built from; only uuid, vcpus and memory are required."""

    uuid: str
    vcpus: int
    memory_mb: int
    disk: str | None = None  # qcow2 overlay, virtio
    rbd: RbdDisk | None = None  # ... or an RBD image (the rbd storage backend)
    config_drive: str | None = None  # NoCloud ISO, IDE cdrom
    console_log: str | None = None  # serial console copied here by virtlogd
    kernel: str | None = None  # direct kernel boot (no bootloader in the image)
    initrd: str | None = None
    cmdline: str | None = None
    network: str | None = None  # libvirt network name ...
    bridge: str | None = None  # ... or an existing bridge
    ip: str | None = None  # reserved on `network`: the only address the NIC may use
    owner: str | None = None  # the host (ecompute) that manages it, kept in the domain's metadata
    volumes: tuple[VolumeDisk, ...] = ()  # attached at definition, as vdb, vdc, ... in order

    @property
    def name(self) -> str:
        return domain_name(self.uuid)

    @property
    def mac(self) -> str:
        return mac_address(self.uuid)


@dataclass(frozen=True)
class NetworkSpec:
    """A libvirt network with DHCP; `forward` False makes it isolated (nothing leaves the host)."""

    name: str
    bridge: str
    address: str  # the bridge's address with prefix, e.g. 10.123.0.1/24
    forward: bool = True
    metadata_address: str | None = None  # put on the bridge for the metadata server


@dataclass(frozen=True)
class InstanceFiles:
    disk: Path
    config_drive: Path
    console_log: Path

    def all(self) -> tuple[Path, ...]:
        return (self.disk, self.config_drive, self.console_log)


def domain_name(uuid: str) -> str:
    return f"{NAME_PREFIX}{uuid}"

