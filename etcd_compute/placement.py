"""A small OpenStack Placement client: the calls etcd-compute makes, and readable errors.

`timeout` bounds each call as a whole. requests' own timeout bounds each socket read, so a
Placement (or a proxy) that sends a byte now and then would hold a call for ever; here a
watchdog shuts the call's socket down when its time is up, and the blocked read returns.

Only errors where the request cannot have reached Placement (connection refused, connect
timeout) are retried, plus reads and deletes, which may safely be repeated; a write that
may have reached Placement but got no answer raises PlacementNoAnswer (claim() then frees
what it may have allocated). Everything Placement answers is returned or raised as
PlacementError with Placement's own error code and detail.
"""

from __future__ import annotations

import hashlib
import html
import logging
import re
import socket
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from functools import cache
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import NewConnectionError
from urllib3.response import HTTPResponse

from etcd_compute.config import PlacementConfig
from etcd_compute.errors import ECError, PlacementError, PlacementNoAnswer, PlacementUnavailable

LOG = logging.getLogger(__name__)

CONCURRENT_UPDATE = "placement.concurrent_update"
# Safe to send again when the first attempt may have reached Placement.
REPEATABLE = ("GET", "HEAD", "DELETE")
_calls = threading.local()  # .deadline: the _Deadline of the call this thread is making

# Shard aggregates: each host joins one when it registers, and eschedule asks one at random
# first, because Placement builds a candidate for every matching provider before `limit`
# applies. Fixed uuids, so every ecompute and eschedule names the same aggregates.
SHARD_NAMESPACE = uuidlib.UUID("2aa8b635-743d-40d6-8e1d-55bc6eb7e03c")
SHARES = "MISC_SHARES_VIA_AGGREGATE"  # the trait of a provider that shares its inventory with its aggregates
MAX_SHARDS = 1024  # config.py's bound on `shards`; also how far stale shard aggregates are recognised


def shard_aggregate(n: int, pool: str | None = None) -> str:
    """The aggregate uuid of shard `n`; of a shared storage pool's (its sharing provider's uuid) shard
    `n`, if `pool`: a pool's DISK_GB is shared with the hosts of its own shard aggregates only, so
    hosts with local disks never get it, and a query narrowed to a shard finds the pool there too
    (Placement wants a sharing provider in the member_of aggregate as well)."""
    return str(uuidlib.uuid5(SHARD_NAMESPACE, f"shard-{n}" if pool is None else f"pool-{pool}-shard-{n}"))


def shard_of(provider: str, count: int) -> int:
    """The shard of a provider: a stable hash of its uuid (not hash(), which is salted per
    process), so that uuids an operator numbered by hand still spread evenly."""
    digest = hashlib.sha256(provider.lower().encode()).digest()
    return int.from_bytes(digest[:8], "big") % count


@cache
def shard_aggregates(pool: str | None = None) -> frozenset[str]:
    """Every aggregate that is a shard of ours (of `pool`'s, if given), whatever the shard count was."""
    return frozenset(shard_aggregate(n, pool) for n in range(MAX_SHARDS))


