"""etcd access: the few reads, writes and transactions both sides need, on the layout in layout.py.

Every call that can fail because etcd is unreachable raises EtcdUnavailable, so
the CLI can say so in one line and the daemon can back off.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

from etcd_compute import layout
from etcd_compute.config import EtcdConfig
from etcd_compute.errors import EtcdUnavailable

# etcd3 0.12's generated protobuf code only imports with protobuf <= 3.20 or with the
# pure-Python implementation; setup.py pins the former, this covers a newer one.
with contextlib.suppress(importlib.metadata.PackageNotFoundError):
    if int(importlib.metadata.version("protobuf").split(".")[0]) >= 4:
        os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")

# gRPC would print its own TLS handshake errors on stderr before our one-line message.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import etcd3  # noqa: E402
import etcd3.exceptions  # noqa: E402
import etcd3.utils  # noqa: E402
from etcd3 import etcdrpc  # noqa: E402
from etcd3.client import EtcdTokenCallCredentials  # noqa: E402
import grpc  # noqa: E402

LOG = logging.getLogger(__name__)

Request = dict[str, Any]


@contextlib.contextmanager
def _unavailable(what: str) -> Iterator[None]:
    try:
        yield
    except (etcd3.exceptions.ConnectionFailedError, etcd3.exceptions.ConnectionTimeoutError) as exc:
        raise EtcdUnavailable(f"etcd unreachable ({what}): {exc or type(exc).__name__}") from None
    except grpc.RpcError as exc:
        detail = exc.details() if hasattr(exc, "details") else str(exc)
        raise EtcdUnavailable(f"etcd unreachable ({what}): {detail}") from None


def _guarded(fn: Callable) -> Callable:
    """EtcdUnavailable instead of gRPC errors; and one fresh login when etcd forgot our token
    (it forgets them all when it restarts)."""
    @functools.wraps(fn)
    def wrapper(self: "Store", *args: Any, **kwargs: Any) -> Any:
        try:
            with _unavailable(fn.__name__):
                return fn(self, *args, **kwargs)
        except EtcdUnavailable as exc:
            if "invalid auth token" not in str(exc) or not self.cfg.user:
                raise
            self.login()
            with _unavailable(fn.__name__):
                return fn(self, *args, **kwargs)
    return wrapper


class Store:
    """An etcd client bound to one prefix (see layout.py)."""

    def __init__(self, cfg: EtcdConfig) -> None:
        self.cfg = cfg
        self.prefix = cfg.prefix.rstrip("/")
        self.client = self._connect(cfg)
        self.tx = self.client.transactions

    @staticmethod
    def _connect(cfg: EtcdConfig) -> etcd3.Etcd3Client:
        """Connect to the first endpoint that answers; etcd3 0.12 speaks to one at a time."""
        errors = []
        for endpoint in cfg.endpoints:
            url = urlsplit(endpoint)
            try:
                with _unavailable("connect"):
                    client = etcd3.client(
                        host=url.hostname, port=url.port or 2379, timeout=cfg.timeout,
                        ca_cert=cfg.ca_cert, cert_cert=cfg.cert_cert, cert_key=cfg.cert_key,
                        user=cfg.user, password=cfg.password)
                    if not client.uses_secure_channel:
                        # gRPC refuses call credentials on plain channels; the token also
                        # travels as metadata, which is all etcd needs.
                        client.call_credentials = None
                    client.status()
                return client
            except (EtcdUnavailable, etcd3.exceptions.Etcd3Exception) as exc:
                errors.append(f"{endpoint}: {str(exc).removeprefix('etcd unreachable ')}")
        raise EtcdUnavailable("etcd unreachable: " + "; ".join(errors))

    def login(self) -> None:
        """Authenticate again (etcd drops every token when it restarts)."""
        with _unavailable("login"):
            resp = self.client.auth_stub.Authenticate(
                etcdrpc.AuthenticateRequest(name=self.cfg.user, password=self.cfg.password), self.cfg.timeout)
        self.client.metadata = (("token", resp.token),)
        if self.client.uses_secure_channel:
            self.client.call_credentials = grpc.metadata_call_credentials(
                EtcdTokenCallCredentials(resp.token))
        LOG.info("logged in to etcd again as %s", self.cfg.user)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()

    def _get(self, key: str) -> tuple[dict | None, int]:
        """(decoded value or None, mod_revision or 0)."""
        value, meta = self.client.get(key)
        return layout.decode(value), (meta.mod_revision if meta else 0)

    # -- eschedule's side -------------------------------------------------------------------

    @_guarded
    def create_instance(self, request: Request) -> bool:
        """Write request + index in one transaction; False if the uuid already exists."""
        uuid, host = request["uuid"], request["host"]
        index = layout.index_key(self.prefix, uuid)
        ok, _ = self.client.transaction(
            compare=[self.tx.create(index) == 0],
            success=[self.tx.put(index, layout.encode({"host": host})),
                     self.tx.put(layout.request_key(self.prefix, host, uuid), layout.encode(request))],
            failure=[])
        return ok

    @_guarded
    def get_instance(self, uuid: str) -> tuple[Request | None, dict | None]:
        """(request, actual status) of one instance; (None, None) if unknown."""
        index, _ = self._get(layout.index_key(self.prefix, uuid))
        status, _ = self._get(layout.instance_key(self.prefix, uuid))
        request = None
        if index:
            request, _ = self._get(layout.request_key(self.prefix, index["host"], uuid))
        return request, status

    @_guarded
    def update_request(self, uuid: str, change: Callable[[Request, dict | None], Request | None]) -> Request | None:
        """Compare-and-swap the request: change(request, status) returns the new request, or
        None for "nothing to do", or raises to refuse. None if the instance is unknown."""
        while True:
            index, _ = self._get(layout.index_key(self.prefix, uuid))
            if not index:
                return None
            key = layout.request_key(self.prefix, index["host"], uuid)
            request, rev = self._get(key)
            if request is None:
                return None
            status, _ = self._get(layout.instance_key(self.prefix, uuid))
            new = change(request, status)
            if new is None:
                return request
            new = dict(new, updated_at=layout.now())
            ok, _ = self.client.transaction(
                compare=[self.tx.mod(key) == rev],
                success=[self.tx.put(key, layout.encode(new))], failure=[])
            if ok:
                return new

    @_guarded
    def move_instance(self, request: Request, new_host: str) -> bool:
        """Hand an instance to another host in one transaction: its request moves, its index
        follows, and the old host's actual state is dropped (the new host reports afresh)."""
        uuid, old_host = request["uuid"], request["host"]
        old_key = layout.request_key(self.prefix, old_host, uuid)
        _, rev = self._get(old_key)
        moved = dict(request, host=new_host, updated_at=layout.now())
        ok, _ = self.client.transaction(
            compare=[self.tx.mod(old_key) == rev],
            success=[self.tx.delete(old_key),
                     self.tx.put(layout.request_key(self.prefix, new_host, uuid), layout.encode(moved)),
                     self.tx.put(layout.index_key(self.prefix, uuid), layout.encode({"host": new_host})),
                     self.tx.delete(layout.instance_key(self.prefix, uuid))],
            failure=[])
        return ok and rev != 0

    @_guarded
    def known_instances(self) -> set[str]:
        return {meta.key.decode().rsplit("/", 1)[1]
                for _, meta in self.client.get_prefix(self.prefix + "/index/", keys_only=True)}

    @_guarded
    def list_instances(self, alive: set[str] | None = None) -> list[dict]:
        """All instances, requested and actual joined (layout.view), with host_state if `alive`."""
        requests: dict[str, Request] = {}
        statuses: dict[str, dict] = {}
        for value, meta in self.client.get_prefix(self.prefix + "/requests/"):
            req = layout.decode(value)
            requests[req["uuid"]] = req
        for value, meta in self.client.get_prefix(self.prefix + "/instances/"):
            st = layout.decode(value)
            statuses[st["uuid"]] = st
        uuids = sorted(set(requests) | set(statuses),
                       key=lambda u: (requests.get(u) or statuses.get(u) or {}).get("created_at") or "")
        return [layout.view(requests.get(u), statuses.get(u), alive) for u in uuids]

    @_guarded
    def hosts(self) -> dict[str, dict]:
        out = {}
        for value, meta in self.client.get_prefix(self.prefix + "/hosts/"):
            rec = layout.decode(value)
            out[rec["uuid"]] = rec
        return out

    # -- ecompute's side --------------------------------------------------------------------

    @_guarded
    def host_requests(self, host: str) -> tuple[dict[str, Request], int]:
        """All requests for `host` and the store revision they were read at."""
        resp = self.client.get_prefix_response(layout.requests_prefix(self.prefix, host))
        reqs = {}
        for kv in resp.kvs:
            req = layout.decode(kv.value)
            reqs[req["uuid"]] = req
        return reqs, resp.header.revision

    @_guarded
    def get_request(self, host: str, uuid: str) -> Request | None:
        return self._get(layout.request_key(self.prefix, host, uuid))[0]

    @_guarded
    def get_status(self, uuid: str) -> dict | None:
        return self._get(layout.instance_key(self.prefix, uuid))[0]

    @_guarded
    def put_status(self, status: dict) -> None:
        self.client.put(layout.instance_key(self.prefix, status["uuid"]), layout.encode(status))

    @_guarded
    def finish_delete(self, host: str, uuid: str) -> None:
        """Remove every key of a deleted instance at once: nothing half-gone is ever visible."""
        self.client.transaction(
            compare=[],
            success=[self.tx.delete(layout.request_key(self.prefix, host, uuid)),
                     self.tx.delete(layout.instance_key(self.prefix, uuid)),
                     self.tx.delete(layout.index_key(self.prefix, uuid))],
            failure=[])

    @_guarded
    def find_by_address(self, ip: str, host: str | None = None) -> Request | None:
        """The request of the instance whose reported IP is `ip` (on `host`, if given)."""
        for value, _ in self.client.get_prefix(self.prefix + "/instances/"):
            status = layout.decode(value)
            if status.get("ip") == ip and (host is None or status.get("host") == host):
                return self.get_request(status["host"], status["uuid"])
        return None

    @_guarded
    def put_host(self, record: dict) -> None:
        self.client.put(layout.host_key(self.prefix, record["uuid"]), layout.encode(record))

    # -- host liveness ----------------------------------------------------------------------

    @_guarded
    def grant_alive(self, host: str, ttl: int, record: dict) -> int:
        """Put PREFIX/alive/<host> on a fresh lease of `ttl` seconds; the lease id."""
        lease = self.client.lease(ttl)
        self.client.put(layout.alive_key(self.prefix, host), layout.encode(record), lease=lease)
        return lease.id

    @_guarded
    def refresh_alive(self, lease_id: int) -> bool:
        """Keep the lease alive; False if it had already expired (the key is gone)."""
        return any(r.TTL > 0 for r in self.client.refresh_lease(lease_id))

    @_guarded
    def revoke_alive(self, lease_id: int) -> None:
        self.client.revoke_lease(lease_id)

    @_guarded
    def is_alive(self, host: str) -> bool:
        return self.client.get(layout.alive_key(self.prefix, host))[0] is not None

    @_guarded
    def alive_hosts(self) -> set[str]:
        return {meta.key.decode().rsplit("/", 1)[1]
                for _, meta in self.client.get_prefix(self.prefix + "/alive/", keys_only=True)}

    def watch(self, prefix: str, start_revision: int, on_event: Callable[[str, int], None],
              on_state: Callable[[str], None]) -> "PrefixWatch":
        return PrefixWatch(self, prefix, start_revision, on_event, on_state)


