"""The daemon's long-lived loops, supervised, and the services that run on them.

A loop that raises or returns while the daemon runs is logged with its traceback, counted
(etcd_compute_loop_restarts_total) and started again after a backoff; one that dies
more than MAX_RESTARTS times within RESTART_WINDOW seconds stops the daemon with a failure,
so that systemd starts it afresh. A loop that reports progress (the reconcile loop, the
keep-alive) counts as stuck once it has not made any for its allowance: the systemd
watchdog (WatchdogSec in the unit) is then no longer fed, and systemd restarts the daemon,
whose fence meanwhile holds (fence.py). So no loop dies silently and the daemon never
runs blind.

The services: the metadata server (md_server), the guests' consoles published to etcd
(console.py) and the hypervisor's lifecycle events (a listener process of its own, only
workers load libvirt), each on a supervised loop.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from etcd_compute import config, systemd
from etcd_compute.ecompute import pool
from etcd_compute.ecompute.console import ConsolePublisher
from etcd_compute.ecompute.hooks import MetricsHooks
from etcd_compute.ecompute.jobs import EVENTS_PROCESS, WorkerSettings
from etcd_compute.errors import ECError
from etcd_compute.store import Store

LOG = logging.getLogger("ecompute")
MAX_RESTARTS = 5
RESTART_WINDOW = 300.0


@dataclass
class _Loop:
    name: str
    target: Callable[[threading.Event], None]
    progress: Callable[[], float] | None
    allowance: float
    thread: threading.Thread | None = None
    restarts: list[float] | None = None


class Supervisor:
    """Runs loops on threads and restarts them; says which ones are stuck; feeds the watchdog."""

    def __init__(self, stopping: threading.Event, metrics: MetricsHooks, fail: Callable[[str], None]) -> None:
        self.stopping, self.metrics, self.fail = stopping, metrics, fail
        self.loops: dict[str, _Loop] = {}

    def start(self, name: str, target: Callable[[threading.Event], None], *,
              progress: Callable[[], float] | None = None, allowance: float = 60.0) -> None:
        """Run target(stopping) on a thread of its own, for as long as the daemon runs."""
        loop = _Loop(name, target, progress, allowance, restarts=[])
        self.loops[name] = loop
        loop.thread = threading.Thread(target=self._keep, args=(loop,), name=name, daemon=True)
        loop.thread.start()

    def watch(self, name: str, progress: Callable[[], float], allowance: float) -> None:
        """Count a loop that runs elsewhere (the main thread's reconcile loop) in stuck()."""
        self.loops[name] = _Loop(name, lambda stopping: None, progress, allowance)

    def _keep(self, loop: _Loop) -> None:
        delay = 1.0
        while not self.stopping.is_set():
            try:
                loop.target(self.stopping)
                if self.stopping.is_set():
                    return
                LOG.error("loop %r returned while the daemon runs; starting it again in %.0fs", loop.name, delay)
            except Exception:  # noqa: BLE001 - logged with its traceback, counted, started again
                LOG.exception("loop %r died; starting it again in %.0fs", loop.name, delay)
            self.metrics.loop_restarted(loop.name)
            now = time.monotonic()
            assert loop.restarts is not None
            loop.restarts = [t for t in loop.restarts if now - t < RESTART_WINDOW] + [now]
            if len(loop.restarts) > MAX_RESTARTS:
                self.fail(f"loop {loop.name!r} died {len(loop.restarts)} times in {RESTART_WINDOW:.0f}s")
                return
            self.stopping.wait(delay)
            delay = min(delay * 2, 30.0)

    def stuck(self) -> list[str]:
        """The loops that made no progress for longer than their allowance, or whose thread is gone."""
        now, found = time.monotonic(), []
        for loop in self.loops.values():
            if loop.thread is not None and not loop.thread.is_alive() and not self.stopping.is_set():
                found.append(f"{loop.name} (not running)")
            elif loop.progress is not None and now - loop.progress() > loop.allowance:
                found.append(f"{loop.name} (no progress for {now - loop.progress():.0f}s)")
        return found

    def start_watchdog(self) -> None:
        """Feed systemd's watchdog (WATCHDOG_USEC, set by WatchdogSec=) twice per period, only while
        no loop is stuck; without it nothing is started."""
        usec = os.environ.get("WATCHDOG_USEC")
        if not usec or not usec.isdigit() or os.environ.get("WATCHDOG_PID", str(os.getpid())) != str(os.getpid()):
            return
        period = int(usec) / 2e6

        def feed(stopping: threading.Event) -> None:
            said = False
            while not stopping.wait(period):
                stuck = self.stuck()
                if not stuck:
                    systemd.notify("WATCHDOG=1")
                    said = False
                elif not said:
                    LOG.error("not feeding the watchdog: stuck: %s", ", ".join(stuck))
                    said = True
        self.start("watchdog", feed)


# -- the services ----------------------------------------------------------------------------------

def metadata_url(cfg: config.ComputeConfig) -> str | None:
    """The metadata server as this host's guests reach it; None if it serves them not."""
    if not cfg.metadata.enabled or (cfg.bridge is None and cfg.network.mode == "none"):
        return None
    return f"http://{cfg.metadata.address}:{cfg.metadata.port}"


def start_metadata_server(cfg: config.ComputeConfig, store: Store, host: str, supervisor: Supervisor,
                          on_ready: Callable[[str, float], None] | None = None) -> None:
    """Serve cloud-init data on the metadata address, which PREPARE put on our bridge; a guest's
    word that it has booted goes to `on_ready` (the loop)."""
    url = metadata_url(cfg)
    if url is None:
        return
    from md_server.server import MetadataServer, guest_facing, serve_metrics
    try:
        server = MetadataServer((cfg.metadata.address, cfg.metadata.port), store, host, url=url, on_ready=on_ready)
    except OSError as exc:
        raise ECError(f"metadata server cannot listen on {cfg.metadata.address}:"
                      f"{cfg.metadata.port}: {exc.strerror}") from None

    def serve(stopping: threading.Event) -> None:
        def stop() -> None:
            stopping.wait()
            server.shutdown()
        threading.Thread(target=stop, name="md_server stop", daemon=True).start()
        server.serve_forever()
    supervisor.start("md_server", serve)
    LOG.info("metadata server on http://%s:%d", cfg.metadata.address, cfg.metadata.port)
    if cfg.metadata.metrics:
        serve_metrics(cfg.metadata.metrics, server.registry, "metadata.metrics", guest_facing(cfg))


def start_console(cfg: config.ComputeConfig, store: Store, host: str, supervisor: Supervisor) -> None:
    publisher = ConsolePublisher(store, host, Path(cfg.instances_path), cfg.console_interval)
    supervisor.start("console", publisher.run)


def start_lifecycle_events(settings: WorkerSettings, changed: threading.Event, supervisor: Supervisor) -> None:
    """Listen to the hypervisor's lifecycle events in a process of their own (only workers load
    libvirt), so that a guest's power-off or a crash is seen at once, not at the next resync;
    `changed` is set on each. Restarted should it die. test:///default keeps each worker's
    domains inside that worker, where no listener can see them, and a fake hypervisor has no
    events: nothing to listen to there."""
    if settings.uri.startswith(("test:", "fake:")):
        return
    events: multiprocessing.Queue[str] = pool.context().Queue()

    def listen(stopping: threading.Event) -> None:
        proc = pool.start_listener(settings, events, EVENTS_PROCESS)
        try:
            while not stopping.is_set():
                if not proc.is_alive():
                    changed.set()  # what it may have missed
                    raise RuntimeError(f"the lifecycle event listener exited ({proc.exitcode})")
                try:
                    uuid = events.get(timeout=1.0)
                except queue.Empty:
                    continue
                LOG.debug("lifecycle event of %s", uuid)
                changed.set()
        finally:
            if proc.is_alive():
                proc.kill()
                proc.join(2)
    supervisor.start("lifecycle events", listen)
