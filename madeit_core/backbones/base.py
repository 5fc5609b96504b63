"""The backbone-adapter interface.

An adapter knows one family of image encoders: how to build it (pre-trained or randomly
initialised), which of its parameters are *modules* (linear maps on feature vectors) and how
they group for the figures, how to turn the data mirror's uint8 images into its input, and how
to normalise checkpoint key names. Methods and the protocol never hard-code parameter names:
they ask the adapter.

The encoder an adapter builds maps images ``[B, 3, S, S]`` (float, already normalised by
``preprocess``) to features ``[B, feature_dim]``; task heads act on those features.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
from torch import nn

from madeit_core.modules import ModuleSpec, discover_modules


class BackboneAdapter(ABC):
    """One family of encoders (EfficientNet-Lite0, HF CLIP vision, open_clip, the toy ViT)."""

    #: short identifier used in cache keys and results files
    name: str = "backbone"

    @property
    @abstractmethod
    def feature_dim(self) -> int:
        """Dimension of the features the encoder returns."""

    @property
    @abstractmethod
    def image_size(self) -> int:
        """Side of the square input images the encoder expects."""

    @abstractmethod
    def build(self, pretrained: bool = True) -> nn.Module:
        """A fresh encoder: with the real pre-trained weights, or randomly initialised (tests)."""

    def modules(self, model: nn.Module) -> list[ModuleSpec]:
        """The encoder's linear modules, shallow to deep, with group and depth for the figures.

        The default discovers every ``nn.Linear`` and 1×1 ``nn.Conv2d``; adapters refine the
        grouping.
        """
        return discover_modules(model)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, H, W, C]`` (C = 1 or 3) → float ``[N, 3, S, S]`` normalised for the encoder.

        The default converts grey to RGB, resizes bilinearly to ``image_size`` and scales to
        [0, 1] then standardises with ``mean``/``std``.
        """
        x = images
        if x.ndim == 3:
            x = x[..., None]
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                                          align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def normalise_keys(self, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a checkpoint's key names onto the encoder's own (identity by default)."""
        return dict(sd)
