"""etcd_compute/invariants.py: each invariant catches a violation seeded into a clean world and
passes the clean world itself. Pure: no services, milliseconds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from etcd_compute import contract, invariants
from etcd_compute.invariants import EtcdView, Observation, PlacementView
from etcd_compute.states import Actual, Desired

P = "/inv"
H1, H2 = "11111111-0000-0000-0000-000000000001", "22222222-0000-0000-0000-000000000002"
A, B = "aaaaaaaa-0000-0000-0000-00000000000a", "bbbbbbbb-0000-0000-0000-00000000000b"
RES = {"VCPU": 1, "MEMORY_MB": 64}
NOW = datetime(2026, 12, 8, 12, 0, tzinfo=UTC)


def stamp(ago: float) -> str:
    return (NOW - timedelta(seconds=ago)).isoformat(timespec="milliseconds")


def request(uuid: str, host: str, desired: str = Desired.ACTIVE, ago: float = 100, **extra: Any) -> bytes:
    value = contract.new_request(uuid, host, {host: {"resources": RES}}, None, "resources=VCPU:1", "p", "u")
    value.update({"desired": desired, "updated_at": stamp(ago), "created_at": stamp(ago), **extra})
    return contract.encode(value).encode()


def status(uuid: str, host: str, state: str = Actual.ACTIVE, ago: float = 90, **extra: Any) -> bytes:
    value = contract.new_status(uuid, host, Actual(state), reason=extra.pop("reason", None))
    value.update({"updated_at": stamp(ago), **extra})
    return contract.encode(value).encode()


def clean_kvs() -> dict[str, bytes]:
    """Two hosts, both UP; A active on H1, B stopped on H2."""
    return {
        f"{P}/requests/{H1}/{A}": request(A, H1), f"{P}/instances/{A}": status(A, H1),
        f"{P}/index/{A}": b'{"host":"%s"}' % H1.encode(),
        f"{P}/requests/{H2}/{B}": request(B, H2, Desired.STOPPED), f"{P}/instances/{B}": status(B, H2, Actual.STOPPED),
        f"{P}/index/{B}": b'{"host":"%s"}' % H2.encode(),
        f"{P}/alive/{H1}": b"{}", f"{P}/alive/{H2}": b"{}",
        f"{P}/hosts/{H1}": contract.encode({"uuid": H1, "state": "up"}).encode(),
        f"{P}/hosts/{H2}": contract.encode({"uuid": H2, "state": "up"}).encode(),
        "/other-prefix/requests/x/y": b"not ours",
    }


def clean_placement() -> PlacementView:
    inventory = {"VCPU": {"total": 4, "reserved": 0, "allocation_ratio": 1.0},
                 "MEMORY_MB": {"total": 256, "reserved": 0, "allocation_ratio": 1.0}}
    return PlacementView(allocations={H1: {A: dict(RES)}, H2: {B: dict(RES)}},
                         inventories={H1: inventory, H2: inventory}, usages={H1: dict(RES), H2: dict(RES)})


def clean_hypervisors() -> dict[str | None, dict[str, str]]:
    return {H1: {A: Actual.ACTIVE}, H2: {B: Actual.STOPPED}}


def view(kvs: dict[str, bytes] | None = None, **changes: bytes | None) -> EtcdView:
    """The clean world's etcd with keys changed (`None` deletes one); key names relative to P."""
    found = clean_kvs() if kvs is None else kvs
    for key, value in changes.items():
        full = f"{P}/{key.replace('__', '/')}"
        if value is None:
            found.pop(full, None)
        else:
            found[full] = value
    return EtcdView.parse(P, found)


def everything(etcd: EtcdView, placement: PlacementView, hypervisors: Any, destroyed: set[str] = frozenset()
               ) -> list[invariants.Violation]:
    return (invariants.one_host(etcd, hypervisors) + invariants.requested_there(etcd, hypervisors)
            + invariants.owned_allocations(etcd, placement, destroyed) + invariants.within_capacity(placement)
            + invariants.settled(etcd, hypervisors) + invariants.destroyed_gone(etcd, placement, destroyed, hypervisors)
            + invariants.up_or_down(etcd) + invariants.stuck(etcd, NOW, 30))


def ids(found: list[invariants.Violation]) -> list[tuple[str, str | None]]:
    return sorted((v.invariant, v.uuid) for v in found)


def test_the_clean_world_keeps_every_invariant() -> None:
    etcd = view()
    assert sorted(etcd.requests) == [A, B] and etcd.alive == {H1, H2} and set(etcd.hosts) == {H1, H2}
    assert everything(etcd, clean_placement(), clean_hypervisors(), destroyed={"gone-long-ago"}) == []


