"""The contract between eschedule and ecompute: etcd keys, value types, and the facts both check.

All keys live under one prefix (`etcd.prefix`, default `/etcd-compute`); every value
is a JSON object, so `etcdctl get --prefix /etcd-compute` is readable as it is.

    PREFIX/requests/<host>/<instance>   REQUESTED state, written by eschedule.
        {"uuid", "host", "desired": "active" | "stopped" | "suspended" | "deleted",
         "reboot": int (bumped by `eschedule reboot`), "start": int (bumped by `eschedule start`
         of an instance held off), "resources": {"VCPU": 1, ...},
         "allocations": {<provider>: {"resources": {...}}}, "image": str | null,
         "image_sha256": str | null, "boot": {"kernel", "initrd", "cmdline"} | null,
         "hostname": str, "ssh_keys": [str], "user_data": str | null, "config_drive": bool (false:
         no config drive, the metadata server alone; missing in records older than it: true),
         "query": str, "project_id", "user_id", "created_at", "updated_at",
         "name": str | null (unique in its project: PREFIX/names/), "flavor": str | null,
         "image_name": str | null (the catalogue entry IMAGE named), "group": {"id", "name", "policy",
         "soft"} | null (its server group, as it was when scheduled; these four are missing in
         records older than them),
         "evacuated": {"at", "from", "down_since": str | null, "forced": bool} (only once evacuated:
         its last evacuation, shown among the instance's events, as its new host starts them afresh),
         "shutdown": {"timeout": float | null, "force": bool} (how the last `stop` or `reboot` asked
         the guest to go down: seconds of clean shutdown before the plug is pulled (null: the
         host's stop_timeout), or at once; missing in records older than it: the host's default),
         "volumes": [{"id", "image", "pool"}] (the volumes to attach, in order: their RBD images in
         the pool whose sharing provider is `pool`; missing in records older than it: none)}
        ecompute watches PREFIX/requests/<its host>/ and nothing else. `allocations`
        is exactly what eschedule claimed in Placement, so the host can size the
        domain without asking Placement.

    PREFIX/instances/<instance>         ACTUAL state, written only by the host's ecompute.
        {"uuid", "host", "state": BUILDING | ACTIVE | STOPPED | SUSPENDED | CRASHED | ERROR | DELETING,
         "reason": str | null, "ip": str | null (reserved before boot, or from the DHCP lease on a
         plain bridge), "reboots": int (handled), "held": int | null (powered off by the guest
         or outside ecompute while requested running, at the request's `start` counter: it
         stays off until `start` passes it, as Nova's instances do),
         "domain": {"name", "state", "vcpus", "memory_mb"} | null, "updated_at",
         "crashes": int (the guest's panics in a row, since it last reported ready or was
         started by its user; missing in records older than it: 0),
         "booted_at": str | null (when the host last started the domain: this boot began),
         "ready_at": str | null (when the guest said this boot had finished: POST to the
         metadata server's READY_PATH; null until then, and again from every new boot on and
         while the guest does not run),
         "volumes": [id] (the volumes attached to its domain now; missing in older records: none),
         "events": [{"at", "event"}, ...] (the last EVENTS_KEPT, oldest first)}

    PREFIX/volumes/<id>                 {"id", "name": str | null, "project_id", "user_id", "size_gb",
        "pool" (the provider of the pool's DISK_GB in Placement: the volume's allocation, with the
        volume's id as its consumer), "pool_name", "image" (its RBD image: vol-<id>), "state":
        "creating" | "available" | "deleting", "instance": uuid | null (the instance it was last
        attached to: it is attached while that instance's request or status names it, and free once
        neither does), "created_at", "updated_at"}: a volume, written only by the user's side
        (eschedule/volumes.py), which also creates and removes its image in Ceph.

    PREFIX/consoles/<instance>          {"uuid", "host", "offset", "text", "boot", "updated_at"}: the
        tail of the guest's serial console log of its current boot (its last CONSOLE_KEPT
        bytes, starting at byte `offset` of that boot's log, undecodable bytes as surrogate
        escapes; `boot`: its number, missing in records older than it), published by the host
        while it changes; fenced like the actual state, removed with the instance.

    PREFIX/consoles/<instance>/<boot>   {"uuid", "host", "boot", "started_at", "size", "head", "tail",
        "updated_at"}: one boot of the guest (each start of its domain by its host; <boot> zero-
        padded to 6 digits): its first CONSOLE_HEAD bytes and last CONSOLE_BOOT_TAIL bytes of
        `size` (surrogate escapes as above), for the first boot and the last few the host keeps
        (ecompute/consolefiles.py); fenced, and removed with the instance, like the tail.

    PREFIX/index/<instance>             {"host": <host>, "project": str, "name": str | null}: where
        an instance's request lives (and whose it is, for finding it by a uuid prefix), written with
        the request in one transaction, so `eschedule UUID` needs one read. Older ones hold only "host".

    PREFIX/names/<project>/<name>       {"uuid", "project", "name"}: an instance's name, unique in
        its project because it is created (compared absent) in the transaction that writes the
        request and removed in the one that removes the instance's keys.

    PREFIX/flavors/<name>               {"name", "resources": {class: n}, "required": [trait],
        "extra": str | null (more of Placement's query), "created_at"}: a named size, made by an
        operator (`eschedule flavor create`); `--flavor NAME` is its query.

    PREFIX/images/<scope>/<name>        {"name", "scope", "url", "sha256", "boot": Boot | null,
        "aliases": [str], "created_at"} or, for an alias, {"name", "scope", "alias_of"}: the image
        catalogue. `scope` is a project, or "_public" for what every project sees; an image and its
        aliases are created and deleted in one transaction, each compared absent.

    PREFIX/groups/<project>/<name>      {"id", "name", "project", "policy": "anti-affinity" |
        "affinity", "soft": bool, "created_at"}: a server group.

    PREFIX/placed/<group id>/<host>/<instance>  {"uuid", "host", "group"}: a member of a server group
        on a host. Written in the transaction that writes the member's request, which for a hard
        rule also compares that no member is on that host (anti-affinity) or on any other host
        (affinity) and that the group is the one read; moved with the request by an evacuation,
        removed with the instance's keys. Any number of concurrent schedulers cannot break a rule.

    PREFIX/hosts/<host>                 {"uuid", "name", "hostname", "pid", "state": "up" |
        "locked" | "unhealthy" (its hypervisor does not answer: nothing new is placed there),
        "reason": str | null, "network": str | null (what guests' NICs attach to: an instance
        there is only done with an IP), "lease_ttl": int, "fence_margin": float | null (null:
        the host does not fence itself), "metrics": "HOST:PORT" | null (where its ecompute serves
        /metrics, and /history/<uuid>: the last hour of an instance's counters, which the API's
        graphs read; missing in older records), "pool": str | null (the sharing provider of the
        Ceph pool its disks and volumes are in; null or missing: local disks, no volumes),
        "updated_at"}: the host's own record, written by its ecompute.

    PREFIX/alive/<host>                 {"uuid", "pid", "since"} on an etcd lease of `lease_ttl`
        seconds that ecompute keeps refreshing: present = the host is UP. When ecompute dies
        the lease lapses, the key vanishes, and eschedule stops placing instances there.

    PREFIX/pools/<provider>             {"provider", "name"}: a shared storage pool (Ceph RBD) whose
        DISK_GB its sharing provider in Placement offers the hosts of its shard aggregates; written
        by those hosts when they register. eschedule narrows a query to a shard of the plain hosts
        and of each pool at once (placement.shard_aggregate).

    PREFIX/down/<host>                  {"host", "since", "by"}: when a host was first seen DOWN (its
        alive key gone), written by whoever noticed first (the evacuator, `eschedule hosts`,
        `evacuate`, `list`, `show`) only while no alive key exists, and deleted by the host in the same
        transaction that creates its alive key again. An evacuation moves an instance only if the
        host has been DOWN for lease_ttl + fence_margin + grace since `since`, and its move
        compares that the alive key is still absent and this record unchanged (see fence.py for
        why the host's domains are stopped by then).

    PREFIX/evacuator                    {"pid", "hostname", "since"} on an etcd lease of `evacuate.leader_ttl`
        seconds: the evacuator (`eschedule evacuate --auto`) that acts; created only where none
        exists, refreshed by its holder, revoked when it stops. The others wait for it to lapse.

    PREFIX/tokens/<id>                  {"id", "sha256" (of the whole token, which is never
        stored), "project", "role": "member" | "admin", "name", "created_at"}: a bearer token of
        the API server, made and revoked with `eschedule token`; the token is `ect_<id>_<secret>`.

    PREFIX/quotas/<project>             {"project", "limits": {"instances": n, <resource class>: n},
        "updated_at"}: a project's limits (`eschedule quota`); what is left out is unlimited.
        Usage is Placement's (GET /usages?project_id=), never counted here.

The states and their transitions live in states.py. Beyond them:

    eschedule destroy   -> desired=deleted; the host destroys the domain, deletes the
                           allocation in Placement, then removes the request, index and
                           actual keys in one transaction.
    eschedule evacuate  -> the request moves to another host (and its allocation with it);
                           the old actual key is dropped and the new host builds it.

ecompute always works towards `desired` from whatever the actual state is, so a request
written twice, a restart or a missed event changes nothing. eschedule refuses requests that
make no sense for the actual state (states.refusal) before writing anything, so no request
is ever left that the host cannot carry out. ERROR is final: destroy the instance.

A request is never deleted by eschedule: it is marked deleted and the host finishes
the deletion (like a Kubernetes finalizer), so the allocation is freed only once
the domain is really gone.

The rule every writer follows: an etcd write that depends on something read compares,
in the same transaction, against what was read (its mod_revision, or create_revision
for existence); on a conflict the writer reads again and decides again. A Placement
write that frees or moves an allocation first checks that it still belongs where the
caller thinks (the consumer generation). Requested state is written only by eschedule,
actual state only by the instance's host.
"""

