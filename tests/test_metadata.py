"""cloud-init data: the config drive and the metadata server render the same data, per instance."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import socket
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pycdlib
import pytest

from devstack.harness import free_port, wait_until
from etcd_compute import contract, guestdata
from etcd_compute.ecompute import configdrive
from etcd_compute.states import Actual
from md_server.server import MetadataServer, Tokens, render

from conftest import Cloud

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTests test@etcd-compute"


def request(**extra: object) -> dict:
    uuid = str(uuidlib.uuid4())
    return contract.new_request(uuid, "h", {"h": {"resources": {"VCPU": 1}}}, None, "q", "p", "u", **extra)


def test_config_drive_is_a_nocloud_iso(tmp_path: Path) -> None:
    req = request(ssh_keys=[KEY], user_data="#cloud-config\nruncmd: [true]\n")
    path = tmp_path / "cd.iso"
    configdrive.write_config_drive(req, path, "http://169.254.169.254:80")
    assert path.stat().st_mode & 0o777 == 0o600
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    assert iso.pvd.volume_identifier.strip() == b"cidata"
    files = {}
    for name in ("meta-data", "user-data", "vendor-data"):
        out = io.BytesIO()
        iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
        files[name] = out.getvalue().decode()
    iso.close()
    assert f"instance-id: {req['uuid']}" in files["meta-data"]
    assert f"local-hostname: ec-{req['uuid'][:8]}" in files["meta-data"]
    assert KEY in files["meta-data"]
    assert files["user-data"] == req["user_data"]
    assert files["vendor-data"] == guestdata.vendor_data(req, "http://169.254.169.254:80")  # each boot says ready


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


def test_the_versions_current_cloud_init_asks_for() -> None:
    """What cloud-init's Ec2 and OpenStack datasources ask: the dated versions each lists, the same
    tree under each, and network and vendor data beside meta_data.json."""
    req = request(ssh_keys=[KEY], user_data="#cloud-config\n{}\n")
    assert render("/", req) == ("2009-04-04\nlatest\n", "text/plain")
    for version in ("2009-04-04", "latest"):
        assert render(f"/{version}/meta-data/instance-id", req) == (req["uuid"], "text/plain")
        assert render(f"/{version}/", req) == render(f"/{version}", req) == ("meta-data\nuser-data\n", "text/plain")
        assert render(f"/{version}/meta-data/", req)[0].splitlines() == [
            "instance-id", "local-hostname", "hostname", "public-keys/"]
    assert render("/2016-09-02/meta-data/instance-id", req) is None  # not listed: not served
    listed = render("/openstack", req)[0].splitlines()
    assert listed[-1] == "latest" and {"2012-08-10", "2015-10-15", "2018-08-27"} <= set(listed)
    for version in listed:
        files = render(f"/openstack/{version}/", req)[0].splitlines()
        assert files == ["meta_data.json", "network_data.json", "vendor_data.json", "vendor_data2.json", "user_data"]
        meta = json.loads(render(f"/openstack/{version}/meta_data.json", req)[0])
        assert meta["uuid"] == req["uuid"] and meta["keys"] == [{"name": "key-0", "type": "ssh", "data": KEY}]
    network = json.loads(render("/openstack/latest/network_data.json", req)[0])
    assert network["links"][0]["ethernet_mac_address"] == guestdata.mac_address(req["uuid"])
    assert network["networks"][0]["type"] == "ipv4_dhcp" and network["networks"][0]["link"] == network["links"][0]["id"]
    assert json.loads(render("/openstack/latest/vendor_data2.json", req)[0]) == {}
    assert render("/openstack/2011-01-01/meta_data.json", req) is None


def call(host: str, port: int, method: str, path: str, source: str,
         headers: dict[str, str] | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection(host, port, timeout=5, source_address=(source, 0))
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def get(host: str, port: int, path: str, source: str) -> tuple[int, str]:
    return call(host, port, "GET", path, source)


def try_get(host: str, port: int, path: str, source: str) -> tuple[int, str] | None:
    """get(), or None when the server refused or dropped the connection."""
    try:
        return get(host, port, path, source)
    except (OSError, http.client.HTTPException):
        return None


def instance(cloud: Cloud, host: str, ip: str, state: Actual = Actual.ACTIVE, **extra: Any) -> dict:
    """A request on `host` whose status reports `state` at `ip`."""
    req = request(**extra)
    req["host"] = host
    assert cloud.store.create_instance(req)
    report(cloud, req, state, ip)
    return req


def report(cloud: Cloud, req: dict, state: Actual, ip: str) -> None:
    """Write the status of `req` as its host would."""
    assert cloud.store.put_status(contract.new_status(req["uuid"], req["host"], state, ip=ip),
                                  cloud.store.request_rev(req["host"], req["uuid"]))


@contextlib.contextmanager
def serving(cloud: Cloud, host: str | None, **kwargs: Any) -> Iterator[MetadataServer]:
    """A metadata server on 127.0.0.20, in this process, for the block."""
    server = MetadataServer(("127.0.0.20", free_port()), cloud.store, host, **kwargs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def closed_by_peer(sock: socket.socket) -> bool:
    """Has the other end closed `sock` (without waiting if it has not)?"""
    try:
        return sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


ID = "/latest/meta-data/instance-id"


def test_each_address_gets_only_its_own_data(cloud: Cloud) -> None:
    """Two instances at two loopback addresses; a third address is nobody."""
    host = str(uuidlib.uuid4())
    mine = instance(cloud, host, "127.0.0.21", ssh_keys=[KEY])
    theirs = instance(cloud, host, "127.0.0.22", ssh_keys=[KEY.replace("Fake", "Other")])
    with serving(cloud, host) as server:
        port = server.server_address[1]
        assert get("127.0.0.20", port, ID, "127.0.0.21") == (200, mine["uuid"])
        assert get("127.0.0.20", port, ID, "127.0.0.22") == (200, theirs["uuid"])
        assert get("127.0.0.20", port, "/latest/meta-data/public-keys/0/openssh-key", "127.0.0.22") == (
            200, theirs["ssh_keys"][0])
        status, body = get("127.0.0.20", port, ID, "127.0.0.23")
        assert status == 404 and mine["uuid"] not in body and theirs["uuid"] not in body
    # An instance of another host is not ours to answer for.
    with serving(cloud, str(uuidlib.uuid4())) as other:
        assert get("127.0.0.20", other.server_address[1], ID, "127.0.0.21")[0] == 404


def test_only_a_running_instance_gets_its_data(cloud: Cloud) -> None:
    """A stopped instance keeps its ip in its status, but the address may be someone else's by then."""
    host, ip = str(uuidlib.uuid4()), "127.0.0.21"
    first = instance(cloud, host, ip)
    with serving(cloud, host) as server:
        port = server.server_address[1]
        assert get("127.0.0.20", port, ID, ip) == (200, first["uuid"])
        for state in (Actual.STOPPED, Actual.SUSPENDED, Actual.BUILDING, Actual.ERROR, Actual.DELETING):
            report(cloud, first, state, ip)
            assert get("127.0.0.20", port, ID, ip)[0] == 404, state
        report(cloud, first, Actual.ACTIVE, ip)
        assert get("127.0.0.20", port, ID, ip) == (200, first["uuid"])
        # Stopped, its address goes to another instance: that one gets its own data.
        report(cloud, first, Actual.STOPPED, ip)
        second = instance(cloud, host, ip)
        assert get("127.0.0.20", port, ID, ip) == (200, second["uuid"])
        # Started again, its status still carries the old address until the host learns the new one:
        # two running instances claim the address and neither is answered.
        report(cloud, first, Actual.ACTIVE, ip)
        assert get("127.0.0.20", port, ID, ip)[0] == 404
        report(cloud, second, Actual.STOPPED, ip)
        assert get("127.0.0.20", port, ID, ip) == (200, first["uuid"])