def test_1_a_request_under_two_hosts() -> None:
    found = invariants.one_host(view(**{f"requests__{H2}__{A}": request(A, H2)}))
    assert ids(found) == [("1", A)] and "requested of 2 hosts" in found[0].text


def test_1_a_domain_on_two_hosts_and_a_status_from_a_host_without_it() -> None:
    hypervisors = clean_hypervisors()
    hypervisors[H2][A] = Actual.ACTIVE
    assert ids(invariants.one_host(view(), hypervisors)) == [("1", A)]
    hypervisors = {H1: {}, H2: {A: Actual.ACTIVE, B: Actual.STOPPED}}
    found = invariants.one_host(view(), hypervisors)
    assert ids(found) == [("1", A)] and "reports it ACTIVE" in found[0].text


def test_2_a_domain_nobody_requests_of_its_host() -> None:
    hypervisors = clean_hypervisors()
    hypervisors[H2][A] = Actual.ACTIVE  # an orphan left on H2
    hypervisors[None] = {B: Actual.STOPPED}  # a domain no host owns
    assert ids(invariants.requested_there(view(), hypervisors)) == [("2", A), ("2", B)]
    assert invariants.requested_there(view(), clean_hypervisors()) == []


@pytest.mark.parametrize("seed, why", [
    ("leak", "no instance requests it"), ("elsewhere", "its request is on"), ("size", "its request asks for"),
    ("error", "whose allocation is freed"), ("missing", "allocations on nothing"), ("both", "allocations on"),
])
def test_3_allocations_and_instances_match_both_ways(seed: str, why: str) -> None:
    etcd, placement = view(), clean_placement()
    if seed == "leak":
        placement.allocations[H1]["cccccccc-0000-0000-0000-00000000000c"] = dict(RES)
    elif seed == "elsewhere":
        placement.allocations[H2][A] = placement.allocations[H1].pop(A)
    elif seed == "size":
        placement.allocations[H1][A] = {"VCPU": 2, "MEMORY_MB": 64}
    elif seed == "error":
        etcd = view(**{f"instances__{A}": status(A, H1, Actual.ERROR, reason="build failed")})
    elif seed == "missing":
        del placement.allocations[H2][B]
    else:
        placement.allocations[H2][A] = dict(RES)
    found = invariants.owned_allocations(etcd, placement)
    assert found and all(v.invariant == "3" for v in found) and any(why in v.text for v in found), found


def test_4_a_provider_over_capacity() -> None:
    placement = clean_placement()
    placement.usages[H2] = {"VCPU": 5, "MEMORY_MB": 64}
    found = invariants.within_capacity(placement)
    assert [v.text for v in found] == [f"{H2[:8]}: VCPU used 5 > capacity 4"]
    placement.inventories[H2]["VCPU"].update(total=6, reserved=1)  # (6 - 1) * 1.0 = 5: fits
    assert invariants.within_capacity(placement) == []


@pytest.mark.parametrize("changes, why", [
    ({f"instances__{A}": None}, "PENDING"),
    ({f"requests__{H1}__{A}": request(A, H1, Desired.STOPPED, ago=10)}, "ACTIVE, requested stopped"),
    ({f"requests__{H1}__{A}": request(A, H1, reboot=1)}, "reboot 1, done 0"),
    ({f"requests__{H1}__{A}": b"garbage"}, "an unreadable request"),
    ({f"requests__{H1}__{A}": None, f"index__{A}": None}, "a status nobody requests"),
    ({f"instances__{A}": status(A, H2)}, "status written by another host"),
    ({f"instances__{A}": status(A, H1, Actual.ERROR)}, "ERROR without a reason"),
    ({f"requests__{H1}__{A}": request(A, H1, Desired.DELETED)}, "requested deleted, still ACTIVE"),
])
def test_5_every_instance_settled(changes: dict[str, bytes | None], why: str) -> None:
    found = invariants.settled(view(**changes))
    assert ids(found) == [("5", A)] and why in found[0].text, found


def test_5_settled_but_not_what_the_hypervisor_has() -> None:
    hypervisors = clean_hypervisors()
    hypervisors[H1][A] = Actual.STOPPED
    found = invariants.settled(view(), hypervisors)
    assert ids(found) == [("5", A)] and "the hypervisor has STOPPED" in found[0].text
    del hypervisors[H1][A]
    assert "no domain" in invariants.settled(view(), hypervisors)[0].text


