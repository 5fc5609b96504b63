"""OPCM, orthogonal projection continual merging (baselines.md §4; arXiv 2501.09522).

Step 1: θ^(1) = θ_1, n_1 = ‖τ_1‖, λ_1 = 1. Step t ≥ 2:

1. n_t = ‖τ_t‖ (global norm over the merged entries), ā_t = mean(n_1..n_t).
2. For every merged entry p, Δ_p = θ^(t−1)_p − θ0_p:
   - a module weight of ``ctx.modules`` (Linear, 1×1 conv as a matrix): τ̃_p = Π_α(Δ_p, τ_p);
   - any other parameter owned by a *leaf* module (biases, norms, embeddings, conv kernels):
     τ̃_p = τ_p;
   - θ'_p = θ0_p + λ_{t−1} Δ_p + τ̃_p;
   - a parameter owned directly by a non-leaf module (CLIP's ``class_embedding``) is not
     visited [ref]: θ'_p = θ^(t−1)_p, so it is only ever shrunk by the rescale
     (``merge_nonleaf=True`` treats it like a leaf parameter instead).
3. n' = ‖θ' − θ0‖, λ_t = n' / ā_t, θ^(t) = θ0 + (θ' − θ0) / λ_t, so ‖θ^(t) − θ0‖ = ā_t.

Projection Π_α(Δ, τ), Δ = U diag(s) Vᵀ: the split rank r is the number of leading singular
values whose cumulative share is ≤ α (the smallest 0-based i with (s_0+…+s_i)/Σs > α; r = 0
when none is, e.g. α ≥ 1). In the singular basis P = Uᵀ τ V the block P_{i<r, j<r} is zeroed
and, with ``zero_diagonal``, the whole diagonal P_ii (i < min(d_out, d_in)). Computed in closed
form from the reduced SVD (no d × d projector is formed):
τ̃ = τ − U_r (U_rᵀ τ V_r) V_rᵀ − [zero_diagonal] Σ_{i≥r} (u_iᵀ τ v_i) u_i v_iᵀ.

``zero_diagonal`` defaults to False: MINGLE's fork (whose Table-1 OPCM numbers the paper's table
carries) calls ``diag()`` on a copy, so its diagonal zeroing is a no-op [ref]; FusionBench HEAD
zeroes it (``zero_diagonal=True``). SVDs run in float32 (float64 for float64 models), as the
reference's float32 ``torch.linalg.svd``.

Choices where the reference is silent or CLIP-specific: which weights are projected comes from
``ctx.modules`` (the backbone adapter), not from ``isinstance(nn.Linear)``; leaf/non-leaf
ownership is read from the module tree of θ0. Merged entries are the float parameters; float
buffers (none in CLIP) stay at θ0 unless ``include_buffers``, and the norms are taken over the
merged entries (the reference's norms cover the whole state dict, i.e. the same set for CLIP).
If n' = 0 the merged model is θ0 and λ_t = 1 (no division by zero).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from madeit_core.errors import MergeInputError
from madeit_core.methods import register
from madeit_core.methods.base import MergeContext, StaticMergeMethod
from madeit_core.methods.task_arithmetic import merge_keys
from madeit_core.modules import as_matrix, from_matrix
from madeit_core.statedict import StateDict, compute_dtype


def split_rank(s: torch.Tensor, alpha: float) -> int:
    """Smallest 0-based i with cumsum(s)_i / Σs > α; 0 when no index passes (§4 (b), (f))."""
    s = s.double()
    total = float(s.sum())
    if not total > 0:
        return 0
    passed = (torch.cumsum(s, 0) / total) > alpha
    return int(passed.nonzero()[0, 0]) if bool(passed.any()) else 0


def project_task_vector(delta: torch.Tensor, tau: torch.Tensor, alpha: float = 0.5,
                        zero_diagonal: bool = False) -> tuple[torch.Tensor, int]:
    """(Π_α(Δ, τ), r) for matrices of shape (d_out, d_in) (baselines.md §4, "Projection")."""
    if delta.ndim != 2 or delta.shape != tau.shape:
        raise MergeInputError(f"opcm: projection needs two matrices of the same shape, got {tuple(delta.shape)} "
                              f"and {tuple(tau.shape)}")
    dt = torch.float64 if delta.dtype == torch.float64 else torch.float32
    U, s, Vh = torch.linalg.svd(delta.to(dt), full_matrices=False)
    r = split_rank(s, alpha)
    t = tau.to(dt)
    out = t
    if r > 0:
        Ur, Vr = U[:, :r], Vh[:r].T
        out = out - Ur @ (Ur.T @ t @ Vr) @ Vr.T
    if zero_diagonal and r < s.numel():
        Uk, Vk = U[:, r:], Vh[r:].T
        coef = ((Uk.T @ t) * Vh[r:]).sum(dim=1)         # u_iᵀ τ v_i for i ≥ r
        out = out - (Uk * coef) @ Vk.T
    return out, r


def leaf_owned(model: nn.Module) -> set[str]:
    """Keys of the parameters owned directly by leaf modules (modules without children)."""
    out: set[str] = set()
    for name, mod in model.named_modules(remove_duplicate=False):
        if next(iter(mod.children()), None) is not None:
            continue
        for pname, _ in mod.named_parameters(recurse=False):
            out.add(f"{name}.{pname}" if name else pname)
    return out


@register
class OPCM(StaticMergeMethod):
    """Orthogonal projection of each new task vector plus a global norm rescale (§4 (b))."""

    name = "opcm"

    def __init__(self, alpha: float = 0.5, zero_diagonal: bool = False, merge_nonleaf: bool = False,
                 include_buffers: bool = False) -> None:
        super().__init__()
        try:
            self.alpha = float(alpha)
        except (TypeError, ValueError) as exc:
            raise MergeInputError(f"opcm: alpha must be a number, got {alpha!r}") from exc
        if math.isnan(self.alpha) or self.alpha < 0:
            raise MergeInputError(f"opcm: alpha must be ≥ 0 (0.5 in every published run), got {alpha!r}")
        self.zero_diagonal, self.merge_nonleaf = bool(zero_diagonal), bool(merge_nonleaf)
        self.include_buffers = bool(include_buffers)
        self.norms: list[float] = []
        self.lam = 1.0
        self.lambdas: list[float] = []
        self.split_ranks: dict[str, dict[str, int]] = {}

    def hparams(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "zero_diagonal": self.zero_diagonal, "merge_nonleaf": self.merge_nonleaf,
                "include_buffers": self.include_buffers}

    def setup(self, pretrained: nn.Module, ctx: MergeContext | None = None) -> None:
        super().setup(pretrained, ctx)
        self.keys = merge_keys(pretrained, self.theta0, self.include_buffers)
        params = {n for n, _ in pretrained.named_parameters(remove_duplicate=False)}
        leaves = leaf_owned(pretrained)
        self.projected: dict[str, str] = {}
        for spec in self.ctx.modules:
            if spec.key not in self.theta0:
                raise MergeInputError(f"opcm: module {spec.name!r} has no weight {spec.key!r} in the model")
            if spec.key in self.keys and self.theta0[spec.key].ndim in (2, 4):
                self.projected[spec.key] = spec.name
        # buffers are never owned by a module's parameters; they are treated as leaf entries
        self.not_visited = [k for k in self.keys if k in params and k not in leaves and k not in self.projected]
        self.merged, self.norms, self.lam, self.lambdas, self.split_ranks = {}, [], 1.0, [], {}

    # ------------------------------------------------------------------ update
    def _tau(self, finetuned: StateDict) -> dict[str, torch.Tensor]:
        out = {}
        for k in self.keys:
            a = self.theta0[k]
            dt = compute_dtype(a)
            out[k] = finetuned[k].to(dt) - a.to(dt)
        return out

    @staticmethod
    def _norm(parts: dict[str, torch.Tensor]) -> float:
        return math.sqrt(sum(float(v.double().pow(2).sum()) for v in parts.values()))

    def _absorb(self, task: str, finetuned: StateDict) -> None:
        tau = self._tau(finetuned)
        self.norms.append(self._norm(tau))
        if not self.tasks:
            self.merged = {k: self.theta0[k].to(tau[k].dtype) + tau[k] for k in self.keys}
            self.lam = 1.0
            self.lambdas = [1.0]
            return
        mean_norm = sum(self.norms) / len(self.norms)
        skip = set(self.not_visited) if not self.merge_nonleaf else set()
        dev = self.ctx.device
        ranks: dict[str, int] = {}
        new_delta: dict[str, torch.Tensor] = {}
        for k in self.keys:
            base = self.theta0[k].to(self.merged[k].dtype)
            delta = self.merged[k] - base
            if k in skip:
                new_delta[k] = delta
                continue
            t = tau[k]
            if k in self.projected:
                d_mat, t_mat = as_matrix(delta).to(dev), as_matrix(t).to(dev)
                proj, ranks[self.projected[k]] = project_task_vector(d_mat, t_mat, self.alpha, self.zero_diagonal)
                t = from_matrix(proj.to(device=t.device, dtype=t.dtype), t)
            new_delta[k] = self.lam * delta + t
        n_prime = self._norm(new_delta)
        if n_prime > 0 and mean_norm > 0:
            self.lam = n_prime / mean_norm
            scale = mean_norm / n_prime
        else:
            self.lam, scale = 1.0, 0.0
        self.merged = {k: self.theta0[k].to(v.dtype) + v * scale for k, v in new_delta.items()}
        self.lambdas.append(self.lam)
        self.split_ranks[task] = ranks

    # ------------------------------------------------------------------ state
    def summary(self) -> dict[str, Any]:
        return {"lambda_per_step": list(self.lambdas), "sqrt_t": [math.sqrt(i + 1) for i in range(len(self.lambdas))],
                "task_vector_norms": list(self.norms), "projected_modules": len(self.projected),
                "not_merged_after_step1": [] if self.merge_nonleaf else list(self.not_visited),
                "split_rank_mean_per_task": {t: (sum(r.values()) / len(r) if r else 0.0)
                                             for t, r in self.split_ranks.items()}}

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, _ = super()._state()
        return tensors, {"norms": list(self.norms), "lam": self.lam, "lambdas": list(self.lambdas),
                         "split_ranks": self.split_ranks, "summary": self.summary()}

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super()._restore(tensors, meta)
        self.norms = [float(v) for v in meta["norms"]]
        self.lam = float(meta["lam"])
        self.lambdas = [float(v) for v in meta["lambdas"]]
        self.split_ranks = {t: {m: int(r) for m, r in d.items()} for t, d in meta.get("split_ranks", {}).items()}


__all__ = ["OPCM", "leaf_owned", "project_task_vector", "split_rank"]
