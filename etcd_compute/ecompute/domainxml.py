"""The libvirt domain XML of an instance, built from its DomainSpec, and the host it names.

Pure XML, no libvirt: what a guest is made of reads in one place, testable without a hypervisor.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET

from etcd_compute.ecompute.driver import VOLUME_ALIAS, DomainSpec, RbdDisk, VolumeDisk
from etcd_compute.guestdata import SMBIOS_FAMILY, SMBIOS_MANUFACTURER, SMBIOS_PRODUCT

XMLNS = "https://github.com/etcd-compute/xmlns/instance/1.0"
ET.register_namespace("ec", XMLNS)
# Pins a guest's NIC to its MAC and its reserved IP (libvirt ships it): no spoofing of either.
GUEST_FILTER = "clean-traffic"


def build_domain_xml(spec: DomainSpec, domain_type: str) -> str:
    """Render the libvirt domain XML for a spec (the only place that knows the XML layout).

    No <graphics> at all (type='none' is invalid); a serial pty doubles as the console, its
    output appended to console_log across boots (virtlogd rotates it at its max_size). ACPI
    and APIC: without them QEMU runs with -no-acpi (no clean shutdown, one CPU whatever <vcpu>).
    A pvpanic device (ISA, port 0x505: the guest's pvpanic-mmio driver) tells QEMU when the
    guest's kernel panics, and on_crash destroy turns that into a domain shut off as crashed:
    the host sees a crash instead of a guest that hangs while its instance stays ACTIVE.
    SMBIOS system data as Nova's (guestdata.SMBIOS_*; serial and uuid the instance's): a stock
    image's cloud-init finds its OpenStack datasource by it when there is no config drive.
    """
    dom = ET.Element("domain", type=domain_type)
    ET.SubElement(dom, "name").text = spec.name
    ET.SubElement(dom, "uuid").text = spec.uuid
    meta = ET.SubElement(ET.SubElement(dom, "metadata"), f"{{{XMLNS}}}instance")
    ET.SubElement(meta, f"{{{XMLNS}}}uuid").text = spec.uuid
    if spec.owner:
        ET.SubElement(meta, f"{{{XMLNS}}}host").text = spec.owner
    ET.SubElement(dom, "memory", unit="MiB").text = str(spec.memory_mb)
    ET.SubElement(dom, "vcpu").text = str(spec.vcpus)
    _machine(dom, spec)
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    for event, action in (("on_poweroff", "destroy"), ("on_reboot", "restart"), ("on_crash", "destroy")):
        ET.SubElement(dom, event).text = action
    devices = ET.SubElement(dom, "devices")
    if spec.disk:
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type="qcow2")
        ET.SubElement(disk, "source", file=spec.disk)
        ET.SubElement(disk, "target", dev="vda", bus="virtio")
    elif spec.rbd:
        _rbd_disk(devices, spec.rbd, "vda")
    for volume, dev in zip(spec.volumes, volume_targets(len(spec.volumes), {"vda"}), strict=True):
        devices.append(volume_element(volume, dev))
    if spec.config_drive:
        cd = ET.SubElement(devices, "disk", type="file", device="cdrom")
        ET.SubElement(cd, "driver", name="qemu", type="raw")
        ET.SubElement(cd, "source", file=spec.config_drive)
        ET.SubElement(cd, "target", dev="hdc", bus="ide")
        ET.SubElement(cd, "readonly")
    if spec.network or spec.bridge:
        kind = "network" if spec.network else "bridge"
        nic = ET.SubElement(devices, "interface", type=kind)
        ET.SubElement(nic, "source", {kind: spec.network or spec.bridge or ""})
        ET.SubElement(nic, "mac", address=spec.mac)
        ET.SubElement(nic, "model", type="virtio")
        if spec.ip:
            ET.SubElement(ET.SubElement(nic, "filterref", filter=GUEST_FILTER), "parameter", name="IP",
                          value=spec.ip)
    ET.SubElement(ET.SubElement(devices, "panic", model="isa"), "address", type="isa", iobase="0x505")
    serial = ET.SubElement(devices, "serial", type="pty")
    if spec.console_log:
        ET.SubElement(serial, "log", file=spec.console_log, append="on")
    ET.SubElement(serial, "target", port="0")
    ET.SubElement(ET.SubElement(devices, "console", type="pty"), "target", type="serial", port="0")
    return ET.tostring(dom, encoding="unicode")


def _machine(dom: ET.Element, spec: DomainSpec) -> None:
    """What the guest's firmware says: its SMBIOS system data, and how it boots."""
    system = ET.SubElement(ET.SubElement(dom, "sysinfo", type="smbios"), "system")
    for name, value in (("manufacturer", SMBIOS_MANUFACTURER), ("product", SMBIOS_PRODUCT),
                        ("serial", spec.uuid), ("uuid", spec.uuid), ("family", SMBIOS_FAMILY)):
        ET.SubElement(system, "entry", name=name).text = value
    os_el = ET.SubElement(dom, "os")
    # i440fx: the config drive is an IDE cdrom, which q35 does not have.
    ET.SubElement(os_el, "type", machine="pc").text = "hvm"
    for tag in ("kernel", "initrd", "cmdline"):
        if getattr(spec, tag):
            ET.SubElement(os_el, tag).text = getattr(spec, tag)
    if not spec.kernel:
        ET.SubElement(os_el, "boot", dev="hd")
    ET.SubElement(os_el, "smbios", mode="sysinfo")


