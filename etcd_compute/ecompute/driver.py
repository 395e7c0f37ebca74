"""The driver's names where their importers look for them, while libvirtdriver.py is split up."""
from etcd_compute.ecompute.libvirtdriver import (
    DNSMASQ,
    NAME_PREFIX,
    XMLNS,
    DomainInfo,
    DomainSpec,
    DomainStats,
    Driver,
    DriverError,
    HypervisorUnavailable,
    InstanceFiles,
    LibvirtDriver,
    NetworkSpec,
    RbdDisk,
    Shutdown,
    _owner,
    build_domain_xml,
    build_network_xml,
    domain_name,
    get_driver,
    owner_in_xml,
    watch_lifecycle,
)

__all__ = ["DNSMASQ", "NAME_PREFIX", "XMLNS", "DomainInfo", "DomainSpec", "DomainStats", "Driver", "DriverError",
           "HypervisorUnavailable", "InstanceFiles", "LibvirtDriver", "NetworkSpec", "RbdDisk", "Shutdown", "_owner",
           "build_domain_xml", "build_network_xml", "domain_name", "get_driver", "owner_in_xml", "watch_lifecycle"]
