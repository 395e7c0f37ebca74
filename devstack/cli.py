"""`python3 -m devstack {install,up,down,status,env,reset,guest,lint,smoke,test,demo,bench,chaos,host}`.

Standard library only, as localstack.py (the stack it starts and stops), testguest.py (the
guests), ceph.py, libvirthost.py and containers.py, whose commands these are.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from devstack import ceph as stack_ceph
from devstack import containers, libvirthost, localstack, testguest
from devstack.localstack import (
    StackError,
    down,
    ensure_up,
    etcd_healthy,
    install,
    lint,
    placement_healthy,
    profile,
    reset,
    run_in_venv,
    run_tests,
    say,
    services_dir,
    stack_dir,
    status,
)


def build_guest(stack: Path, cloud: bool = False) -> dict:
    """The offline test guest (Debian kernel + busybox initramfs + small disk), cached.

    With CLOUD, the Debian 12 cloud-init guest instead (debootstrap; its paths are printed).
    """
    if not cloud:
        return testguest.ensure_guest(stack / "guest")
    guest = testguest.ensure_cloud_guest(stack / "cloudguest")
    for key, value in guest.items():
        say(f"{key}: {value}")
    return guest



def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python3 -m devstack", description=localstack.__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("install", help="install Debian packages and both venvs (idempotent)")
    up = sub.add_parser("up", help="start etcd, Placement, libvirt (idempotent)")
    up.add_argument("--fresh", action="store_true", help="wipe etcd data and placement.db (with --ceph: Ceph's too)")
    up.add_argument("--ceph", action="store_true", help="also a one-node Ceph with an RBD pool (devstack/ceph.py)")
    sub.add_parser("down", help="stop ecompute, etcd, Placement and Ceph").add_argument(
        "--all", action="store_true", help="also the test profile's, and libvirtd/virtlogd if we started them")
    sub.add_parser("status", help="one line per service")
    sub.add_parser("env", help="print the env file")
    sub.add_parser("reset", help="same as up --fresh")
    sub.add_parser("guest", help="build (or reuse) the offline test guest").add_argument(
        "--cloud", action="store_true", help="the Debian 12 cloud-init guest instead (debootstrap, ~3 min once)")
    sub.add_parser("lint", help="ruff, mypy, the import contracts and no import circles")
    sub.add_parser("smoke", help="docker/gabbi's smoke tests against a Placement (default: the stack's)").add_argument(
        "url", nargs="?", help="a Placement URL, e.g. a container's (noauth2)")
    sub.add_parser("test", help="install, up (test profile), lint, pytest tests [ARGS]; "
                                "--quick: only the tests that need no stack (pytest -m quick: no up, no lint)")
    sub.add_parser("demo", help="install, up, boot a guest with eschedule and show its IP")
    sub.add_parser("bench", help="install, up (bench profile), run bench/run.py [NAMES...]")
    sub.add_parser("chaos", help="install, up (test profile), run devstack/chaos/ [ARGS]")
    host = sub.add_parser("host", help="a second libvirt host on this machine (devstack/libvirthost.py)")
    host.add_argument("action", choices=["start", "stop", "status", "hang", "resume"])
    host.add_argument("name", help="its hostname; its files in <stack>/hosts/NAME")
    host.add_argument("--fresh", action="store_true", help="start: forget its domains, networks and pools first")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args, extra = ap.parse_known_args(argv)
    if extra and args.cmd not in ("test", "bench", "chaos"):
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.cmd in ("test", "bench", "chaos"):
        os.environ.setdefault("ECOMPUTE_PROFILE", "bench" if args.cmd == "bench" else "test")
    try:
        if args.cmd == "test" and "--quick" in extra:  # the inner loop: no stack, no lint
            install(stack_dir())
            rest = [a for a in extra if a != "--quick"]
            paths = [] if any(a.startswith("tests") for a in rest) else ["tests"]
            return run_in_venv(services_dir(), ["-m", "pytest", "-m", "quick", *paths, *rest])
        if args.cmd == "host":
            return libvirthost.command(args.action, args.name, args.fresh)
        if args.cmd == "smoke":
            install(stack_dir())
            return containers.smoke(args.url or ensure_up(services_dir())["placement"])
        return command(args, extra)
    except (StackError, RuntimeError, OSError) as e:
        print(f"localstack: error: {e}", file=sys.stderr)
        return 1


def up(stack: Path, fresh: bool, ceph: bool) -> None:
    """`up [--fresh] [--ceph]`: the services, and with `ceph` the stack's one-node Ceph (wiped too when fresh)."""
    reset(stack) if fresh else ensure_up(stack)
    if ceph:
        if fresh:
            stack_ceph.wipe_ceph(stack)
        info = stack_ceph.ensure_ceph(stack)
        say(f"ceph: conf {info.conf}, client.{info.client} (keyring {info.keyring}), pool {info.pool}, "
            f"libvirt secret {info.secret_uuid}")
    say(f"ready: source {stack / 'env'}")


def guest(tools: Path, stack: Path, cloud: bool) -> int:
    """`guest [--cloud]`: build it; the cloud-init guest also goes into a running stack's image
    catalogue (as `debian-12`, devstack/demo.py's register), so that nothing needs the internet."""
    build_guest(tools, cloud=cloud)
    if cloud and etcd_healthy() and placement_healthy():
        return run_in_venv(stack, ["-m", "devstack.demo", "register"])
    return 0


def command(args: argparse.Namespace, extra: list[str]) -> int:
    tools, stack = stack_dir(), services_dir()
    if args.cmd == "install":
        install(tools)
    elif args.cmd in ("up", "reset"):
        up(stack, fresh=args.cmd == "reset" or args.fresh, ceph=getattr(args, "ceph", False))
    elif args.cmd == "down":
        # Ceph first: it removes its libvirt secret and pool, libvirtd may stop next.
        if args.all and profile() == "default" and (stack / "test" / "run").is_dir():
            stack_ceph.stop_ceph(stack / "test")
            down(stack / "test")  # its ports do not matter to stop it: pids are in its run/
        stack_ceph.stop_ceph(stack)
        down(stack, args.all)
    elif args.cmd == "status":
        return status(stack) | stack_ceph.status(stack)
    elif args.cmd == "env":
        if not (stack / "env").exists():
            raise StackError(f"{stack / 'env'} does not exist yet: run `up` first")
        sys.stdout.write((stack / "env").read_text())
    elif args.cmd == "guest":
        return guest(tools, stack, args.cloud)
    elif args.cmd == "lint":
        install(tools)
        return lint(stack)
    else:  # test, demo, bench, chaos: everything installed and up first
        install(tools)
        ensure_up(stack)
        build_guest(tools)
        if args.cmd == "test":
            return run_tests(stack, extra)
        if args.cmd == "bench":
            # Byte-compile the tree as pip does an installed package: with PYTHONDONTWRITEBYTECODE
            # set (as on these machines) every process measured would compile it anew.
            run_in_venv(stack, ["-m", "compileall", "-q", "etcd_compute", "md_server"])
        script = {"demo": ["-m", "devstack.demo"], "bench": ["bench/run.py"], "chaos": ["-m", "devstack.chaos"]}
        return run_in_venv(stack, [*script[args.cmd], *extra])
    return 0
