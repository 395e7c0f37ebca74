"""One harness for the tests, the benchmarks and the demo: the processes they run and how they wait.

A free port, a wait that fails early when the process it waits for has died, a private etcd,
an ecompute daemon with its config and log, an HTTP file server and the test guest's console
report: each exists once, here, so tests/ and bench/ cannot drift apart. Only they and the
demo import this module, in the venv (PyYAML is there); the runtime packages never do.
"""

from __future__ import annotations

import contextlib
import copy
import http.server
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from devstack import localstack, testguest

BIN = Path(sys.executable).parent  # tests and benchmarks run in the venv that holds ecompute and eschedule

# A host of the tests and benchmarks offers this unless told otherwise: fixed, not the machine's.
INVENTORY = {"VCPU": {"total": 8, "allocation_ratio": 1.0}, "MEMORY_MB": {"total": 4096, "reserved": 0},
             "DISK_GB": {"total": 40}}


_HANDED_OUT: set[int] = set()


def _below_ephemeral() -> range:
    """Ports under the kernel's ephemeral range, which outgoing connections never take."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(max(1024, min(20000, low - 2000)), low)


def free_port(preferred: int = 0) -> int:
    """A loopback TCP port nobody listens on: `preferred` if it is free, else one picked at random
    below the kernel's ephemeral range, never one this process handed out before.

    Not bind(0): that hands out an ephemeral port, which any outgoing connection may take
    before the server binds it (CI once saw an etcd member's peer port taken so). Probed with
    SO_REUSEADDR, as the servers started on it bind (etcd, gunicorn, http.server): a port in
    TIME_WAIT is free to them.
    """
    pool = _below_ephemeral()
    for port in [preferred] * bool(preferred) + random.sample(pool, min(len(pool), 500)):
        if port in _HANDED_OUT and port != preferred:
            continue
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free port on 127.0.0.1")


def wait_until(check: Callable[[], Any], timeout: float = 20.0, what: str = "condition", *,
               proc: subprocess.Popen | None = None, log: Path | None = None, interval: float = 0.1) -> Any:
    """Poll check() until it returns something true, and return that; AssertionError on timeout.

    With `proc`, fail as soon as that process exits: a dead daemon never gets ready, and the
    tail of its `log` (also shown on a timeout) says why.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            failed = f"{what}: the process exited with {proc.returncode}"
        elif time.monotonic() > deadline:
            failed = f"timed out after {timeout}s waiting for {what}"
        else:
            time.sleep(interval)
            continue
        raise AssertionError(failed + (f"; last lines of {log}:\n{localstack.tail(log)}" if log else ""))


class Etcd:
    """A one-member etcd of its own on free loopback ports, data and log under `d`.

    For what the stack's etcd must not go through: being killed under a client, TLS, auth.
    `scheme` and `args` make a TLS one (see tests/etcdtls.py). `with Etcd(d) as etcd:` starts
    it and kills it afterwards; its data stays in `d`.
    """

    def __init__(self, d: Path, *, scheme: str = "http", args: Sequence[str] = (), name: str = "t",
                 peer: str | None = None, cluster: str | None = None) -> None:
        self.d, self.log = d, d / "etcd.log"
        self.endpoint = f"{scheme}://127.0.0.1:{free_port()}"
        self.peer = peer or f"http://127.0.0.1:{free_port()}"
        self.cmd = localstack.etcd_command(name, d / "data", self.endpoint, self.peer, cluster)
        self.cmd += args
        self.proc: subprocess.Popen | None = None

    def healthy(self) -> bool:
        return localstack.http_ok(self.endpoint + "/health", needle='"true"')

    def start(self) -> Etcd:
        """Start it (again: the same data and ports) and wait until it is healthy."""
        self.d.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=log)
        wait_until(self.healthy, 30, f"etcd at {self.endpoint}", proc=self.proc, log=self.log)
        return self

    def kill(self) -> None:
        """SIGKILL, as if its machine died: no goodbye to the clients."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        """Like a reboot of etcd's host: the data (and the ports) stay, its auth tokens do not."""
        self.kill()
        self.start()

    def __enter__(self) -> Etcd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


