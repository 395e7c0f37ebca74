"""Per-instance graphs (issue 22, item 6): the host keeps the last hour of each instance's
counters in memory and serves them; the API turns them into rates, scoped like every
instance route; the dashboard draws them as inline SVG.

The pure pieces first (the ring, rates across a counter reset, the SVG of a series and of
none), then a real ecompute on a fake hypervisor (fake:///DIR: its domains' counters grow at
rates a test sets, and start again from zero at each boot, as libvirt's do) and a real eapi.
test:///default cannot serve here: its domains live inside the worker that made them, and the
stats worker, a process of its own, never sees them.
"""

from __future__ import annotations

import json
import signal
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import requests

from devstack.harness import free_port, wait_until
from etcd_compute.api import graphs
from etcd_compute.ecompute.history import History

from conftest import Cloud

SMALL = "resources=VCPU:1,MEMORY_MB:128"
SVG = "{http://www.w3.org/2000/svg}"


# -- the pure pieces ------------------------------------------------------------------------------

def test_the_ring_keeps_an_hour_per_instance_and_forgets_the_deleted() -> None:
    h = History(interval=15, window=60)  # 60 s of 15 s samples: 5 kept (both ends included)
    for i in range(7):
        h.add(1000.0 + 15 * i, {"a": {"cpu_seconds": float(i)}, "b": {"cpu_seconds": 0.0}} if i < 2 else
              {"a": {"cpu_seconds": float(i)}})
    got = h.samples("a", now=1090.0)
    assert [s["t"] for s in got] == [1030.0, 1045.0, 1060.0, 1075.0, 1090.0]
    assert got[-1] == {"t": 1090.0, "cpu_seconds": 6.0}
    assert [s["t"] for s in h.samples("a", now=1125.0)] == [1075.0, 1090.0]  # older than the window: not served
    assert h.samples("b", now=1090.0) == []  # stopped long ago: its samples aged out
    assert "b" not in h.uuids()  # ... and so did its ring
    h.forget("a")
    assert h.samples("a", now=1090.0) == [] and h.uuids() == set()
    h.add(2000.0, {"c": {"cpu_seconds": 1.0}})
    h.add(2000.0, {"c": {"cpu_seconds": 1.0}})  # the same reading twice is one sample
    assert len(h.samples("c", now=2000.0)) == 1
    with pytest.raises(ValueError):
        History(interval=0)


def test_rates_from_counters_survive_a_reset_and_gaps() -> None:
    samples: list[dict[str, float]] = [
        {"t": 0, "cpu_seconds": 10, "network_receive_bytes": 0},
        {"t": 10, "cpu_seconds": 15, "network_receive_bytes": 1000},
        {"t": 20, "cpu_seconds": 2},  # the domain restarted: counted from zero again; rx not reported
        {"t": 30, "cpu_seconds": 7, "network_receive_bytes": 3000},
        {"t": 30, "cpu_seconds": 9},  # no time between: no rate
    ]
    assert graphs.rate(samples, "cpu_seconds") == [(10, 0.5), (20, 0.2), (30, 0.5)]
    assert graphs.rate(samples, "network_receive_bytes") == [(10, 100.0), (30, 100.0)]
    assert graphs.rate([], "cpu_seconds") == [] and graphs.rate(samples[:1], "cpu_seconds") == []
    series = graphs.series(samples)
    assert series["cpu_percent"] == [[10, 50.0], [20, 20.0], [30, 50.0]]
    assert all(v >= 0 for line in series.values() for _, v in line)
    assert set(series) == {name for g in graphs.GRAPHS for name, _ in g.lines}


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)  # well-formed XML, as the browser parses inline SVG


def test_a_graph_is_inline_svg_of_its_lines_and_says_when_there_is_nothing() -> None:
    now = 10_000.0
    series = {name: [] for g in graphs.GRAPHS for name, _ in g.lines}
    series["cpu_percent"] = [[now - 3600, 0.0], [now - 1800, 50.0], [now, 100.0]]
    series["network_receive_bytes_per_second"] = [[now - 60, 2048.0], [now, 4096.0]]
    plots = {p["id"]: p for p in graphs.plot(series, now)}
    assert list(plots) == ["cpu", "memory", "network", "disk"]

    cpu = parse(graphs.svg(plots["cpu"]))
    assert cpu.tag == SVG + "svg" and cpu.get("data-graph") == "cpu" and cpu.get("role") == "img"
    line = cpu.find(f"{SVG}polyline")
    assert line is not None
    points = [tuple(map(float, p.split(","))) for p in line.get("points", "").split()]
    (x0, y0), (x1, y1), (x2, y2) = points
    assert x0 == 0 and x2 == graphs.WIDTH and abs(x1 - graphs.WIDTH / 2) < 1e-6  # the hour, left to right
    assert y0 == graphs.HEIGHT and y2 == 0 and y1 == graphs.HEIGHT / 2  # 0 at the bottom, the top value at the top
    assert "100" in plots["cpu"]["top"] and plots["cpu"]["last"] == "100 %"
    assert plots["network"]["last"] == "rx 4.0 KiB/s"

    empty = parse(graphs.svg(plots["disk"]))
    assert plots["disk"]["empty"] and "no data" in "".join(empty.itertext())
    assert all(p.get("points") == "" for p in empty.iter(f"{SVG}polyline"))
    young = graphs.plot({"cpu_percent": [[now - 30, 1.0], [now, 2.0]]}, now)[0]  # a new instance's half minute
    assert (young["lines"][0]["points"], young["span"]) == (f"150,{graphs.HEIGHT / 2:g} 300,0", "60 s")
    assert plots["cpu"]["span"] == "60 min"
    titled = parse(graphs.svg({**plots["memory"], "title": "<script>x</script> & co"}))  # text is escaped
    assert titled.find(f"{SVG}script") is None and "<script>x</script> & co" in "".join(titled.itertext())


