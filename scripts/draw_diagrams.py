"""Draw the book's method diagrams as SVG (matplotlib), from the library's own decisions.

Usage: python scripts/draw_diagrams.py [--out book/_figures]

- ``pipeline.svg``: what happens when a model arrives, and at inference.
- ``expert_evolution.svg``: one module absorbing synthetic task updates through
  ``madeit_core.experts.ModuleExperts``; every box and arrow is the library's decision log.
- ``routing.svg``: implicit routing on a hand-built four-module bank, the path chosen by
  ``madeit_core.routing.route_path`` (the script stops if the library's answer ever differs from
  the one the book's caption describes).

The figures are illustrations on synthetic inputs, not results. Files are written atomically.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from madeit_core.experts import Decision, EvolutionConfig, ModuleExperts  # noqa: E402
from madeit_core.modules import ModuleSpec  # noqa: E402
from madeit_core.routing import route_path  # noqa: E402

CONSOLIDATE, CREATE, NEUTRAL, MUTED = "#2e7d32", "#ef6c00", "#1565c0", "#9e9e9e"
plt.rcParams.update({"font.size": 12, "svg.hashsalt": "madeit-book", "svg.fonttype": "path"})


def _save(fig: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".svg.tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="svg", bbox_inches="tight", metadata={"Date": None})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        plt.close(fig)


def _box(ax: plt.Axes, x: float, y: float, w: float, h: float, text: str, color: str,
         fill: str = "white", lw: float = 1.5, fontsize: float = 9.5, weight: str = "normal") -> None:
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.06",
                                linewidth=lw, edgecolor=color, facecolor=fill))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, color="#212121", weight=weight)


def _arrow(ax: plt.Axes, x0: float, y0: float, x1: float, y1: float, color: str = "#424242",
           lw: float = 1.4, style: str = "-|>") -> None:
    ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle=style, mutation_scale=12, color=color, lw=lw))


# --------------------------------------------------------------------------- pipeline
def _chain(ax: plt.Axes, y: float, boxes: list[tuple[float, float, str]], h: float, fontsize: float) -> None:
    """Boxes (x centre, width, text) joined left to right by arrows from edge to edge."""
    for x, w, t in boxes:
        _box(ax, x, y, w, h, t, NEUTRAL, fontsize=fontsize)
    for (x0, w0, _), (x1, w1, _) in zip(boxes, boxes[1:]):
        _arrow(ax, x0 + w0 / 2 + 0.03, y, x1 - w1 / 2 - 0.03, y)


def draw_pipeline(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(12.5, 4.0))
    ax.set_xlim(0, 12.5)
    ax.set_ylim(0.2, 4.2)
    ax.axis("off")
    ax.text(0.1, 3.95, "When fine-tuned model $\\theta_t$ arrives (per module $m$, data-free, training-free)",
            fontsize=11, weight="bold", va="center")
    _chain(ax, 3.0, [(1.0, 1.8, "$\\Delta W = W_t - W_0$"),
                     (3.15, 2.1, "Eq. 5: top-$k$ SVD\n$E_{new}=(U, s, V)$"),
                     (5.65, 2.5, "affinity to each expert\n$S_j = \\frac{1}{2}[a(U_j,U) + a(V_j,V)]$"),
                     (8.5, 2.8, "adaptive threshold\n$\\tau_m = \\mathrm{mean}(H_m) + \\lambda\\,\\mathrm{std}(H_m)$")],
           0.9, 9.5)
    _box(ax, 11.4, 3.5, 1.9, 0.65, "$S^* \\geq \\tau_m$: consolidate\n(polar merge, $A \\cup \\{t\\}$)",
         CONSOLIDATE, fontsize=8.5)
    _box(ax, 11.4, 2.5, 1.9, 0.65, "$S^* < \\tau_m$: create\nnew expert, $A=\\{t\\}$", CREATE, fontsize=8.5)
    _arrow(ax, 9.93, 3.15, 10.42, 3.45, CONSOLIDATE)
    _arrow(ax, 9.93, 2.85, 10.42, 2.55, CREATE)
    ax.text(0.1, 1.75, "At inference, per input $x$ (no gate, no training)", fontsize=11, weight="bold", va="center")
    _chain(ax, 0.85, [(1.35, 2.5, "forward $x$ through $\\theta_0$,\nrecord module inputs $X_m$"),
                      (4.35, 2.9, "Eq. 8: $\\mathrm{FPA}(h, E) = \\|V^{\\top}h\\| / \\|h\\|$\nfor every expert"),
                      (7.75, 3.3,
                       "anchor: module with most experts;\nkeep experts with $A_e \\cap C \\neq \\emptyset$"),
                      (10.95, 2.6, "forward $x$ with\n$W_0 + U\\,\\mathrm{diag}(s)\\,V^{\\top}$ on the path")],
           0.95, 9.0)
    _save(fig, path)


# --------------------------------------------------------------------------- expert evolution
def _synthetic_updates(d: int, k: int, seed: int) -> list[tuple[str, torch.Tensor]]:
    """Task updates of one module drawn from three subspace families (X, Y, Z) plus noise."""
    g = torch.Generator().manual_seed(seed)

    def orth(n: int) -> torch.Tensor:
        return torch.linalg.qr(torch.randn(d, n, generator=g, dtype=torch.float64))[0]

    fam = {f: (orth(k), orth(k)) for f in "XYZ"}
    plan = [("t1", "X"), ("t2", "Y"), ("t3", "X"), ("t4", "Z"), ("t5", "X"), ("t6", "Y"), ("t7", "X")]
    out = []
    for name, f in plan:
        U, V = fam[f]
        s = torch.linspace(3.0, 1.5, k, dtype=torch.float64)
        noise = 0.25 * torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
        out.append((name, (U * s) @ V.T + noise))
    return out


def evolution_log(merge_rule: str = "polar", seed: int = 3, d: int = 48, rank: int = 3, margin: float = 1.0
                  ) -> tuple[list[Decision], list[list[list[str]]]]:
    """Run one module's evolution; return the decisions and the identity sets after each step."""
    spec = ModuleSpec("block.mlp.fc1", "block.mlp.fc1.weight", d, d, "linear", "mlp", 0)
    module = ModuleExperts(spec, rank)
    cfg = EvolutionConfig(rank_ratio=rank / d, margin=margin, merge_rule=merge_rule)  # type: ignore[arg-type]
    decisions, snapshots = [], []
    for step, (name, delta) in enumerate(_synthetic_updates(d, rank, seed), start=1):
        decisions.append(module.absorb(name, delta, step, cfg))
        snapshots.append([list(e.tasks) for e in module.experts])
    return decisions, snapshots


