"""The API server against eschedule in-process (issue 13, goal 6): schedule throughput through
POST /v1/instances beside Operations.schedule on the same Placement and etcd, and the latency of
GET /v1/instances at 1,000 instances beside the same read in-process.

Both sides do the same work (token-less in-process; the API adds HTTP, JSON, the token's etcd
read and the per-request Operations), one client at a time, alternating rounds so that noise
falls on both. Everything made is removed at the end.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid as uuidlib
from collections.abc import Callable

import requests
import yaml

from devstack import harness
from etcd_compute import contract
from etcd_compute.states import Role

import common
from common import say as log
from scheduling import HUGE, RESOURCES, clear_allocations, clear_instances, drop_trait, make_provider, scheduler

BENCH = "api"


def run(info: dict, quick: bool) -> list[common.Figure]:
    n, rounds, listed = (20, 3, 200) if quick else (60, 3, 1000)
    run_id = uuidlib.uuid4().hex[:8]
    trait = f"CUSTOM_BENCH_{run_id.upper()}"
    query = f"{RESOURCES}&required={trait}"
    prefix = f"/bench-api-{run_id}"
    placement, store = common.clients(info, prefix)
    files = common.files_dir(info, f"api-{run_id}")
    rp = make_provider(placement, f"bench-api-{run_id}", HUGE, trait)
    server: harness.ApiServer | None = None
    try:
        store.claim_alive(rp, 600, {"uuid": rp, "pid": os.getpid(), "since": contract.now()})
        schedule_yaml = files / "schedule.yaml"
        schedule_yaml.write_text(yaml.safe_dump({"etcd": {"endpoints": [info["etcd"]], "prefix": prefix},
                                                 "placement": {"endpoint": info["placement"]},
                                                 "default_image": None}))
        server = harness.ApiServer(schedule_yaml, files).start()
        sched = scheduler(info, prefix)
        token, _ = sched.create_token(sched.project, Role.MEMBER, "bench")
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token}"

        def through_api() -> None:
            r = session.post(server.url + "/v1/instances", json={"query": query}, timeout=30)
            if r.status_code != 201:
                raise RuntimeError(f"POST /v1/instances -> {r.status_code}: {r.text[:200]}")

        def rate(fn: Callable[[], object]) -> float:
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            return n / (time.perf_counter() - t0)

        for _ in range(3):  # warm both, untimed
            through_api()
            sched.schedule(query)
        api_rates, local_rates = [], []
        for _ in range(rounds):
            for rates, fn in ((api_rates, through_api), (local_rates, lambda: sched.schedule(query))):
                clear_allocations(placement, rp)
                clear_instances(store)
                rates.append(rate(fn))
        log(f"schedules/s through the API {api_rates}, in-process {local_rates}")

        # The list: `listed` instances written as eschedule writes them, then read both ways.
        clear_allocations(placement, rp)
        clear_instances(store)
        for _ in range(listed):
            uuid = str(uuidlib.uuid4())
            store.create_instance(contract.new_request(
                uuid, rp, {rp: {"resources": {"VCPU": 1, "MEMORY_MB": 256, "DISK_GB": 1}}}, None, query,
                sched.project, sched.cfg.user_id))
        api_list, local_list = [], []
        for _ in range(7):
            r = session.get(server.url + "/v1/instances", timeout=60)
            if r.status_code != 200 or len(r.json()) != listed:
                raise RuntimeError(f"GET /v1/instances -> {r.status_code}, {len(r.content)} bytes")
            api_list.append(r.elapsed.total_seconds())
            local_list.append(common.timed(sched.instances))
        log(f"list of {listed}: API {api_list}, in-process {local_list}")
        return [
            common.figure(BENCH, "schedule through the API (one client, sequential)", common.median(api_rates),
                          "inst/s", common.median(local_rates), "eschedule in-process", "≥ 0.9× the floor",
                          lambda v, ratio: ratio is not None and ratio >= 0.9,
                          api_rates=[round(x, 2) for x in api_rates], local_rates=[round(x, 2) for x in local_rates],
                          per_round_ratio=[round(a / b, 3) for a, b in zip(api_rates, local_rates, strict=True)]),
            common.figure(BENCH, f"GET /v1/instances of {listed} instances (median)", common.median(api_list), "s",
                          common.median(local_list), "the same read in-process", "",
                          p90=common.percentile(api_list, 90), api_s=[round(x, 4) for x in api_list],
                          local_s=[round(x, 4) for x in local_list]),
        ]
    finally:
        if server is not None:
            server.stop()
        clear_allocations(placement, rp)
        common.drop_provider(placement, rp)
        drop_trait(placement, trait)
        with contextlib.suppress(Exception):
            store.client.delete_prefix(prefix + "/")
        store.close()
        common.remove_files(files)
