"""CLI: how fast eschedule starts and answers, against floors that do the same work (issue 13, goal 1).

1. `eschedule --help` against `python3 -c pass` (the interpreter alone): goal <= 3x.
2. `eschedule list` of 100 instances against `etcdctl get --prefix` of the same prefix: goal <= 6x.
3. One schedule, a process each: `eschedule QUERY` against a stdlib-only Python script making the
   same calls (etcd: the quota read, the chosen host's alive key, the request + index transaction,
   through etcd's JSON gateway with urllib; Placement: GET /allocation_candidates,
   PUT /allocations and the recheck's GET of the provider's usages, with urllib): goal <= 1.5x.
4. For the record, what the libraries alone cost to load: `import etcd3` against etcdctl, and
   `import etcd3, requests, click, yaml` against the stdlib script.
The kinds alternate, one run of each in turn, in `rounds` rounds; each round's medians give one
ratio, and the figure is the median round (min / median / max of the ratios in extra).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path

import yaml

from etcd_compute import contract

import common
from scheduling import HUGE, clear_allocations, make_provider

BENCH = "cli"
INSTANCES = 100

# The floor of a schedule: what eschedule does, in the fewest lines the standard library allows.
STDLIB_SCHEDULE = r'''
import base64, json, sys, urllib.parse, urllib.request, uuid
etcd, placement, prefix, query = sys.argv[1:5]
def b64(s): return base64.b64encode(s.encode()).decode()
def call(url, body=None, method="POST", headers={}):
    req = urllib.request.Request(url, None if body is None else json.dumps(body).encode(), method=method,
                                 headers={"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(req, timeout=30) as r:
        data = r.read()
        return json.loads(data) if data else None
ph = {"x-auth-token": "admin", "OpenStack-API-Version": "placement 1.39", "Accept": "application/json"}
call(etcd + "/v3/kv/range", {"key": b64(prefix + "/quotas/etcd-compute")})
found = call(placement + "/allocation_candidates?" + query + "&limit=5", method="GET", headers=ph)
candidate = found["allocation_requests"][0]["allocations"]
host = next(iter(candidate))
call(etcd + "/v3/kv/range", {"key": b64(prefix + "/alive/" + host)})
consumer = str(uuid.uuid4())
call(placement + "/allocations/" + consumer, {"allocations": candidate, "project_id": "etcd-compute",
     "user_id": "etcd-compute", "consumer_generation": None, "consumer_type": "INSTANCE"}, "PUT", ph)
call(placement + "/resource_providers/" + host + "/usages", method="GET", headers=ph)
index, request = prefix + "/index/" + consumer, prefix + "/requests/" + host + "/" + consumer
call(etcd + "/v3/kv/txn", {"compare": [{"key": b64(index), "target": "CREATE", "result": "EQUAL",
                                         "create_revision": "0"}],
                           "success": [{"requestPut": {"key": b64(index), "value": b64(json.dumps({"host": host}))}},
                                       {"requestPut": {"key": b64(request), "value": b64(json.dumps(
                                           {"uuid": consumer, "host": host, "query": query}))}}]})
print(consumer)
'''


def run_ok(cmd: list[str], env: dict[str, str] | None = None) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])}... exited {p.returncode}: {p.stderr.strip()[:300]}")


def rounds_of(kinds: dict[str, Callable[[], None]], runs: int, rounds: int,
              between: Callable[[], None] = lambda: None) -> dict[str, list[list[float]]]:
    """Per kind and round, the seconds of each run; the kinds take turns run by run."""
    out: dict[str, list[list[float]]] = {k: [] for k in kinds}
    for _ in range(rounds):
        times: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(runs):
            for k, fn in kinds.items():
                times[k].append(common.timed(fn))
            between()
        for k in kinds:
            out[k].append(times[k])
    return out


def ratio_figure(name: str, ours: list[list[float]], floor: list[list[float]], floor_name: str,
                 goal: float | None) -> common.Figure:
    """The median round's ratio of medians; min / median / max of the per-round ratios in extra.
    Without a goal the figure is information (what a floor of ours is made of)."""
    ratios = [common.median(a) / common.median(b) for a, b in zip(ours, floor, strict=True)]
    mid = sorted(range(len(ratios)), key=ratios.__getitem__)[len(ratios) // 2]
    return common.figure(
        BENCH, name, common.median(ours[mid]), "s", common.median(floor[mid]), floor_name,
        target=f"<= {goal:g}x" if goal else "(info)",
        check=None if goal is None else lambda v, r: r is not None and r <= goal,
        ratios_min_median_max=[round(min(ratios), 2), round(common.median(ratios), 2), round(max(ratios), 2)],
        ours_medians_s=[round(common.median(x), 3) for x in ours],
        floor_medians_s=[round(common.median(x), 3) for x in floor])


def run(info: dict, quick: bool) -> list[common.Figure]:
    runs, rounds = (3, 3) if quick else (7, 3)
    run_id = uuidlib.uuid4().hex[:8]
    prefix, trait = f"/bench-cli-{run_id}", f"CUSTOM_BENCH_CLI_{run_id.upper()}"
    query = f"resources=VCPU:1,MEMORY_MB:256,DISK_GB:1&required={trait}"
    placement, store = common.clients(info, prefix)
    rp = make_provider(placement, f"bench-cli-{run_id}", HUGE, trait)
    tmp = Path(tempfile.mkdtemp(prefix="bench-cli-"))
    eschedule = str(common.BIN / "eschedule")
    try:
        store.claim_alive(rp, 600, {"uuid": rp, "pid": os.getpid(), "since": contract.now()})
        for _ in range(INSTANCES):  # what `list` shows: requests with their actual state
            uuid = str(uuidlib.uuid4())
            store.create_instance(contract.new_request(uuid, rp, {rp: {"resources": {"VCPU": 1}}}, None, query,
                                                     "etcd-compute", "etcd-compute"))
        cfg = tmp / "schedule.yaml"
        cfg.write_text(yaml.safe_dump({"etcd": {"endpoints": [info["etcd"]], "prefix": prefix},
                                       "placement": {"endpoint": info["placement"]}, "default_image": None}))
        script = tmp / "schedule_stdlib.py"
        script.write_text(STDLIB_SCHEDULE)
        etcdctl_env = {**os.environ, "ETCDCTL_API": "3", "ETCDCTL_ENDPOINTS": info["etcd"]}
        kinds: dict[str, Callable[[], None]] = {
            "pass": lambda: run_ok([sys.executable, "-c", "pass"]),
            "help": lambda: run_ok([eschedule, "--help"]),
            "etcdctl": lambda: run_ok(["etcdctl", "get", "--prefix", prefix + "/"], etcdctl_env),
            "list": lambda: run_ok([eschedule, "--config", str(cfg), "list"]),
            "stdlib": lambda: run_ok([sys.executable, str(script), info["etcd"], info["placement"], prefix, query]),
            "schedule": lambda: run_ok([eschedule, "--config", str(cfg), query]),
            # What the libraries alone cost: the least a Python etcd3 (gRPC) client can start in.
            "import etcd3": lambda: run_ok([sys.executable, "-c", "import etcd3"]),
            "import libraries": lambda: run_ok([sys.executable, "-c", "import etcd3, requests, click, yaml"]),
        }
        for fn in kinds.values():  # warm the page cache and Placement
            fn()
        t = rounds_of(kinds, runs, rounds)
        common.say("medians (ms): " + ", ".join(f"{k} {1000 * common.median(sum(v, [])):.0f}" for k, v in t.items()))
        return [
            ratio_figure("`eschedule --help`", t["help"], t["pass"], "python3 -c pass", 3),
            ratio_figure(f"`eschedule list` of {INSTANCES} instances", t["list"], t["etcdctl"],
                         "etcdctl get --prefix, same keys", 6),
            ratio_figure("one schedule, a process (`eschedule QUERY`)", t["schedule"], t["stdlib"],
                         "stdlib-only script, same calls", 1.5),
            ratio_figure("`python3 -c 'import etcd3'` (the gRPC client alone)", t["import etcd3"], t["etcdctl"],
                         "etcdctl get --prefix, same keys", None),
            ratio_figure("`python3 -c 'import etcd3, requests, click, yaml'`", t["import libraries"], t["stdlib"],
                         "stdlib-only script, same calls", None),
        ]
    finally:
        clear_allocations(placement, rp)
        common.drop_provider(placement, rp)
        store.client.delete_prefix(prefix + "/")
        store.close()
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()

