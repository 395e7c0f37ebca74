"""Every bad input gets a one-line reason and its own exit code, and nothing is written."""

from __future__ import annotations

import subprocess
import uuid as uuidlib
from pathlib import Path

import pytest

from devstack import harness
from devstack.harness import BIN, free_port
from etcd_compute.config import EtcdConfig, PlacementConfig, ScheduleConfig
from etcd_compute.errors import EtcdUnavailable
from etcd_compute.eschedule.operations import Operations
from etcd_compute.placement import PlacementClient
from etcd_compute.store import Store

from conftest import Cloud

SMALL = "resources=VCPU:1,MEMORY_MB:256,DISK_GB:1"
UNKNOWN = str(uuidlib.uuid4())


@pytest.mark.parametrize("args, rc, message", [
    ([SMALL.replace("VCPU:1", "VCPU:x")], 2, "amount of VCPU must be a whole number"),
    (["resources=VCPU:0"], 2, "from 1 to"),
    (["resources=VCPU:-1"], 2, "from 1 to"),
    (["resources=VCPU:99999999999"], 2, "from 1 to"),
    (["resources=VCPU"], 2, "is not CLASS:AMOUNT"),
    (["resources=vcpu:1"], 2, "is not CLASS:AMOUNT"),
    (["resources=VCPU:1,VCPU:2"], 2, "given twice"),
    (["resources="], 2, "is not CLASS:AMOUNT"),
    (["required=CUSTOM_X"], 2, "no resources=CLASS:AMOUNT"),
    ([SMALL + "&limit=0"], 2, "limit must be a whole number of at least 1"),
    (["nonsense"], 6, "no instance 'nonsense'"),  # a word that is no query is an instance's name
    (["nonsense&x"], 2, "malformed query"),
    ([SMALL + ",NOT_A_CLASS:1"], 2, "No such resource class NOT_A_CLASS"),
    ([SMALL + "&required=CUSTOM_NOBODY_HAS_THIS"], 2, "No such trait"),
    ([SMALL + "&frobnicate=1"], 2, "query rejected by Placement"),
    (["resources=VCPU:1000,MEMORY_MB:256"], 3, "no capacity"),
    (["resources=VCPU:1,MEMORY_MB:2147483647"], 3, "no capacity"),
    (["show", "not-a-uuid"], 6, "no instance 'not-a-uuid'"),
    (["show", "Not a name!"], 2, "not an instance uuid, uuid prefix or name"),
    (["destroy", "not-a-uuid"], 6, "no instance 'not-a-uuid'"),
    (["destroy", "Not a name!"], 2, "not an instance uuid, uuid prefix or name"),
    ([UNKNOWN], 6, "no instance"),
    (["show", UNKNOWN, "--json"], 6, "no instance"),
    (["destroy", UNKNOWN], 6, "no instance"),
    (["stop", "not-a-uuid"], 6, "no instance"),
    (["reboot", UNKNOWN], 6, "no instance"),
    (["evacuate", "not-a-host"], 6, "no host 'not-a-host'"),
    (["evacuate"], 2, "evacuate needs HOST"),
    ([SMALL, "ftp://example.invalid/x.img"], 2, "expected an http(s):// or file:// URL"),
    ([SMALL, "--image-sha256", "abc"], 2, "must be 64 hex digits"),
    ([SMALL, "--key", "/nonexistent.pub"], 2, "ssh key /nonexistent.pub"),
    ([SMALL, "--user-data", "/nonexistent"], 2, "user-data /nonexistent"),
])
def test_bad_input_is_refused_and_writes_nothing(shared_cloud: Cloud, args: list[str], rc: int,
                                                 message: str) -> None:
    cloud, host = shared_cloud, shared_cloud.computes[0]
    r = cloud.eschedule(*args)
    assert r.rc == rc, r
    assert message in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1, r.err  # one line, no traceback
    assert cloud.instance_keys() == {}
    assert cloud.usages(host.host) == {"VCPU": 0, "MEMORY_MB": 0, "DISK_GB": 0}


@pytest.mark.parametrize("text, message", [
    ("etcd: [unclosed", "malformed YAML"),
    ("etcd:\n  endpoint: http://127.0.0.1:2379\n", "unknown key 'etcd.endpoint'"),
    ("limit: many\n", "key 'limit' must be an integer"),
    ("placement:\n  endpoint: ftp://x\n", "placement.endpoint' must be an http(s) URL"),
    ("- a list\n", "top level must be a mapping"),
])
def test_bad_config_names_file_and_key(shared_cloud: Cloud, text: str, message: str) -> None:
    cloud = shared_cloud
    path = cloud.write("bad.yaml", text)
    r = cloud.eschedule(SMALL, config=path)
    assert r.rc == 2, r
    assert str(path) in r.err and message in r.err, r.err
    assert cloud.instance_keys() == {}


