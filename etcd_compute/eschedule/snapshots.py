"""Snapshots: an instance's root disk in Ceph, copied into an image of the catalogue that new
instances boot from (`eschedule snapshot INSTANCE [--name NAME]`).

Done as Nova's rbd driver does a direct snapshot: a snapshot of the instance's disk, cloned into
an image of its own and flattened (so it depends on nothing: the instance may be destroyed and
its disk removed), the temporary snapshot removed; then the new image is snapshotted (@base) and
protected like every image the hosts import, and entered in the project's catalogue with the URL
`rbd:<pool>/<image>`. A host of that pool clones its instances' disks from it directly; nothing
is downloaded or imported. An instance of it is only placed on a host of that pool.

The copy is crash-consistent: what the guest had written to its disk at that moment, as after a
power cut (no guest agent freezes its filesystems here). Deleting such an image is refused while
an instance's disk is still a clone of it.
"""

from __future__ import annotations

import logging
import uuid as uuidlib
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from etcd_compute import contract
from etcd_compute.contract import Image
from etcd_compute.errors import ECError, InvalidState, UnknownInstance, UsageError
from etcd_compute.eschedule import inputs
from etcd_compute.eschedule.cephpool import ceph_pool
from etcd_compute.rbd import RbdError, RbdPool, disk_name
from etcd_compute.states import Actual

if TYPE_CHECKING:
    from etcd_compute.eschedule.operations import Operations

LOG = logging.getLogger(__name__)


def snapshot(ops: Operations, ref: str, name: str | None = None) -> Image:
    """A crash-consistent copy of the instance's root disk, as image `name` of its project's
    catalogue (default: <instance name or id>-<UTC time>)."""
    name = inputs.check_label(name, "image") if name is not None else None  # bad input before any read
    provider, pool = ceph_pool(ops.cfg, "snapshots")
    uuid = ops.resolve(ref)
    request, _, status = ops.store.read_request(uuid)
    if request is None or not ops._mine(request):
        raise UnknownInstance(f"no instance {ref!r:.80}")
    if provider not in request["allocations"] or not request.get("image"):
        raise InvalidState(f"instance {uuid} has no disk in Ceph pool {pool.settings.pool} (its disk is local to "
                           "its host, or it has none): only an rbd host's instance can be snapshotted")
    state = status["state"] if status else Actual.PENDING
    if state not in (Actual.ACTIVE, Actual.STOPPED, Actual.SUSPENDED, Actual.CRASHED):
        raise InvalidState(f"cannot snapshot instance {uuid} while it is {state}")
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    name = name or f"{request.get('name') or uuid[:8]}-{stamp}"
    if ops.store.image(ops.project, name) is not None:
        raise UsageError(f"image {name} exists already in project {ops.project}")
    sid = uuidlib.uuid4().hex[:12]
    target, disk, temporary = f"img-snap-{sid}", disk_name(uuid), f"snap-{sid}"
    try:
        _copy(pool, disk, temporary, target)
        entry = Image(name=name, scope=ops.project, url=f"rbd:{pool.settings.pool}/{target}", sha256="",
                      boot=request.get("boot"), aliases=[], created_at=contract.now())
        if not ops.store.create_image(entry):
            raise UsageError(f"image {name} exists already in project {ops.project} (made meanwhile)")
    except BaseException:
        _forget(pool, target)
        raise
    LOG.info("instance %s snapshotted into %s as image %s of project %s", uuid, target, name, ops.project)
    return entry


def _copy(pool: RbdPool, disk: str, temporary: str, target: str) -> None:
    """`disk` as it is now, into the independent image `target`, protected at @base."""
    snap = f"{pool.path(disk)}@{temporary}"
    try:
        pool.rbd("snap", "create", snap)
        pool.rbd("snap", "protect", snap)
        pool.rbd("clone", snap, pool.path(target))
        pool.rbd("flatten", "--no-progress", pool.path(target))
    except RbdError as exc:
        raise ECError(f"snapshot of {pool.path(disk)}: {exc}") from None
    finally:
        for step in (("snap", "unprotect", snap), ("snap", "rm", "--no-progress", snap)):
            try:
                pool.rbd(*step)
            except RbdError as exc:  # not made, or made and left: say so, it holds no instance back
                if "No such file" not in str(exc):
                    LOG.warning("could not remove the temporary snapshot %s: %s", snap, exc)
    try:
        pool.rbd("snap", "create", f"{pool.path(target)}@base")
        pool.rbd("snap", "protect", f"{pool.path(target)}@base")
    except RbdError as exc:
        raise ECError(f"snapshot into {pool.path(target)}: {exc}") from None


def _forget(pool: RbdPool, target: str) -> None:
    try:
        pool.remove(target)
    except RbdError as exc:
        LOG.error("%s is left in the pool: %s", pool.path(target), exc)
