"""Continual weight averaging (baselines.md §1): θ^(t) = ((t−1) θ^(t−1) + θ_t) / t.

Every floating-point tensor is averaged (the reference averages only parameters with
``requires_grad``; for CLIP loaded with ``from_pretrained`` that is the same set).
"""

from __future__ import annotations

from madeit_core.methods import register
from madeit_core.methods.base import StaticMergeMethod
from madeit_core.statedict import StateDict, compute_dtype


@register
class ContinualWeightAveraging(StaticMergeMethod):
    name = "swa"

    def _absorb(self, task: str, finetuned: StateDict) -> None:
        t = len(self.tasks) + 1
        for k, v in finetuned.items():
            if not v.is_floating_point():
                continue
            new = v.to(compute_dtype(v))
            self.merged[k] = new.clone() if t == 1 else self.merged[k] + (new - self.merged[k]) / t
