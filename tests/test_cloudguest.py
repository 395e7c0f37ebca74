"""A real Debian 12 cloud-init guest (testguest.ensure_cloud_guest), booted through eschedule and
ecompute on real QEMU, behaves like a real machine. Every check is what the guest itself did or
saw, read over ssh with the real OpenSSH client and the key eschedule injected.

One guest is booted for the module and the tests run in order on it (each boot costs minutes
under TCG): cloud-init, ssh, CPUs and memory, the metadata route, a clean reboot, a clean stop,
the guest's own power-off, and another guest posing as it. `devstack test` starts building the
image in the background before the suite, and conftest runs these tests last, so the build
overlaps the rest of the suite.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
import pytest

from devstack import localstack, testguest
from devstack.harness import Ecompute, guest_report, wait_until

from conftest import Cloud

pytestmark = [pytest.mark.qemu, pytest.mark.cloudguest]
libvirt.registerErrorHandler(lambda *a: None, None)

MARKER = "/var/tmp/ec-runcmd"
DISK_GB, MEMORY_MB, STOP_TIMEOUT = 3, 512, 90
QUERY = f"resources=VCPU:2,MEMORY_MB:{MEMORY_MB},DISK_GB:{DISK_GB}"
USER_DATA = f"#cloud-config\nruncmd:\n  - [sh, -c, 'echo ran > {MARKER}']\n"


@dataclass
class Booted:
    cloud: Cloud
    host: Ecompute
    guest: dict
    key: Path
    uuid: str = ""
    ip: str = ""
    times: dict[str, float] = field(default_factory=dict)

    def ssh(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ssh", "-i", str(self.key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
             f"{self.guest['user']}@{self.ip}", command], capture_output=True, text=True, timeout=timeout)

    def run(self, command: str, timeout: float = 60) -> str:
        p = self.ssh(command, timeout)
        assert p.returncode == 0, f"`{command}` exited {p.returncode}: {p.stdout}{p.stderr}\n{self.console_tail()}"
        return p.stdout.strip()

    def logs_in(self) -> bool:
        try:
            return self.ssh("true", 30).returncode == 0
        except subprocess.TimeoutExpired:  # sshd accepted, but the guest is too busy to finish the handshake
            return False

    def wait_for_ssh(self, what: str) -> None:
        t0 = time.monotonic()
        try:
            wait_until(self.logs_in, 600, f"ssh into the guest ({what})", interval=2)
        except AssertionError as exc:  # what the guest was doing says why (its files go with the test)
            raise AssertionError(f"{exc}\n{self.console_tail()}") from None
        self.times[what] = time.monotonic() - t0

    def console_tail(self) -> str:
        return "console tail:\n" + "\n".join(self.cloud.console(self.uuid).decode(errors="replace").splitlines()[-30:])

    def view(self) -> dict:
        return self.cloud.show(self.uuid)

    def events(self) -> list[str]:
        return [e["event"] for e in self.view()["events"]]

    def journal_recovered(self) -> bool:
        """Whether this boot replayed the root filesystem's journal (it was not cleanly unmounted)."""
        return "recovery complete" in self.run("sudo -n journalctl -k -b --no-pager")


@pytest.fixture(scope="module")
def booted(stack: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Booted]:
    guest = testguest.ensure_cloud_guest()  # waits for the build `devstack test` started, if any
    cloud = Cloud(stack, tmp_path_factory.mktemp("cloudguest"))
    try:
        host = cloud.compute("cg", uri="qemu:///system", workers=2, stop_timeout=STOP_TIMEOUT,
                             image_dirs=[str(Path(guest["disk"]).parent), str(localstack.stack_dir() / "guest")])
        key = cloud.tmp / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        b = Booted(cloud, host, guest, key)
        t0 = time.monotonic()
        r = cloud.eschedule(QUERY, guest["disk"], "--kernel", guest["kernel"], "--initrd", guest["initrd"],
                            "--cmdline", guest["cmdline"], "--key", f"{key}.pub",
                            "--user-data", str(cloud.write("user-data", USER_DATA)), "--wait", "--json")
        assert r.rc == 0, (r, host.logtext()[-3000:])
        view = r.json()
        b.uuid, b.ip = view["uuid"], view["ip"]
        b.times["schedule to ACTIVE with its IP"] = time.monotonic() - t0
        b.wait_for_ssh("ACTIVE to ssh")
        yield b
        print("\ncloudguest: " + ", ".join(f"{k} {v:.1f} s" for k, v in b.times.items()))
        (Path(stack["stack"]) / "cloudguest-times.json").write_text(json.dumps(b.times, indent=1))
        assert cloud.eschedule("destroy", b.uuid, "--wait").rc == 0
        assert cloud.instance_keys() == {}
        assert cloud.usages(host.host) == {"VCPU": 0, "MEMORY_MB": 0, "DISK_GB": 0}
    finally:
        cloud.cleanup()


def test_cloud_init_ran_from_the_config_drive(booted: Booted) -> None:
    status = booted.ssh("cloud-init status --wait --long", 600)
    assert status.returncode == 0 and "status: done" in status.stdout, status
    result = json.loads(booted.run("cat /run/cloud-init/result.json"))["v1"]
    assert result["errors"] == [] and "NoCloud" in result["datasource"], result
    assert booted.run(f"cat {MARKER}") == "ran"  # the user-data's runcmd
    assert booted.run("hostname") == f"ec-{booted.uuid[:8]}"
    assert booted.run("cat /var/lib/cloud/data/instance-id") == booted.uuid
    assert re.fullmatch(r"[0-9a-f]{32}", booted.run("cat /etc/machine-id"))
    # The root filesystem is the overlay grown to DISK_GB (cloud-init's resizefs).
    assert int(booted.run("sudo -n blockdev --getsize64 /dev/vda")) == DISK_GB << 30
    assert int(booted.run("df -B1 --output=size / | tail -n 1")) > 0.9 * (DISK_GB << 30)