def test_5_a_domain_off_since_a_crash_is_what_a_stopped_status_says() -> None:
    """libvirt keeps "shut off (crashed)" until the next start, for a panic or for a QEMU that was
    killed (by the fence, say): an instance recorded STOPPED since (stopped, or fenced) is settled."""
    stopped = {f"instances__{A}": status(A, H1, Actual.STOPPED),
               f"requests__{H1}__{A}": request(A, H1, Desired.STOPPED)}
    hypervisors = clean_hypervisors()
    hypervisors[H1][A] = Actual.CRASHED
    assert invariants.settled(view(**stopped), hypervisors) == []
    found = invariants.settled(view(), hypervisors)  # recorded ACTIVE: a crash not yet seen
    assert ids(found) == [("5", A)] and "the hypervisor has CRASHED" in found[0].text


def test_5_error_with_a_reason_and_a_guest_powered_off_count_as_settled() -> None:
    held = {f"instances__{A}": status(A, H1, Actual.STOPPED, held=0)}
    error = {f"instances__{B}": status(B, H2, Actual.ERROR, reason="image not found")}
    assert invariants.settled(view(**held, **error)) == []


def test_6_what_a_destroyed_instance_left_behind() -> None:
    etcd, placement, hypervisors = view(), clean_placement(), clean_hypervisors()
    found = invariants.destroyed_gone(etcd, placement, {A}, hypervisors)
    assert ids(found) == [("6", A)]
    assert all(w in found[0].text for w in (f"/requests/{H1}/{A}", f"/index/{A}", "its allocation", "a domain"))
    gone = view(**{f"requests__{H1}__{A}": None, f"instances__{A}": None, f"index__{A}": None})
    del placement.allocations[H1][A]
    del hypervisors[H1][A]
    assert invariants.destroyed_gone(gone, placement, {A}, hypervisors) == []


def test_d_a_host_up_and_marked_down() -> None:
    down = contract.encode({"host": H2, "since": stamp(5), "by": "evacuator"}).encode()
    found = invariants.up_or_down(view(**{f"down__{H2}": down}))
    assert [v.invariant for v in found] == ["D"] and H2[:8] in found[0].text
    assert invariants.up_or_down(view(**{f"down__{H2}": down, f"alive__{H2}": None})) == []


def obs(*rows: tuple[float, str, str, bool]) -> list[Observation]:
    return [Observation(*row) for row in rows]


def test_c_two_running_copies_at_once() -> None:
    series = obs((0.0, "h1", A, True), (1.0, "h2", A, True), (1.5, "h1", A, False), (3.0, "h2", A, False))
    found = invariants.two_copies(series)
    assert ids(found) == [("C", A)] and "from t=1.0s for 0.5s" in found[0].text, found
    assert invariants.two_copies(series, window=1.0) == []  # a switch-over that short is allowed
    assert invariants.two_copies(series, window=0.4) != []


def test_c_an_overlap_still_going_and_one_seen_in_a_single_sample() -> None:
    series = obs((0.0, "h1", A, True), (0.0, "h2", A, True))
    found = invariants.two_copies(series)
    assert ids(found) == [("C", A)] and "still at the last look" in found[0].text
    assert invariants.overlaps(series)[0].lasted == 0.0


def test_c_a_move_seen_in_one_sample_and_copies_of_different_instances_are_no_overlap() -> None:
    series = obs((0.0, "h1", A, True), (0.0, "h2", B, True), (1.0, "h1", A, False), (1.0, "h2", A, True),
                 (2.0, "h1", B, True), (2.0, "h2", B, False))
    assert invariants.two_copies(series) == []


def test_c_a_restart_in_place_is_no_overlap() -> None:
    series = obs((0.0, "h1", A, True), (1.0, "h1", A, False), (1.2, "h1", A, True), (1.2, "h1", A, True))
    assert invariants.overlaps(series) == []


@pytest.mark.parametrize("changes, state", [
    ({f"instances__{A}": None}, "PENDING"),
    ({f"instances__{A}": status(A, H1, Actual.BUILDING, ago=60)}, "BUILDING"),
    ({f"requests__{H1}__{A}": request(A, H1, Desired.DELETED, ago=80),
      f"instances__{A}": status(A, H1, Actual.DELETING, ago=70)}, "DELETING"),
    ({f"requests__{H1}__{A}": request(A, H1, Desired.STOPPED, ago=45)}, "ACTIVE (requested stopped)"),
    # a reason written before the request changed says nothing about this wait
    ({f"requests__{H1}__{A}": request(A, H1, Desired.STOPPED, ago=45),
      f"instances__{A}": status(A, H1, ago=50, reason="built")}, "ACTIVE (requested stopped)"),
])
def test_w_a_request_stuck_without_a_reason(changes: dict[str, bytes | None], state: str) -> None:
    found = invariants.stuck(view(**changes), NOW, 30)
    assert ids(found) == [("W", A)] and found[0].text.startswith(f"{A}: {state}") and "for " in found[0].text, found


