"""Server groups (issue 22, item 5): hard rules kept by etcd in the transaction that writes the
request, whatever number of schedulers race; soft rules as preferences; "no capacity" naming the
rule; evacuation honouring it; show printing the spread. Hosts on test:///default."""

from __future__ import annotations

import collections
import subprocess

from devstack.harness import wait_until

from conftest import Cloud

SMALL = "resources=VCPU:1,MEMORY_MB:128"


def ok(cloud: Cloud, *args: str) -> dict:
    r = cloud.eschedule(*args, "--json")
    assert r.rc == 0, r
    return r.json()


def placed(cloud: Cloud) -> dict[str, list[str]]:
    """host -> uuids, from the requests' keys."""
    found = collections.defaultdict(list)
    for key in cloud.etcd_values():
        if "/requests/" in key:
            host, uuid = key.rsplit("/", 2)[1:]
            found[host].append(uuid)
    return dict(found)


def test_twenty_schedulers_into_one_anti_affinity_group_over_five_hosts_place_exactly_five(cloud: Cloud) -> None:
    hosts = [cloud.compute(f"h{i}") for i in range(5)]
    assert cloud.eschedule("group", "create", "web", "--policy", "anti-affinity").rc == 0
    # The stack's Placement is shared by the suite: this test counts only what it adds.
    before = cloud.placement.project_usage("etcd-compute").get("instances", 0)
    procs = [subprocess.Popen([*cloud.eschedule_argv(), SMALL, "--group", "web", "--name", f"web{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(20)]
    results = [(p.wait(180), p.stderr.read()) for p in procs]
    codes = collections.Counter(rc for rc, _ in results)
    assert codes == {0: 5, 3: 15}, results
    assert all("excluded by hard anti-affinity group web" in err for rc, err in results if rc == 3), results
    spread = placed(cloud)
    assert sorted(spread) == sorted(h.host for h in hosts) and all(len(us) == 1 for us in spread.values()), spread
    # every refused claim was given back
    assert cloud.placement.project_usage("etcd-compute")["instances"] - before == 5
    members = [k for k in cloud.etcd_values() if "/placed/" in k]
    assert len(members) == 5
    shown = ok(cloud, "group", "show", "web")
    assert (shown["size"], shown["hosts"], shown["kept"]) == (5, 5, True)


def test_rules_hard_and_soft_and_what_no_capacity_says(cloud: Cloud) -> None:
    a, b = cloud.compute("a"), cloud.compute("b")
    for args in (["anti", "--policy", "anti-affinity"], ["together", "--policy", "affinity"],
                 ["apart", "--policy", "anti-affinity", "--soft"]):
        assert cloud.eschedule("group", "create", *args).rc == 0
    r = cloud.eschedule("group", "create", "anti", "--policy", "affinity")
    assert r.rc == 2 and "exists already" in r.err, r

    first, second = ok(cloud, SMALL, "--group", "anti"), ok(cloud, SMALL, "--group", "anti")
    assert {first["host"], second["host"]} == {a.host, b.host}
    r = cloud.eschedule(SMALL, "--group", "anti")
    assert r.rc == 3 and "2 hosts excluded by hard anti-affinity group anti: each already runs one of its members" \
        in r.err, r

    together = [ok(cloud, SMALL, "--group", "together")["host"] for _ in range(3)]
    assert len(set(together)) == 1, together  # all on the first one's host
    home = together[0]
    r = cloud.eschedule("resources=VCPU:7,MEMORY_MB:128", "--group", "together")  # no room left there
    assert r.rc == 3 and "hard affinity group together" in r.err, r

    soft = [ok(cloud, SMALL, "--group", "apart")["host"] for _ in range(3)]
    assert set(soft[:2]) == {a.host, b.host}  # spread while it can be ...
    assert len(soft) == 3  # ... and placed all the same when it cannot

    view = cloud.eschedule("show", first["uuid"])
    assert "anti (hard anti-affinity group anti): 2 members on 2 hosts" in view.out, view.out
    assert ok(cloud, "show", first["uuid"])["group"] == "anti"
    shown = ok(cloud, "group", "show", "together")
    assert shown["members"] and list(shown["members"]) == [cloud.compute_config("a" if home == a.host else "b")[
        "name"]], shown

    r = cloud.eschedule("group", "delete", "anti")
    assert r.rc == 7 and "still has 2 members" in r.err, r
    for uuid in (first["uuid"], second["uuid"]):
        assert cloud.eschedule("destroy", uuid, "--wait").rc == 0
    assert not [k for k in cloud.etcd_values() if "/placed/" in k and first["uuid"] in k]  # gone with it
    assert cloud.eschedule("group", "delete", "anti").rc == 0
    assert [g["name"] for g in ok(cloud, "group", "list")] == ["apart", "together"]
    assert ok(cloud, "--project", "other", "group", "list") == []  # a project's own


def test_evacuation_honours_the_group(cloud: Cloud) -> None:
    a = cloud.compute("a", lease_ttl=2)
    assert cloud.eschedule("group", "create", "g", "--policy", "anti-affinity").rc == 0
    on_a = ok(cloud, SMALL, "--group", "g", "--name", "m1", "--wait")  # a is the only host yet
    b = cloud.compute("b", lease_ttl=2)
    assert ok(cloud, SMALL, "--group", "g", "--name", "m2")["host"] == b.host  # the rule leaves nothing else
    a.kill_all()
    wait_until(lambda: a.host not in cloud.store.alive_hosts(), 15, "a DOWN")
    # Only b is left, and it runs m2: m1 may not go there.
    r = cloud.eschedule("evacuate", cloud.compute_config("a")["name"], "--json")
    assert r.rc == 3, r
    assert "hard anti-affinity group g" in r.json()[0]["error"], r
    assert placed(cloud)[a.host] == [on_a["uuid"]]
    c = cloud.compute("c", lease_ttl=2)
    r = cloud.eschedule("evacuate", a.host, "--json")
    assert r.rc == 0 and [m["to"] for m in r.json()] == [c.host], r
    members = {k.rsplit("/", 2)[1] for k in cloud.etcd_values() if "/placed/" in k}
    assert members == {b.host, c.host}  # its membership moved with it
    assert b.host not in placed(cloud) or len(placed(cloud)[b.host]) == 1


def test_audit_names_a_broken_group_rule() -> None:
    """Invariant R, on requests as etcd would hold them (the schedulers never write such a cloud:
    this is what `eschedule audit --invariants` and the chaos run would say if one did)."""
    from etcd_compute import contract, invariants

    def request(uuid: str, host: str, policy: str, soft: bool = False) -> tuple[str, bytes]:
        made = contract.new_request(uuid, host, {}, None, SMALL, "p", "u",
                                    group={"id": f"g-{policy}", "name": policy, "policy": policy, "soft": soft})
        return f"/p/requests/{host}/{uuid}", contract.encode(made).encode()

    def uuid(n: int) -> str:
        return f"00000000-0000-4000-8000-{n:012d}"

    kvs = dict([request(uuid(1), "h1", "anti-affinity"), request(uuid(2), "h1", "anti-affinity"),
                request(uuid(3), "h2", "anti-affinity"), request(uuid(4), "h1", "affinity"),
                request(uuid(5), "h2", "affinity"), request(uuid(6), "h1", "anti-affinity", soft=True)])
    kvs[f"/p/requests/h1/{uuid(7)}"] = kvs[f"/p/requests/h1/{uuid(6)}"].replace(uuid(6).encode(), uuid(7).encode())
    found = invariants.group_rules(invariants.EtcdView.parse("/p", kvs))
    assert [(v.invariant, v.text) for v in found] == [
        ("R", "affinity group affinity: members on 2 hosts (h1: 1, h2: 1)"),
        ("R", "anti-affinity group anti-affinity: 2 members on h1")]