def test_ssh_logs_in_as_the_default_user_with_the_injected_key(booted: Booted) -> None:
    assert booted.run("id -un") == booted.guest["user"]
    keys = booted.run("cat ~/.ssh/authorized_keys")
    assert Path(f"{booted.key}.pub").read_text().split()[1] in keys


def test_the_guest_has_what_placement_charged(booted: Booted) -> None:
    assert booted.run("nproc") == "2"  # ACPI MADT: without <acpi/> the guest saw one
    mem_kib = int(booted.run("awk '/MemTotal/ {print $2}' /proc/meminfo"))
    assert 0.8 * MEMORY_MB * 1024 < mem_kib <= MEMORY_MB * 1024  # minus what the kernel keeps


def test_the_guest_reaches_the_metadata_server_by_itself(booted: Booted) -> None:
    """No route was added by hand: DHCP handed it out (option 121)."""
    assert "via 10.124.0.1" in booted.run("ip route get 169.254.169.254")
    url = f"http://169.254.169.254:{booted.cloud.md_port}/latest/meta-data/instance-id"
    fetch = f"import urllib.request as u; print(u.urlopen('{url}', timeout=10).read().decode())"
    got = booted.run(f'python3 -c "{fetch}"')
    assert got == booted.uuid


def test_another_guest_posing_as_it_gets_none_of_its_data(booted: Booted) -> None:
    """A busybox guest that takes this guest's address after DHCP: its packets never leave its NIC."""
    small = testguest.ensure_guest()
    r = booted.cloud.eschedule(
        "resources=VCPU:1,MEMORY_MB:128,DISK_GB:1", small["disk"], "--kernel", small["kernel"], "--initrd",
        small["initrd"], "--cmdline", f"{small['cmdline']} ec.md=http://169.254.169.254:{booted.cloud.md_port} "
        f"ec.spoof={booted.ip}", "--wait", "--json")
    assert r.rc == 0, r
    thief = r.json()["uuid"]
    try:
        seen = guest_report(booted.cloud.console_log("cg", thief))
        assert seen["spoofed"] == booted.ip
        assert seen["md_instance_id"] == "none" and seen["md_ssh_key"] == "none", seen
    finally:
        assert booted.cloud.eschedule("destroy", thief, "--wait").rc == 0
    assert booted.run("true") == ""  # and the real one is still reachable at its address


def test_reboot_is_a_clean_shutdown_and_keeps_what_was_written(booted: Booted) -> None:
    booted.run("echo kept > ~/written-before-reboot")  # no sync: the clean shutdown must flush it
    t0 = time.monotonic()
    r = booted.cloud.eschedule("reboot", booted.uuid, "--wait", "--json")
    assert r.rc == 0 and r.json()["state"] == "ACTIVE", r
    booted.times["reboot (to ACTIVE)"] = time.monotonic() - t0
    rebooted = [e for e in booted.events() if e.startswith("ACTIVE (rebooted")]
    assert rebooted and "clean shutdown in" in rebooted[-1], booted.events()
    booted.wait_for_ssh("reboot to ssh")
    assert booted.run("cat ~/written-before-reboot") == "kept"
    assert not booted.journal_recovered()
    # Both boots' output is kept (the head and tail of each, consolefiles.py); the host's log and
    # etcd's tail hold the current boot's.
    every = booted.cloud.eschedule("console", booted.uuid, "--all")
    assert every.rc == 0 and every.out.count("Linux version") == 2, every
    log = booted.cloud.console_log("cg", booted.uuid)
    assert log.read_bytes().count(b"Linux version") == 1
    console = booted.cloud.console(booted.uuid)
    assert console and console[:2000] in log.read_bytes()


def test_stop_is_a_clean_shutdown_and_start_brings_it_back(booted: Booted) -> None:
    t0 = time.monotonic()
    r = booted.cloud.eschedule("stop", booted.uuid, "--wait", "--json")
    assert r.rc == 0 and r.json()["state"] == "STOPPED", r
    booted.times["stop (clean shutdown)"] = time.monotonic() - t0
    assert any(e.startswith("STOPPED: clean shutdown in") for e in booted.events()), booted.events()
    assert booted.times["stop (clean shutdown)"] < STOP_TIMEOUT
    t0 = time.monotonic()
    assert booted.cloud.eschedule("start", booted.uuid, "--wait").rc == 0
    booted.times["start (to ACTIVE)"] = time.monotonic() - t0
    booted.wait_for_ssh("start to ssh")
    assert not booted.journal_recovered()


def test_the_guests_own_poweroff_stops_it_until_started(booted: Booted) -> None:
    conn = libvirt.open("qemu:///system")
    try:
        dom = conn.lookupByUUIDString(booted.uuid)
        booted.ssh("sudo -n poweroff", 60)  # the connection may drop before an exit status comes back
        wait_until(lambda: not dom.isActive(), 180, "the domain off after the guest's poweroff")
        assert dom.state() == [libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN]
        view = wait_until(lambda: (v := booted.view())["state"] == "STOPPED" and v, 30, "STOPPED in etcd")
        assert "powered off by its guest" in view["reason"]
        time.sleep(6)  # it stays off, as the guest wanted (the host resyncs hourly: the lifecycle event told it)
        assert booted.view()["state"] == "STOPPED" and not dom.isActive()
        r = booted.cloud.eschedule("start", booted.uuid, "--wait", "--json")
        assert r.rc == 0 and r.json()["state"] == "ACTIVE", r
        assert dom.isActive()
    finally:
        conn.close()
