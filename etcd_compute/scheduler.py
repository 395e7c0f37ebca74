"""eschedule's logic: Placement picks and claims a host, etcd carries the request to it.

The order is what keeps capacity honest: etcd is checked first (fail before
claiming anything), then an allocation is claimed, then the request is written in
one transaction; if writing fails for any reason (etcd gone, Ctrl-C, SIGTERM) the
claim is deleted again, so no allocation is left without a request.
"""

from __future__ import annotations

import logging
import random
import re
import time
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qsl

from etcd_compute import cloudinit, images, layout
from etcd_compute.config import ScheduleConfig
from etcd_compute.errors import (ECError, InvalidState, NoCapacity, PlacementError,
                                 UnknownInstance, UsageError, WaitFailed)
from etcd_compute.placement import CONCURRENT_UPDATE, PlacementClient
from etcd_compute.store import Store

LOG = logging.getLogger(__name__)

RESOURCES_KEY = re.compile(r"^resources[a-zA-Z0-9_-]{0,64}$")
RESOURCE_CLASS = re.compile(r"^[A-Z][A-Z0-9_]*$")
MAX_AMOUNT = 2**31 - 1


def parse_query(query: str, limit: int) -> list[tuple[str, str]]:
    """Validate the resources part of an allocation-candidates query; pass the rest through.

    Placement validates everything else (traits, member_of, ...) and its 400 is
    shown to the user; we check `resources` ourselves because a typo there would
    otherwise read as "no capacity".
    """
    if not query or "=" not in query:
        raise UsageError(f"malformed query {query!r}: expected e.g. 'resources=VCPU:1,MEMORY_MB:256'")
    try:
        params = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError as exc:
        raise UsageError(f"malformed query {query!r}: {exc}") from None
    groups = [(k, v) for k, v in params if RESOURCES_KEY.match(k)]
    if not groups:
        raise UsageError(f"malformed query {query!r}: no resources=CLASS:AMOUNT,... part")
    for key, value in groups:
        seen = set()
        for item in value.split(","):
            rc, sep, amount = item.partition(":")
            if not sep or not RESOURCE_CLASS.match(rc):
                raise UsageError(f"malformed query: {key}={value!r}: {item!r} is not CLASS:AMOUNT")
            if rc in seen:
                raise UsageError(f"malformed query: {key}={value!r}: {rc} given twice")
            seen.add(rc)
            if not amount.isdigit() or not 1 <= int(amount) <= MAX_AMOUNT:
                raise UsageError(f"malformed query: {key}={value!r}: amount of {rc} must be "
                                 f"a whole number from 1 to {MAX_AMOUNT}, got {amount!r}")
    limits = [v for k, v in params if k == "limit"]
    if not limits:
        params.append(("limit", str(limit)))
    elif not all(v.isdigit() and int(v) > 0 for v in limits):
        raise UsageError(f"malformed query: limit must be a positive number, got {limits[0]!r}")
    return params


def check_uuid(value: str) -> str:
    try:
        return str(uuidlib.UUID(value))
    except ValueError:
        raise UsageError(f"not an instance uuid: {value!r}") from None


def host_of(allocations: dict, summaries: dict) -> str:
    """The compute host of an allocation request: the root of the provider giving VCPU/RAM."""
    def root(rp: str) -> str:
        return summaries.get(rp, {}).get("root_provider_uuid") or rp
    compute = [rp for rp, a in allocations.items() if {"VCPU", "MEMORY_MB"} & set(a["resources"])]
    return root(sorted(compute or allocations)[0])


