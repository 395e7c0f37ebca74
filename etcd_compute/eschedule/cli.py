"""eschedule: the command line.

Grammar (the original's, kept, and what people type):
    eschedule 'resources=VCPU:1,MEMORY_MB:256,DISK_GB:1[&required=...]' [IMAGE]
    eschedule --flavor NAME [--name NAME] [--group GROUP] [IMAGE]
    eschedule QUERY --count                 (how many more fit now; claims nothing)
    eschedule INSTANCE                      (show: a uuid, a unique uuid prefix, or a name)
    eschedule destroy INSTANCE
plus: schedule, show, list, hosts, start, stop, suspend, resume, reboot, console, evacuate, audit,
token, quota, flavor, image, group, volume, snapshot; --json on every read (-f/-c on lists); --wait where it makes
sense; --project to act as (and see only) one project. A word that is neither a command, a
query nor an instance, but close to a command, is a typo: "unknown command 'lst' (did you mean
list?)". This module only parses and prints: every command is a method of
operations.Operations (or catalog.py's), which the API server (etcd_compute/api) calls too.
Exit codes (errors.py): 0 ok, 2 bad input, 3 no capacity, 4 Placement, 5 etcd,
6 unknown instance, 7 invalid for the instance's state, 8 wait failed, 9 over quota,
11 `audit --invariants` found violations, 130 interrupted.
Every error is one line on stderr.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from etcd_compute import contract
from etcd_compute.contract import View, looks_like_uuid
from etcd_compute.errors import ECError, InvalidState, NoCapacity, UnknownInstance, UsageError, WaitFailed
from etcd_compute.eschedule import inputs
from etcd_compute.eschedule.output import FORMATS, Column, age, pick, render
from etcd_compute.states import Command, Role

if TYPE_CHECKING:  # imported when a command runs: `--help` need not load etcd, gRPC, requests, YAML
    from etcd_compute.eschedule.operations import Operations

SHOW_FIELDS = ("name", "uuid", "project_id", "host_name", "host", "host_state", "host_down_since", "desired", "state",
               "reason", "ip", "ready_at", "flavor", "resources", "image", "group", "volumes", "created_at",
               "updated_at")
GROUP_OPTIONS = {"--config": True, "--project": True, "-v": False, "--verbose": False, "--help": False}


class _Grammar(click.Group):
    """Route `eschedule QUERY [IMAGE]` and `eschedule --flavor NAME ...` to schedule, `eschedule
    INSTANCE` to show, and a typo of a command to an error that names the command meant."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """A schedule's option before any word (`eschedule --flavor small web1-image`) starts a
        schedule: the group's own options are read first."""
        options = {o for p in self.commands["schedule"].params for o in getattr(p, "opts", [])}
        i = 0
        while i < len(args) and args[i].startswith("-"):
            option = args[i].split("=", 1)[0]
            if option in GROUP_OPTIONS:
                i += 2 if GROUP_OPTIONS[option] and "=" not in args[i] else 1
                continue
            if option in options:
                args = [*args[:i], "schedule", *args[i:]]
            break
        return super().parse_args(ctx, args)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            word = args[0]
            if "=" in word or "&" in word:  # a query
                return super().resolve_command(ctx, ["schedule", *args])
            meant = difflib.get_close_matches(word, sorted(self.commands), n=1, cutoff=0.7)
            if meant and not looks_like_uuid(word):
                raise click.UsageError(f"unknown command {word!r:.40} (did you mean {meant[0]}?); an instance "
                                       f"of that name: 'eschedule show {word:.40}'")
            args = ["show", *args]
        return super().resolve_command(ctx, args)


def _emit(value: Any, as_json: bool, text: str) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True) if as_json else text)


def _fmt(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}:{v}" for k, v in value.items())
    return "-" if value is None else str(value)


def _show_text(view: View, spread: str | None = None) -> str:
    lines = [f"{k:<15} {_fmt(view.get(k))}" for k in SHOW_FIELDS if k in view]
    if spread:
        lines.append(f"{'group spread':<15} {spread}")
    lines += [f"{'event' if i == 0 else '':<15} {e['at']} {e['event']}" for i, e in enumerate(view.get("events") or [])]
    return "\n".join(lines)


class Seconds(click.ParamType):
    """A number of seconds within a range, as the API takes it (no NaN, no infinity)."""

    name = "seconds"

    def __init__(self, low: float = 0, high: float = 3600, low_open: bool = True) -> None:
        self.low, self.high, self.low_open = low, high, low_open

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        above = number > self.low if self.low_open else number >= self.low
        if not math.isfinite(number) or not above or number > self.high:
            name = param.opts[0] if param is not None and param.opts else "seconds"
            span = (f"more than {self.low:g} and at most {self.high:g}" if self.low_open
                    else f"from {self.low:g} to {self.high:g}")
            raise click.UsageError(f"{name} must be {span} seconds, got {value}", ctx)
        return number


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
wait_option = click.option("--wait", is_flag=True, help="Wait until the host has acted (its events shown on a "
                           "terminal as they come).")
# --wait alone (or =running): until the host has started the domain (with its address); =ready: until the
# guest also said that boot has finished (cloud-init done): the status's ready_at.
boot_wait_option = click.option(
    "--wait", "wait", type=click.Choice(["running", "ready"]), is_flag=False, flag_value="running", default=None,
    help="Wait until the host has acted: --wait (or --wait=running) until the domain runs with its address, "
         "--wait=ready until its guest has also said it booted (cloud-init done).")
timeout_option = click.option("--timeout", type=Seconds(), default=None,
                              help="Seconds to wait, at most 3600 (default: wait_timeout from schedule.yaml).")