def test_missing_config_file(cloud: Cloud) -> None:
    r = cloud.eschedule("list", config=cloud.tmp / "nope.yaml")
    assert r.rc == 2 and "cannot read config file" in r.err


def test_ecompute_refuses_bad_config(cloud: Cloud) -> None:
    path = cloud.write("c.yaml", "libvirt:\n  uri: test:///default\n  kind: x\n")
    p = subprocess.run([BIN / "ecompute", "--config", path], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "unknown key 'libvirt.kind'" in p.stderr


def test_placement_unreachable_fails_fast_and_writes_nothing(cloud: Cloud) -> None:
    cloud.compute("host1")
    path = cloud.write("noplacement.yaml", {
        "etcd": {"endpoints": [cloud.stack["etcd"]], "prefix": cloud.prefix},
        "placement": {"endpoint": f"http://127.0.0.1:{free_port()}"}, "default_image": None})
    r = cloud.eschedule(SMALL, config=path)
    assert r.rc == 4, r
    assert "Placement unreachable" in r.err
    assert cloud.instance_keys() == {}


def test_etcd_unreachable_fails_before_claiming(cloud: Cloud) -> None:
    host = cloud.compute("host1")
    path = cloud.write("noetcd.yaml", {
        "etcd": {"endpoints": [f"http://127.0.0.1:{free_port()}"], "timeout": 2},
        "placement": {"endpoint": cloud.stack["placement"]}, "default_image": None})
    r = cloud.eschedule(SMALL, config=path)
    assert r.rc == 5, r
    assert "etcd unreachable" in r.err
    assert cloud.usages(host.host) == {"VCPU": 0, "MEMORY_MB": 0, "DISK_GB": 0}


def test_claim_is_freed_when_etcd_dies_between_claim_and_write(cloud: Cloud, private_etcd: harness.Etcd) -> None:
    """The window eschedule cannot avoid: Placement said yes, then etcd went away."""
    host = cloud.compute("host1")
    cfg = ScheduleConfig(etcd=EtcdConfig(endpoints=[private_etcd.endpoint], timeout=2),
                         placement=PlacementConfig(endpoint=cloud.stack["placement"]), default_image=None)
    store = Store(cfg.etcd)  # connected while etcd is up ...
    store.claim_alive(host.host, 60, {"uuid": host.host})  # the host is UP as this etcd sees it
    placement = PlacementClient(cfg.placement)
    claimed: list[str] = []
    original = placement.claim

    def claim_then_kill_etcd(consumer: str, *args: object) -> None:
        original(consumer, *args)
        claimed.append(consumer)
        private_etcd.kill()  # ... and gone right after the claim

    placement.claim = claim_then_kill_etcd  # type: ignore[method-assign]
    with pytest.raises(EtcdUnavailable):
        Operations(cfg, placement=placement, store=store).schedule(SMALL)
    assert len(claimed) == 1
    assert cloud.placement.get_allocations(claimed[0]) == {}
    assert cloud.usages(host.host)["VCPU"] == 0


def test_ecompute_exits_on_a_provider_name_taken_by_another_uuid(cloud: Cloud) -> None:
    """A configuration mistake is final: ecompute says so and exits, it does not retry forever."""
    first = cloud.compute("host1")
    clash = cloud.compute_config("host2")
    clash["name"] = cloud.compute_config("host1")["name"]
    path = cloud.write("clash.yaml", clash)
    p = subprocess.run([BIN / "ecompute", "--config", path], capture_output=True, text=True, timeout=60)
    assert p.returncode == 4, p.stderr
    assert "Conflicting resource provider name" in p.stderr
    assert cloud.placement.provider(clash["uuid"]) is None
    assert cloud.placement.provider(first.host) is not None


def test_more_ssh_keys_than_accepted_are_refused_before_anything_is_claimed(shared_cloud: Cloud,
                                                                             tmp_path: Path) -> None:
    """33 keys (20,000 once reached etcd after the claim and came back as a misleading NOSPACE)."""
    key = tmp_path / "id.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHkqjRrPpPdAm3cRBt6uTpYmOt7JCbx0cpOtdEJnPQW7 test\n")
    cloud, host = shared_cloud, shared_cloud.computes[0]
    r = cloud.eschedule(SMALL, *[a for _ in range(33) for a in ("--key", str(key))])
    assert r.rc == 2 and "33 ssh keys given; at most 32 are accepted" in r.err and r.err.count("\n") == 1, r
    assert cloud.instance_keys() == {}
    assert cloud.usages(host.host) == {"VCPU": 0, "MEMORY_MB": 0, "DISK_GB": 0}
