"""Scale: Operations.schedule latency with 10, 100, 1,000 and 5,000 resource providers, with
narrowing (shard aggregates: a random shard first, claims.narrowed) and without it (shards: 1),
next to a bare GET /allocation_candidates of the same query at the same size (the floor), in
the same run; plus what a full cloud costs (a schedule that fits nowhere, refused).

Providers are created straight through Placement (bench-scale-<run>-<n>, each with the run's
own trait, which the query requires, so other sessions' providers on the bench Placement are
not counted), put in their shard by the same call ecompute's registration makes
(PlacementClient.join_shard), and all UP (alive keys on one etcd lease). Creating 5,000
providers takes minutes, so they are made once and walked: each walk samples every size,
up (creating providers) or down (deleting them, which is the clean-up anyway), the next walk
going the other way (10 .. 5000, then 5000 .. 10): each walk gives one figure of the ratio,
and drift of this shared machine falls on small and large sizes alike. Every
allocation is deleted right after its sample; providers, trait, lease and etcd prefix are
removed at the end. The picture (scale.svg) is drawn from the medians of the walks.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from etcd_compute import contract
from etcd_compute.config import PlacementConfig, ScheduleConfig
from etcd_compute.errors import ECError, NoCapacity
from etcd_compute.eschedule.claims import parse_query
from etcd_compute.eschedule.operations import Operations
from etcd_compute.placement import PlacementClient
from etcd_compute.store import Store

import common
from common import say as log
from scheduling import RESOURCES, clear_instances, drop_trait, scheduler

BENCH = "scale"
INVENTORY = {"VCPU": 64, "MEMORY_MB": 262144, "DISK_GB": 2000}
FITS_NOWHERE = "resources=VCPU:65,MEMORY_MB:256,DISK_GB:1"  # more than any of ours has: what a full cloud answers
SHARDS = ScheduleConfig().shards  # the default, as deployed
WORKERS = 3  # client threads creating/deleting providers (Placement serves one request at a time)
PICTURE = Path(__file__).resolve().parent / "scale.svg"
# series of one size in one walk: bare GET (the floor), schedule narrowed / not, refusal narrowed / not,
# and how many GETs each narrowed schedule made (1: its shard had room; 2: it widened)
SERIES = ("get", "narrowed", "plain", "refused_narrowed", "refused_plain", "gets_per_schedule")


def run(info: dict, quick: bool, walks: int = 2) -> list[common.Figure]:
    """`walks`: two by default (up, down); each more makes or removes 5,000 providers again."""
    sizes, samples = ((10, 100, 1000), 6) if quick else ((10, 100, 1000, 5000), 20)
    run_id = uuidlib.uuid4().hex[:8]
    trait = f"CUSTOM_BENCH_{run_id.upper()}"
    query = f"{RESOURCES}&required={trait}"
    prefix = f"/bench-scale-{run_id}"
    placement, store = common.clients(info, prefix)
    placement.request("PUT", f"/traits/{trait}")
    lease = store.client.lease(3600)  # one lease for every alive key; revoked at the end
    local = threading.local()
    providers: list[str] = []  # in creation order; a walk down deletes from the end
    consumers: set[str] = set()

    def client() -> PlacementClient:
        if not hasattr(local, "client"):
            local.client = PlacementClient(PlacementConfig(endpoint=info["placement"]))
        return local.client

    def create(i: int) -> str:
        return create_provider(client(), f"bench-scale-{run_id}-{i}", trait, providers)

    def delete(rp: str) -> None:
        delete_provider(client(), rp)

    def alive(rps: list[str], up: bool) -> None:
        """Put (on the lease) or delete the alive keys, 100 per transaction."""
        for i in range(0, len(rps), 100):
            store.client.transaction(compare=[], failure=[], success=[
                store.tx.put(contract.alive_key(prefix, rp), contract.encode(
                    {"uuid": rp, "pid": 0, "since": contract.now()}), lease=lease) if up
                else store.tx.delete(contract.alive_key(prefix, rp)) for rp in rps[i:i + 100]])

    # walks[w][size][series] -> samples (ms, or GET counts)
    measured: list[dict[int, dict[str, list[float]]]] = []
    seconds: dict[str, float] = {}
    try:
        narrowed = scheduler(info, prefix)
        narrowed.cfg.shards = SHARDS
        plain = scheduler(info, prefix)
        plain.cfg.shards = 1
        params = parse_query(query, narrowed.cfg.limit)
        with ThreadPoolExecutor(WORKERS) as pool:
            for walk in range(walks):
                measured.append({})
                for size in sizes if walk % 2 == 0 else sizes[::-1]:
                    t0 = time.monotonic()
                    if size > len(providers):
                        alive(list(pool.map(create, range(len(providers), size))), True)
                        seconds[f"walk {walk + 1}: create to {size}"] = round(time.monotonic() - t0, 1)
                    elif size < len(providers):
                        gone = providers[size:]
                        alive(gone, False)
                        list(pool.map(delete, gone))
                        del providers[size:]
                        seconds[f"walk {walk + 1}: delete to {size}"] = round(time.monotonic() - t0, 1)
                    got = measure(narrowed, plain, placement, store, query, f"{FITS_NOWHERE}&required={trait}",
                                  params, samples, consumers)
                    measured[walk][size] = got
                    log(f"walk {walk + 1}, {size} providers: schedule p50 {common.median(got['narrowed']):.0f} ms "
                        f"narrowed, {common.median(got['plain']):.0f} ms not; GET allocation_candidates p50 "
                        f"{common.median(got['get']):.0f} ms; refused {common.median(got['refused_narrowed']):.0f} "
                        f"/ {common.median(got['refused_plain']):.0f} ms")
        figs = figures(sizes, measured, seconds)
        draw(sizes, measured)
        return figs
    finally:
        with contextlib.suppress(Exception):
            for consumer in consumers:
                placement.delete_allocations(consumer)
        with ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(delete, list(providers)))
        with contextlib.suppress(Exception):
            lease.revoke()
        with contextlib.suppress(Exception):
            store.client.delete_prefix(prefix + "/")
        drop_trait(placement, trait)
        store.close()


def create_provider(pc: PlacementClient, name: str, trait: str, providers: list[str]) -> str:
    """One provider of the bench, in its shard; made anew when an answer was lost (this machine
    is loaded). Noted in `providers` before it exists, so clean-up sees every one that may."""
    for attempt in range(3):
        rp = str(uuidlib.uuid4())
        providers.append(rp)  # list.append is atomic
        try:
            pc.request("POST", "/resource_providers", json={"uuid": rp, "name": name})
            pc.request("PUT", f"/resource_providers/{rp}/inventories", json={
                "resource_provider_generation": 0,
                "inventories": {rc: {"total": total, "max_unit": total} for rc, total in INVENTORY.items()}})
            pc.request("PUT", f"/resource_providers/{rp}/traits",
                       json={"resource_provider_generation": 1, "traits": [trait]})
            pc.join_shard(rp, SHARDS)  # as ecompute's registration does
            return rp
        except ECError as exc:
            delete_provider(pc, rp)
            providers.remove(rp)
            if attempt == 2:
                raise
            log(f"making {name} again: {exc}")
            time.sleep(1)
    raise AssertionError("unreachable")


def delete_provider(pc: PlacementClient, rp: str) -> None:
    with contextlib.suppress(Exception):
        pc.request("DELETE", f"/resource_providers/{rp}", ok=(204, 404))


def pooled(measured: list[dict[int, dict[str, list[float]]]], size: int, series: str) -> list[float]:
    return [x for walk in measured for x in walk[size][series]]


def p50_by_walk(measured: list[dict[int, dict[str, list[float]]]], size: int, series: str) -> list[float]:
    return [common.median(walk[size][series]) for walk in measured]


def spread(xs: list[float]) -> str:
    """min / median / max, as the issue asks figures over runs."""
    return f"{min(xs):.3g} / {statistics.median(xs):.3g} / {max(xs):.3g}"


def figures(sizes: tuple[int, ...], measured: list[dict[int, dict[str, list[float]]]],
            seconds: dict[str, float]) -> list[common.Figure]:
    figs = []
    small, big = sizes[0], sizes[-1]
    for size in sizes:
        gets = pooled(measured, size, "gets_per_schedule")
        figs.append(common.figure(
            BENCH, f"schedule latency p50, {size} providers, narrowed ({SHARDS} shards)",
            common.median(pooled(measured, size, "narrowed")), "ms", common.median(pooled(measured, size, "get")),
            "GET allocation_candidates p50", target="(info)", samples=len(pooled(measured, size, "narrowed")),
            not_narrowed_p50_ms=round(common.median(pooled(measured, size, "plain")), 1),
            narrowed_p95_ms=round(common.percentile(pooled(measured, size, "narrowed"), 95), 1),
            widened_share=round(sum(1 for g in gets if g > 1) / len(gets), 3),
            refused_p50_ms={"narrowed": round(common.median(pooled(measured, size, "refused_narrowed")), 1),
                            "not narrowed": round(common.median(pooled(measured, size, "refused_plain")), 1)}))

    def ratios(series: str) -> list[float]:
        return [b / s for b, s in zip(p50_by_walk(measured, big, series), p50_by_walk(measured, small, series),
                                      strict=True)]
    figs.append(common.figure(
        BENCH, f"schedule p50 at {big} vs {small} providers, narrowed",
        common.median(pooled(measured, big, "narrowed")), "ms", common.median(pooled(measured, small, "narrowed")),
        f"schedule p50 at {small} providers",
        target="<= 2x", check=lambda v, r: r is not None and r <= 2.0,
        ratio_by_walk_min_median_max=spread(ratios("narrowed")),
        not_narrowed_ratio_by_walk_min_median_max=spread(ratios("plain")),
        get_allocation_candidates_ratio_by_walk=spread(ratios("get")),
        walks=len(measured), setup_seconds=seconds,
        note=f"narrowed: a random one of {SHARDS} shard aggregates first (member_of), the whole cloud when it has "
             "no room; the floor is the same schedule at the small size; not narrowed is shards: 1"))
    figs.append(common.figure(
        BENCH, f"schedule p50 at {big} providers narrowed vs {small} providers not narrowed",
        common.median(pooled(measured, big, "narrowed")), "ms", common.median(pooled(measured, small, "plain")),
        f"schedule p50 at {small} providers, shards: 1", target="<= 2x",
        check=lambda v, r: r is not None and r <= 2.0, ratio_by_walk_min_median_max=spread(
            [b / s for b, s in zip(p50_by_walk(measured, big, "narrowed"), p50_by_walk(measured, small, "plain"),
                                   strict=True)]),
        note="the stricter floor: a small cloud that turned narrowing off (its random shard is often empty, "
             "which costs a second GET)"))
    figs.append(common.figure(
        BENCH, f"schedule p50 at {big} vs {small} providers, not narrowed",
        common.median(pooled(measured, big, "plain")), "ms", common.median(pooled(measured, small, "plain")),
        f"schedule p50 at {small} providers", target="(info)"))
    figs.append(common.figure(
        BENCH, f"a full cloud: refused schedule p50 at {big} providers, narrowed",
        common.median(pooled(measured, big, "refused_narrowed")), "ms",
        common.median(pooled(measured, big, "refused_plain")), "the same, not narrowed", target="(info)",
        note="a query that fits no provider: two GETs (the shard, then everywhere) against one; Placement drops "
             "providers without room in SQL, so a full cloud's GET is cheap at any size"))
    return figs


def draw(sizes: tuple[int, ...], measured: list[dict[int, dict[str, list[float]]]]) -> None:
    """scale.svg: schedule p50 against provider count, narrowed and not, and the bare GET (the
    floor); each point the median of the walks, its bar their min to max."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for series, label, style in (("plain", "schedule, not narrowed", "o-"),
                                 ("narrowed", f"schedule, narrowed ({SHARDS} shards)", "s-"),
                                 ("get", "Placement's bare GET /allocation_candidates (floor)", "^--")):
        by_walk = [p50_by_walk(measured, size, series) for size in sizes]
        mid = [statistics.median(xs) for xs in by_walk]
        ax.errorbar(sizes, mid, yerr=[[m - min(xs) for m, xs in zip(mid, by_walk, strict=True)],
                                      [max(xs) - m for m, xs in zip(mid, by_walk, strict=True)]],
                    fmt=style, capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xticks(list(sizes), [f"{s:,}" for s in sizes])
    ax.set_xlabel("resource providers")
    ax.set_ylabel("p50 latency (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"eschedule schedule latency against cloud size ({len(measured)} walks)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PICTURE, format="svg", metadata={"Date": None})
    plt.close(fig)
    log(f"drawn: {PICTURE}")


def measure(narrowed: Operations, plain: Operations, placement: PlacementClient, store: Store, query: str,
            refused: str, params: list[tuple[str, str]], samples: int, consumers: set[str]) -> dict[str, list[float]]:
    """`samples` rounds of a bare GET and a schedule with and without narrowing, interleaved (the
    order rotating), then a few refused schedules of each; each allocation is deleted again
    (untimed), so every sample sees the same free capacity."""
    def get() -> None:
        placement.allocation_candidates(params)

    def schedule(ops: Operations, q: str) -> Callable[[], None]:
        return scheduling(ops, q, q == refused, consumers)

    def free() -> None:
        for consumer in list(consumers):
            placement.delete_allocations(consumer)
            consumers.discard(consumer)

    out: dict[str, list[float]] = {series: [] for series in SERIES}
    calls: list[float] = []
    timed_method(narrowed.placement, "allocation_candidates", calls)
    try:
        for fn in (get, schedule(narrowed, query), schedule(plain, query)):  # warm
            fn()
        free()
        steps = [(out["get"], get), (out["narrowed"], schedule(narrowed, query)),
                 (out["plain"], schedule(plain, query))]
        for i in range(samples):
            for into, fn in steps[i % 3:] + steps[:i % 3]:
                before = len(calls)
                into.append(common.timed(fn) * 1000)
                if into is out["narrowed"]:
                    out["gets_per_schedule"].append(len(calls) - before)
            free()
        refusals = [(out["refused_narrowed"], schedule(narrowed, refused)),
                    (out["refused_plain"], schedule(plain, refused))]
        for i in range(max(3, samples // 4)):
            for into, fn in refusals if i % 2 == 0 else refusals[::-1]:
                into.append(common.timed(fn) * 1000)
    finally:
        vars(narrowed.placement).pop("allocation_candidates", None)  # back to the class's own method
        clear_instances(store)
    return out


def scheduling(ops: Operations, query: str, refused: bool, consumers: set[str]) -> Callable[[], None]:
    """One schedule of `query`, its instance noted in `consumers`; `refused`: it must not fit."""
    def once() -> None:
        try:
            consumers.add(ops.schedule(query)["uuid"])
        except NoCapacity:
            if not refused:
                raise
        else:
            if refused:
                raise AssertionError(f"{query} was placed")
    return once


def timed_method(obj: object, name: str, out: list[float]) -> None:
    """Record each call's milliseconds of obj.name (on this instance only; the product is untouched)."""
    method = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            out.append((time.perf_counter() - t0) * 1000)

    setattr(obj, name, wrapper)
