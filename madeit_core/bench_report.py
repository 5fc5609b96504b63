"""Tables and figures of a ``madeit bench`` results file, for the book's performance chapter.

    res = load_bench("results/perf/cpu.json")
    t = tables(res)            # name -> list of flat dict rows (feed to pandas or plots.table_markdown)
    figs = figures(res)        # name -> matplotlib Figure

Nothing here measures or computes a figure of its own: every number is read from the file
(ratios included, as the benchmark wrote them; the one exception is the per-case speed-up of a
columnar case table, the quotient of the two times it records: see :func:`case_columns`).
Sections a run did not produce give empty tables and no figure.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from madeit_core.errors import MergeInputError  # noqa: E402

FORMAT = "madeit-bench/1"
#: absorb phases, in the order the breakdown bars stack them
PHASES = ("io_load", "validate", "delta", "svd", "linalg", "affinity", "merge", "others", "io_state", "other")


def load_bench(path: str | os.PathLike[str], require_complete: bool = True) -> dict[str, Any]:
    """Read a results file, checking that it is one (format, sections, manifest)."""
    p = Path(path)
    try:
        res = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MergeInputError(f"{p}: cannot read a benchmark results file: {exc}") from exc
    if not isinstance(res, dict) or res.get("format") != FORMAT:
        got = res.get("format") if isinstance(res, dict) else type(res).__name__
        raise MergeInputError(f"{p}: not a madeit bench results file (format {got!r}, expected {FORMAT!r})")
    for key in ("manifest", "sections", "targets", "bounds"):
        if key not in res:
            raise MergeInputError(f"{p}: results file lacks its {key!r} entry")
    if require_complete and not res["manifest"].get("complete"):
        raise MergeInputError(f"{p}: the run did not finish (manifest.complete is false); re-run the same "
                              "command to resume it, or pass require_complete=False")
    return res


# ============================================================================ tables
def tables(res: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Every table of the chapter, as lists of flat rows."""
    return {"machine": _machine(res), "absorb": _absorb(res), "absorb_bounds": _absorb_bounds(res),
            "routed": _routed(res), "memory": _memory(res), "scaling": _scaling(res), "svd": _svd(res),
            "targets": _targets(res), "skipped": [dict(x) for x in res.get("skipped", [])]}


def _machine(res: Mapping[str, Any]) -> list[dict[str, Any]]:
    m = res["manifest"]
    hw, v = m.get("hardware", {}), m.get("versions", {})
    b = res.get("bounds", {})
    return [{"device": m.get("device"), "cpu": hw.get("cpu_model"), "cpu_count": hw.get("cpu_count"),
             "torch_threads": hw.get("torch_threads"), "gpu": hw.get("cuda"),
             "torch": v.get("torch"), "git_commit": m.get("git_commit"),
             "peak_gflops": b.get("peak_flops", {}).get("gflops"), "bandwidth_gbs": b.get("bandwidth", {}).get("gbs"),
             "load_average_at_start": (hw.get("load_average_at_start") or [None])[0],
             "load_average_at_end": (m.get("load_average_now") or [None])[0],
             "wall_s": m.get("wall_s_total"), "note": m.get("note")}]


def _absorb(res: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for shape, sec in res["sections"].get("absorb", {}).items():
        opcm = sec["methods"].get("opcm", {}).get("per_model", {}).get("absorb_s")
        for method, r in sec["methods"].items():
            if "per_model" not in r:
                rows.append({"shape": shape, "method": method, "skipped": r.get("skipped")})
                continue
            pm = r["per_model"]
            br = pm["breakdown_s"]
            rows.append({"shape": shape, "method": method, "absorb_s": pm["absorb_s"], "total_s": pm["total_s"],
                         "vs_opcm": pm["absorb_s"] / opcm if opcm else None,
                         **{f"{p}_s": br[p] for p in PHASES if p in br},
                         "svd_ratio_to_bound": pm.get("svd_ratio_to_bound"),
                         "io_load_ratio_to_bound": pm.get("io_load_ratio_to_bound"),
                         "state_bytes": pm.get("state_bytes"), "over": pm.get("over")})
    return rows


def _absorb_bounds(res: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"shape": shape, "parameters": sec.get("parameters"), "modules": sec.get("modules"),
             "checkpoint_bytes": sec.get("checkpoint_bytes"),
             **{k: v for k, v in sec.get("bounds", {}).items() if k.endswith("_bound_s")}}
            for shape, sec in res["sections"].get("absorb", {}).items()]


