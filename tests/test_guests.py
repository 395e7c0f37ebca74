"""Real guests on real QEMU (TCG): the offline test guest boots, gets a DHCP address, reads its
own cloud-init data from the config drive and the metadata server, and leaves nothing behind."""

from __future__ import annotations

import concurrent.futures
import http.client
import ipaddress
import os
import stat
import subprocess
import urllib.request
from pathlib import Path

import libvirt
import pytest

from devstack import localstack
from devstack.harness import Ecompute, Served, free_port, guest_report, wait_until
from devstack.testguest import ensure_guest

from conftest import Cloud

SUBNET = ipaddress.ip_network(localstack.ISOLATED_NETWORK["address"], strict=False)
KEYS = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGuestOneKey one@test",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGuestTwoKey two@test"]

libvirt.registerErrorHandler(lambda *a: None, None)


@pytest.fixture(scope="session")
def guest(stack: dict) -> dict:
    return ensure_guest()


def boot_args(cloud: Cloud, guest: dict, query: str, key: str | None = None, cmdline: str = "") -> list[str]:
    args = [query, guest["disk"], "--kernel", guest["kernel"], "--initrd", guest["initrd"],
            "--cmdline", f"{guest['cmdline']} ec.md=http://169.254.169.254:{cloud.md_port} {cmdline}".strip()]
    if key:
        path = cloud.write(f"key{abs(hash(key))}.pub", key + "\n")
        args += ["--key", str(path)]
    return args


def console(host: Ecompute, cloud: Cloud, uuid: str) -> dict[str, str]:
    """What the guest's /init reported on its serial console, once it is done."""
    return guest_report(cloud.console_log(host.name, uuid))


def instance_files(host: Ecompute, cloud: Cloud) -> list[str]:
    path = Path(cloud.compute_config(host.name)["instances_path"])
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


@pytest.mark.qemu
def test_two_guests_boot_get_addresses_and_read_only_their_own_data(cloud: Cloud, guest: dict) -> None:
    host = cloud.compute("qemu1", uri="qemu:///system", workers=2)
    queries = ["resources=VCPU:1,MEMORY_MB:256,DISK_GB:1", "resources=VCPU:1,MEMORY_MB:256,DISK_GB:2"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda qk: cloud.eschedule(*boot_args(cloud, guest, *qk), "--wait", "--json"),
                                zip(queries, KEYS, strict=True)))
    views = []
    for r in results:
        assert r.rc == 0, (r, host.logtext()[-3000:])
        views.append(r.json())

    conn = libvirt.open("qemu:///system")
    try:
        for view, key, disk_gb in zip(views, KEYS, (1, 2), strict=True):
            uuid, ip = view["uuid"], view["ip"]
            assert view["state"] == "ACTIVE" and ipaddress.ip_address(ip) in SUBNET, view
            assert ip in cloud.eschedule(uuid).out  # `eschedule UUID` shows the address
            seen = console(host, cloud, uuid)
            assert seen["ip"] == ip  # the lease etcd reports is the address the guest configured
            assert seen["cd_instance_id"] == uuid and seen["cd_hostname"] == f"ec-{uuid[:8]}"
            assert seen["md_instance_id"] == uuid
            assert seen["md_ssh_key"] == key  # its own key, not the other guest's
            assert int(seen["disk_bytes"]) == disk_gb << 30  # the overlay grown to DISK_GB
            assert conn.lookupByUUIDString(uuid).info()[1] == 256 * 1024
    finally:
        conn.close()
    assert views[0]["ip"] != views[1]["ip"]
    # QEMU read the base image, kernel and initrd from a cache nobody else can read: it passes
    # through the directory (0711) and libvirt hands it the files (0600) a domain uses.
    cache = Path(cloud.compute_config(host.name)["image_cache_path"])
    assert stat.S_IMODE(cache.stat().st_mode) == 0o711
    cached = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(cached) == 3 and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in cached), cached

    # The host itself is no instance: the metadata server answers it with 404.
    md = http.client.HTTPConnection("169.254.169.254", cloud.md_port, timeout=5)
    md.request("GET", "/latest/meta-data/instance-id")
    resp = md.getresponse()
    assert resp.status == 404 and views[0]["uuid"] not in resp.read().decode()

    # A third guest that takes the first one's address after DHCP gets none of its data: its NIC
    # is pinned to its own reserved address (clean-traffic), so nothing it sends with another leaves.
    r = cloud.eschedule(*boot_args(cloud, guest, "resources=VCPU:1,MEMORY_MB:128,DISK_GB:1", KEYS[1],
                                   cmdline=f"ec.spoof={views[0]['ip']}"), "--wait", "--json")
    assert r.rc == 0, r
    thief = r.json()
    seen = console(host, cloud, thief["uuid"])
    assert seen["spoofed"] == views[0]["ip"] != thief["ip"]
    assert seen["md_instance_id"] == "none" and seen["md_ssh_key"] == "none", seen
    assert cloud.eschedule("destroy", thief["uuid"], "--wait").rc == 0

    # Destroy: twice at once is harmless; afterwards everything is gone.
    first = views[0]["uuid"]
    assert cloud.eschedule("destroy", first).rc == 0
    assert cloud.eschedule("destroy", first).rc == 0
    for view in views:
        r = cloud.eschedule("destroy", view["uuid"], "--wait")
        assert r.rc == 0, r
    assert cloud.eschedule("destroy", first).rc == 6  # now it is simply unknown
    conn = libvirt.open("qemu:///system")
    try:
        for view in views:
            with pytest.raises(libvirt.libvirtError):
                conn.lookupByUUIDString(view["uuid"])
    finally:
        conn.close()
    assert [f for f in instance_files(host, cloud) if f.startswith((views[0]["uuid"], views[1]["uuid"]))] == []
    # ... also as libvirt sees it: no volume left in the pool, no address reserved on the network.
    conn = libvirt.open("qemu:///system")
    try:
        pools = [p for p in conn.listAllStoragePools() if cloud.compute_config(host.name)["instances_path"]
                 in p.XMLDesc(0)]
        assert len(pools) == 1  # not refreshed here: it must know by itself that they are gone
        assert [v for v in pools[0].listVolumes() if not v.startswith(".")] == []
        network = conn.networkLookupByName(localstack.ISOLATED_NETWORK["name"]).XMLDesc(0)
        assert not [v["ip"] for v in [*views, thief] if f"ip='{v['ip']}'" in network]
    finally:
        conn.close()
    assert cloud.instance_keys() == {}
    assert cloud.usages(host.host) == {"VCPU": 0, "MEMORY_MB": 0, "DISK_GB": 0}


