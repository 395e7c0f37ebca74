"""Ceph in devstack (issue 19, item 1): the one-node cluster of devstack/ceph.py is healthy and usable,
its images are snapshotted, protected, cloned and grown, libvirt lists them (on the machine's libvirtd
and on a second libvirt host), a real guest boots from an RBD clone and writes to it, and a blocklist
(not RBD's exclusive lock) fences that guest's client so that another client takes the image over.

Every test removes what it made (images, snapshots, domains, blocklist entries, libvirt definitions
on the second host); the cluster and the machine libvirtd's secret and pool stay, as etcd does.
Timings are printed (`-rP` shows them).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from devstack import ceph as devceph
from devstack.ceph import CephInfo
from devstack.harness import wait_until
from devstack.libvirthost import LibvirtHost
from devstack.testguest import ensure_guest
from etcd_compute.ecompute.domainxml import build_domain_xml
from etcd_compute.ecompute.driver import DomainSpec

pytestmark = pytest.mark.ceph
libvirt.registerErrorHandler(lambda *a: None, None)

MIB = 1 << 20


class Images:
    """RBD images of one test, all named t-<tag>-..., removed at its end: clones before their
    parents, each parent's snapshots unprotected and purged first."""

    def __init__(self, ceph: CephInfo) -> None:
        self.ceph, self.tag = ceph, uuidlib.uuid4().hex[:8]
        self.made: list[str] = []

    def name(self, what: str) -> str:
        name = f"t-{self.tag}-{what}"
        self.made.append(name)
        return name

    def import_raw(self, what: str, source: str) -> str:
        """An image of `source` (any format qemu-img reads) stored raw, as the rbd backend will."""
        name = self.name(what)
        subprocess.run(["qemu-img", "convert", "-O", "raw", source, self.ceph.qemu_url(name)], check=True,
                       capture_output=True, timeout=120)
        return name

    def golden_clone(self, source: str, size: int) -> tuple[str, str]:
        """(base, clone): `source` imported, snapshotted as @gold, protected, cloned and grown to `size`."""
        base = self.import_raw("base", source)
        self.ceph.rbd("snap", "create", f"{self.ceph.pool}/{base}@gold")
        self.ceph.rbd("snap", "protect", f"{self.ceph.pool}/{base}@gold")
        clone = self.name("clone")
        self.ceph.rbd("clone", f"{self.ceph.pool}/{base}@gold", f"{self.ceph.pool}/{clone}")
        self.ceph.rbd("resize", "--no-progress", "--size", f"{size // MIB}M", f"{self.ceph.pool}/{clone}")
        return base, clone

    def listed(self) -> set[str]:
        return set(self.ceph.rbd("ls", self.ceph.pool).split())

    def remove_all(self) -> None:
        present = self.listed()
        for name in reversed(self.made):
            if name not in present:
                continue
            spec = f"{self.ceph.pool}/{name}"
            for snap in json.loads(self.ceph.rbd("snap", "ls", "--format", "json", spec)):
                if snap["protected"] == "true":
                    self.ceph.rbd("snap", "unprotect", f"{spec}@{snap['name']}")
            self.ceph.rbd("snap", "purge", "--no-progress", spec)
            self.ceph.rbd("rm", "--no-progress", spec)


@pytest.fixture
def images(ceph: CephInfo) -> Iterator[Images]:
    made = Images(ceph)
    yield made
    made.remove_all()
    assert not {n for n in made.listed() if n.startswith(f"t-{made.tag}-")}


@pytest.fixture(scope="module")
def guest() -> dict:
    return ensure_guest()


def read_sector(ceph: CephInfo, image: str, tmp: Path, sector: int = 0) -> bytes:
    """One 512-byte sector of `image`, read by a client of its own (read-only: it takes no lock)."""
    out = tmp / f"sector-{uuidlib.uuid4().hex[:6]}.raw"
    # qemu-img dd counts the skipped blocks in `count` (skip=1 count=1 reads nothing).
    subprocess.run(["qemu-img", "dd", "-f", "raw", "-O", "raw", f"if={ceph.qemu_url(image)}", f"of={out}",
                    "bs=512", f"skip={sector}", f"count={sector + 1}"], check=True, capture_output=True, timeout=60)
    data = out.read_bytes()
    out.unlink()
    return data


