"""Tables of the book: our numbers beside the paper's, as markdown.

A table is a list of row labels and a list of :class:`Column` blocks; each column's header says
where its numbers come from (``ours · smoke · toy_vit · toy-4`` or ``paper · ViT-B/32 · T=8``),
so numbers from different settings are never shown as if comparable. Cells without a value show
``–``. The paper's numbers come from :mod:`madeit_core.paper_values` only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from madeit_core.bookplan import PAPER_NAMES
from madeit_core.paper_values import ARCHS, PER_TASK_20, TABLE1, TABLE1_REFERENCE, TABLE2
from madeit_core.reproduce import fmt, summary_rows

MISSING = "–"
PAPER_T = (8, 14, 20)


@dataclass
class Column:
    header: str
    cells: dict[str, str] = field(default_factory=dict)


def markdown_table(row_labels: Sequence[str], columns: Sequence[Column], corner: str = "") -> str:
    """Rows × columns as a markdown table (``|`` in labels is escaped)."""
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    head = "| " + " | ".join([esc(corner)] + [esc(c.header) for c in columns]) + " |"
    sep = "|" + "---|" * (len(columns) + 1)
    lines = [head, sep]
    for r in row_labels:
        lines.append("| " + " | ".join([esc(r)] + [esc(c.cells.get(r, MISSING)) for c in columns]) + " |")
    return "\n".join(lines)


def orders_note(runs: int | None, expected: int | None) -> str:
    """`` (n=3)`` when a value averages another number of orders than ``expected`` (else ``""``)."""
    return f" (n={runs})" if runs is not None and expected is not None and runs != expected else ""


def merged_row_labels(ours: Mapping[str, str], reference: Mapping[str, str]) -> dict[str, str]:
    """Row label → method for a table of this build's rows beside the reference's.

    A small profile resizes some rivals and labels them so (``ODE-M (smoke sizes)``) while the
    reference ran them at full size under the plain label (``ODE-M``). A reference label this build
    does not use gets its own row, right after this build's row of the same method (else at the
    end), so no reference value is hidden by a label mismatch and no resized run is shown as if it
    were the full-size one.
    """
    out: dict[str, str] = {}
    for label, method in ours.items():
        out[label] = method
        for rlabel, rmethod in reference.items():
            if rmethod == method and rlabel not in ours:
                out.setdefault(rlabel, rmethod)
    for rlabel, rmethod in reference.items():
        out.setdefault(rlabel, rmethod)
    return out


def ablation_table(results_by_group: Mapping[str, Sequence[Mapping[str, Any]]], labels: Sequence[str],
                   expected: int | None = None, digits: int = 1) -> str:
    """One open choice's variants as a narrow markdown table: a row per (group, variant), columns
    ACC, BWT (mean ± std over the orders; ``(n=3)`` when another number than ``expected``), the
    mean experts kept per module and the final routing accuracy (%).

    ``results_by_group``: group → results dicts, each carrying its variant's ``label`` (as
    :meth:`madeit_core.nbsupport.ResultsStore.results` returns them). A variant with no finished
    run in a group has no row there.
    """
    cols = {what: Column(what) for what in ("ACC", "BWT", "experts per module", "routing (%)")}
    rows: list[str] = []
    for g, res in results_by_group.items():
        summary = {r["method"]: r for r in summary_rows(res)}
        for lab in labels:
            if lab not in summary:
                continue
            row, key = summary[lab], f"{g} · {lab}"
            rows.append(key)
            n = orders_note(row["runs"], expected)
            for what in ("ACC", "BWT"):
                cols[what].cells[key] = fmt(row[what], row[f"{what}_std"], digits) + n
            experts = [r["method_summary"]["experts_mean"] for r in res
                       if r.get("label") == lab and (r.get("method_summary") or {}).get("experts_mean") is not None]
            if experts:
                cols["experts per module"].cells[key] = f"{sum(experts) / len(experts):.2f}"
            if row["routing_accuracy"] is not None:
                cols["routing (%)"].cells[key] = fmt(row["routing_accuracy"], None, digits)
    return markdown_table(rows, list(cols.values()), "group · variant")


def source_label(kind: str, profile: str, backbone: str) -> str:
    """``ours · smoke · toy_vit``: who produced a block of numbers."""
    return f"{kind} · {profile} · {backbone}"


def metric_columns(rows: Sequence[Mapping[str, Any]], metric: str, groups: Sequence[str], source: str,
                   digits: int = 1, expected: int | None = None) -> list[Column]:
    """One column per group: ``mean±std`` of ``metric`` per method label (rows of
    :func:`madeit_core.reproduce.summary_rows`).

    A cell averaging a number of orders other than ``expected`` says so (``(n=3)``), so a partial
    grid is shown as what it is; without ``expected``, cells of a single order are marked.
    """
    cols = []
    for g in groups:
        col = Column(f"{source} · {g}")
        for r in rows:
            if r["group"] == g:
                runs = int(r.get("runs", 0))
                partial = runs != expected if expected is not None else runs < 2
                n = f" (n={runs})" if partial else ""
                col.cells[r["method"]] = fmt(r[metric], r.get(f"{metric}_std"), digits) + n
        cols.append(col)
    return cols


def beside_paper(columns: Sequence[Column], group_tasks: Sequence[int], paper: Sequence[Column]) -> list[Column]:
    """Our columns (one per group, ``group_tasks`` their numbers of tasks) each followed by the
    paper's column of the same T (``paper``: :func:`paper_table1_columns`, one per :data:`PAPER_T`),
    so every number stands next to the one it is compared with; a paper column no group matches
    comes last."""
    if len(columns) != len(group_tasks) or len(paper) != len(PAPER_T):
        raise ValueError(f"beside_paper: {len(columns)} columns for {len(group_tasks)} task counts, "
                         f"{len(paper)} paper columns for T = {PAPER_T}")
    by_T = dict(zip(PAPER_T, paper, strict=True))
    out: list[Column] = []
    for col, T in zip(columns, group_tasks, strict=True):
        out.append(col)
        if T in by_T:
            out.append(by_T.pop(T))
    return out + list(by_T.values())


def paper_table1_columns(metric: str, arch: str, labels: Mapping[str, str]) -> list[Column]:
    """The paper's Table 1 for one architecture: one column per T (8, 14, 20).

    ``labels``: our row label → library method name; rows whose method the paper does not report
    stay empty. The reference rows have no spread in the paper; their BWT is not reported (the
    individual models' BWT is 0 by definition, shown as such).
    """
    if arch not in ARCHS:
        raise KeyError(f"the paper has no architecture {arch!r}; it has {ARCHS}")
    cols = []
    for T in PAPER_T:
        key = f"{arch}|{T}"
        col = Column(f"paper · {arch} · T={T}")
        for label, method in labels.items():
            name = PAPER_NAMES.get(method)
            if name is None:
                continue
            if name in TABLE1[metric]:
                m, s = TABLE1[metric][name][key]
                col.cells[label] = fmt(m, s)
            elif name in TABLE1_REFERENCE:
                if metric == "ACC":
                    col.cells[label] = fmt(TABLE1_REFERENCE[name][key])
                elif method == "individual":
                    col.cells[label] = fmt(0.0)
        cols.append(col)
    return cols


def paper_table2_columns(arch_list: Sequence[str] = tuple(ARCHS)) -> tuple[list[str], list[Column]]:
    """The paper's Table 2 (8 tasks): rows ``subspace``/``cosine``, columns ACC and BWT per arch."""
    rows = ["subspace", "cosine"]
    cols = []
    for arch in arch_list:
        for metric in ("ACC", "BWT"):
            col = Column(f"paper · {arch} · T=8 · {metric}")
            for r in rows:
                m, s = TABLE2[r][arch][metric]
                col.cells[r] = fmt(m, s)
            cols.append(col)
    return rows, cols


#: The columns of Table 2 in its long layout: a row per (source, group), a column per score and metric.
TABLE2_COLUMNS: tuple[str, ...] = ("subspace · ACC", "cosine · ACC", "subspace · BWT", "cosine · BWT")


def table2_long(rows: Sequence[Mapping[str, Any]], groups: Sequence[str], source: str, columns: Sequence[Column],
                expected: int | None = None, digits: int = 1) -> list[str]:
    """Fill ``columns`` (:data:`TABLE2_COLUMNS`) with a row ``<source> · <group>`` per group that has
    results; ``rows``: :func:`~madeit_core.reproduce.summary_rows` whose ``method`` is the score
    (``subspace`` or ``cosine``). Returns the row labels added. Cells averaging another number of
    orders than ``expected`` say so (``(n=3)``)."""
    by = {c.header: c for c in columns}
    added = []
    for g in groups:
        label = f"{source} · {g}"
        for r in rows:
            if r["group"] != g or r["method"] not in ("subspace", "cosine"):
                continue
            n = orders_note(r["runs"], expected)
            for metric in ("ACC", "BWT"):
                by[f"{r['method']} · {metric}"].cells[label] = fmt(r[metric], r.get(f"{metric}_std"), digits) + n
            if label not in added:
                added.append(label)
    return added


def paper_table2_long(columns: Sequence[Column], arch_list: Sequence[str] = tuple(ARCHS)) -> list[str]:
    """Fill ``columns`` (:data:`TABLE2_COLUMNS`) with the paper's Table 2, a row per architecture
    (8 tasks); returns the row labels added."""
    by = {c.header: c for c in columns}
    added = []
    for arch in arch_list:
        label = f"paper · {arch} · T=8"
        for score in ("subspace", "cosine"):
            for metric in ("ACC", "BWT"):
                m, sd = TABLE2[score][arch][metric]
                by[f"{score} · {metric}"].cells[label] = fmt(m, sd)
        added.append(label)
    return added


def per_task_columns(means: Mapping[str, Mapping[str, float]], labels: Sequence[str], source: str,
                     orders: Mapping[str, int] | None = None, expected: int | None = None,
                     task_order: Sequence[str] | None = None) -> tuple[list[str], list[Column]]:
    """Tables 4–6 layout: rows = tasks (``task_order`` first, e.g. the group's own order; then any
    other in first-seen order), one column per method label, plus a final ``average`` row. With
    ``orders`` (label → number of orders averaged) and ``expected``, a column averaging another
    number of orders says so in its header (``(n=6)``)."""
    seen = {t for lab in labels for t in means.get(lab, {})}
    tasks: list[str] = [t for t in (task_order or []) if t in seen]
    for lab in labels:
        for t in means.get(lab, {}):
            if t not in tasks:
                tasks.append(t)
    cols = []
    for lab in labels:
        if lab not in means:
            continue
        col = Column(f"{source} · {lab}{orders_note((orders or {}).get(lab), expected)}")
        for t, v in means[lab].items():
            col.cells[t] = fmt(v)
        vals = list(means[lab].values())
        col.cells["average"] = fmt(sum(vals) / len(vals))
        cols.append(col)
    return tasks + ["average"], cols


def paper_per_task_columns(arch: str, methods: Sequence[str]) -> tuple[list[str], list[Column]]:
    """The paper's Tables 4–6 (20 tasks) for ``arch``: rows = the paper's tasks, one column per
    library method the paper reports, plus an ``average`` row."""
    table = PER_TASK_20[arch]
    names = [(m, PAPER_NAMES[m]) for m in methods if PAPER_NAMES.get(m) in table]
    tasks = list(next(iter(table.values())))
    cols = []
    for _, name in names:
        col = Column(f"paper · {arch} · {name}")
        for t in tasks:
            col.cells[t] = fmt(table[name][t])
        col.cells["average"] = fmt(sum(table[name].values()) / len(table[name]))
        cols.append(col)
    return tasks + ["average"], cols


__all__ = ["Column", "MISSING", "PAPER_T", "ablation_table", "beside_paper", "markdown_table", "merged_row_labels",
           "metric_columns", "paper_per_task_columns", "paper_table1_columns", "paper_table2_columns",
           "paper_table2_long", "per_task_columns", "source_label", "TABLE2_COLUMNS", "table2_long"]
