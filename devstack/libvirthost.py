"""A second libvirt host on this machine: its own libvirtd and virtlogd in a mount and UTS namespace.

Issue 18's fence is about two copies of one instance on two hosts; on one machine that needs a
second libvirtd that is a host of its own: its own domains, definitions, host UUID and hostname,
invisible to the machine's libvirtd and blind to it. `unshare --mount --uts` gives it private
copies of /etc/libvirt (stripped of every definition: copying the machine's would copy other
stacks' domains, networks and pools), /run/libvirt, /var/lib/libvirt, /var/log/libvirt and
/var/cache/libvirt, all bind-mounted from `base_dir`; its client socket sits in `base_dir/sock`,
outside the namespace, so clients here use `qemu:///system?socket=<base_dir>/sock/libvirt-sock`.

Its QEMU domains run without cgroups (`cgroup_controllers = [ ]`): both daemons would put a
domain in the machine's one cgroup tree as machine/qemu-<id>-<name>, and the same instance on
both hosts (same name, both first domains: id 1) would share one cgroup.

Every process of the host (libvirtd, virtlogd, its QEMUs) lives in its mount namespace, which is
how stop() finds them all, also those of a run whose libvirtd died. Standard library only:
`python3 -m devstack host start NAME` runs it outside the venv. See also `netns` below.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid as uuidlib
from pathlib import Path

from devstack import localstack

log = logging.getLogger(__name__)

# What the host's namespace gets of its own: <base_dir>/<dir> bind-mounted on the machine's path.
MOUNTS = {"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt", "log": "/var/log/libvirt",
          "cache": "/var/cache/libvirt"}
CAPABILITIES = "qemu/capabilities"  # libvirt's QEMU probe (~8 s per binary when missing), under cache/
SOCKET_MAX = 107  # AF_UNIX path limit
START_TIMEOUT = 120.0  # a cold start probes every QEMU binary; under load that takes long


class LibvirtHost:
    """A libvirtd + virtlogd of their own, for tests, the chaos run and the bench.

    `start()` is idempotent (a running host of the same `base_dir` is reused, also one started by
    another process) and returns once the daemon answers; `stop()` kills the daemons and every
    QEMU they started, as a power cut would, and keeps the domains defined (a reboot); `start(fresh=True)`
    forgets them (a reinstall). `hang()`/`resume()` SIGSTOP/SIGCONT libvirtd: its domains run on.
    With `netns` it also gets a network namespace joined to this one by a veth pair (see `address`).
    Its logs: base_dir/log (host.log: start-up; libvirtd.log, virtlogd.log, qemu/<domain>.log).
    """

    def __init__(self, name: str, base_dir: Path, *, netns: bool = False) -> None:
        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?", name):
            raise ValueError(f"host name {name!r}: 1-15 of a-z, 0-9 and '-' (a hostname and a veth name)")
        self.name, self.base, self.netns = name, Path(base_dir).resolve(), netns
        if " " in str(self.base) or "\\" in str(self.base):
            raise ValueError(f"{self.base}: no spaces or backslashes (mountinfo escapes them)")
        self.sock = self.base / "sock" / "libvirt-sock"
        if len(str(self.sock)) > SOCKET_MAX:
            raise ValueError(f"{self.sock}: longer than the {SOCKET_MAX} bytes of an AF_UNIX path")
        self.started_in: float | None = None  # seconds the last start() took to an answering daemon
        self._proc: subprocess.Popen | None = None

    # -- identity ---------------------------------------------------------------------------

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.sock}"

    @property
    def host_uuid(self) -> str:
        """Stable for this name and directory, distinct from any other host's: without SMBIOS
        each libvirtd makes up a random one at every start."""
        return str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"etcd-compute-libvirthost:{self.base}:{self.name}"))

    @property
    def pid(self) -> int | None:
        """libvirtd's pid while it runs (hung or not)."""
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.base / "run" / "libvirtd.pid").read_text().strip())
            if localstack.pid_alive(pid, "libvirtd") and pid in self.processes():
                return pid
        return None

    # -- life cycle -------------------------------------------------------------------------

    def start(self, fresh: bool = False, timeout: float = START_TIMEOUT) -> LibvirtHost:
        """Start it unless it runs; wait until it answers. `fresh`: forget its domains, networks
        and pools first (only when it is not running)."""
        t0 = time.monotonic()
        pid = self.pid
        if pid is not None and localstack.pid_state(pid) == "T":
            raise localstack.StackError(f"host {self.name}: libvirtd (pid {pid}) is stopped: resume() it")
        launched = pid is None
        if launched:
            self.stop()  # what a dead run left: its QEMUs, its virtlogd, its /run
            self._prepare(fresh)
            with (self.base / "log" / "host.log").open("ab") as out:
                out.write(f"=== {time.strftime('%F %T')} start {self.name}\n".encode())
                out.flush()
                cmd = ["unshare", "--mount", "--uts", "--propagation", "private", *(["--net"] if self.netns else []),
                       "--", sys.executable, "-m", "devstack.libvirthost", "inner", str(self.base), self.name]
                self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              start_new_session=True, cwd=localstack.REPO)
        localstack.wait_for(self.answers, f"libvirtd of host {self.name}", self.base / "log" / "host.log",
                            self._proc, timeout=timeout, interval=0.2)
        if self.netns and launched:
            self._link()
        self.started_in = time.monotonic() - t0
        log.info("host %s: libvirtd up in %.2f s at %s", self.name, self.started_in, self.uri)
        return self

    def answers(self) -> bool:
        """Does its libvirtd answer a call? (A hung one does not, nor one still starting.)"""
        if not localstack.sock_ok(self.sock):
            return False
        try:
            return subprocess.run(["virsh", "-q", "-c", self.uri, "hostname"], capture_output=True,
                                  timeout=10).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def stop(self, timeout: float = 30.0) -> None:
        """SIGKILL every process of the host (libvirtd, virtlogd, every QEMU it started), as a power
        cut would, and clear its /run. Definitions stay; nothing of the machine's is touched."""
        deadline = time.monotonic() + timeout
        while pids := self.processes():
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise localstack.StackError(f"host {self.name}: processes {pids} survived SIGKILL")
            time.sleep(0.05)
        if self._proc is not None:
            self._proc.wait(timeout)  # libvirtd was our child: reap it
            self._proc = None
        shutil.rmtree(self.base / "run", ignore_errors=True)

    def hang(self) -> None:
        """libvirtd stops answering (SIGSTOP), as a hung daemon does; its QEMUs run on."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, sig: int) -> None:
        pid = self.pid
        if pid is None:
            raise localstack.StackError(f"host {self.name} is not running")
        os.kill(pid, sig)

    def __enter__(self) -> LibvirtHost:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- its processes ----------------------------------------------------------------------

    def processes(self) -> list[int]:
        """Every process in this host's mount namespace (none when it is down).

        A namespace is the host's when /etc/libvirt there is a bind mount of `base_dir/etc`:
        namespace ids are reused once a namespace is gone, so an id alone is no proof."""
        by_ns: dict[str, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    by_ns.setdefault(os.readlink(entry / "ns" / "mnt"), []).append(int(entry.name))
        mine = os.readlink("/proc/self/ns/mnt")
        return sorted(pid for ns, pids in by_ns.items() if ns != mine and self._is_ours(pids) for pid in pids)

    def _is_ours(self, pids: list[int]) -> bool:
        """Is /etc/libvirt, in the namespace of `pids`, our etc/ (same file system, a path that ends
        like ours: mountinfo gives it relative to its file system's root)?"""
        etc = self.base / "etc"
        try:
            dev = etc.stat().st_dev
        except OSError:
            return False
        for pid in pids:
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
                    fields = line.split()
                    major, minor = map(int, fields[2].split(":"))
                    if (fields[4] == MOUNTS["etc"] and os.makedev(major, minor) == dev
                            and fields[3].endswith(f"/{self.base.name}/etc") and str(etc).endswith(fields[3])):
                        return True
                return False  # read, and not ours
        return False

    def qemu_pids(self) -> list[int]:
        """The QEMU processes of this host's domains."""
        found = []
        for pid in self.processes():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].split(b"/")[-1].startswith(
                        b"qemu-system"):
                    found.append(pid)
        return found

    # -- its files --------------------------------------------------------------------------

    def _prepare(self, fresh: bool) -> None:
        """Its own libvirt config (written, not copied: the machine's /etc/libvirt holds every
        stack's definitions), empty state dirs, and QEMU's capabilities from the machine's cache."""
        if fresh:
            for d in ("etc", "lib", "log"):
                shutil.rmtree(self.base / d, ignore_errors=True)
        for d in [*MOUNTS, "sock", "log/qemu", "etc/qemu/networks/autostart"]:
            (self.base / d).mkdir(parents=True, exist_ok=True)
        (self.base / "sock").chmod(0o755)
        etc = self.base / "etc"
        (etc / "libvirtd.conf").write_text(
            f'unix_sock_dir = "{self.sock.parent}"\nhost_uuid = "{self.host_uuid}"\n'
            f'log_outputs = "3:file:{MOUNTS["log"]}/libvirtd.log"\n')
        (etc / "virtlogd.conf").write_text(f'log_outputs = "3:file:{MOUNTS["log"]}/virtlogd.log"\n')
        # No migration_address: set, it stops libvirtd at start (see platform notes).
        (etc / "qemu.conf").write_text("cgroup_controllers = [ ]\n")
        nwfilter = Path(MOUNTS["etc"]) / "nwfilter"  # libvirt's shipped filters (clean-traffic)
        if nwfilter.is_dir() and not (etc / "nwfilter").exists():
            shutil.copytree(nwfilter, etc / "nwfilter")
        hosts = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else "127.0.0.1\tlocalhost\n"
        (self.base / "hosts").write_text(f"{hosts.rstrip()}\n127.0.1.1\t{self.name}\n")
        caps, machine_caps = self.base / "cache" / CAPABILITIES, Path(MOUNTS["cache"]) / CAPABILITIES
        if not any(caps.glob("*.xml")) and machine_caps.is_dir():
            shutil.copytree(machine_caps, caps, dirs_exist_ok=True)  # valid here: same binaries, same kernel

    # -- network namespace ------------------------------------------------------------------

    @property
    def _veth(self) -> tuple[str, str]:
        return f"vh-{self.name}"[:15], f"vn-{self.name}"[:15]

    @property
    def address(self) -> str | None:
        """With `netns`: the host's own address (its end of the veth), reachable from here."""
        return str(self._link_net[2]) if self.netns else None

    @property
    def _link_net(self) -> ipaddress.IPv4Network:
        """A /30 of 169.254.0.0/16 (link-local: routed nowhere) picked by the host's UUID, outside
        169.254.169.0/24 (the metadata address 169.254.169.254): .1 here, .2 in the host."""
        n = uuidlib.UUID(self.host_uuid).int % (255 * 64)
        third = n // 64
        return ipaddress.IPv4Network(f"169.254.{third + (third >= 169)}.{n % 64 * 4}/30")

    def _link(self) -> None:
        """The veth pair between this namespace and the host's: <subnet>.1 here, .2 there."""
        pid = self.pid
        (here, there), net = self._veth, self._link_net
        if pid is None:
            return
        subprocess.run(["ip", "link", "del", here], capture_output=True)  # a dead run's, if the kernel still has it
        inside = ["nsenter", f"--net=/proc/{pid}/ns/net", "--"]
        steps = [["ip", "link", "add", here, "type", "veth", "peer", "name", there, "netns", str(pid)],
                 ["ip", "addr", "add", f"{net[1]}/30", "dev", here], ["ip", "link", "set", here, "up"],
                 [*inside, "ip", "addr", "add", f"{net[2]}/30", "dev", there],
                 [*inside, "ip", "link", "set", there, "up"], [*inside, "ip", "link", "set", "lo", "up"]]
        for step in steps:
            localstack.run_logged(step, self.base / "log" / "host.log", f"host {self.name}: {' '.join(step)}")


