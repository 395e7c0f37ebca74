"""The reconcile loop: one thread that does all the deciding, and carries it out.

It takes events off a queue (an instance to reconcile, a finished job, the hypervisor's
list of domains, the host's lease lost or back), reads the instance's request and status
from etcd, asks reconciler.decide what to do, records the state that goes with it and
hands the job to a runner (the worker pool; in tests, threads over a fake driver); when
the job ends, reconciler.report says what to record and what the queue does next
(`Next`: done, again, later after a backoff, or parked until the request changes): one
switch, in the manner of controller-runtime's reconcileHandler. The watch, the pool's
threads and the host's liveness only put events on the queue.

Every job has a deadline (its kind's, from compute.yaml), past which the runner kills its
worker: a hung libvirt call or a dripping download ends as a named failure, retried with a
backoff, and after `retries` such failures in a row the instance is parked (a build in
ERROR; a power change left until asked again). While the host cannot prove its lease
(liveness.py), nothing that starts a domain is handed out, the jobs under way are ended,
and once the lease is back every instance is looked at afresh, and those the fence stopped
and the host still owns are started again. While the hypervisor does not answer, the host
is unhealthy (no new placements, see daemon.py) and builds wait instead of failing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from etcd_compute import contract
from etcd_compute.contract import BadRecord, DomainRecord, Request, Status, looks_like_uuid
from etcd_compute.ecompute import jobs, reconciler
from etcd_compute.ecompute import proof as fence
from etcd_compute.ecompute.hooks import MetricsHooks
from etcd_compute.ecompute.jobs import Job, JobKind, JobResult
from etcd_compute.ecompute.pool import Runner
from etcd_compute.ecompute.reconciler import Next
from etcd_compute.errors import ECError
from etcd_compute.etcd import PrefixWatch
from etcd_compute.states import Actual, Desired
from etcd_compute.store import Rev, Store

LOG = logging.getLogger("ecompute")
STARTS = (JobKind.BUILD, JobKind.REBOOT)  # and POWER to anything but STOPPED: jobs that let a guest run
HEALTH_PROBE = 5.0  # seconds between looks at an unhealthy hypervisor


class Lease(Protocol):
    """What the loop needs of the host's liveness (liveness.py)."""

    epoch: int

    def proven(self) -> bool: ...


class Placement(Protocol):
    def delete_allocations(self, consumer: str) -> object: ...


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
class Settings:
    """What the loop needs of compute.yaml."""

    host: str
    resync_interval: float
    deadlines: dict[JobKind, float | None]
    retries: int = 3
    instances_path: str = ""
    fenced_path: Path | None = None  # the fence's record of what it stopped (fence.py); None: no fence
    stop_timeout: float = 60.0  # the host's clean-shutdown time, within deadlines of POWER and REBOOT
    crash_restarts: int = 0  # a guest that panicked is started again up to this often in a row


@dataclass
class _Failures:
    kind: JobKind
    count: int = 0


