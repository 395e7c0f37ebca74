"""A hypervisor made of files, for scenarios that need no QEMU (in the manner of nomad's mock driver).

`fake:///DIR` keeps each domain as DIR/<uuid>.json ({"uuid", "name", "owner", "state",
"vcpus", "memory_mb"}), so every process of a host (its workers, its fence, a test or the
chaos run looking from outside) sees the same domains, and a domain "runs" until one of
them stops it. Unlike libvirt's test:///default, whose domains live inside the worker
process that made them, these survive their worker and can be watched.

Faults are files too: DIR/.down makes every call fail as an unreachable hypervisor does;
DIR/.hang makes every call block until the file goes (a hung libvirtd); DIR/.hang-<op>
(e.g. .hang-ensure_running) does so for one operation only. A domain file whose state a test
sets to "crashed" is a guest that panicked (off, seen as CRASHED); the fence's kill leaves
"crashed" too, as libvirt says of any domain whose QEMU died. A domain file's "rates"
({DomainStats counter field: per second, "memory_rss_bytes": bytes}) make its stats' counters
grow from its last boot ("booted"), as libvirt's start from zero when a domain starts.
A domain file's "volumes" ({volume id: device}) are the volumes attached to it; a volume id in its
"unreleased" list is one its running guest never lets go of (a detach waits, then fails).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from etcd_compute.ecompute.domainxml import volume_targets
from etcd_compute.ecompute.driver import (
    DomainInfo,
    DomainSpec,
    DomainStats,
    Driver,
    DriverError,
    HypervisorUnavailable,
    InstanceFiles,
    NetworkSpec,
    Shutdown,
    VolumeDisk,
    domain_name,
)
from etcd_compute.ecompute.libvirtdriver import get_driver
from etcd_compute.states import Actual

_POWER = {Actual.ACTIVE: "running", Actual.STOPPED: "shutoff", Actual.SUSPENDED: "paused"}


class FakeDriver:
    """The Driver protocol (driver.py) over a directory of domain files."""

    def __init__(self, uri: str, instances_path: str = "/var/lib/etcd-compute/instances") -> None:
        self.uri = uri
        self.dir = Path(uri.removeprefix("fake://"))
        if not self.dir.is_absolute():
            raise DriverError(f"{uri}: a fake hypervisor is fake:///ABSOLUTE/DIR")
        self.instances = Path(instances_path)

    # -- faults ---------------------------------------------------------------------------------

    def _enter(self, op: str) -> None:
        while (self.dir / ".hang").exists() or (self.dir / f".hang-{op}").exists():
            time.sleep(0.05)
        if (self.dir / ".down").exists():
            raise HypervisorUnavailable(f"cannot connect to the hypervisor at {self.uri} (fake: .down)")

    # -- domain files ---------------------------------------------------------------------------

    def _path(self, uuid: str) -> Path:
        return self.dir / f"{uuid.lower()}.json"

    def _read(self, uuid: str) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self._path(uuid).read_text())
        except (OSError, ValueError):
            return None
        return data

    def _write(self, dom: dict[str, Any]) -> None:
        path = self._path(dom["uuid"])
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dom))
        os.replace(tmp, path)

    @staticmethod
    def _info(dom: dict[str, Any]) -> DomainInfo:
        crashed = dom["state"] == "crashed"  # (a test writes it: the guest panicked)
        return DomainInfo(dom["uuid"], dom["name"], "shutoff" if crashed else dom["state"], dom["vcpus"],
                          dom["memory_mb"], crashed=crashed)

    def _existing(self, uuid: str) -> dict[str, Any]:
        dom = self._read(uuid)
        if dom is None:
            raise DriverError(f"no domain for instance {uuid} on {self.uri}")
        return dom

    # -- the Driver protocol --------------------------------------------------------------------

    def files(self, uuid: str) -> InstanceFiles:
        base = self.instances / uuid.lower()
        return InstanceFiles(base.with_suffix(".qcow2"), base.with_suffix(".iso"), base.with_suffix(".console.log"))

    def prepare(self, network: NetworkSpec | None) -> None:
        self._enter("prepare")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.instances.mkdir(parents=True, exist_ok=True)

    def create_disk(self, uuid: str, base: str, base_format: str, size_bytes: int) -> str:
        self._enter("create_disk")
        path = self.files(uuid).disk
        if not path.exists():
            path.write_bytes(b"")
        return str(path)

    def ensure_running(self, spec: DomainSpec) -> DomainInfo:
        self._enter("ensure_running")
        dom = self._read(spec.uuid) or {
            "uuid": spec.uuid.lower(), "name": spec.name, "owner": spec.owner, "vcpus": spec.vcpus,
            "memory_mb": spec.memory_mb, "state": "shutoff",
            "volumes": dict(zip((v.id for v in spec.volumes), volume_targets(len(spec.volumes), {"vda"}), strict=True))}
        dom["owner"] = spec.owner or dom.get("owner")
        return self._run(dom)

    def _run(self, dom: dict[str, Any], again: bool = False) -> DomainInfo:
        """Make `dom` run: a new boot unless it ran (or was paused) already, or `again`."""
        booted = time.time() if again or dom["state"] not in ("running", "paused") else None
        dom["state"] = "running"
        if booted is not None:
            dom["booted"] = booted
        self._write(dom)
        return replace(self._info(dom), booted_at=booted)

    def wait_for_address(self, uuid: str, timeout: float) -> str | None:
        self._enter("wait_for_address")
        return None

    def set_power(self, uuid: str, target: Actual, shutdown: Shutdown) -> DomainInfo:
        self._enter("set_power")
        dom = self._existing(uuid)
        if target == Actual.SUSPENDED and dom["state"] != "running" and dom["state"] != "paused":
            raise DriverError(f"cannot suspend {dom['name']}: it is {dom['state']}")
        if target == Actual.ACTIVE:
            return self._run(dom)
        if target == Actual.STOPPED and dom["state"] == "crashed":
            return self._info(dom)  # off already: libvirt keeps its reason (crashed) until a start
        dom["state"] = _POWER[target]
        self._write(dom)
        return self._info(dom)

    def reboot(self, uuid: str, shutdown: Shutdown) -> DomainInfo:
        self._enter("reboot")
        return self._run(self._existing(uuid), again=True)

    def reserve_address(self, uuid: str, network: str) -> str:
        self._enter("reserve_address")
        return "10.0.0." + str(int(uuid.replace("-", "")[:4], 16) % 200 + 20)

    def destroy(self, uuid: str, network: str | None = None) -> bool:
        self._enter("destroy")
        removed = False
        with contextlib.suppress(FileNotFoundError):
            self._path(uuid).unlink()
            removed = True
        for path in self.files(uuid).all():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed = True
        return removed

    def volumes(self, uuid: str) -> dict[str, str]:
        self._enter("volumes")
        return dict(self._existing(uuid).get("volumes") or {})

    def attach_volume(self, uuid: str, volume: VolumeDisk) -> str:
        self._enter("attach_volume")
        dom = self._existing(uuid)
        attached: dict[str, str] = dom.setdefault("volumes", {})
        if volume.id not in attached:
            attached[volume.id] = volume_targets(1, {"vda", *attached.values()})[0]
            self._write(dom)
        return attached[volume.id]

    def detach_volume(self, uuid: str, volume: str, timeout: float) -> bool:
        self._enter("detach_volume")
        dom = self._read(uuid)
        if dom is None or volume not in (dom.get("volumes") or {}):
            return False
        if dom["state"] == "running" and volume in (dom.get("unreleased") or []):
            time.sleep(timeout)
            raise DriverError(f"the guest did not release volume {volume} within {timeout:g} s")
        del dom["volumes"][volume]
        self._write(dom)
        return True

    def hard_stop(self, uuid: str, owner: str | None = None) -> bool:
        """The fence's stop: like its SIGKILL of a QEMU process, it needs no answer from the
        hypervisor (a hung one holds up everything else)."""
        dom = self._read(uuid)
        if dom is None or dom["state"] in ("shutoff", "crashed") or (owner is not None and dom.get("owner") != owner):
            return False
        dom["state"] = "crashed"  # libvirt's word for a domain whose QEMU died, until its next start
        self._write(dom)
        return True

    def lookup(self, uuid: str) -> DomainInfo | None:
        self._enter("lookup")
        dom = self._read(uuid)
        return self._info(dom) if dom else None

    def _domains(self, owner: str | None) -> list[dict[str, Any]]:
        found = []
        for path in self.dir.glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                dom = json.loads(path.read_text())
                if dom["name"] == domain_name(dom["uuid"]) and (owner is None or dom.get("owner") == owner):
                    found.append(dom)
        return found

    def list_uuids(self, owner: str | None = None) -> list[str]:
        self._enter("list_uuids")
        return sorted(d["uuid"] for d in self._domains(owner))

    def list_domains(self, owner: str | None = None) -> dict[str, DomainInfo]:
        self._enter("list_domains")
        return {d["uuid"]: self._info(d) for d in self._domains(owner)}

    def domain_stats(self, owner: str | None = None) -> dict[str, DomainStats]:
        self._enter("domain_stats")
        return {d["uuid"]: self._stats(d) for d in self._domains(owner) if d["state"] == "running"}

    @staticmethod
    def _stats(dom: dict[str, Any]) -> DomainStats:
        """Counters at the domain file's "rates" since its boot; its memory as given (no rates: 0 CPU)."""
        rates: dict[str, float] = dom.get("rates") or {}
        up = max(0.0, time.time() - dom.get("booted", time.time()))
        counters = {f: rates[f] * up for f in ("network_receive_bytes", "network_transmit_bytes",
                                               "disk_read_bytes", "disk_write_bytes") if f in rates}
        return DomainStats(cpu_seconds=rates.get("cpu_seconds", 0.0) * up, memory_bytes=dom["memory_mb"] * 2.0**20,
                           memory_rss_bytes=rates.get("memory_rss_bytes"), **counters)


def open_driver(uri: str, domain_type: str, instances_path: str) -> Driver:
    """The driver for a hypervisor URI: the fake one for fake:///DIR, libvirt's otherwise."""
    if uri.startswith("fake://"):
        return FakeDriver(uri, instances_path)
    return get_driver(uri, domain_type, instances_path)


def running(directory: Path) -> dict[str, str | None]:
    """uuid -> owner of every running domain of a fake hypervisor (for checks from outside)."""
    found = {}
    for path in directory.glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            dom = json.loads(path.read_text())
            if dom.get("state") == "running":
                found[dom["uuid"]] = dom.get("owner")
    return found
