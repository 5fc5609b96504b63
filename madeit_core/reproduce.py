"""Grids of protocol runs and the tables built from their results files (Tables 1, 2, 4–6).

Notebooks call these functions; they hold no logic of their own. A grid skips runs whose results
file exists for the same configuration, and resumes interrupted ones (see :mod:`madeit_core.protocol`).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from madeit_core.benchmark import Benchmark
from madeit_core.errors import MergeInputError
from madeit_core.protocol import RunSpec, run_continual

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MethodRun:
    """A row of a table: a method with hyper-parameters under a display label."""

    label: str
    method: str
    hparams: Mapping[str, Any] = field(default_factory=dict)

    @property
    def tag(self) -> str | None:
        return self.hparams.get("tag") if isinstance(self.hparams.get("tag"), str) else None


def method_runs(spec: Sequence[str | MethodRun | tuple[str, str, Mapping[str, Any]]]) -> list[MethodRun]:
    out = []
    for s in spec:
        if isinstance(s, MethodRun):
            out.append(s)
        elif isinstance(s, str):
            out.append(MethodRun(s, s, {}))
        else:
            out.append(MethodRun(s[0], s[1], dict(s[2])))
    return out


def run_grid(bench: Benchmark, group: str, tasks: Sequence[str], methods: Sequence[Any], runs: Iterable[int],
             out_dir: str | os.PathLike[str], profile: str, device: str = "cpu", eval_seen: bool = False,
             show_progress: bool = True) -> list[dict[str, Any]]:
    """Run every method on every order of one group; returns the results dicts (label added)."""
    results = []
    for mr in method_runs(methods):
        for r in runs:
            spec = RunSpec(method=mr.method, group=group, run=r, profile=profile, hparams=dict(mr.hparams),
                           tasks=list(tasks), eval_seen=eval_seen)
            res = run_continual(spec, bench, out_dir, device=device, show_progress=show_progress)
            res = dict(res)
            res["label"] = mr.label
            results.append(res)
            log.info("%s %s seed %d: ACC %.2f BWT %.2f", mr.label, group, spec.seed, res["ACC"], res["BWT"])
    return results


def load_results(root: str | os.PathLike[str], profile: str | None = None, group: str | None = None
                 ) -> list[dict[str, Any]]:
    """Every finished results file under ``root`` (optionally one profile / group)."""
    base = Path(root)
    pattern = f"{profile or '*'}/{group or '*'}/*/seed*.json"
    out = []
    for f in sorted(base.glob(pattern)):
        if f.name.endswith(".partial.json"):
            continue
        with open(f, encoding="utf-8") as fh:
            out.append(json.load(fh))
    return out


def _mean_std(v: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def summary_rows(results: Sequence[Mapping[str, Any]], label_key: str = "label") -> list[dict[str, Any]]:
    """One row per (label, group): ACC and BWT mean ± sample std over orders (baselines.md §9.4)."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in results:
        label = r.get(label_key) or r["method"]
        groups.setdefault((label, r["group"]), []).append(r)
    rows = []
    for (label, group), rs in groups.items():
        acc_m, acc_s = _mean_std([r["ACC"] for r in rs])
        bwt_m, bwt_s = _mean_std([r["BWT"] for r in rs])
        routing = [statistics.fmean(r["routing_accuracy_final"].values()) for r in rs
                   if r.get("routing_accuracy_final")]
        rows.append({"method": label, "group": group, "T": len(rs[0]["order"]), "runs": len(rs),
                     "ACC": acc_m, "ACC_std": acc_s, "BWT": bwt_m, "BWT_std": bwt_s,
                     "routing_accuracy": statistics.fmean(routing) * 100 if routing else None,
                     "absorb_s": statistics.fmean(r["timings"]["absorb_s"] for r in rs),
                     "needs_data": rs[0].get("needs_data")})
    return rows


