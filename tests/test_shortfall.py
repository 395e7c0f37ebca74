"""Why no host (issue 20, item 3): every "no capacity" names the shortfall per resource class
and the hosts not considered (down, locked, filtered out); `eschedule QUERY --count` says how
many more fit, claiming nothing. The wording as tables of the pure functions; then the CLI, the
API and --count against the suite's real etcd and Placement, on test:///default hosts.

The suite shares one Placement: every host and trait here is this test's own, and what is
counted (up, down, locked, filtered) is read under the test's own etcd prefix."""

from __future__ import annotations

import uuid as uuidlib

import pytest
import requests

from devstack.harness import wait_until
from etcd_compute.contract import Allocations
from etcd_compute.eschedule.shortfall import fits, message

from conftest import Cloud

ASK = {"VCPU": 1, "MEMORY_MB": 4096, "DISK_GB": 1}


@pytest.mark.parametrize(("asked", "free", "counts", "rule", "said"), [
    (ASK, [{"VCPU": 8, "MEMORY_MB": 512, "DISK_GB": 40}, {"VCPU": 2, "MEMORY_MB": 256, "DISK_GB": 40}], (0, 0, 0),
     None, "MEMORY_MB: asked 4096, at most 512 free on any up host"),
    (ASK, [{"VCPU": 0, "MEMORY_MB": 512}], (2, 1, 3), None,
     "VCPU: asked 1, at most 0 free on any up host; MEMORY_MB: asked 4096, at most 512 free on any up host; "
     "DISK_GB: asked 1, at most 0 free on any up host; 2 hosts down, 1 host locked, "
     "3 hosts filtered out by traits/aggregates"),
    (ASK, [], (1, 0, 0), None, "no up host to place it on; 1 host down"),
    (ASK, [], (0, 0, 2), None, "no up host to place it on; 2 hosts filtered out by traits/aggregates"),
    # each class is free somewhere, but not all on one host
    ({"VCPU": 4, "MEMORY_MB": 4096}, [{"VCPU": 8, "MEMORY_MB": 512}, {"VCPU": 1, "MEMORY_MB": 8192}], (0, 1, 0),
     None, "each class fits on some up host, but none has room for all of them at once; 1 host locked"),
    # a server group's rule explains it: no "each class fits" line, the rule said last
    ({"VCPU": 1, "MEMORY_MB": 128}, [{"VCPU": 8, "MEMORY_MB": 4096}], (0, 0, 0),
     "2 hosts excluded by hard anti-affinity group web", "2 hosts excluded by hard anti-affinity group web"),
    ({"VCPU": 7, "MEMORY_MB": 128}, [{"VCPU": 6, "MEMORY_MB": 4096}], (1, 0, 0), "hard affinity group t: on host h",
     "VCPU: asked 7, at most 6 free on any up host; 1 host down; hard affinity group t: on host h"),
])
def test_message_names_each_short_class_and_the_hosts_not_considered(
        asked: dict[str, int], free: list[dict[str, int]], counts: tuple[int, int, int], rule: str | None,
        said: str) -> None:
    assert message(asked, free, *counts, rule=rule) == said


def _alloc(**by_rp: dict[str, int]) -> Allocations:
    return {rp: {"resources": resources} for rp, resources in by_rp.items()}


@pytest.mark.parametrize(("candidates", "free", "roots", "expected"), [
    # the scarcest class of each host decides; hosts add up
    ([("a", _alloc(a={"VCPU": 1, "MEMORY_MB": 256})), ("b", _alloc(b={"VCPU": 1, "MEMORY_MB": 256}))],
     {"a": {"VCPU": 8, "MEMORY_MB": 512}, "b": {"VCPU": 3, "MEMORY_MB": 4096}}, {}, (5, {"a": 2, "b": 3})),
    # nothing candidates: nothing fits
    ([], {}, {}, (0, {})),
    # a shared pool's DISK_GB caps the total: every host draws on it
    ([("a", _alloc(a={"VCPU": 1}, pool={"DISK_GB": 10})), ("b", _alloc(b={"VCPU": 1}, pool={"DISK_GB": 10}))],
     {"a": {"VCPU": 8}, "b": {"VCPU": 8}, "pool": {"DISK_GB": 35}}, {"pool": "pool"}, (3, {"a": 8, "b": 8})),
    # a nested host: the child is in the host's tree; a host's best candidate counts, once
    ([("h", _alloc(h={"VCPU": 2}, c1={"CUSTOM_GPU": 1})), ("h", _alloc(h={"VCPU": 2}, c2={"CUSTOM_GPU": 1}))],
     {"h": {"VCPU": 16}, "c1": {"CUSTOM_GPU": 1}, "c2": {"CUSTOM_GPU": 3}}, {"h": "h", "c1": "h", "c2": "h"},
     (3, {"h": 3})),
])
def test_fits_counts_the_scarcest_class_per_host(candidates: list[tuple[str, Allocations]],
                                                 free: dict[str, dict[str, int]], roots: dict[str, str],
                                                 expected: tuple[int, dict[str, int]]) -> None:
    assert fits(candidates, free, roots) == expected


