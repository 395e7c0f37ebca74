"""No instance ever runs twice, even when its host is cut off (issue 18), on two real libvirt hosts.

Host A runs on a libvirtd of its own (devstack/libvirthost.py: a second libvirt host on this
machine) and reaches etcd through a fault proxy (devstack/netfault.py); host B runs on the
machine's libvirtd. A diskless QEMU instance runs on A; then A is lost in one of three ways
(cut from etcd by a blackhole, its daemon SIGSTOPped past its lease, its daemon SIGKILLed)
and the instance is evacuated to B. Every QEMU process of the machine is sampled every
100 ms throughout (devstack/chaos/sampler.py): the instance must never run on both hosts at
once (invariant C, etcd_compute/invariants.py, with no window at all), A's copy must be
stopped (by A's fence) before A even shows DOWN, and A must never start it again.

Measured on the tree before the fence: the cut-off host kept its guest running beside the
evacuated copy for as long as the cut lasted.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from devstack.chaos.sampler import Sampler
from devstack.harness import Ecompute, wait_until
from devstack.libvirthost import LibvirtHost
from devstack.netfault import HostLinks
from etcd_compute.invariants import Observation, two_copies

from conftest import Cloud

pytestmark = pytest.mark.qemu
SMALL = "resources=VCPU:1,MEMORY_MB:64"
TTL = 3  # the hosts' lease_ttl: the fence acts 0.3 * TTL before the lease can lapse


@dataclass
class Pair:
    cloud: Cloud
    a: Ecompute  # on the second libvirt host, behind the proxies
    b: Ecompute  # on the machine's libvirtd
    links: HostLinks
    sampler: Sampler
    uuid: str

    def copies(self) -> dict[str, str]:
        """Where the instance runs now, by the sampler's last look: place -> uuid."""
        return {where: uuid for where, uuid in self.sampler.sample() if uuid == self.uuid}

    def seen(self) -> list[Observation]:
        return [o for o in self.sampler.observations if o.uuid == self.uuid]

    def up(self, host: Ecompute) -> bool:
        return host.host in self.cloud.store.alive_hosts()

    def evacuate_to_b(self) -> float:
        """`eschedule evacuate A` (it waits for A's fence window), then the instance ACTIVE on B;
        the monotonic time it was."""
        r = self.cloud.eschedule("evacuate", self.a.host, "--json", timeout=120)
        assert r.rc == 0, r
        assert [(m["uuid"], m["to"]) for m in r.json()] == [(self.uuid, self.b.host)], r.out
        view = wait_until(lambda: (v := self.cloud.show(self.uuid))["state"] == "ACTIVE" and v, 60, "ACTIVE on B")
        assert view["host"] == self.b.host
        return time.monotonic()

    def check(self) -> None:
        """Never two copies; and A, back, never runs the instance again (its leftover goes)."""
        wait_until(lambda: self.up(self.a), 60, "A UP again")
        wait_until(lambda: self.uuid not in self.cloud.domains(self.a), 60, "A's leftover domain removed")
        deadline = time.monotonic() + 2 * TTL  # A has resynced (its epoch changed): it stays so
        while time.monotonic() < deadline:
            assert len(self.copies()) == 1, self.copies()
            time.sleep(0.2)
        assert self.cloud.show(self.uuid)["host"] == self.b.host
        assert two_copies(self.seen()) == [], self.seen()


@pytest.fixture
def pair(cloud: Cloud, second_host: LibvirtHost) -> Iterator[Pair]:
    """An instance on A (alone at first, so that it lands there), then B started beside it."""
    links = HostLinks([cloud.stack["etcd"]], cloud.stack["placement"], name="hostA")
    sampler = Sampler().start()
    try:
        a = cloud.compute("hostA", uri=second_host.uri, network={"mode": "none"}, metadata={"enabled": False},
                          lease_ttl=TTL, **links.compute_config())
        uuid = cloud.boot(SMALL)["uuid"]
        assert uuid in cloud.domains(a)
        b = cloud.qemu_host("hostB", lease_ttl=TTL)
        world = Pair(cloud, a, b, links, sampler, uuid)
        wait_until(lambda: len(world.copies()) == 1, 10, "the instance's QEMU on A")
        yield world
    finally:
        sampler.stop()
        links.close()


def _stopped_before_down(pair: Pair, lost_at: float) -> tuple[float, float]:
    """Wait until A's copy has stopped and A shows DOWN; the first must come first. Seconds after the loss."""
    stopped = wait_until(lambda: not pair.copies() and time.monotonic(), 6 * TTL, "A's fence to stop the domain")
    down = wait_until(lambda: not pair.up(pair.a) and time.monotonic(), 6 * TTL, "A DOWN")
    assert stopped <= down, f"A's domain still ran {down - stopped:.1f}s after A showed DOWN"
    return stopped - lost_at, down - lost_at


def _lose(pair: Pair, how: Callable[[], None], name: str) -> None:
    lost_at = time.monotonic()
    how()
    stopped, down = _stopped_before_down(pair, lost_at)
    active = pair.evacuate_to_b() - lost_at
    print(f"{name}: A's domain stopped {stopped:.1f}s after the loss, A DOWN at {down:.1f}s, "
          f"ACTIVE on B at {active:.1f}s (lease_ttl {TTL})")


def test_a_host_cut_from_etcd_stops_its_domain_before_anyone_may_start_it_elsewhere(pair: Pair) -> None:
    """A blackhole between A and etcd (no RST: calls just hang): A's fence stops its domain before
    A's lease can lapse; evacuated to B; once the cut heals, A does not start it again."""
    _lose(pair, lambda: pair.links.cut("blackhole", placement=False), "etcd blackholed")
    pair.links.heal()
    pair.check()


def test_a_daemon_stopped_past_its_lease_has_its_domain_stopped(pair: Pair) -> None:
    """SIGSTOP of A's daemon (its workers and fence run on): the fence stops the domain; when the
    daemon wakes up it finds its lease gone and the instance moved, and touches nothing of it."""
    assert pair.a.proc is not None
    pid = pair.a.proc.pid
    try:
        _lose(pair, lambda: os.kill(pid, signal.SIGSTOP), "daemon SIGSTOPped")
    finally:
        os.kill(pid, signal.SIGCONT)
    pair.check()


def test_a_killed_daemon_has_its_domain_stopped_by_its_fence(pair: Pair) -> None:
    """kill -9 of A's daemon (its workers die with it; its fence, a process of its own, does not):
    the fence stops the domain; A's daemon, started again, finds the instance moved and removes
    what is left of it."""
    assert pair.a.proc is not None and pair.a.fence_pid() is not None
    _lose(pair, lambda: os.kill(pair.a.proc.pid, signal.SIGKILL), "daemon SIGKILLed")  # type: ignore[union-attr]
    pair.a.kill_all()  # reap it
    pair.cloud.start(pair.a)
    pair.check()
