"""eschedule: the command line.

Grammar (the original's, kept):
    eschedule 'resources=VCPU:1,MEMORY_MB:256,DISK_GB:1[&required=...]' [IMAGE]
    eschedule UUID
    eschedule destroy UUID
plus: schedule, show, list, hosts, start, stop, suspend, resume, reboot, console, evacuate, audit;
--json on every read; --wait where it makes sense. This module only parses and prints:
every command is a method of operations.Operations.
Exit codes (errors.py): 0 ok, 2 bad input, 3 no capacity, 4 Placement, 5 etcd,
6 unknown instance, 7 invalid for the instance's state, 8 wait failed, 130 interrupted.
Every error is one line on stderr.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from typing import Any

import click

from etcd_compute import config, contract
from etcd_compute.contract import View, looks_like_uuid
from etcd_compute.errors import ECError, NoCapacity, UnknownInstance, WaitFailed
from etcd_compute.eschedule.operations import Operations
from etcd_compute.states import Actual, Command, settled

SHOW_FIELDS = ("uuid", "host", "host_state", "desired", "state", "reason", "ip", "resources", "image",
               "created_at", "updated_at")


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
timeout_option = click.option("--timeout", type=float, default=None,
                              help="Seconds to wait (default: wait_timeout from schedule.yaml).")


@click.group(cls=_Grammar, no_args_is_help=True)
@click.option("--config", "config_path", envvar="ESCHEDULE_CONFIG", type=click.Path(dir_okay=False),
              help="schedule.yaml (default: ./schedule.yaml, /etc/etcd-compute/schedule.yaml).")
@click.option("-v", "--verbose", is_flag=True, help="Log what happens on stderr.")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, verbose: bool) -> None:
    """Schedule VMs with Placement, deliver them through etcd."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    ctx.obj = Operations(config.load_schedule(config_path))


@cli.command()
@click.argument("query")
@click.argument("image", required=False)
@click.option("--image-sha256", help="Expected sha256 of the image; the build fails on a mismatch.")
@click.option("--key", "keys", multiple=True, help="An ssh public key file for the guest (repeatable).")
@click.option("--user-data", help="A cloud-init user-data file for the guest.")
@click.option("--kernel", help="Boot this kernel directly (URL or path on the host); with --initrd, --cmdline.")
@click.option("--initrd", help="Initrd for --kernel.")
@click.option("--cmdline", help="Kernel command line for --kernel.")
@json_option
@wait_option
@timeout_option
@click.pass_obj
def schedule(ops: Operations, query: str, image: str | None, image_sha256: str | None, keys: tuple[str, ...],
             user_data: str | None, kernel: str | None, initrd: str | None, cmdline: str | None,
             as_json: bool, wait: bool, timeout: float | None) -> None:
    """Claim resources for QUERY and ask the chosen host to build it from IMAGE."""
    request = ops.schedule(query, image, image_sha256=image_sha256, keys=keys, user_data=user_data,
                             kernel=kernel, initrd=initrd, cmdline=cmdline)
    view = contract.view(request, None)
    if wait:
        view = _wait_settled(ops, request["uuid"], timeout)
    _emit(view, as_json, _show_text(view))
    if view["state"] == Actual.ERROR:
        raise WaitFailed(f"instance {view['uuid']} failed: {view['reason']}")
    if wait:
        _fail_unless_addressed(ops, view)


def _fail_unless_addressed(ops: Operations, view: View) -> None:
    if why := ops.unaddressed(view):
        raise WaitFailed(f"instance {view['uuid']} {why}")


def _wait_settled(ops: Operations, uuid: str, timeout: float | None) -> View:
    try:
        view = ops.wait(uuid, lambda v: v is None or v["state"] in (Actual.ACTIVE, Actual.ERROR), timeout)
    except WaitFailed:
        click.echo(f"instance {uuid} was scheduled; it is not ACTIVE yet (eschedule {uuid} shows it)", err=True)
        raise
    if view is None:
        raise WaitFailed(f"instance {uuid} was deleted while waiting")
    return view


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
        ops.wait(uuid, lambda v: v is None, timeout)
        result["state"] = "DELETED"
    _emit(result, as_json, f"instance {uuid} {result['state'].lower()} on host {host}")


