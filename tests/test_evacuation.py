"""Issue 18: an instance never runs twice, even when its host is cut off: the user's side.

A host's fence (ecompute) stops its domains before its lease can lapse; an evacuation acts
on a host only once it has been DOWN (PREFIX/down/<host>) for the host's lease_ttl +
fence_margin + grace, and its move compares that the host is still DOWN, the same DOWN. The
evacuator (`eschedule evacuate --auto`) is a service: it outlives etcd and Placement outages,
one of several leads, and it says how it is (sd_notify, Prometheus).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import urllib.request
import uuid as uuidlib
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from devstack.harness import Etcd, free_port, wait_until
from etcd_compute import contract
from etcd_compute.config import EtcdConfig, ScheduleConfig
from etcd_compute.eschedule import moves
from etcd_compute.eschedule.operations import Operations

from conftest import Cloud

SMALL = "resources=VCPU:1,MEMORY_MB:128"


def operations(cloud: Cloud) -> Operations:
    cfg = ScheduleConfig(etcd=EtcdConfig(endpoints=[cloud.stack["etcd"]], prefix=cloud.prefix), default_image=None)
    cfg.placement.endpoint = cloud.stack["placement"]
    return Operations(cfg)


def where(cloud: Cloud, uuid: str) -> list[str]:
    """The hosts whose request keys name `uuid`."""
    return [k.split("/")[-2] for k in cloud.etcd_values() if "/requests/" in k and k.endswith(uuid)]


def dead_host(cloud: Cloud, **kwargs: Any) -> tuple[Any, str, Any]:
    """Host A with one instance, host B beside it, then A's daemon killed and A seen DOWN."""
    a = cloud.compute("hostA", lease_ttl=2, **kwargs)
    uuid = cloud.boot(SMALL)["uuid"]  # A is the only host yet
    b = cloud.compute("hostB", lease_ttl=2)
    a.kill_all()
    wait_until(lambda: a.host not in cloud.store.alive_hosts(), 15, "A DOWN")
    return a, uuid, b


def window(cloud: Cloud, host: str) -> float:
    record = cloud.host_record(host)
    assert record is not None and record["fence_margin"] is not None, record
    return float(record["lease_ttl"] + record["fence_margin"])


def marker(cloud: Cloud, host: str) -> dict | None:
    return cloud.etcd_values().get(f"{cloud.prefix}/down/{host}")


def test_evacuate_waits_until_the_host_has_been_down_for_its_fence_window(cloud: Cloud) -> None:
    """Before issue 18 a host was evacuated the moment its alive key was gone, while its fence
    (lease_ttl - fence_margin after its last proof of the lease) may not have acted yet."""
    a, uuid, b = dead_host(cloud)
    before = datetime.now().astimezone()
    r = cloud.eschedule("evacuate", a.host, "--json")
    assert r.rc == 0 and [m["to"] for m in r.json()] == [b.host], r
    moved = cloud.etcd_values()[f"{cloud.prefix}/requests/{b.host}/{uuid}"]
    # Nobody had noticed A DOWN before this evacuate: it started the clock, and waited it out.
    assert datetime.fromisoformat(moved["updated_at"]) - before >= timedelta(seconds=window(cloud, a.host))
    down = marker(cloud, a.host)
    assert down is not None and datetime.fromisoformat(down["since"]) >= before, down
    assert r.err.count("waiting") == 1 and "fence window ends in" in r.err, r.err
    assert moved["evacuated"] == {"at": moved["updated_at"], "from": a.host, "down_since": down["since"],
                                  "forced": False}
    wait_until(lambda: cloud.show(uuid)["state"] == "ACTIVE", 30, "ACTIVE on B")
    events = [e["event"] for e in cloud.show(uuid)["events"]]
    assert f"evacuated from {a.host}" in events[0] and "DOWN since" in events[0], events


