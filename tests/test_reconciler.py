"""The reconciler's decisions and the refusal policy, as tables (no etcd, no libvirt, no processes).

Each table covers every combination of its inputs: a row that is not listed must
decide nothing (or refuse nothing), so a new state cannot slip through unnoticed.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from etcd_compute import contract
from etcd_compute.contract import Request, Status
from etcd_compute.ecompute.jobs import Job, JobKind, JobResult
from etcd_compute.ecompute.reconciler import (
    Action,
    Facts,
    Next,
    Report,
    attachable,
    decide,
    drift,
    fenced,
    report,
)
from etcd_compute.states import Actual, Command, Desired, refusal, settled

UUID = "6c1d1d5e-7a43-4b0e-9f43-3f0f7b1b3c01"
HERE, THERE = "host-here", "host-there"
DOMAIN = {"uuid": UUID, "name": f"ec-{UUID}", "state": "running", "vcpus": 1, "memory_mb": 256}
STORED = [None, *(a for a in Actual if a != Actual.PENDING)]  # PENDING is never stored


def request(desired: Desired | None, reboot: int = 0) -> Request | None:
    if desired is None:
        return None
    req = contract.new_request(UUID, HERE, {HERE: {"resources": {"VCPU": 1}}}, None, "resources=VCPU:1", "p", "u")
    req["desired"], req["reboot"] = desired, reboot
    return req


def status(state: Actual | None, host: str = HERE, reboots: int = 0) -> Status | None:
    return None if state is None else contract.new_status(UUID, host, state, reboots=reboots)


A, B, S, U, E, D, C = (Actual.ACTIVE, Actual.BUILDING, Actual.STOPPED, Actual.SUSPENDED, Actual.ERROR,
                       Actual.DELETING, Actual.CRASHED)
OWNER = 42  # create revision of the request as read: every job carries it
BUILD = Action(Job(JobKind.BUILD, UUID, request=None, owner=OWNER), B)  # request filled in below
DESTROY = Action(Job(JobKind.DESTROY, UUID, owner=OWNER))
DESTROY_MARKED = Action(Job(JobKind.DESTROY, UUID, owner=OWNER), D)
LEFTOVER = Action(Job(JobKind.REMOVE_ORPHAN, UUID))  # never its allocation: that may not be ours


def power(target: Actual, doing: str | None = None) -> Action:
    return Action(Job(JobKind.POWER, UUID, power=target, owner=OWNER),
                  doing=doing or {A: "starting", S: "stopping", U: "suspending"}[target])


# (desired, actual) -> action, with this host's status, no reboot pending, no job running.
# Every pair not listed decides nothing.
DECISIONS: dict[tuple[Desired | None, Actual | None], Action] = {
    **{(None, state): LEFTOVER for state in STORED if state is not None},  # nobody requests it
    **{(Desired.DELETED, state): DESTROY_MARKED for state in STORED},  # (DELETING: said again if it says nothing)
    **{(desired, state): BUILD for desired in (Desired.ACTIVE, Desired.STOPPED, Desired.SUSPENDED)
       for state in (None, B)},
    (Desired.ACTIVE, S): power(A), (Desired.ACTIVE, U): power(A, "resuming"),
    (Desired.STOPPED, A): power(S), (Desired.STOPPED, U): power(S),
    (Desired.SUSPENDED, A): power(U), (Desired.SUSPENDED, S): power(U),
    (Desired.ACTIVE, C): power(A), (Desired.STOPPED, C): power(S), (Desired.SUSPENDED, C): power(U),
}


def expected(desired: Desired | None, state: Actual | None) -> Action | None:
    action = DECISIONS.get((desired, state))
    if action is BUILD:
        return Action(Job(JobKind.BUILD, UUID, request=request(desired), owner=OWNER), B)
    return action


@pytest.mark.parametrize(("desired", "state"), list(itertools.product([None, *Desired], STORED)))
def test_decide(desired: Desired | None, state: Actual | None) -> None:
    got = decide(UUID, request(desired), status(state), Facts(HERE, owner=OWNER))
    want = expected(desired, state)
    if want is not None and want.job.kind == JobKind.BUILD:  # timestamps differ: compare the request's uuid
        assert got is not None and got.job.request is not None
        assert (got.job.kind, got.record, got.job.request["desired"]) == (JobKind.BUILD, B, desired)
    else:
        assert got == want


@pytest.mark.parametrize(("desired", "state"), list(itertools.product([None, *Desired], STORED)))
def test_decide_nothing_while_a_job_runs(desired: Desired | None, state: Actual | None) -> None:
    assert decide(UUID, request(desired), status(state), Facts(HERE, busy=True, owner=OWNER)) is None


@pytest.mark.parametrize("state", STORED)
def test_reboot_only_when_active_and_pending(state: Actual | None) -> None:
    got = decide(UUID, request(Desired.ACTIVE, reboot=2), status(state, reboots=1), Facts(HERE, owner=OWNER))
    if state == A:
        assert got == Action(Job(JobKind.REBOOT, UUID, owner=OWNER), doing="rebooting")
    else:  # anything else first reaches ACTIVE (or is final)
        assert got is None or got.job.kind != JobKind.REBOOT
    done = decide(UUID, request(Desired.ACTIVE, reboot=2), status(A, reboots=2), Facts(HERE, owner=OWNER))
    assert done is None


@pytest.mark.parametrize("state", [s for s in STORED if s is not None])
def test_another_hosts_status_without_request_is_not_ours_to_touch(state: Actual) -> None:
    assert decide(UUID, None, status(state, host=THERE), Facts(HERE)) is None


def test_an_orphans_status_is_dropped_only_when_it_is_ours() -> None:
    done = JobResult(ok=True)
    assert report(Job(JobKind.REMOVE_ORPHAN, UUID), done, status(A, host=THERE), None, Facts(HERE)).drop_status is False
    assert report(Job(JobKind.REMOVE_ORPHAN, UUID), done, None, None, Facts(HERE)).drop_status is False


OK_RUNNING = JobResult(ok=True, domain=DOMAIN, power=A, ip="10.0.0.5")  # type: ignore[arg-type]
FAILED = JobResult(ok=False, reason="boom")
MISSING = JobResult(ok=False, reason="no domain", missing=True)
INTERRUPTED = JobResult(ok=False, interrupted=True, reason="worker process died")
LATE = "build did not finish within 60s; its worker was killed"
TIMED_OUT = JobResult(ok=False, timed_out=True, reason=LATE)
NO_HV = "cannot connect to libvirt"
DOWN = JobResult(ok=False, hypervisor_down=True, reason=NO_HV)
FENCED = JobResult(ok=False, fenced=True, reason="not proven")
ORPHAN = f"orphan {UUID} removed: no request of this host names it"

# (job kind, result, the job's request still there?) -> what to record. "Not there" means deleted,
# moved to another host or made anew: nothing of it is this job's to record, ever.
NOT_OURS = "is no longer requested of this host; removing its domain"
REPORTS: list[tuple[JobKind, JobResult, bool, Report]] = [
    (JobKind.BUILD, OK_RUNNING, True, Report(A, domain=DOMAIN, ip="10.0.0.5")),  # type: ignore[arg-type]
    (JobKind.BUILD, JobResult(ok=True, power=A, reason="no IP address seen within 5s"), True,
     Report(A, reason="no IP address seen within 5s")),
    (JobKind.BUILD, FAILED, True, Report(E, reason="boom", free=True, volumes=[])),  # no domain, no volumes
    (JobKind.POWER, OK_RUNNING, True, Report(A, domain=DOMAIN)),  # type: ignore[arg-type]
    # backoff, no hot loop
    (JobKind.POWER, FAILED, True, Report(S, reason="boom; trying again (1 of 3)", next=Next.LATER)),
    (JobKind.POWER, MISSING, True, Report(B, reason="domain was gone; rebuilding")),
    (JobKind.BUILD, OK_RUNNING, False, Report(next=Next.DONE, remove=True, note=f"{UUID} {NOT_OURS}")),
    (JobKind.BUILD, FAILED, False, Report(next=Next.DONE)),
    (JobKind.POWER, OK_RUNNING, False, Report(next=Next.DONE, remove=True, note=f"{UUID} {NOT_OURS}")),
    (JobKind.REBOOT, OK_RUNNING, False, Report(next=Next.DONE, remove=True, note=f"{UUID} {NOT_OURS}")),
    (JobKind.DESTROY, JobResult(ok=True), False, Report(next=Next.DONE)),  # never frees what is not ours
    (JobKind.REBOOT, OK_RUNNING, True, Report(A, domain=DOMAIN, reboots=3,  # type: ignore[arg-type]
                                             event="ACTIVE (rebooted)")),
    (JobKind.REBOOT, JobResult(ok=True, domain=DOMAIN, power=A, reason="clean shutdown in 4.2s"),  # type: ignore[arg-type]
     True, Report(A, domain=DOMAIN, reboots=3, event="ACTIVE (rebooted: clean shutdown in 4.2s)")),  # type: ignore[arg-type]
    (JobKind.POWER, JobResult(ok=True, domain=DOMAIN, power=S, reason="clean shutdown in 4.2s"),  # type: ignore[arg-type]
     True, Report(S, domain=DOMAIN, event="STOPPED: clean shutdown in 4.2s")),  # type: ignore[arg-type]
    (JobKind.REBOOT, MISSING, True, Report(B, reason="domain was gone; rebuilding")),
    (JobKind.DESTROY, JobResult(ok=True), True, Report(delete=True)),
    (JobKind.DESTROY, FAILED, True, Report(D, reason="boom", next=Next.LATER)),
    (JobKind.REMOVE_ORPHAN, JobResult(ok=True), False, Report(next=Next.DONE, drop_status=True, note=ORPHAN)),
    (JobKind.REMOVE_ORPHAN, JobResult(ok=True), True, Report(next=Next.DONE, note=ORPHAN)),
    (JobKind.REMOVE_ORPHAN, FAILED, False, Report(next=Next.LATER, note=f"orphan {UUID} not removed: boom")),
    # A job past its deadline (its worker killed): tried again after a backoff, named.
    (JobKind.BUILD, TIMED_OUT, True, Report(B, reason=f"{LATE}; trying again (1 of 3)", next=Next.LATER)),
    (JobKind.POWER, TIMED_OUT, True, Report(S, reason=f"{LATE}; trying again (1 of 3)", next=Next.LATER)),
    (JobKind.DESTROY, TIMED_OUT, True, Report(D, reason=LATE, next=Next.LATER)),
    (JobKind.BUILD, TIMED_OUT, False, Report(next=Next.DONE, remove=True, note=f"{UUID} {NOT_OURS}")),
    # The hypervisor does not answer: the instance did nothing wrong; it waits, named.
    (JobKind.BUILD, DOWN, True, Report(B, reason=f"waiting for the hypervisor: {NO_HV}", next=Next.LATER)),
    (JobKind.POWER, DOWN, True, Report(S, reason=f"waiting for the hypervisor: {NO_HV}", next=Next.LATER)),
    (JobKind.DESTROY, DOWN, True, Report(D, reason=f"waiting for the hypervisor: {NO_HV}", next=Next.LATER)),
    # The host's lease lapsed under the job: nothing recorded; the resync once it is back looks again.
    (JobKind.BUILD, FENCED, True, Report(next=Next.LATER, note=f"build of {UUID} held back: not proven")),
    (JobKind.POWER, FENCED, False, Report(next=Next.LATER, note=f"power of {UUID} held back: not proven")),
]


@pytest.mark.parametrize(("kind", "result", "requested", "want"), REPORTS)
def test_report(kind: JobKind, result: JobResult, requested: bool, want: Report) -> None:
    req = request(Desired.ACTIVE, reboot=3) if requested else None
    assert report(Job(kind, UUID), result, status(S), req, Facts(HERE)) == want


@pytest.mark.parametrize("kind", list(JobKind))
def test_an_interrupted_job_records_nothing_and_looks_again(kind: JobKind) -> None:
    got = report(Job(kind, UUID), INTERRUPTED, status(B), request(Desired.ACTIVE), Facts(HERE))
    assert (got.state, got.free, got.delete, got.next) == (None, False, False, Next.AGAIN)


# The same failure `retries` times in a row parks the instance: a build in ERROR (its allocation
# freed, its leftovers removed), a power change or reboot as it is until asked again, a delete never.
PARKED: list[tuple[JobKind, JobResult, Report]] = [
    (JobKind.BUILD, TIMED_OUT, Report(E, reason=f"{LATE} (3 times in a row)", free=True, remove=True,
                                      next=Next.DONE, volumes=[])),
    (JobKind.POWER, FAILED, Report(S, reason="boom (3 times in a row); left as it is until it is asked again",
                                   next=Next.PARK)),
    (JobKind.REBOOT, TIMED_OUT, Report(S, reason=f"{LATE} (3 times in a row); left as it is until it is asked "
                                                 "again", next=Next.PARK)),
    (JobKind.DESTROY, TIMED_OUT, Report(D, reason=LATE, next=Next.LATER)),
]


@pytest.mark.parametrize(("kind", "result", "want"), PARKED)
def test_a_job_that_fails_the_same_way_too_often_parks_its_instance(kind: JobKind, result: JobResult,
                                                                     want: Report) -> None:
    got = report(Job(kind, UUID), result, status(S), request(Desired.ACTIVE), Facts(HERE, failures=2, retries=3))
    assert got == want


# What the fence's stop means once the host proves its lease again and still owns the instance.
FENCE_RECORD = {"at": "2026-12-07T10:00:00.000+00:00", "why": "lease not proven"}
FENCED_REPORTS: dict[Actual | None, Report | None] = {
    A: Report(S, reason=f"stopped by the host's fence at {FENCE_RECORD['at']} (lease not proven); starting it again"),
    U: Report(S, reason=f"stopped by the host's fence at {FENCE_RECORD['at']} (lease not proven); its memory is "
                        "lost: 'eschedule start' starts it", held=0),
}


@pytest.mark.parametrize("state", STORED)
def test_what_the_fence_stopped_is_started_again_where_it_was_to_run(state: Actual | None) -> None:
    assert fenced(status(state), request(Desired.ACTIVE), FENCE_RECORD) == FENCED_REPORTS.get(state)


@pytest.mark.parametrize("state", [A, U])
def test_what_the_fence_stopped_while_asked_to_suspend_stays_off_until_started(state: Actual) -> None:
    """The chaos run (fake, seed 5): suspend accepted while the host was cut off (etcd said ACTIVE);
    started again it was asked to suspend a shut-off domain, failed three times, and was parked."""
    assert fenced(status(state), request(Desired.SUSPENDED), FENCE_RECORD) == FENCED_REPORTS[U]


def test_what_the_fence_stopped_while_asked_to_stop_is_not_said_to_start() -> None:
    """The chaos run (qemu, seed 23): stopped while its host was cut off, the instance was recorded
    STOPPED "...; starting it again", and was not started: it said what did not happen."""
    got = fenced(status(A), request(Desired.STOPPED), FENCE_RECORD)
    assert got == Report(S, reason=f"stopped by the host's fence at {FENCE_RECORD['at']} (lease not proven); "
                                   "it stays off, as asked")


# The refusal policy: (command, desired, actual) pairs that are refused; all others are allowed.
RUNNING = (A, U)


def refused(command: Command, desired: Desired, state: Actual) -> bool:
    return (desired == Desired.DELETED or state == E
            or (command in (Command.SUSPEND, Command.RESUME) and state not in RUNNING)
            or (command in (Command.SUSPEND, Command.RESUME) and desired == Desired.STOPPED)
            or (command == Command.REBOOT and (state != A or desired != Desired.ACTIVE)))


@pytest.mark.parametrize(("command", "desired", "state"), list(itertools.product(Command, Desired, Actual)))
def test_refusal(command: Command, desired: Desired, state: Actual) -> None:
    reason = refusal(command, desired, state, "disk full")
    assert (reason is not None) == refused(command, desired, state), reason
    if state == E and desired != Desired.DELETED:
        assert reason is not None and "disk full" in reason


def test_a_suspend_after_a_stop_its_host_has_not_carried_out_yet_is_refused() -> None:
    # Chaos seed 10: `stop`, then `suspend` while the status still said ACTIVE, was written;
    # the host then held a shut-off domain that it tried to suspend every few seconds, forever.
    reason = refusal(Command.SUSPEND, Desired.STOPPED, A)
    assert reason is not None and "start" in reason


@pytest.mark.parametrize(("command", "state"), [(Command.START, A), (Command.RESUME, A), (Command.REBOOT, A),
                                                (Command.STOP, S), (Command.SUSPEND, U)])
def test_each_command_settles_in_its_state(command: Command, state: Actual) -> None:
    assert settled(command) == state


# (recorded state, what the hypervisor shows) -> what to record. Unlisted pairs record nothing.
DRIFT: dict[tuple[Actual | None, Actual | None], Actual] = {
    **{(settled_state, None): B for settled_state in (A, S, U, C)},  # the domain is gone: build it again
    (A, S): S, (A, U): U, (S, A): A, (S, U): U, (U, A): A, (U, S): S,  # changed behind ecompute's back
    (C, A): A, (C, U): U,
    **{(settled_state, C): C for settled_state in (A, U)},  # its guest panicked
    # (S, C): nothing. libvirt says "crashed" of a domain off since its QEMU died, by a panic or a
    # kill (the fence's): it stays so until the next start, so a domain recorded off is no news.
}


# A domain found off while it ran was powered off by its guest, or its guest crashed: held off at
# the request's start counter, so that it stays off until `eschedule start` (as in Nova).
HELD = {(A, S), (U, S), (A, C), (U, C)}


@pytest.mark.parametrize(("recorded", "observed"), list(itertools.product(STORED, [None, A, S, U, C])))
def test_drift(recorded: Actual | None, observed: Actual | None) -> None:
    req = request(Desired.ACTIVE)
    assert req is not None
    req["start"] = 4
    got = drift(status(recorded), observed, req, Facts(HERE))
    want = DRIFT.get((recorded, observed))
    assert (got.state if got else None) == want
    if got is not None:
        assert got.reason and ("crashed: its kernel panicked" if observed == C else "outside ecompute") in got.reason
        assert got.held == (4 if (recorded, observed) in HELD else None)


def test_a_guest_that_panics_is_started_again_up_to_crash_restarts_times_in_a_row() -> None:
    req, st = request(Desired.ACTIVE), status(A)
    assert req is not None and st is not None
    req["start"] = 1
    facts = Facts(HERE, owner=OWNER, crash_restarts=2)
    for count in (1, 2):
        got = drift(st, C, req, facts)
        assert got is not None and (got.state, got.held, got.crashes) == (C, None, count), got
        assert got.reason is not None and f"starting it again ({count} of 2 in a row)" in got.reason
        st = contract.new_status(UUID, HERE, C, old=st, reason=got.reason, crashes=got.crashes)
        assert decide(UUID, req, st, facts) == power(A)  # not held: the host starts it
        st = contract.new_status(UUID, HERE, A, old=st)
    got = drift(st, C, req, facts)
    assert got is not None and (got.state, got.held, got.crashes) == (C, 1, 3)
    assert got.reason is not None and "3 times in a row; left off" in got.reason
    st = contract.new_status(UUID, HERE, C, old=st, reason=got.reason, held=got.held, crashes=got.crashes)
    assert decide(UUID, req, st, facts) is None  # held until `eschedule start`
    stop = request(Desired.STOPPED)
    assert stop is not None and decide(UUID, stop, st, facts) == power(S)  # a stop of it settles STOPPED
    req["start"] = 2
    assert decide(UUID, req, st, facts) == power(A)
    started = report(Job(JobKind.POWER, UUID, power=A, owner=OWNER), OK_RUNNING, st, req, facts)
    assert (started.state, started.crashes) == (A, 0)  # its user started it: the count starts over


def held(start: int, held_at: int | None, state: Actual = S) -> tuple[Request, Status]:
    req, st = request(Desired.ACTIVE), status(state)
    assert req is not None and st is not None
    req["start"], st["held"] = start, held_at
    return req, st


# (request's start counter, status held at, recorded state) -> is it left off?
HOLDS = [(0, 0, S, True), (3, 3, S, True), (4, 3, S, False), (0, None, S, False), (0, 0, A, False),
         (2, 5, S, True), (0, 0, C, True), (1, 0, C, False)]


@pytest.mark.parametrize(("start", "held_at", "state", "left_off"), HOLDS)
def test_a_guest_powered_off_stays_off_until_started(start: int, held_at: int | None, state: Actual,
                                                     left_off: bool) -> None:
    req, st = held(start, held_at, state)
    assert contract.held_off(req, st) is left_off
    got = decide(UUID, req, st, Facts(HERE, owner=OWNER))
    assert got == (None if left_off or state == A else power(A))


def test_start_of_a_held_instance_passes_the_hold_and_the_next_status_ends_it() -> None:
    req, st = held(0, 2)
    assert contract.held_off(req, st)
    req["start"] = 3  # what `eschedule start` writes
    assert decide(UUID, req, st, Facts(HERE, owner=OWNER)) == power(A)
    after = contract.new_status(UUID, HERE, A, old=st)
    assert after["held"] is None


def test_a_failed_power_change_of_a_held_instance_keeps_it_held() -> None:
    """The chaos run (qemu, seed 23): a fenced instance asked to suspend was recorded held, then a
    suspend decided on what etcd said before failed, and recording that failure ended the hold:
    the host tried to suspend a shut-off domain until it parked the instance."""
    held = contract.new_status(UUID, HERE, S, held=0)
    got = report(Job(JobKind.POWER, UUID, power=U), FAILED, held, request(Desired.SUSPENDED), Facts(HERE))
    assert got.held == 0 and got.state == S


def test_a_stop_or_reboot_carries_how_its_request_asked_the_guest_to_go_down() -> None:
    """The request's `shutdown` (eschedule stop|reboot --timeout S | --force) goes with the job; a
    request older than it (none) leaves the host's default."""
    stop = request(Desired.STOPPED)
    assert stop is not None
    assert decide(UUID, stop, status(A), Facts(HERE, owner=OWNER)) == power(S)
    stop["shutdown"] = {"timeout": 120.0, "force": False}
    assert decide(UUID, stop, status(A), Facts(HERE, owner=OWNER)) == Action(
        Job(JobKind.POWER, UUID, power=S, owner=OWNER, stop_timeout=120.0), doing="stopping")
    reboot = request(Desired.ACTIVE, reboot=1)
    assert reboot is not None
    reboot["shutdown"] = {"timeout": None, "force": True}
    assert decide(UUID, reboot, status(A), Facts(HERE, owner=OWNER)) == Action(
        Job(JobKind.REBOOT, UUID, owner=OWNER, force=True), doing="rebooting")
    reboot["shutdown"] = {"timeout": "soon", "force": "yes"}  # type: ignore[typeddict-item]
    assert decide(UUID, reboot, status(A), Facts(HERE, owner=OWNER)) == Action(Job(JobKind.REBOOT, UUID, owner=OWNER),
                                                                               doing="rebooting")