def _check_evolution_caption(logs: dict[str, tuple[list[Decision], list[list[list[str]]]]]) -> None:
    """The book's caption describes these decisions in words; stop if the library ever differs."""
    polar = {d.task: d.action for d in logs["polar"][0]}
    exact = {d.task: d.action for d in logs["sum"][0]}
    ok = (polar["t3"] == "consolidate" and polar["t5"] == "create" and exact["t5"] == "consolidate"
          and ["t1", "t3", "t5", "t7"] in logs["sum"][1][-1] and len(logs["sum"][1][-1]) == 3)
    if not ok:
        raise SystemExit(f"the evolution decisions changed ({polar}, {exact}): update the diagram's caption")


def _evolution_panel(ax: plt.Axes, decisions: list[Decision], snapshots: list[list[list[str]]],
                     n_max: int, title: str) -> None:
    T = len(decisions)
    ax.set_xlim(-0.9, T - 0.2)
    ax.set_ylim(-1.35, n_max + 0.8)
    ax.axis("off")
    ax.text(-0.85, n_max + 0.62, title, fontsize=13, weight="bold", va="center")
    for j in range(max(len(e) for e in snapshots)):
        ax.text(-0.85, n_max - 0.5 - j, f"$E_{j + 1}$", fontsize=13, va="center")
    for i, (dec, experts) in enumerate(zip(decisions, snapshots)):
        ax.text(i + 0.25, n_max + 0.02, f"after {dec.task}", ha="center", fontsize=11.5)
        for j, tasks in enumerate(experts):
            hit = j == dec.expert
            color = {"first": NEUTRAL, "create": CREATE, "consolidate": CONSOLIDATE}.get(dec.action, NEUTRAL)
            fill = ("#f1f8e9" if dec.action == "consolidate" else "#fff3e0" if dec.action == "create"
                    else "white") if hit else "white"
            _box(ax, i + 0.25, n_max - 0.5 - j, 0.94, 0.62, "{" + ",".join(tasks) + "}",
                 color if hit else MUTED, fill=fill, lw=2.2 if hit else 1.0, fontsize=10.5)
        if dec.action == "first":
            label = "first task:\none expert"
        elif dec.threshold is None:
            label = f"$S^*$={max(dec.scores):.2f}\nhistory too short\n→ create"
        else:
            rel = "\\geq" if dec.action == "consolidate" else "<"
            label = f"$S^*$={max(dec.scores):.2f}\n${rel}$ $\\tau$={dec.threshold:.2f}\n→ {dec.action}"
        ax.text(i + 0.25, -0.65, label, ha="center", va="center", fontsize=10.5,
                color={"create": CREATE, "consolidate": CONSOLIDATE}.get(dec.action, "#212121"))


