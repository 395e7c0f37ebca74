"""The seeded chaos run (devstack/chaos/) as CI runs it, from fixed seeds, after which every
invariant must hold: 80 s on three QEMU hosts over two libvirtds (this machine's and one of the
run's own), where one instance could run twice, with hosts cut from etcd and Placement, daemons
stopped past their lease and a hung libvirtd besides the older faults (seed 23: 7 cuts, most
outlasting the fence window, evacuations that move instances); and 35 s of issue 18's faults
alone on four fake hypervisors, where they cost no QEMU (seed 32: cuts of each kind, long and
short, killed daemons, a daemon stopped past its lease, 8 instances evacuated).

Each run is a process of its own, as `python3 -m devstack chaos` starts it: it handles its own
signals and cleans up after itself, and its table is printed here whatever the outcome.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from devstack import localstack

# A failure names its seed; `python3 -m devstack chaos ARGS` (the test's own) runs it again.
# Issue 18's faults but the hung hypervisor: a hung fake hypervisor also holds up its host's fence
# (devstack/chaos/hypervisors.py), so a host that loses its lease meanwhile may run beside its
# evacuated copy (seed 404 showed it); the QEMU run hangs a real libvirtd, which the fence gets around.
ISSUE_18 = "cut-etcd,cut-placement,cut-both,stop-daemon-long,kill-daemon"
QEMU = ["--seconds", "80", "--seed", "23", "--hosts", "3", "--hypervisor", "qemu"]
FAKE = ["--seconds", "35", "--seed", "32", "--hosts", "4", "--hypervisor", "fake", "--faults", ISSUE_18]


def chaos(args: list[str]) -> str:
    """Run the chaos run with `args`; its output. Fails with the output's tail on any violation."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(localstack.REPO), os.environ.get("PYTHONPATH"))
                                                       if p)}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "devstack.chaos", *args], cwd=localstack.REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # it cleans up on Ctrl-C
        out, _ = proc.communicate(timeout=180)
    print(out)
    print(f"chaos run with setup, settling and cleanup: {time.monotonic() - t0:.0f}s")
    assert proc.returncode == 0, f"chaos run ({' '.join(args)}) exited {proc.returncode}:\n{out[-4000:]}"
    return out


@pytest.mark.qemu
@pytest.mark.chaos
def test_seeded_chaos_run_on_two_libvirtds_keeps_every_invariant(stack: dict) -> None:
    chaos(QEMU)


@pytest.mark.chaos
def test_seeded_chaos_run_on_fake_hypervisors_keeps_every_invariant(stack: dict) -> None:
    chaos(FAKE)
