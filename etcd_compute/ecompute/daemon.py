"""ecompute: the per-host daemon. Registers the host in Placement, then reconciles.

One loop thread does all the deciding: it takes events off a queue (an instance to
reconcile, a finished job, the hypervisor's list of domains), reads the instance's
request and status from etcd, asks reconciler.decide what to do, records the state
that goes with it and hands the job to a worker process; when a job ends,
reconciler.report says what to record. The watch thread and the pool's callbacks only
put events on the queue.

Startup lists every request of this host and watches from the revision of that
list (the Kubernetes list+watch pattern); the watch itself resumes from the last
revision it delivered after an etcd outage, backing off meanwhile. Every resync
also asks the hypervisor which domains it runs and removes those no request of
this host names (orphans: e.g. instances evacuated while this host was down).
Liveness is a key on an etcd lease this daemon keeps refreshing. On SIGINT/SIGTERM
it lets running jobs finish (bounded), locks its inventory (reserved = total) so
nothing new is scheduled here, and exits 0. With `metrics` set it serves Prometheus
metrics (metrics.py), fed by hooks where the loop reads, records and finishes jobs.
"""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import click

from etcd_compute import config, contract
from etcd_compute.contract import BadRecord, DomainRecord, Request, Status, looks_like_uuid
from etcd_compute.ecompute import inventory, jobs, reconciler
from etcd_compute.ecompute.console import ConsolePublisher
from etcd_compute.ecompute.hooks import MetricsHooks
from etcd_compute.ecompute.jobs import Job, JobKind, JobResult, WorkerSettings
from etcd_compute.errors import ConfigError, ECError, EtcdUnavailable, PlacementError, PlacementUnavailable
from etcd_compute.etcd import PrefixWatch
from etcd_compute.placement import PlacementClient
from etcd_compute.states import Actual, Desired
from etcd_compute.store import Rev, Store

LOG = logging.getLogger("ecompute")
T = TypeVar("T")


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


Event = Reconcile | Finished | Domains


def worker_settings(cfg: config.ComputeConfig) -> WorkerSettings:
    net: dict[str, object] | None = None
    if cfg.bridge is None and cfg.network.mode != "none":
        net = {"name": cfg.network.name, "bridge": cfg.network.bridge_name, "address": cfg.network.address,
               "forward": cfg.network.mode == "nat",
               "metadata_address": cfg.metadata.address if cfg.metadata.enabled else None}
    return WorkerSettings(
        host=cfg.host_uuid(), uri=cfg.libvirt.uri, domain_type=cfg.libvirt.domain_type,
        instances_path=cfg.instances_path, image_cache_path=cfg.image_cache_path,
        image_dirs=tuple(cfg.image_dirs), image_max_bytes=cfg.image_max_bytes, resize=cfg.resize,
        bridge=cfg.bridge, network=net, ip_timeout=cfg.ip_timeout, stop_timeout=cfg.stop_timeout,
        log_level=cfg.log_level, daemon_pid=os.getpid())


