"""Adapter for open_clip vision towers (the original task-vector checkpoints, Ilharco et al.).

The encoder is the ``visual`` tower of an ``open_clip`` CLIP model (``VisionTransformer``): images
→ ``pooled @ proj`` = CLIP image features ``[B, embed_dim]``. Unlike the Hugging Face encoder, the
projection ``proj`` is a parameter *of the tower* here (the task-vector checkpoints fine-tune it),
so it is an *other* parameter that methods treat like any non-module tensor.

The in-projection. open_clip's blocks use ``nn.MultiheadAttention``: q, k and v come from one
packed **bare parameter** ``attn.in_proj_weight`` ``[3d, d]`` (+ ``in_proj_bias``), and
``F.multi_head_attention_forward`` reads ``attn.out_proj.weight`` directly without ever calling
``out_proj`` as a module. Left as is, in_proj would not be a module at all, and any forward hook or
wrapper on ``out_proj`` (MADE-IT's routed low-rank updates, WEMoE/MINGLE experts) would silently do
nothing — which is why ``madeit_core.methods._lowrank_moe.bypassed_by_parent`` makes WEMoE and
MINGLE skip MHA's out_proj, and WEMoE folds bare attention parameters into its task arithmetic.

This adapter removes the problem at the source: :func:`split_attention` replaces every
``nn.MultiheadAttention`` of the tower by :class:`SplitInProjAttention`, which computes the same
function (checked by the tests to float precision) with ``in_proj`` as a real ``nn.Linear(d, 3d)``
— one module of shape 3d × d (q, k, v stacked, in MHA's packing order) — and calls ``out_proj`` as
a module. Every method then sees four attention modules per block (in_proj, out_proj) plus the two
MLP modules (``mlp.c_fc``, ``mlp.c_proj``), and hooks fire on all of them. The only visible change
is the key name: ``attn.in_proj_weight`` ↔ ``attn.in_proj.weight`` (and ``_bias`` ↔ ``.bias``),
translated by :meth:`OpenCLIPVisionAdapter.normalise_keys` (checkpoint → encoder) and
:meth:`OpenCLIPVisionAdapter.export_keys` (encoder → open_clip form).

Checkpoints accepted by ``normalise_keys``: a bare visual-tower state dict, a full open_clip CLIP
state dict (``visual.`` prefix; the text tower is dropped) and the task-vector ``ImageEncoder`` form
(``model.visual.`` prefix). The task-vector repository saves whole pickled modules; load one with its
own code and save ``.state_dict()`` first (this library only unpickles plain tensors).
"""

from __future__ import annotations

import copy
import json
import logging
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from madeit_core.backbones.base import BackboneAdapter
from madeit_core.backbones.hf_clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess
from madeit_core.errors import MergeInputError
from madeit_core.modules import ModuleSpec, discover_modules

_BLOCK_PAT = re.compile(r"(?:^|\.)resblocks\.(\d+)\.")
_IN_PROJ_NATIVE = re.compile(r"\.attn\.in_proj_(weight|bias)$")
_IN_PROJ_SPLIT = re.compile(r"\.attn\.in_proj\.(weight|bias)$")


class SplitInProjAttention(nn.Module):
    """Self-attention equal to ``nn.MultiheadAttention`` (no dropout, no bias_k/v, no zero attention),
    with the packed in-projection as a module ``in_proj = nn.Linear(d, 3d)`` and ``out_proj``
    called as a module. Takes MHA's call signature; self-attention only (query = key = value)."""

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True, batch_first: bool = True) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise MergeInputError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.batch_first = embed_dim, num_heads, batch_first
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> SplitInProjAttention:
        """The same attention, weights copied (same dtype and device)."""
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn or mha.dropout:
            raise MergeInputError("only plain self-attention MultiheadAttention (same q/k/v dims, no bias_k/v, "
                                  "no zero attention, no dropout) can be split")
        w = mha.in_proj_weight
        new = cls(mha.embed_dim, mha.num_heads, bias=mha.in_proj_bias is not None, batch_first=mha.batch_first)
        new = new.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.in_proj.weight.copy_(w)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                new.in_proj.bias.copy_(mha.in_proj_bias)
            if mha.out_proj.bias is not None and new.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new

    def to_mha(self) -> nn.MultiheadAttention:
        """Back to an ``nn.MultiheadAttention`` holding the same weights."""
        w = self.in_proj.weight
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, bias=self.in_proj.bias is not None,
                                    batch_first=self.batch_first).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            mha.in_proj_weight.copy_(w)
            mha.out_proj.weight.copy_(self.out_proj.weight)
            if self.in_proj.bias is not None:
                mha.in_proj_bias.copy_(self.in_proj.bias)
                mha.out_proj.bias.copy_(self.out_proj.bias)
        return mha

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise NotImplementedError("SplitInProjAttention does self-attention only (key and value must be query)")
        if need_weights:
            raise NotImplementedError("SplitInProjAttention does not return attention weights")
        x = query if self.batch_first else query.transpose(0, 1)
        unbatched = x.ndim == 2
        if unbatched:
            x = x[None]
        b, n, d = x.shape
        h = self.num_heads
        q, k, v = self.in_proj(x).view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        mask = None
        if attn_mask is not None:   # MHA: bool True = not allowed; float = added to the scores
            mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(q.dtype)
            if mask.ndim == 3:
                mask = mask.view(b, h, n, n)
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        if key_padding_mask is not None:  # True = ignore that key
            pad = key_padding_mask.view(b, 1, 1, n)
            pad = (torch.zeros(pad.shape, dtype=q.dtype, device=q.device).masked_fill(pad, float("-inf"))
                   if pad.dtype == torch.bool else pad.to(q.dtype))
            mask = pad if mask is None else mask + pad
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, d))
        if unbatched:
            out = out[0]
        return (out if self.batch_first else out.transpose(0, 1)), None


