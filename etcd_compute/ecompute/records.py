"""The host's reads and writes of an instance's records: its request as this host sees it, its
actual state, and its allocation in Placement.

Every write here depends on a read and compares against it: the status is written only while
the request read (at its create revision, `owner`) is still this host's, and a delete only
while the request is the one read (Store.put_status, Store.finish_delete). An allocation
Placement would not free is remembered and freed again at each resync; the state is written
first, so a host that dies in between leaks an allocation, never overcommits.
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Protocol

from etcd_compute import contract
from etcd_compute.contract import BadRecord, DomainRecord, Request, Status, looks_like_uuid
from etcd_compute.ecompute import reconciler
from etcd_compute.ecompute.hooks import MetricsHooks
from etcd_compute.errors import ECError
from etcd_compute.states import Actual
from etcd_compute.store import Rev, Store

LOG = logging.getLogger("ecompute")


class Placement(Protocol):
    def delete_allocations(self, consumer: str) -> object: ...


class Read(NamedTuple):
    """An instance as read: its request on this host (None: none, or malformed) and the
    revisions of its key, its status and the status's mod revision."""

    request: Request | None
    rev: Rev
    status: Status | None
    status_mod: int


class Recorded(NamedTuple):
    done: bool  # False: a delete waits for Placement to free the allocation
    deleted: bool  # the instance's keys are gone


class Records:
    def __init__(self, host: str, store: Store, placement: Placement, metrics: MetricsHooks) -> None:
        self.host, self.store, self.placement, self.metrics = host, store, placement, metrics
        self.bad_seen: set[str] = set()
        self.unfreed: set[str] = set()  # ERROR instances whose allocation Placement did not free yet

    def read(self, uuid: str) -> Read:
        """The request of `uuid` on this host and where it was read, and its status. A malformed
        request reads as None with its key's revision (reported here; nothing acts on it)."""
        try:
            request, rev = self.store.get_request(self.host, uuid)
        except BadRecord as exc:  # the key is there (rev) but says nothing we can act on
            request, rev = None, self.store.request_rev(self.host, uuid)
            self.report_bad(uuid, rev, str(exc))
        status, status_mod = self.store.get_status(uuid)
        self.metrics.seen(uuid, rev.create != 0, request, status)
        return Read(request, rev, status, status_mod)

    def report_bad(self, uuid: str, rev: Rev, why: str) -> None:
        """A request nobody can act on: say so in its status (if its key names an instance)."""
        if uuid not in self.bad_seen:
            LOG.warning("request %s is malformed, skipping it: %s", uuid, why)
            self.bad_seen.add(uuid)
        if looks_like_uuid(uuid):
            status, _ = self.store.get_status(uuid)
            self.put_status(uuid, Actual.ERROR, status, rev, reason=f"malformed request: {why}")

    def record(self, uuid: str, done: reconciler.Report, status: Status | None, rev: Rev,
               status_mod: int) -> Recorded:
        """Carry out what a report says to record."""
        deleted = False
        if done.delete:
            if not self.free_allocation(uuid):
                self.put_status(uuid, Actual.DELETING, status, rev,
                                reason="waiting for Placement to free the allocation")
                return Recorded(False, False)
            if self.store.finish_delete(self.host, uuid, rev):
                LOG.info("instance %s deleted", uuid)
                self.metrics.forget(uuid)
                deleted = True
        elif done.state is not None:
            self.put_status(uuid, done.state, status, rev, reason=done.reason, domain=done.domain, ip=done.ip,
                            reboots=done.reboots, event=done.event, held=done.held, crashes=done.crashes,
                            booted_at=done.booted_at, volumes=done.volumes)
        if done.free and not self.free_allocation(uuid):
            self.unfreed.add(uuid)  # after the state: a daemon that dies between leaks, never overcommits
        if done.drop_status:
            self.store.drop_status(uuid, status_mod)
        return Recorded(True, deleted)

    def free_unfreed(self) -> None:
        """Free again the allocations Placement would not free before."""
        for uuid in sorted(self.unfreed):
            if self.free_allocation(uuid):
                self.unfreed.discard(uuid)

    def free_allocation(self, uuid: str) -> bool:
        try:
            self.placement.delete_allocations(uuid)
            return True
        except ECError as exc:
            LOG.warning("could not free allocation of %s: %s (will retry)", uuid, exc)
            return False

    def put_status(self, uuid: str, state: Actual, old: Status | None, owner: Rev, *, reason: str | None = None,
                   domain: DomainRecord | None = None, ip: str | None = None, reboots: int | None = None,
                   event: str | None = None, held: int | None = None, crashes: int | None = None,
                   booted_at: str | None = None, ready_at: str | None = None,
                   volumes: list[str] | None = None) -> bool:
        """Write the actual state, unless it would only repeat what is there; only while the
        request read at `owner` is still this host's. False if it no longer is."""
        changes = (domain, ip, reboots, event, held, crashes, booted_at, ready_at) != (None,) * 8
        if volumes is not None and volumes != (old.get("volumes") or [] if old else []):
            changes = True
        if old and old["state"] == state and old.get("reason") == reason and not changes:
            return True
        written = self.store.put_status(contract.new_status(uuid, self.host, state, reason=reason, domain=domain,
                                                            ip=ip, old=old, reboots=reboots, event=event,
                                                            held=held, crashes=crashes, booted_at=booted_at,
                                                            ready_at=ready_at, volumes=volumes), owner)
        if written:
            self.metrics.recorded(uuid, state)
        return written
