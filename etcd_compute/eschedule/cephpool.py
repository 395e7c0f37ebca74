"""The Ceph pool as the user's side uses it (schedule.yaml's `ceph`): volumes are made in it,
snapshots of instances' disks too; and what deleting a snapshot's catalogue entry asks of it.
It imports nothing of operations.py, so that the catalogue (which operations.py calls) may call it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from etcd_compute.contract import Image
from etcd_compute.errors import ECError, InvalidState, UsageError
from etcd_compute.rbd import RbdError, RbdPool, RbdSettings, snapshot_image

if TYPE_CHECKING:
    from etcd_compute.config import ScheduleConfig


def ceph_pool(schedule: ScheduleConfig, what: str) -> tuple[str, RbdPool]:
    """(the pool's sharing provider, the pool) of schedule.yaml's `ceph`; UsageError naming
    `what` needs it when this cloud has none."""
    cfg = schedule.ceph
    if not cfg.pool:
        raise UsageError(f"{what} are not set up here: schedule.yaml names no ceph.pool (the Ceph pool of the rbd "
                         "hosts)")
    settings = RbdSettings(pool=cfg.pool, conf=cfg.ceph_conf, cluster=cfg.cluster, user=cfg.user,
                           keyring=cfg.keyring_path())
    return cfg.pool_provider(), RbdPool(settings)


def in_use(pool: RbdPool, image: str) -> list[str]:
    """The images cloned from `image`@base (instances' disks)."""
    found = json.loads(pool.rbd("children", "--format", "json", f"{pool.path(image)}@base", timeout=60) or "[]")
    return [c.get("image", "") if isinstance(c, dict) else str(c) for c in found]


def delete_snapshot(cfg: ScheduleConfig, entry: Image, remove: Callable[[], None]) -> None:
    """Delete a snapshot's catalogue entry (`remove`) and then its image; refused while an
    instance's disk is a clone of it."""
    found = snapshot_image(entry["url"])
    assert found is not None
    where, image = found
    _, pool = ceph_pool(cfg, "snapshots")
    if where != pool.settings.pool:
        raise InvalidState(f"image {entry['name']} is in Ceph pool {where}, not schedule.yaml's "
                           f"ceph.pool {pool.settings.pool}")
    try:
        users = in_use(pool, image)
    except RbdError as exc:
        if "No such file" not in str(exc) and "does not exist" not in str(exc):
            raise ECError(f"image {entry['name']}: {exc}") from None
        users = []
    if users:
        shown = ", ".join(u.removeprefix("vm-") for u in users[:5])
        raise InvalidState(f"image {entry['name']} is in use: {len(users)} instances' disks are clones of it "
                           f"({shown}); destroy them first")
    remove()
    try:
        pool.remove(image)
    except RbdError as exc:
        raise ECError(f"image {entry['name']} is deleted, but {pool.path(image)} is left in the pool: "
                      f"{exc}") from None


def is_snapshot(url: str) -> bool:
    return snapshot_image(url) is not None