def _routed(res: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for shape, sec in res["sections"].get("routed", {}).items():
        for b in sec["batches"].values():
            rows.append({"shape": shape, "batch": b["batch"],
                         "static_latency_s": b["static"]["latency_s"],
                         "static_throughput_per_s": b["static"]["throughput_per_s"],
                         "static_ratio_to_flop_bound": b["static"]["ratio_to_bound"],
                         "routed_latency_s": b["routed"]["latency_s"],
                         "routed_throughput_per_s": b["routed"]["throughput_per_s"],
                         "throughput_ratio": b["throughput_ratio"], "bound": b["bound"],
                         "ratio_to_bound": b["ratio_to_bound"], "path_groups": b["routed"]["path_groups"],
                         "modules_dense": b["routed"].get("modules_dense"),
                         "grouped_by_path_ratio": b.get("path_grouping_ratio"),
                         "one_path_ratio": b.get("one_path_ratio"),
                         **{f"{k}_s": v for k, v in b["routed"].get("breakdown_s", {}).items()}})
    return rows


def memory_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Memory rows grouped by (variant, T): the number of banks and the mean / min / max of the
    bank's parameters and of its ratios to MINGLE and to T full models."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r.get("variant", "default"), r["T"]), []).append(r)
    out = []
    for (variant, T), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "default", kv[0][0], kv[0][1])):
        row: dict[str, Any] = {"variant": variant, "T": T, "banks": len(rs),
                               "mingle_parameters": rs[0]["mingle_parameters"]["experts_and_gates"],
                               "full_models_parameters": rs[0]["full_models_parameters"]}
        for key in ("made_it_bank_parameters", "made_it_expert_parameters", "made_it_bank_bytes",
                    "made_it_experts_total", "ratio_bank_total_to_mingle",
                    "ratio_experts_to_mingle", "ratio_bank_total_to_full_models"):
            vals = [r[key] for r in rs]
            row[f"{key}_mean"], row[f"{key}_min"], row[f"{key}_max"] = statistics.fmean(vals), min(vals), max(vals)
        out.append(row)
    return out


