"""What the reconcile loop has yet to do, and when: its events, and per instance the backoff,
the failures in a row and whether it is parked.

The loop (loop.py) is the one reader. The watch, the pool's threads, the host's liveness and
the metadata server put events here from their own threads; an instance is queued at most
once at a time. `then` is the one switch from a report's `Next` to what happens to the
instance: looked at again now, after a backoff (1 s, doubling up to the resync interval, 60 s
at most), never until its request changes (parked), or nothing more.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from etcd_compute.ecompute.jobs import Job, JobKind, JobResult
from etcd_compute.ecompute.reconciler import Next

LOG = logging.getLogger("ecompute")


@dataclass(frozen=True)
class Reconcile:
    """Event: look at this instance again."""

    uuid: str


@dataclass(frozen=True)
class Finished:
    """Event: a worker ended this job."""

    job: Job
    result: JobResult


@dataclass(frozen=True)
class Domains:
    """Event: the hypervisor's list of this host's domains, asked for at `listed_at`."""

    result: JobResult
    listed_at: float


@dataclass(frozen=True)
class Regained:
    """Event: the host proves its lease again (or for the first time)."""


@dataclass(frozen=True)
class Ready:
    """Event: the guest of this instance said, at `at` (epoch seconds), that its boot has finished."""

    uuid: str
    at: float


Event = Reconcile | Finished | Domains | Regained | Ready


@dataclass
class _Failures:
    kind: JobKind
    count: int = 0


class Backlog:
    def __init__(self, resync_interval: float) -> None:
        self.resync_interval = resync_interval
        self.events: queue.Queue[Event] = queue.Queue()
        self._queued: set[str] = set()
        self._lock = threading.Lock()
        self.touched: dict[str, float] = {}  # when a job of each instance last ended
        self.backoff: dict[str, tuple[float, float]] = {}  # uuid -> (when to look again, last delay)
        self.failures: dict[str, _Failures] = {}
        self.parked: dict[str, int] = {}  # uuid -> the request's mod revision when it was parked
        self.cut_short: dict[str, str] = {}  # jobs ended by a lapse of the lease: said when they start again

    def put(self, event: Event) -> None:
        self.events.put(event)

    def enqueue(self, uuid: str) -> None:
        """Look at `uuid` again, unless it is queued already."""
        with self._lock:
            if uuid in self._queued:
                return
            self._queued.add(uuid)
        self.events.put(Reconcile(uuid))

    def get(self, timeout: float) -> Event | None:
        """The next event (None after `timeout`); a Reconcile leaves the queued set as it is taken."""
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(event, Reconcile):
            with self._lock:
                self._queued.discard(event.uuid)
        return event

    def then(self, uuid: str, next_: Next, mod: int) -> None:
        """The one switch from a report to what the queue does with the instance (`mod`: its
        request's revision as read, which a parked instance waits to see change)."""
        if next_ == Next.AGAIN:
            self.backoff.pop(uuid, None)
            self.enqueue(uuid)
        elif next_ == Next.LATER:
            self.later(uuid)
        elif next_ == Next.PARK:
            self.parked[uuid] = mod
            self.backoff.pop(uuid, None)
            LOG.warning("instance %s parked until its request changes", uuid)
        else:
            self.backoff.pop(uuid, None)

    def is_parked(self, uuid: str, mod: int) -> bool:
        """Parked and its request unchanged since; a changed request ends the parking."""
        if self.parked.get(uuid) == mod:
            return True
        self.parked.pop(uuid, None)
        return False

    def later(self, uuid: str) -> None:
        """Look at `uuid` again after a backoff: 1 s, doubling up to the resync interval (60 s at most)."""
        delay = min(self.backoff.get(uuid, (0.0, 0.5))[1] * 2, max(self.resync_interval, 1.0), 60.0)
        self.backoff[uuid] = (time.monotonic() + delay, delay)

    def due(self) -> None:
        """Queue the instances whose backoff has run out."""
        now = time.monotonic()
        for uuid, (when, delay) in list(self.backoff.items()):
            if when <= now:
                self.backoff[uuid] = (float("inf"), delay)  # keeps its delay until it succeeds
                self.enqueue(uuid)

    def count(self, uuid: str, kind: JobKind, result: JobResult) -> int:
        """Failures of `kind` in a row for `uuid` before this result, and count this one. An
        interrupted, fenced or hypervisor-less job is no failure of the instance's."""
        if result.ok:
            self.failures.pop(uuid, None)
            return 0
        if result.interrupted or result.fenced or result.hypervisor_down:
            return self.failures[uuid].count if uuid in self.failures and self.failures[uuid].kind == kind else 0
        known = self.failures.get(uuid)
        before = known.count if known is not None and known.kind == kind else 0
        self.failures[uuid] = _Failures(kind, before + 1)
        return before

    def forget(self, uuid: str) -> None:
        """The instance is gone from this host: nothing of it is kept."""
        for table in self._tables():
            table.pop(uuid, None)

    def prune(self, keep: set[str]) -> None:
        """Forget every instance but those in `keep` (this host's, and those with a job under way)."""
        for table in self._tables():
            for uuid in set(table) - keep:
                del table[uuid]

    def _tables(self) -> tuple[dict[str, Any], ...]:
        """Everything kept per instance."""
        return self.backoff, self.failures, self.parked, self.touched, self.cut_short
