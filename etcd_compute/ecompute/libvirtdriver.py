"""The Driver (driver.py) on libvirt: domains, their power, networks and addresses, disks and stats.

Every method is safe to repeat and to race with itself (see driver.py). This and lifecycle.py
are the only modules that speak libvirt: it translates libvirt's power states into the actual
states of states.py, and it knows nothing of etcd or Placement.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import libvirt

from etcd_compute.ecompute import consolefiles
from etcd_compute.ecompute.domainxml import XMLNS, build_domain_xml, disks_in_xml, volume_targets, volume_xml
from etcd_compute.ecompute.driver import (
    VOLUME_ALIAS,
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
from etcd_compute.ecompute.networkxml import DNSMASQ, build_network_xml, dhcp_range
from etcd_compute.guestdata import mac_address
from etcd_compute.states import Actual

log = logging.getLogger(__name__)
T = TypeVar("T")

# Without this libvirt prints every error (including expected "Domain not found") to stderr.
libvirt.registerErrorHandler(lambda *a: None, None)

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
# The libvirt state each power target is reached in.
_POWER = {Actual.ACTIVE: "running", Actual.STOPPED: "shutoff", Actual.SUSPENDED: "paused"}


def _net_xml(lv_net: libvirt.virNetwork) -> str:
    """A network's persistent definition (the test driver knows only the live one)."""
    try:
        return lv_net.XMLDesc(libvirt.VIR_NETWORK_XML_INACTIVE)
    except libvirt.libvirtError:
        return lv_net.XMLDesc(0)


def _update_dhcp_host(lv_net: libvirt.virNetwork, command: int, mac: str, ip: str) -> None:
    """Add or delete a DHCP host reservation, in the definition and (if it runs) in dnsmasq."""
    flags = libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG | (
        libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE if lv_net.isActive() else 0)
    lv_net.update(command, libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, -1, f"<host mac='{mac}' ip='{ip}'/>", flags)


def _norm_uuid(uuid: str) -> str:
    try:
        return str(uuidlib.UUID(str(uuid)))
    except ValueError:
        raise DriverError(f"invalid instance uuid {uuid!r}") from None


def _is_not_found(e: libvirt.libvirtError) -> bool:
    return e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN


def _owner(dom: libvirt.virDomain) -> str | None:
    try:
        meta = ET.fromstring(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, XMLNS, 0))
    except (libvirt.libvirtError, ET.ParseError):
        return None
    return meta.findtext("host") or meta.findtext(f"{{{XMLNS}}}host")


def _kvm_usable() -> bool:
    """Hardware KVM only: /dev/kvm opens, the CPU has vmx/svm and kvm_intel/kvm_amd is loaded.

    A software /dev/kvm (e.g. PVM, as on the build machines) opens fine but hangs
    ordinary guests, so opening it is not enough.
    """
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    hw = any(f" {flag}" in flags for flag in ("vmx", "svm"))
    return hw and (Path("/sys/module/kvm_intel").exists() or Path("/sys/module/kvm_amd").exists())


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
            raise HypervisorUnavailable(f"cannot connect to libvirt at {uri}: {e.get_error_message()}") from e
        _conns[uri] = (pid, conn)
        log.debug("opened libvirt connection %s in pid %d", uri, pid)
        return conn


