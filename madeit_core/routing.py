"""Implicit routing (paper §3.2; method.md §5): no gate, no training, no data beyond the input.

1. Forward x through θ0 and, at each module, score every expert by feature projection
   alignment FPA(h, E) = ‖Vᵀh‖ / ‖h‖ (Eq. 8), aggregated over tokens.
2. :func:`route_path`: the module with the most experts anchors the path (ties: the deepest); its
   best expert fixes the constraint set C = A_e. Every other module keeps the experts whose
   identity sets meet C; the most ambiguous module re-anchors (C ← C ∩ A_e) until each module has
   one expert.
3. Forward x again with W_m = W_0,m + U diag(s) Vᵀ of the chosen experts, applied as low-rank
   updates, and the merged *other* parameters. Samples with the same path share one pass.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from typing import Literal

import torch
from torch import nn

from madeit_core.errors import MergeInputError
from madeit_core.experts import ExpertBank
from madeit_core.geometry import Expert
from madeit_core.timing import timed

Aggregation = Literal["mean", "cls", "token_mean"]


def _tokens(h: torch.Tensor, kind: str) -> torch.Tensor:
    """Module input → [B, N, d_in] (a 1×1 conv's pixels are its tokens)."""
    if kind == "conv1x1":
        return h.flatten(2).transpose(1, 2)
    if h.ndim == 2:
        return h[:, None, :]
    return h.reshape(h.shape[0], -1, h.shape[-1])


def fpa(h: torch.Tensor, V: torch.Tensor, aggregation: Aggregation = "mean", eps: float = 1e-12) -> torch.Tensor:
    """Eq. 8 per sample: FPA(h, E) = ‖Vᵀh‖ / ‖h‖ for tokens h ([B, N, d] or [B, d]).

    ``aggregation``: ``mean`` of the per-token FPA (default), ``cls`` (token 0 only) or
    ``token_mean`` (FPA of the mean token). An empty V (the zero expert) scores 0.
    """
    t = h[:, None, :] if h.ndim == 2 else h
    if aggregation == "cls":
        t = t[:, :1]
    elif aggregation == "token_mean":
        t = t.mean(dim=1, keepdim=True)
    elif aggregation != "mean":
        raise MergeInputError(f"unknown FPA aggregation {aggregation!r} (mean, cls, token_mean)")
    if V.shape[1] == 0:
        return torch.zeros(t.shape[0], dtype=t.dtype, device=t.device)
    num = torch.linalg.vector_norm(t @ V.to(t.dtype), dim=-1)
    den = torch.linalg.vector_norm(t, dim=-1).clamp_min(eps)
    return (num / den).mean(dim=1)


def route_path(scores: Mapping[str, Sequence[float]], task_sets: Mapping[str, Sequence[Collection[str]]],
               module_order: Sequence[str]) -> tuple[dict[str, int], frozenset[str]]:
    """Choose one expert per module for one sample (method.md §5, steps 3–4).

    ``scores[m][e]`` is the FPA of expert e of module m, ``task_sets[m][e]`` its identity set,
    ``module_order`` lists modules shallow to deep. Returns (module → chosen expert, final C).
    """
    depth = {m: i for i, m in enumerate(module_order)}
    cands: dict[str, list[int]] = {m: list(range(len(task_sets[m]))) for m in module_order}
    for m in module_order:
        if not cands[m]:
            raise MergeInputError(f"module {m!r} has no experts")
        if len(scores[m]) != len(task_sets[m]):
            raise MergeInputError(f"module {m!r}: {len(scores[m])} scores for {len(task_sets[m])} experts")
    chosen: dict[str, int] = {}
    C: frozenset[str] | None = None
    while True:
        if C is not None:
            for m in module_order:
                if m not in chosen:
                    cands[m] = [e for e in cands[m] if C & frozenset(task_sets[m][e])]
                    if len(cands[m]) == 1:
                        chosen[m] = cands[m][0]
        open_modules = [m for m in module_order if m not in chosen]
        if not open_modules:
            break
        anchor = max(open_modules, key=lambda m: (len(cands[m]), depth[m]))
        if C is None and len(cands[anchor]) == 1:  # every module has a single expert
            for m in open_modules:
                chosen[m] = cands[m][0]
            break
        e = max(cands[anchor], key=lambda j: (scores[anchor][j], -j))
        chosen[anchor] = e
        A = frozenset(task_sets[anchor][e])
        C = A if C is None else C & A
    if C is None:
        all_tasks: set[str] = set()
        for m in module_order:
            for s in task_sets[m]:
                all_tasks |= set(s)
        C = frozenset(all_tasks)
    return chosen, C


class RoutedModel(nn.Module):
    """θ0 wrapped with an expert bank for routed inference (images → features).

    ``forward`` records, per sample, the final constraint set; :meth:`routing_accuracy` gives the
    share of samples since :meth:`reset_routing_log` whose set contains a given task (the
    diagnostic the paper lacks).
    """

    def __init__(self, pretrained: nn.Module, bank: ExpertBank, aggregation: Aggregation = "mean",
                 copy_model: bool = True) -> None:
        super().__init__()
        self.model = copy.deepcopy(pretrained) if copy_model else pretrained
        self.model.eval()
        self.bank = bank
        self.aggregation: Aggregation = aggregation
        self.specs = list(bank.specs)
        named = dict(self.model.named_modules())
        missing = [s.name for s in self.specs if s.name not in named]
        if missing:
            raise MergeInputError(f"model has no module(s) {missing[:5]} named in the bank")
        self._mods = {s.key: named[s.name] for s in self.specs}
        device = next(self.model.parameters()).device
        self._experts: dict[str, list[Expert]] = {}
        for s in self.specs:
            w = self._mods[s.key].weight
            if tuple(w.shape[:2]) != (s.d_out, s.d_in):
                raise MergeInputError(f"module {s.name!r}: model weight {tuple(w.shape)} vs bank ({s.d_out}, {s.d_in})")
            self._experts[s.key] = [Expert(e.U.to(device, w.dtype), e.s.to(device, w.dtype), e.V.to(device, w.dtype),
                                           list(e.tasks)) for e in bank.modules[s.key].experts]
        self._task_sets = {k: [frozenset(e.tasks) for e in v] for k, v in self._experts.items()}
        sd = self.model.state_dict()
        delta = bank.others_delta()
        unknown = [k for k in delta if k not in sd]
        if unknown:
            raise MergeInputError(f"bank holds other parameter(s) {unknown[:5]} that the model lacks")
        self._others_pre = {k: sd[k].detach().clone() for k in delta}
        self._others_merged = {k: (sd[k].to(delta[k].dtype) + delta[k].to(sd[k].device)).to(sd[k].dtype)
                               for k in delta}
        self._route_log: list[frozenset[str]] = []
        self.path_counts: list[int] = []

    # ----------------------------------------------------------------- diagnostics
    def reset_routing_log(self) -> None:
        self._route_log = []
        self.path_counts = []

    def routing_accuracy(self, task: str) -> float | None:
        if not self._route_log:
            return None
        return sum(task in c for c in self._route_log) / len(self._route_log)

    # ----------------------------------------------------------------- passes
    def _load_others(self, which: Mapping[str, torch.Tensor]) -> None:
        if not which:
            return
        sd = self.model.state_dict()
        with torch.no_grad():
            for k, v in which.items():
                sd[k].copy_(v)

    def score(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pass 1: FPA of every expert at every multi-expert module, [B, n_experts] each."""
        out: dict[str, torch.Tensor] = {}
        handles = []
        for s in self.specs:
            experts = self._experts[s.key]
            if len(experts) < 2:
                continue

            def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], key: str = s.key, kind: str = s.kind) -> None:
                with timed("fpa"):
                    t = _tokens(inp[0], kind)
                    out[key] = torch.stack([fpa(t, e.V, self.aggregation) for e in self._experts[key]], dim=1)

            handles.append(self._mods[s.key].register_forward_pre_hook(hook))
        try:
            with timed("pretrained_pass"), torch.no_grad():
                self._load_others(self._others_pre)
                self.model(x)
        finally:
            for h in handles:
                h.remove()
        return out

    def route(self, x: torch.Tensor) -> tuple[list[tuple[int, ...]], list[frozenset[str]]]:
        """Paths (one expert index per module, in bank order) and constraint sets per sample."""
        scores = self.score(x)
        with timed("routing"):
            keys = [s.key for s in self.specs]
            cpu_scores = {k: v.float().cpu().tolist() for k, v in scores.items()}
            paths, sets = [], []
            for b in range(x.shape[0]):
                per = {k: (cpu_scores[k][b] if k in cpu_scores else [0.0] * len(self._task_sets[k])) for k in keys}
                chosen, C = route_path(per, self._task_sets, keys)
                paths.append(tuple(chosen[k] for k in keys))
                sets.append(C)
        return paths, sets

    def forward_with_path(self, x: torch.Tensor, path: Sequence[int]) -> torch.Tensor:
        """Pass 2 for samples sharing ``path``: low-rank updates on θ0 plus merged others."""
        handles = []
        for s, e_idx in zip(self.specs, path, strict=True):
            e = self._experts[s.key][e_idx]
            if e.is_zero:
                continue

            def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], output: torch.Tensor, e: Expert = e,
                     kind: str = s.kind) -> torch.Tensor:
                with timed("lowrank_apply"):
                    h = inp[0]
                    if kind == "conv1x1":
                        z = torch.einsum("bchw,ck->bkhw", h, e.V) * e.s[None, :, None, None]
                        return output + torch.einsum("bkhw,ok->bohw", z, e.U)
                    return output + ((h @ e.V) * e.s) @ e.U.T

            handles.append(self._mods[s.key].register_forward_hook(hook))
        try:
            self._load_others(self._others_merged)
            return self.model(x)
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paths, sets = self.route(x)
        self._route_log.extend(sets)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, p in enumerate(paths):
            groups[p].append(i)
        self.path_counts.append(len(groups))
        out: torch.Tensor | None = None
        for p, idx in groups.items():
            with timed("routed_pass"):
                ids = torch.tensor(idx, device=x.device)
                y = self.forward_with_path(x[ids], p)
                if out is None:
                    out = y.new_empty((x.shape[0], *y.shape[1:]))
                out[ids] = y
        assert out is not None
        return out


def wrap(pretrained: nn.Module, bank: ExpertBank, aggregation: Aggregation = "mean") -> RoutedModel:
    """Wrap a pre-trained model with an expert bank for routed inference (the documented API)."""
    return RoutedModel(pretrained, bank, aggregation)
