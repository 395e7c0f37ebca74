"""The README's first command: a one-host cloud on this machine boots a VM and prints its IP.

Run through `python3 -m devstack demo`, which installs and starts etcd,
Placement and libvirtd and builds the offline test guest first. This writes a
compute.yaml and schedule.yaml under the stack directory, starts ecompute (left
running; `python3 -m devstack down` stops it, and the demo's VMs) and the API server with its
dashboard, puts its flavors and the guests it built in the catalogue (the test guest is the
default image, the cloud-init guest `debian-12` once built: nothing comes from the internet),
runs `eschedule --flavor tiny --name demo --wait` exactly as a user would, shows what the guest
read from its cloud-init data, and prints the dashboard's URL with an admin token.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid as uuidlib
from pathlib import Path

import yaml

from devstack import harness, localstack, testguest
from etcd_compute.config import EtcdConfig
from etcd_compute.store import Store

FLAVORS = [("tiny", "VCPU=1", "MEMORY_MB=256", "DISK_GB=1"), ("small", "VCPU=1", "MEMORY_MB=512", "DISK_GB=4"),
           ("medium", "VCPU=2", "MEMORY_MB=2048", "DISK_GB=10")]


def cloud_guest(stack: Path) -> dict | None:
    """The cloud-init guest's files if `guest --cloud` has built them (never built here: minutes)."""
    image = stack / "cloudguest" / "image"
    if testguest.cloud_stamp(image) is None:
        return None
    return {"kernel": str(image / "vmlinuz"), "initrd": str(image / "initrd.img"), "disk": str(image / "disk.qcow2"),
            "cmdline": testguest.CLOUD_CMDLINE}


def register(eschedule: list[str], guest: dict, cloud: dict | None = None) -> list[str]:
    """Put the demo's flavors and the guests this machine built in the catalogue, public: the test
    guest as `testguest` (alias `default`, the default image), the cloud-init guest as `debian-12`.
    What is there stays, but an image whose file changed (a rebuilt guest) is registered anew with
    its new sha256. What it added, by name."""
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*eschedule, *args], capture_output=True, text=True)

    added = []
    for name, *resources in FLAVORS:
        if run("flavor", "show", name).returncode != 0:
            made = run("flavor", "create", name, *resources)
            if made.returncode != 0:
                raise RuntimeError(f"flavor {name}: {made.stderr.strip()}")
            added.append(name)
    for name, files, aliases in [("testguest", guest, ["default"]), ("debian-12", cloud, ["debian"])]:
        if files is None:
            continue
        with open(files["disk"], "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        shown = run("image", "show", name, "--json")
        if shown.returncode == 0 and json.loads(shown.stdout)["sha256"] == digest:
            continue
        if shown.returncode == 0:
            run("image", "delete", name)
        made = run("image", "add", name, files["disk"], "--public", "--sha256", digest,
                   *[a for alias in aliases for a in ("--alias", alias)], "--kernel", files["kernel"],
                   "--initrd", files["initrd"], "--cmdline", files["cmdline"])
        if made.returncode != 0:
            raise RuntimeError(f"image {name}: {made.stderr.strip()}")
        added.append(name)
    return added


def write_configs(stack: Path, guest: dict) -> tuple[Path, Path, str]:
    urls = localstack.urls()
    demo = stack / "demo"
    demo.mkdir(parents=True, exist_ok=True)
    os.chmod(demo, 0o755)  # QEMU (user libvirt-qemu) reaches the instances through it
    host = str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"etcd-compute-demo:{stack}"))
    common = {"etcd": {"endpoints": [urls["etcd"]]}, "placement": {"endpoint": urls["placement"]}}
    compute = demo / "compute.yaml"
    # TCG (KVM hangs guests here), the isolated network (nothing leaves this machine), the metadata
    # server on 169.254.169.254:80, the machine's own inventory; local images only from the guest's dir.
    compute.write_text(yaml.safe_dump(harness.compute_config(
        urls, demo, uuid=host, name=f"demo-{os.uname().nodename}", uri="qemu:///system", workers=2,
        md_port=80, inventory=None, image_dirs=[str(Path(guest["disk"]).parent),
                                                str(localstack.stack_dir() / "cloudguest" / "image")]),
        sort_keys=False))
    keys = [str(p) for p in (Path.home() / ".ssh").glob("id_*.pub")][:1]
    schedule = demo / "schedule.yaml"  # the default image is the catalogue's (register())
    schedule.write_text(yaml.safe_dump({**common, "wait_timeout": 180, "ssh_keys": keys}, sort_keys=False))
    return compute, schedule, host


def start_compute(stack: Path, compute: Path, host: str, bin_dir: Path) -> None:
    pid = localstack.read_pid(stack, "ecompute")
    if pid and localstack.pid_alive(pid, "ecompute"):
        print(f"ecompute already running (pid {pid})")
        return
    # Unlike a harness.Ecompute it outlives the demo (`down` stops it, by its pid file): it is
    # ready once its host record in etcd names this process as up.
    proc = localstack.spawn(stack, "ecompute", [str(bin_dir / "ecompute"), "--config", str(compute)])
    store = Store(EtcdConfig(endpoints=[localstack.urls()["etcd"]]))

    def registered() -> bool:
        record = store.hosts().get(host)
        return record is not None and record.get("pid") == proc.pid and record.get("state") == "up"

    try:
        harness.wait_until(registered, 60, "ecompute to register", proc=proc, log=stack / "logs" / "ecompute.log",
                           interval=0.2)
    except AssertionError as exc:
        sys.exit(f"ecompute did not come up: {exc}")
    finally:
        store.close()
    print(f"ecompute started (pid {proc.pid}), host {host} registered in Placement")