class LibvirtDriver:
    """Driver on one libvirt URI (qemu:///system, test:///default, ...)."""

    def __init__(self, uri: str, domain_type: str = "auto",
                 instances_path: str = "/var/lib/etcd-compute/instances") -> None:
        self.uri = uri
        self._domain_type: str | None = None if domain_type == "auto" else domain_type
        self.instances = Path(instances_path)

    def files(self, uuid: str) -> InstanceFiles:
        base = self.instances / _norm_uuid(uuid)
        return InstanceFiles(base.with_suffix(".qcow2"), base.with_suffix(".iso"), base.with_suffix(".console.log"))

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
        crashed, ioerror = state == libvirt.VIR_DOMAIN_CRASHED, False
        if state == libvirt.VIR_DOMAIN_SHUTOFF:  # why it is off: a panic (on_crash destroy) says crashed
            crashed = self._call(f"state of {dom.name()}", dom.state)[1] == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED
        elif state == libvirt.VIR_DOMAIN_PAUSED:  # why it is paused: a disk that failed (error_policy stop)
            ioerror = self._call(f"state of {dom.name()}", dom.state)[1] == libvirt.VIR_DOMAIN_PAUSED_IOERROR
        return DomainInfo(dom.UUIDString(), dom.name(), _STATES.get(state, "unknown"), nr_vcpus, max_kib // 1024,
                          crashed=crashed, ioerror=ioerror)

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

    # -- host preparation and disks ---------------------------------------------------------

    def prepare(self, network: NetworkSpec | None) -> None:
        """Make sure the instances directory, its storage pool and the network exist and run."""
        self.instances.mkdir(parents=True, exist_ok=True)
        os.chmod(self.instances, 0o755)  # QEMU runs as libvirt-qemu and must reach its files
        self._pool()
        if network is not None:
            self.ensure_network(network)

    def ensure_network(self, net: NetworkSpec) -> None:
        try:
            lv_net = self.conn.networkLookupByName(net.name)
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_NETWORK:
                raise DriverError(f"look up network {net.name}: {e.get_error_message()}") from e
            lv_net = self._call(f"define network {net.name}", self.conn.networkDefineXML, build_network_xml(net))
            log.info("defined network %s (%s, %s)", net.name, net.address, "nat" if net.forward else "isolated")
        else:
            self._update_definition(lv_net, net)
        if not lv_net.isActive():
            try:
                lv_net.create()
            except libvirt.libvirtError as e:
                if not lv_net.isActive():  # another worker may have started it meanwhile
                    raise DriverError(f"start network {net.name}: {e.get_error_message()}") from e
        with contextlib.suppress(libvirt.libvirtError):
            lv_net.setAutostart(True)

    def _update_definition(self, lv_net: libvirt.virNetwork, net: NetworkSpec) -> None:
        """A network defined before the metadata route existed gets it in its definition: at
        once if it is not running, else from its next start (restarting a running network
        would cut its guests off)."""
        want, have = build_network_xml(net), _net_xml(lv_net)
        if DNSMASQ not in want or DNSMASQ in have:
            return
        root = ET.fromstring(have)
        root.append(ET.fromstring(want).find(f"{{{DNSMASQ}}}options"))  # type: ignore[arg-type]
        self._call(f"redefine network {net.name}", self.conn.networkDefineXML, ET.tostring(root, encoding="unicode"))
        log.warning("network %s: added the DHCP route to the metadata address to its definition%s", net.name,
                    "; guests get it once the network restarts" if lv_net.isActive() else "")

    def reserve_address(self, uuid: str, network: str) -> str:
        """The instance's address on `network`: a DHCP host reservation for its MAC, made once
        (a rebuild finds it again). Several hosts' workers may share the network, so libvirt is
        the arbiter: it refuses a second reservation of an address, and the loser tries the
        next one. Addresses still leased to another MAC are skipped: dnsmasq would not hand
        them out until the lease ran out."""
        mac = mac_address(_norm_uuid(uuid))
        lv_net = self._call(f"look up network {network}", self.conn.networkLookupByName, network)
        start = int(hashlib.sha256(uuid.encode()).hexdigest(), 16)
        for _attempt in range(8):
            pool, reserved = dhcp_range(_net_xml(lv_net))
            if mac in reserved:
                return reserved[mac]
            leased = {lease["ipaddr"] for lease in self._leases(lv_net) if lease.get("mac", "").lower() != mac}
            taken = set(reserved.values()) | leased
            ring = pool[start % len(pool):] + pool[:start % len(pool)] if pool else []
            free = [ip for ip in ring if ip not in taken]
            if not free:
                raise DriverError(f"network {network} has no free address left in its DHCP range")
            try:
                _update_dhcp_host(lv_net, libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST, mac, free[0])
            except libvirt.libvirtError as e:
                log.info("reserving %s for %s on %s: %s; trying again", free[0], uuid, network, e.get_error_message())
                continue  # another worker reserved it (or this MAC) meanwhile: look again
            log.info("reserved %s on %s for %s (%s)", free[0], network, uuid, mac)
            return free[0]
        raise DriverError(f"could not reserve an address on network {network} for {uuid}")

    @staticmethod
    def _leases(lv_net: libvirt.virNetwork) -> list[dict]:
        try:
            return lv_net.DHCPLeases() or []
        except libvirt.libvirtError:
            return []  # the test driver has no leases

    def _release_address(self, uuid: str, network: str) -> bool:
        mac = mac_address(uuid)
        try:
            lv_net = self.conn.networkLookupByName(network)
            ip = dhcp_range(_net_xml(lv_net))[1].get(mac)
            if ip is None:
                return False
            _update_dhcp_host(lv_net, libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE, mac, ip)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_NETWORK:
                return False
            raise DriverError(f"release the address of {uuid} on {network}: {e.get_error_message()}") from e
        log.info("released %s on %s (%s)", ip, network, uuid)
        return True

    def _pool(self) -> libvirt.virStoragePool:
        """A storage pool over the instances directory; libvirt creates the overlays in it."""
        name = "ec-" + hashlib.sha256(str(self.instances).encode()).hexdigest()[:12]
        try:
            pool = self.conn.storagePoolLookupByName(name)
            if not pool.isActive():
                pool.create()
            return pool
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
                raise DriverError(f"storage pool {name}: {e.get_error_message()}") from e
        xml = f"<pool type='dir'><name>{name}</name><target><path>{self.instances}</path></target></pool>"
        try:
            return self.conn.storagePoolCreateXML(xml, 0)
        except libvirt.libvirtError as e:
            with contextlib.suppress(libvirt.libvirtError):  # created by a racing worker
                return self.conn.storagePoolLookupByName(name)
            raise DriverError(f"create storage pool {name}: {e.get_error_message()}") from e

    def _volume(self, pool: libvirt.virStoragePool, name: str) -> libvirt.virStorageVol | None:
        for attempt in range(2):
            try:
                return pool.storageVolLookupByName(name)
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
                    raise DriverError(f"look up volume {name}: {e.get_error_message()}") from e
                if attempt == 0:
                    with contextlib.suppress(libvirt.libvirtError):
                        pool.refresh(0)  # the file may predate this pool object
        return None

    def create_disk(self, uuid: str, base: str, base_format: str, size_bytes: int) -> str:
        """A qcow2 overlay of `base` of `size_bytes` (libvirt runs qemu-img); kept if it exists."""
        pool = self._pool()
        path = self.files(uuid).disk
        vol = self._volume(pool, path.name)
        if vol is None:
            xml = (f"<volume><name>{path.name}</name><capacity unit='bytes'>{size_bytes}</capacity>"
                   f"<target><format type='qcow2'/><permissions><mode>0600</mode></permissions></target>"
                   f"<backingStore><path>{base}</path><format type='{base_format}'/></backingStore></volume>")
            vol = self._call(f"create overlay {path.name}", pool.createXML, xml, 0)
            log.info("created %s on %s (%d GiB)", path.name, base, size_bytes >> 30)
        return vol.path()

    # -- domains ----------------------------------------------------------------------------

    def ensure_running(self, spec: DomainSpec) -> DomainInfo:
        """Define `ec-<uuid>` if absent and start it if not running. An existing
        definition is kept as is (a size mismatch is only logged)."""
        uuid = _norm_uuid(spec.uuid)
        vcpus, memory_mb = spec.vcpus, spec.memory_mb
        if vcpus < 1 or memory_mb < 1:
            raise DriverError(f"{uuid}: need vcpus >= 1 and memory_mb >= 1, got {vcpus}, {memory_mb}")
        dom = self._find(uuid)
        if dom is None:
            # defineXML of an identical uuid+name just redefines, so racing workers are harmless.
            dom = self._call(f"define {spec.name}", self.conn.defineXML, build_domain_xml(spec, self.domain_type))
            log.info("defined %s (%d vcpus, %d MiB, type %s)", spec.name, vcpus, memory_mb, self.domain_type)
        elif spec.owner and _owner(dom) != spec.owner:
            self._adopt(dom, spec.owner)
        info = self._info(dom)
        if (info.vcpus, info.memory_mb) != (vcpus, memory_mb):
            log.warning("%s exists with %d vcpus/%d MiB, allocation says %d/%d; keeping it",
                        info.name, info.vcpus, info.memory_mb, vcpus, memory_mb)
        state = info.state
        if state == "running":
            return info
        if state == "paused":
            try:
                dom.resume()
                log.info("resumed %s", dom.name())
            except libvirt.libvirtError as e:
                # A domain libvirt is still starting shows paused until it runs (a worker cut
                # off mid-start leaves it so): "already running" is then the outcome we want.
                if self._info(dom).state != "running":
                    raise DriverError(f"resume {dom.name()} on {self.uri}: {e.get_error_message()}") from e
        elif state in ("shutoff", "crashed", "nostate"):
            try:
                booted = self._boot(dom)
                log.info("started %s", dom.name())
                return replace(self._info(dom), booted_at=booted)
            except DriverError:
                # Lost a race with another worker? The error code for "already running"
                # differs between drivers (qemu: OPERATION_INVALID, test: INTERNAL_ERROR).
                if not self._call(f"check {dom.name()}", dom.isActive):
                    raise
        return self._info(dom)

    def _boot(self, dom: libvirt.virDomain) -> float:
        """Start the domain: a new boot of its guest, with a console log of its own (consolefiles);
        when it began (epoch seconds)."""
        began = time.time()
        if self.instances.is_dir():
            try:
                consolefiles.new_boot(self.instances, dom.UUIDString())
            except OSError as e:  # the guest's console history is worth less than the guest
                log.warning("%s: cannot set its last boot's console aside: %s", dom.name(), e)
        self._call(f"start {dom.name()}", dom.create)
        return began

    def _adopt(self, dom: libvirt.virDomain, owner: str) -> None:
        """Make `owner` the domain's host in its metadata. Only on a libvirtd shared by several
        hosts can a host find an instance's domain made by another (evacuated to it): the same
        uuid is one domain there, so it takes it over instead of fighting over it."""
        meta = ET.Element("instance")  # libvirt puts it in our namespace (key "ec", XMLNS)
        ET.SubElement(meta, "uuid").text = dom.UUIDString()
        ET.SubElement(meta, "host").text = owner
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if dom.isActive() else 0)
        previous = _owner(dom)
        self._call(f"take over {dom.name()}", dom.setMetadata, libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                   ET.tostring(meta, encoding="unicode"), "ec", XMLNS, flags)
        log.warning("took over %s from host %s (a libvirtd shared by several hosts)", dom.name(), previous)

    def _existing(self, uuid: str) -> libvirt.virDomain:
        dom = self._find(_norm_uuid(uuid))
        if dom is None:
            raise DriverError(f"no domain for instance {uuid} on {self.uri}")
        return dom

    # -- volumes ------------------------------------------------------------------------------------

    def _disks(self, dom: libvirt.virDomain) -> tuple[dict[str, str], dict[str, str], set[str]]:
        """The volumes of the running guest ({} while it is off) and of the definition ({id: dev}),
        and every disk name either uses."""
        config, taken = disks_in_xml(self._call(f"read {dom.name()}", dom.XMLDesc, libvirt.VIR_DOMAIN_XML_INACTIVE))
        if not self._call(f"check {dom.name()}", dom.isActive):
            return {}, config, taken
        live, running = disks_in_xml(self._call(f"read {dom.name()}", dom.XMLDesc, 0))
        return live, config, taken | running

    def volumes(self, uuid: str) -> dict[str, str]:
        """The volumes attached to the domain: the running guest's, else its definition's ({id: dev})."""
        dom = self._existing(uuid)
        live, config, _ = self._disks(dom)
        return live if dom.isActive() else config

    def attach_volume(self, uuid: str, volume: VolumeDisk) -> str:
        """Attach a volume as the next free virtio disk, to the running guest and to the definition
        (only the definition while the domain is off: it has it from its next start); its device.
        Attached already: where it is."""
        dom = self._existing(uuid)
        live, config, taken = self._disks(dom)
        active = dom.isActive()
        dev = live.get(volume.id) or config.get(volume.id) or volume_targets(1, taken)[0]
        flags = (0 if volume.id in config else libvirt.VIR_DOMAIN_AFFECT_CONFIG) | (
            libvirt.VIR_DOMAIN_AFFECT_LIVE if active and volume.id not in live else 0)
        if flags:
            self._call(f"attach volume {volume.id} to {dom.name()}", dom.attachDeviceFlags, volume_xml(volume, dev),
                       flags)
            log.info("attached volume %s to %s as %s%s", volume.id, dom.name(), dev, "" if active else " (off)")
        return dev

    def detach_volume(self, uuid: str, volume: str, timeout: float) -> bool:
        """Detach a volume from the definition and the running guest. A running guest must release
        the device first (libvirt's detach only asks it): wait up to `timeout` seconds for it, and
        fail if it does not, rather than call a volume free that its guest still uses. True if it
        was attached."""
        dom = self._find(_norm_uuid(uuid))
        if dom is None:
            return False
        live, config, _ = self._disks(dom)
        if volume not in live and volume not in config:
            return False
        flags = (libvirt.VIR_DOMAIN_AFFECT_CONFIG if volume in config else 0) | (
            libvirt.VIR_DOMAIN_AFFECT_LIVE if volume in live else 0)
        said = ""
        try:
            dom.detachDeviceAlias(f"{VOLUME_ALIAS}{volume}", flags)
        except libvirt.libvirtError as e:
            if volume not in live:
                raise DriverError(f"detach volume {volume} from {dom.name()}: {e.get_error_message()}") from e
            said = f" (libvirt: {e.get_error_message()})"  # e.g. asked before: the guest is still releasing it
        deadline = time.monotonic() + timeout
        while volume in live:
            if time.monotonic() > deadline:
                raise DriverError(f"the guest did not release volume {volume} within {timeout:g} s{said}")
            time.sleep(0.2)
            live = self._disks(dom)[0]
        log.info("detached volume %s from %s", volume, dom.name())
        return True

    def set_power(self, uuid: str, power: Actual, shutdown: Shutdown) -> DomainInfo:
        """Bring the domain to `power`: ACTIVE (running), STOPPED (as `shutdown` says) or
        SUSPENDED (paused). Already there is fine."""
        if power not in _POWER:
            raise DriverError(f"unknown power target {power!r}")
        target = _POWER[power]
        dom = self._existing(uuid)
        state = self._info(dom).state
        note, booted = None, None
        if target == "running":
            if state == "paused" and self._info(dom).ioerror:  # resumed, it would fail the same way: a new QEMU
                self._call(f"destroy {dom.name()}", dom.destroy)
                booted, note = self._boot(dom), "started anew: it was paused on an I/O error of its disk"
            elif state == "paused":
                self._call(f"resume {dom.name()}", dom.resume)
            elif state != "running":
                booted = self._boot(dom)
        elif target == "paused":
            if state == "running":
                self._call(f"suspend {dom.name()}", dom.suspend)
            elif state != "paused":
                raise DriverError(f"cannot suspend {dom.name()}: it is {state}")
        elif state != "shutoff":  # target shutoff
            note = self._power_off(dom, shutdown)
        info = self._info(dom)
        if info.state != target:
            raise DriverError(f"{dom.name()} is {info.state}, not {target}")
        return replace(info, note=note, booted_at=booted)

    def _power_off(self, dom: libvirt.virDomain, shutdown: Shutdown) -> str:
        """ACPI power button first, so the guest shuts down cleanly; the plug pulled after
        `shutdown.timeout` seconds, at once if forced, or when hurried meanwhile. Says which:
        a guest still busy shutting down under load is no guest that ignored ACPI."""
        t0 = time.monotonic()
        if not shutdown.force:
            with contextlib.suppress(libvirt.libvirtError):
                dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
            while (self._info(dom).state != "shutoff" and time.monotonic() < t0 + shutdown.timeout
                   and not shutdown.hurry()):
                time.sleep(0.2)
            if self._info(dom).state == "shutoff":
                return f"clean shutdown in {time.monotonic() - t0:.1f}s"
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()
        if shutdown.force:
            return "powered off at once (--force): no clean shutdown"
        if shutdown.hurry():
            return f"powered off (--force) after {time.monotonic() - t0:.0f} s of its clean shutdown"
        log.info("%s did not shut down within %gs: powering it off", dom.name(), shutdown.timeout)
        return f"did not finish shutting down within {shutdown.timeout:g} s; powered off"

    def reboot(self, uuid: str, shutdown: Shutdown) -> DomainInfo:
        """A restart: the guest shuts down as `shutdown` says (cleanly by default, as Nova's
        soft reboot), then the domain starts again."""
        dom = self._existing(uuid)
        note = self._power_off(dom, shutdown) if dom.isActive() else "it was off"
        booted = self._boot(dom)
        return replace(self._info(dom), note=note, booted_at=booted)

    def wait_for_address(self, uuid: str, timeout: float) -> str | None:
        """The guest's IPv4 address from the network's DHCP lease (ARP for a plain bridge)."""
        deadline = time.monotonic() + timeout
        sources = (libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP)
        while True:
            dom = self._find(_norm_uuid(uuid))
            if dom is None:
                raise DriverError(f"domain of {uuid} vanished while waiting for its address")
            for source in sources:
                try:
                    ifaces = dom.interfaceAddresses(source, 0) or {}
                except libvirt.libvirtError:
                    continue
                for iface in ifaces.values():
                    for addr in iface.get("addrs") or []:
                        if addr.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4:
                            return addr["addr"]
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)

    def destroy(self, uuid: str, network: str | None = None) -> bool:
        """Power off (hard), undefine, remove the instance's files and its address reservation
        on `network`. True if anything was removed."""
        uuid = _norm_uuid(uuid)
        removed = self._destroy_domain(uuid)
        removed = self._remove_files(uuid) or removed
        return (network is not None and self._release_address(uuid, network)) or removed

    def hard_stop(self, uuid: str, owner: str | None = None) -> bool:
        """Pull the plug of a running domain now (of `owner`'s only, if given), keeping its
        definition and files (the fence); True if it was running."""
        dom = self._find(_norm_uuid(uuid))
        if dom is None or (owner is not None and _owner(dom) != owner):
            return False
        try:
            dom.destroy()
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID or _is_not_found(e):
                return False  # not running (any more)
            raise DriverError(f"hard stop {dom.name()} on {self.uri}: {e.get_error_message()}") from e
        log.warning("hard-stopped %s", dom.name())
        return True

    def _remove_files(self, uuid: str) -> bool:
        """Through the storage pool, so that it lists no volume of a destroyed instance."""
        paths = [*self.files(uuid).all(), *consolefiles.all_files(self.instances, uuid)]
        removed = False
        if self.instances.is_dir():
            pool = self._pool()
            for path in paths:
                vol = self._volume(pool, path.name)
                if vol is not None:
                    with contextlib.suppress(libvirt.libvirtError):
                        vol.delete(0)
                        removed = True
        for path in paths:  # files the pool did not know (made since its last refresh)
            try:
                path.unlink()
                removed = True
            except FileNotFoundError:
                pass
        return removed

    def _destroy_domain(self, uuid: str) -> bool:
        dom = self._find(uuid)
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

    def list_uuids(self, owner: str | None = None) -> list[str]:
        """UUIDs of our domains only: name `ec-<uuid>` whose libvirt uuid matches, and, with
        `owner`, whose metadata names that host: several ecomputes may share one libvirtd
        (tests, a demo beside them), and none may take another's domains for orphans."""
        doms = self._call("list domains", self.conn.listAllDomains, 0)
        ours = [d for d in doms if d.name() == domain_name(d.UUIDString())]
        if owner is not None:
            ours = [d for d in ours if _owner(d) == owner]
        return sorted(d.UUIDString() for d in ours)

    def list_domains(self, owner: str | None = None) -> dict[str, DomainInfo]:
        """Our domains (as list_uuids), each as it is: its `observed` state is what its power state
        implies (CRASHED: off because its guest panicked, or paused on a disk's I/O error)."""
        found = {}
        for uuid in self.list_uuids(owner):
            info = self.lookup(uuid)
            if info is not None:  # else removed since it was listed
                found[uuid] = info
        return found

    def domain_stats(self, owner: str | None = None) -> dict[str, DomainStats]:
        """The counters of our running domains (as list_uuids), in one bulk call. NOWAIT: a
        domain busy with a job of its own answers at once with what it has, instead of holding
        the call (and a scrape waiting on it) until that job ends."""
        groups = (libvirt.VIR_DOMAIN_STATS_CPU_TOTAL | libvirt.VIR_DOMAIN_STATS_BALLOON
                  | libvirt.VIR_DOMAIN_STATS_INTERFACE | libvirt.VIR_DOMAIN_STATS_BLOCK)
        flags = (libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
                 | getattr(libvirt, "VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT", 0))
        found = {}
        for dom, values in self._call("read domain stats", self.conn.getAllDomainStats, groups, flags):
            uuid = dom.UUIDString()
            if dom.name() == domain_name(uuid) and (owner is None or _owner(dom) == owner):
                found[uuid] = _domain_stats(values)
        return found


