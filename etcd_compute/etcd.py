"""The etcd connection: connect (first endpoint that answers), log in, one error type, the watch.

Every call that can fail because etcd is unreachable raises EtcdUnavailable, so the
CLI can say so in one line and the daemon can back off. store.py builds the
project's reads and transactions on this; nothing else speaks gRPC.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar
from urllib.parse import urlsplit

import google.protobuf

from etcd_compute.config import EtcdConfig
from etcd_compute.errors import EtcdUnavailable

# etcd3 0.12's generated protobuf code only imports with protobuf <= 3.20 or with the
# pure-Python implementation; setup.py pins the former, this covers a newer one. The package's
# own __init__ only names its version (the implementation is chosen later, by its first real
# import); importlib.metadata would cost every etcd client ~25 ms of start-up.
if int(google.protobuf.__version__.split(".")[0]) >= 4:
    os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")

# gRPC would print its own TLS handshake errors on stderr before our one-line message.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import etcd3  # noqa: E402
import etcd3.exceptions  # noqa: E402
import etcd3.utils  # noqa: E402
import grpc  # noqa: E402
from etcd3 import etcdrpc  # noqa: E402
from etcd3.client import EtcdTokenCallCredentials  # noqa: E402

LOG = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")


class EtcdFailing(EtcdUnavailable):
    """etcd answered, but with an error (e.g. out of space): another endpoint will not help."""


@contextlib.contextmanager
def unavailable(what: str) -> Iterator[None]:
    """Turn etcd3's and gRPC's errors into one EtcdUnavailable line."""
    try:
        yield
    except (etcd3.exceptions.ConnectionFailedError, etcd3.exceptions.ConnectionTimeoutError) as exc:
        raise EtcdUnavailable(f"etcd unreachable ({what}): {exc or type(exc).__name__}") from None
    except grpc.RpcError as exc:
        detail = exc.details() if hasattr(exc, "details") else str(exc)
        code = exc.code() if hasattr(exc, "code") else None
        if "space exceeded" in str(detail):
            raise EtcdFailing(f"etcd is out of space (NOSPACE alarm; compact, defragment and disarm it) "
                              f"({what}): {detail}") from None
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED or "too large" in str(detail):  # a record, not etcd, is at fault
            raise EtcdFailing(f"etcd refused a record too large ({what}): {detail}") from None
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            raise EtcdUnavailable(f"etcd unreachable ({what}): {detail}") from None
        raise EtcdFailing(f"etcd unreachable ({what}): {detail}") from None


class Etcd:
    """One client connection at a time, failing over between the configured endpoints.

    etcd3 0.12 speaks to one endpoint per client: when that member dies, failover()
    connects to the next one that answers, so calls, the watch and the lease go on
    while the cluster has a quorum.
    """

    def __init__(self, cfg: EtcdConfig) -> None:
        self.cfg = cfg
        self._lock = threading.Lock()
        self.failovers = 0
        self.endpoint, self.client = self._connect(cfg.endpoints)

    def _connect(self, endpoints: list[str]) -> tuple[str, etcd3.Etcd3Client]:
        """Connect to the first of `endpoints` that answers."""
        errors = []
        for endpoint in endpoints:
            url = urlsplit(endpoint)
            try:
                with unavailable("connect"):
                    client = etcd3.client(
                        host=url.hostname, port=url.port or 2379, timeout=self.cfg.timeout,
                        ca_cert=self.cfg.ca_cert, cert_cert=self.cfg.cert_cert, cert_key=self.cfg.cert_key,
                        user=self.cfg.user, password=self.cfg.password)
                    if not client.uses_secure_channel:
                        # gRPC refuses call credentials on plain channels; the token also
                        # travels as metadata, which is all etcd needs.
                        client.call_credentials = None
                    client.status()
                return endpoint, client
            except (EtcdUnavailable, etcd3.exceptions.Etcd3Exception) as exc:
                errors.append(f"{endpoint}: {str(exc).removeprefix('etcd unreachable ')}")
        raise EtcdUnavailable("etcd unreachable: " + "; ".join(errors))

    def failover(self, failed: etcd3.Etcd3Client | None = None) -> bool:
        """Connect to the next endpoint that answers, the current one last; False if there is
        only one endpoint (its channel reconnects by itself) or `failed` was already replaced."""
        endpoints = self.cfg.endpoints
        if len(endpoints) < 2:
            return False
        with self._lock:
            if failed is not None and failed is not self.client:
                return True  # another thread failed over meanwhile
            i = endpoints.index(self.endpoint) if self.endpoint in endpoints else -1
            old_endpoint, old = self.endpoint, self.client
            self.endpoint, self.client = self._connect(endpoints[i + 1:] + endpoints[:i + 1])
            self.failovers += 1
        LOG.warning("etcd: failed over from %s to %s", old_endpoint, self.endpoint)
        if old is not self.client:
            with contextlib.suppress(Exception):
                old.close()
        return True

    def login(self) -> None:
        """Authenticate again (etcd drops every token when it restarts)."""
        with unavailable("login"):
            resp = self.client.auth_stub.Authenticate(
                etcdrpc.AuthenticateRequest(name=self.cfg.user, password=self.cfg.password), self.cfg.timeout)
        self.client.metadata = (("token", resp.token),)
        if self.client.uses_secure_channel:
            self.client.call_credentials = grpc.metadata_call_credentials(
                EtcdTokenCallCredentials(resp.token))
        LOG.info("logged in to etcd again as %s", self.cfg.user)

    def keepalive(self, lease_id: int, timeout: float) -> bool:
        """One keep-alive of a lease, waiting at most `timeout` seconds for etcd's answer (etcd3's
        refresh_lease waits the client's whole timeout); False if the lease had expired."""
        client = self.client
        answers = client.leasestub.LeaseKeepAlive(iter([etcdrpc.LeaseKeepAliveRequest(ID=lease_id)]), timeout,
                                                  credentials=client.call_credentials, metadata=client.metadata)
        return any(r.TTL > 0 for r in answers)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()