def _memory(res: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (unit, T): a synthetic bank's own row, or, for real banks (``--banks``), the
    mean over the banks of MADE-IT's default configuration (``summary``; the ablation variants'
    banks stay in the file) with their number and the largest ratio to MINGLE."""
    rows = []
    for unit, sec in res["sections"].get("memory", {}).items():
        summary = sec.get("summary")
        if summary is None and str(sec.get("source", "")).startswith("banks"):
            # files written before banks were labelled: every bank counts, whatever its configuration
            summary = memory_summary([{**r, "variant": "default"} for r in sec.get("rows", [])])
            for r in summary:
                r["variant_note"] = "all banks below --banks (this file predates configuration labels)"
        if summary:
            for r in summary:
                if r["variant"] != "default":
                    continue
                rows.append({"unit": unit, "source": sec.get("source"), "T": r["T"], "banks": r["banks"],
                             "made_it_bank_parameters": r["made_it_bank_parameters_mean"],
                             "made_it_expert_parameters": r["made_it_expert_parameters_mean"],
                             "made_it_bank_bytes": r["made_it_bank_bytes_mean"],
                             "made_it_experts_total": r["made_it_experts_total_mean"],
                             "mingle_parameters": r["mingle_parameters"],
                             "full_models_parameters": r["full_models_parameters"],
                             "ratio_to_mingle": r["ratio_bank_total_to_mingle_mean"],
                             "ratio_to_mingle_max": r["ratio_bank_total_to_mingle_max"],
                             "ratio_experts_to_mingle": r["ratio_experts_to_mingle_mean"],
                             "ratio_to_full_models": r["ratio_bank_total_to_full_models_mean"],
                             "note": r.get("variant_note")})
            continue
        for r in sec.get("rows", []):
            rows.append({"unit": unit, "source": sec.get("source"), "T": r["T"],
                         "made_it_bank_parameters": r["made_it_bank_parameters"],
                         "made_it_expert_parameters": r["made_it_expert_parameters"],
                         "made_it_bank_bytes": r["made_it_bank_bytes"],
                         "made_it_experts_total": r["made_it_experts_total"],
                         "mingle_parameters": r["mingle_parameters"]["experts_and_gates"],
                         "full_models_parameters": r["full_models_parameters"],
                         "ratio_to_mingle": r["ratio_bank_total_to_mingle"],
                         "ratio_experts_to_mingle": r["ratio_experts_to_mingle"],
                         "ratio_to_full_models": r["ratio_bank_total_to_full_models"]})
    return rows


def _scaling(res: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for unit, sec in res["sections"].get("scaling", {}).items():
        for r in sec.get("rows", []):
            rows.append({"unit": unit, "T": r["T"], "absorb_s": r["absorb_s"],
                         "svd_s": r["breakdown_s"].get("svd"), "affinity_s": r["breakdown_s"].get("affinity"),
                         "experts_total": r["experts_total"], "made_it_parameters": r["expert_parameters"],
                         "mingle_parameters": r.get("mingle_expert_parameters"),
                         "full_models_parameters": r.get("full_models_parameters")})
    return rows


def _svd(res: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for unit, sec in res["sections"].get("svd", {}).items():
        summ = sec.get("summary", {})
        for variant, v in summ.items():
            if not isinstance(v, dict):
                continue
            rows.append({"unit": unit, "variant": variant, "cases": summ.get("cases"),
                         "min_affinity": v["min_affinity"], "median_affinity": v["median_affinity"],
                         "min_affinity_stable_cases": v.get("min_affinity_stable_cases"),
                         "median_speedup_vs_exact": v.get("median_speedup_vs_exact"),
                         "unstable_cases": summ.get("cases_with_unstable_exact_top_k")})
    return rows


def _targets(res: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"name": name, "target": t.get("target"), "threshold": t.get("threshold"), "value": t.get("value"),
             "pass": t.get("pass"), "note": t.get("note") or t.get("source")}
            for name, t in res.get("targets", {}).items()]


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "PASS" if v else "FAIL"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


#: Pixels of table the book's content column shows without a horizontal scroll bar (it is about
#: 690 px wide at a 1280-px window; the estimate below errs by a few per cent, hence the margin).
PAGE_PX = 665
#: Mean advance of a table character, and the padding of a cell, in the book's theme (measured on
#: its screenshots: a 41-character name took 332 px, its column 360 px).
CHAR_PX, PAD_PX = 8.1, 26
#: Width, in characters, to which a cell or header with spaces may wrap.
WRAP_CHARS = 20


def _text_width(text: str) -> int:
    """Characters ``text`` takes across in a comfortably narrow column: a line breaks at spaces,
    after hyphens and at the book's soft breaks (:data:`madeit_core.nbsupport.SOFT_BREAK`),
    and such text wraps to :data:`WRAP_CHARS` or its longest unbreakable piece."""
    from madeit_core.nbsupport import SOFT_BREAK

    marked = SOFT_BREAK.sub("\\1\\n", re.sub(r"(?<=\S-)(?=\S)", "\n", text.strip()))
    pieces = [x for x in re.split(r"\s+", marked) if x]
    if len(pieces) <= 1:
        return len(text.strip())
    return max(max(len(x) for x in pieces), min(len(text.strip()), WRAP_CHARS))


def key_columns(rows: list[dict[str, Any]], cols: list[str], most: int = 3) -> list[str]:
    """The fewest leading columns (at most ``most``) whose values tell the rows apart: what each
    part of a split table repeats so that its rows can be read on their own."""
    for k in range(1, min(most, len(cols)) + 1):
        if len({tuple(_fmt(r.get(c)) for c in cols[:k]) for r in rows}) == len(rows):
            return cols[:k]
    return cols[:min(most, len(cols))]


def column_width_px(rows: list[dict[str, Any]], c: str) -> float:
    """Estimated width of column ``c`` at its narrowest (words unbroken), padding included."""
    return max(_text_width(c), *(_text_width(_fmt(r.get(c))) for r in rows)) * CHAR_PX + PAD_PX


def column_groups(rows: list[dict[str, Any]], cols: list[str], width: float = PAGE_PX) -> list[list[str]]:
    """``cols`` cut into tables no wider than ``width`` pixels (:func:`column_width_px`), each
    beginning with :func:`key_columns`; one group when everything fits."""
    width_of = {c: column_width_px(rows, c) for c in cols}      # each column measured once
    if sum(width_of.values()) <= width:
        return [list(cols)]
    keys = key_columns(rows, cols)
    base, rest = sum(width_of[c] for c in keys), cols[len(keys):]
    ws = [width_of[c] for c in rest]
    count, used = 0, width                 # the fewest tables: fill each in turn
    for wc in ws:
        if count and base + used + wc <= width:
            used += wc
        else:
            count, used = count + 1, wc
    # then the same number of tables, as even as possible: the cut that makes the widest narrowest
    best: dict[tuple[int, int], tuple[float, list[int]]] = {}

    def split(i: int, k: int) -> tuple[float, list[int]]:
        """(widest part, cut points) of rest[i:] in k contiguous parts."""
        if k == 1:
            return sum(ws[i:]), []
        if (i, k) not in best:
            options = []
            for j in range(i + 1, len(ws) - k + 2):
                widest, cuts = split(j, k - 1)
                options.append((max(sum(ws[i:j]), widest), [j, *cuts]))
            best[(i, k)] = min(options, key=lambda x: x[0])
        return best[(i, k)]

    cuts = [0, *split(0, count)[1], len(rest)]
    return [keys + rest[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


def markdown(rows: list[dict[str, Any]], columns: list[str] | None = None, width: float | None = PAGE_PX) -> str:
    """A markdown table of ``rows`` (floats to 3 significant digits, None as –, booleans as PASS/FAIL).

    Wider than ``width`` pixels, it becomes several tables (:func:`column_groups`) that each
    repeat the identifying columns, rather than one whose last columns hide behind a scroll bar;
    ``width=None`` keeps one table."""
    if not rows:
        return "(no rows)"
    cols = columns or list(dict.fromkeys(k for r in rows for k in r))
    parts = []
    for group in ([cols] if width is None else column_groups(rows, cols, width)):
        head = "| " + " | ".join(group) + " |\n|" + "---|" * len(group) + "\n"
        parts.append(head + "\n".join("| " + " | ".join(_fmt(r.get(c)) for c in group) + " |" for r in rows))
    return "\n\n".join(parts)


#: Text columns that would make very tall table rows: shown below the table instead of in it.
NOTE_COLUMNS = ("note", "over")


def _rows_text(rows: list[int]) -> str:
    """``[1, 2, 3, 7]`` as ``rows 1–3, 7`` (``row 5`` for one)."""
    spans: list[list[int]] = []
    for r in rows:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    text = ", ".join(f"{a}" if a == b else f"{a}–{b}" for a, b in spans)
    return f"row {text}" if len(rows) == 1 else f"rows {text}"


def table_markdown(name: str, rows: list[dict[str, Any]]) -> str:
    """``**name**``, the markdown table of ``rows`` and, below it, the text of :data:`NOTE_COLUMNS`.

    A long sentence squeezed into a cell makes a very tall row, so such a column leaves the table:
    a value shared by every row is stated once under it; otherwise each distinct value is stated
    once with the row numbers (1-based) it belongs to.
    """
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lifted = [c for c in NOTE_COLUMNS if c in cols and any(r.get(c) for r in rows)]
    kept = [c for c in cols if c not in lifted]
    notes = []
    for c in lifted:
        label = "Note" if c == "note" else f"`{c}`"
        by_value: dict[str, list[int]] = {}
        for i, r in enumerate(rows, 1):
            if r.get(c):
                by_value.setdefault(str(r[c]), []).append(i)
        for v, where in by_value.items():
            notes.append(f"*{label}* (every row): {v}" if len(where) == len(rows)
                         else f"*{label}*, {_rows_text(where)}: {v}")
    return f"**{name}**\n\n" + markdown(rows, kept) + "".join(f"\n\n{n}" for n in notes)


def summary_markdown(res: Mapping[str, Any]) -> str:
    """Targets, absorb, routed, memory and SVD tables of a results file, as markdown (for READMEs).

    A suite the run did not include (``--suite``) gets no heading; one it ran with no rows says so."""
    t = tables(res)
    ran = res.get("sections", {})
    parts = ["### Targets", markdown(t["targets"], ["name", "target", "value", "pass"]) if t["targets"]
             else "(no target applies to what this run measured)"]
    if "absorb" in ran:
        parts += ["### Absorb cost per incoming model (seconds, median of steps ≥ 2)",
                  markdown(t["absorb"], ["shape", "method", "absorb_s", "total_s", "vs_opcm", "svd_s", "linalg_s",
                                         "affinity_s", "merge_s", "io_load_s", "io_state_s", "svd_ratio_to_bound"])]
    if "routed" in ran:
        parts += ["### Routed inference", markdown(t["routed"], ["shape", "batch", "static_latency_s",
                                                                 "routed_latency_s", "throughput_ratio",
                                                                 "grouped_by_path_ratio", "one_path_ratio",
                                                                 "path_groups", "modules_dense"])]
    if "memory" in ran:
        parts += ["### Memory (real banks: mean over the orders of MADE-IT's default configuration, "
                  "unless the note says otherwise)",
                  markdown(t["memory"], ["unit", "T", "banks", "made_it_bank_parameters", "mingle_parameters",
                                         "full_models_parameters", "ratio_to_mingle", "ratio_to_mingle_max",
                                         "ratio_to_full_models"]
                           + (["note"] if any(r.get("note") for r in t["memory"]) else []))]
    if "svd" in ran:
        parts += ["### Top-k SVD accuracy", markdown(t["svd"], ["unit", "variant", "cases", "min_affinity",
                                                                "min_affinity_stable_cases",
                                                                "median_speedup_vs_exact"])]
    if t["skipped"]:
        parts += ["### Not measured", markdown(t["skipped"])]
    return "\n\n".join(parts) + "\n"


# ============================================================================ figures
def figures(res: Mapping[str, Any]) -> dict[str, Figure]:
    """The chapter's figures; a section the run did not produce gives no figure."""
    out: dict[str, Figure] = {}
    t = tables(res)
    if any("absorb_s" in r for r in t["absorb"]):
        out["absorb_breakdown"] = _absorb_figure(t["absorb"])
    if t["routed"]:
        out["routed_throughput"] = _routed_figure(t["routed"])
    if t["scaling"]:
        out["scaling"] = _scaling_figure(t["scaling"])
    if t["memory"]:
        out["memory"] = _memory_figure(t["memory"])
    if res["sections"].get("svd"):
        out["svd_accuracy"] = _svd_figure(res["sections"]["svd"])
    return out


