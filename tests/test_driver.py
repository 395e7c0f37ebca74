"""Driver tests: against libvirt's in-process test driver, plus one real QEMU (TCG) domain."""
import time
import uuid

import libvirt
import pytest

from etcd_compute.ecompute.domainxml import build_domain_xml
from etcd_compute.ecompute.driver import DomainInfo, DomainSpec, DriverError
from etcd_compute.ecompute.libvirtdriver import LibvirtDriver, get_driver

TEST_URI = "test:///default"
QEMU_URI = "qemu:///system"

libvirt.registerErrorHandler(lambda *a: None, None)


@pytest.fixture
def drv():
    return get_driver(TEST_URI, "auto")


@pytest.fixture
def conn():
    """A second, independent connection: the test driver shares its state within the process."""
    c = libvirt.open(TEST_URI)
    yield c
    c.close()


@pytest.fixture
def inst(drv):
    """A fresh instance uuid, removed afterwards whatever the test did."""
    u = str(uuid.uuid4())
    yield u
    drv.destroy(u)


def test_get_driver_is_cached_per_process(drv):
    assert get_driver(TEST_URI, "auto") is drv
    assert get_driver(TEST_URI, "qemu") is not drv
    assert drv.domain_type == "test"  # the test driver only advertises <domain type='test'/>


def test_ensure_running_defines_and_starts(drv, conn, inst):
    info = drv.ensure_running(DomainSpec(inst, 2, 256))
    assert info == DomainInfo(inst, f"ec-{inst}", "running", 2, 256)

    dom = conn.lookupByUUIDString(inst)
    assert dom.name() == f"ec-{inst}"
    assert dom.isActive() and dom.isPersistent()
    state, max_kib, _, nr_vcpus, _ = dom.info()
    assert (state, max_kib, nr_vcpus) == (libvirt.VIR_DOMAIN_RUNNING, 256 * 1024, 2)
    xml = dom.XMLDesc()
    assert "<on_crash>destroy</on_crash>" in xml and "<serial type='pty'>" in xml
    assert "<graphics" not in xml and "<disk" not in xml


def test_ensure_running_twice_is_harmless(drv, conn, inst):
    first = drv.ensure_running(DomainSpec(inst, 1, 128))
    dom_id = conn.lookupByUUIDString(inst).ID()
    assert drv.ensure_running(DomainSpec(inst, 1, 128)) == first
    assert conn.lookupByUUIDString(inst).ID() == dom_id  # not restarted
    assert drv.list_uuids().count(inst) == 1


def test_ensure_running_restarts_and_resumes(drv, conn, inst):
    drv.ensure_running(DomainSpec(inst, 1, 128))
    dom = conn.lookupByUUIDString(inst)
    dom.destroy()
    assert drv.lookup(inst).state == "shutoff"
    assert drv.ensure_running(DomainSpec(inst, 1, 128)).state == "running"
    dom.suspend()
    assert drv.lookup(inst).state == "paused"
    assert drv.ensure_running(DomainSpec(inst, 1, 128)).state == "running"


def test_lookup(drv, inst):
    assert drv.lookup(inst) is None
    drv.ensure_running(DomainSpec(inst, 1, 64))
    info = drv.lookup(inst.upper())  # uuids are normalised
    assert info is not None and info.uuid == inst and info.memory_mb == 64 and info.state == "running"


def test_list_uuids_only_ours(drv, conn, inst):
    foreign = str(uuid.uuid4())
    conn.defineXML(build_domain_xml(DomainSpec(foreign, 1, 64), "test").replace(f"ec-{foreign}", "not-ours"))
    try:
        drv.ensure_running(DomainSpec(inst, 1, 64))
        uuids = drv.list_uuids()
        assert inst in uuids
        builtin = conn.lookupByName("test").UUIDString()
        assert builtin not in uuids and foreign not in uuids
    finally:
        conn.lookupByUUIDString(foreign).undefine()


def test_destroy(drv, conn, inst):
    assert drv.destroy(inst) is False  # never existed: not an error
    drv.ensure_running(DomainSpec(inst, 1, 64))
    assert drv.destroy(inst) is True
    assert drv.destroy(inst) is False
    assert drv.lookup(inst) is None
    assert inst not in drv.list_uuids()
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByUUIDString(inst)


def test_destroy_defined_but_stopped(drv, conn, inst):
    drv.ensure_running(DomainSpec(inst, 1, 64))
    conn.lookupByUUIDString(inst).destroy()
    assert drv.destroy(inst) is True
    assert drv.lookup(inst) is None