class HasEtcd(Protocol):
    etcd: Etcd


S = TypeVar("S", bound=HasEtcd)


def guarded(fn: Callable[Concatenate[S, P], T]) -> Callable[Concatenate[S, P], T]:
    """EtcdUnavailable instead of gRPC errors; one fresh login when etcd forgot our token (it
    forgets them all when it restarts); one failover when the member we talk to is gone."""
    def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        client = self.etcd.client
        try:
            with unavailable(fn.__name__):
                return fn(self, *args, **kwargs)
        except EtcdFailing:
            raise
        except EtcdUnavailable as exc:
            if "invalid auth token" in str(exc) and self.etcd.cfg.user:
                self.etcd.login()
            elif not self.etcd.failover(client):
                raise
            with unavailable(fn.__name__):
                return fn(self, *args, **kwargs)
    functools.update_wrapper(wrapper, fn)
    return wrapper


class PrefixWatch:
    """A watch on a prefix that outlives etcd outages, failovers and compactions without spinning.

    etcd3 0.12's own watcher thread retries in a tight loop while etcd is down and
    drops its watches on the first error, so it is not used. This one backs off
    (0.5 s doubling to 5 s), fails over to another endpoint, and resumes from the
    revision after the last event it delivered, so nothing is missed or delivered
    twice. When that history was compacted away it resumes from the compaction
    revision and says "compacted": the owner must list again.
    on_event(key, revision) runs per change; on_state("down" | "up" | "compacted").
    """

    def __init__(self, etcd: Etcd, prefix: str, start_revision: int,
                 on_event: Callable[[str, int], None], on_state: Callable[[str], None]) -> None:
        self.etcd, self.prefix = etcd, prefix
        self.revision = start_revision - 1  # last revision delivered
        self.on_event, self.on_state = on_event, on_state
        self.stopped = threading.Event()
        self.streams = 0  # watch streams opened (one per outage, failover or compaction)
        self._down = False
        self._cancels = 0  # cancels by etcd in a row, without a stream that worked between
        self._call: Any = None
        self._call_over = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch {prefix}", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        """Is its thread still running (or was it stopped on purpose)?"""
        return self._thread.is_alive() or self.stopped.is_set()

    def stop(self) -> None:
        self.stopped.set()
        self._call_over.set()
        if self._call is not None:
            self._call.cancel()

    def _requests(self, start: int, over: threading.Event) -> Iterator[Any]:
        """The request stream of one call: create, then stay open until that call is over.

        gRPC consumes it on a thread of its own, which lives as long as this generator:
        each call must end its own generator, or every reconnect leaks a thread.
        """
        key = self.prefix.encode()
        yield etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
            key=key, range_end=etcd3.utils.increment_last_byte(key), start_revision=start))
        over.wait()

    def _stream(self) -> bool:
        """Run one watch call until it ends; True if etcd canceled it (compaction, auth)."""
        client = self.etcd.client
        over = threading.Event()
        self._call_over = over
        if self.stopped.is_set():
            return False
        self.streams += 1
        self._call = etcdrpc.WatchStub(client.channel).Watch(
            self._requests(self.revision + 1, over), credentials=client.call_credentials, metadata=client.metadata)
        try:
            for response in self._call:
                if response.compact_revision:  # checked first: etcd sets `canceled` too
                    LOG.warning("watch on %s: history before revision %d was compacted; listing again",
                                self.prefix, response.compact_revision)
                    self.revision = response.compact_revision - 1
                    self._say("compacted")
                    return True
                if response.canceled:  # e.g. our auth token died with an etcd restart
                    LOG.warning("watch on %s canceled by etcd: %s", self.prefix, response.cancel_reason)
                    if self.etcd.cfg.user and "auth token" in response.cancel_reason:
                        with contextlib.suppress(EtcdUnavailable):
                            self.etcd.login()
                    return True
                if response.created:
                    self._cancels = 0
                    if self._down:
                        self._down = False
                        self._say("up")
                for event in response.events:
                    self.revision = event.kv.mod_revision
                    self.on_event(event.kv.key.decode(), event.kv.mod_revision)
            return False
        finally:
            over.set()
            self._call.cancel()

    def _say(self, state: str) -> None:
        try:
            self.on_state(state)
        except Exception:  # noqa: BLE001 - the owner's bug must not end the watch either
            LOG.exception("watch on %s: telling its owner %r failed", self.prefix, state)

    def _run(self) -> None:
        delay = 0.5
        while not self.stopped.is_set():
            try:
                if self._stream():  # canceled by etcd: re-create at once, unless it keeps doing so
                    self._cancels += 1
                    self.stopped.wait(min(0.1 * 2 ** self._cancels, 5.0) if self._cancels > 1 else 0)
                    continue
            except grpc.RpcError as exc:
                if self.stopped.is_set():
                    return
                if not self._down:
                    self._down, delay = True, 0.5
                    LOG.warning("watch on %s lost (%s); retrying with backoff", self.prefix,
                                exc.code() if hasattr(exc, "code") else exc)
                    self._say("down")
                with contextlib.suppress(Exception):
                    self.etcd.failover()
            except Exception:  # noqa: BLE001 - a bug (ours or the owner's) must not end the watch
                # The event being delivered is not delivered again (it could fail for ever):
                # "down", then "up" once the stream is back, tells the owner to list again.
                LOG.exception("watch on %s failed; starting it again from revision %d", self.prefix,
                              self.revision + 1)
                self._down = True
                self._say("down")
            self.stopped.wait(delay)
            delay = min(delay * 2, 5.0)
