"""`eschedule audit --invariants` on a real cloud (etcd, Placement, ecompute on test:///default):
a clean cloud passes; violations seeded behind eschedule's back are each reported with its line,
and the command exits 11."""

from __future__ import annotations

import uuid as uuidlib
from datetime import UTC, datetime, timedelta

from etcd_compute import contract
from etcd_compute.states import Actual, Desired

from conftest import Cloud

SMALL = "resources=VCPU:1,MEMORY_MB:128,DISK_GB:1"
VIOLATED = 11


def audit(cloud: Cloud, *args: str) -> tuple[int, str, list[dict]]:
    text = cloud.eschedule("audit", "--invariants", "--grace", "0", *args)
    as_json = cloud.eschedule("audit", "--invariants", "--grace", "0", "--json", *args)
    assert text.rc == as_json.rc, (text, as_json)
    return text.rc, text.out, as_json.json()


def test_a_clean_cloud_keeps_every_invariant_audit_can_see(cloud: Cloud) -> None:
    cloud.compute("host1", stop_timeout=1)
    uuid = cloud.boot(SMALL)["uuid"]
    assert cloud.eschedule("stop", uuid, "--wait").rc == 0
    rc, out, found = audit(cloud)
    assert (rc, found) == (0, []), out
    assert out.strip() == "no violations of 1, 3, 4, D, R, W, V"


def test_each_seeded_violation_is_reported_with_its_line(cloud: Cloud) -> None:
    host = cloud.compute("host1")
    kept = cloud.boot(SMALL)["uuid"]
    store, prefix = cloud.store, cloud.prefix
    # 1: the request of a running instance written under a second host too, behind eschedule's back
    twice = cloud.boot(SMALL)["uuid"]
    other = str(uuidlib.uuid4())
    raw, _ = store.client.get(contract.request_key(prefix, host.host, twice))
    store.client.put(contract.request_key(prefix, other, twice), raw)
    # 3: an allocation no instance owns (eschedule killed between its claim and its etcd write)
    leaked = str(uuidlib.uuid4())
    cloud.placement.claim(leaked, {host.host: {"resources": {"VCPU": 1}}}, "etcd-compute", "etcd-compute")
    # W: BUILDING for an hour, with no reason, on a host that is UP (a fake one: a real daemon would act)
    fake, stuck = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    hour_ago = (datetime.now(UTC) - timedelta(hours=1)).isoformat(timespec="milliseconds")
    request = contract.new_request(stuck, fake, {fake: {"resources": {"VCPU": 1}}}, None, SMALL, "p", "u")
    request.update(desired=Desired.ACTIVE, updated_at=hour_ago, created_at=hour_ago)
    status = contract.new_status(stuck, fake, Actual.BUILDING)
    status["updated_at"] = hour_ago
    store.client.put(contract.request_key(prefix, fake, stuck), contract.encode(request))
    store.client.put(contract.index_key(prefix, stuck), contract.encode({"host": fake}))
    store.client.put(contract.instance_key(prefix, stuck), contract.encode(status))
    store.client.put(contract.alive_key(prefix, fake), contract.encode({"uuid": fake}))
    # D: that host UP and marked DOWN at once
    store.client.put(contract.down_key(prefix, fake), contract.encode({"host": fake, "since": hour_ago, "by": "t"}))

    rc, out, found = audit(cloud)
    assert rc == VIOLATED, out
    lines = out.splitlines()
    assert [line.split("  ")[0] for line in lines] == [v["invariant"] for v in found], out

    def reported(invariant: str, uuid: str | None, words: str) -> bool:
        return any(v["invariant"] == invariant and v["uuid"] == uuid and words in v["text"] for v in found)

    assert reported("1", twice, "requested of 2 hosts"), out
    assert reported("3", leaked, "no instance requests it"), out
    assert reported("W", stuck, "BUILDING (requested active) for 36"), out
    assert reported("3", stuck, "allocations on nothing"), out
    assert any(v["invariant"] == "D" and fake[:8] in v["text"] for v in found), out
    assert not [v for v in found if v["uuid"] == kept], out  # the untouched instance is fine
    assert {v["meaning"] for v in found if v["invariant"] == "W"} == {"no request stuck without a reason"}

    # a stuck instance that names its reason, or one younger than the bound, is not stuck
    status["reason"] = "waiting for the image server"
    store.client.put(contract.instance_key(prefix, stuck), contract.encode(status))
    assert not [v for v in audit(cloud)[2] if v["invariant"] == "W"]
    status["reason"] = None
    store.client.put(contract.instance_key(prefix, stuck), contract.encode(status))
    assert not [v for v in audit(cloud, "--stuck-after", "7200")[2] if v["invariant"] == "W"]


def test_audit_invariants_refuses_to_fix(cloud: Cloud) -> None:
    r = cloud.eschedule("audit", "--invariants", "--fix")
    assert r.rc == 2 and "only reads" in r.err, r