class _Deadline:
    """One call's time limit. The connections of this client hand it each socket the call
    reads from; when the time is up it shuts them down, so a read blocked there returns now."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds
        self.expired = False
        self._over = False  # the call has ended: its sockets may serve the next call
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        _calls.deadline = self
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._lock:
            self._over = True
        _calls.deadline = None

    def left(self) -> float:
        return max(self.at - time.monotonic(), 0.001)

    def watch(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            self._socks.append(sock)
            if self.expired:
                _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            if self._over:
                return
            self.expired = True
            for sock in self._socks:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


def _watch(sock: socket.socket | None) -> None:
    deadline = getattr(_calls, "deadline", None)
    if deadline is not None:
        deadline.watch(sock)


class _WatchedHTTPConnection(HTTPConnection):
    def getresponse(self) -> HTTPResponse:  # type: ignore[override]
        _watch(self.sock)  # the request is sent: from here on, reads may drip
        return super().getresponse()


class _WatchedHTTPSConnection(HTTPSConnection):
    def getresponse(self) -> HTTPResponse:  # type: ignore[override]
        _watch(self.sock)
        return super().getresponse()


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _WatchedAdapter(HTTPAdapter):
    """requests' adapter, with connections that show their socket to the call's _Deadline."""

    POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self.POOLS

    def proxy_manager_for(self, proxy: Any, **kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **kwargs)
        if isinstance(manager, urllib3.ProxyManager):  # (SOCKS managers keep their own classes)
            manager.pool_classes_by_scheme = self.POOLS
        return manager


VOLUME = "VOLUME"  # the consumer type of a volume's allocation (an instance's: INSTANCE)


class PlacementClient:
    def __init__(self, cfg: PlacementConfig) -> None:
        self.base = cfg.endpoint.rstrip("/")
        self.timeout = cfg.timeout
        self.retries = cfg.retries
        self.session = requests.Session()
        self.session.mount("http://", _WatchedAdapter())
        self.session.mount("https://", _WatchedAdapter())
        self.session.headers.update({
            "x-auth-token": cfg.token,
            "OpenStack-API-Version": f"placement {cfg.microversion}",
            "Accept": "application/json",
        })

    def request(self, method: str, path: str, *, json: Any = None, params: Any = None,
                ok: tuple[int, ...] = (200, 201, 204)) -> requests.Response:
        url = self.base + path
        with _Deadline(self.timeout) as deadline:
            for attempt in range(self.retries + 1):
                try:
                    resp = self.session.request(method, url, json=json, params=params, timeout=deadline.left())
                    if deadline.expired:  # cut off: http.client may take a cut head or body for a whole one
                        raise requests.Timeout
                    break
                except requests.RequestException as exc:
                    unsent = _unsent(exc)
                    if not unsent and (deadline.expired or isinstance(exc, requests.Timeout)):
                        raise PlacementNoAnswer(f"Placement at {self.base} did not answer in {self.timeout:g}s "
                                                f"({method} {path.split('?')[0]})") from None
                    if not unsent and method not in REPEATABLE:
                        raise PlacementNoAnswer(f"Placement at {self.base} dropped the connection without "
                                                f"answering {method} {path}: {_reason(exc)}") from None
                    pause = 0.2 * 2 ** attempt
                    if attempt == self.retries or deadline.left() <= pause:
                        raise PlacementUnavailable(f"Placement unreachable at {self.base}: {_reason(exc)}") from None
                    time.sleep(pause)
        if resp.status_code not in ok:
            raise _error(method, path, resp)
        if resp.content and "json" not in resp.headers.get("Content-Type", ""):
            raise PlacementError(f"Placement {method} {path.split('?')[0]} -> {resp.status_code}: not a JSON "
                                 f"answer ({_text(resp)}); is {self.base} Placement?", resp.status_code)
        return resp

    # -- scheduling -------------------------------------------------------------------------

    def allocation_candidates(self, params: list[tuple[str, str]]) -> dict:
        return self.request("GET", "/allocation_candidates", params=params).json()

    def claim(self, consumer: str, allocations: dict, project_id: str, user_id: str,
              consumer_type: str = "INSTANCE") -> None:
        """Allocate for a new consumer; raises PlacementError(409) when someone was faster.

        When the answer is lost the allocation may exist all the same; the consumer is new, so
        whatever Placement holds for it came from this claim: it is freed before the error is
        raised. (A claim Placement carries out only after that delete is left for audit.)"""
        try:
            self.request("PUT", f"/allocations/{consumer}", json={
                "allocations": allocations, "project_id": project_id, "user_id": user_id,
                "consumer_generation": None, "consumer_type": consumer_type})
        except PlacementNoAnswer as exc:
            try:
                freed = self.delete_allocations(consumer)
            except ECError as again:
                LOG.error("the claim of %s may be left in Placement: %s (run 'eschedule audit --fix' later)",
                          consumer, again)
                raise PlacementNoAnswer(f"{exc}; its claim may be left allocated ('eschedule audit' finds it)") \
                    from None
            LOG.info("claim of %s got no answer; %s", consumer, "freed it" if freed else "nothing was allocated")
            raise PlacementNoAnswer(f"{exc} (the claim was undone)") from None

    def move(self, consumer: str, allocations: dict, generation: int | None, project_id: str,
             user_id: str) -> None:
        """Replace an existing consumer's allocations in one step (evacuation), only if the
        consumer is still at `generation` (409 "consumer generation conflict" otherwise)."""
        self.request("PUT", f"/allocations/{consumer}", json={
            "allocations": allocations, "project_id": project_id, "user_id": user_id,
            "consumer_generation": generation, "consumer_type": "INSTANCE"})

    def consumer(self, consumer: str) -> dict:
        return self.request("GET", f"/allocations/{consumer}").json()

    def provider_allocations(self, uuid: str) -> dict:
        return self.request("GET", f"/resource_providers/{uuid}/allocations").json()["allocations"]

    def get_allocations(self, consumer: str) -> dict:
        return self.request("GET", f"/allocations/{consumer}").json().get("allocations", {})

    def delete_allocations(self, consumer: str) -> bool:
        """Free a consumer's allocations; False if it had none (already freed)."""
        return self.request("DELETE", f"/allocations/{consumer}", ok=(204, 404)).status_code == 204

    # -- providers --------------------------------------------------------------------------

    def providers(self) -> list[dict]:
        return self.request("GET", "/resource_providers").json()["resource_providers"]

    def provider(self, uuid: str) -> dict | None:
        resp = self.request("GET", f"/resource_providers/{uuid}", ok=(200, 404))
        return resp.json() if resp.status_code == 200 else None

    def ensure_provider(self, uuid: str, name: str) -> dict:
        """Create the provider, or rename it if it exists under another name."""
        current = self.provider(uuid)
        if current is None:
            return self.request("POST", "/resource_providers", json={"uuid": uuid, "name": name}).json()
        if current["name"] != name:
            return self.request("PUT", f"/resource_providers/{uuid}", json={"name": name}).json()
        return current

    def delete_provider(self, uuid: str) -> bool:
        """Remove a provider with every allocation on it (retiring a host); False if absent."""
        if self.provider(uuid) is None:
            return False
        for consumer in self.provider_allocations(uuid):
            self.delete_allocations(consumer)
        self.request("DELETE", f"/resource_providers/{uuid}", ok=(204, 404))
        return True

    def inventories(self, uuid: str) -> dict:
        return self.request("GET", f"/resource_providers/{uuid}/inventories").json()["inventories"]

    def usages(self, uuid: str) -> dict:
        return self.request("GET", f"/resource_providers/{uuid}/usages").json()["usages"]

    def project_usage(self, project: str) -> dict[str, int]:
        """What a project's instances and volumes hold, over every provider: {"instances": its
        instances, "volumes": its volumes (if any), <resource class>: amount of both} (microversion 1.38
        counts consumers by type)."""
        found = self.request("GET", "/usages", params={"project_id": project}).json()["usages"]
        usage: dict[str, int] = {}
        for amounts in found.values():
            for rc, amount in amounts.items():
                if rc != "consumer_count":
                    usage[rc] = usage.get(rc, 0) + amount
        usage["instances"] = found.get("INSTANCE", {}).get("consumer_count", 0)
        if found.get(VOLUME, {}).get("consumer_count"):
            usage["volumes"] = found[VOLUME]["consumer_count"]
        return usage

    def resource_classes(self) -> set[str]:
        """Every resource class Placement knows (standard and CUSTOM_)."""
        return {rc["name"] for rc in self.request("GET", "/resource_classes").json()["resource_classes"]}

    def known_traits(self, names: list[str]) -> set[str]:
        """Which of `names` are traits Placement knows."""
        if not names:
            return set()
        return set(self.request("GET", "/traits", params={"name": "in:" + ",".join(names)}).json()["traits"])

    def traits(self, uuid: str) -> list[str]:
        return self.request("GET", f"/resource_providers/{uuid}/traits").json()["traits"]

    def set_inventories(self, uuid: str, inventories: dict) -> None:
        """Replace the provider's inventory; claims bump the generation, so retry on conflict."""
        self._put_generational(f"/resource_providers/{uuid}/inventories", {"inventories": inventories})

    def aggregates(self, uuid: str) -> tuple[list[str], int]:
        """The provider's aggregates and the generation they were read at."""
        body = self.request("GET", f"/resource_providers/{uuid}/aggregates").json()
        return body["aggregates"], body["resource_provider_generation"]

    def update_aggregates(self, uuid: str, change: Callable[[list[str]], list[str]], attempts: int = 10) -> list[str]:
        """Replace the provider's aggregates with change(current): PUT replaces the whole list, so
        it is written against the generation it was read at, and read again on a conflict."""
        for attempt in range(attempts):
            current, generation = self.aggregates(uuid)
            wanted = change(list(current))
            if sorted(wanted) == sorted(current):
                return current
            try:
                self.request("PUT", f"/resource_providers/{uuid}/aggregates",
                             json={"aggregates": wanted, "resource_provider_generation": generation})
                return wanted
            except PlacementError as exc:
                if exc.code != CONCURRENT_UPDATE or attempt == attempts - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def join_shard(self, uuid: str, count: int, pool: str | None = None) -> str | None:
        """Put the provider in its shard aggregate (of `count`; 1: none, but a pool's one aggregate),
        of `pool`'s shards if it has its disks there, out of any other shard of ours, keeping every
        other aggregate. Returns the shard's aggregate."""
        shard = shard_aggregate(shard_of(uuid, count) if count > 1 else 0, pool) if count > 1 or pool else None
        ours = shard_aggregates() | (shard_aggregates(pool) if pool else frozenset())
        self.update_aggregates(uuid, lambda aggs: [a for a in aggs if a not in ours] + ([shard] if shard else []))
        return shard

    def share_pool(self, pool: str, name: str, disk_gb: int, count: int, allocation_ratio: float = 1.0) -> None:
        """Make `pool` the sharing provider of a storage pool's DISK_GB (MISC_SHARES_VIA_AGGREGATE),
        in each of its shard aggregates (of `count`): every host of those gets its disks there."""
        self.ensure_provider(pool, name)
        self.set_inventories(pool, {"DISK_GB": {"total": disk_gb, "reserved": 0, "allocation_ratio": allocation_ratio,
                                                "min_unit": 1, "max_unit": disk_gb, "step_size": 1}})
        self.set_traits(pool, [SHARES])
        shards = {shard_aggregate(n, pool) for n in range(max(count, 1))}
        ours = shard_aggregates(pool)
        self.update_aggregates(pool, lambda aggs: sorted({a for a in aggs if a not in ours} | shards))

    def set_traits(self, uuid: str, traits: list[str]) -> None:
        for trait in traits:
            if trait.startswith("CUSTOM_"):
                self.request("PUT", f"/traits/{trait}")
        self._put_generational(f"/resource_providers/{uuid}/traits", {"traits": sorted(set(traits))})

    def _put_generational(self, path: str, body: dict, attempts: int = 10) -> None:
        provider = path.split("/")[2]
        for attempt in range(attempts):
            current = self.provider(provider)
            if current is None:
                raise PlacementError(f"resource provider {provider} does not exist", 404)
            try:
                self.request("PUT", path, json=dict(body, resource_provider_generation=current["generation"]))
                return
            except PlacementError as exc:
                if exc.code != CONCURRENT_UPDATE or attempt == attempts - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))


