"""The project's etcd reads, writes and transactions, on the keys of contract.py.

Both sides use it: eschedule writes requests, ecompute writes actual state. Every
write that depends on something read compares, in its transaction, against the
revision that was read (contract.py states the rule); a write that lost the race
returns False and its caller reads again and decides again. Values that are not what
the contract says are reported (BadRecord, or as ERROR views), never crash a reader.
Connection, login, failover and the watch live in etcd.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from etcd_compute import contract
from etcd_compute.config import EtcdConfig
from etcd_compute.contract import BadRecord, DownRecord, HostRecord, Request, Status, View
from etcd_compute.etcd import Etcd, PrefixWatch, guarded
from etcd_compute.states import Actual

LOG = logging.getLogger(__name__)


class Rev(NamedTuple):
    """Where a value was read: its mod_revision and create_revision (0, 0: no such key).

    mod changes with every write; create only when the key is deleted and made anew, so
    a request's create revision names one incarnation of an instance on one host.
    """

    mod: int = 0
    create: int = 0


NO_KEY = Rev()
# An instance is read from its index, then its host's key: an evacuation between the two moves it
# away. Read again while the index moved, this often (a move per read would be a busy cloud indeed).
MOVES_READ = 5


@dataclass
class HostRequests:
    """Every request under one host's key, as read at one store revision."""

    revision: int
    requests: dict[str, Request] = field(default_factory=dict)
    revs: dict[str, Rev] = field(default_factory=dict)
    bad: dict[str, str] = field(default_factory=dict)  # uuid (from the key) -> what is wrong


@dataclass
class Holder:
    """The instance a volume was last attached to, as read (store.holder)."""

    request: Request | None
    status: Status | None
    revs: dict[str, int]  # key -> mod revision read (0: absent)


def _rev(meta: Any) -> Rev:
    return Rev(meta.mod_revision, meta.create_revision) if meta is not None else NO_KEY


