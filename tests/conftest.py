"""Test harness: real etcd, real Placement and real ecompute/eschedule processes.

The stack (etcd, Placement, libvirtd) comes from devstack.localstack; each test
gets its own etcd prefix, its own config files and its own resource providers
(named `test-...`, deleted afterwards), so tests never see each other's state.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack import localstack

os.environ.setdefault("ECOMPUTE_PROFILE", "test")  # the suite never touches the demo's cloud
from etcd_compute.config import EtcdConfig, PlacementConfig
from etcd_compute.placement import PlacementClient
from etcd_compute.store import Store

BIN = Path(sys.executable).parent


def wait_until(check: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class ComputeProc:
    name: str
    host: str
    config: Path
    log: Path
    proc: subprocess.Popen | None = None

    def start(self) -> "ComputeProc":
        with self.log.open("a") as log:
            log.write("=== start\n")
        # Its own session, so a test can kill the daemon with its workers, as a crash of the
        # whole service (or systemd's SIGKILL of the cgroup) would.
        self.proc = subprocess.Popen([BIN / "ecompute", "--config", self.config],
                                     stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    def kill_all(self) -> None:
        """SIGKILL the daemon and its worker processes at once."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):  # it may have exited already
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        self.proc = None
        return rc

    def logtext(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Cloud:
    """One test's cloud: a prefix in etcd, providers in Placement, config files in tmp."""

    stack: dict
    tmp: Path
    prefix: str = field(default_factory=lambda: f"/test-{uuidlib.uuid4().hex[:8]}")
    computes: list[ComputeProc] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.files = Path(self.stack["stack"]) / "tests" / self.prefix.strip("/")
        self.files.mkdir(parents=True, exist_ok=True)
        for d in (self.files.parent, self.files):
            d.chmod(0o755)
        self.md_port = free_port()  # each test's metadata server on its own port of 169.254.169.254
        self.placement = PlacementClient(PlacementConfig(endpoint=self.stack["placement"]))
        self.store = Store(EtcdConfig(endpoints=[self.stack["etcd"]], prefix=self.prefix))
        self.schedule_yaml = self.write("schedule.yaml", {
            "etcd": {"endpoints": [self.stack["etcd"]], "prefix": self.prefix},
            "placement": {"endpoint": self.stack["placement"]},
            "wait_timeout": 60,
            "default_image": None,
        })

    def write(self, name: str, data: Any) -> Path:
        path = self.tmp / name
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
        return path

    def compute_config(self, name: str, *, uri: str = "test:///default", traits: list[str] = (),
                       inventory: dict | None = None, workers: int = 1, **extra: Any) -> dict:
        real = uri.startswith("qemu")
        files = self.files / name  # under the stack dir: QEMU (user libvirt-qemu) must reach it
        return {
            "uuid": str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, self.prefix + name)),
            "name": f"test-{self.prefix[6:]}-{name}",
            "etcd": {"endpoints": [self.stack["etcd"]], "prefix": self.prefix},
            "placement": {"endpoint": self.stack["placement"]},
            "libvirt": {"uri": uri, "domain_type": "qemu" if uri.startswith("qemu") else "auto"},
            "instances_path": str(files / "instances"),
            "image_cache_path": str(files / "images"),
            # test:///default has no DHCP: no NIC there; real guests sit on the isolated network.
            "network": localstack.ISOLATED_NETWORK if real else {"mode": "none"},
            "metadata": {"enabled": real, "port": self.md_port},
            "workers": workers,
            "traits": list(traits),
            "inventory": inventory or {"VCPU": {"total": 8, "allocation_ratio": 1.0},
                                       "MEMORY_MB": {"total": 4096, "reserved": 0},
                                       "DISK_GB": {"total": 40}},
            "resync_interval": 5,
            **extra,
        }

    def compute(self, name: str = "host1", start: bool = True, etcd: str | None = None,
                **kwargs: Any) -> ComputeProc:
        cfg = self.compute_config(name, **kwargs)
        if etcd:
            cfg["etcd"]["endpoints"] = [etcd]
        (self.tmp / name).mkdir(exist_ok=True)
        cp = ComputeProc(name, cfg["uuid"], self.write(f"{name}.yaml", cfg), self.tmp / f"{name}.log")
        self.computes.append(cp)
        if start:
            self.start(cp)
        return cp

    def start(self, cp: ComputeProc) -> ComputeProc:
        cp.start()
        wait_until(lambda: "registered;" in cp.logtext().split("=== start")[-1], 30, f"{cp.name} to register")
        return cp

    def host_record(self, host: str) -> dict | None:
        return self.store.hosts().get(host)

    def eschedule(self, *args: str, config: Path | None = None, timeout: float = 90) -> Result:
        cmd = [str(BIN / "eschedule"), "--config", str(config or self.schedule_yaml), *args]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return Result(p.returncode, p.stdout, p.stderr)

    def boot(self, query: str = "resources=VCPU:1,MEMORY_MB:256,DISK_GB:1") -> dict:
        r = self.eschedule(query, "--wait", "--json")
        assert r.rc == 0, r
        view = r.json()
        assert view["state"] == "ACTIVE", view
        return view

    def keys(self) -> dict[str, Any]:
        """Every key under this test's prefix, decoded."""
        return {meta.key.decode(): json.loads(value)
                for value, meta in self.store.client.get_prefix(self.prefix + "/")}

    def instance_keys(self) -> dict[str, Any]:
        return {k: v for k, v in self.keys().items()
                if not k.startswith((self.prefix + "/hosts/", self.prefix + "/alive/"))}

    def usages(self, host: str) -> dict[str, int]:
        return self.placement.usages(host)

    def cleanup(self) -> None:
        for cp in self.computes:
            if cp.proc is not None:
                cp.kill_all()
        self._remove_real_domains()
        for cp in self.computes:
            self.placement.delete_provider(cp.host)
        self.store.client.delete_prefix(self.prefix + "/")
        self.store.close()
        shutil.rmtree(self.files, ignore_errors=True)


    def _remove_real_domains(self) -> None:
        """A test that failed half-way may leave QEMU domains and a storage pool: remove them."""
        import libvirt
        from etcd_compute.driver import LibvirtDriver
        uuids = {k.rsplit("/", 1)[1] for k in self.instance_keys() if "/requests/" in k or "/instances/" in k}
        conn = libvirt.open("qemu:///system")
        try:
            for cp in self.computes:
                cfg = yaml.safe_load(cp.config.read_text())  # as started, not the defaults
                if cfg["libvirt"]["uri"].startswith("qemu"):
                    driver = LibvirtDriver("qemu:///system", "qemu", cfg["instances_path"])
                    for uuid in uuids:
                        driver.destroy(uuid)
            for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
                if f"<path>{self.files}/" in pool.XMLDesc(0):
                    pool.destroy()
        finally:
            conn.close()


