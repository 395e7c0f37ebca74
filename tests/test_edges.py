"""Edges of issue 10: a Placement that drips or loses a reply, two clouds on one Placement,
queries that would escape accounting, and values that used to end in a traceback."""

from __future__ import annotations

import socket
import socketserver
import subprocess
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from devstack.harness import BIN, Etcd, free_port, wait_until
from etcd_compute.config import EtcdConfig
from etcd_compute.store import Store

from conftest import Cloud

SMALL = "resources=VCPU:1,MEMORY_MB:256,DISK_GB:1"
ZERO = {"VCPU": 0, "MEMORY_MB": 0, "DISK_GB": 0}


class LoopbackServer:
    """A TCP server on 127.0.0.1 that hands each connection to `serve(conn, stopping)` on a
    thread of its own; close() sets `stopping` so handlers that hold a connection let go."""

    def __init__(self, serve: Callable[[socket.socket, threading.Event], None]) -> None:
        self.stopping = threading.Event()
        stopping = self.stopping

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                serve(self.request, stopping)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def servers() -> Iterator[list[LoopbackServer]]:
    made: list[LoopbackServer] = []
    yield made
    for s in made:
        s.close()


def read_request(conn: socket.socket) -> bytes:
    """One HTTP request as the client sent it: head and Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def config_with_placement(cloud: Cloud, endpoint: str, timeout: float = 2) -> Path:
    return cloud.write("placement.yaml", {
        "etcd": {"endpoints": [cloud.stack["etcd"]], "prefix": cloud.prefix},
        "placement": {"endpoint": endpoint, "timeout": timeout}, "default_image": None})


def one_line(err: str) -> bool:
    return len(err.strip().splitlines()) == 1


# -- finding 10: a Placement that drips --------------------------------------------------------

def test_dripping_placement_is_bounded_by_the_timeout(cloud: Cloud, servers: list[LoopbackServer]) -> None:
    """requests' timeout is per socket read: a byte every half second never trips a 2 s one."""
    def drip(conn: socket.socket, stopping: threading.Event) -> None:
        read_request(conn)
        try:
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-Drip: ")
            while not stopping.wait(0.5):
                conn.sendall(b"a")
        except OSError:
            pass  # the client gave up: what should happen

    servers.append(LoopbackServer(drip))
    path = config_with_placement(cloud, servers[0].url, timeout=2)
    started = time.monotonic()
    assert cloud.eschedule("list", config=path).rc == 0
    baseline = time.monotonic() - started  # start-up and etcd on this (shared, busy) machine
    for args in ([SMALL], ["hosts"]):
        started = time.monotonic()
        r = cloud.eschedule(*args, config=path, timeout=20)
        took = time.monotonic() - started
        assert r.rc == 4, r
        assert "did not answer in 2s" in r.err and one_line(r.err), r.err
        assert took < baseline + 2 + 2, f"eschedule {args[0]} took {took:.1f}s ({baseline:.1f}s without Placement)"
    assert cloud.instance_keys() == {}


def test_non_json_placement_error_is_one_short_line(cloud: Cloud, servers: list[LoopbackServer]) -> None:
    """A proxy or a WSGI server in front of Placement answers in HTML: one line, no markup."""
    page = b"<html>\n<head><title>Bad Gateway</title></head>\n<body>\n<h1>502</h1>\n" + b"x" * 5000 + b"\n</body>"

    def html(conn: socket.socket, stopping: threading.Event) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(page) + page)

    servers.append(LoopbackServer(html))
    r = cloud.eschedule(SMALL, config=config_with_placement(cloud, servers[0].url))
    assert r.rc == 4, r
    assert "502" in r.err and "Bad Gateway" in r.err and "<" not in r.err, r.err
    assert one_line(r.err) and len(r.err) < 400, r.err


# -- finding 11: a claim whose reply is lost ---------------------------------------------------

@pytest.mark.parametrize("loss", ["reset", "silence"])
def test_claim_whose_reply_is_lost_is_freed(cloud: Cloud, servers: list[LoopbackServer], loss: str) -> None:
    """Placement made the allocation, eschedule never heard: it must not stay allocated."""
    host = cloud.compute("host1")
    upstream = urlsplit(cloud.stack["placement"])
    claimed: list[str] = []

    def proxy(conn: socket.socket, stopping: threading.Event) -> None:
        request = read_request(conn)
        request = request.replace(b"Connection: keep-alive", b"Connection: close")
        with socket.create_connection((upstream.hostname, upstream.port)) as up:
            up.sendall(request)
            response = b""
            while chunk := up.recv(65536):
                response += chunk
        if request.startswith(b"PUT /allocations/"):
            claimed.append(request.split(b" ")[1].decode().rsplit("/", 1)[1])
            if loss == "silence":
                stopping.wait(30)
            return  # the connection closes without a reply
        conn.sendall(response)

    servers.append(LoopbackServer(proxy))
    r = cloud.eschedule(SMALL, config=config_with_placement(cloud, servers[0].url, timeout=2), timeout=30)
    assert r.rc == 4, r
    assert one_line(r.err), r.err
    assert len(claimed) == 1, claimed  # the claim reached Placement once, and was not blindly repeated
    assert cloud.placement.get_allocations(claimed[0]) == {}
    assert cloud.usages(host.host) == ZERO
    assert cloud.instance_keys() == {}


