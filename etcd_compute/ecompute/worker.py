"""The jobs, as they run in ecompute's worker processes: everything that touches the hypervisor.

Workers are spawned (not forked) before the daemon opens its etcd connection, so
they never share its gRPC channel; each keeps one hypervisor connection for its
life. Jobs never raise: they return a JobResult for the daemon to report. A failed
build removes whatever it had made, so an ERROR instance leaves nothing on disk.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
from collections.abc import Callable

from etcd_compute.contract import Request
from etcd_compute.ecompute import configdrive, driver, images
from etcd_compute.ecompute.jobs import Job, JobKind, JobResult, WorkerSettings

LOG = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
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


def _cfg() -> WorkerSettings:
    return _settings[0]


def _driver() -> driver.Driver:
    cfg = _cfg()
    return driver.get_driver(cfg.uri, cfg.domain_type, cfg.instances_path)


def _network() -> driver.NetworkSpec | None:
    net = _cfg().network
    return driver.NetworkSpec(**net) if net else None  # type: ignore[arg-type]


def run(job: Job) -> JobResult:
    return _RUNNERS[job.kind](job)


def prepare(job: Job) -> JobResult:
    """Host set-up before the first build: instances directory, storage pool, network."""
    _driver().prepare(_network())
    return JobResult(ok=True)


def build(job: Job) -> JobResult:
    assert job.request is not None
    uuid, cfg, drv = job.uuid, _cfg(), _driver()
    try:
        spec = _domain_spec(drv, uuid, job.request)
        info = drv.ensure_running(spec)
        ip, reason = None, None
        if spec.network or spec.bridge:
            ip = drv.wait_for_address(uuid, cfg.ip_timeout)
            if ip is None:
                reason = f"no IP address seen within {cfg.ip_timeout:.0f}s"
    except Exception as exc:  # noqa: BLE001 - any failure is the instance's ERROR reason
        LOG.warning("build of %s failed: %s", uuid, exc, exc_info=not isinstance(exc, images.ImageError))
        try:
            drv.destroy(uuid)  # leave nothing behind
        except Exception:  # noqa: BLE001
            LOG.exception("cleanup after the failed build of %s failed", uuid)
        return JobResult(ok=False, reason=str(exc))
    LOG.info("instance %s running as %s, address %s", uuid, info.name, ip)
    return JobResult(ok=True, domain=info.record(), power=info.power, ip=ip, reason=reason)


def _domain_spec(drv: driver.Driver, uuid: str, request: Request) -> driver.DomainSpec:
    cfg = _cfg()
    resources = request["resources"]
    files = drv.files(uuid)
    disk = None
    if request.get("image"):
        image = images.fetch(request["image"] or "", cfg.image_cache_path, request.get("image_sha256"))
        size = image.virtual_size
        allocated = resources.get("DISK_GB", 0) << 30
        if allocated and image.virtual_size > allocated:
            raise images.ImageError(f"image is {image.virtual_size / 2**30:.1f} GiB, more than the "
                                    f"{resources['DISK_GB']} GiB of DISK_GB allocated")
        if cfg.resize and allocated:
            size = allocated
        disk = drv.create_disk(uuid, str(image.path), image.format, size)
    boot = request.get("boot") or {"kernel": None, "initrd": None, "cmdline": None}
    kernel, initrd = (images.fetch(ref, cfg.image_cache_path, kind="file").path if ref else None
                      for ref in (boot["kernel"], boot["initrd"]))
    configdrive.write_config_drive(request, files.config_drive)
    net = _network()
    return driver.DomainSpec(
        uuid, vcpus=resources.get("VCPU", 1), memory_mb=resources.get("MEMORY_MB", 256),
        disk=disk, config_drive=str(files.config_drive), console_log=str(files.console_log),
        kernel=str(kernel) if kernel else None, initrd=str(initrd) if initrd else None,
        cmdline=boot.get("cmdline"), network=net.name if net else None, bridge=cfg.bridge,
        owner=cfg.host)


def power(job: Job) -> JobResult:
    assert job.power is not None
    drv = _driver()
    try:
        info = drv.set_power(job.uuid, job.power, _cfg().stop_timeout)
    except Exception as exc:  # noqa: BLE001
        LOG.warning("power %s of %s failed: %s", job.power, job.uuid, exc)
        return JobResult(ok=False, reason=f"{job.power} failed: {exc}", missing=drv.lookup(job.uuid) is None)
    return JobResult(ok=True, domain=info.record(), power=info.power)


def reboot(job: Job) -> JobResult:
    drv = _driver()
    try:
        info = drv.reboot(job.uuid)
    except Exception as exc:  # noqa: BLE001
        LOG.warning("reboot of %s failed: %s", job.uuid, exc)
        return JobResult(ok=False, reason=f"reboot failed: {exc}", missing=drv.lookup(job.uuid) is None)
    return JobResult(ok=True, domain=info.record(), power=info.power)


def list_domains(job: Job) -> JobResult:
    """The instances this hypervisor runs for this host (for finding orphans)."""
    try:
        return JobResult(ok=True, domains=tuple(_driver().list_domains(owner=_cfg().host).items()))
    except Exception as exc:  # noqa: BLE001
        return JobResult(ok=False, reason=str(exc))


def destroy(job: Job) -> JobResult:
    try:
        removed = _driver().destroy(job.uuid)
    except Exception as exc:  # noqa: BLE001
        LOG.exception("destroy of %s failed", job.uuid)
        return JobResult(ok=False, reason=f"destroy failed: {exc}")
    LOG.info("instance %s destroyed%s", job.uuid, "" if removed else " (it was already gone)")
    return JobResult(ok=True)


_RUNNERS: dict[JobKind, Callable[[Job], JobResult]] = {
    JobKind.PREPARE: prepare, JobKind.BUILD: build, JobKind.POWER: power, JobKind.REBOOT: reboot,
    JobKind.DESTROY: destroy, JobKind.REMOVE_ORPHAN: destroy, JobKind.LIST_DOMAINS: list_domains,
}
