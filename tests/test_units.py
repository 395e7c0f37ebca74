"""Pure logic: config validation, query parsing, key layout, command-line grammar."""

from __future__ import annotations

import pytest

from etcd_compute import config, contract
from etcd_compute.errors import ConfigError, UsageError
from etcd_compute.eschedule.claims import host_of, parse_query
from etcd_compute.eschedule.cli import _Grammar, cli
from etcd_compute.states import Actual


def test_defaults_point_at_localhost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ECOMPUTE_ETCD_ENDPOINT", raising=False)
    monkeypatch.delenv("ECOMPUTE_PLACEMENT_URL", raising=False)
    cfg = config.load(config.ScheduleConfig, None)
    assert cfg.etcd.endpoints == ["http://127.0.0.1:2379"]
    assert cfg.placement.endpoint == "http://127.0.0.1:8778"


def test_environment_gives_defaults_file_wins(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECOMPUTE_ETCD_ENDPOINT", "http://10.0.0.1:1,http://10.0.0.2:2")
    assert config.load(config.ScheduleConfig, None).etcd.endpoints == ["http://10.0.0.1:1", "http://10.0.0.2:2"]
    path = tmp_path / "s.yaml"
    path.write_text("etcd: {endpoints: ['http://127.0.0.1:9']}\n")
    assert config.load(config.ScheduleConfig, str(path)).etcd.endpoints == ["http://127.0.0.1:9"]


def test_compute_config_merges_inventory_and_checks_values(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("uuid: 6ab2b4c4-8a8c-4b8e-9c55-3f0f2f1b0a11\ninventory: {VCPU: {total: 4}}\n")
    cfg = config.load_compute(str(path))
    assert cfg.inventory["VCPU"].total == 4
    assert cfg.inventory["MEMORY_MB"].reserved == 512  # untouched classes keep their defaults
    for text, message in [
        ("uuid: nope\n", "key 'uuid' is not a uuid"),
        ("inventory: {GPU: {total: 1}}\n", "inventory.GPU"),
        ("inventory: {VCPU: {totl: 1}}\n", "unknown key 'inventory.VCPU.totl'"),
        ("workers: 0\n", "key 'workers' must be from 1 to"),
        ("resize: maybe\n", "key 'resize' must be true or false"),
        ("libvirt: {domain_type: xen}\n", "libvirt.domain_type"),
        ("traits: CUSTOM_A\n", "key 'traits' must be a list"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            config.load_compute(str(path))


def test_stable_host_uuid_without_config() -> None:
    assert config.ComputeConfig().host_uuid() == config.ComputeConfig().host_uuid()


def test_parse_query_passes_through_and_adds_limit() -> None:
    params = parse_query("resources=VCPU:1,MEMORY_MB:256&required=HW_CPU_X86_AVX2&member_of=in:a,b", 7)
    assert params == [("resources", "VCPU:1,MEMORY_MB:256"), ("required", "HW_CPU_X86_AVX2"),
                      ("member_of", "in:a,b"), ("limit", "7")]
    assert ("limit", "3") in parse_query("resources=VCPU:1,MEMORY_MB:1&limit=3", 7)
    assert parse_query("resources1=VCPU:1,MEMORY_MB:1&resources2=DISK_GB:5&group_policy=none", 1)[-1] == \
        ("limit", "1")
    with pytest.raises(UsageError):
        parse_query("resources=VCPU:1,MEMORY_MB:1&&", 1)


def test_parse_query_keeps_keys_placement_combines() -> None:
    """required, member_of and same_subtree may repeat (Placement ANDs them); VCPU and MEMORY_MB
    may come from different groups: what counts is that the instance is charged for both."""
    query = ("resources=VCPU:1&resources_mem=MEMORY_MB:64&required=A&required=!B&member_of=x&member_of=y"
             "&group_policy=none")
    assert parse_query(query, 5)[:6] == [("resources", "VCPU:1"), ("resources_mem", "MEMORY_MB:64"),
                                         ("required", "A"), ("required", "!B"), ("member_of", "x"), ("member_of", "y")]


@pytest.mark.parametrize("query, message", [
    ("resources=DISK_GB:1", "must ask for VCPU and MEMORY_MB"),
    ("resources=VCPU:1&resources=MEMORY_MB:1", "'resources' given twice"),
    ("resources=VCPU:1,MEMORY_MB:1&in_tree=a&in_tree=b", "'in_tree' given twice"),
    ("resources=VCPU:²,MEMORY_MB:1", "whole number"),
    ("resources=VCPU:1,MEMORY_MB:1&limit=²", "limit must be a whole number"),
    ("resources\n=VCPU:1,MEMORY_MB:1", "is not a query key"),
    ("resources=VCPU\n:1,MEMORY_MB:1", "is not CLASS:AMOUNT"),
    ("resources=VCPU:1,MEMORY_MB:1&required=" + "X" * 5000, "query is too long"),
])
def test_parse_query_refuses(query: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as exc:
        parse_query(query, 5)
    assert "\n" not in str(exc.value)


# Bad values of compute.yaml (c) and schedule.yaml (s): each refused naming its key, none a traceback.
BAD_CONFIG = [
    ("s", "placement: {retries: -1}", "placement.retries"),
    ("s", "placement: {retries: 1000}", "placement.retries"),
    ("s", "placement: {timeout: 0}", "placement.timeout"),
    ("s", "placement: {timeout: .inf}", "placement.timeout"),
    ("s", "placement: {endpoint: 'http://127.0.0.1:notaport'}", "placement.endpoint"),
    ("s", "placement: {endpoint: 'http://127.0.0.1:99999'}", "placement.endpoint"),
    ("s", "placement: {endpoint: 'http://[::1:23379'}", "placement.endpoint"),
    ("s", "placement: {endpoint: 'http://'}", "placement.endpoint"),
    ("s", "etcd: {endpoints: ['http://127.0.0.1:notaport']}", "etcd.endpoints"),
    ("s", "etcd: {endpoints: ['http://127.0.0.1:99999']}", "etcd.endpoints"),
    ("s", "etcd: {endpoints: ['http://[::1:23379']}", "etcd.endpoints"),
    ("s", "etcd: {endpoints: ['http://127.0.0.1:0']}", "etcd.endpoints"),
    ("s", "etcd: {timeout: 0}", "etcd.timeout"),
    ("s", "limit: 0", "limit"),
    ("s", "limit: 100000", "limit"),
    ("s", "wait_timeout: 0", "wait_timeout"),
    ("s", "wait_timeout: .nan", "wait_timeout"),
    ("c", "metadata: {port: 70000}", "metadata.port"),
    ("c", "metadata: {port: 0}", "metadata.port"),
    ("c", "instances_path: FILE", "instances_path"),
    ("c", "image_cache_path: FILE", "image_cache_path"),
    ("c", "resync_interval: 0", "resync_interval"),
    ("c", "resync_interval: 0.01", "resync_interval"),
    ("c", "lease_ttl: 1000000000000", "lease_ttl"),
    ("c", "lease_ttl: 1e12", "lease_ttl"),
    ("c", "lease_ttl: 10.5", "lease_ttl"),
    ("c", "lease_ttl: 1", "lease_ttl"),
    ("c", "workers: 0", "workers"),
    ("c", "workers: 100000", "workers"),
    ("c", "ip_timeout: 0", "ip_timeout"),
    ("c", "stop_timeout: -1", "stop_timeout"),
    ("c", "shutdown_timeout: 0", "shutdown_timeout"),
    ("c", "placement: {timeout: -5}", "placement.timeout"),
    ("c", "inventory: {VCPU: {allocation_ratio: 0}}", "inventory.VCPU.allocation_ratio"),
    ("c", "inventory: {VCPU: {reserved: -1}}", "inventory.VCPU.reserved"),
    ("c", "inventory: {MEMORY_MB: {total: -1}}", "inventory.MEMORY_MB.total"),
    ("c", "inventory: {DISK_GB: {max_unit: 0}}", "inventory.DISK_GB.max_unit"),
]


@pytest.mark.parametrize("kind, text, key", BAD_CONFIG)
def test_bad_config_values_name_the_key(tmp_path, kind: str, text: str, key: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace("FILE", str(path)) + "\n")
    load = config.load_compute if kind == "c" else config.load_schedule
    with pytest.raises(ConfigError) as exc:
        load(str(path))
    assert exc.value.exit_code == 2
    assert str(exc.value).startswith(f"{path}: key '{key}'"), exc.value
    assert "\n" not in str(exc.value)


def test_host_of_prefers_the_compute_root() -> None:
    allocations = {"shared": {"resources": {"DISK_GB": 1}}, "child": {"resources": {"VCPU": 1}}}
    summaries = {"child": {"root_provider_uuid": "root"}, "shared": {"root_provider_uuid": "shared"}}
    assert host_of(allocations, summaries) == "root"


def test_layout_keys_round_trip() -> None:
    key = contract.request_key("/p", "h", "i")
    assert contract.instance_from_request_key("/p", "h", key.encode()) == "i"
    assert contract.instance_from_request_key("/p", "other", key) is None
    assert contract.instance_from_request_key("/p", "h", "/p/requests/h/i/x") is None
    req = contract.new_request("i", "h", {"h": {"resources": {"VCPU": 2}}}, None, "q", "p", "u")
    assert contract.decode(contract.encode(req)) == req and req["resources"] == {"VCPU": 2}
    assert contract.view(req, None)["state"] == Actual.PENDING


@pytest.mark.parametrize("argv, command", [
    (["resources=VCPU:1"], "schedule"),
    (["resources=VCPU:1", "http://x/img"], "schedule"),
    (["6ab2b4c4-8a8c-4b8e-9c55-3f0f2f1b0a11"], "show"),
    (["destroy", "6ab2b4c4-8a8c-4b8e-9c55-3f0f2f1b0a11"], "destroy"),
    (["list"], "list"),
    (["hosts"], "hosts"),
])
def test_original_grammar_routes(argv: list[str], command: str) -> None:
    assert isinstance(cli, _Grammar)
    ctx = cli.make_context("eschedule", ["--config", "/dev/null"], resilient_parsing=True)
    name, _, _ = cli.resolve_command(ctx, list(argv))
    assert name == command


def test_example_files_document_exactly_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    for var in ("ECOMPUTE_ETCD_ENDPOINT", "ECOMPUTE_PLACEMENT_URL", "ECOMPUTE_PLACEMENT_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    assert config.load_compute(str(root / "compute.yaml.example")) == config.ComputeConfig()
    assert config.load_schedule(str(root / "schedule.yaml.example")) == config.ScheduleConfig()


def test_widen_limit_only_after_a_full_page() -> None:
    from etcd_compute.eschedule.claims import _widen_limit
    params = [("resources", "VCPU:1"), ("limit", "50")]
    assert _widen_limit(params, 50) and params[-1] == ("limit", "200")
    assert not _widen_limit(params, 12)  # fewer than asked for: there are no more candidates


def test_chaos_names_each_daemon_traceback_by_where_it_was_logged_and_how_it_ended() -> None:
    from devstack.chaos.report import tracebacks
    log = ("2026-11-23 06:00:00,123 WARNING ecompute: build of A failed: boom\n"
           "Traceback (most recent call last):\n  File \"w.py\", line 1, in run\n    go()\n"
           "OSError: disk full\n"
           "2026-11-23 06:00:09,456 WARNING ecompute: build of A failed: boom\n"
           "Traceback (most recent call last):\n  File \"w.py\", line 1, in run\nOSError: disk full\n"
           "2026-11-23 06:01:00,000 ERROR ecompute: reconcile of B\n"
           "Traceback (most recent call last):\n  File \"d.py\", line 2, in x\nKeyError: 'ip'\n"
           "\nDuring handling of the above exception, another exception occurred:\n\n"
           "Traceback (most recent call last):\n  File \"d.py\", line 3, in y\nValueError: bad\n")
    found = tracebacks(log)
    assert found["WARNING ecompute: build of A failed: boom -> OSError: disk full"] == 2
    assert found["ERROR ecompute: reconcile of B -> KeyError: 'ip'"] == 1
    assert sum(found.values()) == 4  # the chained one counts too, under the line before it


def test_free_ports_are_below_the_ephemeral_range_and_never_handed_out_twice() -> None:
    """An ephemeral port (bind(0)) can be taken by any outgoing connection before the server the
    harness starts binds it; CI once lost an etcd member's peer port so."""
    import socket
    from pathlib import Path

    from devstack.harness import free_port
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == 200 and max(ports) < low
    with socket.socket() as s:  # and free indeed
        s.bind(("127.0.0.1", ports[-1]))


def test_etcd_s_errors_say_which_is_out_of_space_and_which_is_a_record_too_large() -> None:
    import grpc

    from etcd_compute.etcd import EtcdFailing, unavailable

    class Refused(grpc.RpcError):
        def __init__(self, code: grpc.StatusCode, detail: str) -> None:
            self._code, self._detail = code, detail

        def code(self) -> grpc.StatusCode:
            return self._code

        def details(self) -> str:
            return self._detail

    said = {}
    for code, detail in ((grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: mvcc: database space exceeded"),
                         (grpc.StatusCode.RESOURCE_EXHAUSTED, "grpc: received message larger than max (2 vs. 1)"),
                         (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: request is too large")):
        with pytest.raises(EtcdFailing) as caught, unavailable("put"):
            raise Refused(code, detail)
        said[detail] = str(caught.value)
    assert [("NOSPACE" in s, "too large" in s) for s in said.values()] == [(True, False), (False, True),
                                                                          (False, True)], said
