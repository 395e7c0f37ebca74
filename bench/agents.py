"""Agents: 100 watchers on one etcd (request write -> agent receipt), and what one ecompute costs idle.

1. Watch latency. 100 simulated agents, each a PrefixWatch (the watch ecompute uses) on its
   own prefix, spread over a few etcd clients in this process; another client puts requests to
   random agents one at a time and the time from just before the put to the callback firing is
   recorded (time.perf_counter, one process). Floor: the same with a single agent.
2. Footprint. A real ecompute (test:///default, no network, no metadata server; workers 2, the
   default, and workers 1) against the bench etcd and Placement: RSS of the daemon plus its pool
   workers and CPU% over an idle window. Floor: a bare `python -c 'import etcd3, libvirt'`
   process sampled in the same window (what the libraries cost alone).
3. CPU while etcd is down. The same ecompute against a private etcd: idle CPU% with etcd up, then
   with that etcd killed, then etcd is started again and the watch must come back.

The ecompute processes and the private etcd are devstack.harness's, as in the tests.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib
from pathlib import Path

import psutil

from devstack.harness import Etcd
from etcd_compute.config import EtcdConfig
from etcd_compute.etcd import PrefixWatch
from etcd_compute.store import Store

import common
from common import say

BENCH = "agents"
MB = 1024 * 1024


# ----------------------------------------------------------------------------- 1. watch latency

def _revision(store: Store) -> int:
    return store.client.get_response(store.prefix + "/").header.revision


def watch_latency(info: dict, prefix: str, agents: int, writes: int, channels: int) -> list[float]:
    """Latencies (s) of `writes` puts to random agents out of `agents` watchers."""
    stores = [Store(EtcdConfig(endpoints=[info["etcd"]], prefix=prefix)) for _ in range(min(channels, agents))]
    writer = Store(EtcdConfig(endpoints=[info["etcd"]], prefix=prefix))
    received: dict[str, float] = {}
    arrived = threading.Event()
    pending: list[str] = [""]

    def on_event(key: str, _revision: int) -> None:
        received[key] = time.perf_counter()
        if key == pending[0]:
            arrived.set()

    prefixes = [f"{prefix}/agents/{agents}-{i:04d}/" for i in range(agents)]
    start = _revision(writer) + 1
    watches = [PrefixWatch(stores[i % len(stores)].etcd, p, start, on_event, lambda state: None)
               for i, p in enumerate(prefixes)]
    try:
        # Warm-up: every agent receives one request, so all streams are established.
        for p in prefixes:
            writer.client.put(p + "hello", "{}")
        deadline = time.monotonic() + 30
        while sum(k.endswith("/hello") for k in list(received)) < agents:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(received)} of {agents} watches delivered the warm-up")
            time.sleep(0.01)
        latencies = []
        rnd = random.Random(agents)
        for j in range(writes):
            key = f"{rnd.choice(prefixes)}req-{j}"
            pending[0] = key
            arrived.clear()
            t0 = time.perf_counter()
            writer.client.put(key, '{"desired": "active"}')
            if not arrived.wait(10):
                raise RuntimeError(f"watch event for {key} not delivered within 10 s")
            latencies.append(received[key] - t0)
        return latencies
    finally:
        for w in watches:
            w.stop()
        for w in watches:
            w._thread.join(2)
        writer.client.delete_prefix(prefix + "/agents/")
        for s in [writer, *stores]:
            s.close()


def bench_watch(info: dict, quick: bool) -> list[common.Figure]:
    agents, channels = 100, 10
    writes, reps = (300, 2) if quick else (1000, 3)
    prefix = f"/bench-{uuidlib.uuid4().hex[:8]}"
    p50, p99, f50, f99 = [], [], [], []
    try:
        for _ in range(reps):  # alternate floor and figure, so drift hits both
            one = watch_latency(info, prefix, 1, writes, 1)
            many = watch_latency(info, prefix, agents, writes, channels)
            f50.append(common.percentile(one, 50))
            f99.append(common.percentile(one, 99))
            p50.append(common.percentile(many, 50))
            p99.append(common.percentile(many, 99))
            say(f"watch latency p50/p99: 1 agent {f50[-1] * 1e3:.2f}/{f99[-1] * 1e3:.2f} ms, "
                f"{agents} agents {p50[-1] * 1e3:.2f}/{p99[-1] * 1e3:.2f} ms")
    finally:
        _, store = common.clients(info, prefix)
        store.client.delete_prefix(prefix + "/")
        store.close()
    ms = 1000.0
    extra = {"agents": agents, "etcd_clients": channels, "writes_per_rep": writes, "reps": reps,
             "p50_reps_ms": [round(x * ms, 3) for x in p50], "p99_reps_ms": [round(x * ms, 3) for x in p99],
             "floor_p50_reps_ms": [round(x * ms, 3) for x in f50],
             "floor_p99_reps_ms": [round(x * ms, 3) for x in f99]}
    return [
        common.figure(BENCH, f"watch latency p50, {agents} agents", common.median(p50) * ms, "ms",
                      common.median(f50) * ms, "1 agent", target="ratio <= 2",
                      check=lambda v, r: r is not None and r <= 2, **extra),
        common.figure(BENCH, f"watch latency p99, {agents} agents", common.median(p99) * ms, "ms",
                      common.median(f99) * ms, "1 agent", target="ratio <= 3",
                      check=lambda v, r: r is not None and r <= 3),
    ]


# ----------------------------------------------------------------------------- 2./3. footprint

def _tree(pid: int) -> list[psutil.Process]:
    parent = psutil.Process(pid)
    return [parent, *parent.children(recursive=True)]


def _role(p: psutil.Process, root: int) -> str:
    if p.pid == root:
        return "parent"
    with contextlib.suppress(psutil.Error):
        cmd = " ".join(p.cmdline())
        if "resource_tracker" in cmd:
            return "resource_tracker"
        if "spawn_main" in cmd:
            return "worker"
    return "other"


class Sampler:
    """RSS samples and CPU time of process trees over one window."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.rss: dict[str, list[dict[str, int]]] = {k: [] for k in pids}
        self.cpu0 = {k: self._cpu(pid) for k, pid in pids.items()}
        self.t0 = time.monotonic()

    @staticmethod
    def _cpu(pid: int) -> dict[int, float]:
        out = {}
        for p in _tree(pid):
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
        return out

    def sample(self) -> None:
        for k, pid in self.pids.items():
            by_role: dict[str, int] = {}
            for p in _tree(pid):
                with contextlib.suppress(psutil.Error):
                    role = _role(p, pid)
                    by_role[role] = by_role.get(role, 0) + p.memory_info().rss
            self.rss[k].append(by_role)

    def run(self, seconds: float, every: float = 1.0) -> None:
        end = self.t0 + seconds
        while time.monotonic() < end:
            self.sample()
            time.sleep(min(every, max(0.0, end - time.monotonic())))
        self.sample()

    def cpu_percent(self, k: str) -> float:
        """CPU% of one core used by the tree over the window (processes alive at both ends)."""
        wall = time.monotonic() - self.t0
        now = self._cpu(self.pids[k])
        used = sum(now[pid] - t for pid, t in self.cpu0[k].items() if pid in now)
        used += sum(t for pid, t in now.items() if pid not in self.cpu0[k])  # started meanwhile
        return 100.0 * used / wall

    def rss_mb(self, k: str, role: str | None = None) -> float:
        vals = [sum(v for r, v in s.items() if role is None or r == role) for s in self.rss[k]]
        return common.median(vals) / MB

    def count(self, k: str, role: str) -> int:
        with contextlib.suppress(psutil.Error):
            return sum(_role(p, self.pids[k]) == role for p in _tree(self.pids[k]))
        return 0


