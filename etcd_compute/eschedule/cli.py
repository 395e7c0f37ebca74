"""eschedule: the command line.

Grammar (the original's, kept):
    eschedule 'resources=VCPU:1,MEMORY_MB:256,DISK_GB:1[&required=...]' [IMAGE]
    eschedule UUID
    eschedule destroy UUID
plus: schedule, show, list, hosts, start, stop, suspend, resume, reboot, console, evacuate, audit,
token, quota; --json on every read; --wait where it makes sense; --project to act as (and see
only) one project. This module only parses and prints: every command is a method of
operations.Operations, which the API server (etcd_compute/api) calls too.
Exit codes (errors.py): 0 ok, 2 bad input, 3 no capacity, 4 Placement, 5 etcd,
6 unknown instance, 7 invalid for the instance's state, 8 wait failed, 9 over quota,
11 `audit --invariants` found violations, 130 interrupted.
Every error is one line on stderr.
"""

from __future__ import annotations

import contextlib
import json
import logging
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
from etcd_compute.states import Command, Role

if TYPE_CHECKING:  # imported when a command runs: `--help` need not load etcd, gRPC, requests, YAML
    from etcd_compute.eschedule.operations import Operations

SHOW_FIELDS = ("uuid", "project_id", "host", "host_state", "host_down_since", "desired", "state", "reason", "ip",
               "ready_at", "resources", "image", "created_at", "updated_at")