def _rbd_disk(devices: ET.Element, rbd: RbdDisk, dev: str) -> ET.Element:
    """A network disk on RBD: no host cache (another host may open it next), and error_policy
    'stop': a guest whose client was blocklisted (storage.take_over) pauses instead of seeing
    I/O errors, and never writes again."""
    disk = ET.SubElement(devices, "disk", type="network", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="raw", cache="none", error_policy="stop")
    auth = ET.SubElement(disk, "auth", username=rbd.user)
    ET.SubElement(auth, "secret", type="ceph", uuid=rbd.secret_uuid)
    source = ET.SubElement(disk, "source", protocol="rbd", name=rbd.name)
    for host, port in rbd.monitors:
        ET.SubElement(source, "host", name=host, port=str(port))
    ET.SubElement(disk, "target", dev=dev, bus="virtio")
    return disk


def volume_element(volume: VolumeDisk, dev: str) -> ET.Element:
    """A volume's disk: an RBD disk as the root disk is, with the volume's id as its serial (what
    the guest sees) and its alias (how the domain's XML names it)."""
    disk = _rbd_disk(ET.Element("devices"), volume.rbd, dev)
    ET.SubElement(disk, "serial").text = volume.serial
    ET.SubElement(disk, "alias", name=volume.alias)
    return disk


def volume_xml(volume: VolumeDisk, dev: str) -> str:
    return ET.tostring(volume_element(volume, dev), encoding="unicode")


def volume_targets(count: int, taken: set[str]) -> list[str]:
    """The first `count` virtio disk names after vda not in `taken` (vdb, vdc, ...)."""
    free = [f"vd{chr(c)}" for c in range(ord("b"), ord("z") + 1) if f"vd{chr(c)}" not in taken]
    if count > len(free):
        raise ValueError(f"no virtio disk name left for {count} more volumes")
    return free[:count]


def disks_in_xml(xml: str) -> tuple[dict[str, str], set[str]]:
    """A domain XML's volumes ({volume id: target dev}, by their alias) and every disk target it uses."""
    root = ET.fromstring(xml)
    volumes, targets = {}, set()
    for disk in root.findall("devices/disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if dev:
            targets.add(dev)
        alias = disk.find("alias")
        name = alias.get("name", "") if alias is not None else ""
        if dev and name.startswith(VOLUME_ALIAS):
            volumes[name.removeprefix(VOLUME_ALIAS)] = dev
    return volumes, targets


def owner_in_xml(xml: str) -> str | None:
    """The host named in a domain's XML (ours: <metadata><ec:instance><ec:host>), or in a
    libvirt status file holding it; None if none is named or it is no XML."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    return root.findtext(f".//{{{XMLNS}}}instance/{{{XMLNS}}}host")

