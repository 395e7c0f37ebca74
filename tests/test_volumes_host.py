"""Volumes, the host's side (issue 19 item 5): a host attaches the RBD volumes its request names to
the instance's domain, detaches the others, and never removes a volume's image.

The domain XML and the fake hypervisor's volumes first; then whole in-process daemons
(tests/test_scenarios.py's InProcess) over a fake hypervisor whose Ceph pool is a dict (the
storage's Ceph calls replaced: which images exist, which were taken over, which removed), the
requests' volumes written with the Store as the user's side will; last, one real QEMU guest on
an rbd host that gets a volume hot-plugged, writes to it, and reads it back after a detach and
an attach again.
"""

from __future__ import annotations

import json
import re
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from test_scenarios import SMALL, Host, InProcess

from devstack.ceph import CephInfo
from devstack.harness import wait_until
from etcd_compute.contract import Request, Status, VolumeRef
from etcd_compute.ecompute import storage
from etcd_compute.ecompute.domainxml import build_domain_xml, disks_in_xml
from etcd_compute.ecompute.driver import DomainSpec, DriverError, RbdDisk, VolumeDisk
from etcd_compute.ecompute.fakedriver import FakeDriver
from etcd_compute.eschedule import moves
from etcd_compute.rbd import RbdPool, RbdSettings
from etcd_compute.states import Actual, Command

from conftest import Cloud

V1, V2 = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d", "1b2c3d4e-5f6a-4b7c-8d9e-0f1a2b3c4d5e"
MONITORS = (("10.0.0.1", 6789),)


def rbd_volume(volume: str) -> VolumeDisk:
    return VolumeDisk(volume, RbdDisk(f"pool/vol-{volume}", MONITORS, "ec", "secret-uuid"))


def test_a_domain_has_its_volumes_as_rbd_disks_after_its_root_disk() -> None:
    spec = DomainSpec(str(uuidlib.uuid4()), 1, 64, rbd=RbdDisk("pool/vm-x", MONITORS, "ec", "secret-uuid"),
                      volumes=(rbd_volume(V1), rbd_volume(V2)))
    xml = build_domain_xml(spec, "qemu")
    disks = {d.find("target").get("dev"): d for d in ET.fromstring(xml).findall("devices/disk")}  # type: ignore[union-attr]
    assert sorted(disks) == ["vda", "vdb", "vdc"]
    vdb = disks["vdb"]
    assert vdb.find("source").attrib == {"protocol": "rbd", "name": f"pool/vol-{V1}"}  # type: ignore[union-attr]
    assert vdb.find("driver").attrib == {"name": "qemu", "type": "raw", "cache": "none",  # type: ignore[union-attr]
                                         "error_policy": "stop"}
    assert vdb.find("auth/secret").attrib == {"type": "ceph", "uuid": "secret-uuid"}  # type: ignore[union-attr]
    assert vdb.findtext("serial") == V1[:20]  # the guest's /dev/disk/by-id/virtio-<serial>
    assert disks_in_xml(xml) == ({V1: "vdb", V2: "vdc"}, {"vda", "vdb", "vdc"})


def test_the_fake_hypervisor_attaches_and_detaches_and_a_guest_may_hold_on(tmp_path: Path) -> None:
    drv = FakeDriver(f"fake://{tmp_path / 'hv'}", str(tmp_path / "instances"))
    drv.prepare(None)
    uuid = str(uuidlib.uuid4())
    drv.ensure_running(DomainSpec(uuid, 1, 64, volumes=(rbd_volume(V1),)))
    assert drv.volumes(uuid) == {V1: "vdb"}
    assert drv.attach_volume(uuid, rbd_volume(V2)) == "vdc"
    assert drv.attach_volume(uuid, rbd_volume(V2)) == "vdc"  # again: where it is
    assert drv.detach_volume(uuid, V1, 1) and not drv.detach_volume(uuid, V1, 1)
    path = tmp_path / "hv" / f"{uuid}.json"
    dom = json.loads(path.read_text())
    path.write_text(json.dumps({**dom, "unreleased": [V2]}))
    started = time.monotonic()
    with pytest.raises(DriverError, match=f"the guest did not release volume {V2} within 0.3 s"):
        drv.detach_volume(uuid, V2, 0.3)
    assert time.monotonic() - started >= 0.3 and drv.volumes(uuid) == {V2: "vdc"}


# ---------------------------------------------------------------- in-process daemons, a dict for a pool


@dataclass
class FakePool:
    """The Ceph pool as the host's storage sees it (RbdStorage's Ceph calls replaced)."""

    images: set[str] = field(default_factory=set)
    taken: list[str] = field(default_factory=list)  # take_over(name), in order
    removed: list[str] = field(default_factory=list)  # remove(name), in order