def small(memory: int) -> dict:
    return {"VCPU": {"total": 8}, "MEMORY_MB": {"total": memory}, "DISK_GB": {"total": 40}}


def test_no_capacity_says_why_on_the_cli_and_the_api_and_count_claims_nothing(cloud: Cloud) -> None:
    trait = f"CUSTOM_WHY_{uuidlib.uuid4().hex[:8].upper()}"
    a = cloud.compute("a", inventory=small(512))
    t = cloud.compute("t", inventory=small(1024), traits=[trait])
    # Big hosts that must not count as room: one dies (its lease lapses: down), one is
    # stopped (it locks its inventory on the way out: locked).
    dead = cloud.compute("dead", inventory=small(16384), lease_ttl=2)
    stopped = cloud.compute("stopped", inventory=small(16384), stop_timeout=1)
    stopped.stop()
    dead.kill_all()
    dead.kill_fence()
    wait_until(lambda: cloud.store.alive_hosts() == {a.host, t.host}, 15, "the dead host's lease to lapse")
    assert (cloud.host_record(stopped.host) or {}).get("state") == "locked"

    big = "resources=VCPU:1,MEMORY_MB:4096,DISK_GB:1"
    r = cloud.eschedule(big)
    assert r.rc == 3 and r.err.count("\n") == 1, r
    assert ("no capacity for resources=VCPU:1,MEMORY_MB:4096,DISK_GB:1 (MEMORY_MB: asked 4096, at most 1024 free "
            "on any up host; 1 host down, 1 host locked)") in r.err, r.err

    r = cloud.eschedule(f"{big}&member_of={uuidlib.uuid4()}")  # an aggregate no host is in
    assert r.rc == 3 and "no up host to place it on; 1 host down, 1 host locked, 2 hosts filtered out by " \
        "traits/aggregates" in r.err, r.err
    r = cloud.eschedule(f"resources=VCPU:1,MEMORY_MB:2048&required={trait}")
    assert r.rc == 3 and "MEMORY_MB: asked 2048, at most 1024 free on any up host; 1 host down, 1 host locked, " \
        "1 host filtered out by traits/aggregates" in r.err, r.err

    api = cloud.api()
    r = requests.post(api.url + "/v1/instances", json={"query": big}, timeout=90,
                      headers={"Authorization": f"Bearer {cloud.token('alpha')}"})
    assert r.status_code == 409, r.text
    said = r.json()["error"]["message"]
    assert "MEMORY_MB: asked 4096, at most 1024 free on any up host; 1 host down, 1 host locked" in said, said

    # --count: 2 on a (512 MB), 4 on t (1024 MB); 4 with the trait. Placement unchanged by it.
    before = {h.host: cloud.usages(h.host) for h in (a, t)}
    each = "resources=VCPU:1,MEMORY_MB:256,DISK_GB:1"
    r = cloud.eschedule(each, "--count")
    assert (r.rc, r.out) == (0, "6\n"), r
    r = cloud.eschedule(f"{each}&required={trait}", "--count", "--json")
    assert r.rc == 0 and r.json() == {"fits": 4, "hosts": {t.host: 4}}, r
    assert {h.host: cloud.usages(h.host) for h in (a, t)} == before
    assert cloud.instance_keys() == {}
    assert cloud.eschedule(each, "--count", "--name", "x").rc == 2

    # ... and it is right: exactly that many are placed, then no capacity; then 0 fit.
    placed = [cloud.eschedule(f"{each}&required={trait}").rc for _ in range(5)]
    assert placed == [0, 0, 0, 0, 3], placed
    r = cloud.eschedule(f"{each}&required={trait}", "--count")
    assert (r.rc, r.out) == (0, "0\n"), r
