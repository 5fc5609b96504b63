"""Continual TIES-Merging (baselines.md §3).

**TIES on a stack of rows** r_1..r_n ∈ R^d (§3.1), :func:`ties_merge`:

1. Trim each row over the whole model at once: κ = K/100 (K read as a percent when > 1),
   q = d − ⌊κd⌋, μ_k = the q-th smallest |r_k|; keep |r_{k,i}| ≥ μ_k. This keeps ⌊κd⌋ + 1
   entries [ref: off by one] (ties at μ_k all kept); ``trim="exact"`` keeps ⌊κd⌋ instead.
2. Elect: σ_i = sign(Σ_k r̂_{k,i}); where σ_i = 0, σ_i = sign(Σ_i σ_i) (global majority).
3. Disjoint merge of the entries whose sign matches σ_i strictly: ``merge_func`` "sum"
   (reference default [ref]), "mean" (over the selected entries, TIES's own), or "max"
   (max |·| times σ_i).

The flat vector is every state-dict entry sorted by key (non-float entries count as zeros), so d
and the trim are global over the whole model, as in the reference.

**Continual update** (§3.2): θ^(1) = θ0 + λ τ_1; for t ≥ 2, with Δ = θ^(t−1) − θ0,
θ^(t) = θ^(t−1) + λ · TIES([Δ; τ_t]) (``update="increment"``, the reference [ref]: Δ enters
already shrunk by λ and the untrimmed entries of Δ stay). ``update="replace"`` is the other
reading, θ^(t) = θ0 + λ · TIES([Δ/λ; τ_t]).

λ: the scripts' 0.3 for 8 tasks and 0.1 for 14/20 (from ``ctx.num_tasks``, T ≤ 8 → 0.3,
T > 8 → 0.1), the config default 0.5 without ``num_tasks``; an explicit ``scaling_factor``
overrides. Merged entries: the float parameters (float buffers stay θ0 unless
``include_buffers``; they still take part in the trim, since the reference flattens the state
dict). Where σ_i = 0 even after the majority fill (only when Σ_i σ_i = 0 exactly) nothing is
selected (strict match, as baselines.md states it).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from madeit_core.errors import MergeInputError
from madeit_core.methods import register
from madeit_core.methods.base import MergeContext, StaticMergeMethod
from madeit_core.methods.task_arithmetic import check_scaling, merge_keys, scaling_for_group
from madeit_core.statedict import StateDict, compute_dtype

MERGE_FUNCS = ("sum", "mean", "max")
TRIMS = ("reference", "exact")
UPDATES = ("increment", "replace")


def keep_fraction(threshold: float) -> float:
    """κ from K: a percentage when K > 1, else a fraction (baselines.md §3.1)."""
    return threshold / 100.0 if threshold > 1 else float(threshold)


def trim_rows(rows: torch.Tensor, threshold: float, trim: str = "reference") -> torch.Tensor:
    """Per row, keep the entries of largest magnitude and zero the rest (§3.1 step 1)."""
    _, d = rows.shape
    keep = int(d * keep_fraction(threshold))
    if trim == "reference":
        q = d - keep                       # μ = q-th smallest |r|; keeps ⌊κd⌋ + 1 entries [ref]
        if q <= 0:
            return rows.clone()
    else:
        if keep <= 0:
            return torch.zeros_like(rows)
        q = d - keep + 1                   # μ = the ⌊κd⌋-th largest |r|
    mag = rows.abs()
    mu = mag.kthvalue(q, dim=1, keepdim=True).values
    return rows * (mag >= mu)


def elect_sign(trimmed: torch.Tensor) -> torch.Tensor:
    """σ = sign of the column sums, zeros replaced by the global majority sign (§3.1 step 2)."""
    sigma = trimmed.sum(dim=0).sign()
    majority = sigma.sum().sign()
    return torch.where(sigma == 0, majority, sigma)


def disjoint_merge(trimmed: torch.Tensor, sigma: torch.Tensor, merge_func: str = "sum") -> torch.Tensor:
    """Combine the entries whose sign matches σ strictly (§3.1 step 3)."""
    sel = ((sigma > 0) & (trimmed > 0)) | ((sigma < 0) & (trimmed < 0))
    chosen = trimmed * sel
    if merge_func == "sum":
        return chosen.sum(dim=0)
    if merge_func == "mean":
        return chosen.sum(dim=0) / sel.sum(dim=0).clamp_min(1)
    if merge_func == "max":
        return chosen.abs().max(dim=0).values * sigma
    raise MergeInputError(f"ties: merge_func must be one of {MERGE_FUNCS}, got {merge_func!r}")


def ties_merge(rows: torch.Tensor, threshold: float = 20.0, merge_func: str = "sum",
               trim: str = "reference") -> torch.Tensor:
    """TIES of the rows of ``rows`` ([n, d]) → [d] (baselines.md §3.1)."""
    if rows.ndim != 2:
        raise MergeInputError(f"ties: expected an [n, d] stack of vectors, got shape {tuple(rows.shape)}")
    trimmed = trim_rows(rows, threshold, trim)
    return disjoint_merge(trimmed, elect_sign(trimmed), merge_func)


@register
class ContinualTIES(StaticMergeMethod):
    """θ^(t) = θ^(t−1) + λ TIES([θ^(t−1) − θ0; τ_t]) (baselines.md §3.2)."""

    name = "ties"

    def __init__(self, scaling_factor: float | None = None, threshold: float = 20.0, merge_func: str = "sum",
                 update: str = "increment", trim: str = "reference", include_buffers: bool = False) -> None:
        super().__init__()
        self.scaling_factor = check_scaling(self.name, scaling_factor)
        try:
            self.threshold = float(threshold)
        except (TypeError, ValueError) as exc:
            raise MergeInputError(f"ties: threshold must be a number, got {threshold!r}") from exc
        if not (0 < self.threshold <= 100) or math.isnan(self.threshold):
            raise MergeInputError(f"ties: threshold (keep %) must be in (0, 100], got {threshold!r}")
        if merge_func not in MERGE_FUNCS:
            raise MergeInputError(f"ties: merge_func must be one of {MERGE_FUNCS}, got {merge_func!r}")
        if update not in UPDATES:
            raise MergeInputError(f"ties: update must be one of {UPDATES}, got {update!r}")
        if trim not in TRIMS:
            raise MergeInputError(f"ties: trim must be one of {TRIMS}, got {trim!r}")
        self.merge_func, self.update, self.trim = merge_func, update, trim
        self.include_buffers = bool(include_buffers)
        self.lam: float | None = None
        self.lam_source = ""
        self.keys: list[str] = []
        self.increment_nonzero: dict[str, int] = {}

    def hparams(self) -> dict[str, Any]:
        return {"scaling_factor": self.scaling_factor, "threshold": self.threshold, "merge_func": self.merge_func,
                "update": self.update, "trim": self.trim, "include_buffers": self.include_buffers,
                "resolved_scaling_factor": self.lam, "scaling_factor_source": self.lam_source}

    def setup(self, pretrained: nn.Module, ctx: MergeContext | None = None) -> None:
        super().setup(pretrained, ctx)
        if self.scaling_factor is not None:
            self.lam, self.lam_source = self.scaling_factor, "explicit"
        else:
            self.lam, self.lam_source = scaling_for_group(self.ctx.num_tasks, 0.5)
        if self.update == "replace" and self.lam == 0:
            raise MergeInputError("ties: update='replace' divides by λ; scaling_factor must not be 0")
        self.keys = merge_keys(pretrained, self.theta0, self.include_buffers)
        self.flat_keys = sorted(self.theta0)
        self.merged = {}
        self.increment_nonzero = {}

    # ------------------------------------------------------------------ flat vectors
    def _dtype(self) -> torch.dtype:
        return torch.float64 if any(v.dtype == torch.float64 for v in self.theta0.values()) else torch.float32

    def _flatten(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        dev, dt = self.ctx.device, self._dtype()
        return torch.cat([parts[k].to(device=dev, dtype=dt).reshape(-1) if k in parts
                          else torch.zeros(self.theta0[k].numel(), device=dev, dtype=dt) for k in self.flat_keys])

    def _unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for k in self.flat_keys:
            n = self.theta0[k].numel()
            out[k] = flat[start:start + n].reshape(self.theta0[k].shape)
            start += n
        return out

    # ------------------------------------------------------------------ update
    def _absorb(self, task: str, finetuned: StateDict) -> None:
        assert self.lam is not None
        lam = self.lam
        tau: dict[str, torch.Tensor] = {}
        for k, a in self.theta0.items():
            if a.is_floating_point():
                dt = compute_dtype(a)
                tau[k] = finetuned[k].to(dt) - a.to(dt)
        if not self.tasks:
            self.merged = {k: self.theta0[k].to(tau[k].dtype) + lam * tau[k] for k in self.keys}
            return
        delta = {k: self.merged[k] - self.theta0[k].to(self.merged[k].dtype) for k in self.keys}
        if self.update == "replace":
            delta = {k: v / lam for k, v in delta.items()}
        rows = torch.stack([self._flatten(delta), self._flatten(tau)])
        m = ties_merge(rows, self.threshold, self.merge_func, self.trim)
        self.increment_nonzero[task] = int((m != 0).sum())
        inc = self._unflatten(m)
        for k in self.keys:
            step = lam * inc[k].to(device=self.merged[k].device, dtype=self.merged[k].dtype)
            if self.update == "increment":
                self.merged[k] = self.merged[k] + step
            else:
                self.merged[k] = self.theta0[k].to(step.dtype) + step

    # ------------------------------------------------------------------ state
    def summary(self) -> dict[str, Any]:
        return {"scaling_factor": self.lam, "scaling_factor_source": self.lam_source,
                "flat_length": int(sum(v.numel() for v in self.theta0.values())),
                "increment_nonzero_per_task": dict(self.increment_nonzero)}

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, _ = super()._state()
        return tensors, {"lambda": self.lam, "increment_nonzero": self.increment_nonzero,
                         "summary": self.summary()}

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super()._restore(tensors, meta)
        if meta.get("lambda") is not None and meta["lambda"] != self.lam:
            raise MergeInputError(f"ties: saved state used λ = {meta['lambda']}, this run resolves λ = {self.lam}; "
                                  "refusing to resume a different configuration")
        self.increment_nonzero = {k: int(v) for k, v in meta.get("increment_nonzero", {}).items()}


__all__ = ["ContinualTIES", "disjoint_merge", "elect_sign", "keep_fraction", "ties_merge", "trim_rows"]
