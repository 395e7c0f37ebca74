"""Boot: what etcd-compute adds to booting the test guest, parallel builds, and images.

1. Overhead. One ecompute on qemu:///system (TCG, the isolated network, metadata server on a free
   port). "ours" = `eschedule QUERY IMAGE --kernel --initrd --cmdline ... --wait --json` timed
   from its start until it returns with the IP in etcd. Floor ("direct") = the domain XML
   ecompute generated for an earlier instance, with a fresh uuid, name, MAC, overlay, config
   drive copy and console log, defined and started straight through libvirt: define+start.
   The address is chosen before boot (a DHCP reservation), so neither side waits for the guest:
   the difference is what etcd-compute adds (issue 13's goal: <= 0.3 s). The two alternate;
   medians.
2. N parallel builds (eschedule processes started together, workers >= N) versus one build
   (the median of 1.): wall time until every one has its IP.
3. Images. The guest disk is served over HTTP on 127.0.0.1; the host starts with an empty image
   cache. The first boot from that URL downloads it (and copies kernel + initrd into the cache);
   the second is cached (it is also repetition 1 of "ours" above, same measurement). Overlay
   create + resize: LibvirtDriver.create_disk (libvirt's storage API runs qemu-img) versus
   `qemu-img create -f qcow2 -b BASE -F qcow2 OVERLAY SIZE` as a subprocess, 1 and 10 GiB.

A boot that fails (ERROR, no IP, timeout) measures nothing: everything scheduled is destroyed
and it is done again, at most twice; the figure's extra lists why (failed_boots_redone).
Everything is removed afterwards: instances (eschedule destroy --wait), the daemon (SIGTERM),
its provider, any domain still using our files, storage pools, the etcd prefix and the files.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import functools
import json
import os
import random
import re
import shutil
import subprocess
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import requests
import yaml

from devstack import testguest
from devstack.harness import ApiServer, Ecompute, Served, free_port
from devstack.localstack import stack_dir
from etcd_compute.config import load_schedule
from etcd_compute.ecompute.domainxml import XMLNS
from etcd_compute.ecompute.libvirtdriver import LibvirtDriver
from etcd_compute.eschedule.operations import Operations
from etcd_compute.states import Role

import common
from common import say

BENCH = "boot"
QUERY = "resources=VCPU:1,MEMORY_MB:256,DISK_GB:1"
IP_TIMEOUT = 90.0  # ecompute's ip_timeout: the test guest gives up DHCP 60 s into its /init
PICTURE = Path(__file__).resolve().parent / "boot-timeline.svg"
WAIT = 150  # seconds an eschedule --wait may take (parallel TCG boots on 2 cores are slow)

libvirt.registerErrorHandler(lambda *a: None, None)


def draw_timeline(path: Path, rows: list[tuple[str, dict[str, float]]], overhead: float) -> None:
    """README's boot picture: the median boot step by step (through eschedule, through the API),
    beside the same domain defined and started directly. rows: (label, step -> seconds), the
    steps named as in COLOURED."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams["svg.fonttype"] = "none"  # text stays text: a small file
    fig, ax = plt.subplots(figsize=(9, 4))
    colors = plt.get_cmap("tab10").colors
    labelled: set[str] = set()
    for row, (_label, steps) in enumerate(rows):
        left = 0.0
        for step, seconds in steps.items():
            ax.barh(row, seconds, left=left, color=colors[COLOURED.index(step) % 10], edgecolor="white",
                    label=None if step in labelled else step)
            labelled.add(step)
            left += seconds
        ax.text(left + 0.03, row, f"{left:.2f} s", va="center", fontsize=9)
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.set_xlabel("seconds from the start (medians)")
    ax.set_title(f"Schedule to IP, step by step: eschedule --wait adds {overhead:.2f} s to define + start",
                 fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: COLOURED.index(labels[i]))  # the steps in boot order
    ax.legend([handles[i] for i in order], [labels[i] for i in order], loc="upper center",
              bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class BootFailed(RuntimeError):
    """A boot that measured nothing: ERROR, no IP, or a timeout."""


# A boot, step by step: (the step, the ecompute log line that ends it; {uuid} is the instance's).
STEPS_IN_LOG = [
    ("etcd write, watch, the daemon's decision", r"ecompute: build {uuid}"),
    ("image from the cache, overlay", r"created \S+ on "),
    ("kernel + initrd, config drive, DHCP reservation", r"reserved \S+ on \S+ for {uuid}"),
    ("domain XML, define", r"defined ec-{uuid}"),
    ("start (QEMU starts)", r"started ec-{uuid}"),
]
STEPS = ["eschedule start-up and claim (until created_at)", *(s for s, _ in STEPS_IN_LOG),
         "status in etcd, eschedule --wait sees it and exits"]
API_STEPS = {STEPS[0]: "API: HTTP, token and claim (until created_at)",  # the API's own first and last steps
             STEPS[-1]: "status in etcd, the API's wait sees it and answers"}
COLOURED = [*STEPS, *API_STEPS.values()]  # a step's colour in the picture is its place here
DIRECT_STEPS = [STEPS[4], STEPS[5]]  # the floor's two steps are ours too


def median_phases(phases: list[dict[str, float] | None]) -> dict[str, float]:
    phases = [p for p in phases if p]
    return {k: round(common.median([p[k] for p in phases]), 3) for k in (phases[0] if phases else {})}


class Bench:
    def __init__(self, info: dict, quick: bool) -> None:
        self.info, self.quick = info, quick
        self.reps = 2 if quick else 3
        self.parallel = 2 if quick else 3
        self.prefix = f"/bench-{uuidlib.uuid4().hex[:8]}"
        self.files = common.files_dir(info, self.prefix.strip("/"))
        self.placement, self.store = common.clients(info, self.prefix)
        built = stack_dir() / "guest"
        self.guest = testguest.result(built) if (built / "build.json").exists() else testguest.ensure_guest()
        self.md_port = free_port()
        self.host: Ecompute | None = None
        self.served: Served | None = None
        self.api_server: ApiServer | None = None
        self.api = requests.Session()
        self.instances: set[str] = set()  # scheduled and not yet destroyed
        self.direct: set[str] = set()  # names of direct domains not yet removed
        self.failures: list[str] = []  # boots done again, and why
        self.walls: dict[str, tuple[float, float]] = {}  # uuid -> wall clock start, end of its eschedule
        self.direct_phases: list[dict[str, float]] = []
        self.conn = libvirt.open("qemu:///system")
        self.schedule_yaml = self.files / "schedule.yaml"
        self.schedule_yaml.write_text(yaml.safe_dump({
            "etcd": {"endpoints": [info["etcd"]], "prefix": self.prefix},
            "placement": {"endpoint": info["placement"]}, "wait_timeout": WAIT, "default_image": None}))

    # -- ours: eschedule ... --wait -------------------------------------------------------

    def eschedule(self, *args: str, timeout: float = WAIT + 30) -> subprocess.CompletedProcess:
        return subprocess.run([str(common.BIN / "eschedule"), "--config", str(self.schedule_yaml), *args],
                              capture_output=True, text=True, timeout=timeout)

    def boot(self, image: str) -> tuple[float, dict]:
        """eschedule ... --wait: seconds until it returns with the instance ACTIVE and its IP."""
        elapsed, r = self._boot_once(image)
        if r.returncode != 0:
            raise BootFailed(f"eschedule exit {r.returncode}: {r.stderr.strip()}")
        view = json.loads(r.stdout)
        if view["state"] != "ACTIVE" or not view.get("ip"):
            raise BootFailed(f"{view['uuid']} is {view['state']} without an IP: {view.get('reason')}")
        return elapsed, view

    def attempt(self, what: str, fn, fresh_cache: bool = False):
        """fn(), done again (up to twice) after a BootFailed, everything scheduled destroyed first.

        Seen here: a guest whose DHCP gave up (3 TCG guests on a loaded 2-core machine), and,
        before domains carried their owner, another ecompute on this libvirtd (the test suite's)
        destroying ours as its orphans ("vanished while waiting for its address").
        """
        for attempt in range(3):
            try:
                return fn()
            except BootFailed as exc:
                self.failures.append(f"{what}: {exc}")
                say(f"{what} failed: {exc}; {'again' if attempt < 2 else 'giving up'}")
                self.destroy_all()
                if attempt == 2:
                    raise
                if fresh_cache:  # a first boot must download again, not find the cache warm
                    for f in Path(self.host.cfg["image_cache_path"]).iterdir():
                        f.unlink()

    def boot_api(self, image: str) -> tuple[float, dict]:
        """POST /v1/instances with wait: seconds until it answers with the instance ACTIVE and its IP."""
        g = self.guest
        wall0, t0 = time.time(), time.perf_counter()
        r = self.api.post(f"{self.api_server.url}/v1/instances", timeout=WAIT + 30, json={
            "query": self.query, "image": image, "kernel": g["kernel"], "initrd": g["initrd"],
            "cmdline": f"{g['cmdline']} ec.md=http://169.254.169.254:{self.md_port}", "wait": True, "timeout": WAIT})
        elapsed = time.perf_counter() - t0
        view = r.json()
        if "uuid" in view:
            self.instances.add(view["uuid"])
            self.walls[view["uuid"]] = (wall0, wall0 + elapsed)
        if r.status_code != 201 or view.get("state") != "ACTIVE" or not view.get("ip"):
            raise BootFailed(f"POST /v1/instances -> {r.status_code}: {r.text[:300]}")
        return elapsed, view

    def _boot_once(self, image: str) -> tuple[float, subprocess.CompletedProcess]:
        g = self.guest
        wall0, t0 = time.time(), time.perf_counter()
        r = self.eschedule(self.query, image, "--kernel", g["kernel"], "--initrd", g["initrd"],
                           "--cmdline", f"{g['cmdline']} ec.md=http://169.254.169.254:{self.md_port}",
                           "--wait", "--json")
        elapsed = time.perf_counter() - t0
        with contextlib.suppress(ValueError, KeyError):
            uuid = json.loads(r.stdout)["uuid"]
            self.instances.add(uuid)
            self.walls[uuid] = (wall0, wall0 + elapsed)
        return elapsed, r

    def phases(self, uuid: str, view: dict) -> dict[str, float] | None:
        """Where one eschedule boot's time went: its start and exit (ours), the request's created_at
        (written just before the etcd transaction, after the claim), and ecompute's log lines
        (millisecond timestamps), each looked for after the one before (boots run one at a time)."""
        text, pos = self.host.logtext(), 0
        marks = {}
        for what, pattern in STEPS_IN_LOG:
            m = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*" + pattern.format(uuid=re.escape(uuid)),
                           re.M).search(text, pos)
            if not m:
                return None
            pos = m.end()
            marks[what] = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        start, end = self.walls[uuid]
        created = datetime.datetime.fromisoformat(view["created_at"]).timestamp()
        times = [start, created, *marks.values(), end]
        return {name: round(b - a, 4) for name, a, b in zip(STEPS, times[:-1], times[1:], strict=True)}

    def destroy(self, uuid: str) -> None:
        r = self.eschedule("destroy", uuid, "--wait", "--timeout", str(IP_TIMEOUT + 60))
        if r.returncode not in (0, 6):
            raise RuntimeError(f"eschedule destroy {uuid} failed ({r.returncode}): {r.stderr.strip()}")
        self.instances.discard(uuid)

    def destroy_all(self) -> list[str]:
        """eschedule destroy --wait every instance of our prefix (even one whose eschedule timed
        out and never printed its uuid); the errors."""
        uuids = set(self.instances)
        with contextlib.suppress(Exception):
            uuids |= self.store.known_instances()
        return common.destroy_every(uuids, self.destroy)

    # -- direct: the same domain XML through libvirt alone ---------------------------------

    def template(self, view: dict) -> None:
        """Keep what the direct boots need from an instance ecompute built (call while it runs)."""
        dom = self.conn.lookupByUUIDString(view["uuid"])
        self.xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        root = ET.fromstring(self.xml)
        overlay = root.find("devices/disk[@device='disk']/source").get("file")
        cdrom = root.find("devices/disk[@device='cdrom']/source").get("file")
        info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", overlay],
                                         capture_output=True, text=True, check=True).stdout)
        self.base = info.get("full-backing-filename") or info["backing-filename"]
        self.base_format = info.get("backing-filename-format", "qcow2")
        self.size = info["virtual-size"]
        self.direct_dir = self.files / "direct"
        self.direct_dir.mkdir(exist_ok=True)
        self.direct_dir.chmod(0o755)
        self.iso = self.direct_dir / "template.iso"
        shutil.copyfile(cdrom, self.iso)

    def direct_xml(self, uuid: str, overlay: Path, iso: Path, log: Path) -> str:
        ET.register_namespace("ec", XMLNS)
        root = ET.fromstring(self.xml)
        root.find("name").text = f"ecbench-{uuid}"  # not ec-<uuid>: never any ecompute's domain
        root.find("uuid").text = uuid
        meta = root.find("metadata")
        if meta is not None:
            root.remove(meta)
        b = random.randbytes(3)
        root.find("devices/interface/mac").set("address", f"52:54:00:{b[0]:02x}:{b[1]:02x}:{b[2]:02x}")
        root.find("devices/disk[@device='disk']/source").set("file", str(overlay))
        root.find("devices/disk[@device='cdrom']/source").set("file", str(iso))
        serial_log = root.find("devices/serial/log")
        if serial_log is not None:
            serial_log.set("file", str(log))
        return ET.tostring(root, encoding="unicode")

    def boot_direct(self) -> float:
        """define + start the same XML (fresh uuid, MAC, overlay), until libvirt says it runs."""
        uuid = str(uuidlib.uuid4())
        d = self.direct_dir
        overlay, iso, log = d / f"{uuid}.qcow2", d / f"{uuid}.iso", d / f"{uuid}.console.log"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", self.base, "-F", self.base_format,
                        str(overlay), str(self.size)], check=True)
        shutil.copyfile(self.iso, iso)
        xml = self.direct_xml(uuid, overlay, iso, log)
        self.direct.add(uuid)
        t0 = time.perf_counter()
        dom = self.conn.defineXML(xml)
        t1 = time.perf_counter()
        dom.create()
        elapsed = time.perf_counter() - t0
        self.direct_phases.append(dict(zip(DIRECT_STEPS, (t1 - t0, elapsed - (t1 - t0)), strict=True)))
        self.remove_direct(uuid)
        return elapsed

    def remove_direct(self, uuid: str) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            dom = self.conn.lookupByUUIDString(uuid)
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
            dom.undefine()
        for suffix in (".qcow2", ".iso", ".console.log"):
            (self.direct_dir / f"{uuid}{suffix}").unlink(missing_ok=True)
        self.direct.discard(uuid)

    # -- the run -----------------------------------------------------------------------------

    def start_host(self) -> None:
        self.host = common.ecompute(self.info, self.prefix, self.files, "qemu1", uri="qemu:///system",
                                    workers=max(3, self.parallel), md_port=self.md_port,
                                    ip_timeout=IP_TIMEOUT).start()
        say(f"ecompute ready in {self.host.wait_ready():.1f}s")
        # Placement is shared with the other benches (whose providers are down in our prefix):
        # without in_tree the first `limit` candidates may all be theirs.
        self.query = f"{QUERY}&in_tree={self.host.host}"
        self.api_server = ApiServer(self.schedule_yaml, self.files).start()
        token, _ = Operations(load_schedule(str(self.schedule_yaml))).create_token("etcd-compute", Role.MEMBER, "bench")
        self.api.headers["Authorization"] = f"Bearer {token}"

    def serve_guest(self) -> str:
        www = self.files / "www"
        www.mkdir()
        shutil.copyfile(self.guest["disk"], www / "guest.qcow2")
        self.served = Served(www)
        return f"{self.served.url}/guest.qcow2"

    def overhead_and_images(self, url: str) -> list[common.Figure]:
        # First boot on a fresh image cache: downloads the disk (and copies kernel + initrd).
        first, view = self.attempt("first boot", lambda: self.boot(url), fresh_cache=True)
        say(f"first boot from {url} (fresh image cache): {first:.1f}s")
        self.template(view)  # the XML ecompute generated, for the direct boots
        self.destroy(view["uuid"])
        ours, direct, api, ours_phases, api_phases = [], [], [], [], []
        for _ in range(self.reps):  # alternate, so the machine's drift hits all three
            t, view = self.attempt("boot", lambda: self.boot(url))
            ours.append(t)
            ours_phases.append(self.phases(view["uuid"], view))
            gone = common.timed(functools.partial(self.destroy, view["uuid"]))
            direct.append(self.attempt("direct boot", self.boot_direct))
            t, view = self.attempt("boot through the API", lambda: self.boot_api(url))
            api.append(t)
            phases = self.phases(view["uuid"], view)
            api_phases.append({API_STEPS.get(k, k): v for k, v in phases.items()} if phases else None)
            self.destroy(view["uuid"])
            say(f"ours {ours[-1]:.1f}s (destroy --wait {gone:.1f}s), direct {direct[-1]:.1f}s, API {api[-1]:.1f}s")
        second = ours[0]  # the cached second boot from the URL
        startup = [common.timed(lambda: self.eschedule("--help")) for _ in range(1 if self.quick else 3)]
        downloads = self.served.hits.get("/guest.qcow2", 0) if self.served else 0
        overhead = common.median(ours) - common.median(direct)
        api_overhead = common.median(api) - common.median(direct)
        ours_steps, direct_steps = median_phases(ours_phases), median_phases(self.direct_phases)
        api_steps = median_phases(api_phases)
        if ours_steps and direct_steps and api_steps:
            draw_timeline(PICTURE, [("define + start\ndirectly", direct_steps),
                                    ("POST /v1/instances\n(wait)", api_steps), ("eschedule\n--wait", ours_steps)],
                          overhead)
        fetched = re.findall(r"image (http\S+): (\d+) bytes in ([0-9.]+)s", self.host.logtext())
        return [
            common.figure(BENCH, "schedule -> IP in etcd (eschedule --wait)", common.median(ours), "s",
                          common.median(direct), "same XML via libvirt: define+start",
                          target="overhead <= 0.3 s", check=lambda v, r: overhead <= 0.3,
                          overhead_s=round(overhead, 3), overhead_of_minima_s=round(min(ours) - min(direct), 3),
                          paired_diff_s=[round(a - b, 3) for a, b in zip(ours, direct, strict=True)],
                          ours_s=[round(x, 3) for x in ours],
                          direct_s=[round(x, 3) for x in direct],
                          eschedule_cli_startup_s=round(common.median(startup), 3),
                          failed_boots_redone=self.failures, query=self.query,
                          ours_phases_s=ours_steps, direct_phases_s=direct_steps),
            common.figure(BENCH, "boot overhead (median ours - median direct)", overhead, "s",
                          target="<= 0.3 s", check=lambda v, r: v <= 0.3),
            common.figure(BENCH, "schedule -> IP through the API (POST /v1/instances, wait)", common.median(api), "s",
                          common.median(direct), "same XML via libvirt: define+start",
                          target="overhead <= 0.3 s", check=lambda v, r: api_overhead <= 0.3,
                          overhead_s=round(api_overhead, 3),
                          paired_diff_s=[round(a - b, 3) for a, b in zip(api, direct, strict=True)],
                          api_s=[round(x, 3) for x in api], api_phases_s=api_steps),
            common.figure(BENCH, "first boot from URL (download + overlay)", first, "s", second,
                          "second boot, cached image", downloads=downloads,
                          download_in_ecompute_log=[f"{b} bytes in {t}s" for _, b, t in fetched],
                          note="first boot also copies kernel + initrd into the cache; disk is 1 MiB"),
        ]

    def parallel_builds(self, single: float) -> list[common.Figure]:
        n, reps = self.parallel, 1 if self.quick else 2
        walls, each = [], []

        def round_() -> tuple[float, list[tuple[float, dict]]]:
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(n) as pool:
                futures = [pool.submit(self.boot, self.served_url) for _ in range(n)]
            wall = time.perf_counter() - t0  # every one has returned
            return wall, [f.result() for f in futures]  # raises the first BootFailed

        for _ in range(reps):
            wall, results = self.attempt(f"{n} parallel boots", round_)
            walls.append(wall)
            each.append(sorted(round(t, 3) for t, _ in results))
            with concurrent.futures.ThreadPoolExecutor(n) as pool:
                list(pool.map(self.destroy, [view["uuid"] for _, view in results]))
        say(f"{n} parallel builds: {', '.join(f'{w:.1f}s' for w in walls)}")
        return [common.figure(BENCH, f"{n} parallel builds, one host (wall until all have IPs)",
                              common.median(walls), "s", single, "one build (median)",
                              target=f"ratio < {n} (better than serial)",
                              check=lambda v, r: r is not None and r < n, walls_s=[round(w, 3) for w in walls],
                              each_s=each, workers=max(3, n), cores=os.cpu_count(),
                              failed_boots_redone=[f for f in self.failures if "parallel" in f])]

    def overlays(self) -> list[common.Figure]:
        path = self.files / "overlay"
        drv = LibvirtDriver("qemu:///system", "qemu", str(path))
        drv.prepare(None)  # the instances dir and its storage pool
        base, fmt = self.guest["disk"], "qcow2"
        warm = str(uuidlib.uuid4())
        drv.create_disk(warm, base, fmt, 1 << 30)  # connection, pool lookup: not part of the figure
        drv.destroy(warm)
        figures = []
        for gib in (1, 10):
            ours, floor = [], []
            for _ in range(5):
                uuid = str(uuidlib.uuid4())
                ours.append(common.timed(functools.partial(drv.create_disk, uuid, base, fmt, gib << 30)))
                drv.destroy(uuid)
                out = path / f"floor-{uuid}.qcow2"
                floor.append(common.timed(functools.partial(
                    subprocess.run,
                    ["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", fmt, str(out), f"{gib}G"],
                    check=True)))
                out.unlink()
            figures.append(common.figure(
                BENCH, f"overlay create + resize, {gib} GiB (LibvirtDriver.create_disk)",
                common.median(ours) * 1000, "ms", common.median(floor) * 1000, "qemu-img create subprocess",
                ours_ms=[round(x * 1000, 1) for x in ours], floor_ms=[round(x * 1000, 1) for x in floor]))
        return figures

    def run(self) -> list[common.Figure]:
        self.start_host()
        self.served_url = self.serve_guest()
        figures = self.overhead_and_images(self.served_url)
        single = figures[0].value
        figures[3:3] = self.parallel_builds(single)
        figures += self.overlays()
        return figures

    def cleanup(self) -> None:
        errors = self.destroy_all() if self.host is not None else []
        if self.host is not None:
            self.host.stop(timeout=40)
            common.drop_provider(self.placement, self.host.host)
        errors += common.remove_domains(self.conn, self.files)
        common.remove_pools(self.conn, self.files)
        if self.api_server is not None:
            self.api_server.stop()
        if self.served is not None:
            self.served.close()
        self.store.client.delete_prefix(self.prefix + "/")
        self.store.close()
        self.conn.close()
        common.remove_files(self.files)
        if errors:
            say("cleanup: " + "; ".join(errors))


def run(info: dict, quick: bool) -> list[common.Figure]:
    bench = Bench(info, quick)
    try:
        return bench.run()
    finally:
        bench.cleanup()
