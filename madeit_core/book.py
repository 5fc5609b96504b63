"""What the book's notebooks call: profile defaults, the method rows of the paper's tables, running
or loading result grids, the reference results, the paper's values beside ours, and glue.

Notebooks hold parameters, calls, tables and plots; every computation lives here or in
:mod:`madeit_core.reproduce`, :mod:`madeit_core.analysis`, :mod:`madeit_core.claims`.

**Stale results.** Results a build computes go under ``<runs_root>/<library hash>/`` where the
hash covers every ``madeit_core/**/*.py`` file (:func:`library_hash`), so a change to the library
can never leave numbers computed by older code in the book. The committed reference results
(``results/reference/<profile>``) are labelled with the commit that made them instead.
"""

from __future__ import annotations

import hashlib
import html
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from madeit_core.paper_values import TABLE1, TABLE1_REFERENCE
from madeit_core.reproduce import MethodRun, load_results, run_grid, summary_rows

ROOT = Path(__file__).resolve().parents[1]

#: Table 1's rows in the paper's order: (label, method name, hyper-parameters).
TABLE1_ROWS: list[tuple[str, str, dict[str, Any]]] = [
    ("Pre-Trained", "pretrained", {}),
    ("Fine-Tuned", "individual", {}),
    ("C. Fine-Tuned", "continual_finetuning", {}),
    ("Average (SWA)", "swa", {}),
    ("C. Task Arithmetic", "task_arithmetic", {}),
    ("C. Ties-Merging", "ties", {}),
    ("C. LW AdaMerging", "adamerging", {}),
    ("C. LoRA-WEMoE", "wemoe", {}),
    ("OPCM", "opcm", {}),
    ("MINGLE", "mingle", {}),
    ("ODE-M", "odem", {}),
    ("MADE-IT (Ours)", "made_it", {}),
]
REFERENCE_LABELS = ("Pre-Trained", "Fine-Tuned", "C. Fine-Tuned")
LABEL_OF = {m: label for label, m, _ in TABLE1_ROWS}
PAPER_ARCH = "ViT-B/32"   # the paper's column shown beside ours (its other backbones are in the tables too)


@dataclass(frozen=True)
class ProfileDefaults:
    benchmark: str
    groups: tuple[str, ...]
    runs: tuple[int, ...]
    note: str


#: What each profile runs when a notebook is not told otherwise.
PROFILE_DEFAULTS: dict[str, ProfileDefaults] = {
    "smoke": ProfileDefaults("zoo", ("smoke-4",), (0, 1),
                             "smoke profile: EfficientNet-Lite0 at 32 px, 4 small tasks, 2 orders; the numbers "
                             "only show that the pipeline works"),
    "offline": ProfileDefaults("zoo", ("offline-8", "offline-14", "offline-20"), tuple(range(10)),
                               "offline profile: EfficientNet-Lite0 (ImageNet weights) at 64 px on the offline "
                               "task groups, 10 orders"),
    "toy": ProfileDefaults("toy", ("toy-4",), (0, 1), "toy benchmark: a tiny ViT on synthetic tasks"),
}


def defaults(profile: str) -> ProfileDefaults:
    if profile not in PROFILE_DEFAULTS:
        raise KeyError(f"no notebook defaults for profile {profile!r}; known: {', '.join(PROFILE_DEFAULTS)}")
    return PROFILE_DEFAULTS[profile]


