"""A second libvirt host on this machine (devstack/libvirthost.py), and tests that look only at their own domains."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from devstack.libvirthost import LibvirtHost
from etcd_compute.ecompute.domainxml import build_domain_xml
from etcd_compute.ecompute.driver import DomainSpec

from conftest import Cloud, own_domains

MACHINE = "qemu:///system"
SMALL = "resources=VCPU:1,MEMORY_MB:64"


def diskless(uuid: str, owner: str) -> str:
    """The domain XML ecompute makes for a diskless instance (no NIC): it idles in SeaBIOS."""
    return build_domain_xml(DomainSpec(uuid, 1, 64, owner=owner), "qemu")


@contextlib.contextmanager
def running(uri: str, uuid: str, owner: str = "test-libvirthost") -> Iterator[libvirt.virDomain]:
    """A transient diskless domain on `uri` for the length of a block."""
    conn = libvirt.open(uri)
    try:
        dom = conn.createXML(diskless(uuid, owner))
        try:
            yield dom
        finally:
            with contextlib.suppress(libvirt.libvirtError):  # gone already
                dom.destroy()
    finally:
        conn.close()


def qemu_with_uuid(uuid: str) -> list[int]:
    """Every QEMU process of this machine started with `-uuid <uuid>`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            args = cmdline.read_bytes().split(b"\0")
            if args[0].split(b"/")[-1].startswith(b"qemu-system") and uuid.encode() in args:
                found.append(int(cmdline.parent.name))
    return found


def own_domains_on(uri: str) -> dict[str, int]:
    """The domains of these tests (owner test-libvirthost) on `uri`."""
    conn = libvirt.open(uri)
    try:
        return own_domains(conn, "test-libvirthost")
    finally:
        conn.close()


def known(uri: str) -> dict[str, set[str]]:
    """The names of every domain, network and storage pool defined or running on `uri`."""
    conn = libvirt.open(uri)
    try:
        return {"domains": {d.name() for d in conn.listAllDomains()},
                "networks": {n.name() for n in conn.listAllNetworks()},
                "pools": {p.name() for p in conn.listAllStoragePools()}}
    finally:
        conn.close()


class _VanishesAfterListing:
    """A real connection whose listAllDomains() destroys `victim` right after listing it: an
    unrelated domain going away at the worst moment for whoever walks the list."""

    def __init__(self, conn: libvirt.virConnect, victim: libvirt.virDomain) -> None:
        self._conn, self._victim = conn, victim

    def listAllDomains(self, flags: int = 0) -> list[libvirt.virDomain]:  # noqa: N802 (libvirt's name)
        listed = self._conn.listAllDomains(flags)
        self._victim.destroy()
        return listed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


@pytest.mark.qemu
def test_a_look_at_our_domains_survives_anothers_vanishing(second_host: LibvirtHost) -> None:
    """test_faults walked every domain of the shared libvirtd and read each one's XML: a domain of
    another test or stack destroyed between the listing and that read failed it."""
    ours, foreign = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    with running(second_host.uri, ours, owner="this-test"), running(second_host.uri, foreign, "another") as victim:
        conn = libvirt.open(second_host.uri)
        try:
            assert own_domains(_VanishesAfterListing(conn, victim), "this-test").keys() == {ours}
        finally:
            conn.close()


def test_the_second_host_is_a_host_of_its_own(second_host: LibvirtHost) -> None:
    """Its own host UUID and hostname, and none of the machine's definitions: copying /etc/libvirt
    would have brought every domain, network and pool any stack defined there."""
    conn = libvirt.open(second_host.uri)
    try:
        caps = conn.getCapabilities()
        assert f"<uuid>{second_host.host_uuid}</uuid>" in caps
        assert conn.getHostname() == "second"
    finally:
        conn.close()
    machine = libvirt.open(MACHINE)
    try:
        assert f"<uuid>{second_host.host_uuid}</uuid>" not in machine.getCapabilities()
    finally:
        machine.close()
    theirs, ours = known(MACHINE), known(second_host.uri)
    assert "default" in theirs["networks"]  # Debian defines it on the machine's libvirtd ...
    assert all(not theirs[kind] & ours[kind] for kind in theirs), (theirs, ours)  # ... and nothing came along


@pytest.mark.qemu
def test_a_domain_on_one_host_is_invisible_on_the_other(second_host: LibvirtHost) -> None:
    here, there = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    with running(second_host.uri, there), running(MACHINE, here):
        assert own_domains_on(second_host.uri).keys() == {there}
        assert there not in own_domains_on(MACHINE) and here in own_domains_on(MACHINE)
        [qemu] = qemu_with_uuid(there)
        assert qemu in second_host.qemu_pids()  # it runs in the second host's namespace
        assert qemu_with_uuid(here)[0] not in second_host.processes()