def workers_load(pid: int, needle: str) -> bool:
    """Does some pool worker of this daemon have `needle` (a shared object) mapped?"""
    for p in _tree(pid):
        if _role(p, pid) == "worker":
            with contextlib.suppress(OSError):
                if needle in Path(f"/proc/{p.pid}/maps").read_text():
                    return True
    return False


def uss_pss_mb(pid: int) -> dict[str, float]:
    uss = pss = 0
    for p in _tree(pid):
        with contextlib.suppress(psutil.Error):
            m = p.memory_full_info()
            uss += m.uss
            pss += getattr(m, "pss", 0)
    return {"uss_mb": round(uss / MB, 1), "pss_mb": round(pss / MB, 1)}


def bench_footprint(info: dict, quick: bool) -> list[common.Figure]:
    window = 10.0 if quick else 30.0
    prefix = f"/bench-{uuidlib.uuid4().hex[:8]}"
    files = common.files_dir(info, prefix.strip("/"))
    placement, store = common.clients(info, prefix)
    hosts = {w: common.ecompute(info, prefix, files, f"w{w}", workers=w) for w in (2, 1)}
    bare = None
    figures = []
    try:
        # The floor process sleeps through the same window as the daemons.
        bare = subprocess.Popen([sys.executable, "-c", f"import etcd3, libvirt, time; time.sleep({window + 120})"])
        for h in hosts.values():
            h.start()
        ready = {w: h.wait_ready() for w, h in hosts.items()}
        say(f"ecompute workers 2 and 1 ready in {ready[2]:.1f}s, {ready[1]:.1f}s; sampling {window:.0f}s idle")
        time.sleep(2.0)  # let the first resync and orphan check settle: idle means idle
        sampler = Sampler({"w2": hosts[2].proc.pid, "w1": hosts[1].proc.pid, "bare": bare.pid})
        sampler.run(window)
        cpu = {k: sampler.cpu_percent(k) for k in ("w2", "w1", "bare")}
        floor_rss = sampler.rss_mb("bare")
        for w in (2, 1):
            k = f"w{w}"
            total = sampler.rss_mb(k)
            parent = sampler.rss_mb(k, "parent")
            workers = sampler.rss_mb(k, "worker")
            nworkers = sampler.count(k, "worker")
            other = total - parent - workers
            split = dict(parent_mb=round(parent, 1), workers_mb=round(workers, 1), workers=nworkers,
                         per_worker_mb=round(workers / max(1, nworkers), 1),
                         resource_tracker_and_other_mb=round(other, 1),
                         gap_to_60mb=round(total - 60, 1), ready_s=round(ready[w], 2),
                         window_s=window, workers_map_grpc=workers_load(hosts[w].proc.pid, "cygrpc"),
                         **uss_pss_mb(hosts[w].proc.pid))
            figures.append(common.figure(
                BENCH, f"ecompute idle RSS, workers {w} (parent + children)", round(total, 1), "MB",
                round(floor_rss, 1),
                "bare python import etcd3, libvirt", target="<= 60 MB", check=lambda v, r: v <= 60, **split))
            figures.append(common.figure(
                BENCH, f"ecompute idle RSS, workers {w}: parent only", round(parent, 1), "MB", round(floor_rss, 1),
                "bare python import etcd3, libvirt"))
            figures.append(common.figure(
                BENCH, f"ecompute idle CPU, workers {w} ({window:.0f}s)", round(cpu[k], 2), "%", round(cpu["bare"], 2),
                "bare python, same window", target="< 1 %", check=lambda v, r: v < 1.0))
    finally:
        for h in hosts.values():
            h.stop(timeout=40)
        if bare is not None:
            bare.kill()
            bare.wait()
        for h in hosts.values():
            common.drop_provider(placement, h.host)
        store.client.delete_prefix(prefix + "/")
        store.close()
        common.remove_files(files)
    return figures


