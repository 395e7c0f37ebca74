"""One chaos run: build the world, drive it (operations and faults from one seeded rng), settle
it, check it, report, clean up; and the command line.

The invariants are etcd_compute/invariants.py's. Checked while the run goes on (each violation
reported once, when first seen): C from the QEMU sampler's observations, and 1 (etcd's side: one
request per instance), D and W from etcd, every LIVE_EVERY seconds and on every look while
settling. 2, 3, 4, 5 and 6 only once the world has settled: a claim precedes its request, a
claim Placement let through over capacity is given back a moment later, a domain outlives its
request until its host removes it, and a moving world is not settled.
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import signal
import sys
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from devstack import harness
from devstack.chaos import __doc__ as DOC  # noqa: N812
from devstack.chaos.book import Book
from devstack.chaos.faults import FAULT_RATE, FAULTS, Faults
from devstack.chaos.hypervisors import FakeHypervisor
from devstack.chaos.operations import Operations
from devstack.chaos.report import report
from devstack.chaos.sampler import FakeSampler, Sampler
from devstack.chaos.world import World
from etcd_compute import contract, invariants
from etcd_compute.invariants import EtcdView, Hypervisors
from etcd_compute.states import Actual

LIVE_EVERY = 5.0  # seconds between the checks made while the run goes on
STUCK = 30.0  # seconds an instance may wait without saying why (W); well below the daemons' resync
HOLD = 5.0  # seconds the world must hold still, everything settled, to count as settled


def shape(etcd: EtcdView, domains: Hypervisors) -> list[Any]:
    """What must hold still for the world to count as settled: every request and status write,
    every domain, every host's liveness."""
    return sorted([(k, str(r and r["desired"])) for k, found in etcd.requests.items() for _, r in found]
                  + [(k, s["state"], s["host"], s["updated_at"]) if s else (k,) for k, s in etcd.statuses.items()]
                  + [(str(h), sorted(d.items())) for h, d in domains.items()]) + sorted(etcd.alive)


