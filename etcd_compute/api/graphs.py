"""An instance's last hour as graphs: its host's samples (ecompute's /history/<uuid>, on the
address its host record publishes as `metrics`), rates from its counters, and small inline SVG
drawn here, so that the dashboard needs nobody's script or stylesheet but its own.

A counter that went down was started again (the domain restarted): its increase since is its
value, as Prometheus' rate() counts a reset. CPU is a percentage of one vCPU (200 %: two busy
vCPUs); memory is what the guest has and what its QEMU holds on the host.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from html import escape
from typing import Any
from urllib.parse import quote

from etcd_compute.api.context import Caller
from etcd_compute.contract import View

WIDTH, HEIGHT = 300.0, 80.0  # the SVG's drawing area (viewBox); CSS scales it
WINDOW = 3600.0
TIMEOUT = 2.0  # seconds a host has to answer: a page waits no longer for its graphs

Point = list[float]  # [epoch seconds, value]


@dataclass(frozen=True)
class Graph:
    id: str
    title: str
    unit: str  # "%", "B" or "B/s"
    lines: tuple[tuple[str, str], ...]  # (series, its label)


GRAPHS = (
    Graph("cpu", "CPU", "%", (("cpu_percent", "cpu"),)),
    Graph("memory", "Memory", "B", (("memory_bytes", "guest"), ("memory_rss_bytes", "host RSS"))),
    Graph("network", "Network", "B/s", (("network_receive_bytes_per_second", "rx"),
                                         ("network_transmit_bytes_per_second", "tx"))),
    Graph("disk", "Disk", "B/s", (("disk_read_bytes_per_second", "read"), ("disk_write_bytes_per_second", "write"))),
)
# The API's series: (name, the sampled field, per second (a counter) or as is (a gauge), factor).
SERIES = (("cpu_percent", "cpu_seconds", True, 100.0), ("memory_bytes", "memory_bytes", False, 1.0),
          ("memory_rss_bytes", "memory_rss_bytes", False, 1.0),
          ("network_receive_bytes_per_second", "network_receive_bytes", True, 1.0),
          ("network_transmit_bytes_per_second", "network_transmit_bytes", True, 1.0),
          ("disk_read_bytes_per_second", "disk_read_bytes", True, 1.0),
          ("disk_write_bytes_per_second", "disk_write_bytes", True, 1.0))


class HostSilent(Exception):
    """The host's history could not be had; the message says why, for the page's note."""


def rate(samples: list[dict[str, float]], field: str) -> list[tuple[float, float]]:
    """Per-second increase of counter `field` between consecutive samples that report it, at the
    later one's time; a decrease is a reset (the counter restarted from zero)."""
    found, last = [], None
    for sample in samples:
        if field not in sample:
            continue
        if last is not None and sample["t"] > last["t"]:
            delta = sample[field] - last[field]
            found.append((sample["t"], (delta if delta >= 0 else sample[field]) / (sample["t"] - last["t"])))
        last = sample
    return found


def series(samples: list[dict[str, float]]) -> dict[str, list[Point]]:
    """The API's series of an instance's samples: [[t, value], ...] each, oldest first."""
    found: dict[str, list[Point]] = {}
    for name, field, counter, factor in SERIES:
        points = rate(samples, field) if counter else [(s["t"], s[field]) for s in samples if field in s]
        found[name] = [[t, round(v * factor, 6)] for t, v in points]
    return found


