"""A second libvirt host on this machine (devstack/libvirthost.py), and tests that look only at their own domains."""

from __future__ import annotations

import contextlib
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from devstack.libvirthost import LibvirtHost
from etcd_compute.ecompute.driver import DomainSpec, build_domain_xml

from conftest import own_domains

MACHINE = "qemu:///system"
SMALL = "resources=VCPU:1,MEMORY_MB:64"


def diskless(uuid: str, owner: str) -> str:
    """The domain XML ecompute makes for a diskless instance (no NIC): it idles in SeaBIOS."""
    return build_domain_xml(DomainSpec(uuid, 1, 64, owner=owner), "qemu")


@contextlib.contextmanager
def running(uri: str, uuid: str, owner: str = "test-libvirthost") -> Iterator[libvirt.virDomain]:
    """A transient diskless domain on `uri` for the length of a block."""
    conn = libvirt.open(uri)
    try:
        dom = conn.createXML(diskless(uuid, owner))
        try:
            yield dom
        finally:
            with contextlib.suppress(libvirt.libvirtError):  # gone already
                dom.destroy()
    finally:
        conn.close()


def qemu_with_uuid(uuid: str) -> list[int]:
    """Every QEMU process of this machine started with `-uuid <uuid>`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            args = cmdline.read_bytes().split(b"\0")
            if args[0].split(b"/")[-1].startswith(b"qemu-system") and uuid.encode() in args:
                found.append(int(cmdline.parent.name))
    return found


def own_domains_on(uri: str) -> dict[str, int]:
    """The domains of these tests (owner test-libvirthost) on `uri`."""
    conn = libvirt.open(uri)
    try:
        return own_domains(conn, "test-libvirthost")
    finally:
        conn.close()


def known(uri: str) -> dict[str, set[str]]:
    """The names of every domain, network and storage pool defined or running on `uri`."""
    conn = libvirt.open(uri)
    try:
        return {"domains": {d.name() for d in conn.listAllDomains()},
                "networks": {n.name() for n in conn.listAllNetworks()},
                "pools": {p.name() for p in conn.listAllStoragePools()}}
    finally:
        conn.close()


class _VanishesAfterListing:
    """A real connection whose listAllDomains() destroys `victim` right after listing it: an
    unrelated domain going away at the worst moment for whoever walks the list."""

    def __init__(self, conn: libvirt.virConnect, victim: libvirt.virDomain) -> None:
        self._conn, self._victim = conn, victim

    def listAllDomains(self, flags: int = 0) -> list[libvirt.virDomain]:  # noqa: N802 (libvirt's name)
        listed = self._conn.listAllDomains(flags)
        self._victim.destroy()
        return listed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


@pytest.mark.qemu
def test_a_look_at_our_domains_survives_anothers_vanishing(second_host: LibvirtHost) -> None:
    """test_faults walked every domain of the shared libvirtd and read each one's XML: a domain of
    another test or stack destroyed between the listing and that read failed it."""
    ours, foreign = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    with running(second_host.uri, ours, owner="this-test"), running(second_host.uri, foreign, "another") as victim:
        conn = libvirt.open(second_host.uri)
        try:
            assert own_domains(_VanishesAfterListing(conn, victim), "this-test").keys() == {ours}
        finally:
            conn.close()

