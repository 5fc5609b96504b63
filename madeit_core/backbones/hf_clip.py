"""Adapter for Hugging Face CLIP vision towers (``transformers``): ViT-B/32, B/16, L/14.

The encoder (:class:`CLIPVisionEncoder`) maps images to CLIP *image features*: the pooled output
(``post_layernorm`` of the class token) times the transposed ``visual_projection`` weight, exactly
as ``CLIPModel.get_image_features`` computes them (baselines.md §0.3). The projection comes from
the *pre-trained* CLIP model (``CLIPModel.visual_projection``; the FusionBench fine-tuned
checkpoints are ``CLIPVisionModel``s and do not contain one) and is held as a non-persistent
buffer: it is not in the encoder's state dict, so no method ever merges it and fine-tuned
checkpoints never need it (baselines.md §0.1: text tower, projections and logit scale are never
merged).

Key names. The encoder's state dict has the keys of the vision transformer itself, without any
prefix (``encoder.layers.0.self_attn.q_proj.weight``): the form of ``CLIPVisionModel`` in
transformers ≥ 5. Checkpoints saved by transformers < 5 (all FusionBench checkpoints) prefix every
key with ``vision_model.``; a full ``CLIPModel`` state dict adds the text tower, the two
projections and ``logit_scale``. :meth:`HFCLIPVisionAdapter.normalise_keys` accepts all of these
(and any leading wrapper prefix such as ``model.vision_model.``) and
:meth:`HFCLIPVisionAdapter.export_keys` writes either form back.

Modules (baselines.md §0.2): per layer ``self_attn.{q,k,v,out}_proj`` (group ``attention``) and
``mlp.fc1``/``mlp.fc2`` (group ``mlp``), depth = the layer index. The patch embedding (a 32×32
conv), the class and position embeddings and the LayerNorms are *other* parameters.

Nothing here downloads anything unless ``build(pretrained=True)`` / :meth:`load_clip_model` is
called; the tests build tiny random models from a ``CLIPVisionConfig``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from madeit_core.backbones.base import BackboneAdapter
from madeit_core.errors import MergeInputError
from madeit_core.modules import ModuleSpec, discover_modules

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: Vision-tower sizes of the three OpenAI CLIP models of the paper (so that feature_dim,
#: image_size and the key list are known without touching the hub).
KNOWN_VISION_CONFIGS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-base-patch32": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                     "num_attention_heads": 12, "patch_size": 32, "image_size": 224,
                                     "projection_dim": 512},
    "openai/clip-vit-base-patch16": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                     "num_attention_heads": 12, "patch_size": 16, "image_size": 224,
                                     "projection_dim": 512},
    "openai/clip-vit-large-patch14": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                                      "num_attention_heads": 16, "patch_size": 14, "image_size": 224,
                                      "projection_dim": 768},
}

_LAYER_PAT = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_ATTN_PAT = re.compile(r"\.(q_proj|k_proj|v_proj|out_proj)$")
_MLP_PAT = re.compile(r"\.(fc1|fc2)$")
# keys of a CLIPModel / CLIPVisionModelWithProjection checkpoint that are not the vision body
_NOT_VISION = re.compile(r"(^|\.)(text_model\.|text_projection|visual_projection|logit_scale)")


# ----------------------------------------------------------------------------- preprocessing
def clip_preprocess(images: torch.Tensor | Sequence[torch.Tensor], size: int,
                    mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD) -> torch.Tensor:
    """CLIP's image preprocessing on uint8 images: ``[N, H, W, C]`` (C = 1 or 3), ``[H, W, C]``, or a
    list of ``[H, W, C]`` images of different sizes → float ``[N, 3, size, size]``.

    As ``CLIPImageProcessor`` / open_clip's transform: resize the shorter side to ``size``
    (bicubic, antialiased), centre-crop ``size × size``, scale to [0, 1], standardise with
    ``mean``/``std``. The resize runs in torch on floats rather than in PIL on uint8, so pixels
    may differ from the reference by interpolation rounding (a documented approximation).
    """
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        batch = [images]
    elif isinstance(images, torch.Tensor):
        batch = [images[None]]
    else:
        batch = [im[None] if im.ndim == 3 else im for im in images]
    out = []
    for x in batch:
        if x.ndim == 3:
            x = x[..., None]
        x = x.permute(0, 3, 1, 2).float().div(255.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 4:
            x = x[:, :3]
        h, w = x.shape[-2:]
        if (h, w) != (size, size):
            scale = size / min(h, w)
            nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
            x = nn.functional.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False,
                                          antialias=True).clamp_(0.0, 1.0)
            top, left = (nh - size) // 2, (nw - size) // 2
            x = x[..., top:top + size, left:left + size]
        out.append(x)
    x = torch.cat(out) if len(out) > 1 else out[0]
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


# ----------------------------------------------------------------------------- encoder
class CLIPVisionEncoder(nn.Module):
    """A CLIP vision transformer that returns projected image features ``[B, projection_dim]``.

    ``body`` is the vision transformer (transformers ≥ 5: a ``CLIPVisionModel``; < 5: the
    ``CLIPVisionTransformer`` found at ``.vision_model``). Its children (``embeddings``,
    ``pre_layrnorm``, ``encoder``, ``post_layernorm``) are registered as this module's own, so
    the state dict carries exactly the body's key names; the body object itself is kept
    unregistered and called for the forward pass (it shares those children, also after
    ``copy.deepcopy`` and ``.to``). ``visual_projection`` (``[projection_dim, hidden]``, from the
    pre-trained CLIP) is a non-persistent buffer: never in the state dict, never merged.
    """

    def __init__(self, body: nn.Module, projection: torch.Tensor) -> None:
        super().__init__()
        object.__setattr__(self, "_body", body)
        for name, child in body.named_children():
            self.add_module(name, child)
        own = [n for n, _ in body.named_parameters(recurse=False)] + [n for n, _ in body.named_buffers(recurse=False)]
        if own:
            raise MergeInputError(f"vision body {type(body).__name__} holds tensors outside its children: {own}")
        hidden = int(getattr(getattr(body, "config", None), "hidden_size", projection.shape[1]))
        if projection.ndim != 2 or projection.shape[1] != hidden:
            raise MergeInputError(f"visual projection of shape {tuple(projection.shape)} does not fit hidden size "
                                  f"{hidden}")
        self.register_buffer("visual_projection", projection.detach().clone(), persistent=False)

    @property
    def config(self) -> Any:
        return getattr(self._body, "config", None)

    def pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The pooler output (``post_layernorm`` of the class token), ``[B, hidden]``."""
        out = self._body(pixel_values=pixel_values)
        return out.pooler_output if hasattr(out, "pooler_output") else out[1]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.pooled(pixel_values)
        return pooled @ self.visual_projection.to(pooled.dtype).T


