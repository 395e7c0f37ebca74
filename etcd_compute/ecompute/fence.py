"""The fence: a host that cannot prove its etcd lease stops every domain it runs, before
anyone may start those instances elsewhere.

The daemon (liveness.py) proves the host's lease by refreshing it, and after each refresh
that etcd answered it writes a *proof* beside the instances directory: until which
moment (CLOCK_MONOTONIC, one clock for every process of the machine) the lease is
certain to hold, minus a margin, and under which *epoch* (the number of times the host
has had to claim its lease anew). The fence is a small process of its own that reads
that file ten times a second and, whenever the moment has passed, stops every domain of
the host at once: it SIGKILLs their QEMU processes (found through libvirt's pid files,
so a hung libvirtd cannot hold it up) and then has libvirt destroy them. It keeps doing
so while the proof is lapsed, so a domain started late by a worker that had not heard
of it goes too. The daemon's workers also read the proof and refuse to start a domain
for a job of an older epoch or once the proof has lapsed.

The fence runs apart from the daemon, in a session of its own (a unit of its own under
systemd: ecompute-fence.service), so it holds when the daemon's threads are stuck, when
the daemon is SIGSTOPped, SIGKILLed or crashes, and when etcd blackholes: none of these
refreshes the proof. The daemon starts one if none runs and restarts one that died or
stopped beating (its heartbeat file).

Timing. Let T be lease_ttl, M the fence margin, P the fence's poll interval (0.1 s) and
K the time a SIGKILL takes to end a QEMU process (< 0.1 s here; libvirt's destroy comes
after and is not waited for).
- The daemon sends a keep-alive at t0 (its monotonic clock) and etcd answers it with a
  TTL > 0. etcd restarts the lease's countdown when it handles the keep-alive, which is
  after t0, and a new etcd leader only ever extends leases: the lease cannot lapse, and
  the host's alive key cannot vanish, before t0 + T. The proof written says t0 + T - M.
- So the fence has stopped every domain by t0 + T - M + P + K, which is before the lease
  can lapse because M >= 0.5 s > P + K (config.py refuses a smaller margin).
- eschedule moves an instance only after the host has been seen DOWN (its alive key
  gone) and stayed DOWN for T + M + grace, and its move compares, in the same
  transaction, that the alive key is still absent. A new copy therefore starts at least
  T + M + grace after the old one was stopped.
- Worst case from the last keep-alive etcd answered (the lease is lost from then on) to
  the last domain stopped: T - M + P + K; 7.2 s with the defaults (T = 10, M = 3).
What this does not cover: a machine frozen as a whole (all of it paused, e.g. a VM
whose hypervisor stops it) for longer than T + M + grace resumes its QEMU processes and
its fence together, and a domain may run for up to P + K beside its new copy before the
fence's first look; and a fence killed while its daemon is also dead (the daemon restarts
a dead fence; systemd restarts its unit). test:///default keeps domains inside each
worker process, where no fence can see them: there the daemon's killing its workers when
the proof lapses is the fence.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from etcd_compute import systemd
from etcd_compute.ecompute.domainxml import owner_in_xml
from etcd_compute.ecompute.driver import NAME_PREFIX, Driver
from etcd_compute.ecompute.proof import FenceSettings, lapsed, paths, read_proof, record_fenced

LOG = logging.getLogger("ecompute.fence")
POLL = 0.1  # seconds between the fence's looks at the proof (P above)
BEAT = 0.5  # seconds between the fence's heartbeats (its .alive file)
REFRESH = 1.0  # seconds between the fence's listings of the host's domains
PROCESS_NAME = "ecompute-fence"


# -- finding QEMU processes without asking libvirtd ----------------------------------------------

def libvirtd_pid(uri: str) -> int | None:
    """The pid of the libvirtd behind a qemu:///system URI (its socket's peer credentials: this
    works while the daemon hangs, as the kernel answers the connection)."""
    parts = urlsplit(uri)
    if not parts.scheme.startswith("qemu"):
        return None
    sock_path = parse_qs(parts.query).get("socket", ["/run/libvirt/libvirt-sock"])[0]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            s.connect(sock_path)
            creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid: int = struct.unpack("3i", creds)[0]
    return pid or None


def qemu_pid(libvirtd: int, name: str, uuid: str) -> int | None:
    """The running QEMU process of domain `name` of that libvirtd: its pid file, read through
    the daemon's own view of /run (a second libvirtd on this machine has a /run of its own),
    checked against the process's command line (a pid can be reused)."""
    pidfile = Path(f"/proc/{libvirtd}/root/run/libvirt/qemu/{name}.pid")
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if uuid.encode() in cmdline and b"-uuid" in cmdline else None


