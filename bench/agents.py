"""Agents: 100 watchers on one etcd (request write -> agent receipt), and what one ecompute costs idle.

1. Watch latency. 100 simulated agents, each a PrefixWatch (the watch ecompute uses) on its
   own prefix, spread over a few etcd clients in this process; another client puts requests to
   random agents one at a time and the time from just before the put to the callback firing is
   recorded (time.perf_counter, one process). Floor: the same with a single agent.
2. Footprint. Real ecomputes (no network, no metadata server) against the bench etcd and
   Placement, idle: on test:///default with workers 1 and 2, and on qemu:///system with the
   default 2 workers (its lifecycle-event listener runs there too). RSS, PSS and USS
   (psutil's memory_full_info) of every process of each tree, daemon, workers, listener and
   multiprocessing's resource tracker, the median of one sample a second; the goal is on the
   total PSS (issue 13: <= 50 MB), RSS double-counts what the processes share. Floors, idle in
   the same window: each of those processes as a bare interpreter importing only the libraries
   it must have (FLOORS), summed over the tree; and `python -c 'import etcd3, libvirt'`.
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
from etcd_compute.ecompute.jobs import EVENTS_PROCESS
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
        return "daemon"
    with contextlib.suppress(psutil.Error):
        cmd = " ".join(p.cmdline())
        if "resource_tracker" in cmd:
            return "resource_tracker"
        if "spawn_main" in cmd:
            return "events" if p.name() == EVENTS_PROCESS[:15] else "worker"
    return "other"


class Sampler:
    """Memory samples (RSS, PSS, USS: psutil's memory_full_info) and CPU time of process trees
    over one window."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        # per tree: one sample a second, each {pid: (role, rss, pss, uss)}
        self.mem: dict[str, list[dict[int, tuple[str, int, int, int]]]] = {k: [] for k in pids}
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
            found: dict[int, tuple[str, int, int, int]] = {}
            for p in _tree(pid):
                with contextlib.suppress(psutil.Error):
                    m = p.memory_full_info()
                    found[p.pid] = (_role(p, pid), m.rss, m.pss, m.uss)
            self.mem[k].append(found)

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

    def total_mb(self, k: str, field: int) -> float:
        """Median over the window of the tree's sum of RSS (1), PSS (2) or USS (3)."""
        return common.median([sum(v[field] for v in s.values()) for s in self.mem[k]]) / MB

    def processes(self, k: str) -> list[dict[str, object]]:
        """Each process of the tree (by role) with its median RSS, PSS and USS in MB."""
        pids = sorted({pid for s in self.mem[k] for pid in s}, key=lambda pid: (_ROLES.index(self._role(k, pid)), pid))
        rows = []
        for pid in pids:
            seen = [s[pid] for s in self.mem[k] if pid in s]
            rows.append({"role": seen[-1][0], "pid": pid, **{
                f"{name}_mb": round(common.median([v[i] for v in seen]) / MB, 1)
                for i, name in ((1, "rss"), (2, "pss"), (3, "uss"))}})
        return rows

    def roles(self, k: str) -> list[list[str]]:
        """The roles of the tree's processes, sample by sample."""
        return [[v[0] for v in s.values()] for s in self.mem[k]]

    def _role(self, k: str, pid: int) -> str:
        return next(s[pid][0] for s in reversed(self.mem[k]) if pid in s)


_ROLES = ["daemon", "worker", "events", "resource_tracker", "other", "bare"]

# Floor processes, idle in the same window: each of ecompute's processes as a bare interpreter
# importing only the libraries it must have.
FLOORS = {
    "daemon": "import etcd3, requests, yaml",  # etcd (watch, lease), Placement's HTTP client, config
    "worker": "import libvirt, concurrent.futures.process",  # the hypervisor, the pool's worker loop
    "resource_tracker": "import multiprocessing.resource_tracker",  # what the tracker runs
}


def workers_load(pid: int, needle: str) -> bool:
    """Does some pool worker of this daemon have `needle` (a shared object) mapped?"""
    for p in _tree(pid):
        if _role(p, pid) == "worker":
            with contextlib.suppress(OSError):
                if needle in Path(f"/proc/{p.pid}/maps").read_text():
                    return True
    return False


def _table(title: str, rows: list[dict[str, object]]) -> None:
    say(f"{title}:")
    say(f"    {'process':<17} {'RSS':>6} {'PSS':>6} {'USS':>6}  (MB, median of the window)")
    for r in rows:
        say(f"    {r['role']:<17} {r['rss_mb']:>6} {r['pss_mb']:>6} {r['uss_mb']:>6}")
    say(f"    {'total':<17} {sum(r['rss_mb'] for r in rows):>6.1f} {sum(r['pss_mb'] for r in rows):>6.1f} "
        f"{sum(r['uss_mb'] for r in rows):>6.1f}")


def _floor_pss(code: str, seconds: float) -> tuple[float, float]:
    """(PSS, RSS) in MB of a bare interpreter running `code`, idle and alone: PSS splits pages
    among the processes that map them, so a floor sharing the window would lower the figure."""
    proc = subprocess.Popen([sys.executable, "-c", f"{code}; print(flush=True); import time; time.sleep(600)"],
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # imported
        sampler = Sampler({"floor": proc.pid})
        sampler.run(seconds)
        return sampler.total_mb("floor", 2), sampler.total_mb("floor", 1)
    finally:
        proc.kill()
        proc.wait()


COLORS = {"daemon": "#4878a8", "worker": "#e49444", "events": "#d1615d", "resource_tracker": "#85b6b2",
          "other": "#999999"}


def draw_footprint(measured: dict, floors: dict[str, float], path: Path) -> None:
    """One bar per configuration: the PSS of each of its processes, stacked, beside the same
    processes' floors (bare interpreters with only their libraries) and the 50 MB goal."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.4))
    labels, right = [], 50.0
    for i, (what, rows) in enumerate((what, rows) for what, rows, *_ in measured.values()):
        for j, (kind, value) in enumerate((("ecompute", "pss_mb"), ("floor", None))):
            y, left = 2 * i + j * 0.8, 0.0
            for r in rows:
                width = float(r[value]) if value else floors.get(str(r["role"]), floors["worker"])
                ax.barh(y, width, left=left, height=0.7, color=COLORS.get(str(r["role"]), "#999999"),
                        alpha=1.0 if value else 0.45, edgecolor="white")
                left += width
            ax.text(left + 0.5, y, f"{left:.1f}", va="center", fontsize=8)
            labels.append((y, f"{what}: {kind}"))
            right = max(right, left)
    ax.axvline(50, color="black", linestyle="--", linewidth=1, label="goal: 50 MB")
    ax.set_xlim(0, right * 1.1)
    ax.set_yticks([y for y, _ in labels], [t for _, t in labels], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("idle PSS (MB)")
    roles = [role for role in COLORS if any(r["role"] == role for _, rows, *_ in measured.values() for r in rows)]
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[role]) for role in roles]
    handles.append(plt.Line2D([0], [0], color="black", linestyle="--", linewidth=1))
    ax.legend(handles, [*roles, "goal: 50 MB"], fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("ecompute idle memory by process (PSS), and each process's floor", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def bench_footprint(info: dict, quick: bool) -> list[common.Figure]:
    """Idle memory of ecompute on test:///default with workers 1 and 2 (the goal: PSS <= 50 MB),
    and on qemu:///system with the default 2 workers, where its lifecycle-event listener runs too.
    Each alone in its window (PSS splits shared pages: two daemons side by side would each look
    lighter), beside a bare `python` for CPU; the floors after, each alone too."""
    window = 10.0 if quick else 30.0
    prefix = f"/bench-{uuidlib.uuid4().hex[:8]}"
    files = common.files_dir(info, prefix.strip("/"))
    placement, store = common.clients(info, prefix)
    configs = {"w1": ("workers 1", {"workers": 1}), "w2": ("workers 2", {"workers": 2}),
               "qemu": ("qemu:///system, workers 2", {"workers": 2, "uri": "qemu:///system",
                                                      "network": {"mode": "none"}, "metadata": {"enabled": False}})}
    figures = []
    measured = {}
    try:
        for k, (what, kwargs) in configs.items():
            host = common.ecompute(info, prefix, files, k, **kwargs)  # type: ignore[arg-type]
            bare = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({window + 60})"])
            try:
                host.start()
                ready = host.wait_ready()
                time.sleep(2.0)  # let the first resync and orphan check settle: idle means idle
                assert host.proc is not None
                sampler = Sampler({k: host.proc.pid, "bare": bare.pid})
                sampler.run(window)
                rows = sampler.processes(k)
                _table(f"{k} ({what}, ready in {ready:.1f}s)", rows)
                total = {f: round(sampler.total_mb(k, i), 1) for f, i in (("rss", 1), ("pss", 2), ("uss", 3))}
                measured[k] = (what, rows, total, sampler.cpu_percent(k), sampler.cpu_percent("bare"),
                               workers_load(host.proc.pid, "cygrpc"), sampler.roles(k))
            finally:
                host.stop(timeout=40)
                common.drop_provider(placement, host.host)
                bare.kill()
                bare.wait()
        floors = {role: _floor_pss(code, 3.0)[0] for role, code in FLOORS.items()}
        both_pss, both_rss = _floor_pss("import etcd3, libvirt", 3.0)
        say("floors, alone (PSS): " + ", ".join(f"{FLOORS[r]} {v:.1f} MB" for r, v in floors.items())
            + f"; import etcd3, libvirt {both_pss:.1f} MB (RSS {both_rss:.1f})")
        picture = Path(__file__).resolve().parent / "footprint.svg"
        draw_footprint(measured, floors, picture)
        say(f"drawn: {picture}")
        for k, (what, rows, total, cpu, cpu_bare, grpc, roles) in measured.items():
            # the floor: each process of the tree as a bare interpreter with only its libraries,
            # per sample like the value (a worker the pool starts meanwhile counts from then on)
            floor = common.median([sum(floors.get(r, floors["worker"]) for r in sample if r != "other")
                                   for sample in roles])
            extra = {"processes": rows, "rss_mb": total["rss"], "uss_mb": total["uss"], "window_s": window,
                     "floors_pss_mb": {FLOORS[r]: round(v, 1) for r, v in floors.items()},
                     "import_etcd3_libvirt_pss_mb": round(both_pss, 1), "workers_map_grpc": grpc}
            name = f"ecompute idle PSS, {what}"
            floor_name = "bare interpreters importing only what each process needs"
            if k == "qemu":
                figures.append(common.figure(BENCH, f"{name} (+ lifecycle listener)", total["pss"], "MB",
                                             round(floor, 1), floor_name, **extra))
                continue
            figures.append(common.figure(BENCH, f"{name} (daemon + workers + resource tracker)", total["pss"], "MB",
                                         round(floor, 1), floor_name, target="<= 50 MB", check=lambda v, r: v <= 50,
                                         **extra))
            figures.append(common.figure(BENCH, f"ecompute idle RSS, {what} (daemon + children)", total["rss"], "MB",
                                         round(both_rss, 1), "bare python import etcd3, libvirt"))
            figures.append(common.figure(BENCH, f"ecompute idle CPU, {what} ({window:.0f}s)", round(cpu, 2), "%",
                                         round(cpu_bare, 2), "bare python, same window", target="< 1 %",
                                         check=lambda v, r: v < 1.0))
    finally:
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