class Daemon:
    def __init__(self, cfg: config.ComputeConfig) -> None:
        self.cfg = cfg
        self.host = cfg.host_uuid()
        self.name = cfg.host_name()
        self.facts = reconciler.Facts(host=self.host)
        self.pool = self._new_pool()
        self.placement = PlacementClient(cfg.placement)
        self._store: Store | None = None
        self.events: queue.Queue[Event] = queue.Queue()
        self.queued: set[str] = set()
        self.lock = threading.Lock()
        self.inflight: dict[str, Job] = {}
        self.stopping = threading.Event()
        self.watch: PrefixWatch | None = None
        self.resync_now = threading.Event()
        self.domains_changed = threading.Event()  # a lifecycle event: compare domains with etcd now
        self.lease: int | None = None
        self.lost_host = False  # another daemon took this host over: exit without locking it
        self.touched: dict[str, float] = {}  # when a job of each instance last ended
        self.backoff: dict[str, tuple[float, float]] = {}  # uuid -> (when to look again, last delay)
        self.bad_seen: set[str] = set()
        # PREFIX/alive/<host>: who serves this host (claim_host, keep_alive).
        self.alive = {"uuid": self.host, "pid": os.getpid(), "hostname": inventory.hostname(),
                      "since": contract.now()}
        self.metrics = MetricsHooks()  # Prometheus metrics replace these no-ops in run() when `metrics` is set

    @property
    def store(self) -> Store:
        assert self._store is not None, "used before run() connected to etcd"
        return self._store

    def _new_pool(self, workers: int | None = None) -> ProcessPoolExecutor:
        """Spawned (not forked) workers: they must never inherit the etcd client's gRPC channel.
        `workers` (default: the configured number) is 1 for the metrics' stats worker.

        A ProcessPoolExecutor, not a multiprocessing.Pool: when a worker dies abruptly
        (a crash, or SIGTERM sent to the whole process group) it reports a broken pool
        instead of hanging on a lock the dead worker held.
        """
        return jobs.pool(worker_settings(self.cfg), workers or self.cfg.workers)

    def _run_job(self, job: Job, then: Callable[[JobResult], None]) -> None:
        """Run `job` in a worker; then(result) runs in a pool thread when it ends, whatever happens."""
        def done(future: Future[JobResult]) -> None:
            try:
                result = future.result()
            except BrokenProcessPool:
                result = JobResult(ok=False, interrupted=True, reason="worker process died")
            except Exception as exc:  # noqa: BLE001 - a job must always report back
                result = JobResult(ok=False, reason=f"{job.kind.value} failed: {exc!r}")
            then(result)
        try:
            future = self.pool.submit(jobs.run, job)
        except BrokenProcessPool:
            LOG.warning("worker pool broken (a worker died); starting a new one")
            self.pool = self._new_pool()
            future = self.pool.submit(jobs.run, job)
        future.add_done_callback(done)

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        Path(self.cfg.instances_path).mkdir(parents=True, exist_ok=True)
        if self.cfg.metadata.metrics:  # a typo refuses the start now, not once the host is registered
            from md_server.server import guest_facing, metrics_address
            metrics_address(self.cfg.metadata.metrics, "metadata.metrics", guest_facing(self.cfg))
        if self.cfg.metrics:  # first: a daemon waiting for etcd or Placement shows it there
            self.metrics = self.serve_metrics(self.cfg.metrics)
        self._store = self._retry("connect to etcd", lambda: Store(self.cfg.etcd))
        if self._store is None:
            return self._close(locked=False)
        self.lock_host_dir()
        if not self._retry("claim the host", self.claim_host):
            return self._close(locked=False)
        prepared = self.pool.submit(jobs.run, Job(JobKind.PREPARE)).result()  # before the first build
        if not prepared.ok:
            raise ECError(prepared.reason or "preparing the host failed")
        if self._retry("register in Placement", self.register) is None:
            return self._close(locked=False)
        self.start_metadata_server()
        threading.Thread(target=self.keep_alive, name="liveness", daemon=True).start()
        self.start_lifecycle_events()
        publisher = ConsolePublisher(self.store, self.host, Path(self.cfg.instances_path), self.cfg.console_interval)
        threading.Thread(target=publisher.run, args=(self.stopping,), name="console", daemon=True).start()
        self.resync()
        LOG.info("host %s (%s) registered; %d workers on %s", self.host, self.name,
                 self.cfg.workers, self.cfg.libvirt.uri)
        sd_notify(f"READY=1\nSTATUS=serving host {self.name}")
        next_resync = time.monotonic() + self.cfg.resync_interval
        while not self.stopping.is_set():
            try:
                if self.resync_now.is_set() or time.monotonic() >= next_resync:
                    self.resync_now.clear()
                    self.resync()
                    next_resync = time.monotonic() + self.cfg.resync_interval
                if self.domains_changed.is_set():
                    self.domains_changed.clear()
                    self.list_domains()
                self._due()
                self._handle(timeout=0.5)
            except ECError as exc:  # etcd or Placement away: back off, the resync redoes the work
                LOG.warning("%s; retrying in 2s", exc)
                self.stopping.wait(2.0)
                self.resync_now.set()
            except Exception:  # noqa: BLE001 - a bug must not stop every instance of the host
                LOG.exception("unexpected error in the loop; resyncing in 2s")
                self.stopping.wait(2.0)
                self.resync_now.set()
        return self._close(locked=not self.lost_host)

    def _handle(self, timeout: float) -> None:
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            return
        if isinstance(event, Reconcile):
            with self.lock:
                self.queued.discard(event.uuid)
            self.reconcile(event.uuid)
        elif isinstance(event, Finished):
            self.finish(event.job, event.result)
        else:
            self.on_domains(event.result, event.listed_at)

    def enqueue(self, uuid: str) -> None:
        with self.lock:
            if uuid in self.queued:
                return
            self.queued.add(uuid)
        self.events.put(Reconcile(uuid))

    def resync(self) -> None:
        """List this host's requests, make sure the watch runs, reconcile them all, and compare
        the hypervisor's domains with them (orphans, drift)."""
        found = self.store.host_requests(self.host)
        if self.watch is None:
            self.watch = self.store.watch(contract.requests_prefix(self.store.prefix, self.host),
                                          found.revision + 1, self.on_watch_event, self.on_watch_state)
            LOG.info("watching requests from revision %d (%d known)", found.revision + 1, len(found.requests))
        for uuid in [*found.requests, *found.bad]:
            self.enqueue(uuid)
        for uuid in set(self.backoff) - set(found.requests) - set(found.bad):
            del self.backoff[uuid]
        self.list_domains()

    def list_domains(self) -> None:
        """Compare the hypervisor's domains with this host's requests (orphans, drift: on_domains).
        The hypervisor is asked first and etcd read when it answers: a domain listed then was
        requested before, so a request created meanwhile cannot look orphaned."""
        listed_at = time.monotonic()
        self._run_job(Job(JobKind.LIST_DOMAINS), lambda result: self.events.put(Domains(result, listed_at)))

    def start_lifecycle_events(self) -> None:
        """Listen to the hypervisor's lifecycle events in a process of their own (only workers
        load libvirt), so that a guest's power-off or a crash is seen at once, not at the next
        resync; restarted should it die. test:///default keeps each worker's domains inside that
        worker, where no listener can see them: nothing to listen to there."""
        if self.cfg.libvirt.uri.startswith("test:"):
            return
        ctx = jobs.context()
        changed: multiprocessing.Queue[str] = ctx.Queue()

        def supervise() -> None:
            proc: multiprocessing.process.BaseProcess | None = None
            while not self.stopping.is_set():
                if proc is None or not proc.is_alive():
                    if proc is not None:
                        LOG.warning("lifecycle event listener exited (%s); starting another", proc.exitcode)
                        self.domains_changed.set()  # what it may have missed
                    proc = ctx.Process(target=jobs.watch_events, args=(worker_settings(self.cfg), changed),
                                       name="ecompute-events", daemon=True)
                    proc.start()
                try:
                    uuid = changed.get(timeout=1.0)
                except queue.Empty:
                    continue
                LOG.debug("lifecycle event of %s", uuid)
                self.domains_changed.set()

        threading.Thread(target=supervise, name="lifecycle events", daemon=True).start()

    def on_watch_event(self, key: str, revision: int) -> None:
        """Runs in the watch thread: only note what changed, the loop does the work."""
        uuid = contract.instance_from_request_key(self.store.prefix, self.host, key)
        if uuid:
            self.enqueue(uuid)

    def on_watch_state(self, state: str) -> None:
        self.metrics.watch_state(state, self.store.etcd.endpoint)
        if state in ("up", "compacted"):
            LOG.info("etcd watch %s: resyncing", "back" if state == "up" else "compacted")
            self.resync_now.set()

    # -- liveness: one live daemon per host -------------------------------------------------

    def lock_host_dir(self) -> None:
        """Keep a second daemon on this machine out at once: a lock beside the instances directory."""
        path = Path(self.cfg.instances_path.rstrip("/") + ".lock")
        self._lockfile = path.open("a+")
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ECError(f"another ecompute already runs on {self.cfg.instances_path} "
                          f"(pid {path.read_text().strip() or '?'}); refusing to start") from None
        self._lockfile.truncate(0)
        self._lockfile.write(f"{os.getpid()}\n")
        self._lockfile.flush()

    def _take_alive_key(self) -> tuple[int | None, dict[str, Any]]:
        """Put PREFIX/alive/<host> on a new lease unless another live daemon holds it: (lease id or
        None, the holder's record). A key left on this machine by this very process (a lease lost
        track of across an etcd failover) or by a daemon here that died is ours to take: once we
        hold the lock beside the instances directory, no other daemon of this host runs here."""
        lease = self.store.claim_alive(self.host, self.cfg.lease_ttl, self.alive)
        if lease is not None:
            return lease, self.alive
        holder = self.store.alive_record(self.host) or {}
        pid = holder.get("pid")
        if holder.get("hostname") != self.alive["hostname"] or (pid != os.getpid() and _running(pid)):
            return None, holder
        LOG.warning("alive key of %s here (pid %s) found on a lapsed lease; taking it again",
                    "this daemon" if pid == os.getpid() else "a daemon that died", pid)
        self.store.clear_alive(self.host)
        lease = self.store.claim_alive(self.host, self.cfg.lease_ttl, self.alive)
        return lease, (self.alive if lease is not None else self.store.alive_record(self.host) or {})

    def claim_host(self) -> bool:
        """Be the only daemon of this host, or refuse to start: the alive key (created only where
        none exists) keeps out a daemon elsewhere with the same host uuid. False if asked to stop."""
        deadline = time.monotonic() + self.cfg.lease_ttl + 2
        while not self.stopping.is_set():
            self.lease, holder = self._take_alive_key()
            if self.lease is not None:
                return True
            if time.monotonic() > deadline:
                raise ECError(f"host {self.host} is served by another live ecompute (pid {holder.get('pid')} "
                              f"on {holder.get('hostname')}); refusing to start")
            self.stopping.wait(0.5)
        return False

    def keep_alive(self) -> None:
        """Keep PREFIX/alive/<host> on its lease; claim it again if it lapsed (e.g. etcd was down),
        and stop serving if another daemon took the host meanwhile."""
        while not self.stopping.is_set():
            try:
                refreshed = self.lease is not None and self.store.refresh_alive(self.lease)
                if self.lease is not None and not refreshed:
                    self.metrics.lease_refresh_failed("expired")
                if not refreshed:
                    self.lease, holder = self._take_alive_key()
                    if self.lease is None:
                        LOG.error("host %s was taken over by another ecompute (pid %s on %s); stopping",
                                  self.host, holder.get("pid"), holder.get("hostname"))
                        self.lost_host = True
                        self.stopping.set()
                        return
                    LOG.info("alive on a %ds lease", self.cfg.lease_ttl)
            except ECError as exc:
                self.metrics.lease_refresh_failed("error")
                LOG.debug("lease refresh failed: %s", exc)
            self.stopping.wait(self.cfg.lease_ttl / 3)

    # -- reconcile: read, decide (reconciler.py), do ---------------------------------------

    def read(self, uuid: str) -> tuple[Request | None, Rev, Status | None, int]:
        """The request of `uuid` on this host and where it was read, and its status. A malformed
        request reads as None with its key's revision (reported here; nothing acts on it)."""
        try:
            request, rev = self.store.get_request(self.host, uuid)
        except BadRecord as exc:  # the key is there (rev) but says nothing we can act on
            request, rev = None, self.store.request_rev(self.host, uuid)
            self.report_bad(uuid, rev, str(exc))
        status, status_mod = self.store.get_status(uuid)
        self.metrics.seen(uuid, rev.create != 0, request, status)
        return request, rev, status, status_mod

    def report_bad(self, uuid: str, rev: Rev, why: str) -> None:
        """A request nobody can act on: say so in its status (if its key names an instance)."""
        if uuid not in self.bad_seen:
            LOG.warning("request %s is malformed, skipping it: %s", uuid, why)
            self.bad_seen.add(uuid)
        if looks_like_uuid(uuid):
            status, _ = self.store.get_status(uuid)
            self.put_status(uuid, Actual.ERROR, status, rev, reason=f"malformed request: {why}")

    def reconcile(self, uuid: str) -> None:
        """Compare requested with actual for one instance and start what closes the gap."""
        if uuid in self.inflight:
            self.cancel_if_unwanted(self.inflight[uuid])
            return  # finish() looks again when the running job ends
        request, rev, status, _ = self.read(uuid)
        if request is None and rev.create:
            return  # malformed (reported by read): not an orphan, not buildable; destroy --force removes it
        action = reconciler.decide(uuid, request, status, replace(self.facts, owner=rev.create))
        if action is None:
            return
        if action.record is not None and not self.put_status(uuid, action.record, status, rev):
            self.enqueue(uuid)  # the request changed since it was read: read again, decide again
            return
        self.submit(action.job)

    def cancel_if_unwanted(self, job: Job) -> None:
        """A build whose instance was deleted (or moved away) meanwhile: tell it to stop its
        download (workers have no etcd; they look for this marker between chunks)."""
        if job.kind != JobKind.BUILD:
            return
        request, rev, _, _ = self.read(job.uuid)
        if request is None or rev.create != job.owner or request["desired"] == Desired.DELETED:
            jobs.cancel_marker(self.cfg.instances_path, job.uuid).touch()
            LOG.info("build of %s no longer wanted: asked it to stop", job.uuid)

    def submit(self, job: Job) -> None:
        self.inflight[job.uuid] = job
        LOG.info("%s %s%s", job.kind.value, job.uuid, f" {job.power}" if job.power else "")
        self._run_job(job, lambda result: self.events.put(Finished(job, result)))

    def finish(self, job: Job, result: JobResult) -> None:
        """Record a job's outcome, then reconcile again: the request may have changed meanwhile."""
        uuid = job.uuid
        del self.inflight[uuid]
        self.touched[uuid] = time.monotonic()
        if result.interrupted and self.stopping.is_set():
            LOG.warning("%s of %s interrupted by the shutdown; the next start redoes it", job.kind.value, uuid)
            return
        self.metrics.job_done(job.kind, result)
        request, rev, status, status_mod = self.read(uuid)
        if rev.create != job.owner:
            request = None  # deleted, moved away or made anew: this job's result is not its to record
        done = reconciler.report(job, result, status, request, self.facts)
        if done.note:
            LOG.info("%s", done.note)
        recorded = self.record(uuid, done, status, rev, status_mod)
        if request is not None and job.kind == JobKind.BUILD and done.state == Actual.ACTIVE:
            self.metrics.became_active(request, status)
        if not recorded:
            self.later(uuid)  # no hot loop while Placement is away
        elif done.remove:
            self.submit(Job(JobKind.REMOVE_ORPHAN, uuid))
        elif done.later:
            self.later(uuid)
        elif done.again:
            self.backoff.pop(uuid, None)
            self.enqueue(uuid)

    def record(self, uuid: str, done: reconciler.Report, status: Status | None, rev: Rev, status_mod: int) -> bool:
        """Carry out what a report says to record; False if a delete must wait for Placement."""
        if done.delete:
            if not self.free_allocation(uuid):
                self.put_status(uuid, Actual.DELETING, status, rev,
                                reason="waiting for Placement to free the allocation")
                return False
            if self.store.finish_delete(self.host, uuid, rev):
                LOG.info("instance %s deleted", uuid)
                self.backoff.pop(uuid, None)
                self.metrics.forget(uuid)
        elif done.state is not None:
            self.put_status(uuid, done.state, status, rev, reason=done.reason, domain=done.domain, ip=done.ip,
                            reboots=done.reboots, event=done.event, held=done.held)
        if done.free:
            self.free_allocation(uuid)
        if done.drop_status:
            self.store.drop_status(uuid, status_mod)
        return True

    def later(self, uuid: str) -> None:
        """Look at `uuid` again after a backoff: 1 s, doubling up to the resync interval."""
        delay = min(self.backoff.get(uuid, (0.0, 0.5))[1] * 2, max(self.cfg.resync_interval, 1.0), 60.0)
        self.backoff[uuid] = (time.monotonic() + delay, delay)

    def _due(self) -> None:
        now = time.monotonic()
        for uuid, (when, delay) in list(self.backoff.items()):
            if when <= now:
                self.backoff[uuid] = (float("inf"), delay)  # keeps its delay until it succeeds
                self.enqueue(uuid)

    def on_domains(self, result: JobResult, listed_at: float) -> None:
        """Compare the hypervisor's domains with this host's requests: remove the domains no
        request names (orphans, never touching Placement), record what changed behind our back."""
        if not result.ok:
            self.metrics.job_done(JobKind.LIST_DOMAINS, result)
            LOG.warning("cannot list domains: %s", result.reason)
            return
        observed = dict(result.domains)
        found = self.store.host_requests(self.host)
        for uuid in observed:
            if uuid not in found.requests and uuid not in found.bad and uuid not in self.inflight:
                self.submit(Job(JobKind.REMOVE_ORPHAN, uuid))
        for uuid in found.requests:
            if uuid in self.inflight or self.touched.get(uuid, 0.0) >= listed_at:
                continue  # a job changed it since the list was taken: the list is stale for it
            status, _ = self.store.get_status(uuid)
            change = reconciler.drift(status, observed.get(uuid), found.requests[uuid])
            if change is not None and change.state is not None:
                LOG.warning("instance %s: %s", uuid, change.reason)
                self.put_status(uuid, change.state, status, found.revs[uuid], reason=change.reason,
                                held=change.held)
                self.enqueue(uuid)

    def free_allocation(self, uuid: str) -> bool:
        try:
            self.placement.delete_allocations(uuid)
            return True
        except ECError as exc:
            LOG.warning("could not free allocation of %s: %s (will retry)", uuid, exc)
            return False

    def put_status(self, uuid: str, state: Actual, old: Status | None, owner: Rev, *, reason: str | None = None,
                   domain: DomainRecord | None = None, ip: str | None = None, reboots: int | None = None,
                   event: str | None = None, held: int | None = None) -> bool:
        """Write the actual state, unless it would only repeat what is there; only while the
        request read at `owner` is still this host's. False if it no longer is."""
        changes = (domain, ip, reboots, event, held) != (None, None, None, None, None)
        if old and old["state"] == state and old.get("reason") == reason and not changes:
            return True
        written = self.store.put_status(contract.new_status(uuid, self.host, state, reason=reason, domain=domain,
                                                            ip=ip, old=old, reboots=reboots, event=event,
                                                            held=held), owner)
        if written:
            self.metrics.recorded(uuid, state)
        return written

    # -- Placement registration and the metadata server -------------------------------------

    def register(self) -> bool:
        """Create or update our provider with measured inventory (unlocking it) and traits."""
        inventory.register(self.placement, self.cfg)
        self.metrics.set_inventory(inventory.inventory(self.cfg))
        self._put_host("up")
        return True

    def lock_inventory(self) -> None:
        inventory.lock(self.placement, self.cfg)
        LOG.info("inventory locked (reserved = total)")

    def _put_host(self, state: str, reason: str | None = None) -> None:
        self.store.put_host({"uuid": self.host, "name": self.name, "hostname": inventory.hostname(),
                             "pid": os.getpid(), "state": state, "reason": reason,
                             "network": self.cfg.attachment(), "lease_ttl": self.cfg.lease_ttl,
                             "fence_margin": self.cfg.fence_margin(),
                             "updated_at": contract.now()})

    def serve_metrics(self, address: str) -> MetricsHooks:
        """Prometheus metrics on `address`; loaded only here, so that a host without them never
        loads prometheus_client (metrics.py)."""
        from etcd_compute.ecompute.metrics import Metrics
        from md_server.server import guest_facing
        served = Metrics(self.host, self.name, stats_pool=lambda: self._new_pool(1))
        served.serve(address, guest_facing(self.cfg))
        return served

    def start_metadata_server(self) -> None:
        """Serve cloud-init data on the metadata address, which PREPARE put on our bridge."""
        if not self.cfg.metadata.enabled or (self.cfg.bridge is None and self.cfg.network.mode == "none"):
            return
        from md_server.server import MetadataServer, guest_facing, serve_metrics
        try:
            server = MetadataServer((self.cfg.metadata.address, self.cfg.metadata.port), self.store, self.host)
        except OSError as exc:
            raise ECError(f"metadata server cannot listen on {self.cfg.metadata.address}:"
                          f"{self.cfg.metadata.port}: {exc.strerror}") from None
        threading.Thread(target=server.serve_forever, name="md_server", daemon=True).start()
        LOG.info("metadata server on http://%s:%d", self.cfg.metadata.address, self.cfg.metadata.port)
        if self.cfg.metadata.metrics:
            serve_metrics(self.cfg.metadata.metrics, server.registry, "metadata.metrics", guest_facing(self.cfg))

    def _retry(self, what: str, fn: Callable[[], T]) -> T | None:
        """Call fn until it works or we are asked to stop; None if stopped first.

        Only outages are waited out; an answer such as "that name is taken" is final.
        """
        delay = 0.5
        while not self.stopping.is_set():
            try:
                return fn()
            except (EtcdUnavailable, PlacementUnavailable, PlacementError) as exc:
                if isinstance(exc, PlacementError) and exc.status < 500:
                    raise  # a final answer (e.g. that name is taken), not an outage
                LOG.warning("cannot %s: %s; retrying in %.1fs", what, exc, delay)
                self.stopping.wait(delay)
                delay = min(delay * 2, 10.0)
        return None

    # -- shutdown ---------------------------------------------------------------------------

    def _close(self, locked: bool) -> int:
        LOG.info("stopping")
        sd_notify("STOPPING=1")
        rc = 0
        if self.watch is not None:
            self.watch.stop()
        deadline = time.monotonic() + self.cfg.shutdown_timeout
        while self.inflight and time.monotonic() < deadline:
            try:
                self._handle(timeout=0.2)
            except ECError as exc:
                LOG.warning("while finishing jobs: %s", exc)
        if self.inflight:
            LOG.warning("leaving %d jobs unfinished; the next start reconciles them", len(self.inflight))
        self.metrics.close()
        processes = list(getattr(self.pool, "_processes", {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for proc in processes:  # unfinished jobs are cut off: their BUILDING/DELETING state stays
            proc.terminate()
            proc.join(5)
        if locked:
            try:
                self.lock_inventory()
                self._put_host("locked")
            except ECError as exc:
                LOG.error("could not lock inventory: %s", exc)
                rc = 1
        if self._store is not None:
            if self.lease is not None:
                try:
                    self.store.revoke_alive(self.lease)  # DOWN at once, not after the TTL
                except ECError:
                    pass
            self.store.close()
        return rc


def _running(pid: object) -> bool:
    """Is `pid` a live process on this machine (a daemon of ours that still runs)?"""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return Path(f"/proc/{pid}").exists()


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) how we are; a no-op when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract socket namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        LOG.warning("cannot notify systemd at %s: %s", address, exc)


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="compute.yaml (default: ./compute.yaml, /etc/etcd-compute/compute.yaml).")
def main(config_path: str | None) -> None:
    """Run the per-host daemon."""
    try:
        cfg = config.load_compute(config_path)
    except ConfigError as exc:
        click.echo(f"ecompute: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    logging.basicConfig(level=cfg.log_level, stream=sys.stderr,
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    daemon = Daemon(cfg)

    def stop(signum: int, _frame: Any) -> None:
        LOG.info("got %s", signal.Signals(signum).name)
        daemon.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        rc = daemon.run()
    except ECError as exc:
        LOG.error("%s", exc)
        daemon.stopping.set()
        daemon.pool.shutdown(wait=False, cancel_futures=True)
        rc = exc.exit_code
    sys.exit(rc)
