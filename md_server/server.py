"""A metadata server: each guest gets its own cloud-init data, found in etcd by its address.

EC2 paths (/2009-04-04/ and /latest/: meta-data/..., user-data) and OpenStack paths
(/openstack/<version>/meta_data.json, network_data.json, vendor_data.json,
vendor_data2.json, user_data) are rendered from the instance's request by
etcd_compute.guestdata, the same source as the config drive; `/` and `/openstack` list
the versions. A request from an address that is no running instance's gets 404, so no
guest can read another's keys or user-data (store.find_by_address says who counts).

IMDSv2, as current cloud-init asks first: `PUT /latest/api/token` with
X-aws-ec2-metadata-token-ttl-seconds (1 to 21600) gives a token bound to the asking
instance and its address, until its TTL runs out (an HMAC under a secret of this
process: nothing is kept per token, and a restart ends every token: guests ask again).
A request that carries X-aws-ec2-metadata-token is answered only if the token is the
asking guest's and still valid (401 otherwise); one without is answered as before
(IMDSv1). A PUT through a proxy (X-Forwarded-For) is refused, as EC2 does.

Readiness: vendor-data (guestdata.vendor_data) has each boot of the guest POST to
READY_PATH/<its uuid> once cloud-init is done; the server hands that to `on_ready` (the
daemon's loop records it as the status's ready_at), at most once every READY_EVERY seconds
per instance, and only for the instance at the asking address.

Guests are not trusted to be polite: each connection has `timeout` seconds in all to
send its request and take the answer, and at most `max_connections` are served at once
(one thread each); a connection beyond that is closed unanswered at once, so idle or
trickling clients cost neither threads nor more than their slot.

Every request is counted by how it ended (RESULTS) in the server's own Prometheus registry,
served on `metadata.metrics` (HOST:PORT) when set: an address of the host's, never the
guest-facing listener, as the counters speak of every guest of the host.

ecompute starts it on a thread when `metadata.enabled` is set; standalone:
    python -m md_server --config compute.yaml
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import CollectorRegistry, Counter

from etcd_compute import guestdata
from etcd_compute.contract import Request
from etcd_compute.errors import ConfigError, ECError
from etcd_compute.store import Store

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication

    from etcd_compute.config import ComputeConfig

LOG = logging.getLogger("md_server")

TIMEOUT = 5.0  # seconds a client has for its whole request and answer
MAX_CONNECTIONS = 32  # connections served at once, one thread each
# How a request ended: answered with data, from an address that is no running instance's, for a
# path there is nothing at, etcd away (503), closed unanswered with every slot busy, with a token
# that is not the guest's or no longer valid (401), malformed (400; a token asked through a proxy:
# 403), or anything else left unanswered (timed out, dropped, failed).
RESULTS = ("served", "no_instance", "not_found", "unavailable", "refused", "unauthorized", "bad_request", "error")
TOKEN_PATH = "/latest/api/token"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
MAX_TOKEN_TTL = 21600  # seconds, as EC2's
MAX_BODY = 64 * 1024  # bytes of a PUT or POST body read (and dropped)
READY_EVERY = 2.0  # seconds: a guest's ready POSTs beyond one in this long are answered, not passed on


# What current cloud-init asks for: its Ec2 datasource probes dated versions (2009-04-04 the
# oldest it takes), its OpenStack datasource picks the newest version /openstack lists that it
# knows (Nova's list). Every version listed serves the same tree.
EC2_VERSIONS = ("2009-04-04", "latest")
OPENSTACK_VERSIONS = ("2012-08-10", "2013-04-04", "2013-10-17", "2015-10-15", "2016-06-30", "2016-10-06",
                      "2017-02-22", "2018-08-27", "latest")
TEXT, JSON = "text/plain", "application/json"


def _listing(*names: str) -> tuple[str, str]:
    return "".join(f"{n}\n" for n in names), TEXT


def render(path: str, request: Request, url: str | None = None) -> tuple[str, str] | None:
    """(body, content type) for GET `path` of `request`'s instance, or None for 404; `url`: this
    server's as guests reach it (vendor-data tells the guest to report ready there)."""
    path = path.split("?", 1)[0]
    if path in ("", "/"):
        return _listing(*EC2_VERSIONS)
    head, _, rest = path.lstrip("/").partition("/")
    if head in EC2_VERSIONS:
        return _ec2(rest, request)
    if head == "openstack":
        version, _, rest = rest.partition("/")
        if not version:
            return _listing(*OPENSTACK_VERSIONS)
        if version in OPENSTACK_VERSIONS:
            return _openstack(rest, request, url)
    return None


