"""`eapi`: run the API server (uvicorn) on schedule.yaml's etcd and Placement."""

from __future__ import annotations

import logging
import sys

import click
import uvicorn

from etcd_compute import config
from etcd_compute.errors import ECError


@click.command()
@click.option("--config", "config_path", envvar="ESCHEDULE_CONFIG", type=click.Path(dir_okay=False),
              help="schedule.yaml (default: ./schedule.yaml, /etc/etcd-compute/schedule.yaml).")
@click.option("--listen", default="127.0.0.1:8780", show_default=True, help="HOST:PORT to serve on.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def cli(config_path: str | None, listen: str, log_level: str) -> None:
    """Serve the etcd-compute API (/v1), dashboard (/ui) and metrics (/metrics)."""
    from etcd_compute.api.app import create_app

    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise click.BadParameter(f"expected HOST:PORT, got {listen!r}", param_hint="--listen")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    app = create_app(config.load_schedule(config_path))
    uvicorn.run(app, host=host.strip("[]"), port=int(port), log_level=log_level, access_log=False,
                timeout_graceful_shutdown=5)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except ECError as exc:
        click.echo(f"eapi: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"eapi: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
