"""Fixtures: real etcd, real Placement and real ecompute/eschedule processes.

The stack (etcd, Placement, libvirtd) comes from devstack.localstack, the processes
and waits from devstack.harness (shared with the benchmarks); each test gets its own
etcd prefix, its own config files and its own resource providers (named `test-...`,
deleted afterwards), so tests never see each other's state.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack import harness, localstack
from devstack.harness import BIN, Ecompute, Served, free_port

os.environ.setdefault("ECOMPUTE_PROFILE", "test")  # the suite never touches the demo's cloud
from etcd_compute.config import EtcdConfig, PlacementConfig
from etcd_compute.placement import PlacementClient
from etcd_compute.store import Store


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def pytest_configure(config: pytest.Config) -> None:
    for marker in ("qemu: boots real QEMU guests", "cloudguest: the real cloud-init guest's (last)",
                   "chaos: the seeded chaos run", f"quick: needs no stack (the quick tier, {QUICK_BUDGET:.0f} s)"):
        config.addinivalue_line("markers", marker)
    config.stash[STARTED] = time.monotonic()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The real cloud-init guest's tests last: its image (minutes to build) is built meanwhile
    by `devstack test`, in the background, while everything else runs. A test that needs no
    stack (no etcd, Placement, libvirt or daemon: pure functions, in-process fakes) is `quick`:
    `devstack test --quick` runs only those."""
    items.sort(key=lambda item: item.get_closest_marker("cloudguest") is not None)
    for item in items:
        if "stack" not in getattr(item, "fixturenames", ()) and not item.get_closest_marker("qemu"):
            item.add_marker(pytest.mark.quick)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """The tier's time against its budget (issue 24: quick tier, whole suite on two quiet cores)."""
    marks, paths = config.getoption("markexpr"), [a for a in config.args if a.startswith("tests/")]
    tier = None if paths else "quick tier" if marks == "quick" else "whole suite" if not marks else None
    if tier is None:
        return
    took = time.monotonic() - config.stash[STARTED]
    budget = QUICK_BUDGET if tier == "quick tier" else SUITE_BUDGET
    verdict = "within" if took <= budget else "OVER"
    terminalreporter.write_line(f"{tier}: {took:.0f} s, {verdict} its budget of {budget:.0f} s "
                                "(on two quiet cores)")


QUICK_BUDGET, SUITE_BUDGET = 120.0, 30 * 60.0
STARTED = pytest.StashKey[float]()


def _json_or_raw(value: bytes) -> Any:
    """A value as JSON, or as text when a test wrote garbage there on purpose."""
    try:
        return json.loads(value)
    except ValueError:
        return value.decode(errors="replace")


def own_domains(conn: Any, owner: str) -> dict[str, int]:
    """The domains on `conn` whose metadata names host `owner`: uuid -> libvirt id (-1: off).

    Only those are looked at, by what ecompute wrote in them: a libvirtd is shared (other tests,
    other stacks), and a domain of someone else's that vanishes between the listing and a look
    at it is no concern of the caller's. Name, uuid and id come with the listing (no call to
    libvirtd); the owner is read with one, which finds nothing for a domain gone meanwhile."""
    from etcd_compute.ecompute.driver import domain_name
    from etcd_compute.ecompute.libvirtdriver import _owner
    return {dom.UUIDString(): dom.ID() for dom in conn.listAllDomains()
            if dom.name() == domain_name(dom.UUIDString()) and _owner(dom) == owner}