from __future__ import annotations

import json
import uuid as uuidlib
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, NotRequired
from urllib.parse import urlsplit

# (typing's TypedDict before Python 3.12 lacks what pydantic needs to describe these in the
# API's OpenAPI document.)
from typing_extensions import TypedDict

from etcd_compute.states import COMMANDS, Actual, Command, Desired, Role, refusal

EVENTS_KEPT = 10
# Placement's largest integer (amounts in queries, inventory values).
MAX_AMOUNT = 2**31 - 1
# The largest cloud-init user-data accepted: eschedule refuses more, the host never sees more.
MAX_USER_DATA = 64 * 1024
# The most ssh keys one instance takes (each at most inputs.MAX_KEY bytes): with the user-data, a
# request stays far below etcd's largest request (1.5 MiB by default), and a bad one is refused as
# bad input before anything is claimed, never by etcd after the claim.
MAX_SSH_KEYS = 32
CONSOLE_KEPT = 64 * 1024  # bytes of console output published per instance, of its current boot
CONSOLE_HEAD = 16 * 1024  # bytes of each boot's console kept from its start ...
CONSOLE_BOOT_TAIL = 16 * 1024  # ... and from its end

# -- value types (the JSON objects stored under each key) ----------------------------------

Allocations = dict[str, dict[str, dict[str, int]]]  # {provider: {"resources": {class: amount}}}


