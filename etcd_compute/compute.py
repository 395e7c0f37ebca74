"""ecompute: the per-host daemon. Registers the host in Placement, then reconciles.

The heart is `reconcile(uuid)`: read what is requested (etcd request key), read
what is (etcd actual key), start the one action that closes the gap, and look again
when it ends. It is level-triggered, so a repeated watch event, a periodic resync
or a restart all just lead to the same comparison and are harmless.

Startup lists every request of this host and watches from the revision of that
list (the Kubernetes list+watch pattern); the watch itself resumes from the last
revision it delivered after an etcd outage, backing off meanwhile. Every resync
also asks the hypervisor which domains it runs and removes those no request of
this host names (orphans: e.g. instances evacuated while this host was down).
Liveness is a key on an etcd lease this daemon keeps refreshing. On SIGINT/SIGTERM
it lets running jobs finish (bounded), locks its inventory (reserved = total) so
nothing new is scheduled here, and exits 0.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import socket
import sys
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import click

from etcd_compute import config, host, layout, worker
from etcd_compute.errors import ConfigError, ECError, EtcdUnavailable, PlacementUnavailable
from etcd_compute.placement import PlacementClient
from etcd_compute.store import PrefixWatch, Store

LOG = logging.getLogger("ecompute")
POWER = {layout.ACTIVE_REQ: "running", layout.STOPPED_REQ: "shutoff", layout.SUSPENDED_REQ: "paused"}


class Compute:
    def __init__(self, cfg: config.ComputeConfig) -> None:
        self.cfg = cfg
        self.host = cfg.host_uuid()
        self.name = cfg.host_name()
        self.pool = self._new_pool()
        self.placement = PlacementClient(cfg.placement)
        self.store: Store | None = None
        self.events: queue.Queue[tuple[str, str, Any]] = queue.Queue()
        self.queued: set[str] = set()
        self.lock = threading.Lock()
        self.inflight: dict[str, str] = {}
        self.stopping = threading.Event()
        self.watch: PrefixWatch | None = None
        self.resync_now = threading.Event()
        self.lease: int | None = None

    def _new_pool(self) -> ProcessPoolExecutor:
        """Spawned (not forked) workers: they must never inherit the etcd client's gRPC channel.

        A ProcessPoolExecutor, not a multiprocessing.Pool: when a worker dies abruptly
        (a crash, or SIGTERM sent to the whole process group) it reports a broken pool
        instead of hanging on a lock the dead worker held.
        """
        return ProcessPoolExecutor(self.cfg.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=worker.init, initargs=(worker.settings(self.cfg),))

    def _run_job(self, fn: Any, *args: Any, then: Any) -> None:
        """Run fn(*args) in a worker; then(result dict) runs in a pool thread when it ends."""
        def done(future: Future) -> None:
            try:
                then(future.result())
            except BrokenProcessPool:
                then({"ok": False, "interrupted": True, "reason": "worker process died"})
            except Exception as exc:  # noqa: BLE001 - a job must always report back
                then({"ok": False, "reason": f"{fn.__name__} failed: {exc!r}"})
        try:
            future = self.pool.submit(fn, *args)
        except BrokenProcessPool:
            LOG.warning("worker pool broken (a worker died); starting a new one")
            self.pool = self._new_pool()
            future = self.pool.submit(fn, *args)
        future.add_done_callback(done)

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        Path(self.cfg.instances_path).mkdir(parents=True, exist_ok=True)
        self.store = self._retry("connect to etcd", lambda: Store(self.cfg.etcd))
        if self.store is None:
            return self._close(locked=False)
        prepared = self.pool.submit(worker.prepare).result()  # network and storage before the first build
        if not prepared["ok"]:
            raise ECError(prepared["reason"])
        if self._retry("register in Placement", self.register) is None:
            return self._close(locked=False)
        self.start_metadata_server()
        threading.Thread(target=self.keep_alive, name="liveness", daemon=True).start()
        self.resync()
        LOG.info("host %s (%s) registered; %d workers on %s", self.host, self.name,
                 self.cfg.workers, self.cfg.libvirt.uri)
        sd_notify(f"READY=1\nSTATUS=serving host {self.name}")
        next_resync = time.monotonic() + self.cfg.resync_interval
        while not self.stopping.is_set():
            try:
                if self.resync_now.is_set() or time.monotonic() >= next_resync:
                    self.resync_now.clear()
                    self.resync()
                    next_resync = time.monotonic() + self.cfg.resync_interval
                self._handle(timeout=0.5)
            except ECError as exc:  # etcd or Placement away: back off, the resync redoes the work
                LOG.warning("%s; retrying in 2s", exc)
                self.stopping.wait(2.0)
                self.resync_now.set()
        return self._close(locked=True)

    def _handle(self, timeout: float) -> None:
        try:
            kind, uuid, payload = self.events.get(timeout=timeout)
        except queue.Empty:
            return
        if kind == "reconcile":
            with self.lock:
                self.queued.discard(uuid)
            self.reconcile(uuid)
        elif kind == "done":
            self.finish(uuid, *payload)
        elif kind == "domains":
            self.remove_orphans(payload)

    def enqueue(self, uuid: str) -> None:
        with self.lock:
            if uuid in self.queued:
                return
            self.queued.add(uuid)
        self.events.put(("reconcile", uuid, None))

    def resync(self) -> None:
        """List this host's requests, make sure the watch runs, reconcile them all, look for orphans."""
        assert self.store is not None
        requests, revision = self.store.host_requests(self.host)
        if self.watch is None:
            self.watch = self.store.watch(layout.requests_prefix(self.store.prefix, self.host), revision + 1,
                                          self.on_watch_event, self.on_watch_state)
            LOG.info("watching requests from revision %d (%d known)", revision + 1, len(requests))
        for uuid in requests:
            self.enqueue(uuid)
        # Ask the hypervisor first, compare with etcd when it answers: a domain listed
        # then was requested before, so a request created meanwhile cannot look orphaned.
        self._run_job(worker.domains, then=lambda r: self.events.put(("domains", "", r)))

    def on_watch_event(self, key: str, revision: int) -> None:
        """Runs in the watch thread: only note what changed, the loop does the work."""
        assert self.store is not None
        uuid = layout.instance_from_request_key(self.store.prefix, self.host, key)
        if uuid:
            self.enqueue(uuid)

    def on_watch_state(self, state: str) -> None:
        if state in ("up", "compacted"):
            LOG.info("etcd watch %s: resyncing", "back" if state == "up" else "compacted")
            self.resync_now.set()

    def keep_alive(self) -> None:
        """Keep PREFIX/alive/<host> on a lease; re-grant it if it lapsed (e.g. etcd was down)."""
        assert self.store is not None
        ttl = self.cfg.lease_ttl
        record = {"uuid": self.host, "pid": os.getpid(), "since": layout.now()}
        while not self.stopping.is_set():
            try:
                if self.lease is None or not self.store.refresh_alive(self.lease):
                    self.lease = self.store.grant_alive(self.host, ttl, record)
                    LOG.info("alive on a %ds lease", ttl)
            except ECError as exc:
                LOG.debug("lease refresh failed: %s", exc)
            self.stopping.wait(ttl / 3)

    # -- reconcile --------------------------------------------------------------------------

    def reconcile(self, uuid: str) -> None:
        """Compare requested with actual for one instance and start what closes the gap."""
        if uuid in self.inflight:
            return  # finish() looks again when the running job ends
        assert self.store is not None
        request = self.store.get_request(self.host, uuid)
        status = self.store.get_status(uuid)
        if request is None:
            if status and status.get("host") == self.host:
                self.submit("destroy", uuid)  # nobody requests it any more
            return
        state = status["state"] if status else None
        desired = request["desired"]
        if desired == layout.DELETED_REQ:
            if state != layout.DELETING:
                self.put_status(uuid, layout.DELETING, status)
            self.submit("destroy", uuid)
        elif state in (None, layout.BUILDING):  # BUILDING with no job here: a build was cut off
            self.put_status(uuid, layout.BUILDING, status)
            self.submit("build", uuid, request)
        elif state in (layout.ERROR, layout.DELETING):
            return
        elif state != layout.TARGET[desired]:
            self.submit("power", uuid, POWER[desired])
        elif request.get("reboot", 0) > status.get("reboots", 0):
            self.submit("reboot", uuid)

    def submit(self, action: str, uuid: str, *args: Any) -> None:
        self.inflight[uuid] = action
        LOG.info("%s %s %s", action, uuid, " ".join(map(str, args[:1])) if action == "power" else "")
        self._run_job(getattr(worker, "destroy" if action == "orphan" else action), uuid, *args,
                      then=lambda result: self.events.put(("done", uuid, (action, result))))

    def finish(self, uuid: str, action: str, result: dict) -> None:
        """Report a job's outcome, then reconcile again: the request may have changed meanwhile."""
        del self.inflight[uuid]
        assert self.store is not None
        if result.get("interrupted"):  # the job's worker died: nothing is known, so nothing is reported
            LOG.warning("%s of %s interrupted; the next reconcile redoes it", action, uuid)
            if not self.stopping.is_set():
                self.enqueue(uuid)
            return
        if action == "orphan":
            LOG.info("orphan %s removed: no request of this host names it", uuid)
            return
        status = self.store.get_status(uuid)
        if action == "build":
            if result["ok"]:
                self.put_status(uuid, layout.ACTIVE, status, domain=result["domain"], ip=result["ip"],
                                reason=result["reason"])
            else:
                self.put_status(uuid, layout.ERROR, status, reason=result["reason"])
                self.free_allocation(uuid)
        elif action in ("power", "reboot"):
            request = self.store.get_request(self.host, uuid)
            if result.get("missing") and request is not None:  # the domain vanished: build it again
                self.put_status(uuid, layout.BUILDING, status, reason="domain was gone; rebuilding")
                self.enqueue(uuid)
                return
            if not result["ok"] or request is None:
                self.put_status(uuid, status["state"], status, reason=result.get("reason"))
                return  # no retry loop on a failing hypervisor: the next resync tries again
            state = {"running": layout.ACTIVE, "shutoff": layout.STOPPED,
                     "paused": layout.SUSPENDED}[result["domain"]["state"]]
            reboots = request.get("reboot", 0) if action == "reboot" else None
            self.put_status(uuid, state, status, domain=result["domain"], reboots=reboots,
                            event=f"{state} (rebooted)" if action == "reboot" else None)
        elif not result["ok"]:
            self.put_status(uuid, layout.DELETING, status, reason=result["reason"])
        elif self.free_allocation(uuid):
            self.store.finish_delete(self.host, uuid)
            LOG.info("instance %s deleted", uuid)
        else:
            self.put_status(uuid, layout.DELETING, status, reason="waiting for Placement to free the allocation")
            return  # no hot loop while Placement is away: the next resync tries again
        self.enqueue(uuid)

    def remove_orphans(self, result: dict) -> None:
        """Destroy local domains that no request of this host names (never touching Placement)."""
        if not result["ok"]:
            LOG.warning("cannot list domains: %s", result["reason"])
            return
        assert self.store is not None
        requested, _ = self.store.host_requests(self.host)
        for uuid in result["uuids"]:
            if uuid not in requested and uuid not in self.inflight:
                self.submit("orphan", uuid)

    def free_allocation(self, uuid: str) -> bool:
        try:
            self.placement.delete_allocations(uuid)
            return True
        except ECError as exc:
            LOG.warning("could not free allocation of %s: %s (will retry)", uuid, exc)
            return False

    def put_status(self, uuid: str, state: str, old: dict | None, **fields: Any) -> None:
        """Write the actual state, unless it would only repeat what is there."""
        assert self.store is not None
        if old and old["state"] == state and old.get("reason") == fields.get("reason") and not (
                fields.keys() - {"reason"}):
            return
        self.store.put_status(layout.new_status(uuid, self.host, state, old=old, **fields))

    # -- Placement registration and the metadata server -------------------------------------

    def register(self) -> bool:
        """Create or update our provider with measured inventory (unlocking it) and traits."""
        self.placement.ensure_provider(self.host, self.name)
        self.placement.set_inventories(self.host, host.inventory(self.cfg))
        self.placement.set_traits(self.host, host.traits(self.cfg))
        self._put_host("up")
        return True

    def lock_inventory(self) -> None:
        self.placement.set_inventories(self.host, host.inventory(self.cfg, locked=True))
        LOG.info("inventory locked (reserved = total)")

    def _put_host(self, state: str) -> None:
        assert self.store is not None
        self.store.put_host({"uuid": self.host, "name": self.name, "hostname": host.hostname(),
                             "pid": os.getpid(), "state": state, "updated_at": layout.now()})

    def start_metadata_server(self) -> None:
        """Serve cloud-init data on the metadata address, which prepare() put on our bridge."""
        if not self.cfg.metadata.enabled or (self.cfg.bridge is None and self.cfg.network.mode == "none"):
            return
        from md_server.server import MetadataServer
        assert self.store is not None
        try:
            server = MetadataServer((self.cfg.metadata.address, self.cfg.metadata.port), self.store, self.host)
        except OSError as exc:
            raise ECError(f"metadata server cannot listen on {self.cfg.metadata.address}:"
                          f"{self.cfg.metadata.port}: {exc.strerror}") from None
        threading.Thread(target=server.serve_forever, name="md_server", daemon=True).start()
        LOG.info("metadata server on http://%s:%d", self.cfg.metadata.address, self.cfg.metadata.port)

    def _retry(self, what: str, fn: Any) -> Any:
        """Call fn until it works or we are asked to stop; None if stopped first.

        Only outages are waited out; an answer such as "that name is taken" is final.
        """
        delay = 0.5
        while not self.stopping.is_set():
            try:
                return fn()
            except (EtcdUnavailable, PlacementUnavailable) as exc:
                LOG.warning("cannot %s: %s; retrying in %.1fs", what, exc, delay)
                self.stopping.wait(delay)
                delay = min(delay * 2, 10.0)
        return None

    # -- shutdown ---------------------------------------------------------------------------

    def _close(self, locked: bool) -> int:
        LOG.info("stopping")
        sd_notify("STOPPING=1")
        rc = 0
        if self.watch is not None:
            self.watch.stop()
        deadline = time.monotonic() + self.cfg.shutdown_timeout
        while self.inflight and time.monotonic() < deadline:
            try:
                self._handle(timeout=0.2)
            except ECError as exc:
                LOG.warning("while finishing jobs: %s", exc)
        if self.inflight:
            LOG.warning("leaving %d jobs unfinished; the next start reconciles them", len(self.inflight))
        processes = list(getattr(self.pool, "_processes", {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for proc in processes:  # unfinished jobs are cut off: their BUILDING/DELETING state stays
            proc.terminate()
            proc.join(5)
        if locked:
            try:
                self.lock_inventory()
                self._put_host("locked")
            except ECError as exc:
                LOG.error("could not lock inventory: %s", exc)
                rc = 1
        if self.store is not None:
            if self.lease is not None:
                try:
                    self.store.revoke_alive(self.lease)  # DOWN at once, not after the TTL
                except ECError:
                    pass
            self.store.close()
        return rc


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) how we are; a no-op when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract socket namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        LOG.warning("cannot notify systemd at %s: %s", address, exc)


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
    compute = Compute(cfg)

    def stop(signum: int, _frame: Any) -> None:
        LOG.info("got %s", signal.Signals(signum).name)
        compute.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        rc = compute.run()
    except ECError as exc:
        LOG.error("%s", exc)
        compute.stopping.set()
        compute.pool.shutdown(wait=False, cancel_futures=True)
        rc = exc.exit_code
    sys.exit(rc)