class Scheduler:
    def __init__(self, cfg: ScheduleConfig, placement: PlacementClient | None = None,
                 store: Store | None = None) -> None:
        self.cfg = cfg
        self._placement = placement
        self._store = store

    @property
    def placement(self) -> PlacementClient:
        if self._placement is None:
            self._placement = PlacementClient(self.cfg.placement)
        return self._placement

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.cfg.etcd)
        return self._store

    def schedule(self, query: str, image: str | None = None, *, image_sha256: str | None = None,
                 keys: tuple[str, ...] = (), user_data: str | None = None, kernel: str | None = None,
                 initrd: str | None = None, cmdline: str | None = None) -> dict:
        """Claim and request one instance; file arguments are paths read here, on this machine."""
        params = parse_query(query, self.cfg.limit)
        cfg = self.cfg
        extra = {
            "image_sha256": _sha256(image_sha256),
            "ssh_keys": [_read_key(p) for p in (keys or cfg.ssh_keys)],
            "user_data": _read_user_data(user_data or cfg.user_data),
        }
        kernel, initrd = kernel or cfg.kernel, initrd or cfg.initrd
        if kernel or initrd:
            extra["boot"] = {"kernel": _image_ref(kernel), "initrd": _image_ref(initrd),
                             "cmdline": cmdline or cfg.cmdline}
        image = _image_ref(image or cfg.default_image)
        store = self.store  # etcd must be reachable before anything is claimed
        uuid = str(uuidlib.uuid4())
        allocations, host = self._claim(uuid, params, self._liveness())
        request = layout.new_request(uuid, host, allocations, image, query, cfg.project_id, cfg.user_id,
                                     **extra)
        try:
            if not store.create_instance(request):
                raise ECError(f"instance {uuid} already exists in etcd")
        except BaseException:
            self._unclaim(uuid)
            raise
        LOG.info("instance %s requested on host %s", uuid, host)
        return request

    def _liveness(self) -> Callable[[str], bool]:
        """is_up(host), reading only the hosts asked about (once each): a large cloud's
        schedule must not pay for every host's alive key."""
        seen: dict[str, bool] = {}

        def is_up(host: str) -> bool:
            if host not in seen:
                seen[host] = self.store.is_alive(host)
            return seen[host]
        return is_up

    def _claim(self, uuid: str, params: list[tuple[str, str]], is_up: Callable[[str], bool],
               claim: Callable[[str, dict], None] | None = None) -> tuple[dict, str]:
        """Claim the first candidate on a live host that still fits; re-ask Placement when all
        were taken. Hosts whose ecompute lease lapsed (DOWN) are never chosen."""
        down: set[str] = set()
        for _ in range(6):
            try:
                found = self.placement.allocation_candidates(params)
            except PlacementError as exc:
                if exc.status == 400:
                    raise UsageError(f"query rejected by Placement: {exc.args[0].split(': ', 1)[-1]}") from None
                raise
            summaries = found["provider_summaries"]
            candidates = found["allocation_requests"]
            if not candidates:
                break
            live = 0
            for candidate in candidates:
                allocations = candidate["allocations"]
                host = host_of(allocations, summaries)
                if not is_up(host):
                    down.add(host)
                    continue
                live += 1
                if self._try_claim(uuid, allocations, claim):
                    return allocations, host
            if not live and not _widen_limit(params, len(candidates)):
                break  # every candidate there is sits on a host that is down
        extra = f" ({len(down)} candidate hosts are down)" if down else ""
        raise NoCapacity(f"no capacity for {_query_text(params)}{extra}")

    def _try_claim(self, uuid: str, allocations: dict, claim: Callable[[str, dict], None] | None) -> bool:
        for attempt in range(8):
            try:
                if claim:
                    claim(uuid, allocations)
                else:
                    self.placement.claim(uuid, allocations, self.cfg.project_id, self.cfg.user_id)
                return True
            except PlacementError as exc:
                if exc.status == 400 and "does not exist" in str(exc):
                    return False  # the provider went away since the candidates were listed
                if exc.status != 409:
                    raise
                if exc.code != CONCURRENT_UPDATE:
                    return False  # it no longer fits: try the next candidate
                time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))  # a racer bumped the generation
        return False

    def _unclaim(self, uuid: str) -> None:
        try:
            self.placement.delete_allocations(uuid)
        except ECError as exc:
            LOG.error("could not free the allocation of %s after a failed write: %s "
                      "(run 'eschedule audit --fix' later)", uuid, exc)

    def show(self, uuid: str) -> dict:
        uuid = check_uuid(uuid)
        request, status = self.store.get_instance(uuid)
        if request is None and status is None:
            raise UnknownInstance(f"no instance {uuid}")
        return layout.view(request, status, self.store.alive_hosts())

    def act(self, action: str, uuid: str) -> dict:
        """start | stop | suspend | resume | reboot: change the requested state, or refuse."""
        uuid = check_uuid(uuid)

        def change(request: dict, status: dict | None) -> dict | None:
            reason = layout.refusal(action, request, status)
            if reason:
                raise InvalidState(f"cannot {action} {uuid}: {reason}")
            if action == "reboot":
                return dict(request, reboot=request.get("reboot", 0) + 1)
            desired = layout.ACTIONS[action]
            return None if request["desired"] == desired else dict(request, desired=desired)

        request = self.store.update_request(uuid, change)
        if request is None:
            raise UnknownInstance(f"no instance {uuid}")
        return request

    def destroy(self, uuid: str, force: bool = False) -> dict:
        """Ask the host to destroy the instance. `force`, for a host that is DOWN: free the
        allocation and drop the keys here; the host removes the domain if it ever returns."""
        uuid = check_uuid(uuid)
        alive = self.store.alive_hosts() if force else set()

        def change(request: dict, status: dict | None) -> dict | None:
            if force and request["host"] in alive:  # refuse before anything is written
                raise InvalidState(f"host {request['host']} is UP: it destroys {uuid} itself (no --force)")
            return None if request["desired"] == layout.DELETED_REQ else dict(request, desired=layout.DELETED_REQ)

        request = self.store.update_request(uuid, change)
        if request is None:
            raise UnknownInstance(f"no instance {uuid}")
        if force:
            self.placement.delete_allocations(uuid)
            self.store.finish_delete(request["host"], uuid)
        return request

    def evacuate(self, host: str, force: bool = False) -> list[dict]:
        """Rebuild a dead host's instances elsewhere: each gets a new claim (its allocation moves
        in Placement, same consumer), and its request moves to the new host's key."""
        host = check_uuid(host)
        if host in self.store.alive_hosts() and not force:
            raise InvalidState(f"host {host} is UP; evacuate only hosts that are down (or --force)")
        requests, _ = self.store.host_requests(host)
        moved = []
        for request in requests.values():
            if request["desired"] == layout.DELETED_REQ:
                self.placement.delete_allocations(request["uuid"])  # finish the delete for it
                self.store.finish_delete(host, request["uuid"])
                continue
            is_up = self._liveness()
            params = parse_query(request["query"], self.cfg.limit)
            try:
                allocations, new_host = self._claim(request["uuid"], params, lambda h: h != host and is_up(h),
                                                    claim=lambda u, a: (
                    self.placement.move(u, a, request["project_id"], request["user_id"])))
            except NoCapacity as exc:
                moved.append({"uuid": request["uuid"], "from": host, "to": None, "error": str(exc)})
                continue
            new = dict(request, allocations=allocations)
            if self.store.move_instance(new, new_host):
                moved.append({"uuid": request["uuid"], "from": host, "to": new_host, "error": None})
        return moved

    def auto_evacuate(self, grace: float, interval: float = 2.0, rounds: int | None = None) -> None:
        """Evacuate every host that has been DOWN for `grace` seconds, forever (or `rounds`)."""
        down_since: dict[str, float] = {}
        while rounds is None or rounds > 0:
            alive = self.store.alive_hosts()
            hosts = {k for k in self.store.hosts()} | {r["host"] for r in self.store.list_instances()}
            now = time.monotonic()
            for host in hosts:
                if host in alive:
                    down_since.pop(host, None)
                    continue
                since = down_since.setdefault(host, now)
                if now - since >= grace and self.store.host_requests(host)[0]:
                    for m in self.evacuate(host):
                        LOG.warning("evacuated %s from %s to %s %s", m["uuid"], m["from"], m["to"], m["error"] or "")
            if rounds is not None:
                rounds -= 1
            time.sleep(interval)

    def audit(self, fix: bool = False, grace: float = 5.0) -> list[dict]:
        """Allocations of our project in Placement that no instance in etcd owns. A claim whose
        request is still being written looks the same for a moment, so a finding must still
        hold after `grace` seconds."""
        def orphans() -> dict[str, dict]:
            known = self.store.known_instances()
            found = {}
            for rp in self.placement.providers():
                for consumer, alloc in self.placement.provider_allocations(rp["uuid"]).items():
                    if consumer not in known:
                        found[consumer] = {"consumer": consumer, "provider": rp["uuid"],
                                           "resources": alloc["resources"]}
            return found

        first = orphans()
        if first and grace:
            time.sleep(grace)
        findings = [f for c, f in orphans().items() if c in first]
        findings = [f for f in findings
                    if self.placement.consumer(f["consumer"]).get("project_id") == self.cfg.project_id]
        if fix:
            for f in findings:
                self.placement.delete_allocations(f["consumer"])
        return findings

    def list(self) -> list[dict]:
        return self.store.list_instances(self.store.alive_hosts())

    def hosts(self) -> list[dict]:
        records = self.store.hosts()
        alive = self.store.alive_hosts()
        out = []
        for rp in self.placement.providers():
            inventory = self.placement.inventories(rp["uuid"])
            usages = self.placement.usages(rp["uuid"])
            record = records.get(rp["uuid"], {})
            out.append({
                "uuid": rp["uuid"], "name": rp["name"], "state": "UP" if rp["uuid"] in alive else "DOWN",
                "locked": record.get("state") == "locked",
                "capacity": {rc: int((i["total"] - i["reserved"]) * i["allocation_ratio"])
                             for rc, i in inventory.items()},
                "used": usages,
            })
        return out

    def wait(self, uuid: str, done: Callable[[dict | None], bool], timeout: float | None = None) -> dict | None:
        """Poll until done(view or None-if-gone) holds; raise WaitFailed on timeout."""
        deadline = time.monotonic() + (timeout or self.cfg.wait_timeout)
        while True:
            request, status = self.store.get_instance(uuid)
            view = layout.view(request, status, self.store.alive_hosts()) if (request or status) else None
            if done(view):
                return view
            if time.monotonic() > deadline:
                state = view["state"] if view else "gone"
                raise WaitFailed(f"timed out waiting for instance {uuid} (state {state})")
            time.sleep(0.1)


