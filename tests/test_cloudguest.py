"""The Debian 12 cloud-init test guest (testguest.ensure_cloud_guest) boots as a real cloud guest.

Without ecompute: the domain, its isolated network, its overlay and its NoCloud ISO are made here
with libvirt, qemu-img and pycdlib, so a failure points at the image, not at the control plane.
Checked through the real OpenSSH client: cloud-init finished without errors, ran the user-data,
put our key on the default user (who has sudo), 2 vCPUs are seen (ACPI MADT), logind watches the
power button (dbus), and `sudo poweroff` ends the domain by itself (ACPI).

The image takes minutes to build, so the test builds it only when this file is named on the
command line; otherwise it runs only if `python3 -m devstack guest --cloud` has built it.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from xml.sax.saxutils import escape, quoteattr

import libvirt
import pycdlib
import pytest

from devstack import localstack, testguest

pytestmark = [pytest.mark.qemu, pytest.mark.cloudguest]
libvirt.registerErrorHandler(lambda *a: None, None)

# The test's own isolated network (no <forward>), apart from the suite's ec-isolated (10.124.0.0/24).
NETWORK, BRIDGE, HOST_IP = "cloudguest-test", "cgtest-br0", "10.125.0.1"
MARKER = "/var/tmp/ec-runcmd"
T = TypeVar("T")


@pytest.fixture(scope="module")
def cloud_guest() -> dict:
    """Built (or reused) here: this file is collected only when asked for (see conftest.py)."""
    ready = testguest.cloud_guest_ready()
    if ready:
        return ready
    t0 = time.monotonic()
    guest = testguest.ensure_cloud_guest()
    print(f"\ncloudguest: built in {time.monotonic() - t0:.0f} s")
    return guest


@pytest.fixture
def conn() -> Iterator[libvirt.virConnect]:
    c = libvirt.open("qemu:///system")
    yield c
    c.close()


def remove_network(conn: libvirt.virConnect) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        net = conn.networkLookupByName(NETWORK)
        if net.isActive():
            net.destroy()
        net.undefine()


@pytest.fixture
def network(conn: libvirt.virConnect) -> Iterator[str]:
    remove_network(conn)  # a killed run's
    net = conn.networkDefineXML(
        f"<network><name>{NETWORK}</name><bridge name='{BRIDGE}' stp='off'/>"
        f"<ip address='{HOST_IP}' prefix='24'><dhcp><range start='10.125.0.100' end='10.125.0.200'/></dhcp></ip>"
        "</network>")
    try:
        net.create()
        yield NETWORK
    finally:
        remove_network(conn)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """Under the stack, not pytest's tmp: QEMU runs as libvirt-qemu and must reach the files."""
    path = localstack.services_dir() / "tests" / f"cloudguest-{secrets.token_hex(4)}"
    path.mkdir(parents=True)
    for d in (path.parent, path):
        d.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run(*cmd: str | Path) -> None:
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True, timeout=60)


def write_cidata(path: Path, files: dict[str, str]) -> None:
    """A NoCloud seed: ISO9660 labelled `cidata`, names readable through Rock Ridge and Joliet."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for name, text in files.items():
        body = text.encode()
        iso.add_fp(io.BytesIO(body), len(body), f"/{name.upper().replace('-', '_')}.;1",
                   rr_name=name, joliet_path=f"/{name}")
    iso.write(str(path))
    iso.close()
    path.chmod(0o644)


def domain_xml(name: str, guest: dict, disk: Path, seed: Path, mac: str, console: Path) -> str:
    """Domain type qemu (TCG: KVM hangs here) with ACPI and APIC: without them QEMU gets -no-acpi,
    the guest sees one CPU and ignores the power button."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(guest["kernel"])}</kernel>
    <initrd>{escape(guest["initrd"])}</initrd>
    <cmdline>{escape(guest["cmdline"])}</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/><source file={quoteattr(str(disk))}/><target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/><source file={quoteattr(str(seed))}/><target dev='hdc' bus='ide'/><readonly/>
    </disk>
    <interface type='network'>
      <source network='{NETWORK}'/><mac address='{mac}'/><model type='virtio'/>
    </interface>
    <serial type='pty'><log file={quoteattr(str(console))} append='off'/><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
  </devices>