@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch) -> FakePool:
    fake = FakePool()

    def take_over(self: storage.RbdStorage, name: str) -> list[str]:
        fake.taken.append(name)
        return []

    def remove(self: RbdPool, name: str) -> bool:
        fake.removed.append(name)
        return name in fake.images and not fake.images.discard(name)

    monkeypatch.setattr(storage.RbdStorage, "exists", lambda self, name: name in fake.images)
    monkeypatch.setattr(storage.RbdStorage, "take_over", take_over)
    monkeypatch.setattr(storage.RbdStorage, "remove", remove)
    return fake


@pytest.fixture
def world(cloud: Cloud) -> Iterator[InProcess]:
    made = InProcess(cloud)
    yield made
    made.close()
    for provider in cloud.store.pools():  # the fake pool's sharing provider
        try:
            cloud.placement.delete_provider(provider)
        except Exception:  # noqa: BLE001 - best effort: a test's leftover, in its own aggregates
            pass


def rbd_host(world: InProcess, name: str = "vol1", fsid: str | None = None, **overrides: Any) -> tuple[Host, str]:
    """A fake host whose disks are in a Ceph pool (storage.backend rbd, a ceph.conf of the
    cluster `fsid`, else of its own); (the host, its pool's sharing provider)."""
    files = world.cloud.files / name
    files.mkdir(parents=True, exist_ok=True)
    conf, keyring = files / "ceph.conf", files / "keyring"
    conf.write_text(f"[global]\nfsid = {fsid or uuidlib.uuid4()}\nmon host = 127.0.0.1:6789\n")
    keyring.write_text("[client.ec]\nkey = x\n")
    host = world.start(name, storage={"backend": "rbd", "rbd": {
        "pool": "vols", "ceph_conf": str(conf), "user": "ec", "keyring": str(keyring),
        "secret_uuid": str(uuidlib.uuid4()), "capacity_gb": 10}}, **overrides)
    record = world.cloud.store.host_record(host.host)
    assert record is not None and record.get("pool")  # the host says which pool its volumes are in
    return host, str(record["pool"])


def ref(volume: str, pool: str) -> VolumeRef:
    return {"id": volume, "image": f"vol-{volume}", "pool": pool}


def want_volumes(world: InProcess, uuid: str, *refs: VolumeRef) -> None:
    """What the user's side will write: the request's volumes."""
    def change(request: Request, status: Status | None) -> Request:
        return {**request, "volumes": list(refs)}
    world.cloud.store.update_request(uuid, change)


def status(world: InProcess, uuid: str) -> Status:
    found = world.cloud.store.get_status(uuid)[0]
    assert found is not None
    return found


def settled(world: InProcess, uuid: str, state: Actual, volumes: list[str], what: str) -> Status:
    def done() -> Status | None:
        s = world.cloud.store.get_status(uuid)[0]
        if s is None or s["state"] != state or s.get("volumes") != volumes:
            return None
        return None if (s.get("reason") or "").startswith(("attaching", "detaching")) else s
    found: Status = wait_until(done, 20, what)
    return found


def events(found: Status) -> list[str]:
    return [e["event"] for e in found["events"]]


def domain(host: Host, uuid: str) -> dict[str, Any]:
    return dict(json.loads((host.hypervisor / f"{uuid}.json").read_text()))


def test_volumes_attach_and_detach_running_or_off_and_outlive_their_instance(world: InProcess, pool: FakePool) -> None:
    host, provider = rbd_host(world)
    uuid = world.schedule(SMALL)
    settled(world, uuid, Actual.ACTIVE, [], "ACTIVE")
    pool.images |= {f"vol-{V1}", f"vol-{V2}"}

    want_volumes(world, uuid, ref(V1, provider))
    found = settled(world, uuid, Actual.ACTIVE, [V1], "V1 attached")
    assert f"volume {V1} attached (vdb)" in events(found)
    assert domain(host, uuid)["volumes"] == {V1: "vdb"} and pool.taken == [f"vol-{V1}"]

    want_volumes(world, uuid, ref(V1, provider), ref(V2, provider))
    settled(world, uuid, Actual.ACTIVE, [V1, V2], "V2 attached")
    want_volumes(world, uuid, ref(V2, provider))
    found = settled(world, uuid, Actual.ACTIVE, [V2], "V1 detached")
    assert f"volume {V1} detached" in events(found) and domain(host, uuid)["volumes"] == {V2: "vdc"}

    world.ops.act(Command.STOP, uuid)
    settled(world, uuid, Actual.STOPPED, [V2], "STOPPED")
    want_volumes(world, uuid, ref(V2, provider), ref(V1, provider))  # attached while off: in its definition
    settled(world, uuid, Actual.STOPPED, [V2, V1], "V1 attached while STOPPED")
    assert domain(host, uuid)["state"] == "shutoff" and domain(host, uuid)["volumes"] == {V2: "vdc", V1: "vdb"}
    world.ops.act(Command.START, uuid)
    settled(world, uuid, Actual.ACTIVE, [V2, V1], "started with both")
    assert domain(host, uuid)["state"] == "running"
    assert pool.taken == [f"vol-{V1}", f"vol-{V2}", f"vol-{V1}"]  # each time it was opened anew, never after

    world.ops.destroy(uuid)
    wait_until(lambda: world.cloud.store.get_status(uuid)[0] is None, 20, "destroyed")
    assert pool.removed == [storage.disk_name(uuid)]  # its root disk's name only: never a volume
    assert pool.images == {f"vol-{V1}", f"vol-{V2}"}


