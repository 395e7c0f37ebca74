"""Disks that outlive their host (issue 19): instance root disks as RBD clones in Ceph.

Two real QEMU hosts with the rbd storage backend (storage.backend: rbd): A on a libvirtd of its
own (devstack/libvirthost.py), B on the machine's. A real guest (the test guest, booted from
its kernel with `ec.stamp=WORD`: it says what the first sector of its disk held at boot, then
writes WORD there) runs on A; A dies as a machine does (its daemon, fence, libvirtd and every
QEMU killed); the instance is evacuated to B and started there from *the same* disk: its guest
finds what it wrote on A. Its events say so; destroying it removes its clone from the pool.
"""

from __future__ import annotations

import re
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest

from devstack.ceph import CephInfo
from devstack.harness import wait_until
from devstack.libvirthost import LibvirtHost
from devstack.testguest import ensure_guest
from etcd_compute.ecompute.storage import disk_name
from etcd_compute.eschedule import claims
from etcd_compute.placement import shard_aggregate, shard_of

from conftest import Cloud

pytestmark = [pytest.mark.qemu, pytest.mark.ceph]
QUERY = "resources=VCPU:1,MEMORY_MB:128,DISK_GB:1"
SMALL_DISK = "resources=VCPU:1,MEMORY_MB:64,DISK_GB:1&required=CUSTOM_RBDTEST"


def stamped(console: Path) -> str:
    """What the guest found on its disk at boot (`stamp_was=`), once it has stamped it (the whole
    report comes a minute later, after a DHCP that a guest without a NIC waits out)."""
    def said() -> str | None:
        text = console.read_text(errors="replace") if console.exists() else ""
        found = re.findall(r"ECTEST stamp_was=([^\r\n]*)", text)
        return found[-1] if found and "ECTEST stamp=KEPT" in text else None
    return str(wait_until(lambda: (s := said()) is not None and [s], 600, f"the guest to stamp its disk ({console})",
                          interval=0.5)[0])


def beat(console: Path) -> int:
    """The guest's last heartbeat written to its disk (`beat=N`), 0 before the first."""
    found = re.findall(r"ECTEST beat=(\d+)", console.read_text(errors="replace") if console.exists() else "")
    return int(found[-1]) if found else 0


def rbd_storage(ceph: CephInfo) -> dict:
    """compute.yaml's storage section for the stack's Ceph."""
    return {"backend": "rbd", "rbd": {"pool": ceph.pool, "ceph_conf": str(ceph.conf), "cluster": ceph.cluster,
                                      "user": ceph.client, "keyring": str(ceph.keyring),
                                      "secret_uuid": ceph.secret_uuid,
                                      "monitors": [f"{h}:{p}" for h, p in ceph.mon_hosts]}}


@pytest.fixture
def host_a(stack: dict, ceph: CephInfo, tmp_path: Path) -> Iterator[LibvirtHost]:
    """A libvirt host of this test's own (it is killed whole), with Ceph's secret and pool."""
    host = LibvirtHost(f"rbd-{uuidlib.uuid4().hex[:6]}", Path(stack["stack"]) / "hosts" / f"rbd-{tmp_path.name[-12:]}")
    host.start(fresh=True)
    try:
        ceph.define_libvirt(host.uri)
        yield host
    finally:
        host.stop()


def test_an_instance_on_rbd_keeps_its_data_when_its_host_dies(host_a: LibvirtHost, cloud: Cloud,
                                                               ceph: CephInfo) -> None:
    guest = ensure_guest()
    storage = rbd_storage(ceph)
    a = cloud.compute("rbdA", uri=host_a.uri, network={"mode": "none"}, metadata={"enabled": False},
                      lease_ttl=3, storage=storage)
    r = cloud.eschedule(QUERY, guest["disk"], "--kernel", guest["kernel"], "--initrd", guest["initrd"],
                        "--cmdline", f"{guest['cmdline']} ec.stamp=KEPT", "--wait", "--json", timeout=300)
    assert r.rc == 0, r
    uuid = r.json()["uuid"]
    assert disk_name(uuid) in ceph.rbd("ls", ceph.pool).split()  # its disk is in the pool, not on A
    first = stamped(cloud.console_log("rbdA", uuid))
    assert first == "", first  # a fresh clone: nothing there before the guest stamped it
    b = cloud.qemu_host("rbdB", lease_ttl=3, storage=storage)

    a.kill_all()  # A dies as a machine does: its daemon, its fence and libvirtd, and every QEMU of it
    a.kill_fence()
    host_a.stop()
    wait_until(lambda: a.host not in cloud.store.alive_hosts(), 30, "A DOWN")
    moved = cloud.eschedule("evacuate", a.host, "--json", timeout=120)
    assert moved.rc == 0 and [m["to"] for m in moved.json()] == [b.host], moved
    view = wait_until(lambda: (v := cloud.show(uuid))["state"] == "ACTIVE" and v, 120, "ACTIVE on B")
    assert any("on its own disk (in Ceph: what it wrote is kept)" in e["event"] for e in view["events"]), view
    assert stamped(cloud.console_log("rbdB", uuid)) == "KEPT"  # what the guest wrote on A, read on B

    # A comes back (its machine rebooted): it removes the domain it no longer owns, never the disk
    # its new host runs on.
    host_a.start()
    cloud.start(a)
    wait_until(lambda: uuid not in cloud.domains(a), 60, "A to remove its leftover domain")
    assert disk_name(uuid) in ceph.rbd("ls", ceph.pool).split()
    beats = beat(cloud.console_log("rbdB", uuid))
    wait_until(lambda: beat(cloud.console_log("rbdB", uuid)) > beats, 60, "B's guest still writing its disk")

    assert cloud.eschedule("destroy", uuid, "--wait").rc == 0
    assert disk_name(uuid) not in ceph.rbd("ls", ceph.pool).split()  # nothing left in the pool


