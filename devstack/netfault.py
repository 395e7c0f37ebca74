"""A TCP proxy between one host and one upstream (an etcd member, Placement) that can cut the link.

Issue 18's fence must hold when a host is cut off, and a cut is not a dead server: nothing
answers, nothing is refused, calls just wait. Each host of a test or chaos run gets its own
proxy per upstream (HostLinks), so one host can be partitioned while the others go on.

Modes, switched at any time from any thread (set_mode returns once the mode is in effect):

| mode | established connections | new connections |
| --- | --- | --- |
| pass | forwarded both ways | connected upstream |
| blackhole | nothing moves either way, no error | accepted, never connected upstream |
| reject | reset (RST) at once, both ends | refused (RST to the SYN) |
| drop_upstream | the host's bytes stop; the server's still flow | as blackhole |
| drop_downstream | the server's bytes stop; the host's still flow | as blackhole |

A stopped direction holds its bytes (the proxy stops reading; the kernels' buffers fill, then
the sender's writes block) and delivers them when it flows again, as TCP retransmits what a
partition held back once it heals: streams come out intact (HTTP/2 stays in sync), only late.
A one-way cut is therefore what a real asymmetric partition does to an application: with
drop_downstream the server carries out the host's requests and the host never hears back.
New connections need both directions for their handshake, so they wait out every cut.

Standard library only (sockets and one selector thread per proxy).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import selectors
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from devstack.harness import free_port

log = logging.getLogger(__name__)

# Which directions flow in each mode: (host -> server, server -> host).
FLOWS = {"pass": (True, True), "blackhole": (False, False), "reject": (False, False),
         "drop_upstream": (False, True), "drop_downstream": (True, False)}
MODES = tuple(FLOWS)
CHUNK = 65536
LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST instead of FIN


def _reset(sock: socket.socket | None) -> None:
    """Close with RST, as a firewall's REJECT (or a crashed peer's kernel) would."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    sock.close()


@dataclass
class _Pipe:
    """One direction of a connection: what was read from `src` and not yet written to `dst`."""
    up: bool  # host -> server
    buf: bytearray = field(default_factory=bytearray)
    eof: bool = False  # src has finished sending
    shut: bool = False  # ... and dst was told (shutdown SHUT_WR)


@dataclass
class _Conn:
    key: int  # unique for the proxy's life (an id() could name a later connection)
    client: socket.socket
    upstream: socket.socket | None = None
    connected: bool = False  # the upstream connect completed
    pipes: tuple[_Pipe, _Pipe] = field(default_factory=lambda: (_Pipe(True), _Pipe(False)))

    def ends(self, pipe: _Pipe) -> tuple[socket.socket | None, socket.socket | None]:
        return (self.client, self.upstream) if pipe.up else (self.upstream, self.client)