def _lifecycle(action: Command, doc: str) -> None:
    target = settled(action)

    @json_option
    @wait_option
    @timeout_option
    @click.argument("uuid")
    @click.pass_obj
    def command(ops: Operations, uuid: str, as_json: bool, wait: bool, timeout: float | None) -> None:
        request = ops.act(action, uuid)
        view = ops.show(request["uuid"])
        if wait:
            def done(v: View | None) -> bool:
                if v is None or v["state"] == Actual.ERROR:
                    return True
                rebooted = action != Command.REBOOT or ops.reboots_done(request["uuid"]) >= request.get("reboot", 0)
                return v["state"] == target and rebooted
            waited = ops.wait(request["uuid"], done, timeout)
            if waited is None or waited["state"] != target:
                raise WaitFailed(f"instance {request['uuid']} is {waited['state'] if waited else 'gone'}, not {target}")
            view = waited
        _emit(view, as_json, _show_text(view))
        if wait:
            _fail_unless_addressed(ops, view)

    command.__doc__ = doc
    cli.command(name=str(action))(command)


for _action, _doc in [(Command.START, "Power an instance on (also one its guest powered off)."),
                      (Command.STOP, "Shut an instance down (ACPI, then power off after stop_timeout)."),
                      (Command.SUSPEND, "Pause a running instance in memory."),
                      (Command.RESUME, "Continue a suspended instance."),
                      (Command.REBOOT, "Restart a running instance (clean ACPI shutdown and start; "
                                       "powered off after stop_timeout).")]:
    _lifecycle(_action, _doc)


@cli.command()
@click.argument("uuid")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new output until the instance is gone.")
@click.pass_obj
def console(ops: Operations, uuid: str, follow: bool) -> None:
    """Print an instance's serial console (its last 64 KiB, as its host publishes it)."""
    shown = ops.console(uuid)
    upto = _print_console(shown, None)
    if shown is None and not follow:
        click.echo(f"instance {uuid}: no console output published yet", err=True)
    while follow:
        time.sleep(1.0)
        try:
            upto = _print_console(ops.console(uuid), upto)
        except UnknownInstance:
            return  # destroyed: nothing more will come


def _print_console(console: contract.Console | None, upto: int | None) -> int | None:
    """Write what `console` holds beyond byte `upto` of the log (all of it after a rotation);
    the new `upto`."""
    if console is None:
        return upto
    data, end = contract.console_bytes(console)
    start = end - len(data)
    if upto is not None and start <= upto <= end:
        data = data[upto - start:]
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return end


@cli.command()
@click.argument("host", required=False)
@click.option("--force", is_flag=True, help="Evacuate even though the host is UP.")
@click.option("--auto", "auto", is_flag=True, help="Keep running: evacuate every host DOWN for --grace seconds.")
@click.option("--grace", type=float, default=30.0, show_default=True, help="With --auto: seconds DOWN first.")
@json_option
@click.pass_obj
def evacuate(ops: Operations, host: str | None, force: bool, auto: bool, grace: float, as_json: bool) -> None:
    """Rebuild the instances of a DOWN host on other hosts."""
    if auto:
        click.echo(f"evacuating hosts that are DOWN for {grace:.0f}s; Ctrl-C stops", err=True)
        ops.auto_evacuate(grace)
        return
    if host is None:
        raise click.UsageError("evacuate needs HOST (or --auto)")
    moved = ops.evacuate(host, force)
    _emit(moved, as_json, "\n".join(
        f"{m['uuid']}  {'-> ' + m['to'] if m['to'] else 'NOT MOVED: ' + m['error']}" for m in moved)
        or f"host {host} has no instances")
    if any(m["to"] is None for m in moved):
        raise NoCapacity(f"{sum(m['to'] is None for m in moved)} instances found no other host")


@cli.command()
@click.option("--fix", is_flag=True, help="Delete the allocations that no instance owns.")
@click.option("--grace", type=float, default=5.0, show_default=True,
              help="Seconds a finding must persist (a claim being written looks leaked for a moment).")
@json_option
@click.pass_obj
def audit(ops: Operations, fix: bool, grace: float, as_json: bool) -> None:
    """Find allocations in Placement that no instance in etcd owns (leaked capacity)."""
    found = ops.audit(fix, grace)
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
             " ".join(f"{rc}:{h['used'].get(rc, 0)}/{cap}" for rc, cap in sorted(h["capacity"].items()))
             for h in found]
    _emit(found, as_json, "\n".join(rows))


def main() -> None:
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
