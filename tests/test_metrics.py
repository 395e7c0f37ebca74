"""Prometheus metrics: ecompute's /metrics and the metadata server's, scraped over HTTP and read
with prometheus_client's own parser, move as instances come and go."""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import re
import socket
import threading
import time
import urllib.request
import uuid as uuidlib
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from devstack import harness
from devstack.harness import free_port, guest_report, wait_until
from devstack.testguest import ensure_guest
from etcd_compute import contract
from etcd_compute.ecompute import metrics
from etcd_compute.ecompute.jobs import JobKind, JobResult
from etcd_compute.errors import ConfigError
from etcd_compute.states import Actual
from md_server.server import MetadataServer, serve_metrics

from conftest import Cloud

SMALL = "resources=VCPU:1,MEMORY_MB:256,DISK_GB:1"
ID = "/latest/meta-data/instance-id"
Families = dict[str, Metric]


def scrape(address: str) -> Families:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        return {f.name: f for f in text_string_to_metric_families(resp.read().decode())}


def value(families: Families, name: str, **labels: str) -> float | None:
    """The value of the one sample `name` whose labels include `labels`; None if there is none."""
    found = [s.value for f in families.values() for s in f.samples
             if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def num(families: Families, name: str, **labels: str) -> float:
    """value(), which must be there."""
    found = value(families, name, **labels)
    assert found is not None, (name, labels)
    return found


def until(address: str, check: Callable[[Families], object], what: str, timeout: float = 10) -> Families:
    """Scrape until check(families) holds (the daemon updates its metrics just after etcd); the last scrape."""
    last: list[Families] = []

    def look() -> bool:
        last[:] = [scrape(address)]
        return bool(check(last[0]))
    wait_until(look, timeout, what, interval=0.2)
    return last[0]


def check_names(families: Families) -> None:
    """Prometheus' naming rules, on every family served."""
    ours = [f for f in families.values() if f.name.startswith("etcd_compute_")]
    assert ours
    for family in families.values():
        names = {s.name for s in family.samples}
        assert re.fullmatch(r"[a-z_][a-z0-9_]*", family.name), family.name
        assert family.documentation, family.name
        assert not any(n.endswith("_created") for n in names), family.name
        if family.type == "counter":
            assert all(n.endswith("_total") for n in names), (family.name, names)
        else:
            assert not family.name.endswith("_total"), family.name
        if family.type == "histogram":
            assert family.name.endswith(("_seconds", "_bytes")), family.name
    for family in ours:
        base = family.name.removesuffix("_info")
        # Base units only, named last: seconds and bytes, never milli-, kilo- or mebi-anything.
        assert not re.search(r"_(milli\w*|micro\w*|nano\w*|kilo\w*|mega\w*|giga\w*|kib|mib|gib|kb|mb|gb|ms|us|ns|"
                             r"minutes|hours|percent)(_|$)", base), family.name
        for unit in ("seconds", "bytes"):
            if unit in base:
                assert base.endswith("_" + unit), family.name
        if family.name.endswith("_info"):
            assert family.type == "gauge" and all(s.value == 1 for s in family.samples), family.name
        elif family.name.startswith("etcd_compute_instance_"):
            # Per-instance values carry the uuid alone; the rest is in etcd_compute_instance_info.
            assert all(set(s.labels) == {"uuid"} for s in family.samples), family.name


def test_instances_allocations_and_build_times_move_with_an_instance(cloud: Cloud) -> None:
    address = f"127.0.0.1:{free_port()}"
    host = cloud.compute("host1", metrics=address)
    before = scrape(address)
    check_names(before)
    assert value(before, "etcd_compute_host_info", host=host.host) == 1
    assert value(before, "etcd_compute_instances", state="ACTIVE") == 0
    assert {rc: value(before, "etcd_compute_host_capacity", resource_class=rc)
            for rc in ("VCPU", "MEMORY_MB", "DISK_GB")} == {"VCPU": 8, "MEMORY_MB": 4096, "DISK_GB": 40}
    assert value(before, "etcd_compute_host_allocated", resource_class="VCPU") == 0
    assert value(before, "etcd_compute_build_duration_seconds_count", result="ok") == 0

    uuid = cloud.boot(SMALL)["uuid"]
    now = until(address, lambda m: value(m, "etcd_compute_schedule_to_active_seconds_count") == 1, "ACTIVE")
    assert value(now, "etcd_compute_instances", state="ACTIVE") == 1
    assert value(now, "etcd_compute_instances", state="BUILDING") == 0
    assert {rc: value(now, "etcd_compute_host_allocated", resource_class=rc)
            for rc in ("VCPU", "MEMORY_MB", "DISK_GB")} == {"VCPU": 1, "MEMORY_MB": 256, "DISK_GB": 1}
    assert value(now, "etcd_compute_build_duration_seconds_count", result="ok") == 1
    assert 0 < num(now, "etcd_compute_build_duration_seconds_sum", result="ok") < 30
    assert 0 < num(now, "etcd_compute_schedule_to_active_seconds_sum") < 30
    assert value(now, "etcd_compute_instance_info", uuid=uuid, host=host.host, project="etcd-compute",
                 hostname=f"ec-{uuid[:8]}") == 1
    assert value(now, "etcd_compute_start_to_ip_seconds_count") == 0  # test:///default: no NIC, no address
    check_names(now)

    r = cloud.eschedule("destroy", uuid, "--wait")
    assert r.rc == 0, r
    after = until(address, lambda m: value(m, "etcd_compute_instance_info", uuid=uuid) is None, "the instance gone")
    assert all(value(after, "etcd_compute_instances", state=state) == 0 for state in Actual)
    assert value(after, "etcd_compute_host_allocated", resource_class="VCPU") == 0
    assert value(after, "etcd_compute_build_duration_seconds_count", result="ok") == 1  # a counter stays
    assert sum(s.value for s in after["etcd_compute_reconcile_errors"].samples) == 0


def test_a_failed_build_counts_as_a_reconcile_error(cloud: Cloud) -> None:
    address = f"127.0.0.1:{free_port()}"
    cloud.compute("host1", metrics=address)
    r = cloud.eschedule(SMALL, "/nonexistent/disk.qcow2", "--wait")
    assert r.rc == 8, r  # ERROR: not in the host's image_dirs
    m = until(address, lambda m: value(m, "etcd_compute_instances", state="ERROR") == 1, "ERROR")
    assert value(m, "etcd_compute_reconcile_errors_total", kind="build") == 1
    assert value(m, "etcd_compute_build_duration_seconds_count", result="error") == 1
    assert value(m, "etcd_compute_build_duration_seconds_count", result="ok") == 0
    assert value(m, "etcd_compute_schedule_to_active_seconds_count") == 0
    assert value(m, "etcd_compute_host_allocated", resource_class="VCPU") == 0  # freed with the ERROR


def test_an_etcd_outage_counts_lease_failures_and_a_watch_restart(cloud: Cloud, private_etcd: harness.Etcd) -> None:
    address = f"127.0.0.1:{free_port()}"
    cloud.compute("host1", etcd=private_etcd.endpoint, lease_ttl=3, metrics=address)

    def lease_failures(m: Families) -> float:
        return sum(s.value for s in m["etcd_compute_lease_refresh_failures"].samples)

    before = scrape(address)
    assert lease_failures(before) == 0
    assert value(before, "etcd_compute_watch_restarts_total", reason="lost") == 0
    private_etcd.kill()
    # Served all along: a scrape asks etcd nothing.
    until(address, lambda m: lease_failures(m) >= 1, "a failed lease refresh", timeout=30)
    private_etcd.start()
    after = until(address, lambda m: value(m, "etcd_compute_watch_restarts_total", reason="lost") == 1,
                  "the watch restarted", timeout=30)
    assert value(after, "etcd_compute_watch_restarts_total", reason="failover") == 0  # one endpoint only
    assert value(after, "etcd_compute_watch_restarts_total", reason="compacted") == 0


@pytest.fixture(scope="module")
def guest(stack: dict) -> dict:
    return ensure_guest()


@pytest.mark.qemu
def test_a_running_guest_has_libvirt_stats_and_its_metadata_requests_are_counted(cloud: Cloud, guest: dict) -> None:
    """One real guest on a network: its CPU, memory, NIC and disk counters from libvirt appear while
    it runs and go with it; the metadata server counts what it answered, on an address of its own."""
    address, md_address = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    host = cloud.compute("qemu1", uri="qemu:///system", metrics=address,
                         metadata={"enabled": True, "port": cloud.md_port, "metrics": md_address})
    assert value(scrape(md_address), "etcd_compute_metadata_requests_total", result="served") == 0
    r = cloud.eschedule(SMALL, guest["disk"], "--kernel", guest["kernel"], "--initrd", guest["initrd"],
                        "--cmdline", f"{guest['cmdline']} ec.md=http://169.254.169.254:{cloud.md_port}",
                        "--wait", "--json")
    assert r.rc == 0, (r, host.logtext()[-3000:])
    uuid = r.json()["uuid"]
    assert guest_report(cloud.console_log("qemu1", uuid))["md_instance_id"] == uuid  # it asked the server

    md = scrape(md_address)
    served = num(md, "etcd_compute_metadata_requests_total", result="served")
    assert served >= 1
    nobody = num(md, "etcd_compute_metadata_requests_total", result="no_instance")
    conn = http.client.HTTPConnection("169.254.169.254", cloud.md_port, timeout=5)  # from the host: no instance
    conn.request("GET", ID)
    assert conn.getresponse().status == 404
    conn.close()
    md = until(md_address, lambda m: value(m, "etcd_compute_metadata_requests_total", result="no_instance")
               == nobody + 1, "the 404 counted")
    assert value(md, "etcd_compute_metadata_requests_total", result="served") == served
    check_names(md)

    def stats(m: Families) -> bool:
        return value(m, "etcd_compute_instance_cpu_seconds_total", uuid=uuid) is not None
    m = until(address, stats, "the guest's stats", timeout=20)
    # Served stats are up to 5 s old (DomainStatsCache), and the history's sampler may have read
    # them just as the guest started: wait for a reading from after its first packets.
    m = until(address, lambda m: (value(m, "etcd_compute_instance_network_transmit_bytes_total", uuid=uuid) or 0) > 0,
              "the guest's packets counted", timeout=20)
    assert num(m, "etcd_compute_instance_cpu_seconds_total", uuid=uuid) > 0
    assert num(m, "etcd_compute_instance_memory_bytes", uuid=uuid) == 256 << 20
    assert num(m, "etcd_compute_instance_memory_rss_bytes", uuid=uuid) > 0
    for name in ("network_receive", "network_transmit", "disk_read"):  # DHCP, HTTP, the config drive
        assert num(m, f"etcd_compute_instance_{name}_bytes_total", uuid=uuid) > 0, name
    assert num(m, "etcd_compute_instance_disk_write_bytes_total", uuid=uuid) >= 0
    # Only this host's domains (a chaos run or other tests may run theirs on the same libvirtd).
    assert {s.labels["uuid"] for s in m["etcd_compute_instance_cpu_seconds"].samples} == {uuid}
    assert 0 <= num(m, "etcd_compute_domain_stats_age_seconds") < 10
    assert value(m, "etcd_compute_start_to_ip_seconds_count") == 1  # reserved on the network before boot
    assert value(m, "etcd_compute_instances", state="ACTIVE") == 1
    check_names(m)

    r = cloud.eschedule("destroy", uuid, "--wait")
    assert r.rc == 0, r
    after = until(address, lambda m: not stats(m), "the guest's stats gone")
    assert not after["etcd_compute_instance_memory_bytes"].samples
    assert value(after, "etcd_compute_instances", state="ACTIVE") == 0
    assert value(after, "etcd_compute_domain_stats_failures_total") == 0


@contextlib.contextmanager
def md_serving(cloud: Cloud, **kwargs: Any) -> Iterator[tuple[MetadataServer, str]]:
    """A metadata server on 127.0.0.20 in this process, and the address of its own /metrics."""
    server = MetadataServer(("127.0.0.20", free_port()), cloud.store, None, **kwargs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"127.0.0.1:{free_port()}"
    exposition = serve_metrics(address, server.registry, "metadata.metrics", {"127.0.0.20"})
    assert exposition is not None
    try:
        yield server, address
    finally:
        exposition.shutdown()
        exposition.server_close()
        server.shutdown()
        server.server_close()


def md_get(server: MetadataServer, path: str, source: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.20", server.server_address[1], timeout=5, source_address=(source, 0))
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def md_counts(address: str) -> dict[str, float]:
    return {s.labels["result"]: s.value for s in scrape(address)["etcd_compute_metadata_requests"].samples}


ZERO = dict.fromkeys(("served", "no_instance", "not_found", "unavailable", "refused", "unauthorized", "bad_request",
                      "error"), 0.0)


def test_metadata_requests_are_counted_by_result(cloud: Cloud) -> None:
    req = contract.new_request(str(uuidlib.uuid4()), "h", {"h": {"resources": {"VCPU": 1}}}, None, "q", "p", "u")
    assert cloud.store.create_instance(req)
    assert cloud.store.put_status(contract.new_status(req["uuid"], "h", Actual.ACTIVE, ip="127.0.0.21"),
                                  cloud.store.request_rev("h", req["uuid"]))
    with md_serving(cloud) as (server, address):
        assert md_counts(address) == ZERO
        assert md_get(server, ID, "127.0.0.21") == 200
        assert md_get(server, "/latest/meta-data/nothing-here", "127.0.0.21") == 404
        assert md_get(server, ID, "127.0.0.23") == 404
        # Counted as each handler ends, just before its connection closes: allow a moment.
        wait_until(lambda: md_counts(address) == {**ZERO, "served": 1, "not_found": 1, "no_instance": 1}, 5,
                   "three counted")
        check_names(scrape(address))

    with md_serving(cloud, max_connections=1, timeout=30) as (server, address):
        # Accepted in order: the idle client holds the one slot before the request is accepted.
        idle = socket.create_connection(server.server_address, timeout=10)
        with pytest.raises(ConnectionError):
            md_get(server, ID, "127.0.0.21")
        idle.close()  # gone without a request: unanswered
        wait_until(lambda: md_counts(address) == {**ZERO, "refused": 1, "error": 1}, 5, "refused and error counted")


def test_a_hung_stats_worker_never_holds_a_scrape(cloud: Cloud) -> None:
    """The stats worker stopped dead (as in a libvirt call that never returns): a scrape still
    answers within its wait, with every other series, and says how old the stats are."""
    address = f"127.0.0.1:{free_port()}"
    host = cloud.compute("host1", metrics=address)
    daemon = psutil.Process(host.proc.pid)
    before = {p.pid for p in daemon.children()}
    until(address, lambda m: value(m, "etcd_compute_domain_stats_age_seconds") is not None, "a first reading")
    stats_worker = [p for p in daemon.children() if p.pid not in before]
    assert len(stats_worker) == 1, stats_worker
    stats_worker[0].suspend()
    try:
        time.sleep(5.5)  # the reading is stale: the next scrape asks the stopped worker
        began = time.monotonic()
        m = scrape(address)
        assert time.monotonic() - began < 4
        assert num(m, "etcd_compute_domain_stats_age_seconds") > 5
        assert value(m, "etcd_compute_host_info", host=host.host) == 1
        assert value(m, "etcd_compute_instances", state="ACTIVE") == 0
    finally:
        stats_worker[0].resume()
    until(address, lambda m: num(m, "etcd_compute_domain_stats_age_seconds") < 5, "fresh stats again")


def test_metrics_never_stop_the_daemon_but_a_malformed_address_refuses_its_start(cloud: Cloud) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        host = cloud.compute("host1", metrics=f"127.0.0.1:{port}")  # ready all the same
        assert "cannot serve metrics on" in host.logtext()
        assert cloud.boot(SMALL)["host"] == host.host
    bad = cloud.compute("host2", start=False, metadata={"metrics": "169.254.169.254:9181"})
    bad.start()
    assert bad.proc is not None and bad.proc.wait(30) == 2
    assert "key 'metadata.metrics': guests reach 169.254.169.254" in bad.logtext()


def test_metrics_addresses_are_checked() -> None:
    """A malformed address, or one guests reach, is refused like any bad config value."""
    registry = metrics.Metrics("h", "n").registry
    for bad in ("9180", "localhost", "127.0.0.1:", "127.0.0.1:http", "127.0.0.1:70000"):
        with pytest.raises(ConfigError, match="HOST:PORT"):
            serve_metrics(bad, registry, "metrics")
    with pytest.raises(ConfigError, match="guests reach"):
        serve_metrics("169.254.169.254:9180", registry, "metrics", {"169.254.169.254", "10.123.0.1"})


def test_every_series_follows_the_naming_rules() -> None:
    """Every family ecompute can serve, each with a sample (per-instance stats as the stats worker
    would send them), scraped over HTTP: counters end in _total, units are base units and come
    last, per-instance values carry only uuid. And the stats' names the worker sends are the
    ones the daemon maps to series (they cross a process boundary as plain dicts)."""
    from etcd_compute.ecompute.driver import DomainStats  # this test process may load libvirt

    assert {f.name for f in dataclasses.fields(DomainStats)} == set(metrics.INSTANCE_SERIES)
    uuid = str(uuidlib.uuid4())
    m = metrics.Metrics("h", "host-name")
    req = contract.new_request(uuid, "h", {"h": {"resources": {"VCPU": 2, "MEMORY_MB": 512}}}, None, "q", "p", "u")
    m.seen(uuid, True, req, None)
    m.recorded(uuid, Actual.ACTIVE)
    m.set_inventory({"VCPU": {"total": 8, "reserved": 0, "allocation_ratio": 4.0}})
    m.job_done(JobKind.BUILD, JobResult(ok=True, seconds=2.0, ip_seconds=0.5))
    m.job_done(JobKind.POWER, JobResult(ok=False, reason="no"))
    m.became_active(req, None)
    m.watch_state("down", "a")
    m.watch_state("up", "b")
    m.lease_refresh_failed("error")
    sample = dict.fromkeys(metrics.INSTANCE_SERIES, 1024.0)
    m.read_stats = lambda: ({uuid: sample, "not-an-instance-of-this-host": sample}, 1.0)  # type: ignore[method-assign]
    address = f"127.0.0.1:{free_port()}"
    m.serve(address, {"169.254.169.254"})
    try:
        families = scrape(address)
    finally:
        m.close()
    check_names(families)
    assert value(families, "etcd_compute_instance_cpu_seconds_total", uuid=uuid) == 1024
    assert [s.labels["uuid"] for s in families["etcd_compute_instance_cpu_seconds"].samples] == [uuid]
    assert value(families, "etcd_compute_host_capacity", resource_class="VCPU") == 32
    assert value(families, "etcd_compute_host_allocated", resource_class="MEMORY_MB") == 512
    assert value(families, "etcd_compute_watch_restarts_total", reason="failover") == 1
    assert value(families, "etcd_compute_reconcile_errors_total", kind="power") == 1
    assert value(families, "etcd_compute_start_to_ip_seconds_sum") == 0.5
    assert num(families, "process_resident_memory_bytes") > 0


def test_schedule_to_active_counts_an_instance_s_first_run_only() -> None:
    """From the request's creation to its first ACTIVE; a rebuild (a domain was recorded before) or a
    request changed before it ran (evacuated here, or commanded) waited for something else."""
    m = metrics.Metrics("h", "n")
    req = contract.new_request(str(uuidlib.uuid4()), "h", {"h": {"resources": {"VCPU": 1}}}, None, "q", "p", "u")

    def observed() -> tuple[float, float]:
        samples = {s.name.rsplit("_", 1)[1]: s.value for s in m.schedule_to_active.collect()[0].samples}
        return samples["count"], samples["sum"]

    domain = {"uuid": req["uuid"], "name": "ec-x", "state": "running", "vcpus": 1, "memory_mb": 1}
    m.became_active(req, contract.new_status(req["uuid"], "h", Actual.ACTIVE, domain=domain))  # type: ignore[arg-type]
    m.became_active({**req, "updated_at": "2000-01-01T00:00:00.000+00:00"}, None)  # type: ignore[typeddict-item]
    m.became_active({**req, "created_at": "garbage", "updated_at": "garbage"}, None)  # type: ignore[typeddict-item]
    assert observed() == (0, 0)
    m.became_active(req, contract.new_status(req["uuid"], "h", Actual.BUILDING))
    count, total = observed()
    assert count == 1 and 0 <= total < 5
