"""How eschedule prints lists: a table that fits the terminal's 100 columns, or json, yaml, csv and
bare values for scripts (`-f`), of the columns asked for (`-c`), as openstack's client does."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from etcd_compute.errors import UsageError

FORMATS = ("table", "json", "yaml", "csv", "value")
WIDTH = 100  # what a table must fit


@dataclass(frozen=True)
class Column:
    name: str  # what -c takes (lower case) and the table's header (upper case)
    get: Callable[[dict[str, Any]], Any]
    shrinks: bool = False  # may be cut (with "…") to fit the width
    minimum: int = 6


def text(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, dict):
        return ",".join(f"{k}:{v}" for k, v in value.items())
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def age(stamp: str | None, now: datetime | None = None, unknown: str = "-") -> str:
    """'42s', '5m', '3h', '2d' since an ISO time (`unknown` for none)."""
    try:
        seconds = int(((now or datetime.now(UTC)) - datetime.fromisoformat(stamp or "")).total_seconds())
    except (ValueError, TypeError):
        return unknown
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def pick(columns: Sequence[Column], wanted: Sequence[str], default: Sequence[str]) -> list[Column]:
    """The columns named by -c (repeated or comma-separated), else `default`'s."""
    names = [n.strip().lower() for w in wanted for n in w.split(",") if n.strip()] or list(default)
    known = {c.name: c for c in columns}
    for name in names:
        if name not in known:
            raise UsageError(f"no column {name!r:.40}; the columns are {', '.join(known)}")
    return [known[n] for n in names]


def table(rows: list[list[str]], columns: Sequence[Column], width: int = WIDTH) -> str:
    """Rows under upper-case headers, two spaces apart, the widest cuttable column cut until the
    whole fits `width`."""
    widths = [max([len(c.name)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    while sum(widths) + 2 * (len(widths) - 1) > width:
        cuttable = [i for i, c in enumerate(columns) if c.shrinks and widths[i] > max(c.minimum, len(c.name))]
        if not cuttable:
            break
        widest = max(cuttable, key=lambda i: widths[i])
        widths[widest] -= 1

    def cell(value: str, n: int) -> str:
        return value if len(value) <= n else value[:n - 1] + "…"
    lines = [[c.name.upper() for c in columns], *rows]
    return "\n".join("  ".join(cell(v, widths[i]).ljust(widths[i]) for i, v in enumerate(line)).rstrip()
                     for line in lines)


def render(items: list[dict[str, Any]], columns: Sequence[Column], fmt: str, selected: bool) -> str:
    """`items` as `fmt`. json and yaml give whole items unless columns were chosen (`selected`)."""
    if fmt in ("json", "yaml"):
        data: Any = [{c.name: c.get(i) for c in columns} for i in items] if selected else items
        if fmt == "json":
            return json.dumps(data, indent=2, sort_keys=True)
        import yaml
        return str(yaml.safe_dump(data, sort_keys=True, default_flow_style=False)).rstrip("\n")
    rows = [[text(c.get(i)) for c in columns] for i in items]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([c.name for c in columns])
        writer.writerows([["" if v == "-" else v for v in r] for r in rows])
        return out.getvalue().rstrip("\n")
    if fmt == "value":
        return "\n".join(" ".join(r) for r in rows)
    return table(rows, columns)
