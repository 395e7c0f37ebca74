"""Local stack for development and CI: etcd + Placement + libvirt on loopback.

Standard library only, because `install` creates the venv that holds every dependency.
Its commands (`python3 -m devstack ...`) are in cli.py; the other rooms of devstack stand on
this one, and it imports none of them.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
APT_PACKAGES = ["etcd-server", "etcd-client", "qemu-system-x86", "qemu-utils", "libvirt-daemon-system",
                "libvirt-daemon-system-sysv", "dnsmasq-base", "libvirt-dev", "pkg-config", "gcc",
                "postgresql",  # a Placement on PostgreSQL for the tests and benchmarks of concurrent claims
                "chromium", "chromium-driver",  # the dashboard's tests run in a real headless browser
                "iproute2",  # a second libvirt host in a network namespace of its own (devstack/libvirthost.py)
                # docker/'s containers (devstack/containers.py): podman on runc (crun refuses the hybrid
                # cgroups here), catatonit for pods, netavark + aardvark-dns (compose's service names),
                # debootstrap for the offline base image, docker-compose to read the file as Docker does
                "podman", "runc", "catatonit", "netavark", "aardvark-dns", "debootstrap", "docker-compose",
                # Ceph RBD disks (devstack/ceph.py): the daemons, their CLIs, QEMU's rbd driver and libvirt's
                # rbd pools. libvirtd loads that backend only at start: installed here, before ensure_up()
                # first starts libvirtd (ceph.ensure_libvirt_rbd restarts one that predates it).
                "ceph-mon", "ceph-osd", "ceph-mgr", "ceph-common", "qemu-block-extra",
                "libvirt-daemon-driver-storage-rbd"]
PLACEMENT_PACKAGES = ["openstack-placement", "gunicorn", "osc-placement", "python-openstackclient",
                      "psycopg2-binary"]
PLACEMENT_API_VERSION = "1.39"
LIBVIRT_SOCK = Path("/run/libvirt/libvirt-sock")
VIRTLOGD_SOCK = Path("/run/libvirt/virtlogd-sock")
HEALTH_TIMEOUT = 30.0
# The libvirt network of the demo and the tests: isolated (no <forward>), nothing leaves this machine.
# Only one network per machine can carry the metadata address, so both share this one.
ISOLATED_NETWORK = {"name": "ec-isolated", "mode": "isolated", "bridge_name": "ecbr-iso",
                    "address": "10.124.0.1/24"}
STOP_TIMEOUT = 10.0


class StackError(RuntimeError):
    """A step failed; the message says which and carries the log tail."""


def stack_dir() -> Path:
    """Where everything lives: $ECOMPUTE_STACK_DIR or <repo>/.stack (git-ignored)."""
    return Path(os.environ.get("ECOMPUTE_STACK_DIR") or REPO / ".stack").resolve()


def profile() -> str:
    """`default` (the demo's cloud) or `test` (the suite's own etcd and Placement).

    The suite must not see the demo's hosts (nor the demo the suite's), so each
    profile has its own services, data and ports; venvs and the test guest are shared.
    """
    return os.environ.get("ECOMPUTE_PROFILE", "default")


def services_dir() -> Path:
    return stack_dir() if profile() == "default" else stack_dir() / profile()


def venv() -> Path:
    return stack_dir() / "venv"


def placement_venv() -> Path:
    return stack_dir() / "placement-venv"


def ports() -> dict[str, int]:
    """Loopback ports; overridable so several stacks can share a machine."""
    shift = {"default": 0, "test": 100, "bench": 200}.get(profile(), 300)
    etcd = int(os.environ.get("ECOMPUTE_ETCD_PORT", str(12379 + shift)))
    return {"etcd": etcd, "etcd_peer": etcd + 1,
            "placement": int(os.environ.get("ECOMPUTE_PLACEMENT_PORT", str(18778 + shift)))}


def urls() -> dict[str, str]:
    """Base URLs of etcd and Placement for the configured ports."""
    p = ports()
    return {"etcd": f"http://127.0.0.1:{p['etcd']}", "placement": f"http://127.0.0.1:{p['placement']}"}


def say(msg: str) -> None:
    print(f"localstack: {msg}", flush=True)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def run_logged(cmd: Sequence[str | Path], log: Path, what: str, env: dict[str, str] | None = None) -> None:
    """Run a noisy command with its output in a log file; on failure raise with the tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"\n$ {shlex.join(map(str, cmd))}\n")
        out.flush()
        rc = subprocess.run(list(map(str, cmd)), stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env).returncode
    if rc != 0:
        raise StackError(f"{what} failed (exit {rc}); last lines of {log}:\n{tail(log)}")