def domain_owner(libvirtd: int, name: str) -> str | None:
    """The host a running domain belongs to, from its live XML as that libvirtd keeps it on disk
    (no call to libvirtd, which may hang): several hosts may share one libvirtd, and a fence
    stops only its own host's domains."""
    try:
        return owner_in_xml(Path(f"/proc/{libvirtd}/root/run/libvirt/qemu/{name}.xml").read_text())
    except OSError:
        return None


def domain_names(libvirtd: int) -> dict[str, str]:
    """uuid -> name of every domain of ours that libvirtd has a pid file for (running ones)."""
    found = {}
    with contextlib.suppress(OSError):
        for pidfile in Path(f"/proc/{libvirtd}/root/run/libvirt/qemu").glob(NAME_PREFIX + "*.pid"):
            name = pidfile.name[:-4]
            found[name[len(NAME_PREFIX):]] = name
    return found


# -- the fence --------------------------------------------------------------------------------

class Fence:
    """One host's fence: tick() looks at the proof once and stops what must stop.

    `driver` is the host's hypervisor driver (its hard_stop and list_uuids); where the
    hypervisor has QEMU processes (qemu://), they are SIGKILLed first, without libvirtd."""

    def __init__(self, settings: FenceSettings, driver: Driver, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings, self.driver, self.clock = settings, driver, clock
        self.files = paths(settings.instances_path)
        self.owned: set[str] = set()  # our domains at the last listing the hypervisor answered
        self.listed_at: float | None = None
        self.lapsed_since: float | None = None
        self.stopped: set[str] = set()  # stopped during the current lapse
        self._lock = threading.Lock()
        self._destroying = threading.Event()
        self._destroyed_at = -REFRESH

    def refresh(self) -> None:
        """Learn which domains are ours (a libvirt call: run it off the fence's own loop)."""
        mine = set(self.driver.list_uuids(owner=self.settings.host))
        with self._lock:
            self.owned, self.listed_at = mine, self.clock()

    def tick(self) -> list[str]:
        """Look at the proof; if it has lapsed, stop every domain of ours that still runs.
        The uuids stopped by this look."""
        proof = read_proof(self.files["proof"])
        why = lapsed(proof, now=self.clock())
        if why is None:
            if self.lapsed_since is not None:
                LOG.warning("fence: the lease is proven again (epoch %s); standing by", proof and proof.epoch)
            self.lapsed_since, self.stopped = None, set()
            return []
        if self.lapsed_since is None:
            self.lapsed_since = self.clock()
            LOG.error("fence: %s: stopping every domain of host %s", why, self.settings.host)
        stopped = self._kill()
        if stopped:
            self.stopped |= set(stopped)
            self._record(stopped, why, "killed their QEMU processes")
        return stopped

    def _record(self, uuids: list[str], why: str, how: str) -> None:
        proof = read_proof(self.files["proof"])
        with self._lock:
            record_fenced(self.files["fenced"], uuids, proof.epoch if proof else 0, why)
        LOG.error("fence: %s of %d domains: %s", how, len(uuids), ", ".join(sorted(uuids)))

    def _kill(self) -> list[str]:
        """SIGKILL the QEMU process of every running domain of this host (found without libvirtd:
        its pid and status files, the owner in the latter); then, at most once a REFRESH and on a
        thread of its own, have the hypervisor hard-stop every domain of ours it knows of."""
        host, stopped = self.settings.host, []
        if self.settings.uri.startswith("fake://"):  # its domains are files: stopped as QEMUs are killed
            from etcd_compute.ecompute.fakedriver import running
            for uuid, owner in sorted(running(Path(self.settings.uri.removeprefix("fake://"))).items()):
                if owner == host and self.driver.hard_stop(uuid, host):
                    stopped.append(uuid)
        lvpid = libvirtd_pid(self.settings.uri)
        if lvpid is not None:
            for uuid, name in sorted(domain_names(lvpid).items()):
                if domain_owner(lvpid, name) != host:
                    continue  # another host's, on a libvirtd shared with it
                pid = qemu_pid(lvpid, name, uuid)
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        stopped.append(uuid)
        if not self._destroying.is_set() and self.clock() - self._destroyed_at >= REFRESH:
            self._destroying.set()
            self._destroyed_at = self.clock()
            with self._lock:
                owned = set(self.owned)
            threading.Thread(target=self._destroy, args=(owned,), name="fence destroy", daemon=True).start()
        return stopped

    def _destroy(self, owned: set[str]) -> None:
        """Have the hypervisor hard-stop every running domain of ours (QEMU killed or not); each
        one's owner is checked again first (another host may have taken it over since the listing)."""
        try:
            stopped = [uuid for uuid in sorted(owned) if self.driver.hard_stop(uuid, self.settings.host)]
            if stopped:
                self._record(stopped, "the host's etcd lease is not proven", "hard-stopped through the hypervisor")
        except Exception as exc:  # noqa: BLE001 - the next tick tries again
            LOG.warning("fence: the hypervisor did not stop the domains: %s", exc)
        finally:
            self._destroying.clear()

    def run(self, stopping: threading.Event) -> None:
        """Tick every POLL seconds, beat every BEAT, list the domains every REFRESH (in a thread)."""
        threading.Thread(target=self._refresher, args=(stopping,), name="fence refresh", daemon=True).start()
        next_beat = 0.0
        while not stopping.is_set():
            if not self.files["proof"].parent.is_dir():
                LOG.warning("fence: %s is gone (the host was removed); leaving", self.files["proof"].parent)
                return
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the fence must never stop looking
                LOG.exception("fence: a look failed")
            if self.clock() >= next_beat:
                next_beat = self.clock() + BEAT
                with contextlib.suppress(OSError):
                    self.files["alive"].touch()
                systemd.notify("WATCHDOG=1")
            stopping.wait(POLL)

    def _refresher(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - the hypervisor away: keep the last listing
                LOG.debug("fence: cannot list domains: %s", exc)
            stopping.wait(REFRESH)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ecompute-fence", description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="compute.yaml (instead of the options below)")
    ap.add_argument("--host")
    ap.add_argument("--uri")
    ap.add_argument("--domain-type", default="auto")
    ap.add_argument("--instances")
    ap.add_argument("--proof", help="(the proof's path, for ps and pid checks; derived from --instances)")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    if args.config:
        from etcd_compute import config
        cfg = config.load_compute(args.config)
        settings = FenceSettings(cfg.host_uuid(), cfg.libvirt.uri, cfg.libvirt.domain_type, cfg.instances_path)
        level = cfg.log_level
    elif args.host and args.uri and args.instances:
        settings = FenceSettings(args.host, args.uri, args.domain_type, args.instances)
        level = args.log_level
    else:
        ap.error("give --config, or --host, --uri and --instances")
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(OSError, AttributeError):  # ps and psutil tell it from the daemon
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(15, PROCESS_NAME.encode())  # PR_SET_NAME
    files = paths(settings.instances_path)
    lock = files["pid"].open("a+")  # one fence per host: a second one (a unit's and a daemon's) leaves
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        LOG.info("fence of host %s: another one runs (pid %s); leaving it to it", settings.host,
                 files["pid"].read_text().strip() or "?")
        return 0
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    from etcd_compute.ecompute.fakedriver import open_driver
    fence = Fence(settings, open_driver(settings.uri, settings.domain_type, settings.instances_path))
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    LOG.info("fence of host %s on %s: watching %s", settings.host, settings.uri, files["proof"])
    systemd.notify(f"READY=1\nSTATUS=fence of host {settings.host}")
    fence.run(stopping)
    return 0


if __name__ == "__main__":
    sys.exit(main())
