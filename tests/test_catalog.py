"""Flavors and the image catalogue (issue 22, items 2 and 3): named sizes made by operators and
checked against Placement, images by name with their content pinned on every use, project-owned
or public, and the default image a catalogue entry. Hosts on test:///default."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from devstack.harness import Served, guest_report
from devstack.testguest import ensure_guest

from conftest import Cloud

SMALL = "resources=VCPU:1,MEMORY_MB:128"
DISKED = "resources=VCPU:1,MEMORY_MB:128,DISK_GB:1"


def raw_disk(size: int = 1 << 20, mark: bytes = b"") -> bytes:
    data = bytearray(size)
    data[510:512] = b"\x55\xaa"
    data[1024:1024 + len(mark)] = mark
    return bytes(data)


def ok(cloud: Cloud, *args: str) -> dict:
    r = cloud.eschedule(*args, "--json")
    assert r.rc == 0, r
    return r.json()


def test_flavors_are_named_sizes_checked_against_placement(cloud: Cloud) -> None:
    cloud.compute("plain")
    fast = cloud.compute("fast", traits=["CUSTOM_FAST"])
    made = ok(cloud, "flavor", "create", "small", "VCPU=1", "MEMORY_MB=128", "DISK_GB=1")
    assert made["resources"] == {"VCPU": 1, "MEMORY_MB": 128, "DISK_GB": 1}
    ok(cloud, "flavor", "create", "quick", "VCPU=1", "MEMORY_MB=128", "--required", "CUSTOM_FAST")
    for args, message in [(["small", "VCPU=1", "MEMORY_MB=1"], "flavor small exists already"),
                          (["bad", "VPCU=1", "MEMORY_MB=1"], "no resource class 'VPCU' (did you mean VCPU?)"),
                          (["bad", "VCPU=1"], "must ask for VCPU and MEMORY_MB"),
                          (["bad", "VCPU=x", "MEMORY_MB=1"], "expected CLASS=N"),
                          (["bad", "VCPU=1", "MEMORY_MB=1", "--required", "CUSTOM_NOBODY"], "no trait CUSTOM_NOBODY"),
                          (["b/d", "VCPU=1", "MEMORY_MB=1"], "not a flavor name")]:
        r = cloud.eschedule("flavor", "create", *args)
        assert r.rc == 2 and message in r.err, (args, r)
    assert [f["name"] for f in ok(cloud, "flavor", "list")] == ["quick", "small"]
    assert "required=CUSTOM_FAST" in cloud.eschedule("flavor", "show", "quick").out

    # `eschedule --flavor NAME [IMAGE]`, the raw query beside it
    web = ok(cloud, "--flavor", "small", "--name", "web1", "--wait")
    assert (web["flavor"], web["resources"], web["state"]) == ("small", {"VCPU": 1, "MEMORY_MB": 128, "DISK_GB": 1},
                                                               "ACTIVE")
    assert ok(cloud, "schedule", "--flavor", "quick")["host"] == fast.host  # its trait steers it
    assert ok(cloud, SMALL)["flavor"] is None
    assert "small" in cloud.eschedule("list", "-c", "name,size").out
    r = cloud.eschedule("--flavor", "smal")
    assert r.rc == 2 and "no flavor 'smal' (did you mean small?)" in r.err, r
    # deleting a flavor leaves its instances as they are
    assert cloud.eschedule("flavor", "delete", "small").rc == 0
    assert cloud.show("web1")["flavor"] == "small"
    assert cloud.eschedule("flavor", "show", "small").rc == 2


def test_images_by_name_pinned_on_every_use(cloud: Cloud) -> None:
    cloud.compute("host1", image_dirs=[str(cloud.files)])
    disk = cloud.files / "tiny.img"  # inside the hosts' image_dirs
    disk.write_bytes(raw_disk())
    digest = hashlib.sha256(disk.read_bytes()).hexdigest()
    entry = ok(cloud, "image", "add", "tiny", str(disk), "--alias", "tiny-1", "--public")
    assert (entry["sha256"], entry["url"], entry["aliases"], entry["scope"]) == (digest, str(disk), ["tiny-1"],
                                                                                  "_public")
    assert ok(cloud, "image", "show", "tiny-1")["name"] == "tiny"
    assert [i["name"] for i in ok(cloud, "image", "list")] == ["tiny"]
    r = cloud.eschedule("image", "add", "again", str(disk), "--sha256", "0" * 64)
    assert r.rc == 2 and f"its sha256 is {digest}" in r.err, r
    r = cloud.eschedule("image", "add", "tiny", str(disk))
    assert r.rc == 0, r  # the project's own "tiny" beside the public one (its own comes first)
    r = cloud.eschedule("image", "add", "tiny", str(disk))
    assert r.rc == 2 and "exists already" in r.err, r
    assert cloud.eschedule("image", "delete", "tiny").rc == 0  # the project's own

    view = ok(cloud, DISKED, "tiny-1", "--wait")
    assert (view["state"], view["image"]) == ("ACTIVE", "tiny")
    request = next(v for k, v in cloud.etcd_values().items() if "/requests/" in k)
    assert (request["image"], request["image_sha256"], request["image_name"]) == (str(disk), digest, "tiny")
    r = cloud.eschedule(DISKED, "tiny", "--image-sha256", "1" * 64)
    assert r.rc == 2 and "contradicts image tiny's" in r.err, r

    # The content changed behind the catalogue's back: a host that has not cached it refuses it.
    other = cloud.compute("host2", image_dirs=[str(cloud.files)])
    disk.write_bytes(raw_disk(mark=b"changed"))
    r = cloud.eschedule("image", "add", "changed", str(disk), "--sha256", digest)
    assert r.rc == 2 and "its sha256 is" in r.err, r  # nor may it be added with the old pin
    failed = cloud.eschedule(DISKED + f"&in_tree={other.host}", "tiny", "--wait", "--json")
    assert failed.rc == 8 and "sha256" in failed.err, failed

    # Deleting an entry removes its aliases with it.
    assert cloud.eschedule("image", "delete", "tiny-1").rc == 0
    assert cloud.eschedule("image", "show", "tiny").rc == 2 and ok(cloud, "image", "list") == []


def test_an_image_is_its_projects_unless_public_and_urls_are_pinned_by_their_download(cloud: Cloud,
                                                                                      tmp_path: Path) -> None:
    cloud.compute("host1")
    (tmp_path / "www").mkdir()
    served = Served(tmp_path / "www")
    try:
        url = served.add("web.img", raw_disk(mark=b"web"))
        mine = ok(cloud, "--project", "alpha", "image", "add", "webimg", url)
        assert mine["sha256"] == hashlib.sha256(raw_disk(mark=b"web")).hexdigest() and mine["scope"] == "alpha"
    finally:
        served.close()
    assert [i["name"] for i in ok(cloud, "--project", "alpha", "image", "list")] == ["webimg"]
    assert ok(cloud, "--project", "beta", "image", "list") == []
    r = cloud.eschedule("--project", "beta", SMALL, "webimg")
    assert r.rc == 2 and "no image 'webimg' in the catalogue" in r.err, r
    r = cloud.eschedule("image", "add", "gone", "http://127.0.0.1:9/nothing.img")
    assert r.rc == 2 and "give --sha256" in r.err, r


def test_the_default_image_is_a_catalogue_entry(cloud: Cloud) -> None:
    cloud.compute("host1", image_dirs=[str(cloud.files)])
    config = cloud.write("default.yaml", {"etcd": {"endpoints": [cloud.stack["etcd"]], "prefix": cloud.prefix},
                                          "placement": {"endpoint": cloud.stack["placement"]}})
    r = cloud.eschedule(DISKED, config=config)
    assert r.rc == 2 and "no image 'default' in the catalogue" in r.err and "image add" in r.err, r
    disk = cloud.files / "guest.img"
    disk.write_bytes(raw_disk())
    assert cloud.eschedule("image", "add", "guest", str(disk), "--public", "--alias", "default").rc == 0
    r = cloud.eschedule(DISKED, "--wait", "--json", config=config)
    assert r.rc == 0 and r.json()["image"] == "guest", r


@pytest.mark.qemu
def test_a_real_guest_from_the_catalogue_by_flavor_gets_its_name_as_hostname(cloud: Cloud) -> None:
    """On QEMU: the test guest as a catalogue entry that says how to boot it (kernel, initrd, cmdline),
    scheduled by flavor and name as README's "Using it" does; the guest's hostname is its name."""
    guest = ensure_guest()
    host = cloud.compute("qemu1", uri="qemu:///system")
    cmdline = f"{guest['cmdline']} ec.md=http://169.254.169.254:{cloud.md_port}"  # this test's metadata port
    assert cloud.eschedule("flavor", "create", "tiny", "VCPU=1", "MEMORY_MB=256", "DISK_GB=1").rc == 0
    r = cloud.eschedule("image", "add", "testguest", guest["disk"], "--kernel", guest["kernel"], "--initrd",
                        guest["initrd"], "--cmdline", cmdline)
    assert r.rc == 0, r
    view = ok(cloud, "--flavor", "tiny", "--name", "web1", "testguest", "--wait")
    assert view["state"] == "ACTIVE" and view["ip"], (view, host.logtext()[-2000:])
    seen = guest_report(cloud.console_log(host.name, view["uuid"]))
    assert (seen["cd_hostname"], seen["cd_instance_id"], seen["ip"]) == ("web1", view["uuid"], view["ip"])
    assert int(seen["disk_bytes"]) == 1 << 30
    assert cloud.eschedule("destroy", "web1", "--wait").rc == 0
