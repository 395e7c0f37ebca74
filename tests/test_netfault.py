"""The fault proxy (devstack/netfault.py) between real clients and real servers: etcd over gRPC
(calls, a watch stream, an ecompute's lease), Placement over HTTP/1.1 keep-alive."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Callable, Iterator

import etcd3.exceptions
import pytest
import requests

from devstack import harness
from devstack.harness import wait_until
from devstack.netfault import FaultProxy, HostLinks
from etcd_compute.config import EtcdConfig, PlacementConfig
from etcd_compute.errors import EtcdUnavailable, PlacementNoAnswer
from etcd_compute.placement import PlacementClient
from etcd_compute.store import Store

from conftest import Cloud

Proxies = Callable[[str], FaultProxy]


@pytest.fixture
def etcd_pair(private_etcd: harness.Etcd, fault_proxy: Proxies) -> Iterator[tuple[FaultProxy, Store, Store]]:
    """A proxy to a private etcd, a client through it (calls time out after 2 s) and one beside it."""
    proxy = fault_proxy(private_etcd.endpoint)
    through = Store(EtcdConfig(endpoints=[proxy.url], prefix="/p", timeout=2))
    direct = Store(EtcdConfig(endpoints=[private_etcd.endpoint], prefix="/p"))
    yield proxy, through, direct
    through.close()
    direct.close()


def watched(store: Store, direct: Store) -> tuple[list[str], Callable[[], None]]:
    """The keys a watch of /p/ through `store` has seen (it is running once it saw a first key,
    written beside the proxy); and how to stop it."""
    seen: list[str] = []
    watch = store.watch("/p/", 1, lambda key, _rev: seen.append(key), lambda _state: None)
    direct.client.put("/p/first", "1")
    wait_until(lambda: "/p/first" in seen, 30, "the watch through the proxy to see a first key")
    return seen, watch.stop


def test_pass_carries_calls_and_a_watch_on_one_connection(etcd_pair: tuple[FaultProxy, Store, Store]) -> None:
    proxy, through, direct = etcd_pair
    seen, stop = watched(through, direct)
    try:
        through.client.put("/p/a", "1")
        direct.client.put("/p/b", "2")
        wait_until(lambda: seen == ["/p/first", "/p/a", "/p/b"], 30, "both events through the proxy")
        assert direct.client.get("/p/a")[0] == b"1"
    finally:
        stop()
    stats = proxy.stats()
    # HTTP/2: the calls and the watch stream share one connection.
    assert stats["connections"] == 1 and stats["mode"] == "pass", stats
    assert isinstance(stats["bytes_up"], int) and stats["bytes_up"] > 0 and stats["resets"] == 0


def test_a_blackhole_stalls_calls_to_their_deadline_and_the_heal_resumes_the_same_connection(
        etcd_pair: tuple[FaultProxy, Store, Store]) -> None:
    proxy, through, direct = etcd_pair
    seen, stop = watched(through, direct)
    try:
        proxy.blackhole()
        direct.client.put("/p/during", "x")  # written while the client is cut off
        t0 = time.monotonic()
        with pytest.raises(EtcdUnavailable, match="etcd connection timeout"):  # its deadline, not an error
            through.is_alive("h")
        assert time.monotonic() - t0 >= 2  # (a lower bound: a busy machine only adds to it)
        assert "/p/during" not in seen
        proxy.heal()
        assert through.is_alive("h") is False  # the same client
        wait_until(lambda: "/p/during" in seen, 30, "the event held back in the cut, after the heal")
    finally:
        stop()
    assert proxy.stats()["connections"] == 1  # held, not dropped: the HTTP/2 stream came out intact


def test_reject_resets_at_once_and_the_client_connects_again_after_the_heal(
        private_etcd: harness.Etcd, fault_proxy: Proxies) -> None:
    proxy = fault_proxy(private_etcd.endpoint)
    store = Store(EtcdConfig(endpoints=[proxy.url], prefix="/p", timeout=60))
    try:
        assert store.is_alive("h") is False
        proxy.reject()
        # Unavailable (the reset, then a refused connect), not the 60 s deadline run out.
        with pytest.raises(EtcdUnavailable, match="etcd connection failed"):
            store.is_alive("h")
        assert proxy.stats()["resets"] == 1
        proxy.heal()

        def answers() -> bool:
            try:
                return store.is_alive("h") is False
            except EtcdUnavailable:  # gRPC waits out its reconnect backoff first
                return False
        wait_until(answers, 60, "the same client to connect again", interval=0.5)
    finally:
        store.close()
    assert proxy.stats()["connections"] >= 2  # a new one


@pytest.mark.parametrize(("mode", "reaches_etcd"), [("drop_upstream", False), ("drop_downstream", True)])
def test_a_one_way_cut_stalls_the_caller_whether_or_not_etcd_did_the_write(
        mode: str, reaches_etcd: bool, etcd_pair: tuple[FaultProxy, Store, Store]) -> None:
    """drop_downstream is the asymmetric partition that fools a host: etcd carries out its write
    (a lease refresh, a status) and the host never hears back."""
    proxy, through, direct = etcd_pair
    assert through.is_alive("h") is False
    proxy.set_mode(mode)
    with pytest.raises(etcd3.exceptions.ConnectionTimeoutError):
        through.client.put("/p/k", "v")
    if reaches_etcd:
        wait_until(lambda: direct.client.get("/p/k")[0] == b"v", 30, "the write to land in etcd")
    else:
        assert direct.client.get("/p/k")[0] is None  # held back: it cannot have arrived
    proxy.heal()
    assert through.client.get("/p/other")[0] is None  # the same client goes on


def test_http_keep_alive_keeps_one_connection_through_the_proxy(fault_proxy: Proxies) -> None:
    """(Placement's gunicorn sync worker closes every connection after its answer: a server that keeps them.)"""
    class KeepAlive(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *a: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", harness.free_port()), KeepAlive)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        proxy = fault_proxy(f"http://127.0.0.1:{server.server_port}")
        with requests.Session() as session:
            assert [session.get(proxy.url, timeout=30).text for _ in range(3)] == ["ok"] * 3
        assert proxy.stats()["connections"] == 1
    finally:
        server.shutdown()
        server.server_close()


def test_placement_through_the_proxy_times_out_in_a_blackhole_and_answers_once_healed(
        stack: dict, fault_proxy: Proxies) -> None:
    proxy = fault_proxy(stack["placement"])
    client = PlacementClient(PlacementConfig(endpoint=proxy.url, timeout=3))
    client.providers()
    proxy.blackhole()
    with pytest.raises(PlacementNoAnswer, match="did not answer in 3s"):
        client.providers()
    proxy.heal()
    client.providers()


def test_a_host_cut_from_etcd_goes_down_and_comes_back_up_once_healed(cloud: Cloud) -> None:
    """HostLinks gives one ecompute its own way to etcd and Placement: the lease keepalive goes
    through the proxy while it passes, and the host is DOWN while it is cut from etcd only."""
    with HostLinks([cloud.stack["etcd"]], cloud.stack["placement"], name="cut") as links:
        host = cloud.compute("cut", lease_ttl=2, **links.compute_config())
        wait_until(lambda: host.host in cloud.store.alive_hosts(), 30, "the host UP through its proxies")
        links.cut("blackhole", placement=False)
        assert links.placement_proxy is not None and links.placement_proxy.mode == "pass"
        wait_until(lambda: host.host not in cloud.store.alive_hosts(), 30, "the host DOWN: its lease lapsed")
        links.heal()
        wait_until(lambda: host.host in cloud.store.alive_hosts(), 60, "the host UP again")
        stats = links.stats()
        assert all(s["bytes_down"] for s in stats.values()), stats
