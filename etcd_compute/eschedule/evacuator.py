"""The evacuator: `eschedule evacuate --auto`, a long-running service under systemd.

Every `evacuate.interval` seconds it looks at the hosts of this prefix (those with a record or
with requests), records since when each one without an alive key has been DOWN, and evacuates
those DOWN past their fence window + `auto_grace` (moves.evacuate: never waiting, never
forced; a host that does not fence itself is named in the log and left to an operator).

It never ends on an error: etcd or Placement away, a failing call, a bug met in a round are
logged, counted and backed off (0.5 s doubling to 10 s); the next round reads everything anew.

Several may run (on several machines, for availability); one acts: the holder of
PREFIX/evacuator, a key on its own etcd lease of `leader_ttl` seconds, created only where none
exists, refreshed every round and between moves, and revoked when it stops (SIGTERM), so another
takes over at once (or once the lease lapses, if it died). Two acting at once (a leader paused
past its lease while another took over) are still safe: every move compares what it read
(Placement's against the consumer generation, etcd's against the request's revision and the
host's alive key and DOWN record), so each instance moves once and the loser undoes its
allocation move (see tests/test_races.py, two evacuations at once).

It tells systemd READY=1 once it runs, WATCHDOG=1 from its loop and between moves, STOPPING=1;
with `metrics` (HOST:PORT) it serves Prometheus series, and only then loads prometheus_client.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING

from etcd_compute import contract, systemd
from etcd_compute.errors import ECError, EtcdUnavailable, InvalidState, PlacementError, PlacementUnavailable
from etcd_compute.eschedule import moves

if TYPE_CHECKING:
    from etcd_compute.eschedule.operations import Operations

LOG = logging.getLogger("eschedule.evacuator")
BACKOFF_FIRST, BACKOFF_CAP = 0.5, 10.0  # seconds after a failed round, doubling
RESULTS = ("moved", "failed")  # what became of an instance the evacuator tried to move
KINDS = ("etcd", "placement", "other")  # what failed


class _Interrupted(Exception):
    """The round stops between two moves: the lead was lost, or the service is stopping."""


class Metrics:
    """The evacuator's Prometheus series, served on `address`; without one, every call does nothing."""

    def __init__(self, address: str | None) -> None:
        self._on = address is not None
        if address is None:
            return
        from prometheus_client import CollectorRegistry, Counter, Gauge

        from md_server.server import serve_metrics  # ecompute's way of serving too
        registry = CollectorRegistry()
        self._down = Gauge("etcd_compute_evacuator_hosts_down", "Hosts of this prefix without an alive key.",
                           registry=registry)
        self._moves = Counter("etcd_compute_evacuator_evacuations", "Instances the evacuator tried to move, "
                              "by result.", ["result"], registry=registry)
        self._errors = Counter("etcd_compute_evacuator_errors", "Failed rounds and hosts, by what failed.",
                               ["kind"], registry=registry)
        self._leader = Gauge("etcd_compute_evacuator_leader", "1 while this evacuator leads (acts), else 0.",
                             registry=registry)
        self._round = Gauge("etcd_compute_evacuator_last_round_timestamp_seconds",
                            "When this evacuator last ended a round as leader (Unix time).", registry=registry)
        for result in RESULTS:
            self._moves.labels(result)
        for kind in KINDS:
            self._errors.labels(kind)
        self.server = serve_metrics(address, registry, "--metrics", log=LOG)

    def hosts_down(self, n: int) -> None:
        if self._on:
            self._down.set(n)

    def moved(self, result: str) -> None:
        if self._on:
            self._moves.labels(result).inc()

    def error(self, kind: str) -> None:
        if self._on:
            self._errors.labels(kind).inc()

    def leader(self, leading: bool) -> None:
        if self._on:
            self._leader.set(int(leading))

    def round_done(self) -> None:
        if self._on:
            self._round.set(time.time())

    def close(self) -> None:
        if self._on and self.server is not None:
            self.server.shutdown()


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, EtcdUnavailable):
        return "etcd"
    return "placement" if isinstance(exc, PlacementUnavailable | PlacementError) else "other"


