"""Capacity is never handed out twice, even when Placement's own conflict retry would.

Placement 16.0 on PostgreSQL lets a claim that lost a provider's generation race through over
capacity when it retries it itself (allocation_conflict_retry_count > 1; see
etcd_compute/eschedule/overcommit.py for where and why). The race is forced here, not hoped
for: the provider's row is held locked in Placement's database until both claims have
checked capacity and wait to bump its generation, then released; the first one commits, the
second loses the generation and goes down Placement's retry path.
"""

from __future__ import annotations

import re
import subprocess
import threading
import uuid as uuidlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack import harness, localstack
from etcd_compute.config import EtcdConfig, PlacementConfig, ScheduleConfig
from etcd_compute.errors import NoCapacity, PlacementError
from etcd_compute.eschedule.operations import Operations
from etcd_compute.placement import CONCURRENT_UPDATE, PlacementClient
from etcd_compute.store import Store

OVERAGE = harness.OVERAGE_LOGGED


@pytest.fixture(scope="module")
def pg_default(stack: dict) -> Iterator[harness.PgPlacement]:
    """A Placement on PostgreSQL as it comes: allocation_conflict_retry_count left at 10."""
    with harness.postgres_placement(stack, workers=2, threads=1, conflict_retries=None) as pg:
        yield pg


class Hosts:
    """Providers of one test in a Placement, UP in the test's etcd prefix, found by a trait of
    their own (so only they are candidates); removed at the end."""

    def __init__(self, stack: dict, placement_url: str) -> None:
        self.stack, self.url = stack, placement_url
        self.placement = PlacementClient(PlacementConfig(endpoint=placement_url))
        self.prefix = f"/test-{uuidlib.uuid4().hex[:8]}"
        self.store = Store(EtcdConfig(endpoints=[stack["etcd"]], prefix=self.prefix))
        self.trait = f"CUSTOM_OVERCOMMIT_{uuidlib.uuid4().hex[:8].upper()}"
        self.query = f"resources=VCPU:1,MEMORY_MB:128&required={self.trait}"
        self.uuids: list[str] = []

    def add(self, vcpus: int) -> str:
        rp = str(uuidlib.uuid4())
        self.placement.ensure_provider(rp, f"test-{self.prefix[6:]}-{len(self.uuids)}")
        self.uuids.append(rp)
        self.placement.set_inventories(rp, {"VCPU": {"total": vcpus}, "MEMORY_MB": {"total": 4096}})
        self.placement.set_traits(rp, [self.trait])
        self.store.claim_alive(rp, 120, {"uuid": rp})
        return rp

    def operations(self) -> Operations:
        cfg = ScheduleConfig(etcd=EtcdConfig(endpoints=[self.stack["etcd"]], prefix=self.prefix), default_image=None)
        cfg.placement.endpoint = self.url
        return Operations(cfg)

    def vcpus_used(self, rp: str) -> int:
        return int(self.placement.usages(rp).get("VCPU", 0))

    def close(self) -> None:
        for rp in self.uuids:
            self.placement.delete_provider(rp)
        self.placement.request("DELETE", f"/traits/{self.trait}", ok=(204, 404, 409))
        self.store.client.delete_prefix(self.prefix + "/")
        self.store.close()


@pytest.fixture
def hosts_sqlite(stack: dict) -> Iterator[Hosts]:
    h = Hosts(stack, stack["placement"])
    yield h
    h.close()


@pytest.fixture
def hosts_pg_default(stack: dict, pg_default: harness.PgPlacement) -> Iterator[Hosts]:
    h = Hosts(stack, pg_default.url)
    yield h
    h.close()


def race(pg: harness.PgPlacement, rp: str, claims: list[Callable[[], Any]]) -> list[Any]:
    """Run `claims` (each one PUT /allocations on `rp`) side by side so that they meet: all get as
    far as the generation bump, then go on. Each one's result, or the exception it raised."""
    out: list[Any] = [None] * len(claims)

    def run(i: int) -> None:
        try:
            out[i] = claims[i]()
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test looks at
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(claims))]
    with harness.provider_row_held(pg, rp):
        for t in threads:
            t.start()
        harness.wait_until(lambda: harness.claims_waiting(pg) == len(claims), 30, "the claims to meet")
    for t in threads:
        t.join(60)
    return out


def log_since(log: Path, offset: int) -> str:
    with log.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