# ---------------------------------------------------------------- install

def missing_debs() -> list[str]:
    res = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\n", *APT_PACKAGES],
                         capture_output=True, text=True)
    installed = {ln.split()[0] for ln in res.stdout.splitlines() if ln.endswith(" installed")}
    return [p for p in APT_PACKAGES if p not in installed]


def install_debs(stack: Path) -> None:
    missing = missing_debs()
    if not missing:
        say("debian packages: present")
        return
    say(f"debian packages: installing {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = stack / "logs" / "apt.log"
    run_logged(["apt-get", "update"], log, "apt-get update", env)
    run_logged(["apt-get", "install", "-y", "--no-install-recommends", *APT_PACKAGES], log, "apt-get install", env)


def ensure_venv(venv: Path, requirements: list[str], fingerprint: str, log: Path) -> None:
    """(Re)install into a venv only when the fingerprint of what it should hold changed."""
    stamp = venv / ".localstack-stamp"
    if stamp.exists() and stamp.read_text() == fingerprint and (venv / "bin" / "python").exists():
        say(f"{venv.name}: up to date")
        return
    if not (venv / "bin" / "python").exists():
        say(f"{venv.name}: creating")
        run_logged([sys.executable, "-m", "venv", venv], log, f"creating {venv}")
    say(f"{venv.name}: pip install (log: {log})")
    t0 = time.monotonic()
    run_logged([venv / "bin" / "python", "-m", "pip", "install", "--disable-pip-version-check", *requirements],
               log, f"pip install into {venv}")
    stamp.write_text(fingerprint)
    say(f"{venv.name}: done in {time.monotonic() - t0:.0f} s")


def install(stack: Path | None = None) -> None:
    """Idempotently install Debian packages, the project venv and the Placement venv."""
    stack = stack or stack_dir()
    (stack / "logs").mkdir(parents=True, exist_ok=True)
    install_debs(stack)
    # Not sys.executable: the system's python3 and the venv's own (helpers run devstack with it)
    # must agree, or each reinstalls the venv in turn.
    base = f"{sys.version}\n"
    setup_hash = hashlib.sha256((REPO / "setup.py").read_bytes()).hexdigest()
    ensure_venv(venv(), ["-e", f"{REPO}[test,bench]"], base + setup_hash, stack / "logs" / "pip-venv.log")
    ensure_venv(placement_venv(), PLACEMENT_PACKAGES, base + " ".join(PLACEMENT_PACKAGES),
                stack / "logs" / "pip-placement.log")


# ---------------------------------------------------------------- processes

def pid_state(pid: int) -> str | None:
    """The state letter of a process in /proc (R, S, D, T when stopped, Z a zombie); None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int, name: str) -> bool:
    """True if pid runs and its command line mentions name (guards against pid reuse and zombies)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return pid_state(pid) not in ("Z", None) and name in cmdline


def read_pid(stack: Path, name: str) -> int | None:
    try:
        return int((stack / "run" / f"{name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def http_ok(url: str, headers: dict[str, str] | None = None, needle: str = "") -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as r:
            return r.status == 200 and needle in r.read().decode(errors="replace")
    except OSError:
        return False


def sock_ok(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


def etcd_healthy() -> bool:
    return http_ok(urls()["etcd"] + "/health", needle='"true"')


def placement_healthy() -> bool:
    return http_ok(urls()["placement"] + "/", {"x-auth-token": "admin"})


def wait_for(check: Callable[[], bool], what: str, log: Path, proc: subprocess.Popen | None = None, *,
             timeout: float = HEALTH_TIMEOUT, interval: float = 0.05) -> None:
    """Poll check() until it passes; fail early if the process died, late on timeout."""
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited with {proc.returncode}; last lines of {log}:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise StackError(f"{what} not healthy after {timeout:.0f} s; last lines of {log}:\n{tail(log)}")
        time.sleep(interval)


def spawn(stack: Path, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a detached service (own session, so it outlives us and its group can be signalled)."""
    log = stack / "logs" / f"{name}.log"
    with log.open("a") as out:
        out.write(f"\n=== {time.strftime('%F %T')} $ {shlex.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, cwd=stack)
    (stack / "run" / f"{name}.pid").write_text(f"{proc.pid}\n")
    return proc


def stop(stack: Path, name: str, match: str) -> bool:
    """SIGTERM the pidfile's process group, SIGKILL after STOP_TIMEOUT; True if something was stopped."""
    pidfile = stack / "run" / f"{name}.pid"
    pid = read_pid(stack, name)
    pidfile.unlink(missing_ok=True)
    if pid is None or not pid_alive(pid, match):
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:  # the whole group: gunicorn's worker goes with its master
            os.killpg(pid, sig) if os.getpgid(pid) == pid else os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + STOP_TIMEOUT
        while pid_alive(pid, match) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not pid_alive(pid, match):
            return True
    raise StackError(f"{name} (pid {pid}) survived SIGKILL")


# ---------------------------------------------------------------- services

def etcd_command(name: str, data: Path, client: str, peer: str, cluster: str | None = None) -> list[str]:
    """An etcd member on loopback URLs (alone, or of `cluster`: "name=peer,..."); fast
    elections (10/100 ms): no network to wait for.

    Shared with devstack.harness, whose private etcds (killed under a client, TLS, auth, a
    3-member cluster losing members) are started the same way as the stack's.
    """
    return ["etcd", "--name", name, "--data-dir", str(data),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", cluster or f"{name}={peer}",
            # One token per cluster (all its members alike), so clusters on one machine never mix.
            "--initial-cluster-token", "ec-" + hashlib.sha256((cluster or peer).encode()).hexdigest()[:12],
            "--heartbeat-interval", "10", "--election-timeout", "100"]


def start_etcd(stack: Path) -> None:
    if etcd_healthy():
        say(f"etcd: healthy at {urls()['etcd']}")
        return
    stop(stack, "etcd", "etcd")  # a hung leftover of ours
    p = ports()
    client, peer = f"http://127.0.0.1:{p['etcd']}", f"http://127.0.0.1:{p['etcd_peer']}"
    (stack / "etcd").mkdir(mode=0o700, exist_ok=True)
    proc = spawn(stack, "etcd", etcd_command("ecompute", stack / "etcd", client, peer)
                 + ["--logger", "zap", "--log-outputs", "stderr"])
    wait_for(etcd_healthy, "etcd", stack / "logs" / "etcd.log", proc)
    say(f"etcd: started at {client} (pid {proc.pid})")


def placement_section(conflict_retries: int = 1) -> str:
    """The [placement] section of every placement.conf we write. Placement's own retry of a claim
    that lost a provider's generation (default 10) runs inside the claim's transaction and can let
    it through over capacity (etcd_compute/eschedule/overcommit.py); with 1 the 409 reaches
    eschedule, which retries in a fresh request."""
    return f"[placement]\nallocation_conflict_retry_count = {conflict_retries}\n"


def placement_env(stack: Path) -> dict[str, str]:
    return {**os.environ, "OS_PLACEMENT_CONFIG_DIR": str(stack / "placement")}


def start_placement(stack: Path) -> None:
    if placement_healthy():
        say(f"placement: healthy at {urls()['placement']}")
        return
    stop(stack, "placement", "gunicorn")
    conf_dir, pvenv = stack / "placement", placement_venv()
    if not (pvenv / "bin" / "gunicorn").exists():
        raise StackError(f"{pvenv} is missing: run `python3 -m devstack install` first")
    conf_dir.mkdir(exist_ok=True)
    conf = (f"[api]\nauth_strategy = noauth2\n\n[placement_database]\n"
            f"connection = sqlite:///{conf_dir / 'placement.db'}\n\n{placement_section()}")
    if not (conf_dir / "placement.conf").exists() or (conf_dir / "placement.conf").read_text() != conf:
        (conf_dir / "placement.conf").write_text(conf)
    synced = conf_dir / ".db-synced"
    if not (synced.exists() and (conf_dir / "placement.db").exists()):
        say("placement: db sync")
        run_logged([pvenv / "bin" / "placement-manage", "--config-file", conf_dir / "placement.conf", "db", "sync"],
                   stack / "logs" / "placement-db-sync.log", "placement db sync", placement_env(stack))
        synced.touch()
    # SQLite: exactly one worker and one thread, or concurrent requests get "database is locked".
    proc = spawn(stack, "placement", [
        str(pvenv / "bin" / "gunicorn"), "--bind", f"127.0.0.1:{ports()['placement']}",
        "--workers", "1", "--threads", "1", "placement.wsgi.api:application"], placement_env(stack))
    wait_for(placement_healthy, "placement", stack / "logs" / "placement.log", proc)
    say(f"placement: started at {urls()['placement']} (pid {proc.pid})")


def fix_kvm_node() -> None:
    """Give /dev/kvm the owner Debian's udev rules give it (root:kvm 0660).

    Without udev it stays root-only; libvirtd then finds KVM "not available now" for
    the libvirt-qemu user, throws away its QEMU capability cache and re-probes QEMU on
    nearly every call (8-50 s per define or start instead of milliseconds).
    """
    import grp
    import stat
    kvm = Path("/dev/kvm")
    try:
        st = kvm.stat()
        gid = grp.getgrnam("kvm").gr_gid
    except (OSError, KeyError):
        return
    if stat.S_ISCHR(st.st_mode) and (st.st_gid != gid or stat.S_IMODE(st.st_mode) & 0o060 != 0o060):
        os.chown(kvm, 0, gid)
        os.chmod(kvm, 0o660)
        say("libvirt: /dev/kvm set to root:kvm 0660 (as udev would)")


def start_libvirt(stack: Path) -> None:
    """libvirtd is machine-wide: reuse a running one, else start virtlogd + libvirtd (they daemonize)."""
    fix_kvm_node()
    if sock_ok(LIBVIRT_SOCK):
        say("libvirt: running")
        return
    log = stack / "logs" / "libvirt.log"
    with log.open("a") as out:
        if not sock_ok(VIRTLOGD_SOCK):
            subprocess.run(["virtlogd", "-d"], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        # A racing starter makes ours fail on the pid lock: the socket check below is what counts.
        subprocess.run(["libvirtd", "-d"], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    wait_for(lambda: sock_ok(LIBVIRT_SOCK), "libvirtd", log)
    for daemon in ("virtlogd", "libvirtd"):  # remember them so `down --all` stops only what we started
        pid = Path(f"/run/{daemon}.pid")
        if pid.exists():
            shutil.copyfile(pid, stack / "run" / f"{daemon}.pid")
    say("libvirt: started")


def service_env(stack: Path) -> dict[str, str]:
    """What `source <stack>/env` sets: endpoints, admin-token auth for the openstack CLI, PATH."""
    u = urls()
    return {"ECOMPUTE_STACK_DIR": str(stack_dir()), "ECOMPUTE_PROFILE": profile(),
            "ECOMPUTE_ETCD_ENDPOINT": u["etcd"],
            "ECOMPUTE_PLACEMENT_URL": u["placement"], "ETCDCTL_API": "3", "ETCDCTL_ENDPOINTS": u["etcd"],
            "ECOMPUTE_PLACEMENT_TOKEN": "admin",
            "OS_AUTH_TYPE": "admin_token", "OS_TOKEN": "admin", "OS_ENDPOINT": u["placement"],
            "OS_PLACEMENT_API_VERSION": PLACEMENT_API_VERSION}


def bin_path(stack: Path) -> str:
    return f"{venv() / 'bin'}:{placement_venv() / 'bin'}"


def write_env(stack: Path) -> None:
    lines = [f"export {k}={shlex.quote(v)}" for k, v in service_env(stack).items()]
    lines.append(f'export PATH={shlex.quote(bin_path(stack))}:"$PATH"')
    (stack / "env").write_text("\n".join(lines) + "\n")


@contextmanager
def locked(stack: Path) -> Iterator[None]:
    """Serialize up/down across processes (e.g. parallel test workers calling ensure_up)."""
    (stack / "run").mkdir(parents=True, exist_ok=True)
    with (stack / "run" / "lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def ensure_up(stack: Path | None = None) -> dict:
    """Start whatever is not running and healthy (installs nothing); return the endpoints."""
    stack = Path(stack or services_dir()).resolve()
    (stack / "logs").mkdir(parents=True, exist_ok=True)
    with locked(stack):
        start_etcd(stack)
        start_placement(stack)
        start_libvirt(stack)
        write_env(stack)
    return {**urls(), "stack": str(stack), "venv": str(venv()), "placement_venv": str(placement_venv())}


def placement_cli_env(stack: Path | None = None) -> dict[str, str]:
    """A full environment for running <placement-venv>/bin/openstack against our Placement."""
    stack = Path(stack or services_dir()).resolve()
    env = {**os.environ, **service_env(stack)}
    env["PATH"] = f"{bin_path(stack)}:{env.get('PATH', '')}"
    return env


def down(stack: Path, everything: bool = False) -> None:
    with locked(stack):
        for name, match in [("eapi", "eapi"), ("ecompute", "ecompute")]:
            say(f"{name}: {'stopped' if stop(stack, name, match) else 'not running (of ours)'}")
        stopped = stop_demo_domains(stack)  # its daemon is gone: nobody else stops them
        if stopped:
            say(f"demo VMs: stopped {', '.join(stopped)} (`demo` or `up` and ecompute start them again)")
        for name, match in [("placement", "gunicorn"), ("etcd", "etcd")] + (
                [("libvirtd", "libvirtd"), ("virtlogd", "virtlogd")] if everything else []):
            say(f"{name}: {'stopped' if stop(stack, name, match) else 'not running (of ours)'}")


def stop_demo_domains(stack: Path) -> list[str]:
    """Power off the running QEMU domains of the demo's host (their disks under <stack>/demo/), left
    defined: the demo's ecompute starts them again as their requests say. Their names."""
    if not (stack / "demo").is_dir() or not sock_ok(LIBVIRT_SOCK) or not shutil.which("virsh"):
        return []
    virsh = ["virsh", "-q", "-c", "qemu:///system"]
    listed = subprocess.run([*virsh, "list", "--name", "--state-running"], capture_output=True, text=True)
    stopped = []
    for name in listed.stdout.split():
        xml = subprocess.run([*virsh, "dumpxml", name], capture_output=True, text=True).stdout
        if f"{stack / 'demo'}/" not in xml:
            continue
        if subprocess.run([*virsh, "destroy", name], capture_output=True).returncode == 0:
            stopped.append(name)
    return stopped


def reset(stack: Path) -> dict:
    """Stop, wipe etcd data and the Placement DB, start again: a clean slate."""
    down(stack)
    shutil.rmtree(stack / "etcd", ignore_errors=True)
    for f in ("placement.db", ".db-synced"):
        (stack / "placement" / f).unlink(missing_ok=True)
    say("wiped etcd data and placement.db")
    return ensure_up(stack)


def status(stack: Path) -> int:
    checks = {"etcd": ("etcd", etcd_healthy()), "placement": ("gunicorn", placement_healthy())}
    bad = 0
    for name, (match, healthy) in checks.items():
        pid = read_pid(stack, name)
        running = f"running (pid {pid})" if pid and pid_alive(pid, match) else "not running (of ours)"
        say(f"{name:9} {running}, {'healthy' if healthy else 'NOT healthy'} at {urls()[name]}")
        bad += not healthy
    lv = sock_ok(LIBVIRT_SOCK)
    say(f"{'libvirt':9} {'healthy' if lv else 'NOT healthy'} at {LIBVIRT_SOCK}")
    for name in ("ecompute", "eapi"):  # the demo's (optional: not running is no failure)
        pid = read_pid(stack, name)
        say(f"{name:9} {f'running (pid {pid})' if pid and pid_alive(pid, name) else 'not running (of ours)'}")
    return 1 if bad or not lv else 0


def venv_command(stack: Path, args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The venv's python with `args`, and the stack's environment to run it in.

    The repo root goes on PYTHONPATH: devstack is not installed into the venv (setup.py
    ships only the runtime), yet the tests, the benchmarks and the demo import it.
    """
    env = placement_cli_env(stack)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return [str(venv() / "bin" / "python"), *args], env


def run_in_venv(stack: Path, args: list[str]) -> int:
    """Run the venv's python from the repo root with the stack's environment."""
    cmd, env = venv_command(stack, args)
    return subprocess.run(cmd, cwd=REPO, env=env).returncode


LINTS = (["ruff", "check", "."], ["mypy"], ["lint-imports"], ["python", "-m", "devstack.cycles"])


def lint(stack: Path) -> int:
    """ruff, mypy, the import contracts (configured in pyproject.toml) and no import circles
    (devstack/cycles.py), from the venv."""
    env = placement_cli_env(stack)
    env["PYTHONPATH"] = str(REPO)  # lint-imports must find devstack to check nothing imports it
    for cmd in LINTS:
        say("lint: " + " ".join(cmd))
        rc = subprocess.run([str(venv() / "bin" / cmd[0]), *cmd[1:]], cwd=REPO, env=env).returncode
        if rc != 0:
            say(f"lint: {cmd[0]} failed (exit {rc})")
            return rc
    return 0


def run_tests(stack: Path, extra: list[str]) -> int:
    """Lint, then pytest: the whole suite, or the paths and options given.

    When the run may include the cloud-init guest's tests (no -m, no paths other than theirs),
    its image is built in the background meanwhile (minutes, once per recipe): those tests
    run last and wait for it (testguest's lock).
    """
    named = [a for a in extra if a.startswith("tests")]
    builder = None
    if "-m" not in extra and (not named or any("cloudguest" in a for a in named)):
        cmd, env = venv_command(stack, ["-m", "devstack.testguest", "build", "--cloud"])
        # At idle I/O and CPU priority: its dpkg runs must not starve etcd's fsyncs and the tests.
        cmd = ["ionice", "-c", "3", "nice", "-n", "19", *cmd] if shutil.which("ionice") else cmd
        with (stack / "logs" / "cloudguest-build.log").open("w") as log:
            builder = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        say("cloudguest: building (or reusing) the image in the background (logs/cloudguest-build.log)")
    try:
        rc = lint(stack)
        if rc == 0:
            # The slowest tests named at the end: the suite must stay within its time budget.
            rc = run_in_venv(stack, ["-m", "pytest", "--durations=25", *([] if named else ["tests"]), *extra])
    finally:
        if builder is not None and builder.poll() is None:
            builder.terminate()
            builder.wait()
    return 1 if rc == 5 else rc  # 5 = no tests collected: never let CI pass empty
