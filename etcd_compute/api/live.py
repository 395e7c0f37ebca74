"""The dashboard's live updates: one etcd watch per server process, fanned out to every open
page as server-sent events.

Every browser tab holds one stream (/ui/events). A watch per tab would cost etcd a watcher
and the server a thread each, so the process keeps a single PrefixWatch on the whole prefix
(started by the first stream) and only tells each stream *that* something it cares about
changed. The stream then reads its caller's views again, as any page load would, so what a
stream shows is always exactly what that token may see: the watch itself carries no data
to anyone. Bursts (a build writes several keys within a second) are coalesced into one
read, and a read that fails (etcd or Placement down) is retried on a timer as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from sse_starlette.event import ServerSentEvent
from starlette.concurrency import run_in_threadpool

from etcd_compute.errors import ECError, Forbidden, UnknownInstance
from etcd_compute.etcd import PrefixWatch, unavailable
from etcd_compute.store import Store

LOG = logging.getLogger(__name__)

COALESCE = 0.2  # seconds to let a burst of changes settle before reading once
RETRY = 5.0  # seconds between reads while they fail (the watch may not see the cause end)
HEARTBEAT = 15  # seconds between comment lines, so that proxies keep an idle stream open
GRAPHS = 10.0  # seconds between reads of an instance's page without a change: its graphs move on


@dataclass(eq=False)
class Subscription:
    """One open stream: which keys concern it, and the flag the watch raises on its loop."""

    wants: Callable[[str], bool]
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        """From any thread: wake the stream on its own loop (asyncio.Event is not thread-safe)."""
        with contextlib.suppress(RuntimeError):  # the loop closed under us: the server is stopping
            self.loop.call_soon_threadsafe(self.changed.set)


class Hub:
    """The process's one watch on `prefix/`, and the streams it wakes."""

    def __init__(self, store: Callable[[], Store]) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._subs: set[Subscription] = set()
        self.watch: PrefixWatch | None = None
        self.prefix = ""

    def start(self) -> None:
        """Start the watch unless it runs (blocking: call it in a thread). From the revision
        after now: a stream reads the present itself when it opens."""
        with self._lock:
            if self.watch is not None:
                return
            store = self._store()
            self.prefix = store.prefix + "/"
            with unavailable("revision"):
                revision = store.client.get_response(self.prefix).header.revision
            self.watch = store.watch(self.prefix, revision + 1, self._on_event, self._on_state)
            LOG.info("dashboard: watching %s from revision %d", self.prefix, revision + 1)

    def stop(self) -> None:
        with self._lock:
            if self.watch is not None:
                self.watch.stop()
                self.watch = None

    def subscribe(self, wants: Callable[[str], bool]) -> Subscription:
        sub = Subscription(wants)
        with self._lock:
            self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subs.discard(sub)

    @property
    def streams(self) -> int:
        return len(self._subs)

    def _on_event(self, key: str, revision: int) -> None:
        """On the watch's thread: wake the streams that care about `key` (relative to the prefix)."""
        rest = key.removeprefix(self.prefix)
        with self._lock:
            subs = [s for s in self._subs if s.wants(rest)]
        for sub in subs:
            sub.notify()

    def _on_state(self, state: str) -> None:
        """"down", "up", "compacted": events may have been missed (or reads now fail): everyone reads."""
        with self._lock:
            subs = list(self._subs)
        for sub in subs:
            sub.notify()


def instances_keys(rest: str) -> bool:
    """Keys that change a list of instances: requests, actual states, hosts' liveness, quotas."""
    return rest.partition("/")[0] in ("requests", "instances", "alive", "quotas")


def instance_keys(uuid: str) -> Callable[[str], bool]:
    """Keys that change one instance's page: its request, actual state and console, and liveness."""
    def wants(rest: str) -> bool:
        kind, _, tail = rest.partition("/")
        return kind == "alive" or (kind in ("requests", "instances", "consoles") and tail.rpartition("/")[2] == uuid)
    return wants


async def stream(hub: Hub, read: Callable[[], dict[str, Any]], wants: Callable[[str], bool],
                 coalesce: float = COALESCE, retry: float = RETRY, every: float | None = None
                 ) -> AsyncIterator[ServerSentEvent]:
    """Send `read()` (blocking: it runs in a thread) as an "update" event now and whenever the
    watch reports a key that `wants` accepts, and every `every` seconds if given (what etcd does
    not carry: the graphs' samples); unchanged results are not sent again.

    Ends with a "gone" event when the instance no longer exists (or is not the caller's) and a
    "denied" event when the token was revoked: the page stops listening rather than reconnect.
    Other failures (etcd, Placement) are sent as {"error": ...} and read again every `retry` s.
    """
    sub = hub.subscribe(wants)
    try:
        last = None
        while True:
            sub.changed.clear()  # before reading: a change during the read wakes us once more
            failing = False
            try:
                payload = await run_in_threadpool(read)
            except UnknownInstance as exc:
                yield ServerSentEvent(json.dumps({"error": str(exc)}), event="gone")
                return
            except Forbidden as exc:
                yield ServerSentEvent(json.dumps({"error": str(exc)}), event="denied")
                return
            except ECError as exc:
                payload, failing = {"error": str(exc)}, True
            data = json.dumps(payload, sort_keys=True)
            if data != last:
                yield ServerSentEvent(data, event="update")
                last = data
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sub.changed.wait(), retry if failing else every)
            await asyncio.sleep(coalesce)
    finally:
        hub.unsubscribe(sub)