@pytest.mark.qemu
def test_one_uuid_runs_on_both_hosts_as_two_qemus(second_host: LibvirtHost) -> None:
    """Two copies of one instance, as the fence must never let happen: one uuid, two hosts, two
    QEMUs; the second host's is in no cgroup of the machine's tree, where both copies, alike in
    name and id, would share one (machine/qemu-1-ec-<uuid>)."""
    uuid = str(uuidlib.uuid4())
    with running(MACHINE, uuid), running(second_host.uri, uuid) as second:
        [second_qemu] = [pid for pid in qemu_with_uuid(uuid) if pid in second_host.qemu_pids()]
        [machine_qemu] = [pid for pid in qemu_with_uuid(uuid) if pid != second_qemu]
        assert "/machine/qemu-" in Path(f"/proc/{machine_qemu}/cgroup").read_text()
        assert "/machine/" not in Path(f"/proc/{second_qemu}/cgroup").read_text()
        second.destroy()  # one copy goes; the other runs on
        assert len(qemu_with_uuid(uuid)) == 1 and uuid in own_domains_on(MACHINE)


@pytest.mark.qemu
def test_a_hung_libvirtd_answers_nothing_and_its_domains_run_on(second_host: LibvirtHost) -> None:
    uuid = str(uuidlib.uuid4())
    with running(second_host.uri, uuid):
        [qemu] = qemu_with_uuid(uuid)
        second_host.hang()
        try:
            with pytest.raises(subprocess.TimeoutExpired):  # a stopped daemon can never answer
                subprocess.run(["virsh", "-c", second_host.uri, "domstate", uuid], capture_output=True, timeout=5)
            assert qemu_with_uuid(uuid) == [qemu] and qemu in second_host.qemu_pids()
        finally:
            second_host.resume()
        state = subprocess.run(["virsh", "-c", second_host.uri, "domstate", uuid], capture_output=True, text=True,
                               timeout=60)
        assert state.stdout.strip() == "running", state


@pytest.mark.qemu
def test_ecompute_builds_on_the_second_host_only(cloud: Cloud, second_host: LibvirtHost) -> None:
    host = cloud.compute("second", uri=second_host.uri, network={"mode": "none"}, metadata={"enabled": False})
    uuid = cloud.boot(SMALL)["uuid"]
    assert list(cloud.domains(host)) == [uuid]
    conn = libvirt.open(MACHINE)
    try:
        with pytest.raises(libvirt.libvirtError, match="[Dd]omain not found"):
            conn.lookupByUUIDString(uuid)
    finally:
        conn.close()
    assert len(qemu_with_uuid(uuid)) == 1 and qemu_with_uuid(uuid)[0] in second_host.qemu_pids()
    assert cloud.eschedule("destroy", uuid, "--wait").rc == 0
    assert cloud.domains(host) == {} and qemu_with_uuid(uuid) == []


@pytest.mark.qemu
def test_stop_kills_its_own_qemus_and_nothing_else(second_host: LibvirtHost, tmp_path: Path) -> None:
    """A power cut of one host: its daemons and QEMUs die; the machine's and the other host's run on;
    its definitions stay (after start() the domain is there, shut off), until start(fresh=True)."""
    host = LibvirtHost("third", tmp_path / "third")
    shutil.copytree(second_host.base / "cache", host.base / "cache")  # QEMU's probe, not made again
    mine, theirs, machines = (str(uuidlib.uuid4()) for _ in range(3))
    try:
        host.start()
        conn = libvirt.open(host.uri)
        try:
            conn.defineXML(diskless(mine, "test-libvirthost")).create()
        finally:
            conn.close()
        with running(second_host.uri, theirs), running(MACHINE, machines):
            [qemu] = host.qemu_pids()
            assert qemu_with_uuid(mine) == [qemu]
            host.stop()
            assert host.processes() == [] and host.pid is None and qemu_with_uuid(mine) == []
            assert len(qemu_with_uuid(theirs)) == len(qemu_with_uuid(machines)) == 1
        host.start()
        assert own_domains_on(host.uri) == {mine: -1}  # defined, off: as after a reboot
        host.stop()
        host.start(fresh=True)
        assert own_domains_on(host.uri) == {}
    finally:
        host.stop()
    assert host.processes() == []


def test_a_host_in_a_network_namespace_of_its_own(tmp_path: Path) -> None:
    """With netns: its own address, reachable from here over a veth pair, and a libvirt network with
    the bridge name the machine's isolated network uses, started inside without a clash."""
    host = LibvirtHost("netns", tmp_path / "netns", netns=True)
    try:
        host.start()
        assert host.address is not None
        inside = ["nsenter", f"--net=/proc/{host.pid}/ns/net", "--"]
        server = subprocess.Popen([*inside, "python3", "-c", "import socket, sys; s = socket.create_server(("
                                   f"'{host.address}', 5555)); print('up', flush=True); s.accept()[0].send(b'hi')"],
                                  stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None and server.stdout.readline() == "up\n"
        with contextlib.closing(socket.create_connection((host.address, 5555), timeout=30)) as s:
            assert s.recv(2) == b"hi"
        server.wait(30)
        conn = libvirt.open(host.uri)
        try:
            net = conn.networkCreateXML(
                "<network><name>ec-isolated</name><bridge name='ecbr-iso'/><ip address='10.124.0.1' prefix='24'>"
                "<dhcp><range start='10.124.0.100' end='10.124.0.200'/></dhcp></ip></network>")
            assert net.isActive()
        finally:
            conn.close()
        links = subprocess.run([*inside, "ip", "-br", "addr", "show", "ecbr-iso"], capture_output=True, text=True)
        assert "10.124.0.1/24" in links.stdout, links
    finally:
        host.stop()
