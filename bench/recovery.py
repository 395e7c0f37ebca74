"""Recovery: a host lost -> every one of its instances ACTIVE on another host (issue 18).

A lane is a small cloud of real parts on an etcd prefix of its own: the bench stack's etcd and
Placement, two real ecompute daemons on QEMU (diskless domains: no network, no metadata server,
as the tests' qemu_host) and the real evacuator, `eschedule evacuate --auto`, with its default
grace (30 s; --quick: 1 s and shorter leases). The lost host runs on a second libvirtd
(devstack.libvirthost: its domains are its own, in a namespace of their own) and reaches etcd
and Placement through fault proxies (devstack.netfault.HostLinks); the survivor runs on the
machine's libvirtd with room for 10 instances. Both carry a trait of the lane's own, which the
instances require: they go nowhere else in the shared Placement.

A trial: the survivor is stopped (SIGTERM: its lease is revoked), N instances are scheduled
(so onto the lost host) and ACTIVE, the survivor starts again, one instance is scheduled onto it
and timed until ACTIVE (the build of the floor) and destroyed; then, at t0, the host is lost:
- killed: its daemon and workers (Ecompute.kill_all), its fence, and its libvirtd with every
  QEMU (LibvirtHost.stop): a machine that dies;
- cut: its links to etcd blackholed (HostLinks.cut("blackhole", placement=False)): it runs on,
  and its fence must stop its domains.
From t0 on, every 0.1 s: when its alive key vanished (DOWN), and each instance's request on
the survivor (moved) and ACTIVE there; the DOWN record's `since`, each request's
`evacuated.at` and each status's `updated_at` (wall clock, ms) date the evacuator's and the
survivor's steps more exactly. A QEMU sampler (devstack.chaos.sampler) dates when the lost
host's last domain stopped and checks that no copy ran beside its new one. Recovery = t0 -> the
last instance ACTIVE elsewhere. Then everything is undone: the instances destroyed, the host
brought back (libvirtd and daemon started again, or the link healed) and its orphaned domains
gone. Cases (killed, cut) x (1, 10 instances) take turns, so the machine's drift hits all.

Each lane also keeps a shut-off placeholder domain on the machine's libvirtd, owned by no
host: a stopped or stray host's fence on that shared libvirtd takes an empty listing for "only
mine" and kills any domain that starts just then (see Lane.place_holder).

Floor: lease_ttl + fence_margin (from the host's record) + the grace + one build (median).
After a loss the lease itself still runs up to lease_ttl (the last refresh was at most a
third of it earlier), and the evacuator looks every 2 s: both lie outside the floor and show
in the picture. Goal (issue 18): p95 <= 60 s with the defaults. Full runs use two lanes side
by side (the trials of each are their own; the machine is shared either way).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import shutil
import signal
import subprocess
import threading
import time
import uuid as uuidlib
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import libvirt
import yaml

from devstack.chaos.sampler import Sampler
from devstack.harness import Ecompute, wait_until
from devstack.libvirthost import LibvirtHost
from devstack.netfault import HostLinks
from etcd_compute.config import load_schedule
from etcd_compute.ecompute.driver import DriverError, domain_name
from etcd_compute.ecompute.libvirtdriver import LibvirtDriver
from etcd_compute.errors import WaitFailed
from etcd_compute.eschedule.operations import Operations
from etcd_compute.invariants import Observation, overlaps
from etcd_compute.states import Actual

import common
from common import say

BENCH = "recovery"
PICTURE = Path(__file__).resolve().parent / "recovery.svg"
SMALL = "resources=VCPU:1,MEMORY_MB:128"
GOAL = 60.0  # seconds, p95 with the defaults: what users compare to (vSphere HA: 30-60 s)
WAYS = ("killed", "cut")
SIZES = (1, 10)
MACHINE = "qemu:///system"
# Room for 10 instances of SMALL on each host, fixed (not the machine's).
INVENTORY = {"VCPU": {"total": 16, "allocation_ratio": 1.0}, "MEMORY_MB": {"total": 4096, "reserved": 0},
             "DISK_GB": {"total": 40}}
POLL = 0.1
# The phases of a trial, in order, as drawn (each from the end of the one before).
PHASES = ["lease runs out (loss -> DOWN)", "DOWN -> recorded by the evacuator", "fence window (lease_ttl + margin)",
          "grace", "the evacuator's next round, moves", "rebuilds -> ACTIVE"]

libvirt.registerErrorHandler(lambda *a: None, None)


@dataclass
class Timings:
    """What a lane's hosts and evacuator are given; None: the product's default."""
    lease_ttl: int | None
    grace: float | None
    interval: float | None
    trials: int  # per case
    lanes: int
    timeout: float  # seconds a recovery may take before the trial counts as failed


FULL = Timings(lease_ttl=None, grace=None, interval=None, trials=20, lanes=2, timeout=240)
QUICK = Timings(lease_ttl=2, grace=1.0, interval=0.5, trials=2, lanes=2, timeout=60)


@dataclass
class Trial:
    """One loss; times in seconds from t0 (the loss)."""
    way: str
    n: int
    lane: int
    build: float  # the floor's build, schedule -> ACTIVE, measured just before
    fence_window: float  # lease_ttl + fence_margin, from the host's record
    grace: float
    down: float  # the alive key gone
    recorded: float  # the DOWN record's since
    moved: list[float]  # per instance, sorted: its request on the survivor
    active: list[float]  # per instance, sorted: ACTIVE there
    fenced: float | None = None  # the lost host's last QEMU gone (sampler)
    overlaps: int = 0  # instances that ran on both hosts at once
    gap: float | None = None  # least time from an old copy's end to its new copy's start

    @property
    def recovery(self) -> float:
        return self.active[-1]

    @property
    def floor(self) -> float:
        return self.fence_window + self.grace + self.build

    def phases(self) -> dict[str, float]:
        """The seconds of each of PHASES, each from the end of the one before (never negative)."""
        recorded = max(self.recorded, self.down)
        ends = [self.down, recorded, recorded + self.fence_window, recorded + self.fence_window + self.grace,
                self.moved[-1], self.recovery]
        out, last = {}, 0.0
        for name, end in zip(PHASES, ends, strict=True):
            out[name] = round(max(end - last, 0.0), 3)
            last = max(last, end)
        return out


class TrialFailed(RuntimeError):
    """A loss after which the instances were not all ACTIVE elsewhere in time."""


def _wall(stamp: str | None, wall0: float) -> float | None:
    """An ISO time (the product's wall-clock stamps) as seconds after wall0."""
    if not stamp:
        return None
    try:
        return datetime.fromisoformat(stamp).timestamp() - wall0
    except ValueError:
        return None


class Lane:
    """One small cloud: a lost host (second libvirtd, behind HostLinks), a survivor on the
    machine's libvirtd, an evacuator; its own prefix, files, trait and providers."""

    def __init__(self, info: dict, k: int, timings: Timings, stopping: threading.Event) -> None:
        self.info, self.k, self.t, self.stopping = info, k, timings, stopping
        tag = uuidlib.uuid4().hex[:8]
        self.prefix = f"/bench-{tag}"
        self.files = common.files_dir(info, self.prefix.strip("/"))
        self.placement, self.store = common.clients(info, self.prefix)
        self.trait = f"CUSTOM_BENCH_RECOVERY_{tag.upper()}"
        self.query = f"{SMALL}&required={self.trait}"
        # A host of this run's own (a stray fence of an earlier run, on the same socket, would
        # take its domains for its own: see place_holder()).
        self.host = LibvirtHost(f"rec{k}-{tag[:6]}", Path(info["stack"]) / "hosts" / f"recovery-{tag}")
        self.links = HostLinks([info["etcd"]], info["placement"], name=f"lost{k}")
        self.lost: Ecompute | None = None
        self.survivor: Ecompute | None = None
        self.evacuator: subprocess.Popen | None = None
        self.ops: Operations | None = None
        self.uuids: set[str] = set()  # every instance this lane scheduled and did not see gone
        self.lost_by: str | None = None  # how the host was lost in the trial under way (WAYS)
        self.placeholder: str | None = None  # see place_holder()
        self.lost_pids: set[int] = set()  # the QEMU processes of the lost host seen in the trial under way
        self.failures: list[str] = []

    # -- set-up ------------------------------------------------------------------------------

    def start(self) -> None:
        self.host.stop()  # what an interrupted run left
        self.host.start(fresh=True)
        extra = {"lease_ttl": self.t.lease_ttl} if self.t.lease_ttl else {}
        common_kwargs = dict(network={"mode": "none"}, metadata={"enabled": False}, inventory=INVENTORY,
                             traits=[self.trait], **extra)
        self.lost = common.ecompute(self.info, self.prefix, self.files, "lost", uri=self.host.uri,
                                    **self.links.compute_config(), **common_kwargs)
        self.survivor = common.ecompute(self.info, self.prefix, self.files, "survivor", uri=MACHINE,
                                        **common_kwargs)
        schedule = self.files / "schedule.yaml"
        evacuate = {"interval": self.t.interval} if self.t.interval else {}
        schedule.write_text(yaml.safe_dump({
            "etcd": {"endpoints": [self.info["etcd"]], "prefix": self.prefix},
            "placement": {"endpoint": self.info["placement"]}, "default_image": None, "wait_timeout": 120,
            **({"evacuate": evacuate} if evacuate else {})}))
        self.ops = Operations(load_schedule(str(schedule)))
        self.placeholder = self.place_holder()
        for cp in (self.lost, self.survivor):
            self.up(cp)
        grace = ["--grace", str(self.t.grace)] if self.t.grace is not None else []
        with (self.files / "evacuator.log").open("ab") as log:
            self.evacuator = subprocess.Popen(
                [str(common.BIN / "eschedule"), "--config", str(schedule), "evacuate", "--auto", *grace],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    @staticmethod
    def place_holder() -> str:
        """A shut-off domain on the machine's libvirtd, named as ecompute names its domains and
        owned by no host, for the lane's whole run. A fence whose proof has lapsed stops every
        running domain of its libvirtd when its last listing showed only its own (fence.py,
        `exclusive`), and an empty listing counts as that: on this shared libvirtd, the fence of
        any stopped host of another stack (or a stray one whose files are gone) then kills a
        domain of ours that starts within its listing period. With this one listed, none does."""
        uuid = str(uuidlib.uuid4())
        conn = libvirt.open(MACHINE)
        try:
            conn.defineXML(f"<domain type='qemu'><name>{domain_name(uuid)}</name><uuid>{uuid}</uuid>"
                           "<memory unit='MiB'>16</memory><os><type arch='x86_64'>hvm</type></os></domain>")
        finally:
            conn.close()
        return uuid

    def up(self, cp: Ecompute) -> None:
        """Start a daemon and wait until it is ready and UP (its alive key written)."""
        cp.start()
        cp.wait_ready(90)
        self.wait(lambda: cp.host in self.store.alive_hosts(), 30, f"{cp.name} UP")

    def wait(self, check, timeout: float, what: str):  # noqa: ANN001, ANN201 - harness.wait_until's
        def checked():  # noqa: ANN202
            if self.stopping.is_set():
                raise KeyboardInterrupt
            return check()
        return wait_until(checked, timeout, f"lane {self.k}: {what}", interval=POLL)

    # -- a trial -----------------------------------------------------------------------------

    def prepare(self, n: int) -> tuple[list[str], float]:
        """n instances ACTIVE on the lost host (the survivor stopped meanwhile), the survivor
        back UP; and the floor's build: one instance scheduled onto the survivor until ACTIVE."""
        assert self.ops is not None and self.lost is not None and self.survivor is not None
        self.survivor.stop()  # SIGTERM: reserved = total, lease revoked
        self.wait(lambda: self.survivor.host not in self.store.alive_hosts(), 30, "survivor DOWN")
        uuids = []
        for _ in range(n):
            uuids.append(self.ops.schedule(self.query)["uuid"])
            self.uuids.add(uuids[-1])
        for uuid in uuids:
            view = self.ops.wait_settled(uuid, 120)
            if view["host"] != self.lost.host:
                raise RuntimeError(f"{uuid} went to {view['host']}, not the host to lose")
        self.up(self.survivor)
        t0 = time.perf_counter()
        one = self.ops.schedule(f"{SMALL}&in_tree={self.survivor.host}")["uuid"]
        self.uuids.add(one)
        self.ops.wait_settled(one, 120)
        build = time.perf_counter() - t0
        self.destroy([one])
        return uuids, build

    def destroy(self, uuids: list[str]) -> None:
        assert self.ops is not None
        for uuid in uuids:
            self.ops.destroy(uuid)
        for uuid in uuids:
            self.ops.wait_gone(uuid, 120)
            self.uuids.discard(uuid)

    def lose(self, way: str) -> None:
        assert self.lost is not None
        self.lost_by = way
        if way == "killed":  # the machine dies: daemon, workers, fence, libvirtd, QEMUs
            self.lost.kill_all()
            self.lost.kill_fence()
            self.host.stop()
        else:
            self.links.cut("blackhole", placement=False)

    def trial(self, way: str, n: int) -> Trial:
        assert self.lost is not None and self.survivor is not None
        uuids, build = self.prepare(n)
        # Which QEMU processes are the lost host's: libvirt gives each QEMU a mount namespace of
        # its own (whose id the kernel reuses), so the sampler's namespaces cannot tell; the
        # host's own listing (its /etc/libvirt in their mountinfo) can, while they live.
        self.lost_pids = set(self.host.qemu_pids())
        sampler = Sampler().start()
        try:
            time.sleep(2 * POLL)  # the sampler has seen the lost host's QEMUs
            t0, wall0 = time.monotonic(), time.time()
            self.lose(way)
            trial = self.watch(way, n, uuids, t0, wall0)
            trial.build = round(build, 3)
            time.sleep(2 * POLL)
        finally:
            sampler.stop()
        self.judge(trial, sampler, uuids, t0)
        self.restore()
        return trial

    def watch(self, way: str, n: int, uuids: list[str], t0: float, wall0: float) -> Trial:
        """Poll etcd from the loss until every instance is ACTIVE on the survivor."""
        assert self.lost is not None and self.survivor is not None
        lost, survivor = self.lost.host, self.survivor.host
        down: float | None = None
        moved: dict[str, float] = {}
        active: dict[str, float] = {}
        while len(active) < n:
            if self.stopping.is_set():
                raise KeyboardInterrupt
            now = time.monotonic() - t0
            if now > self.t.timeout:
                raise TrialFailed(f"{way}, {n}: after {now:.0f} s, {len(moved)} moved and {len(active)} ACTIVE "
                                  f"of {n}; DOWN at {down}")
            if down is None and lost not in self.store.alive_hosts():
                down = now
            if way == "cut" and int(now / POLL) % 10 == 0:  # a QEMU it started late, if any, counts too
                self.lost_pids |= set(self.host.qemu_pids())
            for view in self.store.list_instances():
                uuid = view["uuid"]
                if uuid not in uuids or view["host"] != survivor:
                    continue
                moved.setdefault(uuid, now)
                if view["state"] == Actual.ACTIVE:
                    active.setdefault(uuid, now)
                elif view["state"] == Actual.ERROR:
                    raise TrialFailed(f"{uuid} ERROR on the survivor: {view['reason']}")
            time.sleep(POLL)
        self.stamped(uuids, moved, active, wall0)
        record = self.store.host_record(lost) or {}
        since = (self.store.down_record(lost) or ({}, None))[0].get("since")
        recorded = _wall(since, wall0)
        if down is None or recorded is None:
            raise TrialFailed(f"{way}, {n}: moved without a DOWN seen ({down}) or recorded ({since})")
        return Trial(way, n, self.k, 0.0, float(record.get("lease_ttl", 0) + (record.get("fence_margin") or 0)),
                     self.grace, round(down, 3), round(recorded, 3), sorted(round(x, 3) for x in moved.values()),
                     sorted(round(x, 3) for x in active.values()))

    def stamped(self, uuids: list[str], moved: dict[str, float], active: dict[str, float], wall0: float) -> None:
        """The product's own stamps (ms) in place of the polled times, where they are there: finer."""
        for uuid in uuids:
            request, status = self.store.get_instance(uuid)
            at = _wall(((request or {}).get("evacuated") or {}).get("at"), wall0)
            if at is not None and 0 < at <= moved[uuid]:
                moved[uuid] = at
            at = _wall((status or {}).get("updated_at"), wall0)
            if at is not None and 0 < at <= active[uuid]:
                active[uuid] = at

    @property
    def grace(self) -> float:
        assert self.ops is not None
        return self.t.grace if self.t.grace is not None else self.ops.cfg.evacuate.auto_grace

    def judge(self, trial: Trial, sampler: Sampler, uuids: list[str], t0: float) -> None:
        """From the QEMU sampler: when the lost host's last domain stopped, and whether any
        instance ran on both hosts at once (and how far apart the two copies were)."""
        shift = sampler.t0 - t0
        seen = [Observation(o.t + shift, "lost" if int(o.host.rsplit("/", 1)[1]) in self.lost_pids else "survivor",
                            o.uuid, o.running) for o in sampler.observations if o.uuid in uuids]
        ended = [o.t for o in seen if o.host == "lost" and not o.running]
        still = {o.uuid for o in seen if o.host == "lost"} - {o.uuid for o in seen if o.host == "lost"
                                                               and not o.running}
        if still:
            raise TrialFailed(f"{trial.way}: {len(still)} domains still ran on the lost host at the end")
        trial.fenced = round(max(ended), 3) if ended else None
        trial.overlaps = len({o.uuid for o in overlaps(seen)})
        gaps = []
        for uuid in uuids:
            end = max((o.t for o in seen if o.uuid == uuid and o.host == "lost" and not o.running), default=None)
            start = min((o.t for o in seen if o.uuid == uuid and o.host == "survivor" and o.running), default=None)
            if end is not None and start is not None:
                gaps.append(start - end)
        trial.gap = round(min(gaps), 3) if gaps else None

    def restore(self) -> None:
        """Back to where a trial starts: the lost host UP again (restarted, or its link healed)
        without the domains it lost, the survivor UP, every instance of the lane destroyed."""
        assert self.lost is not None and self.survivor is not None
        if self.lost_by == "killed":
            self.host.start()
            self.up(self.lost)
        elif self.lost_by == "cut":
            self.links.heal()
            self.wait(lambda: self.lost.host in self.store.alive_hosts(), 90, "the lost host UP again")
        self.lost_by = None
        if self.survivor.proc is None:  # a trial that failed while it was stopped
            self.up(self.survivor)
        self.destroy(sorted(self.uuids))
        self.wait(lambda: self.domains(self.host.uri, self.lost) == [], 90, "the lost host's orphans removed")

    @staticmethod
    def domains(uri: str, cp: Ecompute) -> list[str] | None:
        """The domains host `cp` owns on `uri`; None while that libvirtd cannot say (restarted:
        the driver's cached connection is reopened at the next call)."""
        try:
            return LibvirtDriver(uri, "qemu", cp.cfg["instances_path"]).list_uuids(owner=cp.host)
        except DriverError:
            return None

    # -- clean-up ----------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Everything the lane made: the evacuator, the daemons and fences, the domains on both
        libvirtds, the second libvirtd and its files, the providers, the etcd prefix."""
        if self.evacuator is not None and self.evacuator.poll() is None:
            self.evacuator.send_signal(signal.SIGTERM)
            try:
                self.evacuator.wait(15)
            except subprocess.TimeoutExpired:
                self.evacuator.kill()
                self.evacuator.wait()
        self.links.close()
        computes = [cp for cp in (self.lost, self.survivor) if cp is not None]
        for cp in computes:
            cp.kill_all()
            cp.kill_fence()
        errors = self.remove_domains()
        self.host.stop()
        for cp in computes:
            common.drop_provider(self.placement, cp.host)
        if self.ops is not None:
            self.ops.close()
        with contextlib.suppress(Exception):
            self.store.client.delete_prefix(self.prefix + "/")
        self.store.close()
        if self.failures:  # the lane's logs, fence records and configs, for a look afterwards
            kept = Path(self.info["stack"]) / "logs" / f"recovery-{self.prefix.strip('/')}"
            shutil.copytree(self.files, kept, ignore=shutil.ignore_patterns("*.qcow2", "*.iso", "images"),
                            dirs_exist_ok=True)
            shutil.copytree(self.host.base / "log", kept / "lost-libvirt", dirs_exist_ok=True)
            say(f"lane {self.k}: its logs are kept in {kept}")
        shutil.rmtree(self.host.base, ignore_errors=True)
        common.remove_files(self.files)
        if errors:
            say(f"lane {self.k} cleanup: " + "; ".join(errors))

    def remove_domains(self) -> list[str]:
        """Every domain of the lane's hosts (on the lost host's libvirtd while it runs) and the
        storage pools on its files; what failed."""
        errors = []
        with contextlib.suppress(Exception):
            self.uuids |= self.store.known_instances()
        for cp, uri in ((self.survivor, MACHINE), (self.lost, self.host.uri)):
            if cp is None or (uri != MACHINE and self.host.pid is None):
                continue
            try:
                driver = LibvirtDriver(uri, "qemu", cp.cfg["instances_path"])
                for uuid in self.uuids | set(self.domains(uri, cp) or self.domains(uri, cp) or []):
                    driver.destroy(uuid, None)
            except Exception as exc:  # noqa: BLE001 - keep cleaning
                errors.append(f"domains of {cp.name}: {exc}")
        with contextlib.suppress(libvirt.libvirtError):
            conn = libvirt.open(MACHINE)
            try:
                if self.placeholder:
                    with contextlib.suppress(libvirt.libvirtError):
                        conn.lookupByUUIDString(self.placeholder).undefine()
                common.remove_pools(conn, self.files)
            finally:
                conn.close()
        return errors

    # -- the lane's share of the run ---------------------------------------------------------

    def run(self, cases: list[tuple[str, int]]) -> list[Trial]:
        trials = []
        self.start()
        for i, (way, n) in enumerate(cases):
            try:
                trials.append(self.trial(way, n))
            except (TrialFailed, WaitFailed) as exc:  # recorded; the lane is brought back and goes on
                self.failures.append(str(exc))
                say(f"lane {self.k}: trial {way}, {n} failed: {exc}")
                self.restore()
                continue
            t = trials[-1]
            say(f"lane {self.k} #{i + 1}/{len(cases)} {way:6} {n:2}: recovery {t.recovery:5.1f} s "
                f"(DOWN {t.down:.1f}, recorded {t.recorded:.1f}, fenced {'-' if t.fenced is None else t.fenced}, "
                f"moved {t.moved[0]:.1f}-{t.moved[-1]:.1f}, ACTIVE {t.active[0]:.1f}-{t.active[-1]:.1f}; "
                f"build {t.build:.2f}; overlaps {t.overlaps}, gap {t.gap})")
        return trials


# ----------------------------------------------------------------------------- figures, picture

def cases(trials: int) -> list[tuple[str, int]]:
    """Every case `trials` times, in turns, each round starting one case later."""
    order = [(way, n) for way in WAYS for n in SIZES]
    return [order[(r + i) % len(order)] for r in range(trials) for i in range(len(order))]


def label(way: str, n: int) -> str:
    return f"{way}, {n} instance{'s' if n > 1 else ''}"


def summary(xs: list[float]) -> dict[str, float]:
    return {"min": round(min(xs), 2), "median": round(common.median(xs), 2),
            "p95": round(common.percentile(xs, 95), 2), "max": round(max(xs), 2)}


def typical(trials: list[Trial]) -> Trial:
    """The trial whose recovery is the median one."""
    ranked = sorted(trials, key=lambda t: t.recovery)
    return ranked[(len(ranked) - 1) // 2]


def draw(path: Path, by_case: dict[tuple[str, int], list[Trial]], floor: float, goal: float | None) -> None:
    """README's recovery picture: the median trial of each case, phase by phase (the lost
    host's last domain stopped marked), and every trial's recovery time per case."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams["svg.fonttype"] = "none"  # text stays text: a small file
    shown = [(c, ts) for c, ts in by_case.items() if ts]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), gridspec_kw={"height_ratios": [3, 2]})
    colors = plt.get_cmap("tab10").colors
    labelled: set[str] = set()
    for row, (_case, ts) in enumerate(shown):
        t = typical(ts)
        left = 0.0
        for i, (phase, seconds) in enumerate(t.phases().items()):
            top.barh(row, seconds, left=left, color=colors[i], edgecolor="white",
                     label=None if phase in labelled else phase)
            labelled.add(phase)
            left += seconds
        if t.way == "cut" and t.fenced is not None:
            top.plot([t.fenced] * 2, [row - 0.4, row + 0.4], color="black", lw=1.5,
                     label=None if "fenced" in labelled else "the lost host's last domain stopped (its fence)")
            labelled.add("fenced")
        top.text(left + 0.5, row, f"{t.recovery:.1f} s", va="center", fontsize=9)
    top.set_yticks(range(len(shown)), [f"{label(*c)}\n(median trial)" for c, _ in shown], fontsize=8)
    top.set_xlabel("seconds from the loss")
    top.set_title("A host lost -> its instances ACTIVE on another host, phase by phase", fontsize=10)
    top.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, fontsize=7, frameon=False)
    data = [[t.recovery for t in ts] for _, ts in shown]
    bottom.boxplot(data, vert=False, whis=(5, 95), showfliers=False)
    for i, xs in enumerate(data):
        bottom.scatter(xs, [i + 1] * len(xs), s=10, color="tab:blue", alpha=0.6, zorder=3)
    bottom.axvline(floor, color="tab:green", ls="--", lw=1, label=f"floor {floor:.1f} s")
    if goal is not None:
        bottom.axvline(goal, color="tab:red", ls=":", lw=1, label=f"goal: p95 <= {goal:g} s")
    bottom.set_yticks(range(1, len(shown) + 1), [label(*c) for c, _ in shown], fontsize=8)
    bottom.set_xlabel(f"recovery (s), {len(data[0]) if data else 0} trials per case; box: quartiles, "
                      "whiskers 5th-95th percentile")
    bottom.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def figures(trials: list[Trial], failures: list[str], quick: bool, timings: Timings) -> list[common.Figure]:
    builds = [t.build for t in trials]
    build = common.median(builds)
    window, grace = common.median([t.fence_window for t in trials]), common.median([t.grace for t in trials])
    floor = window + grace + build
    floor_name = f"lease_ttl + fence margin ({window:g}) + grace ({grace:g}) + one build ({build:.2f})"
    by_case = {(way, n): [t for t in trials if (t.way, t.n) == (way, n)] for way in WAYS for n in SIZES}
    goal = None if quick else GOAL
    draw(PICTURE, by_case, floor, goal)
    out = []
    for (way, n), ts in by_case.items():
        if not ts:
            continue
        rec = [t.recovery for t in ts]
        stats = summary(rec)
        typ = typical(ts)
        fenced = [t.fenced for t in ts if t.fenced is not None]
        out.append(common.figure(
            BENCH, f"host {way}: {n} instance{'s' if n > 1 else ''} ACTIVE elsewhere, p95", stats["p95"], "s",
            floor, floor_name, target=f"p95 <= {GOAL:g} s with the defaults" if goal else "(quick: no goal)",
            check=(lambda v, r: v <= GOAL) if goal else None, **stats, trials=len(ts),
            recovery_s=sorted(rec), down_s=summary([t.down for t in ts]),
            recorded_s=summary([t.recorded for t in ts]), fenced_s=summary(fenced) if fenced else None,
            moved_last_s=summary([t.moved[-1] for t in ts]), after_window_s=summary(
                [t.recovery - (max(t.recorded, t.down) + t.fence_window + t.grace) for t in ts]),
            median_trial_phases_s=typ.phases(),
            median_phases_s={p: round(common.median([t.phases()[p] for t in ts]), 3) for p in PHASES},
            overlaps=sum(t.overlaps for t in ts),
            least_gap_between_copies_s=min((t.gap for t in ts if t.gap is not None), default=None)))
    out.append(common.figure(BENCH, "one build (schedule -> ACTIVE, diskless QEMU, in-process)", build, "s",
                             **summary(builds), builds=len(builds)))
    out[0].extra.update(lanes=timings.lanes, lease_ttl=timings.lease_ttl or "default", grace=grace,
                        evacuator_interval=timings.interval or "default", failed_trials=failures,
                        all_trials=[asdict(t) for t in trials])
    return out


def run(info: dict, quick: bool) -> list[common.Figure]:
    timings = QUICK if quick else FULL
    stopping = threading.Event()
    lanes = [Lane(info, k, timings, stopping) for k in range(timings.lanes)]
    todo = cases(timings.trials)
    say(f"{len(todo)} trials on {len(lanes)} lane(s): {', '.join(label(w, n) for w, n in todo[:4])}, ...")
    try:
        with concurrent.futures.ThreadPoolExecutor(len(lanes)) as pool:
            futures = [pool.submit(lane.run, todo[k::len(lanes)]) for k, lane in enumerate(lanes)]
            try:
                trials = [t for f in futures for t in f.result()]
            except BaseException:
                stopping.set()  # the other lanes stop at their next look
                raise
    finally:
        stopping.set()
        for lane in lanes:
            lane.cleanup()
    return figures(trials, [f for lane in lanes for f in lane.failures], quick, timings)