@pytest.mark.qemu
def test_image_errors_end_in_error_free_the_allocation_and_leave_no_files(
        cloud: Cloud, guest: dict, tmp_path: Path) -> None:
    host = cloud.compute("qemu1", uri="qemu:///system")
    (tmp_path / "www").mkdir()
    served = Served(tmp_path / "www")
    garbage = served.add("garbage.img", b"<html>this is no disk image</html>\n" * 2000)
    (tmp_path / "vmlinuz").write_bytes(Path(guest["kernel"]).read_bytes())
    try:
        cases = [
            ([f"{served.url}/missing.img"], "HTTP 404"),
            ([garbage], "not a disk image"),
            # The overlay exists by the time the missing kernel is noticed: it must go too.
            ([guest["disk"], "--kernel", str(Path(guest["kernel"]).parent / "no-such-vmlinuz")], "No such file"),
            # A kernel from outside the directories the host allows (image_dirs) is refused.
            ([guest["disk"], "--kernel", str(tmp_path / "vmlinuz")], "not in a directory this host allows"),
        ]
        for args, reason in cases:
            r = cloud.eschedule("resources=VCPU:1,MEMORY_MB:128,DISK_GB:1", *args, "--wait", "--json")
            assert r.rc == 8 and reason in r.err, r
            view = r.json()
            assert view["state"] == "ERROR" and reason in view["reason"]
            # Freed once the ERROR is recorded (in that order: a daemon dying between leaks, never overcommits).
            wait_until(lambda view=view: cloud.placement.get_allocations(view["uuid"]) == {}, 10,
                       "the allocation freed")
            assert cloud.usages(host.host) == {"VCPU": 0, "MEMORY_MB": 0, "DISK_GB": 0}
            assert instance_files(host, cloud) == []
            cache = Path(cloud.compute_config(host.name)["image_cache_path"])
            assert [p for p in cache.iterdir() if p.name.endswith(".part")] == []
            assert cloud.eschedule("destroy", view["uuid"], "--wait").rc == 0
        assert cloud.instance_keys() == {}
    finally:
        served.close()


def test_second_instance_from_a_cached_image_downloads_nothing(cloud: Cloud, guest: dict, tmp_path: Path) -> None:
    host = cloud.compute("host1")  # the image cache works the same on test:///default
    (tmp_path / "www").mkdir()
    served = Served(tmp_path / "www")
    try:
        url = served.add("guest.qcow2", Path(guest["disk"]).read_bytes())
        for _ in range(2):
            r = cloud.eschedule("resources=VCPU:1,MEMORY_MB:128,DISK_GB:1", url, "--wait", "--json")
            assert r.rc == 0 and r.json()["state"] == "ACTIVE", r
        assert served.hits == {"/guest.qcow2": 1}
        cache = Path(cloud.compute_config(host.name)["image_cache_path"])
        assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1
    finally:
        served.close()


