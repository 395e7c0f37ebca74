"""Interleavings that once broke the promises: each test forces one, then checks what holds.

The racing write is injected at the worst moment (between a read and the write that depends
on it) rather than hoped for, so each test is deterministic; where the point is that a
process outlives or misses something, QEMU domains stand for the real thing (they outlive
their daemon, as on a real host).
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
import uuid as uuidlib
from typing import Any

import psutil
import pytest

from devstack.harness import Etcd, EtcdCluster, wait_until
from etcd_compute import contract
from etcd_compute.config import EtcdConfig, ScheduleConfig
from etcd_compute.errors import EtcdUnavailable, PlacementNoAnswer
from etcd_compute.eschedule import moves
from etcd_compute.eschedule.operations import Operations
from etcd_compute.etcd import PrefixWatch
from etcd_compute.store import HostRequests, Store

from conftest import Cloud

SMALL = "resources=VCPU:1,MEMORY_MB:128"


def operations(cloud: Cloud) -> Operations:
    cfg = ScheduleConfig(etcd=EtcdConfig(endpoints=[cloud.stack["etcd"]], prefix=cloud.prefix), default_image=None)
    cfg.placement.endpoint = cloud.stack["placement"]
    return Operations(cfg)


def read_then(ops: Operations, racer: Any) -> None:
    """Make `ops` run `racer()` right after it has read a host's requests: the stale-read window."""
    real = ops.store.host_requests

    def host_requests(host: str) -> HostRequests:
        found = real(host)
        racer()
        return found
    ops.store.host_requests = host_requests  # type: ignore[method-assign]


def dead_host_with(cloud: Cloud, n: int) -> tuple[Any, list[str]]:
    """A QEMU host with `n` instances whose daemon then died (its domains run on), seen DOWN."""
    a = cloud.qemu_host("qemuA", lease_ttl=2)
    uuids = [cloud.boot(SMALL)["uuid"] for _ in range(n)]
    a.kill_all()
    wait_until(lambda: a.host not in cloud.store.alive_hosts(), 10, "A DOWN")
    return a, uuids


def where(cloud: Cloud, uuid: str) -> list[str]:
    """The hosts whose request keys name `uuid`."""
    return [k.split("/")[-2] for k in cloud.etcd_values() if "/requests/" in k and k.endswith(uuid)]


@pytest.mark.qemu
def test_two_evacuations_at_once_move_each_instance_once(cloud: Cloud) -> None:
    """Finding 1: the second evacuator read A's requests before the first moved them."""
    a, uuids = dead_host_with(cloud, 2)
    b = cloud.compute("hostB")  # not on the libvirtd A's copies still run on (as on a real second host)
    first, second = operations(cloud), operations(cloud)
    outcome: dict[str, Any] = {}
    read_then(second, lambda: outcome.setdefault("first", moves.evacuate(first, a.host)))
    outcome["second"] = moves.evacuate(second, a.host)
    assert [m["to"] for m in outcome["first"]] == [b.host, b.host]
    assert all(m["to"] is None for m in outcome["second"]), outcome["second"]  # nothing moved twice
    for uuid in uuids:
        assert where(cloud, uuid) == [b.host]
        assert set(cloud.placement.get_allocations(uuid)) == {b.host}
    assert cloud.usages(b.host)["VCPU"] == 2 and cloud.usages(a.host)["VCPU"] == 0
    wait_until(lambda: all(cloud.show(u)["state"] == "ACTIVE" for u in uuids), 30, "both rebuilt on B")
    cloud.start(a)  # A returns and removes what it no longer owns: each instance runs once
    wait_until(lambda: not cloud.domains(a), 30, "A to remove its old copies")


@pytest.mark.qemu
def test_destroy_racing_an_evacuation_is_not_lost(cloud: Cloud) -> None:
    """Finding 2: the evacuator moved the copy it had read, which still said `active`."""
    a, [uuid] = dead_host_with(cloud, 1)
    b = cloud.compute("hostB")
    ops = operations(cloud)
    read_then(ops, lambda: cloud.eschedule("destroy", uuid))
    moved = moves.evacuate(ops, a.host)
    assert moved == [{"uuid": uuid, "from": a.host, "to": None, "error": moved[0]["error"]}]
    assert "changed meanwhile" in moved[0]["error"]
    assert where(cloud, uuid) == [a.host]  # still A's, still being deleted
    assert cloud.show(uuid)["desired"] == "deleted"
    assert set(cloud.placement.get_allocations(uuid)) == {a.host}  # moved back, not leaked on B
    assert cloud.usages(b.host)["VCPU"] == 0
    assert cloud.eschedule("destroy", uuid, "--force").rc == 0
    assert cloud.eschedule(uuid).rc == 6 and not cloud.placement.get_allocations(uuid)



