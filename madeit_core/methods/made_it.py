"""MADE-IT (the paper): manifold-aware expert evolution with implicit routing. Data-free.

Absorbing a model runs one step of expert evolution (:mod:`madeit_core.experts`); the model to
evaluate is θ0 wrapped with the bank for routed inference (:mod:`madeit_core.routing`), sharing
the process-wide :func:`~madeit_core.activation_cache.shared_activation_cache` (on the CPU:
θ0's module inputs on batches seen before; results identical with it off, ``MADEIT_ACTIVATION_CACHE_MB=0``).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from madeit_core.activation_cache import shared_activation_cache
from madeit_core.experts import EvolutionConfig, ExpertBank
from madeit_core.methods import register
from madeit_core.methods.base import ContinualMethod, MergeContext
from madeit_core.routing import Aggregation, AnchorRule, RoutedModel, check_anchor_rule
from madeit_core.statedict import StateDict


@register
class MadeIt(ContinualMethod):
    """MADE-IT with every open choice of method.md as a keyword (see :class:`EvolutionConfig`);
    ``aggregation`` is the FPA token aggregation (mean, cls, token_mean); ``anchor`` the anchor
    rule of the implicit routing: ``experts`` (the paper's) or ``signed`` (modules whose input has
    a negative entry anchor first; see :mod:`madeit_core.routing` for why the paper's rule fails
    on the offline convnet)."""

    name = "made_it"
    needs_data = False

    def __init__(self, aggregation: Aggregation = "mean", anchor: AnchorRule = "experts", **evolution: Any) -> None:
        super().__init__()
        check_anchor_rule(anchor)
        self.config = EvolutionConfig(**evolution)
        self.aggregation: Aggregation = aggregation
        self.anchor: AnchorRule = anchor
        self.bank: ExpertBank | None = None
        self._routed: RoutedModel | None = None

    def setup(self, pretrained: nn.Module, ctx: MergeContext | None = None) -> None:
        super().setup(pretrained, ctx)
        self.bank = ExpertBank(self.ctx.modules, self.config)
        self._routed = None

    def _absorb(self, task: str, finetuned: StateDict) -> None:
        assert self.bank is not None
        self.bank.absorb(task, self.theta0, finetuned, validated=True)   # base.absorb checked it
        self._routed = None

    def merged_model(self) -> nn.Module:
        assert self.bank is not None and self.pretrained is not None
        if self._routed is None:
            on_cpu = torch.device(self.ctx.device).type == "cpu"
            cache = shared_activation_cache() if on_cpu else None
            self._routed = RoutedModel(self.pretrained.to(self.ctx.device), self.bank, self.aggregation,
                                       anchor=self.anchor, activation_cache=cache,
                                       theta0_tag=self._theta0_fingerprint() if on_cpu else None)
        return self._routed

    def save_artifacts(self, folder: str | Path) -> None:
        assert self.bank is not None
        self.bank.save(folder)

    def hparams(self) -> dict[str, Any]:
        return {**asdict(self.config), "aggregation": self.aggregation, "anchor": self.anchor}

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        assert self.bank is not None
        tensors, meta = self.bank.to_tensors_and_meta()
        return tensors, {"bank": meta, "summary": self.bank.summary()}

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.bank = ExpertBank.from_tensors_and_meta(tensors, meta["bank"])
        self._routed = None
