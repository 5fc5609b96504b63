"""Regenerate the committed reference results: every method of Table 1 on every group and order.

Usage:
    python scripts/run_reference.py [--profile offline] [--groups offline-8 offline-14 offline-20]
                                    [--runs 0..9] [--methods ...] [--out results/reference] [--device auto]

The zoo is built first (cached), then the grid runs cheapest first: for each group and order, the
static methods and MADE-IT, then the methods that train at merge time (AdaMerging, WEMoE, MINGLE,
ODE-M) and continual fine-tuning. Every run is resumable and skipped when its results file exists
for the same configuration, so the command can be killed and started again at any point; partial
grids are honest grids (the tables say how many orders each row has). Progress is logged, and
``results/reference/<profile>/grid_manifest.json`` records what finished and how long it took.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from madeit_core.book import TABLE1_ROWS  # noqa: E402
from madeit_core.io import write_json  # noqa: E402
from madeit_core.protocol import RunSpec, resolve_device, results_path, run_continual  # noqa: E402

CHEAP = ["pretrained", "individual", "swa", "task_arithmetic", "ties", "opcm", "made_it"]
log = logging.getLogger("run_reference")


def parse_runs(text: str) -> list[int]:
    if ".." in text:
        lo, hi = text.split("..")
        return list(range(int(lo), int(hi) + 1))
    return [int(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="offline")
    ap.add_argument("--groups", nargs="+", default=["offline-8", "offline-14", "offline-20"])
    ap.add_argument("--runs", type=parse_runs, default=list(range(10)))
    ap.add_argument("--methods", nargs="+", default=[m for _, m, _ in TABLE1_ROWS])
    ap.add_argument("--benchmark", default="zoo")
    ap.add_argument("--out", default=str(ROOT / "results" / "reference"))
    ap.add_argument("--device", default="auto")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from madeit_core.benchmarks import make_benchmark

    device = resolve_device(a.device)
    cheap = [m for m in a.methods if m in CHEAP]
    costly = [m for m in a.methods if m not in CHEAP]
    manifest_path = Path(a.out) / a.profile / "grid_manifest.json"
    done: list[dict] = []
    t_all = time.perf_counter()
    for methods in (cheap, costly):
        for g in a.groups:
            bench, tasks = make_benchmark(a.benchmark, g, profile=a.profile, device=device)
            for r in a.runs:
                for m in methods:
                    spec = RunSpec(method=m, group=g, run=r, profile=a.profile, tasks=tasks)
                    t0 = time.perf_counter()
                    res = run_continual(spec, bench, a.out, device=device)
                    done.append({"method": m, "group": g, "run": r, "ACC": res["ACC"], "BWT": res["BWT"],
                                 "file": str(results_path(a.out, spec).relative_to(a.out)),
                                 "seconds_this_process": round(time.perf_counter() - t0, 1)})
                    log.info("%s %s run %d: ACC %.2f BWT %.2f", m, g, r, res["ACC"], res["BWT"])
                    write_json(manifest_path, {"profile": a.profile, "benchmark": a.benchmark, "device": device,
                                               "groups": a.groups, "runs": a.runs, "methods": a.methods,
                                               "finished": done,
                                               "wall_s_this_process": round(time.perf_counter() - t_all, 1)})
    print(f"reference grid complete: {len(done)} runs, {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