class Store:
    """An etcd client bound to one prefix (see contract.py)."""

    def __init__(self, cfg: EtcdConfig) -> None:
        self.cfg = cfg
        self.prefix = cfg.prefix.rstrip("/")
        self.etcd = Etcd(cfg)

    @property
    def client(self) -> Any:
        """The etcd3 client of the endpoint in use (it changes on failover)."""
        return self.etcd.client

    @property
    def tx(self) -> Any:
        return self.etcd.client.transactions

    def close(self) -> None:
        self.etcd.close()

    def _raw(self, key: str) -> tuple[bytes | None, Rev]:
        value, meta = self.client.get(key)
        return value, _rev(meta)

    def _index_host(self, uuid: str) -> str | None:
        raw, _ = self._raw(contract.index_key(self.prefix, uuid))
        try:
            index = contract.decode(raw)
        except ValueError:
            return None
        host = index.get("host") if index else None
        return host if isinstance(host, str) else None

    def _located(self, uuid: str) -> tuple[str | None, bytes | None, Rev]:
        """The host its index names, and the instance's request there (raw) and where it was read.
        An evacuation between the two reads moves it away: read again where it went."""
        for _ in range(MOVES_READ):
            host = self._index_host(uuid)
            if not host:
                return None, None, NO_KEY
            raw, rev = self._raw(contract.request_key(self.prefix, host, uuid))
            if raw is not None or self._index_host(uuid) == host:
                break
        return host, raw, rev

    # -- eschedule's side -------------------------------------------------------------------

    @guarded
    def create_instance(self, request: Request, group_created: int = 0) -> bool:
        """Write request + index, its name and its server group membership in one transaction;
        False if the uuid or the name is taken in its project, or its group's hard rule does not
        allow its host now, or the group is not the one whose create revision was `group_created`
        (deleted, or made anew): see taken() for which."""
        uuid, host = request["uuid"], request["host"]
        index = contract.index_key(self.prefix, uuid)
        compare = [self.tx.create(index) == 0]
        success = [self.tx.put(index, contract.encode(self._index_value(request))),
                   self.tx.put(contract.request_key(self.prefix, host, uuid), contract.encode(request))]
        name = request.get("name")
        if name:
            key = contract.name_key(self.prefix, request["project_id"], name)
            compare.append(self.tx.create(key) == 0)
            success.append(self.tx.put(key, contract.encode(
                {"uuid": uuid, "project": request["project_id"], "name": name})))
        group = request.get("group")
        if group:
            compare.append(self.tx.create(contract.group_key(self.prefix, request["project_id"], group["name"]))
                           == group_created)
            compare += self._rule(group, host)
            success.append(self._member(group, host, uuid))
        ok, _ = self.client.transaction(compare=compare, success=success, failure=[])
        return bool(ok)

    @staticmethod
    def _index_value(request: Request) -> dict[str, Any]:
        return {"host": request["host"], "project": request.get("project_id"), "name": request.get("name")}

    def _member(self, group: contract.GroupRef, host: str, uuid: str) -> Any:
        return self.tx.put(contract.placed_key(self.prefix, group["id"], host, uuid),
                           contract.encode({"uuid": uuid, "host": host, "group": group["id"]}))

    def _empty(self, start: str, end: str) -> Any:
        """A compare that holds while no key lies in [start, end)."""
        return self.tx.version(start, range_end=end) == 0

    def _rule(self, group: contract.GroupRef, host: str, moving_from: str | None = None) -> list[Any]:
        """The compares that make a hard rule hold for a member put on `host`: anti-affinity, no
        member there yet; affinity, no member on any other host (but `moving_from`, the host an
        evacuation takes it from). A soft rule compares nothing."""
        if group.get("soft"):
            return []
        if group["policy"] == "anti-affinity":
            here = contract.placed_prefix(self.prefix, group["id"], host)
            return [self._empty(here, contract.prefix_end(here))]
        whole = contract.placed_prefix(self.prefix, group["id"])
        compares, start = [], whole
        for allowed in sorted({host} | ({moving_from} if moving_from else set())):
            mine = contract.placed_prefix(self.prefix, group["id"], allowed)
            compares.append(self._empty(start, mine))
            start = contract.prefix_end(mine)
        return [*compares, self._empty(start, contract.prefix_end(whole))]

    @guarded
    def taken(self, request: Request) -> str:
        """Why create_instance() refused `request`: "uuid", "name", or "group"."""
        if self._raw(contract.index_key(self.prefix, request["uuid"]))[1].mod:
            return "uuid"
        name = request.get("name")
        if name and self._raw(contract.name_key(self.prefix, request["project_id"], name))[1].mod:
            return "name"
        return "group"

    @guarded
    def get_instance(self, uuid: str) -> tuple[Request | None, Status | None]:
        """(request, actual status) of one instance; (None, None) if unknown; BadRecord if
        either is malformed."""
        _, raw, _ = self._located(uuid)
        status = contract.parse_status(self._raw(contract.instance_key(self.prefix, uuid))[0], uuid)
        request = contract.parse_request(raw, uuid)
        return request, status

    @guarded
    def read_request(self, uuid: str) -> tuple[Request | None, Rev, Status | None]:
        """The request of an instance wherever it lives, where it was read, and its status."""
        host, raw, rev = self._located(uuid)
        if not host:
            return None, NO_KEY, None
        request = contract.parse_request(raw, uuid)
        try:
            status = contract.parse_status(self._raw(contract.instance_key(self.prefix, uuid))[0], uuid)
        except BadRecord:
            status = None  # the host rewrites it; the request is what a user acts on
        return request, rev, status

    @guarded
    def update_request(self, uuid: str, change: Callable[[Request, Status | None], Request | None]) -> Request | None:
        """Compare-and-swap the request: change(request, status) returns the new request, or
        None for "nothing to do", or raises to refuse. None if the instance is unknown."""
        while True:
            request, rev, status = self.read_request(uuid)
            if request is None:
                return None
            new = change(request, status)
            if new is None:
                return request
            new = Request(**new)
            new["updated_at"] = contract.now()
            key = contract.request_key(self.prefix, request["host"], uuid)
            ok, _ = self.client.transaction(
                compare=[self.tx.mod(key) == rev.mod],
                success=[self.tx.put(key, contract.encode(new))], failure=[])
            if ok:
                return new

    @guarded
    def move_instance(self, request: Request, rev: Rev, new_host: str, down: tuple[DownRecord, Rev] | None) -> bool:
        """Evacuate an instance to another host in one transaction: its request moves (saying so in
        its `evacuated`), its index follows, and the old host's actual state is dropped (the new
        host reports afresh). Only if the request is still exactly what was read at `rev` and the
        old host is still DOWN, the same DOWN as read (`down`: its DOWN record and where it was
        read): no alive key, that record unchanged. `down` None: forced, neither is compared."""
        uuid, old_host = request["uuid"], request["host"]
        if rev.mod == 0 or (down is not None and down[1].mod == 0):
            return False  # a missing key compares equal to 0: never move what was not there
        old_key = contract.request_key(self.prefix, old_host, uuid)
        moved = Request(**request)
        moved["host"], moved["updated_at"] = new_host, contract.now()
        moved["evacuated"] = {"at": moved["updated_at"], "from": old_host, "forced": down is None,
                              "down_since": down[0]["since"] if down else None}
        fenced = [] if down is None else [self.tx.version(contract.alive_key(self.prefix, old_host)) == 0,
                                          self.tx.mod(contract.down_key(self.prefix, old_host)) == down[1].mod]
        group = request.get("group")
        membership = [] if not group else [
            self.tx.delete(contract.placed_key(self.prefix, group["id"], old_host, uuid)),
            self._member(group, new_host, uuid)]
        ok, _ = self.client.transaction(
            compare=[self.tx.mod(old_key) == rev.mod, *fenced,
                     *(self._rule(group, new_host, moving_from=old_host) if group else [])],
            success=[self.tx.delete(old_key),
                     self.tx.put(contract.request_key(self.prefix, new_host, uuid), contract.encode(moved)),
                     self.tx.put(contract.index_key(self.prefix, uuid), contract.encode(self._index_value(moved))),
                     self.tx.delete(contract.instance_key(self.prefix, uuid)),
                     self.tx.delete(contract.console_key(self.prefix, uuid)), self._delete_boots(uuid), *membership],
            failure=[])
        return bool(ok)

    def _delete_boots(self, uuid: str) -> Any:
        """The transaction step that removes every boot record of an instance's console."""
        head = contract.console_boots_prefix(self.prefix, uuid)
        return self.tx.delete(head, range_end=head[:-1] + chr(ord(head[-1]) + 1))

    @guarded
    def forget_instance(self, uuid: str) -> str | None:
        """Remove every key of an instance, whatever they hold (destroy --force of a DOWN host,
        or of records too malformed to read); the host it was on, or None if unknown."""
        host = self._index_host(uuid)
        if host is None:
            for _value, meta in self.client.get_prefix(contract.requests_prefix(self.prefix), keys_only=True):
                key = meta.key.decode()
                if key.endswith("/" + uuid):
                    host = key.rsplit("/", 2)[1]
                    break
        if host is None:
            return None
        key = contract.request_key(self.prefix, host, uuid)
        self.client.transaction(
            compare=[],
            success=[self.tx.delete(key),
                     self.tx.delete(contract.instance_key(self.prefix, uuid)),
                     self.tx.delete(contract.console_key(self.prefix, uuid)), self._delete_boots(uuid),
                     self.tx.delete(contract.index_key(self.prefix, uuid)),
                     *self._owned(self._raw(key)[0], host, uuid)],
            failure=[])
        return host

    def _owned(self, raw: bytes | None, host: str, uuid: str) -> list[Any]:
        """Deletes of the keys an instance's request owns beside its own: its name and its group
        membership. Read leniently: a record too malformed to name them owns none that can be found."""
        try:
            request = contract.decode(raw) or {}
        except (ValueError, UnicodeDecodeError):
            return []
        ops = []
        name, project, group = request.get("name"), request.get("project_id"), request.get("group")
        if isinstance(name, str) and name and isinstance(project, str):
            ops.append(self.tx.delete(contract.name_key(self.prefix, project, name)))
        if isinstance(group, dict) and isinstance(group.get("id"), str):
            ops.append(self.tx.delete(contract.placed_key(self.prefix, group["id"], host, uuid)))
        return ops

    @guarded
    def is_known(self, uuid: str) -> bool:
        """Does the instance have an index key (one read, where known_instances() lists them all)?"""
        return self._raw(contract.index_key(self.prefix, uuid))[1].mod != 0

    @guarded
    def known_instances(self) -> set[str]:
        return {meta.key.decode().rsplit("/", 1)[1]
                for _, meta in self.client.get_prefix(self.prefix + "/index/", keys_only=True)}

    @guarded
    def list_instances(self, alive: set[str] | None = None) -> list[View]:
        """All instances, requested and actual joined (contract.view), with host_state if `alive`.
        A malformed record shows as an ERROR view saying what is wrong with it."""
        requests: dict[str, Request] = {}
        statuses: dict[str, Status] = {}
        bad: dict[str, tuple[str | None, str]] = {}
        for value, meta in self.client.get_prefix(self.prefix + "/requests/"):
            host, uuid = meta.key.decode().rsplit("/", 2)[1:]
            try:
                requests[uuid] = contract.parse_request(value, uuid)  # type: ignore[assignment]
            except BadRecord as exc:
                bad[uuid] = (host, str(exc))
        for value, meta in self.client.get_prefix(self.prefix + "/instances/"):
            uuid = meta.key.decode().rsplit("/", 1)[1]
            try:
                statuses[uuid] = contract.parse_status(value, uuid)  # type: ignore[assignment]
            except BadRecord as exc:
                bad.setdefault(uuid, (None, str(exc)))

        def created(uuid: str) -> str:
            request = requests.get(uuid)
            return request["created_at"] if request else ""

        uuids = sorted((set(requests) | set(statuses)) - set(bad), key=created)
        views = [contract.view(requests.get(u), statuses.get(u), alive) for u in uuids]
        return views + [contract.bad_view(u, host, why, alive) for u, (host, why) in sorted(bad.items())]

    def _records(self, kind: str, parse: Callable[[bytes], Any]) -> Iterator[tuple[str, Any]]:
        """(key, value) of every record under PREFIX/<kind>/ that `parse` reads; one it refuses
        (a ValueError, such as BadRecord) is logged and passed over."""
        for value, meta in self.client.get_prefix(f"{self.prefix}/{kind}/"):
            key = meta.key.decode()
            try:
                found = parse(value)
            except ValueError as exc:
                LOG.warning("ignoring malformed record %s: %s", key, exc)
                continue
            if found is not None:
                yield key, found

    @guarded
    def hosts(self) -> dict[str, HostRecord]:
        return {rec["uuid"]: rec for _, rec in self._records("hosts", contract.decode)
                if isinstance(rec.get("uuid"), str)}

    # -- tokens and quotas (eschedule and the API server) --------------------------------------

    @guarded
    def create_token(self, token: contract.Token) -> bool:
        """Store a new token record; False if its id is taken."""
        key = contract.token_key(self.prefix, token["id"])
        ok, _ = self.client.transaction(compare=[self.tx.create(key) == 0],
                                        success=[self.tx.put(key, contract.encode(token))], failure=[])
        return bool(ok)

    @guarded
    def get_token(self, token_id: str) -> contract.Token | None:
        """The token record of `token_id`; None if there is none or it is malformed (no access)."""
        try:
            return contract.parse_token(self._raw(contract.token_key(self.prefix, token_id))[0])
        except BadRecord as exc:
            LOG.warning("token %s: %s", token_id, exc)
            return None

    @guarded
    def list_tokens(self) -> list[contract.Token]:
        return sorted((token for _, token in self._records("tokens", contract.parse_token)),
                      key=lambda t: t.get("created_at", ""))

    @guarded
    def delete_token(self, token_id: str) -> bool:
        return bool(self.client.delete(contract.token_key(self.prefix, token_id)))

    @guarded
    def get_quota(self, project: str) -> tuple[contract.Quota | None, Rev]:
        """A project's quota and where it was read; BadRecord if malformed."""
        raw, rev = self._raw(contract.quota_key(self.prefix, project))
        return contract.parse_quota(raw), rev

    @guarded
    def update_quota(self, project: str, change: Callable[[dict[str, int]], dict[str, int]]) -> contract.Quota:
        """Compare-and-swap a project's limits: change(limits) returns the new ones (none left:
        the record is deleted). A malformed record is replaced."""
        key = contract.quota_key(self.prefix, project)
        while True:
            raw, rev = self._raw(key)
            try:
                quota = contract.parse_quota(raw)
            except BadRecord:
                quota = None
            limits = change(dict(quota["limits"]) if quota else {})
            new = contract.Quota(project=project, limits=limits, updated_at=contract.now())
            ops = [self.tx.put(key, contract.encode(new))] if limits else [self.tx.delete(key)]
            ok, _ = self.client.transaction(compare=[self.tx.mod(key) == rev.mod], success=ops, failure=[])
            if ok:
                return new

    # -- names, flavors, images and server groups (eschedule and the API server) ----------------

    @guarded
    def index(self) -> dict[str, dict[str, Any]]:
        """Every instance's index entry (where its request lives, whose it is), by uuid."""
        found = {}
        for value, meta in self.client.get_prefix(self.prefix + "/index/"):
            try:
                entry = contract.decode(value) or {}
            except (ValueError, UnicodeDecodeError):
                entry = {}
            found[meta.key.decode().rsplit("/", 1)[1]] = entry
        return found

    @guarded
    def named(self, project: str, name: str) -> str | None:
        """The uuid of the instance called `name` in `project`, or None."""
        try:
            found = contract.decode(self._raw(contract.name_key(self.prefix, project, name))[0])
        except (ValueError, UnicodeDecodeError):
            return None
        uuid = found.get("uuid") if found else None
        return uuid if isinstance(uuid, str) else None

    @guarded
    def names(self) -> list[tuple[str, str, str]]:
        """(project, name, uuid) of every named instance."""
        found = []
        for key, value in self._records("names", contract.decode):
            project, name = key.rsplit("/", 2)[1:]
            if isinstance(value.get("uuid"), str):
                found.append((project, name, value["uuid"]))
        return found

    def _create(self, values: dict[str, Any]) -> bool:
        """Put every key of `values` in one transaction, only if none of them exists."""
        ok, _ = self.client.transaction(compare=[self.tx.create(k) == 0 for k in values],
                                        success=[self.tx.put(k, contract.encode(v)) for k, v in values.items()],
                                        failure=[])
        return bool(ok)

    @guarded
    def create_flavor(self, flavor: contract.Flavor) -> bool:
        """Store a new flavor; False if its name is taken."""
        return self._create({contract.flavor_key(self.prefix, flavor["name"]): flavor})

    @guarded
    def flavor(self, name: str) -> contract.Flavor | None:
        """A flavor by name; BadRecord if malformed."""
        return contract.parse_flavor(self._raw(contract.flavor_key(self.prefix, name))[0])

    @guarded
    def flavors(self) -> list[contract.Flavor]:
        return sorted((f for _, f in self._records("flavors", contract.parse_flavor)), key=lambda f: f["name"])

    @guarded
    def delete_flavor(self, name: str) -> bool:
        return bool(self.client.delete(contract.flavor_key(self.prefix, name)))

    @guarded
    def create_image(self, image: contract.Image) -> bool:
        """Store a catalogue entry and its aliases at once; False if any of those names is taken
        in its scope."""
        values: dict[str, Any] = {contract.image_key(self.prefix, image["scope"], image["name"]): image}
        for alias in image["aliases"]:
            values[contract.image_key(self.prefix, image["scope"], alias)] = {
                "name": alias, "scope": image["scope"], "alias_of": image["name"]}
        return self._create(values)

    @guarded
    def image(self, scope: str, name: str) -> tuple[contract.Image, Rev] | None:
        """The entry called `name` (or aliased so) in `scope` and where it was read; None if there
        is none; BadRecord if malformed."""
        raw, rev = self._raw(contract.image_key(self.prefix, scope, name))
        try:
            found = contract.decode(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRecord(f"image {name} is not a JSON object ({exc})") from None
        if found is not None and isinstance(found.get("alias_of"), str) and found["alias_of"] != name:
            raw, rev = self._raw(contract.image_key(self.prefix, scope, found["alias_of"]))
        image = contract.parse_image(raw)
        return (image, rev) if image else None

    @guarded
    def images(self) -> list[contract.Image]:
        """Every catalogue entry (aliases are in their entry's `aliases`), by scope and name."""
        def entry(raw: bytes) -> contract.Image | None:
            value = contract.decode(raw)
            return None if value is None or "alias_of" in value else contract.parse_image(raw)
        return sorted((i for _, i in self._records("images", entry)), key=lambda i: (i["scope"], i["name"]))

    @guarded
    def delete_image(self, image: contract.Image, rev: Rev) -> bool:
        """Remove an entry and its aliases, if the entry is still what was read at `rev`."""
        keys = [contract.image_key(self.prefix, image["scope"], n) for n in [image["name"], *image["aliases"]]]
        ok, _ = self.client.transaction(compare=[self.tx.mod(keys[0]) == rev.mod],
                                        success=[self.tx.delete(k) for k in keys], failure=[])
        return bool(ok)

    @guarded
    def create_group(self, group: contract.Group) -> bool:
        return self._create({contract.group_key(self.prefix, group["project"], group["name"]): group})

    @guarded
    def group(self, project: str, name: str) -> tuple[contract.Group, Rev] | None:
        """A server group and where it was read; None if none; BadRecord if malformed."""
        raw, rev = self._raw(contract.group_key(self.prefix, project, name))
        group = contract.parse_group(raw)
        return (group, rev) if group else None

    @guarded
    def groups(self) -> list[contract.Group]:
        return sorted((g for _, g in self._records("groups", contract.parse_group)),
                      key=lambda g: (g["project"], g["name"]))

    @guarded
    def members(self, group_id: str) -> dict[str, list[str]]:
        """The hosts a group's members are on: host -> instance uuids."""
        found: dict[str, list[str]] = {}
        for _, meta in self.client.get_prefix(contract.placed_prefix(self.prefix, group_id), keys_only=True):
            host, uuid = meta.key.decode().rsplit("/", 2)[1:]
            found.setdefault(host, []).append(uuid)
        return found

    @guarded
    def delete_group(self, group: contract.Group, rev: Rev) -> bool:
        """Remove a group that has no members and is still what was read at `rev`."""
        key, members = contract.group_key(self.prefix, group["project"], group["name"]), \
            contract.placed_prefix(self.prefix, group["id"])
        ok, _ = self.client.transaction(
            compare=[self.tx.mod(key) == rev.mod, self._empty(members, contract.prefix_end(members))],
            success=[self.tx.delete(key)], failure=[])
        return bool(ok)

    # -- volumes (the user's side: eschedule/volumes.py) ------------------------------------

    @guarded
    def create_volume(self, volume: contract.Volume) -> bool:
        return self._create({contract.volume_key(self.prefix, volume["id"]): volume})

    @guarded
    def volume(self, volume_id: str) -> tuple[contract.Volume, Rev] | None:
        """A volume and where it was read; None if none; BadRecord if malformed."""
        raw, rev = self._raw(contract.volume_key(self.prefix, volume_id))
        found = contract.parse_volume(raw)
        return (found, rev) if found else None

    @guarded
    def volumes(self) -> list[contract.Volume]:
        return sorted((v for _, v in self._records("volumes", contract.parse_volume)),
                      key=lambda v: (v["project_id"], v["created_at"]))

    @guarded
    def holder(self, uuid: str | None) -> Holder:
        """The instance a volume names, as read: its request and status (None if gone) and the
        revisions of its index, request and status keys, for a write that depends on them."""
        if uuid is None:
            return Holder(None, None, {})
        host, raw, rev = self._located(uuid)
        index = contract.index_key(self.prefix, uuid)
        revs = {index: self._raw(index)[1].mod}
        request = status = None
        if host:
            revs[contract.request_key(self.prefix, host, uuid)] = rev.mod
            request = contract.parse_request(raw, uuid)
        raw, rev = self._raw(contract.instance_key(self.prefix, uuid))
        revs[contract.instance_key(self.prefix, uuid)] = rev.mod
        try:
            status = contract.parse_status(raw, uuid)
        except BadRecord:
            status = None
        return Holder(request, status, revs)

    @guarded
    def commit(self, read: dict[str, int], put: dict[str, Any], delete: Iterable[str] = ()) -> bool:
        """Put and delete keys in one transaction, only if every key of `read` is still at the
        mod revision it was read at (0: absent)."""
        ok, _ = self.client.transaction(
            compare=[self.tx.mod(k) == mod for k, mod in read.items()],
            success=[*(self.tx.put(k, contract.encode(v)) for k, v in put.items()),
                     *(self.tx.delete(k) for k in delete)], failure=[])
        return bool(ok)

    # -- ecompute's side --------------------------------------------------------------------

    @guarded
    def host_requests(self, host: str) -> HostRequests:
        """All requests for `host` and the store revision they were read at; malformed ones
        are set apart in `bad`, keyed by the uuid their key names."""
        resp = self.client.get_prefix_response(contract.requests_prefix(self.prefix, host))
        found = HostRequests(resp.header.revision)
        for kv in resp.kvs:
            uuid = contract.instance_from_request_key(self.prefix, host, kv.key)
            if not uuid:
                continue
            try:
                request = contract.parse_request(kv.value, uuid)
            except BadRecord as exc:
                found.bad[uuid] = str(exc)
                continue
            if request is not None:
                found.requests[uuid] = request
                found.revs[uuid] = _rev(kv)
        return found

    @guarded
    def get_request(self, host: str, uuid: str) -> tuple[Request | None, Rev]:
        """The request of `uuid` on `host` and where it was read; BadRecord if malformed."""
        raw, rev = self._raw(contract.request_key(self.prefix, host, uuid))
        return contract.parse_request(raw, uuid), rev

    @guarded
    def request_rev(self, host: str, uuid: str) -> Rev:
        return self._raw(contract.request_key(self.prefix, host, uuid))[1]

    @guarded
    def get_status(self, uuid: str) -> tuple[Status | None, int]:
        """The actual state and its mod_revision; a malformed one reads as None (the host
        that owns the instance writes it anew)."""
        raw, rev = self._raw(contract.instance_key(self.prefix, uuid))
        try:
            return contract.parse_status(raw, uuid), rev.mod
        except BadRecord as exc:
            LOG.warning("status of %s is malformed (%s); it will be rewritten", uuid, exc)
            return None, rev.mod

    @guarded
    def put_status(self, status: Status, owner: Rev) -> bool:
        """Write the actual state, only while the request it answers is still this host's and
        the same incarnation (`owner`, where that request was read). False otherwise."""
        return self._put_fenced(contract.instance_key(self.prefix, status["uuid"]), status, owner)

    @guarded
    def put_console(self, console: contract.Console, owner: Rev) -> bool:
        """Publish a console tail, fenced like the actual state."""
        return self._put_fenced(contract.console_key(self.prefix, console["uuid"]), console, owner)

    @guarded
    def put_console_boot(self, boot: contract.ConsoleBoot, owner: Rev) -> bool:
        """Publish one boot's console record, fenced like the actual state."""
        return self._put_fenced(contract.console_boot_key(self.prefix, boot["uuid"], boot["boot"]), boot, owner)

    @guarded
    def console_boots(self, uuid: str) -> list[contract.ConsoleBoot]:
        """Every boot record of an instance's console, oldest first (malformed ones left out)."""
        found = []
        for value, _ in self.client.get_prefix(contract.console_boots_prefix(self.prefix, uuid)):
            try:
                boot = contract.parse_console_boot(value, uuid)
            except BadRecord:
                continue  # its host writes it anew when that boot's output changes
            if boot is not None:
                found.append(boot)
        return sorted(found, key=lambda b: b["boot"])

    @guarded
    def console_boot_numbers(self, uuid: str) -> set[int]:
        """The boots of an instance's console that have records (keys only)."""
        return {int(meta.key.decode().rsplit("/", 1)[1]) for _, meta in self.client.get_prefix(
            contract.console_boots_prefix(self.prefix, uuid), keys_only=True) if meta.key.decode()[-1].isdigit()}

    @guarded
    def drop_console_boot(self, uuid: str, boot: int) -> None:
        """Remove one boot's record (its host no longer keeps that boot)."""
        self.client.delete(contract.console_boot_key(self.prefix, uuid, boot))

    def _put_fenced(self, key: str, value: Status | contract.Console | contract.ConsoleBoot, owner: Rev) -> bool:
        """Put a value a host writes about an instance (its `uuid` and `host`), only while that
        host's request of it is the incarnation created at `owner.create`."""
        if owner.create == 0:
            return False
        request = contract.request_key(self.prefix, value["host"], value["uuid"])
        ok, _ = self.client.transaction(compare=[self.tx.create(request) == owner.create],
                                        success=[self.tx.put(key, contract.encode(value))], failure=[])
        return bool(ok)

    @guarded
    def get_console(self, uuid: str) -> contract.Console | None:
        try:
            return contract.parse_console(self._raw(contract.console_key(self.prefix, uuid))[0], uuid)
        except BadRecord:
            return None  # its host writes it anew when the console changes

    @guarded
    def drop_status(self, uuid: str, mod: int) -> bool:
        """Delete a status nobody requests any more, if it is still what was read at `mod`."""
        key = contract.instance_key(self.prefix, uuid)
        ok, _ = self.client.transaction(compare=[self.tx.mod(key) == mod], success=[self.tx.delete(key)],
                                        failure=[])
        return bool(ok)

    @guarded
    def finish_delete(self, host: str, uuid: str, rev: Rev) -> bool:
        """Remove every key of a deleted instance at once (nothing half-gone is ever visible),
        if its request is still what was read at `rev`."""
        key = contract.request_key(self.prefix, host, uuid)
        if rev.mod == 0:
            return False
        raw, now = self._raw(key)  # what it owns besides (its name, its group membership)
        if now.mod != rev.mod:
            return False
        ok, _ = self.client.transaction(
            compare=[self.tx.mod(key) == rev.mod],
            success=[self.tx.delete(key),
                     self.tx.delete(contract.instance_key(self.prefix, uuid)),
                     self.tx.delete(contract.console_key(self.prefix, uuid)), self._delete_boots(uuid),
                     self.tx.delete(contract.index_key(self.prefix, uuid)),
                     *self._owned(raw, host, uuid)],
            failure=[])
        return bool(ok)

    @guarded
    def find_by_address(self, ip: str, host: str | None = None) -> Request | None:
        """The request of the one ACTIVE instance whose reported IP is `ip` (on `host`, if given).

        A status keeps its ip while stopped, suspended or failed, and that address may be another
        guest's by then; a restarted one reports its old ip until its host learns the new one. So
        only a running instance counts, and an address two running ones claim is nobody's.
        """
        found: list[Status] = []
        for value, _ in self.client.get_prefix(self.prefix + "/instances/"):
            try:
                status = contract.parse_status(value)
            except BadRecord:
                continue
            if (status and status.get("ip") == ip and status.get("state") == Actual.ACTIVE
                    and (host is None or status.get("host") == host)):
                found.append(status)
        if len(found) != 1:
            if found:
                LOG.warning("%d running instances claim %s: %s", len(found), ip,
                            ", ".join(st["uuid"] for st in found))
            return None
        try:
            return self.get_request(found[0]["host"], found[0]["uuid"])[0]
        except BadRecord:
            return None

    @guarded
    def host_record(self, host: str) -> HostRecord | None:
        """One host's record (None: none, or a malformed one)."""
        try:
            record = contract.decode(self._raw(contract.host_key(self.prefix, host))[0])
        except ValueError:
            return None
        return record

    @guarded
    def put_host(self, record: HostRecord) -> None:
        self.client.put(contract.host_key(self.prefix, record["uuid"]), contract.encode(record))

    @guarded
    def put_pool(self, provider: str, name: str) -> None:
        """Say that shared storage pool `provider` (its sharing provider in Placement) serves this cloud."""
        self.client.put(contract.pool_key(self.prefix, provider), contract.encode({"provider": provider, "name": name}))

    @guarded
    def pools(self) -> list[str]:
        """The sharing providers of this cloud's storage pools (keys only: one read)."""
        return sorted(meta.key.decode().rsplit("/", 1)[1]
                      for _, meta in self.client.get_prefix(self.prefix + "/pools/", keys_only=True))

    # -- host liveness ----------------------------------------------------------------------

    @guarded
    def claim_alive(self, host: str, ttl: int, record: dict[str, Any]) -> int | None:
        """Put PREFIX/alive/<host> on a fresh lease of `ttl` seconds, only if no one holds it,
        and end the host's DOWN record in the same transaction (a host that returns restarts the
        clock of its next evacuation, and an evacuation that read it DOWN moves nothing now); the
        lease id, or None if the key exists (another daemon, or a dead one's lease)."""
        return self._on_new_lease(contract.alive_key(self.prefix, host), ttl, record,
                                  [self.tx.delete(contract.down_key(self.prefix, host))])

    def _on_new_lease(self, key: str, ttl: int, record: dict[str, Any], also: list[Any]) -> int | None:
        """Put `key` on a fresh lease of `ttl` seconds if it does not exist (doing `also` with it);
        the lease id, or None if the key exists."""
        lease = self.client.lease(ttl)
        ok, _ = self.client.transaction(
            compare=[self.tx.version(key) == 0],
            success=[self.tx.put(key, contract.encode(record), lease), *also], failure=[])
        if not ok:
            self.client.revoke_lease(lease.id)
            return None
        return int(lease.id)

    @guarded
    def alive_record(self, host: str) -> dict[str, Any] | None:
        raw, _ = self._raw(contract.alive_key(self.prefix, host))
        try:
            return contract.decode(raw)
        except ValueError:
            return {}

    @guarded
    def clear_alive(self, host: str) -> None:
        """Remove a dead daemon's alive key (and its lease) before its TTL runs out."""
        _, meta = self.client.get(contract.alive_key(self.prefix, host))
        if meta is not None and meta.lease_id:
            self.client.revoke_lease(meta.lease_id)
        self.client.delete(contract.alive_key(self.prefix, host))

    @guarded
    def refresh_lease(self, lease_id: int, timeout: float | None = None) -> bool:
        """Keep a lease of ours alive, waiting at most `timeout` seconds (default: the client's) for
        etcd's answer; False if it had already expired (its key is gone)."""
        return self.etcd.keepalive(lease_id, timeout or self.cfg.timeout)

    @guarded
    def revoke_lease(self, lease_id: int) -> None:
        """End a lease of ours now: its key goes at once, not when it would have lapsed."""
        self.client.revoke_lease(lease_id)

    refresh_alive = refresh_lease
    revoke_alive = revoke_lease

    @guarded
    def is_alive(self, host: str) -> bool:
        return self.client.get(contract.alive_key(self.prefix, host))[0] is not None

    @guarded
    def alive_hosts(self) -> set[str]:
        return {meta.key.decode().rsplit("/", 1)[1]
                for _, meta in self.client.get_prefix(self.prefix + "/alive/", keys_only=True)}

    # -- DOWN hosts and their evacuation (eschedule's side) -----------------------------------

    @guarded
    def mark_down(self, host: str, by: str) -> tuple[DownRecord, Rev] | None:
        """The DOWN record of `host` and where it was read, written now (saying `by` whom) if the
        host has no alive key and no record yet; None while the host is UP. A malformed record
        cannot say since when: it is dropped and written anew, which restarts the clock (the safe
        way; a record garbled again and again reads as UP, which moves nothing)."""
        alive, key = contract.alive_key(self.prefix, host), contract.down_key(self.prefix, host)
        for _ in range(3):
            record = DownRecord(host=host, since=contract.now(), by=by)
            self.client.transaction(compare=[self.tx.version(alive) == 0, self.tx.version(key) == 0],
                                    success=[self.tx.put(key, contract.encode(record))], failure=[])
            raw, rev = self._raw(key)
            if raw is None:
                return None  # UP (or up again already)
            try:
                return contract.parse_down(raw), rev  # type: ignore[return-value]
            except BadRecord as exc:
                LOG.warning("DOWN record of %s dropped: %s", host, exc)
                self.client.transaction(compare=[self.tx.mod(key) == rev.mod], success=[self.tx.delete(key)],
                                        failure=[])
        return None

    @guarded
    def down_record(self, host: str) -> tuple[DownRecord, Rev] | None:
        """The DOWN record of `host` as it is (None: none, or a malformed one) and where it was read."""
        raw, rev = self._raw(contract.down_key(self.prefix, host))
        try:
            found = contract.parse_down(raw)
        except BadRecord:
            return None
        return (found, rev) if found else None

    @guarded
    def down_records(self) -> dict[str, DownRecord]:
        """Every well-formed DOWN record, by host."""
        return {rec["host"]: rec for key, rec in self._records("down", contract.parse_down)
                if key.endswith("/" + rec["host"])}

    @guarded
    def request_hosts(self) -> set[str]:
        """The hosts that have requests (keys only: what an evacuator must look at)."""
        return {meta.key.decode().rsplit("/", 2)[1]
                for _, meta in self.client.get_prefix(contract.requests_prefix(self.prefix), keys_only=True)}

    def down_since(self, hosts: Iterable[str], by: str, ours: Iterable[str] | None = None) -> dict[str, str]:
        """Since when each of `hosts` (DOWN ones) has been DOWN. One of `ours` (default: all of
        them) that nobody had recorded DOWN yet is recorded now, saying `by` whom."""
        hosts = set(hosts)
        if not hosts:
            return {}
        found = {h: r["since"] for h, r in self.down_records().items() if h in hosts}
        for host in (hosts & set(hosts if ours is None else ours)) - set(found):
            down = self.mark_down(host, by)
            if down is not None:
                found[host] = down[0]["since"]
        return found

    @guarded
    def has_requests(self, host: str) -> bool:
        """Does `host` have any request at all (one key read, keys only)?"""
        resp = self.client.get_prefix_response(contract.requests_prefix(self.prefix, host), keys_only=True, limit=1)
        return bool(resp.kvs)

    @guarded
    def lead_evacuators(self, ttl: int, record: dict[str, Any]) -> int | None:
        """Become the evacuator that acts: PREFIX/evacuator on a fresh lease, if nobody holds it;
        the lease id, or None."""
        return self._on_new_lease(contract.evacuator_key(self.prefix), ttl, record, [])

    @guarded
    def evacuator_leader(self) -> dict[str, Any] | None:
        raw, _ = self._raw(contract.evacuator_key(self.prefix))
        try:
            return contract.decode(raw)
        except ValueError:
            return {}

    def watch(self, prefix: str, start_revision: int, on_event: Callable[[str, int], None],
              on_state: Callable[[str], None]) -> PrefixWatch:
        return PrefixWatch(self.etcd, prefix, start_revision, on_event, on_state)
