"""The seeded chaos run (issue 10): random operations and faults against a small cloud, then invariants.

    python3 -m devstack chaos --seconds N --seed S --hosts K [--settle S] [--faults a,b]
                              [--placement postgresql [--conflict-retries R]] [--keep] [-v]

The tests prove each fault alone; this run mixes them as production would. Every choice
(which operation, which fault, which instance or host, how long) comes from one
`random.Random(seed)` in one thread, so a seed replays the same sequence of choices; what
happens between them still depends on timing on a shared machine, so a seed reproduces a
run's shape, not its every interleaving (the printed timeline says what happened when).

The world is the run's own: a 3-member etcd cluster (harness.EtcdCluster) that every daemon
and every eschedule knows all members of; K ecompute hosts (harness.Ecompute) with their own
files, a prefix of the run's own, lease_ttl 3 and a short resync, on qemu:///system with
diskless domains (no NIC, no metadata server, no image: such a domain starts in well under a
second and idles in SeaBIOS); the stack's Placement (or, with --placement postgresql, one of
the run's own on PostgreSQL with 2 workers, where claims race in the database) behind a
loopback proxy that can answer 503 or hang. Not libvirt's test:///default: its domains live
inside each worker process, vanish with it and cannot be seen from outside, so nothing could
check that no domain runs on two hosts.

All K hosts share this machine's libvirtd, where one uuid names at most one domain, so "a
domain on two hosts" shows as two QEMU processes with one uuid, as one instance requested of
two hosts, or as a domain whose owner (the host in its libvirt metadata) is not the host that
etcd says runs it. After N seconds everything is resumed and restarted, the garbage records
are checked (ERROR in `eschedule list`) and removed, and once every instance has settled the
invariants are checked against etcd, Placement and libvirt. Exit 1 on any violation.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import heapq
import http.client
import http.server
import json
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid as uuidlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import libvirt
import psutil
import yaml

from devstack import harness, localstack
from devstack.harness import BIN, Ecompute, EtcdCluster
from etcd_compute import contract
from etcd_compute.config import PlacementConfig
from etcd_compute.contract import BadRecord, Request, Status
from etcd_compute.ecompute.driver import LibvirtDriver
from etcd_compute.ecompute.jobs import EVENTS_PROCESS
from etcd_compute.eschedule import overcommit
from etcd_compute.placement import PlacementClient
from etcd_compute.states import TARGET, Actual, Desired

URI = "qemu:///system"
LEASE_TTL = 3
RESYNC = 4.0  # seconds between a daemon's resyncs; a settled world must hold still longer than this
# Small hosts, so "no capacity" happens and capacity is worth checking: 6 small instances each.
INVENTORY = {"VCPU": {"total": 6, "allocation_ratio": 1.0}, "MEMORY_MB": {"total": 768, "reserved": 0},
             "DISK_GB": {"total": 10}}
QUERIES = ("resources=VCPU:1,MEMORY_MB:64", "resources=VCPU:1,MEMORY_MB:64", "resources=VCPU:2,MEMORY_MB:128")
OPS = {"schedule": 30, "destroy": 7, "stop": 8, "start": 8, "reboot": 6, "suspend": 3, "resume": 3,
       "evacuate": 10, "destroy-force": 5, "list": 4}
FAULTS = ("kill-daemon", "kill-group", "kill-worker", "stop-daemon", "stop-worker", "kill-etcd",
          "kill-etcd-leader", "compact", "placement-5xx", "placement-hang", "garbage")
FAULT_RATE = 0.15  # of the ticks (every 0.2-0.7 s) that inject a fault rather than start an operation
OP_SLOTS = 4  # eschedule processes at once: each costs ~0.5 CPU-seconds on a 2-core machine
# Instances per host above which a schedule turns into a destroy: a full cloud leaves an evacuation
# nowhere to go, so evacuations would only ever test "no capacity".
POPULATION = 4
THREAD_SLACK = 8  # threads a daemon may have above its count just after start
INVARIANTS = {
    "1": "no domain on two hosts", "2": "every domain has a request on its own host",
    "3": "allocations belong to live instances", "4": "no provider over capacity",
    "5": "every instance settled", "6": "destroyed instances gone everywhere",
    "7": "no daemon died, none leaked threads", "G": "garbage reported as ERROR, then removable",
    "E": "eschedule gave a documented answer in time",
}
OUTCOMES = {0: "ok", 3: "no-capacity", 4: "placement", 5: "etcd", 6: "unknown", 7: "refused", 8: "wait"}
SETTLED = {Actual.ACTIVE, Actual.STOPPED, Actual.SUSPENDED}
# What the daemons' logs say about how they took the faults (counted for the report, never judged).
LOG_SIGNALS = {"worker pool rebuilt": "worker pool broken", "watch lost": "retrying with backoff",
               "watch compacted": "was compacted", "etcd failover": "failed over from",
               "drift rebuild": "vanished outside ecompute", "job failed": "failed: ",
               "malformed request": "is malformed, skipping", "orphan removed": "removed: no request",
               "allocation free failed": "could not free allocation", "traceback": "Traceback"}


def tracebacks(log: str) -> Counter[str]:
    """The daemons' tracebacks, each as the line that logged it and the exception it ended in
    (its log time dropped, so the same failure counts once), to read without the log files."""
    found: Counter[str] = Counter()
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("Traceback (most recent call last)"):
            continue
        logged = re.sub(r"^\S+ \S+ ", "", lines[i - 1]) if i else "?"
        ended = next((x for x in lines[i + 1:] if x and not x.startswith((" ", "Traceback", "During handling"))
                      and not x.startswith("The above exception")), "?")
        found[f"{logged[:160]} -> {ended[:200]}"] += 1
    return found


def _readable(parse: Callable[[bytes, str], Any], value: bytes, uuid: str) -> Any:
    """A record as eschedule reads it; None if it is malformed."""
    try:
        return parse(value, uuid)
    except BadRecord:
        return None


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


# -- the world's pieces --------------------------------------------------------------------------

class PlacementProxy:
    """Placement behind a loopback proxy that, for a window, answers 503 or hangs and then drops
    the connection (a request that never reached Placement: nothing half-done is left there)."""

    HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}

    def __init__(self, upstream: str) -> None:
        target = urlsplit(upstream)
        self.mode, self.until = "pass", 0.0
        self.served: Counter[str] = Counter()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                mode = proxy.current()
                proxy.served[mode] += 1
                if mode == "hang":
                    while proxy.current() == "hang":
                        time.sleep(0.1)
                    self.close_connection = True  # no answer at all
                    return
                if mode == "5xx":
                    error = {"errors": [{"status": 503, "code": "chaos", "title": "Service Unavailable",
                                         "detail": "injected by devstack.chaos"}]}
                    self.answer(503, [("Content-Type", "application/json")], json.dumps(error).encode())
                    return
                conn = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port or 80, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body or None,
                                 headers={k: v for k, v in self.headers.items() if k.lower() not in proxy.HOP})
                    resp = conn.getresponse()
                    data = resp.read()
                except OSError as exc:  # Placement itself is away: say so as a gateway would
                    self.answer(502, [("Content-Type", "text/plain")], f"proxy: {exc}".encode())
                    return
                finally:
                    conn.close()
                self.answer(resp.status, [(k, v) for k, v in resp.getheaders() if k.lower() not in proxy.HOP], data)

            def answer(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
                try:
                    self.send_response(status)
                    for k, v in headers:
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up first (its timeout): nothing to tell it
                    self.close_connection = True

            do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = relay  # noqa: N815

            def log_message(self, *a: Any) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that gave up: expected
                    super().handle_error(request, client_address)

        self.server = Server(("127.0.0.1", harness.free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, name="placement proxy", daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def current(self) -> str:
        return self.mode if time.monotonic() < self.until else "pass"

    def fail(self, mode: str, seconds: float) -> None:
        self.mode, self.until = mode, time.monotonic() + seconds

    def close(self) -> None:
        self.until = 0.0
        self.server.shutdown()
        self.server.server_close()


class Gateway:
    """The cluster's JSON gateway, from whichever member answers: the run's own reads and writes
    never depend on one member (nor on the etcd3 client, whose failover is under test)."""

    def __init__(self, cluster: EtcdCluster) -> None:
        self.cluster = cluster

    def call(self, path: str, body: dict[str, Any], member: harness.Etcd | None = None) -> dict[str, Any]:
        errors = []
        for m in [member] if member else self.cluster.members:
            if m.proc is None:
                continue
            req = urllib.request.Request(m.endpoint + path, json.dumps(body).encode(), method="POST")
            try:
                with urllib.request.urlopen(req, timeout=3) as r:
                    return json.loads(r.read())
            except OSError as exc:
                errors.append(f"{m.endpoint}: {exc}")
        raise RuntimeError(f"no etcd member answered {path}: {'; '.join(errors) or 'none running'}")

    def range(self, prefix: str) -> dict[str, bytes]:
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        kvs = self.call("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(end)}).get("kvs", [])
        return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")) for kv in kvs}

    def put(self, key: str, value: bytes) -> None:
        self.call("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})

    def delete(self, key: str) -> None:
        self.call("/v3/kv/deleterange", {"key": _b64(key)})

    def compact(self) -> int:
        revision = int(self.call("/v3/kv/range", {"key": _b64("\0")})["header"]["revision"])
        self.call("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        return revision

    def leader(self) -> harness.Etcd | None:
        for m in self.cluster.members:
            with contextlib.suppress(RuntimeError, KeyError):
                status = self.call("/v3/maintenance/status", {}, m)
                if status["leader"] == status["header"]["member_id"]:
                    return m
        return None


@dataclass
class Host:
    """One ecompute host of the run and what the run knows of its daemon."""

    name: str
    cp: Ecompute
    driver: LibvirtDriver
    state: str = "up"  # up | stopped (SIGSTOP) | dead (killed by the run) | starting
    baseline: int = 0  # the daemon's threads just after its last start
    starts: int = 0
    failed_starts: int = 0
    final_threads: int = 0

    @property
    def uuid(self) -> str:
        return self.cp.host

    def pid(self) -> int | None:
        return self.cp.proc.pid if self.cp.proc is not None else None

    def workers(self) -> list[psutil.Process]:
        """The daemon's spawned processes: the pool's workers and its lifecycle-event listener
        (not multiprocessing's resource tracker)."""
        pid = self.pid()
        try:
            children = psutil.Process(pid).children() if pid else []
            return [c for c in children if "spawn_main" in " ".join(c.cmdline())]
        except psutil.Error:
            return []


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return ""


@dataclass
class Snapshot:
    """Everything under the run's prefix at one etcd revision, decoded as eschedule would."""

    keys: dict[str, bytes]
    requests: dict[str, list[tuple[str, Request | None]]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[str, Status | None] = field(default_factory=dict)
    alive: set[str] = field(default_factory=set)

    @classmethod
    def read(cls, gateway: Gateway, prefix: str) -> Snapshot:
        snap = cls(gateway.range(prefix + "/"))
        for key, value in snap.keys.items():
            parts = key[len(prefix) + 1:].split("/")
            if parts[0] == "requests" and len(parts) == 3:
                snap.requests[parts[2]].append((parts[1], _readable(contract.parse_request, value, parts[2])))
            elif parts[0] == "instances":
                snap.statuses[parts[1]] = _readable(contract.parse_status, value, parts[1])
            elif parts[0] == "alive":
                snap.alive.add(parts[1])
        return snap

    def shape(self) -> list[tuple[str, ...]]:
        """What must hold still for the world to count as settled: every request and status write."""
        return sorted([(k, str(r and r["desired"])) for k, found in self.requests.items() for _, r in found]
                      + [(k, s["state"], s["host"], s["updated_at"]) if s else (k,) for k, s in self.statuses.items()])

    def request(self, uuid: str) -> Request | None:
        found = self.requests.get(uuid, [])
        return found[0][1] if len(found) == 1 else None

    def unsettled(self, uuid: str) -> str | None:
        """Why `uuid` has not settled yet, or None (settled, or ERROR with a reason)."""
        request, status = self.request(uuid), self.statuses.get(uuid)
        if request is None:
            return "a status nobody requests" if uuid in self.statuses else "an unreadable request"
        if request["desired"] == Desired.DELETED:
            return f"requested deleted, still {status['state'] if status else 'PENDING'}"
        if status is None:
            return "PENDING (no status)"
        state = Actual(status["state"])
        if status["host"] != request["host"]:
            return f"status written by another host ({status['host'][:8]})"
        if state == Actual.ERROR:
            return None if status.get("reason") else "ERROR without a reason"
        if contract.held_off(request, status):
            return None  # powered off by its guest (or by hand): it stays so until started
        if state != TARGET[Desired(request["desired"])] or status.get("reboots", 0) < request.get("reboot", 0):
            return f"{state}, requested {request['desired']} (reboot {request.get('reboot', 0)}, " \
                   f"done {status.get('reboots', 0)})"
        return None


@dataclass
class Violation:
    invariant: str
    text: str
    uuid: str | None = None


# -- the run --------------------------------------------------------------------------------------

class Chaos:
    """One run: build the world, drive it, settle it, check it, report, clean up."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.faults_on = set(args.faults.split(",")) if args.faults else set(FAULTS)
        self.max_faults = max(2, args.seconds // 12)  # per kind
        self.stack = localstack.ensure_up()
        self.tag = f"{args.seed}-{secrets.token_hex(3)}"  # not from the rng: it must not shift the choices
        self.prefix = f"/chaos-{self.tag}"
        self.dir = Path(self.stack["stack"]) / "chaos" / self.tag
        self.lock = threading.RLock()  # the run's bookkeeping
        self.lifecycle = threading.Lock()  # starting a process vs. the teardown: nothing starts after it
        self.closing = threading.Event()
        self.t0 = time.monotonic()
        self.timeline: list[tuple[float, str]] = []
        self.ops: dict[str, Counter[str]] = defaultdict(Counter)
        self.faults: Counter[str] = Counter()
        self.violations: list[Violation] = []
        self.notes: list[str] = []
        self.instances: dict[str, str] = {}  # uuid -> the host it was last placed or moved to
        self.destroyed: set[str] = set()
        self.garbage: dict[str, tuple[str, bool]] = {}  # key name -> (host, index key written)
        self.stopped: set[int] = set()  # pids under SIGSTOP
        self.pending: list[tuple[float, int, str, Callable[[], None]]] = []
        self.seq = 0
        self.procs: set[subprocess.Popen[str]] = set()
        self.inflight = 0
        self.repairing = 0
        self.hosts: list[Host] = []
        self.timings: dict[str, float] = {}
        self.op_pool = ThreadPoolExecutor(OP_SLOTS, thread_name_prefix="op")
        self.repairs = ThreadPoolExecutor(4, thread_name_prefix="repair")
        self.own = contextlib.ExitStack()  # a Placement of the run's own (--placement postgresql)
        upstream, self.placement_log = self.stack["placement"], Path(self.stack["stack"]) / "logs" / "placement.log"
        if args.placement == "postgresql":
            pg = self.own.enter_context(harness.postgres_placement(
                self.stack, workers=2, threads=1, conflict_retries=args.conflict_retries or None))
            upstream, self.placement_log = pg.url, pg.log
        self.placement_log_start = self.placement_log.stat().st_size if self.placement_log.exists() else 0
        self.rechecks = 0  # claims eschedule gave back after finding their provider over capacity
        self.placement = PlacementClient(PlacementConfig(endpoint=upstream))  # not proxied
        self.cluster = EtcdCluster(self.dir / "etcd")
        self.gateway = Gateway(self.cluster)
        self.proxy = PlacementProxy(upstream)
        self.schedule_yaml = self.dir / "schedule.yaml"

    # -- bookkeeping ----------------------------------------------------------------------------

    def note(self, text: str, live: bool = False) -> None:
        t = time.monotonic() - self.t0
        with self.lock:
            self.timeline.append((t, text))
        if live or self.args.verbose:
            print(f"  {t:7.1f}s  {text}", flush=True)

    def violation(self, invariant: str, text: str, uuid: str | None = None) -> None:
        with self.lock:
            if self.closing.is_set():
                return
            self.violations.append(Violation(invariant, text, uuid))
        self.note(f"VIOLATION [{invariant}] {text}", live=True)

    def after(self, seconds: float, label: str, fn: Callable[[], None]) -> None:
        with self.lock:
            self.seq += 1
            heapq.heappush(self.pending, (time.monotonic() + seconds, self.seq, label, fn))

    def run_due(self, everything: bool = False) -> None:
        while True:
            with self.lock:
                if not self.pending or not (everything or self.pending[0][0] <= time.monotonic()):
                    return
                _, _, label, fn = heapq.heappop(self.pending)
            self.note(label)
            fn()

    def name(self, host: str | None) -> str:
        return next((h.name for h in self.hosts if h.uuid == host), (host or "?")[:8])

    # -- the world ------------------------------------------------------------------------------

    def start(self) -> None:
        self.dir.mkdir(parents=True)
        for d in (self.dir.parent, self.dir):
            d.chmod(0o755)  # QEMU runs as libvirt-qemu and must reach the config drives
        self.cluster.start()
        endpoints = self.cluster.endpoints
        self.schedule_yaml.write_text(yaml.safe_dump({
            "etcd": {"endpoints": endpoints, "prefix": self.prefix, "timeout": 3},
            "placement": {"endpoint": self.proxy.url}, "default_image": None, "wait_timeout": 30}))
        for i in range(self.args.hosts):
            name = f"h{i}"
            files = self.dir / "hosts" / name
            cfg = harness.compute_config(
                {"etcd": endpoints[0], "placement": self.proxy.url}, files,
                uuid=str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, self.prefix + name)), name=f"chaos-{self.tag}-{name}",
                prefix=self.prefix, uri=URI, workers=2, inventory=INVENTORY, network={"mode": "none"},
                metadata={"enabled": False}, lease_ttl=LEASE_TTL, resync_interval=RESYNC, stop_timeout=1,
                shutdown_timeout=5)
            cfg["etcd"]["endpoints"] = endpoints[i % 3:] + endpoints[:i % 3]  # each starts on another member
            host = Host(name, Ecompute(name, cfg, self.dir / "logs"), LibvirtDriver(URI, "qemu", cfg["instances_path"]))
            self.hosts.append(host)
            host.cp.start()
        for host in self.hosts:
            host.cp.wait_ready(120)
            host.starts = 1
        time.sleep(2)  # the threads of a fresh daemon (liveness, watch, pool) are all up by now
        for host in self.hosts:
            host.baseline = self.threads(host)

    def threads(self, host: Host) -> int:
        with contextlib.suppress(psutil.Error, ValueError):
            return psutil.Process(host.pid()).num_threads()
        return 0

    def restart(self, host: Host) -> None:
        """Start a dead daemon again (in a repair thread) and take its thread count once it is up."""
        with self.lifecycle:
            if self.closing.is_set() or host.state != "dead":
                return  # another restart of it got there first
            host.cp.kill_all()  # reap the killed one (and any worker it left)
            host.cp.start()
            host.state = "starting"
        try:
            host.cp.wait_ready(90)
        except Exception as exc:  # noqa: BLE001 - AssertionError with the log tail, or torn down meanwhile
            if self.closing.is_set():
                return
            host.failed_starts += 1
            why = str(exc).splitlines()[0].split("; last lines")[0]
            self.violation("7", f"{host.name}: the restarted daemon never became ready: {why}; its log:\n"
                                f"{_last_run(host.cp.logtext())}")
            with self.lock:
                host.state = "dead"
            if host.failed_starts < 3:
                self.after(2, f"restart {host.name} (again)", lambda: self.repair(self.restart, host))
            return
        host.starts += 1
        host.failed_starts = 0
        time.sleep(2)
        with self.lock:
            host.baseline = self.threads(host)
            host.state = "up"

    def repair(self, fn: Callable[..., None], *args: Any) -> None:
        def run() -> None:
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - a repair that failed is worth a line, not a crash
                self.note(f"repair {fn.__name__} failed: {exc!r}", live=True)
            finally:
                with self.lock:
                    self.repairing -= 1
        with self.lock:
            if self.closing.is_set():
                return
            self.repairing += 1
        self.repairs.submit(run)

    def watch_daemons(self) -> None:
        """A daemon the run did not kill must not exit: report it (with its log) and restart it."""
        for host in self.hosts:
            with self.lock:
                proc = host.cp.proc
                if host.state not in ("up", "stopped") or proc is None or proc.poll() is None:
                    continue
                host.state = "dead"
            self.violation("7", f"{host.name}: daemon exited by itself with {proc.returncode}; last lines:\n"
                           + localstack.tail(host.cp.log, 15))
            self.after(1, f"restart {host.name} (died)", functools.partial(self.repair, self.restart, host))

    def restart_etcd(self, member: harness.Etcd) -> None:
        with self.lifecycle:  # a member started after the teardown would be left running
            if not self.closing.is_set() and member.proc is None:
                member.start()

    # -- operations: eschedule processes, started from the loop, run in op threads --------------

    def cli(self, kind: str, target: str, *args: str, timeout: float = 120) -> tuple[int, str]:
        """Run eschedule about `target` (for the timeline); tally its outcome by exit code; an
        undocumented code, a traceback or a hang is a violation. (exit code, stdout)."""
        cmd = [str(BIN / "eschedule"), "--config", str(self.schedule_yaml), *args]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        with self.lock:
            self.procs.add(proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            self.violation("E", f"eschedule {shlex.join(args)} still ran after {timeout:.0f}s; killed")
        finally:
            with self.lock:
                self.procs.discard(proc)
        outcome = OUTCOMES.get(proc.returncode, "error")
        if (outcome == "error" or "Traceback" in err) and proc.returncode >= 0:
            self.violation("E", f"eschedule {shlex.join(args)} exited {proc.returncode}: {err.strip()[-1500:]}")
        with self.lock:
            self.ops[kind][outcome] += 1
            self.rechecks += err.count(overcommit.GIVEN_BACK)
        self.note(f"{kind} {target} -> {outcome}"
                  + (f": {err.strip().splitlines()[-1][:160]}" if proc.returncode and err.strip() else ""))
        return proc.returncode, out

    def op_schedule(self, query: str) -> None:
        rc, out = self.cli("schedule", query, query, "--json")
        if rc == 0:
            view = json.loads(out)
            with self.lock:
                self.instances[view["uuid"]] = view["host"]
            self.note(f"  scheduled {view['uuid']} on {self.name(view['host'])}")

    def op_destroy(self, uuid: str, force: bool) -> None:
        args = ("destroy", uuid, "--force") if force else ("destroy", uuid)
        rc, _ = self.cli("destroy-force" if force else "destroy", uuid, *args)
        if rc == 0:
            with self.lock:
                self.destroyed.add(uuid)
                self.instances.pop(uuid, None)

    def op_evacuate(self, host: str) -> None:
        rc, out = self.cli("evacuate", self.name(host), "evacuate", host, "--json")
        if rc in (0, 3):
            for move in json.loads(out or "[]"):
                if move["to"]:
                    with self.lock:
                        self.instances[move["uuid"]] = move["to"]
                    self.note(f"  evacuated {move['uuid']} from {self.name(move['from'])} to {self.name(move['to'])}")

    def some_op(self) -> None:
        kind = self.rng.choices(list(OPS), weights=list(OPS.values()))[0]
        with self.lock:
            if self.inflight >= OP_SLOTS:
                return
            live = sorted(self.instances)
        if kind == "schedule" and len(live) >= POPULATION * len(self.hosts):
            kind = "destroy"
        jobs: list[Callable[[], object]] = []
        if kind == "schedule":
            query = self.rng.choice(QUERIES)
            jobs.append(lambda: self.op_schedule(query))
        elif kind == "list":
            jobs.append(lambda: self.cli("list", "", "list", "--json"))
        elif kind in ("evacuate", "destroy-force"):
            down = [h.uuid for h in self.hosts if h.uuid not in self.alive()]
            if kind == "evacuate" and down:  # several evacuations of the same host at once
                host = self.rng.choice(down)
                jobs += [lambda: self.op_evacuate(host)] * self.rng.randint(2, 3)
            candidates = [u for u in live if self.instances.get(u) in down]
            if kind == "destroy-force" and candidates:
                uuid = self.rng.choice(candidates)
                jobs.append(lambda: self.op_destroy(uuid, True))
        elif live:
            uuid = self.rng.choice(live)
            if kind == "destroy":
                jobs.append(lambda: self.op_destroy(uuid, False))
            else:
                jobs.append(lambda: self.cli(kind, uuid, kind, uuid))
        for job in jobs:
            self.submit(job)

    def submit(self, job: Callable[[], object]) -> None:
        def run() -> None:
            try:
                job()
            except Exception as exc:  # noqa: BLE001 - the run goes on; this is our bug, say so
                self.note(f"operation failed in the chaos run itself: {exc!r}", live=True)
            finally:
                with self.lock:
                    self.inflight -= 1
        with self.lock:
            self.inflight += 1
        self.op_pool.submit(run)

    def alive(self) -> set[str]:
        try:
            return {k.rsplit("/", 1)[1] for k in self.gateway.range(f"{self.prefix}/alive/")}
        except RuntimeError:
            return {h.uuid for h in self.hosts}

    # -- faults: quick actions in the loop; what takes long (restarts) in repair threads --------

    def some_fault(self) -> None:
        kind = self.rng.choice([k for k in FAULTS if k in self.faults_on])
        if self.faults[kind] >= self.max_faults:
            return
        up = [h for h in self.hosts if h.state == "up"]
        if kind in ("kill-daemon", "kill-group", "stop-daemon") and len(up) < 2:
            return  # one host always serves, so scheduling and evacuation have somewhere to go
        try:
            done = self.inject(kind, up)
        except (OSError, RuntimeError) as exc:  # e.g. the process died meanwhile, or no etcd member answered
            self.note(f"fault {kind} not injected: {exc!r}", live=True)
            return
        if done:
            if kind != "compact":  # compact() counts itself: it also follows etcd kills
                self.faults[kind] += 1
            self.note(f"FAULT {kind}: {done}", live=True)

    def inject(self, kind: str, up: list[Host]) -> str | None:
        """Inject one fault of `kind`; what was done, or None if nothing fitted."""
        rng = self.rng
        if kind in ("kill-daemon", "kill-group", "stop-daemon", "kill-worker", "stop-worker"):
            if not up:
                return None
            with self.lock:  # mostly the busiest host: an empty one gives evacuation nothing to move
                load = Counter(self.instances.values())
            busiest = max(up, key=lambda h: (load[h.uuid], h.name))
            return self.host_fault(kind, busiest if rng.random() < 0.6 else rng.choice(up))
        if kind in ("kill-etcd", "kill-etcd-leader"):
            return self.etcd_fault(kind == "kill-etcd-leader")
        if kind == "compact":
            return self.compact()
        if kind.startswith("placement-"):
            if self.proxy.current() != "pass":
                return None
            seconds = rng.uniform(2, 8) if kind == "placement-5xx" else rng.uniform(2, 13)
            self.proxy.fail(kind.split("-")[1], seconds)
            return f"Placement {kind.split('-')[1]} for {seconds:.1f}s"
        return self.write_garbage(rng.choice(self.hosts))

    def host_fault(self, kind: str, host: Host) -> str | None:
        rng, pid = self.rng, host.pid()
        if pid is None:
            return None
        if kind in ("kill-daemon", "kill-group"):
            with self.lock:
                host.state = "dead"
                if kind == "kill-group":
                    host.cp.kill_all()  # the daemon and its workers at once
                else:
                    os.kill(pid, signal.SIGKILL)  # its workers follow by PDEATHSIG
            delay = rng.uniform(2, 14)
            self.after(delay, f"restart {host.name}", lambda: self.repair(self.restart, host))
            return f"{host.name} (pid {pid}); restart in {delay:.1f}s"
        if kind == "stop-daemon":
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
        seconds = rng.uniform(1, 8)
        os.kill(target, signal.SIGSTOP)
        with self.lock:
            self.stopped.add(target)
            if target == pid:
                host.state = "stopped"
        self.after(seconds, f"SIGCONT {target} ({host.name})", lambda: self.cont(target, host))
        return f"SIGSTOP {'daemon' if target == pid else 'worker'} {target} of {host.name} for {seconds:.1f}s"

    def cont(self, pid: int, host: Host | None = None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        with self.lock:
            self.stopped.discard(pid)
            if host is not None and host.state == "stopped" and host.pid() == pid:
                host.state = "up"

    def etcd_fault(self, leader: bool) -> str | None:
        if any(m.proc is None for m in self.cluster.members):
            return None  # one member down at a time: the other two keep the quorum
        member = self.gateway.leader() if leader else self.rng.choice(self.cluster.members)
        if member is None:
            return None
        member.kill()
        delay = self.rng.uniform(2, 8)
        self.after(delay, f"restart etcd {member.endpoint}", lambda: self.repair(self.restart_etcd, member))
        if self.rng.random() < 0.5 and "compact" in self.faults_on:  # a watch that resumes finds its history gone
            self.after(self.rng.uniform(0.05, 0.4), "FAULT compact during the outage",
                       lambda: self.note(self.compact(), live=True))
        return f"{'leader ' if leader else ''}{member.endpoint}; restart in {delay:.1f}s"

    def compact(self) -> str:
        """Compact at the current revision; one that is not possible now (no member answers,
        or that revision was compacted already) is noted, not fatal to the run."""
        try:
            revision = self.gateway.compact()
        except RuntimeError as exc:
            return f"compaction not injected: {exc}"
        self.faults["compact"] += 1
        return f"compacted at revision {revision}"

    def write_garbage(self, host: Host) -> str | None:
        if len(self.garbage) >= self.max_faults:
            return None
        rng = self.rng
        if rng.random() < 0.2:
            key, index = f"garbage-{len(self.garbage)}", False
        else:
            key, index = str(uuidlib.UUID(int=rng.getrandbits(128), version=4)), rng.random() < 0.5
        bogus = contract.new_request(key, host.uuid, {host.uuid: {"resources": {"VCPU": 1}}}, None,
                                     "resources=VCPU:1", "chaos", "chaos")
        values: list[bytes] = [b"garbage", b"", b"[]", b'{"a":1}', b"\xff\xfe{",
                               contract.encode({**bogus, "desired": "bogus"}).encode(),
                               contract.encode({**bogus, "uuid": str(uuidlib.UUID(int=1))}).encode()]
        value = rng.choice(values)
        self.gateway.put(contract.request_key(self.prefix, host.uuid, key), value)
        if index:
            self.gateway.put(contract.index_key(self.prefix, key), contract.encode({"host": host.uuid}).encode())
        with self.lock:
            self.garbage[key] = (host.uuid, index)
        return f"{value[:40]!r} at requests/{host.name}/{key}{' (+ index)' if index else ''}"

    # -- drive, settle -------------------------------------------------------------------------

    def drive(self) -> None:
        end = time.monotonic() + self.args.seconds
        while time.monotonic() < end:
            self.run_due()
            self.watch_daemons()
            if self.rng.random() < FAULT_RATE:
                self.some_fault()
            else:
                self.some_op()
            time.sleep(self.rng.uniform(0.2, 0.7))

    def settle(self) -> None:
        """Stop the operations, undo every fault, restart what is dead, deal with the garbage, and
        wait (bounded) until every instance has settled and the world holds still."""
        self.op_pool.shutdown(wait=True)
        self.proxy.fail("pass", 0)
        self.run_due(everything=True)  # every SIGCONT and restart that was still to come
        for pid in list(self.stopped):
            self.cont(pid)
        for member in self.cluster.members:
            self.restart_etcd(member)
        for host in self.hosts:
            if host.state == "dead":
                self.repair(self.restart, host)

        def restarted() -> bool:
            self.run_due(everything=True)  # a failed restart schedules another
            return self.repairing == 0 and not self.pending
        harness.wait_until(restarted, 400, "the restarts to finish", interval=0.5)
        self.note("settling: every fault undone", live=True)
        self.check_garbage()
        self.wait_settled(self.args.settle)

    def check_garbage(self) -> None:
        """Every garbage record shows as an ERROR view in `eschedule list`, then goes: by
        `destroy --force` where eschedule can find it (an index key), directly otherwise."""
        if not self.garbage:
            return
        rc, out = self.cli("list", "", "list", "--json")
        views = {v["uuid"]: v for v in json.loads(out)} if rc == 0 else {}
        for key, (host, index) in sorted(self.garbage.items()):
            view = views.get(key)
            if view is None or view["state"] != Actual.ERROR or "malformed" not in (view["reason"] or ""):
                self.violation("G", f"garbage requests/{self.name(host)}/{key} is not an ERROR view in "
                               f"eschedule list: {view}", key)
            forced = contract.looks_like_uuid(key) and \
                self.cli("garbage-removal", key, "destroy", key, "--force")[0] == 0
            if index and not forced:
                self.violation("G", f"eschedule destroy --force {key} did not remove the garbage record "
                               f"(with an index key)", key)
            if not forced:
                if contract.looks_like_uuid(key):
                    self.notes.append(f"destroy --force {key}: no instance (garbage without an index key): "
                                      f"removed directly")
                self.gateway.delete(contract.request_key(self.prefix, host, key))
                self.gateway.delete(contract.index_key(self.prefix, key))

    def wait_settled(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Any = None
        still_since = time.monotonic()
        while time.monotonic() < deadline:
            self.run_due()
            self.watch_daemons()
            snap, doms = Snapshot.read(self.gateway, self.prefix), self.domains()
            waiting = [u for u in set(snap.requests) | set(snap.statuses) if snap.unsettled(u)]
            waiting += [k for k in self.garbage if any(key.endswith("/" + k) for key in snap.keys)]
            state = (snap.shape(), sorted(doms.items()), sorted(snap.alive))
            if waiting or state != last or len(snap.alive) < len(self.hosts):
                last, still_since = state, time.monotonic()
            elif time.monotonic() - still_since > RESYNC + 2:
                return
            time.sleep(1)
        self.note(f"settling: gave up after {timeout:.0f}s", live=True)

    # -- the invariants ------------------------------------------------------------------------

    def domains(self) -> dict[str, tuple[str | None, str]]:
        """Every domain of the run in libvirt: uuid -> (owner host or None, actual power state)."""
        found: dict[str, tuple[str | None, str]] = {}
        for host in self.hosts:
            for uuid, power in host.driver.list_domains(owner=host.uuid).items():
                found[uuid] = (host.uuid, str(power))
        known = set(self.instances) | self.destroyed | set(self.garbage)
        for uuid in set(self.hosts[0].driver.list_uuids()) & known - set(found):
            info = self.hosts[0].driver.lookup(uuid)
            found[uuid] = (None, str(info.power) if info else "gone")
        return found

    def check(self) -> None:
        snap = Snapshot.read(self.gateway, self.prefix)
        doms = self.domains()
        self.check_domains(snap, doms)
        self.check_placement(snap)
        self.check_claims(snap)
        self.check_settled(snap, doms)
        self.check_destroyed(snap, doms)
        self.check_daemons()

    def check_domains(self, snap: Snapshot, doms: dict[str, tuple[str | None, str]]) -> None:
        """1: one copy, one host; 2: each domain requested of the host that owns it."""
        copies: Counter[str] = Counter()
        for proc in psutil.process_iter(["cmdline"]):
            cmd = proc.info["cmdline"] or []
            if "-uuid" in cmd and cmd.index("-uuid") + 1 < len(cmd):
                copies[cmd[cmd.index("-uuid") + 1]] += 1
        for uuid, n in copies.items():
            if n > 1 and (uuid in doms or uuid in snap.requests):
                self.violation("1", f"{uuid}: {n} QEMU processes", uuid)
        for uuid, found in snap.requests.items():
            if len(found) > 1:
                self.violation("1", f"{uuid}: requested of {len(found)} hosts: "
                               f"{', '.join(self.name(h) for h, _ in found)}", uuid)
        for uuid, (owner, power) in sorted(doms.items()):
            status = snap.statuses.get(uuid)
            if status and status["host"] != owner and status["state"] in SETTLED:
                self.violation("1", f"{uuid}: domain ({power}) owned by {self.name(owner)}, but "
                               f"{self.name(status['host'])} reports it {status['state']}", uuid)
            hosts = [h for h, _ in snap.requests.get(uuid, [])]
            if owner is None or owner not in hosts:
                self.violation("2", f"{uuid}: domain ({power}) owned by {self.name(owner)} has no request there "
                               f"(requested of: {', '.join(map(self.name, hosts)) or 'nobody'})", uuid)

    def check_placement(self, snap: Snapshot) -> None:
        """3: each allocation is one live instance's, on its host, of its resources; 4: capacity."""
        for host in self.hosts:
            for consumer, alloc in self.placement.provider_allocations(host.uuid).items():
                request, status = snap.request(consumer), snap.statuses.get(consumer)
                why = None
                if request is None:
                    why = "no instance requests it" + (" (destroyed)" if consumer in self.destroyed else "")
                elif request["host"] != host.uuid:
                    why = f"its request is on {self.name(request['host'])}"
                elif alloc["resources"] != request["resources"]:
                    why = f"its request asks for {request['resources']}"
                elif status and status["state"] == Actual.ERROR:
                    why = f"it is ERROR ({status.get('reason')}), whose allocation is freed"
                if why:
                    self.violation("3", f"{consumer}: allocation {alloc['resources']} on {host.name}: {why}", consumer)
            usages, inventory = self.placement.usages(host.uuid), self.placement.inventories(host.uuid)
            for rc, used in usages.items():
                inv = inventory.get(rc)
                capacity = int((inv["total"] - inv["reserved"]) * inv["allocation_ratio"]) if inv else 0
                if used > capacity:
                    self.violation("4", f"{host.name}: {rc} used {used} > capacity {capacity}")

    def check_claims(self, snap: Snapshot) -> None:
        """3, the other way round: each live instance (not ERROR) holds its allocation, on its host only."""
        for uuid in snap.requests:
            request, status = snap.request(uuid), snap.statuses.get(uuid)
            if request is None or (status and status["state"] == Actual.ERROR):
                continue
            held = self.placement.get_allocations(uuid)
            if set(held) != {request["host"]}:
                self.violation("3", f"{uuid} on {self.name(request['host'])} ({status and status['state']}): "
                               f"allocations on {[self.name(h) for h in held] or 'nothing'}", uuid)

    def check_settled(self, snap: Snapshot, doms: dict[str, tuple[str | None, str]]) -> None:
        """5: settled, and what etcd says is what libvirt has. ERROR with a reason is settled, but
        under faults alone it may mean a fault was not survived: the reasons go in the notes."""
        errors = Counter(s["reason"] for s in snap.statuses.values() if s and s["state"] == Actual.ERROR)
        self.notes += [f"{n} instances ended in ERROR: {reason}" for reason, n in errors.items()]
        for uuid in sorted(set(snap.requests) | set(snap.statuses)):
            why = snap.unsettled(uuid)
            status = snap.statuses.get(uuid)
            if why is None and status and status["state"] in SETTLED:
                owner, power = doms.get(uuid, (None, "no domain"))
                if (owner, power) != (status["host"], status["state"]):
                    why = f"{status['state']} on {self.name(status['host'])}, but libvirt has " \
                          f"{power} owned by {self.name(owner)}"
            if why:
                self.violation("5", f"{uuid}: {why}", uuid)

    def check_destroyed(self, snap: Snapshot, doms: dict[str, tuple[str | None, str]]) -> None:
        """6: nothing of a destroyed instance is left: keys, allocation, domain."""
        for uuid in sorted(self.destroyed):
            left = [k[len(self.prefix):] for k in snap.keys if k.endswith("/" + uuid)]
            if self.placement.get_allocations(uuid):
                left.append("its allocation")
            if uuid in doms:
                left.append(f"a domain owned by {self.name(doms[uuid][0])}")
            if left:
                self.violation("6", f"destroyed {uuid}, yet: {', '.join(left)}", uuid)

    def check_daemons(self) -> None:
        """7: every daemon runs (deaths during the run are reported as they happen) and has not
        gathered threads or worker processes."""
        for host in self.hosts:
            if host.state != "up" or host.cp.proc is None or host.cp.proc.poll() is not None:
                self.violation("7", f"{host.name}: daemon not running at the end ({host.state})")
                continue
            threads = self.threads(host)
            for _ in range(2):  # the least of a few looks: a job's short-lived thread is no leak
                time.sleep(0.3)
                threads = min(threads, self.threads(host))
            host.final_threads = threads
            if threads > host.baseline + THREAD_SLACK:
                self.violation("7", f"{host.name}: {threads} threads, {host.baseline} just after its last start")
            spawned = host.workers()
            listeners = [p for p in spawned if _name(p) == EVENTS_PROCESS]
            if len(listeners) > 1:
                self.violation("7", f"{host.name}: {len(listeners)} lifecycle-event listeners")
            workers = [p for p in spawned if p not in listeners]
            if len(workers) > host.cp.cfg["workers"]:
                self.violation("7", f"{host.name}: {len(workers)} worker processes for {host.cp.cfg['workers']} "
                               f"workers: {[w.pid for w in workers]}")

    # -- report and cleanup --------------------------------------------------------------------

    def report(self) -> int:
        args, t = self.args, self.timings
        print(f"\nchaos run: seed {args.seed}, {args.hosts} hosts, prefix {self.prefix}")
        print(f"  setup {t.get('setup', 0):.1f}s, chaos {t.get('chaos', 0):.1f}s, settle {t.get('settle', 0):.1f}s, "
              f"check {t.get('check', 0):.1f}s")
        columns = [*OUTCOMES.values(), "error"]
        print(f"\n{'operations':<16}" + "".join(f"{c:>12}" for c in columns))
        for kind in OPS | {"garbage-removal": 0}:
            if kind in self.ops:
                print(f"  {kind:<14}" + "".join(f"{self.ops[kind][c]:>12}" for c in columns))
        print(f"\n{'faults':<20}{'count':>6}")
        for kind in FAULTS:
            print(f"  {kind:<18}{self.faults[kind]:>6}")
        print(f"  (Placement requests answered: {dict(self.proxy.served)})")
        print(f"\nPlacement: {self.placement_summary()}")
        print(f"\n{'daemons':<10}{'starts':>8}{'threads after start':>21}{'threads at the end':>20}")
        for host in self.hosts:
            print(f"  {host.name:<8}{host.starts:>8}{host.baseline:>21}{host.final_threads:>20}")
        by: dict[str, list[Violation]] = defaultdict(list)
        for v in self.violations:
            by[v.invariant].append(v)
        text = "".join(host.cp.logtext() for host in self.hosts)
        print("\ndaemon logs: " + ", ".join(f"{k} {text.count(v)}" for k, v in LOG_SIGNALS.items()))
        for what, n in tracebacks(text).most_common():
            print(f"  traceback x{n}: {what}")
        print(f"\n{'invariant':<50}{'violations':>10}")
        for key, text in INVARIANTS.items():
            print(f"  {key} {text:<46}{len(by[key]):>10}")
        for note in self.notes:
            print(f"note: {note}")
        if self.violations:
            self.evidence(by)
            print(f"\nFAIL: {len(self.violations)} violations, seed {args.seed} "
                  f"(python3 -m devstack chaos --seconds {args.seconds} --seed {args.seed} --hosts {args.hosts})")
            return 1
        print(f"\nOK: no violations, seed {args.seed}")
        return 0

    def evidence(self, by: dict[str, list[Violation]]) -> None:
        """Each violation, the run's timeline of faults and of what touched its instance, and
        the daemons' log lines about it."""
        print("\nfaults, in order:")
        for t, text in self.timeline:
            if text.startswith(("FAULT", "restart", "SIGCONT", "settling")):
                print(f"  {t:7.1f}s  {text}")
        for key in INVARIANTS:
            for v in by[key]:
                print(f"\n[{key}] {v.text}")
                if v.uuid is None:
                    continue
                for t, text in self.timeline:
                    if v.uuid[:8] in text:
                        print(f"    {t:7.1f}s  {text}")
                for host in self.hosts:
                    for line in _log_lines(host.cp.logtext(), v.uuid)[-12:]:
                        print(f"    {host.name}{line[:240]}")

    def cleanup(self, keep_logs: bool) -> None:
        """Take down everything the run made, whatever state it is in: never raises."""
        with self.lifecycle, self.lock:
            self.closing.set()
        steps: list[tuple[str, Callable[[], object]]] = [
            ("operations", self.stop_operations),
            ("daemons", self.stop_daemons),
            ("domains", self.remove_domains),
            ("providers", self.remove_providers),
            ("placement", self.own.close),
            ("etcd", self.cluster.__exit__),
            ("proxy", self.proxy.close),
            ("files", lambda: self.remove_files(keep_logs)),
        ]
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - clean up the rest anyway
                print(f"chaos: cleanup of {what} failed: {exc!r}", file=sys.stderr)

    def placement_summary(self) -> str:
        """Which Placement served the run, and how often its own conflict retry let a claim
        through over capacity (its log) and eschedule gave such a claim back (eschedule's)."""
        which = "the stack's (SQLite, 1 worker)" if self.args.placement == "stack" else (
            f"PostgreSQL, 2 workers, allocation_conflict_retry_count "
            f"{self.args.conflict_retries or 'left at its default (10)'}")
        try:
            with self.placement_log.open("rb") as f:
                f.seek(self.placement_log_start)
                overage = f.read().decode(errors="replace").count(harness.OVERAGE_LOGGED)
        except OSError:
            overage = -1
        return (f"{which}; claims it let through over capacity ({harness.OVERAGE_LOGGED!r} in its log): {overage}; "
                f"claims eschedule gave back on its recheck: {self.rechecks}")

    def stop_operations(self) -> None:
        with self.lock:
            procs = list(self.procs)
        for proc in procs:
            proc.kill()
        self.op_pool.shutdown(wait=False, cancel_futures=True)
        self.repairs.shutdown(wait=False, cancel_futures=True)

    def stop_daemons(self) -> None:
        for pid in list(self.stopped):
            self.cont(pid)
        for host in self.hosts:
            host.cp.kill_all()

    def remove_providers(self) -> None:
        for host in self.hosts:
            self.placement.delete_provider(host.uuid)

    def remove_domains(self) -> None:
        """The run's domains (and their files and volumes), then the storage pools over its dirs."""
        known = set(self.instances) | self.destroyed | set(self.garbage)
        for host in self.hosts:
            for uuid in set(host.driver.list_uuids(owner=host.uuid)) | (set(host.driver.list_uuids()) & known):
                host.driver.destroy(uuid)
        conn = libvirt.open(URI)
        try:
            for pool in conn.listAllStoragePools(0):
                try:
                    ours = f"<path>{self.dir}/" in pool.XMLDesc(0)
                except libvirt.libvirtError:  # another test's pool, gone meanwhile
                    continue
                if not ours:
                    continue
                persistent = pool.isPersistent()  # asked first: a transient pool is gone once destroyed
                if pool.isActive():
                    pool.destroy()
                if persistent:
                    pool.undefine()
        finally:
            conn.close()

    def remove_files(self, keep_logs: bool) -> None:
        if not keep_logs:
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        for d in (self.dir / "hosts", self.dir / "etcd"):
            shutil.rmtree(d, ignore_errors=True)
        print(f"chaos: logs kept in {self.dir}")


def _last_run(text: str, lines: int = 12) -> str:
    """The first lines a daemon logged in its last run: why it failed to start comes first, the
    interpreter's noise on the way out after."""
    return "\n".join(text.rsplit("=== start\n", 1)[-1].splitlines()[:lines])


def _log_lines(text: str, needle: str) -> list[str]:
    """The lines of a daemon log that mention `needle`, each marked with the daemon run it is from."""
    run, found = 0, []
    for line in text.splitlines():
        if line == "=== start":
            run += 1
        elif needle in line:
            found.append(f"#{run}| {line}")
    return found


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python3 -m devstack chaos", description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=60, help="how long to inject operations and faults")
    ap.add_argument("--seed", type=int, default=None, help="the seed of every choice (default: a random one)")
    ap.add_argument("--hosts", type=int, default=3, help="ecompute hosts (at least 2)")
    ap.add_argument("--settle", type=float, default=120.0, help="seconds to wait for the world to settle")
    ap.add_argument("--faults", default="", help=f"only these faults, comma-separated (of {', '.join(FAULTS)})")
    ap.add_argument("--placement", choices=("stack", "postgresql"), default="stack",
                    help="the stack's Placement (SQLite: one request at a time) or one of the run's own on "
                         "PostgreSQL with 2 workers, where claims race in the database (harness.postgres_placement)")
    ap.add_argument("--conflict-retries", type=int, default=1,
                    help="with --placement postgresql: its allocation_conflict_retry_count (0: Placement's "
                         "default, 10); 1 as devstack and INSTALL.md configure it")
    ap.add_argument("--keep", action="store_true", help="keep the daemons' and etcd's logs even without violations")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every operation as it ends")
    return ap


def main(argv: Iterable[str] | None = None) -> int:
    args = parser().parse_args(list(argv) if argv is not None else None)
    if args.seed is None:
        args.seed = secrets.randbelow(10**6)
    unknown = set(filter(None, args.faults.split(","))) - set(FAULTS)
    if unknown or args.hosts < 2:
        parser().error(f"unknown faults {sorted(unknown)}" if unknown else "--hosts must be at least 2")
    signal.signal(signal.SIGTERM, _interrupt)  # unwind through the cleanup, as Ctrl-C does
    print(f"chaos: seed {args.seed}, {args.hosts} hosts, {args.seconds}s", flush=True)
    run = Chaos(args)
    rc = 1
    try:
        for phase, step in (("setup", run.start), ("chaos", run.drive), ("settle", run.settle),
                            ("check", run.check)):
            started = time.monotonic()
            step()
            run.timings[phase] = time.monotonic() - started
        rc = run.report()
    except KeyboardInterrupt:
        print(f"chaos: interrupted; cleaning up (seed {args.seed})", file=sys.stderr)
        rc = 130
    except BaseException:
        print(f"chaos: the run itself failed (seed {args.seed}):", file=sys.stderr)
        raise
    finally:
        run.cleanup(keep_logs=args.keep or rc != 0)
    return rc


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
