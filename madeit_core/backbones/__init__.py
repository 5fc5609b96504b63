"""Backbone adapters: EfficientNet-Lite0, Hugging Face CLIP vision, open_clip, and the toy ViT."""

from madeit_core.backbones.base import BackboneAdapter

__all__ = ["BackboneAdapter"]