class Evacuator:
    """One evacuator process: campaigns for the lead, and while it leads, evacuates."""

    def __init__(self, ops: Operations, *, grace: float | None = None, metrics: str | None = None) -> None:
        cfg = ops.cfg.evacuate
        self.ops = ops
        self.grace = cfg.auto_grace if grace is None else grace
        self.interval, self.ttl = cfg.interval, cfg.leader_ttl
        self.metrics = Metrics(metrics if metrics is not None else cfg.metrics)
        self.watchdog = systemd.Watchdog()
        self.stopping = threading.Event()
        self.lease: int | None = None
        self._refreshed = 0.0
        self.by = f"evacuator on {socket.gethostname()} (pid {os.getpid()})"
        self._told: dict[str, str] = {}  # what was last logged of each host not evacuated: said once

    def run(self, stopping: threading.Event) -> None:
        """Until `stopping` is set (SIGTERM): rounds while leading, a backoff after a failure;
        then resign, so that another evacuator takes over at once."""
        self.stopping = stopping
        self.metrics.leader(False)
        LOG.info("evacuating hosts DOWN past their fence window + %g s; %s", self.grace, self.by)
        systemd.notify(f"READY=1\nSTATUS=evacuating hosts DOWN past their fence window + {self.grace:g} s")
        delay = BACKOFF_FIRST
        try:
            while not stopping.is_set():
                self.watchdog.pet()
                if self.step():
                    delay, pause = BACKOFF_FIRST, self.interval
                else:
                    pause, delay = delay, min(delay * 2, BACKOFF_CAP)
                stopping.wait(pause)
        finally:
            systemd.notify("STOPPING=1")
            self.resign()
            self.metrics.close()

    def step(self) -> bool:
        """One round if this evacuator leads; False if it failed (logged and counted: back off)."""
        try:
            return not self.lead() or self.round()
        except _Interrupted as exc:
            LOG.warning("round stopped: %s", exc)
            return True
        except ECError as exc:
            self.metrics.error(error_kind(exc))
            LOG.warning("round failed: %s; trying again after a pause", exc)
            return False
        except Exception:
            self.metrics.error("other")
            LOG.exception("round failed; trying again after a pause")
            return False

    def lead(self) -> bool:
        """Do we lead (refreshing our lease), or do we now (taking the key where nobody holds it)?"""
        store = self.ops.store
        if self.lease is not None:
            if store.refresh_lease(self.lease):
                self._refreshed = time.monotonic()
                return True
            LOG.warning("lost the lead: its lease lapsed (etcd away, or this process stalled)")
            self.lease = None
            self.metrics.leader(False)
        me = {"pid": os.getpid(), "hostname": socket.gethostname(), "since": contract.now()}
        self.lease = store.lead_evacuators(self.ttl, me)
        if self.lease is None:
            leader = store.evacuator_leader() or {}
            self._tell("", f"another evacuator leads (pid {leader.get('pid')} on {leader.get('hostname')}): "
                           "standing by")
            return False
        self._refreshed = time.monotonic()
        self.metrics.leader(True)
        LOG.info("leading the evacuators of %s", store.prefix)
        self._told.pop("", None)
        return True

    def tick(self) -> None:
        """Between two moves: tell the watchdog, keep the lead (or stop the round), stop on SIGTERM."""
        self.watchdog.pet()
        if self.stopping.is_set():
            raise _Interrupted("stopping")
        if self.lease is not None and time.monotonic() - self._refreshed > self.ttl / 3:
            if not self.ops.store.refresh_lease(self.lease):
                self.lease = None
                self.metrics.leader(False)
                raise _Interrupted("lost the lead: its lease lapsed")
            self._refreshed = time.monotonic()

    def round(self) -> bool:
        """Record DOWN hosts, evacuate those past their window; False if one failed."""
        store = self.ops.store
        alive = store.alive_hosts()
        records, with_requests = store.hosts(), store.request_hosts()
        down = (set(records) | with_requests) - alive
        self.metrics.hosts_down(len(down))
        store.down_since(down, self.by)
        for host in set(self._told) - down - {""}:
            del self._told[host]  # UP again (or gone): tell anew next time
        ok = True
        for host in sorted(down & with_requests):
            self.tick()
            try:
                moved = moves.evacuate(self.ops, host, grace=self.grace, wait=False, tick=self.tick, by=self.by)
            except moves.FenceWindow as exc:
                self._tell(host, f"host {host} DOWN since {exc.since}: evacuated once its fence window and "
                           f"{self.grace:g} s grace have passed, in {exc.left:.1f} s", exc.since)
                continue
            except InvalidState as exc:  # does not fence itself, or came back UP meanwhile
                self._tell(host, str(exc), level=logging.WARNING)
                continue
            except ECError as exc:
                self.metrics.error(error_kind(exc))
                LOG.warning("evacuating host %s failed: %s", host, exc)
                ok = False
                continue
            for m in moved:
                self.metrics.moved("moved" if m["to"] else "failed")
                if m["to"]:
                    LOG.warning("evacuated %s from DOWN host %s to %s", m["uuid"], host, m["to"])
                else:
                    LOG.warning("could not evacuate %s from DOWN host %s: %s", m["uuid"], host, m["error"])
        self.metrics.round_done()
        return ok

    def _tell(self, host: str, what: str, once_per: str | None = None, level: int = logging.INFO) -> None:
        """Log `what` about `host` once for each `once_per` (default: what is said)."""
        key = what if once_per is None else once_per
        if self._told.get(host) != key:
            self._told[host] = key
            LOG.log(level, "%s", what)

    def resign(self) -> None:
        """Give up the lead now (revoke its lease), so another evacuator need not wait it out."""
        if self.lease is None:
            return
        try:
            self.ops.store.revoke_lease(self.lease)
            LOG.info("resigned the lead")
        except ECError as exc:
            LOG.warning("could not resign the lead (%s): another evacuator takes over when it lapses", exc)
        self.lease = None
        self.metrics.leader(False)
