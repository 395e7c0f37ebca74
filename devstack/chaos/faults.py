"""The run's faults: quick actions in the loop (a kill, a SIGSTOP, a compaction, a Placement
window, a garbage record, a host cut from etcd or Placement, a hung hypervisor), each chosen by
the one seeded rng; what takes long (a restart, a SIGCONT) is put off in the book and done in
repair threads, what is quick (a heal, a resume) in the loop when it is due.

Issue 18's faults are the ones that make a host lose its lease while its domains could run on:
a host cut off (devstack/netfault.py: blackhole, reject, or one way only) from etcd, from
Placement or from both; its daemon SIGSTOPped for longer than its lease; its libvirtd hung. Most
cuts outlast the host's fence window (lease_ttl + fence margin), so that the fence acts, the
lease expires and the run's evacuations find the host DOWN long enough to move its instances;
some end within it, so that the host comes back before anyone may act. One host always serves.
"""

from __future__ import annotations

import contextlib
import os
import signal
import uuid as uuidlib
from collections import Counter
from random import Random

from devstack.chaos.book import Book
from devstack.chaos.hypervisors import Hypervisor
from devstack.chaos.world import FENCE_WINDOW, Host, World
from devstack.netfault import MODES
from etcd_compute import contract

FAULTS = ("kill-daemon", "kill-group", "kill-worker", "stop-daemon", "stop-worker", "kill-etcd",
          "kill-etcd-leader", "compact", "placement-5xx", "placement-hang", "garbage",
          "cut-etcd", "cut-placement", "cut-both", "stop-daemon-long", "hang-libvirtd")
WEIGHTS = {"cut-etcd": 3.0, "cut-both": 2.0}  # of each kind's choice (1 unless said): cuts are issue 18's
FAULT_RATE = 0.15  # of the ticks (every 0.2-0.7 s) that inject a fault rather than start an operation
# Faults that take a host (or a hypervisor's hosts) out of service: only while another still serves.
DISRUPTIVE = {"kill-daemon", "kill-group", "stop-daemon", "stop-daemon-long", "cut-etcd", "cut-placement",
              "cut-both", "hang-libvirtd"}
CUT_MODES = tuple(m for m in MODES if m != "pass")
LONG_CUTS = 0.7  # of the cuts that outlast the host's fence window