class _Grammar(click.Group):
    """Route `eschedule QUERY [IMAGE]` to schedule and `eschedule UUID` to show."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["show" if looks_like_uuid(args[0]) else "schedule", *args]
        return super().resolve_command(ctx, args)


def _emit(value: Any, as_json: bool, text: str) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True) if as_json else text)


def _fmt(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}:{v}" for k, v in value.items())
    return "-" if value is None else str(value)


def _show_text(view: View) -> str:
    lines = [f"{k:<11} {_fmt(view.get(k))}" for k in SHOW_FIELDS if k in view]
    lines += [f"{'event' if i == 0 else '':<11} {e['at']} {e['event']}" for i, e in enumerate(view.get("events") or [])]
    return "\n".join(lines)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
wait_option = click.option("--wait", is_flag=True, help="Wait until the host has acted.")
# --wait alone (or =running): until the host has started the domain (with its address); =ready: until the
# guest also said that boot has finished (cloud-init done): the status's ready_at.
boot_wait_option = click.option(
    "--wait", "wait", type=click.Choice(["running", "ready"]), is_flag=False, flag_value="running", default=None,
    help="Wait until the host has acted: --wait (or --wait=running) until the domain runs with its address, "
         "--wait=ready until its guest has also said it booted (cloud-init done).")
timeout_option = click.option("--timeout", type=float, default=None,
                              help="Seconds to wait (default: wait_timeout from schedule.yaml).")


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
@click.argument("query")
@click.argument("image", required=False)
@click.option("--image-sha256", help="Expected sha256 of the image; the build fails on a mismatch.")
@click.option("--key", "keys", multiple=True, help="An ssh public key file for the guest (repeatable).")
@click.option("--user-data", help="A cloud-init user-data file for the guest.")
@click.option("--kernel", help="Boot this kernel directly (URL or path on the host); with --initrd, --cmdline.")
@click.option("--initrd", help="Initrd for --kernel.")
@click.option("--cmdline", help="Kernel command line for --kernel.")
@click.option("--no-config-drive", is_flag=True, help="No config drive: the guest reads its data from the "
              "metadata server alone (stock OpenStack images find it through SMBIOS).")
@json_option
@boot_wait_option
@timeout_option
@click.pass_obj
def schedule(ops: Operations, query: str, image: str | None, image_sha256: str | None, keys: tuple[str, ...],
             user_data: str | None, kernel: str | None, initrd: str | None, cmdline: str | None,
             no_config_drive: bool, as_json: bool, wait: str | None, timeout: float | None) -> None:
    """Claim resources for QUERY and ask the chosen host to build it from IMAGE."""
    request = ops.schedule(query, image, image_sha256=image_sha256, ssh_keys=[inputs.read_key(k) for k in keys],
                           user_data=inputs.read_user_data(user_data), kernel=kernel, initrd=initrd,
                           cmdline=cmdline, config_drive=not no_config_drive)
    view = contract.view(request, None)
    if wait:
        view = _waited(lambda: ops.wait_settled(request["uuid"], timeout, wait == "ready"), ops, request["uuid"],
                       as_json)
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
@click.argument("uuid")
@json_option
@click.pass_obj
def show(ops: Operations, uuid: str, as_json: bool) -> None:
    """Show an instance: host, requested and actual state, IP."""
    view = ops.show(uuid)
    _emit(view, as_json, _show_text(view))


@cli.command()
@click.argument("uuid")
@click.option("--force", is_flag=True, help="For a host that is DOWN: free the allocation and forget the "
              "instance now; the host removes the domain if it returns.")
@json_option
@wait_option
@timeout_option
@click.pass_obj
def destroy(ops: Operations, uuid: str, force: bool, as_json: bool, wait: bool, timeout: float | None) -> None:
    """Destroy an instance; its host frees the allocation once the domain is gone."""
    uuid, host = ops.destroy(uuid, force)
    result = {"uuid": uuid, "host": host, "desired": "deleted", "state": "DELETED" if force else "DELETING"}
    if wait and not force:
        ops.wait_gone(uuid, timeout)
        result["state"] = "DELETED"
    _emit(result, as_json, f"instance {uuid} {result['state'].lower()} on host {host}")


def _lifecycle(action: Command, doc: str) -> None:
    @json_option
    @(boot_wait_option if action != Command.SUSPEND else wait_option)
    @timeout_option
    @click.argument("uuid")
    @click.pass_obj
    def command(ops: Operations, uuid: str, as_json: bool, wait: str | bool | None, timeout: float | None) -> None:
        request = ops.act(action, uuid)
        _acted(ops, action, request, as_json, wait, timeout)

    command.__doc__ = doc
    cli.command(name=str(action))(command)


def _shutting_down(action: Command, doc: str) -> None:
    """stop and reboot: their --timeout is the guest's clean shutdown, not the wait's."""
    @json_option
    @(boot_wait_option if action == Command.REBOOT else wait_option)
    @click.option("--timeout", "stop_timeout", type=float, default=None,
                  help="Seconds the guest has to shut down cleanly before it is powered off "
                  "(default: the host's stop_timeout, 60); --wait waits wait_timeout on top.")
    @click.option("--force", is_flag=True, help="Power the guest off at once, without a clean shutdown "
                  "(also one that is under way); its events say so.")
    @click.argument("uuid")
    @click.pass_obj
    def command(ops: Operations, uuid: str, as_json: bool, wait: str | bool | None, stop_timeout: float | None,
                force: bool) -> None:
        request = ops.act(action, uuid, stop_timeout=stop_timeout, force=force)
        _acted(ops, action, request, as_json, wait, None)

    command.__doc__ = doc
    cli.command(name=str(action))(command)


def _acted(ops: Operations, action: Command, request: contract.Request, as_json: bool, wait: str | bool | None,
           timeout: float | None) -> None:
    if wait:
        view = _waited(lambda: ops.wait_acted(action, request, timeout, wait == "ready"), ops, request["uuid"],
                       as_json)
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
@click.argument("uuid")
@click.option("--boot", type=click.IntRange(min=1), help="Boot N (each start of the domain by its host is one): its "
              "first and last 16 KiB.")
@click.option("--all", "every", is_flag=True, help="Every boot kept (the first and the last few), oldest first.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new output (the next boots' too) until the "
              "instance is gone.")
@json_option
@click.pass_obj
def console(ops: Operations, uuid: str, boot: int | None, every: bool, follow: bool, as_json: bool) -> None:
    """Print an instance's serial console: its current boot (the last 64 KiB, as its host
    publishes it), boot N, or every boot kept."""
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
@click.argument("uuid")
@click.argument("command", nargs=-1)
@click.option("-l", "--user", help="Log in as this user (default: ssh_user of schedule.yaml, else ssh's own).")
@click.option("-i", "--identity", help="The private key (default: that of the first of schedule.yaml's ssh_keys, "
              "if it is there; else ssh's own).")
@click.option("-o", "options", multiple=True, help="An ssh option, as `ssh -o` takes it (repeatable).")
@timeout_option
@click.pass_obj
def ssh(ops: Operations, uuid: str, command: tuple[str, ...], user: str | None, identity: str | None,
        options: tuple[str, ...], timeout: float | None) -> None:
    """Wait until the instance's guest has booted (ready), then log in with the OpenSSH client
    (or run COMMAND there). Its host key is remembered under the instance's uuid, not its address."""
    if shutil.which("ssh") is None:
        raise UsageError("no OpenSSH client (ssh) on PATH")
    view = ops.wait_ready(uuid, timeout)
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
@click.option("--grace", type=float, default=None, help="Seconds to wait beyond the host's fence window "
              "(lease_ttl + fence_margin); default: evacuate.grace (0), with --auto evacuate.auto_grace (30).")