def library_hash(root: str | os.PathLike[str] | None = None) -> str:
    """sha256 (16 hex) over the relative paths and bytes of every ``madeit_core/**/*.py``."""
    base = Path(root) if root is not None else ROOT
    h = hashlib.sha256()
    for f in sorted((base / "madeit_core").rglob("*.py")):
        h.update(str(f.relative_to(base)).encode())
        h.update(b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def runs_dir(runs_root: str | os.PathLike[str] | None = None) -> Path:
    """Where this library version's build results go (``_build/runs/<library hash>`` by default)."""
    base = Path(runs_root) if runs_root else ROOT / "_build" / "runs"
    return base / library_hash()


def method_rows(methods: Sequence[str] | None = None,
                rows: Sequence[tuple[str, str, Mapping[str, Any]]] = TABLE1_ROWS) -> list[MethodRun]:
    """The table's rows, optionally restricted to ``methods`` (method names or labels)."""
    out = []
    for label, m, hp in rows:
        if methods is None or m in methods or label in methods:
            out.append(MethodRun(label, m, dict(hp)))
    return out


def run_groups(profile: str, benchmark: str, groups: Sequence[str], runs: Sequence[int],
               methods: Sequence[MethodRun], out_dir: str | os.PathLike[str], device: str = "cpu",
               show_progress: bool = False) -> list[dict[str, Any]]:
    """:func:`run_grid` over several groups (building each group's benchmark once); results labelled."""
    from madeit_core.benchmarks import make_benchmark

    results: list[dict[str, Any]] = []
    for g in groups:
        bench, tasks = make_benchmark(benchmark, g, profile=profile, device=device)
        results += run_grid(bench, g, tasks, methods, runs, out_dir, profile, device=device,
                            show_progress=show_progress)
    return results


def reference_results(profile: str = "offline", root: str | os.PathLike[str] | None = None,
                      groups: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The committed reference results (``results/reference/<profile>``), labelled like Table 1."""
    base = Path(root) if root is not None else ROOT / "results" / "reference"
    out = []
    for r in load_results(base, profile):
        if groups is not None and r["group"] not in groups:
            continue
        r = dict(r)
        r["label"] = LABEL_OF.get(r["method"], r["method"])
        out.append(r)
    return out


def paper_value(label: str, T: int, metric: str = "ACC", arch: str = PAPER_ARCH) -> str:
    """The paper's number for a Table 1 row as printed ("mean±std", or the accuracy), or "–"."""
    key = f"{arch}|{T}"
    if label in TABLE1_REFERENCE:
        v = TABLE1_REFERENCE[label].get(key)
        return "–" if v is None or metric != "ACC" else f"{v:.1f}"
    entry = TABLE1.get(metric, {}).get(label, {}).get(key)
    if entry is None:
        return "–"
    m, s = entry
    return f"{m:.1f}±{s:.1f}"


def table1_rows(results: Sequence[Mapping[str, Any]], source: str,
                order: Sequence[str] = tuple(label for label, _, _ in TABLE1_ROWS)) -> list[dict[str, Any]]:
    """Table 1 as rows: per method and group, ours (mean ± std over orders) and the paper's."""
    rows = summary_rows(results)
    rank = {label: i for i, label in enumerate(order)}
    rows.sort(key=lambda r: (int(r["T"]), rank.get(r["method"], 99)))
    out = []
    for r in rows:
        ref = r["method"] in REFERENCE_LABELS
        out.append({
            "group": r["group"], "T": r["T"], "method": r["method"], "source": source, "orders": r["runs"],
            "ACC": f"{r['ACC']:.1f}±{r['ACC_std']:.1f}",
            "BWT": "–" if r["method"] in ("Pre-Trained", "Fine-Tuned") else f"{r['BWT']:.1f}±{r['BWT_std']:.1f}",
            f"paper ACC ({PAPER_ARCH})": paper_value(r["method"], int(r["T"]), "ACC"),
            f"paper BWT ({PAPER_ARCH})": "–" if ref else paper_value(r["method"], int(r["T"]), "BWT"),
            "data at merge": "yes" if r.get("needs_data") else "no",
        })
    return out


def verdict_html(claim: Mapping[str, Any], source: str) -> Any:
    """A claim verdict as HTML (cross-page glue renders text/html), with its evidence and source."""
    from IPython.display import HTML

    colour = {"reproduced": "#1a7f37", "partly": "#9a6700", "not reproduced": "#cf222e"}.get(claim["verdict"], "#000")
    return HTML(f'<p><strong style="color:{colour}">{html.escape(claim["verdict"])}</strong> '
                f"({html.escape(source)}): {html.escape(str(claim['evidence']))}</p>")


def made_it_bank(results_root: str | os.PathLike[str], profile: str, group: str, seed: int = 42,
                 tag: str | None = None) -> Any:
    """MADE-IT's final expert bank of one run (the ``.artifacts`` folder beside its results file)."""
    from madeit_core.experts import ExpertBank

    name = "made_it" if tag is None else f"made_it-{tag}"
    path = Path(results_root) / profile / group / name / f"seed{seed}.artifacts"
    if not path.exists():
        raise FileNotFoundError(f"no MADE-IT bank at {path}: run MADE-IT on {group} (seed {seed}) first")
    return ExpertBank.load(path)


def source_label(profile: str, benchmark: str, committed: bool = False) -> str:
    what = "committed reference run" if committed else "this build"
    return f"{what}, profile {profile}, benchmark {benchmark}"