def test_idle_connections_hold_no_more_than_the_bound(cloud: Cloud) -> None:
    """300 clients that connect and say nothing: at most 16 threads serve them, each is dropped after
    the 1 s timeout, and then a real guest gets its data."""
    host = str(uuidlib.uuid4())
    req = instance(cloud, host, "127.0.0.21")
    with serving(cloud, host, max_connections=16, timeout=1.0) as server:
        before = most = threading.active_count()
        idle: list[socket.socket] = []
        try:
            for _ in range(300):
                idle.append(socket.create_connection(server.server_address, timeout=10))
                most = max(most, threading.active_count())
            assert most <= before + 16 + 3, (before, most)
            left = list(idle)

            def all_closed() -> bool:
                left[:] = [s for s in left if not closed_by_peer(s)]
                return not left
            wait_until(all_closed, timeout=20, what="the server to close every idle connection")
            assert wait_until(lambda: try_get("127.0.0.20", server.server_address[1], ID, "127.0.0.21"),
                              timeout=5, what="an answer to a real request") == (200, req["uuid"])
        finally:
            for s in idle:
                s.close()


def test_a_connection_beyond_the_bound_is_refused_at_once(cloud: Cloud) -> None:
    """While every slot is taken, a request is closed unanswered at once (not queued behind the idle
    ones' timeout); it is served again as soon as a slot is free."""
    host = str(uuidlib.uuid4())
    req = instance(cloud, host, "127.0.0.21")
    with serving(cloud, host, max_connections=2, timeout=30.0) as server:
        port = server.server_address[1]
        # Accepted in order: the two idle clients hold both slots before the request is accepted.
        idle = [socket.create_connection(server.server_address, timeout=10) for _ in range(2)]
        try:
            began = time.monotonic()
            with pytest.raises(ConnectionError):
                get("127.0.0.20", port, ID, "127.0.0.21")
            assert time.monotonic() - began < 5
        finally:
            for s in idle:
                s.close()
        assert wait_until(lambda: try_get("127.0.0.20", port, ID, "127.0.0.21"), timeout=5,
                          what="an answer once the idle clients left") == (200, req["uuid"])


