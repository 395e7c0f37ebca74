"""Flavors, the image catalogue and server groups: what people schedule by name.

A flavor is a named Placement query (`eschedule flavor create small VCPU=1 MEMORY_MB=512
DISK_GB=5`): its classes and traits are checked against Placement's own when it is made, so a
typo is refused then, not read later as "no capacity". An image entry pins its content: its
sha256 is taken when it is added (computed here from the file or the download when not given)
and every instance built from it carries that pin, which each host checks on every use, cached
or not (ecompute/images.py). Entries are a project's own or public; a name is looked up in the
acting project first, then among the public ones. A server group's rule is kept by etcd
(groups.py, store.create_instance).
"""

from __future__ import annotations

import difflib
import hashlib
import uuid as uuidlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from etcd_compute import contract
from etcd_compute.contract import PUBLIC, BadRecord, Boot, Flavor, Group, Image
from etcd_compute.errors import ECError, InvalidState, UsageError
from etcd_compute.eschedule import inputs
from etcd_compute.eschedule.groups import ANTI, describe

if TYPE_CHECKING:
    from etcd_compute.config import ScheduleConfig
    from etcd_compute.placement import PlacementClient
    from etcd_compute.store import Rev, Store


class Operations(Protocol):
    """What the catalogue needs of eschedule's operations (operations.py, which calls it):
    the clients, the configuration and whose catalogue it is."""

    cfg: ScheduleConfig
    project: str
    scoped: bool

    @property
    def store(self) -> Store: ...

    @property
    def placement(self) -> PlacementClient: ...

    def host_names(self) -> dict[str, str]: ...

MAX_TRAITS = 32


class UnknownName(UsageError):
    """No flavor, image or group of that name (exit 2: bad input, like an unknown resource class)."""


