"""The fence's proof: how the daemon, its workers and the fence process agree on whether the
host's etcd lease holds (see fence.py for the timing argument).

The daemon writes the proof (liveness.py), its workers read it before they start a domain
(worker.py), and the fence process reads it ten times a second (fence.py). Beside it, the
fence keeps its record of what it stopped, its pid and its heartbeat. All are small files
beside the instances directory, replaced whole (rename), so a reader never sees half of
one. This module loads nothing of the hypervisor: the daemon imports it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

FENCE_MODULE = "etcd_compute.ecompute.fence"


def boot_id() -> str:
    """This boot of the machine: a proof from an earlier boot (whose monotonic clock is gone) proves nothing."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class Proof:
    """What the daemon proved: the lease holds until `deadline` (CLOCK_MONOTONIC) under `epoch`."""

    host: str
    epoch: int
    deadline: float
    pid: int
    boot: str = field(default_factory=boot_id)


def paths(instances_path: str) -> dict[str, Path]:
    """The fence's files, beside the instances directory (as the host's lock file is)."""
    base = instances_path.rstrip("/")
    return {"proof": Path(base + ".proof"), "fenced": Path(base + ".fenced"), "pid": Path(base + ".fence-pid"),
            "alive": Path(base + ".fence-alive")}


def write_proof(path: Path, proof: Proof) -> None:
    """Replace the proof at once (rename): a reader sees the old one or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(proof)))
    os.replace(tmp, path)


def read_proof(path: Path) -> Proof | None:
    """The proof, or None if there is none, it is unreadable or from another boot."""
    try:
        data = json.loads(path.read_text())
        proof = Proof(host=str(data["host"]), epoch=int(data["epoch"]), deadline=float(data["deadline"]),
                      pid=int(data["pid"]), boot=str(data["boot"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return proof if proof.boot == boot_id() else None


def lapsed(proof: Proof | None, epoch: int | None = None, *, now: float | None = None,
           slack: float = 0.0) -> str | None:
    """Why `proof` does not cover the moment `now` (plus `slack`) for a job of `epoch`, or None."""
    if proof is None:
        return "the host has not proven its etcd lease"
    if epoch is not None and proof.epoch != epoch:
        return f"the host claimed its etcd lease anew (epoch {proof.epoch}, this work began in {epoch})"
    left = proof.deadline - (time.monotonic() if now is None else now)
    if left <= slack:
        return f"the host's etcd lease is not proven ({-left:.1f}s past the fence's deadline)"
    return None


# -- what the fence stopped, for the daemon to report and undo once the lease is back -----------

def record_fenced(path: Path, uuids: list[str], epoch: int, why: str) -> None:
    """Add `uuids` to the fence's record (what it stopped, since when, and why)."""
    known = read_fenced(path)
    stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
    for uuid in uuids:
        known.setdefault(uuid, {"at": stamp, "epoch": epoch, "why": why})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(known))
    os.replace(tmp, path)


def read_fenced(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def take_fenced(path: Path) -> dict[str, dict[str, Any]]:
    """The record, emptied: the daemon reports each stopped instance once, after its lease is back."""
    found = read_fenced(path)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return found


@dataclass
class FenceSettings:
    host: str
    uri: str
    domain_type: str
    instances_path: str


def heartbeat_age(instances_path: str) -> float | None:
    """Seconds since the fence of this host last beat; None if it never did."""
    try:
        return time.time() - paths(instances_path)["alive"].stat().st_mtime
    except OSError:
        return None


def fence_pid(instances_path: str) -> int | None:
    """The pid of this host's fence process if one runs (its pid file, checked against /proc)."""
    files = paths(instances_path)
    try:
        pid = int(files["pid"].read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return None
    if FENCE_MODULE.encode() not in cmdline or str(files["proof"]).encode() not in cmdline:
        return None
    return None if state == "Z" else pid


def command(settings: FenceSettings, log_level: str) -> list[str]:
    """The fence process's command line, as the daemon starts it."""
    return [sys.executable, "-m", FENCE_MODULE, "--host", settings.host, "--uri", settings.uri,
            "--domain-type", settings.domain_type, "--instances", settings.instances_path,
            "--proof", str(paths(settings.instances_path)["proof"]), "--log-level", log_level]
