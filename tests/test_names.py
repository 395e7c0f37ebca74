"""Instances and hosts by name (issue 22): --name, names/uuid prefixes everywhere, list's columns
and formats, a CLI that tells typos from queries, numeric options checked as the API checks them,
and --wait's progress on a terminal. Hosts on test:///default: no guest needs to boot."""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import select
import subprocess
import time
import uuid as uuidlib

import pytest
import yaml

from etcd_compute import contract

from conftest import Cloud

SMALL = "resources=VCPU:1,MEMORY_MB:128"


def made(cloud: Cloud, *args: str) -> dict:
    r = cloud.eschedule(SMALL, *args, "--json")
    assert r.rc == 0, r
    return r.json()


def test_an_instance_is_known_by_its_name_everywhere(cloud: Cloud) -> None:
    cloud.compute("host1", stop_timeout=1)
    web = made(cloud, "--name", "web1", "--wait")
    assert web["name"] == "web1" and web["state"] == "ACTIVE"
    request = next(v for k, v in cloud.etcd_values().items() if "/requests/" in k)
    assert request["hostname"] == "web1"  # its guest's hostname (cloud-init's local-hostname)
    # show, by name (both grammars), by a unique uuid prefix
    for ref in ("web1", web["uuid"][:6], web["uuid"]):
        assert cloud.show(ref)["uuid"] == web["uuid"], ref
        r = cloud.eschedule("show", ref, "--json")
        assert r.rc == 0 and r.json()["name"] == "web1", r
    # lifecycle and console by name
    r = cloud.eschedule("stop", "web1", "--wait", "--json")
    assert r.rc == 0 and r.json()["state"] == "STOPPED", r
    assert cloud.eschedule("start", "web1", "--wait").rc == 0
    assert cloud.eschedule("console", "web1").rc == 0
    console = cloud.eschedule("console", "web1", "--json")  # README: every read command takes --json
    assert console.rc == 0 and isinstance(console.json(), list), console  # the boots kept: none on test:///
    assert all(boot["uuid"] == web["uuid"] and "text" in boot for boot in console.json()), console
    # unique per project: taken, refused before anything is claimed
    r = cloud.eschedule(SMALL, "--name", "web1")
    assert r.rc == 2 and "instance name web1 is taken in project" in r.err, r
    assert len([k for k in cloud.etcd_values() if "/requests/" in k]) == 1
    # ... but another project may have its own web1; the operator's plain name is then ambiguous
    other = cloud.eschedule("--project", "beta", SMALL, "--name", "web1", "--json")
    assert other.rc == 0, other
    assert cloud.eschedule("--project", "beta", "show", "web1", "--json").json()["uuid"] == other.json()["uuid"]
    assert cloud.eschedule("show", "web1", "--json").json()["uuid"] == web["uuid"]  # the operator's own project
    assert cloud.eschedule("show", "beta/web1", "--json").json()["uuid"] == other.json()["uuid"]
    assert cloud.eschedule("--project", "beta", "show", web["uuid"][:8]).rc == 6  # never another project's
    # destroy by name frees the name with the instance
    r = cloud.eschedule("destroy", "web1", "--wait")
    assert r.rc == 0, r
    assert not [k for k in cloud.etcd_values() if f"/names/{cloud_project(cloud)}/" in k]
    assert made(cloud, "--name", "web1")["name"] == "web1"


def cloud_project(cloud: Cloud) -> str:
    return "etcd-compute"  # schedule.yaml's project_id default


@pytest.mark.parametrize("name", ["Web1", "1web", "web_1", "web-", "-web", "a" * 64, "web.example", "",
                                  "6ab2b4c4-8a8c-4b8e-9c55-3f0f2f1b0a11"])
def test_a_name_must_be_a_dns_label(shared_cloud: Cloud, name: str) -> None:
    r = shared_cloud.eschedule(SMALL, "--name", name)
    assert r.rc == 2 and "not an instance name" in r.err, r
    assert shared_cloud.instance_keys() == {}


