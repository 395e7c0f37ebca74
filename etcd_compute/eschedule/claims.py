"""Choosing and claiming a host: the allocation-candidates query, the claim, its release.

The query is Placement's own GET /allocation_candidates query string. What decides what an
instance is charged for is checked here: the `resources` groups (a typo there would read as
"no capacity"), that they ask for VCPU and MEMORY_MB (the host builds a domain with both, and
what Placement does not count is capacity handed out twice), and that no key Placement reads
only once is repeated (it would drop the rest silently). Placement validates the rest.
Hosts whose ecompute lease lapsed (DOWN) are never chosen.

Narrowing: Placement reads every matching provider before `limit` applies, so a large cloud's
query is slow. Each host joins one of `shards` shard aggregates when it registers, and the
first query here adds `member_of=<a random shard>` (Placement ANDs it with the user's own
member_of and traits). When that shard has nothing, the query is asked again without it (the
whole cloud, providers in no shard too): two queries at most, and the second costs what the one
query cost before (a walk over more shards would cost their sum, and miss providers in no shard).
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode

from etcd_compute.contract import MAX_AMOUNT, Allocations
from etcd_compute.errors import ECError, NoCapacity, PlacementError, UsageError
from etcd_compute.eschedule import overcommit
from etcd_compute.eschedule.groups import Rule
from etcd_compute.placement import CONCURRENT_UPDATE, PlacementClient, shard_aggregate
from etcd_compute.store import Store

LOG = logging.getLogger(__name__)

# All matched whole (fullmatch): `$` would also match before a trailing newline.
QUERY_KEY = re.compile(r"[a-z_]{1,32}[a-zA-Z0-9_-]{0,64}")
RESOURCES_KEY = re.compile(r"resources[a-zA-Z0-9_-]{0,64}")
# Keys whose repeats Placement combines (ANDs); of any other key it reads only one.
REPEATABLE_KEY = re.compile(r"(required|member_of)[a-zA-Z0-9_-]{0,64}|same_subtree")
RESOURCE_CLASS = re.compile(r"[A-Z][A-Z0-9_]*")
WHOLE = re.compile(r"[0-9]{1,12}")  # ASCII digits only: str.isdigit() also takes '²', which int() refuses
CHARGED = ("VCPU", "MEMORY_MB")  # what every domain uses, so what every instance must be charged for
# Bytes of the query as sent: Placement's usual server (gunicorn) refuses request lines over 4094.
MAX_QUERY = 3000
Params = list[tuple[str, str]]
# claim(consumer, allocations): raises PlacementError as Placement's PUT /allocations does.
ClaimFn = Callable[[str, Allocations], None]
# accept(allocations, host) after a claim: True keeps it; False means it undid the claim itself
# (a server group's compare failed in etcd) and the next candidate is tried.
AcceptFn = Callable[[Allocations, str], bool]
PICK = random.Random()  # which shard is asked first (a test may pin it)


def parse_query(query: str, limit: int) -> Params:
    """Validate what decides the charge of an allocation-candidates query; pass the rest through."""
    shown = query if len(query) <= 80 else query[:80] + "..."
    if not query or "=" not in query:
        raise UsageError(f"malformed query {shown!r}: expected e.g. 'resources=VCPU:1,MEMORY_MB:256'")
    try:
        params = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError as exc:
        raise UsageError(f"malformed query {shown!r}: {exc}") from None
    size = len(urlencode(params))
    if size > MAX_QUERY:
        raise UsageError(f"query is too long: {size} bytes as sent to Placement, at most {MAX_QUERY}")
    for key, count in Counter(k for k, _ in params).items():
        if not QUERY_KEY.fullmatch(key):
            raise UsageError(f"malformed query: {key!r} is not a query key")
        if count > 1 and not REPEATABLE_KEY.fullmatch(key):
            raise UsageError(f"malformed query: {key!r} given twice (Placement would read only one of them)")
    groups = [(k, v) for k, v in params if RESOURCES_KEY.fullmatch(k)]
    if not groups:
        raise UsageError(f"malformed query {shown!r}: no resources=CLASS:AMOUNT,... part")
    classes: set[str] = set()
    for key, value in groups:
        classes |= _resources(key, value)
    limits = [v for k, v in params if k == "limit"]
    if not limits:
        params.append(("limit", str(limit)))
    elif not WHOLE.fullmatch(limits[0]) or int(limits[0]) < 1:
        raise UsageError(f"malformed query: limit must be a whole number of at least 1, got {limits[0]!r}")
    missing = [rc for rc in CHARGED if rc not in classes]
    if missing:
        raise UsageError(f"query {shown!r} must ask for VCPU and MEMORY_MB (every instance is charged for "
                         f"the vCPUs and memory of its domain); it lacks {' and '.join(missing)}")
    return params


def requested(params: Params) -> dict[str, int]:
    """What a parsed query asks for in all, over its resources groups (what a quota counts)."""
    total: Counter[str] = Counter()
    for key, value in params:
        if RESOURCES_KEY.fullmatch(key):
            for part in value.split(","):
                rc, amount = part.split(":")
                total[rc] += int(amount)
    return dict(total)


def _resources(key: str, value: str) -> set[str]:
    """The classes of one resources group, each CLASS:AMOUNT with a whole amount, none twice."""
    seen: set[str] = set()
    for item in value.split(","):
        rc, sep, amount = item.partition(":")
        if not sep or not RESOURCE_CLASS.fullmatch(rc):
            raise UsageError(f"malformed query: {key}={value!r}: {item!r} is not CLASS:AMOUNT")
        if rc in seen:
            raise UsageError(f"malformed query: {key}={value!r}: {rc} given twice")
        seen.add(rc)
        if not WHOLE.fullmatch(amount) or not 1 <= int(amount) <= MAX_AMOUNT:
            raise UsageError(f"malformed query: {key}={value!r}: amount of {rc} must be "
                             f"a whole number from 1 to {MAX_AMOUNT}, got {amount!r}")
    return seen


def host_of(allocations: Allocations, summaries: dict[str, Any]) -> str:
    """The compute host of an allocation request: the root of the provider giving VCPU/RAM."""
    def root(rp: str) -> str:
        return str(summaries.get(rp, {}).get("root_provider_uuid") or rp)
    compute = [rp for rp, a in allocations.items() if {"VCPU", "MEMORY_MB"} & set(a["resources"])]
    return root(sorted(compute or allocations)[0])


def liveness(store: Store) -> Callable[[str], bool]:
    """is_up(host), reading only the hosts asked about (once each): a large cloud's
    schedule must not pay for every host's alive key."""
    seen: dict[str, bool] = {}

    def is_up(host: str) -> bool:
        if host not in seen:
            seen[host] = store.is_alive(host)
        return seen[host]
    return is_up