API_PORT = 8780


def start_api(stack: Path, schedule: Path, bin_dir: Path) -> str:
    """The API server and dashboard, left running like ecompute; the URL to open."""
    url = f"http://127.0.0.1:{API_PORT}"
    pid = localstack.read_pid(stack, "eapi")
    if pid and localstack.pid_alive(pid, "eapi"):
        return url
    proc = localstack.spawn(stack, "eapi", [str(bin_dir / "eapi"), "--config", str(schedule), "--listen",
                                            f"127.0.0.1:{API_PORT}"])

    def up() -> bool:
        try:
            return urllib.request.urlopen(url + "/v1/openapi.json", timeout=2).status == 200
        except OSError:
            return False

    try:
        harness.wait_until(up, 30, "the API server to answer", proc=proc, log=stack / "logs" / "eapi.log",
                           interval=0.2)
    except AssertionError as exc:
        sys.exit(f"the API server did not come up: {exc}")
    return url


def free_name(eschedule: list[str]) -> str:
    """`demo`, or `demo-2`, `demo-3`, ... when an earlier run's instance has the name."""
    for n in range(1, 100):
        name = "demo" if n == 1 else f"demo-{n}"
        if subprocess.run([*eschedule, "show", name], capture_output=True).returncode == 6:
            return name
    raise RuntimeError("demo-1 to demo-99 are all taken: destroy some")


def main() -> int:
    stack = localstack.services_dir()
    bin_dir = Path(sys.executable).parent
    guest = testguest.ensure_guest(localstack.stack_dir() / "guest")
    compute, schedule, host = write_configs(stack, guest)
    start_compute(stack, compute, host, bin_dir)
    api = start_api(stack, schedule, bin_dir)
    eschedule = [str(bin_dir / "eschedule"), "--config", str(schedule)]
    added = register(eschedule, guest, cloud_guest(localstack.stack_dir()))
    if added:
        print(f"In the catalogue: {', '.join(added)} (eschedule flavor list; eschedule image list)")
    name = free_name(eschedule)
    print(f"\n$ eschedule --flavor tiny --name {name} --wait")
    started = time.monotonic()
    out = subprocess.run([*eschedule, "--flavor", "tiny", "--name", name, "--wait", "--json"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        return out.returncode
    view = json.loads(out.stdout)
    print(subprocess.run([*eschedule, name], capture_output=True, text=True).stdout)
    print(f"The guest booted (QEMU, TCG) and has IP {view['ip']}: {time.monotonic() - started:.1f}s "
          f"from eschedule to the address in etcd.")
    try:
        seen = harness.guest_report(stack / "demo" / "instances" / f"{view['uuid']}.console.log", 120)
    except AssertionError:
        seen = {}  # each line below says "(not seen)"
    print("What the guest read, from its serial console:")
    for key, what in [("ip", "address it configured by DHCP"),
                      ("cd_instance_id", "instance-id on its config drive"),
                      ("md_instance_id", "instance-id from the metadata server"),
                      ("md_ssh_key", "ssh key from the metadata server"),
                      ("disk_bytes", "size of its disk (bytes)")]:
        print(f"  {what:<40} {seen.get(key, '(not seen)')}")
    token = subprocess.run([*eschedule, "token", "create", "etcd-compute", "--admin", "--name", "demo"],
                           capture_output=True, text=True).stdout.strip()
    print(f"""
The dashboard: {api}/ui/ (log in with this admin token; the API takes it as a Bearer token)
  {token}
  curl -H 'Authorization: Bearer {token}' {api}/v1/instances
Look around (README's "Using it"):
  source {stack / 'env'}
  eschedule list; eschedule hosts; eschedule image list; eschedule flavor list
  etcdctl get --prefix /etcd-compute
  openstack resource provider list
  virsh -c qemu:///system list
Destroy it:
  eschedule destroy {name} --wait
Stop everything (its VMs too):
  python3 -m devstack down""")
    return 0


def register_here() -> int:
    """`python -m devstack.demo register` (what `devstack guest --cloud` runs once it has built the
    cloud-init guest): the guests this machine built, in the running stack's catalogue."""
    stack = localstack.services_dir()
    schedule = stack / "demo" / "schedule.yaml"
    eschedule = [str(Path(sys.executable).parent / "eschedule"), *(["--config", str(schedule)]
                                                                   if schedule.exists() else [])]
    guest = testguest.ensure_guest(localstack.stack_dir() / "guest")
    added = register(eschedule, guest, cloud_guest(localstack.stack_dir()))
    print(f"catalogue: {', '.join(added) or 'up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(register_here() if sys.argv[1:] == ["register"] else main())
