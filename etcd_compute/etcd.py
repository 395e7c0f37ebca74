"""The etcd connection: connect (first endpoint that answers), log in, one error type, the watch.

Every call that can fail because etcd is unreachable raises EtcdUnavailable, so the
CLI can say so in one line and the daemon can back off. store.py builds the
project's reads and transactions on this; nothing else speaks gRPC.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar
from urllib.parse import urlsplit

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
import grpc  # noqa: E402
from etcd3 import etcdrpc  # noqa: E402
from etcd3.client import EtcdTokenCallCredentials  # noqa: E402

LOG = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")


@contextlib.contextmanager
def unavailable(what: str) -> Iterator[None]:
    """Turn etcd3's and gRPC's connection errors into one EtcdUnavailable line."""
    try:
        yield
    except (etcd3.exceptions.ConnectionFailedError, etcd3.exceptions.ConnectionTimeoutError) as exc:
        raise EtcdUnavailable(f"etcd unreachable ({what}): {exc or type(exc).__name__}") from None
    except grpc.RpcError as exc:
        detail = exc.details() if hasattr(exc, "details") else str(exc)
        raise EtcdUnavailable(f"etcd unreachable ({what}): {detail}") from None


class Etcd:
    """One client connection (etcd3 0.12 speaks to one endpoint at a time)."""

    def __init__(self, cfg: EtcdConfig) -> None:
        self.cfg = cfg
        self.client = self._connect(cfg)

    @staticmethod
    def _connect(cfg: EtcdConfig) -> etcd3.Etcd3Client:
        """Connect to the first endpoint that answers."""
        errors = []
        for endpoint in cfg.endpoints:
            url = urlsplit(endpoint)
            try:
                with unavailable("connect"):
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
        with unavailable("login"):
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


class HasEtcd(Protocol):
    etcd: Etcd


S = TypeVar("S", bound=HasEtcd)


def guarded(fn: Callable[Concatenate[S, P], T]) -> Callable[Concatenate[S, P], T]:
    """EtcdUnavailable instead of gRPC errors; and one fresh login when etcd forgot our token
    (it forgets them all when it restarts)."""
    def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            with unavailable(fn.__name__):
                return fn(self, *args, **kwargs)
        except EtcdUnavailable as exc:
            if "invalid auth token" not in str(exc) or not self.etcd.cfg.user:
                raise
            self.etcd.login()
            with unavailable(fn.__name__):
                return fn(self, *args, **kwargs)
    functools.update_wrapper(wrapper, fn)
    return wrapper


class PrefixWatch:
    """A watch on a prefix that outlives etcd outages without spinning.

    etcd3 0.12's own watcher thread retries in a tight loop while etcd is down and
    drops its watches on the first error, so it is not used. This one backs off
    (0.5 s doubling to 5 s) and resumes from the revision after the last event it
    delivered, so nothing is missed or delivered twice across an outage.
    on_event(key, revision) runs per change; on_state("down" | "up") on transitions.
    """

    def __init__(self, etcd: Etcd, prefix: str, start_revision: int,
                 on_event: Callable[[str, int], None], on_state: Callable[[str], None]) -> None:
        self.etcd, self.prefix = etcd, prefix
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
        stub = etcdrpc.WatchStub(self.etcd.client.channel)
        delay, down = 0.5, False
        while not self.stopped.is_set():
            try:
                self._call = stub.Watch(self._requests(self.revision + 1),
                                        credentials=self.etcd.client.call_credentials,
                                        metadata=self.etcd.client.metadata)
                for response in self._call:
                    if response.canceled:  # e.g. our auth token died with an etcd restart
                        LOG.warning("watch on %s canceled by etcd: %s", self.prefix, response.cancel_reason)
                        if self.etcd.cfg.user and "auth token" in response.cancel_reason:
                            with contextlib.suppress(EtcdUnavailable):
                                self.etcd.login()
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
