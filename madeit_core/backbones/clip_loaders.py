"""Every access to pre-trained CLIP models and fine-tuned checkpoints, behind one small interface.

A :class:`CLIPLoader` gives the CLIP benchmark (:mod:`madeit_core.clip_benchmark`) two things:

- :meth:`~CLIPLoader.load_pretrained`: the parts of the pre-trained model the benchmark needs
  (:class:`CLIPParts`: the backbone adapter, the vision encoder θ0, the text tower as a function
  ``texts → embeddings`` for the zero-shot heads, and ``exp(logit_scale)``);
- :meth:`~CLIPLoader.load_checkpoint`: a fine-tuned checkpoint's state dict from its reference
  (a hub id or a local file/folder), with the checkpoint's own key names (the adapter normalises
  them).

Implementations:

- :class:`HFCLIPLoader`: Hugging Face ``transformers`` CLIP (``CLIPModel.from_pretrained`` and
  ``AutoTokenizer.from_pretrained`` of a hub id such as ``openai/clip-vit-base-patch32`` *or a
  local folder*); checkpoints through :func:`load_checkpoint_ref` (``huggingface_hub``
  ``snapshot_download`` for hub ids: the FusionBench ``tanganke/clip-vit-base-patch32_<task>``).
- :class:`OpenCLIPLoader`: ``open_clip`` (``create_model(name, pretrained=tag)``, or a
  ``local-dir:<folder>`` holding ``open_clip_config.json`` and weights) and its tokenizer;
  checkpoints are local state-dict files (the task-vector checkpoints are pickled modules: save
  their ``state_dict()`` first).
- :class:`madeit_core.backbones.tiny_clip.TinyHFCLIPLoader`: a tiny random CLIP built in memory
  (offline smoke profile).

The tests substitute tiny random models saved to temporary folders, so the real loading code
(``from_pretrained``, ``create_model``, tokenizers, checkpoint files) runs offline; only the
downloads themselves are not exercised here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from madeit_core.backbones.base import BackboneAdapter
from madeit_core.backbones.hf_clip import HFCLIPVisionAdapter, hf_logit_scale, hf_text_encoder
from madeit_core.backbones.zero_shot import TextEncoder
from madeit_core.errors import MergeInputError
from madeit_core.io import load_checkpoint

log = logging.getLogger(__name__)


@dataclass
class CLIPParts:
    """What the CLIP benchmark needs from a pre-trained CLIP model."""

    adapter: BackboneAdapter
    encoder: nn.Module           # the pre-trained vision encoder θ0 (images → projected features)
    encode_text: TextEncoder     # the pre-trained text tower + projection, for zero-shot heads
    logit_scale: float           # exp(logit_scale): 100 for OpenAI CLIP


@runtime_checkable
class CLIPLoader(Protocol):
    """Access to one pre-trained CLIP model and its fine-tuned checkpoints (module docstring)."""

    #: what results files record as the pre-trained model (hub id, folder or description)
    model_name: str

    def load_pretrained(self, device: str = "cpu") -> CLIPParts: ...

    def load_checkpoint(self, ref: str) -> Mapping[str, torch.Tensor]: ...


def load_checkpoint_ref(ref: str, cache_dir: str | None = None, local_files_only: bool = False,
                        revision: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict from a local file or folder (:func:`madeit_core.io.load_checkpoint`), else from
    the hub repository ``ref``: ``huggingface_hub.snapshot_download`` of its ``*.safetensors`` and
    ``*.json`` (or, if it has no safetensors, its ``*.bin``), into the Hugging Face cache."""
    if Path(ref).exists():
        return load_checkpoint(ref)
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with transformers
        raise MergeInputError(f"checkpoint {ref!r} is not a local path and huggingface_hub is not installed") from exc
    try:  # pragma: no cover - needs the hub or a filled cache
        folder = Path(snapshot_download(ref, allow_patterns=["*.json", "*.safetensors"], cache_dir=cache_dir,
                                        local_files_only=local_files_only, revision=revision))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(ref, allow_patterns=["*.json", "*.bin"], cache_dir=cache_dir,
                                            local_files_only=local_files_only, revision=revision))
    except Exception as exc:
        raise MergeInputError(
            f"checkpoint {ref!r} is neither a local file/folder nor reachable on the Hugging Face hub "
            f"({type(exc).__name__}: {exc}); with no internet, fill the cache elsewhere "
            "(`huggingface-cli download <id>`) and set HF_HUB_OFFLINE=1") from exc
    return load_checkpoint(folder)  # pragma: no cover


def hf_parts(adapter: HFCLIPVisionAdapter, clip_model: nn.Module, tokenizer: Callable[..., Any],
             device: str = "cpu") -> CLIPParts:
    """The benchmark parts of a ``transformers`` ``CLIPModel`` and its tokenizer."""
    clip_model.eval()
    return CLIPParts(adapter=adapter, encoder=adapter.encoder_from_clip(clip_model),
                     encode_text=hf_text_encoder(clip_model, tokenizer, device=device),
                     logit_scale=hf_logit_scale(clip_model))


