"""Analyses behind the paper's figures, computed from banks and task vectors.

- Banks are read whole (:class:`~madeit_core.experts.ExpertBank`) or, for committed results that
  carry no tensors, as a :class:`BankLayout` from ``bank.json`` alone.
- Fig. 2/7: :func:`allocation_matrix`: which expert each task joined, per module, as tasks arrive.
- Fig. 3/8: :func:`experts_by_group`: experts kept per module type and depth; reduction rates.
- Fig. 4/9 and 5: :func:`pairwise_scores`: subspace affinity vs. cosine similarity between the
  experts of every pair of tasks, per module, from the tasks' own (unmerged) experts.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from madeit_core.errors import BankFormatError
from madeit_core.experts import BANK_FORMAT, ExpertBank
from madeit_core.geometry import expert_affinity, expert_cosine, extract_expert, rank_for
from madeit_core.io import read_json
from madeit_core.modules import ModuleSpec, as_matrix


@dataclass
class _LayoutModule:
    experts: list[list[str]]          # the identity set of each expert, in creation order


class BankLayout:
    """The structure of an expert bank without its tensors: modules, experts and their task sets.

    Read from a bank's ``bank.json`` alone (:func:`load_bank_layout`), so figures can be drawn
    from committed results that do not carry the (large) expert tensors. Offers the views of
    :class:`~madeit_core.experts.ExpertBank` that :func:`allocation_matrix` and
    :func:`experts_by_group` use: ``specs``, ``tasks``, ``modules[key].experts`` and ``allocation()``.
    """

    def __init__(self, meta: Mapping[str, Any], source: str = "bank.json") -> None:
        if meta.get("format") != BANK_FORMAT:
            raise BankFormatError(f"{source}: not an expert bank (format {meta.get('format')!r})")
        try:
            self.specs = [ModuleSpec.from_dict(m["spec"]) for m in meta["modules"]]
            self.tasks: list[str] = list(meta["tasks"])
            self.modules = {m["spec"]["key"]: _LayoutModule([list(e["tasks"]) for e in m["experts"]])
                            for m in meta["modules"]}
            self.config: dict[str, Any] = dict(meta.get("config", {}))
        except (KeyError, TypeError) as exc:
            raise BankFormatError(f"{source}: malformed bank metadata ({exc})") from exc

    def allocation(self) -> dict[str, list[int]]:
        out = {}
        for s in self.specs:
            owner = {t: i for i, tasks in enumerate(self.modules[s.key].experts) for t in tasks}
            missing = [t for t in self.tasks if t not in owner]
            if missing:
                raise BankFormatError(f"module {s.key}: tasks {missing} belong to no expert")
            out[s.key] = [owner[t] for t in self.tasks]
        return out


def load_bank_layout(folder: str | os.PathLike[str]) -> BankLayout:
    """The :class:`BankLayout` of the bank saved in ``folder`` (only its ``bank.json`` is read)."""
    f = Path(folder) / "bank.json"
    if not f.is_file():
        raise BankFormatError(f"{folder} holds no bank.json (was the run saved with its artifacts?)")
    return BankLayout(read_json(f), str(f))


def mean_summaries(summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Leaf-wise mean of nested dicts of numbers with the same keys (e.g. :func:`experts_by_group`
    of several orders); keys missing from some summary are averaged over those that have them."""
    if not summaries:
        raise ValueError("no summaries to average")
    out: dict[str, Any] = {}
    keys = list(dict.fromkeys(k for s in summaries for k in s))
    for k in keys:
        vals = [s[k] for s in summaries if k in s]
        if isinstance(vals[0], Mapping):
            out[k] = mean_summaries(vals)
        else:
            out[k] = statistics.fmean(float(v) for v in vals)
    return out


def allocation_matrix(bank: ExpertBank | BankLayout) -> tuple[list[str], list[str], list[list[int]]]:
    """(module keys, tasks in arrival order, rows of expert indices) for Fig. 2/7.

    Expert indices are renumbered per module in order of first use, so colours read as
    "the first expert, the second, …" in every row.
    """
    alloc = bank.allocation()
    rows = []
    for spec in bank.specs:
        seen: dict[int, int] = {}
        rows.append([seen.setdefault(e, len(seen)) for e in alloc[spec.key]])
    return [s.key for s in bank.specs], list(bank.tasks), rows


