"""The one interface every continual merging method implements.

A method is set up once with the pre-trained model θ0 and a :class:`MergeContext`, then absorbs
fine-tuned models one at a time (``absorb``) and gives, at any point, a model to evaluate
(``merged_model``). Its whole state can be saved and restored (``state``/``restore``), which is
how the protocol resumes a killed run with identical numbers.

Methods that need data (test-time adaptation, calibration) get it only through the context's
callbacks, and record what they saw in ``data_used`` so results files can say it plainly.
"""

from __future__ import annotations

import copy
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from madeit_core.errors import MergeInputError
from madeit_core.modules import ModuleSpec, discover_modules
from madeit_core.statedict import (
    ModelLike,
    StateDict,
    as_state_dict,
    check_compatible,
    check_pretrained,
    state_fingerprint,
)
from madeit_core.timing import timed

# features (B × D) -> logits (B × C) for one task; a frozen, task-specific classification head.
Head = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class MergeContext:
    """Everything a method may know besides the models themselves.

    - ``modules``: the linear modules of the backbone (from its adapter); discovered from the
      model when empty.
    - ``num_tasks``: size of the task group (Task Arithmetic's λ depends on it, as in the
      reference scripts).
    - ``heads``: task → frozen head, for methods whose losses need logits.
    - ``unlabeled_samples(task, per_class, seed)``: images of a task's *test* split chosen per class
      (labels used only for the stratified choice, as the references do); returns a tensor.
    - ``labeled_samples(task, n, seed)``: (images, labels) from the *train* split (ODE-M).
    - ``seed``: the run's seed; ``step_seed(step)`` derives the seed of one absorb step so a
      resumed run draws exactly the same numbers.
    """

    modules: list[ModuleSpec] = field(default_factory=list)
    num_tasks: int | None = None
    device: str = "cpu"
    seed: int = 0
    heads: Mapping[str, Head] = field(default_factory=dict)
    unlabeled_samples: Callable[[str, int, int], torch.Tensor] | None = None
    labeled_samples: Callable[[str, int, int], tuple[torch.Tensor, torch.Tensor]] | None = None
    show_progress: bool = True

    def step_seed(self, step: int) -> int:
        digest = hashlib.sha256(f"{self.seed}:{step}".encode()).digest()
        return int.from_bytes(digest[:4], "little")


class ContinualMethod(ABC):
    """Base class: holds θ0 (as a module and a state dict), the modules and the step count."""

    name: ClassVar[str] = "base"
    #: True when the method needs data at merge time (the book's "data" column).
    needs_data: ClassVar[bool] = False

    def __init__(self) -> None:
        self.pretrained: nn.Module | None = None
        self.theta0: StateDict = {}
        self.ctx = MergeContext()
        self.tasks: list[str] = []
        self.data_used: dict[str, Any] = {}

    # ----------------------------------------------------------------- lifecycle
    def setup(self, pretrained: nn.Module, ctx: MergeContext | None = None) -> None:
        """Keep θ0 and the context. Must be called before the first ``absorb``."""
        if not isinstance(pretrained, nn.Module):
            raise MergeInputError(f"setup needs the pre-trained nn.Module, got {type(pretrained).__name__}")
        self.pretrained = pretrained
        self._theta0_fp: str | None = None
        self.theta0 = {k: v.detach().clone() for k, v in as_state_dict(pretrained, "pre-trained model").items()}
        check_pretrained(self.theta0)
        self.ctx = ctx if ctx is not None else MergeContext()
        if not self.ctx.modules:
            self.ctx.modules = discover_modules(pretrained)
        self.tasks = []
        self.data_used = {}

    def absorb(self, task: str, finetuned: ModelLike) -> None:
        """Fold the fine-tuned model of ``task`` into the merged state."""
        if self.pretrained is None:
            raise MergeInputError(f"{self.name}: call setup(pretrained, ctx) before absorb")
        if task in self.tasks:
            raise MergeInputError(f"{self.name}: duplicate task name {task!r}")
        with timed("validate"):
            sd = as_state_dict(finetuned, f"fine-tuned model of {task!r}")
            check_compatible(self.theta0, sd, f"fine-tuned model of {task!r}")
        self._absorb(task, sd)
        self.tasks.append(task)

    @abstractmethod
    def _absorb(self, task: str, finetuned: StateDict) -> None:
        """Method-specific update; ``finetuned`` is validated against θ0."""

    @abstractmethod
    def merged_model(self) -> nn.Module:
        """A model to evaluate now (images → features), on ``ctx.device``."""

    def model_for_task(self, task: str) -> nn.Module:
        """The model the protocol evaluates on ``task``. Every merging method returns its one
        merged model (task-agnostic inference); only the non-merging reference rows (e.g. the
        individual fine-tuned models) override this."""
        return self.merged_model()

    def save_artifacts(self, folder: str | Path) -> None:
        """Write what the figures need beyond the results file (MADE-IT: its bank). No-op here."""
        return None

    def eval_fingerprint(self, task: str) -> str | None:
        """A hash that fixes the model ``model_for_task(task)`` would return, or None.

        Methods whose evaluated model is a plain set of weights on θ0's module return the hash of
        those weights, so the protocol can reuse an evaluation it has already made of the very same
        weights (θ0 in every order, the same fine-tuned model, order-independent merges such as SWA
        and TA after the last step). None (the default) means: always evaluate.
        """
        return None

    def _theta0_fingerprint(self) -> str:
        fp: str | None = getattr(self, "_theta0_fp", None)
        if fp is None:
            fp = state_fingerprint(self.theta0)
            self._theta0_fp = fp
        return fp

    # ----------------------------------------------------------------- state
    def hparams(self) -> dict[str, Any]:
        """Hyper-parameters, for results files."""
        return {}

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able meta) capturing everything ``absorb`` has changed."""
        tensors, meta = self._state()
        meta = dict(meta)
        meta["tasks"] = list(self.tasks)
        meta["data_used"] = self.data_used
        return tensors, meta

    def restore(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Inverse of ``state`` (after ``setup``)."""
        self.tasks = list(meta["tasks"])
        self.data_used = dict(meta.get("data_used", {}))
        self._restore(dict(tensors), dict(meta))

    @abstractmethod
    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]: ...

    @abstractmethod
    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None: ...

    # ----------------------------------------------------------------- helpers
    def model_with(self, sd: Mapping[str, torch.Tensor]) -> nn.Module:
        """A copy of the pre-trained module carrying the weights ``sd`` (cast to θ0's dtypes)."""
        assert self.pretrained is not None
        model = copy.deepcopy(self.pretrained)
        full = dict(self.theta0)
        full.update({k: v.to(self.theta0[k].dtype) for k, v in sd.items()})
        model.load_state_dict(full)
        return model.to(self.ctx.device).eval()

    @property
    def module_keys(self) -> list[str]:
        return [m.key for m in self.ctx.modules]


class StaticMergeMethod(ContinualMethod):
    """A method whose merged model is a single set of weights ``self.merged`` (a state dict)."""

    def __init__(self) -> None:
        super().__init__()
        self.merged: StateDict = {}

    def eval_fingerprint(self, task: str) -> str | None:
        if not self.merged:
            return self._theta0_fingerprint()
        return hashlib.sha256((self._theta0_fingerprint() + state_fingerprint(self.merged)).encode()).hexdigest()

    def merged_model(self) -> nn.Module:
        return self.model_with(self.merged if self.merged else self.theta0)

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {f"merged.{k}": v for k, v in self.merged.items()}, {}

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.merged = {k[len("merged."):]: v for k, v in tensors.items() if k.startswith("merged.")}
