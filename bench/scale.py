"""Scale: Operations.schedule latency with 10, 100 and 1,000 resource providers, with the
`limit` eschedule adds (50 by default), next to a bare GET /allocation_candidates of the
same query at the same size.

Providers are created straight through Placement (bench-scale-<run>-<n>, each with the
run's own trait, which the query requires, so other sessions' providers on the bench
Placement are not counted), all UP (alive keys on one etcd lease). The sizes are walked
up (creating providers) and back down (deleting them, which is the clean-up anyway), and
each size below the largest is sampled on both ways (10, 100, 1000, 100, 10): drift of
this shared machine then falls on small and large sizes alike. Every allocation is deleted
right after its sample; providers, trait, lease and etcd prefix are removed at the end.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid as uuidlib
from concurrent.futures import ThreadPoolExecutor

from etcd_compute import contract
from etcd_compute.config import PlacementConfig
from etcd_compute.eschedule.claims import parse_query
from etcd_compute.eschedule.operations import Operations
from etcd_compute.placement import PlacementClient
from etcd_compute.store import Store

import common
from common import say as log
from scheduling import RESOURCES, clear_instances, drop_trait, scheduler

BENCH = "scale"
INVENTORY = {"VCPU": 64, "MEMORY_MB": 262144, "DISK_GB": 2000}
WORKERS = 3  # client threads creating/deleting providers (Placement serves one request at a time)
PARTS = [("placement", "allocation_candidates", "its_get"), ("placement", "claim", "its_put"),
         ("store", "is_alive", "alive_read"), ("store", "create_instance", "etcd_txn")]


def run(info: dict, quick: bool) -> list[common.Figure]:
    sizes, samples = ((10, 100, 1000), 10) if quick else ((10, 100, 1000), 30)
    run_id = uuidlib.uuid4().hex[:8]
    trait = f"CUSTOM_BENCH_{run_id.upper()}"
    query = f"{RESOURCES}&required={trait}"
    prefix = f"/bench-scale-{run_id}"
    placement, store = common.clients(info, prefix)
    placement.request("PUT", f"/traits/{trait}")
    lease = store.client.lease(1800)  # one lease for every alive key; revoked at the end
    local = threading.local()
    providers: list[str] = []  # in creation order; the down walk deletes from the end
    consumers: set[str] = set()

    def client() -> PlacementClient:
        if not hasattr(local, "client"):
            local.client = PlacementClient(PlacementConfig(endpoint=info["placement"]))
        return local.client

    def create(i: int) -> str:
        rp = str(uuidlib.uuid4())
        pc = client()
        pc.request("POST", "/resource_providers", json={"uuid": rp, "name": f"bench-scale-{run_id}-{i}"})
        providers.append(rp)  # list.append is atomic: clean-up sees every provider that exists
        pc.request("PUT", f"/resource_providers/{rp}/inventories", json={
            "resource_provider_generation": 0,
            "inventories": {rc: {"total": total, "max_unit": total} for rc, total in INVENTORY.items()}})
        pc.request("PUT", f"/resource_providers/{rp}/traits",
                   json={"resource_provider_generation": 1, "traits": [trait]})
        return rp

    def delete(rp: str) -> None:
        with contextlib.suppress(Exception):
            client().request("DELETE", f"/resource_providers/{rp}", ok=(204, 404))

    def alive(rps: list[str], up: bool) -> None:
        """Put (on the lease) or delete the alive keys, 100 per transaction."""
        for i in range(0, len(rps), 100):
            store.client.transaction(compare=[], failure=[], success=[
                store.tx.put(contract.alive_key(prefix, rp), contract.encode(
                    {"uuid": rp, "pid": 0, "since": contract.now()}), lease=lease) if up
                else store.tx.delete(contract.alive_key(prefix, rp)) for rp in rps[i:i + 100]])

    samples_of: dict[int, dict[str, list]] = {}
    seconds: dict[str, float] = {}
    try:
        sched = scheduler(info, prefix)
        params = parse_query(query, sched.cfg.limit)

        def sample(size: int, k: int) -> None:
            got = measure(sched, placement, store, query, params, k, consumers)
            into = samples_of.setdefault(size, {})
            for key, value in got.items():
                into.setdefault(key, []).extend(value)
            log(f"{size} providers: schedule p50 {common.median(got['sched']):.0f} ms, GET allocation_candidates "
                f"p50 {common.median(got['get']):.0f} ms ({k} samples)")

        with ThreadPoolExecutor(WORKERS) as pool:
            for size in sizes:  # up
                t0 = time.monotonic()
                alive(list(pool.map(create, range(len(providers), size))), True)
                seconds[f"create to {size}"] = round(time.monotonic() - t0, 1)
                sample(size, samples if size == sizes[-1] else samples - samples // 2)
            for size in reversed(sizes[:-1]):  # down
                t0 = time.monotonic()
                gone = providers[size:]
                alive(gone, False)
                list(pool.map(delete, gone))
                del providers[size:]
                seconds[f"delete to {size}"] = round(time.monotonic() - t0, 1)
                sample(size, samples // 2)
        return figures(sizes, samples_of, sched.cfg.limit, seconds)
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


def figures(sizes: tuple[int, ...], samples_of: dict[int, dict[str, list]], limit: int,
            seconds: dict[str, float]) -> list[common.Figure]:
    figs = []
    p50 = {size: common.median(s["sched"]) for size, s in samples_of.items()}
    get50 = {size: common.median(s["get"]) for size, s in samples_of.items()}
    for size in sizes:
        s = samples_of[size]
        parts = {label: round(common.median(s[label]), 1) for _, _, label in PARTS}
        if all(len(s[label]) == len(s["sched"]) for _, _, label in PARTS):  # one call of each per schedule
            parts["rest"] = round(common.median([total - sum(xs) for total, *xs in zip(
                s["sched"], *(s[label] for _, _, label in PARTS), strict=True)]), 1)
        figs.append(common.figure(
            BENCH, f"schedule latency p50, {size} providers", p50[size], "ms", get50[size],
            "GET allocation_candidates p50", target="(info)", samples=len(s["sched"]), limit=limit,
            candidates_returned=max(s["candidates"]), schedule_parts_p50_ms=parts))
        figs.append(common.figure(
            BENCH, f"schedule latency p95, {size} providers", common.percentile(s["sched"], 95), "ms",
            common.percentile(s["get"], 95), "GET allocation_candidates p95", target="(info)"))
    small, big = sizes[0], sizes[-1]
    figs.append(common.figure(
        BENCH, f"schedule p50 at {big} vs {small} providers", p50[big], "ms", p50[small],
        f"schedule p50 at {small} providers", target="<= 2x", check=lambda v, r: r is not None and r <= 2.0,
        get_allocation_candidates_ratio=round(get50[big] / get50[small], 3),
        alive_keys_read_ratio=round(common.median(samples_of[big]["alive_read"])
                                    / common.median(samples_of[small]["alive_read"]), 3),
        setup_seconds=seconds,
        note="the GET ratio is Placement's own growth (it builds every candidate before applying limit); "
             "the schedule ratio adds the PUT (flat), the read of the chosen host's alive key and the "
             "etcd write (flat)"))
    return figs


def measure(sched: Operations, placement: PlacementClient, store: Store, query: str,
            params: list[tuple[str, str]], samples: int, consumers: set[str]) -> dict[str, list]:
    """`samples` schedules and as many bare GETs, interleaved (order alternating), plus the time of
    each part of every timed schedule; each allocation is deleted again (untimed), so every sample
    sees the same free capacity."""
    def get() -> dict:
        return placement.allocation_candidates(params)

    def schedule() -> None:
        consumers.add(sched.schedule(query)["uuid"])

    def free() -> None:
        for consumer in list(consumers):
            placement.delete_allocations(consumer)
            consumers.discard(consumer)

    for _ in range(2):  # warm
        get()
        schedule()
    free()
    out: dict[str, list] = {"sched": [], "get": [], "candidates": [len(get()["allocation_requests"])]}
    for owner, method, label in PARTS:
        out[label] = []
        timed_method(getattr(sched, owner), method, out[label])
    try:
        for i in range(samples):
            steps = [(out["get"], get), (out["sched"], schedule)]
            for into, fn in steps if i % 2 == 0 else steps[::-1]:
                into.append(common.timed(fn) * 1000)
            free()
    finally:
        for owner, method, _ in PARTS:
            vars(getattr(sched, owner)).pop(method, None)  # back to the class's own method
        clear_instances(store)
    return out


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