def fetch(address: str, hostname: str, uuid: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The host's {"interval", "window", "samples"} of instance `uuid` from its metrics address
    (HOST:PORT; a wildcard host is reached by the host's hostname)."""
    host, _, port = address.rpartition(":")
    if host.strip("[]") in ("0.0.0.0", "::", ""):
        host = hostname
    url = f"http://{host}:{port}/history/{quote(uuid)}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            found: dict[str, Any] = json.loads(resp.read())
    except (OSError, ValueError) as exc:  # refused, timed out, HTTP error, not JSON
        raise HostSilent(f"its host did not answer at {address}: {getattr(exc, 'reason', exc)}") from exc
    if not isinstance(found.get("samples"), list):
        raise HostSilent(f"its host at {address} answered without samples")
    return found


# -- drawing ----------------------------------------------------------------------------------------

def number(value: float, unit: str) -> str:
    """'25 %', '4.0 KiB/s', '128 MiB': three figures or so, binary prefixes for bytes."""
    prefix = ""
    if unit.startswith("B"):
        for prefix in ("", "Ki", "Mi", "Gi", "Ti"):
            if abs(value) < 1024 or prefix == "Ti":
                break
            value /= 1024
    text = f"{value:.0f}" if abs(value) >= 10 or value == 0 else f"{value:.1f}"
    return f"{text} {prefix}{unit}"


def points(line: list[Point], now: float, window: float, top: float) -> str:
    """A line's points in the viewBox: the window from left to right, 0 to `top` from bottom to top."""
    return " ".join(f"{min(WIDTH, max(0.0, (t - now + window) / window * WIDTH)):g},{HEIGHT - v / top * HEIGHT:g}"
                    for t, v in line)


def plot(found: dict[str, list[Point]], now: float, window: float = WINDOW) -> list[dict[str, Any]]:
    """Each graph ready to draw (the page's template and ui.js alike): its lines' points in the
    viewBox (from left to right the window, or the time since the oldest sample if that is
    shorter; 0 to the largest value from bottom to top), the top value's label, the newest
    values' and the span's."""
    oldest = min((p[0] for line in found.values() for p in line if p[0] >= now - window), default=now - window)
    window = min(window, max(60.0, now - oldest))  # a new instance's minute fills the graph, not 1/60 of it
    span = f"{window / 60:.0f} min" if window >= 90 else f"{window:.0f} s"
    plots = []
    for graph in GRAPHS:
        lines = {name: [p for p in found.get(name, []) if p[0] >= now - window] for name, _ in graph.lines}
        top = max((v for points in lines.values() for _, v in points), default=0.0)
        scale = top if top > 0 else 1.0
        last = [f"{label} {number(lines[name][-1][1], graph.unit)}" if len(graph.lines) > 1
                else number(lines[name][-1][1], graph.unit) for name, label in graph.lines if lines[name]]
        plots.append({"id": graph.id, "title": graph.title, "top": number(top, graph.unit), "span": span,
                      "empty": not any(lines.values()), "last": ", ".join(last),
                      "lines": [{"name": name, "label": label, "points": points(lines[name], now, window, scale)}
                                for name, label in graph.lines]})
    return plots


def svg(graph: dict[str, Any]) -> str:
    """One graph as an inline <svg> (its text escaped). ui.js redraws it by setting each line's
    points and the labels' text."""
    title = escape(str(graph["title"]))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="graph" data-graph="{escape(graph["id"])}" '
             f'viewBox="0 0 {WIDTH:g} {HEIGHT:g}" role="img" '
             f'aria-label="{title}, the last hour">',
             f'<title>{title}</title>',
             f'<line class="axis" x1="0" y1="{HEIGHT:g}" x2="{WIDTH:g}" y2="{HEIGHT:g}"/>']
    for i, line in enumerate(graph["lines"]):
        parts.append(f'<polyline class="line line-{i}" data-line="{escape(line["name"])}" '
                     f'points="{escape(line["points"])}"><title>{escape(line["label"])}</title></polyline>')
    hidden = "" if graph["empty"] else ' visibility="hidden"'
    parts.append(f'<text class="empty" x="{WIDTH / 2:g}" y="{HEIGHT / 2:g}" text-anchor="middle"{hidden}>'
                 'no data</text>')
    parts.append("</svg>")
    return "".join(parts)


# -- one instance's ----------------------------------------------------------------------------------

def instance_history(who: Caller, ref: str, view: View | None = None) -> dict[str, Any]:
    """GET /v1/instances/{uuid}/metrics: the instance's series over the last hour, from its host
    (`view`: the instance as the caller just read it). Another project's instance is
    UnknownInstance (404), as everywhere; a host without metrics, or one that does not answer,
    gives empty series and a note saying why."""
    view = view or who.ops.show(ref)
    uuid, host = view["uuid"] or ref, view["host"]
    record = who.ops.store.host_record(host) if host else None
    address = record.get("metrics") if record else None
    samples: list[dict[str, float]] = []
    interval, note = None, None
    if record is None:
        note = "its host has no record"
    elif not address:
        note = "its host serves no metrics (`metrics` is not set in its compute.yaml)"
    else:
        try:
            found = fetch(address, record["hostname"], uuid)
            samples, interval = found["samples"], found.get("interval")
        except HostSilent as exc:
            note = str(exc)
    return {"uuid": uuid, "host": host, "interval": interval, "window": WINDOW, "note": note,
            "series": series(samples)}