@pytest.mark.parametrize("changes", [
    {f"instances__{A}": None, f"requests__{H1}__{A}": request(A, H1, ago=20)},  # young
    {f"instances__{A}": status(A, H1, Actual.DELETING, ago=60, reason="waiting for Placement to free the "
                                                                      "allocation"),
     f"requests__{H1}__{A}": request(A, H1, Desired.DELETED, ago=80)},  # named
    {f"instances__{A}": None, f"alive__{H1}": None},  # its host is DOWN: nothing there can say why
    {f"instances__{A}": None,
     f"hosts__{H1}": contract.encode({"uuid": H1, "state": "unhealthy", "reason": "libvirt hangs"}).encode()},
    {f"instances__{A}": status(A, H1, Actual.BUILDING, updated_at="yesterday")},  # unreadable stamp: not judged
])
def test_w_a_wait_that_is_young_or_named_is_no_violation(changes: dict[str, bytes | None]) -> None:
    assert invariants.stuck(view(**changes), NOW, 30) == []


def test_malformed_records_read_as_none_and_never_raise() -> None:
    etcd = view(**{f"instances__{A}": b"\xff", f"hosts__{H1}": b"[]", f"down__{H2}": b"nope"})
    assert etcd.statuses[A] is None and H1 not in etcd.hosts and etcd.down == {H2: None}
    assert ids(invariants.settled(etcd)) == [("5", A)]


POOL = "99999999-0000-0000-0000-000000000009"
V1, V2 = "0000000a-0000-4000-8000-000000000001", "0000000b-0000-4000-8000-000000000002"


def volume(vid: str, instance: str | None, state: str = "available", size: int = 2) -> bytes:
    return contract.encode({"id": vid, "name": None, "project_id": "p", "user_id": "u", "size_gb": size, "pool": POOL,
                            "pool_name": "vms", "image": f"vol-{vid}", "state": state, "instance": instance,
                            "created_at": stamp(50), "updated_at": stamp(50)}).encode()


def ref(vid: str) -> dict[str, str]:
    return {"id": vid, "image": f"vol-{vid}", "pool": POOL}


def volume_world() -> tuple[dict[str, bytes], PlacementView]:
    """A on H1 with V1 attached; V2 free; A's disk and both volumes on the pool."""
    kvs = clean_kvs()
    kvs[f"{P}/requests/{H1}/{A}"] = request(A, H1, volumes=[ref(V1)])
    kvs[f"{P}/volumes/{V1}"], kvs[f"{P}/volumes/{V2}"] = volume(V1, A), volume(V2, None)
    pools = PlacementView(allocations={POOL: {V1: {"DISK_GB": 2}, V2: {"DISK_GB": 2}, A: {"DISK_GB": 1}}})
    return kvs, pools


def test_v_a_volume_is_one_instances_and_holds_its_own_allocation() -> None:
    kvs, pools = volume_world()
    assert invariants.volumes_held(EtcdView.parse(P, kvs), pools) == []
    seeded = {
        "two requests": {f"{P}/requests/{H2}/{B}": request(B, H2, Desired.STOPPED, volumes=[ref(V1)])},
        "record names another": {f"{P}/volumes/{V1}": volume(V1, B)},
        "no such volume": {f"{P}/requests/{H2}/{B}": request(B, H2, Desired.STOPPED, volumes=[ref(V2[:-1] + "9")])},
    }
    for why, change in seeded.items():
        found = invariants.volumes_held(EtcdView.parse(P, {**kvs, **change}), pools)
        assert [v.invariant for v in found] == ["V"], (why, found)
    leaked = PlacementView(allocations={POOL: {**pools.allocations[POOL], B[:-1] + "c": {"DISK_GB": 3}}})
    assert ["neither a volume nor an instance" in v.text for v in
            invariants.volumes_held(EtcdView.parse(P, kvs), leaked)] == [True]
    del pools.allocations[POOL][V2]
    assert [v.uuid for v in invariants.volumes_held(EtcdView.parse(P, kvs), pools)] == [V2]
    kvs[f"{P}/volumes/{V2}"] = volume(V2, None, "deleting")  # its allocation goes while it is deleted
    assert invariants.volumes_held(EtcdView.parse(P, kvs), pools) == []


def test_3_an_rbd_instance_holds_on_its_host_what_it_claimed_there() -> None:
    kvs = clean_kvs()
    kvs[f"{P}/requests/{H1}/{A}"] = contract.encode({
        **contract.decode(request(A, H1)), "resources": {**RES, "DISK_GB": 1},
        "allocations": {H1: {"resources": RES}, POOL: {"resources": {"DISK_GB": 1}}}}).encode()
    assert invariants.owned_allocations(EtcdView.parse(P, kvs), clean_placement()) == []