def test_a_guests_word_that_it_booted_counts_for_its_current_boot_only() -> None:
    """ready_at: set by the guest's word during the boot the host started last; a word older than
    that boot, or a second one, changes nothing; a new boot (booted_at) clears it, and so does any
    state in which the guest does not run."""
    from etcd_compute.ecompute.reconciler import ready
    booted = contract.new_status(UUID, HERE, A, booted_at="2026-12-08T10:00:00.000+00:00")
    began = contract.seconds_of(booted["booted_at"])
    assert began is not None and booted["ready_at"] is None
    assert ready(booted, began - 5) is None  # the boot before's word, late
    got = ready(booted, began + 42.5)
    assert got is not None and (got.state, got.crashes, got.ready_seconds) == (A, 0, 42.5)
    assert got.event == "ready: the guest says it has booted 42.5 s after its start"
    done = contract.new_status(UUID, HERE, A, old=booted, ready_at=got.ready_at)
    assert done["ready_at"] == got.ready_at and done["booted_at"] == booted["booted_at"]
    assert ready(done, began + 50) is None  # said already
    assert contract.new_status(UUID, HERE, U, old=done)["ready_at"] == got.ready_at  # suspended: same boot
    assert contract.new_status(UUID, HERE, A, old=done)["ready_at"] == got.ready_at
    for state in (S, C, E, B):
        assert contract.new_status(UUID, HERE, state, old=done)["ready_at"] is None
        assert ready(contract.new_status(UUID, HERE, state, old=done), began + 60) is None
    again = contract.new_status(UUID, HERE, A, old=done, booted_at="2026-12-08T10:05:00.000+00:00")
    assert again["ready_at"] is None  # a new boot: not ready until it says so
    started = report(Job(JobKind.REBOOT, UUID, owner=OWNER), JobResult(ok=True, domain=DOMAIN, power=A,  # type: ignore[arg-type]
                                                                        booted_at=began + 300),
                     done, request(Desired.ACTIVE, reboot=1), Facts(HERE))
    assert started.booted_at == contract.stamp(began + 300)


