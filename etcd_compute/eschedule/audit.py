"""`eschedule audit`: what an operator checks on a live cloud, read from etcd and Placement.

Two checks. `leaked`: allocations on our hosts that no instance owns (`--fix` frees them).
`invariants` (`--invariants`): the invariants of etcd_compute/invariants.py that etcd and
Placement can show: 1 (one request per instance), 3 (allocations and instances match, both
ways), 4 (no provider over capacity), D (no host both UP and marked DOWN) and W (nothing waits
longer than `stuck_after` seconds without a reason). It never reads a hypervisor (2, 5's
comparison with the domains and C need each host's libvirt: the chaos run checks those), and it
writes nothing.

A live cloud moves: a claim precedes its request, an evacuation moves the allocation before
the request, a claim Placement let through over capacity is given back a moment later. So a
finding is reported only if it still holds `grace` seconds later.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from etcd_compute import invariants
from etcd_compute.errors import PlacementError
from etcd_compute.invariants import EtcdView, PlacementView, Violation

if TYPE_CHECKING:
    from etcd_compute.eschedule.operations import Operations
    from etcd_compute.placement import PlacementClient

VIOLATED = 11  # the exit code of `audit --invariants` when it found any (README's table)
CHECKED = ("1", "3", "4", "D", "R", "W", "V")


def _allocations(placement: PlacementClient, host: str) -> dict[str, Any] | None:
    """A host's allocations by consumer; None for a provider that is gone (a retired host)."""
    try:
        return placement.provider_allocations(host)
    except PlacementError as exc:
        if exc.status == 404:
            return None
        raise


def leaked(ops: Operations, fix: bool = False, grace: float = 5.0) -> list[dict[str, Any]]:
    """Allocations of our project on our hosts that no instance in etcd owns. Our hosts are
    those with a record under this prefix: other clouds (prefixes) may share the Placement,
    and their instances are not ours to judge. A claim whose request is still being written
    looks the same for a moment, so a finding must still hold after `grace` seconds."""
    def orphans() -> dict[str, dict[str, Any]]:
        known = ops.store.known_instances()
        found = {}
        for host in ops.store.hosts():
            for consumer, alloc in (_allocations(ops.placement, host) or {}).items():
                if consumer not in known:
                    found[consumer] = {"consumer": consumer, "provider": host, "resources": alloc["resources"]}
        return found

    first = orphans()
    if first and grace:
        time.sleep(grace)
    findings = [f for c, f in orphans().items() if c in first]
    findings = [f for f in findings
                if ops.placement.consumer(f["consumer"]).get("project_id") == ops.cfg.project_id]
    if fix:
        for f in findings:
            ops.placement.delete_allocations(f["consumer"])
    return findings


def gather(ops: Operations) -> tuple[EtcdView, PlacementView, PlacementView]:
    """Everything under the prefix, what Placement holds on every host etcd names (a host
    record, or a request of it), and on every storage pool."""
    store = ops.store
    etcd = EtcdView.parse(store.prefix, {meta.key.decode(): value
                                         for value, meta in store.client.get_prefix(store.prefix + "/")})
    placement = PlacementView()
    for host in sorted(set(etcd.hosts) | {h for found in etcd.requests.values() for h, _ in found}):
        allocations = _allocations(ops.placement, host)
        if allocations is None:
            continue
        placement.allocations[host] = {c: a["resources"] for c, a in allocations.items()}
        placement.usages[host] = ops.placement.usages(host)
        placement.inventories[host] = ops.placement.inventories(host)
    return etcd, placement, _pools(ops)


def _pools(ops: Operations) -> PlacementView:
    """What Placement holds on the cloud's storage pools (volumes and instances' disks)."""
    pools = PlacementView()
    for pool in ops.store.pools():
        allocations = _allocations(ops.placement, pool)
        if allocations is not None:
            pools.allocations[pool] = {c: a["resources"] for c, a in allocations.items()}
    return pools


def check(etcd: EtcdView, placement: PlacementView, pools: PlacementView, now: datetime,
          stuck_after: float) -> list[Violation]:
    """The invariants an audit checks (CHECKED), on one reading."""
    def name(host: str | None) -> str:
        record = etcd.hosts.get(host or "")
        return str(record.get("name")) if record and record.get("name") else invariants.short(host)

    return (invariants.one_host(etcd, name=name) + invariants.owned_allocations(etcd, placement, name=name)
            + invariants.within_capacity(placement, name) + invariants.up_or_down(etcd, name)
            + invariants.group_rules(etcd, name) + invariants.stuck(etcd, now, stuck_after, name)
            + invariants.volumes_held(etcd, pools, name))


def _key(v: Violation) -> tuple[str, str]:
    """The same finding in two readings (its figures, such as an age or a usage, may move)."""
    return v.invariant, v.uuid or re.sub(r"\d+", "#", v.text)


def audit_invariants(ops: Operations, stuck_after: float = 300.0, grace: float = 5.0) -> list[Violation]:
    """The violations that hold in two readings `grace` seconds apart (in the second's words)."""
    first = check(*gather(ops), datetime.now(UTC), stuck_after)
    if not first:
        return []
    if grace:
        time.sleep(grace)
    again = {_key(v) for v in first}
    return [v for v in check(*gather(ops), datetime.now(UTC), stuck_after) if _key(v) in again]


def as_json(found: list[Violation]) -> list[dict[str, Any]]:
    return [{"invariant": v.invariant, "meaning": invariants.INVARIANTS[v.invariant], "uuid": v.uuid,
             "text": v.text} for v in found]


def as_text(found: list[Violation]) -> str:
    return "\n".join(f"{v.invariant}  {v.text}" for v in found) or f"no violations of {', '.join(CHECKED)}"