class PrefixWatch:
    """A watch on a prefix that outlives etcd outages without spinning.

    etcd3 0.12's own watcher thread retries in a tight loop while etcd is down and
    drops its watches on the first error, so it is not used. This one backs off
    (0.5 s doubling to 5 s) and resumes from the revision after the last event it
    delivered, so nothing is missed or delivered twice across an outage.
    on_event(key, revision) runs per change; on_state("down" | "up") on transitions.
    """

    def __init__(self, store: Store, prefix: str, start_revision: int,
                 on_event: Callable[[str, int], None], on_state: Callable[[str], None]) -> None:
        self.store, self.prefix = store, prefix
        self.revision = start_revision - 1  # last revision delivered
        self.on_event, self.on_state = on_event, on_state
        self.stopped = threading.Event()
        self._call: Any = None
        self._thread = threading.Thread(target=self._run, name=f"watch {prefix}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stopped.set()
        if self._call is not None:
            self._call.cancel()

    def _requests(self, start: int) -> Iterator[Any]:
        key = self.prefix.encode()
        yield etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
            key=key, range_end=etcd3.utils.increment_last_byte(key), start_revision=start))
        self.stopped.wait()  # keep the stream open until stop()

    def _run(self) -> None:
        stub = etcdrpc.WatchStub(self.store.client.channel)
        delay, down = 0.5, False
        while not self.stopped.is_set():
            try:
                self._call = stub.Watch(self._requests(self.revision + 1),
                                        credentials=self.store.client.call_credentials,
                                        metadata=self.store.client.metadata)
                for response in self._call:
                    if response.canceled:  # e.g. our auth token died with an etcd restart
                        LOG.warning("watch on %s canceled by etcd: %s", self.prefix, response.cancel_reason)
                        if self.store.cfg.user and "auth token" in response.cancel_reason:
                            with contextlib.suppress(EtcdUnavailable):
                                self.store.login()
                        self._call.cancel()
                        continue
                    if response.created and down:
                        down, delay = False, 0.5
                        self.on_state("up")
                    if response.compact_revision:  # history gone: the owner must list again
                        self.revision = response.compact_revision - 1
                        self.on_state("compacted")
                    for event in response.events:
                        self.revision = event.kv.mod_revision
                        self.on_event(event.kv.key.decode(), event.kv.mod_revision)
            except grpc.RpcError as exc:
                if self.stopped.is_set():
                    return
                if not down:
                    down = True
                    LOG.warning("watch on %s lost (%s); retrying with backoff", self.prefix,
                                exc.code() if hasattr(exc, "code") else exc)
                    self.on_state("down")
            self.stopped.wait(delay)
            delay = min(delay * 2, 5.0)
