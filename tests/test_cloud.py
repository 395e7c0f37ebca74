"""The whole path on real parts: eschedule -> Placement -> etcd -> ecompute -> libvirt (test:///default)."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import subprocess

import pytest
import requests

from devstack.harness import wait_until

from conftest import Cloud, placement_cli

SMALL = "resources=VCPU:1,MEMORY_MB:256,DISK_GB:1"


def test_schedule_show_destroy_round_trip(cloud: Cloud) -> None:
    host = cloud.compute("host1")

    r = cloud.eschedule(SMALL, "--json")
    assert r.rc == 0, r
    uuid, where = r.json()["uuid"], r.json()["host"]
    assert where == host.host
    assert cloud.usages(host.host) == {"VCPU": 1, "MEMORY_MB": 256, "DISK_GB": 1}

    view = wait_until(lambda: (v := cloud.eschedule(uuid, "--json").json())["state"] == "ACTIVE" and v,
                      20, "ACTIVE")
    assert view["host"] == host.host and view["desired"] == "active"
    status = cloud.etcd_values()[f"{cloud.prefix}/instances/{uuid}"]
    # The daemon reports what libvirt says the domain is, sized from the allocation.
    assert status["domain"]["vcpus"] == 1 and status["domain"]["memory_mb"] == 256
    assert status["domain"]["state"] == "running"

    text = cloud.eschedule(uuid)
    assert text.rc == 0 and "ACTIVE" in text.out and host.host in text.out
    shown = cloud.eschedule("show", uuid, "--json").json()
    assert shown["state"] == "ACTIVE"
    listed = cloud.eschedule("list", "--json").json()
    assert [v["uuid"] for v in listed] == [uuid]

    r = cloud.eschedule("destroy", uuid, "--wait")
    assert r.rc == 0, r
    assert cloud.usages(host.host) == {"VCPU": 0, "MEMORY_MB": 0, "DISK_GB": 0}
    assert cloud.placement.get_allocations(uuid) == {}
    assert cloud.instance_keys() == {}
    # Destroying what is gone is a clear "unknown", not a crash.
    again = cloud.eschedule("destroy", uuid)
    assert again.rc == 6 and "no instance" in again.err


def test_query_string_traits_steer_the_choice(cloud: Cloud) -> None:
    plain = cloud.compute("plain")
    fast = cloud.compute("fast", traits=["CUSTOM_FAST"])

    for _ in range(3):
        r = cloud.eschedule(SMALL + "&required=CUSTOM_FAST", "--json")
        assert r.rc == 0, r
        assert r.json()["host"] == fast.host
    for _ in range(3):
        r = cloud.eschedule(SMALL + "&required=!CUSTOM_FAST", "--json")
        assert r.rc == 0, r
        assert r.json()["host"] == plain.host
    assert cloud.usages(fast.host)["VCPU"] == 3
    assert cloud.usages(plain.host)["VCPU"] == 3
    # Each request went to its own host's key, and nowhere else.
    keys = cloud.etcd_values()
    assert len([k for k in keys if k.startswith(f"{cloud.prefix}/requests/{fast.host}/")]) == 3
    assert len([k for k in keys if k.startswith(f"{cloud.prefix}/requests/{plain.host}/")]) == 3


def test_concurrent_schedules_never_overcommit(cloud: Cloud) -> None:
    host = cloud.compute("host1", inventory={"VCPU": {"total": 10, "allocation_ratio": 1.0},
                                             "MEMORY_MB": {"total": 8192, "reserved": 0},
                                             "DISK_GB": {"total": 100}})
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: cloud.eschedule("resources=VCPU:1,MEMORY_MB:64", "--json"),
                                range(20)))

    placed = [r for r in results if r.rc == 0]
    refused = [r for r in results if r.rc != 0]
    assert len(placed) == 10, [r.err for r in refused]
    assert len(refused) == 10
    assert all(r.rc == 3 and "no capacity" in r.err for r in refused), [r.err for r in refused]
    assert cloud.usages(host.host)["VCPU"] == 10
    uuids = {r.json()["uuid"] for r in placed}
    requests = {k.rsplit("/", 1)[1] for k in cloud.etcd_values() if k.startswith(f"{cloud.prefix}/requests/")}
    assert requests == uuids
    wait_until(lambda: all(v["state"] == "ACTIVE" for v in cloud.eschedule("list", "--json").json()),
               30, "all ten ACTIVE")


def test_request_written_while_daemon_is_down_is_built_on_start(cloud: Cloud) -> None:
    host = cloud.compute("host1")
    # A crash (SIGKILL) leaves the inventory unlocked, so scheduling still lands here.
    assert host.stop(signal.SIGKILL) == -signal.SIGKILL
    r = cloud.eschedule(SMALL, "--json")
    assert r.rc == 0, r
    uuid = r.json()["uuid"]
    assert cloud.eschedule(uuid, "--json").json()["state"] == "PENDING"

    cloud.start(host)
    wait_until(lambda: cloud.eschedule(uuid, "--json").json()["state"] == "ACTIVE", 20, "ACTIVE")


def test_sigterm_locks_inventory_and_restart_unlocks(cloud: Cloud) -> None:
    host = cloud.compute("host1")
    assert host.stop(signal.SIGTERM) == 0
    inventory = cloud.placement.inventories(host.host)
    assert {rc: (i["reserved"], i["total"]) for rc, i in inventory.items()} == {
        "VCPU": (8, 8), "MEMORY_MB": (4096, 4096), "DISK_GB": (40, 40)}
    assert cloud.host_record(host.host)["state"] == "locked"
    r = cloud.eschedule(SMALL)
    assert r.rc == 3 and "no capacity" in r.err
    assert cloud.instance_keys() == {}

    cloud.start(host)
    assert all(i["reserved"] == 0 for i in cloud.placement.inventories(host.host).values())
    cloud.boot()


def test_sigint_also_locks(cloud: Cloud) -> None:
    host = cloud.compute("host1")
    assert host.stop(signal.SIGINT) == 0
    assert cloud.placement.inventories(host.host)["VCPU"]["reserved"] == 8


@pytest.mark.qemu
def test_restart_does_not_rebuild_or_duplicate(cloud: Cloud) -> None:
    """On QEMU, where the domain outlives the daemon: a restart finds it running and leaves it."""
    host = cloud.qemu_host()
    view = cloud.boot(SMALL)
    before = cloud.etcd_values()[f"{cloud.prefix}/instances/{view['uuid']}"]
    domains = cloud.domains(host)
    host.stop(signal.SIGTERM)
    cloud.start(host)
    cloud.boot(SMALL)  # the reconcile queue is FIFO: once this one is ACTIVE the old one was looked at
    after = cloud.etcd_values()[f"{cloud.prefix}/instances/{view['uuid']}"]
    assert after == before  # level-triggered: ACTIVE stays ACTIVE, nothing rebuilt
    assert cloud.domains(host)[view["uuid"]] == domains[view["uuid"]]  # the same running domain
    assert len(cloud.domains(host)) == 2
    assert cloud.usages(host.host)["VCPU"] == 2


def test_a_domain_gone_behind_our_back_is_rebuilt(cloud: Cloud) -> None:
    """test:///default keeps its domains in the worker process: a restarted daemon finds none,
    as after a host reboot, sees the drift and builds the instance again."""
    host = cloud.compute("host1")
    uuid = cloud.boot()["uuid"]
    host.stop(signal.SIGKILL)
    cloud.start(host)
    wait_until(lambda: [e for e in cloud.show(uuid)["events"] if "vanished" in e["event"]], 30, "the drift seen")
    events = wait_until(lambda: cloud.show(uuid)["state"] == "ACTIVE" and cloud.show(uuid)["events"], 30, "ACTIVE")
    names = [e["event"] for e in events]
    rebuilt = names.index("BUILDING: domain vanished outside ecompute; rebuilding")
    assert names[rebuilt + 1:] in (["ACTIVE"], ["BUILDING", "ACTIVE"]), names
    assert cloud.usages(host.host)["VCPU"] == 1


def test_osc_placement_sees_what_ecompute_registered(cloud: Cloud) -> None:
    host = cloud.compute("host1", traits=["CUSTOM_OSC"])
    providers = placement_cli(["resource", "provider", "list", "-f", "json"])
    assert providers.returncode == 0, providers.stderr
    assert host.host in [p["uuid"] for p in json.loads(providers.stdout)]
    inventory = placement_cli(["resource", "provider", "inventory", "list", host.host, "-f", "json"])
    assert inventory.returncode == 0, inventory.stderr
    totals = {row["resource_class"]: row["total"] for row in json.loads(inventory.stdout)}
    assert totals == {"VCPU": 8, "MEMORY_MB": 4096, "DISK_GB": 40}
    traits = placement_cli(["resource", "provider", "trait", "list", host.host, "-f", "json"])
    assert "CUSTOM_OSC" in [t["name"] for t in json.loads(traits.stdout)]


def test_hosts_lists_capacity_and_usage(cloud: Cloud) -> None:
    host = cloud.compute("host1")
    cloud.boot()
    found = {h["uuid"]: h for h in cloud.eschedule("hosts", "--json").json()}
    mine = found[host.host]
    assert mine["state"] == "UP" and mine["locked"] is False
    assert mine["capacity"] == {"VCPU": 8, "MEMORY_MB": 4096, "DISK_GB": 40}
    assert mine["used"] == {"VCPU": 1, "MEMORY_MB": 256, "DISK_GB": 1}


@pytest.mark.qemu
def test_real_qemu_domain_and_destroy_when_domain_is_already_gone(cloud: Cloud) -> None:
    """On qemu:///system (TCG): the domain really runs, sized from the allocation; and
    `destroy` still finishes (allocation freed, keys gone) when someone removed it by hand."""
    import libvirt

    host = cloud.compute("qemu1", uri="qemu:///system")
    view = cloud.boot("resources=VCPU:1,MEMORY_MB:128,DISK_GB:1")
    conn = libvirt.open("qemu:///system")
    try:
        dom = conn.lookupByUUIDString(view["uuid"])
        state, max_kib, _, vcpus, _ = dom.info()
        assert state == libvirt.VIR_DOMAIN_RUNNING and max_kib == 128 * 1024 and vcpus == 1
        dom.destroy()
        dom.undefine()  # gone behind the control plane's back
    finally:
        conn.close()

    r = cloud.eschedule("destroy", view["uuid"], "--wait")
    assert r.rc == 0, r
    assert cloud.usages(host.host) == {"VCPU": 0, "MEMORY_MB": 0, "DISK_GB": 0}
    assert cloud.instance_keys() == {}


def test_systemd_notify_ready_and_stopping(cloud: Cloud) -> None:
    """Type=notify: READY=1 once registered and watching, STOPPING=1 on SIGTERM.

    The harness gives every ecompute a NOTIFY_SOCKET of its own and waits for READY=1."""
    host = cloud.compute("host1")
    assert host.notices[0].startswith("READY=1")
    # READY means really ready: the provider exists and the host record says so.
    assert cloud.placement.provider(host.host) is not None
    assert cloud.host_record(host.host)["state"] == "up"
    assert host.stop(signal.SIGTERM) == 0
    assert host.notices[1:] == ["STOPPING=1"]


@pytest.mark.qemu
def test_sigterm_to_the_whole_process_group_exits_and_locks(cloud: Cloud) -> None:
    """A terminal or a supervisor may signal the workers too; the daemon must still exit cleanly."""
    import os
    host = cloud.compute("host1", workers=2)
    pid = host.proc.pid
    os.killpg(pid, signal.SIGTERM)
    assert host.proc.wait(30) == 0
    host.proc = None
    assert cloud.placement.inventories(host.host)["VCPU"]["reserved"] == 8


def test_the_console_is_published_kept_whole_and_followed(cloud: Cloud) -> None:
    """`eschedule console` reads what the host publishes of the guest's console log (on the test
    driver nothing writes it, so the test does, as virtlogd would): exact bytes, appended output
    followed, and nothing left of it once the instance is destroyed."""
    import subprocess

    host = cloud.compute("host1", console_interval=0.5)
    uuid = cloud.boot(SMALL)["uuid"]
    assert cloud.eschedule("console", uuid).err.strip().endswith("no console output published yet")
    log = cloud.console_log(host.name, uuid)
    first = b"ECTEST boot\r\nhost key SHA256:abc \xff\xfe (not UTF-8)\r\n"
    log.write_bytes(first)
    wait_until(lambda: cloud.console(uuid) == first, 10, "the console published")
    follow = subprocess.Popen([*cloud.eschedule_argv(), "console", uuid, "--follow"], stdout=subprocess.PIPE)
    try:
        assert follow.stdout is not None
        assert follow.stdout.read(len(first)) == first
        with log.open("ab") as f:
            f.write(b"second boot\r\n")
        assert follow.stdout.read(len(b"second boot\r\n")) == b"second boot\r\n"  # only what is new
        assert cloud.eschedule("destroy", uuid, "--wait").rc == 0
        assert follow.wait(10) == 0  # the instance is gone: following ends
    finally:
        follow.kill()
    assert [k for k in cloud.etcd_values() if "/consoles/" in k] == []
    r = cloud.eschedule("console", uuid)
    assert r.rc == 6 and "no instance" in r.err


def test_every_boots_console_is_kept_apart(cloud: Cloud) -> None:
    """Each start of the domain is a boot with a log of its own (the driver sets the last one
    aside): `console --boot N` and `--all` read them after any number of restarts, a long boot
    keeps its head and tail, the first boot and the last four are kept; nothing is left once the
    instance is destroyed. (On the test driver nothing writes the logs: the test does, as
    virtlogd would.)"""
    host = cloud.compute("host1", console_interval=0.5)
    uuid = cloud.boot(SMALL)["uuid"]
    log = cloud.console_log(host.name, uuid)
    first = b"Linux version 1\r\n" + b"x" * 40_000 + b"\r\nlogin: \xff"
    log.write_bytes(first)
    for n in range(2, 7):
        assert cloud.eschedule("stop", uuid, "--force", "--wait").rc == 0
        assert cloud.eschedule("start", uuid, "--wait").rc == 0
        log.write_bytes(f"Linux version {n}\r\nlogin: ".encode())
    kept = [1, 3, 4, 5, 6]  # boot 2 was dropped: the first and the last four stay
    wait_until(lambda: (r := cloud.eschedule("console", uuid, "--json")).rc == 0 and r.json()[0]["boot"] == 6
               and "Linux version 6" in r.json()[0]["text"], 20, "boot 6 published")
    boots = {}
    for n in kept:
        boots[n] = subprocess.run([*cloud.eschedule_argv(), "console", uuid, "--boot", str(n)], capture_output=True,
                                  timeout=30).stdout
    assert boots[1].startswith(first[:16384]) and boots[1].endswith(first[-16384:])
    assert f"[... {len(first) - 32768} bytes of boot 1 not kept ...]".encode() in boots[1]
    assert all(boots[n] == f"Linux version {n}\r\nlogin: ".encode() for n in kept[1:])
    every = subprocess.run([*cloud.eschedule_argv(), "console", uuid, "--all"], capture_output=True, timeout=30).stdout
    assert [int(line.split()[2].rstrip(b",")) for line in every.splitlines() if line.startswith(b"===== boot ")] == kept
    assert all(boots[n] in every for n in kept)
    api, headers = cloud.api().url, {"Authorization": f"Bearer {cloud.token('etcd-compute')}"}
    assert requests.get(f"{api}/v1/instances/{uuid}/console?boot=1", headers=headers, timeout=30).content == boots[1]
    assert requests.get(f"{api}/v1/instances/{uuid}/console?all=true", headers=headers, timeout=30).content == every
    listed = requests.get(f"{api}/v1/instances/{uuid}/console/boots", headers=headers, timeout=30).json()
    assert [b["boot"] for b in listed] == kept and listed[0]["size"] == len(first)
    assert listed[-1]["text"] == "Linux version 6\r\nlogin: "
    page = requests.get(f"{api}/ui/instances/{uuid}?boot=3", cookies={"ec_token": headers["Authorization"][7:]},
                        timeout=30)
    assert page.status_code == 200 and "Linux version 3" in page.text and 'href="?boot=6"' in page.text, page.text
    assert cloud.eschedule("console", uuid, "--boot", "2").rc == 6
    assert cloud.eschedule("console", uuid, "--boot", "1", "--all").rc == 2
    assert cloud.console(uuid) == b"Linux version 6\r\nlogin: "  # the plain console: the current boot
    files = sorted(p.name for p in log.parent.iterdir() if p.name.startswith(uuid) and "console" in p.name)
    assert files == sorted([f"{uuid}.console-{n}.log" for n in kept[:-1]] + [f"{uuid}.console.log"])
    assert cloud.eschedule("destroy", uuid, "--wait").rc == 0
    assert [k for k in cloud.etcd_values() if "/consoles/" in k] == []
    assert [p.name for p in log.parent.iterdir() if p.name.startswith(uuid)] == []
