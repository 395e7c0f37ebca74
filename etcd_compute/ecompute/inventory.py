"""What this host offers Placement: inventory measured with psutil, and traits; registering it.

Totals come from the machine (VCPU = logical CPUs, MEMORY_MB = RAM, DISK_GB = the
filesystem holding the instances) unless compute.yaml sets them; reserved and
allocation ratios always come from compute.yaml. Locking reserves everything, so
nothing new is placed on a host whose daemon has stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import psutil

from etcd_compute.config import ComputeConfig
from etcd_compute.errors import ECError
from etcd_compute.placement import PlacementClient

# CPU flags from /proc/cpuinfo that Placement knows as standard traits (os-traits names).
CPU_TRAITS = {
    "avx": "HW_CPU_X86_AVX", "avx2": "HW_CPU_X86_AVX2", "sse42": "HW_CPU_X86_SSE42",
    "sse41": "HW_CPU_X86_SSE41", "aes": "HW_CPU_X86_AESNI", "fma": "HW_CPU_X86_FMA3",
    "avx512f": "HW_CPU_X86_AVX512F", "bmi2": "HW_CPU_X86_BMI2", "sha_ni": "HW_CPU_X86_SHA",
}


def measured_totals(instances_path: str) -> dict[str, int]:
    path = Path(instances_path)
    while not path.exists():  # the directory may not exist before the first instance
        path = path.parent
    return {
        "VCPU": psutil.cpu_count(logical=True) or 1,
        "MEMORY_MB": psutil.virtual_memory().total // 2**20,
        "DISK_GB": psutil.disk_usage(str(path)).total // 2**30,
    }


def inventory(cfg: ComputeConfig, locked: bool = False) -> dict[str, dict[str, float | int]]:
    """Placement inventory; `locked` reserves everything so nothing new lands here. A host whose
    disks are in a Ceph pool offers no DISK_GB of its own: the pool's sharing provider does."""
    measured = measured_totals(cfg.instances_path)
    out: dict[str, dict[str, float | int]] = {}
    for rc, opts in cfg.inventory.items():
        if rc == "DISK_GB" and cfg.storage.backend == "rbd":
            continue
        total = opts.total if opts.total is not None else measured[rc]
        if total < 1:
            continue
        reserved = total if locked else min(opts.reserved, total)
        out[rc] = {"total": total, "reserved": reserved, "allocation_ratio": opts.allocation_ratio,
                   "min_unit": 1, "max_unit": opts.max_unit or total, "step_size": 1}
    return out


def cpu_traits() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return sorted(trait for flag, trait in CPU_TRAITS.items() if flag in flags)


def traits(cfg: ComputeConfig) -> list[str]:
    return sorted(set(cpu_traits()) | set(cfg.traits))


def hostname() -> str:
    return os.uname().nodename


def register(placement: PlacementClient, cfg: ComputeConfig) -> None:
    """Create or update this host's provider with measured inventory (unlocking it) and traits,
    in its shard aggregate (keeping the aggregates an operator put it in)."""
    host = cfg.host_uuid()
    placement.ensure_provider(host, cfg.host_name())
    placement.set_inventories(host, inventory(cfg))
    placement.set_traits(host, traits(cfg))
    if cfg.storage.backend == "rbd":
        rbd = cfg.storage.rbd
        pool = rbd.pool_provider()
        placement.share_pool(pool, f"rbd:{rbd.cluster}/{rbd.pool}", pool_capacity_gb(cfg), cfg.shards,
                             rbd.allocation_ratio)
        placement.join_shard(host, cfg.shards, pool)
    else:
        placement.join_shard(host, cfg.shards)


def pool_capacity_gb(cfg: ComputeConfig) -> int:
    """The DISK_GB a Ceph pool offers: storage.rbd.capacity_gb, or what `ceph df` says the pool
    holds and may still take (raw space divided by its replication), in whole GiB."""
    rbd = cfg.storage.rbd
    if rbd.capacity_gb is not None:
        return rbd.capacity_gb
    p = subprocess.run(["ceph", "--cluster", rbd.cluster, "--conf", rbd.ceph_conf, "--id", rbd.user, "--keyring",
                        rbd.keyring_path(), "df", "--format", "json"], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise ECError(f"cannot read the capacity of pool {rbd.pool} (ceph df): {p.stderr.strip()}")
    for pool in json.loads(p.stdout).get("pools", []):
        if pool.get("name") == rbd.pool:
            stats = pool.get("stats", {})
            return max(1, int((stats.get("stored", 0) + stats.get("max_avail", 0)) // 2**30))
    raise ECError(f"pool {rbd.pool} is not in `ceph df`: does it exist, and may client.{rbd.user} see it?")


def lock(placement: PlacementClient, cfg: ComputeConfig) -> None:
    """Reserve the whole inventory: Placement offers nothing of this host until register()."""
    placement.set_inventories(cfg.host_uuid(), inventory(cfg, locked=True))