def test_state_survives_other_connections_closing(drv, inst):
    """test:/// state dies with the last connection: the driver's cached one must keep it alive."""
    drv.ensure_running(DomainSpec(inst, 1, 64))
    other = libvirt.open(TEST_URI)
    other.close()
    assert drv.lookup(inst).state == "running"


def test_errors_are_driver_errors(inst):
    with pytest.raises(DriverError, match="invalid instance uuid"):
        get_driver(TEST_URI).lookup("not-a-uuid")
    with pytest.raises(DriverError, match="invalid domain type"):
        LibvirtDriver(TEST_URI, "nonsense").ensure_running(DomainSpec(inst, 1, 64))


# --- real QEMU -------------------------------------------------------------------------------

def test_qemu_diskless_domain_runs_and_is_destroyed(stack):  # the stack fixture starts libvirtd
    drv = get_driver(QEMU_URI, "qemu")  # KVM here is a broken software KVM: force TCG
    inst = str(uuid.uuid4())
    check = libvirt.open(QEMU_URI)
    try:
        t0 = time.monotonic()
        info = drv.ensure_running(DomainSpec(inst, 1, 128))
        started = time.monotonic() - t0
        assert info.state == "running" and info.memory_mb == 128 and info.vcpus == 1

        dom = check.lookupByUUIDString(inst)  # no BIOS boot device: it sits in SeaBIOS, still running
        state, max_kib, _, nr_vcpus, _ = dom.info()
        assert state == libvirt.VIR_DOMAIN_RUNNING and max_kib == 128 * 1024 and nr_vcpus == 1
        assert "type='qemu'" in dom.XMLDesc() and inst in drv.list_uuids()
        assert drv.ensure_running(DomainSpec(inst, 1, 128)).state == "running"

        t0 = time.monotonic()
        assert drv.destroy(inst) is True
        destroyed = time.monotonic() - t0
        assert drv.destroy(inst) is False and drv.lookup(inst) is None
        with pytest.raises(libvirt.libvirtError) as e:
            check.lookupByUUIDString(inst)
        assert e.value.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
        print(f"qemu: define+start {started:.2f} s, destroy+undefine {destroyed:.2f} s")
    finally:
        drv.destroy(inst)
        check.close()


def test_list_uuids_by_owner(drv, conn):
    """Several ecomputes may share one libvirtd: each lists only the domains it owns."""
    mine, theirs, untagged = (str(uuid.uuid4()) for _ in range(3))
    try:
        drv.ensure_running(DomainSpec(mine, 1, 64, owner="host-a"))
        drv.ensure_running(DomainSpec(theirs, 1, 64, owner="host-b"))
        drv.ensure_running(DomainSpec(untagged, 1, 64))
        assert mine in drv.list_uuids(owner="host-a")
        assert theirs not in drv.list_uuids(owner="host-a") and untagged not in drv.list_uuids(owner="host-a")
        assert {mine, theirs, untagged} <= set(drv.list_uuids())
    finally:
        for u in (mine, theirs, untagged):
            drv.destroy(u)


def test_a_host_takes_over_its_instances_domain_made_by_another_on_a_shared_libvirtd(drv, inst):
    """Evacuated onto a host sharing the old host's libvirtd, an instance's domain already exists
    (one uuid is one domain there): the new host adopts it, running as it is, instead of
    rebuilding it for ever (its own list never showed a domain owned by another)."""
    before = drv.ensure_running(DomainSpec(inst, vcpus=1, memory_mb=64, owner="host-a"))
    assert inst in drv.list_uuids(owner="host-a")
    after = drv.ensure_running(DomainSpec(inst, vcpus=1, memory_mb=64, owner="host-b"))
    assert after.state == "running" and after.uuid == before.uuid
    assert inst in drv.list_uuids(owner="host-b") and inst not in drv.list_uuids(owner="host-a")


# --- what guests need from the XML --------------------------------------------------------------

def test_domains_have_acpi_keep_their_console_and_are_pinned_to_their_address():
    """Without ACPI QEMU runs with -no-acpi: no clean shutdown, one CPU whatever <vcpu> says."""
    import xml.etree.ElementTree as ET
    spec = DomainSpec(str(uuid.uuid4()), 2, 256, console_log="/x/c.log", network="net", ip="10.9.0.7")
    dom = ET.fromstring(build_domain_xml(spec, "qemu"))
    assert dom.find("features/acpi") is not None and dom.find("features/apic") is not None
    assert dom.find("devices/serial/log").get("append") == "on"  # every boot's output is kept
    ref = dom.find("devices/interface/filterref")
    assert ref.get("filter") == "clean-traffic"
    assert ref.find("parameter").attrib == {"name": "IP", "value": "10.9.0.7"}
    unpinned = ET.fromstring(build_domain_xml(DomainSpec(spec.uuid, 1, 64, bridge="br0"), "qemu"))
    assert unpinned.find("devices/interface/filterref") is None  # another's DHCP: no address known