class Faults:
    def __init__(self, book: Book, world: World, rng: Random, only: set[str], seconds: int) -> None:
        self.book, self.world, self.rng = book, world, rng
        self.faults_on = only or set(FAULTS)
        self.max_faults = max(2, seconds // 12)  # per kind

    def some(self) -> None:
        kinds = [k for k in FAULTS if k in self.faults_on]
        kind = self.rng.choices(kinds, [WEIGHTS.get(k, 1.0) for k in kinds])[0]
        if self.book.faults[kind] >= self.max_faults:
            return
        serving = [h for h in self.world.hosts if h.serving()]
        if kind in DISRUPTIVE and len(serving) < 2:
            return  # one host always serves, so scheduling and evacuation have somewhere to go
        try:
            done = self.inject(kind, serving)
        except (OSError, RuntimeError) as exc:  # e.g. the process died meanwhile, or no etcd member answered
            self.book.note(f"fault {kind} not injected: {exc!r}", live=True)
            return
        if done:
            if kind != "compact":  # compact() counts itself: it also follows etcd kills
                self.book.faults[kind] += 1
            self.book.note(f"FAULT {kind}: {done}", live=True)

    def inject(self, kind: str, serving: list[Host]) -> str | None:
        """Inject one fault of `kind`; what was done, or None if nothing fitted."""
        rng = self.rng
        if kind in ("kill-daemon", "kill-group", "stop-daemon", "stop-daemon-long", "kill-worker", "stop-worker"):
            up = [h for h in self.world.hosts if h.state == "up"]
            return self.host_fault(kind, self.pick(up)) if up else None
        if kind.startswith("cut-"):
            return self.cut(kind, self.pick(serving))
        if kind == "hang-libvirtd":
            return self.hang(serving)
        if kind in ("kill-etcd", "kill-etcd-leader"):
            return self.etcd_fault(kind == "kill-etcd-leader")
        if kind == "compact":
            return self.compact()
        if kind.startswith("placement-"):
            if self.world.proxy.current() != "pass":
                return None
            seconds = rng.uniform(2, 8) if kind == "placement-5xx" else rng.uniform(2, 13)
            self.world.proxy.fail(kind.split("-")[1], seconds)
            return f"Placement {kind.split('-')[1]} for {seconds:.1f}s"
        return self.write_garbage(rng.choice(self.world.hosts))

    def pick(self, hosts: list[Host]) -> Host:
        """Mostly the busiest host: an empty one gives the fence and evacuation nothing to do."""
        with self.book.lock:
            load = Counter(self.book.instances.values())
        busiest = max(hosts, key=lambda h: (load[h.uuid], h.name))
        return busiest if self.rng.random() < 0.6 else self.rng.choice(hosts)

    def host_fault(self, kind: str, host: Host) -> str | None:
        rng, pid = self.rng, host.pid()
        if pid is None:
            return None
        if kind in ("kill-daemon", "kill-group"):
            with self.book.lock:
                host.state = "dead"
                if kind == "kill-group":
                    host.cp.kill_all()  # the daemon and its workers at once
                else:
                    os.kill(pid, signal.SIGKILL)  # its workers follow by PDEATHSIG
            delay = rng.uniform(2, 14)
            self.book.after(delay, f"restart {host.name}", lambda: self.book.repair(self.world.restart, host))
            return f"{host.name} (pid {pid}); restart in {delay:.1f}s"
        if kind in ("stop-daemon", "stop-daemon-long"):
            target = pid
        else:
            workers = host.workers()
            if not workers:
                return None
            target = rng.choice(sorted(w.pid for w in workers))
            if kind == "kill-worker":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(target, signal.SIGKILL)
                return f"worker {target} of {host.name}"
        # (a long stop outlasts the lease and the fence window: the fence acts, the host goes DOWN)
        seconds = rng.uniform(FENCE_WINDOW + 1, FENCE_WINDOW + 14) if kind == "stop-daemon-long" else rng.uniform(1, 8)
        os.kill(target, signal.SIGSTOP)
        with self.book.lock:
            self.book.stopped.add(target)
            if target == pid:
                host.state = "stopped"
        self.book.after(seconds, f"SIGCONT {target} ({host.name})", lambda: self.cont(target, host))
        return f"SIGSTOP {'daemon' if target == pid else 'worker'} {target} of {host.name} for {seconds:.1f}s"

    def cont(self, pid: int, host: Host | None = None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        with self.book.lock:
            self.book.stopped.discard(pid)
            if host is not None and host.state == "stopped" and host.pid() == pid:
                host.state = "up"

    def cut(self, kind: str, host: Host) -> str:
        """Cut `host` from etcd, Placement or both, in one of the proxies' modes, for a while."""
        rng = self.rng
        mode = rng.choice(CUT_MODES)
        longer = rng.random() < LONG_CUTS
        seconds = (rng.uniform(FENCE_WINDOW + 0.5, 4 * FENCE_WINDOW + 4) if longer
                   else rng.uniform(0.5, FENCE_WINDOW - 0.3))
        what = kind.removeprefix("cut-")
        host.links.cut(mode, etcd=what != "placement", placement=what != "etcd")
        with self.book.lock:
            host.cut = f"{what} ({mode})"
            self.book.detail[kind][mode] += 1
            self.book.detail[kind]["longer" if longer else "shorter"] += 1
        self.book.after(seconds, f"heal {host.name}", lambda: self.heal(host))
        return (f"{host.name} from {what} ({mode}) for {seconds:.1f}s, {'longer' if longer else 'shorter'} than its "
                f"fence window ({FENCE_WINDOW:g}s)")

    def heal(self, host: Host) -> None:
        try:
            host.links.heal()
        except RuntimeError as exc:  # a proxy closed by the teardown
            self.book.note(f"heal {host.name} failed: {exc!r}", live=True)
        with self.book.lock:
            host.cut = None

    def hang(self, serving: list[Host]) -> str | None:
        """Hang a hypervisor of the run's own (SIGSTOP its libvirtd; a fake one's .hang file) while
        a host elsewhere serves; its domains run on."""
        hvs = [hv for hv in self.world.hvs if hv.can_hang and not hv.hung and any(h.hv is not hv for h in serving)]
        if not hvs:
            return None
        hv = self.rng.choice(hvs)
        seconds = self.rng.uniform(2, 15)
        hv.hang()
        self.book.after(seconds, f"unhang {hv.name}", lambda: self.resume(hv))
        return f"{hv.name} of {', '.join(h.name for h in self.world.hosts if h.hv is hv)} for {seconds:.1f}s"

    def resume(self, hv: Hypervisor) -> None:
        try:
            hv.resume()
        except Exception as exc:  # noqa: BLE001 - e.g. torn down meanwhile: the teardown kills it anyway
            self.book.note(f"unhang {hv.name} failed: {exc!r}", live=True)

    def undo(self) -> None:
        """Heal every cut and resume every hypervisor (the settle; their due actions did it already
        unless one failed)."""
        for host in self.world.hosts:
            if host.cut is not None:
                self.heal(host)
        for hv in self.world.hvs:
            if hv.hung:
                self.resume(hv)

    def etcd_fault(self, leader: bool) -> str | None:
        if any(m.proc is None for m in self.world.cluster.members):
            return None  # one member down at a time: the other two keep the quorum
        member = self.world.gateway.leader() if leader else self.rng.choice(self.world.cluster.members)
        if member is None:
            return None
        member.kill()
        delay = self.rng.uniform(2, 8)
        book = self.book
        book.after(delay, f"restart etcd {member.endpoint}", lambda: book.repair(self.world.restart_etcd, member))
        if self.rng.random() < 0.5 and "compact" in self.faults_on:  # a watch that resumes finds its history gone
            book.after(self.rng.uniform(0.05, 0.4), "FAULT compact during the outage",
                       lambda: book.note(self.compact(), live=True))
        return f"{'leader ' if leader else ''}{member.endpoint}; restart in {delay:.1f}s"

    def compact(self) -> str:
        """Compact at the current revision; one that is not possible now (no member answers,
        or that revision was compacted already) is noted, not fatal to the run."""
        try:
            revision = self.world.gateway.compact()
        except RuntimeError as exc:
            return f"compaction not injected: {exc}"
        self.book.faults["compact"] += 1
        return f"compacted at revision {revision}"

    def write_garbage(self, host: Host) -> str | None:
        if len(self.book.garbage) >= self.max_faults:
            return None
        rng = self.rng
        if rng.random() < 0.2:
            key, index = f"garbage-{len(self.book.garbage)}", False
        else:
            key, index = str(uuidlib.UUID(int=rng.getrandbits(128), version=4)), rng.random() < 0.5
        bogus = contract.new_request(key, host.uuid, {host.uuid: {"resources": {"VCPU": 1}}}, None,
                                     "resources=VCPU:1", "chaos", "chaos")
        values: list[bytes] = [b"garbage", b"", b"[]", b'{"a":1}', b"\xff\xfe{",
                               contract.encode({**bogus, "desired": "bogus"}).encode(),
                               contract.encode({**bogus, "uuid": str(uuidlib.UUID(int=1))}).encode()]
        value = rng.choice(values)
        self.world.gateway.put(contract.request_key(self.world.prefix, host.uuid, key), value)
        if index:
            index_value = contract.encode({"host": host.uuid}).encode()
            self.world.gateway.put(contract.index_key(self.world.prefix, key), index_value)
        with self.book.lock:
            self.book.garbage[key] = (host.uuid, index)
        return f"{value[:40]!r} at requests/{host.name}/{key}{' (+ index)' if index else ''}"