def test_a_rebuilt_domain_comes_up_with_its_volumes(world: InProcess, pool: FakePool) -> None:
    """A build attaches the request's volumes in the domain's definition and records them: the
    domain vanished here (and so comes back), as an evacuated instance comes up on its new host."""
    host, provider = rbd_host(world, resync_interval=1)
    uuid = world.schedule(SMALL)
    settled(world, uuid, Actual.ACTIVE, [], "ACTIVE")
    pool.images.add(f"vol-{V1}")
    want_volumes(world, uuid, ref(V1, provider))
    settled(world, uuid, Actual.ACTIVE, [V1], "V1 attached")
    (host.hypervisor / f"{uuid}.json").unlink()
    wait_until(lambda: any("vanished" in e for e in events(status(world, uuid))), 20, "the vanished domain seen")
    settled(world, uuid, Actual.ACTIVE, [V1], "rebuilt")
    assert domain(host, uuid)["volumes"] == {V1: "vdb"} and pool.taken == [f"vol-{V1}", f"vol-{V1}"]


def test_an_evacuated_instance_comes_up_on_its_new_host_with_its_volumes(world: InProcess, pool: FakePool) -> None:
    """Two hosts of one pool; A stops (forced evacuation: the operator fenced it): B builds the
    instance with its volumes in the definition, taking each over from A first."""
    fsid = str(uuidlib.uuid4())
    a, provider = rbd_host(world, "volA", fsid)
    uuid = world.schedule(SMALL)
    settled(world, uuid, Actual.ACTIVE, [], "ACTIVE on A")
    assert status(world, uuid)["host"] == a.host
    pool.images.add(f"vol-{V1}")
    want_volumes(world, uuid, ref(V1, provider))
    settled(world, uuid, Actual.ACTIVE, [V1], "V1 attached on A")
    b, same = rbd_host(world, "volB", fsid)
    assert same == provider
    world.stop(a)
    [moved] = moves.evacuate(world.ops, a.host, force=True)
    assert moved["to"] == b.host, moved
    found = settled(world, uuid, Actual.ACTIVE, [V1], "ACTIVE on B with V1")  # (its status starts afresh there)
    assert found["host"] == b.host
    assert domain(b, uuid)["volumes"] == {V1: "vdb"} and pool.taken == [f"vol-{V1}", f"vol-{V1}"]


def test_a_host_with_local_disks_has_no_pool(world: InProcess) -> None:
    host = world.start("plain")
    record = world.cloud.store.host_record(host.host)
    assert record is not None and record.get("pool", "missing") is None


def test_a_volume_of_another_pool_is_parked_with_the_reason(world: InProcess, pool: FakePool) -> None:
    host, provider = rbd_host(world)
    uuid = world.schedule(SMALL)
    settled(world, uuid, Actual.ACTIVE, [], "ACTIVE")
    pool.images |= {f"vol-{V1}", f"vol-{V2}"}
    elsewhere = str(uuidlib.uuid4())
    want_volumes(world, uuid, ref(V1, provider), ref(V2, elsewhere))
    found = settled(world, uuid, Actual.ACTIVE, [V1], "V1 attached, V2 not")
    wait_until(lambda: f"volume {V2} is in pool {elsewhere}" in (status(world, uuid).get("reason") or ""), 20,
               "the reason")
    assert domain(host, uuid)["volumes"] == {V1: "vdb"} and pool.taken == [f"vol-{V1}"]  # V2 never looked at
    assert f"vol-{V2}" not in str(found)


