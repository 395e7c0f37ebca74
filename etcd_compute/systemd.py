"""Telling systemd how a service is (sd_notify), for both sides' long-running processes.

Type=notify services say READY=1 once they serve, STOPPING=1 when they stop, and, with
WatchdogSec=, WATCHDOG=1 at least every half of it from the loop that does the work (never
from a thread of its own: a hung loop must let the watchdog fire). Without NOTIFY_SOCKET
(not run by systemd) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time

LOG = logging.getLogger(__name__)


def notify(message: str) -> None:
    """Send `message` ("READY=1", "STATUS=...", newline-separated) to systemd, if it listens."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract socket namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        LOG.warning("cannot notify systemd at %s: %s", address, exc)


class Watchdog:
    """WATCHDOG=1, at most every half of systemd's WatchdogSec (WATCHDOG_USEC), however often
    pet() is called; nothing if no watchdog is asked for this process."""

    def __init__(self) -> None:
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        wanted = usec.isdigit() and int(usec) > 0 and (not pid.isdigit() or int(pid) == os.getpid())
        self.every = int(usec) / 2e6 if wanted else None
        self._last = float("-inf")

    def pet(self) -> None:
        if self.every is None or time.monotonic() - self._last < self.every:
            return
        self._last = time.monotonic()
        notify("WATCHDOG=1")
