"""Host liveness: one live daemon per host, its etcd lease, and the proof of it that the fence reads.

The host is UP while PREFIX/alive/<host> exists on an etcd lease of lease_ttl seconds.
The keep-alive refreshes it every lease_ttl / 4 (sooner after a failure), each call
bounded by that period, and after every refresh etcd answered it writes the fence's
proof (fence.py: the lease holds until the moment the refresh was sent + lease_ttl -
fence margin). When that moment passes without a newer answer, the proof has lapsed:
the fence stops the host's domains and the daemon ends every job under way (the loop's
`lapsed`); nothing that starts a domain is handed out until the lease is proven again.
A lease that etcd says has expired means others may act on the host's instances: the
proof is withdrawn at once and the key claimed anew. Every time the proof comes back after
a lapse, or the key is claimed anew, the host's *epoch* grows: no job of an older epoch
may start a domain (worker.py), and the loop looks at everything afresh (`regain`).

Two daemons never serve one host: a lock beside the instances directory keeps out a
second one on this machine at once, and the alive key (created only where none exists)
keeps out one elsewhere. The fence runs as a process of its own (a unit of its own under
systemd); liveness starts one when none runs and starts it again when it stops beating.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from etcd_compute import config, contract
from etcd_compute.ecompute import inventory
from etcd_compute.ecompute import proof as fence
from etcd_compute.ecompute.hooks import MetricsHooks
from etcd_compute.errors import ECError
from etcd_compute.store import Store

LOG = logging.getLogger("ecompute")
FENCE_STALE = 5.0  # seconds without a heartbeat after which the fence process counts as stuck


class Liveness:
    """The host's lease, its proof and its fence process; see the module docstring."""

    def __init__(self, cfg: config.ComputeConfig, store: Store, metrics: MetricsHooks | None = None) -> None:
        self.cfg, self.store = cfg, store
        self.metrics = metrics or MetricsHooks()
        self.host = cfg.host_uuid()
        self.ttl = cfg.lease_ttl
        self.margin = cfg.fence_margin() or 0.0
        self.period = self.ttl / 4  # between refreshes; also each refresh's own deadline
        self.files = fence.paths(cfg.instances_path)
        previous = fence.read_proof(self.files["proof"])
        self.epoch = previous.epoch if previous else 0
        self.deadline = 0.0  # CLOCK_MONOTONIC: until when the lease is proven (minus the margin)
        self.lease: int | None = None
        self.lapsed_since: float | None = None
        self.lost_host = False  # another daemon took this host over: exit without locking it
        self.progress = time.monotonic()  # the last turn of the keep-alive (the watchdog's)
        self.alive = {"uuid": self.host, "pid": os.getpid(), "hostname": inventory.hostname(),
                      "since": contract.now()}
        self.on_lapsed: Callable[[str], None] = lambda why: None  # the loop ends its jobs
        self.on_regained: Callable[[], None] = lambda: None  # the loop looks at everything afresh
        self._fence_proc: subprocess.Popen[bytes] | None = None
        self._lockfile: Any = None

    # -- the proof --------------------------------------------------------------------------

    def proven(self) -> bool:
        return time.monotonic() < self.deadline

    def _proved(self, sent: float, anew: bool) -> None:
        """etcd answered a refresh (or a claim) sent at `sent`: the lease holds until sent + ttl."""
        regained = anew or self.lapsed_since is not None or self.deadline == 0.0
        if regained:
            self.epoch += 1
        self.deadline = sent + self.ttl - self.margin
        fence.write_proof(self.files["proof"], fence.Proof(self.host, self.epoch, self.deadline, os.getpid()))
        if regained:
            if self.lapsed_since is not None:
                LOG.warning("the host's lease is proven again after %.1fs (epoch %d)",
                            time.monotonic() - self.lapsed_since, self.epoch)
            self.lapsed_since = None
            self.on_regained()

    def _lapse(self, why: str, withdraw: bool = False) -> None:
        """The proof no longer holds (or, `withdraw`, must not: the lease is gone)."""
        if withdraw and self.deadline > time.monotonic():
            self.deadline = time.monotonic()
            fence.write_proof(self.files["proof"], fence.Proof(self.host, self.epoch, self.deadline, os.getpid()))
        if self.lapsed_since is None:
            self.lapsed_since = time.monotonic()
            self.metrics.lease_lapsed()
            LOG.error("%s: the fence stops this host's domains; no job starts one until the lease is back", why)
            self.on_lapsed(why)

    # -- one daemon per host ----------------------------------------------------------------

    def lock_host_dir(self) -> None:
        """Keep a second daemon on this machine out at once: a lock beside the instances directory."""
        path = Path(self.cfg.instances_path.rstrip("/") + ".lock")
        self._lockfile = path.open("a+")
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ECError(f"another ecompute already runs on {self.cfg.instances_path} "
                          f"(pid {path.read_text().strip() or '?'}); refusing to start") from None
        self._lockfile.truncate(0)
        self._lockfile.write(f"{os.getpid()}\n")
        self._lockfile.flush()

    def _take_alive_key(self) -> tuple[int | None, dict[str, Any]]:
        """Put PREFIX/alive/<host> on a new lease unless another live daemon holds it: (lease id or
        None, the holder's record). A key left on this machine by this very process (a lease lost
        track of across an etcd failover) or by a daemon here that died is ours to take: once we
        hold the lock beside the instances directory, no other daemon of this host runs here."""
        lease = self.store.claim_alive(self.host, self.ttl, self.alive)
        if lease is not None:
            return lease, self.alive
        holder = self.store.alive_record(self.host) or {}
        pid = holder.get("pid")
        if holder.get("hostname") != self.alive["hostname"] or (pid != os.getpid() and _running(pid)):
            return None, holder
        LOG.warning("alive key of %s here (pid %s) found on a lapsed lease; taking it again",
                    "this daemon" if pid == os.getpid() else "a daemon that died", pid)
        self.store.clear_alive(self.host)
        lease = self.store.claim_alive(self.host, self.ttl, self.alive)
        return lease, (self.alive if lease is not None else self.store.alive_record(self.host) or {})

    def claim(self, stopping: threading.Event) -> bool:
        """Be the only daemon of this host, or refuse to start: the alive key (created only where
        none exists) keeps out a daemon elsewhere with the same host uuid. False if asked to stop."""
        deadline = time.monotonic() + self.ttl + 2
        while not stopping.is_set():
            sent = time.monotonic()
            self.lease, holder = self._take_alive_key()
            if self.lease is not None:
                self._proved(sent, anew=True)
                return True
            if time.monotonic() > deadline:
                raise ECError(f"host {self.host} is served by another live ecompute (pid {holder.get('pid')} "
                              f"on {holder.get('hostname')}); refusing to start")
            stopping.wait(0.5)
        return False

    # -- keeping the lease --------------------------------------------------------------------

    def run(self, until: threading.Event, stopping: threading.Event) -> None:
        """Refresh the lease until `until`; claim it anew if it expired, and set `stopping` (the
        daemon's) if another daemon took the host meanwhile."""
        while not until.is_set():
            self.progress = time.monotonic()
            wait = self.turn()
            if self.lost_host:
                stopping.set()
                return
            until.wait(wait)

    def turn(self) -> float:
        """One refresh (and what follows from it); the seconds until the next."""
        if self.deadline and not self.proven():
            self._lapse(f"the host's etcd lease is not proven ({time.monotonic() - self.deadline:.1f}s past "
                        "the fence's deadline)")
        self.keep_fence()
        sent = time.monotonic()
        try:
            if self.lease is not None and self.store.refresh_alive(self.lease, timeout=self.period):
                self._proved(sent, anew=False)
                return max(0.05, self.period - (time.monotonic() - sent))
            if self.lease is not None:
                self.metrics.lease_refresh_failed("expired")
                self._lapse("the host's etcd lease expired", withdraw=True)
            sent = time.monotonic()
            self.lease, holder = self._take_alive_key()
            if self.lease is None:
                LOG.error("host %s was taken over by another ecompute (pid %s on %s); stopping",
                          self.host, holder.get("pid"), holder.get("hostname"))
                self.lost_host = True
                return 0.0
            LOG.info("alive on a new %ds lease", self.ttl)
            self._proved(sent, anew=True)
            return self.period
        except ECError as exc:
            self.metrics.lease_refresh_failed("error")
            LOG.debug("lease refresh failed: %s", exc)
            return min(0.5, self.period / 2)

    def close(self) -> None:
        """Revoke the lease (DOWN at once, not after the TTL). The proof stays: the domains run on
        until it lapses, so a daemon restarted within lease_ttl - margin keeps every guest running,
        and one that is not has them stopped by the fence."""
        if self.lease is not None:
            with contextlib.suppress(ECError):
                self.store.revoke_alive(self.lease)
            self.lease = None

    # -- the fence process ----------------------------------------------------------------------

    def fence_settings(self) -> fence.FenceSettings | None:
        """None where there is no fence: fencing off, or test:///default (whose domains live in the
        workers, which the loop kills when the proof lapses)."""
        if self.cfg.fence_margin() is None or self.cfg.libvirt.uri.startswith("test:"):
            return None
        return fence.FenceSettings(self.host, self.cfg.libvirt.uri, self.cfg.libvirt.domain_type,
                                   self.cfg.instances_path)

    def keep_fence(self) -> None:
        """Make sure this host's fence runs and beats: adopt one that does (its own unit's, or a
        predecessor's), else start one, in a session of its own so it outlives this daemon."""
        settings = self.fence_settings()
        if settings is None:
            return
        if self._fence_proc is not None and self._fence_proc.poll() is not None:
            LOG.error("the fence process exited (%s); starting another", self._fence_proc.returncode)
            self.metrics.loop_restarted("fence")
            self._fence_proc = None
        if self._fence_proc is not None and not self._fence_started_long_ago():
            return  # ours, still starting (its pid file and heartbeat come once it runs)
        pid = fence.fence_pid(self.cfg.instances_path)
        age = fence.heartbeat_age(self.cfg.instances_path)
        if pid is not None and (age is None or age > FENCE_STALE) and self._fence_started_long_ago():
            LOG.error("the fence process %d has not beaten for %s; killing it and starting another", pid,
                      "ever" if age is None else f"{age:.0f}s")
            self.metrics.loop_restarted("fence")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
            pid = None
        if pid is None:
            # Not the daemon's systemd socket nor its watchdog: the fence is no part of this service.
            env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
            self._fence_proc = subprocess.Popen(fence.command(settings, self.cfg.log_level), stdin=subprocess.DEVNULL,
                                                start_new_session=True, env=env)
            self._fence_started = time.monotonic()
            LOG.info("fence process %d started for host %s", self._fence_proc.pid, self.host)

    _fence_started = -1e9

    def _fence_started_long_ago(self) -> bool:
        return time.monotonic() - self._fence_started > FENCE_STALE


def _running(pid: object) -> bool:
    """Is `pid` a live process on this machine (a daemon of ours that still runs)?"""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return Path(f"/proc/{pid}").exists()
