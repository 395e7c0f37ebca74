"""The heart of ecompute, as two pure functions: what to do, and what a finished job means.

`decide(uuid, request, status, facts)` compares what is requested with what the host
last reported and returns the one Action that closes the gap (or None). `report(job,
result, status, request)` turns a job's result into what to record. Neither reads nor
writes anything, so both are tested as tables (tests/test_reconciler.py); the daemon
reads etcd, calls them, and carries the answers out. Being level-triggered, the same
inputs always give the same answer: a repeated watch event, a resync or a restart is
harmless.
"""

from __future__ import annotations

from dataclasses import dataclass

from etcd_compute.contract import DomainRecord, Request, Status
from etcd_compute.ecompute.jobs import Job, JobKind, JobResult
from etcd_compute.states import TARGET, Actual, Desired


@dataclass(frozen=True)
class Facts:
    """What the daemon knows beyond etcd."""

    host: str  # this host's uuid
    busy: bool = False  # a job for this instance is running here now


@dataclass(frozen=True)
class Action:
    job: Job
    record: Actual | None = None  # the actual state to record before the job starts


@dataclass(frozen=True)
class Report:
    """What to record after a job; every field but `state` carries over when None."""

    state: Actual | None = None  # None: record nothing
    reason: str | None = None
    domain: DomainRecord | None = None
    ip: str | None = None
    reboots: int | None = None
    event: str | None = None
    free: bool = False  # free the allocation in Placement (a failed build)
    delete: bool = False  # free the allocation, then remove every key of the instance
    again: bool = True  # reconcile the instance again afterwards
    note: str | None = None  # worth a log line


def actual(status: Status | None) -> Actual | None:
    return Actual(status["state"]) if status else None


def decide(uuid: str, request: Request | None, status: Status | None, facts: Facts) -> Action | None:
    """The one action that brings the instance closer to its request, or None."""
    if facts.busy:
        return None  # the running job's report looks again
    state = actual(status)
    if request is None:
        if status is not None and status.get("host") == facts.host:
            return Action(Job(JobKind.DESTROY, uuid))  # nobody requests it any more
        return None
    desired = Desired(request["desired"])
    if desired == Desired.DELETED:
        return Action(Job(JobKind.DESTROY, uuid), None if state == Actual.DELETING else Actual.DELETING)
    if state in (None, Actual.BUILDING):  # BUILDING with no job here: a build was cut off
        return Action(Job(JobKind.BUILD, uuid, request=request), Actual.BUILDING)
    if state in (Actual.ERROR, Actual.DELETING):
        return None
    if state != TARGET[desired]:
        return Action(Job(JobKind.POWER, uuid, power=TARGET[desired]))
    if status is not None and request.get("reboot", 0) > status.get("reboots", 0):
        return Action(Job(JobKind.REBOOT, uuid))
    return None


def report(job: Job, result: JobResult, status: Status | None, request: Request | None) -> Report:
    """What `result` of `job` means for the instance, given its current status and request."""
    kind = job.kind
    if result.interrupted:  # the worker died: nothing is known, so nothing is recorded
        return Report(note=f"{kind.value} of {job.uuid} interrupted; reconciling again")
    if kind == JobKind.REMOVE_ORPHAN:
        return Report(again=False, note=f"orphan {job.uuid} removed: no request of this host names it")
    if kind == JobKind.BUILD:
        if not result.ok:
            return Report(Actual.ERROR, reason=result.reason, free=True)
        return Report(Actual.ACTIVE, reason=result.reason, domain=result.domain, ip=result.ip)
    if kind in (JobKind.POWER, JobKind.REBOOT):
        if result.missing and request is not None:  # the domain vanished: build it again
            return Report(Actual.BUILDING, reason="domain was gone; rebuilding")
        if not result.ok or request is None or result.power is None:
            # No retry loop on a failing hypervisor: the next resync tries again.
            return Report(actual(status), reason=result.reason, again=False)
        if kind == JobKind.REBOOT:
            return Report(result.power, domain=result.domain, reboots=request.get("reboot", 0),
                          event=f"{result.power} (rebooted)")
        return Report(result.power, domain=result.domain)
    if kind == JobKind.DESTROY:
        if not result.ok:
            return Report(Actual.DELETING, reason=result.reason)
        return Report(delete=True)
    raise ValueError(f"no report for {kind}")