# -- finding 13.3: audit stays within its own prefix -------------------------------------------

def test_audit_sees_only_the_hosts_of_its_own_prefix(cloud: Cloud, stack: dict, tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    other = Cloud(stack, tmp_path / "other")  # a second cloud (prefix) on the same Placement
    try:
        a, b = cloud.compute("hostA"), other.compute("hostB")
        cloud.boot(SMALL)
        on_b = other.boot(SMALL)["uuid"]
        for c in (cloud, other):
            r = c.eschedule("audit", "--grace", "0", "--json")
            assert r.rc == 0 and r.json() == [], (c.prefix, r)
        leaked = str(uuidlib.uuid4())  # as if eschedule of cloud A died between claim and etcd write
        cloud.placement.claim(leaked, {a.host: {"resources": {"VCPU": 1, "MEMORY_MB": 64}}},
                              "etcd-compute", "etcd-compute")
        r = cloud.eschedule("audit", "--grace", "0", "--json")
        assert r.rc == 0 and [f["consumer"] for f in r.json()] == [leaked], r
        r = other.eschedule("audit", "--grace", "0", "--json")
        assert r.rc == 0 and r.json() == [], r
        r = cloud.eschedule("audit", "--grace", "0", "--fix", "--json")
        assert r.rc == 0 and [f["consumer"] for f in r.json()] == [leaked], r
        assert cloud.placement.get_allocations(leaked) == {}
        assert other.placement.get_allocations(on_b) != {}  # B's instance keeps its claim
        assert other.usages(b.host)["VCPU"] == 1 and cloud.usages(a.host)["VCPU"] == 1
    finally:
        other.cleanup()


# -- finding 13.4 and 13.5: queries ------------------------------------------------------------

LONG = SMALL + "&required=" + "CUSTOM_" + "X" * 10_000


@pytest.mark.parametrize("query, message", [
    ("resources=DISK_GB:1", "must ask for VCPU and MEMORY_MB"),
    ("resources=VCPU:1", "must ask for VCPU and MEMORY_MB"),
    ("resources=VCPU:1&resources=MEMORY_MB:1", "'resources' given twice"),
    ("resources1=VCPU:1&resources1=MEMORY_MB:1&resources=DISK_GB:1", "'resources1' given twice"),
    (SMALL + "&limit=2&limit=3", "'limit' given twice"),
    (SMALL + "&group_policy=none&group_policy=isolate", "'group_policy' given twice"),
    ("resources=VCPU:²,MEMORY_MB:256", "amount of VCPU must be a whole number"),
    ("resources=VCPU:١,MEMORY_MB:256", "amount of VCPU must be a whole number"),
    (SMALL + "&limit=²", "limit must be a whole number"),
    ("resources\n=VCPU:1,MEMORY_MB:256", "is not a query key"),
    (SMALL + "&resources\n=DISK_GB:1000", "is not a query key"),
    ("resources=VCPU\n:1,MEMORY_MB:256", "is not CLASS:AMOUNT"),
    ("resources=VCPU:1,MEMORY_MB:256\n", "amount of MEMORY_MB must be a whole number"),
    (LONG, "query is too long"),
])
def test_bad_query_is_refused_before_placement(shared_cloud: Cloud, query: str, message: str) -> None:
    cloud, host = shared_cloud, shared_cloud.computes[0]
    r = cloud.eschedule(query)
    assert r.rc == 2, r
    assert message in r.err and one_line(r.err), r.err
    assert len(r.err) < 400, r.err
    assert cloud.instance_keys() == {}
    assert cloud.usages(host.host) == ZERO


# -- finding 13.5: config values ---------------------------------------------------------------

@pytest.mark.parametrize("text, key", [
    ("placement: {retries: -1}", "placement.retries"),
    ("placement: {timeout: 0}", "placement.timeout"),
    ("placement: {endpoint: 'http://127.0.0.1:notaport'}", "placement.endpoint"),
    ("etcd: {endpoints: ['http://127.0.0.1:99999']}", "etcd.endpoints"),
    ("etcd: {endpoints: ['http://[::1:23379']}", "etcd.endpoints"),
    ("limit: 0", "limit"),
    ("wait_timeout: .nan", "wait_timeout"),
])
def test_bad_schedule_config_exits_2_naming_the_key(cloud: Cloud, text: str, key: str) -> None:
    path = cloud.write("bad.yaml", text + "\n")
    r = cloud.eschedule("list", config=path, timeout=30)
    assert r.rc == 2, r
    assert str(path) in r.err and f"'{key}'" in r.err and one_line(r.err), r.err


@pytest.mark.parametrize("text, key", [
    ("metadata: {port: 70000}", "metadata.port"),
    ("resync_interval: 0", "resync_interval"),
    ("lease_ttl: 1000000000000", "lease_ttl"),
    ("instances_path: FILE", "instances_path"),
])
def test_bad_compute_config_exits_2_naming_the_key(cloud: Cloud, text: str, key: str) -> None:
    """(Nothing listens on its etcd and Placement: an ecompute that took the value ends there.)"""
    dead = f"http://127.0.0.1:{free_port()}"
    path = cloud.write("bad.yaml", f"etcd: {{endpoints: ['{dead}']}}\nplacement: {{endpoint: '{dead}'}}\n"
                       f"libvirt: {{uri: 'test:///default'}}\n" + text.replace("FILE", str(cloud.schedule_yaml)) + "\n")
    p = subprocess.run([str(BIN / "ecompute"), "--config", str(path)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2, p
    assert str(path) in p.stderr and f"'{key}'" in p.stderr and one_line(p.stderr), p.stderr


# -- done elsewhere, checked here: a full etcd --------------------------------------------------

def test_full_etcd_is_named_and_the_claim_freed(cloud: Cloud, tmp_path: Path) -> None:
    """etcd past its quota raises the NOSPACE alarm and refuses every write: eschedule says so
    (exit 5), and frees the claim it made just before."""
    host = cloud.compute("host1")
    with Etcd(tmp_path / "etcd", args=["--quota-backend-bytes", str(4 << 20)]) as etcd:
        store = Store(EtcdConfig(endpoints=[etcd.endpoint], prefix=cloud.prefix))
        store.claim_alive(host.host, 120, {"uuid": host.host})  # the host is UP in this etcd
        with pytest.raises(Exception, match="space"):
            for i in range(64):
                store.client.put(f"/fill/{i}", "x" * (1 << 20))
        store.close()
        path = cloud.write("full.yaml", {"etcd": {"endpoints": [etcd.endpoint], "prefix": cloud.prefix},
                                         "placement": {"endpoint": cloud.stack["placement"]}, "default_image": None})
        r = cloud.eschedule(SMALL, config=path)
    assert r.rc == 5, r
    assert "etcd is out of space (NOSPACE alarm" in r.err and one_line(r.err), r.err
    assert cloud.usages(host.host) == ZERO


def test_ecompute_waits_out_a_placement_answering_5xx_at_start(cloud: Cloud, servers: list[LoopbackServer]) -> None:
    """Found by the chaos run: a daemon (re)started while Placement answered 503 exited (code 4)
    instead of waiting, as it does for a Placement that does not answer at all."""
    upstream = urlsplit(cloud.stack["placement"])
    healthy = threading.Event()

    def flaky(conn: socket.socket, stopping: threading.Event) -> None:
        request = read_request(conn).replace(b"Connection: keep-alive", b"Connection: close")
        if not healthy.is_set():
            conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        with socket.create_connection((upstream.hostname, upstream.port)) as up:
            up.sendall(request)
            while chunk := up.recv(65536):
                conn.sendall(chunk)

    servers.append(LoopbackServer(flaky))
    host = cloud.compute("host1", start=False, placement={"endpoint": servers[0].url})
    host.start()
    time.sleep(3)  # a few refused registrations
    assert host.proc is not None and host.proc.poll() is None, host.logtext()
    healthy.set()
    host.wait_ready(30)
    assert cloud.placement.inventories(host.host)["VCPU"]["reserved"] == 0


def test_an_evacuation_whose_move_reply_is_lost_still_moves_the_request(cloud: Cloud,
                                                                       servers: list[LoopbackServer]) -> None:
    """Placement moved the allocation but the reply never came: the request must follow it (else
    the allocation sits on B while the request stays on A, and audit cannot tell)."""
    upstream = urlsplit(cloud.stack["placement"])
    dropped: list[bytes] = []

    def proxy(conn: socket.socket, stopping: threading.Event) -> None:
        request = read_request(conn).replace(b"Connection: keep-alive", b"Connection: close")
        with socket.create_connection((upstream.hostname, upstream.port)) as up:
            up.sendall(request)
            response = b""
            while chunk := up.recv(65536):
                response += chunk
        if request.startswith(b"PUT /allocations/") and not dropped:
            dropped.append(request)
            return  # made, never answered
        conn.sendall(response)

    a = cloud.compute("hostA", lease_ttl=2)
    uuid = cloud.boot(SMALL)["uuid"]
    b = cloud.compute("hostB")
    a.kill_all()
    wait_until(lambda: a.host not in cloud.store.alive_hosts(), 10, "A DOWN")
    servers.append(LoopbackServer(proxy))
    r = cloud.eschedule("evacuate", a.host, "--json", config=config_with_placement(cloud, servers[0].url, 5))
    assert r.rc == 0 and r.json()[0]["to"] == b.host, r
    assert dropped
    assert set(cloud.placement.get_allocations(uuid)) == {b.host}
    wait_until(lambda: cloud.show(uuid)["host"] == b.host and cloud.show(uuid)["state"] == "ACTIVE", 20, "on B")
