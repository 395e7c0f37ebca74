"""The daemon's loop in-process, over a fake hypervisor: deadlines, parking, health, the fence.

Each scenario runs a whole ecompute daemon (daemon.Daemon, the same wiring as the process)
on a thread of the test, its jobs on threads (pool.ThreadRunner) against a hypervisor made
of files (fakedriver: fake:///DIR, whose faults are files too), with the stack's real etcd
and Placement and eschedule's own operations. No QEMU, no worker processes: seconds each.
The end-to-end tests (QEMU, two libvirt hosts) prove the same on the real thing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devstack.harness import wait_until
from etcd_compute import config, contract
from etcd_compute.ecompute import fakedriver, proof, services
from etcd_compute.ecompute.daemon import Daemon, worker_settings
from etcd_compute.ecompute.pool import ThreadRunner
from etcd_compute.errors import EtcdUnavailable, NoCapacity
from etcd_compute.eschedule.operations import Operations
from etcd_compute.states import Actual, Command

from conftest import Cloud

SMALL = "resources=VCPU:1,MEMORY_MB:64"


@dataclass
class Host:
    """One in-process daemon over a fake hypervisor."""

    daemon: Daemon
    thread: threading.Thread
    hypervisor: Path
    cfg: config.ComputeConfig
    rc: list[int]

    @property
    def host(self) -> str:
        return self.daemon.host

    def fault(self, name: str, on: bool = True) -> None:
        """Create (or remove) a fault file of the fake hypervisor: .down, .hang, .hang-<op>."""
        path = self.hypervisor / name
        if on:
            path.touch()
        else:
            path.unlink(missing_ok=True)

    def running(self) -> set[str]:
        return {uuid for uuid, owner in fakedriver.running(self.hypervisor).items() if owner == self.host}

    def lease_cut(self) -> threading.Event:
        """A switch: while set, every refresh of the host's lease fails as if etcd were cut off."""
        live = self.daemon.liveness
        assert live is not None
        refresh, cut = live.store.refresh_alive, threading.Event()

        def unreachable(lease: int, timeout: float | None = None) -> bool:
            if cut.is_set():
                raise EtcdUnavailable("etcd unreachable (cut off by the test)")
            return refresh(lease, timeout)
        live.store.refresh_alive = unreachable  # type: ignore[method-assign]
        return cut


class InProcess:
    def __init__(self, cloud: Cloud) -> None:
        self.cloud = cloud
        self.hosts: list[Host] = []
        self.ops = Operations(config.load_schedule(str(cloud.schedule_yaml)))

    def start(self, name: str = "fake1", **overrides: Any) -> Host:
        hypervisor = self.cloud.files / name / "hypervisor"
        settings = self.cloud.compute_config(name, uri=f"fake://{hypervisor}", **overrides)
        path = self.cloud.write(f"{name}.yaml", settings)
        cfg = config.load_compute(str(path))
        daemon = Daemon(cfg, runner=ThreadRunner(worker_settings(cfg)))
        rc: list[int] = []
        thread = threading.Thread(target=lambda: rc.append(daemon.run()), name=f"daemon {name}", daemon=True)
        host = Host(daemon, thread, hypervisor, cfg, rc)
        self.hosts.append(host)
        thread.start()
        wait_until(lambda: daemon.loop is not None and daemon.host in self.cloud.store.alive_hosts() or rc, 30,
                   f"daemon {name} serving")
        assert not rc, f"daemon {name} ended with {rc}"
        return host

    def schedule(self, query: str = SMALL) -> str:
        return self.ops.schedule(query)["uuid"]

    def state(self, uuid: str) -> str:
        return self.ops.show(uuid)["state"]

    def stop(self, host: Host) -> None:
        host.daemon.stopping.set()
        host.thread.join(30)

    def close(self) -> None:
        for host in self.hosts:
            self.stop(host)
            pid = proof.fence_pid(host.cfg.instances_path)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.cloud.placement.delete_provider(host.host)
        self.ops.close()


@pytest.fixture
def inproc(cloud: Cloud) -> Iterator[InProcess]:
    world = InProcess(cloud)
    yield world
    world.close()