def _absorb_figure(rows: list[dict[str, Any]]) -> Figure:
    shapes = list(dict.fromkeys(r["shape"] for r in rows if "absorb_s" in r))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.6 * len(shapes), 3.4), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, shape in zip(axes[0], shapes):
        rs = [r for r in rows if r["shape"] == shape and "absorb_s" in r]
        names = [r["method"] for r in rs]
        bottom = [0.0] * len(rs)
        for i, p in enumerate(PHASES):
            vals = [r.get(f"{p}_s", 0.0) or 0.0 for r in rs]
            if not any(vals):
                continue
            ax.bar(names, vals, bottom=bottom, label=p, color=colors(i % 10))
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_title(shape, fontsize=9)
        ax.set_ylabel("seconds per incoming model (median)")
        ax.tick_params(axis="x", labelsize=7, rotation=30)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Absorb cost per model, by phase (I/O included)", fontsize=9)
    fig.tight_layout()
    return fig


def _routed_figure(rows: list[dict[str, Any]]) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = [f"{r['shape']}\nbatch {r['batch']}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["throughput_ratio"] for r in rows], width=0.4, label="one pass, grouped per module")
    ax.bar([i + 0.2 for i in x], [r["grouped_by_path_ratio"] or 0.0 for r in rows], width=0.4,
           label="one pass per path")
    ax.axhline(0.5, color="grey", ls="--", lw=0.8, label="bound: two forward passes (0.5)")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("routed / static throughput")
    ax.legend(fontsize=7)
    ax.set_title("Routed inference against one static merged model", fontsize=9)
    fig.tight_layout()
    return fig


def _scaling_figure(rows: list[dict[str, Any]]) -> Figure:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    T = [r["T"] for r in rows]
    axes[0].plot(T, [r["absorb_s"] for r in rows], marker="o", label="absorb")
    axes[0].plot(T, [r["svd_s"] or 0.0 for r in rows], marker=".", label="of which SVD")
    axes[0].plot(T, [r["affinity_s"] or 0.0 for r in rows], marker=".", label="of which affinity")
    axes[0].set_xlabel("tasks absorbed T")
    axes[0].set_ylabel("seconds for step T")
    axes[0].legend(fontsize=7)
    axes[1].plot(T, [r["made_it_parameters"] for r in rows], marker="o", label="MADE-IT experts")
    axes[1].plot(T, [r["mingle_parameters"] for r in rows], marker=".", label="MINGLE experts + gates")
    axes[1].plot(T, [r["full_models_parameters"] for r in rows], marker=".", label="T full models")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("tasks absorbed T")
    axes[1].set_ylabel("parameters kept")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"Scaling ({rows[0]['unit']})", fontsize=9)
    fig.tight_layout()
    return fig


