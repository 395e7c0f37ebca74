"""libvirt's lifecycle events of our domains, on a connection of their own: the listener's
process (worker.watch_events) tells the daemon which domains to look at again.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

import libvirt

from etcd_compute.ecompute.driver import domain_name

log = logging.getLogger(__name__)


def watch_lifecycle(uri: str, notify: Callable[[str], None]) -> None:
    """Call notify(uuid) whenever one of our domains starts, stops, pauses, resumes, crashes or
    goes away, for ever (its process dies with the daemon): libvirt's lifecycle events, on a connection of its own
    with libvirt's default event loop. A lost connection (libvirtd restarted) is reopened after a
    backoff; nothing is missed for good, as the daemon's periodic resync compares everything."""
    libvirt.virEventRegisterDefaultImpl()
    libvirt.virEventAddTimeout(1000, lambda *_: None, None)  # the loop wakes up at least every second
    delay = 1.0
    while True:
        try:
            conn = libvirt.openReadOnly(uri)
        except libvirt.libvirtError as e:
            log.warning("lifecycle events: no connection to %s (%s)", uri, e.get_error_message())
        else:
            delay = 1.0
            _listen(conn, notify)
            log.warning("lifecycle events: lost the connection to %s; reconnecting", uri)
        time.sleep(delay)
        delay = min(delay * 2, 30.0)


def _listen(conn: libvirt.virConnect, notify: Callable[[str], None]) -> None:
    closed = threading.Event()
    conn.registerCloseCallback(lambda *_: closed.set(), None)

    def on_event(_conn: libvirt.virConnect, dom: libvirt.virDomain, *_: object) -> None:
        if dom.name() == domain_name(dom.UUIDString()):
            notify(dom.UUIDString())

    conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_event, None)
    log.info("listening to lifecycle events on %s", conn.getURI())
    try:
        while not closed.is_set() and conn.isAlive():
            libvirt.virEventRunDefaultImpl()  # returns after each event or timer tick
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()
