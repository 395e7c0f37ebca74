"""The run's bookkeeping: its timeline, what it did and found, and the actions it put off.

Every room of the run (world, operations, faults, the run itself) writes here, from the
loop and from its worker threads, under one lock.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from etcd_compute.invariants import Violation


class Book:
    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose
        self.lock = threading.RLock()  # the run's bookkeeping
        self.lifecycle = threading.Lock()  # starting a process vs. the teardown: nothing starts after it
        self.closing = threading.Event()
        self.t0 = time.monotonic()
        self.timeline: list[tuple[float, str]] = []
        self.ops: dict[str, Counter[str]] = defaultdict(Counter)
        self.faults: Counter[str] = Counter()
        self.detail: dict[str, Counter[str]] = defaultdict(Counter)  # fault kind -> how (a cut's mode, its length)
        self.moved = 0  # instances that evacuations moved
        self.violations: list[Violation] = []
        self.reported: set[tuple[str, str]] = set()  # (invariant, uuid or text) found by a check during the run
        self.notes: list[str] = []
        self.instances: dict[str, str] = {}  # uuid -> the host it was last placed or moved to
        self.destroyed: set[str] = set()
        self.garbage: dict[str, tuple[str, bool]] = {}  # key name -> (host, index key written)
        self.stopped: set[int] = set()  # pids under SIGSTOP
        self.pending: list[tuple[float, int, str, Callable[[], None]]] = []
        self.seq = 0
        self.repairing = 0
        self.rechecks = 0  # claims eschedule gave back after finding their provider over capacity
        self.timings: dict[str, float] = {}
        self.repairs = ThreadPoolExecutor(4, thread_name_prefix="repair")

    def note(self, text: str, live: bool = False) -> None:
        t = time.monotonic() - self.t0
        with self.lock:
            self.timeline.append((t, text))
        if live or self.verbose:
            print(f"  {t:7.1f}s  {text}", flush=True)

    def violation(self, invariant: str, text: str, uuid: str | None = None) -> None:
        with self.lock:
            if self.closing.is_set():
                return
            self.violations.append(Violation(invariant, text, uuid))
        self.note(f"VIOLATION [{invariant}] {text}", live=True)

    def found(self, violations: list[Violation]) -> None:
        """Violations of a check made during the run: each (invariant, instance) once."""
        for v in violations:
            key = (v.invariant, v.uuid or v.text)
            with self.lock:
                if key in self.reported:
                    continue
                self.reported.add(key)
            self.violation(v.invariant, v.text, v.uuid)

    def after(self, seconds: float, label: str, fn: Callable[[], None]) -> None:
        with self.lock:
            self.seq += 1
            heapq.heappush(self.pending, (time.monotonic() + seconds, self.seq, label, fn))

    def run_due(self, everything: bool = False) -> None:
        while True:
            with self.lock:
                if not self.pending or not (everything or self.pending[0][0] <= time.monotonic()):
                    return
                _, _, label, fn = heapq.heappop(self.pending)
            self.note(label)
            fn()

    def repair(self, fn: Callable[..., None], *args: Any) -> None:
        """Run `fn` in a repair thread (what takes long, such as a restart, never holds the loop)."""
        def run() -> None:
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - a repair that failed is worth a line, not a crash
                self.note(f"repair {fn.__name__} failed: {exc!r}", live=True)
            finally:
                with self.lock:
                    self.repairing -= 1
        with self.lock:
            if self.closing.is_set():
                return
            self.repairing += 1
        self.repairs.submit(run)