class Boot(TypedDict):
    kernel: str | None
    initrd: str | None
    cmdline: str | None


# A request's last evacuation: from which host, and whether its fence window was waited out
# (`down_since`: since when the host was DOWN) or skipped (`forced`: the operator fenced it by
# hand). The functional form, as "from" is a keyword.
Evacuated = TypedDict("Evacuated", {"at": str, "from": str, "down_since": str | None, "forced": bool})


class GroupRef(TypedDict):
    """A request's server group, as it was when the request was written (a group's policy never
    changes), so that whoever moves or removes the instance knows its rule without a read."""

    id: str
    name: str
    policy: str  # anti-affinity | affinity
    soft: bool


class Shutdown(TypedDict):
    """How a stop or reboot shuts the guest down: `force` pulls the plug at once; otherwise the
    guest has `timeout` seconds (None: the host's stop_timeout) to power itself off cleanly."""

    timeout: float | None
    force: bool


MAX_STOP_TIMEOUT = 3600.0  # seconds: the longest clean shutdown a stop or reboot may ask for


class VolumeRef(TypedDict):
    """A volume as a request names it: what its host needs to attach it."""

    id: str
    image: str  # its RBD image in the pool (vol-<id>)
    pool: str  # the pool's sharing provider: the host attaches it only if that is its own pool


class Request(TypedDict):
    """PREFIX/requests/<host>/<instance>: the requested state."""

    uuid: str
    host: str
    desired: str  # a Desired value
    reboot: int
    start: int  # missing in records older than it: read with .get("start", 0)
    resources: dict[str, int]
    allocations: Allocations
    image: str | None
    image_sha256: str | None
    boot: Boot | None
    hostname: str
    ssh_keys: list[str]
    user_data: str | None
    query: str
    project_id: str
    user_id: str
    created_at: str
    updated_at: str
    evacuated: NotRequired[Evacuated]
    # Missing in records older than them: read with .get().
    name: NotRequired[str | None]
    flavor: NotRequired[str | None]
    image_name: NotRequired[str | None]
    group: NotRequired[GroupRef | None]
    shutdown: NotRequired[Shutdown]
    config_drive: NotRequired[bool]
    volumes: NotRequired[list[VolumeRef]]


class Event(TypedDict):
    at: str
    event: str


class DomainRecord(TypedDict):
    uuid: str
    name: str
    state: str  # libvirt's word, for people: running, paused, shutoff, ...
    vcpus: int
    memory_mb: int


class Status(TypedDict):
    """PREFIX/instances/<instance>: the actual state, written only by the host."""

    uuid: str
    host: str
    state: str  # an Actual value
    reason: str | None
    ip: str | None
    domain: DomainRecord | None
    reboots: int
    held: int | None  # missing in records older than it: read with .get("held")
    crashes: NotRequired[int]  # the guest's panics in a row (reconciler.drift)
    booted_at: NotRequired[str | None]  # when the host last started the domain
    ready_at: NotRequired[str | None]  # when the guest said that boot had finished (None: not yet)
    volumes: NotRequired[list[str]]  # the volumes attached to its domain now (missing in older records: none)
    updated_at: str
    events: list[Event]


class View(TypedDict):
    """One instance as users see it: requested and actual side by side."""

    name: str | None
    project_id: str | None
    host_state: str | None
    host_down_since: str | None  # since when its host has been DOWN (PREFIX/down/<host>), if it is
    events: list[Event]
    uuid: str | None
    host: str | None
    desired: str | None
    state: str
    reason: str | None
    ip: str | None
    ready_at: str | None  # when the guest said its current boot had finished (None: not yet, or not running)
    resources: dict[str, int] | None
    image: str | None
    flavor: str | None
    group: str | None
    volumes: list[str]  # the volumes its request names (attached, or being attached)
    host_name: str | None  # the name its ecompute gave its host (the reader fills it in)
    created_at: str | None
    updated_at: str | None


