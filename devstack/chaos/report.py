"""The run's report: what it did, what the daemons' logs say about how they took it, each
invariant's violations and, for each violation, the evidence (the faults in order, what touched
its instance, the daemons' lines about it; for two copies at once, when and how long, each
copy's start and end, and the whole timeline around it).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict

from devstack import harness
from devstack.chaos.book import Book
from devstack.chaos.faults import FAULTS
from devstack.chaos.operations import OPS, OUTCOMES
from devstack.chaos.sampler import Sampler
from devstack.chaos.world import World
from etcd_compute import invariants
from etcd_compute.invariants import Violation

# The invariants of etcd_compute/invariants.py, and the run's own (about its processes and answers).
INVARIANTS = {**invariants.INVARIANTS, "7": "no daemon died, none leaked threads",
              "G": "garbage reported as ERROR, then removable", "E": "eschedule gave a documented answer in time"}
# What the daemons' logs say about how they took the faults (counted for the report, never judged).
LOG_SIGNALS = {"worker pool rebuilt": "worker pool broken", "watch lost": "retrying with backoff",
               "watch compacted": "was compacted", "etcd failover": "failed over from",
               "drift rebuild": "vanished outside ecompute", "job failed": "failed: ",
               "malformed request": "is malformed, skipping", "orphan removed": "removed: no request",
               "allocation free failed": "could not free allocation",
               "hypervisor hung": "the hypervisor does not answer",
               "lease lapsed": "the fence stops this host's domains", "lease proven again": "is proven again after",
               "fence acted": "stopping every domain of host", "fence kills": "killed their QEMU processes",
               "fence hard-stops": "hard-stopped through the hypervisor", "traceback": "Traceback"}
# The timeline's lines that are faults or their undoing (the evidence's "faults, in order").
FAULT_LINES = ("FAULT", "restart", "SIGCONT", "heal", "unhang", "settling")
AROUND = 30.0  # seconds of the timeline before an overlap that its evidence shows


def tracebacks(log: str) -> Counter[str]:
    """The daemons' tracebacks, each as the line that logged it and the exception it ended in
    (its log time dropped, so the same failure counts once), to read without the log files."""
    found: Counter[str] = Counter()
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("Traceback (most recent call last)"):
            continue
        logged = re.sub(r"^\S+ \S+ ", "", lines[i - 1]) if i else "?"
        ended = next((x for x in lines[i + 1:] if x and not x.startswith((" ", "Traceback", "During handling"))
                      and not x.startswith("The above exception")), "?")
        found[f"{logged[:160]} -> {ended[:200]}"] += 1
    return found


def log_lines(text: str, needle: str) -> list[str]:
    """The lines of a daemon log that mention `needle`, each marked with the daemon run it is from."""
    run, found = 0, []
    for line in text.splitlines():
        if line == "=== start":
            run += 1
        elif needle in line:
            found.append(f"#{run}| {line}")
    return found


def placement_summary(args: argparse.Namespace, book: Book, world: World) -> str:
    """Which Placement served the run, and how often its own conflict retry let a claim
    through over capacity (its log) and eschedule gave such a claim back (eschedule's)."""
    which = "the stack's (SQLite, 1 worker)" if args.placement == "stack" else (
        f"PostgreSQL, 2 workers, allocation_conflict_retry_count "
        f"{args.conflict_retries or 'left at its default (10)'}")
    try:
        with world.placement_log.open("rb") as f:
            f.seek(world.placement_log_start)
            overage = f.read().decode(errors="replace").count(harness.OVERAGE_LOGGED)
    except OSError:
        overage = -1
    return (f"{which}; claims it let through over capacity ({harness.OVERAGE_LOGGED!r} in its log): {overage}; "
            f"claims eschedule gave back on its recheck: {book.rechecks}")


def report(args: argparse.Namespace, book: Book, world: World, sampler: Sampler) -> int:
    """Print the report; 1 if anything was violated, else 0."""
    t = book.timings
    print(f"\nchaos run: seed {args.seed}, {args.hosts} hosts, prefix {world.prefix}")
    print(f"  setup {t.get('setup', 0):.1f}s, chaos {t.get('chaos', 0):.1f}s, settle {t.get('settle', 0):.1f}s, "
          f"check {t.get('check', 0):.1f}s")
    columns = [*OUTCOMES.values(), "error"]
    print(f"\n{'operations':<16}" + "".join(f"{c:>12}" for c in columns))
    for kind in OPS | {"garbage-removal": 0}:
        if kind in book.ops:
            print(f"  {kind:<14}" + "".join(f"{book.ops[kind][c]:>12}" for c in columns))
    print(f"\n{'faults':<20}{'count':>6}")
    for kind in FAULTS:
        how = ", ".join(f"{k} {n}" for k, n in sorted(book.detail[kind].items())) if kind in book.detail else ""
        print(f"  {kind:<18}{book.faults[kind]:>6}" + (f"   ({how})" if how else ""))
    print(f"  (Placement requests answered: {dict(world.proxy.served)}; instances moved by evacuations: {book.moved})")
    print(f"\nPlacement: {placement_summary(args, book, world)}")
    print(f"Sampler (invariant C, window 0): {sampler.summary()}")
    for hv in world.hvs:
        print(f"  {', '.join(h.name for h in world.hosts if h.hv is hv)} on {hv.describe()}")
    print(f"\n{'daemons':<10}{'starts':>8}{'threads after start':>21}{'threads at the end':>20}")
    for host in world.hosts:
        print(f"  {host.name:<8}{host.starts:>8}{host.baseline:>21}{host.final_threads:>20}")
    by: dict[str, list[Violation]] = defaultdict(list)
    for v in book.violations:
        by[v.invariant].append(v)
    text = "".join(host.cp.logtext() for host in world.hosts)
    print("\ndaemon logs: " + ", ".join(f"{k} {text.count(v)}" for k, v in LOG_SIGNALS.items()))
    for what, n in tracebacks(text).most_common():
        print(f"  traceback x{n}: {what}")
    print(f"\n{'invariant':<50}{'violations':>10}")
    for key, text in INVARIANTS.items():
        print(f"  {key} {text:<46}{len(by[key]):>10}")
    for note in book.notes:
        print(f"note: {note}")
    if book.violations:
        evidence(book, world, sampler, by)
        print(f"\nFAIL: {len(book.violations)} violations, seed {args.seed} "
              f"(python3 -m devstack chaos --seconds {args.seconds} --seed {args.seed} --hosts {args.hosts})")
        return 1
    print(f"\nOK: no violations, seed {args.seed}")
    return 0


def overlap(book: Book, sampler: Sampler, uuid: str) -> None:
    """When and for how long `uuid` ran twice, each copy's starts and ends, and everything the
    run did from AROUND seconds before until the overlap ended."""
    spans = [o for o in invariants.overlaps(sampler.observations) if o.uuid == uuid]
    for o in spans:
        print(f"    overlap from t={o.began:.2f}s for {o.lasted:.2f}s on {', '.join(o.hosts)}"
              + (" (still at the last look)" if o.open else ""))
    for seen in sampler.observations:
        if seen.uuid == uuid:
            print(f"    {seen.t:7.2f}s  {'runs' if seen.running else 'ends'} at {seen.host}")
    if spans:
        first, last = spans[0].began - AROUND, max(o.began + o.lasted for o in spans) + 1
        print(f"    the run from t={first:.0f}s to t={last:.0f}s:")
        for t, text in book.timeline:
            if first <= t <= last:
                print(f"    {t:7.1f}s  {text}")


def evidence(book: Book, world: World, sampler: Sampler, by: dict[str, list[Violation]]) -> None:
    """Each violation, the run's timeline of faults and of what touched its instance, and
    the daemons' log lines about it."""
    print("\nfaults, in order:")
    for t, text in book.timeline:
        if text.startswith(FAULT_LINES):
            print(f"  {t:7.1f}s  {text}")
    for key in INVARIANTS:
        for v in by[key]:
            print(f"\n[{key}] {v.text}")
            if v.uuid is None:
                continue
            if key == "C":
                overlap(book, sampler, v.uuid)
            for t, text in book.timeline:
                if v.uuid[:8] in text:
                    print(f"    {t:7.1f}s  {text}")
            for host in world.hosts:
                for line in log_lines(host.cp.logtext(), v.uuid)[-12:]:
                    print(f"    {host.name}{line[:240]}")
