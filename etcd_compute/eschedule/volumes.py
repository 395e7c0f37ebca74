"""Volumes: persistent RBD images that outlive instances, attached to one at a time.

The user's side makes and removes them, as Cinder's volume service does: a volume is a record
(contract.Volume), an allocation of DISK_GB on its pool's sharing provider in Placement (its id
the consumer, of type VOLUME, so quotas count it), and an RBD image `vol-<id>` in the pool. The
host attaches what its instance's request names (`volumes`) and says in the instance's status
what is attached; this module never talks to a host.

Create and delete go step by step, each step recorded first, so that an interrupted one is
finished (or undone) by the next `volume delete`: a record in state creating or deleting is
what is left, never an image or allocation nobody knows of.

Attach and detach change the instance's request. Attaching also names the instance in the
volume's record, in one transaction that compares the volume, the instance's request and,
when the volume was attached before, that instance's request and status as read: a volume is
free only once neither names it (its old host has detached it), so two operators attaching
one volume to two instances, or an attach racing a detach still under way, can never put it
in two domains.
"""

from __future__ import annotations

import logging
import time
import uuid as uuidlib
from typing import TYPE_CHECKING

from etcd_compute import contract
from etcd_compute.contract import Request, Status, Volume, VolumeRef, VolumeState, VolumeView
from etcd_compute.errors import ECError, InvalidState, NoCapacity, PlacementError, UnknownInstance, UsageError
from etcd_compute.eschedule import inputs
from etcd_compute.eschedule.cephpool import ceph_pool
from etcd_compute.invariants import capacity
from etcd_compute.placement import VOLUME
from etcd_compute.rbd import RbdError, RbdPool
from etcd_compute.states import Actual, Desired

if TYPE_CHECKING:
    from etcd_compute.eschedule.operations import Operations
    from etcd_compute.store import Holder, Rev

LOG = logging.getLogger(__name__)
MAX_SIZE_GB = 16384
STALE_CREATE = 600.0  # seconds after which a volume still "creating" was cut off: delete may finish it
WAIT_POLL = 0.5
TRIES = 10  # a transaction whose compare failed is decided again, this often


class UnknownVolume(UnknownInstance):
    """No such volume (for this caller)."""


def image_name(volume_id: str) -> str:
    return f"vol-{uuidlib.UUID(volume_id)}"


def _view(volume: Volume, holder: Holder) -> VolumeView:
    state = contract.volume_state(volume, holder.request, holder.status)
    attached = state in (VolumeState.ATTACHING, VolumeState.IN_USE, VolumeState.DETACHING)
    return {"id": volume["id"], "name": volume["name"], "project_id": volume["project_id"],
            "size_gb": volume["size_gb"], "pool_name": volume["pool_name"], "state": state,
            "instance": volume["instance"] if attached else None, "created_at": volume["created_at"]}