def test_down_since_is_shown_refused_early_and_restarts_with_the_host(cloud: Cloud) -> None:
    a, uuid, b = dead_host(cloud)
    found = {h["uuid"]: h for h in cloud.eschedule("hosts", "--json").json()}
    assert found[a.host]["state"] == "DOWN" and found[b.host]["down_since"] is None
    since = found[a.host]["down_since"]
    assert marker(cloud, a.host) == {"host": a.host, "since": since, "by": marker(cloud, a.host)["by"]}
    view = cloud.show(uuid)
    assert (view["host_state"], view["host_down_since"]) == ("DOWN", since)
    r = cloud.eschedule("evacuate", a.host, "--no-wait")
    assert r.rc == 7 and "fence window ends in" in r.err and len(r.err.strip().splitlines()) == 1, r
    assert where(cloud, uuid) == [a.host]

    cloud.start(a)  # it comes back: its alive key and the end of its DOWN record in one transaction
    wait_until(lambda: a.host in cloud.store.alive_hosts(), 10, "A UP")
    assert marker(cloud, a.host) is None
    assert cloud.show(uuid)["host_down_since"] is None
    a.kill_all()
    wait_until(lambda: a.host not in cloud.store.alive_hosts(), 15, "A DOWN again")
    again = cloud.show(uuid)["host_down_since"]
    assert again is not None and again > since  # the clock restarted
    wait_until(lambda: cloud.eschedule("evacuate", a.host, "--no-wait").rc != 7, 30, "the fence window to pass")
    assert where(cloud, uuid) == [b.host]


def test_a_host_that_comes_back_before_the_move_keeps_its_instance(cloud: Cloud) -> None:
    """The host's alive key reappears between the evacuation's read and its etcd move: the move
    must fail (the returned host runs the instance) and the allocation go back to it."""
    a, uuid, b = dead_host(cloud)
    ops = operations(cloud)
    real_move = ops.placement.move

    def comes_back(*args: Any) -> None:
        ops.placement.move = real_move  # type: ignore[method-assign]
        cloud.start(a)
        wait_until(lambda: a.host in cloud.store.alive_hosts(), 10, "A UP")
        real_move(*args)

    ops.placement.move = comes_back  # type: ignore[method-assign]
    moved = moves.evacuate(ops, a.host)
    assert [m["to"] for m in moved] == [None] and "came back" in moved[0]["error"], moved
    assert where(cloud, uuid) == [a.host]
    assert set(cloud.placement.get_allocations(uuid)) == {a.host}
    assert cloud.usages(b.host)["VCPU"] == 0
    wait_until(lambda: cloud.show(uuid)["state"] == "ACTIVE", 30, "ACTIVE on A again")


def test_a_host_without_a_fence_is_evacuated_only_by_force(cloud: Cloud) -> None:
    a, uuid, b = dead_host(cloud, fence={"enabled": False})
    r = cloud.eschedule("evacuate", a.host)
    assert r.rc == 7 and "does not fence itself" in r.err and "--force" in r.err, r
    assert where(cloud, uuid) == [a.host]
    r = cloud.eschedule("evacuate", a.host, "--force", "--json")
    assert r.rc == 0 and [m["to"] for m in r.json()] == [b.host], r
    assert set(cloud.placement.get_allocations(uuid)) == {b.host}
    wait_until(lambda: cloud.show(uuid)["state"] == "ACTIVE", 30, "ACTIVE on B")
    first = cloud.show(uuid)["events"][0]["event"]
    assert f"evacuated from {a.host}" in first and "--force" in first, first


def test_a_host_of_an_ecompute_older_than_the_fence_is_refused(cloud: Cloud) -> None:
    host = str(uuidlib.uuid4())
    cloud.store.put_host({"uuid": host, "name": "old", "hostname": "old", "pid": 1, "state": "up",  # type: ignore
                          "network": None, "updated_at": contract.now()})
    r = cloud.eschedule("evacuate", host)
    assert r.rc == 7 and "does not fence itself" in r.err, r


def test_a_move_compares_the_hosts_down_record(cloud: Cloud) -> None:
    """store.move_instance moves a request off a host only while that host is DOWN, the same
    DOWN it read: not once it came back, nor once it came back and died again."""
    store, host, other, uuid = cloud.store, str(uuidlib.uuid4()), str(uuidlib.uuid4()), str(uuidlib.uuid4())
    request = contract.new_request(uuid, host, {host: {"resources": {"VCPU": 1}}}, None, SMALL, "p", "u")
    assert store.create_instance(request)
    rev = store.get_request(host, uuid)[1]
    first = store.mark_down(host, "test")
    assert first is not None and store.mark_down(host, "later") == first  # the first to notice says since when
    lease = store.claim_alive(host, 5, {"pid": 1})  # back: its DOWN record goes with the alive key's return
    assert lease is not None and store.down_record(host) is None and store.mark_down(host, "test") is None
    assert not store.move_instance(request, rev, other, first)
    store.revoke_alive(lease)  # and dead again: a new DOWN record
    second = store.mark_down(host, "test")
    assert second is not None and second[1].mod != first[1].mod
    assert not store.move_instance(request, rev, other, first)
    assert store.move_instance(request, rev, other, second)
    assert store.get_request(other, uuid)[0] is not None


