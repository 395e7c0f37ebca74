"""ecompute's Prometheus metrics, counted in the daemon process where things happen.

One registry, served as Prometheus text on `metrics` (HOST:PORT) when it is set. Workers
add nothing to it: what they measure comes back in their job results (JobResult.seconds,
ip_seconds, stats), so no registry is shared across processes. The host's gauges (instances
by state, allocations against capacity) come from what the daemon reads and writes anyway:
a scrape asks neither Placement nor etcd. Per instance, one `_info` series carries the
labels that would repeat (project, user, hostname); the value series carry only `uuid`.
Counters end in `_total`; times are in seconds, sizes in bytes; capacity and allocations
are Placement's amounts of each resource class (VCPU, MEMORY_MB, DISK_GB), as Placement
counts them. A failure here is logged and costs at most a scrape, never the daemon.

Beside /metrics, /history/<uuid> serves the last hour of an instance's counters as JSON
({"uuid", "interval", "window", "samples": [{"t", <stat>: value}]}, history.py), read every
`interval` seconds by a thread of its own: what the API's graphs draw.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from typing import ParamSpec
from wsgiref.simple_server import WSGIServer
from wsgiref.types import StartResponse

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from etcd_compute.contract import Request, Status
from etcd_compute.ecompute.history import History
from etcd_compute.ecompute.hooks import MetricsHooks
from etcd_compute.ecompute.jobs import Job, JobKind, JobResult
from etcd_compute.ecompute.pool import WorkerPool
from etcd_compute.states import Actual
from md_server.server import serve_metrics

LOG = logging.getLogger("ecompute.metrics")
P = ParamSpec("P")

# Per-instance value series, by the driver.DomainStats field they come from: (name, type, help).
INSTANCE_SERIES: dict[str, tuple[str, str, str]] = {
    "cpu_seconds": ("etcd_compute_instance_cpu_seconds", "counter", "CPU time the domain used."),
    "memory_bytes": ("etcd_compute_instance_memory_bytes", "gauge", "Memory the guest has (its balloon)."),
    "memory_rss_bytes": ("etcd_compute_instance_memory_rss_bytes", "gauge", "Host memory the domain's QEMU holds."),
    "network_receive_bytes": ("etcd_compute_instance_network_receive_bytes", "counter",
                              "Bytes the domain's NICs received."),
    "network_transmit_bytes": ("etcd_compute_instance_network_transmit_bytes", "counter",
                               "Bytes the domain's NICs sent."),
    "disk_read_bytes": ("etcd_compute_instance_disk_read_bytes", "counter", "Bytes the domain read from its disks."),
    "disk_write_bytes": ("etcd_compute_instance_disk_write_bytes", "counter", "Bytes the domain wrote to its disks."),
}
# The job kinds the reconcile loop runs, whose failures count as reconcile errors.
RECONCILE_JOBS = (JobKind.BUILD, JobKind.POWER, JobKind.REBOOT, JobKind.VOLUMES, JobKind.DESTROY,
                  JobKind.REMOVE_ORPHAN, JobKind.LIST_DOMAINS)
WATCH_RESTARTS = ("lost", "failover", "compacted")

StatsReading = tuple[dict[str, dict[str, float]], float | None]  # {uuid: {stat: value}}, its age in seconds


class DomainStatsCache:
    """Per-instance counters from the hypervisor, read at scrape time and kept `ttl` seconds.

    At scrape time rather than on a timer: nothing is read while nobody scrapes, a reading is
    at most `ttl` old when served, and several Prometheus servers cost one libvirt call per
    `ttl` between them. The call runs in a worker process of its own (the daemon never loads
    libvirt), not in the job pool: a scrape must not queue behind a build fetching an image,
    and a libvirt call that hangs must not hold a build worker. A thread of its own starts
    that worker (at the first scrape) and waits for its answers: a worker dies with the thread
    that started it (PR_SET_PDEATHSIG), so never a short-lived scrape thread. A scrape waits at
    most `wait` seconds for a fresh reading, and otherwise serves the last one (the age series
    says how old), never one older than `max_age`; a call that has not returned after `stuck`
    seconds has its worker killed and replaced.
    """

    def __init__(self, new_pool: Callable[[], WorkerPool], failures: Counter, *, ttl: float = 5.0,
                 wait: float = 2.0, stuck: float = 30.0, max_age: float = 60.0) -> None:
        self.new_pool, self.failures = new_pool, failures
        self.ttl, self.wait, self.stuck, self.max_age = ttl, wait, stuck, max_age
        self._lock = threading.Lock()
        self._answered = threading.Condition(self._lock)
        self._wanted = threading.Event()  # a scrape wants a fresh reading
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: WorkerPool | None = None
        self._stats: dict[str, dict[str, float]] = {}
        self._at: float | None = None  # when the last reading came
        self._calls = 0  # calls ended (well or not): what a waiting scrape watches
        self._logged = 0.0

    def read(self) -> StatsReading:
        with self._lock:
            if self._at is None or time.monotonic() - self._at >= self.ttl:
                if self._thread is None and not self._closed.is_set():
                    self._thread = threading.Thread(target=self._run, name="domain stats", daemon=True)
                    self._thread.start()
                calls = self._calls
                self._wanted.set()
                self._answered.wait_for(lambda: self._calls > calls, self.wait)
            age = None if self._at is None else time.monotonic() - self._at
            return ({}, age) if age is None or age > self.max_age else (self._stats, age)

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            if self._closed.is_set():
                return
            result = self._call()
            with self._lock:
                if result.ok:
                    self._stats, self._at = dict(result.stats), time.monotonic()
                self._calls += 1
                self._answered.notify_all()
                self._wanted.clear()  # scrapes that asked during the call have their answer
            if self._closed.is_set():
                return
            if not result.ok:
                self.failures.inc()
                self._warn(f"cannot read the domains' stats: {result.reason}")

    def _call(self) -> JobResult:
        """One DOMAIN_STATS job in the stats worker, killed and replaced if it hangs past `stuck`."""
        if self._pool is None:
            self._pool = self.new_pool()
        result = self._pool.run(Job(JobKind.DOMAIN_STATS), self.stuck)
        if result.timed_out:
            return replace(result, reason=f"no answer in {self.stuck:.0f}s; stats worker restarted")
        return result

    def _warn(self, message: str) -> None:
        if time.monotonic() - self._logged > 60:  # at most once a minute: scrapes come every few seconds
            self._logged = time.monotonic()
            LOG.warning("%s (logged once a minute)", message)

    def _stop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def close(self) -> None:
        self._closed.set()
        self._wanted.set()
        if self._thread is not None:
            self._thread.join(2)
        if self._thread is None or not self._thread.is_alive():  # else it owns the pool still; the worker dies with us
            self._stop_pool()


def _stamp(iso: object) -> float:
    """Epoch seconds of an ISO 8601 time from etcd; now if there is none (or it is garbage)."""
    try:
        return datetime.fromisoformat(str(iso)).timestamp()
    except ValueError:
        return time.time()


def _never_raises(hook: Callable[P, None]) -> Callable[P, None]:
    """A hook the daemon's threads call as they work: a bug in it is logged, and ends nothing."""
    @functools.wraps(hook)
    def safe(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            hook(*args, **kwargs)
        except Exception:  # noqa: BLE001 - metrics are never worth a daemon
            LOG.exception("metrics: %s failed", hook.__name__)
    return safe


@dataclass(frozen=True)
class _Instance:
    """What the metrics know of one instance of this host."""

    state: str
    request: Request | None  # None: malformed
    since: float  # when it entered `state` (epoch seconds; its status's updated_at)


class Metrics(MetricsHooks, Collector):
    """The daemon's metrics: it calls the hooks below as it works; a scrape calls collect().
    `stats_pool` makes the worker pool that reads the domains' stats (none: no per-instance stats,
    no history); `interval` is the seconds between the history's samples."""

    def __init__(self, host: str, name: str, stats_pool: Callable[[], WorkerPool] | None = None,
                 interval: float = 15.0) -> None:
        self.host, self.name = host, name
        self.history = History(interval)
        self._sampler: threading.Thread | None = None
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._instances: dict[str, _Instance] = {}
        self._capacity: dict[str, int] = {}
        self._down_on: str | None = None  # the etcd endpoint the watch was lost on
        self._server: WSGIServer | None = None
        # Counters as `_total` alone, without a `_created` series beside each (untyped in prometheus_client).
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = r = CollectorRegistry()
        prometheus_client.ProcessCollector(registry=r)
        prometheus_client.PlatformCollector(registry=r)
        self.schedule_to_active = Histogram(
            "etcd_compute_schedule_to_active_seconds",
            "From an instance's request to its first ACTIVE on this host (instances moved or commanded "
            "before they first ran are left out).",
            registry=r, buckets=(1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600))
        self.start_to_ip = Histogram(
            "etcd_compute_start_to_ip_seconds",
            "From a build's start until the guest's address is known (reserved before boot on a network "
            "ecompute manages, seen in DHCP on a plain bridge).",
            registry=r, buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120))
        self.start_to_ready = Histogram(
            "etcd_compute_start_to_ready_seconds",
            "From the host starting a domain (a build, a start, a reboot) until its guest said that boot "
            "had finished (cloud-init done, through the metadata server).",
            registry=r, buckets=(5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200, 1800))
        self.build_duration = Histogram(
            "etcd_compute_build_duration_seconds", "How long builds ran in their worker, by result.",
            ["result"], registry=r, buckets=(0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600))
        self.watch_restarts = Counter(
            "etcd_compute_watch_restarts", "Restarts of the watch on this host's requests, by reason: lost "
            "(etcd away, back on the same endpoint), failover (back on another), compacted (history gone: "
            "listed again).", ["reason"], registry=r)
        self.lease_failures = Counter(
            "etcd_compute_lease_refresh_failures", "Refreshes of the host's liveness lease that failed: etcd "
            "error, or the lease had expired.", ["reason"], registry=r)
        self.reconcile_errors = Counter(
            "etcd_compute_reconcile_errors", "Jobs that failed, by kind.", ["kind"], registry=r)
        self.loop_restarts = Counter(
            "etcd_compute_loop_restarts", "Long-lived loops of the daemon that died (or stopped beating) and "
            "were started again, by loop.", ["loop"], registry=r)
        self.lease_lapses = Counter(
            "etcd_compute_lease_lapses", "Times the host could not prove its etcd lease in time, so that its "
            "fence stopped its domains.", registry=r)
        self._healthy = True
        self.stats_failures = Counter(
            "etcd_compute_domain_stats_failures", "Readings of the domains' stats that failed or hung.",
            registry=r)
        for result in ("ok", "error"):
            self.build_duration.labels(result)
        for reason in WATCH_RESTARTS:
            self.watch_restarts.labels(reason)
        for reason in ("error", "expired"):
            self.lease_failures.labels(reason)
        for kind in RECONCILE_JOBS:
            self.reconcile_errors.labels(kind.value)
        self.domain_stats = (DomainStatsCache(stats_pool, self.stats_failures, ttl=min(5.0, interval))
                             if stats_pool else None)
        r.register(self)

    # -- serving ----------------------------------------------------------------------------

    def serve(self, address: str, guest_facing: Collection[str]) -> None:
        """Serve /metrics and /history/<uuid> on HOST:PORT `address` (ConfigError if malformed or
        guest-facing), and start sampling the history."""
        self._server = serve_metrics(address, self.registry, "metrics", guest_facing, LOG,
                                     routes={"/history/": self._serve_history})
        if self.domain_stats is not None and self._server is not None:
            self._sampler = threading.Thread(target=self._sample_forever, name="history", daemon=True)
            self._sampler.start()

    def _sample_forever(self) -> None:
        while not self._closing.wait(self.history.interval):
            self.sample()

    @_never_raises
    def sample(self) -> None:
        """One reading of the domains' counters into the history (the instances of this host only)."""
        stats, age = self.read_stats()
        if age is not None:
            with self._lock:
                known = set(self._instances)
            self.history.add(time.time() - age, stats, known)

    def _serve_history(self, environ: dict[str, object], start_response: StartResponse) -> list[bytes]:
        uuid = str(environ.get("PATH_INFO", "")).removeprefix("/history/")
        body = json.dumps({"uuid": uuid, "interval": self.history.interval, "window": self.history.window,
                           "samples": self.history.samples(uuid, time.time())}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    def close(self) -> None:
        self._closing.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self.domain_stats is not None:
            self.domain_stats.close()

    # -- hooks the daemon calls -------------------------------------------------------------

    @_never_raises
    def seen(self, uuid: str, requested: bool, request: Request | None, status: Status | None) -> None:
        """The daemon read an instance: `requested` if this host has a request for it (`request`
        None: a malformed one), with its status."""
        with self._lock:
            if not requested:
                self._instances.pop(uuid, None)
                self.history.forget(uuid)
                return
            state = status["state"] if status else Actual.PENDING
            known = self._instances.get(uuid)
            stamped = status["updated_at"] if status else request["updated_at"] if request else None
            since = known.since if known is not None and known.state == state else _stamp(stamped)
            self._instances[uuid] = _Instance(state, request, since)

    @_never_raises
    def recorded(self, uuid: str, state: str) -> None:
        """The daemon wrote the instance's actual state."""
        with self._lock:
            known = self._instances.get(uuid)
            since = known.since if known is not None and known.state == state else time.time()
            self._instances[uuid] = _Instance(state, known.request if known else None, since)

    @_never_raises
    def forget(self, uuid: str) -> None:
        """The instance is gone from this host (deleted)."""
        with self._lock:
            self._instances.pop(uuid, None)
        self.history.forget(uuid)

    @_never_raises
    def set_inventory(self, inventory: dict[str, dict[str, float | int]]) -> None:
        """What the host offers Placement; capacity as eschedule shows it: (total - reserved) x ratio."""
        with self._lock:
            self._capacity = {rc: int((i["total"] - i["reserved"]) * i["allocation_ratio"])
                              for rc, i in inventory.items()}

    @_never_raises
    def job_done(self, kind: JobKind, result: JobResult) -> None:
        if not result.ok:
            self.reconcile_errors.labels(kind.value).inc()
        if kind == JobKind.BUILD and result.seconds is not None:
            self.build_duration.labels("ok" if result.ok else "error").observe(result.seconds)
        if kind == JobKind.BUILD and result.ok and result.ip_seconds is not None:
            self.start_to_ip.observe(result.ip_seconds)

    @_never_raises
    def became_active(self, request: Request, status: Status | None) -> None:
        """A build made the instance ACTIVE: from its request to now, if this is its first run
        (a rebuild has a domain recorded already) and the request is as it was created (not
        moved here by an evacuation, nor commanded meanwhile): else what it waited for was not
        its schedule."""
        if (status is not None and status.get("domain")) or request.get("updated_at") != request.get("created_at"):
            return
        try:
            seconds = time.time() - datetime.fromisoformat(request["created_at"]).timestamp()
        except (KeyError, TypeError, ValueError):
            return
        if seconds >= 0:  # else the scheduler's clock is ahead of ours: no honest value
            self.schedule_to_active.observe(seconds)

    @_never_raises
    def guest_ready(self, seconds: float | None) -> None:
        if seconds is not None and seconds >= 0:
            self.start_to_ready.observe(seconds)

    @_never_raises
    def watch_state(self, state: str, endpoint: str) -> None:
        """The request watch's state (etcd.PrefixWatch: down, up, compacted) and the etcd endpoint in use."""
        if state == "down":
            self._down_on = endpoint
        elif state == "up":
            self.watch_restarts.labels("failover" if endpoint != self._down_on else "lost").inc()
        elif state == "compacted":
            self.watch_restarts.labels("compacted").inc()

    @_never_raises
    def lease_refresh_failed(self, reason: str) -> None:
        self.lease_failures.labels(reason).inc()

    @_never_raises
    def loop_restarted(self, loop: str) -> None:
        self.loop_restarts.labels(loop).inc()

    @_never_raises
    def lease_lapsed(self) -> None:
        self.lease_lapses.inc()

    @_never_raises
    def health(self, healthy: bool) -> None:
        self._healthy = healthy

    # -- a scrape ---------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """The host's and its instances' series, from what the daemon knows now."""
        with self._lock:
            instances = {uuid: (i.state, i.request) for uuid, i in self._instances.items()}
            since = {uuid: i.since for uuid, i in self._instances.items()}
            capacity = dict(self._capacity)
        info = InfoMetricFamily("etcd_compute_host", "This host: its provider uuid and name in Placement.",
                                labels=["host", "name"])
        info.add_metric([self.host, self.name], {})
        yield info
        states = GaugeMetricFamily("etcd_compute_instances", "Instances of this host by actual state.",
                                   labels=["state"])
        for actual in Actual:
            states.add_metric([actual.value], sum(1 for state, _ in instances.values() if state == actual))
        yield states
        yield GaugeMetricFamily("etcd_compute_host_healthy", "1 while the hypervisor answers, 0 while it does "
                                "not (the host's inventory is locked meanwhile).", value=int(self._healthy))
        age = GaugeMetricFamily("etcd_compute_instance_state_age_seconds",
                                "How long each instance of this host has been in its actual state.", labels=["uuid"])
        now = time.time()
        for uuid, began in sorted(since.items()):
            age.add_metric([uuid], max(0.0, now - began))
        yield age
        allocated = dict.fromkeys(capacity, 0)
        for state, request in instances.values():
            if request is not None and state != Actual.ERROR:  # a failed build's allocation is freed
                for rc, amount in request["allocations"].get(self.host, {}).get("resources", {}).items():
                    allocated[rc] = allocated.get(rc, 0) + amount
        for name, help_text, values in (
                ("etcd_compute_host_capacity", "What Placement may allocate here: (total - reserved) x "
                 "allocation ratio, in the resource class's unit.", capacity),
                ("etcd_compute_host_allocated", "Allocations of this host's instances, in the resource "
                 "class's unit.", allocated)):
            family = GaugeMetricFamily(name, help_text, labels=["resource_class"])
            for rc, amount in sorted(values.items()):
                family.add_metric([rc], amount)
            yield family
        about = InfoMetricFamily("etcd_compute_instance", "Each instance of this host; join on uuid.",
                                 labels=["uuid", "host", "project", "user", "hostname"])
        for uuid, (_, request) in sorted(instances.items()):
            labels = [request.get(k) or "" for k in ("project_id", "user_id", "hostname")] if request else ["", "", ""]
            about.add_metric([uuid, self.host, *labels], {})
        yield about
        yield from self._instance_stats(set(instances))

    def read_stats(self) -> StatsReading:
        return self.domain_stats.read() if self.domain_stats is not None else ({}, None)

    def _instance_stats(self, known: set[str]) -> Iterator[Metric]:
        try:
            stats, age = self.read_stats()
        except Exception:  # noqa: BLE001 - a scrape goes on without them
            LOG.exception("reading domain stats failed")
            return
        if age is not None:
            yield GaugeMetricFamily("etcd_compute_domain_stats_age_seconds",
                                    "How old the per-instance stats served are.", value=age)
        for field, (name, kind, help_text) in INSTANCE_SERIES.items():
            family = (CounterMetricFamily(name, help_text, labels=["uuid"]) if kind == "counter"
                      else GaugeMetricFamily(name, help_text, labels=["uuid"]))
            for uuid in sorted(known & set(stats)):  # an instance deleted meanwhile goes at once
                if field in stats[uuid]:
                    family.add_metric([uuid], stats[uuid][field])
            yield family