def _ec2(path: str, request: Request) -> tuple[str, str] | None:
    """The EC2 tree under one version: meta-data/..., user-data."""
    meta = guestdata.meta_data(request)
    keys = meta.get("public-keys", [])
    user_data = guestdata.user_data(request)
    files = {
        "meta-data/instance-id": meta["instance-id"],
        "meta-data/local-hostname": meta["local-hostname"],
        "meta-data/hostname": meta["local-hostname"],
        "meta-data/public-keys/": "".join(f"{i}=key-{i}\n" for i in range(len(keys))),
    }
    for i, key in enumerate(keys):
        files[f"meta-data/public-keys/{i}/"] = "openssh-key\n"
        files[f"meta-data/public-keys/{i}/openssh-key"] = key
    if path in files:
        return files[path], TEXT
    if path in ("meta-data", "meta-data/"):
        return _listing("instance-id", "local-hostname", "hostname", *(["public-keys/"] if keys else []))
    if path == "":
        return _listing("meta-data", *(["user-data"] if user_data else []))
    if path == "user-data" and user_data is not None:
        return user_data, "application/octet-stream"
    return None


def _openstack(path: str, request: Request, url: str | None) -> tuple[str, str] | None:
    """The OpenStack tree under one version: meta_data.json, network_data.json, vendor data, user_data."""
    user_data = guestdata.user_data(request)
    vendor = {"cloud-init": guestdata.vendor_data(request, url)} if url else {}
    files = {"meta_data.json": guestdata.openstack_meta_data(request), "network_data.json":
             guestdata.network_data(request), "vendor_data.json": vendor, "vendor_data2.json": {}}
    if path in files:
        return json.dumps(files[path]), JSON
    if path == "":
        return _listing(*files, *(["user_data"] if user_data else []))
    if path == "user_data" and user_data is not None:
        return user_data, "application/octet-stream"
    return None


class Tokens:
    """IMDSv2 session tokens: each names the instance and address it was given to and when it
    ends, signed with a secret of this process, so checking one needs no state."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)

    def _sign(self, payload: bytes) -> str:
        return base64.urlsafe_b64encode(hmac.new(self._key, payload, hashlib.sha256).digest()).decode().rstrip("=")

    def issue(self, uuid: str, address: str, ttl: int, now: float | None = None) -> str:
        payload = f"{uuid}|{address}|{int((now or time.time()) + ttl)}".encode()
        return f"{base64.urlsafe_b64encode(payload).decode().rstrip('=')}.{self._sign(payload)}"

    def valid(self, token: str, uuid: str, address: str, now: float | None = None) -> bool:
        """Is `token` one of ours, given to instance `uuid` at `address`, and not yet expired?"""
        head, _, signature = token.strip().partition(".")
        try:
            payload = base64.urlsafe_b64decode(head + "=" * (-len(head) % 4))
            owner, at, ends = payload.decode().split("|")
            expires = int(ends)
        except (ValueError, UnicodeDecodeError):
            return False
        return (hmac.compare_digest(signature, self._sign(payload)) and (owner, at) == (uuid, address)
                and expires > (now or time.time()))


class _DeadlineIO(socket.SocketIO):
    """A socket reader whose timeout is a deadline for all reads together: a per-read timeout
    alone lets a client trickling a byte at a time hold its slot forever."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        super().__init__(sock, "rb")
        self._socket = sock
        self._deadline = time.monotonic() + seconds

    def readinto(self, b: Any) -> int | None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request deadline passed")
        self._socket.settimeout(left)
        return super().readinto(b)


