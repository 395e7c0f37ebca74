"""The run's hypervisors: where its hosts' domains run, and how the run sees, hangs and removes them.

With --hypervisor qemu the hosts take turns between this machine's libvirtd and libvirt hosts of
the run's own (devstack/libvirthost.py: a libvirtd in a mount namespace of its own), so the same
instance uuid CAN run on two libvirtds at once, as two QEMU processes (the sampler tells whose
each is by its mounts): what invariant C must catch. (One libvirtd holds at most one domain per
uuid, so hosts that share one can never show two copies.) With --hypervisor fake every host has a fake hypervisor of its
own (fake:///DIR, etcd_compute/ecompute/fakedriver.py): no QEMU, so many hosts cost little, and
C is sampled from the domain files. Not libvirt's test:///default: its domains live inside each
worker process, where nothing outside it can see them, so no one could check C there.

The machine's libvirtd serves everyone on this machine: the run never hangs it and touches only
its own domains and pools there.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import libvirt
import psutil

from devstack.libvirthost import LibvirtHost
from etcd_compute.ecompute import fakedriver
from etcd_compute.ecompute.driver import Driver

MACHINE_URI = "qemu:///system"
RUN_PID = "run.pid"  # in the run's directory: tells a live run's libvirt hosts from a dead one's


class Hypervisor:
    """This machine's libvirtd (the base class): shared, never hung, never stopped by the run."""

    can_hang = False

    def __init__(self, name: str, uri: str) -> None:
        self.name, self.uri = name, uri
        self.hung = False

    def start(self) -> None:
        pass

    def driver(self, instances_path: str) -> Driver:
        return fakedriver.open_driver(self.uri, "qemu", instances_path)

    def hang(self) -> None:
        raise NotImplementedError(f"{self.name} is not the run's to hang")

    def resume(self) -> None:
        pass

    def remove(self, drivers: dict[str, Driver], known: set[str], run_dir: Path) -> None:
        """The run's domains (by owner, or known instances whoever owns them), their files and
        volumes, then the storage pools over the run's directories."""
        for host, driver in drivers.items():
            for uuid in set(driver.list_uuids(owner=host)) | (set(driver.list_uuids()) & known):
                driver.destroy(uuid)
        conn = libvirt.open(self.uri)
        try:
            for pool in conn.listAllStoragePools(0):
                try:
                    ours = f"<path>{run_dir}/" in pool.XMLDesc(0)
                except libvirt.libvirtError:  # another test's pool, gone meanwhile
                    continue
                if not ours:
                    continue
                persistent = pool.isPersistent()  # asked first: a transient pool is gone once destroyed
                if pool.isActive():
                    pool.destroy()
                if persistent:
                    pool.undefine()
        finally:
            conn.close()

    def stop(self) -> None:
        """Undo what the run did to it (the run's teardown; never raises for a host that is gone)."""

    def describe(self) -> str:
        return f"{self.name} (this machine's libvirtd, {self.uri})"


class OwnLibvirt(Hypervisor):
    """A libvirtd of the run's own (LibvirtHost); hung by SIGSTOP, stopped with everything it ran."""

    can_hang = True

    def __init__(self, name: str, base: Path) -> None:
        self.host = LibvirtHost(name, base)
        super().__init__(name, self.host.uri)

    def start(self) -> None:
        self.host.start(fresh=True)

    def hang(self) -> None:
        self.host.hang()
        self.hung = True

    def resume(self) -> None:
        if self.hung:
            self.host.resume()
            self.hung = False

    def remove(self, drivers: dict[str, Driver], known: set[str], run_dir: Path) -> None:
        pass  # stop() takes every domain it ran with it; its definitions go with its files

    def stop(self) -> None:
        """Kill it and every QEMU it ran (a stopped libvirtd dies of SIGKILL too)."""
        self.host.stop()
        self.hung = False

    def describe(self) -> str:
        return f"{self.name} (a libvirtd of the run's own, pid {self.host.pid}, {self.uri})"


class FakeHypervisor(Hypervisor):
    """A fake hypervisor (a directory of domain files); hung by its `.hang` file.

    A hung one holds up every call, the fence's hard_stop too: a fake domain has no process the
    fence could kill without the hypervisor, as it kills QEMU without libvirtd. So if its host
    loses its lease while it hangs, and the hang outlasts the evacuation that follows, C fires:
    a limit of the fake hypervisor, not of the fence on QEMU."""

    can_hang = True

    def __init__(self, name: str, directory: Path) -> None:
        self.dir = directory
        super().__init__(name, f"fake://{directory}")

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)

    def driver(self, instances_path: str) -> Driver:
        return fakedriver.open_driver(self.uri, "auto", instances_path)

    def hang(self) -> None:
        (self.dir / ".hang").touch()
        self.hung = True

    def resume(self) -> None:
        (self.dir / ".hang").unlink(missing_ok=True)
        self.hung = False

    def remove(self, drivers: dict[str, Driver], known: set[str], run_dir: Path) -> None:
        pass  # its domains are files of the run's, kept with its logs (evidence) or removed with them

    def stop(self) -> None:
        self.resume()

    def describe(self) -> str:
        return f"{self.name} (fake, {self.dir})"


def make(kind: str, libvirtds: int, hosts: int, run_dir: Path, tag: str) -> list[Hypervisor]:
    """The hypervisor of each host, in host order: on qemu, host i on libvirtd i mod `libvirtds`,
    the first being this machine's and the others the run's own; on fake, one per host."""
    if kind == "fake":
        return [FakeHypervisor(f"fake-h{i}", run_dir / "fake" / f"h{i}") for i in range(hosts)]
    mine = tag.rsplit("-", 1)[-1]
    daemons = [Hypervisor("libvirtd", MACHINE_URI)] + [
        OwnLibvirt(f"ch-{mine}-{j}", run_dir / f"lv{j}") for j in range(1, max(1, min(libvirtds, hosts)))]
    return [daemons[i % len(daemons)] for i in range(hosts)]


def sweep(chaos_dir: Path) -> list[str]:
    """Stop the libvirt hosts that dead runs left behind (a run killed with SIGKILL cleans up
    nothing); the names of those stopped."""
    stopped = []
    for base in sorted(chaos_dir.glob("*/lv*")):
        try:
            pid = int((base.parent / RUN_PID).read_text())
        except (OSError, ValueError):
            pid = 0
        with contextlib.suppress(psutil.Error):
            if pid and "devstack.chaos" in " ".join(psutil.Process(pid).cmdline()):
                continue  # a run that still goes on
        host = LibvirtHost("swept", base)
        if host.processes():
            host.stop()
            stopped.append(str(base))
    return stopped
