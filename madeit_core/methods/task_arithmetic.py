"""Continual Task Arithmetic (baselines.md §2): θ^(t) = θ^(t−1) + λ (θ_t − θ0), θ^(0) = θ0.

After t tasks θ^(t) = θ0 + λ Σ_{i≤t} τ_i (up to float rounding of the running sum, which is the
reference's form). The first model is θ0 + λ τ_1, not the fine-tuned model.

λ (``scaling_factor``) is fixed in advance from the size of the task group, as the published
scripts do [ref]: 0.3 for 8 tasks, 0.1 for 14 and 20 (``ctx.num_tasks``). Other sizes (the toy and
offline groups) use T ≤ 8 → 0.3, T > 8 → 0.1; without ``num_tasks`` the config default 0.3 is used.
An explicit ``scaling_factor`` overrides all of this.

Merged entries: every floating-point *parameter* of the model, whether or not it requires grad
(the reference merges the parameters with ``requires_grad``; for CLIP loaded with
``from_pretrained`` that is all of them, baselines.md §1 (f)). Float buffers stay at θ0, as in the
reference, unless ``include_buffers=True``; non-float entries are equal to θ0 by validation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from madeit_core.errors import MergeInputError
from madeit_core.methods import register
from madeit_core.methods.base import MergeContext, StaticMergeMethod
from madeit_core.statedict import StateDict, compute_dtype


def merge_keys(model: nn.Module, theta0: Mapping[str, torch.Tensor], include_buffers: bool = False) -> list[str]:
    """The state-dict keys a static rival merges, in state-dict order: every floating-point
    parameter (``requires_grad`` ignored), plus the float buffers when ``include_buffers``."""
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return [k for k, v in theta0.items() if v.is_floating_point() and (include_buffers or k in params)]


def scaling_for_group(num_tasks: int | None, default: float) -> tuple[float, str]:
    """(λ, why) from the group size, as the OPCM and MINGLE scripts set it (baselines.md §2 (c),
    §3 (c)): 0.3 for T ≤ 8, 0.1 for T > 8 (the scripts have 8, 14 and 20); ``default`` without T."""
    if num_tasks is None:
        return default, "config default (no num_tasks in the context)"
    if num_tasks <= 8:
        return 0.3, f"group-size rule: num_tasks={num_tasks} ≤ 8 → 0.3"
    return 0.1, f"group-size rule: num_tasks={num_tasks} > 8 → 0.1"


def check_scaling(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise MergeInputError(f"{name}: scaling_factor must be a number, got {value!r}") from exc
    if not torch.isfinite(torch.tensor(v)):
        raise MergeInputError(f"{name}: scaling_factor must be finite, got {value!r}")
    return v


@register
class ContinualTaskArithmetic(StaticMergeMethod):
    """θ^(t) = θ^(t−1) + λ τ_t over the merged keys (baselines.md §2 (b))."""

    name = "task_arithmetic"

    def __init__(self, scaling_factor: float | None = None, include_buffers: bool = False) -> None:
        super().__init__()
        self.scaling_factor = check_scaling(self.name, scaling_factor)
        self.include_buffers = bool(include_buffers)
        self.lam: float | None = None
        self.lam_source = ""
        self.keys: list[str] = []

    def hparams(self) -> dict[str, Any]:
        return {"scaling_factor": self.scaling_factor, "include_buffers": self.include_buffers,
                "resolved_scaling_factor": self.lam, "scaling_factor_source": self.lam_source}

    def setup(self, pretrained: nn.Module, ctx: MergeContext | None = None) -> None:
        super().setup(pretrained, ctx)
        if self.scaling_factor is not None:
            self.lam, self.lam_source = self.scaling_factor, "explicit"
        else:
            self.lam, self.lam_source = scaling_for_group(self.ctx.num_tasks, 0.3)
        self.keys = merge_keys(pretrained, self.theta0, self.include_buffers)
        self.merged = {}

    def _absorb(self, task: str, finetuned: StateDict) -> None:
        assert self.lam is not None
        for k in self.keys:
            a = self.theta0[k]
            dt = compute_dtype(a)
            tau = finetuned[k].to(dt) - a.to(dt)
            base = self.merged[k] if k in self.merged else a.to(dt)
            self.merged[k] = base + self.lam * tau

    def summary(self) -> dict[str, Any]:
        return {"scaling_factor": self.lam, "scaling_factor_source": self.lam_source, "merged_keys": len(self.keys)}

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, _ = super()._state()
        return tensors, {"lambda": self.lam, "summary": self.summary()}

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super()._restore(tensors, meta)
        if meta.get("lambda") is not None and meta["lambda"] != self.lam:
            raise MergeInputError(f"task_arithmetic: saved state used λ = {meta['lambda']}, this run resolves "
                                  f"λ = {self.lam}; refusing to resume a different configuration")


__all__ = ["ContinualTaskArithmetic", "check_scaling", "merge_keys", "scaling_for_group"]
