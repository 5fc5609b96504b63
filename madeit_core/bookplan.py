"""What the book runs: the method rows of every table, the ablations, the sweeps, and the jobs.

One place defines every protocol run a notebook needs, so that notebooks reuse each other's
runs (the same :class:`~madeit_core.reproduce.MethodRun` maps to the same results file) and the
reference command (``scripts/run_reference.py``) runs exactly what the notebooks show.

A MADE-IT variant whose options equal the defaults *is* the default run (:func:`made_it_variant`),
so e.g. the ρ = 0.1 point of the sensitivity sweep and the MADE-IT row of Table 1 are one run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from madeit_core.errors import MergeInputError
from madeit_core.experts import EvolutionConfig
from madeit_core.paper_values import METHOD_NAMES
from madeit_core.reproduce import MethodRun

#: Library method name → the paper's display name (keys of :mod:`madeit_core.paper_values`).
PAPER_NAMES: dict[str, str] = {lib: paper for paper, lib in METHOD_NAMES.items()}

#: Library method name → the label of its row in our tables.
DISPLAY_NAMES: dict[str, str] = {**PAPER_NAMES, "made_it": "MADE-IT", "odem": "ODE-M"}

#: The non-merging rows of Table 1 (never counted as rivals).
REFERENCE_ROWS: tuple[str, ...] = ("pretrained", "individual", "continual_finetuning")

#: Table 1's rows in the paper's order (reference rows, classic merging, MoE-style, ours).
TABLE1_METHODS: tuple[str, ...] = ("pretrained", "individual", "continual_finetuning", "swa", "task_arithmetic",
                                   "ties", "adamerging", "wemoe", "opcm", "mingle", "odem", "made_it")

#: MADE-IT's options besides the evolution config (:class:`madeit_core.methods.made_it.MadeIt`).
MADE_IT_DEFAULTS: dict[str, Any] = {**{f.name: f.default for f in fields(EvolutionConfig)}, "aggregation": "mean",
                                     "anchor": "experts"}

#: The open choices of method.md, each with its non-default options (defaults are implied).
ABLATIONS: dict[str, list[dict[str, Any]]] = {
    "consolidation rule": [{"merge_rule": "sum"}, {"merge_rule": "mean"}],
    "threshold history": [{"history": "past"}, {"min_history": 1}, {"min_history": 3}],
    "other parameters": [{"others": "pretrained"}, {"others": "task_arithmetic"}],
    "FPA aggregation": [{"aggregation": "cls"}, {"aggregation": "token_mean"}],
    "affinity score": [{"score": "cosine"}],
    "routing anchor": [{"anchor": "signed"}],
    "top-k SVD": [{"svd": "exact"}],
}


#: Per-profile hyper-parameters of rivals too slow for that profile's time budget. The row is
#: labelled with them, so a table never passes a resized rival off as its default. At ``smoke``
#: ODE-M integrates with h = 0.05 instead of 0.01 (5× fewer Euler steps), fewer gradient and probe
#: batches and 20 refinement steps: ≈ 4× faster on the toy benchmark, same code path.
PROFILE_METHOD_HPARAMS: dict[str, dict[str, dict[str, Any]]] = {
    "smoke": {"odem": {"step_size": 0.05, "macro_grad_batches": 2, "barrier_probe_batches": 2,
                       "post_refine_steps": 20}},
}


def display_name(method: str) -> str:
    return DISPLAY_NAMES.get(method, method)


def _fmt_value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def resized_note(methods: Iterable[str], profile: str) -> str | None:
    """A sentence naming the rivals resized at ``profile`` and their sizes (None if none)."""
    sizes = PROFILE_METHOD_HPARAMS.get(profile, {})
    parts = [f"{display_name(m)}: " + ", ".join(f"`{k}={_fmt_value(v)}`" for k, v in sizes[m].items())
             for m in methods if m in sizes]
    if not parts:
        return None
    return (f"Resized for the `{profile}` profile's time budget (rows marked *{profile} sizes*; every other "
            f"hyper-parameter at its default): " + "; ".join(parts) + ".")


def made_it_variant(label: str | None = None, **options: Any) -> MethodRun:
    """MADE-IT with ``options``; the options equal to defaults are dropped (same run, same file).

    The tag (part of the results path) and default label are ``key=value`` pairs in sorted order.
    """
    unknown = sorted(set(options) - set(MADE_IT_DEFAULTS))
    if unknown:
        raise MergeInputError(f"unknown MADE-IT option(s) {unknown}; known: {sorted(MADE_IT_DEFAULTS)}")
    changed = {k: v for k, v in sorted(options.items()) if v != MADE_IT_DEFAULTS[k]}
    if not changed:
        return MethodRun(label or "MADE-IT", "made_it", {})
    tag = ",".join(f"{k}={_fmt_value(v)}" for k, v in changed.items())
    return MethodRun(label or f"MADE-IT ({tag})", "made_it", {**changed, "tag": tag})


def table1_runs(methods: Iterable[str], profile: str | None = None) -> list[MethodRun]:
    """One row per library method name, labelled with :func:`display_name`, in the given order;
    a rival resized for ``profile`` (:data:`PROFILE_METHOD_HPARAMS`) carries its sizes in its
    label and its results file (tag ``<profile>-sizes``)."""
    out = []
    sizes = PROFILE_METHOD_HPARAMS.get(profile or "", {})
    for m in methods:
        if m == "made_it":
            out.append(made_it_variant())
        elif m in sizes:
            out.append(MethodRun(f"{display_name(m)} ({profile} sizes)", m, {**sizes[m], "tag": f"{profile}-sizes"}))
        else:
            out.append(MethodRun(display_name(m), m, {}))
    return out


def ablation_runs(ablations: Mapping[str, Sequence[Mapping[str, Any]]] | None = None
                  ) -> dict[str, list[MethodRun]]:
    """choice → [default run, one run per option] (the default row is shared by all choices)."""
    abl = ABLATIONS if ablations is None else ablations
    out: dict[str, list[MethodRun]] = {}
    for choice, options in abl.items():
        out[choice] = [made_it_variant(f"default ({_default_text(options)})")]
        out[choice] += [made_it_variant(", ".join(f"{k}={_fmt_value(v)}" for k, v in o.items()), **o)
                        for o in options]
    return out


def _default_text(options: Sequence[Mapping[str, Any]]) -> str:
    keys = sorted({k for o in options for k in o})
    return ", ".join(f"{k}={_fmt_value(MADE_IT_DEFAULTS[k])}" for k in keys)


def sensitivity_runs(option: str, values: Sequence[float]) -> list[MethodRun]:
    """MADE-IT at each value of ``option`` (``rank_ratio`` ρ or ``margin`` λ), others at default."""
    if option not in ("rank_ratio", "margin"):
        raise MergeInputError(f"sensitivity sweeps rank_ratio or margin, not {option!r}")
    if len(set(values)) != len(values):
        raise MergeInputError(f"duplicate values in the {option} sweep: {list(values)}")
    return [made_it_variant(f"{option}={_fmt_value(float(v))}", **{option: float(v)}) for v in values]


@dataclass(frozen=True)
class Job:
    """Runs of several methods on one group over the same orders."""

    group: str
    runs: tuple[MethodRun, ...]
    seeds: tuple[int, ...]
    eval_seen: bool = False
    notebooks: tuple[str, ...] = field(default=(), compare=False)


def _sensitivity_group(params: Mapping[str, Any]) -> str:
    return params.get("sensitivity_group") or params["groups"][0]


def notebook_jobs(name: str, params: Mapping[str, Any]) -> list[Job]:
    """The protocol runs notebook ``name`` needs under ``params`` (its parameters cell)."""
    groups, seeds = list(params["groups"]), tuple(int(s) for s in params["seeds"])
    if name in ("table1_acc_bwt", "tables4_6_per_task"):
        runs = tuple(table1_runs(params["methods"], params.get("profile")))
        return [Job(g, runs, seeds, notebooks=(name,)) for g in groups]
    if name == "table2_affinity_cosine":
        runs = (made_it_variant(), made_it_variant("MADE-IT, cosine similarity", score="cosine"))
        return [Job(g, runs, seeds, notebooks=(name,)) for g in groups]
    if name in ("fig2_allocation", "fig3_experts_kept", "routing_accuracy"):
        return [Job(g, (made_it_variant(),), seeds, notebooks=(name,)) for g in groups]
    if name == "fig6_sensitivity":
        runs = tuple(sensitivity_runs("rank_ratio", params["rho_values"])
                     + sensitivity_runs("margin", params["lambda_values"]))
        return [Job(_sensitivity_group(params), runs, seeds, notebooks=(name,))]
    if name == "ablations":
        runs = tuple(r for rs in ablation_runs().values() for r in rs)
        return [Job(g, runs, seeds, notebooks=(name,)) for g in groups]
    if name in ("fig4_score_densities", "fig5_task_heatmaps", "performance"):
        return []
    raise MergeInputError(f"unknown notebook {name!r}")


def merge_jobs(jobs: Iterable[Job]) -> list[Job]:
    """Union of jobs per (group, seeds, eval_seen), each run once (by method and tag), order kept."""
    merged: dict[tuple[str, tuple[int, ...], bool], tuple[list[MethodRun], set[tuple[str, str | None]], list[str]]] = {}
    for j in jobs:
        runs, seen, names = merged.setdefault((j.group, j.seeds, j.eval_seen), ([], set(), []))
        for r in j.runs:
            if (r.method, r.tag) not in seen:
                seen.add((r.method, r.tag))
                runs.append(r)
        names.extend(n for n in j.notebooks if n not in names)
    return [Job(g, tuple(runs), seeds, ev, tuple(names)) for (g, seeds, ev), (runs, _, names) in merged.items()]


__all__ = ["ABLATIONS", "DISPLAY_NAMES", "Job", "MADE_IT_DEFAULTS", "PAPER_NAMES", "PROFILE_METHOD_HPARAMS",
           "REFERENCE_ROWS", "TABLE1_METHODS", "ablation_runs", "display_name", "made_it_variant", "merge_jobs",
           "notebook_jobs", "resized_note", "sensitivity_runs", "table1_runs"]
