"""devstack/chaos/sampler.py: the QEMU sampler sees copies of one instance as processes on this
machine, stopped ones too, and its observations make invariant C name when two began and for how
long. Fake QEMU processes (a Python that calls itself qemu, with a -uuid) stand in: no services.
The fake sampler does the same over fake hypervisors' domain files, and both tell the run at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.chaos.sampler import FakeSampler, Sampler, qemu_uuid
from devstack.harness import wait_until
from etcd_compute import invariants


@pytest.fixture
def fakes() -> Iterator[list[subprocess.Popen]]:
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def fake_qemu(procs: list[subprocess.Popen], uuid: str) -> subprocess.Popen:
    proc = subprocess.Popen(["qemu-system-x86_64", "-c", "import time; time.sleep(120)", "-uuid", uuid],
                            executable=sys.executable)
    procs.append(proc)
    return proc


def test_qemu_uuid_reads_only_a_qemu_command_line() -> None:
    assert qemu_uuid(b"/usr/bin/qemu-system-x86_64\0-name\0x\0-uuid\0abc\0-m\064\0") == "abc"
    assert qemu_uuid(b"/usr/bin/python3\0-uuid\0abc\0") is None
    assert qemu_uuid(b"/usr/bin/qemu-system-x86_64\0-uuid\0") is None
    assert qemu_uuid(b"") is None


def test_two_copies_are_seen_stopped_or_not_and_c_names_when_and_how_long(fakes: list) -> None:
    uuid, other = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    alarms: list[tuple[float, str, list[str]]] = []
    sampler = Sampler(period=0.02, alarm=lambda *told: alarms.append(told)).start()
    try:
        first = fake_qemu(fakes, uuid)
        fake_qemu(fakes, other)
        wait_until(lambda: {uuid, other} <= {o.uuid for o in sampler.observations}, 20, "the first copies seen")
        second = fake_qemu(fakes, uuid)
        os.kill(second.pid, signal.SIGSTOP)  # a stopped copy is a copy: it may go on at any moment
        wait_until(lambda: invariants.two_copies(sampler.observations), 20, "two copies seen")
        time.sleep(0.2)  # (a span of several samples; nothing below depends on its length)
        first.kill()
        first.wait()
        wait_until(lambda: not invariants.overlaps(sampler.observations)[0].open, 20, "the overlap's end seen")
    finally:
        sampler.stop()
        os.kill(second.pid, signal.SIGCONT)
    found = invariants.two_copies(sampler.observations)
    assert [v.uuid for v in found] == [uuid], found
    span = invariants.overlaps(sampler.observations)[0]
    assert span.lasted > 0 and not span.open and {w.split("/")[1] for w in span.hosts} == {
        str(first.pid), str(second.pid)}, span
    assert invariants.two_copies(sampler.observations, window=span.lasted + 1) == []
    assert [(u, len(places)) for _, u, places in alarms] == [(uuid, 2)]  # told once, at once
    assert sampler.samples > 1 and sampler.cpu > 0


def domain_file(hypervisor: Path, uuid: str, state: str = "running") -> None:
    """A domain of a fake hypervisor (fakedriver's file format), as its host would write it."""
    hypervisor.mkdir(parents=True, exist_ok=True)
    (hypervisor / f"{uuid}.json").write_text(json.dumps({"uuid": uuid, "name": f"ec-{uuid}", "owner": "h",
                                                         "state": state, "vcpus": 1, "memory_mb": 64}))


def test_the_fake_sampler_tells_two_copies_at_once_and_c_names_the_span(tmp_path: Path) -> None:
    """Over fake hypervisors a copy is a running domain file; the alarm comes once, from the first
    sample that sees the second copy, naming both places; C names the span."""
    uuid, other = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    a, b = tmp_path / "a", tmp_path / "b"
    domain_file(a, uuid)
    domain_file(b, other)
    domain_file(b, str(uuidlib.uuid4()), state="shutoff")  # defined, not running: no copy
    alarms: list[tuple[float, str, list[str]]] = []
    sampler = FakeSampler(dirs={"hv-a": a, "hv-b": b}, period=0.02, alarm=lambda *told: alarms.append(told))
    sampler.start()
    try:
        wait_until(lambda: {uuid, other} <= {o.uuid for o in sampler.observations}, 20, "the first copies seen")
        domain_file(b, uuid)
        wait_until(lambda: alarms, 20, "the alarm")
        time.sleep(0.1)
        domain_file(a, uuid, state="shutoff")  # the fence stopped it
        wait_until(lambda: not invariants.overlaps(sampler.observations)[0].open, 20, "the overlap's end seen")
    finally:
        sampler.stop()
    assert [(u, places) for _, u, places in alarms] == [(uuid, ["hv-a", "hv-b"])]
    [span] = invariants.overlaps(sampler.observations)
    assert span.uuid == uuid and span.hosts == ("hv-a", "hv-b") and span.began == pytest.approx(alarms[0][0])
    assert [v.uuid for v in invariants.two_copies(sampler.observations)] == [uuid]
    assert "running fake domains" in sampler.summary() and sampler.started == {"hv-a": 1, "hv-b": 2}


def test_a_qemu_of_a_libvirt_host_is_told_from_the_machines_by_its_etc_mount(fakes: list, tmp_path: Path) -> None:
    """libvirt gives every QEMU a mount namespace of its own, so the namespace names no libvirtd:
    a libvirt host's QEMU shows /etc/libvirt bind-mounted from the host's etc/ (as devstack's
    libvirthost does it), the machine's has none. Two copies, one of each, are told apart."""
    uuid, etc = str(uuidlib.uuid4()), tmp_path / "lv1" / "etc"
    etc.mkdir(parents=True)
    fake_qemu(fakes, uuid)  # this machine's
    inner = f'mount --bind {etc} /etc/libvirt && exec -a qemu-system-x86_64 {sys.executable} -c "import time; ' \
            f'time.sleep(120)" -uuid {uuid}'
    fakes.append(subprocess.Popen(["unshare", "--mount", "--propagation", "private", "bash", "-c", inner]))
    alarms: list[tuple[float, str, list[str]]] = []
    sampler = Sampler(libvirt_etcs={str(etc): "lv1"}, period=0.02, alarm=lambda *told: alarms.append(told)).start()
    try:
        wait_until(lambda: alarms, 20, "two copies seen")
    finally:
        sampler.stop()
    [(_, told, places)] = alarms
    assert told == uuid and [p.split("/")[0] for p in places] == ["libvirtd", "lv1"], places
