"""What each of ecompute's processes loads (issue 13, goal 3: the daemon idles light).

The daemon keeps etcd3 and the Placement client and never loads libvirt, nor prometheus_client
when no metrics are served; its workers load the driver and libvirt, and what only a build uses
(images, the config drive) with the first build. Checked on running processes: their memory
maps (shared objects) and, through the daemon's own pool, a worker's sys.modules. The memory
figures themselves are bench/agents.py's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

from devstack.harness import wait_until

from conftest import Cloud

# Never in an idle worker: the daemon's side (etcd, Placement, config, CLI, metrics) and what
# only a build needs.
NOT_IN_WORKERS = ("etcd3", "grpc", "google.protobuf", "requests", "urllib3", "yaml", "click", "prometheus_client",
                  "md_server", "etcd_compute.store", "etcd_compute.placement", "etcd_compute.config",
                  "etcd_compute.ecompute.images", "etcd_compute.ecompute.configdrive")
# Never in the daemon of a host without metrics or metadata server.
NOT_IN_DAEMON = ("libvirt", "libvirtmod", "etcd_compute.ecompute.driver", "etcd_compute.ecompute.libvirtdriver",
                 "etcd_compute.ecompute.lifecycle", "etcd_compute.ecompute.worker",
                 "prometheus_client", "md_server", "etcd_compute.ecompute.metrics")

# The daemon in a process of its own, as `ecompute` runs it; once it watches, its own pool's
# worker answers with its modules (a MODULES job: it imports nothing for it).
PROBE = """
import json, sys, threading, time
from etcd_compute import config
from etcd_compute.ecompute.daemon import Daemon
from etcd_compute.ecompute.jobs import Job, JobKind
daemon = Daemon(config.load_compute(sys.argv[1]))
thread = threading.Thread(target=daemon.run, daemon=True)
thread.start()
deadline = time.monotonic() + 60
while (daemon.loop is None or daemon.loop.watch is None) and thread.is_alive() and time.monotonic() < deadline:
    time.sleep(0.1)
worker = list(daemon.pool.run(Job(JobKind.MODULES), 60).modules)
loaded = sorted(sys.modules)
daemon.stopping.set()
thread.join(60)
print(json.dumps({"daemon": loaded, "worker": worker}))
"""


def _loaded(modules: list[str], names: tuple[str, ...]) -> list[str]:
    return [m for m in modules if any(m == n or m.startswith(n + ".") for n in names)]


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_a_daemon_and_its_worker_load_only_what_they_use(cloud: Cloud) -> None:
    path = cloud.write("compute.yaml", cloud.compute_config("host1"))
    run = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = json.loads(run.stdout.splitlines()[-1])
    assert "etcd3" in loaded["daemon"] and "libvirt" in loaded["worker"]  # each has what it uses
    assert _loaded(loaded["daemon"], NOT_IN_DAEMON) == []
    assert _loaded(loaded["worker"], NOT_IN_WORKERS) == []


def test_a_running_host_maps_libvirt_in_its_workers_only(cloud: Cloud) -> None:
    """The real `ecompute`: read from /proc/PID/maps, whatever imported them."""
    host = cloud.compute("host1")
    assert host.proc is not None
    daemon = psutil.Process(host.proc.pid)

    def workers() -> list[psutil.Process]:
        return [p for p in daemon.children() if "spawn_main" in " ".join(p.cmdline())]

    wait_until(lambda: workers(), 30, "a pool worker")
    time.sleep(0.5)  # its first jobs (PREPARE, LIST_DOMAINS) ran: the worker is as it idles
    maps = _maps(daemon.pid)
    assert "cygrpc" in maps and "libvirt" not in maps
    for worker in workers():
        maps = _maps(worker.pid)
        assert "libvirtmod" in maps
        assert [so for so in ("cygrpc", "_yaml", "_ssl") if so in maps] == []