@dataclass
class Cloud:
    """One test's cloud: a prefix in etcd, providers in Placement, config files in tmp."""

    stack: dict
    tmp: Path
    prefix: str = field(default_factory=lambda: f"/test-{uuidlib.uuid4().hex[:8]}")
    computes: list[Ecompute] = field(default_factory=list)
    servers: list[harness.ApiServer] = field(default_factory=list)

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

    def compute_config(self, name: str, *, traits: list[str] = (), inventory: dict | None = None,
                       **kwargs: Any) -> dict:
        """Host `name` of this test: a stable uuid, files under the stack dir (QEMU, running as
        libvirt-qemu, must reach them), the test's own metadata server port."""
        uuid = kwargs.pop("uuid", None) or str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, self.prefix + name))
        return harness.compute_config(
            self.stack, self.files / name, uuid=uuid,
            name=f"test-{self.prefix[6:]}-{name}", prefix=self.prefix, md_port=self.md_port,
            traits=list(traits), inventory=inventory or harness.INVENTORY, **{"resync_interval": 3600, **kwargs})

    def compute(self, name: str = "host1", start: bool = True, **kwargs: Any) -> Ecompute:
        cp = Ecompute(name, self.compute_config(name, **kwargs), self.tmp)
        self.computes.append(cp)
        if start:
            self.start(cp)
        return cp

    def qemu_host(self, name: str = "qemu1", **kwargs: Any) -> Ecompute:
        """A host on real QEMU for diskless domains (no network, no metadata server): its
        domains outlive its daemon, as on a real host, and start in well under a second."""
        return self.compute(name, uri="qemu:///system", network={"mode": "none"}, metadata={"enabled": False},
                            **kwargs)

    def domains(self, host: Ecompute) -> dict[str, int]:
        """The QEMU domains `host` owns, on its libvirtd: uuid -> libvirt domain id (changes on every
        start; -1 off)."""
        import libvirt
        conn = libvirt.open(host.cfg["libvirt"]["uri"])
        try:
            return own_domains(conn, host.host)
        finally:
            conn.close()

    def start(self, cp: Ecompute) -> Ecompute:
        cp.start()
        cp.wait_ready(30)
        return cp

    def host_record(self, host: str) -> dict | None:
        return self.store.hosts().get(host)

    def api(self) -> harness.ApiServer:
        """This test's API server (on its prefix), started; stopped at cleanup."""
        server = harness.ApiServer(self.schedule_yaml, self.files).start()
        self.servers.append(server)
        return server

    def token(self, project: str, admin: bool = False) -> str:
        """A new API token of `project`, made as an operator makes one: with the CLI."""
        r = self.eschedule("token", "create", project, *(["--admin"] if admin else []))
        assert r.rc == 0, r
        return r.out.strip()

    def eschedule_argv(self, config: Path | None = None) -> list[str]:
        return [str(BIN / "eschedule"), "--config", str(config or self.schedule_yaml)]

    def console(self, uuid: str) -> bytes:
        """What `eschedule console UUID` prints (the exact bytes the guest wrote)."""
        return subprocess.run([*self.eschedule_argv(), "console", uuid], capture_output=True, timeout=30).stdout

    def console_log(self, host: str, uuid: str) -> Path:
        """The serial console log of instance `uuid` on host `host` (a name of this test's)."""
        return Path(self.compute_config(host)["instances_path"]) / f"{uuid}.console.log"

    def eschedule(self, *args: str, config: Path | None = None, timeout: float = 90) -> Result:
        p = subprocess.run([*self.eschedule_argv(config), *args], capture_output=True, text=True, timeout=timeout)
        return Result(p.returncode, p.stdout, p.stderr)

    def boot(self, query: str = "resources=VCPU:1,MEMORY_MB:256,DISK_GB:1") -> dict:
        r = self.eschedule(query, "--wait", "--json")
        assert r.rc == 0, r
        view = r.json()
        assert view["state"] == "ACTIVE", view
        return view

    def show(self, uuid: str) -> dict:
        r = self.eschedule(uuid, "--json")
        assert r.rc == 0, r
        return r.json()

    def etcd_values(self) -> dict[str, Any]:
        """Every key under this test's prefix, decoded."""
        return {meta.key.decode(): _json_or_raw(value)
                for value, meta in self.store.client.get_prefix(self.prefix + "/")}

    def instance_keys(self) -> dict[str, Any]:
        kinds = tuple(f"{self.prefix}/{kind}/" for kind in ("requests", "instances", "index", "consoles"))
        return {k: v for k, v in self.etcd_values().items() if k.startswith(kinds)}

    def usages(self, host: str) -> dict[str, int]:
        return self.placement.usages(host)

    def cleanup(self) -> None:
        for server in self.servers:
            server.stop()
        for cp in self.computes:
            cp.kill_all()
            cp.kill_fence()
        self._remove_real_domains()
        for cp in self.computes:
            self.placement.delete_provider(cp.host)
        self.store.client.delete_prefix(self.prefix + "/")
        self.store.close()
        shutil.rmtree(self.files, ignore_errors=True)


    def _remove_real_domains(self) -> None:
        """A test that failed half-way may leave QEMU domains and a storage pool: remove them."""
        import libvirt

        from etcd_compute.ecompute.libvirtdriver import LibvirtDriver
        uuids = {k.rsplit("/", 1)[1] for k in self.instance_keys() if "/requests/" in k or "/instances/" in k}
        uris = {"qemu:///system"}
        for cp in self.computes:
            cfg = yaml.safe_load(cp.config.read_text())  # as started, not the defaults
            if cfg["libvirt"]["uri"].startswith("qemu"):  # the machine's libvirtd or a second host's
                uris.add(cfg["libvirt"]["uri"])
                driver = LibvirtDriver(cfg["libvirt"]["uri"], "qemu", cfg["instances_path"])
                network = cfg["network"].get("name") if cfg["network"].get("mode") != "none" else None
                # Also the domains of instances forgotten meanwhile (destroy --force of a dead
                # host that never came back): they would idle on for the rest of the suite.
                for uuid in uuids | set(driver.list_uuids(owner=cp.host)):
                    driver.destroy(uuid, network)
        for uri in uris:
            conn = libvirt.open(uri)
            try:
                for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
                    with contextlib.suppress(libvirt.libvirtError):  # another test's, gone since listed
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