@pytest.mark.qemu
def test_a_forced_destroy_racing_an_evacuation_leaves_no_allocation(cloud: Cloud) -> None:
    """Found by the chaos run (seed 202): `destroy --force` freed the allocation and forgot the
    instance after an evacuator had read it; the evacuator then claimed for it anew (a consumer
    with no allocation has no generation to compare) and, its request gone, moved that claim
    "back" to the dead host, where it stayed for ever."""
    a, [uuid] = dead_host_with(cloud, 1)
    b = cloud.compute("hostB")
    ops = operations(cloud)
    read_then(ops, lambda: cloud.eschedule("destroy", uuid, "--force"))
    moved = moves.evacuate(ops, a.host)
    assert [m["to"] for m in moved] == [None], moved
    assert cloud.eschedule(uuid).rc == 6
    assert cloud.placement.get_allocations(uuid) == {}
    assert cloud.usages(a.host)["VCPU"] == cloud.usages(b.host)["VCPU"] == 0


@pytest.mark.qemu
def test_an_evacuation_whose_lost_move_was_another_ones_keeps_the_allocation(cloud: Cloud) -> None:
    """Found by a 20-minute chaos run (seed 202): two evacuations of one DOWN host chose the same
    new host; the reply to one's move was lost, and finding the allocation where it meant to put
    it, that one carried on, lost the race for the request to the other, and "undid" its move
    by freeing the allocation the other's instance now runs on."""
    a, [uuid] = dead_host_with(cloud, 1)
    b = cloud.compute("hostB")
    first, second = operations(cloud), operations(cloud)

    real_move = second.placement.move

    def lost_reply(*_args: Any) -> None:
        second.placement.move = real_move  # type: ignore[method-assign]  # only this one reply is lost
        moves.evacuate(first, a.host)  # the other evacuation, meanwhile, to the same host
        raise PlacementNoAnswer("the reply to this move was lost")

    second.placement.move = lost_reply  # type: ignore[method-assign]
    assert [m["to"] for m in moves.evacuate(second, a.host)] == [None]
    assert where(cloud, uuid) == [b.host]
    assert set(cloud.placement.get_allocations(uuid)) == {b.host}
    assert cloud.usages(b.host)["VCPU"] == 1


def test_a_hung_host_that_resumes_after_its_instance_moved_touches_nothing(cloud: Cloud, slow_image: str) -> None:
    """Finding 3: host A, stopped mid-build and evacuated, wakes up: its build ends, and it must
    neither record anything nor free the allocation that now belongs to B."""
    a = cloud.compute("hostA", lease_ttl=2)
    uuid = cloud.eschedule(SMALL + ",DISK_GB:1", slow_image, "--json").json()["uuid"]
    wait_until(lambda: cloud.show(uuid)["state"] == "BUILDING", 20, "BUILDING on A")
    hung = [a.proc, *psutil.Process(a.proc.pid).children(recursive=True)]
    for p in hung:
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):  # a short-lived child, gone
            p.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: a.host not in cloud.store.alive_hosts(), 10, "A DOWN")
        b = cloud.compute("hostB")
        assert cloud.eschedule("evacuate", a.host).rc == 0
        wait_until(lambda: cloud.show(uuid)["state"] == "ACTIVE", 60, "ACTIVE on B")
    finally:
        for p in hung:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                p.send_signal(signal.SIGCONT)
    # A wakes up to a lapsed lease: it ends the jobs it had under way (its fence has stopped what
    # they started) and claims its lease anew. Nothing A may write can be seen in etcd (that is
    # the point): once it is UP again, whatever it does about its old build, it has done.
    wait_until(lambda: a.host in cloud.store.alive_hosts(), 60, "A UP again")
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        view = cloud.show(uuid)
        assert (view["host"], view["state"]) == (b.host, "ACTIVE"), view
        assert set(cloud.placement.get_allocations(uuid)) == {b.host}
        assert cloud.etcd_values()[f"{cloud.prefix}/index/{uuid}"]["host"] == b.host
        time.sleep(0.2)
    assert cloud.eschedule("destroy", uuid, "--wait").rc == 0


