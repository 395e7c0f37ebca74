"""README's "Using it" works as written (issue 22, item 7): its lines run, one by one, in a shell
that has what `source .stack/env` gives (the stack's endpoints and PATH), against a cloud set up
the way the demo sets up its own: its flavors and its guest registered in the catalogue by
devstack/demo.py's register(). The one difference: the test's own etcd prefix (ESCHEDULE_CONFIG
names it), so that the suite never touches the demo's cloud. The host is on test:///default."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import uuid as uuidlib
from pathlib import Path

import libvirt
import pytest

from devstack import demo, localstack
from devstack.testguest import ensure_guest
from etcd_compute.ecompute.domainxml import build_domain_xml
from etcd_compute.ecompute.driver import DomainSpec

from conftest import Cloud

README = Path(__file__).resolve().parent.parent / "README.md"


def using_it() -> list[str]:
    """The commands of the first sh block of README's "Using it", comments cut off."""
    text = README.read_text()
    block = re.search(r"^## Using it\n.*?^```sh\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert block, "README has no 'Using it' block"
    return [re.split(r"\s{2,}#\s", line)[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_the_readmes_using_it_runs_as_written(cloud: Cloud) -> None:
    lines = using_it()
    assert lines[0].startswith("eschedule") and not any(word in " ".join(lines) for word in ("UUID", "QUERY", "IMAGE"))
    cloud.compute("demo-like", stop_timeout=1)  # its image_dirs hold the test guest, as the demo's host's do
    config = cloud.write("env.yaml", {"etcd": {"prefix": cloud.prefix}})  # endpoints: from the env, as after `source`
    env = {**os.environ, **localstack.placement_cli_env(), "ESCHEDULE_CONFIG": str(config)}
    for var in ("ECOMPUTE_ETCD_ENDPOINT", "ECOMPUTE_PLACEMENT_URL"):
        assert env[var] == cloud.stack["etcd" if "ETCD" in var else "placement"]
    eschedule = [str(localstack.venv() / "bin" / "eschedule"), "--config", str(config)]
    added = demo.register(eschedule, ensure_guest(), None)
    assert added == ["tiny", "small", "medium", "testguest"], added
    assert demo.register(eschedule, ensure_guest(), None) == []  # idempotent
    for line in lines:
        r = subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, (line, r.stdout, r.stderr)
        if "--name web1 --wait" in line:
            assert "ACTIVE" in r.stdout and "testguest" in r.stdout, r.stdout
    assert cloud.instance_keys() == {}  # the lines destroyed what they made


@pytest.mark.qemu
def test_devstack_status_shows_the_daemons_and_down_stops_the_demos_vms(tmp_path: Path) -> None:
    """`status` names ecompute and eapi; `down` powers off the demo host's domains, which its
    stopped ecompute would otherwise leave running (a diskless QEMU domain stands in for them)."""
    stack = Path(localstack.services_dir())
    r = subprocess.run(["python3", "-m", "devstack", "status"], capture_output=True, text=True,
                       env={**os.environ, **localstack.placement_cli_env()}, cwd=README.parent, timeout=60)
    said = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("localstack: ")]
    assert {"etcd", "placement", "libvirt", "ecompute", "eapi"} <= set(said), r.stdout
    (tmp_path / "demo" / "instances").mkdir(parents=True)
    uuid = str(uuidlib.uuid4())
    xml = build_domain_xml(DomainSpec(uuid, 1, 64, owner="test-readme"), "qemu").replace(
        "<name>", f"<description>{tmp_path / 'demo' / 'instances'}/{uuid}</description><name>", 1)
    conn = libvirt.open("qemu:///system")
    try:
        dom = conn.createXML(xml)
        try:
            assert dom.isActive()
            assert localstack.stop_demo_domains(tmp_path) == [dom.name()]
            assert uuid not in [d.UUIDString() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)]
            assert localstack.stop_demo_domains(stack / "no-such-stack") == []
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
    finally:
        conn.close()