class Volume(TypedDict):
    """PREFIX/volumes/<id>: a volume (written only by the user's side)."""

    id: str
    name: str | None
    project_id: str
    user_id: str
    size_gb: int
    pool: str  # the pool's sharing provider in Placement
    pool_name: str  # the Ceph pool
    image: str  # its RBD image in the pool
    state: str  # a VolumeState value
    instance: str | None  # the instance it was last attached to (see volume_state)
    created_at: str
    updated_at: str


class VolumeState(StrEnum):
    """What a volume is doing: its record's state, or where it stands with its instance."""

    CREATING = "creating"  # recorded; its allocation and image are being made
    AVAILABLE = "available"  # free
    ATTACHING = "attaching"  # its instance's request names it, its host has not attached it yet
    IN_USE = "in-use"  # attached to its instance's domain
    DETACHING = "detaching"  # no longer requested, its host has not detached it yet
    DELETING = "deleting"  # its image and allocation are being removed


class VolumeView(TypedDict):
    """A volume as users see it: its record, and where it stands with its instance."""

    id: str
    name: str | None
    project_id: str
    size_gb: int
    pool_name: str
    state: str  # a VolumeState value
    instance: str | None  # attached (or attaching, or detaching) to it; None when available
    created_at: str


MAX_VOLUMES = 16  # per instance (virtio disks vdb..vdq)


def volume_state(volume: Volume, request: Request | None, status: Status | None) -> VolumeState:
    """Where a volume stands, from its record and its instance's request and status (as read)."""
    if volume["state"] != VolumeState.AVAILABLE:
        return VolumeState(volume["state"])
    requested = request is not None and any(v["id"] == volume["id"] for v in request.get("volumes") or [])
    attached = status is not None and volume["id"] in (status.get("volumes") or [])
    if requested:
        return VolumeState.IN_USE if attached else VolumeState.ATTACHING
    return VolumeState.DETACHING if attached else VolumeState.AVAILABLE


class Console(TypedDict):
    """PREFIX/consoles/<instance>: the tail of the serial console, published by the host."""

    uuid: str
    host: str
    offset: int  # where `text` starts in the log file (a smaller one than before: it was rotated)
    text: str
    boot: NotRequired[int]  # whose boot's log (a new boot starts a new log)
    updated_at: str


class ConsoleBoot(TypedDict):
    """PREFIX/consoles/<instance>/<boot>: the head and tail of one boot's console output."""

    uuid: str
    host: str
    boot: int
    started_at: str | None  # when the host started the domain (None: from before boots were counted)
    size: int  # bytes the guest wrote this boot
    head: str  # its first CONSOLE_HEAD bytes (surrogate escapes)
    tail: str  # its last CONSOLE_BOOT_TAIL bytes after the head
    updated_at: str


class Token(TypedDict):
    """PREFIX/tokens/<id>: an API token, by the hash of its secret."""

    id: str
    sha256: str
    project: str
    role: str  # a Role value
    name: str
    created_at: str


class Quota(TypedDict):
    """PREFIX/quotas/<project>: a project's limits ("instances" and resource classes)."""

    project: str
    limits: dict[str, int]
    updated_at: str


class Usage(TypedDict):
    """A project's usage (Placement's: instances and resource classes) beside its limits."""

    project: str
    usage: dict[str, int]
    limits: dict[str, int]


INSTANCES = "instances"  # the quota on the number of instances (the others are resource classes) ...
VOLUMES = "volumes"  # ... and on the number of volumes
COUNTED = (INSTANCES, VOLUMES)


class HostRecord(TypedDict):
    """PREFIX/hosts/<host>."""

    uuid: str
    name: str
    hostname: str
    pid: int
    state: str  # up | locked | unhealthy
    reason: str | None  # why unhealthy (missing in records older than it)
    network: str | None  # "network <name>", "bridge <name>", or None (no NIC)
    lease_ttl: int  # missing in records older than these two: read with .get()
    fence_margin: float | None  # None: the host does not fence itself
    metrics: NotRequired[str | None]  # HOST:PORT of its /metrics and /history (missing in older records)
    pool: NotRequired[str | None]  # the sharing provider of the Ceph pool its disks are in (None: local disks)
    updated_at: str


class Flavor(TypedDict):
    """PREFIX/flavors/<name>: a named size."""

    name: str
    resources: dict[str, int]
    required: list[str]
    extra: str | None
    created_at: str


class Image(TypedDict):
    """PREFIX/images/<scope>/<name>: an entry of the image catalogue."""

    name: str
    scope: str  # a project, or PUBLIC
    url: str
    sha256: str
    boot: Boot | None
    aliases: list[str]
    created_at: str


PUBLIC = "_public"  # the scope of the images every project sees (no project name starts with "_")


class Group(TypedDict):
    """PREFIX/groups/<project>/<name>: a server group."""

    id: str
    name: str
    project: str
    policy: str  # anti-affinity | affinity
    soft: bool
    created_at: str


class DownRecord(TypedDict):
    """PREFIX/down/<host>: since when a host has been seen DOWN, and by whom."""

    host: str
    since: str
    by: str


# -- keys -----------------------------------------------------------------------------------

def requests_prefix(prefix: str, host: str | None = None) -> str:
    return f"{prefix}/requests/" + (f"{host}/" if host else "")


