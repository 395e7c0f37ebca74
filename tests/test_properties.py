"""Properties over generated inputs (hypothesis), beside the tables of test_reconciler.py:

- the query parser answers any text with params or a UsageError, never anything else;
- every request a command is allowed to make (contract.commanded, states.refusal) settles on a
  host whose jobs succeed: decide(), report() and drift() against the domain as libvirt shows
  it reach the requested state in a few steps and then change nothing more (no flip-flop, no
  request the host cannot carry out). It finds CI's chaos seed 23 (a domain off since its QEMU
  was killed, which libvirt calls crashed, taken for a new panic at every look) in seconds.

No deadline per example: a busy machine must not fail them.
"""

from __future__ import annotations

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from etcd_compute import contract
from etcd_compute.contract import Request, Status
from etcd_compute.ecompute.jobs import Job, JobKind, JobResult
from etcd_compute.ecompute.reconciler import Facts, decide, drift, report
from etcd_compute.errors import UsageError
from etcd_compute.eschedule import claims
from etcd_compute.states import TARGET, Actual, Command, Desired

UUID = "aaaaaaaa-0000-0000-0000-00000000000a"
HERE = "11111111-1111-1111-1111-111111111111"
DOMAIN = {"uuid": UUID, "name": "ec-a", "state": "running", "vcpus": 1, "memory_mb": 64}
FACTS = Facts(HERE, owner=7)
STEPS = 6  # the longest path: build, then stop (or suspend), then a reboot pending behind it


@settings(deadline=None)
@given(st.text(max_size=300))
def test_the_query_parser_answers_anything_with_params_or_a_usage_error(text: str) -> None:
    try:
        params = claims.parse_query(text, 10)
    except UsageError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert any(k.startswith("resources") for k, _ in params)


CLASSES = st.sampled_from(["VCPU", "MEMORY_MB", "DISK_GB", "CUSTOM_GPU"])


@settings(deadline=None)
@given(st.dictionaries(CLASSES, st.integers(1, 10**6), min_size=1), st.integers(1, 1000))
def test_a_wellformed_query_charges_what_it_asks(asked: dict[str, int], limit: int) -> None:
    query = "resources=" + ",".join(f"{rc}:{n}" for rc, n in asked.items())
    try:
        params = claims.parse_query(query, limit)
    except UsageError as exc:
        assert not {"VCPU", "MEMORY_MB"} <= set(asked), exc  # refused only for leaving out a charged class
        return
    assert claims.requested(params) == asked and ("limit", str(limit)) in params


def request_of(desired: Desired, reboot: int, start: int) -> Request:
    made = contract.new_request(UUID, HERE, {HERE: {"resources": {"VCPU": 1}}}, None, "resources=VCPU:1", "p", "u")
    made["desired"], made["reboot"], made["start"] = desired, reboot, start
    return made


def succeeded(job: Job) -> JobResult:
    """What a job returns on a host where everything works."""
    power = {JobKind.BUILD: Actual.ACTIVE, JobKind.REBOOT: Actual.ACTIVE}.get(job.kind, job.power)
    return JobResult(ok=True, power=power, domain=DOMAIN if power else None,  # type: ignore[arg-type]
                     ip="10.0.0.5" if job.kind == JobKind.BUILD else None)


def domain_after(job: Job, observed: Actual | None) -> Actual | None:
    """The domain's state after `job` succeeded, as libvirt shows it: one off since its QEMU died
    stays "crashed" (CRASHED) until it is started again."""
    if job.kind in (JobKind.DESTROY, JobKind.REMOVE_ORPHAN):
        return None
    if job.kind in (JobKind.BUILD, JobKind.REBOOT) or job.power == Actual.ACTIVE:
        return Actual.ACTIVE
    return observed if job.power == Actual.STOPPED and observed == Actual.CRASHED else job.power


def run_host(request: Request, status: Status | None, observed: Actual | None
             ) -> tuple[Status | None, list[str]]:
    """Carry out decide()'s actions with jobs that succeed, and drift() against the domain as the
    hypervisor shows it (`observed`), recording as the loop does, until neither changes anything:
    (the final status, None once deleted; the jobs run and the drifts recorded)."""
    done: list[str] = []
    for _ in range(STEPS):
        action = decide(UUID, request, status, FACTS)
        if action is None:
            change = drift(status, observed, request, FACTS) if observed is not None else None
            if change is None or change.state is None:
                return status, done
            done.append(f"drift to {change.state}")
            status = contract.new_status(UUID, HERE, change.state, old=status, reason=change.reason,
                                         held=change.held, crashes=change.crashes)
            continue
        done.append(action.job.kind.value)
        if action.record is not None:
            status = contract.new_status(UUID, HERE, action.record, old=status)
        got = report(action.job, succeeded(action.job), status, request, FACTS)
        observed = domain_after(action.job, observed)
        if got.delete:
            return None, done
        if got.state is not None:
            status = contract.new_status(UUID, HERE, got.state, old=status, reason=got.reason, domain=got.domain,
                                         reboots=got.reboots, held=got.held, crashes=got.crashes)
    raise AssertionError(f"still changing after {STEPS} steps: {done}")


def settled(request: Request, status: Status | None) -> bool:
    if request["desired"] == Desired.DELETED:
        return status is None
    assert status is not None
    if status["state"] == Actual.ERROR or contract.held_off(request, status):
        return True  # final, or off until started: both settled (invariant 5)
    return (status["state"] == TARGET[Desired(request["desired"])]
            and status.get("reboots", 0) >= request.get("reboot", 0))


STATES = st.sampled_from([None, *[a for a in Actual if a != Actual.PENDING]])
# What the hypervisor shows of a domain whose status is each state (an off one may have died: CRASHED).
SHOWN = {Actual.ACTIVE: [Actual.ACTIVE], Actual.STOPPED: [Actual.STOPPED, Actual.CRASHED],
         Actual.SUSPENDED: [Actual.SUSPENDED], Actual.CRASHED: [Actual.CRASHED, Actual.STOPPED]}


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(Desired), STATES, st.integers(0, 2), st.integers(0, 2), st.integers(0, 2),
       st.none() | st.integers(0, 2), st.sampled_from([*Command, None]), st.integers(0, 1))
def test_every_request_a_command_may_make_settles_on_a_working_host(
        desired: Desired, state: Actual | None, reboot: int, reboots: int, start: int, held: int | None,
        command: Command | None, shown: int) -> None:
    request = request_of(desired, reboot, start)
    status = None if state is None else contract.new_status(UUID, HERE, state, reboots=reboots, held=held,
                                                            reason="boom" if state == Actual.ERROR else None)
    observed = SHOWN[state][shown % len(SHOWN[state])] if state in SHOWN else None
    if command is not None:
        changed = contract.commanded(command, request, status)
        assume(not isinstance(changed, str))  # refused: nothing is written
        assert not isinstance(changed, str)
        request = changed or request
        # Only requests a host has carried out are commanded from: start from a settled one.
        assume(state is None or settled(request_of(desired, reboot, start), status))
    final, done = run_host(request, status, observed)
    if status is not None and status["state"] in (Actual.ERROR, Actual.DELETING) and desired != Desired.DELETED:
        assert done == [] and final == status  # final, or the user's destroy is what ends it
        return
    assert settled(request, final), (request, final, done)