@click.option("--no-wait", is_flag=True, help="Exit 7 instead of waiting when the fence window has not passed.")
@click.option("--metrics", help="With --auto: serve Prometheus metrics on HOST:PORT (default: evacuate.metrics).")
@json_option
@click.pass_obj
def evacuate(ops: Operations, host: str | None, force: bool, auto: bool, grace: float | None, no_wait: bool,
             metrics: str | None, as_json: bool) -> None:
    """Rebuild the instances of a DOWN host on other hosts, once its fence has stopped them."""
    if grace is not None and not 0 <= grace <= 86400:
        raise UsageError(f"--grace must be from 0 to 86400 seconds, got {grace:g}")
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
@click.option("--grace", type=float, default=5.0, show_default=True,
              help="Seconds a finding must persist (a claim being written looks leaked for a moment).")
@click.option("--invariants", "invariants", is_flag=True,
              help="Instead, check the invariants etcd and Placement show (1, 3, 4, D, W: see "
              "etcd_compute/invariants.py), read-only; no hypervisor is read. One line per violation; "
              "exit 11 if any.")
@click.option("--stuck-after", type=float, default=300.0, show_default=True,
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


@cli.command(name="list")
@json_option
@click.pass_obj
def list_(ops: Operations, as_json: bool) -> None:
    """List all instances."""
    views = ops.instances()
    rows = [f"{'UUID':<36}  {'STATE':<9}  {'IP':<15}  {'HOST':<36}  {'HOST UP':<7}  RESOURCES"]
    rows += [f"{v['uuid']:<36}  {v['state']:<9}  {_fmt(v['ip']):<15}  {_fmt(v['host']):<36}  "
             f"{v['host_state']:<7}  {_fmt(v['resources'])}" for v in views]
    _emit(views, as_json, "\n".join(rows))


@cli.command()
@json_option
@click.pass_obj
def hosts(ops: Operations, as_json: bool) -> None:
    """List hosts (Placement resource providers) with capacity and usage."""
    found = ops.hosts()
    rows = [f"{'UUID':<36}  {'NAME':<20}  {'STATE':<13}  USED/CAPACITY"]
    rows += [f"{h['uuid']:<36}  {h['name']:<20}  {h['state'] + (' locked' if h['locked'] else ''):<13}  " +
             " ".join(f"{rc}:{h['used'].get(rc, 0)}/{cap}" for rc, cap in sorted(h["capacity"].items())) +
             (f"  (DOWN since {h['down_since']})" if h["down_since"] else "") for h in found]
    _emit(found, as_json, "\n".join(rows))


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