def draw_evolution(path: Path) -> None:
    logs = {rule: evolution_log(rule) for rule in ("polar", "sum")}
    _check_evolution_caption(logs)
    n_max = max(len(s) for _, snaps in logs.values() for s in snaps)
    fig, axes = plt.subplots(2, 1, figsize=(10.5, 2 * (1.8 + 0.75 * n_max)))
    _evolution_panel(axes[0], *logs["polar"], n_max, "consolidation by polar merge (the paper)")
    _evolution_panel(axes[1], *logs["sum"], n_max, "consolidation by the exact sum (option merge_rule='sum')")
    _save(fig, path)


# --------------------------------------------------------------------------- routing
ROUTING_ORDER = ["m1", "m2", "m3", "m4"]
ROUTING_SETS = {
    "m1": [["1", "2", "3", "4", "5"]],
    "m2": [["1", "2"], ["3", "4", "5"]],
    "m3": [["1", "3"], ["2"], ["4", "5"]],
    "m4": [["1", "2", "3"], ["4"], ["5"]],
}
ROUTING_FPA = {"m1": [0.41], "m2": [0.37, 0.52], "m3": [0.30, 0.46, 0.44], "m4": [0.58, 0.21, 0.33]}
# What the book's caption says route_path does on this bank: anchor m4 (3 experts, deepest of the
# tie) picks {1,2,3}; m1 resolves; m2 and m3 keep two candidates each; m3 (deeper) re-anchors and
# picks {2}, so C = {2} and m2 resolves to {1,2}.
ANCHOR_NOTES = {("m4", 0): "\n① anchor\nC = {1,2,3}", ("m3", 1): "\n② re-anchor\nC = {2}"}
ROUTING_EXPECTED = ({"m1": 0, "m2": 0, "m3": 1, "m4": 0}, frozenset({"2"}))


def draw_routing(path: Path) -> None:
    chosen, C = route_path(ROUTING_FPA, ROUTING_SETS, ROUTING_ORDER)
    if (chosen, C) != ROUTING_EXPECTED:
        raise SystemExit(f"route_path now answers {chosen}, {set(C)}: update the routing diagram and its caption")
    fig, ax = plt.subplots(figsize=(9, 4.6))
    ax.set_xlim(-0.75, 4.65)
    ax.set_ylim(-0.35, 3.6)
    ax.axis("off")
    pos = {}
    for i, m in enumerate(ROUTING_ORDER):
        ax.text(1.3 * i, 3.35, f"module {m}" + ("\n(shallow)" if i == 0 else "\n(deep)" if i == 3 else "\n"),
                ha="center", va="center", fontsize=12, weight="bold")
        for j, tasks in enumerate(ROUTING_SETS[m]):
            y = 2.4 - j * 1.08
            pos[(m, j)] = (1.3 * i, y)
            on_path = chosen[m] == j
            alive = bool(C & frozenset(tasks))
            color = CONSOLIDATE if on_path else (NEUTRAL if alive else MUTED)
            note = ANCHOR_NOTES.get((m, j), "")
            _box(ax, 1.3 * i, y, 1.12, 0.98, "$A$={" + ",".join(tasks) + "}\n" + f"FPA {ROUTING_FPA[m][j]:.2f}" + note,
                 color, fill="#f1f8e9" if on_path else "white", lw=2.4 if on_path else 1.0, fontsize=11)
    for a, b in zip(ROUTING_ORDER, ROUTING_ORDER[1:]):
        x0, y0 = pos[(a, chosen[a])]
        x1, y1 = pos[(b, chosen[b])]
        _arrow(ax, x0 + 0.57, y0, x1 - 0.57, y1, CONSOLIDATE, lw=2.2)
    _save(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="book/_figures")
    args = ap.parse_args(argv)
    out = Path(args.out)
    draw_pipeline(out / "pipeline.svg")
    draw_evolution(out / "expert_evolution.svg")
    draw_routing(out / "routing.svg")
    print(f"diagrams written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