class Chaos:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.book = Book(args.verbose)
        self.world = World(args, self.book)
        self.ops = Operations(self.book, self.world, self.rng)
        self.faults = Faults(self.book, self.world, self.rng, set(filter(None, args.faults.split(","))),
                             args.seconds)
        fakes = {hv.name: hv.dir for hv in self.world.hvs if isinstance(hv, FakeHypervisor)}
        self.sampler = (FakeSampler(dirs=fakes, t0=self.book.t0, alarm=self.alarm) if fakes else
                        Sampler(libvirt_etcs=self.world.libvirt_etcs, t0=self.book.t0, alarm=self.alarm))

    def known(self) -> set[str]:
        """Every instance the run made, destroyed or wrote garbage for."""
        with self.book.lock:
            return set(self.book.instances) | self.book.destroyed | set(self.book.garbage)

    # -- checks while it runs ----------------------------------------------------------------

    def copies(self, etcd: EtcdView | None = None) -> list[invariants.Violation]:
        """C over everything the sampler saw of the run's instances (other QEMU processes on this
        machine are not the run's to judge)."""
        ours = self.known() | set(etcd.requests if etcd else ())
        return invariants.two_copies([o for o in list(self.sampler.observations) if o.uuid in ours])

    def alarm(self, t: float, uuid: str, places: list[str]) -> None:
        """The sampler saw one of the run's instances in two places at once (its thread): say so now;
        C's check over the whole series says for how long."""
        if uuid in self.known():
            self.book.found([invariants.Violation(
                "C", f"{uuid}: running in {len(places)} places at once ({', '.join(places)}) at t={t:.1f}s", uuid)])

    def check_live(self, etcd: EtcdView | None = None) -> None:
        """The invariants that hold at every moment: C, 1 (etcd's side), D and W."""
        if etcd is None:
            try:
                etcd = self.world.etcd()
            except RuntimeError:  # no member answered: the next look will
                return
        name = self.world.name
        self.book.found(self.copies(etcd) + invariants.one_host(etcd, name=name) + invariants.up_or_down(etcd, name)
                        + invariants.stuck(etcd, datetime.now(UTC), STUCK, name))

    # -- drive, settle -------------------------------------------------------------------------

    def start(self) -> None:
        self.sampler.start()
        self.world.start()

    def drive(self) -> None:
        end = time.monotonic() + self.args.seconds
        next_check = time.monotonic() + LIVE_EVERY
        while time.monotonic() < end:
            self.book.run_due()
            self.world.watch_daemons()
            if self.rng.random() < FAULT_RATE:
                self.faults.some()
            else:
                self.ops.some()
            if time.monotonic() >= next_check:  # (no rng here: the choices stay the seed's)
                self.check_live()
                next_check = time.monotonic() + LIVE_EVERY
            time.sleep(self.rng.uniform(0.2, 0.7))

    def settle(self) -> None:
        """Stop the operations, undo every fault, restart what is dead, deal with the garbage, and
        wait (bounded) until every instance has settled and the world holds still."""
        book, world = self.book, self.world
        self.ops.pool.shutdown(wait=True)
        world.proxy.fail("pass", 0)
        book.run_due(everything=True)  # every SIGCONT, heal, resume and restart that was still to come
        self.faults.undo()
        for pid in list(book.stopped):
            self.faults.cont(pid)
        for member in world.cluster.members:
            world.restart_etcd(member)
        for host in world.hosts:
            if host.state == "dead":
                book.repair(world.restart, host)

        def restarted() -> bool:
            book.run_due(everything=True)  # a failed restart schedules another
            return book.repairing == 0 and not book.pending
        harness.wait_until(restarted, 400, "the restarts to finish", interval=0.5)
        book.note("settling: every fault undone", live=True)
        self.check_garbage()
        self.wait_settled(self.args.settle)

    def check_garbage(self) -> None:
        """Every garbage record shows as an ERROR view in `eschedule list`, then goes: by
        `destroy --force` where eschedule can find it (an index key), directly otherwise."""
        book, world = self.book, self.world
        if not book.garbage:
            return
        rc, out = self.ops.cli("list", "", "list", "--json")
        views = {v["uuid"]: v for v in json.loads(out)} if rc == 0 else {}
        for key, (host, index) in sorted(book.garbage.items()):
            view = views.get(key)
            if view is None or view["state"] != Actual.ERROR or "malformed" not in (view["reason"] or ""):
                book.violation("G", f"garbage requests/{world.name(host)}/{key} is not an ERROR view in "
                               f"eschedule list: {view}", key)
            forced = contract.looks_like_uuid(key) and \
                self.ops.cli("garbage-removal", key, "destroy", key, "--force")[0] == 0
            if index and not forced:
                book.violation("G", f"eschedule destroy --force {key} did not remove the garbage record "
                               f"(with an index key)", key)
            if not forced:
                if contract.looks_like_uuid(key):
                    book.notes.append(f"destroy --force {key}: no instance (garbage without an index key): "
                                      f"removed directly")
                world.gateway.delete(contract.request_key(world.prefix, host, key))
                world.gateway.delete(contract.index_key(world.prefix, key))

    def wait_settled(self, timeout: float) -> None:
        """Until every instance has settled, every host is UP and nothing has changed for HOLD
        seconds (bounded by `timeout`). Not the daemons' resync: a change their watches missed
        must stay missed, for W and 5 to see it."""
        deadline = time.monotonic() + timeout
        last: Any = None
        still_since = time.monotonic()
        while time.monotonic() < deadline:
            self.book.run_due()
            self.world.watch_daemons()
            etcd, domains = self.world.etcd(), self.world.hypervisors(self.known())
            self.check_live(etcd)
            waiting = [u for u in etcd.instances() if invariants.waiting_for(etcd, u)]
            waiting += [k for k in self.book.garbage if any(key.endswith("/" + k) for key in etcd.keys)]
            state = shape(etcd, domains)
            if waiting or state != last or len(etcd.alive) < len(self.world.hosts):
                last, still_since = state, time.monotonic()
            elif time.monotonic() - still_since >= HOLD:
                return
            time.sleep(1)
        self.book.note(f"settling: gave up after {timeout:.0f}s", live=True)

    # -- the end ---------------------------------------------------------------------------------

    def check(self) -> None:
        """Every invariant, on the settled world; then the daemons (7)."""
        world, book, name = self.world, self.book, self.world.name
        etcd = world.etcd()
        domains = world.hypervisors(self.known())
        placement = world.placement_view()
        book.found(invariants.one_host(etcd, domains, name) + invariants.requested_there(etcd, domains, name)
                   + invariants.owned_allocations(etcd, placement, book.destroyed, name)
                   + invariants.within_capacity(placement, name) + invariants.settled(etcd, domains, name)
                   + invariants.destroyed_gone(etcd, placement, book.destroyed, domains, name)
                   + invariants.up_or_down(etcd, name) + invariants.stuck(etcd, datetime.now(UTC), STUCK, name)
                   + self.copies(etcd))
        world.check_daemons()

    def cleanup(self, keep_logs: bool) -> None:
        """Take down everything the run made, whatever state it is in: never raises."""
        book, world = self.book, self.world
        with book.lifecycle, book.lock:
            book.closing.set()
        steps: list[tuple[str, Callable[[], object]]] = [
            ("operations", self.ops.stop),
            ("sampler", self.sampler.stop),
            ("daemons", world.stop_daemons),
            ("links", world.close_links),
            ("domains", lambda: world.remove_domains(self.known())),
            ("hypervisors", world.stop_hypervisors),
            ("providers", world.remove_providers),
            ("placement", world.own.close),
            ("etcd", world.cluster.__exit__),
            ("proxy", world.proxy.close),
            ("files", lambda: world.remove_files(keep_logs)),
        ]
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - clean up the rest anyway
                print(f"chaos: cleanup of {what} failed: {exc!r}", file=sys.stderr)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python3 -m devstack chaos", description=(DOC or "").splitlines()[0])
    ap.add_argument("--seconds", type=int, default=60, help="how long to inject operations and faults")
    ap.add_argument("--seed", type=int, default=None, help="the seed of every choice (default: a random one)")
    ap.add_argument("--hosts", type=int, default=3, help="ecompute hosts (at least 2)")
    ap.add_argument("--hypervisor", choices=("qemu", "fake"), default="qemu",
                    help="qemu: hosts take turns on this machine's libvirtd and libvirtds of the run's own (QEMU "
                         "domains; C from /proc); fake: a fake hypervisor per host (fake:///DIR; C from its files)")
    ap.add_argument("--libvirtds", type=int, default=2,
                    help="with qemu: libvirt daemons the hosts take turns on, this machine's first (1: all on it, "
                         "where C cannot fire)")
    ap.add_argument("--settle", type=float, default=120.0, help="seconds to wait for the world to settle")
    ap.add_argument("--faults", default="", help=f"only these faults, comma-separated (of {', '.join(FAULTS)})")
    ap.add_argument("--placement", choices=("stack", "postgresql"), default="stack",
                    help="the stack's Placement (SQLite: one request at a time) or one of the run's own on "
                         "PostgreSQL with 2 workers, where claims race in the database (harness.postgres_placement)")
    ap.add_argument("--conflict-retries", type=int, default=1,
                    help="with --placement postgresql: its allocation_conflict_retry_count (0: Placement's "
                         "default, 10); 1 as devstack and INSTALL.md configure it")
    ap.add_argument("--keep", action="store_true", help="keep the daemons' and etcd's logs even without violations")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every operation as it ends")
    return ap