def _memory_figure(rows: list[dict[str, Any]]) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = [f"T = {r['T']}" for r in rows]
    x = range(len(rows))
    for off, key, name in ((-0.27, "made_it_bank_parameters", "MADE-IT bank"),
                           (0.0, "mingle_parameters", "MINGLE experts + gates"),
                           (0.27, "full_models_parameters", "T full models")):
        ax.bar([i + off for i in x], [r[key] for r in rows], width=0.27, label=name)
    ax.set_yscale("log")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("parameters")
    ax.legend(fontsize=7)
    ax.set_title(f"Memory ({rows[0]['source']})", fontsize=8)
    fig.tight_layout()
    return fig


def _flatten(x: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves of nested dicts / lists of dicts under dotted paths (``subspace.0.seconds``)."""
    if isinstance(x, dict):
        items = list(x.items())
    elif isinstance(x, list) and x and all(isinstance(v, dict) for v in x):
        items = [(str(i), v) for i, v in enumerate(x)]
    else:
        return {prefix: x}
    out: dict[str, Any] = {}
    for k, v in items:
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
    return out


def _put(row: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    node: Any = row
    for part, nxt in zip(parts[:-1], parts[1:]):
        key: Any = int(part) if part.isdigit() else part
        if isinstance(node, list):
            while len(node) <= key:
                node.append(None)
            if node[key] is None:
                node[key] = [] if nxt.isdigit() else {}
            node = node[key]
        else:
            node = node.setdefault(key, [] if nxt.isdigit() else {})
    last: Any = int(parts[-1]) if parts[-1].isdigit() else parts[-1]
    if isinstance(node, list):
        while len(node) <= last:
            node.append(None)
    node[last] = value


#: per-variant fields a columnar case table drops because they follow from two recorded times
_SPEEDUP = "speedup_vs_exact"


def case_columns(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Columnar form of SVD-suite cases (the thousands of real-checkpoint ones).

    Every case is flattened to dotted paths; a path with the same value in every case is stored
    once under ``constant`` (the variants' settings), the others as one list per case in
    ``columns`` order. ``speedup_vs_exact`` is left out (it is ``exact_s / seconds``) and
    rebuilt by :func:`case_rows`, which inverts this exactly."""
    flat = [{k: v for k, v in _flatten(r).items() if k.rsplit(".", 1)[-1] != _SPEEDUP} for r in rows]
    paths: list[str] = []
    for f in flat:
        paths.extend(k for k in f if k not in paths)
    missing = object()
    constant = {k: flat[0].get(k) for k in paths
                if flat and all(f.get(k, missing) == flat[0].get(k, missing) for f in flat)}
    columns = [k for k in paths if k not in constant]
    return {"layout": "columns", "constant": constant, "columns": columns,
            "rows": [[f.get(k) for k in columns] for f in flat]}


def case_rows(cases: Any) -> list[dict[str, Any]]:
    """The SVD cases of a section as nested dicts, from either layout (a list of rows, or the
    columnar table of :func:`case_columns`, whose per-variant ``speedup_vs_exact`` is rebuilt)."""
    if isinstance(cases, list):
        return list(cases)
    if not isinstance(cases, dict) or cases.get("layout") != "columns":
        raise MergeInputError(f"svd cases: expected a list or a columnar table, got {type(cases).__name__}")
    out = []
    for vals in cases["rows"]:
        row: dict[str, Any] = {}
        for k, v in [*cases["constant"].items(), *zip(cases["columns"], vals)]:
            _put(row, k, v)
        for variant in [row.get("gram"), *row.get("subspace", []), *row.get("randomized", [])]:
            if isinstance(variant, dict) and variant.get("seconds"):
                variant[_SPEEDUP] = row["exact_s"] / variant["seconds"]
        out.append(row)
    return out


def _svd_figure(svd: Mapping[str, Any]) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 3.4))
    markers = "osd^v<>"
    for ui, (unit, sec) in enumerate(svd.items()):
        cases = case_rows(sec.get("cases", []))
        pts = [("gram", [c["gram"] for c in cases])]
        if cases and "subspace" in cases[0]:       # files written before the subspace method lack it
            for j, r in enumerate(cases[0]["subspace"]):
                pts.append((f"subspace q={r['q']} steps={r['steps']}", [c["subspace"][j] for c in cases]))
        if cases:
            for j, r in enumerate(cases[0]["randomized"]):
                name = f"randomized p={r['oversample_rule']} q={r['n_iter']}"
                pts.append((name, [c["randomized"][j] for c in cases]))
        for vi, (name, vs) in enumerate(pts):
            ax.scatter([v["speedup_vs_exact"] for v in vs], [v["affinity"] for v in vs], s=10,
                       marker=markers[ui % len(markers)], color=plt.get_cmap("tab10")(vi),
                       label=f"{unit}: {name}", alpha=0.7)
    ax.axhline(0.99, color="grey", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("speed-up over the full SVD")
    ax.set_ylabel("affinity to the exact top-k")
    ax.legend(fontsize=5, ncol=2)
    ax.set_title("Top-k SVD: accuracy against speed", fontsize=9)
    fig.tight_layout()
    return fig


__all__ = ["FORMAT", "PHASES", "case_columns", "case_rows", "figures", "load_bench", "markdown", "memory_summary",
           "summary_markdown", "tables"]