class Volumes:
    """The volume commands of one Operations (its project, scope and clients)."""

    def __init__(self, ops: Operations) -> None:
        self.ops = ops

    # -- the pool -----------------------------------------------------------------------------

    def _pool(self) -> tuple[str, RbdPool]:
        return ceph_pool(self.ops.cfg, "volumes")

    # -- reading ------------------------------------------------------------------------------

    def _mine(self, volume: Volume) -> bool:
        return not self.ops.scoped or volume["project_id"] == self.ops.project

    def resolve(self, ref: str) -> tuple[Volume, Rev]:
        """The volume `ref` names: its id, a unique prefix of it, or its name (unique among the
        volumes this caller sees)."""
        if not isinstance(ref, str) or not ref:
            raise UsageError("no volume given")
        store = self.ops.store
        if contract.looks_like_uuid(ref):
            found = store.volume(str(uuidlib.UUID(ref)))
            if found is None or not self._mine(found[0]):
                raise UnknownVolume(f"no volume {ref}")
            return found
        if not inputs.LABEL.fullmatch(ref):
            raise UsageError(f"not a volume id, id prefix or name: {ref!r:.80}")
        seen = [v for v in store.volumes() if self._mine(v)]
        named = [v for v in seen if v["name"] == ref] or [v for v in seen if v["id"].startswith(ref)]
        if len(named) > 1:
            shown = ", ".join(v["id"] for v in named[:10])
            raise UsageError(f"{ref!r} names {len(named)} volumes: {shown}; give its id")
        found = store.volume(named[0]["id"]) if named else None
        if found is None:
            raise UnknownVolume(f"no volume {ref!r:.80}" + (f" in project {self.ops.project}" if self.ops.scoped
                                                             else ""))
        return found

    def show(self, ref: str) -> VolumeView:
        volume, _ = self.resolve(ref)
        return _view(volume, self.ops.store.holder(volume["instance"]))

    def list(self, instance: str | None = None) -> list[VolumeView]:
        """The volumes this caller sees (those last attached to `instance`, if given): one read of
        the volumes, and one of each instance they name."""
        store = self.ops.store
        holders: dict[str | None, Holder] = {}
        found = []
        for v in store.volumes():
            if self._mine(v) and (instance is None or v["instance"] == instance):
                if v["instance"] not in holders:
                    holders[v["instance"]] = store.holder(v["instance"])
                found.append(_view(v, holders[v["instance"]]))
        return found

    # -- create and delete ----------------------------------------------------------------------

    def create(self, size_gb: int, name: str | None = None) -> VolumeView:
        """A new volume of `size_gb` GiB in the pool: recorded, allocated in Placement (quota
        checked before and after, as a schedule is), its image made; undone on any failure."""
        if not isinstance(size_gb, int) or isinstance(size_gb, bool) or not 1 <= size_gb <= MAX_SIZE_GB:
            raise UsageError(f"a volume's size is a whole number of GiB from 1 to {MAX_SIZE_GB}, got {size_gb!r:.20}")
        name = inputs.check_label(name, "volume") if name is not None else None
        provider, pool = self._pool()
        ops, store = self.ops, self.ops.store
        if name is not None and any(v["name"] == name and v["project_id"] == ops.project for v in store.volumes()):
            raise UsageError(f"volume name {name} is taken in project {ops.project}")
        limits = ops.limits()
        wanted = {contract.VOLUMES: 1, "DISK_GB": size_gb}
        ops._check_quota(limits, wanted)
        vid = str(uuidlib.uuid4())
        stamp = contract.now()
        volume: Volume = {"id": vid, "name": name, "project_id": ops.project, "user_id": ops.cfg.user_id,
                          "size_gb": size_gb, "pool": provider, "pool_name": pool.settings.pool,
                          "image": image_name(vid), "state": VolumeState.CREATING, "instance": None,
                          "created_at": stamp, "updated_at": stamp}
        if not store.create_volume(volume):
            raise ECError(f"volume {vid} exists already")
        try:
            self._claim(vid, provider, size_gb, pool.settings.pool)
            ops._check_quota(limits, {}, " (counting this volume: a concurrent request took the room)")
            pool.create(volume["image"], size_gb)
            made = self._put(volume, {"state": VolumeState.AVAILABLE})
        except BaseException:
            self._undo(volume, pool)
            raise
        LOG.info("volume %s (%d GiB) of project %s created in pool %s", vid, size_gb, ops.project,
                 pool.settings.pool)
        return _view(made, store.holder(None))

    def _claim(self, vid: str, provider: str, size_gb: int, pool: str) -> None:
        try:
            self.ops.placement.claim(vid, {provider: {"resources": {"DISK_GB": size_gb}}}, self.ops.project,
                                     self.ops.cfg.user_id, consumer_type=VOLUME)
        except PlacementError as exc:
            if exc.status not in (400, 409):
                raise
            free = self._free_gb(provider)
            room = f"{free} GiB of DISK_GB free" if free is not None else "its sharing provider is not registered"
            raise NoCapacity(f"no capacity: pool {pool} has {room}, {size_gb} asked") from None

    def _free_gb(self, provider: str) -> int | None:
        try:
            inventory = self.ops.placement.inventories(provider).get("DISK_GB")
            used = self.ops.placement.usages(provider).get("DISK_GB", 0)
        except PlacementError:
            return None
        return max(0, capacity(inventory) - used) if inventory else None

    def _put(self, volume: Volume, change: dict[str, object]) -> Volume:
        """The volume's record changed, if it is still as this process last wrote it."""
        key = contract.volume_key(self.ops.store.prefix, volume["id"])
        found = self.ops.store.volume(volume["id"])
        if found is None or found[0] != volume:
            raise InvalidState(f"volume {volume['id']} was changed meanwhile (deleted?)")
        new = Volume(**{**volume, **change, "updated_at": contract.now()})  # type: ignore[typeddict-item]
        if not self.ops.store.commit({key: found[1].mod}, {key: new}):
            raise InvalidState(f"volume {volume['id']} was changed meanwhile (deleted?)")
        return new

    def _undo(self, volume: Volume, pool: RbdPool) -> None:
        """Give back what a failed create made: image, allocation, record (in that order, so that
        what is left is always recorded)."""
        try:
            pool.remove(volume["image"])
            self.ops.placement.delete_allocations(volume["id"])
            found = self.ops.store.volume(volume["id"])
            if found is not None and found[0]["state"] == VolumeState.CREATING:
                self.ops.store.commit({contract.volume_key(self.ops.store.prefix, volume["id"]): found[1].mod}, {},
                                      [contract.volume_key(self.ops.store.prefix, volume["id"])])
        except (ECError, RbdError) as exc:
            LOG.error("volume %s left in state creating: %s ('eschedule volume delete %s' removes it)",
                      volume["id"], exc, volume["id"])

    def delete(self, ref: str) -> Volume:
        """Remove a volume that no instance has: its image, its allocation, its record. One left
        deleting (or creating, cut off) is finished here."""
        provider, pool = self._pool()
        store = self.ops.store
        for _ in range(TRIES):
            volume, rev = self.resolve(ref)
            if volume["pool"] != provider:
                raise InvalidState(f"volume {volume['id']} is in another pool than schedule.yaml's "
                                   f"ceph.pool ({volume['pool_name']})")
            holder = store.holder(volume["instance"])
            state = contract.volume_state(volume, holder.request, holder.status)
            if state in (VolumeState.ATTACHING, VolumeState.IN_USE, VolumeState.DETACHING):
                raise InvalidState(f"volume {volume['id']} is {state} (instance {volume['instance']}): "
                                   "detach it first")
            age = time.time() - (contract.seconds_of(volume["created_at"]) or 0)
            if state == VolumeState.CREATING and age < STALE_CREATE:
                raise InvalidState(f"volume {volume['id']} is being created; try again in a moment")
            key = contract.volume_key(store.prefix, volume["id"])
            deleting = Volume(**{**volume, "state": VolumeState.DELETING, "updated_at": contract.now()})
            if state != VolumeState.DELETING and not store.commit({key: rev.mod, **holder.revs}, {key: deleting}):
                continue  # it changed (or its instance did) since it was read: decide again
            try:
                pool.remove(volume["image"])
            except RbdError as exc:
                raise ECError(f"volume {volume['id']} is left deleting: {exc} ('volume delete' again finishes "
                              "it)") from None
            self.ops.placement.delete_allocations(volume["id"])
            found = store.volume(volume["id"])
            if found is not None:
                store.commit({key: found[1].mod}, {}, [key])
            LOG.info("volume %s deleted", volume["id"])
            return volume
        raise InvalidState(f"volume {ref} kept changing while it was deleted; try again")

    # -- attach and detach -----------------------------------------------------------------------

    def attach(self, ref: str, instance: str) -> VolumeView:
        """Ask the instance's host to attach the volume (it does so while the instance is ACTIVE
        or STOPPED); refused where it cannot go."""
        ops, store = self.ops, self.ops.store
        for _ in range(TRIES):
            volume, vrev = self.resolve(ref)
            uuid = ops.resolve(instance)
            request, rrev, status = store.read_request(uuid)
            if request is None or not ops._mine(request):
                raise UnknownInstance(f"no instance {instance!r:.80}")
            self._check_attach(volume, request, status)
            holder = store.holder(volume["instance"])
            state = contract.volume_state(volume, holder.request, holder.status)
            if state != VolumeState.AVAILABLE:
                where = f" (instance {volume['instance']})" if volume["instance"] else ""
                raise InvalidState(f"volume {volume['id']} is {state}{where}: it is attached to one instance "
                                   "at a time")
            ref_: VolumeRef = {"id": volume["id"], "image": volume["image"], "pool": volume["pool"]}
            new = Request(**request)
            new["volumes"] = [*contract.volume_refs(request), ref_]
            new["updated_at"] = contract.now()
            vkey = contract.volume_key(store.prefix, volume["id"])
            rkey = contract.request_key(store.prefix, request["host"], uuid)
            moved = Volume(**{**volume, "instance": uuid, "updated_at": contract.now()})
            if store.commit({**holder.revs, vkey: vrev.mod, rkey: rrev.mod}, {rkey: new, vkey: moved}):
                LOG.info("volume %s to be attached to %s", volume["id"], uuid)
                return _view(moved, store.holder(uuid))
        raise InvalidState(f"volume {ref} or its instance kept changing; try again")

    def _check_attach(self, volume: Volume, request: Request, status: Status | None) -> None:
        uuid = request["uuid"]
        if volume["project_id"] != request["project_id"]:
            raise InvalidState(f"volume {volume['id']} is of project {volume['project_id']}, instance {uuid} of "
                               f"project {request['project_id']}")
        if volume["state"] != VolumeState.AVAILABLE:
            raise InvalidState(f"volume {volume['id']} is {volume['state']}")
        state = status["state"] if status else Actual.PENDING
        if request["desired"] == Desired.DELETED or state not in (Actual.ACTIVE, Actual.STOPPED):
            raise InvalidState(f"cannot attach a volume to instance {uuid} while it is {state}"
                               + (" (being deleted)" if request["desired"] == Desired.DELETED else "")
                               + ": only ACTIVE or STOPPED")
        refs = contract.volume_refs(request)
        if len(refs) >= contract.MAX_VOLUMES:
            raise InvalidState(f"instance {uuid} has {len(refs)} volumes, the most one may have")
        host = self.ops.store.host_record(request["host"])
        pool = host.get("pool") if host else None
        if pool is None and volume["pool"] in request["allocations"]:
            pool = volume["pool"]  # its disk is in the pool: its host is one of the pool's (an older record)
        if pool != volume["pool"]:
            where = "keeps its disks on itself" if not pool else "uses another Ceph pool"
            raise InvalidState(f"instance {uuid} is on host {request['host']}, which {where}: volume "
                               f"{volume['id']} (pool {volume['pool_name']}) can only go to an instance on a host "
                               "of its pool")

    def detach(self, ref: str) -> VolumeView:
        """Ask the volume's instance's host to detach it; it is available once the host has."""
        store = self.ops.store
        for _ in range(TRIES):
            volume, _ = self.resolve(ref)
            uuid = volume["instance"]
            request, rrev, _status = store.read_request(uuid) if uuid else (None, None, None)
            refs = contract.volume_refs(request) if request else []
            if request is None or rrev is None or not any(v["id"] == volume["id"] for v in refs):
                raise InvalidState(f"volume {volume['id']} is not attached"
                                   + (" (its instance is detaching it)" if request else ""))
            new = Request(**request)
            new["volumes"] = [v for v in refs if v["id"] != volume["id"]]
            new["updated_at"] = contract.now()
            rkey = contract.request_key(store.prefix, request["host"], request["uuid"])
            if store.commit({rkey: rrev.mod}, {rkey: new}):
                LOG.info("volume %s to be detached from %s", volume["id"], uuid)
                return _view(volume, store.holder(uuid))
        raise InvalidState(f"volume {ref}'s instance kept changing; try again")

    def wait(self, volume_id: str, wanted: VolumeState, timeout: float | None = None) -> VolumeView:
        """Until the volume is `wanted` (its host attached or detached it); WaitFailed on timeout."""
        from etcd_compute.errors import WaitFailed
        deadline = time.monotonic() + (timeout or self.ops.cfg.wait_timeout)
        while True:
            view = self.show(volume_id)
            if view["state"] == wanted:
                return view
            if time.monotonic() > deadline:
                why = ""
                if view["instance"]:
                    status = self.ops.store.get_instance(view["instance"])[1]
                    why = f"; its instance says: {status.get('reason')}" if status and status.get("reason") else ""
                raise WaitFailed(f"timed out waiting for volume {volume_id} to be {wanted} (it is "
                                 f"{view['state']}{why})")
            time.sleep(WAIT_POLL)
