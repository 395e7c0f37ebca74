"""Volumes (issue 19): disks in Ceph that outlive instances, made and removed by the user's side,
attached to one instance at a time.

Each test runs an rbd host on the fake hypervisor (fake:///DIR: libvirt's test driver cannot
attach disks; a real guest's hot-plug is test_volumes_host.py's) and the stack's real Ceph and
Placement: a
volume is an RBD image, an allocation of DISK_GB on the pool's sharing provider (consumer type
VOLUME, so the project's quota counts it) and a record in etcd; nothing of it is left after a
delete, or after a create that failed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import yaml
from test_rbd import rbd_storage

from devstack.ceph import CephInfo
from etcd_compute.placement import VOLUME

from conftest import Cloud

pytestmark = [pytest.mark.ceph]
QUERY = "resources=VCPU:1,MEMORY_MB:64,DISK_GB:1"
CAPACITY_GB = 20


@pytest.fixture
def vcloud(cloud: Cloud, ceph: CephInfo) -> Iterator[Cloud]:
    """The cloud with volumes in the stack's pool (schedule.yaml's ceph) and one rbd host,
    which registers the pool's sharing provider with CAPACITY_GB; every volume left is removed."""
    storage = rbd_storage(ceph)
    storage["rbd"]["capacity_gb"] = CAPACITY_GB
    hypervisor = cloud.files / "rbd-domains"
    hypervisor.mkdir()
    cloud.rbd_host = cloud.compute("rbd", storage=storage, uri=f"fake://{hypervisor}")  # type: ignore[attr-defined]
    conf = yaml.safe_load(cloud.schedule_yaml.read_text())
    conf["ceph"] = {k: v for k, v in storage["rbd"].items() if k in ("pool", "ceph_conf", "cluster", "user",
                                                                        "keyring")}
    cloud.write("schedule.yaml", conf)
    try:
        yield cloud
    finally:
        for volume in cloud.store.volumes():
            cloud.placement.delete_allocations(volume["id"])
            if volume["image"] in images(ceph):
                ceph.rbd("rm", "--no-progress", f"{ceph.pool}/{volume['image']}")


def images(ceph: CephInfo) -> set[str]:
    return {n for n in ceph.rbd("ls", ceph.pool).split() if n.startswith("vol-")}


def test_a_volume_is_made_listed_and_deleted_with_its_image_and_allocation(vcloud: Cloud, ceph: CephInfo) -> None:
    before = images(ceph)
    r = vcloud.eschedule("volume", "create", "3", "--name", "data", "--json")
    assert r.rc == 0, r
    made = r.json()
    vid = made["id"]
    assert (made["state"], made["size_gb"], made["name"], made["instance"]) == ("available", 3, "data", None)
    assert images(ceph) - before == {f"vol-{vid}"}
    info = ceph.rbd("info", "--format", "json", f"{ceph.pool}/vol-{vid}")
    assert '"size":3221225472' in info.replace(" ", ""), info  # 3 GiB
    pool = next(iter(vcloud.store.pools()))
    assert {p: a["resources"] for p, a in vcloud.placement.get_allocations(vid).items()} == {pool: {"DISK_GB": 3}}
    assert vcloud.placement.consumer(vid).get("consumer_type", VOLUME) == VOLUME
    usage = vcloud.eschedule("quota", "show", "--json").json()["usage"]
    assert usage["volumes"] == 1 and usage["DISK_GB"] == 3, usage

    listed = vcloud.eschedule("volume", "list", "--json").json()
    assert [(v["id"], v["state"]) for v in listed] == [(vid, "available")]
    assert vcloud.eschedule("volume", "show", "data", "--json").json()["id"] == vid
    assert vcloud.eschedule("volume", "show", vid[:6], "--json").json()["id"] == vid

    r = vcloud.eschedule("volume", "delete", "data")
    assert r.rc == 0 and f"volume {vid} deleted" in r.out, r
    assert f"vol-{vid}" not in images(ceph)
    assert vcloud.placement.get_allocations(vid) == {}
    assert vcloud.store.volume(vid) is None
    assert vcloud.eschedule("volume", "list", "--json").json() == []


