"""Run the benchmarks and print one table plus JSON (also written to bench/results.json).

    python3 -m devstack bench            # all, with their default sizes
    python3 -m devstack bench boot       # only some: cli, scheduling, scale, agents, boot, api, recovery, storage
    ... bench --quick                                   # smaller sizes, for a smoke run
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

BENCHES = ["cli", "scheduling", "scale", "agents", "boot", "api", "recovery", "storage"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"which benchmarks (default: all of {', '.join(BENCHES)})")
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    args = ap.parse_args()
    unknown = set(args.names) - set(BENCHES)
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}; choose from {', '.join(BENCHES)}")
    info = common.stack()
    figures: list[common.Figure] = []
    for name in args.names or BENCHES:
        t0 = time.monotonic()
        print(f"== {name}", flush=True)
        try:
            figures += importlib.import_module(name).run(info, quick=args.quick)
        except Exception as exc:  # noqa: BLE001 - any failure is recorded as a figure; the other benchmarks run on
            print(f"   {name} failed: {exc!r}", flush=True)
            figures.append(common.figure(name, "FAILED: " + repr(exc)[:80], 0, "-"))
        print(f"   ({time.monotonic() - t0:.0f}s)", flush=True)
    print()
    print(common.table(figures))
    print()
    print(common.goals(figures))
    out = Path(__file__).resolve().parent / "results.json"
    text = common.to_json(common.merged(out, figures))
    print(text)
    out.write_text(text + "\n")
    print(f"\n{platform.node()}, {time.strftime('%Y-%m-%d %H:%M')}: written to {out} "
          f"(the benchmarks not run keep their earlier figures)")
    return 0  # targets are reported (column ok), not enforced: these machines are noisy


if __name__ == "__main__":
    sys.exit(main())
