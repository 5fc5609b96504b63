"""Plotting helpers for the book's figures (kept apart from the algorithm; matplotlib only).

Every function takes computed data (from :mod:`madeit_core.analysis` or results files) and
returns a matplotlib Figure; none computes a number itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

#: Widest figure, in inches, that the book shows unscaled: its content column is about 690 px wide
#: at a 1280-px window and :func:`madeit_core.nbsupport.show_figure` saves at 110 dpi. A wider
#: figure is shrunk to fit, and its 6–7 pt tick labels with it (unreadable on 20-task grids).
PAGE_WIDTH_IN = 6.3


def expert_colours(n: int) -> matplotlib.colors.ListedColormap:
    """``n`` distinct colours for expert indices: tab20's 20, then tab20b's and tab20c's (60 in
    all, where ``get_cmap("tab20", n)`` would repeat its 20), then evenly spaced hues of turbo."""
    n = max(int(n), 1)
    if n > 60:
        return matplotlib.colors.ListedColormap(plt.get_cmap("turbo")(np.linspace(0, 1, n)))
    pool = [c for name in ("tab20", "tab20b", "tab20c") for c in plt.get_cmap(name).colors]
    return matplotlib.colors.ListedColormap(pool[:n])


def allocation_figure(module_keys: Sequence[str], tasks: Sequence[str], rows: Sequence[Sequence[int]],
                      title: str = "", max_modules: int | None = None) -> Figure:
    """Fig. 2/7: module × task grid, colour = expert index (renumbered by first use per module)."""
    keys, data = list(module_keys), np.asarray(rows)
    if max_modules is not None and len(keys) > max_modules:
        idx = np.linspace(0, len(keys) - 1, max_modules).round().astype(int)
        keys, data = [keys[i] for i in idx], data[idx]
    fig, ax = plt.subplots(figsize=(min(0.35 * len(tasks) + 3.5, PAGE_WIDTH_IN), 0.18 * len(keys) + 1.5))
    cmap = expert_colours(int(data.max()) + 1)
    ax.imshow(data, aspect="auto", cmap=cmap, interpolation="nearest", vmin=-0.5, vmax=int(data.max()) + 0.5)
    ax.set_xticks(range(len(tasks)), tasks, rotation=90, fontsize=7)
    ax.set_yticks(range(len(keys)), [k.removesuffix(".weight") for k in keys], fontsize=6)
    ax.set_xlabel("tasks, in arrival order")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def growth_figure(tasks: Sequence[str], growth: Mapping[str, Sequence[float]], title: str = "") -> Figure:
    """Mean experts per module after each arriving task, one line per module group (Fig. 2/7 companion)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    steps = np.arange(1, len(tasks) + 1)
    ax.plot(steps, steps, color="grey", ls="--", lw=0.8, label="one expert per task")
    for g, vals in growth.items():
        ax.plot(steps, vals, "o-", ms=3, label=g)
    ax.set_xticks(steps, tasks, rotation=90, fontsize=7)
    ax.set_xlabel("tasks, in arrival order")
    ax.set_ylabel("experts per module (mean)")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def experts_bar_figure(by_group: Mapping[str, Mapping[str, float]], by_depth: Mapping[int, Mapping[str, float]],
                       T: int, title: str = "") -> Figure:
    """Fig. 3/8: mean experts kept (and reduction rate) per module type and per depth."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, data, xlabel in ((axes[0], by_group, "module type"), (axes[1], by_depth, "depth (block)")):
        names = [str(k) for k in data]
        vals = [v["experts_mean"] for v in data.values()]
        bars = ax.bar(names, vals, color="#4c72b0")
        for b, v in zip(bars, data.values()):
            ax.annotate(f"{100 * v['reduction_rate']:.0f}%", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7)
        ax.axhline(T, color="grey", ls="--", lw=0.8, label=f"T = {T} (no sharing)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("experts kept (mean per module)")
        ax.tick_params(axis="x", labelsize=7, rotation=45)
    axes[0].legend(fontsize=7)
    fig.suptitle(title + " (labels: reduction rate 1 − experts/T)", fontsize=9)
    fig.tight_layout()
    return fig


def score_density_figure(affinity: Sequence[float], cosine: Sequence[float], title: str = "") -> Figure:
    """Fig. 4/9: densities of pairwise scores, subspace affinity vs. cosine similarity."""
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    bins = np.linspace(-0.2, 1.0, 61)
    ax.hist(cosine, bins=bins, density=True, alpha=0.6, label="cosine similarity of ΔW")
    ax.hist(affinity, bins=bins, density=True, alpha=0.6, label="subspace affinity")
    ax.set_xlabel("pairwise score between two tasks' experts (one module)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def heatmap_pair_figure(tasks: Sequence[str], affinity: Sequence[Sequence[float]],
                        cosine: Sequence[Sequence[float]], title: str = "") -> Figure:
    """Fig. 5: task × task heatmaps of both scores (mean over modules), on one 0–1 colour scale.

    Side by side while both fit the page's width (up to 6 tasks); above one another beyond, each
    at most the page's width, so that the task names stay legible on 14 and 20 tasks."""
    n = len(tasks)
    side = min(0.35 * n + 2.5, PAGE_WIDTH_IN)
    if 2 * side <= 1.5 * PAGE_WIDTH_IN:
        fig, axes = plt.subplots(1, 2, figsize=(2 * side, side - 0.3))
    else:
        fig, axes = plt.subplots(2, 1, figsize=(side, 2 * (side - 0.3)))
    for ax, mat, name in ((axes[0], affinity, "subspace affinity"), (axes[1], cosine, "cosine similarity")):
        im = ax.imshow(np.asarray(mat), vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(n), tasks, rotation=90, fontsize=7)
        ax.set_yticks(range(n), tasks, fontsize=7)
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def sensitivity_figure(values: Sequence[float], acc: Sequence[tuple[float, float]],
                       bwt: Sequence[tuple[float, float]], xlabel: str, title: str = "",
                       experts: Sequence[float] | None = None) -> Figure:
    """Fig. 6/10/11: ACC and BWT (mean ± std over orders) against a hyper-parameter."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, data, name in ((axes[0], acc, "ACC (%)"), (axes[1], bwt, "BWT (%)")):
        m = np.array([d[0] for d in data])
        s = np.array([d[1] for d in data])
        ax.plot(values, m, "o-")
        ax.fill_between(values, m - s, m + s, alpha=0.2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(name)
    if experts is not None:
        ax2 = axes[0].twinx()
        ax2.plot(values, experts, "s--", color="grey", ms=3)
        ax2.set_ylabel("experts per module", color="grey")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def routing_figure(curves: Mapping[str, Sequence[float | None]], title: str = "") -> Figure:
    """Routing accuracy (%) of the newest task after each step, one line per group."""
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for name, vals in curves.items():
        pts = [(i + 1, v) for i, v in enumerate(vals) if v is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label=name)
    ax.set_xlabel("step (number of tasks absorbed)")
    ax.set_ylabel("routing accuracy of the new task (%)")
    ax.set_ylim(0, 102)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def routing_acc_figure(groups: Mapping[str, Mapping[str, Any]], title: str = "") -> Figure:
    """One point per order: final routing accuracy (%, mean over tasks) against ACC (%), a colour
    per group (``groups``: group → :func:`~madeit_core.reproduce.routing_vs_acc`), Pearson r in
    the legend."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for name, d in groups.items():
        pts = d["points"]
        if not pts:
            continue
        r = d.get("r")
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=16,
                   label=f"{name} (r = {r:.2f})" if r is not None else name)
    ax.set_xlabel("final routing accuracy, mean over tasks (%)")
    ax.set_ylabel("ACC (%)")
    ax.set_xlim(-2, 102)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def table_markdown(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table from dict rows (for glue-free display in notebooks)."""
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "\n".join("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows)
