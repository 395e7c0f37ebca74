"""Scheduling: what eschedule adds on top of the two Placement calls it makes, end to end
with a real ecompute, and how it behaves with 1-8 concurrent schedulers (SQLite and
PostgreSQL Placement).

Every provider made here carries a trait of this run's own (CUSTOM_BENCH_<id>) and every
query requires it, so providers of other sessions on the bench Placement neither steal nor
slow our candidates. Everything made is removed at the end: providers, allocations, the
trait, the etcd prefixes, files, processes (the PostgreSQL Placement, devstack.harness's, takes
its cluster with it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path

import requests
import yaml

from devstack import harness
from etcd_compute import contract
from etcd_compute.config import EtcdConfig, PlacementConfig, ScheduleConfig
from etcd_compute.errors import NoCapacity, PlacementError
from etcd_compute.eschedule import overcommit
from etcd_compute.eschedule.claims import parse_query
from etcd_compute.eschedule.operations import Operations
from etcd_compute.placement import CONCURRENT_UPDATE, PlacementClient
from etcd_compute.states import Actual
from etcd_compute.store import Store

import common
from common import say as log

BENCH = "scheduling"
RESOURCES = "resources=VCPU:1,MEMORY_MB:256,DISK_GB:1"
HUGE = {"VCPU": {"total": 100000}, "MEMORY_MB": {"total": 100000 * 256}, "DISK_GB": {"total": 100000}}


# ---------------------------------------------------------------- Placement and etcd helpers

def inventory(totals: dict[str, dict]) -> dict[str, dict]:
    return {rc: {"total": v["total"], "reserved": 0, "allocation_ratio": 1.0, "min_unit": 1,
                 "max_unit": v["total"], "step_size": 1} for rc, v in totals.items()}


def make_provider(placement: PlacementClient, name: str, totals: dict[str, dict], trait: str) -> str:
    rp = str(uuidlib.uuid4())
    placement.ensure_provider(rp, name)
    placement.set_inventories(rp, inventory(totals))
    placement.set_traits(rp, [trait])
    return rp


def clear_allocations(placement: PlacementClient, rp: str) -> int:
    """Delete every allocation on the provider; how many there were."""
    consumers = list(placement.provider_allocations(rp))
    for consumer in consumers:
        placement.delete_allocations(consumer)
    return len(consumers)


def drop_trait(placement: PlacementClient, trait: str) -> None:
    with contextlib.suppress(Exception):
        placement.request("DELETE", f"/traits/{trait}", ok=(204, 404, 409))


def clear_instances(store: Store) -> None:
    """Forget the instances written under the prefix (requests, index, actual); hosts stay alive."""
    for part in ("requests", "index", "instances"):
        store.client.delete_prefix(f"{store.prefix}/{part}/")


def scheduler(info: dict, prefix: str, placement_url: str | None = None) -> Operations:
    return Operations(ScheduleConfig(etcd=EtcdConfig(endpoints=[info["etcd"]], prefix=prefix),
                                    placement=PlacementConfig(endpoint=placement_url or info["placement"]),
                                    default_image=None))


class PlainLoop:
    """The floor: the same Placement calls with a bare requests.Session, nothing else: the
    candidates, the claim, and the claimed provider's usage (eschedule's recheck, overcommit.py)."""

    def __init__(self, endpoint: str, params: list[tuple[str, str]]) -> None:
        cfg = PlacementConfig(endpoint=endpoint)
        self.base, self.params = endpoint.rstrip("/"), params
        self.session = requests.Session()
        self.session.headers.update({"x-auth-token": cfg.token,
                                     "OpenStack-API-Version": f"placement {cfg.microversion}",
                                     "Accept": "application/json"})

    def once(self) -> bool:
        found = self.session.get(self.base + "/allocation_candidates", params=self.params).json()
        for candidate in found["allocation_requests"]:
            resp = self.session.put(f"{self.base}/allocations/{uuidlib.uuid4()}", json={
                "allocations": candidate["allocations"], "project_id": "etcd-compute",
                "user_id": "etcd-compute", "consumer_generation": None, "consumer_type": "INSTANCE"})
            if resp.status_code == 204:
                for rp in candidate["allocations"]:
                    self.session.get(f"{self.base}/resource_providers/{rp}/usages").raise_for_status()
                return True
            if resp.status_code != 409:
                raise RuntimeError(f"plain PUT /allocations -> {resp.status_code}: {resp.text[:200]}")
        return False

    def rate(self, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            if not self.once():
                raise RuntimeError("plain loop: no capacity")
        return n / (time.perf_counter() - t0)

    def placed_rate(self, attempts: int) -> float:
        """Like rate(), but attempts beyond the capacity fail (cheaply) and only placed ones count."""
        t0 = time.perf_counter()
        placed = sum(self.once() for _ in range(attempts))
        return placed / (time.perf_counter() - t0)


def schedule_rate(sched: Operations, query: str, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        sched.schedule(query)
    return n / (time.perf_counter() - t0)


# ---------------------------------------------------------------- 1. overhead, CLI, end to end

def overhead(info: dict, quick: bool, run_id: str, trait: str, query: str) -> list[common.Figure]:
    n, rounds, cli_n = (20, 3, 4) if quick else (80, 3, 10)
    prefix = f"/bench-sched-{run_id}"
    placement, store = common.clients(info, prefix)
    sched = scheduler(info, prefix)
    rp = make_provider(placement, f"bench-sched-{run_id}", HUGE, trait)
    tmp = Path(tempfile.mkdtemp(prefix="bench-sched-"))
    try:
        store.claim_alive(rp, 600, {"uuid": rp, "pid": os.getpid(), "since": contract.now()})
        plain = PlainLoop(info["placement"], parse_query(query, sched.cfg.limit))
        for _ in range(3):  # warm both (connections, imports, Placement's caches), untimed
            plain.once()
            sched.schedule(query)

        def reset() -> None:
            clear_allocations(placement, rp)
            clear_instances(store)

        def measure(fn: Callable[[], float]) -> float:
            try:
                return fn()
            finally:
                reset()

        def plain_etcd_once() -> bool:
            """The plain loop plus the etcd work eschedule must do: read the chosen host's alive key,
            write the request + index in one transaction (a diagnostic: what is code, what is etcd)."""
            store.is_alive(rp)
            uuid = str(uuidlib.uuid4())
            placed = plain.once()
            store.create_instance(contract.new_request(uuid, rp, {rp: {"resources": {"VCPU": 1}}}, None, query,
                                                     "etcd-compute", "etcd-compute"))
            return placed

        kinds: dict[str, Callable[[], object]] = {
            "plain": plain.once, "eschedule": lambda: sched.schedule(query), "plain+etcd": plain_etcd_once}
        block = 5 if quick else 10
        reset()
        rates = interleaved_rates(kinds, n, rounds, block, reset)
        plain_rates, sched_rates = rates["plain"], rates["eschedule"]
        plain_rate, sched_rate = common.median(plain_rates), common.median(sched_rates)
        with_etcd = common.median(rates["plain+etcd"])
        figs = [common.figure(
            BENCH, "eschedule in-process (Operations.schedule)", sched_rate, "sched/s", plain_rate,
            "plain requests loop", target=">= 0.9x plain", check=lambda v, r: r is not None and r >= 0.9,
            n=n, rounds=rounds, block=block, plain_rates=[round(x, 2) for x in plain_rates],
            eschedule_rates=[round(x, 2) for x in sched_rates],
            per_round_ratio=[round(s / p, 3) for s, p in zip(sched_rates, plain_rates, strict=True)],
            plain_plus_etcd_rate=round(with_etcd, 2),
            plain_plus_etcd_rates=[round(x, 2) for x in rates["plain+etcd"]],
            ratio_to_plain_plus_etcd=round(sched_rate / with_etcd, 3),
            note="eschedule also reads the alive keys and writes request+index in one etcd txn; "
                 "plain+etcd does those too with bare calls (what is left is eschedule's own code)")]

        figs.append(cli_figure(info, prefix, query, tmp, cli_n, n, plain, plain_rate, reset))
        figs.append(end_to_end(info, quick, run_id, trait, query, lambda k: measure(lambda: schedule_rate(
            sched, query, k))))
        return figs
    finally:
        common.drop_provider(placement, rp)
        store.client.delete_prefix(prefix + "/")
        store.close()
        shutil.rmtree(tmp, ignore_errors=True)


def interleaved_rates(kinds: dict[str, Callable[[], object]], n: int, rounds: int, block: int,
                      reset: Callable[[], None]) -> dict[str, list[float]]:
    """Per kind, one rate per round of n calls (a call returning False means no capacity: an error)."""
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(rounds):
        # Small blocks, rotating which kind goes first: the machine's noise (other sessions,
        # etcd's background commits) falls on all kinds alike.
        spent = dict.fromkeys(kinds, 0.0)
        for b in range(n // block):
            names = list(kinds)[b % 3:] + list(kinds)[:b % 3]
            for name in names:
                t0 = time.perf_counter()
                for _ in range(block):
                    if kinds[name]() is False:
                        raise RuntimeError(f"{name}: no capacity")
                spent[name] += time.perf_counter() - t0
        for name in kinds:
            rates[name].append(n // block * block / spent[name])
        reset()
        log(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}/s" for k, v in rates.items()))
    return rates


def cli_figure(info: dict, prefix: str, query: str, tmp: Path, cli_n: int, n: int, plain: PlainLoop,
               plain_rate: float, reset: Callable[[], None]) -> common.Figure:
    """The CLI: one Python process per schedule, against the plain loop (its rate before and right after)."""
    cfg = tmp / "schedule.yaml"
    cfg.write_text(yaml.safe_dump({"etcd": {"endpoints": [info["etcd"]], "prefix": prefix},
                                   "placement": {"endpoint": info["placement"]}, "default_image": None}))
    cmd = [str(common.BIN / "eschedule"), "--config", str(cfg), query]

    def cli_once() -> None:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if p.returncode != 0:
            raise RuntimeError(f"eschedule exited {p.returncode}: {p.stderr.strip()}")

    cli_once()  # warm the page cache
    startup = common.median([common.timed(lambda: subprocess.run(
        [str(common.BIN / "eschedule"), "--help"], capture_output=True, timeout=60)) for _ in range(3)])
    t0 = time.perf_counter()
    for _ in range(cli_n):
        cli_once()
    cli_rate = cli_n / (time.perf_counter() - t0)
    reset()
    plain_after = plain.rate(n)  # the floor once more, right after the CLI runs
    reset()
    cli_floor = common.median([plain_rate, plain_after])
    log(f"CLI: {cli_rate:.2f}/s (eschedule --help alone: {startup:.2f}s)")
    return common.figure(
        BENCH, "eschedule CLI (one process per schedule)", cli_rate, "sched/s", cli_floor,
        "plain requests loop", target="(info) far below: Python start-up",
        n=cli_n, eschedule_help_seconds=round(startup, 3),
        note="each run pays interpreter start-up and imports (eschedule --help alone takes "
             f"{startup:.2f}s) plus a fresh etcd and Placement connection; in-process is the figure "
             "that measures the scheduling path")


def end_to_end(info: dict, quick: bool, run_id: str, trait: str, query: str,
               floor_rate: Callable[[int], float]) -> common.Figure:
    """Schedule N onto a real ecompute (test:///default) and wait until every one is ACTIVE;
    floor_rate(n) measures the in-process schedule rate (to a host nobody builds for) alongside."""
    n, rounds = (8, 2) if quick else (20, 3)
    prefix = f"/bench-sched-{run_id}-e2e"
    placement, store = common.clients(info, prefix)
    files = Path(info["stack"]) / f"bench-sched-{run_id}"
    cfg = harness.compute_config(
        info, files, uuid=str(uuidlib.uuid4()), name=f"bench-sched-{run_id}-host", prefix=prefix, lease_ttl=10,
        traits=[trait], resync_interval=120,
        inventory={rc: {"total": v["total"], "allocation_ratio": 1.0, "reserved": 0} for rc, v in HUGE.items()})
    host = harness.Ecompute("ecompute", cfg, files).start()
    try:
        host.wait_ready(60)
        # READY=1 may come just before its liveness thread's first lease: eschedule skips a host not alive.
        harness.wait_until(lambda: host.host in store.alive_hosts(), 10, "its alive key", proc=host.proc,
                           log=host.log)
        log(f"ecompute up in {time.monotonic() - host.started_at:.1f}s")
        sched = scheduler(info, prefix)
        state_prefix = prefix + "/instances/"

        def active(uuids: set[str]) -> int:
            done = 0
            for value, _ in store.client.get_prefix(state_prefix):
                st = contract.decode(value)
                if st["uuid"] in uuids:
                    if st["state"] == Actual.ERROR:
                        raise RuntimeError(f"instance {st['uuid']} went to ERROR: {st.get('reason')}")
                    done += st["state"] == Actual.ACTIVE
            return done

        def one_round(k: int) -> float:
            t0 = time.perf_counter()
            uuids = {sched.schedule(query)["uuid"] for _ in range(k)}
            deadline = time.monotonic() + 120
            while active(uuids) < k:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"end to end: {active(uuids)}/{k} ACTIVE after 120 s")
                time.sleep(0.01)
            return k / (time.perf_counter() - t0)

        one_round(2)  # warm: the worker's first libvirt connection, the watch
        rates, floors = [], []
        for r in range(rounds):  # alternate with the floor, as above
            steps = [(rates, lambda: one_round(n)), (floors, lambda: floor_rate(n))]
            for out, fn in steps if r % 2 == 0 else steps[::-1]:
                out.append(fn())
            log(f"end to end round {r + 1}: {rates[-1]:.1f}/s (in-process schedule {floors[-1]:.1f}/s)")
        return common.figure(BENCH, "end to end: schedule until ecompute reports ACTIVE (test:///default)",
                             common.median(rates), "inst/s", common.median(floors), "eschedule in-process",
                             target="(info)", n=n, rounds=rounds, rates=[round(x, 2) for x in rates],
                             floor_rates=[round(x, 2) for x in floors], workers=1,
                             note="ecompute with 1 worker process: each build is a libvirt define+start "
                                  "on the test driver, then an etcd status write the bench polls for")
    finally:
        stopping = time.monotonic()
        rc = host.stop(timeout=30)  # SIGTERM to the daemon only (as systemd would): it stops its workers itself
        log(f"ecompute stopped in {time.monotonic() - stopping:.1f}s" if rc == 0 else
            f"ecompute did not stop cleanly within 30s of SIGTERM (exit {rc})")
        common.drop_provider(placement, host.host)
        store.client.delete_prefix(prefix + "/")
        store.close()
        shutil.rmtree(files, ignore_errors=True)


# ---------------------------------------------------------------- 2. concurrency, SQLite vs PostgreSQL

# Issue 13, goal 5: racing runs (2+ schedulers) each PostgreSQL setting must go through, none over capacity.
GOAL_RUNS = 20
PG_REPS = 7  # x 3 racing levels = 21 racing runs per PostgreSQL setting, quick or not


class GivenBack(logging.Handler):
    """Claims eschedule's recheck gave back (etcd_compute/eschedule/overcommit.py logs each)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if overcommit.GIVEN_BACK in record.getMessage():
            self.count += 1


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def count_since(path: Path, offset: int, needle: str) -> int:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace").count(needle)
    except OSError:
        return 0


class Conflicts:
    """409s seen by the schedulers' claims, by Placement's error code."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.generation = 0  # placement.concurrent_update: retried on the same candidate
        self.full = 0  # no longer fits: next candidate

    def wrap(self, sched: Operations) -> Operations:
        client = sched.placement
        claim = client.claim

        def counted(*args, **kwargs):
            try:
                return claim(*args, **kwargs)
            except PlacementError as exc:
                if exc.status == 409:
                    with self.lock:
                        if exc.code == CONCURRENT_UPDATE:
                            self.generation += 1
                        else:
                            self.full += 1
                raise

        client.claim = counted  # this instance only; the product code is untouched
        return sched


def concurrent_run(scheds: list[Operations], query: str, attempts: int) -> dict:
    """`attempts` schedules shared by len(scheds) threads; the last ones race for the last capacity."""
    lock = threading.Lock()
    left = [attempts]
    out = {"placed": 0, "no_capacity": 0, "errors": []}
    start = threading.Barrier(len(scheds) + 1)

    def worker(sched: Operations) -> None:
        start.wait()
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            try:
                sched.schedule(query)
                key = "placed"
            except NoCapacity:
                key = "no_capacity"
            except Exception as exc:  # noqa: BLE001 - any failure is counted and shown, the run goes on
                with lock:
                    out["errors"].append(repr(exc)[:200])
                continue
            with lock:
                out[key] += 1

    threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in scheds]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(300)
    out["seconds"] = time.perf_counter() - t0
    return out


def concurrency(info: dict, quick: bool, run_id: str, trait: str, query: str) -> list[common.Figure]:
    """1-8 schedulers on one provider, on SQLite and on PostgreSQL twice: configured as devstack
    and INSTALL.md do (allocation_conflict_retry_count 1) and as Placement comes (10, whose own
    retry lets a claim through over capacity; eschedule's recheck must give it back). The
    goal figures count racing runs that ended over capacity, beside the claims Placement let
    through over capacity in the same runs (what the recheck had to catch)."""
    levels = [1, 2, 4, 8]
    capacity, reps = (20, 2) if quick else (50, 3)
    given_back = GivenBack()
    logging.getLogger(overcommit.__name__).addHandler(given_back)
    extra_attempts = 8  # more schedules than capacity: the last ones race for the last VCPUs
    prefix = f"/bench-sched-{run_id}-conc"
    etcd_store = Store(EtcdConfig(endpoints=[info["etcd"]], prefix=prefix))
    figs: list[common.Figure] = []
    with contextlib.ExitStack() as stack:
        stack.callback(etcd_store.close)
        stack.callback(etcd_store.client.delete_prefix, prefix + "/")
        stack.callback(logging.getLogger(overcommit.__name__).removeHandler, given_back)
        backends = _backends(info, stack, reps, figs)
        setups = {}
        for name, (url, api_log, backend_reps) in backends.items():
            placement = PlacementClient(PlacementConfig(endpoint=url))
            totals = {"VCPU": {"total": capacity}, "MEMORY_MB": HUGE["MEMORY_MB"], "DISK_GB": HUGE["DISK_GB"]}
            rp = make_provider(placement, f"bench-sched-{run_id}-conc", totals, trait)
            stack.callback(drop_trait, placement, trait)
            stack.callback(common.drop_provider, placement, rp)
            etcd_store.claim_alive(rp, 900, {"uuid": rp, "pid": os.getpid(), "since": contract.now()})
            conflicts = Conflicts()
            scheds = [conflicts.wrap(scheduler(info, prefix, url)) for _ in range(max(levels))]
            for s in scheds:
                _ = s.store, s.placement  # connect now, not inside the timed part
                stack.callback(s.store.close)
            plain = PlainLoop(url, parse_query(query, scheds[0].cfg.limit))
            plain.once(), scheds[0].schedule(query)  # warm
            setups[name] = {"placement": placement, "rp": rp, "conflicts": conflicts, "scheds": scheds, "log": api_log,
                            "plain": plain, "runs": {c: [] for c in levels}, "plain_rates": [],
                            "reps": backend_reps}

        def reset(s: dict) -> None:
            clear_allocations(s["placement"], s["rp"])
            clear_instances(etcd_store)

        for s in setups.values():
            reset(s)
        for rep in range(max(s["reps"] for s in setups.values())):  # outermost: noise spreads over all
            for name, s in setups.items():
                if rep >= s["reps"]:
                    continue
                s["plain_rates"].append(s["plain"].placed_rate(capacity + extra_attempts))
                reset(s)
                for c in levels:
                    before = (s["conflicts"].generation, s["conflicts"].full, given_back.count)
                    log_offset = file_size(s["log"])
                    res = concurrent_run(s["scheds"][:c], query, capacity + extra_attempts)
                    usage = s["placement"].usages(s["rp"]).get("VCPU", 0)
                    allocs = len(s["placement"].provider_allocations(s["rp"]))
                    indexed = len(list(etcd_store.client.get_prefix(prefix + "/index/", keys_only=True)))
                    res.update(rate=res["placed"] / res["seconds"], usage=usage, allocations=allocs,
                               indexed=indexed, generation_409=s["conflicts"].generation - before[0],
                               full_409=s["conflicts"].full - before[1],
                               overage_accepted=count_since(s["log"], log_offset, harness.OVERAGE_LOGGED),
                               given_back=given_back.count - before[2],
                               consistent=(usage <= capacity and usage == res["placed"] == allocs == indexed
                                           and not res["errors"]))
                    s["runs"][c].append(res)
                    reset(s)
                log(f"rep {rep + 1} {name}: plain {s['plain_rates'][-1]:.1f}/s, "
                    + ", ".join(f"c={c} {s['runs'][c][-1]['rate']:.1f}/s "
                                f"({s['runs'][c][-1]['generation_409'] + s['runs'][c][-1]['full_409']}x409)"
                                for c in levels))

        for name, s in setups.items():
            figs += _level_figures(name, s, capacity, capacity + extra_attempts)
            if name.startswith("postgresql"):
                figs.append(overcommit_goal(name, [r for c, runs in s["runs"].items() if c > 1 for r in runs],
                                            capacity))
    return figs


def _backends(info: dict, stack: contextlib.ExitStack, reps: int,
              figs: list[common.Figure]) -> dict[str, tuple[str, Path, int]]:
    """name -> (Placement URL, its log, repetitions): the stack's SQLite one, and two on
    PostgreSQL (started here, stopped with `stack`), one configured as ours, one as it comes."""
    backends = {"sqlite (1 worker)": (info["placement"], Path(info["stack"]) / "logs" / "placement.log", reps)}
    for name, retries in (("postgresql (2 workers, conflict retries 1)", 1),
                          ("postgresql (2 workers, Placement's default 10 conflict retries)", None)):
        try:
            pg = stack.enter_context(harness.postgres_placement(info, workers=2, conflict_retries=retries))
            backends[name] = (pg.url, pg.log, max(reps, PG_REPS))
        except Exception as exc:  # noqa: BLE001 - optional backend: any setup failure becomes a failed figure
            log(f"PostgreSQL Placement unavailable: {exc}")
            figs.append(common.figure(BENCH, f"{name}: setup failed", 0, "-",
                                      target="runs", check=lambda v, r: False, error=str(exc)[:500]))
    return backends


def _level_figures(name: str, s: dict, capacity: int, attempts: int) -> list[common.Figure]:
    """One figure per number of schedulers on one backend: its rate beside its floor."""
    figs = []
    rate1 = common.median([r["rate"] for r in s["runs"][1]])
    plain_rate = common.median(s["plain_rates"])
    for c, runs in s["runs"].items():
        rate = common.median([r["rate"] for r in runs])
        ok = all(r["consistent"] for r in runs)
        floor, floor_name = (plain_rate, "plain requests loop, same backend") if c == 1 else (
            rate1, "1 scheduler, same backend")
        figs.append(common.figure(
            BENCH, f"{c} concurrent scheduler{'s' if c > 1 else ''}, {name}", rate, "sched/s", floor,
            floor_name, target="no overcommit", check=lambda v, r, ok=ok: ok,
            rates=[round(r["rate"], 2) for r in runs],
            retries_409_generation=[r["generation_409"] for r in runs],
            retries_409_no_longer_fits=[r["full_409"] for r in runs],
            placed=[r["placed"] for r in runs], no_capacity=[r["no_capacity"] for r in runs],
            usage_vcpu=[r["usage"] for r in runs], capacity_vcpu=capacity,
            overcommitted_vcpu=[max(0, r["usage"] - capacity) for r in runs],
            attempts=attempts, errors=sum((r["errors"] for r in runs), [])[:3],
            placement_log_overage_accepted=[r["overage_accepted"] for r in runs],
            given_back_by_recheck=[r["given_back"] for r in runs]))
    return figs


def overcommit_goal(name: str, runs: list[dict], capacity: int) -> common.Figure:
    """Goal 5: racing runs over capacity (0 is the only acceptable figure) in at least GOAL_RUNS
    runs; beside it, as the floor, the runs in which Placement itself let a claim through over
    capacity (without eschedule's recheck, those would have ended over)."""
    over = sum(r["usage"] > capacity for r in runs)
    let_through = sum(r["overage_accepted"] > 0 for r in runs)
    return common.Figure(
        BENCH, f"goal 5: racing runs over capacity, {name}", over, f"of {len(runs)} runs",
        let_through, "runs where Placement let a claim through over capacity (its log)", None,
        f"0 in >= {GOAL_RUNS} runs", over == 0 and len(runs) >= GOAL_RUNS and all(r["consistent"] for r in runs),
        {"runs": len(runs), "overcommitted_runs": over, "placement_let_through_runs": let_through,
         "placement_let_through_claims": sum(r["overage_accepted"] for r in runs),
         "given_back_by_recheck": sum(r["given_back"] for r in runs),
         "inconsistent_runs": sum(not r["consistent"] for r in runs)})


# ---------------------------------------------------------------- entry point

def run(info: dict, quick: bool) -> list[common.Figure]:
    run_id = uuidlib.uuid4().hex[:8]
    trait = f"CUSTOM_BENCH_{run_id.upper()}"
    query = f"{RESOURCES}&required={trait}"
    placement = PlacementClient(PlacementConfig(endpoint=info["placement"]))
    figs: list[common.Figure] = []
    try:
        for part in (overhead, concurrency):
            t0 = time.monotonic()
            figs += part(info, quick, run_id, trait, query)
            log(f"{part.__name__}: {time.monotonic() - t0:.0f}s")
        return figs
    finally:
        drop_trait(placement, trait)
