"""Shards: a host joins a shard aggregate when it registers, and a schedule asks a random shard
first and widens when it has no room; narrowing must never lose capacity, nor the user's own
member_of and traits.

Hosts are registered here with ecompute's own registration (inventory.register) and made UP
with an alive key, as their daemon would, rather than by a dozen running daemons: what is
tested is the registration and the schedule. The shard asked first is pinned (claims.PICK)
where the point is which one it is, so every case runs, not just the one chance picks.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from etcd_compute.config import ComputeConfig, EtcdConfig, InventoryClassConfig, PlacementConfig, ScheduleConfig
from etcd_compute.ecompute import inventory
from etcd_compute.errors import NoCapacity
from etcd_compute.eschedule import claims
from etcd_compute.eschedule.operations import Operations
from etcd_compute.placement import PlacementClient, shard_aggregate, shard_of

from conftest import Cloud

ONE = "resources=VCPU:1,MEMORY_MB:256"
SHARDS = 4


class Pinned:
    """Stands for claims.PICK: the first shard asked is always `shard`."""

    def __init__(self, shard: int) -> None:
        self.shard = shard

    def randrange(self, n: int) -> int:
        assert n == SHARDS
        return self.shard


@dataclass
class Hosts:
    """Providers of one test, registered as ecompute registers its host, all UP."""

    cloud: Cloud
    uuids: list[str] = field(default_factory=list)
    leases: list[int] = field(default_factory=list)

    def uuid_in(self, name: str, shard: int | None, count: int = SHARDS) -> str:
        """A uuid for host `name` whose shard of `count` is `shard` (None: any)."""
        for i in range(1000):
            uuid = str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"{self.cloud.prefix}/{name}/{i}"))
            if shard is None or shard_of(uuid, count) == shard:
                return uuid
        raise AssertionError("no uuid found")

    def config(self, uuid: str, name: str, *, shards: int = SHARDS, instances: int = 1,
               traits: list[str] | None = None) -> ComputeConfig:
        return ComputeConfig(
            uuid=uuid, name=f"test-{self.cloud.prefix[6:]}-{name}", shards=shards, traits=traits or [],
            placement=PlacementConfig(endpoint=self.cloud.stack["placement"]),
            instances_path=str(self.cloud.files), inventory={
                "VCPU": InventoryClassConfig(total=instances, allocation_ratio=1.0),
                "MEMORY_MB": InventoryClassConfig(total=256 * instances),
                "DISK_GB": InventoryClassConfig(total=10)})

    def add(self, name: str, shard: int | None, *, shards: int = SHARDS, instances: int = 1,
            traits: list[str] | None = None) -> str:
        """Register host `name` in `shard` (None: any), with room for `instances` ONE instances.
        shards=1 registers it in no shard, as an older ecompute (or an operator) would."""
        uuid = self.uuid_in(name, shard)
        inventory.register(self.cloud.placement, self.config(uuid, name, shards=shards, instances=instances,
                                                             traits=traits))
        self.uuids.append(uuid)
        lease = self.cloud.store.claim_alive(uuid, 600, {"uuid": uuid, "pid": 0})
        assert lease is not None
        self.leases.append(lease)
        return uuid

    def fill(self, uuid: str) -> None:
        """Take all the room of a provider left, as other instances would."""
        placement = self.cloud.placement
        free = placement.inventories(uuid)["VCPU"]["total"] - placement.usages(uuid).get("VCPU", 0)
        for _ in range(free):
            placement.claim(str(uuidlib.uuid4()), {uuid: {"resources": {"VCPU": 1, "MEMORY_MB": 256}}},
                            "test-filler", "test-filler")

    def cleanup(self) -> None:
        for lease in self.leases:
            self.cloud.store.revoke_alive(lease)
        for uuid in self.uuids:
            self.cloud.placement.delete_provider(uuid)


@pytest.fixture
def hosts(cloud: Cloud) -> Iterator[Hosts]:
    h = Hosts(cloud)
    yield h
    h.cleanup()


def operations(cloud: Cloud, shards: int = SHARDS) -> Operations:
    cfg = ScheduleConfig(etcd=EtcdConfig(endpoints=[cloud.stack["etcd"]], prefix=cloud.prefix),
                         placement=PlacementConfig(endpoint=cloud.stack["placement"]), default_image=None,
                         shards=shards)
    return Operations(cfg)


def host_of(ops: Operations, query: str) -> str:
    return ops.schedule(query)["host"]


def test_registration_joins_the_shard_and_keeps_other_aggregates(hosts: Hosts) -> None:
    """Placement's PUT replaces the whole list: a register that did not read first would drop the
    operator's aggregate, and one that did not write against what it read would drop an aggregate
    added meanwhile (here: between its read and its write, the worst moment)."""
    placement = hosts.cloud.placement
    operator, meanwhile = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    uuid = hosts.uuid_in("h", 6, count=7)  # shard 6 of 7, so not the same shard as of 4 (0-3)
    hosts.uuids.append(uuid)
    placement.ensure_provider(uuid, f"test-{hosts.cloud.prefix[6:]}-h")
    placement.update_aggregates(uuid, lambda aggs: [*aggs, operator])

    inventory.register(placement, hosts.config(uuid, "h", shards=SHARDS))
    assert set(placement.aggregates(uuid)[0]) == {operator, shard_aggregate(shard_of(uuid, SHARDS))}

    racer = PlacementClient(PlacementConfig(endpoint=hosts.cloud.stack["placement"]))
    real = placement.aggregates
    raced = []

    def aggregates(rp: str) -> tuple[list[str], int]:
        found = real(rp)
        if not raced:
            raced.append(racer.update_aggregates(rp, lambda aggs: [*aggs, meanwhile]))
        return found
    placement.aggregates = aggregates  # type: ignore[method-assign]
    inventory.register(placement, hosts.config(uuid, "h", shards=7))  # the count changed: another shard
    assert raced
    assert set(real(uuid)[0]) == {operator, meanwhile, shard_aggregate(shard_of(uuid, 7))}

    placement.aggregates = real  # type: ignore[method-assign]
    inventory.register(placement, hosts.config(uuid, "h", shards=1))  # sharding turned off: no shard
    assert set(placement.aggregates(uuid)[0]) == {operator, meanwhile}


def test_a_schedule_asks_its_random_shard_first(hosts: Hosts, monkeypatch: pytest.MonkeyPatch) -> None:
    in_shard = {shard: {hosts.add(f"s{shard}-{i}", shard, instances=4) for i in range(2)}
                for shard in range(SHARDS)}
    ops = operations(hosts.cloud)
    for shard in range(SHARDS):
        monkeypatch.setattr(claims, "PICK", Pinned(shard))
        assert host_of(ops, ONE) in in_shard[shard]


@pytest.mark.parametrize("room", ["in one shard", "in no shard"])
def test_a_nearly_full_cloud_places_what_fits_from_any_shard(hosts: Hosts, monkeypatch: pytest.MonkeyPatch,
                                                             room: str) -> None:
    """Room for two instances is left on two providers of one shard, or on one provider that is
    in no shard (registered by an older ecompute): whichever shard is asked first, both are
    placed there, and the third is refused."""
    sharded = [hosts.add(f"s{shard}-{i}", shard) for shard in range(SHARDS) for i in range(2)]
    if room == "in one shard":
        left = set(sharded[2:4])  # the two of shard 1
    else:
        left = {hosts.add("old", None, shards=1, instances=2)}
    for uuid in set(sharded) - left:
        hosts.fill(uuid)
    ops = operations(hosts.cloud)
    for first in range(SHARDS):
        monkeypatch.setattr(claims, "PICK", Pinned(first))
        placed = [ops.schedule(ONE) for _ in range(2)]
        assert {p["host"] for p in placed} <= left
        with pytest.raises(NoCapacity, match="no capacity"):
            ops.schedule(ONE)
        for p in placed:
            ops.placement.delete_allocations(p["uuid"])


def test_a_cloud_fills_up_to_its_last_instance(hosts: Hosts) -> None:
    """Shards asked at random, as they come: every instance that fits is placed, then refused."""
    rooms = {hosts.add(f"h{i}", None, instances=1 + i % 2): 1 + i % 2 for i in range(10)}
    rooms[hosts.add("old", None, shards=1, instances=2)] = 2
    ops = operations(hosts.cloud)
    placed = [host_of(ops, ONE) for _ in range(sum(rooms.values()))]
    assert {h: placed.count(h) for h in rooms} == rooms
    with pytest.raises(NoCapacity):
        ops.schedule(ONE)


def test_the_users_member_of_and_traits_hold_when_the_shard_has_room_elsewhere(
        hosts: Hosts, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shard asked first has room, but not on the hosts the query allows: the instance goes
    where the query says (another shard) or nowhere, never into the shard's free room."""
    aggregate, trait = str(uuidlib.uuid4()), "CUSTOM_TEST_SHARDS"  # (the trait is left: one name, no litter)
    elsewhere = {hosts.add(f"free{i}", 0, instances=8) for i in range(2)}
    member = hosts.add("member", 1)
    hosts.cloud.placement.update_aggregates(member, lambda aggs: [*aggs, aggregate])
    gifted = hosts.add("gifted", 2, traits=[trait])
    ops = operations(hosts.cloud)
    monkeypatch.setattr(claims, "PICK", Pinned(0))
    assert host_of(ops, f"{ONE}&member_of={aggregate}") == member
    assert host_of(ops, f"{ONE}&required={trait}") == gifted
    for query in (f"{ONE}&member_of={aggregate}", f"{ONE}&required={trait}"):
        with pytest.raises(NoCapacity):  # both are full now, while shard 0 still has room
            ops.schedule(query)
    assert host_of(ops, ONE) in elsewhere
