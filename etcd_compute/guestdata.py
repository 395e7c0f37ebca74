"""An instance's cloud-init data, one source for both ways a guest can read it.

The NoCloud config drive (ecompute/configdrive.py) and the metadata server (md_server/)
both render from the request in etcd, so a guest sees the same instance-id, hostname,
keys and user-data whichever datasource its cloud-init picks.
"""

from __future__ import annotations

from typing import Any

from etcd_compute.contract import Request


def hostname(request: Request) -> str:
    return request.get("hostname") or f"ec-{request['uuid'][:8]}"


def meta_data(request: Request) -> dict[str, Any]:
    """NoCloud/EC2-style meta-data."""
    data: dict[str, Any] = {"instance-id": request["uuid"], "local-hostname": hostname(request)}
    if request.get("ssh_keys"):
        data["public-keys"] = list(request["ssh_keys"])
    return data


def user_data(request: Request) -> str | None:
    return request.get("user_data")


def openstack_meta_data(request: Request) -> dict[str, Any]:
    """/openstack/latest/meta_data.json, the subset cloud-init's OpenStack datasource reads."""
    return {"uuid": request["uuid"], "name": hostname(request), "hostname": hostname(request),
            "launch_index": 0, "availability_zone": "etcd-compute",
            "public_keys": {f"key-{i}": key for i, key in enumerate(request.get("ssh_keys") or [])}}
