"""eschedule's operations: every command is one method here; the CLI and the API server only
parse, authorize and print.

An Operations acts for one project (`project`; schedule.yaml's project_id by default). A
`scoped` one (an API member's token, `eschedule --project`) sees and acts only on that
project's instances: another project's instance is UnknownInstance, never its data.

Quotas (contract.Quota) are checked against Placement's usage of the project twice: before
claiming (refuse early, nothing claimed) and again after (the claim counted): two schedules
racing for the last room both pass the first check, and the second sees both claims, so
the limit is never exceeded; near the limit a racer may be refused although the other
one's claim is freed again a moment later (Nova's quota "recheck" behaves alike).

The order of a schedule is what keeps capacity honest: etcd is checked first (fail
before claiming anything), then an allocation is claimed (claims.py), then the
request is written in one transaction; if writing fails for any reason (etcd gone,
Ctrl-C, SIGTERM) the claim is deleted again, so no allocation is left without a request.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from etcd_compute import contract
from etcd_compute.config import ScheduleConfig
from etcd_compute.contract import BadRecord, Boot, Request, Status, View
from etcd_compute.errors import (
    ECError,
    InvalidState,
    QuotaExceeded,
    Unauthenticated,
    UnknownInstance,
    UsageError,
    WaitFailed,
)
from etcd_compute.eschedule import inputs
from etcd_compute.states import Actual, Command, Desired, Role, settled
from etcd_compute.store import Store

if TYPE_CHECKING:  # claims and the Placement client load requests: only the commands that call Placement pay
    from etcd_compute.placement import PlacementClient

LOG = logging.getLogger(__name__)
WAIT_POLL = 0.5  # seconds between a wait's checks when its watch brings no change
TOKEN = re.compile(r"ect_([0-9a-f]{12})_[A-Za-z0-9_-]{43}")


class _Clients:
    """The etcd and Placement clients, made on first use (so the API server starts, and answers
    503, while etcd or Placement is down) and shared by every Operations acting_for() made from
    one: the API server's callers all use the server's two connections."""

    def __init__(self, cfg: ScheduleConfig, placement: PlacementClient | None, store: Store | None) -> None:
        self.cfg = cfg
        self._lock = threading.Lock()
        self._placement, self._store = placement, store

    @property
    def placement(self) -> PlacementClient:
        with self._lock:
            if self._placement is None:
                from etcd_compute.placement import PlacementClient
                self._placement = PlacementClient(self.cfg.placement)
            return self._placement

    @property
    def store(self) -> Store:
        with self._lock:
            if self._store is None:
                self._store = Store(self.cfg.etcd)
            return self._store

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()


class Operations:
    """eschedule's commands on one etcd prefix and one Placement; clients made when first used."""

    def __init__(self, cfg: ScheduleConfig, placement: PlacementClient | None = None,
                 store: Store | None = None, *, project: str | None = None, scoped: bool = False) -> None:
        self.cfg = cfg
        self._clients = _Clients(cfg, placement, store)
        self.project = inputs.check_project(project) if project is not None else cfg.project_id
        self.scoped = scoped

    def acting_for(self, project: str, scoped: bool) -> Operations:
        """The same operations for `project` (seeing only it if `scoped`), on the same clients."""
        ops = Operations(self.cfg, project=project, scoped=scoped)
        ops._clients = self._clients
        return ops

    @property
    def placement(self) -> PlacementClient:
        return self._clients.placement

    @property
    def store(self) -> Store:
        return self._clients.store

    def close(self) -> None:
        """Close the etcd connection, if one was made (it is shared with acting_for()'s)."""
        self._clients.close()

    def schedule(self, query: str | None = None, image: str | None = None, *, flavor: str | None = None,
                 name: str | None = None, group: str | None = None, image_sha256: str | None = None,
                 ssh_keys: list[str] | None = None, user_data: str | None = None, kernel: str | None = None,
                 initrd: str | None = None, cmdline: str | None = None,
                 config_drive: bool = True) -> Request:
        """Claim and request one instance, sized by `query` or `flavor`, called `name` (unique in
        its project), a member of server group `group`. `ssh_keys` and `user_data` are contents
        (the CLI reads its files first); schedule.yaml's files serve when none are given.
        `config_drive` False: the guest gets its data from the metadata server alone (as a
        stock OpenStack image expects)."""
        from etcd_compute.eschedule import catalog, claims, shortfall
        from etcd_compute.eschedule.groups import Rule, ref
        cfg = self.cfg
        name = inputs.check_name(name) if name is not None else None
        query = self._query_of(query, flavor, "schedule")
        params = claims.parse_query(query, self.cfg.limit)
        ssh_keys, user_data = self._guest_data(ssh_keys, user_data)
        url, sha256, boot, image_name = self._image(image or cfg.default_image, inputs.sha256(image_sha256),
                                                    default=not image)
        boot = self._boot({"kernel": kernel, "initrd": initrd, "cmdline": cmdline} if kernel or initrd or cmdline
                          else boot)
        store = self.store  # etcd must be reachable before anything is claimed
        if name and (owner := store.named(self.project, name)):
            raise UsageError(f"instance name {name} is taken in project {self.project} (by {owner})")
        rule, group_rev = None, 0
        if group is not None:
            found, rev = catalog.find_group(self, group)
            rule, group_rev = Rule(ref(found), store.members(found["id"])), rev.create
        limits = self.limits()
        wanted = {contract.INSTANCES: 1, **claims.requested(params)}
        self._check_quota(limits, wanted)
        uuid = str(uuidlib.uuid4())
        made: list[Request] = []

        from etcd_compute.eschedule.cephpool import ceph_pool, is_snapshot
        pool = ceph_pool(cfg, "images that are snapshots")[0] if url and is_snapshot(url) else None

        def write(allocations: contract.Allocations, host: str) -> bool:
            """The request, in etcd with its name and group membership; False (its claim given
            back) when its group's rule no longer allows `host`, or its image is a snapshot in
            Ceph and `host` is not of its pool (its disk would not come from the pool)."""
            if pool is not None and pool not in allocations:
                claims.unclaim(self.placement, uuid)
                return False
            request = contract.new_request(uuid, host, allocations, url, query, self.project, cfg.user_id,
                                           image_sha256=sha256, boot=boot, ssh_keys=ssh_keys, user_data=user_data,
                                           name=name, flavor=flavor, image_name=image_name,
                                           group=rule.group if rule else None,
                                           config_drive=config_drive)
            try:
                self._check_quota(limits, {}, " (counting this claim: a concurrent request took the room)")
                if store.create_instance(request, group_rev):
                    made.append(request)
                    return True
                taken = store.taken(request)
                if taken == "uuid":
                    raise ECError(f"instance {uuid} already exists in etcd")
                if taken == "name":
                    raise UsageError(f"instance name {name} is taken in project {self.project} (meanwhile)")
                assert rule is not None and group is not None
                now = store.group(self.project, group)
                if now is None or now[1].create != group_rev:
                    raise UsageError(f"server group {group} was deleted meanwhile")
                rule.members = store.members(rule.group["id"])  # a member got there first: look again
            except BaseException:
                claims.unclaim(self.placement, uuid)
                raise
            claims.unclaim(self.placement, uuid)
            return False

        claims.claim(self.placement, uuid, params, claims.liveness(store), self._new_claim, self.cfg.shards,
                     store.pools() if self.cfg.shards > 1 else None, rule=rule, accept=write,
                     explain=lambda ruled: shortfall.explain(self.placement, store, params, ruled))
        request = made[0]
        LOG.info("instance %s of project %s requested on host %s", uuid, self.project, request["host"])
        return request

    def fits(self, query: str | None, flavor: str | None = None) -> dict[str, Any]:
        """How many more instances of `query` (or `flavor`) fit now: {"fits": n, "hosts": {host: n}}.
        Claims nothing: one GET /allocation_candidates, read as shortfall.count() says."""
        from etcd_compute.eschedule import claims, shortfall
        params = claims.parse_query(self._query_of(query, flavor, "--count"), self.cfg.limit)
        return shortfall.count(self.placement, self.store, params)

    def _query_of(self, query: str | None, flavor: str | None, what: str) -> str:
        """The query to place: the one given, or `flavor`'s; one of the two, never both."""
        from etcd_compute.eschedule import catalog
        if flavor is not None:
            if query:
                raise UsageError("give a query or --flavor, not both")
            return catalog.flavor_query(catalog.flavor(self, flavor))
        if not query:
            raise UsageError(f"{what} needs a query ('resources=VCPU:1,MEMORY_MB:256,...') or --flavor NAME")
        return query

    def _guest_data(self, ssh_keys: list[str] | None, user_data: str | None) -> tuple[list[str], str | None]:
        """The keys and user-data given (contents), checked, else schedule.yaml's files'."""
        given = ssh_keys or self.cfg.ssh_keys
        if len(given) > contract.MAX_SSH_KEYS:
            raise UsageError(f"{len(given)} ssh keys given; at most {contract.MAX_SSH_KEYS} are accepted")
        if ssh_keys:
            keys = [inputs.check_key(k, f"ssh key {i + 1}") for i, k in enumerate(ssh_keys)]
        else:
            keys = [inputs.read_key(p) for p in self.cfg.ssh_keys]
        if user_data is not None:
            return keys, inputs.check_text(user_data, "user-data", contract.MAX_USER_DATA)
        return keys, inputs.read_user_data(self.cfg.user_data)

    @staticmethod
    def _boot(boot: Boot | None) -> Boot | None:
        """A direct kernel boot with its references checked; None without a kernel or initrd."""
        if boot is None or not (boot["kernel"] or boot["initrd"]):
            return None
        return {"kernel": inputs.image_ref(boot["kernel"]), "initrd": inputs.image_ref(boot["initrd"]),
                "cmdline": boot["cmdline"]}

    def _image(self, ref: str | None, sha256: str | None, default: bool = False
               ) -> tuple[str | None, str | None, Boot | None, str | None]:
        """(url, sha256, boot, catalogue name) of an IMAGE (`default`: schedule.yaml's): a catalogue
        entry (of the project or public) by name or alias, else a URL or path as it is. A pin that
        contradicts the catalogue's is refused."""
        from etcd_compute.eschedule import catalog
        if not ref:
            return None, sha256, None, None
        found = catalog.find_image(self, ref)
        if found is None:
            if inputs.LABEL.fullmatch(ref) and "." not in ref and not Path(ref).exists():
                how = (f"add one ('eschedule image add NAME URL --public --alias {ref}') or set default_image in "
                       "schedule.yaml" if default else "an image outside it is an http(s):// or file:// URL or a path")
                raise catalog.UnknownName(f"no image {ref!r} in the catalogue ('eschedule image list'): {how}")
            return inputs.image_ref(ref), sha256, None, None
        entry = found[0]
        if sha256 is not None and sha256 != entry["sha256"]:
            raise UsageError(f"--image-sha256 {sha256} contradicts image {entry['name']}'s {entry['sha256']}")
        return entry["url"], entry["sha256"] or None, entry.get("boot"), entry["name"]  # (a snapshot pins none)

    def _new_claim(self, uuid: str, allocations: contract.Allocations) -> None:
        self.placement.claim(uuid, allocations, self.project, self.cfg.user_id)

    # -- quotas ------------------------------------------------------------------------------

    def limits(self, project: str | None = None) -> dict[str, int]:
        """A project's limits ({}: unlimited); a malformed record limits nothing, loudly."""
        project = project or self.project
        try:
            quota, _ = self.store.get_quota(project)
        except BadRecord as exc:
            LOG.warning("the quota of project %s is malformed (%s): not enforced", project, exc)
            return {}
        return quota["limits"] if quota else {}

    def _check_quota(self, limits: dict[str, int], wanted: dict[str, int], why: str = "") -> None:
        if not limits:
            return
        usage = self.placement.project_usage(self.project)
        for name, limit in sorted(limits.items()):
            used, more = usage.get(name, 0), wanted.get(name, 0)
            if used + more > limit:
                asked = f", {more} more asked" if more else ""
                raise QuotaExceeded(f"quota of project {self.project} exceeded: {name} limit {limit}, "
                                    f"{used} in use{asked}{why}")

    def usage(self, project: str | None = None) -> contract.Usage:
        """A project's usage (Placement's) beside its limits."""
        project = project or self.project
        return contract.Usage(project=project, usage=self.placement.project_usage(project),
                              limits=self.limits(project))

    def set_quota(self, project: str, changes: dict[str, int | None]) -> contract.Quota:
        """Set (an int) or lift (None) limits of a project; the others stay."""
        from etcd_compute.eschedule import claims
        project = inputs.check_project(project)
        for name, value in changes.items():
            if name not in contract.COUNTED and not claims.RESOURCE_CLASS.fullmatch(name) and value is None:
                raise UsageError(f"quota {name!r}: neither 'instances', 'volumes' nor a resource class "
                                 "(VCPU, MEMORY_MB, ...)")
            if value is not None and not 0 <= value <= contract.MAX_AMOUNT:
                raise UsageError(f"quota {name}: a limit is a whole number from 0 to {contract.MAX_AMOUNT}")
        from etcd_compute.eschedule import catalog
        catalog.check_classes(self, [n for n, v in changes.items() if v is not None], "quota")

        def change(limits: dict[str, int]) -> dict[str, int]:
            for name, value in changes.items():
                if value is None:
                    limits.pop(name, None)
                else:
                    limits[name] = value
            return limits

        return self.store.update_quota(project, change)

    # -- API tokens ---------------------------------------------------------------------------

    def create_token(self, project: str, role: Role, name: str = "") -> tuple[str, contract.Token]:
        """A new bearer token of `project` with `role`: (the token, shown only now; its record,
        which keeps only the token's hash)."""
        project = inputs.check_project(project)
        if len(name) > 200:
            raise UsageError("a token's name is at most 200 characters")
        while True:
            token_id = secrets.token_hex(6)
            token = f"ect_{token_id}_{secrets.token_urlsafe(32)}"
            record = contract.Token(id=token_id, sha256=hashlib.sha256(token.encode()).hexdigest(), project=project,
                                    role=str(role), name=name, created_at=contract.now())
            if self.store.create_token(record):
                return token, record

    def tokens(self) -> list[contract.Token]:
        return [t for t in self.store.list_tokens() if not self.scoped or t["project"] == self.project]

    def revoke_token(self, token_id: str) -> contract.Token:
        found = next((t for t in self.tokens() if t["id"] == token_id), None)
        if found is None or not self.store.delete_token(token_id):
            raise UnknownInstance(f"no token {token_id}")
        return found

    def authenticate(self, token: str) -> contract.Token:
        """The record of a presented token; Unauthenticated if it is unknown, revoked or malformed."""
        match = TOKEN.fullmatch(token or "")
        record = self.store.get_token(match.group(1)) if match else None
        if record is None or not hmac.compare_digest(record["sha256"], hashlib.sha256(token.encode()).hexdigest()):
            raise Unauthenticated("missing, unknown or revoked token")
        return record

    # -- reading and acting on instances ------------------------------------------------------

    def _mine(self, request: Request | None) -> bool:
        return not self.scoped or (request is not None and request.get("project_id") == self.project)

    def resolve(self, ref: str) -> str:
        """The uuid of the instance `ref` names: its uuid, its name (in the acting project; for an
        operator who sees every project, in whichever project has it; PROJECT/NAME says which) or
        a unique prefix of its uuid. UnknownInstance if none, UsageError listing them if several."""
        if not isinstance(ref, str) or not ref:
            raise UsageError("no instance given")
        if contract.looks_like_uuid(ref):
            return str(uuidlib.UUID(ref))
        project, _, name = ref.rpartition("/")
        if project:
            if self.scoped and project != self.project:
                raise UnknownInstance(f"no instance {ref!r:.80}")
            found = self.store.named(inputs.check_project(project), inputs.check_name(name))
            if found is None:
                raise UnknownInstance(f"no instance {ref!r:.80}")
            return found
        is_name, is_prefix = bool(inputs.NAME.fullmatch(ref)), bool(inputs.UUID_PREFIX.fullmatch(ref))
        if not is_name and not is_prefix:
            raise UsageError(f"not an instance uuid, uuid prefix or name: {ref!r:.80}")
        found = self._by_name(ref) if is_name else None
        if found is not None:
            return found
        matches = self._prefixed(ref) if is_prefix else []
        if len(matches) == 1:
            return matches[0][0]
        if matches:
            shown = ", ".join(f"{u} ({n})" if n else u for u, n in matches[:10])
            raise UsageError(f"{ref!r} starts {len(matches)} instances' uuids: {shown}; give more of it")
        raise UnknownInstance(f"no instance {ref!r:.80}" + (f" in project {self.project}" if self.scoped else ""))

    def _by_name(self, name: str) -> str | None:
        """The instance called `name` in the acting project; for an operator who sees every
        project, in the one project that has it (UsageError if several do)."""
        found = self.store.named(self.project, name)
        if found is not None or self.scoped:
            return found
        named = sorted((p, u) for p, n, u in self.store.names() if n == name)
        if len(named) > 1:
            raise UsageError(f"several projects have an instance {name}: "
                             + ", ".join(f"{p}/{name} ({u})" for p, u in named[:10]) + "; say PROJECT/NAME")
        return named[0][1] if named else None

    def _prefixed(self, prefix: str) -> list[tuple[str, str | None]]:
        """(uuid, name) of the instances whose uuid starts with `prefix` that this caller may see."""
        found = []
        for uuid, entry in sorted(self.store.index().items()):
            if not uuid.startswith(prefix):
                continue
            project = entry.get("project")
            if self.scoped and project is None:  # an index older than its project: ask its request
                try:
                    request = self.store.read_request(uuid)[0]
                except BadRecord:
                    request = None
                project = request.get("project_id") if request else None
            if not self.scoped or project == self.project:
                found.append((uuid, entry.get("name")))
        return found

    def resolve_host(self, ref: str) -> str:
        """The uuid of the host `ref` names: its uuid, or its name (its ecompute's `name`, which is
        its resource provider's name). UnknownInstance ("no host") if none."""
        if contract.looks_like_uuid(ref):
            return str(uuidlib.UUID(ref))
        found = sorted(u for u, record in self.store.hosts().items() if record.get("name") == ref)
        if not found and inputs.LABEL.fullmatch(ref):
            found = [rp["uuid"] for rp in self.placement.request(
                "GET", "/resource_providers", params={"name": ref}).json()["resource_providers"]]
        if len(found) > 1:
            raise UsageError(f"several hosts are called {ref}: {', '.join(found)}; give its uuid")
        if not found:
            raise UnknownInstance(f"no host {ref!r:.80}")
        return found[0]

    def host_names(self) -> dict[str, str]:
        """Host uuid -> the name its ecompute gave it (people know hosts by name)."""
        return {uuid: str(record.get("name") or uuid) for uuid, record in self.store.hosts().items()}

    def show(self, ref: str) -> View:
        uuid = self.resolve(ref)
        try:
            request, status = self.store.get_instance(uuid)
        except BadRecord as exc:
            if self.scoped:
                raise UnknownInstance(f"no instance {uuid}") from None
            return contract.bad_view(uuid, None, str(exc), self.store.alive_hosts())
        if request is None and status is None or not self._mine(request):
            raise UnknownInstance(f"no instance {uuid}")
        return self._dated([contract.view(request, status, self.store.alive_hosts())], "eschedule show")[0]

    def _dated(self, views: list[View], by: str) -> list[View]:
        """`views` with host_down_since filled in where the host is DOWN (recording since when, if
        nobody had yet: Store.down_since)."""
        down = {v["host"] for v in views if v["host_state"] == "DOWN" and v["host"]}
        since = self.store.down_since(down, by) if down else {}
        names = self.host_names() if views else {}
        for v in views:
            v["host_down_since"] = since.get(v["host"] or "") if v["host_state"] == "DOWN" else None
            v["host_name"] = names.get(v["host"] or "", v["host"])
        return views

    def _update(self, uuid: str, change: Callable[[Request, Status | None], Request | None]) -> Request:
        try:
            request = self.store.update_request(uuid, change)
        except BadRecord as exc:
            raise InvalidState(f"the record of {uuid} in etcd is malformed ({exc}); "
                               f"'eschedule destroy --force {uuid}' removes it") from None
        if request is None:
            raise UnknownInstance(f"no instance {uuid}")
        return request

    def act(self, command: Command, ref: str, *, stop_timeout: float | None = None, force: bool = False) -> Request:
        """start | stop | suspend | resume | reboot: change the requested state, or refuse. A stop
        or reboot says how the guest goes down (contract.Shutdown): `stop_timeout` seconds of
        clean shutdown (None: the host's stop_timeout), or at once with `force`."""
        shutdown = self._shutdown(command, stop_timeout, force)  # bad input is refused before any read
        uuid = self.resolve(ref)

        def change(request: Request, status: Status | None) -> Request | None:
            if not self._mine(request):
                raise UnknownInstance(f"no instance {uuid}")
            new = contract.commanded(command, request, status, shutdown)
            if isinstance(new, str):
                raise InvalidState(f"cannot {command} {uuid}: {new}")
            return new

        return self._update(uuid, change)

    @staticmethod
    def _shutdown(command: Command, stop_timeout: float | None, force: bool) -> contract.Shutdown | None:
        """What a stop or reboot says of the guest's shutdown (None for the other commands);
        UsageError for a timeout out of range, with --force, or on another command."""
        if command not in (Command.STOP, Command.REBOOT):
            if stop_timeout is not None or force:
                raise UsageError(f"a shutdown timeout and --force go with stop and reboot, not {command}")
            return None
        if stop_timeout is not None and not 0 < stop_timeout <= contract.MAX_STOP_TIMEOUT:
            raise UsageError(f"the shutdown timeout must be more than 0 and at most "
                             f"{contract.MAX_STOP_TIMEOUT:g} seconds, got {stop_timeout:g}")
        if force and stop_timeout is not None:
            raise UsageError("--force powers the guest off at once: it takes no shutdown timeout")
        return contract.Shutdown(timeout=stop_timeout, force=force)

    def destroy(self, ref: str, force: bool = False) -> tuple[str, str]:
        """Ask the host to destroy the instance; (uuid, host). `force`, for a host that is DOWN
        (or a record too malformed to read): free the allocation and drop the keys here; the
        host removes the domain if it ever returns."""
        uuid = self.resolve(ref)
        alive = self.store.alive_hosts() if force else set()

        def change(request: Request, status: Status | None) -> Request | None:
            if not self._mine(request):
                raise UnknownInstance(f"no instance {uuid}")
            if force and request["host"] in alive:  # refuse before anything is written
                raise InvalidState(f"host {request['host']} is UP: it destroys {uuid} itself (no --force)")
            if request["desired"] == Desired.DELETED:
                return None
            new = Request(**request)
            new["desired"] = Desired.DELETED
            return new

        try:
            request = self._update(uuid, change)
        except (InvalidState, UnknownInstance):
            if not force or self.scoped or self._readable(uuid) and self.store.is_known(uuid):
                raise
            request = None  # a record too malformed to read (or with no index): forget it below
        if not force and request is not None:
            return uuid, request["host"]
        self.placement.delete_allocations(uuid)
        host = self.store.forget_instance(uuid)
        if host is None:
            raise UnknownInstance(f"no instance {uuid}")
        return uuid, host

    def _readable(self, uuid: str) -> bool:
        try:
            self.store.get_instance(uuid)
            return True
        except BadRecord:
            return False

    def instances(self, host: str | None = None, state: str | None = None) -> list[View]:
        """The instances this caller sees, on one host (by name or uuid) or in one state if given."""
        if state is not None and state.upper() not in set(Actual):
            raise UsageError(f"no state {state!r:.40}: one of {', '.join(Actual)}")
        host = self.resolve_host(host) if host is not None else None
        views = [v for v in self.store.list_instances(self.store.alive_hosts())
                 if (not self.scoped or v["project_id"] == self.project) and (host is None or v["host"] == host)
                 and (state is None or v["state"] == state.upper())]
        return self._dated(views, "eschedule list")

    def hosts(self) -> list[dict[str, Any]]:
        """Placement's providers with their state (DOWN ones since when: a host of this prefix
        that nobody had recorded DOWN yet is recorded now), capacity and usage."""
        records = self.store.hosts()
        alive = self.store.alive_hosts()
        providers = self.placement.providers()
        since = self.store.down_since({rp["uuid"] for rp in providers} - alive, "eschedule hosts", records)
        out = []
        for rp in providers:
            inventory = self.placement.inventories(rp["uuid"])
            usages = self.placement.usages(rp["uuid"])
            record = records.get(rp["uuid"])
            out.append({
                "uuid": rp["uuid"], "name": rp["name"], "state": "UP" if rp["uuid"] in alive else "DOWN",
                "locked": bool(record and record.get("state") == "locked"), "down_since": since.get(rp["uuid"]),
                "capacity": {rc: int((i["total"] - i["reserved"]) * i["allocation_ratio"])
                             for rc, i in inventory.items()},
                "used": usages,
            })
        return out

    def wait(self, uuid: str, done: Callable[[View | None], bool], timeout: float | None = None,
             seen: Callable[[View], None] | None = None) -> View | None:
        """Until done(view, or None once gone) holds; WaitFailed on timeout.

        A watch on the instance's actual state (its host writes it when anything happens to
        the instance) wakes the check at once; it is also made every WAIT_POLL seconds, so a
        change the watch misses (made before its stream is set up, or during a failover) only
        delays it."""
        deadline = time.monotonic() + (timeout or self.cfg.wait_timeout)
        changed = threading.Event()
        watch = self.store.watch(contract.instance_key(self.store.prefix, uuid), 0,
                                 lambda _key, _rev: changed.set(), lambda _state: changed.set())
        try:
            while True:
                changed.clear()  # before reading: a change from here on wakes the next wait
                request, status = self.store.get_instance(uuid)
                view = contract.view(request, status, self.store.alive_hosts()) if (request or status) else None
                if view is not None and seen is not None:
                    seen(view)
                if done(view):
                    return view
                left = deadline - time.monotonic()
                if left < 0:
                    state = view["state"] if view else "gone"
                    raise WaitFailed(f"timed out waiting for instance {uuid} (state {state})")
                changed.wait(min(WAIT_POLL, left))
        finally:
            watch.stop()

    def console(self, uuid: str) -> contract.Console | None:
        """The tail of the instance's serial console (its current boot) as its host last published
        it (None: not yet); UnknownInstance if there is no such instance."""
        uuid = self._console_of(uuid)
        console = self.store.get_console(uuid)
        if console is None and not self.scoped and not self.store.is_known(uuid):
            raise UnknownInstance(f"no instance {uuid}")
        return console

    def console_boots(self, uuid: str, boot: int | None = None) -> list[contract.ConsoleBoot]:
        """The head and tail of each boot of the instance's console its host keeps, oldest first
        (`boot`: that one alone; UnknownInstance if it has no record of it)."""
        uuid = self._console_of(uuid)
        boots = self.store.console_boots(uuid)
        if not boots and not self.scoped and not self.store.is_known(uuid):
            raise UnknownInstance(f"no instance {uuid}")
        if boot is None:
            return boots
        found = [b for b in boots if b["boot"] == boot]
        if not found:
            kept = ", ".join(str(b["boot"]) for b in boots) or "none yet"
            raise UnknownInstance(f"instance {uuid} has no console of boot {boot} (kept: {kept})")
        return found

    def _console_of(self, uuid: str) -> str:
        """`uuid` (or a name, or a uuid prefix) resolved; a scoped caller's must be its project's
        (another project's, or one whose request cannot be read: UnknownInstance)."""
        uuid = self.resolve(uuid)
        if self.scoped:  # another project's, or one whose request cannot be read: UnknownInstance
            try:
                request = self.store.read_request(uuid)[0]
            except BadRecord:
                request = None
            if request is None or not self._mine(request):
                raise UnknownInstance(f"no instance {uuid}")
        return uuid

    # -- waiting for the host (the CLI's and the API's --wait) --------------------------------

    def wait_settled(self, uuid: str, timeout: float | None, seen: Callable[[View], None] | None = None,
                     ready: bool = False) -> View:
        """Until a new instance is ACTIVE (with its address, where its host gives one) or ERROR;
        `ready`: until its guest also said it has booted (`--wait=ready`; the status's ready_at)."""
        def done(v: View | None) -> bool:
            if v is None or v["state"] == Actual.ERROR:
                return True
            return v["state"] == Actual.ACTIVE and not self._booting(v, ready)

        view = self.wait(uuid, done, timeout, seen)
        if view is None:
            raise WaitFailed(f"instance {uuid} was deleted while waiting")
        if view["state"] == Actual.ERROR:
            raise WaitFailed(f"instance {uuid} failed: {view['reason']}")
        self.check_addressed(view)
        return view

    def _booting(self, view: View, ready: bool) -> bool:
        """Is an ACTIVE instance not done yet for a wait that asks for `ready`: its guest has not
        said it booted, while it has the address it will be reached at (if its host gives one)?"""
        return ready and not view["ready_at"] and self.unaddressed(view) is None

    def wait_ready(self, uuid: str, timeout: float | None) -> View:
        """Until the instance's guest has said its current boot finished (ready_at): for `eschedule
        ssh`. WaitFailed if it is not running, or will not be (ERROR, gone)."""
        view = self.wait(uuid, lambda v: v is None or v["state"] in (Actual.ERROR, Actual.CRASHED, Actual.STOPPED)
                         or (v["state"] == Actual.ACTIVE and v["ready_at"] is not None), timeout)
        if view is None or view["state"] != Actual.ACTIVE:
            raise WaitFailed(f"instance {uuid} is {view['state'] if view else 'gone'}: no guest to reach")
        self.check_addressed(view)
        return view

    def wait_acted(self, command: Command, request: Request, timeout: float | None,
                   seen: Callable[[View], None] | None = None, ready: bool = False) -> View:
        """Until the host has carried out `command` (its request is `request`); by default for
        wait_timeout, and a stop or reboot that asked for a longer clean shutdown that on top.
        `ready` (start, resume, reboot): until the guest has also said it booted."""
        self.check_ready_wait(command, ready)
        uuid, target = request["uuid"], settled(command)
        if timeout is None and command in (Command.STOP, Command.REBOOT):
            timeout = self.cfg.wait_timeout + (contract.shutdown_of(request)[0] or 0.0)

        def done(v: View | None) -> bool:
            if v is None or v["state"] == Actual.ERROR:
                return True
            return v["state"] == target and not self._booting(v, ready) and (
                command != Command.REBOOT or self.reboots_done(uuid) >= request.get("reboot", 0))

        view = self.wait(uuid, done, timeout, seen)
        if view is None or view["state"] != target:
            raise WaitFailed(f"instance {uuid} is {view['state'] if view else 'gone'}, not {target}")
        self.check_addressed(view)
        return view

    @staticmethod
    def check_ready_wait(command: Command, ready: bool) -> None:
        """UsageError for a wait for ready after a command that leaves no guest running."""
        if ready and settled(command) != Actual.ACTIVE:
            raise UsageError(f"--wait=ready goes with schedule, start, resume and reboot, not {command}")

    def wait_gone(self, uuid: str, timeout: float | None) -> None:
        self.wait(uuid, lambda v: v is None, timeout)

    def check_addressed(self, view: View) -> None:
        if why := self.unaddressed(view):
            raise WaitFailed(f"instance {view['uuid']} {why}")

    def unaddressed(self, view: View) -> str | None:
        """Why an ACTIVE instance is not done, or None: on a host whose guests have a NIC, an
        instance is done when it runs with an IP address (instances without a NIC: when it runs)."""
        if view["state"] != Actual.ACTIVE or view["ip"] or view["host"] is None:
            return None
        record = self.store.hosts().get(view["host"])
        network = record.get("network") if record else None
        return f"runs but has no IP address on {network} ({view['reason'] or 'none seen yet'})" if network else None

    def reboots_done(self, uuid: str) -> int:
        """How many reboots the host has carried out (the status's counter)."""
        status = self.store.get_instance(uuid)[1]
        return status.get("reboots", 0) if status else 0