def _suggest(word: str, known: list[str]) -> str:
    """' (did you mean X?)' for the closest of `known`: the same letters swapped first (VPCU), then
    difflib's nearest."""
    close = [k for k in known if sorted(k) == sorted(word)] or difflib.get_close_matches(word, known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def check_classes(ops: Operations, names: list[str], what: str) -> None:
    """Every name must be a resource class Placement knows: a typo would limit or ask for nothing."""
    unknown = [n for n in names if n not in contract.COUNTED or what != "quota"]
    if not unknown:
        return
    known = ops.placement.resource_classes()
    for name in unknown:
        if name not in known:
            extra = list(contract.COUNTED) if what == "quota" else []
            raise UsageError(f"{what} {name!r:.40}: Placement has no resource class {name!r:.40}"
                             + _suggest(name, sorted(known) + extra))


# -- flavors ------------------------------------------------------------------------------------

def create_flavor(ops: Operations, name: str, resources: dict[str, int], required: list[str],
                  extra: str | None = None) -> Flavor:
    """A new flavor: its classes and traits checked against Placement's, its query as eschedule
    would check it."""
    from etcd_compute.eschedule import claims
    name = inputs.check_label(name, "flavor")
    if not resources:
        raise UsageError("a flavor needs resources: VCPU=N MEMORY_MB=N [DISK_GB=N ...]")
    for rc, amount in resources.items():
        if not claims.RESOURCE_CLASS.fullmatch(rc) or not 1 <= amount <= contract.MAX_AMOUNT:
            raise UsageError(f"flavor {name}: {rc}={amount}: expected CLASS=N, N from 1 to {contract.MAX_AMOUNT}")
    if len(required) > MAX_TRAITS:
        raise UsageError(f"flavor {name}: at most {MAX_TRAITS} traits")
    flavor = Flavor(name=name, resources=dict(resources), required=list(required), extra=extra or None,
                    created_at=contract.now())
    check_classes(ops, sorted(resources), "flavor")
    claims.parse_query(flavor_query(flavor), ops.cfg.limit)  # VCPU and MEMORY_MB, extra's keys
    wanted = [t.lstrip("!") for t in required]
    missing = sorted(set(wanted) - ops.placement.known_traits(wanted))
    if missing:
        raise UsageError(f"flavor {name}: Placement has no trait {missing[0]}")
    if not ops.store.create_flavor(flavor):
        raise UsageError(f"flavor {name} exists already")
    return flavor


def flavor_query(flavor: Flavor) -> str:
    """The flavor as Placement's allocation-candidates query."""
    parts = ["resources=" + ",".join(f"{rc}:{n}" for rc, n in flavor["resources"].items())]
    if flavor["required"]:
        parts.append("required=" + ",".join(flavor["required"]))
    if flavor.get("extra"):
        parts.append(str(flavor["extra"]))
    return "&".join(parts)


def flavor(ops: Operations, name: str) -> Flavor:
    try:
        found = ops.store.flavor(inputs.check_label(name, "flavor"))
    except BadRecord as exc:
        raise InvalidState(f"flavor {name}: {exc}") from None
    if found is None:
        raise UnknownName(f"no flavor {name!r}" + _suggest(name, [f["name"] for f in ops.store.flavors()]))
    return found


def delete_flavor(ops: Operations, name: str) -> Flavor:
    found = flavor(ops, name)
    ops.store.delete_flavor(found["name"])
    return found


# -- images -------------------------------------------------------------------------------------

def _scopes(ops: Operations) -> list[str]:
    return [ops.project, PUBLIC]


def find_image(ops: Operations, name: str) -> tuple[Image, Rev] | None:
    """The catalogue entry `name` (or an alias) of the acting project, else a public one."""
    if not inputs.LABEL.fullmatch(name):
        return None
    for scope in _scopes(ops):
        try:
            found = ops.store.image(scope, name)
        except BadRecord as exc:
            raise InvalidState(f"image {name}: {exc}") from None
        if found is not None:
            return found
    return None


def image(ops: Operations, name: str) -> Image:
    found = find_image(ops, name)
    if found is None:
        raise UnknownName(f"no image {name!r} in the catalogue" + _suggest(name, _names(ops)))
    return found[0]


def _names(ops: Operations) -> list[str]:
    return [n for i in images(ops) for n in [i["name"], *i["aliases"]]]


def images(ops: Operations) -> list[Image]:
    """The entries the acting project sees: its own and the public ones (an unscoped operator: all)."""
    return [i for i in ops.store.images() if not ops.scoped or i["scope"] in _scopes(ops)]


def digest(ref: str) -> str:
    """The sha256 of an image's content, read from here: a local file, or a download."""
    import requests
    sha = hashlib.sha256()
    local = ref.removeprefix("file://") if ref.startswith(("/", "file://")) else None
    try:
        if local is not None:
            with Path(local).open("rb") as f:
                while chunk := f.read(1 << 20):
                    sha.update(chunk)
        else:
            with requests.get(ref, stream=True, timeout=30) as resp:
                resp.raise_for_status()
                for chunk in resp.iter_content(1 << 20):
                    sha.update(chunk)
    except OSError as exc:
        raise UsageError(f"image {ref}: cannot read it here to take its sha256 ({exc.strerror or exc}); "
                         "give --sha256") from None
    except requests.RequestException as exc:
        raise UsageError(f"image {ref}: cannot download it to take its sha256 ({exc}); give --sha256") from None
    return sha.hexdigest()


def add_image(ops: Operations, name: str, source: str, *, sha256: str | None = None, public: bool = False,
              aliases: list[str] | None = None, boot: Boot | None = None) -> Image:
    """A new catalogue entry. Its sha256 is the one given (checked against the content if it can
    be read here) or the content's own."""
    name = inputs.check_label(name, "image")
    aliases = [inputs.check_label(a, "image alias") for a in aliases or []]
    if len(set(aliases) | {name}) != len(aliases) + 1:
        raise UsageError(f"image {name}: a name or alias given twice")
    url = inputs.image_ref(source)
    assert url is not None
    pinned = inputs.sha256(sha256)
    readable = urlsplit(url).scheme in ("", "file") and Path(url.removeprefix("file://")).is_file()
    found = digest(url) if readable or pinned is None else pinned
    if pinned is not None and found != pinned:
        raise UsageError(f"image {url}: its sha256 is {found}, not {pinned}")
    entry = Image(name=name, scope=PUBLIC if public else ops.project, url=url, sha256=found, boot=boot,
                  aliases=aliases, created_at=contract.now())
    if not ops.store.create_image(entry):
        raise UsageError(f"image {name} or one of its aliases exists already in "
                         f"{'the public catalogue' if public else 'project ' + ops.project}")
    return entry


def delete_image(ops: Operations, name: str) -> Image:
    found = find_image(ops, name)
    if found is None:
        raise UnknownName(f"no image {name!r} in the catalogue")
    entry, rev = found

    def remove() -> None:
        if not ops.store.delete_image(entry, rev):
            raise ECError(f"image {name} changed meanwhile; try again")

    from etcd_compute.eschedule import cephpool
    if cephpool.is_snapshot(entry["url"]):
        cephpool.delete_snapshot(ops.cfg, entry, remove)  # its image too, unless a disk is a clone of it
    else:
        remove()
    return entry


# -- server groups ------------------------------------------------------------------------------

def create_group(ops: Operations, name: str, policy: str, soft: bool) -> Group:
    name = inputs.check_label(name, "server group")
    if policy not in contract.POLICIES:
        raise UsageError(f"policy must be anti-affinity or affinity, got {policy!r:.40}")
    group = Group(id=str(uuidlib.uuid4()), name=name, project=ops.project, policy=policy, soft=soft,
                  created_at=contract.now())
    if not ops.store.create_group(group):
        raise UsageError(f"server group {name} exists already in project {ops.project}")
    return group


def find_group(ops: Operations, name: str) -> tuple[Group, Rev]:
    try:
        found = ops.store.group(ops.project, inputs.check_label(name, "server group"))
    except BadRecord as exc:
        raise InvalidState(f"server group {name}: {exc}") from None
    if found is None:
        known = [g["name"] for g in ops.store.groups() if g["project"] == ops.project]
        raise UnknownName(f"no server group {name!r} in project {ops.project}" + _suggest(name, known))
    return found


def groups(ops: Operations) -> list[Group]:
    return [g for g in ops.store.groups() if not ops.scoped or g["project"] == ops.project]


def spread(ops: Operations, group: Group) -> dict[str, Any]:
    """A group with where its members are: {"members": {host name: [instance names or uuids]}}."""
    names = ops.host_names()
    label = {u: e.get("name") or u for u, e in ops.store.index().items()}  # one read of small values
    members = {names.get(h, h): sorted(label.get(u, u) for u in us)
               for h, us in sorted(ops.store.members(group["id"]).items())}
    count = sum(len(us) for us in members.values())
    kept = group["policy"] != ANTI or all(len(us) <= 1 for us in members.values())
    kept = kept and (group["policy"] == ANTI or len(members) <= 1)
    return {**group, "members": members, "size": count, "hosts": len(members), "kept": kept,
            "rule": describe(group)}


def delete_group(ops: Operations, name: str) -> Group:
    group, rev = find_group(ops, name)
    if not ops.store.delete_group(group, rev):
        left = sum(len(u) for u in ops.store.members(group["id"]).values())
        raise InvalidState(f"server group {name} still has {left} members: destroy them first")
    return group


def spread_line(ops: Operations, view: contract.View) -> str | None:
    """For `show`: its group's rule and the spread it achieved, in one line (None: in no group)."""
    project, name = view.get("project_id"), view.get("group")
    if not project or not name:
        return None
    try:
        found = ops.store.group(project, name)
    except BadRecord:
        return None
    if found is None:
        return f"{name} (deleted)"
    group = spread(ops, found[0])
    return (f"{group['name']} ({group['rule']}): {group['size']} members on {group['hosts']} hosts"
            + ("" if group["kept"] else ", its rule NOT kept"))