def test_bad_volume_input_gets_one_line_and_its_exit_code(vcloud: Cloud, ceph: CephInfo) -> None:
    before = images(ceph)
    cases = [
        (["volume", "create", "0"], 2, "a volume's size is a whole number of GiB from 1 to"),
        (["volume", "create", "lots"], 2, "'lots' is not a valid integer"),
        (["volume", "create", "1", "--name", "no/slash"], 2, "not a volume name"),
        (["volume", "show", "nothere"], 6, "no volume 'nothere'"),
        (["volume", "delete", "0b5c3d4e-0000-4000-8000-000000000000"], 6, "no volume"),
        (["volume", "attach", "nothere", "nobody"], 6, "no volume 'nothere'"),
        (["volume", "create", str(CAPACITY_GB + 1)], 3, f"no capacity: pool {ceph.pool} has {CAPACITY_GB} GiB of "
                                                       f"DISK_GB free, {CAPACITY_GB + 1} asked"),
    ]
    for args, code, said in cases:
        r = vcloud.eschedule(*args)
        assert r.rc == code and said in r.err and r.err.count("\n") == 1, (args, r)
    assert vcloud.eschedule("quota", "set", "etcd-compute", "volumes=1").rc == 0
    assert vcloud.eschedule("volume", "create", "1", "--name", "one").rc == 0
    r = vcloud.eschedule("volume", "create", "1")
    assert r.rc == 9 and "volumes limit 1, 1 in use, 1 more asked" in r.err, r
    r = vcloud.eschedule("volume", "create", "1", "--name", "one")
    assert r.rc == 2 and "volume name one is taken" in r.err, r
    # DISK_GB's quota counts volumes and instances' disks alike.
    assert vcloud.eschedule("quota", "set", "etcd-compute", "volumes=none", "DISK_GB=2").rc == 0
    assert vcloud.eschedule(QUERY, "--json").rc == 0
    r = vcloud.eschedule("volume", "create", "1")
    assert r.rc == 9 and "DISK_GB limit 2, 2 in use, 1 more asked" in r.err, r
    plain = vcloud.write("plain.yaml", {k: v for k, v in yaml.safe_load(vcloud.schedule_yaml.read_text()).items()
                                        if k != "ceph"})
    r = vcloud.eschedule("volume", "create", "1", config=plain)
    assert r.rc == 2 and "volumes are not set up here" in r.err, r
    # Nothing half-made is left by the refusals: one volume, one image, one allocation.
    assert [v["name"] for v in vcloud.store.volumes()] == ["one"]
    assert len(images(ceph) - before) == 1


