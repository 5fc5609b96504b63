"""Tiny randomly initialised CLIP models with the real key names, for offline tests and smoke runs.

- :func:`tiny_clip_tokenizer`: a real ``transformers`` ``CLIPTokenizer`` with a byte-level vocabulary
  and no merges (every character one token; 514 tokens), so no vocabulary file is downloaded.
- :func:`tiny_hf_clip`: a ``CLIPModel`` (vision: hidden 32, 2 layers, 4 heads, patch 8, 32×32
  images; text: hidden 32, 2 layers, 77 positions; embeddings of size 16; exp(logit_scale) = 100)
  and that tokenizer. :func:`save_tiny_hf_clip` writes both to a folder that
  ``CLIPModel.from_pretrained`` / ``AutoTokenizer.from_pretrained`` read like a hub model.
- :func:`save_tiny_open_clip`: an open_clip ``local-dir:`` folder (config + safetensors weights) of
  :data:`~madeit_core.backbones.open_clip_adapter.TINY_OPEN_CLIP_CFG`.
- :func:`random_finetuned`: a stand-in "fine-tuned" state dict θ0 + δ with small random δ.
- :class:`TinyHFCLIPLoader`: a :class:`~madeit_core.backbones.clip_loaders.CLIPLoader` that builds
  the tiny CLIP in memory and serves :func:`random_finetuned` checkpoints (smoke profile).

Nothing computed with these models is a result about real data.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from madeit_core.backbones.clip_loaders import CLIPParts, hf_parts
from madeit_core.backbones.hf_clip import HFCLIPVisionAdapter
from madeit_core.io import save_tensors

TINY_CONTEXT = 77


def _byte_chars() -> list[str]:
    """The 256 printable characters GPT-2/CLIP byte-level BPE uses for the bytes 0..255."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    out, extra = dict.fromkeys(range(256)), 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def tiny_clip_tokenizer() -> Any:
    """A ``CLIPTokenizer`` with a 514-token byte-level vocabulary (start, end, 256 bytes, 256 bytes
    ending a word) and no merges; ``model_max_length`` = 77 like OpenAI CLIP."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    chars = _byte_chars()
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TINY_CONTEXT)


def tiny_clip_config(vocab_size: int = 514) -> Any:
    """The ``CLIPConfig`` of :func:`tiny_hf_clip` (start/end/pad ids of :func:`tiny_clip_tokenizer`)."""
    from transformers import CLIPConfig

    text = {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": TINY_CONTEXT, "bos_token_id": 0,
            "eos_token_id": 1, "pad_token_id": 1}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "patch_size": 8, "image_size": 32}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16,
                      logit_scale_init_value=math.log(100.0))


def tiny_hf_clip(seed: int = 0) -> tuple[nn.Module, Any]:
    """A tiny random ``CLIPModel`` (seeded) and :func:`tiny_clip_tokenizer`."""
    from transformers import CLIPModel

    tokenizer = tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(tiny_clip_config(len(tokenizer))).eval()
    return model, tokenizer


def save_tiny_hf_clip(folder: str | Path, seed: int = 0) -> Path:
    """Write :func:`tiny_hf_clip` with ``save_pretrained`` (model and tokenizer) to ``folder``."""
    folder = Path(folder)
    model, tokenizer = tiny_hf_clip(seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_open_clip(folder: str | Path, seed: int = 0) -> str:
    """Write a random open_clip model of ``TINY_OPEN_CLIP_CFG`` as an open_clip ``local-dir`` folder
    (``open_clip_config.json`` + ``open_clip_model.safetensors``); returns ``"local-dir:<folder>"``."""
    from madeit_core.backbones.open_clip_adapter import TINY_OPEN_CLIP_CFG, OpenCLIPVisionAdapter

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = OpenCLIPVisionAdapter(model_cfg=TINY_OPEN_CLIP_CFG, seed=seed).create_clip_model(pretrained=False)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP_CFG}), encoding="utf-8")
    save_tensors(folder / "open_clip_model.safetensors", {k: v.contiguous() for k, v in model.state_dict().items()})
    return f"local-dir:{folder}"


def random_finetuned(theta0: Mapping[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """θ0 + δ, δ ~ N(0, (scale · std θ0[k])²) per floating tensor k (0.02 for constant tensors),
    drawn from ``torch.Generator().manual_seed(seed)`` in key order; other tensors copied."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in theta0.items():
        if v.is_floating_point():
            std = float(v.float().std()) if v.numel() > 1 else 0.0
            std = std if std > 0 else 0.02
            out[k] = v + (scale * std * torch.randn(v.shape, generator=g)).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


class TinyHFCLIPLoader:
    """A :class:`~madeit_core.backbones.clip_loaders.CLIPLoader` of :func:`tiny_hf_clip`, built in
    memory; ``load_checkpoint(ref)`` = :func:`random_finetuned` of θ0 with a seed derived from
    ``seed`` and the CRC32 of ``ref`` (so each task gets its own fixed random task vector)."""

    def __init__(self, seed: int = 0, delta_scale: float = 0.05) -> None:
        self.seed, self.delta_scale = seed, delta_scale
        self.model_name = f"tiny-random-clip(seed={seed})"
        self._theta0: dict[str, torch.Tensor] | None = None

    def load_pretrained(self, device: str = "cpu") -> CLIPParts:
        model, tokenizer = tiny_hf_clip(self.seed)
        adapter = HFCLIPVisionAdapter(config=model.config)
        adapter.name = "hf_clip_vision:tiny-random"
        parts = hf_parts(adapter, model, tokenizer, device=device)
        self._theta0 = {k: v.detach().clone() for k, v in parts.encoder.state_dict().items()}
        return parts

    def load_checkpoint(self, ref: str) -> dict[str, torch.Tensor]:
        if self._theta0 is None:
            self.load_pretrained()
        assert self._theta0 is not None
        return random_finetuned(self._theta0, 1_000_003 * (self.seed + 1) + zlib.crc32(ref.encode()),
                                self.delta_scale)
