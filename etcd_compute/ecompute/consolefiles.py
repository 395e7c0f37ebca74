"""Where each boot's serial console output lives on the host, shared by the driver (which
starts a new boot's file) and the console publisher (which reads them all).

virtlogd appends the guest's console to `<uuid>.console.log` while its QEMU runs. Before the
driver starts the domain again it sets that file aside as `<uuid>.console-<n>.log` (boot n)
and notes when the new boot began in `<uuid>.boots.json` ({"n": iso time}), so every boot has
a file of its own and a reboot's output never pushes an earlier boot's out. A reboot the guest
makes itself (same QEMU) stays in its boot's file. The first boot and the last BOOTS_KEPT - 1
(the current one among them) are kept; older ones are removed. Nothing here loads libvirt or
etcd: both sides import it.
"""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path

BOOTS_KEPT = 5  # the first boot and the last four (the current one among them)
CURRENT = ".console.log"
_FINISHED = re.compile(r"^(?P<uuid>[0-9a-f-]{36})\.console-(?P<boot>\d+)\.log$")


def finished_path(instances: Path, uuid: str, boot: int) -> Path:
    return instances / f"{uuid}.console-{boot}.log"


def boots_path(instances: Path, uuid: str) -> Path:
    return instances / f"{uuid}.boots.json"


def read_boots(instances: Path, uuid: str) -> dict[int, str | None]:
    """Boot number -> when it began (None: not known, a log older than the record)."""
    try:
        found = json.loads(boots_path(instances, uuid).read_text())
        return {int(n): at if isinstance(at, str) else None for n, at in found.items()}
    except (OSError, ValueError, AttributeError):
        return {}


def files(instances: Path, uuid: str) -> dict[int, Path]:
    """Every kept boot's log by boot number: finished ones, and the current one (the last)."""
    found = {int(m["boot"]): p for p in instances.glob(f"{uuid}.console-*.log") if (m := _FINISHED.match(p.name))}
    current = instances / f"{uuid}{CURRENT}"
    if current.exists():
        found[max([*read_boots(instances, uuid), *found, 0]) or 1] = current
    return found


def all_files(instances: Path, uuid: str) -> list[Path]:
    """What the console of `uuid` keeps on disk besides its current log (removed with the instance)."""
    return [*instances.glob(f"{uuid}.console-*.log"), *[p for p in [boots_path(instances, uuid)] if p.exists()]]


def new_boot(instances: Path, uuid: str) -> int:
    """Before the domain starts again: set the last boot's log aside, note when this one began,
    drop boots beyond those kept; this boot's number."""
    boots = read_boots(instances, uuid)
    current = instances / f"{uuid}{CURRENT}"
    last = max(boots, default=0)
    if current.exists():
        last = last or 1  # a log from before boots were counted: boot 1
        boots.setdefault(last, None)
        os.replace(current, finished_path(instances, uuid, last))
    boot = last + 1
    boots[boot] = datetime.now(UTC).isoformat(timespec="milliseconds")
    finished = sorted(n for n in boots if n != boot)
    keep = {1, *finished[-(BOOTS_KEPT - 2):], boot}
    for n in finished:
        if n not in keep:
            finished_path(instances, uuid, n).unlink(missing_ok=True)
            del boots[n]
    tmp = boots_path(instances, uuid).with_suffix(".tmp")
    tmp.write_text(json.dumps({str(n): at for n, at in sorted(boots.items())}))
    os.replace(tmp, boots_path(instances, uuid))
    return boot
