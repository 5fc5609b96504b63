"""EfficientNet-Lite0: the real ImageNet weights load into our model code and classify photos right."""

from __future__ import annotations

import pytest
import torch

from madeit_core.backbones.efficientnet import (
    EfficientNetLite0Adapter,
    efficientnet_lite0,
    load_imagenet_state_dict,
)

skimage_data = pytest.importorskip("skimage.data")

# ImageNet-1k indices (the standard class list): 281 tabby, 282 tiger cat, 285 Egyptian cat;
# 967 espresso, 968 cup.
CAT_CLASSES = {281, 282, 285}
COFFEE_CLASSES = {967, 968}


@pytest.fixture(scope="module")
def imagenet_model() -> torch.nn.Module:
    return efficientnet_lite0(pretrained=True, num_classes=1000)


def _top(model: torch.nn.Module, adapter: EfficientNetLite0Adapter, name: str) -> tuple[int, float]:
    img = torch.from_numpy(getattr(skimage_data, name)())[None]
    with torch.no_grad():
        p = model(adapter.preprocess(img)).softmax(-1)[0]
    return int(p.argmax()), float(p.max())


def test_keys_and_shapes_match_the_package() -> None:
    sd = load_imagenet_state_dict()
    model = efficientnet_lite0(pretrained=False, num_classes=1000)
    ours = model.state_dict()
    assert set(ours) == set(sd)
    assert all(ours[k].shape == sd[k].shape for k in sd)
    assert sum(v.numel() for k, v in sd.items() if not k.endswith("num_batches_tracked")) == sum(
        p.numel() for p in model.parameters()) + sum(b.numel() for n, b in model.named_buffers()
                                                    if not n.endswith("num_batches_tracked"))


def test_imagenet_classes_of_sample_photos(imagenet_model: torch.nn.Module) -> None:
    adapter = EfficientNetLite0Adapter(224)
    cls, p = _top(imagenet_model, adapter, "chelsea")
    assert cls == 285 and p > 0.5, (cls, p)  # Egyptian cat
    cls, p = _top(imagenet_model, adapter, "coffee")
    assert cls == 967 and p > 0.5, (cls, p)  # espresso


def test_symmetric_padding_option_also_right_but_less_sure(imagenet_model: torch.nn.Module) -> None:
    adapter = EfficientNetLite0Adapter(224, padding="symmetric")
    model = efficientnet_lite0(pretrained=True, num_classes=1000, padding="symmetric")
    cls, p_sym = _top(model, adapter, "chelsea")
    assert cls in CAT_CLASSES
    _, p_tf = _top(imagenet_model, EfficientNetLite0Adapter(224), "chelsea")
    assert p_tf > p_sym  # the weights were trained with TF "SAME" padding
    assert _top(model, adapter, "coffee")[0] in COFFEE_CLASSES


def test_random_init_does_not_classify(imagenet_model: torch.nn.Module) -> None:
    torch.manual_seed(0)
    model = efficientnet_lite0(pretrained=False, num_classes=1000).eval()
    cls, p = _top(model, EfficientNetLite0Adapter(224), "chelsea")
    assert p < 0.05


def test_encoder_and_modules() -> None:
    adapter = EfficientNetLite0Adapter(32)
    enc = adapter.build(pretrained=True)
    x = adapter.preprocess(torch.randint(0, 255, (2, 28, 28, 1), dtype=torch.uint8))
    assert x.shape == (2, 3, 32, 32)
    with torch.no_grad():
        assert enc(x).shape == (2, 1280)
    specs = adapter.modules(enc)
    groups = [s.group for s in specs]
    assert groups.count("project") == 16 and groups.count("expand") == 15 and groups.count("head") == 1
    assert all(s.kind == "conv1x1" for s in specs)
    assert specs[-1].name == "_conv_head" and specs[-1].depth == 16
    assert [s.depth for s in specs] == sorted(s.depth for s in specs)
    sd = {"module._fc.weight": torch.zeros(1), "module._conv_stem.weight": torch.zeros(1)}
    assert set(adapter.normalise_keys(sd)) == {"_conv_stem.weight"}


@pytest.mark.parametrize("size", [15, 16, 17])
@pytest.mark.parametrize("kernel, stride", [(3, 1), (5, 1), (3, 2), (5, 2)])
def test_same_padding_shortcut_is_exact(kernel: int, stride: int, size: int) -> None:
    """SameConv2d's TF "SAME" padding: the symmetric shortcut (conv's own padding) and the padded
    copy give the same numbers bit for bit, in both memory formats, and the shapes TF gives."""
    import math

    import torch.nn.functional as F

    from madeit_core.backbones.efficientnet import SameConv2d

    torch.manual_seed(0)
    conv = SameConv2d(8, 8, kernel, stride=stride, groups=8).eval()
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(4, 8, size, size + 1).contiguous(memory_format=fmt)
        pads = []
        for n in (x.shape[-1], x.shape[-2]):
            total = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
            pads += [total // 2, total - total // 2]
        with torch.no_grad():
            want = F.conv2d(F.pad(x, pads), conv.weight, None, stride, 0, 1, 8)
            got = conv(x)
        assert got.shape == (4, 8, math.ceil(size / stride), math.ceil((size + 1) / stride))
        assert torch.equal(got, want)


def test_explicit_same_padding_trains_through_the_padded_copy() -> None:
    """Inside ``explicit_same_padding`` a stride-1 SameConv2d pads a copy (the path the zoo's recipe 2
    checkpoints were trained on): its weight gradient is the padded copy's bit for bit. The block
    restores the shortcut afterwards, also when it raises."""
    import torch.nn.functional as F

    from madeit_core.backbones import efficientnet as E

    torch.manual_seed(0)
    conv = E.SameConv2d(8, 8, 3, stride=1, groups=8)
    x = torch.randn(4, 8, 16, 16)
    g_out = torch.randn(4, 8, 16, 16)

    def weight_grad(fn) -> torch.Tensor:
        conv.weight.grad = None
        fn().backward(g_out)
        return conv.weight.grad.clone()

    copy_grad = weight_grad(lambda: F.conv2d(F.pad(x, [1, 1, 1, 1]), conv.weight, None, 1, 0, 1, 8))
    with E.explicit_same_padding():
        assert E._explicit_padding
        assert torch.equal(weight_grad(lambda: conv(x)), copy_grad)
    assert not E._explicit_padding
    with pytest.raises(RuntimeError), E.explicit_same_padding():
        raise RuntimeError("boom")
    assert not E._explicit_padding
    with torch.no_grad(), E.explicit_same_padding():
        inside = conv(x)
    assert torch.equal(inside, conv(x).detach())   # forward: the same numbers either way


def test_explicit_same_padding_switches_the_path(monkeypatch) -> None:
    """The shortcut skips F.pad on symmetric padding; inside the block every such conv pads a copy."""
    from madeit_core.backbones import efficientnet as E

    calls = []
    real_pad = E.F.pad
    monkeypatch.setattr(E.F, "pad", lambda *a, **k: calls.append(1) or real_pad(*a, **k))
    conv = E.SameConv2d(4, 4, 3, stride=1, groups=4)
    x = torch.randn(1, 4, 8, 8)
    conv(x)
    assert calls == []
    with E.explicit_same_padding():
        conv(x)
    assert calls == [1]