@pytest.mark.postgres
@pytest.mark.parametrize("retries", [None, 1])
def test_placement_retry_lets_the_losing_claim_over_capacity(stack: dict, retries: int | None) -> None:
    """The reproduction, with bare PUT /allocations and nothing of ours: with Placement's default
    (10 retries) the claim that lost the generation is retried inside its transaction, counts its
    own lost rows as existing usage and goes through over capacity; with 1 it gets a 409."""
    with harness.postgres_placement(stack, workers=2, threads=1, conflict_retries=retries) as pg:
        hosts = Hosts(stack, pg.url)
        try:
            rp = hosts.add(vcpus=1)
            project, user = str(uuidlib.uuid4()), str(uuidlib.uuid4())
            ours = {rp: {"resources": {"VCPU": 1, "MEMORY_MB": 128}}}
            offset = pg.log.stat().st_size

            def claim() -> None:
                PlacementClient(PlacementConfig(endpoint=pg.url)).claim(str(uuidlib.uuid4()), ours, project, user)

            results = race(pg, rp, [claim, claim])
            said = log_since(pg.log, offset)
            if retries is None:
                assert results == [None, None]  # both claims accepted ...
                assert hosts.vcpus_used(rp) == 2  # ... in a capacity of 1
                assert f"Over capacity for VCPU on resource provider {rp} but allocation of 1 {OVERAGE} " \
                       "from 2 to 2" in said, said[-2000:]
            else:
                errors = [r for r in results if r is not None]
                assert len(errors) == 1 and isinstance(errors[0], PlacementError), results
                assert errors[0].status == 409 and errors[0].code == CONCURRENT_UPDATE
                assert hosts.vcpus_used(rp) == 1 and OVERAGE not in said
        finally:
            hosts.close()


@pytest.mark.postgres
def test_racing_schedules_keep_capacity_on_placements_default_retry(hosts_pg_default: Hosts,
                                                                    pg_default: harness.PgPlacement) -> None:
    """The same race through eschedule, against Placement's default: Placement lets both claims
    stand (its log says so), and the recheck after claiming gives one back: one instance placed,
    one refused, the provider at its capacity."""
    hosts = hosts_pg_default
    rp = hosts.add(vcpus=1)
    ops = [hosts.operations(), hosts.operations()]
    for o in ops:
        _ = o.store, o.placement  # connected before the race
    offset = pg_default.log.stat().st_size
    results = race(pg_default, rp, [lambda o=o: o.schedule(hosts.query) for o in ops])
    assert OVERAGE in log_since(pg_default.log, offset)  # Placement did let the second claim through
    placed = [r for r in results if isinstance(r, dict)]
    assert len(placed) == 1 and [type(r) for r in results if r not in placed] == [NoCapacity], results
    assert hosts.vcpus_used(rp) == 1
    assert set(hosts.placement.provider_allocations(rp)) == {placed[0]["uuid"]}


def test_a_claim_found_over_capacity_is_freed_and_placed_elsewhere(hosts_sqlite: Hosts) -> None:
    """Deterministic, on any Placement: right after the first claim is accepted, a racer's claim
    stands beside it over capacity (let through while the inventory was briefly larger: the state
    Placement's retry leaves). The recheck frees our claim and the instance goes to the other
    provider; the first one holds only the racer's."""
    hosts = hosts_sqlite
    a, b = hosts.add(vcpus=2), hosts.add(vcpus=2)
    ops = hosts.operations()
    real_claim = ops.placement.claim
    first: list[str] = []
    racer = str(uuidlib.uuid4())

    def claim_then_race(consumer: str, allocations: dict, project: str, user: str) -> None:
        real_claim(consumer, allocations, project, user)
        if not first:
            (rp,) = allocations
            first.append(rp)
            hosts.placement.set_inventories(rp, {"VCPU": {"total": 3}, "MEMORY_MB": {"total": 4096}})
            real_claim(racer, {rp: {"resources": {"VCPU": 2}}}, project, user)
            hosts.placement.set_inventories(rp, {"VCPU": {"total": 2}, "MEMORY_MB": {"total": 4096}})

    ops.placement.claim = claim_then_race  # type: ignore[method-assign]
    request = ops.schedule(hosts.query)
    other = ({a, b} - set(first)).pop()
    assert request["host"] == other and set(request["allocations"]) == {other}
    assert set(hosts.placement.provider_allocations(first[0])) == {racer} and hosts.vcpus_used(first[0]) == 2
    assert hosts.vcpus_used(other) == 1


def test_install_md_placement_conf_is_read_as_meant(tmp_path: Path, stack: dict) -> None:
    """INSTALL.md's placement.conf, read by Placement's own option parser: one conflict retry, and
    every value valid (oslo.config takes a '# ...' after a value as part of the value)."""
    text = (localstack.REPO / "INSTALL.md").read_text()
    block = re.search(r"cat > /etc/placement/placement.conf <<'CONF'\n(.*?)\nCONF\n", text, re.S)
    assert block, "INSTALL.md no longer writes /etc/placement/placement.conf"
    (tmp_path / "placement.conf").write_text(block.group(1) + "\n")
    read = subprocess.run([str(Path(stack["placement_venv"]) / "bin" / "python"), "-c", (
        "import sys\nfrom oslo_config import cfg\nfrom placement import conf\n"
        "c = cfg.ConfigOpts()\nconf.register_opts(c)\n"
        "c(['--config-file', sys.argv[1]], project='placement', default_config_files=[], default_config_dirs=[])\n"
        "print(c.api.auth_strategy, c.placement.allocation_conflict_retry_count)\n"),
        str(tmp_path / "placement.conf")], capture_output=True, text=True, timeout=60)
    assert read.returncode == 0, read.stderr[-1500:]
    auth, retries = read.stdout.split()
    assert auth in ("keystone", "noauth2") and retries == "1"
