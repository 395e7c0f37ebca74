"""Which QEMU processes run on this machine, sampled every ≤ 100 ms, as observations for
invariant C (etcd_compute.invariants.two_copies: never two running copies of one instance).

What counts as a copy: a QEMU process whose command line carries `-uuid <uuid>`, in any
state but zombie or dead. A paused guest (libvirt's SUSPENDED) and a process under SIGSTOP
(state T) count: either can continue at any moment and write to the disk the other copy
writes to, so neither is a safe stand-by.

Where a copy runs: libvirt gives each QEMU process a mount namespace of its own (qemu.conf's
`namespaces`), made from its libvirtd's. A libvirtd of the run's own (devstack/libvirthost.py)
has /etc/libvirt bind-mounted from its base directory, and so do its QEMUs: `libvirt_etcs`
(that directory -> the libvirtd's name) tells them apart, read once from each new QEMU's
mountinfo; a QEMU without such a mount is this machine's libvirtd's (`machine`), one with
another's is another-libvirtd's (someone else's libvirt host on this machine). The copy's
place is "<libvirtd>/<pid>", so two processes of one uuid under one daemon count as two copies
as well.

A uuid seen in two places in one sample is told at once (`alarm`, from the sampler's thread),
so the run's timeline shows it beside the faults of that moment; C itself is judged over the
whole series (`observations`), which says when each overlap began and how long it lasted.

FakeSampler does the same over fake hypervisors (fake:///DIR, etcd_compute/ecompute/fakedriver.py),
whose running domains are files: a copy there is a domain file in state running (a paused one
does not count, as fakedriver.running() has it), its place the hypervisor's name.

Cost: /proc is listed every sample (one getdents), but a process's command line is read
only while it is young (it may still exec QEMU, as libvirt's forked child does) or when its
/proc entry is a new one (a pid used again gets a new inode); a QEMU process's state is read
each sample. The thread's own CPU time is measured (`cpu`).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from etcd_compute.ecompute import fakedriver
from etcd_compute.invariants import Observation

PERIOD = 0.1  # seconds between samples
YOUNG = 2.0  # seconds during which a process may still exec QEMU: its command line is read again


@dataclass
class _Seen:
    first: float
    uuid: str | None  # None: not a QEMU process (as far as its command line said)
    where: str = ""


def qemu_uuid(cmdline: bytes) -> str | None:
    """The -uuid of a QEMU command line (NUL-separated, as /proc gives it), or None."""
    args = cmdline.rstrip(b"\0").split(b"\0")
    if b"qemu" not in os.path.basename(args[0]):
        return None
    try:
        return args[args.index(b"-uuid") + 1].decode() or None
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # gone meanwhile
        return None


def libvirt_etc(pid: str) -> str | None:
    """Where /etc/libvirt comes from in the process's mount namespace: the root of the bind mount
    on it, as mountinfo gives it (relative to its file system); None if it is no mount point."""
    for line in (_read(f"/proc/{pid}/mountinfo") or b"").decode(errors="replace").splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4] == "/etc/libvirt":
            return fields[3]
    return None


def _alive(pid: str) -> bool:
    """Is the process still more than a zombie? (state is the field after the command name)"""
    stat = _read(f"/proc/{pid}/stat")
    return stat is not None and stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3] not in (b"Z", b"X", b"x")


@dataclass
class Sampler:
    """A thread that samples QEMU processes until stopped; `observations` holds every change."""

    libvirt_etcs: Mapping[str, str] = field(default_factory=dict)  # a libvirt host's etc/ -> its name
    machine: str = "libvirtd"  # the name of this machine's libvirtd
    # Told (t, uuid, places) when a uuid is first seen in two places or more, until it is in one again.
    alarm: Callable[[float, str, list[str]], None] | None = None
    period: float = PERIOD
    t0: float = field(default_factory=time.monotonic)
    observations: list[Observation] = field(default_factory=list)
    samples: int = 0
    cpu: float = 0.0  # seconds of CPU this sampler's thread used
    most: int = 0  # the most QEMU processes seen at once
    late: float = 0.0  # the longest a sample came after the one before
    started: Counter[str] = field(default_factory=Counter)  # copies seen starting, by hypervisor
    _seen: dict[tuple[str, int], _Seen] = field(default_factory=dict)
    _running: set[tuple[str, str]] = field(default_factory=set)  # (where, uuid)
    _doubled: set[str] = field(default_factory=set)  # uuids in two places at the last sample
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Sampler:
        self._thread = threading.Thread(target=self._loop, name="copy sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _loop(self) -> None:
        started, last = time.thread_time(), time.monotonic()
        while not self._stop.is_set():
            self.sample()
            now = time.monotonic()
            self.late = max(self.late, now - last)
            last = now
            self.cpu = time.thread_time() - started
            self._stop.wait(max(0.0, self.period - (time.monotonic() - now)))

    def sample(self) -> set[tuple[str, str]]:
        """One look: record what started and what ended since the last look."""
        now = time.monotonic()
        running = self.look(now)
        t = now - self.t0
        self.observations += [Observation(t, where, uuid, True) for where, uuid in sorted(running - self._running)]
        self.started.update(where.split("/")[0] for where, _ in running - self._running)
        self.observations += [Observation(t, where, uuid, False) for where, uuid in sorted(self._running - running)]
        self._running = running
        self.samples += 1
        self.most = max(self.most, len(running))
        self._tell(t, running)
        return running

    def _tell(self, t: float, running: set[tuple[str, str]]) -> None:
        places: dict[str, list[str]] = defaultdict(list)
        for where, uuid in running:
            places[uuid].append(where)
        doubled = {uuid for uuid, found in places.items() if len(found) > 1}
        if self.alarm is not None:
            for uuid in sorted(doubled - self._doubled):
                self.alarm(t, uuid, sorted(places[uuid]))
        self._doubled = doubled

    def look(self, now: float) -> set[tuple[str, str]]:
        """(where, uuid) of every QEMU process that runs: one listing of /proc."""
        running = set()
        present = set()
        with os.scandir("/proc") as entries:
            for entry in entries:
                if not entry.name.isdigit():
                    continue
                key = (entry.name, entry.inode())
                present.add(key)
                seen = self._look(key, now)
                if seen.uuid is not None and _alive(entry.name):
                    running.add((seen.where, seen.uuid))
        for key in set(self._seen) - present:
            del self._seen[key]
        return running

    def _look(self, key: tuple[str, int], now: float) -> _Seen:
        seen = self._seen.get(key)
        if seen is not None and (seen.uuid is not None or now - seen.first > YOUNG):
            return seen
        pid = key[0]
        uuid = qemu_uuid(_read(f"/proc/{pid}/cmdline") or b"")
        if seen is None:
            seen = self._seen[key] = _Seen(now, None)
        if uuid is not None:
            seen.uuid, seen.where = uuid, f"{self.libvirtd(pid)}/{pid}"
        return seen

    def libvirtd(self, pid: str) -> str:
        """The libvirtd a QEMU process belongs to (see the module's docstring)."""
        root = libvirt_etc(pid)
        if root is None:
            return self.machine
        return next((name for etc, name in self.libvirt_etcs.items() if etc.endswith(root)), "another-libvirtd")

    what = "QEMU processes"

    def summary(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        return (f"{self.samples} samples in {elapsed:.0f}s (every {elapsed / max(self.samples, 1) * 1000:.0f} ms, "
                f"longest gap {self.late * 1000:.0f} ms), {self.cpu:.2f} CPU-s ({self.cpu / elapsed:.1%} of a core), "
                f"at most {self.most} {self.what} at once, {len(self.observations)} changes; started (anyone's), "
                f"by hypervisor: "
                + (", ".join(f"{where} {n}" for where, n in sorted(self.started.items())) or "none"))


@dataclass
class FakeSampler(Sampler):
    """The same over fake hypervisors: their running domain files, by hypervisor name."""

    dirs: Mapping[str, Path] = field(default_factory=dict)  # hypervisor name -> its fake:/// directory
    what = "running fake domains"

    def look(self, now: float) -> set[tuple[str, str]]:
        return {(name, uuid) for name, d in self.dirs.items() for uuid in fakedriver.running(d)}
