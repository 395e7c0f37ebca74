"""The NoCloud config drive: an ISO9660 volume labelled `cidata`, built in Python with pycdlib."""

from __future__ import annotations

import io
import os
from pathlib import Path

import yaml

from etcd_compute import guestdata
from etcd_compute.contract import Request


def write_config_drive(request: Request, path: Path, metadata_url: str | None = None) -> None:
    """Write the NoCloud ISO to `path` atomically, readable by its owner only (it may hold secrets).
    With the metadata server's `metadata_url`, vendor-data that has each boot report ready there."""
    import pycdlib  # only builds pay for importing it

    files = {"meta-data": yaml.safe_dump(guestdata.meta_data(request), sort_keys=False).encode()}
    files["user-data"] = (guestdata.user_data(request) or "#cloud-config\n{}\n").encode()
    if metadata_url:
        files["vendor-data"] = guestdata.vendor_data(request, metadata_url).encode()
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