</domain>"""


def lease_ip(dom: libvirt.virDomain) -> str | None:
    try:
        ifaces = dom.interfaceAddresses(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE)
    except libvirt.libvirtError:
        return None
    for iface in ifaces.values():
        for addr in iface.get("addrs") or []:
            if addr["type"] == libvirt.VIR_IP_ADDR_TYPE_IPV4:
                return str(addr["addr"])
    return None


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, diag: Callable[[], str]) -> T:
    end = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > end:
            pytest.fail(f"no {what} after {timeout:.0f} s\n{diag()}")
        time.sleep(1)


def test_cloud_guest_boots_runs_cloud_init_and_powers_off(
        cloud_guest: dict, conn: libvirt.virConnect, network: str, workdir: Path) -> None:
    instance = f"cloudguest-{secrets.token_hex(4)}"
    key, disk, seed, console = (workdir / n for n in ("id_ed25519", "disk.qcow2", "cidata.iso", "console.log"))
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", instance, "-f", key)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", cloud_guest["disk"], "-F", "qcow2", disk)
    disk.chmod(0o644)
    user_data = {"ssh_authorized_keys": [Path(f"{key}.pub").read_text().strip()],
                 "runcmd": [["sh", "-c", f"echo {instance} > {MARKER}"]]}
    write_cidata(seed, {"meta-data": f"instance-id: {instance}\nlocal-hostname: {instance}\n",
                        "user-data": "#cloud-config\n" + json.dumps(user_data, indent=1) + "\n"})
    mac = "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
    user = cloud_guest["user"]

    def diag() -> str:
        try:
            lines = console.read_text(errors="replace").splitlines()
        except OSError as e:
            return f"(no console log: {e})"
        return "console tail:\n" + "\n".join(lines[-40:])

    def ssh(command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
             f"{user}@{ip}", command], capture_output=True, text=True, timeout=timeout)

    def ssh_ok(command: str, timeout: float = 60) -> str:
        p = ssh(command, timeout)
        assert p.returncode == 0, f"`{command}` exited {p.returncode}: {p.stdout}{p.stderr}\n{diag()}"
        return p.stdout.strip()

    def logs_in() -> bool:
        try:
            return ssh("true", 30).returncode == 0
        except subprocess.TimeoutExpired:  # sshd accepted but the guest is too busy to finish the handshake
            return False

    dom = conn.defineXML(domain_xml(instance, cloud_guest, disk, seed, mac, console))
    times: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        dom.create()
        ip = wait_for("DHCP lease", lambda: lease_ip(dom), 300, diag)
        times["boot to lease"] = time.monotonic() - t0
        wait_for("ssh login", logs_in, 420, diag)
        times["boot to ssh"] = time.monotonic() - t0

        status = ssh("cloud-init status --wait --long", 600)
        times["boot to cloud-init done"] = time.monotonic() - t0
        assert status.returncode == 0 and "status: done" in status.stdout, f"{status.stdout}{status.stderr}\n{diag()}"
        result = json.loads(ssh_ok("cat /run/cloud-init/result.json"))["v1"]
        assert result["errors"] == [], result
        assert "NoCloud" in result["datasource"], result

        assert ssh_ok(f"cat {MARKER}") == instance, "runcmd did not run"
        assert ssh_ok("hostname") == instance
        assert ssh_ok("nproc") == "2", "the guest does not see both vCPUs (ACPI/APIC)"
        assert re.fullmatch(r"[0-9a-f]{32}", ssh_ok("cat /etc/machine-id")), "no machine-id of its own"
        assert "ssh_host_ed25519_key.pub" in ssh_ok("ls /etc/ssh"), "no per-instance host key"
        logind = ssh_ok("sudo -n journalctl -b -u systemd-logind --no-pager")
        assert "Power Button" in logind, f"logind does not watch the ACPI power button:\n{logind}"

        # Where the boot time goes (printed with -s; the boot is CPU-bound under TCG).
        print("\n" + ssh("systemd-analyze; systemd-analyze blame --no-pager | head -n 8; "
                         "cloud-init analyze blame | head -n 8", 180).stdout)

        t1 = time.monotonic()
        ssh("sudo -n poweroff", 60)  # the connection may drop before an exit status comes back
        wait_for("shutoff after `sudo poweroff`", lambda: not dom.isActive() or None, 180, diag)
        times["poweroff"] = time.monotonic() - t1
        state, reason = dom.state()
        assert (state, reason) == (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN), (state, reason)
    finally:
        print("\ncloudguest: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
        with contextlib.suppress(libvirt.libvirtError):
            if dom.isActive():
                dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            dom.undefine()
