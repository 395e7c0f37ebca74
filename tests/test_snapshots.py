"""Snapshots (issue 19): an instance's disk in Ceph copied into an image of the catalogue that new
instances boot from, independent of the instance (it may be destroyed), refused while in use.

The hosts run on libvirt's test driver with the rbd backend: their instances' disks are real RBD
clones in the stack's Ceph, read and written here with qemu-io, so what a snapshot holds is
checked byte for byte without booting a guest.
"""

from __future__ import annotations

import subprocess

import pytest
from test_volumes import QUERY, vcloud  # noqa: F401 - a fixture

from devstack.ceph import CephInfo

from conftest import Cloud

pytestmark = [pytest.mark.ceph]


AT = 1 << 20  # the sector the test's "guest" writes (the first holds a partition table: a disk image)


def disk_says(ceph: CephInfo, image: str, byte: int) -> bool:
    """Does the sector at AT of `image` hold `byte` throughout?"""
    p = subprocess.run(["qemu-io", "-f", "raw", "-c", f"read -P {byte:#x} {AT} 512", ceph.qemu_url(image)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p
    return "Pattern verification failed" not in p.stdout + p.stderr


def pool_images(ceph: CephInfo) -> set[str]:
    return set(ceph.rbd("ls", ceph.pool).split())


def test_a_snapshot_keeps_the_disk_as_it_was_and_outlives_its_instance(vcloud: Cloud, ceph: CephInfo) -> None:  # noqa: F811
    base = vcloud.files / "rbd" / "base.raw"
    base.write_bytes((b"\0" * 510 + b"\x55\xaa").ljust(AT, b"\0") + b"\x4f" * 512 + b"\0" * (3 << 20))
    r = vcloud.eschedule(QUERY, str(base), "--wait", "--json")
    assert r.rc == 0, r
    source = r.json()["uuid"]
    disk = f"vm-{source}"
    assert disk_says(ceph, disk, 0x4F)
    subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P 0x43 {AT} 512", ceph.qemu_url(disk)], check=True,
                   capture_output=True, timeout=60)  # what "the guest" wrote since it booted

    r = vcloud.eschedule("snapshot", source, "--name", "snap1", "--json")
    assert r.rc == 0, r
    made = r.json()
    target = made["url"].rpartition("/")[2]
    assert made["url"] == f"rbd:{ceph.pool}/{target}" and target in pool_images(ceph), made
    assert [i["name"] for i in vcloud.eschedule("image", "list", "--json").json()] == ["snap1"]
    assert not [s for s in ceph.rbd("snap", "ls", f"{ceph.pool}/{disk}").split("\n")[1:] if s.strip()]

    r = vcloud.eschedule(QUERY, "snap1", "--wait", "--json")
    assert r.rc == 0, r
    copy = r.json()["uuid"]
    assert disk_says(ceph, f"vm-{copy}", 0x43)  # the disk as it was when snapshotted, not the image's

    assert vcloud.eschedule("destroy", source, "--wait").rc == 0
    assert disk not in pool_images(ceph)  # the source's disk is gone; the snapshot did not hold it back
    assert disk_says(ceph, f"vm-{copy}", 0x43)
    r = vcloud.eschedule("image", "delete", "snap1")
    assert r.rc == 7 and f"image snap1 is in use: 1 instances' disks are clones of it ({copy})" in r.err, r

    assert vcloud.eschedule("destroy", copy, "--wait").rc == 0
    r = vcloud.eschedule("image", "delete", "snap1")
    assert r.rc == 0, r
    assert target not in pool_images(ceph)
    assert vcloud.eschedule("image", "list", "--json").json() == []


def test_a_snapshot_is_refused_where_there_is_no_disk_in_ceph(vcloud: Cloud, ceph: CephInfo) -> None:  # noqa: F811
    vcloud.compute("local", traits=["CUSTOM_LOCALDISK"])
    local = vcloud.boot(QUERY + "&required=CUSTOM_LOCALDISK")
    before = pool_images(ceph)
    cases = [
        ([local["uuid"]], 7, f"instance {local['uuid']} has no disk in Ceph pool {ceph.pool}"),
        (["nosuch"], 6, "no instance 'nosuch'"),
        ([local["uuid"], "--name", "bad/name"], 2, "not an image name"),
    ]
    for args, code, said in cases:
        r = vcloud.eschedule("snapshot", *args)
        assert r.rc == code and said in r.err and r.err.count("\n") == 1, (args, r)
    assert pool_images(ceph) == before and vcloud.store.images() == []


def test_the_api_snapshots_an_instance_of_its_project_only(vcloud: Cloud) -> None:  # noqa: F811
    from test_api import Api, error
    url = vcloud.api().url
    alpha, beta = Api(url, vcloud.token("alpha")), Api(url, vcloud.token("beta"))
    uuid = alpha.ok("POST", "/v1/instances", 201, json={"query": QUERY, "wait": True})["uuid"]
    assert error(beta("POST", f"/v1/instances/{uuid}/snapshot", json={})) == (404, "UnknownInstance", 6)
    assert error(alpha("POST", f"/v1/instances/{uuid}/snapshot", json={})) == (409, "InvalidState", 7)  # no image
    assert error(alpha("POST", f"/v1/instances/{uuid}/snapshot", json={"name": "a b"})) == (400, "UsageError", 2)
    assert "/v1/instances/{uuid}/snapshot" in alpha.ok("GET", "/v1/openapi.json")["paths"]