def test_disk_gb_of_rbd_hosts_comes_from_the_pool_in_one_allocation(cloud: Cloud, ceph: CephInfo) -> None:
    """The pool is a sharing provider (DISK_GB, MISC_SHARES_VIA_AGGREGATE) in its own shard
    aggregates with the rbd hosts, which offer no DISK_GB of their own: a claim takes VCPU and
    MEMORY_MB from a host and DISK_GB from the pool, in one allocation; a host with local disks
    still gives its own; queries narrowed to a shard find both kinds; a full pool says no capacity."""
    storage = rbd_storage(ceph)
    storage["rbd"]["capacity_gb"] = 6
    rbd_hosts = [cloud.compute(f"rbd{i}", storage=storage, traits=["CUSTOM_RBDTEST", "CUSTOM_RBDONLY"])
                 for i in range(2)]
    local = cloud.compute("local", traits=["CUSTOM_RBDTEST"],  # room for one: the rest must go to the pool
                          inventory={"VCPU": {"total": 1}, "MEMORY_MB": {"total": 4096}, "DISK_GB": {"total": 40}})
    pool = cloud.placement.provider(next(iter(cloud.store.pools())))
    assert pool is not None
    assert cloud.placement.inventories(pool["uuid"])["DISK_GB"]["total"] == 6
    assert "MISC_SHARES_VIA_AGGREGATE" in cloud.placement.traits(pool["uuid"])
    for host in rbd_hosts:
        assert "DISK_GB" not in cloud.placement.inventories(host.host)
    for host in rbd_hosts:  # eschedule's query narrowed to a host's shard finds it, with the pool
        n = shard_of(host.host, 16)
        with mock.patch.object(claims.PICK, "randrange", return_value=n):
            [narrowed, _] = claims.narrowed(claims.parse_query(SMALL_DISK, 50), 16, cloud.store.pools())
        assert shard_aggregate(n, pool["uuid"]) in narrowed[-1][1]
        found = cloud.placement.allocation_candidates(narrowed)["allocation_requests"]
        assert any(set(c["allocations"]) == {host.host, pool["uuid"]} for c in found), found
    placed: dict[str, int] = {}
    for _ in range(8):
        r = cloud.eschedule(SMALL_DISK, "--json")
        if r.rc == 3:
            break
        assert r.rc == 0, r
        view = r.json()
        allocations = cloud.placement.get_allocations(view["uuid"])
        if view["host"] == local.host:
            assert set(allocations) == {local.host}, allocations
        else:
            assert set(allocations) == {view["host"], pool["uuid"]}, allocations
            assert allocations[pool["uuid"]]["resources"] == {"DISK_GB": 1}
        placed[view["host"]] = placed.get(view["host"], 0) + 1
    assert placed[local.host] == 1 and sum(placed.values()) == 7, placed  # the pool held 6
    assert cloud.placement.usages(pool["uuid"])["DISK_GB"] == sum(placed.get(h.host, 0) for h in rbd_hosts)
    r = cloud.eschedule("resources=VCPU:1,MEMORY_MB:64,DISK_GB:7&required=CUSTOM_RBDONLY")
    assert r.rc == 3 and "DISK_GB" in r.err, r  # more than the pool holds


def test_a_guest_whose_disk_is_taken_away_is_left_off_and_starts_again_on_its_own_disk(cloud: Cloud,
                                                                                       ceph: CephInfo) -> None:
    """Another Ceph client takes the disk over (its blocklist of this QEMU's client, as an
    evacuation after a wrong --force would): the guest, which can no longer write (error_policy
    stop pauses it on the I/O error), is recorded CRASHED with that reason and left off, not
    resumed into the same error again and again; `start` starts a new QEMU, a new client, which
    finds its disk as it left it and writes it again."""
    guest = ensure_guest()
    cloud.qemu_host("rbdio", lease_ttl=3, storage=rbd_storage(ceph))
    r = cloud.eschedule(QUERY, guest["disk"], "--kernel", guest["kernel"], "--initrd", guest["initrd"],
                        "--cmdline", f"{guest['cmdline']} ec.stamp=KEPT", "--wait", "--json", timeout=300)
    assert r.rc == 0, r
    uuid = r.json()["uuid"]
    console = cloud.console_log("rbdio", uuid)
    assert stamped(console) == ""
    wait_until(lambda: beat(console) > 1, 60, "the guest writing its disk")
    [client] = ceph.watchers(disk_name(uuid))
    ceph.blocklist(client, 600)
    try:
        view = wait_until(lambda: (v := cloud.show(uuid))["state"] == "CRASHED" and v, 120, "CRASHED")
        assert "its disk failed under it (paused on an I/O error" in (view["reason"] or ""), view
        assert "'eschedule start' starts it" in view["reason"], view
        stopped_at = beat(console)
        time.sleep(5)
        assert beat(console) == stopped_at and cloud.show(uuid)["state"] == "CRASHED"  # left off, writing nothing
        assert cloud.eschedule("start", uuid, "--wait").rc == 0
        read = lambda: console.read_text(errors="replace") if console.exists() else ""  # noqa: E731
        wait_until(lambda: "stamp_was=KEPT" in read() and re.search(r"stamp_was=KEPT.*beat=2", read(), re.S), 120,
                   "the new boot finding its disk as it was, and writing it")
        assert client not in ceph.watchers(disk_name(uuid))
    finally:
        ceph.unblocklist(client)
    assert cloud.eschedule("destroy", uuid, "--wait").rc == 0
    assert disk_name(uuid) not in ceph.rbd("ls", ceph.pool).split()