def per_task_means(results: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """label → task → mean final accuracy (%) over orders (Tables 4–6)."""
    acc: dict[str, dict[str, list[float]]] = {}
    for r in results:
        label = r.get("label") or r["method"]
        for t, a in zip(r["order"], r["a_Ti"]):
            acc.setdefault(label, {}).setdefault(t, []).append(100 * a)
    return {m: {t: statistics.fmean(v) for t, v in d.items()} for m, d in acc.items()}


def fmt(mean: float, std: float | None = None, digits: int = 1) -> str:
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f}±{std:.{digits}f}"


def routing_by_step(results: Sequence[Mapping[str, Any]]) -> list[float | None]:
    """Routing accuracy (%) of the newest task right after it arrived, per step, mean over orders.

    Step i's value averages ``steps[i]["routing_accuracy"][task]`` of the runs that recorded it
    (methods without routing record none: the step's value is None).
    """
    T = max((len(r["steps"]) for r in results), default=0)
    out: list[float | None] = []
    for i in range(T):
        vals = [100 * r["steps"][i]["routing_accuracy"][r["steps"][i]["task"]] for r in results
                if i < len(r["steps"]) and (r["steps"][i].get("routing_accuracy") or {}).get(r["steps"][i]["task"])
                is not None]
        out.append(statistics.fmean(vals) if vals else None)
    return out


def routing_vs_acc(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per run (order): the final routing accuracy (%, mean over tasks) and ACC (%), and their
    Pearson correlation over the runs (None with fewer than 3 runs or no spread).

    Returns ``{"points": [(routing, ACC, seed), ...], "r": float | None}``; runs without a
    recorded routing accuracy are left out."""
    pts = []
    for r in results:
        final = {t: v for t, v in (r.get("routing_accuracy_final") or {}).items() if v is not None}
        if final:
            pts.append((100 * statistics.fmean(final.values()), float(r["ACC"]), r.get("seed")))
    corr = None
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if len(pts) >= 3 and len(set(xs)) > 1 and len(set(ys)) > 1:
        corr = statistics.correlation(xs, ys)
    return {"points": pts, "r": corr}


def routing_per_task(results: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """task → routing accuracy (%) of the final model, mean over the orders that recorded it."""
    acc: dict[str, list[float]] = {}
    for r in results:
        for t, v in (r.get("routing_accuracy_final") or {}).items():
            if v is not None:
                acc.setdefault(t, []).append(100 * v)
    return {t: statistics.fmean(v) for t, v in acc.items()}


def run_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """How results file ``b`` differs from ``a``, two runs of one method on one group and order
    (e.g. the same maths in two memory layouts): ACC, BWT and each task's final accuracy as
    ``(a, b, b − a)`` in points, the largest per-task change, how many tasks changed, the
    hyper-parameters that differ (``{name: (a's, b's)}``, None where one run lacks it) and the
    recorded merge times ``(a, b, b / a)`` in seconds (None unless both runs recorded one)."""
    for k in ("method", "group", "order"):
        if a.get(k) != b.get(k):
            raise MergeInputError(f"run_difference: the two runs differ in {k!r} ({a.get(k)!r} against "
                                  f"{b.get(k)!r}); compare runs of one method, group and order")
    final = [(t, 100 * x, 100 * y, 100 * (y - x)) for t, x, y in zip(a["order"], a["a_Ti"], b["a_Ti"])]
    ha, hb = a.get("hparams") or {}, b.get("hparams") or {}
    ta, tb = ((r.get("timings") or {}).get("absorb_s") for r in (a, b))
    return {"ACC": (a["ACC"], b["ACC"], b["ACC"] - a["ACC"]),
            "BWT": (a["BWT"], b["BWT"], b["BWT"] - a["BWT"]),
            "final": final,
            "max_abs_final": max(abs(d) for *_, d in final),
            "tasks_changed": sum(1 for *_, d in final if d != 0),
            "hparams": {k: (ha.get(k), hb.get(k)) for k in sorted({*ha, *hb}) if ha.get(k) != hb.get(k)},
            "absorb_s": (ta, tb, tb / ta) if ta and tb else None}
