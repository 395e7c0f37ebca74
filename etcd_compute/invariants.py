"""What must hold in a cloud, as pure functions over plain data (issues 18 and 24).

The seeded chaos run (devstack/chaos/), `eschedule audit --invariants` and tests/test_invariants.py
check the same functions: each takes what was read (from etcd, from Placement, from the
hypervisors, a series of observations) and returns the violations it finds. Nothing here reads
etcd, Placement or libvirt itself, so every invariant is tested with seeded violations in
milliseconds, and a check never differs between the chaos run and an operator's audit.

    1  no instance on two hosts: requested of one host only; one domain; the host that reports it
       settled is the one whose domain it is
    2  every domain is requested of the host that runs it          (needs the hypervisors)
    3  allocations belong to live instances, both ways: each allocation is one live instance's,
       on its host, of its resources; each live instance holds its allocation on its host only
    4  no provider over capacity
    5  every instance settled (ERROR with a reason counts), and what etcd says the hypervisor has
    6  destroyed instances are gone: keys, allocation, domain      (needs the list of destroyed)
    D  no host is UP and marked DOWN at once (contract.py: PREFIX/down/<host>)
    R  every server group's hard rule holds: an anti-affinity group's members on different hosts,
       an affinity group's on one
    C  never two running copies of one instance (a series of observations over time)
    W  no request stuck: whatever waits longer than a bound names why (its status's reason)
    V  a volume is one instance's at a time: at most one request names it, the one its record
       names; each volume holds its own size on its pool, and each allocation on a pool is an
       instance's or a volume's (given the pools' allocations; a pool serves one cloud)

Which hold at every moment and which only once the world has settled: 1, 4, D, R, C, W and V's
first half hold always (a claim over capacity that Placement lets through is given back at once: 4 may show it
for a moment, so the chaos run checks 4 at the end only); 2, 3, 5 and 6 hold once operations
have finished (a claim precedes its request; a domain outlives its request until its host
removes it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from itertools import groupby
from typing import Any

from etcd_compute import contract
from etcd_compute.contract import BadRecord, DownRecord, HostRecord, Request, Status
from etcd_compute.states import TARGET, Actual, Desired

INVARIANTS = {
    "1": "no instance on two hosts", "2": "every domain has a request on its own host",
    "3": "allocations belong to live instances", "4": "no provider over capacity",
    "5": "every instance settled", "6": "destroyed instances gone everywhere",
    "D": "no host both UP and marked DOWN", "R": "server groups' hard rules hold",
    "C": "never two running copies of one instance",
    "W": "no request stuck without a reason",
    "V": "a volume is one instance's at a time, and holds its own allocation",
}
SETTLED = {Actual.ACTIVE, Actual.STOPPED, Actual.SUSPENDED}
# The hypervisors' domains: host -> instance uuid -> its power state as an Actual value
# (ACTIVE, STOPPED, SUSPENDED); host None: a domain whose owner is none of the hosts.
Hypervisors = Mapping[str | None, Mapping[str, str]]
Names = Callable[[str | None], str]


@dataclass(frozen=True)
class Violation:
    invariant: str  # a key of INVARIANTS (the chaos run adds its own: 7, G, E)
    text: str  # one line
    uuid: str | None = None


def short(host: str | None) -> str:
    """A host as the texts name it when no names are given: the head of its uuid."""
    return (host or "?")[:8]


def _readable(parse: Callable[[bytes, str], Any], value: bytes, uuid: str) -> Any:
    try:
        return parse(value, uuid)
    except BadRecord:
        return None


@dataclass
class EtcdView:
    """What etcd holds under one prefix at one revision, decoded as eschedule reads it
    (None where a record is malformed)."""

    keys: set[str] = field(default_factory=set)  # every key, without the prefix
    requests: dict[str, list[tuple[str, Request | None]]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[str, Status | None] = field(default_factory=dict)
    alive: set[str] = field(default_factory=set)
    down: dict[str, DownRecord | None] = field(default_factory=dict)
    hosts: dict[str, HostRecord] = field(default_factory=dict)
    volumes: dict[str, contract.Volume | None] = field(default_factory=dict)

    @classmethod
    def parse(cls, prefix: str, kvs: Mapping[str, bytes]) -> EtcdView:
        """From every key and value under `prefix` (as a range read returns them)."""
        view = cls()
        head = prefix.rstrip("/") + "/"
        for key, value in kvs.items():
            if not key.startswith(head):
                continue
            view.keys.add(key[len(head) - 1:])
            parts = key[len(head):].split("/")
            kind, name = parts[0], parts[1] if len(parts) > 1 else ""
            if kind == "requests" and len(parts) == 3:
                view.requests[parts[2]].append((name, _readable(contract.parse_request, value, parts[2])))
            elif kind == "instances":
                view.statuses[name] = _readable(contract.parse_status, value, name)
            elif kind == "alive":
                view.alive.add(name)
            elif kind == "volumes":
                try:
                    view.volumes[name] = contract.parse_volume(value)
                except BadRecord:
                    view.volumes[name] = None
            elif kind in ("down", "hosts"):
                try:
                    record = contract.decode(value)
                except (ValueError, UnicodeDecodeError):
                    record = None
                if kind == "down":
                    view.down[name] = record
                elif record is not None:
                    view.hosts[name] = record
        return view

    def request(self, uuid: str) -> Request | None:
        """The one readable request of `uuid` (None: none, malformed, or several)."""
        found = self.requests.get(uuid, [])
        return found[0][1] if len(found) == 1 else None

    def instances(self) -> list[str]:
        return sorted(set(self.requests) | set(self.statuses))


@dataclass
class PlacementView:
    """What Placement holds for a set of providers (the cloud's hosts)."""

    allocations: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # provider -> consumer -> rc
    inventories: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # provider -> rc -> record
    usages: dict[str, dict[str, int]] = field(default_factory=dict)  # provider -> rc -> used

    def held(self, consumer: str) -> dict[str, dict[str, int]]:
        """Where a consumer holds resources, among these providers."""
        return {rp: found[consumer] for rp, found in self.allocations.items() if consumer in found}


# -- 1, 2: one instance, one host -----------------------------------------------------------

def one_host(etcd: EtcdView, hypervisors: Hypervisors | None = None, name: Names = short) -> list[Violation]:
    """1: each instance is requested of one host, runs as one domain, and is reported settled
    only by the host whose domain it is."""
    out = [Violation("1", f"{uuid}: requested of {len(found)} hosts: {', '.join(name(h) for h, _ in found)}", uuid)
           for uuid, found in sorted(etcd.requests.items()) if len(found) > 1]
    if hypervisors is None:
        return out
    where: dict[str, list[tuple[str | None, str]]] = defaultdict(list)
    for host, domains in hypervisors.items():
        for uuid, power in domains.items():
            where[uuid].append((host, power))
    for uuid, found in sorted(where.items()):
        if len(found) > 1:
            out.append(Violation("1", f"{uuid}: a domain on {len(found)} hosts: "
                                      f"{', '.join(f'{name(h)} ({p})' for h, p in found)}", uuid))
        status = etcd.statuses.get(uuid)
        owners = [h for h, _ in found]
        if status and status["state"] in SETTLED and status["host"] not in owners:
            out.append(Violation("1", f"{uuid}: domain ({found[0][1]}) owned by {name(owners[0])}, but "
                                      f"{name(status['host'])} reports it {status['state']}", uuid))
    return out


def requested_there(etcd: EtcdView, hypervisors: Hypervisors, name: Names = short) -> list[Violation]:
    """2: every domain is requested of the host that runs it (else nobody manages it)."""
    out = []
    for host, domains in hypervisors.items():
        for uuid, power in sorted(domains.items()):
            hosts = [h for h, _ in etcd.requests.get(uuid, [])]
            if host is None or host not in hosts:
                out.append(Violation("2", f"{uuid}: domain ({power}) owned by {name(host)} has no request there "
                                          f"(requested of: {', '.join(map(name, hosts)) or 'nobody'})", uuid))
    return out


# -- 3, 4: Placement --------------------------------------------------------------------------

def owned_allocations(etcd: EtcdView, placement: PlacementView, destroyed: Iterable[str] = (),
                      name: Names = short) -> list[Violation]:
    """3: each allocation is one live instance's, on its host, of its resources; each live
    instance (not ERROR, whose allocation its host frees) holds exactly that."""
    gone, out = set(destroyed), []
    for host, found in sorted(placement.allocations.items()):
        for consumer, resources in sorted(found.items()):
            request, status = etcd.request(consumer), etcd.statuses.get(consumer)
            why = None
            if request is None:
                why = "no instance requests it" + (" (destroyed)" if consumer in gone else "")
            elif request["host"] != host:
                why = f"its request is on {name(request['host'])}"
            elif resources != _claimed(request, host):
                why = f"its request asks for {_claimed(request, host)}"
            elif status and status["state"] == Actual.ERROR:
                why = f"it is ERROR ({status.get('reason')}), whose allocation is freed"
            if why:
                out.append(Violation("3", f"{consumer}: allocation {resources} on {name(host)}: {why}", consumer))
    for uuid in sorted(etcd.requests):
        request, status = etcd.request(uuid), etcd.statuses.get(uuid)
        if request is None or (status and status["state"] == Actual.ERROR):
            continue
        held = placement.held(uuid)
        if set(held) != {request["host"]}:
            out.append(Violation("3", f"{uuid} on {name(request['host'])} ({status and status['state']}): "
                                      f"allocations on {[name(h) for h in held] or 'nothing'}", uuid))
    return out


def _claimed(request: Request, host: str) -> dict[str, int]:
    """What the request claimed of its host: its allocation there (an rbd host's instance takes its
    DISK_GB from the pool), or all its resources in a record that lacks it."""
    found = request.get("allocations", {}).get(host, {}).get("resources")
    return found if isinstance(found, dict) else request["resources"]


def capacity(inventory: Mapping[str, Any]) -> int:
    """What a provider may hand out of one resource class, as Placement computes it."""
    return int((inventory["total"] - inventory.get("reserved", 0)) * inventory.get("allocation_ratio", 1.0))


def within_capacity(placement: PlacementView, name: Names = short) -> list[Violation]:
    """4: no provider has handed out more of a resource class than it has."""
    out = []
    for host, usages in sorted(placement.usages.items()):
        inventory = placement.inventories.get(host, {})
        for rc, used in sorted(usages.items()):
            cap = capacity(inventory[rc]) if rc in inventory else 0
            if used > cap:
                out.append(Violation("4", f"{name(host)}: {rc} used {used} > capacity {cap}"))
    return out


# -- 5, 6: settled, and gone ------------------------------------------------------------------

def waiting_for(etcd: EtcdView, uuid: str) -> str | None:
    """What `uuid` still waits for, or None (settled, ERROR with a reason, or held off)."""
    request, status = etcd.request(uuid), etcd.statuses.get(uuid)
    if request is None:
        found = len(etcd.requests.get(uuid, []))
        return "requests on several hosts" if found > 1 else "an unreadable request" if found else \
            "a status nobody requests"
    if request["desired"] == Desired.DELETED:
        return f"requested deleted, still {status['state'] if status else 'PENDING'}"
    if status is None:
        return "PENDING (no status)"
    state = Actual(status["state"])
    if status["host"] != request["host"]:
        return f"status written by another host ({status['host'][:8]})"
    if state == Actual.ERROR:
        return None if status.get("reason") else "ERROR without a reason"
    if contract.held_off(request, status):
        return None  # powered off by its guest (or by hand): it stays so until started
    if state != TARGET[Desired(request["desired"])] or status.get("reboots", 0) < request.get("reboot", 0):
        return f"{state}, requested {request['desired']} (reboot {request.get('reboot', 0)}, " \
               f"done {status.get('reboots', 0)})"
    return None


def settled(etcd: EtcdView, hypervisors: Hypervisors | None = None, name: Names = short) -> list[Violation]:
    """5: every instance has settled, and (given the hypervisors) the one domain of a settled
    instance is its host's, in the state etcd reports."""
    domains: dict[str, tuple[str | None, str]] = {}
    for host, found in (hypervisors or {}).items():
        for uuid, power in found.items():
            domains.setdefault(uuid, (host, power))
    out = []
    for uuid in etcd.instances():
        why = waiting_for(etcd, uuid)
        status = etcd.statuses.get(uuid)
        if why is None and hypervisors is not None and status and status["state"] in SETTLED:
            owner, power = domains.get(uuid, (None, "no domain"))
            if power == Actual.CRASHED and status["state"] == Actual.STOPPED:
                power = Actual.STOPPED  # off since its QEMU died ("crashed" until its next start): off
            if (owner, power) != (status["host"], status["state"]):
                why = f"{status['state']} on {name(status['host'])}, but the hypervisor has {power} " \
                      f"owned by {name(owner)}"
        if why:
            out.append(Violation("5", f"{uuid}: {why}", uuid))
    return out


def destroyed_gone(etcd: EtcdView, placement: PlacementView, destroyed: Iterable[str],
                   hypervisors: Hypervisors | None = None, name: Names = short) -> list[Violation]:
    """6: nothing of a destroyed instance is left: keys, allocation, domain."""
    out = []
    for uuid in sorted(set(destroyed)):
        left = sorted(k for k in etcd.keys if k.endswith("/" + uuid) or f"/{uuid}/" in k)  # (its console's boots)
        if placement.held(uuid):
            left.append("its allocation")
        left += [f"a domain owned by {name(h)}" for h, found in (hypervisors or {}).items() if uuid in found]
        if left:
            out.append(Violation("6", f"destroyed {uuid}, yet: {', '.join(left)}", uuid))
    return out


# -- D: UP and DOWN ----------------------------------------------------------------------------

def up_or_down(etcd: EtcdView, name: Names = short) -> list[Violation]:
    """D: a host's down record is written only while it has no alive key and removed in the
    transaction that makes its alive key again, so the two never stand together."""
    out = []
    for host in sorted(etcd.alive & set(etcd.down)):
        record = etcd.down[host]
        out.append(Violation("D", f"{name(host)}: UP (alive key) and marked DOWN since "
                                  f"{record.get('since', '?') if record else '? (unreadable record)'}"))
    return out


def group_rules(etcd: EtcdView, name: Names = short) -> list[Violation]:
    """R: the requests of a hard anti-affinity group's members are on different hosts, those of a
    hard affinity group's on one host (a deleted member counts until its keys are gone, as its
    membership does). Members are found by the group each request names."""
    hosts: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    groups: dict[str, Any] = {}
    for uuid, found in sorted(etcd.requests.items()):
        for host, request in found:
            group = request.get("group") if request else None
            if isinstance(group, dict) and not group.get("soft") and isinstance(group.get("id"), str):
                hosts[group["id"]][host].append(uuid)
                groups[group["id"]] = group
    out = []
    for gid, where in sorted(hosts.items()):
        group = groups[gid]
        label = f"{group.get('policy')} group {group.get('name')}"
        if group.get("policy") == "affinity" and len(where) > 1:
            out.append(Violation("R", f"{label}: members on {len(where)} hosts ("
                                      + ", ".join(f"{name(h)}: {len(us)}" for h, us in sorted(where.items())) + ")"))
        elif group.get("policy") == "anti-affinity":
            out += [Violation("R", f"{label}: {len(us)} members on {name(h)}", us[0])
                    for h, us in sorted(where.items()) if len(us) > 1]
    return out


# -- C: never two running copies ----------------------------------------------------------------

@dataclass(frozen=True)
class Observation:
    """At time `t` (seconds, any epoch), `host` was seen running (or no longer running) `uuid`."""

    t: float
    host: str
    uuid: str
    running: bool


@dataclass(frozen=True)
class Overlap:
    """A span during which one instance ran in two places or more."""

    uuid: str
    hosts: tuple[str, ...]
    began: float
    lasted: float
    open: bool  # still so at the last observation


def overlaps(observations: Iterable[Observation]) -> list[Overlap]:
    """Every span in which one uuid ran on two hosts or more. A host runs a uuid from an
    observation saying so until one saying otherwise; the observations of one moment count
    together (a move seen in one sample is no overlap)."""
    running: dict[str, set[str]] = defaultdict(set)
    current: dict[str, tuple[float, set[str]]] = {}
    out: list[Overlap] = []
    last = 0.0
    for t, moment in groupby(sorted(observations, key=lambda o: o.t), key=lambda o: o.t):
        last = t
        touched = set()
        for o in moment:
            (running[o.uuid].add if o.running else running[o.uuid].discard)(o.host)
            touched.add(o.uuid)
        for uuid in touched:
            hosts = running[uuid]
            if len(hosts) > 1:
                current.setdefault(uuid, (t, set()))[1].update(hosts)
            elif uuid in current:
                began, seen = current.pop(uuid)
                out.append(Overlap(uuid, tuple(sorted(seen)), began, t - began, False))
    out += [Overlap(uuid, tuple(sorted(seen)), began, last - began, True) for uuid, (began, seen) in current.items()]
    return sorted(out, key=lambda o: (o.began, o.uuid))


def two_copies(observations: Iterable[Observation], window: float = 0.0) -> list[Violation]:
    """C: no instance runs in two places at once, beyond `window` seconds (0: never; a live
    migration would need the few seconds its switch-over takes)."""
    return [Violation("C", f"{o.uuid}: ran on {len(o.hosts)} hosts at once ({', '.join(o.hosts)}) from "
                           f"t={o.began:.1f}s for {o.lasted:.1f}s{' (still at the last look)' if o.open else ''}",
                      o.uuid)
            for o in overlaps(observations) if not (window > 0 and o.lasted <= window)]


# -- W: nothing stuck without a reason ----------------------------------------------------------

def _time(stamp: Any) -> datetime | None:
    try:
        found = datetime.fromisoformat(stamp) if isinstance(stamp, str) else None
    except ValueError:
        return None
    return found if found is None or found.tzinfo else None


def stuck(etcd: EtcdView, now: datetime, bound: float, name: Names = short) -> list[Violation]:
    """W: an instance that has waited (PENDING, BUILDING, DELETING, or between its requested
    state and its actual one) longer than `bound` seconds names why: its status has a reason
    written since its request last changed, or its host is DOWN or unhealthy (saying why).
    Its age counts from the later of the request's and the status's last write (`now` is
    timezone-aware, as those stamps are); a stamp that cannot be read is not judged."""
    out = []
    for uuid in sorted(etcd.requests):
        request, status = etcd.request(uuid), etcd.statuses.get(uuid)
        if request is None or waiting_for(etcd, uuid) is None:
            continue  # several requests or none readable: 1 and 5 say so
        asked, told = _time(request.get("updated_at")), _time(status.get("updated_at")) if status else None
        if asked is None or (status is not None and told is None):
            continue
        age = (now - max(asked, told or asked)).total_seconds()
        host = request["host"]
        record: Mapping[str, Any] = etcd.hosts.get(host) or {}
        if age <= bound or host not in etcd.alive or (record.get("state") == "unhealthy" and record.get("reason")):
            continue
        if status is not None and status.get("reason") and told and told >= asked:
            continue
        state = status["state"] if status else Actual.PENDING
        out.append(Violation("W", f"{uuid}: {state} (requested {request['desired']}) for {age:.0f}s on "
                                  f"{name(host)}, which is UP, with no reason given", uuid))
    return out


# -- V: volumes ---------------------------------------------------------------------------------

def volumes_held(etcd: EtcdView, pools: PlacementView | None = None, name: Names = short) -> list[Violation]:
    """V: at most one request names a volume, and it is the instance its record names (the attach
    writes both in one transaction); with the pools' allocations: each volume (not being created
    or deleted) holds its own size of DISK_GB on its pool, and every allocation on a pool is an
    instance's (its request's) or a volume's."""
    named: dict[str, list[str]] = defaultdict(list)
    for uuid in etcd.instances():
        request = etcd.request(uuid)
        for ref in contract.volume_refs(request) if request else []:
            named[ref["id"]].append(uuid)
    out = [v for vid, uuids in sorted(named.items()) if (v := _requested_volume(etcd, vid, uuids))]
    return out + (_pool_allocations(etcd, pools, name) if pools is not None else [])


def _requested_volume(etcd: EtcdView, vid: str, uuids: list[str]) -> Violation | None:
    volume = etcd.volumes.get(vid)
    if len(uuids) > 1:
        return Violation("V", f"volume {vid}: requested by {len(uuids)} instances: {', '.join(uuids)}", vid)
    if vid not in etcd.volumes:
        return Violation("V", f"volume {vid}: requested by {uuids[0]}, but there is no such volume", vid)
    if volume is not None and volume["instance"] != uuids[0]:
        return Violation("V", f"volume {vid}: requested by {uuids[0]}, but its record names {volume['instance']}",
                         vid)
    return None


def _pool_allocations(etcd: EtcdView, pools: PlacementView, name: Names) -> list[Violation]:
    out = []
    for vid, volume in sorted(etcd.volumes.items()):
        if volume is None or volume["state"] != contract.VolumeState.AVAILABLE:
            continue  # (one being created or deleted holds its allocation for part of the time)
        held = pools.held(vid)
        if held != {volume["pool"]: {"DISK_GB": volume["size_gb"]}}:
            out.append(Violation("V", f"volume {vid} ({volume['size_gb']} GiB): allocations {held or 'none'}", vid))
    for pool, found in sorted(pools.allocations.items()):
        for consumer, resources in sorted(found.items()):
            if consumer not in etcd.volumes and etcd.request(consumer) is None:
                out.append(Violation("V", f"{consumer}: allocation {resources} on pool {name(pool)}: neither a "
                                          "volume nor an instance", consumer))
    return out