def _domain_stats(values: dict[str, Any]) -> DomainStats:
    """libvirt's flat stat names (cpu.time in ns, balloon.* in KiB, net.N.*, block.N.*) in base units."""
    def summed(group: str, field: str) -> float | None:
        count = values.get(f"{group}.count")
        return None if count is None else float(sum(values.get(f"{group}.{i}.{field}", 0) for i in range(count)))

    def scaled(key: str, factor: float) -> float | None:
        return None if key not in values else values[key] * factor

    return DomainStats(
        cpu_seconds=scaled("cpu.time", 1e-9), memory_bytes=scaled("balloon.current", 1024),
        memory_rss_bytes=scaled("balloon.rss", 1024),
        network_receive_bytes=summed("net", "rx.bytes"), network_transmit_bytes=summed("net", "tx.bytes"),
        disk_read_bytes=summed("block", "rd.bytes"), disk_write_bytes=summed("block", "wr.bytes"))


_drivers: dict[tuple[str, str, str], LibvirtDriver] = {}


def get_driver(uri: str, domain_type: str = "auto", instances_path: str = "/var/lib/etcd-compute/instances") -> Driver:
    """Per-process cached driver: pool workers call this for every job."""
    key = (uri, domain_type, instances_path)
    if key not in _drivers:
        _drivers[key] = LibvirtDriver(uri, domain_type, instances_path)
    return _drivers[key]