def _live_ecompute_configs() -> str:
    """The text of every config file a running ecompute was started with."""
    texts = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            args = cmdline.read_bytes().split(b"\0")
            if any(a.endswith(b"/ecompute") for a in args) and b"--config" in args:
                texts.append(Path(args[args.index(b"--config") + 1].decode()).read_text())
    return "\n".join(texts)


def _in_use(uuid: str, live: str) -> bool:
    """Is a `test-...` provider still served by a live ecompute (another session's)?"""
    return uuid in live


@pytest.fixture(scope="session")
def stack() -> dict:
    info = localstack.ensure_up()
    placement = PlacementClient(PlacementConfig(endpoint=info["placement"]))
    live = _live_ecompute_configs()
    for rp in placement.providers():  # leftovers of an interrupted earlier run
        if rp["name"].startswith("test-") and not _in_use(rp["uuid"], live):
            placement.delete_provider(rp["uuid"])
    return info


@pytest.fixture
def cloud(stack: dict, tmp_path: Path) -> Iterator[Cloud]:
    c = Cloud(stack, tmp_path)
    yield c
    c.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def private_etcd(tmp_path: Path) -> Iterator[dict]:
    """An etcd of the test's own, for tests that stop etcd under a client."""
    client, peer = free_port(), free_port()
    data = tmp_path / "etcd"
    cmd = ["etcd", "--name", "t", "--data-dir", str(data),
           "--listen-client-urls", f"http://127.0.0.1:{client}",
           "--advertise-client-urls", f"http://127.0.0.1:{client}",
           "--listen-peer-urls", f"http://127.0.0.1:{peer}",
           "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
           "--initial-cluster", f"t=http://127.0.0.1:{peer}",
           "--heartbeat-interval", "10", "--election-timeout", "100"]
    def start() -> subprocess.Popen:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=(tmp_path / "etcd.log").open("ab"))

    proc = start()
    endpoint = f"http://127.0.0.1:{client}"
    import urllib.request

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(endpoint + "/health", timeout=1) as r:
                return b"true" in r.read()
        except OSError:
            return False

    wait_until(healthy, 20, "private etcd")
    info: dict = {"endpoint": endpoint, "proc": proc}

    def restart() -> None:
        """Start it again on the same data and ports (after a test killed it)."""
        info["proc"] = start()
        wait_until(healthy, 20, "private etcd to come back")

    info["restart"] = restart
    yield info
    if info["proc"].poll() is None:
        info["proc"].kill()
    info["proc"].wait()


def placement_cli(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, **localstack.placement_cli_env())
    openstack = Path(localstack.ensure_up()["placement_venv"]) / "bin" / "openstack"
    return subprocess.run([str(openstack), *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def shared_cloud(stack: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    """One cloud with one running host for a module of tests that must each write nothing."""
    c = Cloud(stack, tmp_path_factory.mktemp("shared"))
    c.compute("host1")
    yield c
    c.cleanup()
