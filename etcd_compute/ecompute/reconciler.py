"""The heart of ecompute, as two pure functions: what to do, and what a finished job means.

`decide(uuid, request, status, facts)` compares what is requested with what the host
last reported and returns the one Action that closes the gap (or None). `report(job,
result, status, request, facts)` turns a job's result into what to record, and
`drift(status, observed)` what the hypervisor's own view of a domain means. None of
them reads or writes anything, so all are tested as tables (tests/test_reconciler.py);
the daemon reads etcd, calls them, and carries the answers out. Being level-triggered,
the same inputs always give the same answer: a repeated watch event, a resync or a
restart is harmless.

`request` is always the request of this host *as the job's incarnation* (the daemon
passes None when the request was deleted, moved to another host, or made anew): a
job's result is only ever recorded for the request it was started for.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from etcd_compute import contract
from etcd_compute.contract import MAX_VOLUMES, DomainRecord, Request, Status, VolumeRef, held_off, shutdown_of
from etcd_compute.ecompute.jobs import Job, JobKind, JobResult
from etcd_compute.states import TARGET, Actual, Desired


class Next(Enum):
    """What the loop's queue does with an instance after a report (controller-runtime's Result)."""

    DONE = "done"  # nothing more to do now: forget its backoff
    AGAIN = "again"  # look at it again at once (its backoff starts over)
    LATER = "later"  # look again after a backoff (the hypervisor or Placement is failing)
    PARK = "park"  # it failed the same way `retries` times: leave it until its request changes


@dataclass(frozen=True)
class Facts:
    """What the daemon knows beyond etcd."""

    host: str  # this host's uuid
    busy: bool = False  # a job for this instance is running here now
    owner: int = 0  # create revision of the request as read (its incarnation on this host)
    failures: int = 0  # jobs of this kind that failed in a row for this instance, before this one
    retries: int = 3  # how often a job may fail (or time out) the same way before the instance is parked
    crash_restarts: int = 0  # how often in a row a guest that panicked is started again (0: left off)
    pool: str | None = None  # the sharing provider of this host's Ceph pool: only its volumes are attached here


@dataclass(frozen=True)
class Action:
    job: Job
    record: Actual | None = None  # the actual state to record before the job starts
    doing: str | None = None  # ... or, for a job that records no state of its own, what is under way


@dataclass(frozen=True)
class Report:
    """What to record after a job; every field but `state` carries over when None."""

    state: Actual | None = None  # None: record nothing
    reason: str | None = None
    domain: DomainRecord | None = None
    ip: str | None = None
    reboots: int | None = None
    held: int | None = None  # STOPPED by the guest (or CRASHED): left off until the request's start passes this
    crashes: int | None = None  # the guest's panics in a row
    booted_at: str | None = None  # the job started the domain: a new boot began then (not ready yet)
    ready_at: str | None = None  # the guest said its boot has finished
    ready_seconds: float | None = None  # ... that long after the boot began (the metric)
    volumes: list[str] | None = None  # the volumes attached to the domain now
    event: str | None = None
    free: bool = False  # free the allocation in Placement (a failed build)
    delete: bool = False  # free the allocation, then remove every key of the instance
    remove: bool = False  # remove the domain and files (not requested of this host, or a failed build's)
    drop_status: bool = False  # delete the status: a leftover of this host that nobody requests
    next: Next = Next.AGAIN  # what the queue does with the instance afterwards
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
            # A leftover of ours that nobody requests (never its allocation: that is not ours to free).
            return Action(Job(JobKind.REMOVE_ORPHAN, uuid))
        return None
    desired = Desired(request["desired"])
    if desired == Desired.DELETED:
        return Action(Job(JobKind.DESTROY, uuid, owner=facts.owner), Actual.DELETING)
    if state in (None, Actual.BUILDING):  # BUILDING with no job here: a build was cut off
        return Action(Job(JobKind.BUILD, uuid, request=request, owner=facts.owner,
                          volumes=tuple(attachable(request, facts)[0])), Actual.BUILDING)
    if state in (Actual.ERROR, Actual.DELETING):
        return None
    timeout, force = shutdown_of(request)
    if state != TARGET[desired] and not (held_off(request, status) and desired == Desired.ACTIVE):
        doing = "resuming" if state == Actual.SUSPENDED and desired == Desired.ACTIVE else DOING[desired]
        if TARGET[desired] != Actual.STOPPED:
            return Action(Job(JobKind.POWER, uuid, power=TARGET[desired], owner=facts.owner), doing=doing)
        return Action(Job(JobKind.POWER, uuid, power=Actual.STOPPED, owner=facts.owner, stop_timeout=timeout,
                          force=force), doing=doing)
    if status is not None and request.get("reboot", 0) > status.get("reboots", 0):
        return Action(Job(JobKind.REBOOT, uuid, owner=facts.owner, stop_timeout=timeout, force=force),
                      doing="rebooting")
    if state in (Actual.ACTIVE, Actual.STOPPED) and status is not None:
        return _volumes_action(uuid, request, status, facts)
    return None


def attachable(request: Request, facts: Facts) -> tuple[list[VolumeRef], str | None]:
    """The request's volumes this host may attach, in order, and why it leaves out the others
    (None: it leaves out none): one of another pool than this host's (the user's side refuses it
    first, but a host never trusts its request), a malformed entry, a repeat, or one too many."""
    refs, found = contract.volume_refs(request), request.get("volumes")
    why = []
    if isinstance(found, list) and len(refs) < len(found):
        why.append(f"{len(found) - len(refs)} malformed volume entries left out")
    ok: list[VolumeRef] = []
    for ref in refs:
        if ref["pool"] != facts.pool:
            where = f"this host's pool {facts.pool}" if facts.pool else "this host, which has no Ceph pool"
            why.append(f"volume {ref['id']} is in pool {ref['pool']}, not on {where}: not attached")
        elif any(v["id"] == ref["id"] for v in ok):
            why.append(f"volume {ref['id']} is named twice: attached once")
        elif len(ok) == MAX_VOLUMES:
            why.append(f"volume {ref['id']} is one more than the {MAX_VOLUMES} an instance may have: not attached")
        else:
            ok.append(ref)
    return ok, "; ".join(why) or None


def _volumes_action(uuid: str, request: Request, status: Status, facts: Facts) -> Action | None:
    """The volumes job of a settled instance whose domain's volumes are not the ones requested, or
    one whose request names volumes it will not attach (the job's report parks it, saying why)."""
    wanted, refused = attachable(request, facts)
    attached = status.get("volumes") or []
    ids = [v["id"] for v in wanted]
    if set(ids) == set(attached) and (refused is None or status.get("reason") == refused):
        return None
    job = Job(JobKind.VOLUMES, uuid, owner=facts.owner, volumes=tuple(wanted))
    detach = [v for v in attached if v not in ids]
    attach = [v for v in ids if v not in attached]
    doing = (f"detaching volume {detach[0][:8]}" if detach else f"attaching volume {attach[0][:8]}" if attach
             else None)
    return Action(job, doing=doing)


# What the status says while a power job is under way (Nova's task state): a job that hangs on
# its hypervisor until its deadline leaves its instance waiting with a reason, not silent.
DOING = {Desired.ACTIVE: "starting", Desired.STOPPED: "stopping", Desired.SUSPENDED: "suspending"}


def report(job: Job, result: JobResult, status: Status | None, request: Request | None,
           facts: Facts) -> Report:
    """What `result` of `job` means for the instance, given its current status and the request
    of the job's incarnation (None if that is gone)."""
    kind = job.kind
    if result.interrupted:  # the worker died: nothing is known, so nothing is recorded
        return Report(note=f"{kind.value} of {job.uuid} interrupted ({result.reason}); reconciling again")
    if result.fenced:  # the host's lease lapsed under it: once it is back, a resync looks again
        return Report(next=Next.LATER, note=f"{kind.value} of {job.uuid} held back: {result.reason}")
    if kind == JobKind.REMOVE_ORPHAN:
        return _orphan_report(job, result, status, request, facts)
    if request is None:  # deleted, moved away or made anew meanwhile: nothing here is its to record
        if kind == JobKind.DESTROY or (kind == JobKind.BUILD and not result.ok and not result.timed_out):
            return Report(next=Next.DONE)
        return Report(next=Next.DONE, remove=True,
                      note=f"{job.uuid} is no longer requested of this host; removing its domain")
    if result.hypervisor_down:  # the host failed, not the instance: wait for the hypervisor
        state = {JobKind.BUILD: Actual.BUILDING, JobKind.DESTROY: Actual.DELETING}.get(kind, actual(status))
        return Report(state, reason=f"waiting for the hypervisor: {result.reason}", next=Next.LATER)
    if kind == JobKind.BUILD:
        return _build_report(result, facts, status, request)
    if kind in (JobKind.POWER, JobKind.REBOOT):
        return _power_report(job, result, status, request, facts)
    if kind == JobKind.VOLUMES:
        return _volumes_report(job, result, status, request, facts)
    if kind == JobKind.DESTROY:
        if not result.ok:  # a delete is never given up on: it backs off and tries again
            return Report(Actual.DELETING, reason=result.reason, next=Next.LATER)
        return Report(delete=True)
    raise ValueError(f"no report for {kind}")


def _orphan_report(job: Job, result: JobResult, status: Status | None, request: Request | None,
                   facts: Facts) -> Report:
    if not result.ok:
        return Report(next=Next.LATER, note=f"orphan {job.uuid} not removed: {result.reason}")
    ours = status is not None and status.get("host") == facts.host and request is None
    return Report(next=Next.DONE, drop_status=ours, note=f"orphan {job.uuid} removed: no request of this host names it")


def _build_report(result: JobResult, facts: Facts, status: Status | None, request: Request) -> Report:
    if result.ok:
        return Report(Actual.ACTIVE, reason=result.reason, domain=result.domain, ip=result.ip,
                      event=_moved_event(result, status, request), booted_at=_stamp(result.booted_at),
                      volumes=[v for v, _ in result.volumes] if result.volumes is not None else None)
    if not result.timed_out:  # (a failed build leaves no domain: no volume is attached)
        return Report(Actual.ERROR, reason=result.reason, free=True, volumes=[])
    if facts.failures + 1 >= facts.retries:  # parked in ERROR: its allocation freed, its leftovers removed
        return Report(Actual.ERROR, reason=f"{result.reason} ({facts.failures + 1} times in a row)",
                      free=True, remove=True, next=Next.DONE, volumes=[])
    return Report(Actual.BUILDING, reason=_retrying(result, facts), next=Next.LATER)


def _moved_event(result: JobResult, status: Status | None, request: Request) -> str | None:
    """What the first run of an evacuated instance on its new host says of its disk: kept (in
    Ceph), or lost (rebuilt from its image: a local disk died with its host). Never silent."""
    moved = request.get("evacuated")
    if not isinstance(moved, dict) or (status is not None and status.get("domain")) or not request.get("image"):
        return None
    if result.disk_kept:
        return f"ACTIVE: moved from host {moved.get('from')}, on its own disk (in Ceph: what it wrote is kept)"
    return (f"ACTIVE: moved from host {moved.get('from')}, rebuilt from its image: what it wrote on that host's "
            "local disk is lost")


def _retrying(result: JobResult, facts: Facts) -> str:
    return f"{result.reason}; trying again ({facts.failures + 1} of {facts.retries})"


def _power_report(job: Job, result: JobResult, status: Status | None, request: Request, facts: Facts) -> Report:
    if result.missing:  # the domain vanished: build it again
        return Report(Actual.BUILDING, reason="domain was gone; rebuilding")
    if not result.ok or result.power is None:
        held = status.get("held") if status else None  # a failure to act on a held instance keeps it held
        if facts.failures + 1 >= facts.retries:
            return Report(actual(status), next=Next.PARK, held=held,
                          reason=f"{result.reason} ({facts.failures + 1} times in a row); "
                                 "left as it is until it is asked again")
        # No hot loop on a failing hypervisor: try again after a backoff.
        return Report(actual(status), reason=_retrying(result, facts), next=Next.LATER, held=held)
    booted = _stamp(result.booted_at)
    if job.kind == JobKind.REBOOT:
        return Report(result.power, domain=result.domain, reboots=request.get("reboot", 0), booted_at=booted,
                      event=f"{result.power} (rebooted{': ' + result.reason if result.reason else ''})")
    started = status is not None and status.get("held") is not None and result.power == Actual.ACTIVE
    return Report(result.power, domain=result.domain, crashes=0 if started else None, booted_at=booted,
                  event=f"{result.power}: {result.reason}" if result.reason else None)


def _volumes_report(job: Job, result: JobResult, status: Status | None, request: Request, facts: Facts) -> Report:
    """Volumes attached or detached: the state stays as it was (and its hold), the volumes the
    domain has now are recorded and each change is an event. A failure is tried again after a
    backoff, then parked, as a power change is; so is a request naming volumes not attached here."""
    if result.missing:  # the domain vanished: build it again (with its volumes)
        return Report(Actual.BUILDING, reason="domain was gone; rebuilding")
    held = status.get("held") if status else None
    before = (status.get("volumes") or []) if status else []
    now = dict(result.volumes) if result.volumes is not None else None
    changes = [f"volume {v} detached" for v in before if now is not None and v not in now]
    changes += [f"volume {v} attached ({dev})" for v, dev in (now or {}).items() if v not in before]
    event = "; ".join(changes) or None
    volumes = list(now) if now is not None else None
    if not result.ok:
        if facts.failures + 1 >= facts.retries:
            return Report(actual(status), next=Next.PARK, held=held, volumes=volumes, event=event,
                          reason=f"{result.reason} ({facts.failures + 1} times in a row); "
                                 "left as it is until it is asked again")
        return Report(actual(status), reason=_retrying(result, facts), next=Next.LATER, held=held, volumes=volumes,
                      event=event)
    refused = attachable(request, facts)[1]
    if now is None or set(now) != {v["id"] for v in job.volumes}:  # never a hot loop on a driver that says otherwise
        refused = f"the domain has volumes {sorted(now or [])}, not the {sorted(v['id'] for v in job.volumes)} asked"
    return Report(actual(status), reason=refused, held=held, volumes=volumes, event=event,
                  next=Next.PARK if refused else Next.AGAIN)


def _stamp(seconds: float | None) -> str | None:
    return contract.stamp(seconds) if seconds is not None else None


def ready(status: Status | None, at: float) -> Report | None:
    """What a guest's word that it has booted (at `at`, epoch seconds: the metadata server's
    clock, on this host as the workers') means: the running instance's current boot is ready,
    unless it said so already, or the word is older than this boot (the boot before's, late).
    The crash count starts over: this boot got up."""
    if status is None or status["state"] != Actual.ACTIVE or status.get("ready_at"):
        return None
    began = contract.seconds_of(status.get("booted_at"))
    if began is not None and at < began:
        return None
    after = f" {at - began:.1f} s after its start" if began is not None else ""
    return Report(Actual.ACTIVE, reason=status.get("reason"), ready_at=contract.stamp(at), crashes=0,
                  event=f"ready: the guest says it has booted{after}",
                  ready_seconds=at - began if began is not None else None)


def _crashed(status: Status | None, request: Request, facts: Facts, disk_failed: bool = False) -> Report:
    crashes = (status.get("crashes", 0) if status else 0) + 1
    why = "the guest crashed: its kernel panicked (pvpanic)"
    if disk_failed:
        why = ("the guest stopped: its disk failed under it (paused on an I/O error: its Ceph client blocklisted "
               "by another host's take-over, or its storage gone)")
    if crashes <= facts.crash_restarts:
        return Report(Actual.CRASHED, crashes=crashes,
                      reason=f"{why}; starting it again ({crashes} of {facts.crash_restarts} in a row)")
    again = f", {crashes} times in a row" if facts.crash_restarts else ""
    return Report(Actual.CRASHED, crashes=crashes, held=request.get("start", 0),
                  reason=f"{why}{again}; left off: 'eschedule start' starts it")


def fenced(status: Status | None, request: Request, record: dict[str, Any]) -> Report | None:
    """What it means that the host's fence stopped this instance's domain (`record`: when and
    why), now that the host proves its lease again and still owns the instance: one that was to
    run is recorded STOPPED, and so started again; a suspended one (or one asked to suspend while
    its host was cut off) lost its memory, so it stays off until started (held)."""
    state = actual(status)
    if state not in (Actual.ACTIVE, Actual.SUSPENDED):
        return None
    why = f"stopped by the host's fence at {record.get('at')} ({record.get('why')})"
    if state == Actual.SUSPENDED or request["desired"] == Desired.SUSPENDED:  # (suspended while it was cut off)
        return Report(Actual.STOPPED, reason=f"{why}; its memory is lost: 'eschedule start' starts it",
                      held=request.get("start", 0))
    if request["desired"] == Desired.STOPPED:  # (stopped while it was cut off)
        return Report(Actual.STOPPED, reason=f"{why}; it stays off, as asked")
    return Report(Actual.STOPPED, reason=f"{why}; starting it again")


def drift(status: Status | None, observed: Actual | None, request: Request, facts: Facts,
          disk_failed: bool = False) -> Report | None:
    """What the hypervisor's own view (`observed`: the domain's state, None if there is no
    domain) means for an instance whose status says it settled; None if they agree.

    A domain found off while it ran was powered off by its guest (or was stopped outside
    ecompute): as in Nova, it stays off, held, until the user starts it again. One whose guest
    panicked is CRASHED: started again by the host up to `facts.crash_restarts` times in a row,
    else held off like one its guest powered off. One paused on an I/O error of its disk
    (`disk_failed`: observed CRASHED too) can write nothing, and resumed it fails again: it is
    CRASHED as well, saying so, and a start starts a new QEMU (a new Ceph client)."""
    state = actual(status)
    if state not in (Actual.ACTIVE, Actual.STOPPED, Actual.SUSPENDED, Actual.CRASHED):
        return None  # building, failing or going: a job (or the user) decides what comes next
    if observed is None:
        return Report(Actual.BUILDING, reason="domain vanished outside ecompute; rebuilding")
    if state in (Actual.STOPPED, Actual.CRASHED) and observed in (Actual.STOPPED, Actual.CRASHED):
        # Still off. libvirt says "crashed" of a domain whose QEMU died, by a panic or a kill (the
        # fence's): it says so until the next start, so of a domain recorded off it is no news.
        return None
    if observed == Actual.CRASHED:
        return _crashed(status, request, facts, disk_failed)
    if observed == Actual.STOPPED and state != Actual.STOPPED:
        return Report(observed, held=request.get("start", 0),
                      reason="powered off by its guest or outside ecompute; 'eschedule start' starts it")
    if observed != state:
        return Report(observed, reason=f"domain found {observed} (changed outside ecompute)")
    return None
