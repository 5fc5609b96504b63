"""Verdicts on the paper's claims, computed from our results (the book states them, never types them).

Each function returns ``{"verdict": "reproduced" | "partly" | "not reproduced", "evidence": str,
...numbers}``. The rules are stated in each docstring so a reader can check them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

REPRODUCED, PARTLY, NOT = "reproduced", "partly", "not reproduced"


def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    if len(set(rx)) < 2 or len(set(ry)) < 2:
        return 0.0
    return statistics.correlation(rx, ry)


def _acc_by_order(runs: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], dict[Any, float]]:
    """(label, group) → order seed → ACC, from per-run results (label as in ``summary_rows``)."""
    out: dict[tuple[str, str], dict[Any, float]] = {}
    for r in runs:
        out.setdefault((r.get("label") or r["method"], r["group"]), {})[r["seed"]] = r["ACC"]
    return out


def beats_rivals(rows: Sequence[Mapping[str, Any]], ours: str = "MADE-IT",
                 rivals: Sequence[str] | None = None,
                 runs: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Claim: MADE-IT has the best ACC of all merging methods, in every group.

    Rule: per group, MADE-IT's mean ACC is compared with each rival's. Reproduced when it is the
    best in every group; partly when it is the best in some group or beats most rivals overall;
    not reproduced otherwise. Reference rows (pre-trained, individual fine-tuned) are excluded by
    passing ``rivals``; a named rival with no result in a group is listed in that group's
    evidence (``missing``), so a verdict over a partial grid says which comparisons it lacks.

    With ``runs`` (the per-order results behind ``rows``), each comparison is *paired*: both means
    are taken over the orders both methods ran, so a rival with fewer finished orders is compared
    with MADE-IT on those orders only (their number is in the evidence), never with MADE-IT's mean
    over orders the rival has not seen. A rival with no order in common counts as missing. Without
    ``runs``, the row means are compared as they are (the rule as first written; it assumed
    complete grids). With two or more common orders, the evidence also gives the paired difference
    to the closest rival with two standard errors: context for the verdict, which it does not change.
    """
    per = _acc_by_order(runs) if runs is not None else None
    groups = sorted({r["group"] for r in rows})
    wins, comparisons, best_in = 0, 0, []
    detail = {}
    for g in groups:
        in_g = {r["method"]: r for r in rows if r["group"] == g}
        if ours not in in_g:
            continue
        named = [m for m in in_g if m != ours and (rivals is None or m in rivals)]
        paired: dict[str, dict[str, Any]] = {}   # rival → MADE-IT's and its mean ACC, over `orders` common orders
        for m in named:
            if per is None:
                paired[m] = {"ours": in_g[ours]["ACC"], "rival": in_g[m]["ACC"], "orders": None}
                continue
            a, b = per.get((ours, g), {}), per.get((m, g), {})
            common = set(a) & set(b)
            if common:
                d = [a[s] - b[s] for s in sorted(common, key=str)]
                paired[m] = {"ours": statistics.fmean(a[s] for s in common),
                             "rival": statistics.fmean(b[s] for s in common), "orders": len(common),
                             "diff_se": statistics.stdev(d) / math.sqrt(len(d)) if len(d) >= 2 else None}
        beaten = [m for m, p in paired.items() if p["ours"] > p["rival"]]
        wins += len(beaten)
        comparisons += len(paired)
        if paired and len(beaten) == len(paired):
            best_in.append(g)
        best_rival = min(paired, key=lambda m: paired[m]["ours"] - paired[m]["rival"]) if paired else None
        closest = paired.get(best_rival, {})
        detail[g] = {"ours": in_g[ours]["ACC"], "best_rival": best_rival,
                     "best_rival_acc": closest.get("rival"), "ours_on_common": closest.get("ours"),
                     "common_orders": closest.get("orders"), "diff_se": closest.get("diff_se"),
                     "orders": len(per.get((ours, g), {})) if per is not None else None,
                     "beaten": len(beaten), "rivals": len(paired), "paired": paired,
                     "missing": [m for m in (rivals or named) if m != ours and m not in paired]}
    if comparisons == 0:
        return {"verdict": NOT, "evidence": "no comparable results", "groups": detail}
    if len(best_in) == len(detail):
        verdict = REPRODUCED
    elif best_in or wins > comparisons / 2:
        verdict = PARTLY
    else:
        verdict = NOT

    def closest(d: Mapping[str, Any]) -> str:
        text = f"{d['ours']:.1f} vs best rival {d['best_rival']} {d['best_rival_acc']:.1f}"
        if d["common_orders"] is not None and d["common_orders"] != d["orders"]:
            text += (f" on the {d['common_orders']} order{'s' if d['common_orders'] != 1 else ''} it ran"
                     f" (MADE-IT {d['ours_on_common']:.1f} on those)")
        if d.get("diff_se") is not None:
            text += (f", paired difference {d['ours_on_common'] - d['best_rival_acc']:+.1f} ± "
                     f"{2 * d['diff_se']:.1f} (two standard errors)")
        return text

    parts = [f"{g}: {closest(d)} (beats {d['beaten']}/{d['rivals']}"
             + (f"; no results for {', '.join(d['missing'])}" if d["missing"] else "") + ")"
             for g, d in detail.items() if d["best_rival"] is not None]
    return {"verdict": verdict, "evidence": "; ".join(parts), "groups": detail, "wins": wins,
            "comparisons": comparisons}