# -- the evacuator as a service ------------------------------------------------------------


class Evacuator:
    """`eschedule evacuate --auto` as systemd runs it: its log, its sd_notify messages (with a
    watchdog asked for), its metrics if `metrics`."""

    def __init__(self, cloud: Cloud, config: Path, name: str, *args: str, metrics: bool = False) -> None:
        self.log = cloud.tmp / f"{name}.log"
        self.dir = tempfile.mkdtemp(prefix="evn-")  # AF_UNIX paths are short
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(os.path.join(self.dir, "notify"))
        self.sock.settimeout(0.2)
        self.notices: list[str] = []
        self.metrics = f"127.0.0.1:{free_port()}" if metrics else None
        argv = [*cloud.eschedule_argv(config), "evacuate", "--auto", "--grace", "0", *args,
                *(["--metrics", self.metrics] if self.metrics else [])]
        env = {**os.environ, "NOTIFY_SOCKET": os.path.join(self.dir, "notify"), "WATCHDOG_USEC": "4000000"}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        cloud_evacuators.append(self)

    def said(self, word: str) -> bool:
        try:
            while True:
                self.notices.append(self.sock.recv(4096).decode())
        except TimeoutError:
            pass
        return any(word in n.splitlines() for n in self.notices)

    def logtext(self) -> str:
        return self.log.read_text(errors="replace")

    def scrape(self) -> dict[str, float]:
        """The metrics, by series with its labels, e.g. 'etcd_compute_evacuator_leader'."""
        assert self.metrics is not None
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line.startswith("etcd_compute_evacuator")}

    def running(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


cloud_evacuators: list[Evacuator] = []


def teardown_function() -> None:
    while cloud_evacuators:
        cloud_evacuators.pop().close()


class Switch:
    """A TCP forwarder to Placement that can be turned off (connections closed unanswered)."""

    def __init__(self, upstream: str) -> None:
        self.up, self.on, self.refused = urlsplit(upstream), threading.Event(), 0
        self.server = socket.create_server(("127.0.0.1", free_port()))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            if not self.on.is_set():
                self.refused += 1
                conn.close()
                continue
            up = socket.create_connection((self.up.hostname, self.up.port))
            for src, dst in ((conn, up), (up, conn)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()


def test_the_evacuator_outlives_etcd_and_placement_outages(cloud: Cloud, private_etcd: Etcd) -> None:
    """Before issue 18 `evacuate --auto` ended at the first etcd or Placement error."""
    switch = Switch(cloud.stack["placement"])
    try:
        config = cloud.write("evacuator.yaml", {
            "etcd": {"endpoints": [private_etcd.endpoint], "prefix": cloud.prefix, "timeout": 2},
            "placement": {"endpoint": switch.url, "timeout": 3, "retries": 0}, "default_image": None})
        direct = cloud.write("direct.yaml", {
            "etcd": {"endpoints": [private_etcd.endpoint], "prefix": cloud.prefix},
            "placement": {"endpoint": cloud.stack["placement"]}, "default_image": None})
        evacuator = Evacuator(cloud, config, "evacuator", metrics=True)
        wait_until(lambda: evacuator.said("READY=1"), 30, "READY=1", proc=evacuator.proc, log=evacuator.log)
        private_etcd.kill()
        wait_until(lambda: evacuator.scrape().get('etcd_compute_evacuator_errors_total{kind="etcd"}', 0) >= 2, 30,
                   "errors while etcd is away", proc=evacuator.proc, log=evacuator.log)
        private_etcd.start()
        assert evacuator.running(), evacuator.logtext()

        a = cloud.compute("hostA", lease_ttl=2, etcd=private_etcd.endpoint)
        r = cloud.eschedule(SMALL, "--wait", "--json", config=direct)
        assert r.rc == 0, r
        uuid = r.json()["uuid"]
        b = cloud.compute("hostB", lease_ttl=2, etcd=private_etcd.endpoint)
        a.kill_all()  # while Placement is away from the evacuator
        wait_until(lambda: evacuator.scrape().get('etcd_compute_evacuator_errors_total{kind="placement"}', 0) >= 2,
                   60, "errors while Placement is away", proc=evacuator.proc, log=evacuator.log)
        assert switch.refused >= 2
        switch.on.set()
        wait_until(lambda: f"{cloud.prefix}/requests/{b.host}/{uuid}" in private_keys(private_etcd, cloud.prefix),
                   60, "moved to B", proc=evacuator.proc, log=evacuator.log)
        assert evacuator.scrape()['etcd_compute_evacuator_evacuations_total{result="moved"}'] == 1
        assert evacuator.said("WATCHDOG=1")
        evacuator.proc.send_signal(signal.SIGTERM)
        assert evacuator.proc.wait(30) == 0
    finally:
        switch.close()


def private_keys(etcd: Etcd, prefix: str) -> set[str]:
    from etcd_compute.store import Store
    store = Store(EtcdConfig(endpoints=[etcd.endpoint], prefix=prefix))
    try:
        return {meta.key.decode() for _, meta in store.client.get_prefix(prefix + "/", keys_only=True)}
    finally:
        store.close()


def test_one_evacuator_leads_another_takes_over_and_a_stopped_one_resigns(cloud: Cloud) -> None:
    config = cloud.write("evacuators.yaml", {
        "etcd": {"endpoints": [cloud.stack["etcd"]], "prefix": cloud.prefix},
        "placement": {"endpoint": cloud.stack["placement"]}, "default_image": None,
        "evacuate": {"leader_ttl": 3, "interval": 0.5}})
    leader_key = f"{cloud.prefix}/evacuator"
    first = Evacuator(cloud, config, "first")
    wait_until(lambda: (cloud.etcd_values().get(leader_key) or {}).get("pid") == first.proc.pid, 30,
               "the first evacuator to lead", proc=first.proc, log=first.log)
    second = Evacuator(cloud, config, "second", metrics=True)
    wait_until(lambda: second.said("READY=1"), 30, "READY=1", proc=second.proc, log=second.log)
    wait_until(lambda: 'etcd_compute_evacuator_leader' in second.scrape(), 30, "the second one's metrics")
    assert second.scrape()["etcd_compute_evacuator_leader"] == 0

    first.proc.kill()  # the leader dies without resigning: its lease runs out
    a, uuid, b = dead_host(cloud)
    wait_until(lambda: where(cloud, uuid) == [b.host], 60, "the second evacuator to move it",
               proc=second.proc, log=second.log)
    assert cloud.etcd_values()[leader_key]["pid"] == second.proc.pid
    seen = second.scrape()
    assert seen["etcd_compute_evacuator_leader"] == 1
    assert seen['etcd_compute_evacuator_evacuations_total{result="moved"}'] == 1
    assert seen["etcd_compute_evacuator_hosts_down"] >= 1
    assert seen["etcd_compute_evacuator_last_round_timestamp_seconds"] > 0
    wait_until(lambda: cloud.show(uuid)["state"] == "ACTIVE", 30, "ACTIVE on B")

    second.proc.send_signal(signal.SIGTERM)
    assert second.proc.wait(30) == 0
    assert leader_key not in cloud.etcd_values()  # resigned at once, not after its lease


def test_bad_evacuate_input_is_one_line_and_exit_2(cloud: Cloud) -> None:
    host = str(uuidlib.uuid4())
    for args, says in [(["--auto", host], "takes no HOST"), (["--auto", "--no-wait"], "takes no HOST"),
                       ([host, "--grace", "-1"], "--grace must be from 0"),
                       ([host, "--grace", "nan"], "--grace must be from 0"),
                       ([host, "--metrics", "127.0.0.1:9"], "--metrics goes with --auto"),
                       (["--auto", "--metrics", "nowhere"], "must be HOST:PORT")]:
        r = cloud.eschedule("evacuate", *args, timeout=30)
        assert r.rc == 2 and says in r.err and len(r.err.strip().splitlines()) == 1, (args, r)
