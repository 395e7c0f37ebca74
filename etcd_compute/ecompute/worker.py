"""The jobs, as they run in ecompute's worker processes: everything that touches the hypervisor.

Workers are spawned, never forked from the daemon (pool.context), so they never share its
gRPC channel; each keeps one hypervisor connection for its life. Jobs never raise: they
return a JobResult for the daemon to report. A failed build removes whatever it had made,
so an ERROR instance leaves nothing on disk. An idle worker holds only the driver: images
and the config drive (yaml, hashing, downloads) load with the first build.

No job starts or resumes a domain unless the host's lease is proven for the job's epoch
(the fence's proof file, fence.py): a worker that was busy while its daemon lost the
lease, or hung, cannot bring a domain back behind the fence. A Worker runs jobs against
one driver: in its process (serve()), or in the daemon's own process in tests (fake driver).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing import Queue
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

from etcd_compute import guestdata
from etcd_compute.ecompute import driver, lifecycle
from etcd_compute.ecompute import proof as fence
from etcd_compute.ecompute.fakedriver import open_driver
from etcd_compute.ecompute.jobs import (
    EVENTS_PROCESS,
    VOLUME_RELEASE_TIMEOUT,
    Job,
    JobKind,
    JobResult,
    WorkerSettings,
    cancel_marker,
    hurry_marker,
)
from etcd_compute.states import Actual

if TYPE_CHECKING:
    from etcd_compute.contract import Request, VolumeRef
    from etcd_compute.ecompute import images
    from etcd_compute.ecompute.storage import RbdStorage

LOG = logging.getLogger(__name__)
PR_SET_PDEATHSIG, PR_SET_NAME = 1, 15  # linux/prctl.h
START_SLACK = 0.5  # seconds of proven lease a job needs left to start a domain


def init(settings: WorkerSettings) -> None:
    """A worker process's set-up: Ctrl-C goes to the whole process group and only the daemon
    acts on it; the worker dies with the daemon; it logs as the daemon does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with(settings.daemon_pid)
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")


def _die_with(daemon_pid: int) -> None:
    """Have the kernel SIGKILL this worker when the daemon dies (even by SIGKILL), so a
    restarted daemon never races a leftover worker over the same instance."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the pool's own pipe checks remain
        return
    if os.getppid() != daemon_pid:  # it died before we asked
        os._exit(1)


def serve(settings: WorkerSettings, conn: Connection) -> None:
    """A worker process: run each job the daemon sends, send its result back, until the pipe closes."""
    init(settings)
    worker = Worker(settings)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(worker.run(job))


def watch_events(settings: WorkerSettings, events: Queue[str]) -> None:
    """The lifecycle-event listener's process: the uuid of each of our domains whose power state
    changed goes to `events` (the daemon then compares the hypervisor with etcd at once)."""
    init(settings)
    with contextlib.suppress(OSError, AttributeError):  # `ps` tells it from the workers
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, EVENTS_PROCESS.encode())
    lifecycle.watch_lifecycle(settings.uri, events.put)


class BuildRefused(Exception):
    """The request cannot be built as it is; the message is the instance's ERROR reason."""


class Fenced(Exception):
    """The host's lease is not proven for this job: it must not start a domain."""