class EtcdCluster:
    """Three (or `size`) etcd members of one cluster on loopback, for failover: kill any one
    and the others keep a quorum. `endpoints` lists every member's client URL."""

    def __init__(self, d: Path, size: int = 3) -> None:
        peers = {f"m{i}": f"http://127.0.0.1:{free_port()}" for i in range(size)}
        cluster = ",".join(f"{n}={p}" for n, p in peers.items())
        self.members = [Etcd(d / n, name=n, peer=p, cluster=cluster) for n, p in peers.items()]
        self.endpoints = [m.endpoint for m in self.members]

    def start(self) -> EtcdCluster:
        """Start every member at once (each waits for the others to form the cluster)."""
        for m in self.members:
            m.d.mkdir(parents=True, exist_ok=True)
            with m.log.open("ab") as log:
                m.proc = subprocess.Popen(m.cmd, stdout=subprocess.DEVNULL, stderr=log)
        for m in self.members:
            wait_until(m.healthy, 30, f"etcd member at {m.endpoint}", proc=m.proc, log=m.log)
        return self

    def member(self, endpoint: str) -> Etcd:
        return next(m for m in self.members if m.endpoint == endpoint)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        for m in self.members:
            m.kill()


def compute_config(stack: dict, files: Path, *, uuid: str, name: str, prefix: str | None = None,
                   etcd: str | list[str] | None = None, uri: str = "test:///default", workers: int = 1,
                   md_port: int | None = None, inventory: dict | None = INVENTORY, **extra: Any) -> dict:
    """An ecompute config (compute.yaml as a dict) for a host of ours whose files live in `files`.

    `stack` holds the etcd and Placement URLs (localstack.ensure_up() or .urls()); `etcd`
    replaces the former (a private etcd). On qemu:// the domains run under TCG (KVM hangs
    guests here) on the isolated network (nothing leaves the machine), with the metadata
    server on `md_port` if one is given; test:///default has no DHCP, so no NIC and no
    metadata server. `inventory` None: the machine's own. Local images may come from the
    stack's test guest and from `files` (the host's own images and instances excepted).
    `extra` keys go in last.
    """
    real = uri.startswith("qemu")
    cfg: dict[str, Any] = {
        "uuid": uuid, "name": name,
        "etcd": {"endpoints": etcd if isinstance(etcd, list) else [etcd or stack["etcd"]],
                 **({"prefix": prefix} if prefix else {})},
        "placement": {"endpoint": stack["placement"]},
        "libvirt": {"uri": uri, "domain_type": "qemu" if real else "auto"},
        "instances_path": str(files / "instances"), "image_cache_path": str(files / "images"),
        "image_dirs": [str(localstack.stack_dir() / "guest"), str(files)],
        "network": dict(localstack.ISOLATED_NETWORK) if real else {"mode": "none"},
        "metadata": {"enabled": real and md_port is not None, "port": md_port or 80},
        "workers": workers,
    }
    if inventory is not None:
        cfg["inventory"] = copy.deepcopy(inventory)
    return {**cfg, **extra}