@dataclass
class Loop:
    settings: Settings
    store: Store
    placement: Placement
    runner: Runner
    lease: Lease
    metrics: MetricsHooks = field(default_factory=MetricsHooks)
    # Called with (healthy, why) when the hypervisor stops or starts answering (daemon.py: the
    # host's record and its inventory in Placement).
    on_health: Callable[[bool, str | None], None] = lambda healthy, why: None

    def __post_init__(self) -> None:
        self.host = self.settings.host
        self.facts = reconciler.Facts(host=self.host, retries=self.settings.retries,
                                      crash_restarts=self.settings.crash_restarts)
        self.events: queue.Queue[Event] = queue.Queue()
        self.queued: set[str] = set()
        self.lock = threading.Lock()
        self.inflight: dict[str, Job] = {}
        self.watch: PrefixWatch | None = None
        self.resync_now = threading.Event()
        self.domains_changed = threading.Event()
        self.touched: dict[str, float] = {}  # when a job of each instance last ended (pruned at resync)
        self.backoff: dict[str, tuple[float, float]] = {}  # uuid -> (when to look again, last delay)
        self.failures: dict[str, _Failures] = {}
        self.parked: dict[str, int] = {}  # uuid -> the request's mod revision when it was parked
        self.bad_seen: set[str] = set()
        self.unfreed: set[str] = set()  # ERROR instances whose allocation Placement did not free yet
        self.cut_short: dict[str, str] = {}  # jobs ended by a lapse of the lease: said when they start again
        self.fenced: dict[str, dict[str, Any]] = {}  # stopped by the fence; reported once the lease is back
        self.early_ready: dict[str, float] = {}  # a guest's ready that came while a job of its instance ran
        self.unhealthy: str | None = None  # why the hypervisor is not answering
        self.next_probe = 0.0
        self.next_resync = 0.0
        self.progress = time.monotonic()  # the last turn of the loop (the watchdog's)
        self.regained_at = 0.0  # when the lease was last proven again: listings older than that are stale

    # -- the loop -------------------------------------------------------------------------------

    def turn(self, timeout: float = 0.5) -> None:
        """One turn: resync if due, compare the domains if they changed, wake backoffs, handle one event."""
        self.progress = time.monotonic()
        if self.resync_now.is_set() or time.monotonic() >= self.next_resync:
            self.resync_now.clear()
            self.resync()
            self.next_resync = time.monotonic() + self.settings.resync_interval
        self.keep_watching()
        if self.unhealthy and time.monotonic() >= self.next_probe:
            self.next_probe = time.monotonic() + HEALTH_PROBE
            self.list_domains()
        if self.domains_changed.is_set():
            self.domains_changed.clear()
            self.list_domains()
        self._due()
        self._handle(timeout)

    def run(self, stopping: threading.Event) -> None:
        """Turn until `stopping`; an outage or a bug costs a pause and a resync, never the loop."""
        while not stopping.is_set():
            try:
                self.turn()
            except ECError as exc:  # etcd or Placement away: back off, the resync redoes the work
                LOG.warning("%s; retrying in 2s", exc)
                stopping.wait(2.0)
                self.resync_now.set()
            except Exception:  # noqa: BLE001 - a bug must not stop every instance of the host
                LOG.exception("unexpected error in the loop; resyncing in 2s")
                stopping.wait(2.0)
                self.resync_now.set()

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
        elif isinstance(event, Domains):
            self.on_domains(event.result, event.listed_at)
        elif isinstance(event, Ready):
            self.ready(event)
        else:
            self.regained()

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
        for uuid in sorted(self.unfreed):
            if self.free_allocation(uuid):
                self.unfreed.discard(uuid)
        known = set(found.requests) | set(found.bad)
        for table in (self.backoff, self.failures, self.parked, self.touched, self.cut_short):
            for uuid in set(table) - known - set(self.inflight):
                del table[uuid]
        self.list_domains()

    def keep_watching(self) -> None:
        """A watch whose thread died (a bug it could not survive) is started again from the last
        revision it delivered, and everything looked at again: the loop never runs blind."""
        watch = self.watch
        if watch is None or watch.alive():
            return
        LOG.error("the watch on this host's requests stopped; starting it again from revision %d", watch.revision + 1)
        self.metrics.loop_restarted("watch")
        self.watch = self.store.watch(watch.prefix, watch.revision + 1, self.on_watch_event, self.on_watch_state)
        self.resync_now.set()

    def list_domains(self) -> None:
        """Compare the hypervisor's domains with this host's requests (orphans, drift: on_domains).
        The hypervisor is asked first and etcd read when it answers: a domain listed then was
        requested before, so a request created meanwhile cannot look orphaned."""
        listed_at = time.monotonic()
        self._run(Job(JobKind.LIST_DOMAINS, epoch=self.lease.epoch),
                  lambda result: self.events.put(Domains(result, listed_at)))

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

    def stop_watching(self) -> None:
        if self.watch is not None:
            self.watch.stop()

    # -- the guests' word (the metadata server calls this from its threads) ------------------------

    def guest_ready(self, uuid: str, at: float) -> None:
        self.events.put(Ready(uuid, at))

    def ready(self, event: Ready) -> None:
        """Record that the guest's current boot has finished (reconciler.ready). While a job of
        its instance runs (a start or reboot may be recorded any moment) the word waits for it."""
        if event.uuid in self.inflight:
            self.early_ready[event.uuid] = event.at
            return
        request, rev, status, _ = self.read(event.uuid) if looks_like_uuid(event.uuid) else (None, Rev(), None, 0)
        done = reconciler.ready(status, event.at) if request is not None else None
        if done is None or done.state is None:
            LOG.info("instance %s: its guest's word that it booted changes nothing", event.uuid)
            return
        if self.put_status(event.uuid, done.state, status, rev, reason=done.reason, event=done.event,
                           crashes=done.crashes, ready_at=done.ready_at):
            self.metrics.guest_ready(done.ready_seconds)

    # -- the host's lease (liveness.py calls these from its thread) -----------------------------

    def lapsed(self, why: str) -> None:
        """The host cannot prove its lease: end every job now (their domains are being fenced)."""
        self.runner.kill_all(f"the host lost its lease: {why}")

    def regain(self) -> None:
        self.events.put(Regained())

    def regained(self) -> None:
        """The lease is proven again: what the fence stopped is reported and, where this host
        still owns it, started again; everything is looked at afresh."""
        self.regained_at = time.monotonic()
        self.take_fenced()
        self.resync_now.set()

    def take_fenced(self) -> None:
        """Report what the fence stopped (its record, fence.py), once: an instance this host still
        owns is recorded STOPPED and so started again (reconciler.fenced); one it lost is an orphan."""
        if self.settings.fenced_path is None:
            return
        self.fenced.update(fence.take_fenced(self.settings.fenced_path))
        for uuid, record in sorted(self.fenced.items()):
            request, rev = self.store.get_request(self.host, uuid) if looks_like_uuid(uuid) else (None, Rev())
            status, _ = self.store.get_status(uuid)
            change = reconciler.fenced(status, request, record) if request is not None else None
            if change is not None and change.state is not None:
                LOG.warning("instance %s: %s", uuid, change.reason)
                self.put_status(uuid, change.state, status, rev, reason=change.reason, held=change.held)
                self.enqueue(uuid)
            del self.fenced[uuid]

    # -- reconcile: read, decide (reconciler.py), do --------------------------------------------

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
        epoch = self.lease.epoch  # the decision stands on what is read under this lease, and no other
        if self.settings.fenced_path is not None and self.settings.fenced_path.exists() and self.lease.proven():
            self.take_fenced()  # what the fence stopped is recorded first: etcd may still say it runs
        request, rev, status, _ = self.read(uuid)
        if request is None and rev.create:
            return  # malformed (reported by read): not an orphan, not buildable; destroy --force removes it
        if self.parked.get(uuid) == rev.mod:
            return  # it failed the same way too often: left alone until its request changes
        self.parked.pop(uuid, None)
        action = reconciler.decide(uuid, request, status, replace(self.facts, owner=rev.create))
        if action is None:
            return
        if self.held_back(action.job, epoch):
            return  # the lease or the hypervisor is away: the resync once it is back looks again
        record = action.record
        again = self.cut_short.pop(uuid, None)
        if record is not None and (status is None or status["state"] != record or again) \
                and not self.put_status(uuid, record, status, rev, reason=again and f"{again}; trying again"):
            self.enqueue(uuid)  # the request changed since it was read: read again, decide again
            return
        self.submit(action.job, epoch)

    def held_back(self, job: Job, epoch: int) -> bool:
        """May this job not start now? What lets a guest run waits for a proven lease, and must
        have been decided under it: a read from before the host claimed its lease anew (a daemon
        that was stopped between its read and this) may predate its instance's evacuation. Every
        job but the hypervisor's listing waits for a hypervisor that answers."""
        starts = job.kind in STARTS or (job.kind == JobKind.POWER and job.power != Actual.STOPPED)
        return (starts and (not self.lease.proven() or self.lease.epoch != epoch)) or self.unhealthy is not None

    def cancel_if_unwanted(self, job: Job) -> None:
        """A build whose instance was deleted (or moved away) meanwhile: tell it to stop its
        download (workers have no etcd; they look for this marker between chunks). A stop or
        reboot waiting for its guest to shut down, when a `--force` came meanwhile: tell it to
        pull the plug now."""
        shutting_down = job.kind == JobKind.REBOOT or (job.kind == JobKind.POWER and job.power == Actual.STOPPED)
        if job.kind != JobKind.BUILD and not shutting_down:
            return
        request, rev, _, _ = self.read(job.uuid)
        if job.kind == JobKind.BUILD:
            if request is None or rev.create != job.owner or request["desired"] == Desired.DELETED:
                jobs.cancel_marker(self.settings.instances_path, job.uuid).touch()
                LOG.info("build of %s no longer wanted: asked it to stop", job.uuid)
        elif request is not None and rev.create == job.owner and not job.force and contract.shutdown_of(request)[1]:
            jobs.hurry_marker(self.settings.instances_path, job.uuid).touch()
            LOG.info("%s of %s: forced meanwhile: asked it to power the guest off now", job.kind.value, job.uuid)

    def submit(self, job: Job, epoch: int | None = None) -> None:
        """Hand `job` to the runner, as decided under lease `epoch` (default: the current one);
        the worker starts no domain under another (worker.may_start)."""
        job = replace(job, epoch=self.lease.epoch if epoch is None else epoch)
        self.inflight[job.uuid] = job
        LOG.info("%s %s%s", job.kind.value, job.uuid, f" {job.power}" if job.power else "")
        self._run(job, lambda result: self.events.put(Finished(job, result)))

    def _run(self, job: Job, then: Callable[[JobResult], None]) -> None:
        self.runner.submit(job, self.deadline(job), then)

    def deadline(self, job: Job) -> float | None:
        """The job kind's deadline; a stop or reboot that asked for its own clean-shutdown time
        (or none: --force) has it in place of the host's stop_timeout, so a long one is not cut
        off by the deadline, and a forced one is not waited for longer than the call needs."""
        base = self.settings.deadlines.get(job.kind)
        if base is None or job.kind not in (JobKind.POWER, JobKind.REBOOT):
            return base
        if job.force:
            return base - self.settings.stop_timeout
        if job.stop_timeout is not None:
            return base - self.settings.stop_timeout + job.stop_timeout
        return base

    def finish(self, job: Job, result: JobResult) -> None:
        """Record a job's outcome, then act as the report says (Next): the request may have changed."""
        uuid = job.uuid
        del self.inflight[uuid]
        self.touched[uuid] = time.monotonic()
        self.metrics.job_done(job.kind, result)
        if result.hypervisor_down or (result.timed_out and job.kind == JobKind.LIST_DOMAINS):
            self.sick(result.reason or "the hypervisor does not answer")
        if not result.ok and (job.epoch != self.lease.epoch or not self.lease.proven()):
            # Its failure may be the fence's doing (a QEMU killed as it started): nothing to record
            # against the instance; once the lease is proven again, a resync looks afresh.
            LOG.info("%s of %s failed while the host's lease was not proven: %s", job.kind.value, uuid, result.reason)
            self.cut_short[uuid] = f"its {job.kind.value} was cut short while the host's lease was not proven"
            self.later(uuid)
            return
        request, rev, status, status_mod = self.read(uuid)
        if rev.create != job.owner:
            request = None  # deleted, moved away or made anew: this job's result is not its to record
        done = reconciler.report(job, result, status, request,
                                 replace(self.facts, failures=self._count(uuid, job.kind, result)))
        if done.note:
            LOG.info("%s", done.note)
        recorded = self.record(uuid, done, status, rev, status_mod)
        if request is not None and job.kind == JobKind.BUILD and done.state == Actual.ACTIVE:
            self.metrics.became_active(request, status)
        if done.remove:  # (of this incarnation: its status, if still requested here, is not an orphan's)
            self.submit(Job(JobKind.REMOVE_ORPHAN, uuid, owner=job.owner))
        self.then(uuid, done.next if recorded else Next.LATER, rev)
        if uuid in self.early_ready and uuid not in self.inflight:
            self.events.put(Ready(uuid, self.early_ready.pop(uuid)))

    def then(self, uuid: str, next_: Next, rev: Rev) -> None:
        """The one switch from a report to what the queue does with the instance."""
        if next_ == Next.AGAIN:
            self.backoff.pop(uuid, None)
            self.enqueue(uuid)
        elif next_ == Next.LATER:
            self.later(uuid)
        elif next_ == Next.PARK:
            self.parked[uuid] = rev.mod
            self.backoff.pop(uuid, None)
            LOG.warning("instance %s parked until its request changes", uuid)
        else:
            self.backoff.pop(uuid, None)

    def _count(self, uuid: str, kind: JobKind, result: JobResult) -> int:
        """Failures of `kind` in a row for `uuid` before this result, and count this one."""
        if result.ok:
            self.failures.pop(uuid, None)
            return 0
        if result.interrupted or result.fenced or result.hypervisor_down:
            return self.failures[uuid].count if uuid in self.failures and self.failures[uuid].kind == kind else 0
        known = self.failures.get(uuid)
        before = known.count if known is not None and known.kind == kind else 0
        self.failures[uuid] = _Failures(kind, before + 1)
        return before

    def record(self, uuid: str, done: reconciler.Report, status: Status | None, rev: Rev, status_mod: int) -> bool:
        """Carry out what a report says to record; False if a delete must wait for Placement."""
        if done.delete:
            if not self.free_allocation(uuid):
                self.put_status(uuid, Actual.DELETING, status, rev,
                                reason="waiting for Placement to free the allocation")
                return False
            if self.store.finish_delete(self.host, uuid, rev):
                LOG.info("instance %s deleted", uuid)
                for table in (self.backoff, self.failures, self.parked, self.touched, self.cut_short):
                    table.pop(uuid, None)
                self.metrics.forget(uuid)
        elif done.state is not None:
            self.put_status(uuid, done.state, status, rev, reason=done.reason, domain=done.domain, ip=done.ip,
                            reboots=done.reboots, event=done.event, held=done.held, crashes=done.crashes,
                            booted_at=done.booted_at)
        if done.free and not self.free_allocation(uuid):
            self.unfreed.add(uuid)  # after the state: a daemon that dies between leaks, never overcommits
        if done.drop_status:
            self.store.drop_status(uuid, status_mod)
        return True

    def later(self, uuid: str) -> None:
        """Look at `uuid` again after a backoff: 1 s, doubling up to the resync interval (60 s at most)."""
        delay = min(self.backoff.get(uuid, (0.0, 0.5))[1] * 2, max(self.settings.resync_interval, 1.0), 60.0)
        self.backoff[uuid] = (time.monotonic() + delay, delay)

    def _due(self) -> None:
        now = time.monotonic()
        for uuid, (when, delay) in list(self.backoff.items()):
            if when <= now:
                self.backoff[uuid] = (float("inf"), delay)  # keeps its delay until it succeeds
                self.enqueue(uuid)

    # -- the hypervisor's view -------------------------------------------------------------------

    def sick(self, why: str) -> None:
        """The hypervisor does not answer: the host is unhealthy until a listing works again."""
        if self.unhealthy is None:
            LOG.error("the hypervisor does not answer (%s): this host takes nothing new until it does", why)
            self.unhealthy = why
            self.next_probe = time.monotonic() + HEALTH_PROBE
            self.on_health(False, why)

    def on_domains(self, result: JobResult, listed_at: float) -> None:
        """Compare the hypervisor's domains with this host's requests: remove the domains no
        request names (orphans, never touching Placement), record what changed behind our back."""
        if not result.ok:
            LOG.warning("cannot list domains: %s", result.reason)
            return
        if self.unhealthy is not None:
            LOG.warning("the hypervisor answers again: this host is healthy")
            self.unhealthy = None
            self.on_health(True, None)
            self.resync_now.set()
        if not self.lease.proven() or listed_at < self.regained_at:
            return  # the fence may be stopping domains, or has: that is no guest's doing (take_fenced)
        self.take_fenced()
        observed = dict(result.domains)
        found = self.store.host_requests(self.host)
        for uuid in observed:
            if uuid not in found.requests and uuid not in found.bad and uuid not in self.inflight:
                self.submit(Job(JobKind.REMOVE_ORPHAN, uuid))
        for uuid in found.requests:
            if uuid in self.inflight or self.touched.get(uuid, 0.0) >= listed_at or uuid in self.fenced:
                continue  # a job changed it since the list was taken: the list is stale for it
            status, _ = self.store.get_status(uuid)
            if uuid in observed and status is not None and status["state"] == Actual.ERROR:
                # A failed build leaves nothing: this domain outlived it (a hung start that went on
                # after its worker was killed at the deadline).
                self.submit(Job(JobKind.REMOVE_ORPHAN, uuid, owner=found.revs[uuid].create))
                continue
            change = reconciler.drift(status, observed.get(uuid), found.requests[uuid], self.facts)
            if change is not None and change.state is not None:
                LOG.warning("instance %s: %s", uuid, change.reason)
                self.put_status(uuid, change.state, status, found.revs[uuid], reason=change.reason,
                                held=change.held, crashes=change.crashes)
                self.enqueue(uuid)

    # -- writing --------------------------------------------------------------------------------

    def free_allocation(self, uuid: str) -> bool:
        try:
            self.placement.delete_allocations(uuid)
            return True
        except ECError as exc:
            LOG.warning("could not free allocation of %s: %s (will retry)", uuid, exc)
            return False

    def put_status(self, uuid: str, state: Actual, old: Status | None, owner: Rev, *, reason: str | None = None,
                   domain: DomainRecord | None = None, ip: str | None = None, reboots: int | None = None,
                   event: str | None = None, held: int | None = None, crashes: int | None = None,
                   booted_at: str | None = None, ready_at: str | None = None) -> bool:
        """Write the actual state, unless it would only repeat what is there; only while the
        request read at `owner` is still this host's. False if it no longer is."""
        changes = (domain, ip, reboots, event, held, crashes, booted_at, ready_at) != (None,) * 8
        if old and old["state"] == state and old.get("reason") == reason and not changes:
            return True
        written = self.store.put_status(contract.new_status(uuid, self.host, state, reason=reason, domain=domain,
                                                            ip=ip, old=old, reboots=reboots, event=event,
                                                            held=held, crashes=crashes, booted_at=booted_at,
                                                            ready_at=ready_at), owner)
        if written:
            self.metrics.recorded(uuid, state)
        return written
