"""Jobs that run in ecompute's worker processes: everything that touches the hypervisor.

Workers are spawned (not forked) before the daemon opens its etcd connection, so
they never share its gRPC channel; each keeps one hypervisor connection for its
life. Jobs never raise: they return {"ok": bool, ...} for the daemon to report.
A failed build removes whatever it had made, so an ERROR instance leaves nothing
on disk.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
from typing import Any

from etcd_compute import cloudinit, driver, images

LOG = logging.getLogger(__name__)
_settings: dict[str, Any] = {}


def init(settings: dict[str, Any]) -> None:
    """Pool initializer: Ctrl-C goes to the whole process group; only the daemon acts on it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=settings["log_level"],
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    _settings.update(settings)


def _driver() -> driver.Driver:
    return driver.get_driver(_settings["uri"], _settings["domain_type"], _settings["instances_path"])


def prepare() -> dict[str, Any]:
    """Host set-up before the first build: instances directory, storage pool, network."""
    net = _settings.get("network")
    _driver().prepare(driver.NetworkSpec(**net) if net else None)
    return {"ok": True}


def build(uuid: str, request: dict[str, Any]) -> dict[str, Any]:
    drv = _driver()
    try:
        spec = _domain_spec(drv, uuid, request)
        info = drv.ensure_running(spec)
        ip, reason = None, None
        if spec.network or spec.bridge:
            ip = drv.wait_for_address(uuid, _settings["ip_timeout"])
            if ip is None:
                reason = f"no IP address seen within {_settings['ip_timeout']:.0f}s"
    except Exception as exc:  # any failure is the instance's ERROR reason
        LOG.warning("build of %s failed: %s", uuid, exc, exc_info=not isinstance(exc, images.ImageError))
        try:
            drv.destroy(uuid)  # leave nothing behind
        except Exception:
            LOG.exception("cleanup after the failed build of %s failed", uuid)
        return {"ok": False, "reason": str(exc)}
    LOG.info("instance %s running as %s, address %s", uuid, info.name, ip)
    return {"ok": True, "domain": dataclasses.asdict(info), "ip": ip, "reason": reason}


def _domain_spec(drv: driver.Driver, uuid: str, request: dict[str, Any]) -> driver.DomainSpec:
    resources = request["resources"]
    cache = _settings["image_cache_path"]
    files = drv.files(uuid)
    disk = None
    if request.get("image"):
        image = images.fetch(request["image"], cache, request.get("image_sha256"))
        size = image.virtual_size
        allocated = resources.get("DISK_GB", 0) << 30
        if allocated and image.virtual_size > allocated:
            raise images.ImageError(f"image is {image.virtual_size / 2**30:.1f} GiB, more than the "
                                    f"{resources['DISK_GB']} GiB of DISK_GB allocated")
        if _settings["resize"] and allocated:
            size = allocated
        disk = drv.create_disk(uuid, str(image.path), image.format, size)
    boot = request.get("boot") or {}
    kernel = images.fetch(boot["kernel"], cache, kind="file").path if boot.get("kernel") else None
    initrd = images.fetch(boot["initrd"], cache, kind="file").path if boot.get("initrd") else None
    cloudinit.write_config_drive(request, files.config_drive)
    net = _settings.get("network")
    return driver.DomainSpec(
        uuid, vcpus=resources.get("VCPU", 1), memory_mb=resources.get("MEMORY_MB", 256),
        disk=disk, config_drive=str(files.config_drive), console_log=str(files.console_log),
        kernel=str(kernel) if kernel else None, initrd=str(initrd) if initrd else None,
        cmdline=boot.get("cmdline"), network=net["name"] if net else None, bridge=_settings.get("bridge"),
        owner=_settings["host"])


def power(uuid: str, target: str) -> dict[str, Any]:
    """running | shutoff | paused."""
    drv = _driver()
    try:
        info = drv.set_power(uuid, target, _settings["stop_timeout"])
    except Exception as exc:
        LOG.warning("power %s of %s failed: %s", target, uuid, exc)
        return {"ok": False, "reason": f"{target} failed: {exc}", "missing": drv.lookup(uuid) is None}
    return {"ok": True, "domain": dataclasses.asdict(info)}


def reboot(uuid: str) -> dict[str, Any]:
    drv = _driver()
    try:
        info = drv.reboot(uuid)
    except Exception as exc:
        LOG.warning("reboot of %s failed: %s", uuid, exc)
        return {"ok": False, "reason": f"reboot failed: {exc}", "missing": drv.lookup(uuid) is None}
    return {"ok": True, "domain": dataclasses.asdict(info)}


def domains() -> dict[str, Any]:
    """The instances this hypervisor runs (for finding orphans)."""
    try:
        return {"ok": True, "uuids": _driver().list_uuids(owner=_settings["host"])}
    except Exception as exc:
        return {"ok": False, "reason": str(exc)}


def destroy(uuid: str) -> dict[str, Any]:
    try:
        removed = _driver().destroy(uuid)
    except Exception as exc:
        LOG.exception("destroy of %s failed", uuid)
        return {"ok": False, "reason": f"destroy failed: {exc}"}
    LOG.info("instance %s destroyed%s", uuid, "" if removed else " (it was already gone)")
    return {"ok": True, "removed": removed}


def settings(cfg: Any) -> dict[str, Any]:
    """What the workers need from compute.yaml, as plain data (it crosses a process boundary)."""
    net = None
    if cfg.bridge is None and cfg.network.mode != "none":
        net = {"name": cfg.network.name, "bridge": cfg.network.bridge_name, "address": cfg.network.address,
               "forward": cfg.network.mode == "nat",
               "metadata_address": cfg.metadata.address if cfg.metadata.enabled else None}
    return {"host": cfg.host_uuid(), "uri": cfg.libvirt.uri, "domain_type": cfg.libvirt.domain_type,
            "instances_path": cfg.instances_path, "image_cache_path": cfg.image_cache_path,
            "resize": cfg.resize, "bridge": cfg.bridge, "network": net, "ip_timeout": cfg.ip_timeout,
            "stop_timeout": cfg.stop_timeout,
            "log_level": cfg.log_level}
