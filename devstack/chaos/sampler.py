"""Which QEMU processes run on this machine, sampled every ≤ 100 ms, as observations for
invariant C (etcd_compute.invariants.two_copies: never two running copies of one instance).

What counts as a copy: a QEMU process whose command line carries `-uuid <uuid>`, in any
state but zombie or dead. A paused guest (libvirt's SUSPENDED) and a process under SIGSTOP
(state T) count: either can continue at any moment and write to the disk the other copy
writes to, so neither is a safe stand-by.

Where a copy runs: the libvirt daemons of one machine are told apart by the mount namespace
their QEMU processes live in (a second libvirtd runs in a namespace of its own, see
platform.md), named by `namespaces` (ns -> host name) where known; the copy's place is
"<host>/<pid>", so two processes of one uuid under one daemon count as two copies as well.

Cost: /proc is listed every sample (one getdents), but a process's command line is read
only while it is young (it may still exec QEMU, as libvirt's forked child does) or when its
/proc entry is a new one (a pid used again gets a new inode); a QEMU process's state is read
each sample. The thread's own CPU time is measured (`cpu`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

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


def _alive(pid: str) -> bool:
    """Is the process still more than a zombie? (state is the field after the command name)"""
    stat = _read(f"/proc/{pid}/stat")
    return stat is not None and stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3] not in (b"Z", b"X", b"x")


@dataclass
class Sampler:
    """A thread that samples QEMU processes until stopped; `observations` holds every change."""

    namespaces: Mapping[str, str] = field(default_factory=dict)  # "mnt:[4026531832]" -> host name
    period: float = PERIOD
    t0: float = field(default_factory=time.monotonic)
    observations: list[Observation] = field(default_factory=list)
    samples: int = 0
    cpu: float = 0.0  # seconds of CPU this sampler's thread used
    most: int = 0  # the most QEMU processes seen at once
    late: float = 0.0  # the longest a sample came after the one before
    _seen: dict[tuple[str, int], _Seen] = field(default_factory=dict)
    _running: set[tuple[str, str]] = field(default_factory=set)  # (where, uuid)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Sampler:
        self._thread = threading.Thread(target=self._loop, name="qemu sampler", daemon=True)
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
        """One look at /proc: record what started and what ended since the last look."""
        now = time.monotonic()
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
        t = now - self.t0
        self.observations += [Observation(t, where, uuid, True) for where, uuid in sorted(running - self._running)]
        self.observations += [Observation(t, where, uuid, False) for where, uuid in sorted(self._running - running)]
        self._running = running
        self.samples += 1
        self.most = max(self.most, len(running))
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
            try:
                ns = os.readlink(f"/proc/{pid}/ns/mnt")
            except OSError:
                ns = "?"
            seen.uuid, seen.where = uuid, f"{self.namespaces.get(ns, ns)}/{pid}"
        return seen

    def summary(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        return (f"{self.samples} samples in {elapsed:.0f}s (every {elapsed / max(self.samples, 1) * 1000:.0f} ms, "
                f"longest gap {self.late * 1000:.0f} ms), {self.cpu:.2f} CPU-s ({self.cpu / elapsed:.1%} of a core), "
                f"at most {self.most} QEMU processes at once, {len(self.observations)} changes")
