"""Evacuation: a DOWN host's instances rebuilt on other hosts, only once its fence has acted.

A host's fence (ecompute) stops every domain it runs when it cannot prove its etcd lease for
lease_ttl - fence_margin seconds, that is before the lease can lapse and its alive key vanish.
Whoever first sees the alive key gone records since when the host is DOWN (PREFIX/down/<host>);
the host ends that record in the transaction that brings its alive key back. An evacuation
acts on a host only once that record is lease_ttl + fence_margin + grace seconds old (the
host's own figures, from its record): a fence that runs late (a loaded or briefly frozen
machine) gets a whole lease period beyond its deadline, and `grace` is the operator's own.
A host whose record names no fence (fence.enabled false, or an ecompute older than the fence)
is moved only with --force, which an operator gives after stopping its guests by hand.

An instance in a server group goes only where its group's rule allows (groups.Rule), and its
move compares, in the same transaction, that the rule still holds there.

Every move compares what it read: Placement's against the consumer generation read with the
request, etcd's (store.move_instance) against the request's revision and, unless forced, that
the old host still has no alive key and the same DOWN record. Whoever loses a race (another
evacuation, a destroy, the host coming back) moves nothing, and an etcd move that lost undoes
its allocation move (_move_back). `since` is a wall-clock time written by another machine:
the machines that run eschedule must keep their clocks in step (NTP) to well within the window.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from etcd_compute import contract
from etcd_compute.contract import DownRecord, HostRecord, Request
from etcd_compute.errors import (
    ECError,
    InvalidState,
    NoCapacity,
    PlacementError,
    PlacementUnavailable,
    UnknownInstance,
)
from etcd_compute.eschedule.groups import Rule, describe
from etcd_compute.states import Desired
from etcd_compute.store import Rev, Store

if TYPE_CHECKING:
    from etcd_compute.eschedule.operations import Operations

LOG = logging.getLogger(__name__)
Down = tuple[DownRecord, Rev]  # a host's DOWN record and where it was read


class NotFenced(InvalidState):
    """The host does not fence itself: only --force moves its instances."""


class FenceWindow(InvalidState):
    """The host has not been DOWN long enough for its fence to have acted (and --no-wait)."""

    def __init__(self, message: str, since: str, left: float) -> None:
        super().__init__(message)
        self.since, self.left = since, left


class _Superseded(Exception):
    """Someone changed the consumer since we read it: this evacuation of it must stop."""


def _same(found: dict[str, Any] | None, allocations: contract.Allocations) -> bool:
    """Do Placement's allocations of a consumer (with generations) amount to `allocations`?"""
    return {rp: a["resources"] for rp, a in (found or {}).items()} == {
        rp: a["resources"] for rp, a in allocations.items()}


def fence_window(host: str, record: HostRecord | None, grace: float) -> float:
    """Seconds `host` must have been DOWN before its instances may move: its lease_ttl +
    fence_margin + grace; NotFenced if its record names no fence."""
    ttl = record.get("lease_ttl") if record else None
    margin = record.get("fence_margin") if record else None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (ttl, margin)):
        raise NotFenced(f"host {host} does not fence itself: stop its guests yourself, then evacuate --force")
    return float(ttl + margin + grace)  # type: ignore[operator]


def seconds_left(since: str, window: float) -> float:
    """Seconds until a host DOWN since `since` has been DOWN for `window`; a `since` ahead of
    this machine's clock counts from now (never more than `window`)."""
    passed = (datetime.now(UTC) - datetime.fromisoformat(since)).total_seconds()
    return window - max(passed, 0.0)


def await_fence(store: Store, host: str, grace: float, *, wait: bool, say: Callable[[str], None],
                by: str) -> Down:
    """The DOWN record of `host` once it is older than the host's fence window + `grace`,
    waiting for that if `wait` (else FenceWindow); InvalidState if the host is (or comes back)
    UP, NotFenced if it does not fence itself. A host that comes back and dies again while
    waited for starts a new window."""
    announced: Rev | None = None
    while True:
        if store.is_alive(host):
            raise InvalidState(f"host {host} is UP; evacuate only hosts that are down (or --force)")
        window = fence_window(host, store.host_record(host), grace)
        down = store.mark_down(host, by)
        if down is None:
            raise InvalidState(f"host {host} came back UP; not evacuated")
        left = seconds_left(down[0]["since"], window)
        if left <= 0:
            return down
        ends = (datetime.now(UTC) + timedelta(seconds=left)).isoformat(timespec="seconds")
        said = f"host {host} DOWN since {down[0]['since']}; its fence window ends in {left:.1f} s ({ends})"
        if not wait:
            raise FenceWindow(f"{said}: not evacuated (--no-wait)", down[0]["since"], left)
        if announced != down[1]:
            say(f"{said}: waiting")
            announced = down[1]
        time.sleep(left)


def _came_back(store: Store, host: str, down: Down) -> bool:
    """Is `host` no longer the same DOWN as read (back UP, or back and DOWN again)?"""
    now = store.down_record(host)
    return now is None or now[1].mod != down[1].mod