def test_a_watch_survives_restarts_and_compaction_without_leaking_threads(tmp_path: Any) -> None:
    """Finding 4: a compaction while the watch was away made it cancel and retry for ever,
    leaking a thread each time; every etcd restart leaked one too."""
    with Etcd(tmp_path / "etcd") as etcd:
        store = Store(EtcdConfig(endpoints=[etcd.endpoint], prefix="/w"))
        seen: list[str] = []
        states: list[str] = []
        start = store.client.put("/w/r/0", "x").header.revision
        watch = PrefixWatch(store.etcd, "/w/r/", start, lambda k, _rev: seen.append(k), states.append)
        wait_until(lambda: "/w/r/0" in seen, 10, "the first event")
        threads = threading.active_count()
        for i in range(1, 4):
            etcd.kill()
            etcd.start()
            for j in range(5):  # history moves on and is compacted before the watch is back
                store.client.put(f"/w/other/{j}", "x")
            store.client.compact(store.client.put(f"/w/r/{i}", "x").header.revision)
            wait_until(lambda i=i: f"/w/r/{i}" in seen or "compacted" in states[-1:], 20, f"round {i}")
            store.client.put(f"/w/r/{i}b", "x")
            wait_until(lambda i=i: f"/w/r/{i}b" in seen, 20, f"events after round {i}")
        streams = watch.streams
        time.sleep(3)
        assert watch.streams == streams  # no cancel loop
        assert threading.active_count() <= threads + 2, threading.enumerate()
        watch.stop()
        store.close()


def test_garbage_under_a_hosts_prefix_never_kills_the_daemon(cloud: Cloud) -> None:
    """Finding 5: one malformed value killed ecompute, on every restart; `list` showed a traceback."""
    host = cloud.compute("host1")
    good = cloud.boot(SMALL)["uuid"]
    request = cloud.etcd_values()[f"{cloud.prefix}/requests/{host.host}/{good}"]
    bad = {"00000000-0000-4000-8000-00000000000a": "garbage", "00000000-0000-4000-8000-00000000000b": "[]",
           "00000000-0000-4000-8000-00000000000c": '{"a": 1}',
           "00000000-0000-4000-8000-00000000000d": json.dumps(dict(
               request, uuid="00000000-0000-4000-8000-00000000000d", desired="bogus"))}
    for uuid, value in bad.items():
        cloud.store.client.put(f"{cloud.prefix}/requests/{host.host}/{uuid}", value)
        cloud.store.client.put(f"{cloud.prefix}/index/{uuid}", json.dumps({"host": host.host}))
    cloud.store.client.put(f"{cloud.prefix}/instances/{good}", "not json")  # a status rewritten by the host
    cloud.store.client.put(f"{cloud.prefix}/requests/{host.host}/not-a-uuid", "garbage")
    for restart in (False, True):
        if restart:
            host.stop()
            cloud.start(host)
        wait_until(lambda: all(cloud.show(u)["state"] == "ERROR" for u in bad), 20, "bad records reported")
        assert cloud.boot(SMALL)["state"] == "ACTIVE"  # everything else goes on
        assert host.proc is not None and host.proc.poll() is None
    listed = cloud.eschedule("list", "--json")
    assert listed.rc == 0, listed
    views = {v["uuid"]: v for v in listed.json()}
    assert all("malformed" in views[u]["reason"] for u in bad), views
    wait_until(lambda: cloud.show(good)["state"] == "ACTIVE", 20, "the good one's status rewritten")
    for uuid in bad:
        r = cloud.eschedule("stop", uuid)
        assert r.rc == 7 and "destroy --force" in r.err, r
        assert cloud.eschedule("destroy", uuid, "--force").rc == 0
        assert cloud.eschedule(uuid).rc == 6