def test_a_prefix_that_starts_several_uuids_is_an_error_naming_them(cloud: Cloud) -> None:
    host = cloud.compute("host1", start=False)
    shared = ["abcd0000-0000-4000-8000-000000000001", "abcd1111-0000-4000-8000-000000000002"]
    for uuid in shared:  # two requests whose uuids start alike (for the host to build once it starts)
        assert cloud.store.create_instance(contract.new_request(uuid, host.host, {}, None, SMALL, "etcd-compute",
                                                                "etcd-compute"))
    r = cloud.eschedule("show", "abcd")
    assert r.rc == 2 and "give more of it" in r.err and all(u in r.err for u in shared), r
    assert cloud.eschedule("show", "abcd1", "--json").json()["uuid"] == shared[1]
    r = cloud.eschedule("show", "not_a_name!")
    assert r.rc == 2 and "not an instance uuid, uuid prefix or name" in r.err, r
    r = cloud.eschedule("show", "nobody")
    assert r.rc == 6 and "no instance 'nobody'" in r.err, r


def test_an_instance_written_before_names_still_shows_and_acts(cloud: Cloud) -> None:
    """A request, index and status as an older eschedule wrote them: no name, an index of its host only."""
    host = cloud.compute("host1")
    uuid = str(uuidlib.uuid4())
    request = contract.new_request(uuid, host.host, {host.host: {"resources": {"VCPU": 1, "MEMORY_MB": 128}}},
                                   None, SMALL, "etcd-compute", "etcd-compute")
    for key in ("name", "flavor", "image_name", "group"):
        request.pop(key)  # type: ignore[misc]
    cloud.placement.claim(uuid, request["allocations"], "etcd-compute", "etcd-compute")
    cloud.store.client.put(contract.index_key(cloud.prefix, uuid), json.dumps({"host": host.host}))
    cloud.store.client.put(contract.request_key(cloud.prefix, host.host, uuid), contract.encode(request))
    assert cloud.eschedule("show", uuid[:8], "--json").json()["name"] is None
    r = cloud.eschedule("list")
    assert r.rc == 0 and uuid[:8] in r.out, r
    assert cloud.eschedule("--project", "etcd-compute", "show", uuid[:8]).rc == 0  # scoped: its request says whose
    assert cloud.eschedule("destroy", uuid[:8], "--wait").rc == 0
    assert cloud.instance_keys() == {}