# ---------------------------------------------------------------- volumes (issue 19 item 5)

POOL, ELSEWHERE = "pool-here", "pool-there"
V1, V2 = "11111111-1a1a-4b0e-9f43-3f0f7b1b3c01", "22222222-2b2b-4b0e-9f43-3f0f7b1b3c02"
IN_POOL = Facts(HERE, owner=OWNER, pool=POOL)


def ref(volume: str, pool: str = POOL) -> contract.VolumeRef:
    return {"id": volume, "image": f"vol-{volume}", "pool": pool}


def with_volumes(desired: Desired, *refs: contract.VolumeRef) -> Request:
    req = request(desired)
    assert req is not None
    req["volumes"] = list(refs)
    return req


def attached(state: Actual, *volumes: str, held: int | None = None, reason: str | None = None) -> Status:
    return contract.new_status(UUID, HERE, state, volumes=list(volumes), held=held, reason=reason)


def volumes_job(*refs: contract.VolumeRef, doing: str | None) -> Action:
    return Action(Job(JobKind.VOLUMES, UUID, owner=OWNER, volumes=refs), doing=doing)


# (desired, actual, requested, attached) -> the volumes job of a settled instance (None: nothing to do)
VOLUME_DECISIONS: list[tuple[Desired, Actual, list[contract.VolumeRef], list[str], Action | None]] = [
    (Desired.ACTIVE, A, [ref(V1)], [], volumes_job(ref(V1), doing="attaching volume 11111111")),
    (Desired.STOPPED, S, [ref(V1)], [], volumes_job(ref(V1), doing="attaching volume 11111111")),  # (config only)
    (Desired.ACTIVE, A, [], [V1], volumes_job(doing="detaching volume 11111111")),
    (Desired.STOPPED, S, [], [V1], volumes_job(doing="detaching volume 11111111")),
    (Desired.ACTIVE, A, [ref(V1), ref(V2)], [V1], volumes_job(ref(V1), ref(V2), doing="attaching volume 22222222")),
    (Desired.ACTIVE, A, [ref(V2)], [V1], volumes_job(ref(V2), doing="detaching volume 11111111")),  # detach first
    (Desired.ACTIVE, A, [ref(V1)], [V1], None),
    (Desired.ACTIVE, A, [ref(V1), ref(V2)], [V2, V1], None),  # another order is no change
    (Desired.ACTIVE, A, [ref(V1), ref(V1)], [V1], volumes_job(ref(V1), doing=None)),  # named twice: said, parked
]