def test_ecompute_and_eschedule_fail_over_between_etcd_members(cloud: Cloud, tmp_path: Any) -> None:
    """Finding 6: with the member in use killed, the host stayed DOWN though two were healthy."""
    with EtcdCluster(tmp_path / "cluster") as cluster:
        endpoints = cluster.endpoints
        host = cloud.compute("host1", lease_ttl=2, etcd=endpoints)
        config = cloud.write("schedule-cluster.yaml", {
            "etcd": {"endpoints": endpoints, "prefix": cloud.prefix},
            "placement": {"endpoint": cloud.stack["placement"]}, "wait_timeout": 60, "default_image": None})
        watcher = Store(EtcdConfig(endpoints=endpoints[1:], prefix=cloud.prefix))
        assert cloud.eschedule(SMALL, "--wait", config=config).rc == 0
        cluster.member(endpoints[0]).kill()  # the member everyone connected to first
        down_seen = []
        deadline = time.monotonic() + 8  # four lease TTLs
        while time.monotonic() < deadline:
            with contextlib.suppress(EtcdUnavailable):  # the test's own client, mid-election
                if host.host not in watcher.alive_hosts():
                    down_seen.append(time.monotonic())
            time.sleep(0.2)
        assert not down_seen, "the host went DOWN while two members were healthy"
        r = cloud.eschedule(SMALL, "--wait", "--json", config=config)  # the watch failed over too
        assert r.rc == 0 and r.json()["state"] == "ACTIVE", r
        watcher.close()
        host.stop()


@pytest.mark.qemu
def test_workers_die_with_their_daemon_and_a_restart_finishes_the_build(cloud: Cloud, slow_image: str) -> None:
    """Finding 7: the daemon alone SIGKILLed mid-build (as by the OOM killer) left its workers
    building; the restarted daemon's worker raced them and the instance ended in ERROR."""
    host = cloud.qemu_host()
    uuid = cloud.eschedule(SMALL + ",DISK_GB:1", slow_image, "--json").json()["uuid"]
    wait_until(lambda: cloud.show(uuid)["state"] == "BUILDING", 20, "BUILDING")
    assert host.proc is not None
    workers = [p for p in psutil.Process(host.proc.pid).children() if "multiprocessing" not in " ".join(p.cmdline())
               or "spawn_main" in " ".join(p.cmdline())]
    workers = [p for p in workers if p.pid != host.fence_pid()]  # the fence outlives its daemon: that is its job
    assert workers
    host.proc.send_signal(signal.SIGKILL)  # the daemon only
    host.proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, [p.cmdline() for p in alive]
    cloud.start(host)
    wait_until(lambda: cloud.show(uuid)["state"] == "ACTIVE", 60, "ACTIVE after the restart")
    assert list(cloud.domains(host)) == [uuid]
    assert cloud.usages(host.host)["VCPU"] == 1


@pytest.mark.qemu
def test_drift_behind_ecompute_is_seen_and_undone(cloud: Cloud) -> None:
    """Finding 8: a domain powered off or removed behind ecompute's back stayed ACTIVE for ever.
    Powered off, it is STOPPED and stays off until `eschedule start`; gone, it is built again.
    The host resyncs once an hour here: libvirt's lifecycle events are what it reacts to."""
    import libvirt
    host = cloud.qemu_host()
    uuid = cloud.boot(SMALL)["uuid"]
    conn = libvirt.open("qemu:///system")
    try:
        conn.lookupByUUIDString(uuid).destroy()  # powered off (as a QEMU crash or the guest would)
        wait_until(lambda: any("STOPPED: powered off by its guest" in e["event"] for e in cloud.show(uuid)["events"]),
                   20, "the power-off seen")
        time.sleep(3)  # it stays off (as in Nova) until the user starts it
        assert cloud.show(uuid)["state"] == "STOPPED" and not conn.lookupByUUIDString(uuid).isActive()
        r = cloud.eschedule("start", uuid, "--wait", "--json")
        assert r.rc == 0 and r.json()["state"] == "ACTIVE", r
        assert conn.lookupByUUIDString(uuid).isActive()
        dom = conn.lookupByUUIDString(uuid)
        dom.destroy()
        dom.undefine()  # gone altogether (as after a host reinstall)
        wait_until(lambda: any("vanished" in e["event"] for e in cloud.show(uuid)["events"]), 20, "the loss seen")
        wait_until(lambda: cloud.show(uuid)["state"] == "ACTIVE" and uuid in cloud.domains(host), 30, "rebuilt")
    finally:
        conn.close()