def test_the_cluster_is_healthy_idempotent_and_its_pool_takes_io(ceph: CephInfo, images: Images,
                                                                 tmp_path: Path) -> None:
    t0 = time.monotonic()
    again = devceph.ensure_ceph(ceph.dir.parent)
    print(f"ensure_ceph() on a healthy cluster: {time.monotonic() - t0:.2f} s")
    assert again == ceph
    assert devceph.unusable(devceph.cluster_status(ceph)) is None
    assert ceph.ceph("osd", "pool", "get", ceph.pool, "size").split() == ["size:", "1"]
    assert '"rbd"' in ceph.ceph("osd", "pool", "application", "get", ceph.pool)
    name = images.name("io")
    ceph.rbd("create", "--size", "16M", f"{ceph.pool}/{name}")
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 512 512", ceph.qemu_url(name)], check=True,
                   capture_output=True, timeout=60)
    assert read_sector(ceph, name, tmp_path, 1) == b"\x5a" * 512
    assert name in images.listed()


def test_an_image_is_snapshotted_protected_cloned_grown_and_listed_by_libvirt(
        ceph: CephInfo, images: Images, guest: dict) -> None:
    t0 = time.monotonic()
    base, clone = images.golden_clone(guest["disk"], 256 * MIB)
    print(f"import + snapshot + protect + clone + resize: {time.monotonic() - t0:.1f} s")
    info = ceph.rbd("info", f"{ceph.pool}/{clone}")
    assert "size 256 MiB" in info and f"parent: {ceph.pool}/{base}@gold" in info
    assert "protected: True" in ceph.rbd("info", f"{ceph.pool}/{base}@gold")
    with pytest.raises(devceph.CephError, match="child"):  # a protected snapshot with a clone stays
        ceph.rbd("snap", "unprotect", f"{ceph.pool}/{base}@gold")

    conn = libvirt.open(devceph.LIBVIRT_URI)
    try:
        pool = conn.storagePoolLookupByName(ceph.libvirt_pool)
        pool.refresh(0)
        assert {base, clone} <= set(pool.listVolumes())
        assert pool.storageVolLookupByName(clone).info()[1] == 256 * MIB  # capacity
    finally:
        conn.close()


def rbd_disk(ceph: CephInfo, image: str) -> ET.Element:
    """The domain's root disk on RBD: the client's key from the libvirt secret, the monitors named
    (QEMU reads no ceph.conf), and error_policy='stop': a fenced guest pauses instead of seeing I/O errors."""
    disk = ET.Element("disk", type="network", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="raw", cache="none", error_policy="stop")
    auth = ET.SubElement(disk, "auth", username=ceph.client)
    ET.SubElement(auth, "secret", type="ceph", uuid=ceph.secret_uuid)
    source = ET.SubElement(disk, "source", protocol="rbd", name=f"{ceph.pool}/{image}")
    for host, port in ceph.mon_hosts:
        ET.SubElement(source, "host", name=host, port=str(port))
    ET.SubElement(disk, "target", dev="vda", bus="virtio")
    return disk


def beats(console: Path) -> int:
    """The last `beat=N` the guest reported: N writes of its disk made it to the disk."""
    found = re.findall(r"ECTEST beat=(\d+)", console.read_text(errors="replace") if console.exists() else "")
    return int(found[-1]) if found else 0