def bench_etcd_down(info: dict, quick: bool) -> list[common.Figure]:
    window = 10.0 if quick else 20.0
    prefix = f"/bench-{uuidlib.uuid4().hex[:8]}"
    files = common.files_dir(info, prefix.strip("/"))
    placement, _ = common.clients(info, prefix)
    etcd = Etcd(Path(tempfile.mkdtemp(prefix="bench-etcd-")))  # to kill under the daemon
    host = None
    try:
        etcd.start()
        host = common.ecompute(info, prefix, files, "down", etcd=etcd.endpoint)
        host.start()
        host.wait_ready()
        time.sleep(2.0)
        up = Sampler({"h": host.proc.pid})
        up.run(window)
        cpu_up = up.cpu_percent("h")
        mark = len(host.logtext())
        etcd.kill()
        down = Sampler({"h": host.proc.pid})
        down.run(window)
        cpu_down = down.cpu_percent("h")
        t0 = time.monotonic()
        etcd.start()
        host.wait_log("etcd watch back", 60, after=mark)
        back = time.monotonic() - t0
        say(f"private etcd: CPU {cpu_up:.2f}% up, {cpu_down:.2f}% down; watch back {back:.1f}s after restart")
        alive = host.proc.poll() is None
    finally:
        if host is not None:
            host.stop(timeout=40)
            common.drop_provider(placement, host.host)
        etcd.kill()
        shutil.rmtree(etcd.d, ignore_errors=True)  # its data (the only copy of this prefix) goes with it
        common.remove_files(files)
    return [common.figure(
        BENCH, f"ecompute CPU while etcd is down ({window:.0f}s)", round(cpu_down, 2), "%", round(cpu_up, 2),
        "same ecompute, etcd up", target="< 1 %", check=lambda v, r: v < 1.0,
        cpu_seconds_down=round(cpu_down * window / 100, 3), watch_back_after_restart_s=round(back, 2),
        daemon_survived=alive)]


def run(info: dict, quick: bool) -> list[common.Figure]:
    figures = bench_watch(info, quick)
    figures += bench_footprint(info, quick)
    figures += bench_etcd_down(info, quick)
    return figures
