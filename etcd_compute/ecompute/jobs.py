"""What crosses between the daemon and its worker processes: typed jobs and results.

The daemon decides, a worker does: each Job names its kind (an enum, never a
function name), and every job ends in a JobResult, also when the worker died, was
killed at its deadline or refused to start a domain for a host that lost its lease.
The daemon imports this module and pool.py of the worker side, so it never loads
libvirt, and the workers never load etcd3/gRPC (worker.py is imported in the worker).
"""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from etcd_compute.rbd import RbdSettings
from etcd_compute.states import Actual

if TYPE_CHECKING:  # types only: an idle worker never loads contract (nor typing_extensions)
    from etcd_compute.contract import DomainRecord, Request, VolumeRef


class JobKind(Enum):
    PREPARE = "prepare"  # storage pool and network, before the first build
    BUILD = "build"  # image, overlay, config drive, domain, address
    POWER = "power"  # bring a domain to Job.power
    REBOOT = "reboot"
    VOLUMES = "volumes"  # attach and detach the domain's volumes until they are Job.volumes
    DESTROY = "destroy"  # domain and files of an instance this host was asked to delete
    REMOVE_ORPHAN = "remove-orphan"  # the same for a domain no request of this host names
    LIST_DOMAINS = "list-domains"  # the instances whose domains this host owns
    DOMAIN_STATS = "domain-stats"  # counters of this host's running domains (metrics; its own worker)
    MODULES = "modules"  # what the worker process has loaded (diagnostics: its footprint, tests and bench)


@dataclass(frozen=True)
class Job:
    kind: JobKind
    uuid: str = ""
    request: Request | None = None  # BUILD
    power: Actual | None = None  # POWER: ACTIVE, STOPPED or SUSPENDED
    owner: int = 0  # create revision of the request it serves (its incarnation on this host)
    epoch: int = 0  # the host's lease epoch it was decided in: it starts no domain under another (fence.py)
    # POWER to STOPPED and REBOOT: the guest's clean shutdown, as the request's last stop or reboot asked
    stop_timeout: float | None = None  # seconds before the plug is pulled; None: the host's stop_timeout
    force: bool = False  # pull the plug at once
    # BUILD and VOLUMES: the volumes the domain is to have, in order (those the host may attach: in its pool)
    volumes: tuple[VolumeRef, ...] = ()


@dataclass(frozen=True)
class JobResult:
    ok: bool
    reason: str | None = None  # why it failed; for a build that worked, a warning (no IP)
    domain: DomainRecord | None = None
    power: Actual | None = None  # the actual state the domain's power state implies
    ip: str | None = None
    missing: bool = False  # the domain was not there (POWER, REBOOT)
    interrupted: bool = False  # the worker died (or was killed: the host lost its lease): nothing is known
    timed_out: bool = False  # it ran past its deadline: its worker was killed (what it did is unknown)
    fenced: bool = False  # it would have started a domain while the host's lease was not proven
    hypervisor_down: bool = False  # the hypervisor did not answer at all: the host, not the instance, failed
    disk_kept: bool = False  # BUILD: the instance's disk was there already (in Ceph: it kept its data)
    domains: tuple[tuple[str, Actual], ...] = ()  # LIST_DOMAINS: (uuid, actual state) of each ...
    disk_failed: tuple[str, ...] = ()  # ... and those paused on an I/O error of a disk (CRASHED among them)
    # DOMAIN_STATS: (uuid, {stat: value}) of each running domain; the keys are the fields of
    # driver.DomainStats, sent as plain dicts so that unpickling a result never loads the driver.
    stats: tuple[tuple[str, dict[str, float]], ...] = ()
    modules: tuple[str, ...] = ()  # MODULES: the worker's sys.modules
    seconds: float | None = None  # how long the job ran in its worker
    ip_seconds: float | None = None  # BUILD: from the job's start until the guest's address was known
    booted_at: float | None = None  # BUILD, POWER, REBOOT: when it started the domain (a new boot), epoch seconds
    # BUILD, VOLUMES: (id, target device) of each volume attached to the domain now; None: not known
    volumes: tuple[tuple[str, str], ...] | None = None


@dataclass(frozen=True)
class WorkerSettings:
    """What the workers need from compute.yaml, as plain data (it crosses a process boundary)."""

    host: str
    uri: str
    domain_type: str
    instances_path: str
    image_cache_path: str
    image_dirs: tuple[str, ...]  # where local images may come from (none: http(s) only)
    image_max_bytes: int  # largest image, kernel or initrd fetched into the cache
    resize: bool
    bridge: str | None
    network: dict[str, object] | None  # driver.NetworkSpec's fields
    ip_timeout: float
    stop_timeout: float
    log_level: str
    daemon_pid: int  # the workers die with it
    proof: str | None = None  # the fence's proof file (fence.py): no domain starts without it
    image_deadline: float = 1800.0  # images.Pace
    image_min_rate: int = 10 << 10
    image_rate_window: float = 30.0
    rbd: RbdSettings | None = None  # root disks in a Ceph pool; None: qcow2 overlays on this host
    config_drive: bool = True  # compute.yaml's: false, no instance of this host gets one
    metadata_url: str | None = None  # the metadata server as guests reach it (None: none serves them)


def cancel_marker(instances_path: str, uuid: str) -> Path:
    """The file whose existence tells a running BUILD of `uuid` to stop (workers have no etcd).

    The daemon touches it when an instance being built is deleted; the build's image fetch
    checks it before it starts and between chunks, and aborts, removing its partial file. The
    build (and a DESTROY) removes it when it ends. A hidden file beside the instance's files.
    """
    return Path(instances_path) / f".{uuidlib.UUID(uuid)}.cancel"


def hurry_marker(instances_path: str, uuid: str) -> Path:
    """The file whose existence tells a running stop or reboot of `uuid` to pull the plug now:
    the daemon touches it when a `stop --force` (or `reboot --force`) comes while the guest is
    still shutting down; the job removes it when it starts and when it ends."""
    return Path(instances_path) / f".{uuidlib.UUID(uuid)}.hurry"


VOLUME_RELEASE_TIMEOUT = 20.0  # seconds a running guest has to let go of a volume detached (under its deadline)

EVENTS_PROCESS = "ecompute-events"  # the lifecycle-event listener's process name (ps, psutil)
