"""What the protocol needs from a task suite: the :class:`Benchmark` protocol and shared helpers.

A benchmark provides the pre-trained encoder, each task's fine-tuned weights and frozen head,
evaluation, and the data callbacks that data-hungry rivals may use. The offline zoo
(``madeit_core.zoo``), the CLIP setting and the toy benchmark (``madeit_core.toy``) implement it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from madeit_core.methods.base import Head
from madeit_core.modules import ModuleSpec


@runtime_checkable
class Benchmark(Protocol):
    """A suite of tasks with a shared pre-trained encoder (see module docstring)."""

    tasks: list[str]

    def pretrained(self) -> nn.Module: ...

    def finetuned(self, task: str) -> dict[str, torch.Tensor]: ...

    def head(self, task: str) -> Head: ...

    def modules(self) -> list[ModuleSpec]: ...

    def evaluate(self, model: nn.Module, task: str) -> dict[str, Any]: ...

    def unlabeled_samples(self, task: str, per_class: int, seed: int) -> torch.Tensor: ...

    def labeled_samples(self, task: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def describe(self) -> dict[str, Any]: ...


def seed_subset(labels: Sequence[int], per_class: int, seed: int) -> list[int]:
    """Indices of a class-stratified subset (baselines.md §0.4, "seed subset").

    Indices are grouped by label in order of first appearance; from each group ``per_class`` are
    drawn without replacement with Python's ``random.sample`` (all of a smaller group). The
    reference continues the global ``random`` stream after the task-order shuffle; here a
    dedicated ``random.Random(seed)`` makes each subset independent of call order (documented
    difference: same distribution, different draws).
    """
    rng = random.Random(seed)
    groups: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        groups.setdefault(int(y), []).append(i)
    out: list[int] = []
    for idx in groups.values():
        out.extend(idx if len(idx) <= per_class else rng.sample(idx, per_class))
    return out


@torch.no_grad()
def evaluate_classifier(model: nn.Module, head: Head, x: torch.Tensor, y: torch.Tensor,
                        batch_size: int = 128, device: str = "cpu") -> dict[str, Any]:
    """Micro accuracy and mean cross-entropy of ``head(model(x))`` (baselines.md §9.4)."""
    model.eval()
    correct, loss, n = 0, 0.0, int(y.numel())
    for i in range(0, n, batch_size):
        xb = x[i:i + batch_size].to(device)
        yb = y[i:i + batch_size].to(device)
        logits = head(model(xb))
        correct += int((logits.argmax(-1) == yb).sum())
        loss += float(nn.functional.cross_entropy(logits.float(), yb, reduction="sum"))
    return {"accuracy": correct / max(n, 1), "loss": loss / max(n, 1), "n": n}