def inner(base: Path, name: str) -> None:
    """Inside the new namespaces (run by unshare): the bind mounts, the hostname, virtlogd, then
    exec libvirtd in the foreground, so that the process start() made is libvirtd itself."""
    for d, target in MOUNTS.items():
        subprocess.run(["mount", "--bind", str(base / d), target], check=True)
    subprocess.run(["mount", "--bind", str(base / "hosts"), "/etc/hosts"], check=True)  # its name resolves
    socket.sethostname(name)
    subprocess.run(["virtlogd", "--daemon", "--pid-file", str(base / "run" / "virtlogd.pid")], check=True)
    os.execvp("libvirtd", ["libvirtd", "--pid-file", str(base / "run" / "libvirtd.pid")])


def hosts_dir() -> Path:
    """Where `python3 -m devstack host` keeps its hosts: beside the services of the profile."""
    return localstack.services_dir() / "hosts"


def command(action: str, name: str, fresh: bool = False) -> int:
    """`python3 -m devstack host start|stop|status|hang|resume NAME`: a second host for a person."""
    host = LibvirtHost(name, hosts_dir() / name)
    if action == "start":
        host.start(fresh=fresh)
        localstack.say(f"host {name}: up in {host.started_in:.1f} s, host UUID {host.host_uuid}")
        localstack.say(f"  virsh -c '{host.uri}' list")
    elif action == "stop":
        host.stop()
        localstack.say(f"host {name}: stopped")
    elif action in ("hang", "resume"):
        getattr(host, action)()
        localstack.say(f"host {name}: libvirtd {'hung (SIGSTOP)' if action == 'hang' else 'resumed'}")
    else:
        pid = host.pid
        localstack.say(f"host {name}: " + (f"libvirtd pid {pid}, {len(host.qemu_pids())} QEMU, {host.uri}"
                                           if pid else "not running"))
        return 0 if pid else 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "inner":
        inner(Path(sys.argv[2]), sys.argv[3])
    sys.exit(f"usage: python3 -m devstack host start|stop|status|hang|resume NAME (not {sys.argv[1:]})")
