"""Discovery of the *modules* MADE-IT works on: parameters that act as linear maps on features.

A module is the weight of an ``nn.Linear`` (d_out × d_in) or of a 1×1, ungrouped ``nn.Conv2d``
(reshaped to d_out × d_in). Everything else is an *other* parameter (method.md, Notation).
Backbone adapters (``madeit_core.backbones``) may refine the group (attention / mlp / conv / other)
and depth used by the figures; :func:`discover_modules` gives a generic answer for any model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

ATTENTION_PAT = re.compile(r"(attn|attention|q_proj|k_proj|v_proj|out_proj|query|key|value|qkv)", re.I)
MLP_PAT = re.compile(r"(mlp|fc1|fc2|c_fc|c_proj|ffn|intermediate|feed_forward)", re.I)


@dataclass(frozen=True)
class ModuleSpec:
    """One linear module: its module path, its weight key, shape and figure grouping."""

    name: str          # module path, e.g. "encoder.layers.3.mlp.fc1"
    key: str           # state-dict key of the weight, e.g. "encoder.layers.3.mlp.fc1.weight"
    d_out: int
    d_in: int
    kind: str          # "linear" or "conv1x1"
    group: str         # "attention", "mlp", "conv" or "other" (for figures)
    depth: int         # block index (for figures), -1 if unknown

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @staticmethod
    def from_dict(d: Mapping[str, object]) -> ModuleSpec:
        return ModuleSpec(**d)  # type: ignore[arg-type]


def guess_group(name: str, kind: str) -> str:
    if ATTENTION_PAT.search(name):
        return "attention"
    if MLP_PAT.search(name):
        return "mlp"
    return "conv" if kind == "conv1x1" else "other"


def guess_depth(name: str) -> int:
    m = re.search(r"\.(\d+)\.", f".{name}.")
    return int(m.group(1)) if m else -1


def is_linear_module(mod: nn.Module) -> str | None:
    """'linear' or 'conv1x1' when ``mod`` is a linear map on feature vectors, else None."""
    if isinstance(mod, nn.Linear):
        return "linear"
    if isinstance(mod, nn.Conv2d) and mod.kernel_size == (1, 1) and mod.groups == 1:
        return "conv1x1"
    return None


def discover_modules(model: nn.Module) -> list[ModuleSpec]:
    """All linear modules of ``model`` in forward-definition order (shallow to deep)."""
    specs = []
    for name, mod in model.named_modules():
        kind = is_linear_module(mod)
        if kind is None or getattr(mod, "weight", None) is None:
            continue
        w = mod.weight
        d_out, d_in = int(w.shape[0]), int(w.shape[1])
        specs.append(ModuleSpec(name=name, key=f"{name}.weight" if name else "weight", d_out=d_out,
                                d_in=d_in, kind=kind, group=guess_group(name, kind),
                                depth=guess_depth(name)))
    return specs


def modules_from_state_dict(sd: Mapping[str, torch.Tensor],
                            include: str | None = None, exclude: str | None = None) -> list[ModuleSpec]:
    """Guess the linear modules of a bare state dict (no model at hand).

    A ``*.weight`` entry is a module when it is 2-D, or 4-D with a 1×1 kernel, and its key does
    not look like an embedding or a norm. ``include``/``exclude`` are regular expressions on the
    key that override the guess (``madeit merge --include/--exclude``).
    """
    skip = re.compile(r"(embed|position|norm|ln_|layernorm|bn\d*\.|\.bn\.|token)", re.I)
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    specs = []
    for key, t in sd.items():
        if not key.endswith("weight") or not t.is_floating_point():
            continue
        if t.ndim == 2:
            kind = "linear"
        elif t.ndim == 4 and t.shape[2:] == (1, 1):
            kind = "conv1x1"
        else:
            continue
        if inc is not None:
            if not inc.search(key):
                continue
        elif skip.search(key):
            continue
        if exc is not None and exc.search(key):
            continue
        name = key[: -len(".weight")] if key.endswith(".weight") else key
        specs.append(ModuleSpec(name=name, key=key, d_out=int(t.shape[0]), d_in=int(t.shape[1]),
                                kind=kind, group=guess_group(name, kind), depth=guess_depth(name)))
    return specs


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """View a Linear weight or a 1×1 conv weight as a d_out × d_in matrix."""
    return t.reshape(t.shape[0], t.shape[1]) if t.ndim == 4 else t


def from_matrix(m: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return m.reshape(like.shape)