def test_a_hung_hypervisor_call_ends_at_its_deadline_is_retried_and_parks_the_build_in_error(
        inproc: InProcess) -> None:
    """A hung libvirt call used to leave its instance BUILDING until the daemon restarted: now the
    build's deadline ends it (its worker killed), it is tried again after a backoff, and after
    `retries` timeouts in a row the instance is ERROR with the reason, its allocation freed."""
    host = inproc.start(deadlines={"build": 1}, retries=2)
    host.fault(".hang-ensure_running")
    uuid = inproc.schedule()
    wait_until(lambda: "trying again (1 of 2)" in (inproc.ops.show(uuid)["reason"] or ""), 20, "the first timeout")
    view = wait_until(lambda: (v := inproc.ops.show(uuid))["state"] == Actual.ERROR and v, 30, "ERROR")
    assert view["reason"] == "build did not finish within 1s; its worker was killed (2 times in a row)"
    assert inproc.cloud.placement.get_allocations(uuid) == {}
    # The hung calls go on once the hypervisor wakes up and start the domain after all, as a hung
    # libvirtd may after its client was killed: the next look at the hypervisor removes it.
    host.fault(".hang-ensure_running", on=False)
    wait_until(lambda: uuid in host.running(), 10, "the hung start to go on")
    assert host.daemon.loop is not None
    host.daemon.loop.resync_now.set()
    wait_until(lambda: uuid not in host.running() and not (host.hypervisor / f"{uuid}.json").exists(), 20,
               "the failed build's leftover domain removed")
    assert inproc.state(uuid) == Actual.ERROR


def test_a_dead_hypervisor_makes_the_host_unhealthy_and_its_builds_wait(inproc: InProcess) -> None:
    """Builds used to fail into ERROR while libvirtd was down: now the host is unhealthy (its
    record says why, its inventory is locked so nothing new lands), the build waits with a named
    reason, and everything goes on once the hypervisor answers again."""
    host = inproc.start(deadlines={"build": 5})
    host.fault(".down")
    uuid = inproc.schedule()
    wait_until(lambda: (inproc.cloud.host_record(host.host) or {}).get("state") == "unhealthy", 20, "unhealthy")
    assert "cannot connect" in (inproc.cloud.host_record(host.host) or {}).get("reason", "")
    view = inproc.ops.show(uuid)
    assert view["state"] == Actual.BUILDING and view["reason"].startswith("waiting for the hypervisor"), view
    inventory = inproc.cloud.placement.inventories(host.host)
    assert all(i["reserved"] == i["total"] for i in inventory.values()), inventory
    with pytest.raises(NoCapacity):
        inproc.schedule()
    host.fault(".down", on=False)
    wait_until(lambda: inproc.state(uuid) == Actual.ACTIVE, 30, "ACTIVE once the hypervisor answers")
    wait_until(lambda: (inproc.cloud.host_record(host.host) or {}).get("state") == "up", 20, "healthy")
    assert uuid in host.running()
    assert inproc.state(inproc.schedule()) in (Actual.PENDING, Actual.BUILDING, Actual.ACTIVE)


def test_the_keep_alive_outlives_a_bug(inproc: InProcess) -> None:
    """An unexpected exception used to end the keep-alive for good: the host showed DOWN while
    its guests ran (and could be evacuated). Now the loop is restarted, and the host stays UP."""
    host = inproc.start(lease_ttl=4)
    live = host.daemon.liveness
    assert live is not None
    refresh, failed = live.store.refresh_alive, threading.Event()

    def broken(lease: int, timeout: float | None = None) -> bool:
        if not failed.is_set():
            failed.set()
            raise RuntimeError("a bug in the keep-alive")
        return refresh(lease, timeout)
    live.store.refresh_alive = broken  # type: ignore[method-assign]
    wait_until(failed.is_set, 10, "the bug to strike")
    deadline = time.monotonic() + 3 * host.cfg.lease_ttl
    while time.monotonic() < deadline:
        assert host.host in inproc.cloud.store.alive_hosts(), "the host went DOWN"
        time.sleep(0.2)
    assert len(host.daemon.supervisor.loops["liveness"].restarts or []) == 1