def test_a_second_daemon_for_the_same_host_is_refused(cloud: Cloud) -> None:
    """Finding 9: a second ecompute with the same host uuid was accepted; both built everything."""
    first = cloud.compute("host1", lease_ttl=3)
    twin = cloud.compute("host1", start=False, lease_ttl=3)  # the same config: same host, same files
    twin.start()
    assert twin.proc is not None and twin.proc.wait(20) != 0
    assert "another ecompute already runs" in twin.logtext()
    elsewhere = cloud.compute("host1-elsewhere", start=False, lease_ttl=3,
                              uuid=first.host)  # the same host uuid on "another machine"
    elsewhere.start()
    assert elsewhere.proc is not None and elsewhere.proc.wait(20) != 0
    assert "served by another live ecompute" in elsewhere.logtext()
    assert first.proc is not None and first.proc.poll() is None
    assert first.host in cloud.store.alive_hosts()
    assert cloud.placement.inventories(first.host)["VCPU"]["reserved"] == 0  # not locked by the twins
    assert cloud.boot(SMALL)["host"] == first.host


def test_a_request_that_charges_no_vcpu_or_memory_is_never_built(cloud: Cloud) -> None:
    """Finding 11 (the host's side): a request written without VCPU or MEMORY_MB (eschedule
    refuses such queries; this one bypasses it) used to boot 1 vCPU / 256 MiB nobody counted."""
    host = cloud.compute("host1")
    request = contract.new_request(str(uuidlib.uuid4()), host.host, {host.host: {"resources": {"DISK_GB": 1}}},
                                   None, "resources=DISK_GB:1", "p", "u")
    assert cloud.store.create_instance(request)
    view = wait_until(lambda: (v := cloud.show(request["uuid"]))["state"] == "ERROR" and v, 20, "ERROR")
    assert "allocates no VCPU or MEMORY_MB" in view["reason"], view


def test_a_wait_is_woken_by_the_hosts_report_and_leaves_no_watch_behind(cloud: Cloud, monkeypatch) -> None:
    """--wait watches the instance's actual state instead of polling it: with the poll and the
    wait's own timeout an hour away, only the watch can end the wait within the minute given.
    Each wait's watch ends with it (the API server runs many waits for as long as it lives)."""
    from etcd_compute.eschedule import operations as ops_module
    monkeypatch.setattr(ops_module, "WAIT_POLL", 3600.0)
    cloud.compute("h1")
    ops = operations(cloud)
    ops.cfg.default_image = None  # no image: the test driver boots nothing
    request = ops.schedule(SMALL)
    seen: list[Any] = []

    def waits(fn: Any) -> None:
        t = threading.Thread(target=lambda: seen.append(fn()), daemon=True)
        t.start()
        t.join(60)
        assert not t.is_alive(), "only the poll, an hour away, would have ended this wait"

    waits(lambda: ops.wait_settled(request["uuid"], 3600))
    assert seen[-1]["state"] == "ACTIVE" and seen[-1]["host"] == request["host"]
    ops.destroy(request["uuid"])
    waits(lambda: ops.wait_gone(request["uuid"], 3600))
    assert cloud.instance_keys() == {}
    wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("watch ")], 10,
               "the waits' watches end")


def test_an_instance_read_while_it_is_moved_is_found_where_it_went(cloud: Cloud) -> None:
    """`eschedule UUID` reads the index, then the request on the host the index named: an
    evacuation between the two reads used to make it say "no instance" (and `--json` print
    nothing), seen once in the suite's automatic evacuation test. Read again when the index moved."""
    a, b = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    uuid = str(uuidlib.uuid4())
    request = contract.new_request(uuid, a, {a: {"resources": {"VCPU": 1}}}, None, "resources=VCPU:1", "p", "u")
    store = cloud.store
    assert store.create_instance(request)
    real = store._index_host
    moved: list[bool] = []

    def index_then_move(u: str) -> str | None:
        host = real(u)
        if not moved:  # the evacuation lands right after the first read of the index
            moved.append(store.move_instance(request, store.request_rev(a, uuid), b, None))
        return host

    store._index_host = index_then_move  # type: ignore[method-assign]
    try:
        got, _ = store.get_instance(uuid)
    finally:
        store._index_host = real  # type: ignore[method-assign]
    assert moved == [True]
    assert got is not None and got["host"] == b, got
    again, rev, _ = store.read_request(uuid)
    assert again is not None and again["host"] == b and rev.mod
