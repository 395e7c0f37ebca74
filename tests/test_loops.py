"""Every long-lived loop of the daemon survives what it meets, or is noticed and started again.

In-process, against the stack's real etcd: a loop that dies silently leaves a daemon that
runs blind (issue 18: one unexpected exception ended the watch thread or the liveness
thread for good, and a host whose liveness died showed DOWN while its VMs ran).
"""

from __future__ import annotations

import threading
from typing import Any

from devstack.harness import wait_until
from etcd_compute.etcd import PrefixWatch

from conftest import Cloud


def test_a_watch_outlives_a_bug_in_what_it_calls(cloud: Cloud) -> None:
    """An event whose handler raises does not end the watch: later events still arrive, and
    the owner is told to look again (a resync covers the event that failed)."""
    store, prefix = cloud.store, cloud.prefix + "/w/"
    seen: list[str] = []
    states: list[str] = []
    boom = threading.Event()

    def on_event(key: str, _rev: int) -> None:
        if key.endswith("/poison") and not boom.is_set():
            boom.set()
            raise RuntimeError("a bug in the handler")
        seen.append(key.rsplit("/", 1)[1])

    watch = PrefixWatch(store.etcd, prefix, _revision(store), on_event, states.append)
    try:
        store.client.put(prefix + "poison", "x")
        wait_until(boom.is_set, 10, "the handler to raise")
        store.client.put(prefix + "after", "y")
        wait_until(lambda: "after" in seen, 15, "an event after the handler raised")
        assert watch.alive()
        wait_until(lambda: "up" in states, 15, "the owner to be told to look again")
    finally:
        watch.stop()


def _revision(store: Any) -> int:
    return int(store.client.get_prefix_response("/").header.revision) + 1