def list_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """-f/--format and -c/--column (repeatable, or comma-separated) of a list, and --json."""
    fn = click.option("-c", "--column", "columns", multiple=True, help="A column to show (repeatable; or a,b,c).")(fn)
    fn = click.option("-f", "--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
                      help="Output format.")(fn)
    return json_option(fn)


class _Progress:
    """Prints an instance's new events on stderr while --wait waits, when stderr is a terminal
    (piped, it says nothing: a script reads the result)."""

    def __init__(self, fresh: bool) -> None:
        self.on = sys.stderr.isatty()
        self.fresh = fresh  # a new instance: every event is news; else only those after the first look
        self.seen: set[tuple[str, str]] = set()
        self.looked = False

    def __call__(self, view: View) -> None:
        for event in view.get("events") or []:
            key = (event["at"], event["event"])
            if key in self.seen:
                continue
            self.seen.add(key)
            if self.on and (self.fresh or self.looked):
                click.echo(f"  {event['at'][11:19]}  {event['event']}", err=True)
        self.looked = True


@click.group(cls=_Grammar, no_args_is_help=True)
@click.option("--config", "config_path", envvar="ESCHEDULE_CONFIG", type=click.Path(dir_okay=False),
              help="schedule.yaml (default: ./schedule.yaml, /etc/etcd-compute/schedule.yaml).")
@click.option("--project", help="Act as this project: schedule into it, see and act only on its instances "
              "(default: project_id of schedule.yaml, seeing every project).")