class Ecompute:
    """One ecompute daemon of a test or benchmark: its config file, its log and its process.

    The config goes to <files>/<name>.yaml (0600); stdout and stderr to <files>/<name>.log,
    each start marked by a line `=== start`, for diagnostics. Readiness is what the daemon
    tells systemd (Type=notify), received here on a socket of our own: log wording is not
    an interface, sd_notify's READY=1 is.
    """

    def __init__(self, name: str, cfg: dict, files: Path) -> None:
        self.name, self.cfg, self.host = name, cfg, cfg["uuid"]
        files.mkdir(parents=True, exist_ok=True)
        self.config, self.log = files / f"{name}.yaml", files / f"{name}.log"
        self.config.write_text(yaml.safe_dump(cfg))
        self.config.chmod(0o600)
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.notices: list[str] = []  # the sd_notify messages of its current run, in order
        self._notify: socket.socket | None = None
        self._notify_dir: str | None = None

    def start(self) -> Ecompute:
        """Start the daemon in a session of its own, so kill_all() takes its workers with it (as a
        crash of the whole service, or systemd's SIGKILL of the cgroup, would); see wait_ready().

        NOTIFY_SOCKET is a datagram socket this harness binds afresh for each run, in a short
        temp dir (AF_UNIX paths end at 107 bytes; pytest's tmp_path can be longer).
        """
        self.close()
        self._notify_dir = tempfile.mkdtemp(prefix="ecn-")
        address = os.path.join(self._notify_dir, "notify")
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(address)
        self.notices = []
        with self.log.open("a") as log:
            log.write("=== start\n")
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([str(BIN / "ecompute"), "--config", str(self.config)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env={**os.environ, "NOTIFY_SOCKET": address})
        self.started_at = time.monotonic()
        return self

    def notice(self, timeout: float) -> str | None:
        """The next sd_notify message of this run (kept in `notices`); None if none came within `timeout`."""
        if self._notify is None:
            return None
        self._notify.settimeout(timeout)
        try:
            message = self._notify.recv(4096).decode(errors="replace")
        except (TimeoutError, BlockingIOError):  # (timeout 0: a non-blocking socket)
            return None
        self.notices.append(message)
        return message

    def ready(self, timeout: float = 0.0) -> bool:
        """Has this run sent READY=1 (sent once registered in Placement, resynced and watching)?"""
        def said() -> bool:
            return any("READY=1" in n.splitlines() for n in self.notices)
        return said() or (self.notice(timeout) is not None and said())

    def wait_ready(self, timeout: float = 90.0) -> float:
        """Wait for READY=1, failing at once (with the log's tail) if the daemon exits first;
        the seconds since start(). (Its alive key, which its own thread writes, may follow a moment
        later: wait for that too where being UP matters at once.)"""
        wait_until(lambda: self.ready(0.1), timeout, f"ecompute {self.name} to send READY=1",
                   proc=self.proc, log=self.log, interval=0)
        return time.monotonic() - self.started_at

    def wait_log(self, needle: str, timeout: float, after: int = 0) -> float:
        """Wait for `needle` in the log past offset `after`, for what the daemon tells only its log;
        the monotonic time it was seen."""
        wait_until(lambda: needle in self.logtext()[after:], timeout, f"{needle!r} in {self.log}",
                   proc=self.proc, log=self.log, interval=0.05)
        return time.monotonic()

    def logtext(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Send `sig` to the daemon alone (as systemd does: it stops its workers itself) and reap it,
        SIGKILLed after `timeout`; stragglers of its group go too. Its exit status (None: not running)."""
        if self.proc is None:
            return None
        self.proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        return self.kill_all()

    def kill_all(self) -> int | None:
        """SIGKILL the daemon and its workers at once, as a crash of the whole service would;
        its exit status (None: not running)."""
        rc = None
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):  # nothing left of the group
                os.killpg(self.proc.pid, signal.SIGKILL)
            rc = self.proc.wait()
            self.proc = None
        self.close()
        return rc

    def fence_pid(self) -> int | None:
        """The pid of this host's fence process, if one runs (ecompute/fence.py)."""
        from etcd_compute.ecompute import proof
        return proof.fence_pid(self.cfg["instances_path"])

    def kill_fence(self) -> None:
        """SIGKILL this host's fence. It runs in a session of its own (a unit of its own under
        systemd), so kill_all() leaves it, as a crash of the daemon's service would: a test or a
        run that is done with the host ends it here."""
        pid = self.fence_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        """Drop the notify socket of the last run, once what it holds is read into `notices`."""
        if self._notify is not None:
            while self.notice(0) is not None:
                pass
            self._notify.close()
            self._notify = None
        if self._notify_dir is not None:
            shutil.rmtree(self._notify_dir, ignore_errors=True)
            self._notify_dir = None


class ApiServer:
    """An `eapi` process of a test, benchmark or the demo, on a free port of 127.0.0.1; its log
    in <files>/eapi.log."""

    def __init__(self, schedule_yaml: Path, files: Path, port: int = 0) -> None:
        self.config, self.log = schedule_yaml, files / "eapi.log"
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> ApiServer:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([str(BIN / "eapi"), "--config", str(self.config), "--listen",
                                          f"127.0.0.1:{self.port}"], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

        def up() -> bool:
            try:
                return urllib.request.urlopen(self.url + "/v1/openapi.json", timeout=2).status == 200
            except OSError:
                return False
        wait_until(up, timeout, f"eapi on {self.url}", proc=self.proc, log=self.log, interval=0.1)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


class Served:
    """The files of `root` over HTTP on 127.0.0.1, counting the GETs of each path.

    `delay` holds each GET back that long (a slow image server keeps a build BUILDING a while).
    """

    def __init__(self, root: Path, delay: float = 0.0) -> None:
        self.root = root
        self.hits: dict[str, int] = {}
        served = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a: Any, **kw: Any) -> None:
                super().__init__(*a, directory=str(root), **kw)

            def do_GET(self) -> None:  # noqa: N802
                served.hits[self.path] = served.hits.get(self.path, 0) + 1
                time.sleep(delay)
                super().do_GET()

            def log_message(self, *a: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def add(self, name: str, data: bytes) -> str:
        """Put a file in `root`; its URL."""
        (self.root / name).write_bytes(data)
        return f"{self.url}/{name}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def guest_report(console_log: Path, timeout: float = 150.0) -> dict[str, str]:
    """What the test guest's /init reported on its serial console (testguest.INIT), once it is done."""
    def report() -> dict[str, str] | None:
        return testguest.parse_report(console_log.read_text(errors="replace") if console_log.exists() else "")

    return wait_until(report, timeout, f"the guest to report on {console_log}", interval=0.25)


# ---------------------------------------------------------------- Placement on PostgreSQL

# What Placement logs when it lets a claim through over capacity because the change looks "no
# worse than before" (placement/objects/allocation.py, _check_capacity_exceeded): on PostgreSQL,
# its own retry of a claim that lost a provider's generation (etcd_compute/eschedule/overcommit.py).
OVERAGE_LOGGED = "reduces existing overage"


class PgPlacement(NamedTuple):
    """A Placement API served from a PostgreSQL cluster of its own: its URL, its log and the
    loopback port of its database (user postgres, database placement, no password)."""
    url: str
    log: Path
    db_port: int


def pg_bin() -> Path:
    """The binaries of the newest PostgreSQL server installed (Debian's /usr/lib/postgresql/N/bin)."""
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb") if p.parts[-3].isdigit()]
    if not found:
        raise localstack.StackError("PostgreSQL is not installed: run `python3 -m devstack install`")
    return max(found, key=lambda p: int(p.parts[-2]))


def _as_postgres(log: Path, what: str, *cmd: str | Path) -> None:
    """A PostgreSQL tool run as the postgres user (its server refuses to run as root)."""
    localstack.run_logged(["runuser", "-u", "postgres", "--", *cmd], log, what)


def _stop_pg_placement(home: Path) -> None:
    """Stop the Placement and the cluster of a postgres_placement() in `home` and drop the
    cluster's data; its logs stay (for a look after a failure) until the next one clears them."""
    localstack.stop(home, "placement", "gunicorn")
    data = home / "data"
    if (data / "postmaster.pid").exists():
        _as_postgres(home / "setup.log", "pg_ctl stop", pg_bin() / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
    shutil.rmtree(data, ignore_errors=True)


def _clear_dead_pg_placements(base: Path) -> None:
    """What earlier postgres_placement() users, now dead (killed tests, an interrupted bench),
    left under `base`: each in <base>/<its pid>-..., stopped and removed."""
    for home in base.iterdir():
        pid = home.name.split("-")[0]
        if pid.isdigit() and localstack.pid_alive(int(pid), "python"):
            continue  # a live session's (this one's, or a concurrent run's)
        with contextlib.suppress(localstack.StackError):
            _stop_pg_placement(home)
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def postgres_placement(stack: dict, *, workers: int = 2, threads: int = 1, conflict_retries: int | None = 1,
                       extra_conf: str = "") -> Iterator[PgPlacement]:
    """A second Placement beside the stack's, on a PostgreSQL cluster of its own; on exit both
    are stopped and the cluster's data removed.

    The stack's Placement (SQLite: one worker, one thread) carries out one request at a time,
    so no two claims ever overlap. Here `workers` gunicorn processes of `threads` threads each
    run claims side by side in the database, as a deployment does: a claim can lose the race
    for a provider's generation. `conflict_retries` sets [placement]
    allocation_conflict_retry_count: 1 as in every placement.conf we write (localstack
    placement_section()), None for Placement's own default (10 attempts, which can overcommit);
    `extra_conf` is appended to placement.conf.

    Each caller gets its own cluster on its own loopback ports under <stack>/pg/<pid>-...,
    so concurrent runs on one stack dir never share or stop each other's. Needs Debian's
    postgresql and psycopg2 in the Placement venv (both installed by `python3 -m devstack install`).
    """
    base = Path(stack["stack"]) / "pg"
    base.mkdir(exist_ok=True)
    _clear_dead_pg_placements(base)
    home = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=base))
    shutil.chown(home, "postgres", "postgres")  # its cluster's data and log; we (root) write there anyway
    for d in ("logs", "run", "placement"):
        (home / d).mkdir()
    setup_log, data, conf = home / "setup.log", home / "data", home / "placement"
    pg, pvenv = pg_bin(), Path(stack["placement_venv"])
    port, api_port = free_port(), free_port()
    try:
        _as_postgres(setup_log, "initdb", pg / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                     "--no-sync")  # a cluster for one run: its files need not reach the disk first
        with (data / "postgresql.conf").open("a") as f:  # loopback TCP only: no socket path to outgrow
            f.write(f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = ''\n")
        _as_postgres(setup_log, "pg_ctl start", pg / "pg_ctl", "-D", data, "-l", home / "postgres.log",
                     "-w", "-t", "60", "start")
        _as_postgres(setup_log, "createdb", pg / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                     "placement")
        retries = "" if conflict_retries is None else localstack.placement_section(conflict_retries) + "\n"
        (conf / "placement.conf").write_text(
            "[api]\nauth_strategy = noauth2\n\n[placement_database]\n"
            f"connection = postgresql+psycopg2://postgres@127.0.0.1:{port}/placement\n\n{retries}{extra_conf}")
        env = {**os.environ, "OS_PLACEMENT_CONFIG_DIR": str(conf)}
        localstack.run_logged([pvenv / "bin" / "placement-manage", "--config-file", conf / "placement.conf",
                               "db", "sync"], setup_log, "placement db sync (PostgreSQL)", env)
        url = f"http://127.0.0.1:{api_port}"
        api = localstack.spawn(home, "placement", [
            str(pvenv / "bin" / "gunicorn"), "--bind", f"127.0.0.1:{api_port}", "--workers", str(workers),
            "--threads", str(threads), "placement.wsgi.api:application"], env)
        localstack.wait_for(lambda: localstack.http_ok(url + "/", {"x-auth-token": "admin"}),
                            "Placement on PostgreSQL", home / "logs" / "placement.log", api)
        yield PgPlacement(url, home / "logs" / "placement.log", port)
    finally:
        _stop_pg_placement(home)


def _psql(db_port: int) -> list[str]:
    return [str(pg_bin() / "psql"), "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
            "-p", str(db_port), "-U", "postgres", "placement"]


def pg_query(pg: PgPlacement, sql: str) -> str:
    """One statement against a postgres_placement()'s database; its rows as psql prints them."""
    return subprocess.run([*_psql(pg.db_port), "-c", sql], capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip()


def claims_waiting(pg: PgPlacement) -> int:
    """How many of Placement's transactions wait for a row lock on resource_providers: claims
    that checked capacity and inserted their rows, and now wait to bump the provider's generation."""
    return int(pg_query(pg, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                            "AND query LIKE 'UPDATE resource_providers SET generation%'"))


@contextlib.contextmanager
def provider_row_held(pg: PgPlacement, provider: str) -> Iterator[None]:
    """Hold a provider's row in Placement's database locked (SELECT ... FOR UPDATE, generation
    unchanged) until the block ends: every claim on it gets as far as its generation bump and
    waits there, so claims meant to race really meet, in the order the caller chooses. On
    exit the lock is released without changing anything, and the waiting claims go on."""
    if not re.fullmatch(r"[0-9a-f-]{36}", provider):
        raise ValueError(f"not a provider uuid: {provider!r}")
    proc = subprocess.Popen(_psql(pg.db_port), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(f"BEGIN;\nSELECT generation FROM resource_providers WHERE uuid = '{provider}' "
                         "FOR UPDATE;\n")
        proc.stdin.flush()
        if not proc.stdout.readline().strip().isdigit():  # the row is ours once its generation is printed
            raise RuntimeError(f"could not lock provider {provider} in Placement's database")
        yield
    finally:
        proc.communicate("ROLLBACK;\n", timeout=30)
