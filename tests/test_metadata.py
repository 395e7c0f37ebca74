"""cloud-init data: the config drive and the metadata server render the same data, per instance."""

from __future__ import annotations

import http.client
import io
import json
import threading
import uuid as uuidlib
from pathlib import Path

import pycdlib

from devstack.harness import free_port
from etcd_compute import contract
from etcd_compute.ecompute import configdrive
from etcd_compute.states import Actual
from md_server.server import MetadataServer, render

from conftest import Cloud

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTests test@etcd-compute"


def request(**extra: object) -> dict:
    uuid = str(uuidlib.uuid4())
    return contract.new_request(uuid, "h", {"h": {"resources": {"VCPU": 1}}}, None, "q", "p", "u", **extra)


def test_config_drive_is_a_nocloud_iso(tmp_path: Path) -> None:
    req = request(ssh_keys=[KEY], user_data="#cloud-config\nruncmd: [true]\n")
    path = tmp_path / "cd.iso"
    configdrive.write_config_drive(req, path)
    assert path.stat().st_mode & 0o777 == 0o600
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    assert iso.pvd.volume_identifier.strip() == b"cidata"
    files = {}
    for name in ("meta-data", "user-data"):
        out = io.BytesIO()
        iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
        files[name] = out.getvalue().decode()
    iso.close()
    assert f"instance-id: {req['uuid']}" in files["meta-data"]
    assert f"local-hostname: ec-{req['uuid'][:8]}" in files["meta-data"]
    assert KEY in files["meta-data"]
    assert files["user-data"] == req["user_data"]


def test_ec2_and_openstack_paths() -> None:
    req = request(ssh_keys=[KEY], user_data="#!/bin/sh\necho hi\n")
    assert render("/latest/meta-data/instance-id", req) == (req["uuid"], "text/plain")
    assert render("/latest/meta-data/public-keys/", req)[0] == "0=key-0\n"
    assert render("/latest/meta-data/public-keys/0/openssh-key", req)[0] == KEY
    assert render("/latest/user-data", req)[0] == req["user_data"]
    meta = json.loads(render("/openstack/latest/meta_data.json", req)[0])
    assert meta["uuid"] == req["uuid"] and meta["public_keys"] == {"key-0": KEY}
    assert render("/openstack/latest/user_data", req)[0] == req["user_data"]
    assert render("/latest/meta-data/public-keys/1/openssh-key", req) is None
    assert render("/latest/user-data", request()) is None  # no user-data: 404, as EC2 does


def get(host: str, port: int, path: str, source: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection(host, port, timeout=5, source_address=(source, 0))
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def test_each_address_gets_only_its_own_data(cloud: Cloud) -> None:
    """Two instances at two loopback addresses; a third address is nobody."""
    host = str(uuidlib.uuid4())
    mine, theirs = request(ssh_keys=[KEY]), request(ssh_keys=[KEY.replace("Fake", "Other")])
    for req, ip in ((mine, "127.0.0.21"), (theirs, "127.0.0.22")):
        req["host"] = host
        assert cloud.store.create_instance(req)
        assert cloud.store.put_status(contract.new_status(req["uuid"], host, Actual.ACTIVE, ip=ip),
                                      cloud.store.request_rev(host, req["uuid"]))
    server = MetadataServer(("127.0.0.20", free_port()), cloud.store, host)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        assert get("127.0.0.20", port, "/latest/meta-data/instance-id", "127.0.0.21") == (200, mine["uuid"])
        assert get("127.0.0.20", port, "/latest/meta-data/instance-id", "127.0.0.22") == (200, theirs["uuid"])
        assert get("127.0.0.20", port, "/latest/meta-data/public-keys/0/openssh-key", "127.0.0.22") == (
            200, theirs["ssh_keys"][0])
        status, body = get("127.0.0.20", port, "/latest/meta-data/instance-id", "127.0.0.23")
        assert status == 404 and mine["uuid"] not in body and theirs["uuid"] not in body
        # An instance of another host is not ours to answer for.
        other = MetadataServer(("127.0.0.20", free_port()), cloud.store, str(uuidlib.uuid4()))
        threading.Thread(target=other.serve_forever, daemon=True).start()
        assert get("127.0.0.20", other.server_address[1], "/latest/meta-data/instance-id", "127.0.0.21")[0] == 404
        other.shutdown()
    finally:
        server.shutdown()
