"""CLIP zero-shot classification heads (baselines.md §0.3), for any CLIP text tower.

For every class name and every template of a task, the prompt goes through the pre-trained text
tower and its projection; each embedding is L2-normalised, the embeddings of one class are
averaged over the templates and normalised again: that is the class weight w_c. The head maps
image features z to ``exp(logit_scale) · (z / ‖z‖) Wᵀ`` (``exp(logit_scale)`` = 100 for OpenAI CLIP).

The text tower is passed in as a function ``texts → [n, P]`` (see
:func:`madeit_core.backbones.hf_clip.hf_text_encoder` and
:func:`madeit_core.backbones.open_clip_adapter.open_clip_text_encoder`), so this module knows no
model family.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from madeit_core.backbones.clip_tasks import CLIPTask
from madeit_core.errors import MergeInputError

TextEncoder = Callable[[list[str]], torch.Tensor]


class ZeroShotHead(nn.Module):
    """Frozen CLIP zero-shot classifier: logits = scale · (z / ‖z‖) Wᵀ, W = unit class embeddings."""

    def __init__(self, weight: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("scale", torch.tensor(float(scale)))

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z.float()
        return self.scale * (z / z.norm(dim=-1, keepdim=True)) @ self.weight.T


@torch.no_grad()
def zero_shot_weights(encode_text: TextEncoder, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """``[C, P]``: per class, the text embeddings of all its prompts, each L2-normalised, averaged
    over the templates and L2-normalised again."""
    if not classnames or not templates:
        raise MergeInputError("a zero-shot head needs at least one class name and one template")
    texts = [t.format(c) for c in classnames for t in templates]
    emb = encode_text(texts).float()
    if emb.ndim != 2 or emb.shape[0] != len(texts):
        raise MergeInputError(f"text encoder returned {tuple(emb.shape)} for {len(texts)} prompts")
    emb = emb.view(len(classnames), len(templates), -1)
    emb = emb / emb.norm(dim=-1, keepdim=True)
    w = emb.mean(dim=1)
    return w / w.norm(dim=-1, keepdim=True)


def zero_shot_head(encode_text: TextEncoder, task: CLIPTask, logit_scale: float) -> ZeroShotHead:
    """The zero-shot head of ``task`` (``logit_scale`` = exp of the model's logit_scale parameter)."""
    return ZeroShotHead(zero_shot_weights(encode_text, task.classnames, task.templates), logit_scale)
