"""Storage: instance disks on local qcow2 overlays and in Ceph (RBD clones), in one run (issue 19).

Two ecompute daemons on qemu:///system (TCG), both on the isolated network with a metadata server
of their own, the same inventory: "local" (root disks are qcow2 overlays of the cached image, in
its instances directory) and "rbd" (storage.backend rbd on the bench stack's one-node Ceph,
devstack/ceph.py: root disks are RBD clones of the image imported into the pool once). The guest
is the test guest (kernel + initrd + its 64 MiB qcow2 disk), DISK_GB 1.

1. Schedule → IP: `eschedule QUERY DISK --kernel --initrd --cmdline ... --wait --json`, timed until
   it returns with the IP in etcd, on the local host then on the rbd host, N rounds; the ratio
   rbd / local per round. Both hosts have the image cached (and the pool has it imported) first.
2. First boot of a new image on the rbd host: a copy of the guest disk with 64 KiB of a pattern of
   its own written into it (qemu-io), so its bytes and its name are new: the host copies it into
   its cache, imports it into the pool (qemu-img convert to raw, snapshot, protect, rename) and
   clones it; then the next boot of the same image (in the pool already: a clone). A new image
   each round; the ratio first / cached per round. extra: the build's disk step from ecompute's
   log (build start to "root disk ... cloned").
3. Guest disk writes. The guest booted with `ec.ddwrite=512` (devstack/testguest.py) overwrites the
   first 512 MiB of its disk (a fresh clone) before its network comes up: busybox dd, 4 MiB
   O_DIRECT writes one after another (its block layer may split each into a few requests in
   flight), timed in the guest. Floors, in the same round: `rbd bench --io-type write --io-size 4M
   --io-total 512M --io-pattern seq` on a new 1 GiB image of the same pool with --io-threads 1
   (one write in flight, as dd's) and 16 (rbd bench's default), and with 1 thread on a clone of the
   snapshot the guest's disk is a clone of (whose writes copy the parent's objects up, as the
   guest's do). And the same guest on the local host, whose overlay is opened without
   cache='none' (libvirt's default: the host's page cache takes the writes): what a TCG guest's dd
   reaches when the disk behind it costs next to nothing, the ceiling TCG puts on the guest
   figure. Under TCG every virtio request is emulated: a guest figure near that ceiling says TCG
   is the limit, not RBD; KVM guests would differ.

Boots that fail (ERROR, no IP, timeout) measure nothing: everything scheduled is destroyed and
the round is done again, at most twice; the figure's extra says why (failed_boots_redone).
Everything is removed afterwards: instances (eschedule destroy --wait: their clones and
overlays), the daemons (SIGTERM), their providers and allocations, any domain still using our
files, storage pools, the images this run put into the Ceph pool (the new images, the guest's
image if it was not there before, scratch images), the etcd prefix and the files.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import re
import shutil
import subprocess
import time
import uuid as uuidlib
from pathlib import Path

import libvirt
import yaml

from devstack import ceph as devceph
from devstack import testguest
from devstack.harness import Ecompute, free_port, wait_until
from etcd_compute.rbd import RbdPool, RbdSettings

import common
from common import say

BENCH = "storage"
QUERY = "resources=VCPU:1,MEMORY_MB:256,DISK_GB:1"
IP_TIMEOUT = 90.0  # ecompute's ip_timeout: the test guest gives up DHCP 60 s into its /init
WAIT = 150
WRITE_MIB = 512  # guest and rbd bench alike: a run of 128 MiB took ~0.15 s in rbd bench, too short to time well

libvirt.registerErrorHandler(lambda *a: None, None)


class BootFailed(RuntimeError):
    """A boot that measured nothing: ERROR, no IP, or a timeout."""


def spread(xs: list[float], digits: int = 3) -> dict[str, float]:
    """min / median / max, as the README gives them."""
    return {"min": round(min(xs), digits), "median": round(common.median(xs), digits), "max": round(max(xs), digits)}


def rbd_storage(ceph: devceph.CephInfo) -> dict:
    """compute.yaml's storage section for the stack's Ceph (as tests/test_rbd.py's)."""
    return {"backend": "rbd", "rbd": {"pool": ceph.pool, "ceph_conf": str(ceph.conf), "cluster": ceph.cluster,
                                      "user": ceph.client, "keyring": str(ceph.keyring),
                                      "secret_uuid": ceph.secret_uuid,
                                      "monitors": [f"{h}:{p}" for h, p in ceph.mon_hosts]}}


class Bench:
    def __init__(self, info: dict, quick: bool) -> None:
        self.info, self.quick = info, quick
        self.rounds = 3 if quick else 5  # schedule -> IP
        self.image_rounds = 2 if quick else 3  # first boot of a new image
        self.write_rounds = 2 if quick else 3
        self.prefix = f"/bench-{uuidlib.uuid4().hex[:8]}"
        self.files = common.files_dir(info, self.prefix.strip("/"))
        self.placement, self.store = common.clients(info, self.prefix)
        self.guest = testguest.ensure_guest()  # ec.ddwrite is new: rebuilt if stale
        self.ceph = devceph.ensure_ceph(Path(info["stack"]))
        self.pool = RbdPool(RbdSettings(pool=self.ceph.pool, conf=str(self.ceph.conf), cluster=self.ceph.cluster,
                                        user=self.ceph.client, keyring=str(self.ceph.keyring)))
        self.pool_before = set(self.ls())
        self.hosts: dict[str, Ecompute] = {}
        self.queries: dict[str, str] = {}
        self.md_ports: dict[str, int] = {}
        self.instances: dict[str, str] = {}  # uuid -> host name, scheduled and not yet destroyed
        self.failures: list[str] = []
        self.parent = ""  # pool/image@snapshot the rbd guest's disk is a clone of
        self.conn = libvirt.open("qemu:///system")
        self.schedule_yaml = self.files / "schedule.yaml"
        self.schedule_yaml.write_text(yaml.safe_dump({
            "etcd": {"endpoints": [info["etcd"]], "prefix": self.prefix},
            "placement": {"endpoint": info["placement"]}, "wait_timeout": WAIT, "default_image": None}))

    def ls(self) -> list[str]:
        return self.ceph.rbd("ls", self.ceph.pool).split()

    # -- boots ---------------------------------------------------------------------------------

    def eschedule(self, *args: str, timeout: float = WAIT + 30) -> subprocess.CompletedProcess:
        return subprocess.run([str(common.BIN / "eschedule"), "--config", str(self.schedule_yaml), *args],
                              capture_output=True, text=True, timeout=timeout)

    def boot(self, host: str, image: str, extra: str = "") -> tuple[float, dict]:
        """eschedule ... --wait on `host`: seconds until it returns with the instance ACTIVE and its IP."""
        g = self.guest
        cmdline = f"{g['cmdline']} ec.md=http://169.254.169.254:{self.md_ports[host]} {extra}".strip()
        t0 = time.perf_counter()
        r = self.eschedule(self.queries[host], image, "--kernel", g["kernel"], "--initrd", g["initrd"],
                           "--cmdline", cmdline, "--wait", "--json")
        elapsed = time.perf_counter() - t0
        with contextlib.suppress(ValueError, KeyError):
            self.instances[json.loads(r.stdout)["uuid"]] = host
        if r.returncode != 0:
            raise BootFailed(f"eschedule on {host} exit {r.returncode}: {r.stderr.strip()[-300:]}")
        view = json.loads(r.stdout)
        if view["state"] != "ACTIVE" or not view.get("ip"):
            raise BootFailed(f"{view['uuid']} is {view['state']} without an IP: {view.get('reason')}")
        return elapsed, view

    def attempt(self, what: str, fn):  # noqa: ANN001, ANN201 - fn's result, whatever it is
        """fn(), done again (up to twice) after a BootFailed, everything scheduled destroyed first."""
        for attempt in range(3):
            try:
                return fn()
            except BootFailed as exc:
                self.failures.append(f"{what}: {exc}")
                say(f"{what} failed: {exc}; {'again' if attempt < 2 else 'giving up'}")
                self.destroy_all()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def destroy(self, uuid: str) -> None:
        r = self.eschedule("destroy", uuid, "--wait", "--timeout", str(IP_TIMEOUT + 60))
        if r.returncode not in (0, 6):
            raise RuntimeError(f"eschedule destroy {uuid} failed ({r.returncode}): {r.stderr.strip()}")
        self.instances.pop(uuid, None)

    def destroy_all(self) -> list[str]:
        uuids = set(self.instances)
        with contextlib.suppress(Exception):
            uuids |= self.store.known_instances()
        return common.destroy_every(uuids, self.destroy)

    def console(self, host: str, uuid: str) -> str:
        path = Path(self.hosts[host].cfg["instances_path"]) / f"{uuid}.console.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_time(self, host: str, pattern: str) -> float | None:
        """The timestamp of the first line of `host`'s log matching `pattern`."""
        m = re.search(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*" + pattern, self.hosts[host].logtext(), re.M)
        return datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if m else None

    def disk_step(self, uuid: str) -> float | None:
        """rbd host: seconds from its build's start to its root disk cloned (the import, if any, is in it)."""
        start = self.log_time("rbd", rf"ecompute: build {re.escape(uuid)}")
        cloned = self.log_time("rbd", rf"root disk \S+vm-{re.escape(uuid)} cloned")
        return round(cloned - start, 3) if start and cloned else None

    # -- the run -------------------------------------------------------------------------------

    def start_hosts(self) -> None:
        # Placement is shared with other benches: each query names a trait only our host has (not
        # in_tree, which leaves out the Ceph pool's sharing provider that gives the rbd host's DISK_GB).
        for name, extra in (("local", {}), ("rbd", {"storage": rbd_storage(self.ceph)})):
            trait = f"CUSTOM_BENCH_{self.prefix.strip('/').removeprefix('bench-').upper()}_{name.upper()}"
            self.md_ports[name] = free_port()
            self.hosts[name] = common.ecompute(self.info, self.prefix, self.files, name, uri="qemu:///system",
                                               workers=2, md_port=self.md_ports[name], ip_timeout=IP_TIMEOUT,
                                               traits=[trait], **extra).start()
            self.queries[name] = f"{QUERY}&required={trait}"
        for name, host in self.hosts.items():
            say(f"ecompute {name} ready in {host.wait_ready():.1f}s")

    def schedule_to_ip(self) -> list[common.Figure]:
        disk = self.guest["disk"]
        warm: dict[str, float] = {}
        for name in self.hosts:  # the image in each host's cache (and imported into the pool)
            warm[name], view = self.attempt(f"warm-up on {name}", lambda name=name: self.boot(name, disk))
            self.destroy(view["uuid"])
        say(f"warm-up boots (image into the cache{'' if self.guest_in_pool else ' and the pool'}): "
            f"local {warm['local']:.1f}s, rbd {warm['rbd']:.1f}s")
        local, rbd, rbd_disk = [], [], []
        for _ in range(self.rounds):
            def pair() -> tuple[float, float, dict]:
                t_local, view = self.boot("local", disk)
                self.destroy(view["uuid"])
                t_rbd, view = self.boot("rbd", disk)
                self.destroy(view["uuid"])
                return t_local, t_rbd, view
            t_local, t_rbd, view = self.attempt("schedule -> IP round", pair)
            local.append(t_local)
            rbd.append(t_rbd)
            rbd_disk.append(self.disk_step(view["uuid"]))
            say(f"schedule -> IP: local {t_local:.2f}s, rbd {t_rbd:.2f}s ({t_rbd / t_local:.2f}x)")
        ratios = [b / a for a, b in zip(local, rbd, strict=True)]
        return [common.figure(
            BENCH, "schedule -> IP, rbd clone (eschedule --wait)", common.median(rbd), "s", common.median(local),
            "the same on a local qcow2 overlay", rbd_s=[round(x, 3) for x in rbd],
            local_s=[round(x, 3) for x in local], rbd_s_spread=spread(rbd), local_s_spread=spread(local),
            paired_ratio=spread(ratios), paired_ratios=[round(r, 3) for r in ratios],
            rbd_disk_step_s=rbd_disk, failed_boots_redone=[f for f in self.failures if "round" in f],
            note="paired_ratio: rbd / local per round (each round: local boot, destroy, rbd boot, destroy)")]

    def new_image(self, i: int) -> str:
        """A copy of the guest disk with 64 KiB of a pattern of this run's own: new bytes, new name."""
        d = Path(self.hosts["rbd"].cfg["instances_path"]).parent / "new-images"  # in its image_dirs
        d.mkdir(exist_ok=True)
        path = d / f"guest-{self.prefix.strip('/')}-{i}.qcow2"
        shutil.copyfile(self.guest["disk"], path)
        pattern = (int(self.prefix[-2:], 16) + i) % 255 + 1
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} 60M 64k", str(path)],
                       check=True, capture_output=True)
        return str(path)

    def first_boot(self) -> list[common.Figure]:
        first, cached, first_disk, cached_disk = [], [], [], []
        for i in range(self.image_rounds):
            def pair(i: int = i) -> tuple[float, float, dict, dict]:
                image = self.new_image(i)
                t_first, v1 = self.boot("rbd", image)
                self.destroy(v1["uuid"])
                t_cached, v2 = self.boot("rbd", image)
                self.destroy(v2["uuid"])
                return t_first, t_cached, v1, v2
            t_first, t_cached, v1, v2 = self.attempt("new image round", pair)
            first.append(t_first)
            cached.append(t_cached)
            first_disk.append(self.disk_step(v1["uuid"]))
            cached_disk.append(self.disk_step(v2["uuid"]))
            say(f"new image on rbd: first boot {t_first:.2f}s (disk step {first_disk[-1]}s), "
                f"cached {t_cached:.2f}s (disk step {cached_disk[-1]}s)")
        ratios = [a / b for a, b in zip(first, cached, strict=True)]
        return [common.figure(
            BENCH, "first boot of a new image, rbd host (copy, import, clone)", common.median(first), "s",
            common.median(cached), "next boot of it (in the pool: clone)", first_s=[round(x, 3) for x in first],
            cached_s=[round(x, 3) for x in cached], first_s_spread=spread(first), cached_s_spread=spread(cached),
            paired_ratio=spread(ratios), paired_ratios=[round(r, 3) for r in ratios],
            disk_step_first_s=first_disk, disk_step_cached_s=cached_disk,
            failed_boots_redone=[f for f in self.failures if "new image" in f],
            note="the image is the 64 MiB test guest disk (qcow2, ~1 MiB used); disk step: build start to "
                 "root disk cloned, from ecompute's log")]

    def guest_write(self, host: str) -> float:
        """Boot the guest with ec.ddwrite on `host`: the MiB/s its dd reached. On the rbd host, also
        note the snapshot its disk is a clone of (the clone floor clones it too)."""
        _, view = self.boot(host, self.guest["disk"], f"ec.ddwrite={WRITE_MIB}")
        uuid = view["uuid"]
        if host == "rbd" and not self.parent:
            parent = json.loads(self.ceph.rbd("info", "--format", "json", f"{self.ceph.pool}/vm-{uuid}"))["parent"]
            self.parent = f"{parent['pool']}/{parent['image']}@{parent['snapshot']}"
        found = wait_until(lambda: re.search(r"ECTEST ddwrite_us=(\d+)\s+ECTEST ddwrite_mib=(\d+)",
                                             self.console(host, uuid)), 240, f"the guest's ddwrite on {host}",
                           interval=0.5)
        failed = re.search(r"ECTEST ddwrite_failed=([^\r\n]*)", self.console(host, uuid))
        self.destroy(uuid)
        us, mib = int(found.group(1)), int(found.group(2))
        if failed or mib < WRITE_MIB or us <= 0:
            raise BootFailed(f"the guest's dd on {host}: {failed.group(1) if failed else f'{mib} MiB in {us} us'}")
        return mib / (us / 1e6)

    def rbd_bench(self, threads: int, clone: bool = False) -> float:
        """`rbd bench` writes on a new 1 GiB scratch image of the pool (with `clone`: a clone of the
        snapshot the guest's disk is a clone of, so its writes copy up the parent's objects as the
        guest's do): MiB/s (ops/s x 4 MiB)."""
        name = f"bench-scratch-{uuidlib.uuid4().hex[:8]}"
        if clone:
            self.ceph.rbd("clone", self.parent, f"{self.ceph.pool}/{name}")
            self.ceph.rbd("resize", "--size", "1G", f"{self.ceph.pool}/{name}")
        else:
            self.ceph.rbd("create", "--size", "1G", f"{self.ceph.pool}/{name}")
        try:
            out = self.ceph.rbd("bench", "--io-type", "write", "--io-size", "4M", "--io-total", f"{WRITE_MIB}M",
                                "--io-pattern", "seq", "--io-threads", str(threads), f"{self.ceph.pool}/{name}",
                                timeout=300)
        finally:
            self.pool.remove(name)
        m = re.search(r"elapsed:\s*([\d.]+)\s+ops:\s*(\d+)\s+ops/sec:\s*([\d.]+)", out)
        if not m:
            raise RuntimeError(f"rbd bench said: {out[-300:]}")
        return float(m.group(3)) * 4

    def writes(self) -> list[common.Figure]:
        guest, floor1, floor16, clone1, local = [], [], [], [], []
        for _ in range(self.write_rounds):
            g = self.attempt("guest write on rbd", lambda: self.guest_write("rbd"))
            f1, f16, c1 = self.rbd_bench(1), self.rbd_bench(16), self.rbd_bench(1, clone=True)
            loc = self.attempt("guest write on local", lambda: self.guest_write("local"))
            guest.append(g)
            floor1.append(f1)
            floor16.append(f16)
            clone1.append(c1)
            local.append(loc)
            say(f"writes, MiB/s: guest on rbd {g:.1f}; rbd bench 1 thread {f1:.1f}, 16 threads {f16:.1f}, "
                f"1 thread on a clone {c1:.1f}; guest on local {loc:.1f}")
        note = ("guest: busybox dd of 4 MiB O_DIRECT writes under TCG (every virtio request emulated); "
                "the local guest writes into the host's page cache: the most a TCG guest's dd gets here")
        return [
            common.figure(BENCH, f"guest disk writes on rbd ({WRITE_MIB} MiB, dd 4M oflag=direct)",
                          common.median(guest), "MiB/s", common.median(floor1),
                          "rbd bench write 4M seq, 1 thread, same pool",
                          guest_mib_s=[round(x, 1) for x in guest], guest_spread=spread(guest, 1),
                          floor_mib_s=[round(x, 1) for x in floor1], floor_spread=spread(floor1, 1),
                          paired_ratio=spread([a / b for a, b in zip(guest, floor1, strict=True)]),
                          ratio_to_clone_floor=spread([a / b for a, b in zip(guest, clone1, strict=True)]),
                          failed_boots_redone=[f for f in self.failures if "write" in f], note=note),
            common.figure(BENCH, "rbd bench write 4M seq, 16 threads (its default)", common.median(floor16), "MiB/s",
                          common.median(floor1), "the same, 1 thread", mib_s=[round(x, 1) for x in floor16],
                          spread=spread(floor16, 1),
                          paired_ratio=spread([a / b for a, b in zip(floor16, floor1, strict=True)])),
            common.figure(BENCH, "rbd bench write 4M seq, 1 thread, on a clone of the guest's image",
                          common.median(clone1), "MiB/s", common.median(floor1), "the same on a plain image",
                          mib_s=[round(x, 1) for x in clone1], spread=spread(clone1, 1),
                          paired_ratio=spread([a / b for a, b in zip(clone1, floor1, strict=True)])),
            common.figure(BENCH, f"guest disk writes on a local overlay ({WRITE_MIB} MiB, host page cache)",
                          common.median(local), "MiB/s", common.median(guest), "the same guest on rbd",
                          mib_s=[round(x, 1) for x in local], spread=spread(local, 1),
                          paired_ratio=spread([a / b for a, b in zip(local, guest, strict=True)]), note=note),
        ]

    def run(self) -> list[common.Figure]:
        t0 = time.monotonic()
        load = Path("/proc/loadavg").read_text().split()[:3]
        self.guest_in_pool = any(n.startswith("img-") for n in self.pool_before)
        self.start_hosts()
        figures = self.schedule_to_ip()
        figures += self.first_boot()
        figures += self.writes()
        loads = [load, Path("/proc/loadavg").read_text().split()[:3]]
        for f in figures:
            f.extra["load_average_start_end"] = loads
            f.extra["bench_seconds"] = round(time.monotonic() - t0)
        return figures

    def cleanup(self) -> None:
        errors = self.destroy_all() if self.hosts else []
        pools: set[str] = set()
        with contextlib.suppress(Exception):
            pools = set(self.store.pools())  # the Ceph pool's sharing provider, which the rbd host made
        for host in self.hosts.values():
            host.stop(timeout=40)
            common.drop_provider(self.placement, host.host)
        for pool in pools:
            common.drop_provider(self.placement, pool)
        errors += common.remove_domains(self.conn, self.files)
        common.remove_pools(self.conn, self.files)
        # What this run put into the pool: clones left by a failed destroy first, then the images.
        with contextlib.suppress(Exception):
            made = sorted(set(self.ls()) - self.pool_before, key=lambda n: not n.startswith("vm-"))
            for name in made:
                try:
                    self.pool.remove(name)
                except Exception as exc:  # noqa: BLE001 - keep cleaning
                    errors.append(f"rbd rm {name}: {exc}")
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