def test_a_failing_or_hanging_attach_says_why_then_parks(world: InProcess, pool: FakePool) -> None:
    host, provider = rbd_host(world, retries=2, deadlines={"power": 1})
    uuid = world.schedule(SMALL)
    settled(world, uuid, Actual.ACTIVE, [], "ACTIVE")
    want_volumes(world, uuid, ref(V1, provider))  # its image was never made
    missing = f"volume {V1}: its image vols/vol-{V1} does not exist"
    wait_until(lambda: status(world, uuid).get("reason") == f"{missing}; trying again (1 of 2)", 20, "a retry")
    wait_until(lambda: status(world, uuid).get("reason") == f"{missing} (2 times in a row); left as it is until "
               "it is asked again", 30, "parked")
    assert status(world, uuid)["state"] == Actual.ACTIVE and status(world, uuid)["volumes"] == []

    pool.images.add(f"vol-{V2}")
    host.fault(".hang-attach_volume")
    try:
        want_volumes(world, uuid, ref(V2, provider))  # a new request: no longer parked
        wait_until(lambda: "did not finish within 1s" in (status(world, uuid).get("reason") or "")
                   and "left as it is" in (status(world, uuid).get("reason") or ""), 30, "the hang parked")
    finally:
        host.fault(".hang-attach_volume", on=False)
    assert status(world, uuid)["state"] == Actual.ACTIVE


# ---------------------------------------------------------------- a real guest on Ceph


def said(console: Path, key: str) -> list[str]:
    return re.findall(rf"ECTEST {key}=([^\r\n]*)", console.read_text(errors="replace") if console.exists() else "")


@pytest.mark.qemu
@pytest.mark.ceph
def test_a_running_guest_writes_to_a_hot_plugged_volume_and_reads_it_back_after_a_detach(
        cloud: Cloud, ceph: CephInfo) -> None:
    """One boot of the test guest (`ec.volume=WORD`: it waits for /dev/vdb, says its serial and
    what its first sector held, writes WORD there, says when it is gone, and so on): the volume
    is hot-plugged into the running guest, detached (the guest lets go), attached again, and the
    guest reads what it wrote."""
    from test_rbd import rbd_storage

    from devstack.testguest import ensure_guest
    started = time.monotonic()
    guest = ensure_guest()
    host = cloud.qemu_host("volq", storage=rbd_storage(ceph), lease_ttl=3)
    record = cloud.host_record(host.host)
    assert record is not None and record.get("pool")
    volume = str(uuidlib.uuid4())
    client = RbdPool(RbdSettings(pool=ceph.pool, conf=str(ceph.conf), cluster=ceph.cluster, user=ceph.client,
                                 keyring=str(ceph.keyring)))
    assert client.create(f"vol-{volume}", 1)
    try:
        r = cloud.eschedule("resources=VCPU:1,MEMORY_MB:128,DISK_GB:1", guest["disk"], "--kernel", guest["kernel"],
                            "--initrd", guest["initrd"], "--cmdline", f"{guest['cmdline']} ec.volume=WROTE",
                            "--wait", "--json", timeout=300)
        assert r.rc == 0, r
        uuid = r.json()["uuid"]
        console = cloud.console_log("volq", uuid)
        wait_until(lambda: said(console, "volume_waiting"), 120, "the guest up, waiting for its volume")
        vref = ref(volume, str(record["pool"]))

        def want(*refs: VolumeRef) -> None:
            cloud.store.update_request(uuid, lambda request, _: {**request, "volumes": list(refs)})

        def attached(volumes: list[str]) -> Status:
            return wait_until(lambda: (s := cloud.store.get_status(uuid)[0]) is not None
                              and s.get("volumes") == volumes and s["reason"] is None and s, 60,
                              f"volumes {volumes}")
        want(vref)
        found = attached([volume])
        assert f"volume {volume} attached (vdb)" in [e["event"] for e in found["events"]]
        wait_until(lambda: said(console, "volume"), 60, "the guest to write its volume")
        assert said(console, "volume_serial") == [volume[:20]]  # the guest sees the volume's id
        assert said(console, "volume_was") == [""] and said(console, "volume") == ["WROTE"]
        want()
        attached([])
        wait_until(lambda: said(console, "volume_gone"), 30, "the guest to see it gone")
        want(vref)
        attached([volume])
        wait_until(lambda: len(said(console, "volume_was")) == 2, 60, "the guest to read it again")
        assert said(console, "volume_was") == ["", "WROTE"]  # what it wrote before the detach
        assert cloud.eschedule("destroy", uuid, "--wait").rc == 0
        assert client.exists(f"vol-{volume}")  # the instance is gone, its volume is not
    finally:
        client.remove(f"vol-{volume}")
    print(f"volume hot-plug test: {time.monotonic() - started:.1f} s")
