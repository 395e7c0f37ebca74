"""An instance's cloud-init data, one source for both ways a guest can read it.

The NoCloud config drive (an ISO9660 volume labelled `cidata`, built in Python with
pycdlib) and the metadata server (md_server/) both render from the request in
etcd, so a guest sees the same instance-id, hostname, keys and user-data whichever
datasource its cloud-init picks.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import yaml

MAX_USER_DATA = 64 * 1024


def hostname(request: dict[str, Any]) -> str:
    return request.get("hostname") or f"ec-{request['uuid'][:8]}"


def meta_data(request: dict[str, Any]) -> dict[str, Any]:
    """NoCloud/EC2-style meta-data."""
    data: dict[str, Any] = {"instance-id": request["uuid"], "local-hostname": hostname(request)}
    if request.get("ssh_keys"):
        data["public-keys"] = list(request["ssh_keys"])
    return data


def user_data(request: dict[str, Any]) -> str | None:
    return request.get("user_data")


def openstack_meta_data(request: dict[str, Any]) -> dict[str, Any]:
    """/openstack/latest/meta_data.json, the subset cloud-init's OpenStack datasource reads."""
    return {"uuid": request["uuid"], "name": hostname(request), "hostname": hostname(request),
            "launch_index": 0, "availability_zone": "etcd-compute",
            "public_keys": {f"key-{i}": key for i, key in enumerate(request.get("ssh_keys") or [])}}


def write_config_drive(request: dict[str, Any], path: Path) -> None:
    """Write the NoCloud ISO to `path` atomically, readable by its owner only (it may hold secrets)."""
    import pycdlib  # only the hosts build drives: eschedule should not pay for importing it

    files = {"meta-data": yaml.safe_dump(meta_data(request), sort_keys=False).encode()}
    files["user-data"] = (user_data(request) or "#cloud-config\n{}\n").encode()
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for name, body in files.items():
        iso.add_fp(io.BytesIO(body), len(body), f"/{name.upper().replace('-', '_')}.;1",
                   rr_name=name, joliet_path=f"/{name}")
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        iso.write_fp(out)
    iso.close()
    os.rename(tmp, path)