def request_key(prefix: str, host: str, instance: str) -> str:
    return f"{prefix}/requests/{host}/{instance}"


def instance_key(prefix: str, instance: str) -> str:
    return f"{prefix}/instances/{instance}"


def console_key(prefix: str, instance: str) -> str:
    return f"{prefix}/consoles/{instance}"


def console_boot_key(prefix: str, instance: str, boot: int) -> str:
    return f"{prefix}/consoles/{instance}/{boot:06d}"


def console_boots_prefix(prefix: str, instance: str) -> str:
    return f"{prefix}/consoles/{instance}/"


def boot_bytes(boot: ConsoleBoot) -> bytes:
    """What a boot's record holds, as the bytes the guest wrote, with a line saying how much of
    its middle is not kept."""
    head, tail = (boot[k].encode("utf-8", "surrogateescape") for k in ("head", "tail"))
    left_out = boot["size"] - len(head) - len(tail)
    return head + (f"\n[... {left_out} bytes of boot {boot['boot']} not kept ...]\n".encode() if left_out > 0
                   else b"") + tail


class BootView(TypedDict):
    """One boot of a console as users get it in JSON: its record's text, decoded."""

    uuid: str
    host: str
    boot: int
    started_at: str | None
    size: int
    text: str  # head, a line saying how much is not kept, tail; undecodable bytes replaced


def boot_view(boot: ConsoleBoot) -> BootView:
    return {"uuid": boot["uuid"], "host": boot["host"], "boot": boot["boot"], "started_at": boot["started_at"],
            "size": boot["size"], "text": boot_bytes(boot).decode("utf-8", "replace")}


def boots_bytes(boots: list[ConsoleBoot], titled: bool) -> bytes:
    """Boots' console output one after another (`eschedule console --boot N | --all`, the API's
    ?boot= and ?all=), each after a line naming it if `titled`."""
    out = b""
    for b in boots:
        if titled:
            out += (b"" if out.endswith(b"\n") or not out else b"\n") + (
                f"===== boot {b['boot']}, started {b['started_at'] or 'before boots were counted'}, "
                f"{b['size']} bytes =====\n").encode()
        out += boot_bytes(b)
    return out


def console_bytes(console: Console) -> tuple[bytes, int]:
    """The console output a record holds, as the bytes the guest wrote, and the byte of the log
    where it ends."""
    data = console["text"].encode("utf-8", "surrogateescape")
    return data, console["offset"] + len(data)


def index_key(prefix: str, instance: str) -> str:
    return f"{prefix}/index/{instance}"


def alive_key(prefix: str, host: str) -> str:
    return f"{prefix}/alive/{host}"


def host_key(prefix: str, host: str) -> str:
    return f"{prefix}/hosts/{host}"


def pool_key(prefix: str, provider: str) -> str:
    return f"{prefix}/pools/{provider}"


def down_key(prefix: str, host: str) -> str:
    return f"{prefix}/down/{host}"


def evacuator_key(prefix: str) -> str:
    return f"{prefix}/evacuator"


def token_key(prefix: str, token_id: str) -> str:
    return f"{prefix}/tokens/{token_id}"


def quota_key(prefix: str, project: str) -> str:
    return f"{prefix}/quotas/{project}"


def name_key(prefix: str, project: str, name: str) -> str:
    return f"{prefix}/names/{project}/{name}"


def flavor_key(prefix: str, name: str) -> str:
    return f"{prefix}/flavors/{name}"


def image_key(prefix: str, scope: str, name: str) -> str:
    return f"{prefix}/images/{scope}/{name}"


def volume_key(prefix: str, volume: str) -> str:
    return f"{prefix}/volumes/{volume}"


def volumes_prefix(prefix: str) -> str:
    return f"{prefix}/volumes/"


def group_key(prefix: str, project: str, name: str) -> str:
    return f"{prefix}/groups/{project}/{name}"


def placed_prefix(prefix: str, group: str, host: str | None = None) -> str:
    return f"{prefix}/placed/{group}/" + (f"{host}/" if host else "")


def placed_key(prefix: str, group: str, host: str, instance: str) -> str:
    return f"{prefix}/placed/{group}/{host}/{instance}"


def prefix_end(key: str) -> str:
    """The end of the range of keys that start with `key` (etcd's range_end for a prefix)."""
    return key[:-1] + chr(ord(key[-1]) + 1)


def instance_from_request_key(prefix: str, host: str, key: str | bytes) -> str | None:
    """The instance uuid at the end of a request key of `host`, or None for another key."""
    if isinstance(key, bytes):
        key = key.decode()
    head = requests_prefix(prefix, host)
    if not key.startswith(head) or "/" in key[len(head):]:
        return None
    return key[len(head):]


# -- encoding -------------------------------------------------------------------------------

def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def stamp(seconds: float) -> str:
    """Epoch seconds as the records' timestamps are written (now())."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


def seconds_of(timestamp: str | None) -> float | None:
    """A record's timestamp as epoch seconds; None for none, or one that is no timestamp."""
    try:
        return datetime.fromisoformat(timestamp).timestamp() if timestamp else None
    except (TypeError, ValueError):
        return None