@pytest.mark.parametrize(("desired", "state", "requested", "now", "want"), VOLUME_DECISIONS)
def test_a_settled_instance_gets_the_volumes_it_requests(desired: Desired, state: Actual,
                                                         requested: list[contract.VolumeRef], now: list[str],
                                                         want: Action | None) -> None:
    assert decide(UUID, with_volumes(desired, *requested), attached(state, *now), IN_POOL) == want


@pytest.mark.parametrize(("desired", "state"), list(itertools.product(
    [Desired.ACTIVE, Desired.STOPPED, Desired.SUSPENDED, Desired.DELETED], STORED)))
def test_volumes_change_only_on_an_instance_settled_active_or_stopped(desired: Desired, state: Actual | None) -> None:
    """Building, going, failing, mid-change or suspended: what it does first is what it does
    without volumes (a build attaches them in its definition); only then are volumes changed."""
    req = with_volumes(desired, ref(V1))
    got = decide(UUID, req, None if state is None else attached(state), IN_POOL)
    if state == TARGET_OF.get(desired) and state in (A, S):
        assert got == volumes_job(ref(V1), doing="attaching volume 11111111")
        return
    plain = expected(desired, state)
    if plain is not None and plain.job.kind == JobKind.BUILD:
        assert got is not None and got.job.volumes == (ref(V1),) and got.job.kind == JobKind.BUILD
    else:
        assert got == plain
    assert decide(UUID, req, None if state is None else attached(state), replace(IN_POOL, busy=True)) is None