def requests_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def events(cloud: Cloud, uuid: str) -> list[str]:
    return [e["event"] for e in cloud.show(uuid)["events"]]


@pytest.mark.qemu
def test_the_test_guest_shuts_down_cleanly_and_force_pulls_the_plug(cloud: Cloud, guest: dict) -> None:
    """The busybox guest powers itself off on the ACPI power button (acpid): stop and reboot are
    clean, with the host's default stop_timeout; --force pulls the plug at once; a timeout that
    runs out says so, not that the guest ignored ACPI."""
    host = cloud.compute("qemu1", uri="qemu:///system")
    r = cloud.eschedule(*boot_args(cloud, guest, "resources=VCPU:1,MEMORY_MB:128,DISK_GB:1"), "--wait", "--json")
    assert r.rc == 0, r
    uuid = r.json()["uuid"]
    console(host, cloud, uuid)  # booted as far as its report: acpid runs
    r = cloud.eschedule("stop", uuid, "--wait", "--json")
    assert r.rc == 0 and r.json()["state"] == "STOPPED", r
    assert events(cloud, uuid)[-1].startswith("STOPPED: clean shutdown in"), events(cloud, uuid)
    assert "ECTEST power_button" in cloud.console_log(host.name, uuid).read_text(errors="replace")
    assert cloud.eschedule("start", uuid, "--wait").rc == 0
    console(host, cloud, uuid)  # (each boot has a log of its own) booted again, as far as its report
    r = cloud.eschedule("reboot", uuid, "--wait", "--json")
    assert r.rc == 0 and r.json()["state"] == "ACTIVE", r
    assert events(cloud, uuid)[-1].startswith("ACTIVE (rebooted: clean shutdown in"), events(cloud, uuid)
    r = cloud.eschedule("stop", uuid, "--force", "--wait", "--json")
    assert r.rc == 0 and r.json()["state"] == "STOPPED", r
    assert events(cloud, uuid)[-1] == "STOPPED: powered off at once (--force): no clean shutdown"
    for args, message in [(["stop", uuid, "--force", "--timeout", "5"], "takes no shutdown timeout"),
                          (["reboot", uuid, "--timeout", "0"], "more than 0 and at most 3600"),
                          (["stop", uuid, "--timeout", "3601"], "more than 0 and at most 3600")]:
        r = cloud.eschedule(*args)
        assert r.rc == 2 and message in r.err and len(r.err.strip().splitlines()) == 1, (args, r)
    assert cloud.eschedule("destroy", uuid, "--wait").rc == 0


@pytest.mark.qemu
def test_a_guest_whose_kernel_panics_shows_crashed_and_is_restarted_as_configured(cloud: Cloud, guest: dict) -> None:
    """pvpanic: the guest's panic reaches libvirt, which shuts the domain off as crashed; the host
    records CRASHED with the reason. With crash_restarts 1 it starts it once again; the second
    panic in a row leaves it off until `eschedule start`."""
    cloud.compute("qemu1", uri="qemu:///system", crash_restarts=1)
    r = cloud.eschedule(*boot_args(cloud, guest, "resources=VCPU:1,MEMORY_MB:128,DISK_GB:1", cmdline="ec.panic"),
                        "--wait", "--json")
    assert r.rc == 0, r
    uuid = r.json()["uuid"]
    crashed = wait_until(lambda: (v := cloud.show(uuid))["state"] == "CRASHED" and "left off" in (v["reason"] or "")
                         and v, 300, "CRASHED, left off after the second panic")
    assert "the guest crashed: its kernel panicked (pvpanic), 2 times in a row" in crashed["reason"], crashed
    said = [e["event"] for e in crashed["events"]]
    assert any("starting it again (1 of 1 in a row)" in e for e in said), said
    r = cloud.eschedule("console", uuid, "--all")
    assert r.rc == 0 and r.out.count("ECTEST panicking") == 2 and "===== boot 2, started " in r.out, r
    conn = libvirt.open("qemu:///system")
    try:
        assert conn.lookupByUUIDString(uuid).state() == [libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_CRASHED]
    finally:
        conn.close()
    for action in ("reboot", "suspend"):
        r = cloud.eschedule(action, uuid)
        assert r.rc == 7 and "CRASHED" in r.err, r
    r = cloud.eschedule("stop", uuid, "--wait", "--json")  # it is off already: stopped is where it settles
    assert r.rc == 0 and r.json()["state"] == "STOPPED", r
    assert cloud.eschedule("destroy", uuid, "--wait").rc == 0


