"""The backlog (ecompute/backlog.py) as tables: the one switch from a report's Next to what the
queue does, the backoff, parking, and which failures count."""

from __future__ import annotations

import time

import pytest

from etcd_compute.ecompute.backlog import Backlog, Reconcile, Regained
from etcd_compute.ecompute.jobs import JobKind, JobResult
from etcd_compute.ecompute.reconciler import Next

UUID = "11111111-2222-3333-4444-555555555555"


def queued(backlog: Backlog) -> list[str]:
    found = []
    while (event := backlog.get(0)) is not None:
        assert isinstance(event, Reconcile)
        found.append(event.uuid)
    return found


@pytest.mark.parametrize("next_, now, backed_off, parked", [
    (Next.DONE, [], False, False),
    (Next.AGAIN, [UUID], False, False),
    (Next.LATER, [], True, False),
    (Next.PARK, [], False, True),
])
def test_one_switch_from_a_report_to_the_queue(next_: Next, now: list[str], backed_off: bool, parked: bool) -> None:
    backlog = Backlog(resync_interval=30)
    backlog.later(UUID)  # whatever backoff it had ends with AGAIN, PARK and DONE
    backlog.then(UUID, next_, mod=7)
    assert queued(backlog) == now
    assert (UUID in backlog.backoff) == backed_off
    assert backlog.is_parked(UUID, 7) == parked


def test_an_instance_is_queued_once_until_it_is_taken() -> None:
    backlog = Backlog(resync_interval=30)
    backlog.enqueue(UUID)
    backlog.enqueue(UUID)
    backlog.put(Regained())
    assert backlog.get(0) == Reconcile(UUID)
    backlog.enqueue(UUID)  # taken: it may be queued again
    assert backlog.get(0) == Regained() and backlog.get(0) == Reconcile(UUID) and backlog.get(0) is None


def test_the_backoff_doubles_up_to_the_resync_interval_and_wakes_when_due() -> None:
    backlog = Backlog(resync_interval=5)
    delays = []
    for _ in range(5):
        backlog.later(UUID)
        delays.append(backlog.backoff[UUID][1])
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]
    backlog.backoff[UUID] = (time.monotonic() - 1, 5.0)
    backlog.due()
    assert queued(backlog) == [UUID] and backlog.backoff[UUID] == (float("inf"), 5.0)
    backlog.due()
    assert queued(backlog) == []  # woken once; it keeps its delay until it succeeds


def test_parking_ends_when_the_request_changes() -> None:
    backlog = Backlog(resync_interval=30)
    backlog.then(UUID, Next.PARK, mod=7)
    assert backlog.is_parked(UUID, 7)
    assert not backlog.is_parked(UUID, 8)
    assert not backlog.is_parked(UUID, 7)  # the parking ended with the change


@pytest.mark.parametrize("results, counted", [
    ([JobResult(ok=False), JobResult(ok=False)], [0, 1]),
    ([JobResult(ok=False), JobResult(ok=True), JobResult(ok=False)], [0, 0, 0]),
    ([JobResult(ok=False), JobResult(ok=False, interrupted=True), JobResult(ok=False)], [0, 1, 1]),
    ([JobResult(ok=False), JobResult(ok=False, fenced=True), JobResult(ok=False, hypervisor_down=True)], [0, 1, 1]),
])
def test_failures_in_a_row_count_what_the_instance_did_not_the_host(results: list[JobResult],
                                                                     counted: list[int]) -> None:
    backlog = Backlog(resync_interval=30)
    assert [backlog.count(UUID, JobKind.BUILD, r) for r in results] == counted


def test_a_failure_of_another_kind_starts_the_count_again() -> None:
    backlog = Backlog(resync_interval=30)
    assert backlog.count(UUID, JobKind.BUILD, JobResult(ok=False)) == 0
    assert backlog.count(UUID, JobKind.BUILD, JobResult(ok=False)) == 1
    assert backlog.count(UUID, JobKind.POWER, JobResult(ok=False)) == 0


def test_forget_and_prune_keep_nothing_of_instances_gone() -> None:
    other = UUID.replace("1", "9")
    backlog = Backlog(resync_interval=30)
    for uuid in (UUID, other):
        backlog.later(uuid)
        backlog.count(uuid, JobKind.BUILD, JobResult(ok=False))
        backlog.touched[uuid] = 1.0
        backlog.cut_short[uuid] = "cut"
    backlog.prune({other})
    assert all(UUID not in t and other in t for t in (backlog.backoff, backlog.failures, backlog.touched,
                                                       backlog.cut_short))
    backlog.forget(other)
    assert not (backlog.backoff or backlog.failures or backlog.touched or backlog.cut_short)