TARGET_OF = {Desired.ACTIVE: A, Desired.STOPPED: S, Desired.SUSPENDED: U}


def test_a_held_off_instance_gets_its_volumes_in_its_definition() -> None:
    """Powered off by its guest (held): not started, but the volumes job runs (config only)."""
    req = with_volumes(Desired.ACTIVE, ref(V1))
    assert decide(UUID, req, attached(S, held=0), IN_POOL) == volumes_job(ref(V1), doing="attaching volume 11111111")


FOREIGN = f"volume {V2} is in pool {ELSEWHERE}, not on this host's pool {POOL}: not attached"


def test_a_volume_of_another_pool_is_never_attempted_and_parks_with_the_reason() -> None:
    req = with_volumes(Desired.ACTIVE, ref(V1), ref(V2, ELSEWHERE))
    action = decide(UUID, req, attached(A), IN_POOL)
    assert action == volumes_job(ref(V1), doing="attaching volume 11111111")  # V2 is not in the job
    done = report(action.job, JobResult(ok=True, volumes=((V1, "vdb"),)), attached(A), req, IN_POOL)
    assert done == Report(A, reason=FOREIGN, volumes=[V1], event=f"volume {V1} attached (vdb)", next=Next.PARK)
    # Said already: nothing more to do (until the request changes: parked anyway).
    assert decide(UUID, req, attached(A, V1, reason=FOREIGN), IN_POOL) is None
    # Only the foreign one differs: a job that changes nothing, whose report says why and parks.
    only = with_volumes(Desired.ACTIVE, ref(V2, ELSEWHERE))
    action = decide(UUID, only, attached(A), IN_POOL)
    assert action == volumes_job(doing=None)
    assert report(action.job, JobResult(ok=True, volumes=()), attached(A), only, IN_POOL) == Report(
        A, reason=FOREIGN, volumes=[], next=Next.PARK)
    # A host with local disks has no pool: it attaches nothing.
    assert attachable(only, Facts(HERE))[1] == (f"volume {V2} is in pool {ELSEWHERE}, not on this host, which has "
                                                "no Ceph pool: not attached")
    # A build attaches only the volumes of its own pool.
    build = decide(UUID, req, None, IN_POOL)
    assert build is not None and build.job.kind == JobKind.BUILD and build.job.volumes == (ref(V1),)


