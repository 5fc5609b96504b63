"""The two non-merging reference rows of Table 1 (baselines.md §9.4): "Pre-Trained" and
"Fine-Tuned".

- ``pretrained``: θ0 evaluated on every task; absorbing a model changes nothing.
- ``individual``: each task is evaluated with its *own* fine-tuned model θ_t
  (``model_for_task``), so a_{T,j} = a_{j,j} and BWT = 0. Every absorbed state dict is kept
  (O(T) models, in the state too, so a resumed run evaluates the same weights).
  ``merged_model()`` returns the newest task's model (there is no merged model).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from madeit_core.errors import MergeInputError
from madeit_core.methods import register
from madeit_core.methods.base import ContinualMethod
from madeit_core.statedict import StateDict


@register
class PretrainedReference(ContinualMethod):
    """θ^(t) = θ0 for every t."""

    name = "pretrained"

    def _absorb(self, task: str, finetuned: StateDict) -> None:
        return None

    def merged_model(self) -> nn.Module:
        return self.model_with(self.theta0)

    def summary(self) -> dict[str, Any]:
        return {"note": "pre-trained model θ0 on every task; no merging"}

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"summary": self.summary()}

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        return None


@register
class IndividualReference(ContinualMethod):
    """Task j is evaluated with its own fine-tuned model θ_j."""

    name = "individual"

    def __init__(self) -> None:
        super().__init__()
        self.models: dict[str, StateDict] = {}

    def _absorb(self, task: str, finetuned: StateDict) -> None:
        self.models[task] = {k: v.detach().cpu().clone() for k, v in finetuned.items()}

    def model_for_task(self, task: str) -> nn.Module:
        if task not in self.models:
            raise MergeInputError(f"individual: no fine-tuned model absorbed for task {task!r}; "
                                  f"have {sorted(self.models)}")
        return self.model_with(self.models[task])

    def merged_model(self) -> nn.Module:
        if not self.tasks:
            return self.model_with(self.theta0)
        return self.model_for_task(self.tasks[-1])

    def summary(self) -> dict[str, Any]:
        return {"note": "each task evaluated with its own fine-tuned model; no merging",
                "models_kept": len(self.models)}

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"{i}.{k}": v for i, t in enumerate(self.tasks) for k, v in self.models[t].items()}
        return tensors, {"summary": self.summary()}

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.models = {}
        for i, t in enumerate(self.tasks):
            prefix = f"{i}."
            sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if set(sd) != set(self.theta0):
                raise MergeInputError(f"individual: saved state lacks the full model of task {t!r}")
            self.models[t] = sd


__all__ = ["IndividualReference", "PretrainedReference"]