def main(argv: Iterable[str] | None = None) -> int:
    args = parser().parse_args(list(argv) if argv is not None else None)
    if args.seed is None:
        args.seed = secrets.randbelow(10**6)
    unknown = set(filter(None, args.faults.split(","))) - set(FAULTS)
    if unknown or args.hosts < 2 or args.libvirtds < 1:
        parser().error(f"unknown faults {sorted(unknown)}" if unknown else
                       "--hosts must be at least 2" if args.hosts < 2 else "--libvirtds must be at least 1")
    signal.signal(signal.SIGTERM, _interrupt)  # unwind through the cleanup, as Ctrl-C does
    print(f"chaos: seed {args.seed}, {args.hosts} hosts on {args.hypervisor}, {args.seconds}s", flush=True)
    run = Chaos(args)
    rc = 1
    try:
        for phase, step in (("setup", run.start), ("chaos", run.drive), ("settle", run.settle),
                            ("check", run.check)):
            started = time.monotonic()
            step()
            run.book.timings[phase] = time.monotonic() - started
        rc = report(args, run.book, run.world, run.sampler)
    except KeyboardInterrupt:
        print(f"chaos: interrupted; cleaning up (seed {args.seed})", file=sys.stderr)
        rc = 130
    except BaseException:
        print(f"chaos: the run itself failed (seed {args.seed}):", file=sys.stderr)
        raise
    finally:
        run.cleanup(keep_logs=args.keep or rc != 0)
    return rc


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