def test_names_are_unique_under_concurrency(cloud: Cloud) -> None:
    """Eight schedulers race for one name: exactly one gets it, the others are refused and hold nothing."""
    cloud.compute("big", inventory={"VCPU": {"total": 64}, "MEMORY_MB": {"total": 65536}, "DISK_GB": {"total": 99}})
    before = cloud.placement.project_usage("etcd-compute").get("instances", 0)  # the suite shares one Placement
    procs = [subprocess.Popen([*cloud.eschedule_argv(), SMALL, "--name", "race"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(8)]
    results = [(p.wait(60), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0] + [2] * 7, results
    assert all("is taken" in err for rc, err in results if rc)
    assert len([k for k in cloud.etcd_values() if "/requests/" in k]) == 1
    assert cloud.placement.project_usage("etcd-compute")["instances"] - before == 1  # the refused claims freed


def test_hosts_by_name_in_list_hosts_and_evacuate(cloud: Cloud) -> None:
    host = cloud.compute("host1")
    name = cloud.compute_config("host1")["name"]
    made(cloud, "--name", "a1")
    r = cloud.eschedule("list", "--host", name, "-f", "value", "-c", "name")
    assert (r.rc, r.out.split()) == (0, ["a1"]), r
    assert cloud.eschedule("list", "--host", host.host, "-f", "value", "-c", "name").out.split() == ["a1"]
    r = cloud.eschedule("list", "--host", "no-such-host")
    assert r.rc == 6 and "no host" in r.err, r
    r = cloud.eschedule("evacuate", name)  # by name: it is UP, so refused as such (not "not a uuid")
    assert r.rc == 7 and "is UP" in r.err, r
    assert name in cloud.eschedule("hosts").out


def test_list_fits_100_columns_and_speaks_json_yaml_csv_and_value(cloud: Cloud) -> None:
    cloud.compute("host1")
    long = "a-rather-long-instance-name-" + "x" * 30
    one, two = made(cloud, "--name", long), made(cloud)
    r = cloud.eschedule("list")
    assert r.rc == 0, r
    lines = r.out.splitlines()
    assert lines[0].split() == ["NAME", "ID", "STATE", "IP", "HOST", "SIZE", "AGE"]
    assert max(len(line) for line in lines) <= 100, r.out
    assert any(line.startswith("a-rather-long") and one["uuid"][:8] in line for line in lines)
    assert any(two["uuid"][:8] in line and "1vcpu/128M" in line for line in lines)
    views = json.loads(cloud.eschedule("list", "-f", "json").out)
    assert {v["uuid"] for v in views} == {one["uuid"], two["uuid"]} and "events" in views[0]
    assert json.loads(cloud.eschedule("list", "--json").out) == views
    picked = yaml.safe_load(cloud.eschedule("list", "-f", "yaml", "-c", "name,uuid").out)
    assert sorted(picked, key=lambda v: v["uuid"]) == sorted(
        [{"name": long, "uuid": one["uuid"]}, {"name": None, "uuid": two["uuid"]}], key=lambda v: v["uuid"])
    rows = list(csv.DictReader(io.StringIO(cloud.eschedule("list", "-f", "csv", "-c", "uuid", "-c", "state").out)))
    assert {r["uuid"] for r in rows} == {one["uuid"], two["uuid"]} and {r["state"] for r in rows} <= {
        "PENDING", "BUILDING", "ACTIVE"}
    assert sorted(cloud.eschedule("list", "-f", "value", "-c", "uuid").out.split()) == sorted(
        [one["uuid"], two["uuid"]])
    r = cloud.eschedule("list", "-c", "colour")
    assert r.rc == 2 and "no column 'colour'" in r.err, r
    r = cloud.eschedule("list", "--state", "bogus")
    assert r.rc == 2 and "no state 'bogus'" in r.err, r
    assert cloud.eschedule("--project", "beta", SMALL, "--name", "theirs").rc == 0  # two projects: whose is said
    lines = cloud.eschedule("list").out.splitlines()
    assert lines[0].split()[:2] == ["NAME", "PROJECT"] and max(len(line) for line in lines) <= 100, lines
    assert max(len(line) for line in cloud.eschedule("hosts").out.splitlines()) <= 100


@pytest.mark.parametrize("args, message", [
    (["lst"], "unknown command 'lst' (did you mean list?)"),
    (["destory", "x"], "unknown command 'destory' (did you mean destroy?)"),
    (["hots"], "(did you mean hosts?)"),
    ([SMALL, "--timeout", "-5"], "--timeout"),
    ([SMALL, "--timeout", "nan"], "--timeout"),
    ([SMALL, "--timeout", "3601"], "--timeout"),
    (["stop", "x", "--timeout", "0"], "--timeout"),
    (["audit", "--grace", "-1"], "--grace"),
    (["evacuate", "h", "--grace", "inf"], "--grace"),
    (["quota", "set", "p", "VPCU=4"], "Placement has no resource class 'VPCU' (did you mean VCPU?)"),
    (["quota", "set", "p", "instance=4"], "(did you mean instances?)"),
    ([SMALL, "--flavor", "small"], "not both"),
    (["--flavor", "nope"], "no flavor 'nope'"),
    ([SMALL, "no-such-image"], "no image 'no-such-image' in the catalogue"),
    ([SMALL, "--group", "nope"], "no server group 'nope'"),
])
def test_mistakes_are_named_and_refused_before_anything_is_written(shared_cloud: Cloud, args: list[str],
                                                                  message: str) -> None:
    r = shared_cloud.eschedule(*args)
    assert r.rc == 2, r
    assert message in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert shared_cloud.instance_keys() == {}
    assert not [k for k in shared_cloud.etcd_values() if "/quotas/" in k]


def test_wait_shows_the_instances_events_on_a_terminal_and_nothing_when_piped(cloud: Cloud) -> None:
    cloud.compute("host1", stop_timeout=1)
    piped = cloud.eschedule(SMALL, "--name", "quiet", "--wait")
    assert piped.rc == 0 and piped.err == "", piped
    out = on_a_terminal([*cloud.eschedule_argv(), SMALL, "--name", "chatty", "--wait"])
    assert "chatty placed on host" in out and "ACTIVE" in out, out
    said = [line for line in out.splitlines() if line.startswith("  ") and "BUILDING" in line]
    assert said, out  # the events as they came, before the result
    out = on_a_terminal([*cloud.eschedule_argv(), "stop", "chatty", "--wait"])
    assert "  " in out and "STOPPED" in out.split("state")[0], out


def on_a_terminal(argv: list[str], timeout: float = 90) -> str:
    """What a command writes to a terminal (stdout and stderr on one pty)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(argv, stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                data = os.read(leader, 4096)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(10)
    os.close(leader)
    return b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
