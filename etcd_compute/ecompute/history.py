"""The last hour of each instance's counters, in memory: what the dashboard's graphs draw.

No database and nothing in etcd: a bounded ring per instance of this host, one sample every
`interval` seconds (compute.yaml's metrics_interval), served as JSON beside /metrics
(metrics.py). A restart of the daemon starts the history afresh; an instance deleted is
forgotten at once, one stopped keeps its samples until they are an hour old. A sample is
{"t": epoch seconds, <DomainStats field>: value, ...} with the fields libvirt reported.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Collection, Mapping

Sample = dict[str, float]


class History:
    def __init__(self, interval: float, window: float = 3600.0) -> None:
        if interval <= 0 or window <= 0:
            raise ValueError("interval and window must be positive")
        self.interval, self.window = interval, window
        self.size = math.ceil(window / interval) + 1  # both ends of the window
        self._lock = threading.Lock()
        self._rings: dict[str, deque[Sample]] = {}

    def add(self, at: float, stats: Mapping[str, Mapping[str, float]], known: Collection[str] | None = None) -> None:
        """One reading of every running domain's counters, taken at `at`; only the instances in
        `known` (if given) are kept. Rings whose newest sample left the window go."""
        with self._lock:
            for uuid, values in stats.items():
                if known is not None and uuid not in known:
                    continue
                ring = self._rings.setdefault(uuid, deque(maxlen=self.size))
                if ring and ring[-1]["t"] >= at:
                    continue  # the same reading again (or an older one): one sample
                ring.append({"t": at, **values})
            for uuid in [u for u, ring in self._rings.items() if ring[-1]["t"] < at - self.window]:
                del self._rings[uuid]

    def forget(self, uuid: str) -> None:
        with self._lock:
            self._rings.pop(uuid, None)

    def samples(self, uuid: str, now: float) -> list[Sample]:
        """The instance's samples of the window before `now`, oldest first."""
        with self._lock:
            return [dict(s) for s in self._rings.get(uuid, ()) if s["t"] >= now - self.window]

    def uuids(self) -> set[str]:
        with self._lock:
            return set(self._rings)