def test_attach_is_refused_where_the_volume_cannot_go_and_one_volume_has_one_instance(vcloud: Cloud) -> None:
    local = vcloud.compute("local", traits=["CUSTOM_LOCALDISK"])
    on_local = vcloud.boot(QUERY + "&required=CUSTOM_LOCALDISK")
    assert on_local["host"] == local.host
    vid = vcloud.eschedule("volume", "create", "1", "--json").json()["id"]
    r = vcloud.eschedule("volume", "attach", vid, on_local["uuid"])
    assert r.rc == 7 and "keeps its disks on itself" in r.err, r
    assert "volumes" not in (vcloud.store.get_instance(on_local["uuid"])[0] or {})

    first = vcloud.boot(QUERY + "&required=!CUSTOM_LOCALDISK")
    second = vcloud.boot(QUERY + "&required=!CUSTOM_LOCALDISK")
    r = vcloud.eschedule("stop", second["uuid"], "--force", "--wait")
    assert r.rc == 0, (r, vcloud.show(second["uuid"]))
    r = vcloud.eschedule("volume", "attach", vid, first["uuid"], "--wait", "--json")
    assert r.rc == 0 and (r.json()["instance"], r.json()["state"]) == (first["uuid"], "in-use"), r
    request, status = vcloud.store.get_instance(first["uuid"])
    assert request is not None and [v["id"] for v in request["volumes"]] == [vid]
    assert status is not None and status["volumes"] == [vid]
    for args, said in ((["volume", "attach", vid, second["uuid"]], f"volume {vid} is in-use (instance "),
                       (["volume", "delete", vid], "detach it first")):
        r = vcloud.eschedule(*args)
        assert r.rc == 7 and said in r.err, (args, r)
    r = vcloud.eschedule("volume", "detach", vid, "--wait", "--json")
    assert r.rc == 0 and r.json()["state"] == "available", r
    request, status = vcloud.store.get_instance(first["uuid"])
    assert request is not None and request["volumes"] == [] and status is not None and status["volumes"] == []
    r = vcloud.eschedule("volume", "detach", vid)
    assert r.rc == 7 and "is not attached" in r.err, r
    # Free again: it goes to the stopped instance (its definition), and stays when that one is destroyed.
    r = vcloud.eschedule("volume", "attach", vid, second["uuid"], "--wait", "--json")
    assert r.rc == 0 and r.json()["state"] == "in-use", r
    assert vcloud.eschedule("destroy", second["uuid"], "--wait").rc == 0
    assert vcloud.eschedule("volume", "show", vid, "--json").json()["state"] == "available"
    assert vcloud.eschedule("volume", "delete", vid).rc == 0


def test_the_api_makes_shows_and_deletes_a_project_s_volumes_only(vcloud: Cloud) -> None:
    from test_api import Api, error
    url = vcloud.api().url
    alpha, beta = Api(url, vcloud.token("alpha")), Api(url, vcloud.token("beta"))
    made = alpha.ok("POST", "/v1/volumes", 201, json={"size_gb": 2, "name": "logs"})
    assert (made["project_id"], made["size_gb"], made["state"]) == ("alpha", 2, "available")
    assert [v["id"] for v in alpha.ok("GET", "/v1/volumes")] == [made["id"]]
    assert beta.ok("GET", "/v1/volumes") == []
    assert error(beta("GET", "/v1/volumes/logs")) == (404, "UnknownVolume", 6)
    assert error(beta("DELETE", f"/v1/volumes/{made['id']}")) == (404, "UnknownVolume", 6)
    assert error(alpha("POST", "/v1/volumes", json={"size_gb": 0}))[0] == 400
    assert error(alpha("POST", "/v1/volumes/logs/detach", json={})) == (409, "InvalidState", 7)
    assert alpha.ok("GET", "/v1/volumes/logs")["id"] == made["id"]
    assert alpha.ok("DELETE", "/v1/volumes/logs")["id"] == made["id"]
    assert error(alpha("GET", "/v1/volumes/logs")) == (404, "UnknownVolume", 6)
    doc = alpha.ok("GET", "/v1/openapi.json")
    assert {"/v1/volumes", "/v1/volumes/{ref}", "/v1/volumes/{ref}/attach", "/v1/volumes/{ref}/detach"} <= set(
        doc["paths"])
    assert "VolumeView" in doc["components"]["schemas"]