def narrowed(params: Params, shards: int, pools: list[str] | None = None) -> list[Params]:
    """The queries to ask in turn: one random shard of `shards`, then the user's query as it is.
    The shard is the plain hosts' and each shared storage pool's (`pools`, their sharing
    providers): a host with its disks in a pool is in its pool's shards, with the pool, since
    Placement wants a sharing provider in the member_of aggregate too. Not narrowed: no sharding
    (1), a query without an unsuffixed resources group (the shard filter would not bind the
    host), or one with in_tree (a single tree is narrow already)."""
    keys = {k for k, _ in params}
    if shards <= 1 or "resources" not in keys or any(k.startswith("in_tree") for k in keys):
        return [params]
    n = PICK.randrange(shards)
    shard = ",".join([shard_aggregate(n), *(shard_aggregate(n, pool) for pool in pools or [])])
    return [[*params, ("member_of", f"in:{shard}" if pools else shard)], params]


def claim(placement: PlacementClient, uuid: str, params: Params, is_up: Callable[[str], bool],
          put: ClaimFn, shards: int = 1, pools: list[str] | None = None, *, rule: Rule | None = None,
          accept: AcceptFn | None = None, explain: Callable[[str | None], str] | None = None
          ) -> tuple[Allocations, str]:
    """Claim the first candidate on a live host that still fits (with `put`), in a random shard
    first, then anywhere (see narrowed()), on a host that a server group's `rule` allows, in its
    order of preference; `accept` may still turn a claim down. Returns (allocations, host) or
    raises NoCapacity, saying what excluded hosts: explain(the rule's why) when given (read only
    now, so a claim that succeeds never pays for it; shortfall.py), else the down hosts seen."""
    down: set[str] = set()
    home = rule.home() if rule else None
    if home is not None:  # a hard affinity group: Placement is asked for its host only
        params = [*params, ("in_tree", home)]
    for query in narrowed(params, shards, pools):
        found = _claim_in(placement, uuid, list(query), is_up, put, down, rule, accept)
        if found is not None:
            return found
    ruled = rule.why() if rule is not None else ""
    why = [f"{len(down)} candidate hosts are down"] if down else []
    if ruled:
        why.append(ruled)
    if explain is not None:
        try:
            why = [explain(ruled or None)]
        except ECError as exc:  # the plain answer still stands
            LOG.warning("cannot say why there is no capacity: %s", exc)
    extra = f" ({'; '.join(why)})" if why else ""
    raise NoCapacity(f"no capacity for {_query_text(params)}{extra}")


