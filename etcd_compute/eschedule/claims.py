"""Choosing and claiming a host: the allocation-candidates query, the claim, its release.

The query is Placement's own GET /allocation_candidates query string; only its
`resources` part is checked here (a typo there would otherwise read as "no capacity"),
Placement validates the rest. Hosts whose ecompute lease lapsed (DOWN) are never chosen.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from etcd_compute.contract import Allocations
from etcd_compute.errors import ECError, NoCapacity, PlacementError, UsageError
from etcd_compute.placement import CONCURRENT_UPDATE, PlacementClient
from etcd_compute.store import Store

LOG = logging.getLogger(__name__)

RESOURCES_KEY = re.compile(r"^resources[a-zA-Z0-9_-]{0,64}$")
RESOURCE_CLASS = re.compile(r"^[A-Z][A-Z0-9_]*$")
MAX_AMOUNT = 2**31 - 1
Params = list[tuple[str, str]]
# claim(consumer, allocations): raises PlacementError as Placement's PUT /allocations does.
ClaimFn = Callable[[str, Allocations], None]


def parse_query(query: str, limit: int) -> Params:
    """Validate the resources part of an allocation-candidates query; pass the rest through."""
    if not query or "=" not in query:
        raise UsageError(f"malformed query {query!r}: expected e.g. 'resources=VCPU:1,MEMORY_MB:256'")
    try:
        params = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError as exc:
        raise UsageError(f"malformed query {query!r}: {exc}") from None
    groups = [(k, v) for k, v in params if RESOURCES_KEY.match(k)]
    if not groups:
        raise UsageError(f"malformed query {query!r}: no resources=CLASS:AMOUNT,... part")
    for key, value in groups:
        seen = set()
        for item in value.split(","):
            rc, sep, amount = item.partition(":")
            if not sep or not RESOURCE_CLASS.match(rc):
                raise UsageError(f"malformed query: {key}={value!r}: {item!r} is not CLASS:AMOUNT")
            if rc in seen:
                raise UsageError(f"malformed query: {key}={value!r}: {rc} given twice")
            seen.add(rc)
            if not amount.isdigit() or not 1 <= int(amount) <= MAX_AMOUNT:
                raise UsageError(f"malformed query: {key}={value!r}: amount of {rc} must be "
                                 f"a whole number from 1 to {MAX_AMOUNT}, got {amount!r}")
    limits = [v for k, v in params if k == "limit"]
    if not limits:
        params.append(("limit", str(limit)))
    elif not all(v.isdigit() and int(v) > 0 for v in limits):
        raise UsageError(f"malformed query: limit must be a positive number, got {limits[0]!r}")
    return params


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


def claim(placement: PlacementClient, uuid: str, params: Params, is_up: Callable[[str], bool],
          put: ClaimFn) -> tuple[Allocations, str]:
    """Claim the first candidate on a live host that still fits (with `put`); re-ask
    Placement when all were taken. Returns (allocations, host) or raises NoCapacity."""
    down: set[str] = set()
    for _ in range(6):
        try:
            found = placement.allocation_candidates(params)
        except PlacementError as exc:
            if exc.status == 400:
                raise UsageError(f"query rejected by Placement: {exc.args[0].split(': ', 1)[-1]}") from None
            raise
        summaries = found["provider_summaries"]
        candidates = found["allocation_requests"]
        if not candidates:
            break
        live = 0
        for candidate in candidates:
            allocations = candidate["allocations"]
            host = host_of(allocations, summaries)
            if not is_up(host):
                down.add(host)
                continue
            live += 1
            if _try_claim(uuid, allocations, put):
                return allocations, host
        if not live and not _widen_limit(params, len(candidates)):
            break  # every candidate there is sits on a host that is down
    extra = f" ({len(down)} candidate hosts are down)" if down else ""
    raise NoCapacity(f"no capacity for {_query_text(params)}{extra}")


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