def test_malformed_repeated_and_too_many_volumes_are_left_out_with_a_reason() -> None:
    req = with_volumes(Desired.ACTIVE, *(ref(f"{n:08d}-0000-4000-8000-000000000000")
                                         for n in range(contract.MAX_VOLUMES + 1)))
    req["volumes"].append({"id": 7})  # type: ignore[typeddict-item]
    ok, why = attachable(req, IN_POOL)
    assert len(ok) == contract.MAX_VOLUMES
    assert why == ("1 malformed volume entries left out; volume 00000016-0000-4000-8000-000000000000 is one more "
                   f"than the {contract.MAX_VOLUMES} an instance may have: not attached")


ATTACHED_VDB = JobResult(ok=True, volumes=((V1, "vdb"),))
# (result, failures before, status) -> what a volumes job's result records
VOLUME_REPORTS: list[tuple[JobResult, int, Status, Report]] = [
    (ATTACHED_VDB, 0, attached(A), Report(A, volumes=[V1], event=f"volume {V1} attached (vdb)")),
    (JobResult(ok=True, volumes=()), 0, attached(A, V1), Report(A, volumes=[], event=f"volume {V1} detached")),
    (JobResult(ok=True, volumes=((V2, "vdc"),)), 0, attached(S, V1),
     Report(S, volumes=[V2], event=f"volume {V1} detached; volume {V2} attached (vdc)")),
    (ATTACHED_VDB, 0, attached(S, held=4), Report(S, volumes=[V1], held=4, event=f"volume {V1} attached (vdb)")),
    (JobResult(ok=False, reason="boom", volumes=()), 0, attached(A),
     Report(A, reason="boom; trying again (1 of 3)", volumes=[], next=Next.LATER)),
    (JobResult(ok=False, reason="boom", volumes=()), 2, attached(A),
     Report(A, reason="boom (3 times in a row); left as it is until it is asked again", volumes=[], next=Next.PARK)),
    (JobResult(ok=False, reason="boom", volumes=((V1, "vdb"),)), 0, attached(A, V1, V2),  # one of two came off
     Report(A, reason="boom; trying again (1 of 3)", volumes=[V1], event=f"volume {V2} detached", next=Next.LATER)),
    (TIMED_OUT, 0, attached(S, V1, held=1),
     Report(S, reason=f"{LATE}; trying again (1 of 3)", held=1, next=Next.LATER)),
    (MISSING, 0, attached(A, V1), Report(B, reason="domain was gone; rebuilding")),
]


