"""The recheck after a claim: a claim that left its provider over capacity is given back.

Why: Placement 16.0 can let a claim exceed capacity when two claims race on one provider and
its database runs them side by side (PostgreSQL/MySQL with several workers). In
placement/objects/allocation.py, replace_all() retries _set_allocations() up to
[placement] allocation_conflict_retry_count times (default 10) when the provider's
generation bump lost to a racer, but inside the handler's one outer transaction, which still
holds the rows the lost attempt inserted. The retry's "previous usage" snapshot counts those
rows, and _check_capacity_exceeded() lets an allocation through over capacity when it
"reduces existing overage" (no worse than before): so the racer's claim and ours both stand,
one over. Placement logs "... reduces existing overage from N to N". With
allocation_conflict_retry_count = 1 (our devstack, INSTALL.md) the lost attempt is rolled
back and the 409 reaches us instead; this check keeps a Placement left at its default honest.

How: after Placement accepted the claim, read the usage of every provider it charges (one
GET each, after our claim was committed) and compare it with the capacity Placement reported
with the candidates, for the classes we claimed. Over capacity: the claim is freed and
claims.claim() goes on to the next candidate (or asks Placement again).

Why that is enough, whatever the interleaving. Each claimant rechecks after its own claim was
committed, and a kept claim is never freed by this check. Suppose kept claims on a provider
added up to more than its capacity; take the one of them committed last: when it rechecked,
all the others were already committed and still there, so it saw the overage and gave its
claim back -- a contradiction. Concretely, of two racers that together went over:
- one rechecks before the other's claim is committed: it sees no overage and keeps its claim;
  the later one sees both and backs off;
- both recheck after both claims are committed: both see the overage and both back off, and
  each tries again (after a random pause) from a fresh set of candidates; one of them wins.
The cost of the second case is availability, not capacity: while both claims stand, a third
claim on that provider may be refused, and two racers may both find no room at the very end.
An overage that was already there (an inventory lowered under its usage) makes Placement
refuse new claims on the provider, so the recheck only ever meets an overage a claim caused.

An evacuation moves an existing consumer (its previous allocation is gone once the move is
made), so a move found over capacity cannot be given back here: it is kept and logged as an
error. A new claim is told apart by its consumer generation (1: this claim is all it ever had).
If the usage cannot be read, the claim is kept (and logged): no worse than without the check.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from etcd_compute.contract import Allocations
from etcd_compute.errors import ECError
from etcd_compute.placement import PlacementClient

LOG = logging.getLogger(__name__)
GIVEN_BACK = "over capacity (Placement's own conflict retry let it through): freed"  # logged; chaos counts it


def over_capacity(placement: PlacementClient, allocations: Allocations,
                  summaries: dict[str, Any]) -> list[str]:
    """What the providers of `allocations` hold over their capacity, in the classes claimed, as
    "<rp> <class> <used>/<capacity>" (empty: none). Capacity as the candidates reported it
    (Placement's (total - reserved) * allocation_ratio), or read if they did not."""
    over = []
    for rp, alloc in allocations.items():
        usages = placement.usages(rp)
        capacity = {rc: int(r["capacity"]) for rc, r in summaries.get(rp, {}).get("resources", {}).items()}
        if not set(alloc["resources"]) <= set(capacity):
            capacity = {rc: int((inv["total"] - inv["reserved"]) * inv["allocation_ratio"])
                        for rc, inv in placement.inventories(rp).items()}
        for rc in alloc["resources"]:
            if rc in capacity and usages.get(rc, 0) > capacity[rc]:
                over.append(f"{rp} {rc} {usages[rc]}/{capacity[rc]}")
    return over


def kept(placement: PlacementClient, uuid: str, allocations: Allocations, summaries: dict[str, Any]) -> bool:
    """Recheck a claim Placement just accepted (module docstring): True to keep it; False when
    it left a provider over capacity and was freed (try the next candidate)."""
    try:
        over = over_capacity(placement, allocations, summaries)
        if not over:
            return True
        generation = placement.consumer(uuid).get("consumer_generation")
        if generation != 1:
            LOG.error("the move of %s left %s over capacity and cannot be undone here (Placement's "
                      "allocation_conflict_retry_count should be 1)", uuid, ", ".join(over))
            return True
        placement.delete_allocations(uuid)
    except ECError as exc:
        LOG.warning("could not recheck the claim of %s against capacity (%s): kept", uuid, exc)
        return True
    LOG.warning("the claim of %s left %s %s, trying elsewhere", uuid, ", ".join(over), GIVEN_BACK)
    time.sleep(random.uniform(0.01, 0.05))  # two racers that both backed off do not meet again in step
    return False