class HFCLIPLoader:
    """Hugging Face CLIP: ``model_name`` is a hub id (``openai/clip-vit-base-patch32``) or a local
    folder written by ``CLIPModel.save_pretrained`` (with its tokenizer files).

    ``tokenizer``: use this tokenizer instead of ``AutoTokenizer.from_pretrained(model_name)``.
    ``cache_dir``/``local_files_only``/``revision`` go to every ``from_pretrained`` and download.
    """

    def __init__(self, model_name: str = "openai/clip-vit-base-patch32", cache_dir: str | None = None,
                 local_files_only: bool = False, revision: str | None = None,
                 tokenizer: Callable[..., Any] | None = None) -> None:
        self.model_name = model_name
        self.cache_dir, self.local_files_only, self.revision = cache_dir, local_files_only, revision
        self.tokenizer = tokenizer

    def load_pretrained(self, device: str = "cpu") -> CLIPParts:
        adapter = HFCLIPVisionAdapter(self.model_name, cache_dir=self.cache_dir,
                                      local_files_only=self.local_files_only, revision=self.revision)
        try:
            clip = adapter.load_clip_model()
            tokenizer = self.tokenizer if self.tokenizer is not None else adapter.load_tokenizer()
        except OSError as exc:
            raise MergeInputError(
                f"cannot load the CLIP model {self.model_name!r} ({exc}); it must be a hub id reachable from here, "
                "a model in the Hugging Face cache (HF_HOME, with HF_HUB_OFFLINE=1 when offline) or a local folder "
                "written by CLIPModel.save_pretrained with its tokenizer") from exc
        return hf_parts(adapter, clip, tokenizer, device=device)

    def load_checkpoint(self, ref: str) -> dict[str, torch.Tensor]:
        return load_checkpoint_ref(ref, cache_dir=self.cache_dir, local_files_only=self.local_files_only)


def open_clip_model_cfg(model_name: str) -> dict[str, Any]:
    """The open_clip model config of a built-in architecture name or a ``local-dir:<folder>``."""
    import open_clip

    if model_name.startswith("local-dir:"):
        f = Path(model_name[len("local-dir:"):]) / "open_clip_config.json"
        if not f.is_file():
            raise MergeInputError(f"{model_name!r}: no open_clip_config.json in that folder")
        cfg = json.loads(f.read_text(encoding="utf-8")).get("model_cfg")
        if not isinstance(cfg, Mapping):
            raise MergeInputError(f"{f} has no 'model_cfg' entry")
        return dict(cfg)
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise MergeInputError(f"open_clip has no model config {model_name!r}")
    return dict(cfg)


class OpenCLIPLoader:
    """open_clip: ``model_name`` is an architecture (``ViT-B-32``) with weight tag ``pretrained``
    (``openai``), or ``local-dir:<folder>`` holding ``open_clip_config.json`` and the weights
    (``pretrained`` is then ignored).

    When the weight tag was trained with QuickGELU (the OpenAI weights) and the architecture name
    does not say so, QuickGELU is forced, as older open_clip versions (and the task-vector code)
    did implicitly; open_clip 3.x would otherwise build GELU blocks and only warn.
    Checkpoints (:meth:`load_checkpoint`) are local state-dict files or folders.
    """

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = "openai",
                 cache_dir: str | None = None) -> None:
        self.model_name, self.pretrained, self.cache_dir = model_name, pretrained, cache_dir

    def load_pretrained(self, device: str = "cpu") -> CLIPParts:
        import open_clip

        from madeit_core.backbones.open_clip_adapter import OpenCLIPVisionAdapter, open_clip_text_encoder

        cfg = open_clip_model_cfg(self.model_name)
        local = self.model_name.startswith("local-dir:")
        tag = None if local else self.pretrained
        quick = bool(cfg.get("quick_gelu")) or bool(
            tag and (open_clip.get_pretrained_cfg(self.model_name, tag) or {}).get("quick_gelu"))
        try:
            model = open_clip.create_model(self.model_name, pretrained=tag, cache_dir=self.cache_dir,
                                           force_quick_gelu=quick, pretrained_text=False,
                                           require_pretrained=bool(tag) or local)
        except (OSError, RuntimeError) as exc:
            raise MergeInputError(f"cannot load open_clip model {self.model_name!r} with weights {tag!r}: {exc}") \
                from exc
        cfg["quick_gelu"] = quick
        adapter = OpenCLIPVisionAdapter(self.model_name, str(tag), model_cfg=cfg, cache_dir=self.cache_dir)
        adapter.name = f"open_clip_vision:{self.model_name}:{tag}"
        tokenizer = open_clip.get_tokenizer(self.model_name, cache_dir=self.cache_dir)
        return CLIPParts(adapter=adapter, encoder=adapter.encoder_from_clip(model.eval()),
                         encode_text=open_clip_text_encoder(model, tokenizer, device=device),
                         logit_scale=float(model.logit_scale.detach().float().exp()))

    def load_checkpoint(self, ref: str) -> dict[str, torch.Tensor]:
        if not Path(ref).exists():
            raise MergeInputError(f"open_clip checkpoint {ref!r} does not exist (open_clip checkpoints are local "
                                  "state-dict files; the task-vector checkpoints are pickled modules: load one with "
                                  "its own code and torch.save its state_dict() first)")
        return load_checkpoint(ref)