def test_a_trickled_request_is_dropped_at_the_deadline(cloud: Cloud) -> None:
    """The timeout bounds the whole request, not each read: a client sending a byte every 0.2 s
    (a 12 s request) must not hold its slot past the 1 s timeout."""
    with serving(cloud, None, timeout=1.0) as server:
        data = b"GET " + ID.encode() + b" HTTP/1.0\r\nX-Slow: " + b"a" * 8 + b"\r\n\r\n"
        sock = socket.create_connection(server.server_address, timeout=8)

        def trickle() -> None:
            with contextlib.suppress(OSError):  # the server closed it, or the test did
                for byte in data:
                    sock.send(bytes([byte]))
                    time.sleep(0.2)
        threading.Thread(target=trickle, daemon=True).start()
        began = time.monotonic()
        try:
            try:
                answer = sock.recv(1024)
            except ConnectionError:
                answer = b""
            assert answer == b"" and time.monotonic() - began < 5, answer
        finally:
            sock.close()


TTL = "X-aws-ec2-metadata-token-ttl-seconds"


def test_an_imdsv2_token_is_its_guests_alone(cloud: Cloud) -> None:
    """PUT /latest/api/token gives the asking guest a token that works for it alone: another
    guest presenting it is refused (401), as is garbage; one without a token is served (IMDSv1)."""
    host = str(uuidlib.uuid4())
    mine = instance(cloud, host, "127.0.0.21")
    theirs = instance(cloud, host, "127.0.0.22")
    with serving(cloud, host) as server:
        port = server.server_address[1]

        def put(source: str, headers: dict[str, str]) -> tuple[int, str]:
            return call("127.0.0.20", port, "PUT", "/latest/api/token", source, headers)

        status, token = put("127.0.0.21", {TTL: "60"})
        assert status == 200 and token
        with_token = {"X-aws-ec2-metadata-token": token}
        assert call("127.0.0.20", port, "GET", ID, "127.0.0.21", with_token) == (200, mine["uuid"])
        status, body = call("127.0.0.20", port, "GET", ID, "127.0.0.22", with_token)
        assert status == 401 and theirs["uuid"] not in body and mine["uuid"] not in body
        assert call("127.0.0.20", port, "GET", ID, "127.0.0.21", {"X-aws-ec2-metadata-token": token[:-2]})[0] == 401
        assert get("127.0.0.20", port, ID, "127.0.0.22") == (200, theirs["uuid"])  # IMDSv1 still served
        for headers, want in [({}, 400), ({TTL: "0"}, 400), ({TTL: "21601"}, 400), ({TTL: "x"}, 400),
                              ({TTL: "60", "X-Forwarded-For": "10.0.0.9"}, 403)]:
            assert put("127.0.0.21", headers)[0] == want, headers
        assert put("127.0.0.23", {TTL: "60"})[0] == 404  # nobody's address: no token
        assert call("127.0.0.20", port, "PUT", "/latest/meta-data/instance-id", "127.0.0.21", {TTL: "60"})[0] == 404