class Handler(BaseHTTPRequestHandler):
    server: MetadataServer
    protocol_version = "HTTP/1.0"
    result: str  # how this connection's request ended (RESULTS)

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.timeout_s)  # writes: sendall's timeout is for all of it
        self.rfile.close()  # drops its reference to the socket, or closing it would not close it
        self.rfile = io.BufferedReader(_DeadlineIO(self.connection, self.server.timeout_s))

    def handle(self) -> None:
        """One request per connection (HTTP/1.0), counted once by how it ended."""
        self.result = "error"  # until an answer says otherwise
        try:
            super().handle()
        finally:
            self.server.requests.labels(self.result).inc()

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        request = self._instance()
        if request is None:
            return
        token = self.headers.get(TOKEN_HEADER)
        if token is not None and not self.server.tokens.valid(token, request["uuid"], self.client_address[0]):
            return self._send("unauthorized", 401, "the token is not this guest's, or it expired\n")
        found = render(self.path, request, self.server.url)
        if found is None:
            return self._send("not_found", 404, "not found\n")
        self._send("served", 200, *found)

    def do_PUT(self) -> None:  # noqa: N802
        """IMDSv2: a session token for the asking guest, valid for the seconds it asks (1 to 21600)."""
        if not self._drop_body():
            return
        if self.path.split("?", 1)[0] != TOKEN_PATH:
            return self._send("not_found", 404, "not found\n")
        if self.headers.get("X-Forwarded-For") is not None:
            return self._send("bad_request", 403, "no tokens through a proxy\n")
        ttl = (self.headers.get(TTL_HEADER) or "").strip()
        if not ttl.isdigit() or not 1 <= int(ttl) <= MAX_TOKEN_TTL:
            return self._send("bad_request", 400, f"{TTL_HEADER} must be 1 to {MAX_TOKEN_TTL} (seconds)\n")
        request = self._instance()
        if request is None:
            return
        token = self.server.tokens.issue(request["uuid"], self.client_address[0], int(ttl))
        self._send("served", 200, token, headers={TTL_HEADER: ttl})

    def do_POST(self) -> None:  # noqa: N802
        """A guest says a boot of it has finished (guestdata.vendor_data): handed to on_ready."""
        if not self._drop_body():
            return
        path = self.path.split("?", 1)[0]
        if not path.startswith(guestdata.READY_PATH):
            return self._send("not_found", 404, "not found\n")
        request = self._instance()
        if request is None:
            return
        if path[len(guestdata.READY_PATH):] != request["uuid"]:
            return self._send("not_found", 404, "not this guest's instance\n")
        self.server.ready(request["uuid"])
        self._send("served", 200, "noted\n")

    def _instance(self) -> Request | None:
        """The request of the running instance at the client's address; None once 404 or 503 is sent."""
        address = self.client_address[0]
        try:
            request = self.server.store.find_by_address(address, self.server.host)
        except ECError as exc:
            LOG.warning("cannot look up %s: %s", address, exc)
            self._send("unavailable", 503, "etcd unavailable\n")
            return None
        if request is None:
            self._send("no_instance", 404, "no instance at this address\n")
        return request

    def _drop_body(self) -> bool:
        """Read (and drop) a request's body of at most MAX_BODY bytes; False once 400 is sent."""
        length = (self.headers.get("Content-Length") or "0").strip()
        if not length.isdigit() or int(length) > MAX_BODY:
            self._send("bad_request", 400, f"a body of at most {MAX_BODY} bytes, with its Content-Length\n")
            return False
        self.rfile.read(int(length))
        return True

    def _send(self, result: str, status: int, body: str, content_type: str = TEXT,
              headers: dict[str, str] | None = None) -> None:
        self.result = result
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt: str, *args: Any) -> None:
        LOG.info("%s %s", self.client_address[0], fmt % args)


class MetadataServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # guests booting together connect together (socketserver's default: 5)

    def __init__(self, address: tuple[str, int], store: Store, host: str | None = None, *,
                 timeout: float = TIMEOUT, max_connections: int = MAX_CONNECTIONS, url: str | None = None,
                 on_ready: Callable[[str, float], None] | None = None) -> None:
        self.store = store
        self.host = host  # answer only for instances of this host (None: any)
        self.url = url  # as guests reach this server: vendor-data has them report ready there (None: no vendor-data)
        self.on_ready = on_ready  # (uuid, when): a guest said a boot has finished
        self._readied: dict[str, float] = {}  # uuid -> when its last ready was passed on
        self.timeout_s = timeout
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._slots_lock = threading.Lock()
        self._refused_logged = 0.0
        self.tokens = Tokens()
        self.registry = CollectorRegistry()  # its own: served apart from any other (metadata.metrics)
        # Counters as `_total` alone, without a `_created` series beside each (untyped in prometheus_client).
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        self.requests = Counter("etcd_compute_metadata_requests", "Metadata requests by how they ended.",
                                ["result"], registry=self.registry)
        for result in RESULTS:
            self.requests.labels(result)  # each is there from the start, at 0
        super().__init__(address, Handler)

    def ready(self, uuid: str) -> None:
        """Pass a guest's ready on, unless it said so within READY_EVERY seconds: a guest that
        keeps POSTing costs the daemon nothing."""
        now = time.monotonic()
        with self._slots_lock:
            if now - self._readied.get(uuid, -READY_EVERY) < READY_EVERY:
                return
            self._readied = {u: t for u, t in self._readied.items() if now - t < READY_EVERY}
            self._readied[uuid] = now
        LOG.info("instance %s says it has booted", uuid)
        if self.on_ready is not None:
            self.on_ready(uuid, time.time())

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve on a thread of its own if a slot is free, else close at once (no thread, no
        answer: writing one could block the accepting thread)."""
        if not self._slots.acquire(blocking=False):
            self.requests.labels("refused").inc()
            if time.monotonic() - self._refused_logged > 60:
                self._refused_logged = time.monotonic()
                LOG.warning("all %d connections busy: refusing %s (logged once a minute)",
                            self.max_connections, client_address[0])
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: its slot is free again
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def guest_facing(cfg: ComputeConfig) -> set[str]:
    """The host's addresses its guests reach: the metadata address and the managed network's bridge."""
    found = {cfg.metadata.address}
    if cfg.bridge is None and cfg.network.mode != "none":
        found.add(str(ipaddress.ip_interface(cfg.network.address).ip))
    return found


def metrics_address(address: str, key: str, guest_facing: Collection[str] = ()) -> tuple[str, int]:
    """(host, port) of HOST:PORT `address`, the value of config key `key`; a ConfigError if it is
    malformed or in `guest_facing`: the metrics name every instance and project of the host."""
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"key '{key}' must be HOST:PORT, like 127.0.0.1:9180; got {address!r}")
    if host in guest_facing:
        raise ConfigError(f"key '{key}': guests reach {host}; serve metrics on another address")
    return host, int(port)


def serve_metrics(address: str, registry: CollectorRegistry, key: str, guest_facing: Collection[str] = (),
                  log: logging.Logger = LOG, routes: Mapping[str, WSGIApplication] | None = None
                  ) -> WSGIServer | None:
    """Serve `registry` as Prometheus text on HOST:PORT `address` (config key `key`), on threads
    of its own; the server, or None if it cannot listen there (logged to `log`: a daemon goes on
    serving without its metrics). See metrics_address for the addresses refused. ecompute serves
    its own metrics with this too (md_server may not import ecompute), and `routes` beside them:
    a path beginning with one of its prefixes goes to that application."""
    host, port = metrics_address(address, key, guest_facing)
    if host in ("0.0.0.0", "::") and guest_facing:
        log.warning("%s %s: on every address of this host, those its guests reach too", key, address)
    try:
        server, _ = prometheus_client.start_http_server(port, host, registry)
    except OSError as exc:
        log.error("%s: cannot serve metrics on %s: %s; going on without them", key, address, exc)
        return None
    if routes:
        metrics_app = server.get_app()

        def routed(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            app = next((a for prefix, a in routes.items() if path.startswith(prefix)), metrics_app)
            assert app is not None
            return app(environ, start_response)
        server.set_app(routed)
    log.info("serving %s on http://%s/metrics", key, address)
    return server


def main(argv: list[str] | None = None) -> None:
    from etcd_compute import config
    ap = argparse.ArgumentParser(prog="python -m md_server", description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="compute.yaml (its etcd and metadata sections are used)")
    ap.add_argument("--all-hosts", action="store_true", help="answer for instances of every host")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config.load_compute(args.config)
        server = MetadataServer((cfg.metadata.address, cfg.metadata.port), Store(cfg.etcd),
                                None if args.all_hosts else cfg.host_uuid())
        if cfg.metadata.metrics:
            serve_metrics(cfg.metadata.metrics, server.registry, "metadata.metrics", guest_facing(cfg))
    except (ECError, OSError) as exc:
        sys.exit(f"md_server: error: {exc}")
    LOG.info("serving on http://%s:%d", cfg.metadata.address, cfg.metadata.port)
    server.serve_forever()