def test_a_loop_that_keeps_dying_stops_the_daemon_with_a_failure(inproc: InProcess,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A loop that cannot be kept running must not leave a daemon running blind: the daemon exits
    non-zero (systemd starts it afresh)."""
    monkeypatch.setattr(services, "MAX_RESTARTS", 2)
    host = inproc.start()

    def doomed(stopping: threading.Event) -> None:
        raise RuntimeError("this loop always dies")
    host.daemon.supervisor.start("doomed", doomed)
    host.thread.join(30)
    assert host.rc == [1]
    assert host.daemon.failure == "loop 'doomed' died 3 times in 300s"


def test_the_watchdog_is_fed_only_while_every_loop_makes_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd's watchdog hears WATCHDOG=1 while the loops make progress, and nothing once one is stuck."""
    with tempfile.TemporaryDirectory(prefix="wd-") as d, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(f"{d}/notify")
        sock.settimeout(0.05)
        monkeypatch.setenv("NOTIFY_SOCKET", f"{d}/notify")
        monkeypatch.setenv("WATCHDOG_USEC", "200000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        stopping = threading.Event()
        supervisor = services.Supervisor(stopping, services.MetricsHooks(), lambda why: None)
        progress = [time.monotonic()]
        supervisor.watch("reconcile loop", lambda: progress[0], allowance=1.0)
        supervisor.start_watchdog()

        def heard(seconds: float) -> list[bytes]:
            end, got = time.monotonic() + seconds, []
            while time.monotonic() < end:
                progress[0] = time.monotonic() if not stuck.is_set() else progress[0]
                with contextlib.suppress(TimeoutError):
                    got.append(sock.recv(64))
            return got
        stuck = threading.Event()
        try:
            assert b"WATCHDOG=1" in heard(1.0)
            stuck.set()
            heard(1.5)  # the allowance runs out
            assert heard(1.0) == []
            stuck.clear()
            assert b"WATCHDOG=1" in heard(1.0)
        finally:
            stopping.set()


def test_the_fence_stops_the_domains_before_the_lease_can_lapse_and_the_host_starts_them_again(
        inproc: InProcess) -> None:
    """A host whose daemon can no longer refresh its lease (etcd cut off, the daemon stuck) has its
    domains stopped by its fence before etcd can let the lease lapse; once it proves its lease
    again it starts the instances it still owns, with the fence named in their events."""
    host = inproc.start(lease_ttl=4)
    uuids = [inproc.schedule() for _ in range(2)]
    for uuid in uuids:
        wait_until(lambda uuid=uuid: inproc.state(uuid) == Actual.ACTIVE, 20, f"{uuid} ACTIVE")
    assert host.running() == set(uuids)
    cut = host.lease_cut()
    cut.set()
    cut_at = time.monotonic()
    stopped_at = wait_until(lambda: not host.running() and time.monotonic(), 3 * host.cfg.lease_ttl,
                            "the fence to stop the domains")
    down_at = wait_until(lambda: host.host not in inproc.cloud.store.alive_hosts() and time.monotonic(),
                         3 * host.cfg.lease_ttl, "the lease to lapse in etcd")
    assert stopped_at < down_at, "a domain still ran when the host showed DOWN"
    print(f"fence: domains stopped {stopped_at - cut_at:.1f}s after the cut, the host DOWN {down_at - cut_at:.1f}s "
          f"after it (lease_ttl {host.cfg.lease_ttl}, margin {host.cfg.fence_margin()})")
    cut.clear()
    for uuid in uuids:
        wait_until(lambda uuid=uuid: inproc.state(uuid) == Actual.ACTIVE and uuid in host.running(), 30,
                   f"{uuid} running again")
        events = [e["event"] for e in inproc.ops.show(uuid)["events"]]
        assert any("stopped by the host's fence" in e for e in events), events


def test_an_instance_stopped_while_its_host_was_fenced_stays_stopped_without_a_crash(inproc: InProcess) -> None:
    """The chaos run (qemu, seed 23 in CI): the fence killed a guest's QEMU, which libvirt then
    calls "shut off (crashed)" until its next start; the user stopped the instance meanwhile.
    Once the lease was back the instance was recorded STOPPED, and every resync after took the
    crashed domain for a new panic: CRASHED, stopped, CRASHED again, never settled."""
    host = inproc.start(lease_ttl=4, resync_interval=1)
    uuid = inproc.schedule()
    wait_until(lambda: inproc.state(uuid) == Actual.ACTIVE, 20, "ACTIVE")
    cut = host.lease_cut()
    cut.set()
    wait_until(lambda: not host.running(), 3 * host.cfg.lease_ttl, "the fence to stop the domain")
    inproc.ops.act(Command.STOP, uuid)
    cut.clear()
    wait_until(lambda: inproc.state(uuid) == Actual.STOPPED, 30, "STOPPED")
    time.sleep(4)  # a few resyncs, each of which looks at the (crashed) domain
    view = inproc.ops.show(uuid)
    events = [e["event"] for e in view["events"]]
    assert view["state"] == Actual.STOPPED and not view.get("crashes"), view
    assert not [e for e in events if "crash" in e], events


def test_a_power_job_under_way_says_so_in_the_status(inproc: InProcess) -> None:
    """The chaos run (qemu, seed 1804): a host down for 12 s came back with its libvirtd hung; the
    stop asked meanwhile was handed out, and its status said nothing until the job's deadline, so
    the instance waited well past the W bound with no reason. A job that records no state of its
    own now says what is under way when it is handed out, as Nova's task state does."""
    host = inproc.start()
    uuid = inproc.schedule()
    wait_until(lambda: inproc.state(uuid) == Actual.ACTIVE, 20, "ACTIVE")
    host.fault(".hang-set_power")
    inproc.ops.act(Command.STOP, uuid)
    view = wait_until(lambda: (v := inproc.ops.show(uuid))["reason"] and v, 10, "a reason while the stop hangs")
    assert (view["state"], view["reason"]) == (Actual.ACTIVE, "stopping"), view
    host.fault(".hang-set_power", on=False)
    view = wait_until(lambda: (v := inproc.ops.show(uuid))["state"] == Actual.STOPPED and v, 20, "STOPPED")
    events = [e["event"] for e in view["events"]]
    assert view["reason"] is None and events[-2:] == ["ACTIVE", "STOPPED"], events  # (the outcome is the event)


def test_a_destroy_started_again_says_so_in_its_status(inproc: InProcess) -> None:
    """The same run: DELETING was recorded, then the daemon was killed before its destroy ended;
    started again it handed the destroy out under the old record, which said nothing, so the
    instance looked stuck with no reason given."""
    host = inproc.start()
    uuid = inproc.schedule()
    wait_until(lambda: inproc.state(uuid) == Actual.ACTIVE, 20, "ACTIVE")
    status, _ = inproc.cloud.store.get_status(uuid)
    assert status is not None  # (DELETING as the killed daemon left it; no job of this one decides on it)
    inproc.cloud.store.put_status(contract.new_status(uuid, host.host, Actual.DELETING, old=status),
                                  inproc.cloud.store.get_request(host.host, uuid)[1])
    host.fault(".hang-destroy")
    inproc.ops.destroy(uuid)
    view = wait_until(lambda: (v := inproc.ops.show(uuid))["reason"] and v, 10, "a reason while the destroy hangs")
    assert (view["state"], view["reason"]) == (Actual.DELETING, "no destroy was under way; starting one"), view
    host.fault(".hang-destroy", on=False)
    wait_until(lambda: inproc.cloud.store.get_status(uuid)[0] is None, 20, "destroyed")


def test_a_build_started_again_says_so_in_its_status(inproc: InProcess) -> None:
    """The chaos run (qemu, seed 1802): a host recorded BUILDING, but etcd's answer to that write
    was lost (a member failing over), so the build was not handed out; it was built much later
    under the same record (the same when a daemon restarts mid-build): no reason and an old
    stamp, so the instance looked stuck with no reason given. A build started again under a
    record of its own now says so."""
    host = inproc.start()
    loop = host.daemon.loop
    assert loop is not None
    written = loop.records.put_status
    lost: list[str] = []

    def answer_lost(uuid: str, state: Actual, *args: Any, **kwargs: Any) -> bool:
        done = written(uuid, state, *args, **kwargs)
        if state == Actual.BUILDING and not lost:
            lost.append(uuid)
            raise EtcdUnavailable("etcd unreachable (put_status): Channel closed!")
        return done

    loop.records.put_status = answer_lost  # type: ignore[method-assign]
    uuid = inproc.schedule()
    view = wait_until(lambda: (v := inproc.ops.show(uuid))["state"] == Actual.ACTIVE and v, 30, "ACTIVE")
    events = [e["event"] for e in view["events"]]
    assert lost == [uuid] and events[-2:] == ["BUILDING: no build was under way; starting one", "ACTIVE"], \
        events


def test_each_start_again_of_a_build_cut_short_is_recorded(inproc: InProcess) -> None:
    """The chaos run (qemu, seed 1802 again): a host that lost its lease again and again started
    its build again each time, but from the second time on its status already said so, word for
    word, and was left as it was: asked to stop meanwhile, the instance looked stuck for 30 s with
    no reason given since. Every start again is recorded now."""
    host = inproc.start(lease_ttl=4)
    host.fault(".hang-ensure_running")  # every build hangs until the lease lapses and ends it
    uuid = inproc.schedule()
    wait_until(lambda: inproc.state(uuid) == Actual.BUILDING, 20, "BUILDING")
    cut = host.lease_cut()

    def lapse_and_heal() -> str:
        """The lease lapses (the build is cut short), then is proven again: the status once the
        host has started the build again."""
        seen = inproc.cloud.store.get_status(uuid)[0]
        cut.set()
        wait_until(lambda: host.host not in inproc.cloud.store.alive_hosts(), 30, "the lease to lapse")
        cut.clear()
        found = wait_until(lambda: (s := inproc.cloud.store.get_status(uuid)[0]) and s != seen and s, 30,
                           "the build started again")
        return str(found["updated_at"])

    lapse_and_heal()
    stopped = inproc.ops.act(Command.STOP, uuid)  # the request changes while the build is retried
    again = lapse_and_heal()
    assert again > stopped["updated_at"], "the start again after the stop was not recorded"
    view = inproc.ops.show(uuid)
    assert view["reason"] == "its build was cut short while the host's lease was not proven; trying again", view
    host.fault(".hang-ensure_running", on=False)
    wait_until(lambda: inproc.state(uuid) == Actual.STOPPED, 60, "STOPPED")