@click.option("-v", "--verbose", is_flag=True, help="Log what happens on stderr.")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, project: str | None, verbose: bool) -> None:
    """Schedule VMs with Placement, deliver them through etcd."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from etcd_compute import config
    from etcd_compute.eschedule.operations import Operations

    ctx.obj = Operations(config.load_schedule(config_path), project=project, scoped=project is not None)


@cli.command()
@click.argument("words", nargs=-1, metavar="[QUERY] [IMAGE]")
@click.option("--flavor", help="A flavor ('eschedule flavor list') instead of QUERY.")
@click.option("--name", help="The instance's name, unique in its project and its guest's hostname (a DNS label).")
@click.option("--group", help="A server group of the project ('eschedule group create') whose rule it follows.")
@click.option("--image-sha256", help="Expected sha256 of the image; the build fails on a mismatch.")
@click.option("--key", "keys", multiple=True, help="An ssh public key file for the guest (repeatable).")
@click.option("--user-data", help="A cloud-init user-data file for the guest.")
@click.option("--kernel", help="Boot this kernel directly (URL or path on the host); with --initrd, --cmdline.")
@click.option("--initrd", help="Initrd for --kernel.")
@click.option("--cmdline", help="Kernel command line for --kernel.")
@click.option("--no-config-drive", is_flag=True, help="No config drive: the guest reads its data from the "
              "metadata server alone (stock OpenStack images find it through SMBIOS).")
@click.option("--count", is_flag=True, help="Only say how many more such instances fit now; claim nothing.")
@json_option
@boot_wait_option
@timeout_option
@click.pass_obj
def schedule(ops: Operations, words: tuple[str, ...], flavor: str | None, name: str | None, group: str | None,
             image_sha256: str | None, keys: tuple[str, ...], user_data: str | None, kernel: str | None,
             initrd: str | None, cmdline: str | None, no_config_drive: bool, count: bool, as_json: bool,
             wait: str | None, timeout: float | None) -> None:
    """Claim resources for QUERY (or --flavor) and ask the chosen host to build it from IMAGE
    (a catalogue name or alias, a URL, or a path on the hosts; default: schedule.yaml's)."""
    if flavor and words and "=" in words[0]:
        raise UsageError("give a query or --flavor, not both")
    if len(words) > (1 if flavor else 2):
        raise click.UsageError(f"got {' '.join(words)!r:.80}: expected {'[IMAGE]' if flavor else 'QUERY [IMAGE]'}")
    query, image = (None, words[0] if words else None) if flavor else (words[0] if words else None,
                                                                      words[1] if len(words) > 1 else None)
    if count:
        if image or name or group or wait:
            raise UsageError("--count takes a QUERY or --flavor alone: it places nothing, so no IMAGE, --name, "
                             "--group or --wait")
        found = ops.fits(query, flavor)
        _emit(found, as_json, str(found["fits"]))
        return
    request = ops.schedule(query, image, flavor=flavor, name=name, group=group, image_sha256=image_sha256,
                           ssh_keys=[inputs.read_key(k) for k in keys], user_data=inputs.read_user_data(user_data),
                           kernel=kernel, initrd=initrd, cmdline=cmdline,
                           config_drive=not no_config_drive)
    view = contract.view(request, None)
    if wait:
        progress = _Progress(fresh=True)
        if progress.on:
            host = ops.host_names().get(request["host"], request["host"])
            click.echo(f"eschedule: {request.get('name') or request['uuid']} placed on host {host}; waiting", err=True)
        view = _waited(lambda: ops.wait_settled(request["uuid"], timeout, progress, wait == "ready"), ops,
                       request["uuid"], as_json)
    _emit(view, as_json, _show_text(view))


def _waited(wait: Callable[[], View], ops: Operations, uuid: str, as_json: bool) -> View:
    """What `wait` returns; when it fails, the instance as it is is printed before the error."""
    try:
        return wait()
    except WaitFailed:
        with contextlib.suppress(ECError):
            view = ops.show(uuid)
            _emit(view, as_json, _show_text(view))
        raise


@cli.command()
@click.argument("instance")
@json_option
@click.pass_obj
def show(ops: Operations, instance: str, as_json: bool) -> None:
    """Show an instance (by uuid, unique uuid prefix or name): host, requested and actual state, IP."""
    from etcd_compute.eschedule import catalog
    view = ops.show(instance)
    _emit(view, as_json, _show_text(view, None if as_json else catalog.spread_line(ops, view)))


@cli.command()
@click.argument("instance")
@click.option("--force", is_flag=True, help="For a host that is DOWN: free the allocation and forget the "
              "instance now; the host removes the domain if it returns.")
@json_option
@wait_option
@timeout_option
@click.pass_obj
def destroy(ops: Operations, instance: str, force: bool, as_json: bool, wait: bool, timeout: float | None) -> None:
    """Destroy an instance; its host frees the allocation once the domain is gone."""
    uuid, host = ops.destroy(instance, force)
    result = {"uuid": uuid, "host": host, "desired": "deleted", "state": "DELETED" if force else "DELETING"}
    if wait and not force:
        ops.wait_gone(uuid, timeout)
        result["state"] = "DELETED"
    _emit(result, as_json, f"instance {uuid} {result['state'].lower()} on host {host}")


def _lifecycle(action: Command, doc: str) -> None:
    @json_option
    @(boot_wait_option if action != Command.SUSPEND else wait_option)
    @timeout_option
    @click.argument("instance")
    @click.pass_obj
    def command(ops: Operations, instance: str, as_json: bool, wait: str | bool | None, timeout: float | None) -> None:
        request = ops.act(action, instance)
        _acted(ops, action, request, as_json, wait, timeout)

    command.__doc__ = doc
    cli.command(name=str(action))(command)


def _shutting_down(action: Command, doc: str) -> None:
    """stop and reboot: their --timeout is the guest's clean shutdown, not the wait's."""
    @json_option
    @(boot_wait_option if action == Command.REBOOT else wait_option)
    @click.option("--timeout", "stop_timeout", type=Seconds(high=contract.MAX_STOP_TIMEOUT), default=None,
                  help="Seconds the guest has to shut down cleanly before it is powered off "
                  "(default: the host's stop_timeout, 60); --wait waits wait_timeout on top.")
    @click.option("--force", is_flag=True, help="Power the guest off at once, without a clean shutdown "
                  "(also one that is under way); its events say so.")
    @click.argument("instance")
    @click.pass_obj
    def command(ops: Operations, instance: str, as_json: bool, wait: str | bool | None, stop_timeout: float | None,
                force: bool) -> None:
        request = ops.act(action, instance, stop_timeout=stop_timeout, force=force)
        _acted(ops, action, request, as_json, wait, None)

    command.__doc__ = doc
    cli.command(name=str(action))(command)


def _acted(ops: Operations, action: Command, request: contract.Request, as_json: bool, wait: str | bool | None,
           timeout: float | None) -> None:
    if wait:
        progress = _Progress(fresh=False)
        view = _waited(lambda: ops.wait_acted(action, request, timeout, progress, wait == "ready"), ops,
                       request["uuid"], as_json)
    else:
        view = ops.show(request["uuid"])
    _emit(view, as_json, _show_text(view))


for _action, _doc in [(Command.START, "Power an instance on (also one its guest powered off)."),
                      (Command.SUSPEND, "Pause a running instance in memory."),
                      (Command.RESUME, "Continue a suspended instance.")]:
    _lifecycle(_action, _doc)
for _action, _doc in [(Command.STOP, "Shut an instance down (ACPI power button; powered off after --timeout)."),
                      (Command.REBOOT, "Restart a running instance (clean ACPI shutdown and start; "
                                       "powered off after --timeout).")]:
    _shutting_down(_action, _doc)


@cli.command()
@click.argument("instance")
@click.option("--boot", type=click.IntRange(min=1), help="Boot N (each start of the domain by its host is one): its "
              "first and last 16 KiB.")
@click.option("--all", "every", is_flag=True, help="Every boot kept (the first and the last few), oldest first.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new output (the next boots' too) until the "
              "instance is gone.")
@json_option
@click.pass_obj
def console(ops: Operations, instance: str, boot: int | None, every: bool, follow: bool, as_json: bool) -> None:
    """Print an instance's serial console: its current boot (the last 64 KiB, as its host
    publishes it), boot N, or every boot kept."""
    uuid = ops.resolve(instance)
    if boot is not None and every:
        raise UsageError("--boot N or --all, not both")
    if follow and (as_json or boot is not None):
        raise UsageError("--follow goes on from the current boot: without --boot or --json")
    if as_json or boot is not None or every:
        boots = ops.console_boots(uuid, boot)
        if as_json:
            shown = boots if boot is not None or every else boots[-1:]
            _emit([contract.boot_view(b) for b in shown], True, "")
            return
        sys.stdout.buffer.write(contract.boots_bytes(boots, every))
        sys.stdout.buffer.flush()
        if not follow:
            return
    shown_now = ops.console(uuid)
    if shown_now is None and not follow and not every:
        click.echo(f"instance {uuid}: no console output published yet", err=True)
    upto = _print_console(shown_now, None, every)
    while follow:
        time.sleep(1.0)
        try:
            upto = _print_console(ops.console(uuid), upto)
        except UnknownInstance:
            return  # destroyed: nothing more will come


def _print_console(console: contract.Console | None, upto: tuple[int, int] | None,
                   printed: bool = False) -> tuple[int, int] | None:
    """Write what `console` holds beyond `upto` (boot, byte of its log): all of it for a new boot
    (after a line naming it) or a rotated log; the new `upto`. `printed`: the current boot was
    printed already (by --all): only what came since."""
    if console is None:
        return upto
    data, end = contract.console_bytes(console)
    boot = console.get("boot", 0)
    if printed:
        return boot, end
    start = end - len(data)
    if upto is not None and upto[0] == boot and start <= upto[1] <= end:
        data = data[upto[1] - start:]
    elif upto is not None and upto[0] != boot:
        data = f"\n===== boot {boot} =====\n".encode() + data
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return boot, end


@cli.command()
@click.argument("instance")
@click.argument("command", nargs=-1)
@click.option("-l", "--user", help="Log in as this user (default: ssh_user of schedule.yaml, else ssh's own).")
@click.option("-i", "--identity", help="The private key (default: that of the first of schedule.yaml's ssh_keys, "
              "if it is there; else ssh's own).")
@click.option("-o", "options", multiple=True, help="An ssh option, as `ssh -o` takes it (repeatable).")
@timeout_option
@click.pass_obj
def ssh(ops: Operations, instance: str, command: tuple[str, ...], user: str | None, identity: str | None,
        options: tuple[str, ...], timeout: float | None) -> None:
    """Wait until the instance's guest has booted (ready), then log in with the OpenSSH client
    (or run COMMAND there). Its host key is remembered under the instance's uuid, not its address."""
    if shutil.which("ssh") is None:
        raise UsageError("no OpenSSH client (ssh) on PATH")
    view = ops.wait_ready(ops.resolve(instance), timeout)
    argv = ["ssh", *(a for o in options for a in ("-o", o)), "-o", f"HostKeyAlias=etcd-compute-{view['uuid']}",
            "-o", "StrictHostKeyChecking=accept-new"]
    key = identity or _private_key(ops.cfg.ssh_keys)
    user = user or ops.cfg.ssh_user
    argv += [*(["-i", key] if key else []), *(["-l", user] if user else []), str(view["ip"]), *command]
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execvp("ssh", argv)


def _private_key(public: list[str]) -> str | None:
    """The private key beside the first public key file (KEY.pub -> KEY), if it is there."""
    if not public or not public[0].endswith(".pub"):
        return None
    key = os.path.expanduser(public[0][:-len(".pub")])
    return key if os.path.isfile(key) else None


@cli.command()
@click.argument("host", required=False)
@click.option("--force", is_flag=True, help="You stopped the host's guests yourself (it does not fence itself, or "
              "cannot be waited for): skip the fence window and the DOWN check; each moved instance says so.")
@click.option("--auto", "auto", is_flag=True, help="Run as a service: evacuate every host DOWN past its fence "
              "window + --grace (one of several evacuators acts); SIGTERM stops it.")
@click.option("--grace", type=Seconds(0, 86400, low_open=False), default=None, help="Seconds to wait beyond the "
              "host's fence window (lease_ttl + fence_margin); default: evacuate.grace (0), with --auto "
              "evacuate.auto_grace (15).")
@click.option("--no-wait", is_flag=True, help="Exit 7 instead of waiting when the fence window has not passed.")
@click.option("--metrics", help="With --auto: serve Prometheus metrics on HOST:PORT (default: evacuate.metrics).")
@json_option
@click.pass_obj
def evacuate(ops: Operations, host: str | None, force: bool, auto: bool, grace: float | None, no_wait: bool,
             metrics: str | None, as_json: bool) -> None:
    """Rebuild the instances of a DOWN host (by name or uuid) on other hosts, once its fence has stopped them."""
    if auto:
        if host or force or no_wait:
            raise click.UsageError("evacuate --auto takes no HOST, --force or --no-wait")
        _serve_evacuations(ops, grace, metrics)
        return
    if host is None:
        raise click.UsageError("evacuate needs HOST (or --auto)")
    if metrics:
        raise click.UsageError("--metrics goes with --auto")
    if force:
        click.echo(f"eschedule: --force: host {host}'s fence window is not waited for; the moved instances' "
                   "events say so", err=True)
    from etcd_compute.eschedule import moves
    moved = moves.evacuate(ops, host, force=force, grace=grace, wait=not no_wait,
                           say=lambda line: click.echo(f"eschedule: {line}", err=True))
    _emit(moved, as_json, "\n".join(
        f"{m['uuid']}  {'-> ' + m['to'] if m['to'] else 'NOT MOVED: ' + m['error']}" for m in moved)
        or f"host {host} has no instances")
    if any("came back" in (m["error"] or "") for m in moved):
        raise InvalidState(f"host {host} came back UP meanwhile: {sum(m['to'] is None for m in moved)} "
                           "instances stay on it")
    if any(m["to"] is None for m in moved):
        raise NoCapacity(f"{sum(m['to'] is None for m in moved)} instances found no other host")


def _serve_evacuations(ops: Operations, grace: float | None, metrics: str | None) -> None:
    """The evacuator service (evacuator.py) until SIGTERM or Ctrl-C, which end it cleanly (exit 0)
    once the call in flight returns: it resigns its lead, so that another takes over at once."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)  # a service says what it does, and when
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    from etcd_compute.eschedule.evacuator import Evacuator
    Evacuator(ops, grace=grace, metrics=metrics).run(stopping)


@cli.command()
@click.option("--fix", is_flag=True, help="Delete the allocations that no instance owns.")
@click.option("--grace", type=Seconds(0, 3600, low_open=False), default=5.0, show_default=True,
              help="Seconds a finding must persist (a claim being written looks leaked for a moment).")
@click.option("--invariants", "invariants", is_flag=True,
              help="Instead, check the invariants etcd and Placement show (1, 3, 4, D, R, W, V: see "
              "etcd_compute/invariants.py), read-only; no hypervisor is read. One line per violation; "
              "exit 11 if any.")
@click.option("--stuck-after", type=Seconds(0, 86400), default=300.0, show_default=True,
              help="With --invariants: seconds an instance may wait without a reason (W).")
@json_option
@click.pass_obj
def audit(ops: Operations, fix: bool, grace: float, invariants: bool, stuck_after: float, as_json: bool) -> None:
    """Find allocations in Placement that no instance in etcd owns (leaked capacity)."""
    from etcd_compute.eschedule import audit as audits
    if invariants:
        if fix:
            raise UsageError("--invariants only reads: it fixes nothing (--fix is for leaked allocations)")
        violated = audits.audit_invariants(ops, stuck_after, grace)
        _emit(audits.as_json(violated), as_json, audits.as_text(violated))
        if violated:
            sys.exit(audits.VIOLATED)
        return
    found = audits.leaked(ops, fix, grace)
    verb = "deleted" if fix else "found"
    _emit(found, as_json, "\n".join(f"{f['consumer']}  {f['provider']}  {_fmt(f['resources'])}  {verb}"
                                    for f in found) or "no leaked allocations")


def size(view: dict[str, Any]) -> str:
    """A flavor's name, or the resources in short: 1vcpu/256M/1G."""
    if view.get("flavor"):
        return str(view["flavor"])
    res = dict(view.get("resources") or {})
    if not res:
        return "-"
    parts = [f"{res.pop('VCPU')}vcpu" if "VCPU" in res else None, f"{res.pop('MEMORY_MB')}M" if "MEMORY_MB" in res
             else None, f"{res.pop('DISK_GB')}G" if "DISK_GB" in res else None]
    return "/".join([p for p in parts if p] + [f"{rc}:{n}" for rc, n in res.items()])


INSTANCE_COLUMNS = [
    Column("name", lambda v: v.get("name"), shrinks=True), Column("id", lambda v: (v.get("uuid") or "")[:8]),
    Column("uuid", lambda v: v.get("uuid")), Column("state", lambda v: v.get("state")),
    Column("ip", lambda v: v.get("ip")), Column("host", lambda v: v.get("host_name") or v.get("host"), shrinks=True),
    Column("size", size, shrinks=True), Column("age", lambda v: age(v.get("created_at"))),
    Column("project", lambda v: v.get("project_id"), shrinks=True), Column("image", lambda v: v.get("image"),
                                                                            shrinks=True),
    Column("group", lambda v: v.get("group"), shrinks=True), Column("desired", lambda v: v.get("desired")),
    Column("reason", lambda v: v.get("reason"), shrinks=True), Column("host_state", lambda v: v.get("host_state")),
    Column("resources", lambda v: v.get("resources"), shrinks=True), Column("created", lambda v: v.get("created_at")),
]
HOST_COLUMNS = [
    Column("name", lambda h: h["name"], shrinks=True), Column("id", lambda h: h["uuid"][:8]),
    Column("uuid", lambda h: h["uuid"]), Column("state", lambda h: h["state"] + (" locked" if h["locked"] else "")),
    Column("usage", lambda h: " ".join(f"{rc}:{h['used'].get(rc, 0)}/{cap}"
                                       for rc, cap in sorted(h["capacity"].items())), shrinks=True, minimum=20),
    Column("down_since", lambda h: h["down_since"]),
]


def _list(items: list[dict[str, Any]], columns: list[Column], default: list[str], fmt: str,
          wanted: tuple[str, ...], as_json: bool) -> None:
    chosen = pick(columns, wanted, default)
    click.echo(render(items, chosen, "json" if as_json else fmt, bool(wanted)))


@cli.command(name="list")
@click.option("--host", help="Only the instances of this host (name or uuid).")
@click.option("--state", help="Only the instances in this state (ACTIVE, STOPPED, ERROR, ...).")
@list_options
@click.pass_obj
def list_(ops: Operations, host: str | None, state: str | None, as_json: bool, fmt: str,
          columns: tuple[str, ...]) -> None:
    """List instances: name, short id, state, IP, host, size, age (-c for others, -f for scripts)."""
    views = ops.instances(host=host, state=state)
    several = len({v["project_id"] for v in views}) > 1  # an operator's list of several projects: say whose
    _list([dict(v) for v in views], INSTANCE_COLUMNS, ["name", *(["project"] if several else []), "id", "state", "ip",
                                                       "host", "size", "age"], fmt, columns, as_json)


@cli.command()
@list_options
@click.pass_obj
def hosts(ops: Operations, as_json: bool, fmt: str, columns: tuple[str, ...]) -> None:
    """List hosts (Placement resource providers) with capacity and usage."""
    found = ops.hosts()
    _list(found, HOST_COLUMNS, ["name", "id", "state", "usage", "down_since"], fmt, columns, as_json)


@cli.group()
def token() -> None:
    """Bearer tokens of the API server (stored hashed: a token is shown once, when made)."""


@token.command(name="create")
@click.argument("project")
@click.option("--admin", is_flag=True, help="An admin token: every project, hosts, quotas.")
@click.option("--name", default="", help="What the token is for (shown by 'token list').")
@json_option
@click.pass_obj
def token_create(ops: Operations, project: str, admin: bool, name: str, as_json: bool) -> None:
    """Make a token of PROJECT; prints it (only now)."""
    secret, record = ops.create_token(project, Role.ADMIN if admin else Role.MEMBER, name)
    shown = {k: v for k, v in record.items() if k != "sha256"}
    _emit({**shown, "token": secret}, as_json, secret)


@token.command(name="list")
@json_option
@click.pass_obj
def token_list(ops: Operations, as_json: bool) -> None:
    """List tokens (never the tokens themselves)."""
    found = [{k: v for k, v in t.items() if k != "sha256"} for t in ops.tokens()]
    rows = [f"{'ID':<12}  {'PROJECT':<20}  {'ROLE':<6}  {'CREATED':<29}  NAME"]
    rows += [f"{t['id']:<12}  {t['project']:<20}  {t['role']:<6}  {t.get('created_at', '-'):<29}  {t['name']}"
             for t in found]
    _emit(found, as_json, "\n".join(rows))


@token.command(name="revoke")
@click.argument("token_id")
@click.pass_obj
def token_revoke(ops: Operations, token_id: str) -> None:
    """Revoke the token with id TOKEN_ID (from 'token list'): it stops working at once."""
    found = ops.revoke_token(token_id)
    click.echo(f"token {found['id']} of project {found['project']} revoked")


@cli.group()
def quota() -> None:
    """Per-project limits on instances and resource classes (checked before every claim)."""


def _limit(text: str) -> tuple[str, int | None]:
    name, sep, value = text.partition("=")
    if not sep:
        raise UsageError(f"expected NAME=LIMIT (instances=10, VCPU=20, ...), got {text!r}")
    if value in ("none", "unlimited"):
        return name, None
    if not value.isascii() or not value.isdigit() or len(value) > 12:
        raise UsageError(f"limit of {name} must be a whole number or 'none', got {value!r}")
    return name, int(value)


@quota.command(name="set")
@click.argument("project")
@click.argument("limits", nargs=-1, required=True)
@json_option
@click.pass_obj
def quota_set(ops: Operations, project: str, limits: tuple[str, ...], as_json: bool) -> None:
    """Set limits of PROJECT: instances=10 VCPU=20 MEMORY_MB=8192 ... ('none' lifts one)."""
    found = ops.set_quota(project, dict(_limit(text) for text in limits))
    _emit(found, as_json, f"project {project}: " + (_fmt(found["limits"]) or "unlimited"))


@quota.command(name="show")
@click.argument("project", required=False)
@json_option
@click.pass_obj
def quota_show(ops: Operations, project: str | None, as_json: bool) -> None:
    """Usage of PROJECT (default: --project or schedule.yaml's) against its limits."""
    found = ops.usage(inputs.check_project(project) if project else None)
    names = sorted(set(found["usage"]) | set(found["limits"]))
    rows = [f"project {found['project']}"] + [
        f"  {n:<12} {found['usage'].get(n, 0)} / {found['limits'].get(n, 'unlimited')}" for n in names]
    _emit(found, as_json, "\n".join(rows))


def _amounts(pairs: tuple[str, ...]) -> dict[str, int]:
    """CLASS=N words (a flavor's resources)."""
    found: dict[str, int] = {}
    for pair in pairs:
        rc, sep, amount = pair.partition("=")
        if not sep or not amount.isascii() or not amount.isdigit() or len(amount) > 12:
            raise UsageError(f"expected CLASS=N (VCPU=2, MEMORY_MB=2048, DISK_GB=20), got {pair!r:.60}")
        if rc in found:
            raise UsageError(f"{rc} given twice")
        found[rc] = int(amount)
    return found


@cli.group()
def flavor() -> None:
    """Named sizes (`eschedule --flavor NAME`), made by operators."""


FLAVOR_COLUMNS = [Column("name", lambda f: f["name"], shrinks=True),
                  Column("resources", lambda f: f["resources"], shrinks=True),
                  Column("required", lambda f: f["required"], shrinks=True),
                  Column("extra", lambda f: f.get("extra"), shrinks=True),
                  Column("created", lambda f: f.get("created_at"))]


@flavor.command(name="create")
@click.argument("name")
@click.argument("resources", nargs=-1, required=True, metavar="CLASS=N...")
@click.option("--required", "required", multiple=True, help="A trait the host must have (!TRAIT: must not).")
@click.option("--extra", help="More of Placement's query, e.g. 'member_of=AGG'.")
@json_option
@click.pass_obj
def flavor_create(ops: Operations, name: str, resources: tuple[str, ...], required: tuple[str, ...],
                  extra: str | None, as_json: bool) -> None:
    """Make flavor NAME of CLASS=N resources (VCPU=2 MEMORY_MB=2048 DISK_GB=20)."""
    from etcd_compute.eschedule import catalog
    made = catalog.create_flavor(ops, name, _amounts(resources), list(required), extra)
    _emit(made, as_json, f"flavor {made['name']}: {catalog.flavor_query(made)}")


@flavor.command(name="list")
@list_options
@click.pass_obj
def flavor_list(ops: Operations, as_json: bool, fmt: str, columns: tuple[str, ...]) -> None:
    """List flavors."""
    _list([dict(f) for f in ops.store.flavors()], FLAVOR_COLUMNS, ["name", "resources", "required", "extra"], fmt,
          columns, as_json)


def _show_and_delete(group: click.Group, what: str, find: str, delete: str, said: str) -> None:
    """`GROUP show NAME [--json]` and `GROUP delete NAME` of a catalogue's `what`, by catalog.py's
    functions `find` and `delete`; `said` is what delete adds about what stays."""
    article = "an" if what[0] in "aeiou" else "a"

    @group.command(name="show", help=f"Show {article} {what} (by name{' or alias' if what == 'image' else ''}).")
    @click.argument("name")
    @json_option
    @click.pass_obj
    def show(ops: Operations, name: str, as_json: bool) -> None:
        from etcd_compute.eschedule import catalog
        found = getattr(catalog, find)(ops, name)
        extra = {"query": catalog.flavor_query(found)} if what == "flavor" else {}
        _emit(found, as_json, "\n".join(f"{k:<10} {_fmt(v)}" for k, v in {**found, **extra}.items()))

    @group.command(name="delete", help=f"Delete {article} {what} ({said}).")
    @click.argument("name")
    @click.pass_obj
    def delete_(ops: Operations, name: str) -> None:
        from etcd_compute.eschedule import catalog
        click.echo(f"{what} {getattr(catalog, delete)(ops, name)['name']} deleted")


_show_and_delete(flavor, "flavor", "flavor", "delete_flavor", "its instances keep their resources")


@cli.group()
def image() -> None:
    """The image catalogue: images by name, their content pinned by sha256."""


IMAGE_COLUMNS = [Column("name", lambda i: i["name"], shrinks=True),
                 Column("aliases", lambda i: i["aliases"], shrinks=True),
                 Column("scope", lambda i: "public" if i["scope"] == contract.PUBLIC else i["scope"], shrinks=True),
                 Column("sha256", lambda i: i["sha256"][:12]), Column("url", lambda i: i["url"], shrinks=True),
                 Column("boot", lambda i: "kernel" if i.get("boot") else "disk")]


@image.command(name="add")
@click.argument("name")
@click.argument("source", metavar="URL|PATH")
@click.option("--sha256", help="Its content's sha256 (default: taken from the content, read or downloaded here).")
@click.option("--public", is_flag=True, help="Seen by every project (default: the acting project's own).")
@click.option("--alias", "aliases", multiple=True, help="Another name for it (repeatable), e.g. debian-12.")
@click.option("--kernel", help="Boot it with this kernel (URL or path on the hosts), for images without a bootloader.")
@click.option("--initrd", help="Initrd for --kernel.")
@click.option("--cmdline", help="Kernel command line for --kernel.")
@json_option
@click.pass_obj
def image_add(ops: Operations, name: str, source: str, sha256: str | None, public: bool, aliases: tuple[str, ...],
              kernel: str | None, initrd: str | None, cmdline: str | None, as_json: bool) -> None:
    """Add image NAME: an http(s):// or file:// URL or a path on the hosts (in their image_dirs)."""
    from etcd_compute.eschedule import catalog
    boot: contract.Boot | None = None
    if kernel or initrd:
        boot = {"kernel": inputs.image_ref(kernel), "initrd": inputs.image_ref(initrd), "cmdline": cmdline}
    made = catalog.add_image(ops, name, source, sha256=sha256, public=public, aliases=list(aliases), boot=boot)
    _emit(made, as_json, f"image {made['name']} ({'public' if public else made['scope']}): {made['url']} "
                         f"sha256 {made['sha256']}")


@image.command(name="list")
@list_options
@click.pass_obj
def image_list(ops: Operations, as_json: bool, fmt: str, columns: tuple[str, ...]) -> None:
    """List the images this project sees: its own and the public ones."""
    from etcd_compute.eschedule import catalog
    _list([dict(i) for i in catalog.images(ops)], IMAGE_COLUMNS, ["name", "aliases", "scope", "sha256", "url"],
          fmt, columns, as_json)


_show_and_delete(image, "image", "image", "delete_image",
                 "and its aliases; instances built from it keep their disks")


@cli.group()
def group() -> None:
    """Server groups: instances kept apart (anti-affinity) or together (affinity)."""


GROUP_COLUMNS = [Column("name", lambda g: g["name"], shrinks=True), Column("policy", lambda g: g["policy"]),
                 Column("soft", lambda g: "soft" if g["soft"] else "hard"),
                 Column("project", lambda g: g["project"], shrinks=True), Column("id", lambda g: g["id"][:8]),
                 Column("created", lambda g: g.get("created_at"))]


@group.command(name="create")
@click.argument("name")
@click.option("--policy", type=click.Choice(["anti-affinity", "affinity"]), required=True,
              help="anti-affinity: each member on another host; affinity: all on one host.")
@click.option("--soft", is_flag=True, help="A preference, not a rule: members go elsewhere when they must.")
@json_option
@click.pass_obj
def group_create(ops: Operations, name: str, policy: str, soft: bool, as_json: bool) -> None:
    """Make server group NAME of the acting project; members join with `--group NAME`."""
    from etcd_compute.eschedule import catalog
    made = catalog.create_group(ops, name, policy, soft)
    _emit(made, as_json, f"server group {made['name']}: {'soft' if soft else 'hard'} {policy}")


@group.command(name="list")
@list_options
@click.pass_obj
def group_list(ops: Operations, as_json: bool, fmt: str, columns: tuple[str, ...]) -> None:
    """List server groups."""
    from etcd_compute.eschedule import catalog
    _list([dict(g) for g in catalog.groups(ops)], GROUP_COLUMNS, ["name", "policy", "soft", "project", "id"], fmt,
          columns, as_json)


@group.command(name="show")
@click.argument("name")
@json_option
@click.pass_obj
def group_show(ops: Operations, name: str, as_json: bool) -> None:
    """Show a server group and where its members are."""
    from etcd_compute.eschedule import catalog
    found = catalog.spread(ops, catalog.find_group(ops, name)[0])
    lines = [f"server group {found['name']} ({found['rule']}): {found['size']} members on {found['hosts']} hosts"
             + ("" if found["kept"] else " (its rule is NOT kept)")]
    lines += [f"  {host}: {', '.join(members)}" for host, members in found["members"].items()]
    _emit(found, as_json, "\n".join(lines))


@group.command(name="delete")
@click.argument("name")
@click.pass_obj
def group_delete(ops: Operations, name: str) -> None:
    """Delete a server group that has no members left."""
    from etcd_compute.eschedule import catalog
    click.echo(f"server group {catalog.delete_group(ops, name)['name']} deleted")


@cli.command()
@click.argument("instance")
@click.option("--name", help="The image's name in the project's catalogue (default: INSTANCE-<UTC time>).")
@json_option
@click.pass_obj
def snapshot(ops: Operations, instance: str, name: str | None, as_json: bool) -> None:
    """Copy INSTANCE's disk (in Ceph) into a new image of the catalogue, crash-consistent."""
    from etcd_compute.eschedule import snapshots
    made = snapshots.snapshot(ops, instance, name)
    _emit(made, as_json, f"image {made['name']}: {made['url']}")


@cli.group()
def volume() -> None:
    """Volumes: disks in Ceph that outlive instances, attached to one at a time."""


VOLUME_COLUMNS = [Column("name", lambda v: v.get("name"), shrinks=True), Column("id", lambda v: v["id"][:8]),
                  Column("uuid", lambda v: v["id"]), Column("size", lambda v: f"{v['size_gb']}G"),
                  Column("state", lambda v: v["state"]),
                  Column("instance", lambda v: (v.get("instance") or "")[:8] or None),
                  Column("project", lambda v: v["project_id"], shrinks=True), Column("pool", lambda v: v["pool_name"]),
                  Column("age", lambda v: age(v.get("created_at")))]


def _volumes(ops: Operations) -> Any:
    from etcd_compute.eschedule.volumes import Volumes
    return Volumes(ops)


def _volume_text(v: Any) -> str:
    return "\n".join(f"{k:<10} {_fmt(v[k])}" for k in ("id", "name", "size_gb", "state", "instance", "project_id",
                                                      "pool_name", "created_at"))


@volume.command(name="create")
@click.argument("size_gb", type=int, metavar="SIZE_GB")
@click.option("--name", help="Its name (letters, digits, '_', '.', '-'), unique in the project.")
@json_option
@click.pass_obj
def volume_create(ops: Operations, size_gb: int, name: str | None, as_json: bool) -> None:
    """Make a volume of SIZE_GB GiB in the Ceph pool (quota: volumes, DISK_GB)."""
    made = _volumes(ops).create(size_gb, name)
    _emit(made, as_json, made["id"])


@volume.command(name="list")
@list_options
@click.pass_obj
def volume_list(ops: Operations, as_json: bool, fmt: str, columns: tuple[str, ...]) -> None:
    """List volumes: name, id, size, state, instance."""
    _list([dict(v) for v in _volumes(ops).list()], VOLUME_COLUMNS, ["name", "id", "size", "state", "instance"],
          fmt, columns, as_json)


@volume.command(name="show")
@click.argument("volume_ref", metavar="VOLUME")
@json_option
@click.pass_obj
def volume_show(ops: Operations, volume_ref: str, as_json: bool) -> None:
    """Show a volume (by id, id prefix or name)."""
    found = _volumes(ops).show(volume_ref)
    _emit(found, as_json, _volume_text(found))


@volume.command(name="delete")
@click.argument("volume_ref", metavar="VOLUME")
@click.pass_obj
def volume_delete(ops: Operations, volume_ref: str) -> None:
    """Delete a volume no instance has: its data are gone."""
    click.echo(f"volume {_volumes(ops).delete(volume_ref)['id']} deleted")


@volume.command(name="attach")
@click.argument("volume_ref", metavar="VOLUME")
@click.argument("instance")
@click.option("--wait", is_flag=True, help="Wait until its host has attached it.")
@json_option
@click.pass_obj
def volume_attach(ops: Operations, volume_ref: str, instance: str, wait: bool, as_json: bool) -> None:
    """Attach VOLUME to INSTANCE (ACTIVE or STOPPED, on a host of the volume's pool)."""
    from etcd_compute.contract import VolumeState
    vols = _volumes(ops)
    found = vols.attach(volume_ref, instance)
    if wait:
        found = vols.wait(found["id"], VolumeState.IN_USE)
    _emit(found, as_json, f"volume {found['id']} {found['state']} (instance {found['instance']})")


@volume.command(name="detach")
@click.argument("volume_ref", metavar="VOLUME")
@click.option("--wait", is_flag=True, help="Wait until its host has detached it.")
@json_option
@click.pass_obj
def volume_detach(ops: Operations, volume_ref: str, wait: bool, as_json: bool) -> None:
    """Detach VOLUME from its instance (the guest should have unmounted it)."""
    from etcd_compute.contract import VolumeState
    vols = _volumes(ops)
    found = vols.detach(volume_ref)
    if wait:
        found = vols.wait(found["id"], VolumeState.AVAILABLE)
    _emit(found, as_json, f"volume {found['id']} {found['state']}")


def main() -> None:
    """Run one command, then leave without the interpreter's teardown: with gRPC loaded it costs
    60-110 ms per command (its threads and channel objects are torn down one by one), and every
    write a command makes has been acknowledged by then. Output and logs are flushed first."""
    try:
        _main()
        code = 0
    except SystemExit as exc:
        if isinstance(exc.code, str):
            click.echo(exc.code, err=True)
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # e.g. `eschedule list | head` closed the pipe
            stream.flush()
    logging.shutdown()
    os._exit(code)


def _main() -> None:
    # SIGTERM unwinds like Ctrl-C, so a claim made just before is freed again.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    # Ctrl-C unwinds too, also when started as a background job of a script (which inherits
    # SIGINT ignored, and Python then keeps it so).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        cli.main(standalone_mode=False)
    except ECError as exc:
        click.echo(f"eschedule: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:  # one line, like every other error
        if type(exc).__name__ == "NoArgsIsHelpError":  # plain `eschedule`: the help
            exc.show()
            sys.exit(exc.exit_code)
        where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        click.echo(f"eschedule: error: {exc.format_message()}{where}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("eschedule: aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
