"""A metadata server: each guest gets its own cloud-init data, found in etcd by its address.

EC2 paths (/latest/meta-data/..., /latest/user-data) and OpenStack paths
(/openstack/latest/meta_data.json, user_data) are rendered from the instance's
request by etcd_compute.guestdata, the same source as the config drive. A request
from an address that is no instance's gets 404, so no guest can read another's
keys or user-data.

ecompute starts it on a thread when `metadata.enabled` is set; standalone:
    python -m md_server --config compute.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from etcd_compute import guestdata
from etcd_compute.contract import Request
from etcd_compute.errors import ECError
from etcd_compute.store import Store

LOG = logging.getLogger("md_server")


def render(path: str, request: Request) -> tuple[str, str] | None:
    """(body, content type) for `path`, or None for 404."""
    meta = guestdata.meta_data(request)
    keys = meta.get("public-keys", [])
    user_data = guestdata.user_data(request)
    text = "text/plain"
    ec2 = {
        "/latest/meta-data/instance-id": meta["instance-id"],
        "/latest/meta-data/local-hostname": meta["local-hostname"],
        "/latest/meta-data/hostname": meta["local-hostname"],
        "/latest/meta-data/public-keys/": "".join(f"{i}=key-{i}\n" for i in range(len(keys))),
    }
    for i, key in enumerate(keys):
        ec2[f"/latest/meta-data/public-keys/{i}/"] = "openssh-key\n"
        ec2[f"/latest/meta-data/public-keys/{i}/openssh-key"] = key
    path = path.split("?", 1)[0]
    if path in ec2:
        return ec2[path], text
    if path in ("/latest/meta-data", "/latest/meta-data/"):
        return "instance-id\nlocal-hostname\nhostname\n" + ("public-keys/\n" if keys else ""), text
    if path in ("/", "/latest", "/latest/"):
        return "meta-data\n" + ("user-data\n" if user_data else ""), text
    if path in ("/openstack", "/openstack/"):
        return "latest\n", text
    if path in ("/openstack/latest", "/openstack/latest/"):
        return "meta_data.json\n" + ("user_data\n" if user_data else ""), text
    if path == "/openstack/latest/meta_data.json":
        return json.dumps(guestdata.openstack_meta_data(request)), "application/json"
    if path in ("/latest/user-data", "/openstack/latest/user_data") and user_data is not None:
        return user_data, "application/octet-stream"
    return None


class Handler(BaseHTTPRequestHandler):
    server: MetadataServer
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        address = self.client_address[0]
        try:
            request = self.server.store.find_by_address(address, self.server.host)
        except ECError as exc:
            LOG.warning("cannot look up %s: %s", address, exc)
            return self._send(503, "etcd unavailable\n", "text/plain")
        if request is None:
            return self._send(404, "no instance at this address\n", "text/plain")
        found = render(self.path, request)
        if found is None:
            return self._send(404, "not found\n", "text/plain")
        self._send(200, *found)

    def _send(self, status: int, body: str, content_type: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt: str, *args: Any) -> None:
        LOG.info("%s %s", self.client_address[0], fmt % args)


class MetadataServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], store: Store, host: str | None = None) -> None:
        self.store = store
        self.host = host  # answer only for instances of this host (None: any)
        super().__init__(address, Handler)


def main(argv: list[str] | None = None) -> None:
    from etcd_compute import config
    ap = argparse.ArgumentParser(prog="python -m md_server", description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="compute.yaml (its etcd and metadata sections are used)")
    ap.add_argument("--all-hosts", action="store_true", help="answer for instances of every host")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config.load_compute(args.config)
        server = MetadataServer((cfg.metadata.address, cfg.metadata.port), Store(cfg.etcd),
                                None if args.all_hosts else cfg.host_uuid())
    except (ECError, OSError) as exc:
        sys.exit(f"md_server: error: {exc}")
    LOG.info("serving on http://%s:%d", cfg.metadata.address, cfg.metadata.port)
    server.serve_forever()