def test_a_token_ends_with_its_ttl_and_with_the_server_that_gave_it() -> None:
    tokens = Tokens()
    token = tokens.issue("u1", "10.0.0.5", 60, now=1000.0)
    assert tokens.valid(token, "u1", "10.0.0.5", now=1059.0)
    assert not tokens.valid(token, "u1", "10.0.0.5", now=1060.0)  # expired
    assert not tokens.valid(token, "u2", "10.0.0.5", now=1001.0)  # another instance at the address since
    assert not tokens.valid(token, "u1", "10.0.0.6", now=1001.0)
    assert not Tokens().valid(token, "u1", "10.0.0.5", now=1001.0)  # a restarted server's secret differs
    assert not tokens.valid("garbage", "u1", "10.0.0.5") and not tokens.valid("a.b.c", "u1", "10.0.0.5")


def test_a_guest_says_it_booted_for_itself_alone(cloud: Cloud) -> None:
    """POST /etcd-compute/ready/<its uuid> from the guest's address reaches on_ready; naming
    another instance, or from nobody's address, it does not; a guest repeating itself is passed
    on once in READY_EVERY seconds. vendor_data.json tells guests to say so there."""
    host = str(uuidlib.uuid4())
    mine = instance(cloud, host, "127.0.0.21")
    theirs = instance(cloud, host, "127.0.0.22")
    said: list[str] = []
    with serving(cloud, host, url="http://169.254.169.254:80", on_ready=lambda uuid, at: said.append(uuid)) as server:
        port = server.server_address[1]

        def post(uuid: str, source: str) -> int:
            return call("127.0.0.20", port, "POST", f"/etcd-compute/ready/{uuid}", source)[0]

        assert post(theirs["uuid"], "127.0.0.21") == 404  # not its own
        assert post(mine["uuid"], "127.0.0.23") == 404  # nobody's address
        assert post(mine["uuid"], "127.0.0.21") == 200
        assert post(mine["uuid"], "127.0.0.21") == 200  # answered, not passed on again at once
        assert said == [mine["uuid"]]
        vendor = json.loads(get("127.0.0.20", port, "/openstack/latest/vendor_data.json", "127.0.0.21")[1])
        assert f"http://169.254.169.254:80/etcd-compute/ready/{mine['uuid']}" in vendor["cloud-init"]
        assert vendor["cloud-init"].startswith("#cloud-boothook\n")
