"""What every benchmark shares: the bench stack, repetition, and one way to report a figure.

A figure is always printed next to its floor, measured in the same run on the same
machine (these machines are shared and noisy), as a ratio: what etcd-compute adds
on top of what it drives is the number that means something here.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import statistics
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("ECOMPUTE_PROFILE", "bench")  # etcd and Placement of its own

from devstack import harness, localstack  # noqa: E402
from etcd_compute.config import EtcdConfig, PlacementConfig  # noqa: E402
from etcd_compute.placement import PlacementClient  # noqa: E402
from etcd_compute.store import Store  # noqa: E402

BIN = harness.BIN  # eschedule and ecompute, from the venv the benchmarks run in


@dataclass
class Figure:
    """One measured figure; `ratio` = value / floor, `target` a bound on the ratio (or value)."""

    bench: str
    name: str
    value: float
    unit: str
    floor: float | None = None
    floor_name: str = ""
    ratio: float | None = None
    target: str = ""
    ok: bool | None = None
    extra: dict = field(default_factory=dict)


def figure(bench: str, name: str, value: float, unit: str, floor: float | None = None, floor_name: str = "",
           target: str = "", check: Callable[[float, float | None], bool] | None = None, **extra) -> Figure:
    ratio = value / floor if floor else None
    ok = check(value, ratio) if check else None
    return Figure(bench, name, round(value, 4), unit, None if floor is None else round(floor, 4), floor_name,
                  None if ratio is None else round(ratio, 3), target, ok, extra)


def stack() -> dict:
    """Start (or reuse) the bench profile's etcd, Placement and libvirtd."""
    return localstack.ensure_up()


def clients(info: dict, prefix: str | None = None) -> tuple[PlacementClient, Store]:
    prefix = prefix or f"/bench-{uuidlib.uuid4().hex[:8]}"
    return (PlacementClient(PlacementConfig(endpoint=info["placement"])),
            Store(EtcdConfig(endpoints=[info["etcd"]], prefix=prefix)))


def say(msg: str) -> None:
    print(f"   {msg}", flush=True)


def files_dir(info: dict, name: str) -> Path:
    """A directory of this run under the bench stack dir, reachable by QEMU (libvirt-qemu)."""
    path = Path(info["stack"]) / "files" / name
    path.mkdir(parents=True, exist_ok=True)
    for d in (path.parent, path):
        d.chmod(0o755)
    return path


def remove_files(files: Path) -> None:
    shutil.rmtree(files, ignore_errors=True)
    with contextlib.suppress(OSError):
        files.parent.rmdir()  # only if no other bench uses it


def destroy_every(uuids: set[str], destroy: Callable[[str], None]) -> list[str]:
    """Destroy (and wait for) every instance of a bench, four at a time, never stopping on an
    error; the errors."""
    errors: list[str] = []

    def one(uuid: str) -> None:
        try:
            destroy(uuid)
        except Exception as exc:  # noqa: BLE001 - keep cleaning
            errors.append(str(exc))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(one, sorted(uuids)))
    return errors


def remove_domains(conn, files: Path) -> list[str]:  # noqa: ANN001 - a libvirt.virConnect
    """Power off and undefine whatever domain is left that uses a file under `files` (a destroy
    that failed, a build cut off by the daemon's shutdown, a direct domain); what was left."""
    import libvirt
    left = []
    for dom in conn.listAllDomains(0):
        with contextlib.suppress(libvirt.libvirtError):
            if str(files) + "/" in dom.XMLDesc(0):
                left.append(f"left over: domain {dom.name()}")
                with contextlib.suppress(libvirt.libvirtError):
                    dom.destroy()
                dom.undefine()
    return left


def remove_pools(conn, files: Path) -> None:  # noqa: ANN001 - a libvirt.virConnect
    """Stop and undefine every storage pool of `conn` on a path under `files` (ecompute makes
    one for its instances directory)."""
    import libvirt
    for pool in conn.listAllStoragePools(0):
        with contextlib.suppress(libvirt.libvirtError):
            if f"<path>{files}/" in pool.XMLDesc(0):
                if pool.isActive():
                    pool.destroy()
                if pool.isPersistent():
                    pool.undefine()


def drop_provider(placement: PlacementClient, rp: str) -> None:
    """Remove a provider and every allocation on it, whatever state the bench left."""
    with contextlib.suppress(Exception):
        placement.delete_provider(rp)


def ecompute(info: dict, prefix: str, files: Path, name: str, *, workers: int = 2,
             **kwargs: object) -> harness.Ecompute:
    """A (not yet started) ecompute of a benchmark: a fresh uuid, config, log and files under `files`."""
    cfg = harness.compute_config(info, files / name, uuid=str(uuidlib.uuid4()), prefix=prefix,
                                 name=f"bench-{prefix.strip('/').removeprefix('bench-')}-{name}",
                                 workers=workers, **kwargs)
    return harness.Ecompute(name, cfg, files)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def table(figures: list[Figure]) -> str:
    rows = [("bench", "figure", "value", "floor", "ratio", "target", "ok")]
    for f in figures:
        rows.append((f.bench, f.name, f"{f.value:g} {f.unit}",
                     f"{f.floor:g} ({f.floor_name})" if f.floor is not None else "-",
                     f"{f.ratio:g}" if f.ratio is not None else "-", f.target or "-",
                     MARK[f.ok]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


MARK = {True: "✔", False: "✘", None: "-"}


def goals(figures: list[Figure]) -> str:
    """Every figure with a target, met (✔) or missed (✘), with its ratio to its floor."""
    checked = [f for f in figures if f.ok is not None]
    lines = [f"goals: {sum(bool(f.ok) for f in checked)} of {len(checked)} met"]
    for f in checked:
        against = f" = {f.ratio:g}x {f.floor_name}" if f.ratio is not None else ""
        lines.append(f"  {MARK[f.ok]} {f.bench}: {f.name}: {f.value:g} {f.unit}{against} (target {f.target})")
    return "\n".join(lines)


def merged(path: Path, figures: list[Figure]) -> list[Figure]:
    """The figures of this run, plus those of benchmarks it did not run from an earlier results file."""
    ran = {f.bench for f in figures}
    try:
        earlier = [Figure(**d) for d in json.loads(path.read_text()) if d.get("bench") not in ran]
    except (OSError, ValueError, TypeError):
        earlier = []
    return earlier + figures


def to_json(figures: list[Figure]) -> str:
    return json.dumps([asdict(f) for f in figures], indent=1)