def test_domains_say_they_are_openstack_and_report_panics():
    """SMBIOS as Nova's, so stock images' cloud-init finds its OpenStack datasource without a
    config drive; a pvpanic device, so a guest's panic reaches the host."""
    import xml.etree.ElementTree as ET
    spec = DomainSpec(str(uuid.uuid4()), 1, 64)
    dom = ET.fromstring(build_domain_xml(spec, "qemu"))
    entries = {e.get("name"): e.text for e in dom.findall("sysinfo[@type='smbios']/system/entry")}
    assert entries == {"manufacturer": "OpenStack Foundation", "product": "OpenStack Nova", "serial": spec.uuid,
                       "uuid": spec.uuid, "family": "Virtual Machine"}
    assert dom.find("os/smbios").get("mode") == "sysinfo"
    assert dom.find("devices/panic").get("model") == "isa" and dom.findtext("on_crash") == "destroy"
    assert dom.find("devices/disk[@device='cdrom']") is None  # no config drive given: none


@pytest.mark.parametrize(("forward", "routes"), [
    (False, "169.254.169.254/32,10.9.0.1"),
    (True, "169.254.169.254/32,10.9.0.1,0.0.0.0/0,10.9.0.1")])  # option 121 replaces the router option
def test_networks_hand_out_a_route_to_the_metadata_address(forward, routes):
    import xml.etree.ElementTree as ET

    from etcd_compute.ecompute.driver import NetworkSpec
    from etcd_compute.ecompute.networkxml import DNSMASQ, build_network_xml
    net = ET.fromstring(build_network_xml(NetworkSpec("n", "br", "10.9.0.1/24", forward, "169.254.169.254")))
    assert [o.get("value") for o in net.iter(f"{{{DNSMASQ}}}option")] == [f"dhcp-option=121,{routes}"]
    bare = ET.fromstring(build_network_xml(NetworkSpec("n", "br", "10.9.0.1/24", forward)))
    assert list(bare.iter(f"{{{DNSMASQ}}}option")) == []


def _reserve(args):
    name, uuids = args
    d = LibvirtDriver(QEMU_URI, "qemu", "/nonexistent")
    return [(u, d.reserve_address(u, name)) for u in uuids]


def test_concurrent_reservations_never_share_an_address(stack):
    """Several hosts' workers may share one network: libvirt is the arbiter of its reservations."""
    import concurrent.futures
    import multiprocessing

    from etcd_compute.guestdata import mac_address
    name = f"ec-resv-{uuid.uuid4().hex[:6]}"
    drv = LibvirtDriver(QEMU_URI, "qemu", "/nonexistent")
    drv.conn.networkDefineXML(  # defined, never started: reservations go to its definition
        f"<network><name>{name}</name><bridge name='{name[:12]}' stp='off'/><ip address='10.98.0.1' "
        "prefix='24'><dhcp><range start='10.98.0.100' end='10.98.0.111'/></dhcp></ip></network>")
    try:
        batches = [[str(uuid.uuid4()) for _ in range(3)] for _ in range(4)]
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(4, mp_context=ctx) as pool:
            got = dict(pair for batch in pool.map(_reserve, [(name, b) for b in batches]) for pair in batch)
        assert len(got) == 12 and len(set(got.values())) == 12  # twelve addresses for twelve: all of them
        again = drv.reserve_address(batches[0][0], name)
        assert again == got[batches[0][0]]  # a rebuild finds its reservation
        with pytest.raises(DriverError, match="no free address"):
            drv.reserve_address(str(uuid.uuid4()), name)
        assert drv.destroy(batches[0][0], name) is True  # releases it
        xml = drv.conn.networkLookupByName(name).XMLDesc(0)
        assert mac_address(batches[0][0]) not in xml and f"ip='{got[batches[0][0]]}'" not in xml
        assert drv.reserve_address(str(uuid.uuid4()), name) == got[batches[0][0]]
    finally:
        drv.conn.networkLookupByName(name).undefine()