def experts_growth(bank: ExpertBank | BankLayout) -> dict[str, list[float]]:
    """Module group → mean number of experts per module after each step (tasks in arrival order).

    Read from the allocation: after step i a module has as many experts as distinct experts its
    first i tasks joined (experts are only ever added).
    """
    alloc = bank.allocation()
    per_group: dict[str, list[list[int]]] = {}
    for spec in bank.specs:
        row, seen, counts = alloc[spec.key], set(), []
        for e in row:
            seen.add(e)
            counts.append(len(seen))
        per_group.setdefault(spec.group, []).append(counts)
    return {g: [statistics.fmean(c[i] for c in rows) for i in range(len(bank.tasks))]
            for g, rows in sorted(per_group.items())}


def experts_by_group(bank: ExpertBank | BankLayout) -> dict[str, Any]:
    """Experts kept per module group and per depth, with reduction rates 1 − experts / T (Fig. 3/8)."""
    T = max(len(bank.tasks), 1)
    by_group: dict[str, list[int]] = {}
    by_depth: dict[int, list[int]] = {}
    for spec in bank.specs:
        n = len(bank.modules[spec.key].experts)
        by_group.setdefault(spec.group, []).append(n)
        by_depth.setdefault(spec.depth, []).append(n)

    def summarise(d: Mapping[Any, list[int]]) -> dict[Any, dict[str, float]]:
        return {k: {"modules": len(v), "experts_mean": statistics.fmean(v),
                    "reduction_rate": 1 - statistics.fmean(v) / T} for k, v in sorted(d.items())}

    per_module = {}
    for spec in bank.specs:
        name = spec.name.split(".")[-1]
        per_module.setdefault(name, []).append(len(bank.modules[spec.key].experts))
    return {"T": T, "by_group": summarise(by_group), "by_depth": summarise(by_depth),
            "by_module_name": summarise(per_module)}


def task_experts(pretrained: Mapping[str, torch.Tensor], finetuned: Mapping[str, Mapping[str, torch.Tensor]],
                 specs: Sequence[ModuleSpec], rank_ratio: float) -> dict[str, dict[str, Any]]:
    """task → module key → its own expert (Eq. 5), before any consolidation."""
    out: dict[str, dict[str, Any]] = {}
    for task, sd in finetuned.items():
        out[task] = {}
        for s in specs:
            delta = as_matrix(sd[s.key].float() - pretrained[s.key].float())
            out[task][s.key] = extract_expert(delta, rank=rank_for(s.d_out, s.d_in, rank_ratio), task=task)
    return out


def pairwise_scores(experts: Mapping[str, Mapping[str, Any]], specs: Sequence[ModuleSpec]) -> dict[str, Any]:
    """For every pair of tasks and every module: subspace affinity and cosine similarity.

    Returns the flat score lists (densities, Fig. 4/9) and task × task matrices averaged over
    modules (heatmaps, Fig. 5).
    """
    tasks = list(experts)
    n = len(tasks)
    aff = [[0.0] * n for _ in range(n)]
    cos = [[0.0] * n for _ in range(n)]
    flat_aff, flat_cos = [], []
    for i in range(n):
        for j in range(n):
            if j < i:
                aff[i][j], cos[i][j] = aff[j][i], cos[j][i]
                continue
            a_vals, c_vals = [], []
            for s in specs:
                e1, e2 = experts[tasks[i]][s.key], experts[tasks[j]][s.key]
                a_vals.append(expert_affinity(e1, e2))
                c_vals.append(expert_cosine(e1, e2))
            aff[i][j], cos[i][j] = statistics.fmean(a_vals), statistics.fmean(c_vals)
            if j > i:
                flat_aff.extend(a_vals)
                flat_cos.extend(c_vals)
    return {"tasks": tasks, "affinity": aff, "cosine": cos, "affinity_scores": flat_aff, "cosine_scores": flat_cos}
