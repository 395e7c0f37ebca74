"""What crosses between the daemon and its worker processes: typed jobs and results.

The daemon decides, a worker does: each Job names its kind (an enum, never a
function name), and every job ends in a JobResult, also when the worker died. This
module is all the daemon imports of the worker side, so the daemon never loads
libvirt and the workers never load etcd3/gRPC (worker.py is imported in the worker).
"""

from __future__ import annotations

import multiprocessing
import uuid as uuidlib
from dataclasses import dataclass
from enum import Enum
from multiprocessing import Queue
from pathlib import Path
from typing import TYPE_CHECKING

from etcd_compute.states import Actual

if TYPE_CHECKING:  # types only: an idle worker never loads contract (nor typing_extensions)
    from concurrent.futures import ProcessPoolExecutor

    from etcd_compute.contract import DomainRecord, Request


class JobKind(Enum):
    PREPARE = "prepare"  # storage pool and network, before the first build
    BUILD = "build"  # image, overlay, config drive, domain, address
    POWER = "power"  # bring a domain to Job.power
    REBOOT = "reboot"
    DESTROY = "destroy"  # domain and files of an instance this host was asked to delete
    REMOVE_ORPHAN = "remove-orphan"  # the same for a domain no request of this host names
    LIST_DOMAINS = "list-domains"  # the instances whose domains this host owns
    DOMAIN_STATS = "domain-stats"  # counters of this host's running domains (metrics; its own worker)


@dataclass(frozen=True)
class Job:
    kind: JobKind
    uuid: str = ""
    request: Request | None = None  # BUILD
    power: Actual | None = None  # POWER: ACTIVE, STOPPED or SUSPENDED
    owner: int = 0  # create revision of the request it serves (its incarnation on this host)


@dataclass(frozen=True)
class JobResult:
    ok: bool
    reason: str | None = None  # why it failed; for a build that worked, a warning (no IP)
    domain: DomainRecord | None = None
    power: Actual | None = None  # the actual state the domain's power state implies
    ip: str | None = None
    missing: bool = False  # the domain was not there (POWER, REBOOT)
    interrupted: bool = False  # the worker died: nothing is known
    domains: tuple[tuple[str, Actual], ...] = ()  # LIST_DOMAINS: (uuid, actual state) of each
    # DOMAIN_STATS: (uuid, {stat: value}) of each running domain; the keys are the fields of
    # driver.DomainStats, sent as plain dicts so that unpickling a result never loads the driver.
    stats: tuple[tuple[str, dict[str, float]], ...] = ()
    seconds: float | None = None  # how long the job ran in its worker
    ip_seconds: float | None = None  # BUILD: from the job's start until the guest's address was known


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


def cancel_marker(instances_path: str, uuid: str) -> Path:
    """The file whose existence tells a running BUILD of `uuid` to stop (workers have no etcd).

    The daemon touches it when an instance being built is deleted; the build's image fetch
    checks it before it starts and between chunks, and aborts, removing its partial file. The
    build (and a DESTROY) removes it when it ends. A hidden file beside the instance's files.
    """
    return Path(instances_path) / f".{uuidlib.UUID(uuid)}.cancel"


def context() -> multiprocessing.context.SpawnContext:
    """How worker processes start: spawned, a fresh interpreter that never shares the daemon's
    gRPC threads or channel (fork would copy them). Measured against forkserver (bench/agents.py,
    issue 13): the pool starts its workers on demand, so an idle host runs one worker, and a
    fork server with the driver preloaded is a process of its own (~12 MB PSS) whose children
    still dirty ~5 MB each (CPython 3.11 writes every refcount it touches; gc.freeze() in the
    server did not help): spawn is ~10 MB lighter with one libvirt process (test:///default),
    forkserver ~7 MB lighter with two (qemu://: a worker and the lifecycle-event listener).
    Either way multiprocessing starts its resource tracker (popen_spawn_posix and forkserver
    both do, semaphores or not)."""
    return multiprocessing.get_context("spawn")


def pool(settings: WorkerSettings, workers: int) -> ProcessPoolExecutor:
    """A pool of `workers` worker processes, each set up with init(settings) when it starts.
    (Imported here: the lifecycle-event listener, a process of its own, has no pool.)"""
    from concurrent.futures import ProcessPoolExecutor
    return ProcessPoolExecutor(workers, mp_context=context(), initializer=init, initargs=(settings,))


def init(settings: WorkerSettings) -> None:
    """Pool initializer, run in each new worker process."""
    from etcd_compute.ecompute import worker
    worker.init(settings)


EVENTS_PROCESS = "ecompute-events"  # the lifecycle-event listener's process name (ps, psutil)


def watch_events(settings: WorkerSettings, events: Queue[str]) -> None:
    """The lifecycle-event listener process's entry (see worker.watch_events)."""
    from etcd_compute.ecompute import worker
    worker.watch_events(settings, events)


def run(job: Job) -> JobResult:
    """Run one job in a worker process (the pool pickles this function by name)."""
    from etcd_compute.ecompute import worker
    return worker.run(job)