def split_attention(model: nn.Module) -> int:
    """Replace, in place, every splittable ``nn.MultiheadAttention`` of ``model`` by
    :class:`SplitInProjAttention`; returns how many were replaced."""
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.MultiheadAttention)]
    count = 0
    for name, mod in targets:
        if not mod._qkv_same_embed_dim:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SplitInProjAttention.from_mha(mod))
        count += 1
    return count


def _write_local_config(folder: Path, model_cfg: Mapping[str, Any]) -> str:
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": dict(model_cfg)}), encoding="utf-8")
    return f"local-dir:{folder}"


class OpenCLIPVisionAdapter(BackboneAdapter):
    """Adapter of open_clip vision towers (see the module docstring).

    ``model_name``/``pretrained``: an open_clip architecture and weight tag (``"ViT-B-32"``,
    ``"openai"``) for ``build(pretrained=True)``. ``model_cfg``: an open_clip model config dict
    (``embed_dim``, ``vision_cfg``, ``text_cfg``, optional ``quick_gelu``) to build a random model
    from instead, without any download (tests use a tiny one). ``seed`` fixes the random init.
    """

    mean = OPENAI_CLIP_MEAN
    std = OPENAI_CLIP_STD

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str = "openai",
                 model_cfg: Mapping[str, Any] | None = None, seed: int = 0, cache_dir: str | None = None) -> None:
        self.model_name, self.pretrained_tag, self.seed, self.cache_dir = model_name, pretrained, seed, cache_dir
        self._cfg = copy.deepcopy(dict(model_cfg)) if model_cfg is not None else None
        self._keys: list[str] | None = None
        self.name = f"open_clip_vision:{model_name}:{pretrained}" if model_cfg is None else "open_clip_vision:custom"

    # ------------------------------------------------------------------ config
    @property
    def model_cfg(self) -> dict[str, Any]:
        if self._cfg is None:
            import open_clip

            cfg = open_clip.get_model_config(self.model_name)
            if cfg is None:
                raise MergeInputError(f"open_clip has no model config {self.model_name!r}")
            self._cfg = copy.deepcopy(dict(cfg))
        return self._cfg

    @property
    def feature_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def image_size(self) -> int:
        size = self.model_cfg["vision_cfg"].get("image_size", 224)
        return int(size if isinstance(size, int) else size[0])

    # ------------------------------------------------------------------ build
    def create_clip_model(self, pretrained: bool = True) -> nn.Module:
        """The full open_clip model (both towers): pre-trained, or randomly initialised from the
        config (``seed``), through ``open_clip.create_model`` in both cases."""
        import open_clip

        if pretrained:  # pragma: no cover - downloads the weights
            if self._cfg is not None:
                raise MergeInputError("a custom model_cfg has no pre-trained weights; use build(pretrained=False)")
            return open_clip.create_model(self.model_name, pretrained=self.pretrained_tag,
                                          cache_dir=self.cache_dir).eval()
        with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(self.seed)
            if self._cfg is None:
                model = open_clip.create_model(self.model_name, pretrained=None, pretrained_text=False)
            else:  # open_clip logs "no weights found" warnings on the root logger: expected here
                previous = logging.root.manager.disable
                logging.disable(logging.WARNING)
                try:
                    model = open_clip.create_model(_write_local_config(Path(tmp), self._cfg), pretrained_text=False)
                finally:
                    logging.disable(previous)
        return model.eval()

    def build(self, pretrained: bool = True) -> nn.Module:
        """The vision tower with its attention split (see the module docstring)."""
        return self.encoder_from_clip(self.create_clip_model(pretrained))

    def encoder_from_clip(self, clip_model: nn.Module) -> nn.Module:
        """A deep copy of ``clip_model.visual`` with :func:`split_attention` applied."""
        visual = copy.deepcopy(clip_model.visual)
        split_attention(visual)
        return visual.eval()

    # ------------------------------------------------------------------ modules
    def modules(self, model: nn.Module) -> list[ModuleSpec]:
        """in_proj (3d × d) and out_proj (attention), c_fc and c_proj (mlp); depth = block index."""
        native = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
        if native:
            raise MergeInputError(
                f"{native[0]!r} is an nn.MultiheadAttention: its in_proj_weight is a bare parameter and it never "
                "calls out_proj as a module, so neither can carry experts or hooks; build the encoder with "
                "OpenCLIPVisionAdapter.build()/encoder_from_clip() or call split_attention(model) first")
        specs = []
        for s in discover_modules(model):
            m = _BLOCK_PAT.search(s.name)
            depth = int(m.group(1)) if m else -1
            leaf = s.name.rpartition(".")[2]
            group = ("attention" if leaf in ("in_proj", "out_proj") and ".attn" in f".{s.name}"
                     else "mlp" if leaf in ("c_fc", "c_proj") else "other")
            specs.append(ModuleSpec(name=s.name, key=s.key, d_out=s.d_out, d_in=s.d_in, kind=s.kind, group=group,
                                    depth=depth))
        return specs

    def preprocess(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        return clip_preprocess(images, self.image_size, self.mean, self.std)

    # ------------------------------------------------------------------ keys
    def state_keys(self) -> list[str]:
        """The encoder's state-dict keys (the tower is built on the meta device: no memory)."""
        if self._keys is None:
            import open_clip

            cfg = {k: v for k, v in self.model_cfg.items() if k != "custom_text"}
            with torch.device("meta"):
                visual = open_clip.CLIP(**cfg).visual
                split_attention(visual)
            self._keys = list(visual.state_dict().keys())
        return list(self._keys)

    def normalise_keys(self, sd: Mapping[str, torch.Tensor], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Map an open_clip checkpoint onto the encoder's keys (see the module docstring); raises
        :class:`MergeInputError` naming the culprit key when a key has no place in the encoder,
        two keys collide, or a key is missing."""
        expected = list(model.state_dict().keys()) if model is not None else self.state_keys()
        want = set(expected)
        full = any(k.startswith("visual.") or ".visual." in k for k in sd)
        out: dict[str, torch.Tensor] = {}
        origin: dict[str, str] = {}
        for key, value in sd.items():
            if full:
                if not (key.startswith("visual.") or ".visual." in key):
                    continue   # text tower, logit scale, ... of a full model
                new = key[key.rindex("visual.") + len("visual."):]
            else:
                new = key
            new = _IN_PROJ_NATIVE.sub(lambda m: f".attn.in_proj.{m.group(1)}", new)
            if new not in want:
                hint = f" (read as {new!r})" if new != key else ""
                raise MergeInputError(f"checkpoint key {key!r}{hint} is not a parameter of the open_clip vision "
                                      f"encoder {self.name}; expected keys like {expected[0]!r}")
            if new in out:
                raise MergeInputError(f"checkpoint keys {origin[new]!r} and {key!r} both map to {new!r}")
            out[new], origin[new] = value, key
        missing = [k for k in expected if k not in out]
        if missing:
            raise MergeInputError(f"checkpoint lacks {len(missing)} key(s) of the open_clip vision encoder, e.g. "
                                  f"{missing[0]!r}")
        return {k: out[k] for k in expected}

    @staticmethod
    def export_keys(sd: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
        """The encoder's state dict in open_clip's own form (``attn.in_proj_weight``), each key
        prefixed with ``prefix`` (``"visual."`` for a CLIP model, ``"model.visual."`` for the
        task-vector ``ImageEncoder``)."""
        return {prefix + _IN_PROJ_SPLIT.sub(lambda m: f".attn.in_proj_{m.group(1)}", k): v for k, v in sd.items()}


def open_clip_text_encoder(clip_model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor],
                           device: str = "cpu", batch_size: int = 256) -> Callable[[list[str]], torch.Tensor]:
    """``texts → encode_text(tokenizer(texts))`` (projected, not normalised) for zero-shot heads."""

    @torch.no_grad()
    def encode(texts: list[str]) -> torch.Tensor:
        clip_model.to(device).eval()
        outs = [clip_model.encode_text(tokenizer(list(texts[i:i + batch_size])).to(device)).float().cpu()
                for i in range(0, len(texts), batch_size)]
        return torch.cat(outs)

    return encode


#: a tiny open_clip config for tests (no download): 2 vision blocks of width 32, 4 heads, 32×32
#: images; a 1-block text tower of width 32 with open_clip's own vocabulary (49408 tokens, so the
#: bundled ``SimpleTokenizer`` works) and 32-token contexts
TINY_OPEN_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1},
}