@pytest.mark.parametrize(("result", "failures", "now", "want"), VOLUME_REPORTS)
def test_a_volumes_job_records_what_is_attached_and_backs_off_then_parks(result: JobResult, failures: int,
                                                                         now: Status, want: Report) -> None:
    req = with_volumes(Desired.ACTIVE, ref(V1))
    job = Job(JobKind.VOLUMES, UUID, volumes=tuple(ref(v) for v in want.volumes or []))  # what it was to attach
    assert report(job, result, now, req, replace(IN_POOL, failures=failures)) == want


def test_a_volumes_job_whose_domain_says_otherwise_parks_instead_of_looping() -> None:
    req = with_volumes(Desired.ACTIVE, ref(V1))
    got = report(Job(JobKind.VOLUMES, UUID, volumes=(ref(V1),)), JobResult(ok=True, volumes=()), attached(A), req,
                 IN_POOL)
    assert got == Report(A, reason=f"the domain has volumes [], not the ['{V1}'] asked", volumes=[], next=Next.PARK)


def test_a_build_records_the_volumes_its_domain_came_up_with() -> None:
    req = with_volumes(Desired.ACTIVE, ref(V1))
    got = report(Job(JobKind.BUILD, UUID), replace(OK_RUNNING, volumes=((V1, "vdb"),)), None, req, IN_POOL)
    assert (got.state, got.volumes) == (A, [V1])


def test_a_domain_paused_on_a_failed_disk_is_crashed_saying_so_and_left_off() -> None:
    req = request(Desired.ACTIVE)
    assert req is not None
    got = drift(status(Actual.ACTIVE), C, req, Facts(HERE), disk_failed=True)
    assert got is not None and got.state == Actual.CRASHED and got.held == req.get("start", 0), got
    assert got.reason is not None and "its disk failed under it (paused on an I/O error" in got.reason
    assert "kernel panicked" not in got.reason
    panicked = drift(status(Actual.ACTIVE), C, req, Facts(HERE))
    assert panicked is not None and panicked.reason is not None and "kernel panicked" in panicked.reason