def evacuate(ops: Operations, host: str, *, force: bool = False, grace: float | None = None, wait: bool = True,
             say: Callable[[str], None] = LOG.info, tick: Callable[[], None] | None = None,
             by: str = "eschedule evacuate") -> list[dict[str, Any]]:
    """Rebuild a DOWN host's instances elsewhere once its fence window has passed: each gets a
    new claim (its allocation moves in Placement, same consumer), and its request moves to the
    new host's key. `force`: the operator fenced the host by hand; no window, no UP check.
    `grace` (default: schedule.yaml's evacuate.grace) is added to the window; `wait` for it
    (telling `say` once) or raise FenceWindow. `tick` runs before each instance (the evacuator
    pets its watchdog and checks it still leads)."""
    host = ops.resolve_host(host)
    store = ops.store
    if store.host_record(host) is None and ops.placement.provider(host) is None:
        raise UnknownInstance(f"no host {host}")
    down = None
    if not force:
        empty = not store.has_requests(host)  # nothing to move: nothing to wait for
        try:
            down = await_fence(store, host, ops.cfg.evacuate.grace if grace is None else grace,
                               wait=wait and not empty, say=say, by=by)
        except FenceWindow:
            if not empty:
                raise
            return []
    found = store.host_requests(host)
    moved: list[dict[str, Any]] = []
    back: str | None = None  # why nothing more moves: the host came back
    for uuid, request in found.requests.items():
        if tick is not None:
            tick()
        rev = found.revs[uuid]
        if back is None and request["desired"] == Desired.DELETED:
            ops.placement.delete_allocations(uuid)  # finish the delete for it
            store.finish_delete(host, uuid, rev)
            continue
        to, error = (None, back) if back else _evacuate_one(ops, host, request, rev, down)
        if to is None and back is None and down is not None and _came_back(store, host, down):
            back = error = f"host {host} came back meanwhile: not moved"
        moved.append({"uuid": uuid, "from": host, "to": to, "error": error})
    return moved


def _evacuate_one(ops: Operations, host: str, request: Request, rev: Rev,
                  down: Down | None) -> tuple[str | None, str | None]:
    """(new host, None) or (None, why not)."""
    from etcd_compute.eschedule import claims
    placement, uuid = ops.placement, request["uuid"]
    current = placement.consumer(uuid)
    generation = current.get("consumer_generation")
    if not current.get("allocations"):
        return None, "it holds no allocation (destroyed meanwhile?)"  # never claim anew for it
    if host not in current["allocations"]:
        return None, "its allocation was moved meanwhile (another evacuation?)"
    is_up = claims.liveness(ops.store)
    pool = _pool_of(ops, current["allocations"], request)
    pools = {h: r.get("pool") for h, r in ops.store.hosts().items()} if pool else {}
    params = claims.parse_query(request["query"], ops.cfg.limit)
    group = request.get("group")  # its server group's rule holds where it goes (store.move_instance compares)
    rule = Rule(group, ops.store.members(group["id"]), moving=uuid, moving_from=host) if group else None

    def move(consumer: str, allocations: contract.Allocations) -> None:
        try:
            placement.move(consumer, allocations, generation, request["project_id"], request["user_id"])
        except PlacementError as exc:
            if exc.status == 409 and "consumer generation" in str(exc).lower():
                raise _Superseded(str(exc)) from None
            raise
        except PlacementUnavailable:
            if not _same(placement.consumer(consumer).get("allocations"), allocations):
                raise  # the move did not happen (or someone else's did): nothing to undo
            # The reply was lost but the move was made: carry on as if it had been answered.

    try:
        allocations, new_host = claims.claim(placement, uuid, params,
                                             lambda h: h != host and is_up(h) and pools.get(h) == pool, move,
                                             ops.cfg.shards, ops.store.pools() if ops.cfg.shards > 1 else None,
                                             rule=rule)
    except NoCapacity as exc:
        return None, str(exc)
    except _Superseded:
        return None, "its allocation changed meanwhile (another evacuation or a destroy)"
    new = Request(**request)
    new["allocations"] = allocations
    if ops.store.move_instance(new, rev, new_host, down):
        return new_host, None
    _move_back(ops, uuid, allocations, request)
    if group and ops.store.read_request(uuid)[1] == rev:
        return None, f"{describe(group)} no longer allows host {new_host} (a member got there meanwhile)"
    return None, "its request changed meanwhile (destroyed, or moved by another evacuation)"


def _pool_of(ops: Operations, allocations: dict[str, Any], request: Request) -> str | None:
    """The Ceph pool (its sharing provider) an instance's disk or volumes are in, if any: it moves
    only to a host of that pool, where they are (elsewhere its disk would be rebuilt from its
    image, and its volumes could not follow)."""
    pools = set(ops.store.pools())
    found = [p for p in allocations if p in pools] + [v["pool"] for v in contract.volume_refs(request)]
    return found[0] if found else None


def _move_back(ops: Operations, uuid: str, ours: contract.Allocations, request: Request) -> None:
    """Undo an allocation move whose request could not follow, if nobody changed it since, so
    that the allocation is where the request now is: back on the old host while the request
    is still there, gone if it was destroyed meanwhile, kept if another evacuation moved the
    request to where this move put the allocation (a lost reply cannot tell whose move it was)."""
    current = ops.placement.consumer(uuid)
    if not _same(current.get("allocations"), ours):
        return
    still, _, _ = ops.store.read_request(uuid)
    if still is None:
        undo: contract.Allocations = {}  # destroyed meanwhile: nobody's allocation any more
    elif still["host"] == request["host"]:
        undo = request["allocations"]
    else:
        return  # the request lives where another evacuation put it, and so does this allocation
    try:
        ops.placement.move(uuid, undo, current.get("consumer_generation"), request["project_id"],
                           request["user_id"])
    except ECError as exc:
        LOG.warning("could not undo the allocation move of %s: %s ('eschedule audit' checks)", uuid, exc)