def encode(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def decode(raw: bytes | str | None) -> Any:
    """A JSON object from etcd, or None for a missing key; ValueError for anything else."""
    if raw is None:
        return None
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value


# -- reading values back: a daemon must never die of data ---------------------------------

class BadRecord(ValueError):
    """A value under the prefix that is not what the contract says; the message says why."""


def _is(kind: type) -> Any:
    return lambda v: isinstance(v, kind) and not isinstance(v, bool)


def _optional(kind: type) -> Any:
    return lambda v: v is None or isinstance(v, kind)


def _amounts(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(n, int) and not isinstance(n, bool)
                                           and n > 0 for k, n in value.items())


def _timestamp(value: str) -> bool:
    try:
        return datetime.fromisoformat(value).tzinfo is not None
    except ValueError:
        return False


def _boot(value: Any) -> bool:
    return value is None or (isinstance(value, dict) and all(
        isinstance(value.get(k), str | None) for k in ("kernel", "initrd", "cmdline")))


# The fields a reader relies on, each with its check. Others may be there (or missing) harmlessly.
_REQUEST_FIELDS: dict[str, Any] = {
    "uuid": _is(str), "host": _is(str), "desired": lambda v: v in set(Desired), "reboot": _is(int),
    "resources": _amounts, "allocations": _is(dict), "image": _optional(str), "image_sha256": _optional(str),
    "boot": _boot, "ssh_keys": lambda v: isinstance(v, list) and all(isinstance(k, str) for k in v),
    "user_data": _optional(str), "query": _is(str),
}
_STATUS_FIELDS: dict[str, Any] = {
    "uuid": _is(str), "host": _is(str), "state": lambda v: v in set(Actual) and v != Actual.PENDING,
    "reason": _optional(str), "ip": _optional(str), "domain": _optional(dict), "reboots": _is(int),
    "events": _is(list),
}
_CONSOLE_FIELDS: dict[str, Any] = {"uuid": _is(str), "host": _is(str), "offset": _is(int), "text": _is(str)}
_BOOT_FIELDS: dict[str, Any] = {"uuid": _is(str), "host": _is(str), "boot": _is(int), "size": _is(int),
                                "head": _is(str), "tail": _is(str), "started_at": _optional(str)}
_TOKEN_FIELDS: dict[str, Any] = {"id": _is(str), "sha256": _is(str), "project": _is(str),
                                 "role": lambda v: v in set(Role), "name": _is(str)}
_DOWN_FIELDS: dict[str, Any] = {"host": _is(str), "since": lambda v: isinstance(v, str) and _timestamp(v)}
_QUOTA_FIELDS: dict[str, Any] = {
    "project": _is(str),
    "limits": lambda v: isinstance(v, dict) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                    for n in v.values())}


_FLAVOR_FIELDS: dict[str, Any] = {
    "name": _is(str), "resources": _amounts,
    "required": lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v), "extra": _optional(str)}
_IMAGE_FIELDS: dict[str, Any] = {
    "name": _is(str), "scope": _is(str), "url": _is(str), "sha256": _is(str), "boot": _boot,
    "aliases": lambda v: isinstance(v, list) and all(isinstance(a, str) for a in v)}
_VOLUME_FIELDS: dict[str, Any] = {
    "id": _is(str), "name": _optional(str), "project_id": _is(str), "size_gb": lambda v: _is(int)(v) and v > 0,
    "pool": _is(str), "image": _is(str), "state": lambda v: v in (VolumeState.CREATING, VolumeState.AVAILABLE,
                                                                 VolumeState.DELETING),
    "instance": _optional(str)}
POLICIES = ("anti-affinity", "affinity")
_GROUP_FIELDS: dict[str, Any] = {
    "id": _is(str), "name": _is(str), "project": _is(str), "policy": lambda v: v in POLICIES,
    "soft": lambda v: isinstance(v, bool)}