def _vision_body(model: nn.Module) -> nn.Module:
    """The vision transformer inside ``CLIPVisionModel`` / ``CLIPModel.vision_model`` (any version)."""
    inner = getattr(model, "vision_model", None)
    return inner if isinstance(inner, nn.Module) else model


# ----------------------------------------------------------------------------- adapter
class HFCLIPVisionAdapter(BackboneAdapter):
    """Adapter of ``transformers`` CLIP vision towers (see the module docstring).

    ``model_name``: a hub id or local folder of a full CLIP model (the projection and the text
    tower come from it). ``config``: a ``CLIPVisionConfig`` (or dict) to build a random model
    instead (tests); by default the sizes of ``KNOWN_VISION_CONFIGS`` or the hub config.
    ``seed`` fixes the random initialisation of ``build(pretrained=False)``.
    """

    mean = OPENAI_CLIP_MEAN
    std = OPENAI_CLIP_STD

    def __init__(self, model_name: str = "openai/clip-vit-base-patch32", config: Any = None, seed: int = 0,
                 cache_dir: str | None = None, local_files_only: bool = False, revision: str | None = None) -> None:
        self.model_name = model_name
        self.seed = seed
        self.cache_dir, self.local_files_only, self.revision = cache_dir, local_files_only, revision
        self._config = self._as_config(config) if config is not None else None
        self._keys: list[str] | None = None
        self.name = f"hf_clip_vision:{model_name}" if config is None else "hf_clip_vision:custom"

    # ------------------------------------------------------------------ config
    @staticmethod
    def _as_config(config: Any) -> Any:
        from transformers import CLIPVisionConfig

        if isinstance(config, CLIPVisionConfig):
            return config
        if isinstance(config, Mapping):
            return CLIPVisionConfig(**config)
        vision = getattr(config, "vision_config", None)   # a CLIPConfig
        if vision is not None:
            cfg = CLIPVisionConfig(**vision.to_dict())
            cfg.projection_dim = int(getattr(config, "projection_dim", cfg.projection_dim))
            return cfg
        raise MergeInputError(f"expected a CLIPVisionConfig, a CLIPConfig or a dict, got {type(config).__name__}")

    @property
    def config(self) -> Any:
        """The ``CLIPVisionConfig`` of the encoder (``projection_dim`` = the CLIP embedding size)."""
        if self._config is None:
            from transformers import CLIPConfig, CLIPVisionConfig

            if self.model_name in KNOWN_VISION_CONFIGS:
                self._config = CLIPVisionConfig(**KNOWN_VISION_CONFIGS[self.model_name])
            else:  # pragma: no cover - needs the hub or a local CLIP folder
                full = CLIPConfig.from_pretrained(self.model_name, cache_dir=self.cache_dir,
                                                  local_files_only=self.local_files_only, revision=self.revision)
                self._config = self._as_config(full)
        return self._config

    @property
    def feature_dim(self) -> int:
        return int(self.config.projection_dim)

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    # ------------------------------------------------------------------ build
    def build(self, pretrained: bool = True, config: Any = None) -> nn.Module:
        """The encoder: with the pre-trained weights of ``model_name`` (hub or local cache), or
        randomly initialised from ``config`` (which then becomes this adapter's config)."""
        if pretrained:  # pragma: no cover - the real path needs the hub or a local copy
            if config is not None:
                raise MergeInputError("build(pretrained=True) takes its config from the checkpoint; pass no config")
            return self.encoder_from_clip(self.load_clip_model())
        from transformers import CLIPVisionModel

        if config is not None:
            self._config = self._as_config(config)
            self._keys = None
        cfg = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            body = _vision_body(CLIPVisionModel(copy.deepcopy(cfg)))
            proj = torch.randn(int(cfg.projection_dim), int(cfg.hidden_size)) * float(cfg.hidden_size) ** -0.5
        return CLIPVisionEncoder(body, proj).eval()

    def load_clip_model(self) -> nn.Module:  # pragma: no cover - needs the hub or a local copy
        """The full pre-trained ``CLIPModel`` (text tower, projections, logit scale) of ``model_name``."""
        from transformers import CLIPModel

        model = CLIPModel.from_pretrained(self.model_name, cache_dir=self.cache_dir,
                                          local_files_only=self.local_files_only, revision=self.revision)
        self._config = self._as_config(model.config)
        return model.eval()

    def load_tokenizer(self) -> Any:  # pragma: no cover - needs the hub or a local copy
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_name, cache_dir=self.cache_dir,
                                             local_files_only=self.local_files_only, revision=self.revision)

    def encoder_from_clip(self, clip_model: nn.Module) -> CLIPVisionEncoder:
        """The encoder of a ``CLIPModel``: a deep copy of its vision tower + its visual projection."""
        self._config = self._as_config(clip_model.config)
        self._keys = None
        body = copy.deepcopy(_vision_body(clip_model.vision_model))
        return CLIPVisionEncoder(body, clip_model.visual_projection.weight).eval()

    # ------------------------------------------------------------------ modules
    def modules(self, model: nn.Module) -> list[ModuleSpec]:
        """q/k/v/out_proj (attention) and fc1/fc2 (mlp) of every layer, depth = layer index."""
        specs = []
        for s in discover_modules(model):
            m = _LAYER_PAT.search(s.name)
            depth = int(m.group(1)) if m else -1
            group = "attention" if _ATTN_PAT.search(s.name) else "mlp" if _MLP_PAT.search(s.name) else "other"
            specs.append(ModuleSpec(name=s.name, key=s.key, d_out=s.d_out, d_in=s.d_in, kind=s.kind, group=group,
                                    depth=depth))
        return specs

    def preprocess(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """CLIP preprocessing (:func:`clip_preprocess`) at ``image_size`` with OpenAI's mean/std."""
        return clip_preprocess(images, self.image_size, self.mean, self.std)

    # ------------------------------------------------------------------ keys
    def state_keys(self) -> list[str]:
        """The encoder's state-dict keys (computed once on the meta device: no memory, no download)."""
        if self._keys is None:
            from transformers import CLIPVisionModel

            with torch.device("meta"):
                body = _vision_body(CLIPVisionModel(copy.deepcopy(self.config)))
            self._keys = list(body.state_dict().keys())
        return list(self._keys)

    @staticmethod
    def projection_from_checkpoint(sd: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """The ``visual_projection.weight`` of a full CLIP checkpoint, if it holds one."""
        for k, v in sd.items():
            if k == "visual_projection.weight" or k.endswith(".visual_projection.weight"):
                return v
        return None

    def normalise_keys(self, sd: Mapping[str, torch.Tensor], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Map a checkpoint onto the encoder's keys (no prefix; see the module docstring).

        Accepts ``CLIPVisionModel`` checkpoints of transformers < 5 (``vision_model.`` prefix) and
        ≥ 5 (no prefix), ``CLIPVisionModelWithProjection`` and full ``CLIPModel`` state dicts
        (their text tower, projections and ``logit_scale`` are dropped), any wrapper prefix ending
        in ``vision_model.``, and the ``embeddings.position_ids`` buffer some versions saved.
        Raises :class:`MergeInputError` naming the culprit key when a key has no place in the
        encoder, when two keys land on the same name, or when a key is missing.
        """
        expected = list(model.state_dict().keys()) if model is not None else self.state_keys()
        want = set(expected)
        out: dict[str, torch.Tensor] = {}
        origin: dict[str, str] = {}
        for key, value in sd.items():
            if "vision_model." in key:
                new = key.rpartition("vision_model.")[2]
            elif _NOT_VISION.search(key):
                continue   # text tower, projections, logit scale of a full CLIP checkpoint
            else:
                new = key
            if new.endswith("position_ids") and new not in want:
                continue   # a non-persistent buffer in recent transformers; saved by some versions
            if new not in want:
                hint = f" (read as {new!r})" if new != key else ""
                raise MergeInputError(f"checkpoint key {key!r}{hint} is not a parameter of the CLIP vision encoder "
                                      f"{self.name}; expected keys like {expected[0]!r}")
            if new in out:
                raise MergeInputError(f"checkpoint keys {origin[new]!r} and {key!r} both map to {new!r}")
            out[new] = value
            origin[new] = key
        missing = [k for k in expected if k not in out]
        if missing:
            raise MergeInputError(f"checkpoint lacks {len(missing)} key(s) of the CLIP vision encoder, e.g. "
                                  f"{missing[0]!r} (or 'vision_model.{missing[0]}')")
        return {k: out[k] for k in expected}

    @staticmethod
    def export_keys(sd: Mapping[str, torch.Tensor], style: str = "5.x") -> dict[str, torch.Tensor]:
        """The encoder's state dict in a ``CLIPVisionModel`` key style: ``"5.x"`` (no prefix) or
        ``"4.x"`` (``vision_model.`` prefix, also the prefix of the vision part of a ``CLIPModel``)."""
        if style == "5.x":
            return dict(sd)
        if style == "4.x":
            return {f"vision_model.{k}": v for k, v in sd.items()}
        raise MergeInputError(f"unknown key style {style!r} (4.x, 5.x)")


# ----------------------------------------------------------------------------- text tower
def hf_text_encoder(clip_model: nn.Module, tokenizer: Callable[..., Any], device: str = "cpu",
                    batch_size: int = 256) -> Callable[[list[str]], torch.Tensor]:
    """``texts → projected text embeddings [n, projection_dim]`` through a ``CLIPModel``'s text tower
    (``get_text_features``: pooled EOS token, then ``text_projection``), not normalised.

    ``tokenizer`` is called as ``tokenizer(texts, padding=True, truncation=True, return_tensors="pt")``
    and must return ``input_ids`` (and optionally ``attention_mask``), as Hugging Face tokenisers do.
    """

    @torch.no_grad()
    def encode(texts: list[str]) -> torch.Tensor:
        outs = []
        clip_model.to(device).eval()
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True, return_tensors="pt")
            kw = {"input_ids": enc["input_ids"].to(device)}
            if "attention_mask" in enc:
                kw["attention_mask"] = enc["attention_mask"].to(device)
            out = clip_model.get_text_features(**kw)
            outs.append((out if isinstance(out, torch.Tensor) else out.pooler_output).float().cpu())
        return torch.cat(outs)

    return encode


def hf_logit_scale(clip_model: nn.Module) -> float:
    """exp(logit_scale) of a ``CLIPModel`` (100 for the OpenAI models)."""
    return float(clip_model.logit_scale.detach().float().exp())