def candidates_of(placement: PlacementClient, params: Params) -> dict:
    """GET /allocation_candidates for `params`; a query Placement rejects is the user's error."""
    try:
        return placement.allocation_candidates(params)
    except PlacementError as exc:
        if exc.status == 400:
            raise UsageError(f"query rejected by Placement: {exc.args[0].split(': ', 1)[-1]}") from None
        raise


def _claim_in(placement: PlacementClient, uuid: str, params: Params, is_up: Callable[[str], bool],
              put: ClaimFn, down: set[str], rule: Rule | None = None,
              accept: AcceptFn | None = None) -> tuple[Allocations, str] | None:
    """claim() for one query: re-ask Placement when all candidates were taken; None when there
    is nothing (left) to claim."""
    for _ in range(6):
        found = candidates_of(placement, params)
        summaries = found["provider_summaries"]
        candidates = [(c["allocations"], host_of(c["allocations"], summaries)) for c in found["allocation_requests"]]
        if not candidates:
            break
        if rule is not None:
            candidates.sort(key=lambda c: rule.rank(c[1]))  # stable: Placement's order among equals
        live, claimed = _claim_one(placement, uuid, candidates, summaries, is_up, put, down, rule, accept)
        if claimed is not None:
            return claimed
        if not live and not _widen_limit(params, len(candidates)):
            break  # every candidate there is sits on a host that is down (or that the group excludes)
    return None


def _claim_one(placement: PlacementClient, uuid: str, candidates: list[tuple[Allocations, str]],
               summaries: dict[str, Any], is_up: Callable[[str], bool], put: ClaimFn, down: set[str],
               rule: Rule | None, accept: AcceptFn | None) -> tuple[int, tuple[Allocations, str] | None]:
    """Claim the first of one page of candidates that may be claimed: (how many were live and
    allowed, the claim or None)."""
    live = 0
    for allocations, host in candidates:
        if not is_up(host):
            down.add(host)
            continue
        if rule is not None and not rule.allows(host):
            continue
        live += 1
        if _try_claim(uuid, allocations, put) and overcommit.kept(placement, uuid, allocations, summaries):
            if accept is None or accept(allocations, host):
                return live, (allocations, host)
            if rule is not None:
                rule.refused.add(host)
    return live, None


def _try_claim(uuid: str, allocations: Allocations, put: ClaimFn) -> bool:
    for attempt in range(8):
        try:
            put(uuid, allocations)
            return True
        except PlacementError as exc:
            if exc.status == 400 and "does not exist" in str(exc):
                return False  # the provider went away since the candidates were listed
            if exc.status != 409:
                raise
            if exc.code != CONCURRENT_UPDATE:
                return False  # it no longer fits: try the next candidate
            time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))  # a racer bumped the generation
    return False


def unclaim(placement: PlacementClient, uuid: str) -> None:
    """Free a claim whose request could not be written (never raises: it is cleanup)."""
    try:
        placement.delete_allocations(uuid)
    except ECError as exc:
        LOG.error("could not free the allocation of %s after a failed write: %s "
                  "(run 'eschedule audit --fix' later)", uuid, exc)


def _widen_limit(params: Params, returned: int) -> bool:
    """When a full page of candidates was all on DOWN hosts, ask for 4x as many (in place)."""
    for i, (key, value) in enumerate(params):
        if key == "limit" and returned >= int(value) and int(value) < 10000:
            params[i] = ("limit", str(min(int(value) * 4, 10000)))
            return True
    return False


def _query_text(params: Params) -> str:
    return "&".join(f"{k}={v}" for k, v in params if k != "limit")
