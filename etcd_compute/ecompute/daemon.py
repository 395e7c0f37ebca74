"""ecompute: the per-host daemon, as wiring of its rooms.

    liveness.py  the host's lease, one daemon per host, the fence's proof and process (fence.py)
    loop.py      the reconcile loop: read, decide, hand out jobs within their deadlines, fencing
    backlog.py   its events, per-instance backoff and parking, one switch from report to queue
    records.py   its reads and compared writes of an instance's status, and its allocation
    pool.py      the worker processes that run the jobs (worker.py), each job within its deadline
    services.py  the supervised loops: metadata server, consoles, lifecycle events, the watchdog

Start-up: connect to etcd, take the host (the alive key) and prove its lease, so that the
fence of a daemon that restarts quickly never fires; prepare the hypervisor; register in
Placement; start the services; list every request of this host and watch from that
revision; READY=1. While the hypervisor does not answer, the host is unhealthy: its record
says so and its inventory is locked in Placement (nothing new lands here) until it answers.
On SIGINT/SIGTERM it lets running jobs finish (bounded), locks its inventory (reserved =
total) so nothing new is scheduled here, revokes its lease and exits 0; its domains run
on, and a daemon started again within lease_ttl - fence margin keeps them running.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from etcd_compute import config, contract, systemd
from etcd_compute.ecompute import inventory, loop, services
from etcd_compute.ecompute import proof as fence
from etcd_compute.ecompute.hooks import MetricsHooks
from etcd_compute.ecompute.jobs import Job, JobKind, WorkerSettings
from etcd_compute.ecompute.liveness import Liveness
from etcd_compute.ecompute.pool import Runner, WorkerPool
from etcd_compute.errors import ConfigError, ECError, EtcdUnavailable, PlacementError, PlacementUnavailable
from etcd_compute.placement import PlacementClient
from etcd_compute.rbd import RbdSettings
from etcd_compute.store import Store

LOG = logging.getLogger("ecompute")
T = TypeVar("T")


def worker_settings(cfg: config.ComputeConfig) -> WorkerSettings:
    net: dict[str, object] | None = None
    if cfg.bridge is None and cfg.network.mode != "none":
        net = {"name": cfg.network.name, "bridge": cfg.network.bridge_name, "address": cfg.network.address,
               "forward": cfg.network.mode == "nat",
               "metadata_address": cfg.metadata.address if cfg.metadata.enabled else None}
    pace = cfg.image_download
    return WorkerSettings(
        host=cfg.host_uuid(), uri=cfg.libvirt.uri, domain_type=cfg.libvirt.domain_type,
        instances_path=cfg.instances_path, image_cache_path=cfg.image_cache_path,
        image_dirs=tuple(cfg.image_dirs), image_max_bytes=cfg.image_max_bytes, resize=cfg.resize,
        bridge=cfg.bridge, network=net, ip_timeout=cfg.ip_timeout, stop_timeout=cfg.stop_timeout,
        log_level=cfg.log_level, daemon_pid=os.getpid(), proof=str(fence.paths(cfg.instances_path)["proof"]),
        image_deadline=pace.deadline, image_min_rate=pace.min_rate, image_rate_window=pace.window,
        rbd=rbd_settings(cfg), config_drive=cfg.config_drive, metadata_url=services.metadata_url(cfg))


def rbd_settings(cfg: config.ComputeConfig) -> RbdSettings | None:
    """The rbd storage backend's settings, its monitors from compute.yaml or its ceph.conf."""
    if cfg.storage.backend != "rbd":
        return None
    rbd = cfg.storage.rbd
    assert rbd.pool is not None and rbd.secret_uuid is not None  # config.py checked
    return RbdSettings(pool=rbd.pool, conf=rbd.ceph_conf, cluster=rbd.cluster, user=rbd.user,
                       keyring=rbd.keyring_path(), secret_uuid=rbd.secret_uuid, monitors=rbd.monitor_addresses())


def loop_settings(cfg: config.ComputeConfig) -> loop.Settings:
    return loop.Settings(host=cfg.host_uuid(), resync_interval=cfg.resync_interval, deadlines=deadlines(cfg),
                         retries=cfg.retries, instances_path=cfg.instances_path,
                         fenced_path=fence.paths(cfg.instances_path)["fenced"], stop_timeout=cfg.stop_timeout,
                         crash_restarts=cfg.crash_restarts, pool=host_pool(cfg))


def host_pool(cfg: config.ComputeConfig) -> str | None:
    """The sharing provider of the host's Ceph pool (its volumes are there); None: local disks."""
    return cfg.storage.rbd.pool_provider() if cfg.storage.backend == "rbd" else None


