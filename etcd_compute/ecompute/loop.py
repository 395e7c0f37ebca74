"""The reconcile loop: one thread that does all the deciding, and carries it out.

It takes events off its backlog (backlog.py: an instance to reconcile, a finished job, the
hypervisor's list of domains, the host's lease back, a guest's word that it booted), reads
the instance's request and status from etcd (records.py), asks reconciler.decide what to do,
records the state that goes with it and hands the job to a runner (the worker pool; in
tests, threads over a fake driver); when the job ends, reconciler.report says what to record
and what the backlog does next (`Next`: done, again, later after a backoff, or parked until
the request changes): one switch, in the manner of controller-runtime's reconcileHandler.
The watch, the pool's threads and the host's liveness only put events on the backlog.

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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from etcd_compute import contract
from etcd_compute.contract import Status, looks_like_uuid
from etcd_compute.ecompute import jobs, reconciler
from etcd_compute.ecompute import proof as fence
from etcd_compute.ecompute.backlog import Backlog, Domains, Finished, Ready, Reconcile, Regained
from etcd_compute.ecompute.hooks import MetricsHooks
from etcd_compute.ecompute.jobs import Job, JobKind, JobResult
from etcd_compute.ecompute.pool import Runner
from etcd_compute.ecompute.reconciler import Next
from etcd_compute.ecompute.records import Placement, Records
from etcd_compute.errors import ECError
from etcd_compute.etcd import PrefixWatch
from etcd_compute.states import Actual, Desired
from etcd_compute.store import Rev, Store

LOG = logging.getLogger("ecompute")
# Jobs that let a guest run (and POWER to anything but STOPPED), or take a volume over in Ceph from
# whoever has it open (VOLUMES): only under a proven lease, which the evacuated instance's new host
# holds, never a host cut off from etcd.
STARTS = (JobKind.BUILD, JobKind.REBOOT, JobKind.VOLUMES)
HEALTH_PROBE = 5.0  # seconds between looks at an unhealthy hypervisor


class Lease(Protocol):
    """What the loop needs of the host's liveness (liveness.py)."""

    epoch: int

    def proven(self) -> bool: ...


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
    pool: str | None = None  # the sharing provider of the host's Ceph pool (None: local disks, no volumes)


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
                                      crash_restarts=self.settings.crash_restarts, pool=self.settings.pool)
        self.backlog = Backlog(self.settings.resync_interval)
        self.records = Records(self.host, self.store, self.placement, self.metrics)
        self.inflight: dict[str, Job] = {}
        self.watch: PrefixWatch | None = None
        self.resync_now = threading.Event()
        self.domains_changed = threading.Event()
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
        self.backlog.due()
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
        event = self.backlog.get(timeout)
        if event is None:
            return
        if isinstance(event, Reconcile):
            self.reconcile(event.uuid)
        elif isinstance(event, Finished):
            self.finish(event.job, event.result)
        elif isinstance(event, Domains):
            self.on_domains(event.result, event.listed_at)
        elif isinstance(event, Ready):
            self.ready(event)
        else:
            self.regained()

    def resync(self) -> None:
        """List this host's requests, make sure the watch runs, reconcile them all, and compare
        the hypervisor's domains with them (orphans, drift)."""
        found = self.store.host_requests(self.host)
        if self.watch is None:
            self.watch = self.store.watch(contract.requests_prefix(self.store.prefix, self.host),
                                          found.revision + 1, self.on_watch_event, self.on_watch_state)
            LOG.info("watching requests from revision %d (%d known)", found.revision + 1, len(found.requests))
        for uuid in [*found.requests, *found.bad]:
            self.backlog.enqueue(uuid)
        self.records.free_unfreed()
        self.backlog.prune(set(found.requests) | set(found.bad) | set(self.inflight))
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
                  lambda result: self.backlog.put(Domains(result, listed_at)))

    def on_watch_event(self, key: str, revision: int) -> None:
        """Runs in the watch thread: only note what changed, the loop does the work."""
        uuid = contract.instance_from_request_key(self.store.prefix, self.host, key)
        if uuid:
            self.backlog.enqueue(uuid)

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
        self.backlog.put(Ready(uuid, at))

    def ready(self, event: Ready) -> None:
        """Record that the guest's current boot has finished (reconciler.ready). While a job of
        its instance runs (a start or reboot may be recorded any moment) the word waits for it."""
        if event.uuid in self.inflight:
            self.early_ready[event.uuid] = event.at
            return
        if not looks_like_uuid(event.uuid):
            return
        request, rev, status, _ = self.records.read(event.uuid)
        done = reconciler.ready(status, event.at) if request is not None else None
        if done is None or done.state is None:
            LOG.info("instance %s: its guest's word that it booted changes nothing", event.uuid)
            return
        if self.records.put_status(event.uuid, done.state, status, rev, reason=done.reason, event=done.event,
                                   crashes=done.crashes, ready_at=done.ready_at):
            self.metrics.guest_ready(done.ready_seconds)

    # -- the host's lease (liveness.py calls these from its thread) -----------------------------

    def lapsed(self, why: str) -> None:
        """The host cannot prove its lease: end every job now (their domains are being fenced)."""
        self.runner.kill_all(f"the host lost its lease: {why}")

    def regain(self) -> None:
        self.backlog.put(Regained())

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
                self.records.put_status(uuid, change.state, status, rev, reason=change.reason, held=change.held)
                self.backlog.enqueue(uuid)
            del self.fenced[uuid]

    # -- reconcile: read, decide (reconciler.py), do --------------------------------------------

    def reconcile(self, uuid: str) -> None:
        """Compare requested with actual for one instance and start what closes the gap."""
        if uuid in self.inflight:
            self.cancel_if_unwanted(self.inflight[uuid])
            return  # finish() looks again when the running job ends
        epoch = self.lease.epoch  # the decision stands on what is read under this lease, and no other
        if self.settings.fenced_path is not None and self.settings.fenced_path.exists() and self.lease.proven():
            self.take_fenced()  # what the fence stopped is recorded first: etcd may still say it runs
        request, rev, status, _ = self.records.read(uuid)
        if request is None and rev.create:
            return  # malformed (reported by read): not an orphan, not buildable; destroy --force removes it
        if self.backlog.is_parked(uuid, rev.mod):
            return  # it failed the same way too often: left alone until its request changes
        action = reconciler.decide(uuid, request, status, replace(self.facts, owner=rev.create))
        if action is None:
            return
        if self.held_back(action.job, epoch):
            return  # the lease or the hypervisor is away: the resync once it is back looks again
        if not self.record_under_way(uuid, action, status, rev):
            self.backlog.enqueue(uuid)  # the request changed since it was read: read again, decide again
            return
        self.submit(action.job, epoch)

    def record_under_way(self, uuid: str, action: reconciler.Action, status: Status | None, rev: Rev) -> bool:
        """Record what the job about to start means (its state, or what it is doing), so that an
        instance never waits on a job in silence; False if the request changed since it was read."""
        record, held = action.record, None
        again = self.backlog.cut_short.pop(uuid, None)
        reason = again and f"{again}; trying again"  # recorded every time, though it says what it said before
        if reason is None and record is not None and status is not None and status["state"] == record \
                and not status.get("reason"):
            # Recorded by a decision whose job is not under way (the daemon restarted, or etcd's
            # answer to that write was lost): the record says when, and now why it still waits.
            reason = f"no {action.job.kind.value} was under way; starting one"
        event = reason and f"{record}: {reason}"
        if record is None and action.doing and status is not None:
            record, held, reason = Actual(status["state"]), status.get("held"), reason or action.doing
            if status.get("reason") == reason:
                return True
            event = f"{record}: {reason}" if reason != action.doing else contract.NO_EVENT  # (its outcome is)
        if record is None or (status is not None and status["state"] == record and not reason):
            return True
        return self.records.put_status(uuid, record, status, rev, reason=reason, held=held, event=event)

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
        request, rev, _, _ = self.records.read(job.uuid)
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
        self._run(job, lambda result: self.backlog.put(Finished(job, result)))

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
        self.backlog.touched[uuid] = time.monotonic()
        self.metrics.job_done(job.kind, result)
        if result.hypervisor_down or (result.timed_out and job.kind == JobKind.LIST_DOMAINS):
            self.sick(result.reason or "the hypervisor does not answer")
        if not result.ok and (job.epoch != self.lease.epoch or not self.lease.proven()):
            # Its failure may be the fence's doing (a QEMU killed as it started): nothing to record
            # against the instance; once the lease is proven again, a resync looks afresh.
            LOG.info("%s of %s failed while the host's lease was not proven: %s", job.kind.value, uuid, result.reason)
            self.backlog.cut_short[uuid] = f"its {job.kind.value} was cut short while the host's lease was not proven"
            self.backlog.later(uuid)
            return
        request, rev, status, status_mod = self.records.read(uuid)
        if rev.create != job.owner:
            request = None  # deleted, moved away or made anew: this job's result is not its to record
        done = reconciler.report(job, result, status, request,
                                 replace(self.facts, failures=self.backlog.count(uuid, job.kind, result)))
        if done.note:
            LOG.info("%s", done.note)
        recorded = self.records.record(uuid, done, status, rev, status_mod)
        if recorded.deleted:
            self.backlog.forget(uuid)
        if request is not None and job.kind == JobKind.BUILD and done.state == Actual.ACTIVE:
            self.metrics.became_active(request, status)
        if done.remove:  # (of this incarnation: its status, if still requested here, is not an orphan's)
            self.submit(Job(JobKind.REMOVE_ORPHAN, uuid, owner=job.owner))
        self.backlog.then(uuid, done.next if recorded.done else Next.LATER, rev.mod)
        if uuid in self.early_ready and uuid not in self.inflight:
            self.backlog.put(Ready(uuid, self.early_ready.pop(uuid)))

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
            if uuid in self.inflight or self.backlog.touched.get(uuid, 0.0) >= listed_at or uuid in self.fenced:
                continue  # a job changed it since the list was taken: the list is stale for it
            status, _ = self.store.get_status(uuid)
            if uuid in observed and status is not None and status["state"] == Actual.ERROR:
                # A failed build leaves nothing: this domain outlived it (a hung start that went on
                # after its worker was killed at the deadline).
                self.submit(Job(JobKind.REMOVE_ORPHAN, uuid, owner=found.revs[uuid].create))
                continue
            change = reconciler.drift(status, observed.get(uuid), found.requests[uuid], self.facts,
                                      disk_failed=uuid in result.disk_failed)
            if change is not None and change.state is not None:
                LOG.warning("instance %s: %s", uuid, change.reason)
                self.records.put_status(uuid, change.state, status, found.revs[uuid], reason=change.reason,
                                        held=change.held, crashes=change.crashes)
                self.backlog.enqueue(uuid)