def _parse(raw: bytes | str | None, fields: dict[str, Any], what: str, uuid: str | None) -> Any:
    if raw is None:
        return None
    try:
        value = decode(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRecord(f"{what} is not a JSON object ({exc})") from None
    for name, check in fields.items():
        if name not in value or not check(value[name]):
            raise BadRecord(f"{what} has a bad or missing {name!r}: {value.get(name)!r:.80}")
    if uuid is not None and value["uuid"] != uuid:
        raise BadRecord(f"{what} names instance {value['uuid']!r:.40}, not {uuid}")
    return value


def parse_request(raw: bytes | str | None, uuid: str | None = None) -> Request | None:
    """The request stored at a key (of instance `uuid`), checked; BadRecord if it is not one."""
    return _parse(raw, _REQUEST_FIELDS, "request", uuid)


def parse_console(raw: bytes | str | None, uuid: str | None = None) -> Console | None:
    """The console tail stored at a key, checked; BadRecord if it is not one."""
    return _parse(raw, _CONSOLE_FIELDS, "console", uuid)


def parse_console_boot(raw: bytes | str | None, uuid: str | None = None) -> ConsoleBoot | None:
    """One boot's console record, checked; BadRecord if it is not one."""
    return _parse(raw, _BOOT_FIELDS, "console boot", uuid)


def parse_status(raw: bytes | str | None, uuid: str | None = None) -> Status | None:
    """The actual state stored at a key (of instance `uuid`), checked; BadRecord if it is not one."""
    return _parse(raw, _STATUS_FIELDS, "status", uuid)


def parse_token(raw: bytes | str | None) -> Token | None:
    return _parse(raw, _TOKEN_FIELDS, "token", None)


def parse_quota(raw: bytes | str | None) -> Quota | None:
    return _parse(raw, _QUOTA_FIELDS, "quota", None)


def parse_flavor(raw: bytes | str | None) -> Flavor | None:
    return _parse(raw, _FLAVOR_FIELDS, "flavor", None)


def parse_image(raw: bytes | str | None) -> Image | None:
    """A catalogue entry (an alias reads as BadRecord: Store.image follows it)."""
    return _parse(raw, _IMAGE_FIELDS, "image", None)


def parse_volume(raw: bytes | str | None) -> Volume | None:
    return _parse(raw, _VOLUME_FIELDS, "volume", None)


def volume_refs(request: Request) -> list[VolumeRef]:
    """The volumes a request asks to attach, those well formed (a malformed entry is left out:
    a host never dies of data)."""
    found = request.get("volumes")
    if not isinstance(found, list):
        return []
    return [v for v in found if isinstance(v, dict) and all(isinstance(v.get(k), str) for k in ("id", "image", "pool"))]


def parse_group(raw: bytes | str | None) -> Group | None:
    return _parse(raw, _GROUP_FIELDS, "server group", None)


def parse_down(raw: bytes | str | None) -> DownRecord | None:
    """A host's DOWN record, checked (`since` must be a time with its zone); BadRecord if not one."""
    return _parse(raw, _DOWN_FIELDS, "DOWN record", None)


# -- facts both sides check -----------------------------------------------------------------

def looks_like_uuid(text: str) -> bool:
    try:
        uuidlib.UUID(text)
        return True
    except ValueError:
        return False


def held_off(request: Request, status: Status | None) -> bool:
    """The instance is off because its guest (or someone outside ecompute) powered it off, or
    its guest crashed, and no `eschedule start` came since: the host leaves it off, and it
    counts as settled."""
    held = status.get("held") if status else None
    return (status is not None and held is not None and status["state"] in (Actual.STOPPED, Actual.CRASHED)
            and request.get("start", 0) <= held)


def commanded(command: Command, request: Request, status: Status | None,
              shutdown: Shutdown | None = None) -> Request | str | None:
    """The request after `command` (with a stop's or reboot's `shutdown`); None if it changes
    nothing; a str: why it is refused (states.refusal), nothing to write. Pure, so that every
    request it accepts can be shown to settle on the host (tests/test_properties.py)."""
    actual = Actual(status["state"]) if status else Actual.PENDING
    reason = refusal(command, Desired(request["desired"]), actual, status and status.get("reason"))
    if reason:
        return reason
    new = Request(**request)
    if shutdown is not None:
        new["shutdown"] = shutdown
    if command == Command.REBOOT:
        new["reboot"] = request.get("reboot", 0) + 1
        return new
    if command == Command.START and status is not None and held_off(request, status):
        new["start"] = (status.get("held") or 0) + 1  # its guest powered it off: start it again
        new["desired"] = Desired.ACTIVE
        return new
    if request["desired"] == COMMANDS[command] and new.get("shutdown") == request.get("shutdown"):
        return None
    new["desired"] = COMMANDS[command]
    return new


def shutdown_of(request: Request) -> tuple[float | None, bool]:
    """(timeout, force) of the request's last stop or reboot; a missing or malformed `shutdown`
    (a record older than it) reads as the host's default: (None, False)."""
    found: Any = request.get("shutdown")
    if not isinstance(found, dict):
        return None, False
    timeout, force = found.get("timeout"), found.get("force") is True
    if isinstance(timeout, int | float) and not isinstance(timeout, bool) and 0 < timeout <= MAX_STOP_TIMEOUT:
        return float(timeout), force
    return None, force


def image_ref_problem(ref: str) -> str | None:
    """Why the hosts cannot fetch `ref`, or None: eschedule refuses it before claiming,
    the host refuses it again before fetching."""
    scheme = urlsplit(ref).scheme
    if scheme not in ("http", "https", "file", "") or (scheme == "" and not ref.startswith("/")):
        return f"image {ref!r}: expected an http(s):// or file:// URL or an absolute path"
    return None


# -- building values ------------------------------------------------------------------------

def new_request(uuid: str, host: str, allocations: Allocations, image: str | None, query: str,
                project_id: str, user_id: str, *, image_sha256: str | None = None,
                boot: Boot | None = None, ssh_keys: list[str] | None = None,
                user_data: str | None = None, name: str | None = None, flavor: str | None = None,
                image_name: str | None = None, group: GroupRef | None = None,
                config_drive: bool = True) -> Request:
    """A new request; its name is the guest's hostname (cloud-init's local-hostname, which
    user-data may override), else ec-<uuid prefix>."""
    resources: dict[str, int] = {}
    for alloc in allocations.values():
        for rc, amount in alloc["resources"].items():
            resources[rc] = resources.get(rc, 0) + amount
    stamp = now()
    return {"uuid": uuid, "host": host, "desired": Desired.ACTIVE, "resources": resources,
            "allocations": allocations, "image": image, "image_sha256": image_sha256, "boot": boot,
            "reboot": 0, "start": 0, "hostname": name or f"ec-{uuid[:8]}", "ssh_keys": ssh_keys or [],
            "user_data": user_data, "query": query, "project_id": project_id, "user_id": user_id,
            "config_drive": config_drive, "created_at": stamp, "updated_at": stamp, "name": name,
            "flavor": flavor, "image_name": image_name, "group": group}


# new_status(event=NO_EVENT): a change that is no event (what a job under way is doing: the
# outcome is the event), so that the few events kept are not pushed out by transient notes.
NO_EVENT = ""


def new_status(uuid: str, host: str, state: Actual, *, reason: str | None = None,
               ip: str | None = None, domain: DomainRecord | None = None, old: Status | None = None,
               reboots: int | None = None, event: str | None = None, held: int | None = None,
               crashes: int | None = None, booted_at: str | None = None, ready_at: str | None = None,
               volumes: list[str] | None = None) -> Status:
    """The next actual state; ip, domain, reboots and crashes carry over from `old` unless given,
    `held` never does (any other state the host records ends the hold). `booted_at` given: the
    domain was started anew, so it is not ready (yet); else `ready_at` carries over while the
    guest still runs (ACTIVE, or SUSPENDED in memory). `volumes` (attached now) carry over too."""
    stamp = now()
    ready = None
    if booted_at is None and old is not None:
        booted_at = old.get("booted_at")
        if state in (Actual.ACTIVE, Actual.SUSPENDED):
            ready = ready_at or old.get("ready_at")
    events = list(old.get("events") or []) if old else []
    if event != NO_EVENT:
        events.append({"at": stamp, "event": event or (state + (f": {reason}" if reason else ""))})
    return {"uuid": uuid, "host": host, "state": state, "reason": reason,
            "ip": ip if ip is not None else (old.get("ip") if old else None),
            "domain": domain if domain is not None else (old.get("domain") if old else None),
            "reboots": reboots if reboots is not None else (old.get("reboots", 0) if old else 0),
            "held": held, "updated_at": stamp, "events": events[-EVENTS_KEPT:],
            "crashes": crashes if crashes is not None else (old.get("crashes", 0) if old else 0),
            "booted_at": booted_at, "ready_at": ready,
            "volumes": volumes if volumes is not None else list((old.get("volumes") or []) if old else [])}


def view(request: Request | None, status: Status | None, alive: set[str] | None = None) -> View:
    """One instance as users see it: requested and actual side by side. Its last evacuation is
    among its events (its new host starts them afresh); host_down_since is the reader's to fill."""
    base = request or status
    host = base["host"] if base else None
    events = list(status.get("events", [])) if status else []
    if request and request.get("evacuated"):
        events = sorted([evacuation_event(request["evacuated"]), *events], key=lambda e: e["at"])
    group = request.get("group") if request else None
    return {
        "name": request.get("name") if request else None,
        "project_id": request.get("project_id") if request else None,
        "host_state": None if alive is None else ("UP" if host in alive else "DOWN"),
        "host_down_since": None,
        "events": events,
        "uuid": base["uuid"] if base else None,
        "host": host,
        "desired": request.get("desired") if request else None,
        "state": status["state"] if status else Actual.PENDING,
        "reason": status.get("reason") if status else None,
        "ip": status.get("ip") if status else None,
        "ready_at": status.get("ready_at") if status else None,
        "resources": request.get("resources") if request else None,
        "image": (request.get("image_name") or request.get("image")) if request else None,
        "flavor": request.get("flavor") if request else None,
        "group": group.get("name") if isinstance(group, dict) else None,
        "volumes": [v["id"] for v in volume_refs(request)] if request else [],
        "host_name": None,
        "created_at": request.get("created_at") if request else None,
        "updated_at": (status or request or {"updated_at": None})["updated_at"],
    }


def evacuation_event(moved: Evacuated) -> Event:
    if moved.get("forced"):
        said = "with --force: its fence window was not waited for (fenced by hand, said the operator)"
    else:
        said = f"after its fence window: the host was DOWN since {moved.get('down_since')}"
    return {"at": moved["at"], "event": f"evacuated from {moved['from']} {said}"}


def bad_view(uuid: str, host: str | None, why: str, alive: set[str] | None = None) -> View:
    """An instance whose record cannot be read, as users see it: ERROR, saying why."""
    return {"name": None, "project_id": None,
            "host_state": None if alive is None else ("UP" if host in alive else "DOWN"),
            "host_down_since": None, "events": [],
            "uuid": uuid, "host": host, "desired": None, "state": Actual.ERROR,
            "reason": f"malformed record in etcd: {why}", "ip": None, "ready_at": None, "resources": None,
            "image": None, "flavor": None, "group": None, "volumes": [], "host_name": None, "created_at": None,
            "updated_at": None}
