"""Ceph for the local stack: one monitor, one manager and one OSD (BlueStore on a sparse file), pool size 1.

Issue 19 puts instance disks and volumes on RBD; the tests and `python3 -m devstack up --ceph` need a
real cluster on this one machine, from Debian's packages (ceph 16.2 Pacific), started by hand (no
systemd here). Everything of a stack's cluster lives under `<stack>/ceph/`: ceph.conf, keyrings,
the monitor's store, the OSD's 12 GiB sparse file, logs, pids and admin sockets. Two stacks on one
machine never meet: each has its own cluster name and fsid, its own block of loopback ports (kept in
its ceph.conf: a monitor's address is part of its store) and, on a shared libvirtd, a libvirt secret
and an rbd storage pool named after the stack.

`ensure_ceph()` is idempotent (a healthy cluster costs one `ceph status`; daemons gone after a reboot
are started again on their data) and returns a `CephInfo`: what a host's rbd backend needs (ceph.conf,
the cephx client and its keyring, the pool, the libvirt secret) and the client-side operations the
tests use (rbd, qemu-img URLs, watchers, blocklists). Standard library only, like localstack.py: it
runs before the venv exists; the ceph, rbd and virsh command-line tools do the talking.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from devstack import localstack

CLIENT = "etcd-compute"  # the cephx user of the compute hosts (client.etcd-compute)
LIBVIRT_URI = "qemu:///system"  # the machine's libvirtd
OSD_FILE_BYTES = 12 << 30  # sparse: BlueStore writes only what is used
# Every port of one stack: the monitor's v2 and v1 ports, then what the manager and the OSD bind
# (`ms bind port min/max`: the OSD alone takes 8 with msgr v1 and v2).
PORT_BLOCK = 32
# Between the local stacks' etcd (12379+) and Placement (18778+) ports and under the range the test
# harness picks free ports from (20000+), so a test's server never takes a stopped monitor's port.
PORT_RANGE = range(13000, 18000 - PORT_BLOCK, PORT_BLOCK)
HEALTH_TIMEOUT = 180.0  # a loaded 2-core machine: HEALTH_OK came 16-23 s after bootstrap when idle
CLI_TIMEOUT = 60.0
POOL_PGS = 32  # of the pool: fixed (no autoscaler), a power of two, well under 250 per OSD
DAEMONS = ("mon", "mgr", "osd")


class CephError(localstack.StackError):
    """A Ceph step failed; the message says which and carries the output or the log tail."""


@dataclass(frozen=True)
class CephInfo:
    """One stack's Ceph cluster as a compute host's rbd backend and the tests see it.

    A host needs `conf`, `client` and `keyring` (or only the key, in the libvirt secret `secret_uuid`,
    for QEMU), and `pool`. `mon_hosts` are the monitors' msgr v1 addresses, for libvirt's
    `<host name= port=>` (a bare address with a port other than 3300 is read as v1).
    """

    dir: Path  # <stack>/ceph
    cluster: str  # the cluster name (its daemons' admin sockets and logs are named after it)
    fsid: str
    conf: Path  # ceph.conf: monitors and, per client section, the keyring
    client: str  # cephx user id without "client.": etcd-compute
    keyring: Path  # that client's keyring
    admin_keyring: Path  # client.admin's: health, blocklist ls/rm (devstack and tests only)
    pool: str  # the RBD pool of instance disks and volumes: ec-vms-<tag>
    mon_hosts: tuple[tuple[str, int], ...]
    secret_uuid: str  # the libvirt secret (usage type ceph) holding the client's key
    secret_usage: str  # its usage name, unique per stack on a shared libvirtd
    libvirt_pool: str  # the name of the rbd storage pool on a libvirtd: ec-rbd-<tag>

    # -- what the backend and the tests run -------------------------------------------------

    def args(self, admin: bool = False) -> list[str]:
        """Options every Ceph tool (ceph, rbd, rados) takes: the cluster, its conf, the cephx user and keyring."""
        user, keyring = ("admin", self.admin_keyring) if admin else (self.client, self.keyring)
        return ["--cluster", self.cluster, "--conf", str(self.conf), "--id", user, "--keyring", str(keyring)]

    def run(self, tool: str, *args: str, admin: bool = False, timeout: float = CLI_TIMEOUT) -> str:
        """`tool` (ceph, rbd, rados) with this cluster's options; its stdout, CephError on failure."""
        return _run([tool, *self.args(admin), *args], timeout)

    def rbd(self, *args: str, timeout: float = CLI_TIMEOUT) -> str:
        """The rbd CLI as the compute client (the Python bindings import only under /usr/bin/python3)."""
        return self.run("rbd", *args, timeout=timeout)

    def ceph(self, *args: str, admin: bool = True, timeout: float = CLI_TIMEOUT) -> str:
        return self.run("ceph", *args, admin=admin, timeout=timeout)

    def qemu_url(self, image: str) -> str:
        """`rbd:<pool>/<image>:...` for qemu-img and qemu-io, with the client and keyring named: with a
        cluster name other than "ceph" nothing else finds them."""
        return f"rbd:{self.pool}/{image}:id={self.client}:conf={self.conf}:keyring={self.keyring}"

    def key(self) -> str:
        """The client's cephx key (base64), as its keyring holds it."""
        return _keyring_key(self.keyring)

    # -- fencing -----------------------------------------------------------------------------

    def watchers(self, image: str) -> list[str]:
        """The client addresses (`ip:port/nonce`) that have `image` open: a running QEMU is one.

        RBD's exclusive lock does not fence (a second writer got in within 0.11 s): blocklisting a
        watcher's address does. On a real cluster each host has its own IP, and blocklisting
        `<ip>:0/0` fences every client of that host at once; here every client is 127.0.0.1, so
        only a client's own address fences just that client.
        """
        out = json.loads(self.rbd("status", "--format", "json", f"{self.pool}/{image}") or "{}")
        return [w["address"] for w in out.get("watchers", [])]

    def blocklist(self, address: str, expire: float | None = None) -> None:
        """`ceph osd blocklist add ADDRESS [EXPIRE seconds]`, as the compute client (its caps allow it): the
        OSDs refuse that client from the next map on; its QEMU gets I/O errors (pauses with
        error_policy='stop') and never recovers. Without EXPIRE the entry lasts an hour."""
        self.ceph("osd", "blocklist", "add", address, *([f"{expire:g}"] if expire else []), admin=False)

    def unblocklist(self, address: str) -> None:
        self.ceph("osd", "blocklist", "rm", address, admin=False)

    def blocklisted(self) -> list[str]:
        """The addresses on the blocklist (each until its expiry)."""
        # Pacific prints two JSON lists here, the addresses' and the ranges' ("[][]"): read the first.
        listed = self.ceph("osd", "blocklist", "ls", "--format", "json", admin=False).strip()
        out, _ = json.JSONDecoder().raw_decode(listed)
        return [e["addr"] for e in out]

    # -- libvirt -----------------------------------------------------------------------------

    def define_libvirt(self, uri: str = LIBVIRT_URI) -> None:
        """The secret (with the client's key) and the rbd storage pool on the libvirtd at `uri`; idempotent.

        Another libvirt host on this machine (devstack/libvirthost.py) takes the same calls with its
        own URI: it reaches the monitor on 127.0.0.1 like the machine's libvirtd does.
        """
        ensure_libvirt_secret(self, uri)
        ensure_libvirt_pool(self, uri)

    def undefine_libvirt(self, uri: str = LIBVIRT_URI) -> None:
        """Remove this stack's rbd pool and secret from the libvirtd at `uri` (gone already: fine)."""
        _virsh(uri, "pool-destroy", self.libvirt_pool, check=False)
        _virsh(uri, "pool-undefine", self.libvirt_pool, check=False)
        _virsh(uri, "secret-undefine", self.secret_uuid, check=False)

    def to_json(self) -> str:
        return json.dumps({k: str(v) if isinstance(v, Path) else v
                           for k, v in dataclasses.asdict(self).items()}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> CephInfo:
        raw = json.loads(text)
        paths = {f.name for f in dataclasses.fields(cls) if f.type == "Path"}
        raw = {k: Path(v) if k in paths else v for k, v in raw.items()}
        raw["mon_hosts"] = tuple((h, int(p)) for h, p in raw["mon_hosts"])
        return cls(**raw)


# ---------------------------------------------------------------- small helpers

def _run(cmd: Sequence[str | Path], timeout: float = CLI_TIMEOUT) -> str:
    try:
        p = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise CephError(f"{' '.join(map(str, cmd[:8]))} ...: no answer in {timeout:.0f} s") from e
    if p.returncode != 0:
        raise CephError(f"{' '.join(map(str, cmd))} failed (exit {p.returncode}): "
                        f"{(p.stderr or p.stdout).strip()[-1500:]}")
    return p.stdout


def _virsh(uri: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(["virsh", "-q", "-c", uri, *args], capture_output=True, text=True, timeout=CLI_TIMEOUT,
                       stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise CephError(f"virsh -c {uri} {' '.join(args)}: {p.stderr.strip()}")
    return p


def new_key() -> str:
    """A cephx key as `ceph-authtool --gen-print-key` prints it: base64 of type 1 (AES), the creation
    time (seconds, nanoseconds) and 16 random bytes with their length."""
    return base64.b64encode(struct.pack("<HIIH", 1, int(time.time()), 0, 16) + os.urandom(16)).decode()


def _keyring(entity: str, key: str, caps: dict[str, str]) -> str:
    return f"[{entity}]\n\tkey = {key}\n" + "".join(f'\tcaps {k} = "{v}"\n' for k, v in caps.items())


def _keyring_key(path: Path) -> str:
    for line in path.read_text().splitlines():
        name, _, value = line.partition("=")
        if name.strip() == "key":
            return value.strip()
    raise CephError(f"{path}: no key")


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)


def _ports_free(base: int) -> bool:
    for port in range(base, base + PORT_BLOCK):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def pick_ports(tag: str) -> int:
    """The first port of a free block for a new cluster: $ECOMPUTE_CEPH_PORT, else one picked by the
    stack's tag (stable, so two stacks rarely even try the same block) and probed free."""
    if os.environ.get("ECOMPUTE_CEPH_PORT"):
        return int(os.environ["ECOMPUTE_CEPH_PORT"])
    blocks = list(PORT_RANGE)
    start = int(tag, 16) % len(blocks)
    for base in blocks[start:] + blocks[:start]:
        if _ports_free(base):
            return base
    raise CephError(f"no {PORT_BLOCK} free loopback ports in {PORT_RANGE.start}-{PORT_RANGE.stop}")


def ceph_dir(stack: Path | None = None) -> Path:
    return Path(stack or localstack.services_dir()).resolve() / "ceph"


def _tag(d: Path) -> str:
    return hashlib.sha256(str(d).encode()).hexdigest()[:8]


def _say(msg: str) -> None:
    localstack.say(f"ceph: {msg}")


# ---------------------------------------------------------------- bootstrap

def _conf(d: Path, fsid: str, base: int) -> str:
    """ceph.conf of a one-node cluster; the comments say what goes wrong without a setting."""
    logs = d / "logs"
    return f"""\
# A one-node Ceph of the etcd-compute local stack (devstack/ceph.py). No `keyring` line in [global]:
# it breaks the daemons (each reads its own keyring); clients find theirs in their sections below.
[global]
fsid = {fsid}
mon initial members = a
mon host = [v2:127.0.0.1:{base},v1:127.0.0.1:{base + 1}]
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
# Pacific warns (HEALTH_WARN AUTH_INSECURE_GLOBAL_ID_RECLAIM_ALLOWED) while this is allowed; every
# client here is new enough not to need it.
auth allow insecure global id reclaim = false
ms bind port min = {base + 2}
ms bind port max = {base + PORT_BLOCK - 1}
run dir = {d / "run"}
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
# One OSD: "no replicas configured" is the point, not a warning.
mon warn on pool no redundancy = false
# A fixed pg_num (POOL_PGS): no autoscaler changing PGs, and peering them, while tests run.
osd pool default pg autoscale mode = off
# The monitor warns below 30 % free space on its disk, which the shared disk here has not:
# HEALTH_OK would never come.
mon data avail warn = 5
mon data avail crit = 1
# Else the cluster log goes to /var/log/ceph, shared by every stack.
mon cluster log file = {logs}/$cluster.$channel.log

[mon]
mon data = {d}/mon/$cluster-$id
log file = {logs}/$cluster-$name.log
public addr = 127.0.0.1

[mgr]
mgr data = {d}/mgr/$cluster-$id
keyring = {d}/mgr/$cluster-$id/keyring
log file = {logs}/$cluster-$name.log
public addr = 127.0.0.1

[osd]
osd data = {d}/osd/$cluster-$id
keyring = {d}/osd/$cluster-$id/keyring
log file = {logs}/$cluster-$name.log
public addr = 127.0.0.1
cluster addr = 127.0.0.1
osd objectstore = bluestore
# Not <osd data>/block: ceph-osd --mkfs makes that a symlink to this path ("Too many levels of
# symbolic links" when it is the same file).
bluestore block path = {d}/disk/$cluster-$id.img
bluestore block create = true
bluestore block size = {OSD_FILE_BYTES}
# The smallest target: a test cluster, on a machine shared with QEMU guests.
osd memory target = 939524096

# The clients' keyrings, per client: the tools find them from the conf alone.
[client.admin]
keyring = {d}/client.admin.keyring

[client.{CLIENT}]
keyring = {d}/client.{CLIENT}.keyring
"""


def _caps(pool: str) -> dict[str, dict[str, str]]:
    """The cephx entities made at bootstrap and their caps. The compute client may use its pool,
    and blocklist (its mon profile rbd allows `blocklist add`; ls and rm are granted here too):
    evacuation fences a dead host's clients before it opens their images elsewhere. Quotes inside a
    cap are single: the keyring wraps each in double quotes, and one inside makes the monitor's
    mkfs fail on "Malformed input"."""
    return {
        "mon.": {"mon": "allow *"},
        "client.admin": {"mon": "allow *", "osd": "allow *", "mds": "allow *", "mgr": "allow *"},
        "mgr.a": {"mon": "allow profile mgr", "osd": "allow *", "mds": "allow *"},
        "osd.0": {"mon": "allow profile osd", "mgr": "allow profile osd", "osd": "allow *"},
        f"client.{CLIENT}": {"mon": "profile rbd, allow command 'osd blocklist'",
                             "osd": f"profile rbd pool={pool}", "mgr": f"profile rbd pool={pool}"},
    }


def _daemon_cmd(info: CephInfo, kind: str) -> list[str]:
    """-f: in the foreground (we keep its pid and its output), logging to its log file."""
    return [f"ceph-{kind}", "--cluster", info.cluster, "--conf", str(info.conf), "-i", _DAEMON_ID[kind], "-f"]


_DAEMON_ID = {"mon": "a", "mgr": "a", "osd": "0"}


def _match(info: CephInfo, kind: str) -> str:
    """What a daemon's command line holds, and no other stack's: binary and cluster name."""
    return f"ceph-{kind} --cluster {info.cluster} "


def _alive(info: CephInfo, kind: str) -> bool:
    pid = localstack.read_pid(info.dir, kind)
    return pid is not None and localstack.pid_alive(pid, _match(info, kind))


def _start(info: CephInfo, kind: str) -> subprocess.Popen[bytes]:
    localstack.stop(info.dir, kind, _match(info, kind))  # a hung leftover of ours
    return localstack.spawn(info.dir, kind, _daemon_cmd(info, kind))


def _bootstrap(d: Path) -> tuple[CephInfo, dict[str, subprocess.Popen[bytes]]]:
    """A new cluster in the (empty) dir `d`: keys, conf, monitor store, manager, OSD, pool; the
    cluster and its daemons' processes.

    The keys are made here and handed to the monitor's store at mkfs, every entity with its caps:
    no `ceph auth` round trips after. Most of the time goes to the OSD's boot and first peering
    (`rbd pool init` waits for them) and to the manager's first PG report: 13-55 s (median 18 s,
    7 runs) measured here from an empty dir to usable, on 2 cores under a load average of 5-32.
    """
    tag = _tag(d)
    base = pick_ports(tag)
    pool = f"ec-vms-{tag}"
    info = CephInfo(
        dir=d, cluster=f"ec{tag}", fsid=str(uuidlib.uuid4()), conf=d / "ceph.conf", client=CLIENT,
        keyring=d / f"client.{CLIENT}.keyring", admin_keyring=d / "client.admin.keyring", pool=pool,
        mon_hosts=(("127.0.0.1", base + 1),),
        secret_uuid=str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"etcd-compute-ceph:{d}")),
        secret_usage=f"ec-ceph-{tag} client.{CLIENT}", libvirt_pool=f"ec-rbd-{tag}")
    for sub in ("logs", "run", "disk", "mon", f"mgr/{info.cluster}-a", f"osd/{info.cluster}-0"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    info.conf.write_text(_conf(d, info.fsid, base))
    keys = {entity: new_key() for entity in _caps(pool)}
    _write_private(d / "mon.keyring", "".join(_keyring(e, keys[e], c) for e, c in _caps(pool).items()))
    for entity, path in (("client.admin", info.admin_keyring), (f"client.{CLIENT}", info.keyring),
                         ("mgr.a", d / f"mgr/{info.cluster}-a/keyring"),
                         ("osd.0", d / f"osd/{info.cluster}-0/keyring")):
        _write_private(path, _keyring(entity, keys[entity], {}))
    log = d / "logs" / "bootstrap.log"
    localstack.run_logged(["monmaptool", "--create", "--fsid", info.fsid, "--enable-all-features",
                           "--set-min-mon-release", "pacific", "--addv", "a",
                           f"[v2:127.0.0.1:{base},v1:127.0.0.1:{base + 1}]", d / "monmap"], log, "monmaptool")
    localstack.run_logged(["ceph-mon", "--cluster", info.cluster, "--conf", info.conf, "--mkfs", "-i", "a",
                           "--monmap", d / "monmap", "--keyring", d / "mon.keyring"], log, "ceph-mon --mkfs")
    procs = {"mon": _start(info, "mon"), "mgr": _start(info, "mgr")}  # the manager waits for the monitor
    osd_uuid = str(uuidlib.uuid4())
    info.ceph("osd", "new", osd_uuid, "0")  # the first call also waits for the monitor's quorum
    localstack.run_logged(["ceph-osd", "--cluster", info.cluster, "--conf", info.conf, "-i", "0", "--mkfs",
                           "--osd-uuid", osd_uuid], log, "ceph-osd --mkfs")
    procs["osd"] = _start(info, "osd")
    info.ceph("osd", "pool", "create", pool, str(POOL_PGS), str(POOL_PGS), "replicated", "--autoscale-mode", "off")
    # As admin: as a client with `profile rbd` it exits 0 without enabling the rbd application, and
    # HEALTH_WARN POOL_APP_NOT_ENABLED comes once the pool holds objects.
    info.run("rbd", "pool", "init", pool, admin=True)
    (d / "info.json").write_text(info.to_json())  # last: its presence says the bootstrap completed
    return info, procs


def load(stack: Path | None = None) -> CephInfo | None:
    """The stack's cluster as bootstrapped (None if it never completed); starts nothing."""
    try:
        return CephInfo.from_json((ceph_dir(stack) / "info.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _wipe(d: Path) -> None:
    """Stop what runs of the cluster in `d` and remove its files (its lock excepted)."""
    _stop_daemons(d)
    for entry in d.iterdir() if d.exists() else []:
        if entry.name != "run":
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    for entry in (d / "run").iterdir() if (d / "run").exists() else []:
        if entry.name != "lock":
            entry.unlink()


def _stop_daemons(d: Path) -> list[str]:
    """SIGTERM (then SIGKILL) the OSD, manager and monitor of the cluster in `d`; the ones stopped."""
    info = CephInfo.from_json((d / "info.json").read_text()) if (d / "info.json").exists() else None
    stopped = []
    for kind in reversed(DAEMONS):  # the OSD first, while the monitor can still hear it go
        match = _match(info, kind) if info else f"ceph-{kind} --cluster ec{_tag(d)} "
        if localstack.stop(d, kind, match):
            stopped.append(kind)
    return stopped


# ---------------------------------------------------------------- health

def cluster_status(info: CephInfo, timeout: float = 10.0) -> dict:
    """`ceph status` as JSON; {"health": {"status": "NO_ANSWER"}} if no monitor answered within `timeout`."""
    try:
        out = info.run("ceph", "--connect-timeout", f"{timeout:g}", "status", "--format", "json", admin=True,
                       timeout=timeout + 10)
        return dict(json.loads(out))
    except (CephError, ValueError) as e:
        return {"health": {"status": "NO_ANSWER", "error": str(e)[-300:]}}


def unusable(st: dict) -> str | None:
    """Why a cluster with this `ceph status` is not ready for disks yet; None if it is.

    HEALTH_OK alone is not enough: right after a bootstrap or a restart the manager has no PG
    states yet and says OK over an OSD that is not even up (seen 3 s into a bootstrap).
    """
    health = st.get("health", {})
    if health.get("status") != "HEALTH_OK":
        return f"{health.get('status')}: {', '.join(health.get('checks', {})) or health.get('error', '')}"
    osds, pgs = st.get("osdmap", {}), st.get("pgmap", {})
    if osds.get("num_up_osds") != 1:
        return f"{osds.get('num_up_osds')} of {osds.get('num_osds')} OSDs up"
    if not st.get("mgrmap", {}).get("available"):
        return "no active manager"
    states = {s["state_name"]: s["count"] for s in pgs.get("pgs_by_state", [])}
    if pgs.get("num_pgs", 0) < POOL_PGS or set(states) != {"active+clean"}:
        return f"PGs {states or 'unknown'}"
    return None


def wait_usable(info: CephInfo, timeout: float = HEALTH_TIMEOUT,
                procs: dict[str, subprocess.Popen[bytes]] | None = None) -> float:
    """Wait until the cluster is healthy and its pool answers I/O, failing at once if a daemon of
    ours died; the seconds waited.

    The daemons started just now are watched through `procs`, not their command line: right after
    exec /proc/PID/cmdline can still be empty (Popen returns once close-on-exec closed its pipe,
    before the kernel has set the new arguments): one start here reported an OSD that ran on as
    dead within a second, most likely so (not reproduced in 3 x 4 s of polling since).
    """
    t0 = time.monotonic()
    procs = procs or {}
    while True:
        for kind in DAEMONS:
            if procs[kind].poll() is not None if kind in procs else not _alive(info, kind):
                logs = [info.dir / "logs" / f"{info.cluster}-{kind}.{_DAEMON_ID[kind]}.log",
                        info.dir / "logs" / f"{kind}.log"]
                raise CephError(f"ceph-{kind} is not running; " + "\n".join(
                    f"last lines of {log}:\n{localstack.tail(log, 15)}" for log in logs))
        why = unusable(cluster_status(info))
        if why is None:
            # One object read of the pool: blocks until its PG is active on the OSD, which the
            # manager's (possibly stale) PG states do not prove.
            info.rbd("ls", info.pool, timeout=max(10.0, timeout - (time.monotonic() - t0)))
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise CephError(f"not usable after {timeout:.0f} s: {why}")
        time.sleep(1.0)


def running(info: CephInfo) -> dict[str, int | None]:
    """The pid of each daemon of ours that runs (None: not running)."""
    return {kind: localstack.read_pid(info.dir, kind) if _alive(info, kind) else None for kind in DAEMONS}


# ---------------------------------------------------------------- libvirt

def rbd_supported(uri: str) -> bool:
    """Does the libvirtd at `uri` have its rbd storage backend? It loads backends only at start."""
    caps = _virsh(uri, "pool-capabilities", check=False).stdout
    return "<pool type='rbd' supported='yes'>" in caps


RBD_BACKEND = Path("/usr/lib/x86_64-linux-gnu/libvirt/storage-backend/libvirt_storage_backend_rbd.so")


def ensure_libvirt_rbd(stack: Path) -> None:
    """Make the machine's libvirtd load its rbd storage backend: restart it if it started before
    `libvirt-daemon-driver-storage-rbd` was installed (libvirtd loads backends only at start).

    A restart is what every user of the machine's libvirtd sees: running domains (QEMU) go on
    untouched, transient pools and networks are restored from /run, and open connections drop (the
    driver reconnects). Only a libvirtd that lacks the backend while it is installed is restarted,
    once per machine; a fresh machine installs it before libvirtd first starts.
    """
    if rbd_supported(LIBVIRT_URI):
        return
    if not RBD_BACKEND.exists():
        raise CephError("libvirt's rbd storage backend is missing: run `python3 -m devstack install`")
    try:
        pid = int(Path("/run/libvirtd.pid").read_text().strip())
    except (OSError, ValueError) as e:
        raise CephError("the machine's libvirtd lacks its rbd backend and /run/libvirtd.pid names none to "
                        "restart") from e
    # The new libvirtd (and every QEMU it starts) inherits our priority: give it the old one's,
    # not that of a `nice`d devstack run.
    niceness = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
    _say(f"restarting the machine's libvirtd (pid {pid}) to load its rbd storage backend")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while localstack.pid_alive(pid, "libvirtd"):
        if time.monotonic() > deadline:
            raise CephError(f"libvirtd (pid {pid}) did not stop within 30 s")
        time.sleep(0.05)
    (stack / "logs").mkdir(parents=True, exist_ok=True)
    with (stack / "logs" / "libvirt.log").open("a") as out:
        subprocess.run(["libvirtd", "-d"], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                       preexec_fn=lambda: os.setpriority(os.PRIO_PROCESS, 0, niceness))
    localstack.wait_for(lambda: localstack.sock_ok(localstack.LIBVIRT_SOCK), "libvirtd", stack / "logs" / "libvirt.log")
    if not rbd_supported(LIBVIRT_URI):
        raise CephError("libvirtd restarted and still has no rbd storage backend")
    _say("libvirtd restarted with its rbd storage backend")


def ensure_libvirt_secret(info: CephInfo, uri: str) -> None:
    """The client's key in a libvirt secret (persistent: it outlives a libvirtd restart; `down` removes it).

    The value goes in base64 without --plain: virsh decodes it to the key's bytes, which libvirt
    hands QEMU in base64 again. With --plain the pool fails with a misleading "No such file or directory".
    A private secret's value cannot be read back to compare: it is set each time (a new bootstrap of
    the stack makes new keys under the same secret uuid).
    """
    xml = (f"<secret ephemeral='no' private='yes'><uuid>{info.secret_uuid}</uuid>"
           f"<usage type='ceph'><name>{info.secret_usage}</name></usage></secret>")
    with tempfile.TemporaryDirectory(prefix="ec-ceph-") as tmp:
        (Path(tmp) / "secret.xml").write_text(xml)
        _write_private(Path(tmp) / "key", info.key())
        _virsh(uri, "secret-define", str(Path(tmp) / "secret.xml"))
        _virsh(uri, "secret-set-value", info.secret_uuid, "--file", str(Path(tmp) / "key"))


def libvirt_pool_xml(info: CephInfo) -> str:
    hosts = "".join(f"<host name='{h}' port='{p}'/>" for h, p in info.mon_hosts)
    return (f"<pool type='rbd'><name>{info.libvirt_pool}</name><source><name>{info.pool}</name>{hosts}"
            f"<auth type='ceph' username='{info.client}'><secret uuid='{info.secret_uuid}'/></auth></source></pool>")


def ensure_libvirt_pool(info: CephInfo, uri: str) -> None:
    """The rbd storage pool, transient like the driver's dir pools (a libvirtd restart may drop it:
    this makes it again). It lists the pool's images; it cannot upload to them (vol-upload is not
    supported on rbd) nor snapshot them: images go in with qemu-img, snapshots through rbd."""
    state = _virsh(uri, "pool-info", info.libvirt_pool, check=False)
    if state.returncode == 0:
        if "running" in state.stdout:
            return
        _virsh(uri, "pool-start", info.libvirt_pool)
        return
    if not rbd_supported(uri):
        raise CephError(f"the libvirtd at {uri} has no rbd storage backend: it started before "
                        "libvirt-daemon-driver-storage-rbd was installed; restart it")
    with tempfile.TemporaryDirectory(prefix="ec-ceph-") as tmp:
        (Path(tmp) / "pool.xml").write_text(libvirt_pool_xml(info))
        p = _virsh(uri, "pool-create", str(Path(tmp) / "pool.xml"), check=False)
    if p.returncode != 0 and _virsh(uri, "pool-info", info.libvirt_pool, check=False).returncode != 0:
        raise CephError(f"virsh -c {uri} pool-create ({info.libvirt_pool}): {p.stderr.strip()}")


# ---------------------------------------------------------------- the stack's entry points

def ensure_ceph(stack: Path | None = None, *, timeout: float = HEALTH_TIMEOUT) -> CephInfo:
    """The stack's Ceph, healthy, with its libvirt secret and rbd pool on the machine's libvirtd.

    Bootstraps a cluster if none completed (what a killed bootstrap left is wiped first), starts the
    daemons that do not run (after a reboot: same data, same ports), then waits until it is healthy
    and its pool answers. Installs nothing: `python3 -m devstack install` did.
    """
    stack = Path(stack or localstack.services_dir()).resolve()
    d = ceph_dir(stack)
    (d / "run").mkdir(parents=True, exist_ok=True)
    with localstack.locked(d):
        t0 = time.monotonic()
        info = load(stack)
        if info is None:
            if not shutil.which("ceph-mon") or not shutil.which("rbd"):
                raise CephError("Ceph is not installed: run `python3 -m devstack install`")
            _wipe(d)
            _say(f"bootstrapping a cluster in {d}")
            info, procs = _bootstrap(d)
            wait_usable(info, timeout, procs)
            _say(f"usable {time.monotonic() - t0:.1f} s after bootstrap ({info.cluster}, pool {info.pool})")
        elif all(running(info).values()) and unusable(cluster_status(info)) is None:
            _say(f"healthy ({info.cluster}, pool {info.pool})")
        else:
            procs = {kind: _start(info, kind) for kind in DAEMONS if not _alive(info, kind)}
            wait_usable(info, timeout, procs)
            _say(f"started {', '.join(procs) or 'nothing'}; usable {time.monotonic() - t0:.1f} s later")
        ensure_libvirt_rbd(stack)
        info.define_libvirt(LIBVIRT_URI)
    return info


def stop_ceph(stack: Path | None = None) -> None:
    """Stop the stack's daemons (data kept) and remove its secret and pool from the machine's libvirtd."""
    d = ceph_dir(stack)
    if not d.exists():
        return
    with localstack.locked(d):
        info = load(stack)
        if info is not None:
            info.undefine_libvirt(LIBVIRT_URI)
        stopped = _stop_daemons(d)
    _say(f"stopped {', '.join(stopped)}" if stopped else "not running (of ours)")


def wipe_ceph(stack: Path | None = None) -> None:
    """Stop the stack's cluster and remove all its data: the next ensure_ceph() bootstraps anew."""
    stop_ceph(stack)
    d = ceph_dir(stack)
    if d.exists():
        with localstack.locked(d):
            _wipe(d)
        _say(f"wiped {d}")


def status(stack: Path | None = None) -> int:
    """One line: the daemons of ours that run and the cluster's health; 0 if healthy or never made."""
    info = load(stack)
    if info is None:
        localstack.say(f"{'ceph':9} not bootstrapped (`up --ceph` makes it)")
        return 0
    pids = running(info)
    why = unusable(cluster_status(info, timeout=5)) if any(pids.values()) else "not running"
    procs = ", ".join(f"{k} {p}" if p else f"{k} DOWN" for k, p in pids.items())
    localstack.say(f"{'ceph':9} {procs}; {why or 'healthy'} ({info.cluster}, pool {info.pool}, "
                   f"mon {info.mon_hosts[0][0]}:{info.mon_hosts[0][1]})")
    return 0 if why is None else 1

