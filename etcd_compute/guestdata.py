"""An instance's cloud-init data, one source for both ways a guest can read it.

The NoCloud config drive (ecompute/configdrive.py) and the metadata server (md_server/)
both render from the request in etcd, so a guest sees the same instance-id, hostname,
keys and user-data whichever datasource its cloud-init picks. The domain's SMBIOS data
(ecompute/domainxml.py) says what cloud this is, as Nova's do, so that a stock image's
cloud-init (ds-identify) picks its OpenStack datasource and asks the metadata server.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # types only: the driver imports this module, and an idle worker never loads contract
    from etcd_compute.contract import Request

# SMBIOS system information of every domain, as Nova sets it: cloud-init's ds-identify and its
# OpenStack datasource take product "OpenStack Nova" for an OpenStack cloud (DMI); the serial and
# the uuid are the instance's.
SMBIOS_MANUFACTURER = "OpenStack Foundation"
SMBIOS_PRODUCT = "OpenStack Nova"
SMBIOS_FAMILY = "Virtual Machine"


def mac_address(uuid: str) -> str:
    """The NIC's MAC, derived from the uuid: a rebuilt domain keeps it (and its DHCP reservation),
    and the metadata server names it in network_data.json."""
    b = hashlib.sha256(uuid.encode()).digest()
    return f"52:54:00:{b[0]:02x}:{b[1]:02x}:{b[2]:02x}"


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
    """/openstack/<version>/meta_data.json, the subset cloud-init's OpenStack datasource reads."""
    keys = list(request.get("ssh_keys") or [])
    return {"uuid": request["uuid"], "name": hostname(request), "hostname": hostname(request),
            "launch_index": 0, "availability_zone": "etcd-compute",
            "public_keys": {f"key-{i}": key for i, key in enumerate(keys)},
            "keys": [{"name": f"key-{i}", "type": "ssh", "data": key} for i, key in enumerate(keys)]}


def network_data(request: Request) -> dict[str, Any]:
    """/openstack/<version>/network_data.json: the guest's one NIC, by its MAC, on DHCP (its
    address is reserved for that MAC), as Nova describes a port on a DHCP network."""
    link = f"tap{request['uuid'][:11]}"
    return {"links": [{"id": link, "type": "phy", "ethernet_mac_address": mac_address(request["uuid"])}],
            "networks": [{"id": "network0", "type": "ipv4_dhcp", "link": link, "network_id": "etcd-compute"}],
            "services": []}


def config_drive_wanted(request: Request) -> bool:
    """Does the instance want a config drive (`eschedule --no-config-drive` says no)? Records
    older than the choice do."""
    return request.get("config_drive") is not False


READY_PATH = "/etcd-compute/ready/"  # + the instance's uuid: the guest POSTs there once a boot has finished


def vendor_data(request: Request, metadata_url: str) -> str:
    """cloud-init vendor-data that tells the host when each boot has finished (`--wait=ready`,
    `eschedule ssh`): a boothook (cloud-init runs those on every boot, early) queues a transient
    unit ordered after cloud-final.service, which POSTs to the metadata server's READY_PATH once
    cloud-init's last stage is done (user-data's runcmd too). cloud-init's phone_home module
    would do it only on the first boot, before its last modules; and a first metadata request
    comes minutes before the guest is usable (never, with a config drive). Without systemd-run
    it POSTs at once. A user-data that disables vendor-data goes without."""
    url = f"{metadata_url.rstrip('/')}{READY_PATH}{request['uuid']}"
    post = ("import time, urllib.request as u\n"  # (no single quote: the shell quotes it so)
            "for _ in range(40):\n"
            "    try:\n"
            f'        u.urlopen(u.Request("{url}", data=b"ready", method="POST"), timeout=10)\n'
            "        break\n"
            "    except Exception:\n"
            "        time.sleep(3)\n")
    return ("#cloud-boothook\n#!/bin/sh\n"
            "# etcd-compute: tell the host once this boot has finished (cloud-init's last stage done).\n"
            f"post='{post}'\n"
            "if command -v systemd-run >/dev/null 2>&1; then\n"
            "  systemd-run --no-block --quiet --unit=etcd-compute-ready -p After=cloud-final.service \\\n"
            "    /usr/bin/python3 -c \"$post\" || true\n"
            "else\n"
            "  (python3 -c \"$post\" &) || true\n"
            "fi\n")
