"""eschedule: the command line.

Grammar (the original's, kept):
    eschedule 'resources=VCPU:1,MEMORY_MB:256,DISK_GB:1[&required=...]' [IMAGE]
    eschedule UUID
    eschedule destroy UUID
plus: schedule, show, list, hosts; --json on every read; --wait where it makes sense.
Exit codes: see errors.py (0 ok, 2 bad input, 3 no capacity, 4 Placement, 5 etcd,
6 unknown instance, 8 wait failed). Every error is one line on stderr.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from typing import Any

import click

from etcd_compute import config, layout
from etcd_compute.errors import ECError, WaitFailed
from etcd_compute.scheduler import Scheduler, check_uuid

SHOW_FIELDS = ("uuid", "host", "desired", "state", "reason", "ip", "resources", "image",
               "created_at", "updated_at")


def _looks_like_uuid(text: str) -> bool:
    try:
        check_uuid(text)
        return True
    except ECError:
        return False


class _Grammar(click.Group):
    """Route `eschedule QUERY [IMAGE]` to schedule and `eschedule UUID` to show."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["show" if _looks_like_uuid(args[0]) else "schedule", *args]
        return super().resolve_command(ctx, args)


def _emit(value: Any, as_json: bool, text: str) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True) if as_json else text)


def _fmt(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}:{v}" for k, v in value.items())
    return "-" if value is None else str(value)


def _show_text(view: dict) -> str:
    return "\n".join(f"{k:<11} {_fmt(view.get(k))}" for k in SHOW_FIELDS)


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
    ctx.obj = Scheduler(config.load_schedule(config_path))


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
def schedule(sched: Scheduler, query: str, image: str | None, image_sha256: str | None, keys: tuple[str, ...],
             user_data: str | None, kernel: str | None, initrd: str | None, cmdline: str | None,
             as_json: bool, wait: bool, timeout: float | None) -> None:
    """Claim resources for QUERY and ask the chosen host to build it from IMAGE."""
    request = sched.schedule(query, image, image_sha256=image_sha256, keys=keys, user_data=user_data,
                             kernel=kernel, initrd=initrd, cmdline=cmdline)
    view = layout.view(request, None)
    if wait:
        view = _wait_settled(sched, request["uuid"], timeout)
    _emit(view, as_json, _show_text(view))
    if view["state"] == layout.ERROR:
        raise WaitFailed(f"instance {view['uuid']} failed: {view['reason']}")


def _wait_settled(sched: Scheduler, uuid: str, timeout: float | None) -> dict:
    view = sched.wait(uuid, lambda v: v is None or v["state"] in (layout.ACTIVE, layout.ERROR), timeout)
    if view is None:
        raise WaitFailed(f"instance {uuid} was deleted while waiting")
    return view


@cli.command()
@click.argument("uuid")
@json_option
@click.pass_obj
def show(sched: Scheduler, uuid: str, as_json: bool) -> None:
    """Show an instance: host, requested and actual state, IP."""
    view = sched.show(uuid)
    _emit(view, as_json, _show_text(view))


@cli.command()
@click.argument("uuid")
@json_option
@wait_option
@timeout_option
@click.pass_obj
def destroy(sched: Scheduler, uuid: str, as_json: bool, wait: bool, timeout: float | None) -> None:
    """Destroy an instance; its host frees the allocation once the domain is gone."""
    request = sched.destroy(uuid)
    result = {"uuid": request["uuid"], "host": request["host"], "desired": request["desired"],
              "state": "DELETING"}
    if wait:
        sched.wait(request["uuid"], lambda v: v is None, timeout)
        result["state"] = "DELETED"
    _emit(result, as_json, f"instance {request['uuid']} {result['state'].lower()} on host {request['host']}")


@cli.command(name="list")
@json_option
@click.pass_obj
def list_(sched: Scheduler, as_json: bool) -> None:
    """List all instances."""
    views = sched.list()
    rows = [f"{'UUID':<36}  {'STATE':<8}  {'IP':<15}  {'HOST':<36}  RESOURCES"]
    rows += [f"{v['uuid']:<36}  {v['state']:<8}  {_fmt(v['ip']):<15}  {_fmt(v['host']):<36}  "
             f"{_fmt(v['resources'])}" for v in views]
    _emit(views, as_json, "\n".join(rows))


@cli.command()
@json_option
@click.pass_obj
def hosts(sched: Scheduler, as_json: bool) -> None:
    """List hosts (Placement resource providers) with capacity and usage."""
    found = sched.hosts()
    rows = [f"{'UUID':<36}  {'NAME':<20}  {'STATE':<8}  USED/CAPACITY"]
    rows += [f"{h['uuid']:<36}  {h['name']:<20}  {h['state']:<8}  " +
             " ".join(f"{rc}:{h['used'].get(rc, 0)}/{cap}" for rc, cap in sorted(h["capacity"].items()))
             for h in found]
    _emit(found, as_json, "\n".join(rows))


def main() -> None:
    # SIGTERM unwinds like Ctrl-C, so a claim made just before is freed again.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        cli.main(standalone_mode=False)
    except ECError as exc:
        click.echo(f"eschedule: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("eschedule: aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
