"""The libvirt network XML of the instances' network, and the DHCP range and reservations read back from it.

Pure XML, no libvirt: the driver defines the network and updates its reservations with these.
"""
from __future__ import annotations

import ipaddress
import xml.etree.ElementTree as ET

from etcd_compute.ecompute.driver import NetworkSpec

DNSMASQ = "http://libvirt.org/schemas/network/dnsmasq/1.0"  # libvirt's pass-through of dnsmasq options
ET.register_namespace("dnsmasq", DNSMASQ)


def build_network_xml(net: NetworkSpec) -> str:
    """DHCP serves the upper part of the subnet (.100 up to .250 in a /24), where each instance
    gets a host reservation (see reserve_address). With a metadata address, DHCP also hands out
    a classless static route to it (option 121) through the bridge: real cloud-init guests add
    none by themselves. A client taking option 121 ignores the router option, so in NAT mode the
    default route goes in it too."""
    iface = ipaddress.ip_interface(net.address)
    hosts = list(iface.network.hosts())
    root = ET.Element("network")
    ET.SubElement(root, "name").text = net.name
    ET.SubElement(root, "bridge", name=net.bridge, stp="off")
    if net.forward:
        ET.SubElement(root, "forward", mode="nat")
    ip = ET.SubElement(root, "ip", address=str(iface.ip), prefix=str(iface.network.prefixlen))
    ET.SubElement(ET.SubElement(ip, "dhcp"), "range", start=str(hosts[min(99, len(hosts) // 2)]),
                  end=str(hosts[min(249, len(hosts) - 1)]))
    if net.metadata_address:
        ET.SubElement(root, "ip", address=net.metadata_address, prefix="32")
        routes = f"{net.metadata_address}/32,{iface.ip}" + (f",0.0.0.0/0,{iface.ip}" if net.forward else "")
        options = ET.SubElement(root, f"{{{DNSMASQ}}}options")
        ET.SubElement(options, f"{{{DNSMASQ}}}option", value=f"dhcp-option=121,{routes}")
    return ET.tostring(root, encoding="unicode")


def dhcp_range(xml: str) -> tuple[list[str], dict[str, str]]:
    """From a network's XML: the addresses of its DHCP range, and its host reservations (mac: ip)."""
    root = ET.fromstring(xml)
    dhcp = root.find("ip/dhcp")
    rng = dhcp.find("range") if dhcp is not None else None
    if dhcp is None or rng is None:
        return [], {}
    first, last = ipaddress.ip_address(rng.get("start", "")), ipaddress.ip_address(rng.get("end", ""))
    pool = [str(ipaddress.ip_address(a)) for a in range(int(first), int(last) + 1)]
    return pool, {h.get("mac", "").lower(): h.get("ip", "") for h in dhcp.findall("host")}

