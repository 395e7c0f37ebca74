"""Server groups: where a group's rule lets a member go.

A hard rule is enforced by etcd, not here: the transaction that writes a member's request (or
moves it, store.move_instance) also compares that no member is on the chosen host
(anti-affinity) or on any other host (affinity), and creates the member's key under
PREFIX/placed/<group>/<host>/. What this module adds is the choice before the claim: hosts the
rule excludes as read are not claimed at all, an affinity group's host is asked of Placement
(in_tree), a soft rule only orders the candidates, and a host whose compare failed (another
scheduler put a member there meanwhile) is passed over for the next candidate. So any number of
concurrent schedulers never break a hard rule, and most never try a host it excludes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from etcd_compute.contract import Group, GroupRef

ANTI = "anti-affinity"
AFFINITY = "affinity"


def ref(group: Group) -> GroupRef:
    """What a member's request keeps of its group."""
    return {"id": group["id"], "name": group["name"], "policy": group["policy"], "soft": group["soft"]}


def describe(group: Group | GroupRef) -> str:
    return f"{'soft' if group['soft'] else 'hard'} {group['policy']} group {group['name']}"


@dataclass
class Rule:
    """A group's rule for one member about to be placed (or moved: `moving`, from `moving_from`)."""

    group: GroupRef
    members: dict[str, list[str]]  # host -> member uuids, as read
    moving: str | None = None
    moving_from: str | None = None
    refused: set[str] = field(default_factory=set)  # hosts whose compare failed: a member got there first
    excluded: set[str] = field(default_factory=set)  # hosts passed over because of the rule

    def _others(self) -> dict[str, list[str]]:
        """Where the other members are (a moving member's old host does not bind an affinity group:
        every member there is being evacuated with it)."""
        found = {h: [u for u in us if u != self.moving] for h, us in self.members.items()}
        return {h: us for h, us in found.items() if us and h != self.moving_from}

    def home(self) -> str | None:
        """The host a hard affinity group's members are on, if any yet."""
        if self.group["soft"] or self.group["policy"] != AFFINITY:
            return None
        hosts = sorted(self._others())
        return hosts[0] if hosts else None

    def allows(self, host: str) -> bool:
        """May a member go to `host` (as read)? Records the hosts it refuses."""
        if host in self.refused:
            ok = False
        elif self.group["soft"]:
            ok = True
        elif self.group["policy"] == ANTI:
            ok = host not in self._others()
        else:
            home = self.home()
            ok = home is None or host == home
        if not ok:
            self.excluded.add(host)
        return ok

    def rank(self, host: str) -> int:
        """Order of preference among allowed hosts (lower first): a soft anti-affinity group
        prefers hosts with fewer members, a soft affinity group hosts with more."""
        count = len(self._others().get(host, []))
        return -count if self.group["policy"] == AFFINITY else count

    def why(self) -> str:
        """What the rule excluded, for a "no capacity" message ('' if nothing)."""
        home = self.home()
        if home is not None:
            return f"only host {home} was asked: {describe(self.group)} runs its members there"
        if not self.excluded:
            return ""
        n = len(self.excluded)
        if self.group["policy"] == ANTI:
            said = "each already runs one of its members"
        else:
            said = "its members run elsewhere"
        return f"{n} host{'s' if n != 1 else ''} excluded by {describe(self.group)}: {said}"
