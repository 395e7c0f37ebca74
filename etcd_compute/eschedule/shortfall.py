"""Why no host: what a "no capacity" answer says, and `eschedule QUERY --count`.

"no capacity" alone leaves the user guessing whether to ask for less, wait, or fix a host. So
the answer names, per resource class, what was asked against the most any up host has free,
and how many hosts were down, locked or filtered out by the query's traits/aggregates.

It is read only once claim() found nothing, so a schedule that succeeds pays nothing for it:
one relaxed GET /allocation_candidates per class asked (`resources=CLASS:1` with the query's
own filters; its provider_summaries give capacity and usage of every class of each provider
with room for that class, and a provider absent from all of them has nothing free of any),
one GET /resource_providers with the filters (which up hosts they leave out), and three etcd
reads (alive keys, host records, pools). message() and fits() are pure, tested as tables.
"""

from __future__ import annotations

from typing import Any

from etcd_compute.contract import Allocations
from etcd_compute.eschedule import claims
from etcd_compute.placement import PlacementClient
from etcd_compute.store import Store

# The query's keys that filter whole hosts (their traits, aggregates, tree); suffixed ones bind
# a granular group's provider, not the host, and are not counted.
FILTERS = ("required", "member_of", "in_tree")
Free = dict[str, int]  # resource class -> amount free


def message(asked: dict[str, int], free: list[Free], down: int, locked: int, filtered: int,
            rule: str | None = None) -> str:
    """One line: each class whose ask exceeds what the best up host has free (of `free`: one
    entry per up, unlocked host the filters allow), then the hosts not considered, then why a
    server group's `rule` excluded hosts."""
    parts: list[str] = []
    if not free:
        parts.append("no up host to place it on")
    else:
        best = {rc: max(host.get(rc, 0) for host in free) for rc in asked}
        short = [f"{rc}: asked {n}, at most {best[rc]} free on any up host" for rc, n in asked.items() if best[rc] < n]
        if short:
            parts += short
        elif not rule:
            parts.append("each class fits on some up host, but none has room for all of them at once")
    counts = [f"{n} {'host' if n == 1 else 'hosts'} {what}" for n, what in
              ((down, "down"), (locked, "locked"), (filtered, "filtered out by traits/aggregates")) if n]
    if counts:
        parts.append(", ".join(counts))
    if rule:
        parts.append(rule)
    return "; ".join(parts)


def fits(candidates: list[tuple[str, Allocations]], free: dict[str, Free], roots: dict[str, str]
         ) -> tuple[int, dict[str, int]]:
    """How many more instances fit: (in all, per host). A host fits as many as its scarcest class
    allows, on its best candidate; a provider outside the host's tree (a shared storage pool)
    caps the total instead, since every host draws on the same pool."""
    per_host: dict[str, int] = {}
    caps: dict[tuple[str, str], int] = {}
    for host, allocations in candidates:
        own: list[int] = []
        for rp, alloc in allocations.items():
            for rc, amount in alloc["resources"].items():
                n = free.get(rp, {}).get(rc, 0) // amount if amount > 0 else 0
                if roots.get(rp, rp) == host:
                    own.append(n)
                else:
                    caps[(rp, rc)] = n
        per_host[host] = max(per_host.get(host, 0), min(own, default=0))
    return min([sum(per_host.values()), *caps.values()]), per_host


def _free(summary: dict[str, Any]) -> Free:
    return {rc: int(r["capacity"]) - int(r["used"]) for rc, r in summary.get("resources", {}).items()}


def _usable(store: Store) -> tuple[set[str], int, int]:
    """(up hosts that are not locked, how many hosts are down, how many locked). Locked: its
    record says it locked its inventory (stopped cleanly, or its hypervisor does not answer);
    down: its lease lapsed otherwise (it died, or lost etcd). Hosts are this cloud's: those
    with a record or an alive key under its etcd prefix."""
    alive, records = store.alive_hosts(), store.hosts()
    locked = {h for h, record in records.items() if record.get("state") != "up"}
    return alive - locked, len(set(records) - alive - locked), len(locked)


def explain(placement: PlacementClient, store: Store, params: claims.Params, rule: str | None = None) -> str:
    """message() for a query claim() found no room for, from Placement and etcd as they are."""
    asked = claims.requested(params)
    filters = [(k, v) for k, v in params if k in FILTERS]
    up, down, locked = _usable(store)
    filtered = 0
    if filters:
        providers = placement.request("GET", "/resource_providers", params=filters).json()["resource_providers"]
        allowed = {rp.get("root_provider_uuid") or rp["uuid"] for rp in providers}
        filtered = len(up - allowed)
        up &= allowed
    pools = set(store.pools())
    free: dict[str, Free] = {host: {} for host in up}
    shared: Free = {}
    for rc in asked:
        found = placement.allocation_candidates([("resources", f"{rc}:1"), *filters])
        for rp, summary in found["provider_summaries"].items():
            root = summary.get("root_provider_uuid") or rp
            into = free.get(root) if root in free else shared if rp in pools else None
            if into is not None:
                for c, n in _free(summary).items():
                    into[c] = max(into.get(c, 0), n)
    for host in free.values():  # a host without a class of its own draws it from its pool
        for c, n in shared.items():
            host.setdefault(c, n)
    return message(asked, list(free.values()), down, locked, filtered, rule)


def count(placement: PlacementClient, store: Store, params: claims.Params) -> dict[str, Any]:
    """How many more instances of `params` fit now on up, unlocked hosts; claims nothing."""
    found = claims.candidates_of(placement, [(k, v) for k, v in params if k != "limit"])
    summaries = found["provider_summaries"]
    up, _, _ = _usable(store)
    candidates = [(host, c["allocations"]) for c in found["allocation_requests"]
                  if (host := claims.host_of(c["allocations"], summaries)) in up]
    total, per_host = fits(candidates, {rp: _free(s) for rp, s in summaries.items()},
                           {rp: s.get("root_provider_uuid") or rp for rp, s in summaries.items()})
    return {"fits": total, "hosts": per_host}
