"""The project's etcd reads, writes and transactions, on the keys of contract.py.

Both sides use it: eschedule writes requests, ecompute writes actual state (see the
rule in contract.py). Connection, login and the watch live in etcd.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from etcd_compute import contract
from etcd_compute.config import EtcdConfig
from etcd_compute.contract import HostRecord, Request, Status, View
from etcd_compute.etcd import Etcd, PrefixWatch, guarded


class Store:
    """An etcd client bound to one prefix (see contract.py)."""

    def __init__(self, cfg: EtcdConfig) -> None:
        self.cfg = cfg
        self.prefix = cfg.prefix.rstrip("/")
        self.etcd = Etcd(cfg)
        self.client = self.etcd.client
        self.tx = self.client.transactions

    def close(self) -> None:
        self.etcd.close()

    def _get(self, key: str) -> tuple[Any, int]:
        """(decoded value or None, mod_revision or 0)."""
        value, meta = self.client.get(key)
        return contract.decode(value), (meta.mod_revision if meta else 0)

    # -- eschedule's side -------------------------------------------------------------------

    @guarded
    def create_instance(self, request: Request) -> bool:
        """Write request + index in one transaction; False if the uuid already exists."""
        uuid, host = request["uuid"], request["host"]
        index = contract.index_key(self.prefix, uuid)
        ok, _ = self.client.transaction(
            compare=[self.tx.create(index) == 0],
            success=[self.tx.put(index, contract.encode({"host": host})),
                     self.tx.put(contract.request_key(self.prefix, host, uuid), contract.encode(request))],
            failure=[])
        return ok

    @guarded
    def get_instance(self, uuid: str) -> tuple[Request | None, Status | None]:
        """(request, actual status) of one instance; (None, None) if unknown."""
        index, _ = self._get(contract.index_key(self.prefix, uuid))
        status, _ = self._get(contract.instance_key(self.prefix, uuid))
        request = None
        if index:
            request, _ = self._get(contract.request_key(self.prefix, index["host"], uuid))
        return request, status

    @guarded
    def update_request(self, uuid: str, change: Callable[[Request, Status | None], Request | None]) -> Request | None:
        """Compare-and-swap the request: change(request, status) returns the new request, or
        None for "nothing to do", or raises to refuse. None if the instance is unknown."""
        while True:
            index, _ = self._get(contract.index_key(self.prefix, uuid))
            if not index:
                return None
            key = contract.request_key(self.prefix, index["host"], uuid)
            request, rev = self._get(key)
            if request is None:
                return None
            status, _ = self._get(contract.instance_key(self.prefix, uuid))
            new = change(request, status)
            if new is None:
                return request
            new = Request(**new)
            new["updated_at"] = contract.now()
            ok, _ = self.client.transaction(
                compare=[self.tx.mod(key) == rev],
                success=[self.tx.put(key, contract.encode(new))], failure=[])
            if ok:
                return new

    @guarded
    def move_instance(self, request: Request, new_host: str) -> bool:
        """Hand an instance to another host in one transaction: its request moves, its index
        follows, and the old host's actual state is dropped (the new host reports afresh)."""
        uuid, old_host = request["uuid"], request["host"]
        old_key = contract.request_key(self.prefix, old_host, uuid)
        _, rev = self._get(old_key)
        moved = Request(**request)
        moved["host"], moved["updated_at"] = new_host, contract.now()
        ok, _ = self.client.transaction(
            compare=[self.tx.mod(old_key) == rev],
            success=[self.tx.delete(old_key),
                     self.tx.put(contract.request_key(self.prefix, new_host, uuid), contract.encode(moved)),
                     self.tx.put(contract.index_key(self.prefix, uuid), contract.encode({"host": new_host})),
                     self.tx.delete(contract.instance_key(self.prefix, uuid))],
            failure=[])
        return ok and rev != 0

    @guarded
    def known_instances(self) -> set[str]:
        return {meta.key.decode().rsplit("/", 1)[1]
                for _, meta in self.client.get_prefix(self.prefix + "/index/", keys_only=True)}

    @guarded
    def list_instances(self, alive: set[str] | None = None) -> list[View]:
        """All instances, requested and actual joined (contract.view), with host_state if `alive`."""
        requests: dict[str, Request] = {}
        statuses: dict[str, Status] = {}
        for value, _meta in self.client.get_prefix(self.prefix + "/requests/"):
            req = contract.decode(value)
            requests[req["uuid"]] = req
        for value, _meta in self.client.get_prefix(self.prefix + "/instances/"):
            st = contract.decode(value)
            statuses[st["uuid"]] = st

        def created(uuid: str) -> str:
            request = requests.get(uuid)
            return request["created_at"] if request else ""

        uuids = sorted(set(requests) | set(statuses), key=created)
        return [contract.view(requests.get(u), statuses.get(u), alive) for u in uuids]

    @guarded
    def hosts(self) -> dict[str, HostRecord]:
        out = {}
        for value, _meta in self.client.get_prefix(self.prefix + "/hosts/"):
            rec = contract.decode(value)
            out[rec["uuid"]] = rec
        return out

    # -- ecompute's side --------------------------------------------------------------------

    @guarded
    def host_requests(self, host: str) -> tuple[dict[str, Request], int]:
        """All requests for `host` and the store revision they were read at."""
        resp = self.client.get_prefix_response(contract.requests_prefix(self.prefix, host))
        reqs = {}
        for kv in resp.kvs:
            req = contract.decode(kv.value)
            reqs[req["uuid"]] = req
        return reqs, resp.header.revision

    @guarded
    def get_request(self, host: str, uuid: str) -> Request | None:
        return self._get(contract.request_key(self.prefix, host, uuid))[0]

    @guarded
    def get_status(self, uuid: str) -> Status | None:
        return self._get(contract.instance_key(self.prefix, uuid))[0]

    @guarded
    def put_status(self, status: Status) -> None:
        self.client.put(contract.instance_key(self.prefix, status["uuid"]), contract.encode(status))

    @guarded
    def finish_delete(self, host: str, uuid: str) -> None:
        """Remove every key of a deleted instance at once: nothing half-gone is ever visible."""
        self.client.transaction(
            compare=[],
            success=[self.tx.delete(contract.request_key(self.prefix, host, uuid)),
                     self.tx.delete(contract.instance_key(self.prefix, uuid)),
                     self.tx.delete(contract.index_key(self.prefix, uuid))],
            failure=[])

    @guarded
    def find_by_address(self, ip: str, host: str | None = None) -> Request | None:
        """The request of the instance whose reported IP is `ip` (on `host`, if given)."""
        for value, _ in self.client.get_prefix(self.prefix + "/instances/"):
            status = contract.decode(value)
            if status.get("ip") == ip and (host is None or status.get("host") == host):
                return self.get_request(status["host"], status["uuid"])
        return None

    @guarded
    def put_host(self, record: HostRecord) -> None:
        self.client.put(contract.host_key(self.prefix, record["uuid"]), contract.encode(record))

    # -- host liveness ----------------------------------------------------------------------

    @guarded
    def grant_alive(self, host: str, ttl: int, record: dict[str, Any]) -> int:
        """Put PREFIX/alive/<host> on a fresh lease of `ttl` seconds; the lease id."""
        lease = self.client.lease(ttl)
        self.client.put(contract.alive_key(self.prefix, host), contract.encode(record), lease=lease)
        return lease.id

    @guarded
    def refresh_alive(self, lease_id: int) -> bool:
        """Keep the lease alive; False if it had already expired (the key is gone)."""
        return any(r.TTL > 0 for r in self.client.refresh_lease(lease_id))

    @guarded
    def revoke_alive(self, lease_id: int) -> None:
        self.client.revoke_lease(lease_id)

    @guarded
    def is_alive(self, host: str) -> bool:
        return self.client.get(contract.alive_key(self.prefix, host))[0] is not None

    @guarded
    def alive_hosts(self) -> set[str]:
        return {meta.key.decode().rsplit("/", 1)[1]
                for _, meta in self.client.get_prefix(self.prefix + "/alive/", keys_only=True)}

    def watch(self, prefix: str, start_revision: int, on_event: Callable[[str, int], None],
              on_state: Callable[[str], None]) -> PrefixWatch:
        return PrefixWatch(self.etcd, prefix, start_revision, on_event, on_state)
