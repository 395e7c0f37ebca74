"""The etcd key layout and value formats: the whole contract between eschedule and ecompute.

All keys live under one prefix (`etcd.prefix`, default `/etcd-compute`); every value
is a JSON object, so `etcdctl get --prefix /etcd-compute` is readable as it is.

    PREFIX/requests/<host>/<instance>   REQUESTED state, written by eschedule.
        {"uuid", "host", "desired": "active" | "stopped" | "suspended" | "deleted",
         "reboot": int (bumped by `eschedule reboot`), "resources": {"VCPU": 1, ...},
         "allocations": {<provider>: {"resources": {...}}}, "image": str | null,
         "image_sha256": str | null, "boot": {"kernel", "initrd", "cmdline"} | null,
         "hostname": str, "ssh_keys": [str], "user_data": str | null,
         "query": str, "project_id", "user_id", "created_at", "updated_at"}
        ecompute watches PREFIX/requests/<its host>/ and nothing else. `allocations`
        is exactly what eschedule claimed in Placement, so the host can size the
        domain without asking Placement.

    PREFIX/instances/<instance>         ACTUAL state, written only by the host's ecompute.
        {"uuid", "host", "state": BUILDING | ACTIVE | STOPPED | SUSPENDED | ERROR | DELETING,
         "reason": str | null, "ip": str | null (from the DHCP lease), "reboots": int (handled),
         "domain": {"name", "state", "vcpus", "memory_mb"} | null, "updated_at",
         "events": [{"at", "event"}, ...] (the last EVENTS_KEPT, oldest first)}

    PREFIX/index/<instance>             {"host": <host>}: where an instance's request lives,
        written with the request in one transaction, so `eschedule UUID` needs one read.

    PREFIX/hosts/<host>                 {"uuid", "name", "hostname", "pid", "state": "up" |
        "locked", "updated_at"}: the host's own record, written by its ecompute.

    PREFIX/alive/<host>                 {"uuid", "pid", "since"} on an etcd lease of `lease_ttl`
        seconds that ecompute keeps refreshing: present = the host is UP. When ecompute dies
        the lease lapses, the key vanishes, and eschedule stops placing instances there.

Life of an instance (requested state on the left, actual on the right):

    eschedule schedule  -> desired=active          (no actual yet: shown as PENDING)
    ecompute            ->                          BUILDING -> ACTIVE | ERROR(reason)
    eschedule stop      -> desired=stopped          STOPPED   (ACPI shutdown, then power off)
    eschedule start     -> desired=active           ACTIVE
    eschedule suspend   -> desired=suspended        SUSPENDED (paused in memory)
    eschedule resume    -> desired=active           ACTIVE
    eschedule reboot    -> reboot += 1              ACTIVE, reboots = reboot (a cold restart)
    eschedule destroy   -> desired=deleted          DELETING
    ecompute            -> domain gone, allocation deleted in Placement, then the
                           request, index and actual keys are deleted in one transaction.
    eschedule evacuate  -> the request moves to another host (and its allocation with it);
                           the old actual key is dropped and the new host builds it.

ecompute always works towards `desired` from whatever the actual state is, so a request
written twice, a restart or a missed event changes nothing. eschedule refuses requests that
make no sense for the actual state (`refusal` below) before writing anything, so no request
is ever left that the host cannot carry out. ERROR is final: destroy the instance.

A request is never deleted by eschedule: it is marked deleted and the host finishes
the deletion (like a Kubernetes finalizer), so the allocation is freed only once
the domain is really gone.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

# Requested (desired) states, written by eschedule.
ACTIVE_REQ = "active"
STOPPED_REQ = "stopped"
SUSPENDED_REQ = "suspended"
DELETED_REQ = "deleted"

# Actual states, written by ecompute. PENDING is derived (request without actual).
PENDING = "PENDING"
BUILDING = "BUILDING"
ACTIVE = "ACTIVE"
STOPPED = "STOPPED"
SUSPENDED = "SUSPENDED"
ERROR = "ERROR"
DELETING = "DELETING"

# The actual state each runnable desired state ends in.
TARGET = {ACTIVE_REQ: ACTIVE, STOPPED_REQ: STOPPED, SUSPENDED_REQ: SUSPENDED}
EVENTS_KEPT = 10

# Lifecycle commands: the desired state each one asks for (reboot keeps `active`).
ACTIONS = {"start": ACTIVE_REQ, "stop": STOPPED_REQ, "suspend": SUSPENDED_REQ,
           "resume": ACTIVE_REQ, "reboot": ACTIVE_REQ}


def refusal(action: str, request: dict[str, Any], status: dict[str, Any] | None) -> str | None:
    """Why `action` makes no sense for this instance now, or None if it may be requested."""
    state = status["state"] if status else PENDING
    if request["desired"] == DELETED_REQ:
        return "it is being deleted"
    if state == ERROR:
        return f"it is in ERROR ({status.get('reason')}); destroy it and schedule again"
    if action in ("suspend", "resume") and state not in (ACTIVE, SUSPENDED):
        return f"only a running instance can be suspended or resumed; it is {state}"
    if action == "resume" and request["desired"] == STOPPED_REQ:
        return "it is requested stopped; use start"
    if action == "reboot" and (state != ACTIVE or request["desired"] != ACTIVE_REQ):
        return f"only an ACTIVE instance can be rebooted; it is {state} (requested {request['desired']})"
    return None


def requests_prefix(prefix: str, host: str | None = None) -> str:
    return f"{prefix}/requests/" + (f"{host}/" if host else "")


def request_key(prefix: str, host: str, instance: str) -> str:
    return f"{prefix}/requests/{host}/{instance}"


def instance_key(prefix: str, instance: str) -> str:
    return f"{prefix}/instances/{instance}"


def index_key(prefix: str, instance: str) -> str:
    return f"{prefix}/index/{instance}"


def alive_key(prefix: str, host: str) -> str:
    return f"{prefix}/alive/{host}"


def host_key(prefix: str, host: str) -> str:
    return f"{prefix}/hosts/{host}"


def instance_from_request_key(prefix: str, host: str, key: str | bytes) -> str | None:
    """The instance uuid at the end of a request key of `host`, or None for another key."""
    if isinstance(key, bytes):
        key = key.decode()
    head = requests_prefix(prefix, host)
    if not key.startswith(head) or "/" in key[len(head):]:
        return None
    return key[len(head):]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def encode(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def decode(raw: bytes | str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value


def new_request(uuid: str, host: str, allocations: dict, image: str | None, query: str,
                project_id: str, user_id: str, *, image_sha256: str | None = None,
                boot: dict | None = None, ssh_keys: list[str] | None = None,
                user_data: str | None = None) -> dict[str, Any]:
    resources: dict[str, int] = {}
    for alloc in allocations.values():
        for rc, amount in alloc["resources"].items():
            resources[rc] = resources.get(rc, 0) + amount
    stamp = now()
    return {"uuid": uuid, "host": host, "desired": ACTIVE_REQ, "resources": resources,
            "allocations": allocations, "image": image, "image_sha256": image_sha256, "boot": boot,
            "reboot": 0, "hostname": f"ec-{uuid[:8]}", "ssh_keys": ssh_keys or [], "user_data": user_data, "query": query,
            "project_id": project_id, "user_id": user_id,
            "created_at": stamp, "updated_at": stamp}


def new_status(uuid: str, host: str, state: str, *, reason: str | None = None,
               ip: str | None = None, domain: dict | None = None, old: dict | None = None,
               reboots: int | None = None, event: str | None = None) -> dict[str, Any]:
    """The next actual state; ip, domain and reboots carry over from `old` unless given."""
    old = old or {}
    stamp = now()
    events = list(old.get("events") or [])
    events.append({"at": stamp, "event": event or (state + (f": {reason}" if reason else ""))})
    return {"uuid": uuid, "host": host, "state": state, "reason": reason,
            "ip": ip if ip is not None else old.get("ip"),
            "domain": domain if domain is not None else old.get("domain"),
            "reboots": reboots if reboots is not None else old.get("reboots", 0),
            "updated_at": stamp, "events": events[-EVENTS_KEPT:]}


def view(request: dict | None, status: dict | None, alive: set[str] | None = None) -> dict[str, Any]:
    """One instance as users see it: requested and actual side by side."""
    base = request or status or {}
    host = base.get("host")
    return {
        "host_state": None if alive is None else ("UP" if host in alive else "DOWN"),
        "events": status.get("events", []) if status else [],
        "uuid": base.get("uuid"),
        "host": base.get("host"),
        "desired": request.get("desired") if request else None,
        "state": status["state"] if status else PENDING,
        "reason": status.get("reason") if status else None,
        "ip": status.get("ip") if status else None,
        "resources": request.get("resources") if request else None,
        "image": request.get("image") if request else None,
        "created_at": request.get("created_at") if request else None,
        "updated_at": (status or request or {}).get("updated_at"),
    }
