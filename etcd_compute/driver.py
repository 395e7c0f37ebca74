"""The hypervisor behind one small, idempotent interface.

The daemon's reconcile loop calls these methods over and over from long-lived pool
worker processes, so every method must be safe to repeat and safe to race with
itself: "already running", "already gone" and "not found" are outcomes, not errors.
"""
from __future__ import annotations

import logging
import os
import threading
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Callable, Protocol, TypeVar

import libvirt

log = logging.getLogger(__name__)
T = TypeVar("T")

# Without this libvirt prints every error (including expected "Domain not found") to stderr.
libvirt.registerErrorHandler(lambda *a: None, None)

NAME_PREFIX = "ec-"
XMLNS = "https://github.com/etcd-compute/xmlns/instance/1.0"
ET.register_namespace("ec", XMLNS)

_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",  # vCPUs idle/blocked on I/O: still running
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting-down",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}


class DriverError(Exception):
    """A hypervisor operation failed (never raised for "not found")."""


@dataclass(frozen=True)
class DomainInfo:
    uuid: str
    name: str
    state: str  # running, paused, shutoff, crashed, shutting-down, suspended, nostate
    vcpus: int
    memory_mb: int


class Driver(Protocol):
    def ensure_running(self, uuid: str, vcpus: int, memory_mb: int) -> DomainInfo: ...
    def destroy(self, uuid: str) -> bool: ...
    def lookup(self, uuid: str) -> DomainInfo | None: ...
    def list_uuids(self) -> list[str]: ...


@dataclass(frozen=True)
class DomainSpec:
    """Everything the domain XML is built from. Disks, image, cloud-init and NICs go here next."""

    uuid: str
    vcpus: int
    memory_mb: int
    domain_type: str

    @property
    def name(self) -> str:
        return domain_name(self.uuid)


def domain_name(uuid: str) -> str:
    return f"{NAME_PREFIX}{uuid}"


def build_domain_xml(spec: DomainSpec) -> str:
    """Render the libvirt domain XML for a spec (the only place that knows the XML layout).

    No <graphics> at all (type='none' is invalid); a serial pty doubles as the console.
    """
    dom = ET.Element("domain", type=spec.domain_type)
    ET.SubElement(dom, "name").text = spec.name
    ET.SubElement(dom, "uuid").text = spec.uuid
    meta = ET.SubElement(ET.SubElement(dom, "metadata"), "{%s}instance" % XMLNS)
    ET.SubElement(meta, "{%s}uuid" % XMLNS).text = spec.uuid
    ET.SubElement(dom, "memory", unit="MiB").text = str(spec.memory_mb)
    ET.SubElement(dom, "vcpu").text = str(spec.vcpus)
    ET.SubElement(ET.SubElement(dom, "os"), "type").text = "hvm"
    for event, action in (("on_poweroff", "destroy"), ("on_reboot", "restart"), ("on_crash", "destroy")):
        ET.SubElement(dom, event).text = action
    devices = ET.SubElement(dom, "devices")
    # (next issue: <disk>, config drive and <interface> elements are appended to `devices` here)
    ET.SubElement(ET.SubElement(devices, "serial", type="pty"), "target", port="0")
    ET.SubElement(ET.SubElement(devices, "console", type="pty"), "target", type="serial", port="0")
    return ET.tostring(dom, encoding="unicode")


def _norm_uuid(uuid: str) -> str:
    try:
        return str(uuidlib.UUID(str(uuid)))
    except ValueError:
        raise DriverError(f"invalid instance uuid {uuid!r}") from None


def _is_not_found(e: libvirt.libvirtError) -> bool:
    return e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN


def _kvm_usable() -> bool:
    """Root can open /dev/kvm here even where it is a broken software KVM: config must force qemu."""
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
        return True
    except OSError:
        return False


# One connection per (process, uri). test:///default keeps its whole hypervisor state in
# the connection: it must live as long as the process, so it is never closed.
_conn_lock = threading.Lock()
_conns: dict[str, tuple[int, libvirt.virConnect]] = {}
_inherited: list[libvirt.virConnect] = []  # from a parent before fork(): never use, never close


def _connection(uri: str) -> libvirt.virConnect:
    with _conn_lock:
        pid = os.getpid()
        cached = _conns.get(uri)
        if cached is not None:
            owner, conn = cached
            if owner != pid:
                # Closing would send a close RPC on the parent's socket; just park it.
                _inherited.append(conn)
            elif conn.isAlive():
                return conn
            else:
                log.warning("libvirt connection to %s is dead (libvirtd restarted?); reopening", uri)
        try:
            conn = libvirt.open(uri)
        except libvirt.libvirtError as e:
            raise DriverError(f"cannot connect to libvirt at {uri}: {e.get_error_message()}") from e
        _conns[uri] = (pid, conn)
        log.debug("opened libvirt connection %s in pid %d", uri, pid)
        return conn


