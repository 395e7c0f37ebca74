"""Jobs that run in ecompute's worker processes: everything that touches the hypervisor.

Workers are spawned (not forked) before the daemon opens its etcd connection, so
they never share its gRPC channel; each keeps one hypervisor connection for its
life. Jobs never raise: they return {"ok": bool, ...} for the daemon to report.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
from typing import Any

from etcd_compute import driver

LOG = logging.getLogger(__name__)
_settings: dict[str, str] = {}


def init(uri: str, domain_type: str, log_level: str) -> None:
    """Pool initializer: Ctrl-C goes to the whole process group; only the daemon acts on it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    _settings.update(uri=uri, domain_type=domain_type)


def _driver() -> driver.Driver:
    return driver.get_driver(_settings["uri"], _settings["domain_type"])


def build(uuid: str, request: dict[str, Any]) -> dict[str, Any]:
    resources = request["resources"]
    try:
        info = _driver().ensure_running(uuid, vcpus=resources.get("VCPU", 1),
                                        memory_mb=resources.get("MEMORY_MB", 256))
    except Exception as exc:  # any failure is the instance's ERROR reason
        LOG.exception("build of %s failed", uuid)
        return {"ok": False, "reason": f"build failed: {exc}"}
    LOG.info("instance %s running as %s", uuid, info.name)
    return {"ok": True, "domain": dataclasses.asdict(info)}


def destroy(uuid: str) -> dict[str, Any]:
    try:
        removed = _driver().destroy(uuid)
    except Exception as exc:
        LOG.exception("destroy of %s failed", uuid)
        return {"ok": False, "reason": f"destroy failed: {exc}"}
    LOG.info("instance %s destroyed%s", uuid, "" if removed else " (domain was already gone)")
    return {"ok": True, "removed": removed}