def _in_use(rp: dict, live: str, stack_dir: Path) -> bool:
    """Is a `test-...` provider still someone's: served by a live ecompute, or of a test whose
    files were made in the last hour (a concurrent run's test whose hosts are down on purpose)?"""
    if rp["uuid"] in live:
        return True
    files = stack_dir / "tests" / "-".join(rp["name"].split("-")[:2])
    with contextlib.suppress(OSError):
        return time.time() - files.stat().st_mtime < 3600
    return False


@pytest.fixture(scope="session")
def stack() -> dict:
    info = localstack.ensure_up()
    placement = PlacementClient(PlacementConfig(endpoint=info["placement"]))
    live = _live_ecompute_configs()
    for rp in placement.providers():  # leftovers of an interrupted earlier run
        if rp["name"].startswith("test-") and not _in_use(rp, live, Path(info["stack"])):
            placement.delete_provider(rp["uuid"])
    return info


@pytest.fixture
def cloud(stack: dict, tmp_path: Path) -> Iterator[Cloud]:
    c = Cloud(stack, tmp_path)
    yield c
    c.cleanup()


@pytest.fixture
def private_etcd(tmp_path: Path) -> Iterator[harness.Etcd]:
    """An etcd of the test's own, for tests that stop etcd under a client."""
    with harness.Etcd(tmp_path / "etcd") as etcd:
        yield etcd


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


@pytest.fixture
def slow_image(tmp_path: Path, guest_disk: bytes):
    (tmp_path / "www").mkdir()
    served = Served(tmp_path / "www", delay=4.0)
    yield served.add("slow.qcow2", guest_disk)
    served.close()


@pytest.fixture(scope="module")
def guest_disk() -> bytes:
    from devstack.testguest import ensure_guest
    return Path(ensure_guest()["disk"]).read_bytes()


@pytest.fixture(scope="session")
def pg_placement(stack: dict) -> Iterator[harness.PgPlacement]:
    """A second Placement of the session, on PostgreSQL with 2 gunicorn workers (one thread each,
    as Placement is usually deployed): there claims really run side by side in the database and
    meet each other's provider generations, which the stack's SQLite Placement (one request at a
    time) never lets happen. Started on first use, stopped with its cluster at the session's end.

    allocation_conflict_retry_count = 1: Placement 16.0 retries a claim that lost the generation
    race inside the same transaction, which still holds the lost attempt's rows, and then lets it
    exceed the capacity ("reduces existing overage"). With 1 the 409 concurrent_update reaches
    eschedule, which tries again in a fresh request: the retry a deployment must use.
    """
    with harness.postgres_placement(stack, workers=2, threads=1, conflict_retries=1) as pg:
        yield pg


# ---------------------------------------------------------------- issue 18: a second libvirt host, fault proxies

from collections.abc import Callable  # noqa: E402

from devstack.libvirthost import LibvirtHost  # noqa: E402
from devstack.netfault import FaultProxy  # noqa: E402


@pytest.fixture(scope="session")
def second_host(stack: dict) -> Iterator[LibvirtHost]:
    """A second libvirt host of the session (devstack/libvirthost.py): its own libvirtd and virtlogd,
    whose domains the machine's libvirtd never sees (nor it the machine's); a host of ecompute's
    with `uri=second_host.uri`. Started afresh (what an interrupted session left is killed and
    forgotten), stopped with every QEMU of its own at the end."""
    host = LibvirtHost("second", Path(stack["stack"]) / "hosts" / "second")
    host.stop()
    host.start(fresh=True)
    yield host
    host.stop()


@pytest.fixture
def fault_proxy() -> Iterator[Callable[[str], FaultProxy]]:
    """Makes FaultProxy's (devstack/netfault.py) to URLs: `proxy = fault_proxy(etcd.endpoint)`,
    then give a client `proxy.url`. Each is closed after the test."""
    made: list[FaultProxy] = []

    def make(url: str) -> FaultProxy:
        made.append(FaultProxy.to(url))
        return made[-1]
    yield make
    for proxy in made:
        proxy.close()


# ---------------------------------------------------------------- issue 19: Ceph RBD (devstack/ceph.py)

from devstack import ceph as devceph  # noqa: E402


@pytest.fixture(scope="session")
def ceph(stack: dict) -> devceph.CephInfo:
    """The stack's one-node Ceph, brought up on first use (seconds when it runs already), with its
    libvirt secret and rbd storage pool on the machine's libvirtd. Left running at the end, like
    etcd and Placement: `python3 -m devstack down` stops it."""
    return devceph.ensure_ceph(Path(stack["stack"]))
