"""The jobs, as they run in ecompute's worker processes: everything that touches the hypervisor.

Workers are spawned, never forked from the daemon (jobs.context), so they never share its
gRPC channel; each keeps one hypervisor connection for its life. Jobs never raise:
they return a JobResult for the daemon to report. A failed build removes whatever it
had made, so an ERROR instance leaves nothing on disk. An idle worker holds only the
driver: images and the config drive (yaml, hashing, downloads) load with the first build.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing import Queue
from typing import TYPE_CHECKING

from etcd_compute.ecompute import driver
from etcd_compute.ecompute.jobs import EVENTS_PROCESS, Job, JobKind, JobResult, WorkerSettings, cancel_marker

if TYPE_CHECKING:
    from etcd_compute.contract import Request
    from etcd_compute.ecompute import images

LOG = logging.getLogger(__name__)
PR_SET_PDEATHSIG, PR_SET_NAME = 1, 15  # linux/prctl.h
_settings: list[WorkerSettings] = []


def init(settings: WorkerSettings) -> None:
    """Ctrl-C goes to the whole process group; only the daemon acts on it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with(settings.daemon_pid)
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    _settings[:] = [settings]


def _die_with(daemon_pid: int) -> None:
    """Have the kernel SIGKILL this worker when the daemon dies (even by SIGKILL), so a
    restarted daemon never races a leftover worker over the same instance."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the pool's own pipe checks remain
        return
    if os.getppid() != daemon_pid:  # it died before we asked
        os._exit(1)


def watch_events(settings: WorkerSettings, events: Queue[str]) -> None:
    """The lifecycle-event listener's process: the uuid of each of our domains whose power state
    changed goes to `events` (the daemon then compares the hypervisor with etcd at once)."""
    init(settings)
    with contextlib.suppress(OSError, AttributeError):  # `ps` tells it from the workers
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, EVENTS_PROCESS.encode())
    driver.watch_lifecycle(settings.uri, events.put)


def _cfg() -> WorkerSettings:
    return _settings[0]


def _driver() -> driver.Driver:
    cfg = _cfg()
    return driver.get_driver(cfg.uri, cfg.domain_type, cfg.instances_path)


def _network() -> driver.NetworkSpec | None:
    net = _cfg().network
    return driver.NetworkSpec(**net) if net else None  # type: ignore[arg-type]


def _network_name() -> str | None:
    net = _cfg().network
    return str(net["name"]) if net else None


def run(job: Job) -> JobResult:
    """Run `job`; its result says how long it took (the daemon's histograms)."""
    started = time.monotonic()
    result = _RUNNERS[job.kind](job)
    return replace(result, seconds=time.monotonic() - started)


def prepare(job: Job) -> JobResult:
    """Host set-up before the first build: instances directory, storage pool, network."""
    _driver().prepare(_network())
    return JobResult(ok=True)


def build(job: Job) -> JobResult:
    """Build the instance; whatever happens, the cancel marker (the daemon's "it was deleted
    meanwhile") is gone afterwards, so it cannot stop a later build of the same uuid."""
    try:
        return _build(job)
    finally:
        _drop_cancel_marker(job.uuid)


def _drop_cancel_marker(uuid: str) -> None:
    try:
        cancel_marker(_cfg().instances_path, uuid).unlink(missing_ok=True)
    except (OSError, ValueError) as exc:  # a job must still report back
        LOG.warning("cannot remove the cancel marker of %s: %s", uuid, exc)


def _build(job: Job) -> JobResult:
    from etcd_compute.ecompute import images  # what only a build uses loads with the first build
    assert job.request is not None
    uuid, cfg, drv = job.uuid, _cfg(), _driver()
    started = time.monotonic()
    try:
        spec = _domain_spec(drv, uuid, job.request)
        ip_seconds = time.monotonic() - started if spec.ip else None  # reserved before the boot
        info = drv.ensure_running(spec)
        ip, reason = spec.ip, None
        if spec.bridge:  # another's DHCP server: the address shows once the guest has asked for one
            ip = drv.wait_for_address(uuid, cfg.ip_timeout)
            ip_seconds = time.monotonic() - started if ip else None
            if ip is None:
                reason = f"no IP address seen within {cfg.ip_timeout:.0f}s"
    except Exception as exc:  # noqa: BLE001 - any failure is the instance's ERROR reason
        LOG.warning("build of %s failed: %s", uuid, exc,
                    exc_info=not isinstance(exc, images.ImageError | BuildRefused))
        try:
            drv.destroy(uuid, _network_name())  # leave nothing behind
        except Exception:  # noqa: BLE001
            LOG.exception("cleanup after the failed build of %s failed", uuid)
        return JobResult(ok=False, reason=str(exc))
    LOG.info("instance %s running as %s, address %s", uuid, info.name, ip)
    return JobResult(ok=True, domain=info.record(), power=info.power, ip=ip, reason=reason, ip_seconds=ip_seconds)


class BuildRefused(Exception):
    """The request cannot be built as it is; the message is the instance's ERROR reason."""


def _domain_spec(drv: driver.Driver, uuid: str, request: Request) -> driver.DomainSpec:
    from etcd_compute.ecompute import configdrive, images
    cfg = _cfg()
    resources = request["resources"]
    uncharged = [rc for rc in ("VCPU", "MEMORY_MB") if not resources.get(rc)]
    if request.get("image") and not resources.get("DISK_GB"):
        uncharged.append("DISK_GB")
    if uncharged:  # every resource the domain uses must be allocated in Placement
        raise BuildRefused(f"the request allocates no {' or '.join(uncharged)}; the domain would use "
                           "resources Placement never counted")
    files = drv.files(uuid)
    disk = None
    if request.get("image"):
        image = _fetch(uuid, request["image"] or "", request.get("image_sha256"))
        size = image.virtual_size
        allocated = resources.get("DISK_GB", 0) << 30
        if allocated and image.virtual_size > allocated:
            raise images.ImageError(f"image is {image.virtual_size / 2**30:.1f} GiB, more than the "
                                    f"{resources['DISK_GB']} GiB of DISK_GB allocated")
        if cfg.resize and allocated:
            size = allocated
        disk = drv.create_disk(uuid, str(image.path), image.format, size)
    boot = request.get("boot") or {"kernel": None, "initrd": None, "cmdline": None}
    kernel, initrd = (_fetch(uuid, ref, kind="file").path if ref else None
                      for ref in (boot["kernel"], boot["initrd"]))
    configdrive.write_config_drive(request, files.config_drive)
    net = _network()
    ip = drv.reserve_address(uuid, net.name) if net else None
    return driver.DomainSpec(
        uuid, vcpus=resources["VCPU"], memory_mb=resources["MEMORY_MB"],
        disk=disk, config_drive=str(files.config_drive), console_log=str(files.console_log),
        kernel=str(kernel) if kernel else None, initrd=str(initrd) if initrd else None,
        cmdline=boot.get("cmdline"), network=net.name if net else None, bridge=cfg.bridge, ip=ip,
        owner=cfg.host)


def _fetch(uuid: str, ref: str, sha256: str | None = None, kind: str = "disk") -> images.Image:
    """An image, kernel or initrd through the cache, within the host's limits: local files only
    from the operator's image_dirs (never the instances' own files), at most image_max_bytes,
    stopped once the daemon marks the instance deleted (its cancel marker)."""
    from etcd_compute.ecompute import images
    cfg = _cfg()
    return images.fetch(ref, cfg.image_cache_path, sha256, kind, allowed_dirs=cfg.image_dirs,
                        private_dirs=(cfg.instances_path,), max_bytes=cfg.image_max_bytes,
                        cancel=cancel_marker(cfg.instances_path, uuid))


def power(job: Job) -> JobResult:
    power = job.power
    assert power is not None
    return _on_domain(job, str(power), lambda drv: drv.set_power(job.uuid, power, _cfg().stop_timeout))


def reboot(job: Job) -> JobResult:
    return _on_domain(job, "reboot", lambda drv: drv.reboot(job.uuid, _cfg().stop_timeout))


def _on_domain(job: Job, what: str, act: Callable[[driver.Driver], driver.DomainInfo]) -> JobResult:
    """Act on an existing domain; a failure says whether the domain was there at all."""
    drv = _driver()
    try:
        info = act(drv)
    except Exception as exc:  # noqa: BLE001 - any failure is reported, the next reconcile decides
        LOG.warning("%s of %s failed: %s", what, job.uuid, exc)
        return JobResult(ok=False, reason=f"{what} failed: {exc}", missing=drv.lookup(job.uuid) is None)
    return JobResult(ok=True, domain=info.record(), power=info.power, reason=info.note)


def list_domains(job: Job) -> JobResult:
    """The instances this hypervisor runs for this host (for finding orphans)."""
    try:
        return JobResult(ok=True, domains=tuple(_driver().list_domains(owner=_cfg().host).items()))
    except Exception as exc:  # noqa: BLE001
        return JobResult(ok=False, reason=str(exc))


def domain_stats(job: Job) -> JobResult:
    """The counters of this host's running domains, for the daemon's /metrics."""
    try:
        stats = _driver().domain_stats(owner=_cfg().host)
    except Exception as exc:  # noqa: BLE001 - a scrape goes on without them
        return JobResult(ok=False, reason=str(exc))
    return JobResult(ok=True, stats=tuple((uuid, s.values()) for uuid, s in stats.items()))


def destroy(job: Job) -> JobResult:
    try:
        removed = _driver().destroy(job.uuid, _network_name())
    except Exception as exc:  # noqa: BLE001
        LOG.exception("destroy of %s failed", job.uuid)
        return JobResult(ok=False, reason=f"destroy failed: {exc}")
    _drop_cancel_marker(job.uuid)  # the daemon may have set it just after the build ended
    LOG.info("instance %s destroyed%s", job.uuid, "" if removed else " (it was already gone)")
    return JobResult(ok=True)


_RUNNERS: dict[JobKind, Callable[[Job], JobResult]] = {
    JobKind.PREPARE: prepare, JobKind.BUILD: build, JobKind.POWER: power, JobKind.REBOOT: reboot,
    JobKind.DESTROY: destroy, JobKind.REMOVE_ORPHAN: destroy, JobKind.LIST_DOMAINS: list_domains,
    JobKind.DOMAIN_STATS: domain_stats,
}