def _image_ref(ref: str | None) -> str | None:
    """An image reference as the compute host will read it (a relative path made absolute)."""
    if not ref:
        return None
    if "://" not in ref and not ref.startswith("/"):
        ref = str(Path(ref).resolve())
    try:
        images.check_scheme(ref)
    except images.ImageError as exc:
        raise UsageError(str(exc)) from None
    return ref


def _sha256(value: str | None) -> str | None:
    if value is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise UsageError(f"--image-sha256 must be 64 hex digits, got {value!r}")
    return value.lower() if value else None


def _read_text(path: str, what: str, limit: int) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{what} {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise UsageError(f"{what} {path} is {len(data)} bytes; at most {limit} are accepted")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise UsageError(f"{what} {path} is not UTF-8 text") from None


def _read_key(path: str) -> str:
    key = _read_text(path, "ssh key", 16 * 1024).strip()
    if not re.match(r"^(ssh-(rsa|ed25519|dss)|ecdsa-sha2-|sk-)\S* \S+", key) or "\n" in key:
        raise UsageError(f"ssh key {path} is not one OpenSSH public key line (ssh-ed25519 AAAA... comment)")
    return key


def _read_user_data(path: str | None) -> str | None:
    return _read_text(path, "user-data", cloudinit.MAX_USER_DATA) if path else None


def _widen_limit(params: list[tuple[str, str]], returned: int) -> bool:
    """When a full page of candidates was all on DOWN hosts, ask for 4x as many (in place)."""
    for i, (key, value) in enumerate(params):
        if key == "limit" and returned >= int(value) and int(value) < 10000:
            params[i] = ("limit", str(min(int(value) * 4, 10000)))
            return True
    return False


def _query_text(params: list[tuple[str, str]]) -> str:
    return "&".join(f"{k}={v}" for k, v in params if k != "limit")
