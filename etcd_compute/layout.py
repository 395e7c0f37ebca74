"""The etcd key layout and value formats: the whole contract between eschedule and ecompute.

All keys live under one prefix (`etcd.prefix`, default `/etcd-compute`); every value
is a JSON object, so `etcdctl get --prefix /etcd-compute` is readable as it is.

    PREFIX/requests/<host>/<instance>   REQUESTED state, written by eschedule.
        {"uuid", "host", "desired": "active" | "deleted", "resources": {"VCPU": 1, ...},
         "allocations": {<provider>: {"resources": {...}}}, "image": str | null,
         "image_sha256": str | null, "boot": {"kernel", "initrd", "cmdline"} | null,
         "hostname": str, "ssh_keys": [str], "user_data": str | null,
         "query": str, "project_id", "user_id", "created_at", "updated_at"}
        ecompute watches PREFIX/requests/<its host>/ and nothing else. `allocations`
        is exactly what eschedule claimed in Placement, so the host can size the
        domain without asking Placement.

    PREFIX/instances/<instance>         ACTUAL state, written only by the host's ecompute.
        {"uuid", "host", "state": BUILDING | ACTIVE | ERROR | DELETING,
         "reason": str | null, "ip": str | null (from the DHCP lease),
         "domain": {"name", "state", "vcpus", "memory_mb"} | null, "updated_at"}

    PREFIX/index/<instance>             {"host": <host>}: where an instance's request lives,
        written with the request in one transaction, so `eschedule UUID` needs one read.

    PREFIX/hosts/<host>                 {"uuid", "name", "hostname", "pid", "state": "up" |
        "locked", "updated_at"}: the host's own record, written by its ecompute.

Life of an instance (requested state on the left, actual on the right):

    eschedule schedule  -> desired=active          (no actual yet: shown as PENDING)
    ecompute            ->                          BUILDING -> ACTIVE | ERROR(reason)
    eschedule destroy   -> desired=deleted          DELETING
    ecompute            -> domain gone, allocation deleted in Placement, then the
                           request, index and actual keys are deleted in one transaction.

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
DELETED_REQ = "deleted"
DESIRED_STATES = (ACTIVE_REQ, DELETED_REQ)

# Actual states, written by ecompute. PENDING is derived (request without actual).
PENDING = "PENDING"
BUILDING = "BUILDING"
ACTIVE = "ACTIVE"
ERROR = "ERROR"
DELETING = "DELETING"


def requests_prefix(prefix: str, host: str | None = None) -> str:
    return f"{prefix}/requests/" + (f"{host}/" if host else "")


def request_key(prefix: str, host: str, instance: str) -> str:
    return f"{prefix}/requests/{host}/{instance}"


def instance_key(prefix: str, instance: str) -> str:
    return f"{prefix}/instances/{instance}"


def index_key(prefix: str, instance: str) -> str:
    return f"{prefix}/index/{instance}"


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
            "hostname": f"ec-{uuid[:8]}", "ssh_keys": ssh_keys or [], "user_data": user_data, "query": query,
            "project_id": project_id, "user_id": user_id,
            "created_at": stamp, "updated_at": stamp}


def new_status(uuid: str, host: str, state: str, *, reason: str | None = None,
               ip: str | None = None, domain: dict | None = None) -> dict[str, Any]:
    return {"uuid": uuid, "host": host, "state": state, "reason": reason, "ip": ip,
            "domain": domain, "updated_at": now()}


def view(request: dict | None, status: dict | None) -> dict[str, Any]:
    """One instance as users see it: requested and actual side by side."""
    base = request or status or {}
    return {
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
