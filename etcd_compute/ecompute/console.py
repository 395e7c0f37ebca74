"""Publish each guest's serial console to etcd, so `eschedule console` reads it from anywhere.

virtlogd appends every boot's output to `<instances>/<uuid>.console.log` (and rotates it at
its max_size); a thread of the daemon looks at those files every `interval` seconds and puts
the tail of each one that changed (contract.CONSOLE_KEPT bytes) at PREFIX/consoles/<uuid>.
Quiet guests cost nothing; a chatty one at most one write per interval. Every write is fenced
like the actual state (the request's create revision on this host), so a host that lost an
instance (evacuated while it hung) can never publish over its new host's console.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from etcd_compute import contract
from etcd_compute.contract import Console
from etcd_compute.errors import ECError
from etcd_compute.store import Store

LOG = logging.getLogger(__name__)
SUFFIX = ".console.log"


def read_tail(path: Path, keep: int = contract.CONSOLE_KEPT) -> tuple[int, str]:
    """(offset, text) of the last `keep` bytes of `path`; bytes that are not UTF-8 survive as
    surrogate escapes, so a reader gets the exact bytes back."""
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        offset = max(0, size - keep)
        f.seek(offset)
        data = f.read(keep)
    return offset, data.decode("utf-8", "surrogateescape")


class ConsolePublisher:
    def __init__(self, store: Store, host: str, instances: Path, interval: float) -> None:
        self.store, self.host, self.instances, self.interval = store, host, instances, interval
        self.seen: dict[str, tuple[int, int]] = {}  # uuid -> (size, mtime_ns) last published

    def run(self, stopping: threading.Event) -> None:
        while not stopping.wait(self.interval):
            try:
                self.publish_changed()
            except ECError as exc:  # etcd away: the next round publishes what is still new
                LOG.debug("console publishing failed: %s", exc)
            except OSError as exc:
                LOG.warning("console publishing: %s", exc)

    def publish_changed(self) -> int:
        """Publish every console log that changed since it was last published; how many."""
        current: dict[str, tuple[int, int]] = {}
        for path in self.instances.glob("*" + SUFFIX):
            uuid = path.name[: -len(SUFFIX)]
            try:
                st = path.stat()
            except FileNotFoundError:
                continue  # destroyed meanwhile
            current[uuid] = (st.st_size, st.st_mtime_ns)
        published = 0
        for uuid, stamp in current.items():
            if self.seen.get(uuid) != stamp and self.publish(uuid, self.instances / (uuid + SUFFIX)):
                published += 1
            self.seen[uuid] = stamp
        for gone in set(self.seen) - set(current):
            del self.seen[gone]
        return published

    def publish(self, uuid: str, path: Path) -> bool:
        if not contract.looks_like_uuid(uuid):
            return False
        owner = self.store.request_rev(self.host, uuid)
        if owner.create == 0:
            return False  # not requested of this host (any more): not ours to publish
        try:
            offset, text = read_tail(path)
        except FileNotFoundError:
            return False
        record: Console = {"uuid": uuid, "host": self.host, "offset": offset, "text": text,
                           "updated_at": contract.now()}
        return self.store.put_console(record, owner)