def generic_to_specific(by_depth: Mapping[int, Mapping[str, float]],
                        by_group: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, Any]:
    """Claim: early layers share experts, deep layers specialise (experts kept grow with depth).

    Rule: Spearman correlation ρ_s between depth and mean experts kept. Reproduced when
    ρ_s ≥ 0.5, partly when 0 < ρ_s < 0.5, not reproduced when ρ_s ≤ 0.
    """
    depths = [d for d in by_depth if d >= 0]
    if len(depths) < 2:
        return {"verdict": NOT, "evidence": "fewer than two depths", "spearman": None}
    rho = _spearman(depths, [by_depth[d]["experts_mean"] for d in depths])
    verdict = REPRODUCED if rho >= 0.5 else PARTLY if rho > 0 else NOT
    first, last = by_depth[min(depths)]["experts_mean"], by_depth[max(depths)]["experts_mean"]
    ev = f"Spearman(depth, experts kept) = {rho:.2f}; shallowest block {first:.2f}, deepest {last:.2f} experts/module"
    if by_group:
        ev += "; by type: " + ", ".join(f"{k} {v['experts_mean']:.2f}" for k, v in by_group.items())
    return {"verdict": verdict, "evidence": ev, "spearman": rho}


def affinity_wider_than_cosine(affinity: Sequence[float], cosine: Sequence[float]) -> dict[str, Any]:
    """Claim: subspace affinity spreads widely while cosine similarity clusters near zero.

    Rule: compare the interquartile ranges and the share of scores within ±0.05 of zero.
    Reproduced when affinity's IQR is at least twice cosine's and most cosine scores (> 50 %)
    are within ±0.05 of 0; partly when only one holds; not reproduced otherwise.
    """
    def iqr(v: Sequence[float]) -> float:
        q = statistics.quantiles(v, n=4)
        return q[2] - q[0]

    ia, ic = iqr(affinity), iqr(cosine)
    near_zero = sum(abs(c) <= 0.05 for c in cosine) / len(cosine)
    a, b = ia >= 2 * ic, near_zero > 0.5
    verdict = REPRODUCED if a and b else PARTLY if a or b else NOT
    return {"verdict": verdict, "iqr_affinity": ia, "iqr_cosine": ic, "cosine_near_zero": near_zero,
            "evidence": f"IQR affinity {ia:.3f} vs cosine {ic:.3f}; {100 * near_zero:.0f}% of cosine scores in ±0.05"}


def plateau(values: Sequence[float], acc: Sequence[float], tolerance: float = 1.0,
            by_order: Sequence[Mapping[Any, float]] | None = None) -> dict[str, Any]:
    """Claim: ACC plateaus over a range of the hyper-parameter (paper Fig. 6).

    Rule: the plateau is the longest run of consecutive values whose ACC is within ``tolerance``
    points of the best. Reproduced when it spans at least three values; partly with two; not
    reproduced with one.

    ``by_order`` (per value, order seed → ACC) adds context that does not change the verdict: the
    values whose ACC differs from the best value's by at most two standard errors of the paired
    difference over their common orders (``within_noise``). With ten orders whose ACC spreads by
    several points, a one-point window can be narrower than what the orders can tell apart.
    """
    best = max(acc)
    runs, cur = [], []
    for v, a in zip(values, acc):
        if a >= best - tolerance:
            cur.append(v)
        else:
            if cur:
                runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    longest = max(runs, key=len)
    verdict = REPRODUCED if len(longest) >= 3 else PARTLY if len(longest) == 2 else NOT
    out = {"verdict": verdict, "plateau": longest, "best": best,
           "evidence": f"within {tolerance} points of the best ACC ({best:.1f}) for values {longest}"}
    if by_order is not None:
        if len(by_order) != len(values):
            raise ValueError(f"by_order has {len(by_order)} entries for {len(values)} values")
        top = by_order[list(acc).index(best)]
        near = []
        for v, orders in zip(values, by_order):
            common = sorted(set(orders) & set(top), key=str)
            if len(common) < 2:
                continue
            d = [orders[k] - top[k] for k in common]      # all zero for the best value itself
            if abs(statistics.fmean(d)) <= 2 * statistics.stdev(d) / math.sqrt(len(d)):
                near.append(v)
        out["within_noise"] = near
        out["evidence"] += (f"; paired over the orders, {len(near)} of {len(values)} values are within two "
                            f"standard errors of the best: {near}")
    return out


def combine(verdicts: Sequence[Mapping[str, Any]], labels: Sequence[str] | None = None) -> dict[str, Any]:
    """One verdict from several parts of one claim (e.g. the ρ and the λ sweeps of Fig. 6).

    Rule: reproduced when every part is reproduced; not reproduced when every part is not;
    partly otherwise. The evidence lists each part's verdict and evidence.
    """
    if not verdicts:
        return {"verdict": NOT, "evidence": "no evidence", "parts": []}
    names = list(labels) if labels is not None else [str(i + 1) for i in range(len(verdicts))]
    if len(names) != len(verdicts):
        raise ValueError(f"{len(names)} labels for {len(verdicts)} verdicts")
    vs = [v["verdict"] for v in verdicts]
    verdict = REPRODUCED if all(v == REPRODUCED for v in vs) else NOT if all(v == NOT for v in vs) else PARTLY
    ev = "; ".join(f"{n}: {v['verdict']} ({v['evidence']})" for n, v in zip(names, verdicts))
    return {"verdict": verdict, "evidence": ev, "parts": list(verdicts)}
