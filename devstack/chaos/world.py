"""The run's world: its 3-member etcd, its hosts (ecompute daemons on the run's hypervisors,
hypervisors.py), Placement behind a proxy that fails on demand, each host's own links to etcd
and Placement (devstack/netfault.py's HostLinks, cut on demand while another host serves), and what each
of them holds, read as etcd_compute.invariants takes it (EtcdView, PlacementView, the
hypervisors' domains).

Also what keeps the world whole: a daemon's restart, an etcd member's, and the teardown.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import http.client
import http.server
import json
import os
import secrets
import shutil
import signal
import sys
import threading
import time
import urllib.request
import uuid as uuidlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import yaml

from devstack import harness, localstack
from devstack.chaos import hypervisors
from devstack.chaos.book import Book
from devstack.chaos.hypervisors import Hypervisor, OwnLibvirt
from devstack.harness import Ecompute, EtcdCluster
from devstack.netfault import HostLinks
from etcd_compute.config import PlacementConfig
from etcd_compute.ecompute.driver import Driver
from etcd_compute.ecompute.jobs import EVENTS_PROCESS
from etcd_compute.ecompute.proof import FENCE_MODULE
from etcd_compute.ecompute.proof import paths as fence_files
from etcd_compute.invariants import EtcdView, Hypervisors, PlacementView
from etcd_compute.placement import PlacementClient

LEASE_TTL = 3
FENCE_MARGIN = round(0.3 * LEASE_TTL, 3)  # the daemons' default (config.py): the fence acts this early
FENCE_WINDOW = LEASE_TTL + FENCE_MARGIN  # how long a host is DOWN before eschedule may evacuate it
# Seconds between a daemon's resyncs: long, so that a change a daemon's watch missed shows as a
# request stuck (invariant W) instead of being picked up quietly by the next resync.
RESYNC = 60.0
# Each job kind's deadline on the run's hosts: under the W bound (run.STUCK), so that a job slowed
# down by the machine's load (a domain start took 30-47 s at load averages of 15-30) ends in a
# named reason ("did not finish within ...; trying again") rather than waiting unexplained.
DEADLINES = {"build": 25, "power": 20, "destroy": 20, "list": 15, "prepare": 60}
# Small hosts, so "no capacity" happens and capacity is worth checking: 6 small instances each.
INVENTORY = {"VCPU": {"total": 6, "allocation_ratio": 1.0}, "MEMORY_MB": {"total": 768, "reserved": 0},
             "DISK_GB": {"total": 10}}
THREAD_SLACK = 8  # threads a daemon may have above its count just after start


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


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
    hv: Hypervisor
    driver: Driver  # the run's own look at its hypervisor
    links: HostLinks  # its own way to etcd and Placement
    state: str = "up"  # up | stopped (SIGSTOP) | dead (killed by the run) | starting
    cut: str | None = None  # what the run cut it from, while it is cut
    baseline: int = 0  # the daemon's threads just after its last start
    starts: int = 0
    failed_starts: int = 0
    final_threads: int = 0

    @property
    def uuid(self) -> str:
        return self.cp.host

    def pid(self) -> int | None:
        return self.cp.proc.pid if self.cp.proc is not None else None

    def serving(self) -> bool:
        """Up, reaching etcd and Placement, on a hypervisor that answers: a host that can take work."""
        return self.state == "up" and self.cut is None and not self.hv.hung

    def workers(self) -> list[psutil.Process]:
        """The daemon's spawned processes: the pool's workers and its lifecycle-event listener
        (not multiprocessing's resource tracker)."""
        pid = self.pid()
        try:
            children = psutil.Process(pid).children() if pid else []
            return [c for c in children if "spawn_main" in " ".join(c.cmdline())]
        except psutil.Error:
            return []


def fences(hosts: list[Host]) -> dict[str, list[int]]:
    """Every fence process on this machine of each of `hosts` (by name): its proof file is on its
    command line. One each while the run goes on; the pid file names only the last one started."""
    proofs = {str(fence_files(h.cp.cfg["instances_path"])["proof"]): h.name for h in hosts}
    found: dict[str, list[int]] = {h.name: [] for h in hosts}
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        name = next((proofs[arg] for arg in cmdline if arg in proofs), None)
        if name is not None and FENCE_MODULE in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found[name].append(proc.info["pid"])
    return found


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return ""



def last_run(text: str, lines: int = 12) -> str:
    """The first lines a daemon logged in its last run: why it failed to start comes first, the
    interpreter's noise on the way out after."""
    return "\n".join(text.rsplit("=== start\n", 1)[-1].splitlines()[:lines])


class World:
    """What the run is made of, and how each piece is read, restarted and taken down."""

    def __init__(self, args: argparse.Namespace, book: Book) -> None:
        self.args, self.book = args, book
        self.stack = localstack.ensure_up()
        self.tag = f"{args.seed}-{secrets.token_hex(3)}"  # not from the rng: it must not shift the choices
        self.prefix = f"/chaos-{self.tag}"
        self.dir = Path(self.stack["stack"]) / "chaos" / self.tag
        self.hosts: list[Host] = []
        self.placed = hypervisors.make(args.hypervisor, args.libvirtds, args.hosts, self.dir, self.tag)
        self.hvs = list(dict.fromkeys(self.placed))  # each once, in order
        # A libvirt host's etc/ -> its name: how the QEMU sampler tells its QEMUs from the machine's.
        self.libvirt_etcs = {str(hv.host.base / "etc"): hv.name for hv in self.hvs if isinstance(hv, OwnLibvirt)}
        self.own = contextlib.ExitStack()  # a Placement of the run's own (--placement postgresql)
        upstream, self.placement_log = self.stack["placement"], Path(self.stack["stack"]) / "logs" / "placement.log"
        if args.placement == "postgresql":
            pg = self.own.enter_context(harness.postgres_placement(
                self.stack, workers=2, threads=1, conflict_retries=args.conflict_retries or None))
            upstream, self.placement_log = pg.url, pg.log
        self.placement_log_start = self.placement_log.stat().st_size if self.placement_log.exists() else 0
        self.placement = PlacementClient(PlacementConfig(endpoint=upstream))  # not proxied
        self.cluster = EtcdCluster(self.dir / "etcd")
        self.gateway = Gateway(self.cluster)
        self.proxy = PlacementProxy(upstream)
        self.schedule_yaml = self.dir / "schedule.yaml"

    def name(self, host: str | None) -> str:
        return next((h.name for h in self.hosts if h.uuid == host), (host or "?")[:8])

    # -- bringing it up, keeping it up --------------------------------------------------------

    def start(self) -> None:
        """The hypervisors first, then etcd, then the hosts."""
        self.dir.mkdir(parents=True)
        for d in (self.dir.parent, self.dir):
            d.chmod(0o755)  # QEMU runs as libvirt-qemu and must reach the config drives
        (self.dir / hypervisors.RUN_PID).write_text(f"{os.getpid()}\n")
        for swept in hypervisors.sweep(self.dir.parent):
            self.book.note(f"stopped the libvirt host a dead run left in {swept}", live=True)
        for hv in self.hvs:
            hv.start()
        self.cluster.start()
        endpoints = self.cluster.endpoints
        self.schedule_yaml.write_text(yaml.safe_dump({
            "etcd": {"endpoints": endpoints, "prefix": self.prefix, "timeout": 3},
            "placement": {"endpoint": self.proxy.url}, "default_image": None, "wait_timeout": 30}))
        for i, hv in enumerate(self.placed):
            self.hosts.append(self.new_host(f"h{i}", i, hv, endpoints))
            self.hosts[-1].cp.start()
        for host in self.hosts:
            host.cp.wait_ready(120)
            host.starts = 1
        time.sleep(2)  # the threads of a fresh daemon (liveness, watch, pool) are all up by now
        for host in self.hosts:
            host.baseline = self.threads(host)

    def new_host(self, name: str, i: int, hv: Hypervisor, endpoints: list[str]) -> Host:
        """Host `name` on `hv`, reaching etcd and Placement (the run's failing proxy) through links of its own."""
        links = HostLinks(endpoints, self.proxy.url, name=name)
        files = self.dir / "hosts" / name
        cfg = harness.compute_config(
            {"etcd": links.etcd[0], "placement": links.placement or self.proxy.url}, files,
            uuid=str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, self.prefix + name)), name=f"chaos-{self.tag}-{name}",
            prefix=self.prefix, uri=hv.uri, workers=2, inventory=INVENTORY, network={"mode": "none"},
            metadata={"enabled": False}, lease_ttl=LEASE_TTL, resync_interval=RESYNC, stop_timeout=1,
            shutdown_timeout=5, deadlines=DEADLINES)
        cfg["etcd"]["endpoints"] = links.etcd[i % 3:] + links.etcd[:i % 3]  # each starts on another member
        return Host(name, Ecompute(name, cfg, self.dir / "logs"), hv, hv.driver(cfg["instances_path"]), links)

    def threads(self, host: Host) -> int:
        with contextlib.suppress(psutil.Error, ValueError):
            return psutil.Process(host.pid()).num_threads()
        return 0

    def restart(self, host: Host) -> None:
        """Start a dead daemon again (in a repair thread) and take its thread count once it is up."""
        book = self.book
        with book.lifecycle:
            if book.closing.is_set() or host.state != "dead":
                return  # another restart of it got there first
            host.cp.kill_all()  # reap the killed one (and any worker it left)
            host.cp.start()
            host.state = "starting"
        try:
            host.cp.wait_ready(90)
        except Exception as exc:  # noqa: BLE001 - AssertionError with the log tail, or torn down meanwhile
            if book.closing.is_set():
                return
            host.failed_starts += 1
            why = str(exc).splitlines()[0].split("; last lines")[0]
            book.violation("7", f"{host.name}: the restarted daemon never became ready: {why}; its log:\n"
                                f"{last_run(host.cp.logtext())}")
            with book.lock:
                host.state = "dead"
            if host.failed_starts < 3:
                book.after(2, f"restart {host.name} (again)", lambda: book.repair(self.restart, host))
            return
        host.starts += 1
        host.failed_starts = 0
        time.sleep(2)
        with book.lock:
            host.baseline = self.threads(host)
            host.state = "up"

    def watch_daemons(self) -> None:
        """A daemon the run did not kill must not exit: report it (with its log) and restart it."""
        book = self.book
        for host in self.hosts:
            with book.lock:
                proc = host.cp.proc
                if host.state not in ("up", "stopped") or proc is None or proc.poll() is None:
                    continue
                host.state = "dead"
            book.violation("7", f"{host.name}: daemon exited by itself with {proc.returncode}; last lines:\n"
                           + localstack.tail(host.cp.log, 15))
            book.after(1, f"restart {host.name} (died)", functools.partial(book.repair, self.restart, host))

    def restart_etcd(self, member: harness.Etcd) -> None:
        with self.book.lifecycle:  # a member started after the teardown would be left running
            if not self.book.closing.is_set() and member.proc is None:
                member.start()

    # -- reading it, as the invariants take it -------------------------------------------------

    def alive(self) -> set[str]:
        try:
            return {k.rsplit("/", 1)[1] for k in self.gateway.range(f"{self.prefix}/alive/")}
        except RuntimeError:
            return {h.uuid for h in self.hosts}

    def etcd(self) -> EtcdView:
        """Everything under the run's prefix, at one revision."""
        return EtcdView.parse(self.prefix, self.gateway.range(self.prefix + "/"))

    def hypervisors(self, known: set[str]) -> Hypervisors:
        """Every domain of the run on every hypervisor, by the host that owns it (its libvirt
        metadata, read from that host's own hypervisor); under None the domains of `known`
        instances that no host on their hypervisor owns."""
        found: dict[str | None, dict[str, str]] = {}
        stray: dict[str, str] = {}
        for hv in self.hvs:
            hosts = [h for h in self.hosts if h.hv is hv]
            for host in hosts:
                domains = host.driver.list_domains(owner=host.uuid)
                found[host.uuid] = {uuid: str(info.observed) for uuid, info in domains.items()}
            owned = {uuid for h in hosts for uuid in found[h.uuid]}
            for uuid in set(hosts[0].driver.list_uuids()) & known - owned:
                info = hosts[0].driver.lookup(uuid)
                if info is not None:  # (else gone since it was listed)
                    stray[uuid] = str(info.power)
        if stray:
            found[None] = stray
        return found

    def placement_view(self) -> PlacementView:
        """What Placement holds on the run's hosts."""
        view = PlacementView()
        for host in self.hosts:
            allocations = self.placement.provider_allocations(host.uuid)
            view.allocations[host.uuid] = {c: a["resources"] for c, a in allocations.items()}
            view.usages[host.uuid] = self.placement.usages(host.uuid)
            view.inventories[host.uuid] = self.placement.inventories(host.uuid)
        return view

    def check_daemons(self) -> None:
        """7: every daemon runs (deaths during the run are reported as they happen) and has not
        gathered threads or worker processes."""
        for host in self.hosts:
            if host.state != "up" or host.cp.proc is None or host.cp.proc.poll() is not None:
                self.book.violation("7", f"{host.name}: daemon not running at the end ({host.state})")
                continue
            threads = self.threads(host)
            for _ in range(2):  # the least of a few looks: a job's short-lived thread is no leak
                time.sleep(0.3)
                threads = min(threads, self.threads(host))
            host.final_threads = threads
            if threads > host.baseline + THREAD_SLACK:
                self.book.violation("7", f"{host.name}: {threads} threads, {host.baseline} just after its last start")
            spawned = host.workers()
            listeners = [p for p in spawned if _name(p) == EVENTS_PROCESS]
            if len(listeners) > 1:
                self.book.violation("7", f"{host.name}: {len(listeners)} lifecycle-event listeners")
            workers = [p for p in spawned if p not in listeners]
            if len(workers) > host.cp.cfg["workers"]:
                self.book.violation("7", f"{host.name}: {len(workers)} worker processes for {host.cp.cfg['workers']} "
                                         f"workers: {[w.pid for w in workers]}")
        for name, pids in fences(self.hosts).items():
            if len(pids) != 1:
                self.book.violation("7", f"{name}: {len(pids)} fence processes ({pids}): one per host")

    # -- taking it down ------------------------------------------------------------------------

    def stop_daemons(self) -> None:
        for pid in list(self.book.stopped):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)  # a stopped process cannot even die
        for host in self.hosts:
            host.cp.kill_all()
            host.cp.kill_fence()
        for pids in fences(self.hosts).values():  # any the pid files did not name
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def remove_providers(self) -> None:
        for host in self.hosts:
            self.placement.delete_provider(host.uuid)

    def remove_domains(self, known: set[str]) -> None:
        """The run's domains (and their files and volumes), then the storage pools over its dirs."""
        for hv in self.hvs:
            hv.remove({h.uuid: h.driver for h in self.hosts if h.hv is hv}, known, self.dir)

    def stop_hypervisors(self) -> None:
        """Stop the run's own libvirtds (with every QEMU they ran) and resume the fake ones; each
        whatever became of the others."""
        for hv in self.hvs:
            try:
                hv.stop()
            except Exception as exc:  # noqa: BLE001 - the next one must go too
                print(f"chaos: stopping hypervisor {hv.name} failed: {exc!r}", file=sys.stderr)

    def close_links(self) -> None:
        for host in self.hosts:
            host.links.close()

    def remove_files(self, keep_logs: bool) -> None:
        if not keep_logs:
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        for d in (self.dir / "hosts", self.dir / "etcd"):
            shutil.rmtree(d, ignore_errors=True)
        for base in self.dir.glob("lv*"):  # a libvirt host's logs stay; its state and definitions go
            for state in ("etc", "lib", "cache", "run", "sock"):
                shutil.rmtree(base / state, ignore_errors=True)
        print(f"chaos: logs kept in {self.dir}")