def _unsent(exc: requests.RequestException) -> bool:
    """Did the request certainly not reach Placement (no connection was made)?"""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(exc, requests.ConnectionError) and isinstance(reason, NewConnectionError)


def _reason(exc: Exception) -> str:
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "timed out", "No route to host",
                   "Connection reset", "Remote end closed connection"):
        if marker in text:
            return marker
    return text[:200]


def _text(resp: requests.Response, limit: int = 200) -> str:
    """A body that is not Placement's JSON (an HTML page of a proxy or a WSGI server) as one
    short line of its text."""
    text = " ".join(html.unescape(re.sub(r"<[^>]*>", " ", resp.text)).split()) or resp.reason or "no body"
    return text if len(text) <= limit else text[:limit] + "..."


def _error(method: str, path: str, resp: requests.Response) -> PlacementError:
    """Placement's JSON error body turned into one readable line."""
    code = ""
    try:
        err = resp.json()["errors"][0]
        code = err.get("code", "")
        detail = str(err.get("detail", ""))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        detail = _text(resp)
    # Placement prefixes the useful sentence with the generic HTTP explanation.
    detail = " ".join(detail.split("\n\n", 1)[-1].split())
    return PlacementError(f"Placement {method} {path.split('?')[0]} -> {resp.status_code}: {detail}",
                          resp.status_code, code)
