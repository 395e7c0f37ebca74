"""Requested vs actual state: lifecycle round trips, idempotence, and requests that are refused."""

from __future__ import annotations

import secrets
import subprocess

import libvirt
import pytest

from devstack.harness import wait_until

from conftest import Cloud

SMALL = "resources=VCPU:1,MEMORY_MB:128"


@pytest.mark.qemu
def test_stop_start_suspend_resume_reboot_round_trip(cloud: Cloud) -> None:
    """On real QEMU (a diskless domain: no guest to wait for), each request reaches its state."""
    cloud.compute("qemu1", uri="qemu:///system", network={"mode": "none"}, metadata={"enabled": False},
                  stop_timeout=1)
    uuid = cloud.boot(SMALL)["uuid"]
    conn = libvirt.open("qemu:///system")
    try:
        dom = conn.lookupByUUIDString(uuid)
        for action, settled, lv_state in [("stop", "STOPPED", libvirt.VIR_DOMAIN_SHUTOFF),
                                          ("stop", "STOPPED", libvirt.VIR_DOMAIN_SHUTOFF),  # idempotent
                                          ("start", "ACTIVE", libvirt.VIR_DOMAIN_RUNNING),
                                          ("suspend", "SUSPENDED", libvirt.VIR_DOMAIN_PAUSED),
                                          ("resume", "ACTIVE", libvirt.VIR_DOMAIN_RUNNING)]:
            r = cloud.eschedule(action, uuid, "--wait", "--json")
            assert r.rc == 0, r
            assert r.json()["state"] == settled
            assert dom.info()[0] == lv_state, action
        before = conn.lookupByUUIDString(uuid).ID()  # (a virDomain caches its ID: look it up again)
        r = cloud.eschedule("reboot", uuid, "--timeout", "2", "--wait", "--json")
        assert r.rc == 0 and r.json()["state"] == "ACTIVE", r
        after = conn.lookupByUUIDString(uuid)
        assert after.ID() != before and after.info()[0] == libvirt.VIR_DOMAIN_RUNNING  # really restarted
    finally:
        conn.close()
    shown = cloud.show(uuid)
    assert shown["desired"] == "active"
    events = [e["event"] for e in shown["events"]]
    assert events[:2] == ["BUILDING", "ACTIVE"]
    # SeaBIOS with no OS ignores the ACPI power button: each stop and the reboot say they pulled the
    # plug once their timeout ran out (the host's 1 s; the reboot asked for 2 s of its own).
    assert "STOPPED: did not finish shutting down within 1 s; powered off" in events, events
    assert "ACTIVE (rebooted: did not finish shutting down within 2 s; powered off)" in events, events
    assert cloud.eschedule("destroy", uuid, "--wait").rc == 0


def test_refused_requests_say_why_and_change_nothing(cloud: Cloud) -> None:
    host = cloud.compute("host1", stop_timeout=1)
    uuid = cloud.boot(SMALL)["uuid"]
    assert cloud.eschedule("stop", uuid, "--wait").rc == 0
    request_key = next(k for k in cloud.etcd_values() if "/requests/" in k)
    before = cloud.etcd_values()[request_key]
    for action, message in [("reboot", "only an ACTIVE instance can be rebooted"),
                            ("suspend", "only a running instance can be suspended"),
                            ("resume", "only a running instance can be suspended or resumed")]:
        r = cloud.eschedule(action, uuid)
        assert r.rc == 7 and message in r.err, (action, r)
        assert len(r.err.strip().splitlines()) == 1
        assert cloud.etcd_values()[request_key] == before  # no stuck request left behind
    host.kill_all()  # so the delete cannot finish before we ask
    assert cloud.eschedule("destroy", uuid).rc == 0
    r = cloud.eschedule("start", uuid)
    assert r.rc == 7 and "being deleted" in r.err
    cloud.start(host)
    wait_until(lambda: cloud.eschedule(uuid).rc == 6, 20, "the delete to finish")


def test_errored_instance_only_accepts_destroy(cloud: Cloud, tmp_path) -> None:
    cloud.compute("host1")
    r = cloud.eschedule(SMALL, str(tmp_path / "no-such-image.qcow2"), "--wait", "--json")
    assert r.rc == 8 and r.json()["state"] == "ERROR"
    uuid = r.json()["uuid"]
    for action in ("start", "stop", "reboot", "suspend"):
        r = cloud.eschedule(action, uuid)
        assert r.rc == 7 and "ERROR" in r.err and "destroy it" in r.err, r
    assert cloud.eschedule("destroy", uuid, "--wait").rc == 0
    assert cloud.instance_keys() == {}


def test_stop_requested_while_building_ends_stopped(cloud: Cloud) -> None:
    """Level-triggered: the request changes before the build ends; the host still gets there."""
    cloud.compute("host1", stop_timeout=1)
    r = cloud.eschedule(SMALL, "--json")
    uuid = r.json()["uuid"]
    assert cloud.eschedule("stop", uuid).rc == 0
    wait_until(lambda: cloud.show(uuid)["state"] == "STOPPED", 30, "STOPPED")


@pytest.mark.qemu
def test_wait_fails_when_an_instance_on_a_bridge_gets_no_address(cloud: Cloud) -> None:
    """On a bridge of the operator's (no DHCP of ours, so no address known before boot), an
    instance whose address never shows is running but not done: `--wait` says so (exit 8)."""
    bridge = f"ecw{secrets.token_hex(3)}"
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    try:
        subprocess.run(["ip", "link", "set", bridge, "up"], check=True)
        cloud.compute("qemu1", uri="qemu:///system", bridge=bridge, metadata={"enabled": False}, ip_timeout=2)
        r = cloud.eschedule(SMALL, "--wait", "--json")  # a diskless domain: nobody will ask for a lease
        assert r.rc == 8 and "runs but has no IP address on bridge " + bridge in r.err, r
        view = r.json()
        assert (view["state"], view["ip"]) == ("ACTIVE", None) and "no IP address seen" in view["reason"]
        assert cloud.eschedule("destroy", view["uuid"], "--wait").rc == 0
    finally:
        subprocess.run(["ip", "link", "del", bridge], check=False)


@pytest.mark.qemu
def test_a_forced_stop_ends_a_clean_shutdown_under_way(cloud: Cloud) -> None:
    """A guest that takes long to shut down (here: none that listens, with the host's 60 s):
    `stop --force` while the stop waits for it pulls the plug at once, and says so."""
    cloud.qemu_host()
    uuid = cloud.boot(SMALL)["uuid"]
    assert cloud.eschedule("stop", uuid).rc == 0
    wait_until(lambda: cloud.show(uuid)["reason"] == "stopping", 30, "the stop under way")
    r = cloud.eschedule("stop", uuid, "--force", "--wait", "--json")
    assert r.rc == 0 and r.json()["state"] == "STOPPED", r
    event = [e["event"] for e in r.json()["events"]][-1]
    assert event.startswith("STOPPED: powered off (--force) after ") and "of its clean shutdown" in event, event
    assert cloud.eschedule("destroy", uuid, "--wait").rc == 0