def deadlines(cfg: config.ComputeConfig) -> dict[JobKind, float | None]:
    """Each job kind's deadline (compute.yaml's `deadlines`); a power change or a reboot has the
    guest's clean shutdown (stop_timeout, or what the call asked for: Loop.deadline) on top of its own;
    attaching and detaching volumes has `power`'s (above jobs.VOLUME_RELEASE_TIMEOUT)."""
    d = cfg.deadlines
    return {JobKind.PREPARE: d.prepare, JobKind.BUILD: d.build, JobKind.POWER: d.power + cfg.stop_timeout,
            JobKind.REBOOT: d.power + cfg.stop_timeout, JobKind.VOLUMES: d.power, JobKind.DESTROY: d.destroy,
            JobKind.REMOVE_ORPHAN: d.destroy, JobKind.LIST_DOMAINS: d.list, JobKind.DOMAIN_STATS: d.list}


class Daemon:
    """`runner` runs the jobs: worker processes (pool.WorkerPool) unless given, e.g. a
    pool.ThreadRunner for a daemon run in-process over a fake hypervisor."""

    def __init__(self, cfg: config.ComputeConfig, runner: Runner | None = None) -> None:
        self.cfg = cfg
        self.host = cfg.host_uuid()
        self.name = cfg.host_name()
        self.stopping = threading.Event()
        self.lease_kept = threading.Event()  # set when the keep-alive may end: the very end of a shutdown
        self.failure: str | None = None  # why a supervised loop gave up: the daemon exits non-zero
        self.pool: Runner = runner or WorkerPool(worker_settings(cfg), cfg.workers)
        self.placement = PlacementClient(cfg.placement)
        self.metrics = MetricsHooks()  # Prometheus metrics replace these no-ops in run() when `metrics` is set
        self.supervisor = services.Supervisor(self.stopping, self.metrics, self.fail)
        self._store: Store | None = None
        self.liveness: Liveness | None = None
        self.loop: loop.Loop | None = None
        self.health: tuple[bool, str | None] = (True, None)  # as the loop last said
        self._health_done: tuple[bool, str | None] = (True, None)  # as Placement and etcd last heard

    @property
    def store(self) -> Store:
        assert self._store is not None, "used before run() connected to etcd"
        return self._store

    def fail(self, why: str) -> None:
        LOG.error("%s: stopping, to be started again", why)
        self.failure = why
        self.stopping.set()

    def run(self) -> int:
        cfg = self.cfg
        Path(cfg.instances_path).mkdir(parents=True, exist_ok=True)
        if cfg.metadata.metrics:  # a typo refuses the start now, not once the host is registered
            from md_server.server import guest_facing, metrics_address
            metrics_address(cfg.metadata.metrics, "metadata.metrics", guest_facing(cfg))
        if cfg.metrics:  # first: a daemon waiting for etcd or Placement shows it there
            self.metrics = self.serve_metrics(cfg.metrics)
            self.supervisor.metrics = self.metrics
        self._store = self._retry("connect to etcd", lambda: Store(cfg.etcd))
        if self._store is None:
            return self._close(locked=False)
        self.liveness = live = Liveness(cfg, self.store, self.metrics)
        live.lock_host_dir()
        if not self._retry("claim the host", lambda: live.claim(self.stopping)):
            return self._close(locked=False)
        # At once: the proof must not lapse while the rest starts (a slow Placement, say); and to
        # the very end: the lease is kept while a shutdown lets jobs finish (_close ends it).
        self.supervisor.start("liveness", lambda _stopping: live.run(self.lease_kept, self.stopping),
                              progress=lambda: live.progress,
                              allowance=max(30.0, 3 * cfg.lease_ttl + 3 * cfg.etcd.timeout))
        prepared = self.pool.run(Job(JobKind.PREPARE), deadlines(cfg)[JobKind.PREPARE])
        if not prepared.ok and not (prepared.hypervisor_down or prepared.timed_out):
            raise ECError(prepared.reason or "preparing the host failed")
        if self._retry("register in Placement", self.register) is None:
            return self._close(locked=False)
        self.loop = lp = loop.Loop(loop_settings(cfg), self.store, self.placement, self.pool, live, self.metrics,
                                   on_health=self.on_health)
        live.on_lapsed, live.on_regained = lp.lapsed, lp.regain
        if not prepared.ok:
            lp.sick(prepared.reason or "the hypervisor does not answer")
        self.supervisor.start("health", self.keep_health)
        services.start_metadata_server(cfg, self.store, self.host, self.supervisor, on_ready=lp.guest_ready)
        services.start_lifecycle_events(worker_settings(cfg), lp.domains_changed, self.supervisor)
        services.start_console(cfg, self.store, self.host, self.supervisor)
        lp.resync()
        lp.next_resync = time.monotonic() + cfg.resync_interval
        LOG.info("host %s (%s) registered; %d workers on %s", self.host, self.name, cfg.workers, cfg.libvirt.uri)
        systemd.notify(f"READY=1\nSTATUS=serving host {self.name}")
        self.supervisor.watch("reconcile loop", lambda: lp.progress, allowance=max(60.0, 2 * cfg.resync_interval))
        self.supervisor.start_watchdog()
        lp.run(self.stopping)
        return self._close(locked=not live.lost_host)

    # -- the hypervisor's health, told to Placement and etcd ------------------------------------

    def on_health(self, healthy: bool, why: str | None) -> None:
        """The loop's word on the hypervisor; carried out by keep_health (Placement may be away)."""
        self.health = (healthy, why)
        self.metrics.health(healthy)

    def keep_health(self, stopping: threading.Event) -> None:
        """An unhealthy host locks its inventory (nothing new is placed here) and says why in its
        record; a healthy one again unlocks it. Retried until Placement and etcd take it."""
        while not stopping.wait(1.0):
            want = self.health
            if want == self._health_done:
                continue
            try:
                if want[0]:
                    self.register()
                else:
                    self.lock_inventory()
                    self._put_host("unhealthy", want[1])
                self._health_done = want
            except ECError as exc:
                LOG.warning("cannot record that the host is %s: %s", "healthy" if want[0] else "unhealthy", exc)

    # -- Placement registration and the host's record ------------------------------------------

    def register(self) -> bool:
        """Create or update our provider with measured inventory (unlocking it) and traits; a host
        with its disks in a Ceph pool, the pool's sharing provider too (and says so in etcd)."""
        inventory.register(self.placement, self.cfg)
        if self.cfg.storage.backend == "rbd":
            rbd = self.cfg.storage.rbd
            self.store.put_pool(rbd.pool_provider(), f"rbd:{rbd.cluster}/{rbd.pool}")
        self.metrics.set_inventory(inventory.inventory(self.cfg))
        self._put_host("up")
        return True

    def lock_inventory(self) -> None:
        inventory.lock(self.placement, self.cfg)
        LOG.info("inventory locked (reserved = total)")

    def _put_host(self, state: str, reason: str | None = None) -> None:
        self.store.put_host({"uuid": self.host, "name": self.name, "hostname": inventory.hostname(),
                             "pid": os.getpid(), "state": state, "reason": reason,
                             "network": self.cfg.attachment(), "lease_ttl": self.cfg.lease_ttl,
                             "fence_margin": self.cfg.fence_margin(), "metrics": self.cfg.metrics,
                             "pool": host_pool(self.cfg), "updated_at": contract.now()})

    def serve_metrics(self, address: str) -> MetricsHooks:
        """Prometheus metrics on `address`; loaded only here, so that a host without them never
        loads prometheus_client (metrics.py)."""
        from etcd_compute.ecompute.metrics import Metrics
        from md_server.server import guest_facing
        served = Metrics(self.host, self.name, stats_pool=lambda: WorkerPool(worker_settings(self.cfg), 1,
                                                                               name="stats"),
                         interval=self.cfg.metrics_interval)
        served.serve(address, guest_facing(self.cfg))
        return served

    def _retry(self, what: str, fn: Callable[[], T]) -> T | None:
        """Call fn until it works or we are asked to stop; None if stopped first.

        Only outages are waited out; an answer such as "that name is taken" is final.
        """
        delay = 0.5
        while not self.stopping.is_set():
            try:
                return fn()
            except (EtcdUnavailable, PlacementUnavailable, PlacementError) as exc:
                if isinstance(exc, PlacementError) and exc.status < 500:
                    raise  # a final answer (e.g. that name is taken), not an outage
                LOG.warning("cannot %s: %s; retrying in %.1fs", what, exc, delay)
                self.stopping.wait(delay)
                delay = min(delay * 2, 10.0)
        return None

    # -- shutdown ---------------------------------------------------------------------------------

    def _close(self, locked: bool) -> int:
        LOG.info("stopping")
        systemd.notify("STOPPING=1")
        rc = 1 if self.failure else 0
        lp = self.loop
        if lp is not None:
            lp.stop_watching()
            deadline = time.monotonic() + self.cfg.shutdown_timeout
            while lp.inflight and time.monotonic() < deadline:
                try:
                    lp._handle(timeout=0.2)
                except ECError as exc:
                    LOG.warning("while finishing jobs: %s", exc)
            if lp.inflight:
                LOG.warning("leaving %d jobs unfinished; the next start reconciles them", len(lp.inflight))
        self.metrics.close()
        self.pool.close()  # unfinished jobs are cut off: their BUILDING/DELETING state stays
        if locked and not self.failure:
            try:
                self.lock_inventory()
                self._put_host("locked")
            except ECError as exc:
                LOG.error("could not lock inventory: %s", exc)
                rc = 1
        self.lease_kept.set()
        if self._store is not None:
            if self.liveness is not None:
                self.liveness.close()
            self.store.close()
        return rc


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="compute.yaml (default: ./compute.yaml, /etc/etcd-compute/compute.yaml).")
def main(config_path: str | None) -> None:
    """Run the per-host daemon."""
    try:
        cfg = config.load_compute(config_path)
    except ConfigError as exc:
        click.echo(f"ecompute: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    logging.basicConfig(level=cfg.log_level, stream=sys.stderr,
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    daemon = Daemon(cfg)

    def stop(signum: int, _frame: Any) -> None:
        LOG.info("got %s", signal.Signals(signum).name)
        daemon.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        rc = daemon.run()
    except ECError as exc:
        LOG.error("%s", exc)
        daemon.stopping.set()
        daemon.pool.close()
        rc = exc.exit_code
    sys.exit(rc)