# -- a real host and API --------------------------------------------------------------------------

def set_rates(hypervisor: Path, uuid: str, rates: dict[str, float]) -> None:
    """What the fake domain's counters grow by per second (the fake driver reads it at each reading)."""
    path = hypervisor / f"{uuid}.json"
    dom = json.loads(path.read_text())
    dom["rates"] = rates
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dom))
    tmp.replace(path)


def history(address: str, uuid: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{address}/history/{uuid}", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("application/json")
        found: dict[str, Any] = json.loads(resp.read())
        return found


def get(url: str, token: str, path: str) -> requests.Response:
    return requests.get(url + path, headers={"Authorization": f"Bearer {token}"}, timeout=30)


RATES = {"cpu_seconds": 0.5, "network_receive_bytes": 1000.0, "network_transmit_bytes": 500.0,
         "disk_read_bytes": 4096.0, "disk_write_bytes": 2048.0, "memory_rss_bytes": 64 << 20}


def test_a_host_keeps_each_instance_s_history_and_the_api_serves_it_by_project(cloud: Cloud) -> None:
    hypervisor = cloud.files / "host1" / "hypervisor"
    address = f"127.0.0.1:{free_port()}"
    host = cloud.compute("host1", uri=f"fake://{hypervisor}", metrics=address, metrics_interval=1)
    assert cloud.host_record(host.host)["metrics"] == address  # type: ignore[index]  # where the API finds it
    api = cloud.api()
    alpha, beta, admin = cloud.token("alpha"), cloud.token("beta"), cloud.token("ops", admin=True)
    r = requests.post(api.url + "/v1/instances", json={"query": SMALL, "wait": True},
                      headers={"Authorization": f"Bearer {alpha}"}, timeout=90)
    assert r.status_code == 201, r.text
    uuid = r.json()["uuid"]
    set_rates(hypervisor, uuid, RATES)

    # The host samples every second; its counters grow at the rates set; a reboot starts them again.
    wait_until(lambda: len(history(address, uuid)["samples"]) >= 4, 30, "four samples", interval=0.5)
    found = history(address, uuid)
    assert found["interval"] == 1 and found["window"] == 3600
    last = found["samples"][-1]
    assert last["cpu_seconds"] > 0 and last["memory_bytes"] == 128 << 20
    assert history(address, "no-such-instance")["samples"] == []
    r = requests.post(f"{api.url}/v1/instances/{uuid}/action", json={"action": "reboot", "wait": True},
                      headers={"Authorization": f"Bearer {alpha}"}, timeout=90)
    assert r.status_code == 200, r.text

    def after_reset() -> int:
        cpu = [s["cpu_seconds"] for s in history(address, uuid)["samples"]]
        reset = [i for i in range(1, len(cpu)) if cpu[i] < cpu[i - 1]]
        return len(cpu) - reset[0] if reset else 0
    wait_until(lambda: after_reset() >= 3, 30, "three samples after the reboot", interval=0.5)

    # The API: rates, never negative across the reboot; the instance's project and admins only.
    r = get(api.url, alpha, f"/v1/instances/{uuid}/metrics")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["uuid"], body["host"], body["note"], body["interval"]) == (uuid, host.host, None, 1)
    cpu = [v for _, v in body["series"]["cpu_percent"]]
    assert len(cpu) >= 6 and min(cpu) >= 0
    assert sorted(cpu)[len(cpu) // 2] == pytest.approx(50, rel=0.15)  # 0.5 s of CPU a second
    rx = [v for _, v in body["series"]["network_receive_bytes_per_second"]]
    assert sorted(rx)[len(rx) // 2] == pytest.approx(1000, rel=0.15)
    assert body["series"]["memory_bytes"][-1][1] == 128 << 20
    assert get(api.url, beta, f"/v1/instances/{uuid}/metrics").status_code == 404  # another project's
    assert get(api.url, admin, f"/v1/instances/{uuid}/metrics").status_code == 200
    assert get(api.url, alpha, "/v1/instances/no-such/metrics").status_code == 404
    assert get(api.url, "nonsense", f"/v1/instances/{uuid}/metrics").status_code == 401

    # A host that does not answer: empty series and a note, never a 500.
    assert host.proc is not None
    host.proc.send_signal(signal.SIGSTOP)
    try:
        r = get(api.url, alpha, f"/v1/instances/{uuid}/metrics")
    finally:
        host.proc.send_signal(signal.SIGCONT)
    assert r.status_code == 200, r.text
    assert all(line == [] for line in r.json()["series"].values())
    assert "did not answer" in r.json()["note"]