def test_an_instance_with_a_volume_is_evacuated_only_to_a_host_of_its_pool(vcloud: Cloud, ceph: CephInfo) -> None:
    from devstack.harness import wait_until
    a = vcloud.rbd_host  # type: ignore[attr-defined]
    uuid = vcloud.boot(QUERY)["uuid"]  # on A, the only host yet
    vid = vcloud.eschedule("volume", "create", "1", "--json").json()["id"]
    assert vcloud.eschedule("volume", "attach", vid, uuid, "--wait").rc == 0
    local = vcloud.compute("local", uri=f"fake://{vcloud.files / 'local-domains'}")
    (vcloud.files / "local-domains").mkdir(exist_ok=True)
    a.kill_all()
    a.kill_fence()
    wait_until(lambda: a.host not in vcloud.store.alive_hosts(), 60, "A DOWN")
    r = vcloud.eschedule("evacuate", a.host, "--force", "--json")  # only a host with local disks is up
    assert r.rc == 3 and [m["to"] for m in r.json()] == [None] and "no capacity" in r.json()[0]["error"], r
    assert vcloud.store.get_instance(uuid)[0]["host"] == a.host  # type: ignore[index]
    assert set(vcloud.placement.get_allocations(uuid)) == {a.host, next(iter(vcloud.store.pools()))}

    hypervisor = vcloud.files / "b-domains"
    hypervisor.mkdir()
    b = vcloud.compute("rbdB", storage=rbd_storage(ceph), uri=f"fake://{hypervisor}")
    r = vcloud.eschedule("evacuate", a.host, "--force", "--json")
    assert r.rc == 0 and [m["to"] for m in r.json()] == [b.host], r
    view = wait_until(lambda: (v := vcloud.show(uuid))["state"] == "ACTIVE" and v, 60, "ACTIVE on B")
    assert view["host"] == b.host and local.host not in (view["host"],)
    shown = vcloud.eschedule("volume", "show", vid, "--json").json()
    assert (shown["state"], shown["instance"]) == ("in-use", uuid), shown
    assert vcloud.store.get_instance(uuid)[1]["volumes"] == [vid]  # type: ignore[index]


def test_an_osd_killed_under_a_build_a_volume_create_and_a_destroy_loses_nothing(vcloud: Cloud,
                                                                                   ceph: CephInfo) -> None:
    """The pool's only OSD dies while a build clones a disk, a volume is created and an instance is
    destroyed: each waits for Ceph (nothing fails half-way) and finishes once the OSD is back."""
    import os
    import signal
    import subprocess
    import threading

    from devstack import ceph as devceph
    from devstack.harness import wait_until
    base = vcloud.files / "rbd" / "base.raw"
    base.write_bytes((b"\0" * 510 + b"\x55\xaa").ljust(2 << 20, b"\0"))
    gone = vcloud.boot(QUERY)["uuid"]  # diskless: destroyed below while the OSD is down

    def kill_osd() -> None:
        pid = devceph.running(ceph)["osd"]
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: devceph.running(ceph)["osd"] is None, 30, "the OSD to die")

    kill_osd()
    try:
        made: dict[str, subprocess.CompletedProcess[str]] = {}
        creating = threading.Thread(target=lambda: made.update(
            volume=subprocess.run([*vcloud.eschedule_argv(), "volume", "create", "1", "--json"],
                                  capture_output=True, text=True, timeout=300)))
        creating.start()
        r = vcloud.eschedule(QUERY, str(base), "--json")
        assert r.rc == 0, r
        uuid = r.json()["uuid"]
        assert vcloud.eschedule("destroy", gone).rc == 0
        wait_until(lambda: vcloud.show(uuid)["state"] == "BUILDING", 30, "the build under way")
        assert creating.is_alive()  # waiting for Ceph, not failed
    finally:
        devceph.ensure_ceph(ceph.dir.parent)  # the OSD comes back on its data
    creating.join(300)
    assert made["volume"].returncode == 0, made
    vid = json.loads(made["volume"].stdout)["id"]
    assert f"vol-{vid}" in images(ceph) and vcloud.eschedule("volume", "show", vid, "--json").json()[
        "state"] == "available"
    wait_until(lambda: vcloud.show(uuid)["state"] == "ACTIVE", 300, "the build to finish")
    assert f"vm-{uuid}" in ceph.rbd("ls", ceph.pool).split()
    wait_until(lambda: not vcloud.store.is_known(gone), 120, "the destroy to finish")
    assert vcloud.placement.get_allocations(gone) == {}