@pytest.mark.qemu
def test_a_guest_without_a_config_drive_is_openstack_by_smbios_and_reads_the_metadata_server(
        cloud: Cloud, guest: dict) -> None:
    """--no-config-drive: no cdrom at all; the machine says it is "OpenStack Nova" (what stock
    images' cloud-init looks for), its serial is the instance's uuid, and its data come from the
    metadata server."""
    host = cloud.compute("qemu1", uri="qemu:///system")
    r = cloud.eschedule(*boot_args(cloud, guest, "resources=VCPU:1,MEMORY_MB:128,DISK_GB:1", KEYS[0]),
                        "--no-config-drive", "--wait", "--json")
    assert r.rc == 0, r
    uuid = r.json()["uuid"]
    seen = console(host, cloud, uuid)
    assert (seen["dmi_sys_vendor"], seen["dmi_product_name"]) == ("OpenStack Foundation", "OpenStack Nova"), seen
    assert seen["dmi_product_serial"] == uuid
    assert seen["cd_label"] == "none" and seen["cd_instance_id"] == "none", seen
    assert (seen["md_instance_id"], seen["md_ssh_key"]) == (uuid, KEYS[0])
    assert f"{uuid}.iso" not in instance_files(host, cloud)
    assert cloud.eschedule("destroy", uuid, "--wait").rc == 0


def test_a_host_can_give_no_config_drive_at_all(cloud: Cloud) -> None:
    plain, without = cloud.compute("host1"), cloud.compute("host2", config_drive=False)
    for host in (plain, without):
        r = cloud.eschedule(f"resources=VCPU:1,MEMORY_MB:128&in_tree={host.host}", "--wait", "--json")
        assert r.rc == 0, r
        assert (f"{r.json()['uuid']}.iso" in instance_files(host, cloud)) == (host is plain)


@pytest.mark.qemu
def test_wait_ready_returns_once_the_guest_says_it_booted_and_ssh_goes_to_it(
        cloud: Cloud, guest: dict, tmp_path: Path) -> None:
    """--wait=ready waits for the guest's own word (its POST to the metadata server once done):
    the status's ready_at, an event; a reboot is a new boot, ready again only when it says so.
    `eschedule ssh` waits for that too, then runs the OpenSSH client at the instance's address."""
    host = cloud.compute("qemu1", uri="qemu:///system", metrics=f"127.0.0.1:{free_port()}")
    r = cloud.eschedule(*boot_args(cloud, guest, "resources=VCPU:1,MEMORY_MB:128,DISK_GB:1"), "--wait=ready",
                        "--json")
    assert r.rc == 0, r
    view = r.json()
    uuid, first = view["uuid"], view["ready_at"]
    assert view["state"] == "ACTIVE" and first, view
    said = [e for e in events(cloud, uuid) if e.startswith("ready: the guest says it has booted ")]
    assert len(said) == 1 and said[0].endswith(" s after its start"), events(cloud, uuid)
    r = cloud.eschedule("reboot", uuid, "--wait=ready", "--json")
    assert r.rc == 0 and r.json()["ready_at"] > first, r
    assert len([e for e in events(cloud, uuid) if e.startswith("ready:")]) == 2
    metrics = requests_get(f"http://{host.cfg['metrics']}/metrics")
    assert "etcd_compute_start_to_ready_seconds_count 2.0" in metrics
    for args in (["stop", uuid, "--wait=ready"], ["suspend", uuid, "--wait=ready"]):
        r = cloud.eschedule(*args)
        assert r.rc == 2, r
    # A stand-in for OpenSSH on PATH says what it was run with.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ssh").write_text("#!/bin/sh\necho \"$@\"\n")
    (fake / "ssh").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    p = subprocess.run([*cloud.eschedule_argv(), "ssh", uuid, "-l", "root", "-i", "/k", "-o", "Port=2222", "--",
                        "uname", "-a"], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p
    assert p.stdout.split() == ["-o", "Port=2222", "-o", f"HostKeyAlias=etcd-compute-{uuid}", "-o",
                                "StrictHostKeyChecking=accept-new", "-i", "/k", "-l", "root", view["ip"], "uname", "-a"]
    assert cloud.eschedule("stop", uuid, "--wait").rc == 0
    p = subprocess.run([*cloud.eschedule_argv(), "ssh", uuid], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 8 and "is STOPPED: no guest to reach" in p.stderr, p
    assert cloud.eschedule("destroy", uuid, "--wait").rc == 0