@pytest.mark.qemu
def test_a_guest_on_an_rbd_clone_writes_and_a_blocklist_fences_it(
        ceph: CephInfo, images: Images, guest: dict, tmp_path: Path) -> None:
    _, clone = images.golden_clone(guest["disk"], 256 * MIB)
    word = f"w{images.tag}"
    console = tmp_path / "console.log"
    spec = DomainSpec(str(uuidlib.uuid4()), 1, 128, console_log=str(console), kernel=guest["kernel"],
                      initrd=guest["initrd"], cmdline=f"{guest['cmdline']} ec.stamp={word}")
    dom_xml = ET.fromstring(build_domain_xml(spec, "qemu"))
    name, devices = dom_xml.find("name"), dom_xml.find("devices")
    assert name is not None and devices is not None
    # No instance of any host: not named like one (ec-<uuid>), so that no ecompute, fence or test
    # cleanup of any stack on this machine takes it for its own. (Fences left running by an old chaos
    # run SIGKILLed every ec-* QEMU of the machine's libvirtd ~15 ms after its exec.)
    name.text = f"ceph-test-{images.tag}"
    devices.insert(0, rbd_disk(ceph, clone))
    conn = libvirt.open(devceph.LIBVIRT_URI)
    fenced: list[str] = []
    try:
        t0 = time.monotonic()
        dom = conn.createXML(ET.tostring(dom_xml, encoding="unicode"), 0)
        wait_until(lambda: f"ECTEST stamp={word}" in console.read_text(errors="replace") if console.exists()
                   else False, 300, "the guest to stamp its RBD disk", interval=0.25)  # 9-138 s seen
        booted = time.monotonic() - t0
        wait_until(lambda: beats(console) >= 2, 60, "two beats on the guest's disk", interval=0.25)
        text = console.read_text(errors="replace")
        assert "ECTEST stamp_was=\r" in text or "ECTEST stamp_was=\n" in text  # a fresh clone: no stamp yet
        assert f"ECTEST disk_bytes={256 * MIB}" in text  # the guest sees the grown clone
        # What the guest wrote, read back by another client while it runs.
        assert read_sector(ceph, clone, tmp_path).startswith(f"ECSTAMP {word}\n".encode())

        (address,) = ceph.watchers(clone)  # the guest's QEMU: the one client with the image open
        takeover: dict[str, float | Exception] = {}

        def take_over() -> None:
            try:  # a second writer: it must wait until the fenced owner's lock is broken
                subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x54 0 512", ceph.qemu_url(clone)],
                               check=True, capture_output=True, timeout=120)
                takeover["done"] = time.monotonic()
            except (subprocess.SubprocessError, OSError) as e:
                takeover["error"] = e

        t_fence = time.monotonic()
        ceph.blocklist(address)
        fenced.append(address)
        writer = threading.Thread(target=take_over)
        writer.start()
        assert address in ceph.blocklisted()
        wait_until(lambda: dom.state() == [libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR], 120,
                   "the fenced guest to pause on an I/O error", interval=0.1)
        paused = time.monotonic() - t_fence
        writer.join(130)
        assert "error" not in takeover, takeover
        took_over = float(takeover["done"]) - t_fence
        last = beats(console)
        time.sleep(3)
        assert beats(console) == last  # its writes stopped
        assert read_sector(ceph, clone, tmp_path) == b"T" * 512  # the second client's write is there
        print(f"guest stamped its RBD disk {booted:.1f} s after start; after the blocklist: paused "
              f"(I/O error) in {paused:.1f} s, the second client's write done in {took_over:.1f} s")
    finally:
        with contextlib.suppress(libvirt.libvirtError):  # a fenced guest never recovers: destroyed (and gone)
            conn.lookupByUUIDString(spec.uuid).destroy()
        conn.close()
        for address in fenced:
            ceph.unblocklist(address)
    assert not set(fenced) & set(ceph.blocklisted())


def test_a_second_libvirt_host_gets_the_secret_and_the_pool(ceph: CephInfo, images: Images,
                                                            second_host: LibvirtHost) -> None:
    name = images.name("seen")
    ceph.rbd("create", "--size", "8M", f"{ceph.pool}/{name}")
    try:
        ceph.define_libvirt(second_host.uri)
        ceph.define_libvirt(second_host.uri)  # idempotent
        conn = libvirt.open(second_host.uri)
        try:
            pool = conn.storagePoolLookupByName(ceph.libvirt_pool)
            pool.refresh(0)
            assert name in pool.listVolumes()
            assert conn.secretLookupByUUIDString(ceph.secret_uuid).usageID() == ceph.secret_usage
        finally:
            conn.close()
    finally:
        ceph.undefine_libvirt(second_host.uri)
    conn = libvirt.open(second_host.uri)
    try:
        assert ceph.libvirt_pool not in conn.listStoragePools() + conn.listDefinedStoragePools()
        assert ceph.secret_uuid not in conn.listSecrets()
    finally:
        conn.close()


def test_daemons_killed_as_by_a_reboot_come_back_on_their_data(ceph: CephInfo, images: Images) -> None:
    name = images.name("kept")
    ceph.rbd("create", "--size", "24M", f"{ceph.pool}/{name}")
    pids = devceph.running(ceph)
    assert all(pids.values()), pids
    for pid in pids.values():
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not any(devceph.running(ceph).values()), 30, "the daemons to die")
    t0 = time.monotonic()
    assert devceph.ensure_ceph(ceph.dir.parent) == ceph
    print(f"mon, mgr and osd SIGKILLed: usable again {time.monotonic() - t0:.1f} s after ensure_ceph()")
    assert "size 24 MiB" in ceph.rbd("info", f"{ceph.pool}/{name}")