class LibvirtDriver:
    """Driver on one libvirt URI (qemu:///system, test:///default, ...)."""

    def __init__(self, uri: str, domain_type: str = "auto") -> None:
        self.uri = uri
        self._domain_type: str | None = None if domain_type == "auto" else domain_type

    @property
    def conn(self) -> libvirt.virConnect:
        return _connection(self.uri)

    @property
    def domain_type(self) -> str:
        """Resolved lazily: `auto` needs the connection's capabilities."""
        if self._domain_type is None:
            self._domain_type = self._pick_domain_type()
            log.info("%s: domain type auto -> %s", self.uri, self._domain_type)
        return self._domain_type

    def _pick_domain_type(self) -> str:
        # kvm if advertised for the host arch and /dev/kvm opens; else qemu (TCG); else whatever
        # the driver offers (the test driver only advertises 'test').
        caps = ET.fromstring(self._call("read capabilities", self.conn.getCapabilities))
        host_arch = caps.findtext("host/cpu/arch")
        types: list[str] = []
        for guest in caps.findall("guest"):
            arch = guest.find("arch")
            if guest.findtext("os_type") == "hvm" and arch is not None and arch.get("name") == host_arch:
                types += [d.get("type", "") for d in arch.findall("domain")]
        if "kvm" in types and _kvm_usable():
            return "kvm"
        if "qemu" in types:
            return "qemu"
        if types:
            return types[0]
        raise DriverError(f"{self.uri} advertises no hvm guest for host arch {host_arch}")

    def _call(self, what: str, fn: Callable[..., T], *args: object) -> T:
        try:
            return fn(*args)
        except libvirt.libvirtError as e:
            raise DriverError(f"{what} on {self.uri}: {e.get_error_message()}") from e

    def _find(self, uuid: str) -> libvirt.virDomain | None:
        try:
            return self.conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError as e:
            if _is_not_found(e):
                return None
            raise DriverError(f"look up {uuid} on {self.uri}: {e.get_error_message()}") from e

    def _info(self, dom: libvirt.virDomain) -> DomainInfo:
        state, max_kib, _cur_kib, nr_vcpus, _cpu_ns = self._call(f"info of {dom.name()}", dom.info)
        return DomainInfo(dom.UUIDString(), dom.name(), _STATES.get(state, "unknown"), nr_vcpus, max_kib // 1024)

    def lookup(self, uuid: str) -> DomainInfo | None:
        dom = self._find(_norm_uuid(uuid))
        if dom is None:
            return None
        try:
            return self._info(dom)
        except DriverError as e:
            if isinstance(e.__cause__, libvirt.libvirtError) and _is_not_found(e.__cause__):
                return None  # removed between lookup and info
            raise

    def ensure_running(self, uuid: str, vcpus: int, memory_mb: int) -> DomainInfo:
        """Define `ec-<uuid>` if absent and start it if not running. An existing
        definition is kept as is (a size mismatch is only logged)."""
        uuid = _norm_uuid(uuid)
        if vcpus < 1 or memory_mb < 1:
            raise DriverError(f"{uuid}: need vcpus >= 1 and memory_mb >= 1, got {vcpus}, {memory_mb}")
        dom = self._find(uuid)
        if dom is None:
            spec = DomainSpec(uuid, vcpus, memory_mb, self.domain_type)
            # defineXML of an identical uuid+name just redefines, so racing workers are harmless.
            dom = self._call(f"define {spec.name}", self.conn.defineXML, build_domain_xml(spec))
            log.info("defined %s (%d vcpus, %d MiB, type %s)", spec.name, vcpus, memory_mb, spec.domain_type)
        info = self._info(dom)
        if (info.vcpus, info.memory_mb) != (vcpus, memory_mb):
            log.warning("%s exists with %d vcpus/%d MiB, allocation says %d/%d; keeping it",
                        info.name, info.vcpus, info.memory_mb, vcpus, memory_mb)
        state = info.state
        if state == "running":
            return info
        if state == "paused":
            self._call(f"resume {dom.name()}", dom.resume)
            log.info("resumed %s", dom.name())
        elif state in ("shutoff", "crashed", "nostate"):
            try:
                dom.create()
                log.info("started %s", dom.name())
            except libvirt.libvirtError as e:
                # Lost a race with another worker? The error code for "already running"
                # differs between drivers (qemu: OPERATION_INVALID, test: INTERNAL_ERROR).
                if not self._call(f"check {dom.name()}", dom.isActive):
                    raise DriverError(f"start {dom.name()} on {self.uri}: {e.get_error_message()}") from e
        return self._info(dom)

    def destroy(self, uuid: str) -> bool:
        """Power off (hard) and undefine. True if something was removed, False if already gone."""
        dom = self._find(_norm_uuid(uuid))
        if dom is None:
            return False
        name = dom.name()
        removed = False
        try:
            if dom.isActive():
                try:
                    dom.destroy()
                    removed = True
                except libvirt.libvirtError as e:
                    if e.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:  # "not running": raced
                        raise
            if dom.isPersistent():
                flags = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                         | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
                try:
                    dom.undefineFlags(flags)
                except libvirt.libvirtError as e:
                    if e.get_error_code() not in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT):
                        raise
                    dom.undefine()  # the test driver rejects the NVRAM/checkpoint flags
                removed = True
        except libvirt.libvirtError as e:
            if not _is_not_found(e):
                raise DriverError(f"destroy {name} on {self.uri}: {e.get_error_message()}") from e
            # Someone else removed it concurrently: whoever did gets True.
        if removed:
            log.info("destroyed %s", name)
        return removed

    def list_uuids(self) -> list[str]:
        """UUIDs of our domains only: name `ec-<uuid>` whose libvirt uuid matches."""
        doms = self._call("list domains", self.conn.listAllDomains, 0)
        return sorted(d.UUIDString() for d in doms if d.name() == domain_name(d.UUIDString()))


_drivers: dict[tuple[str, str], LibvirtDriver] = {}


def get_driver(uri: str, domain_type: str = "auto") -> Driver:
    """Per-process cached driver: pool workers call this for every job."""
    key = (uri, domain_type)
    if key not in _drivers:
        _drivers[key] = LibvirtDriver(uri, domain_type)
    return _drivers[key]
