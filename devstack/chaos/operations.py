"""The run's operations: eschedule processes, as a user starts them, chosen from the loop
(one seeded rng) and run in op threads; each outcome is tallied by its exit code.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from random import Random

from devstack.chaos.book import Book
from devstack.chaos.world import World
from devstack.harness import BIN
from etcd_compute.eschedule import overcommit

QUERIES = ("resources=VCPU:1,MEMORY_MB:64", "resources=VCPU:1,MEMORY_MB:64", "resources=VCPU:2,MEMORY_MB:128")
OPS = {"schedule": 30, "destroy": 7, "stop": 8, "start": 8, "reboot": 6, "suspend": 3, "resume": 3,
       "evacuate": 10, "destroy-force": 5, "list": 4}
OUTCOMES = {0: "ok", 3: "no-capacity", 4: "placement", 5: "etcd", 6: "unknown", 7: "refused", 8: "wait"}
OP_SLOTS = 4  # eschedule processes at once: each costs ~0.5 CPU-seconds on a 2-core machine
# Instances per host above which a schedule turns into a destroy: a full cloud leaves an evacuation
# nowhere to go, so evacuations would only ever test "no capacity".
POPULATION = 4


class Operations:
    def __init__(self, book: Book, world: World, rng: Random) -> None:
        self.book, self.world, self.rng = book, world, rng
        self.procs: set[subprocess.Popen[str]] = set()
        self.inflight = 0
        self.pool = ThreadPoolExecutor(OP_SLOTS, thread_name_prefix="op")

    def cli(self, kind: str, target: str, *args: str, timeout: float = 120) -> tuple[int, str]:
        """Run eschedule about `target` (for the timeline); tally its outcome by exit code; an
        undocumented code, a traceback or a hang is a violation. (exit code, stdout)."""
        book = self.book
        cmd = [str(BIN / "eschedule"), "--config", str(self.world.schedule_yaml), *args]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        with book.lock:
            self.procs.add(proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            book.violation("E", f"eschedule {shlex.join(args)} still ran after {timeout:.0f}s; killed")
        finally:
            with book.lock:
                self.procs.discard(proc)
        outcome = OUTCOMES.get(proc.returncode, "error")
        if (outcome == "error" or "Traceback" in err) and proc.returncode >= 0:
            book.violation("E", f"eschedule {shlex.join(args)} exited {proc.returncode}: {err.strip()[-1500:]}")
        with book.lock:
            book.ops[kind][outcome] += 1
            book.rechecks += err.count(overcommit.GIVEN_BACK)
        book.note(f"{kind} {target} -> {outcome}"
                  + (f": {err.strip().splitlines()[-1][:160]}" if proc.returncode and err.strip() else ""))
        return proc.returncode, out

    def schedule(self, query: str) -> None:
        rc, out = self.cli("schedule", query, query, "--json")
        if rc == 0:
            view = json.loads(out)
            with self.book.lock:
                self.book.instances[view["uuid"]] = view["host"]
            self.book.note(f"  scheduled {view['uuid']} on {self.world.name(view['host'])}")

    def destroy(self, uuid: str, force: bool) -> None:
        args = ("destroy", uuid, "--force") if force else ("destroy", uuid)
        rc, _ = self.cli("destroy-force" if force else "destroy", uuid, *args)
        if rc == 0:
            with self.book.lock:
                self.book.destroyed.add(uuid)
                self.book.instances.pop(uuid, None)

    def evacuate(self, host: str) -> None:
        name = self.world.name
        rc, out = self.cli("evacuate", name(host), "evacuate", host, "--json")
        if rc in (0, 3, 7) and out.strip():  # (7: the host came back meanwhile; what moved before that, moved)
            for move in json.loads(out):
                if move["to"]:
                    with self.book.lock:
                        self.book.instances[move["uuid"]] = move["to"]
                        self.book.moved += 1
                    self.book.note(f"  evacuated {move['uuid']} from {name(move['from'])} to {name(move['to'])}")

    def some(self) -> None:
        """Start one operation, chosen by the rng (nothing when every slot is busy)."""
        kind = self.rng.choices(list(OPS), weights=list(OPS.values()))[0]
        with self.book.lock:
            if self.inflight >= OP_SLOTS:
                return
            live = sorted(self.book.instances)
        if kind == "schedule" and len(live) >= POPULATION * len(self.world.hosts):
            kind = "destroy"
        for job in self.jobs(kind, live):
            self.submit(job)

    def jobs(self, kind: str, live: list[str]) -> list[Callable[[], object]]:
        jobs: list[Callable[[], object]] = []
        if kind == "schedule":
            query = self.rng.choice(QUERIES)
            jobs.append(lambda: self.schedule(query))
        elif kind == "list":
            jobs.append(lambda: self.cli("list", "", "list", "--json"))
        elif kind in ("evacuate", "destroy-force"):
            down = [h.uuid for h in self.world.hosts if h.uuid not in self.world.alive()]
            if kind == "evacuate" and down:  # several evacuations of the same host at once
                host = self.rng.choice(down)
                jobs += [lambda: self.evacuate(host)] * self.rng.randint(2, 3)
            candidates = [u for u in live if self.book.instances.get(u) in down]
            if kind == "destroy-force" and candidates:
                uuid = self.rng.choice(candidates)
                jobs.append(lambda: self.destroy(uuid, True))
        elif live:
            uuid = self.rng.choice(live)
            if kind == "destroy":
                jobs.append(lambda: self.destroy(uuid, False))
            else:
                jobs.append(lambda: self.cli(kind, uuid, kind, uuid))
        return jobs

    def submit(self, job: Callable[[], object]) -> None:
        def run() -> None:
            try:
                job()
            except Exception as exc:  # noqa: BLE001 - the run goes on; this is our bug, say so
                self.book.note(f"operation failed in the chaos run itself: {exc!r}", live=True)
            finally:
                with self.book.lock:
                    self.inflight -= 1
        with self.book.lock:
            self.inflight += 1
        self.pool.submit(run)

    def stop(self) -> None:
        """Kill every eschedule still running and start no more."""
        with self.book.lock:
            procs = list(self.procs)
        for proc in procs:
            proc.kill()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.book.repairs.shutdown(wait=False, cancel_futures=True)
