"""The README's first command: a one-host cloud on this machine schedules an instance and shows it.

Run through `python3 -m etcd_compute.localstack demo`, which installs and starts etcd,
Placement and libvirtd first. This writes a compute.yaml and schedule.yaml under the
stack directory, starts ecompute (left running; `localstack down` stops it), and
runs `eschedule ... --wait` exactly as a user would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid as uuidlib
from pathlib import Path

import yaml

from etcd_compute import localstack
from etcd_compute.config import EtcdConfig
from etcd_compute.store import Store

QUERY = "resources=VCPU:1,MEMORY_MB:256,DISK_GB:1"


def write_configs(stack: Path) -> tuple[Path, Path, str]:
    urls = localstack.urls()
    demo = stack / "demo"
    demo.mkdir(parents=True, exist_ok=True)
    host = str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"etcd-compute-demo:{stack}"))
    common = {"etcd": {"endpoints": [urls["etcd"]]}, "placement": {"endpoint": urls["placement"]}}
    compute = demo / "compute.yaml"
    compute.write_text(yaml.safe_dump({
        **common, "uuid": host, "name": f"demo-{os.uname().nodename}",
        "libvirt": {"uri": "qemu:///system", "domain_type": "qemu"},  # TCG: KVM hangs guests here
        "instances_path": str(demo / "instances"), "image_cache_path": str(demo / "images"),
        "workers": 2}, sort_keys=False))
    schedule = demo / "schedule.yaml"
    schedule.write_text(yaml.safe_dump({**common, "wait_timeout": 120}, sort_keys=False))
    return compute, schedule, host


def start_compute(stack: Path, compute: Path, host: str, bin_dir: Path) -> None:
    pid = localstack.read_pid(stack, "ecompute")
    if pid and localstack.pid_alive(pid, "ecompute"):
        print(f"ecompute already running (pid {pid})")
        return
    proc = localstack.spawn(stack, "ecompute", [str(bin_dir / "ecompute"), "--config", str(compute)])
    store = Store(EtcdConfig(endpoints=[localstack.urls()["etcd"]]))
    deadline = time.monotonic() + 60
    while True:
        record = store.hosts().get(host) or {}
        if record.get("pid") == proc.pid and record.get("state") == "up":
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"ecompute did not come up; see {stack / 'logs' / 'ecompute.log'}")
        time.sleep(0.2)
    store.close()
    print(f"ecompute started (pid {proc.pid}), host {host} registered in Placement")


def main() -> int:
    stack = localstack.stack_dir()
    bin_dir = Path(sys.executable).parent
    compute, schedule, host = write_configs(stack)
    start_compute(stack, compute, host, bin_dir)
    cmd = [str(bin_dir / "eschedule"), "--config", str(schedule), QUERY, "--wait"]
    print(f"\n$ eschedule '{QUERY}' --wait")
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        return rc
    env = stack / "env"
    print(f"""
The instance above is a real QEMU domain on qemu:///system, sized from its Placement allocation.
(It has no disk yet: images, cloud-init and a guest IP arrive with the next milestone.)

Look around:
  source {env}
  export ESCHEDULE_CONFIG={schedule}
  eschedule list
  eschedule hosts
  etcdctl get --prefix /etcd-compute
  openstack resource provider list
  virsh -c qemu:///system list
Destroy it:
  eschedule destroy UUID --wait
Stop everything:
  python3 -m etcd_compute.localstack down""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
