"""The instance state machine, in one place and one vocabulary.

Requested states (`Desired`) are written by eschedule, actual states (`Actual`) by the
instance's host. The values are the strings stored in etcd, so both enums are `StrEnum`s
and encode as they always did. Only the hypervisor driver knows libvirt's own power words;
it translates them into `Actual` (see ecompute/libvirtdriver.py).

    command        requested                    actual the host brings it to
    schedule       desired=active               (PENDING) -> BUILDING -> ACTIVE | ERROR
    (guest panics)  unchanged                    CRASHED: held off until `start`, or restarted by the host
    stop           desired=stopped              STOPPED
    start/resume   desired=active               ACTIVE
    suspend        desired=suspended            SUSPENDED
    reboot         reboot += 1 (stays active)   ACTIVE, reboots == reboot
    destroy        desired=deleted              DELETING -> every key gone

ERROR is final (destroy it); DELETING ends in the removal of every key. CRASHED is no
failure of the host's: the guest's kernel panicked (pvpanic); start or stop it as one that is off.
"""

from __future__ import annotations

from enum import StrEnum


class Desired(StrEnum):
    """What the user asked for (the request's `desired`)."""

    ACTIVE = "active"
    STOPPED = "stopped"
    SUSPENDED = "suspended"
    DELETED = "deleted"


class Actual(StrEnum):
    """What the host reports (the status's `state`); PENDING = no report yet."""

    PENDING = "PENDING"
    BUILDING = "BUILDING"
    ACTIVE = "ACTIVE"
    STOPPED = "STOPPED"
    SUSPENDED = "SUSPENDED"
    ERROR = "ERROR"
    CRASHED = "CRASHED"  # the guest's kernel panicked (pvpanic): off, its allocation kept
    DELETING = "DELETING"


class Command(StrEnum):
    """The lifecycle commands of eschedule (besides schedule and destroy)."""

    START = "start"
    STOP = "stop"
    SUSPEND = "suspend"
    RESUME = "resume"
    REBOOT = "reboot"


class Role(StrEnum):
    """What an API token may do: a member acts on its project's instances, an admin on all."""

    MEMBER = "member"
    ADMIN = "admin"


# The actual state each runnable desired state ends in.
TARGET: dict[Desired, Actual] = {Desired.ACTIVE: Actual.ACTIVE, Desired.STOPPED: Actual.STOPPED,
                                 Desired.SUSPENDED: Actual.SUSPENDED}

# The desired state each command asks for (reboot keeps `active` and bumps a counter).
COMMANDS: dict[Command, Desired] = {Command.START: Desired.ACTIVE, Command.STOP: Desired.STOPPED,
                                    Command.SUSPEND: Desired.SUSPENDED, Command.RESUME: Desired.ACTIVE,
                                    Command.REBOOT: Desired.ACTIVE}


def settled(command: Command) -> Actual:
    """The actual state in which `command` is done."""
    return TARGET[COMMANDS[command]]


def refusal(command: Command, desired: Desired, actual: Actual, reason: str | None = None) -> str | None:
    """Why `command` makes no sense for an instance requested `desired` and reported `actual`
    (with ERROR `reason`), or None if it may be requested. eschedule refuses before writing,
    so no request is ever left that the host cannot carry out."""
    if desired == Desired.DELETED:
        return "it is being deleted"
    if actual == Actual.ERROR:
        return f"it is in ERROR ({reason}); destroy it and schedule again"
    if command in (Command.SUSPEND, Command.RESUME) and actual not in (Actual.ACTIVE, Actual.SUSPENDED):
        return f"only a running instance can be suspended or resumed; it is {actual}"
    if command in (Command.SUSPEND, Command.RESUME) and desired == Desired.STOPPED:
        # Its status may still say ACTIVE: the host has not carried the stop out yet.
        return "it is requested stopped; use start"
    if command == Command.REBOOT and (actual != Actual.ACTIVE or desired != Desired.ACTIVE):
        return f"only an ACTIVE instance can be rebooted; it is {actual} (requested {desired})"
    return None