class FaultProxy:
    """Listens on 127.0.0.1:`port` (a free one by default) and forwards to the upstream.

    `url` is the upstream's URL with the proxy's address (same scheme: TLS passes through).
    `stats()` counts connections and bytes for diagnostics."""

    def __init__(self, upstream_host: str, upstream_port: int, *, scheme: str = "http", port: int = 0,
                 name: str = "") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = port or free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.name = name or f"{upstream_host}:{upstream_port}"
        self._mode = "pass"
        self._counts = {"connections": 0, "open": 0, "bytes_up": 0, "bytes_down": 0, "resets": 0,
                        "upstream_failures": 0}
        self._lock = threading.Lock()
        self._pending: list[tuple[str, threading.Event]] = []
        self._conns: dict[int, _Conn] = {}  # by key
        self._keys = itertools.count()
        self._sel = selectors.DefaultSelector()
        # Bound to an explicit port: after shutdown() stops it listening (reject), listen() again
        # keeps the same port (an auto-assigned one would be given up).
        self._listener = socket.create_server(("127.0.0.1", self.port), backlog=128)
        self._listener.setblocking(False)
        self._listening = True
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._listener, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"faultproxy {self.name}", daemon=True)
        self._thread.start()

    @classmethod
    def to(cls, url: str, **kwargs: Any) -> FaultProxy:
        """A proxy to the server of `url` (http://host:port)."""
        parts = urlsplit(url)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"{url!r}: a URL with a host and a port")
        return cls(parts.hostname, parts.port, scheme=parts.scheme or "http", **kwargs)

    # -- the caller's side --------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self._mode

    def set_mode(self, mode: str, timeout: float = 30.0) -> None:
        """Switch to `mode` (one of MODES); returns once the proxy's thread has applied it."""
        if mode not in FLOWS:
            raise ValueError(f"unknown mode {mode!r}: one of {', '.join(MODES)}")
        done = threading.Event()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"proxy {self.name} is closed")
            self._pending.append((mode, done))
        self._wake_w.send(b"m")
        if not done.wait(timeout):
            raise RuntimeError(f"proxy {self.name}: mode {mode} not applied within {timeout} s")

    def heal(self) -> None:
        self.set_mode("pass")

    def blackhole(self) -> None:
        self.set_mode("blackhole")

    def reject(self) -> None:
        self.set_mode("reject")

    def drop_upstream(self) -> None:
        self.set_mode("drop_upstream")

    def drop_downstream(self) -> None:
        self.set_mode("drop_downstream")

    def stats(self) -> dict[str, int | str]:
        """Connections accepted and open, bytes forwarded each way (up: host -> server),
        connections reset, upstream connects that failed; and the mode."""
        with self._lock:
            return {"mode": self._mode, **self._counts}

    def close(self) -> None:
        """Stop the proxy and close every connection (FIN, not RST)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake_w.send(b"x")
        self._thread.join(30)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the proxy's thread -------------------------------------------------------------------

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _loop(self) -> None:
        try:
            while not self._closed:
                for key, events in self._sel.select(timeout=1.0):
                    if key.data == "wake":
                        with contextlib.suppress(BlockingIOError):
                            self._wake_r.recv(4096)
                        self._apply_modes()
                    elif key.data == "listen":
                        self._accept()
                    elif (conn := self._conns.get(key.data[0])) is not None:
                        self._on_event(conn, key.data[1], events)
        except Exception:  # a bug here would hang every client silently: say so
            log.exception("proxy %s: its thread died", self.name)
            raise
        finally:
            for conn in list(self._conns.values()):
                self._close(conn, rst=False)
            self._sel.close()
            self._listener.close()
            self._wake_r.close()
            self._wake_w.close()

    def _apply_modes(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for mode, done in pending:
            with self._lock:
                self._mode = mode
            if mode == "reject":
                for conn in list(self._conns.values()):
                    self._close(conn, rst=True)
                if self._listening:  # stops listening, keeps the port: new SYNs get RST
                    self._sel.unregister(self._listener)
                    self._listener.shutdown(socket.SHUT_RD)
                    self._listening = False
            elif not self._listening:
                self._listener.listen(128)
                self._sel.register(self._listener, selectors.EVENT_READ, "listen")
                self._listening = True
            for conn in list(self._conns.values()):
                self._progress(conn)
            log.info("proxy %s: %s", self.name, mode)
            done.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # not listening any more (reject), or out of descriptors
                log.warning("proxy %s: accept: %s", self.name, e)
                return
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(next(self._keys), client)
            self._conns[conn.key] = conn
            self._count("connections")
            self._count("open")
            self._progress(conn)

    def _connect(self, conn: _Conn) -> None:
        up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        up.setblocking(False)
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.upstream = up
        if up.connect_ex(self.upstream) not in (0, errno.EINPROGRESS):
            self._count("upstream_failures")
            self._close(conn, rst=True)

    def _on_event(self, conn: _Conn, which: str, events: int) -> None:
        sock = conn.client if which == "client" else conn.upstream
        if sock is None:
            return
        if which == "upstream" and not conn.connected:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                self._count("upstream_failures")
                self._close(conn, rst=True)  # the host sees what a refused connect looks like
                return
            conn.connected = True
        for pipe, flows in zip(conn.pipes, FLOWS[self._mode], strict=True):
            src, dst = conn.ends(pipe)
            if not flows:  # (an event selected before the mode changed)
                continue
            try:
                if events & selectors.EVENT_READ and src is sock and not pipe.buf and not pipe.eof:
                    data = sock.recv(CHUNK)
                    if data:
                        pipe.buf += data
                    else:
                        pipe.eof = True
                if events & selectors.EVENT_WRITE and dst is sock and pipe.buf:
                    sent = sock.send(pipe.buf)
                    del pipe.buf[:sent]
                    self._count("bytes_up" if pipe.up else "bytes_down", sent)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:  # reset or broken on one side: reset the other, as a router would pass it on
                self._close(conn, rst=True)
                return
        self._progress(conn)

    def _progress(self, conn: _Conn) -> None:
        """Move a connection along in the current mode: connect it upstream, pass on what can be
        passed on, and wait for exactly the events that lets it go on."""
        if conn.key not in self._conns:
            return
        if conn.upstream is None:
            if self._mode != "pass":
                self._want(conn, {})  # held: its SYN never reached the server
                return
            self._connect(conn)
            if conn.key not in self._conns:
                return
        events: dict[str, int] = {"client": 0, "upstream": 0}
        if not conn.connected or conn.upstream is None:
            events["upstream"] = selectors.EVENT_WRITE
        else:
            dsts = {True: conn.upstream, False: conn.client}
            for pipe, flows in zip(conn.pipes, FLOWS[self._mode], strict=True):
                if not flows:
                    continue
                src, dst = ("client", "upstream") if pipe.up else ("upstream", "client")
                if pipe.buf:
                    events[dst] |= selectors.EVENT_WRITE
                elif not pipe.eof:
                    events[src] |= selectors.EVENT_READ
                elif not pipe.shut:  # the sender finished and all of it is through: pass the FIN on
                    pipe.shut = True
                    with contextlib.suppress(OSError):
                        dsts[pipe.up].shutdown(socket.SHUT_WR)
            if all(p.shut for p in conn.pipes):
                self._close(conn, rst=False)
                return
        self._want(conn, events)

    def _want(self, conn: _Conn, events: dict[str, int]) -> None:
        for which, sock in (("client", conn.client), ("upstream", conn.upstream)):
            if sock is None:
                continue
            mask = events.get(which, 0)
            try:
                key = self._sel.get_key(sock)
            except KeyError:
                if mask:
                    self._sel.register(sock, mask, (conn.key, which))
                continue
            if not mask:
                self._sel.unregister(sock)
            elif key.events != mask:
                self._sel.modify(sock, mask, (conn.key, which))

    def _close(self, conn: _Conn, rst: bool) -> None:
        if self._conns.pop(conn.key, None) is None:
            return
        for sock in (conn.client, conn.upstream):
            if sock is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)
            if rst:
                _reset(sock)
            else:
                sock.close()
        self._count("open", -1)
        if rst:
            self._count("resets")


class HostLinks:
    """One host's links: a FaultProxy to every etcd member and one to Placement, cut together
    or apart. Give the host `etcd` and `placement` (the proxies' URLs) instead of the real ones:

        links = HostLinks(cluster.endpoints, stack["placement"])
        host = cloud.compute("a", **links.compute_config())
        links.cut("blackhole", placement=False)  # cut from etcd only
        links.heal()
    """

    def __init__(self, etcd: Sequence[str], placement: str | None = None, name: str = "") -> None:
        host = f"{name} " if name else ""
        self.etcd_proxies = [FaultProxy.to(url, name=f"{host}etcd {url}") for url in etcd]
        self.placement_proxy = FaultProxy.to(placement, name=f"{host}placement") if placement else None
        self.etcd = [p.url for p in self.etcd_proxies]
        self.placement = self.placement_proxy.url if self.placement_proxy else None

    @property
    def proxies(self) -> list[FaultProxy]:
        return self.etcd_proxies + ([self.placement_proxy] if self.placement_proxy else [])

    def compute_config(self) -> dict[str, Any]:
        """Keyword arguments for harness.compute_config / Cloud.compute: the host's etcd and
        Placement go through these proxies."""
        return {"etcd": self.etcd, **({"placement": {"endpoint": self.placement}} if self.placement else {})}

    def cut(self, mode: str = "blackhole", *, etcd: bool = True, placement: bool = True) -> None:
        """Put the chosen links in `mode` (etcd only, Placement only, or both)."""
        self._each(lambda p: p.set_mode(mode), etcd, placement)

    def heal(self) -> None:
        self._each(FaultProxy.heal, True, True)

    def stats(self) -> dict[str, dict[str, int | str]]:
        return {p.name: p.stats() for p in self.proxies}

    def close(self) -> None:
        self._each(FaultProxy.close, True, True)

    def _each(self, fn: Callable[[FaultProxy], None], etcd: bool, placement: bool) -> None:
        chosen: Iterable[FaultProxy] = (self.etcd_proxies if etcd else []) + (
            [self.placement_proxy] if placement and self.placement_proxy else [])
        for proxy in chosen:
            fn(proxy)

    def __enter__(self) -> HostLinks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
