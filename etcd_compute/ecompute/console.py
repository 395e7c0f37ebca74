"""Publish each guest's serial console to etcd, so `eschedule console` reads it from anywhere.

virtlogd appends each boot's output to a log of its own (consolefiles: the driver sets the
last boot's aside before every start, keeping the first and the last few); a thread of the
daemon looks at those files every `interval` seconds and, for an instance whose files
changed, puts the tail of the current boot (contract.CONSOLE_KEPT bytes) at
PREFIX/consoles/<uuid> and the head and tail of every boot that changed at
PREFIX/consoles/<uuid>/<boot> (and drops the records of boots no longer kept). So every kept
boot stays readable after restarts, and a boot's kernel messages are not pushed out by what
came after. Quiet guests cost nothing; a chatty one at most two writes per interval. Every
write is fenced like the actual state (the request's create revision on this host), so a host
that lost an instance (evacuated while it hung) can never publish over its new host's console.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from etcd_compute import contract
from etcd_compute.contract import Console, ConsoleBoot
from etcd_compute.ecompute import consolefiles
from etcd_compute.errors import ECError
from etcd_compute.store import Rev, Store

LOG = logging.getLogger(__name__)
SUFFIX = consolefiles.CURRENT


def read_tail(path: Path, keep: int = contract.CONSOLE_KEPT) -> tuple[int, str]:
    """(offset, text) of the last `keep` bytes of `path`; bytes that are not UTF-8 survive as
    surrogate escapes, so a reader gets the exact bytes back."""
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        offset = max(0, size - keep)
        f.seek(offset)
        data = f.read(keep)
    return offset, data.decode("utf-8", "surrogateescape")


def read_boot(path: Path) -> tuple[int, str, str]:
    """(size, head, tail) of one boot's log: its first CONSOLE_HEAD bytes, and its last
    CONSOLE_BOOT_TAIL bytes after those (surrogate escapes, as read_tail)."""
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        head = f.read(contract.CONSOLE_HEAD)
        start = max(len(head), size - contract.CONSOLE_BOOT_TAIL)
        f.seek(start)
        tail = f.read(size - start)
    return size, head.decode("utf-8", "surrogateescape"), tail.decode("utf-8", "surrogateescape")


Stamp = tuple[int, int]  # (size, mtime_ns) of a log


class ConsolePublisher:
    def __init__(self, store: Store, host: str, instances: Path, interval: float) -> None:
        self.store, self.host, self.instances, self.interval = store, host, instances, interval
        self.seen: dict[str, dict[int, Stamp]] = {}  # uuid -> boot -> its log's stamp when last published

    def run(self, stopping: threading.Event) -> None:
        while not stopping.wait(self.interval):
            try:
                self.publish_changed()
            except ECError as exc:  # etcd away: the next round publishes what is still new
                LOG.debug("console publishing failed: %s", exc)
            except OSError as exc:
                LOG.warning("console publishing: %s", exc)

    def publish_changed(self) -> int:
        """Publish every instance's console whose logs changed since last published; how many."""
        uuids = {p.name[:36] for p in self.instances.glob("*.console*.log") if contract.looks_like_uuid(p.name[:36])}
        published = 0
        for uuid in uuids:
            logs: dict[int, Stamp] = {}
            for boot, path in consolefiles.files(self.instances, uuid).items():
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue  # destroyed, or set aside, meanwhile: the next round sees it
                logs[boot] = (st.st_size, st.st_mtime_ns)
            if logs and self.seen.get(uuid) != logs and self.publish(uuid, logs):
                published += 1
        for gone in set(self.seen) - uuids:
            del self.seen[gone]
        return published

    def publish(self, uuid: str, logs: dict[int, Stamp]) -> bool:
        """The current boot's tail and every boot whose log changed (dropping the records of boots
        no longer kept); False if the instance is not this host's (any more) or a log went away."""
        owner = self.store.request_rev(self.host, uuid)
        if owner.create == 0:
            return False  # not requested of this host (any more): not ours to publish
        before = self.seen.get(uuid)
        if before is None:  # first look since the daemon started: what etcd holds may be stale
            before = dict.fromkeys(self.store.console_boot_numbers(uuid), (-1, -1))
        files = consolefiles.files(self.instances, uuid)
        current = max(logs)
        started = consolefiles.read_boots(self.instances, uuid)
        try:
            if before.get(current) != logs[current]:
                offset, text = read_tail(files[current])
                tail: Console = {"uuid": uuid, "host": self.host, "offset": offset, "text": text, "boot": current,
                                 "updated_at": contract.now()}
                if not self.store.put_console(tail, owner):
                    return False
            for boot, stamp in sorted(logs.items()):
                if before.get(boot) != stamp and not self._put_boot(uuid, boot, files[boot], started.get(boot), owner):
                    return False
        except (FileNotFoundError, KeyError):
            return False  # set aside (a new boot) while read: the next round reads it where it is now
        for boot in set(before) - set(logs):
            self.store.drop_console_boot(uuid, boot)
        self.seen[uuid] = logs
        return True

    def _put_boot(self, uuid: str, boot: int, path: Path, started_at: str | None, owner: Rev) -> bool:
        size, head, tail = read_boot(path)
        record: ConsoleBoot = {"uuid": uuid, "host": self.host, "boot": boot, "started_at": started_at,
                               "size": size, "head": head, "tail": tail, "updated_at": contract.now()}
        return self.store.put_console_boot(record, owner)
