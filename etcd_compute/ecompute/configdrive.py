"""The NoCloud config drive: an ISO9660 volume labelled `cidata`, built in Python with pycdlib."""

from __future__ import annotations

import io
import os
from pathlib import Path

import yaml

from etcd_compute import guestdata
from etcd_compute.contract import Request


def write_config_drive(request: Request, path: Path) -> None:
    """Write the NoCloud ISO to `path` atomically, readable by its owner only (it may hold secrets)."""
    import pycdlib  # only builds pay for importing it

    files = {"meta-data": yaml.safe_dump(guestdata.meta_data(request), sort_keys=False).encode()}
    files["user-data"] = (guestdata.user_data(request) or "#cloud-config\n{}\n").encode()
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