class Worker:
    """Runs jobs against one hypervisor driver."""

    def __init__(self, settings: WorkerSettings, drv: driver.Driver | None = None) -> None:
        self.cfg = settings
        self.drv = drv or open_driver(settings.uri, settings.domain_type, settings.instances_path)
        self.rbd: RbdStorage | None = None
        if settings.rbd is not None:
            from etcd_compute.ecompute.storage import RbdStorage
            self.rbd = RbdStorage(settings.rbd)
        self._runners: dict[JobKind, Callable[[Job], JobResult]] = {
            JobKind.PREPARE: self.prepare, JobKind.BUILD: self.build, JobKind.POWER: self.power,
            JobKind.REBOOT: self.reboot, JobKind.VOLUMES: self.volumes, JobKind.DESTROY: self.destroy,
            JobKind.REMOVE_ORPHAN: self.remove_orphan,
            JobKind.LIST_DOMAINS: self.list_domains, JobKind.DOMAIN_STATS: self.domain_stats,
            JobKind.MODULES: lambda job: JobResult(ok=True, modules=tuple(sorted(sys.modules))),
        }

    def run(self, job: Job) -> JobResult:
        """Run `job`; its result says how long it took (the daemon's histograms)."""
        started = time.monotonic()
        try:
            result = self._runners[job.kind](job)
        except Fenced as exc:
            LOG.warning("%s of %s not carried out: %s", job.kind.value, job.uuid, exc)
            result = JobResult(ok=False, fenced=True, reason=str(exc))
        except driver.HypervisorUnavailable as exc:
            result = JobResult(ok=False, hypervisor_down=True, reason=str(exc))
        except Exception as exc:  # noqa: BLE001 - a job must always report back
            LOG.exception("%s of %s failed", job.kind.value, job.uuid)
            result = JobResult(ok=False, reason=f"{job.kind.value} failed: {exc!r}")
        return replace(result, seconds=time.monotonic() - started)

    def may_start(self, job: Job) -> None:
        """Raise Fenced unless the host's lease is proven for `job`'s epoch, with a little time left."""
        if self.cfg.proof is None:
            return
        why = fence.lapsed(fence.read_proof(Path(self.cfg.proof)), job.epoch, slack=START_SLACK)
        if why:
            raise Fenced(why)

    def _network(self) -> driver.NetworkSpec | None:
        net = self.cfg.network
        return driver.NetworkSpec(**net) if net else None  # type: ignore[arg-type]

    def _network_name(self) -> str | None:
        net = self.cfg.network
        return str(net["name"]) if net else None

    def prepare(self, job: Job) -> JobResult:
        """Host set-up before the first build: instances directory, storage pool, network."""
        self.drv.prepare(self._network())
        return JobResult(ok=True)

    def build(self, job: Job) -> JobResult:
        """Build the instance; whatever happens, the cancel marker (the daemon's "it was deleted
        meanwhile") is gone afterwards, so it cannot stop a later build of the same uuid."""
        try:
            return self._build(job)
        finally:
            self._drop_cancel_marker(job.uuid)

    def _drop_cancel_marker(self, uuid: str) -> None:
        try:
            cancel_marker(self.cfg.instances_path, uuid).unlink(missing_ok=True)
        except (OSError, ValueError) as exc:  # a job must still report back
            LOG.warning("cannot remove the cancel marker of %s: %s", uuid, exc)

    def _build(self, job: Job) -> JobResult:
        from etcd_compute.ecompute import images  # what only a build uses loads with the first build
        assert job.request is not None
        uuid, cfg, drv = job.uuid, self.cfg, self.drv
        started = time.monotonic()
        made: list[str] = []  # what this build made in shared storage (removed if it fails)
        try:
            spec = self._domain_spec(uuid, job.request, made, job.volumes)
            ip_seconds = time.monotonic() - started if spec.ip else None  # reserved before the boot
            self.may_start(job)
            info = drv.ensure_running(spec)
            ip, reason = spec.ip, None
            if spec.bridge:  # another's DHCP server: the address shows once the guest has asked for one
                ip = drv.wait_for_address(uuid, cfg.ip_timeout)
                ip_seconds = time.monotonic() - started if ip else None
                if ip is None:
                    reason = f"no IP address seen within {cfg.ip_timeout:.0f}s"
        except (Fenced, driver.HypervisorUnavailable):
            raise  # neither is the instance's failure: nothing to clean up, nothing to record
        except Exception as exc:  # noqa: BLE001 - any failure is the instance's ERROR reason
            LOG.warning("build of %s failed: %s", uuid, exc,
                        exc_info=not isinstance(exc, images.ImageError | BuildRefused))
            try:
                drv.destroy(uuid, self._network_name())  # leave nothing behind (a disk it found, it keeps)
                if made and self.rbd is not None:
                    self.rbd.remove_root_disk(uuid)
            except Exception:  # noqa: BLE001
                LOG.exception("cleanup after the failed build of %s failed", uuid)
            return JobResult(ok=False, reason=str(exc))
        LOG.info("instance %s running as %s, address %s", uuid, info.name, ip)
        return JobResult(ok=True, domain=info.record(), power=info.power, ip=ip, reason=reason,
                         ip_seconds=ip_seconds, disk_kept=spec.rbd is not None and not made, booted_at=info.booted_at,
                         volumes=self._attached(uuid))

    def _domain_spec(self, uuid: str, request: Request, made: list[str],
                     volumes: tuple[VolumeRef, ...] = ()) -> driver.DomainSpec:
        from etcd_compute.ecompute import configdrive, images
        from etcd_compute.rbd import snapshot_image
        cfg, drv = self.cfg, self.drv
        resources = request["resources"]
        uncharged = [rc for rc in ("VCPU", "MEMORY_MB") if not resources.get(rc)]
        if request.get("image") and not resources.get("DISK_GB"):
            uncharged.append("DISK_GB")
        if uncharged:  # every resource the domain uses must be allocated in Placement
            raise BuildRefused(f"the request allocates no {' or '.join(uncharged)}; the domain would use "
                               "resources Placement never counted")
        files = drv.files(uuid)
        disk, rbd = None, None
        allocated = resources.get("DISK_GB", 0) << 30
        snapshot = snapshot_image(request.get("image"))  # (etcd_compute.rbd: loaded with jobs)
        if request.get("image") and self.rbd is not None and self.rbd.has_root_disk(uuid):
            rbd, _ = self.rbd.root_disk(uuid, None, allocated)  # moved here: its own disk, with its data
        elif snapshot is not None:  # a snapshot in Ceph (eschedule snapshot): cloned as it is, nothing fetched
            if self.rbd is None or snapshot[0] != self.rbd.settings.pool:
                where = f"in pool {self.rbd.settings.pool}" if self.rbd else "local"
                raise BuildRefused(f"image {request.get('image_name') or request['image']} is a snapshot in Ceph pool "
                                   f"{snapshot[0]}: this host's disks are {where}")
            rbd, created = self.rbd.clone_disk(uuid, f"{snapshot[1]}@base", allocated)
            made += [rbd.name] if created else []
        elif request.get("image"):
            image = self._fetch(uuid, request["image"] or "", request.get("image_sha256"))
            size = image.virtual_size
            if allocated and image.virtual_size > allocated:
                raise images.ImageError(f"image is {image.virtual_size / 2**30:.1f} GiB, more than the "
                                        f"{resources['DISK_GB']} GiB of DISK_GB allocated")
            if cfg.resize and allocated:
                size = allocated
            if self.rbd is not None:
                rbd, created = self.rbd.root_disk(uuid, image, size)
                made += [rbd.name] if created else []
            else:
                disk = drv.create_disk(uuid, str(image.path), image.format, size)
        boot = request.get("boot") or {"kernel": None, "initrd": None, "cmdline": None}
        kernel, initrd = (self._fetch(uuid, ref, kind="file").path if ref else None
                          for ref in (boot["kernel"], boot["initrd"]))
        drive = None
        if cfg.config_drive and guestdata.config_drive_wanted(request):
            configdrive.write_config_drive(request, files.config_drive, cfg.metadata_url)
            drive = str(files.config_drive)
        net = self._network()
        ip = drv.reserve_address(uuid, net.name) if net else None
        attached = drv.volumes(uuid) if volumes and drv.lookup(uuid) is not None else {}
        return driver.DomainSpec(
            uuid, vcpus=resources["VCPU"], memory_mb=resources["MEMORY_MB"],
            disk=disk, rbd=rbd, config_drive=drive, console_log=str(files.console_log),
            kernel=str(kernel) if kernel else None, initrd=str(initrd) if initrd else None,
            cmdline=boot.get("cmdline"), network=net.name if net else None, bridge=cfg.bridge, ip=ip,
            owner=cfg.host, volumes=tuple(self._volume(ref, ref["id"] in attached) for ref in volumes))

    def _volume(self, ref: VolumeRef, attached: bool) -> driver.VolumeDisk:
        """A volume to attach, taken over in the pool unless the domain has it `attached` already."""
        if self.rbd is None:
            raise driver.DriverError(f"volume {ref['id']}: this host has no Ceph pool, so it attaches no volumes")
        return self.rbd.volume(ref, attached)

    def _attached(self, uuid: str) -> tuple[tuple[str, str], ...] | None:
        """(id, device) of the volumes the domain has now; None if that cannot be known."""
        try:
            return tuple(self.drv.volumes(uuid).items()) if self.drv.lookup(uuid) is not None else ()
        except driver.DriverError as exc:
            LOG.warning("cannot read the volumes of %s: %s", uuid, exc)
            return None

    def volumes(self, job: Job) -> JobResult:
        """Detach what the domain has and the job does not name, then attach what it names, in
        order (live and in its definition while it runs, in the definition only while it is off).
        What is attached in the end is reported also when a step failed."""
        uuid, drv = job.uuid, self.drv
        if drv.lookup(uuid) is None:
            return JobResult(ok=False, missing=True, reason="volumes failed: the domain is gone")
        try:
            attached = drv.volumes(uuid)
            wanted = {ref["id"] for ref in job.volumes}
            for volume in [v for v in attached if v not in wanted]:
                drv.detach_volume(uuid, volume, VOLUME_RELEASE_TIMEOUT)
            for ref in job.volumes:
                if ref["id"] not in attached:
                    self.may_start(job)  # its take-over blocklists whoever has it: never behind the fence
                    drv.attach_volume(uuid, self._volume(ref, attached=False))
        except (Fenced, driver.HypervisorUnavailable):
            raise
        except Exception as exc:  # noqa: BLE001 - any failure is reported, the next reconcile decides
            LOG.warning("volumes of %s: %s", uuid, exc, exc_info=not isinstance(exc, driver.DriverError))
            return JobResult(ok=False, reason=str(exc), volumes=self._attached(uuid))
        return JobResult(ok=True, volumes=self._attached(uuid))

    def _fetch(self, uuid: str, ref: str, sha256: str | None = None, kind: str = "disk") -> images.Image:
        """An image, kernel or initrd through the cache, within the host's limits: local files only
        from the operator's image_dirs (never the instances' own files), at most image_max_bytes,
        at image_download's pace, stopped once the daemon marks the instance deleted (its cancel marker)."""
        from etcd_compute.ecompute import images
        cfg = self.cfg
        return images.fetch(ref, cfg.image_cache_path, sha256, kind, allowed_dirs=cfg.image_dirs,
                            private_dirs=(cfg.instances_path,), max_bytes=cfg.image_max_bytes,
                            cancel=cancel_marker(cfg.instances_path, uuid),
                            pace=images.Pace(cfg.image_deadline, cfg.image_min_rate, cfg.image_rate_window))

    def power(self, job: Job) -> JobResult:
        target = job.power
        assert target is not None
        if target != Actual.STOPPED:
            self.may_start(job)  # running and resuming both let a guest run
        return self._on_domain(job, str(target), lambda drv: drv.set_power(job.uuid, target, self._shutdown(job)))

    def reboot(self, job: Job) -> JobResult:
        def reboot(drv: driver.Driver) -> driver.DomainInfo:
            self.may_start(job)
            return drv.reboot(job.uuid, self._shutdown(job))
        return self._on_domain(job, "reboot", reboot)

    def _shutdown(self, job: Job) -> driver.Shutdown:
        """The guest's shutdown as the request asked (the host's stop_timeout unless it said);
        a `--force` the daemon marks while it waits (hurry_marker) pulls the plug then. A marker
        left from an earlier job is stale: removed first."""
        marker = hurry_marker(self.cfg.instances_path, job.uuid)
        marker.unlink(missing_ok=True)
        timeout = self.cfg.stop_timeout if job.stop_timeout is None else job.stop_timeout
        return driver.Shutdown(timeout, job.force, hurry=marker.exists)

    def _on_domain(self, job: Job, what: str, act: Callable[[driver.Driver], driver.DomainInfo]) -> JobResult:
        """Act on an existing domain; a failure says whether the domain was there at all."""
        try:
            info = act(self.drv)
        except (Fenced, driver.HypervisorUnavailable):
            raise
        except Exception as exc:  # noqa: BLE001 - any failure is reported, the next reconcile decides
            LOG.warning("%s of %s failed: %s", what, job.uuid, exc)
            return JobResult(ok=False, reason=f"{what} failed: {exc}", missing=self.drv.lookup(job.uuid) is None)
        finally:
            with contextlib.suppress(OSError, ValueError):
                hurry_marker(self.cfg.instances_path, job.uuid).unlink(missing_ok=True)
        return JobResult(ok=True, domain=info.record(), power=info.power, reason=info.note, booted_at=info.booted_at)

    def list_domains(self, job: Job) -> JobResult:
        """The instances this hypervisor runs for this host (for finding orphans)."""
        found = self.drv.list_domains(owner=self.cfg.host)
        return JobResult(ok=True, domains=tuple((uuid, info.observed) for uuid, info in found.items()),
                         disk_failed=tuple(sorted(uuid for uuid, info in found.items() if info.ioerror)))

    def domain_stats(self, job: Job) -> JobResult:
        """The counters of this host's running domains, for the daemon's /metrics."""
        stats = self.drv.domain_stats(owner=self.cfg.host)
        return JobResult(ok=True, stats=tuple((uuid, s.values()) for uuid, s in stats.items()))

    def destroy(self, job: Job) -> JobResult:
        """The instance is deleted: its domain, its files and its disk, wherever that is; never its
        volumes' images (they outlive it: only the user's side removes them)."""
        result = self.remove_orphan(job)
        if self.rbd is not None and self.rbd.remove_root_disk(job.uuid):
            LOG.info("instance %s: its disk in Ceph removed", job.uuid)
        return result

    def remove_orphan(self, job: Job) -> JobResult:
        """The domain and the files on this host of an instance that is not (or no longer) this
        host's: never a disk in shared storage, which its new host may run on."""
        removed = self.drv.destroy(job.uuid, self._network_name())
        self._drop_cancel_marker(job.uuid)  # the daemon may have set it just after the build ended
        LOG.info("instance %s destroyed%s", job.uuid, "" if removed else " (it was already gone)")
        return JobResult(ok=True)
