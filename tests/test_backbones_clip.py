"""CLIP backbones and the CLIP benchmark on tiny random models with the real key names.

Hugging Face CLIP models are saved with ``save_pretrained`` (model and tokenizer) to a temporary
folder and read back through the real loading code; open_clip models through a ``local-dir:``
folder. Fine-tuned checkpoints are θ0 + small random deltas written in the key layouts the real
checkpoints use (transformers 4.x ``vision_model.`` prefix, 5.x without, full ``CLIPModel``,
open_clip ``visual.``/``model.visual.`` with the packed ``in_proj_weight``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from madeit_core.backbones.clip_loaders import HFCLIPLoader, OpenCLIPLoader
from madeit_core.backbones.clip_tasks import CLIP_TASKS, CLIPTask
from madeit_core.backbones.hf_clip import HFCLIPVisionAdapter, hf_text_encoder
from madeit_core.backbones.open_clip_adapter import (
    TINY_OPEN_CLIP_CFG,
    OpenCLIPVisionAdapter,
    open_clip_text_encoder,
)
from madeit_core.backbones.tiny_clip import (
    random_finetuned,
    save_tiny_hf_clip,
    save_tiny_open_clip,
    tiny_clip_config,
    tiny_hf_clip,
)
from madeit_core.backbones.zero_shot import zero_shot_head, zero_shot_weights
from madeit_core.benchmark import Benchmark
from madeit_core.benchmarks import make_benchmark
from madeit_core.clip_benchmark import CLIPBenchmark
from madeit_core.clip_data import MirrorImageData, label_map, synthetic_image_data
from madeit_core.errors import MergeInputError
from madeit_core.io import read_json, save_tensors
from madeit_core.protocol import RunSpec, run_continual

TASKS = ["svhn", "mnist", "dtd"]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def hf_clip() -> tuple[torch.nn.Module, object]:
    return tiny_hf_clip(seed=0)


@pytest.fixture(scope="module")
def hf_setting(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A tiny CLIP saved like a hub model, and one fine-tuned checkpoint per task in a different layout."""
    root = tmp_path_factory.mktemp("hf")
    folder = save_tiny_hf_clip(root / "clip-tiny", seed=0)
    clip, _ = tiny_hf_clip(seed=0)
    adapter = HFCLIPVisionAdapter(config=clip.config)
    theta0 = adapter.encoder_from_clip(clip).state_dict()
    tuned = {t: random_finetuned(theta0, seed=i + 1) for i, t in enumerate(TASKS)}
    refs = {}
    # svhn: a transformers 4.x CLIPVisionModel folder ("vision_model." prefix) with config.json
    d = root / "clip-tiny_svhn"
    save_tensors(d / "model.safetensors", adapter.export_keys(tuned["svhn"], "4.x"))
    (d / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}), encoding="utf-8")
    refs["svhn"] = str(d)
    # mnist: a transformers 5.x state dict (no prefix) as a bare safetensors file
    f = root / "clip-tiny_mnist.safetensors"
    save_tensors(f, adapter.export_keys(tuned["mnist"], "5.x"))
    refs["mnist"] = str(f)
    # dtd: a full CLIPModel (text tower, projections, logit scale) saved with save_pretrained
    full, _ = tiny_hf_clip(seed=0)
    full.vision_model.load_state_dict(tuned["dtd"])
    full.save_pretrained(root / "clip-tiny_dtd")
    refs["dtd"] = str(root / "clip-tiny_dtd")
    return {"root": root, "folder": folder, "theta0": theta0, "tuned": tuned, "refs": refs}


def _hf_bench(setting: dict[str, object], **kw: object) -> CLIPBenchmark:
    data = synthetic_image_data(TASKS, classes=3, n_test=12, n_train=12, seed=0)
    return CLIPBenchmark.from_loader(TASKS, HFCLIPLoader(str(setting["folder"])), kw.pop("refs", setting["refs"]),
                                     data, **kw)


@pytest.fixture(scope="module")
def open_clip_setting(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("oc")
    name = save_tiny_open_clip(root / "tiny-open-clip", seed=0)
    adapter = OpenCLIPVisionAdapter(model_cfg=TINY_OPEN_CLIP_CFG, seed=0)
    theta0 = adapter.build(pretrained=False).state_dict()
    refs = {}
    for i, t in enumerate(TASKS):
        sd = random_finetuned(theta0, seed=10 + i)
        prefix = "model.visual." if i % 2 else "visual."   # task-vector ImageEncoder form, full CLIP form
        path = root / f"tv_{t}" / "finetuned.safetensors"
        save_tensors(path, adapter.export_keys(sd, prefix))
        refs[t] = str(path)
    return {"name": name, "refs": refs, "theta0": theta0}


# ----------------------------------------------------------------------------- modules
def test_hf_modules_listing_and_grouping() -> None:
    adapter = HFCLIPVisionAdapter(config=tiny_clip_config())
    specs = adapter.modules(adapter.build(pretrained=False))
    want = [f"encoder.layers.{layer}.{m}" for layer in range(2)
            for m in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "mlp.fc1",
                      "mlp.fc2")]
    assert sorted(s.name for s in specs) == sorted(want)
    for s in specs:
        assert s.key == s.name + ".weight"
        assert s.depth == int(s.name.split(".")[2])
        assert s.group == ("attention" if "self_attn" in s.name else "mlp")
        assert (s.d_out, s.d_in) == {"fc1": (64, 32), "fc2": (32, 64)}.get(s.name.rsplit(".", 1)[1], (32, 32))
    # the patch embedding (an 8×8 conv), embeddings and LayerNorms are "other" parameters, not modules
    assert not any("embeddings" in s.name or "layer_norm" in s.name for s in specs)


def test_open_clip_modules_listing_grouping_and_split_attention_is_exact() -> None:
    adapter = OpenCLIPVisionAdapter(model_cfg=TINY_OPEN_CLIP_CFG, seed=0)
    clip = adapter.create_clip_model(pretrained=False)
    enc = adapter.encoder_from_clip(clip)
    specs = adapter.modules(enc)
    shapes = {"attn.in_proj": (96, 32), "attn.out_proj": (32, 32), "mlp.c_fc": (128, 32), "mlp.c_proj": (32, 128)}
    assert sorted(s.name for s in specs) == sorted(f"transformer.resblocks.{b}.{m}" for b in range(2) for m in shapes)
    for s in specs:
        leaf = s.name.split(".", 3)[3]
        assert (s.d_out, s.d_in) == shapes[leaf]
        assert s.group == ("attention" if leaf.startswith("attn") else "mlp")
        assert s.depth == int(s.name.split(".")[2])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), clip.visual(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(MergeInputError, match="MultiheadAttention"):
        adapter.modules(clip.visual)


# ----------------------------------------------------------------------------- keys
def test_hf_key_layouts_4x_5x_and_clipmodel(hf_clip: tuple[torch.nn.Module, object]) -> None:
    clip, _ = hf_clip
    adapter = HFCLIPVisionAdapter(config=clip.config)
    enc = adapter.encoder_from_clip(clip)
    sd = enc.state_dict()
    assert "encoder.layers.0.self_attn.q_proj.weight" in sd and not any(k.startswith("vision_model.") for k in sd)
    layouts = {
        "5.x": adapter.export_keys(sd, "5.x"),
        "4.x": adapter.export_keys(sd, "4.x"),
        "CLIPModel": clip.state_dict(),
        "wrapped": {f"model.vision_model.{k}": v for k, v in sd.items()},
        "position_ids": {**adapter.export_keys(sd, "4.x"),
                         "vision_model.embeddings.position_ids": torch.arange(17)[None]},
    }
    assert "text_model.embeddings.token_embedding.weight" in layouts["CLIPModel"]
    for name, layout in layouts.items():
        assert _same(adapter.normalise_keys(layout, enc), sd), name
        assert _same(adapter.normalise_keys(layout), sd), name   # keys from the config alone
    with pytest.raises(MergeInputError, match="vision_model.encoder.layers.0.bogus"):
        adapter.normalise_keys({**layouts["4.x"], "vision_model.encoder.layers.0.bogus": torch.zeros(1)}, enc)
    partial = dict(layouts["4.x"])
    partial.pop("vision_model.post_layernorm.weight")
    with pytest.raises(MergeInputError, match="post_layernorm.weight"):
        adapter.normalise_keys(partial, enc)


def test_open_clip_key_layouts() -> None:
    adapter = OpenCLIPVisionAdapter(model_cfg=TINY_OPEN_CLIP_CFG, seed=0)
    clip = adapter.create_clip_model(pretrained=False)
    enc = adapter.encoder_from_clip(clip)
    sd = enc.state_dict()
    assert "transformer.resblocks.0.attn.in_proj.weight" in sd
    full = clip.state_dict()
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in full and "token_embedding.weight" in full
    layouts = {"full CLIP": full, "ImageEncoder": {f"model.{k}": v for k, v in full.items()},
               "bare tower": clip.visual.state_dict(), "export": adapter.export_keys(sd)}
    for name, layout in layouts.items():
        assert _same(adapter.normalise_keys(layout, enc), sd), name
    assert _same(adapter.normalise_keys(adapter.export_keys(sd, "visual.")), sd)


# ----------------------------------------------------------------------------- zero-shot heads
def test_zero_shot_head_matches_hand_computation_hf(hf_clip: tuple[torch.nn.Module, object]) -> None:
    clip, tok = hf_clip
    task = CLIP_TASKS["eurosat"]
    classes = task.classnames[:4]
    w = zero_shot_weights(hf_text_encoder(clip, tok, batch_size=5), classes, task.templates)
    assert w.shape == (4, 16)
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(4))
    hand = []
    with torch.no_grad():
        for c in classes:   # one prompt at a time: no padding, no batching
            embs = []
            for t in task.templates:
                enc = tok([t.format(c)], return_tensors="pt")
                e = clip.text_projection(clip.text_model(**enc).pooler_output)[0]
                embs.append(e / e.norm())
            m = torch.stack(embs).mean(0)
            hand.append(m / m.norm())
    torch.testing.assert_close(w, torch.stack(hand), rtol=1e-5, atol=1e-5)
    sub = CLIPTask("eurosat", classes, task.templates, task.dataset, None, "test")
    head = zero_shot_head(hf_text_encoder(clip, tok), sub, float(clip.logit_scale.detach().exp()))
    z = torch.randn(5, 16)
    torch.testing.assert_close(head(z), 100.0 * (z / z.norm(dim=-1, keepdim=True)) @ torch.stack(hand).T,
                               rtol=1e-4, atol=1e-4)


def test_zero_shot_head_matches_hand_computation_open_clip() -> None:
    import open_clip

    clip = OpenCLIPVisionAdapter(model_cfg=TINY_OPEN_CLIP_CFG, seed=0).create_clip_model(pretrained=False)
    tok = open_clip.tokenize
    task = CLIP_TASKS["gtsrb"]
    classes, templates = task.classnames[:3], task.templates[:4]
    w = zero_shot_weights(open_clip_text_encoder(clip, lambda texts: tok(texts, context_length=32)), classes,
                          templates)
    with torch.no_grad():
        hand = []
        for c in classes:
            e = torch.stack([clip.encode_text(tok([t.format(c)], context_length=32))[0] for t in templates])
            m = (e / e.norm(dim=-1, keepdim=True)).mean(0)
            hand.append(m / m.norm())
    assert w.shape == (3, 16)
    torch.testing.assert_close(w, torch.stack(hand), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- benchmark
def test_hf_benchmark_loads_every_layout_and_refuses_bad_mappings(hf_setting: dict[str, object]) -> None:
    bench = _hf_bench(hf_setting)
    assert isinstance(bench, Benchmark)
    assert _same(bench.pretrained().state_dict(), hf_setting["theta0"])
    for t in TASKS:   # three key layouts, one encoder layout
        assert _same(bench.finetuned(t), hf_setting["tuned"][t]), t
        assert bench.head(t).weight.shape == (CLIP_TASKS[t].num_classes, 16)
    desc = bench.describe()
    json.dumps(desc)
    assert desc["mapping_check"] == {t: "name" for t in TASKS} and desc["logit_scale"] == pytest.approx(100.0)
    res = bench.evaluate(bench.pretrained(), "dtd")
    assert res["n"] == 12 and 0.0 <= res["accuracy"] <= 1.0
    x = bench.unlabeled_samples("mnist", per_class=2, seed=42)
    assert x.shape == (6, 3, 32, 32)
    xs, ys = bench.labeled_samples("svhn", 5, seed=42)
    assert xs.shape == (5, 3, 32, 32) and ys.shape == (5,)

    refs = hf_setting["refs"]
    swapped = {**refs, "svhn": refs["mnist"], "mnist": refs["svhn"]}
    with pytest.raises(MergeInputError, match="names task"):
        _hf_bench(hf_setting, refs=swapped)
    with pytest.raises(MergeInputError, match="both mapped"):
        _hf_bench(hf_setting, refs={**refs, "dtd": refs["svhn"]})
    # a checkpoint that is θ0 itself, or a copy of another task's weights, is refused at load time
    root = Path(hf_setting["root"])
    save_tensors(root / "copy_dtd.safetensors", hf_setting["tuned"]["svhn"])
    save_tensors(root / "theta0_dtd.safetensors", hf_setting["theta0"])
    bench = _hf_bench(hf_setting, refs={**refs, "dtd": str(root / "copy_dtd.safetensors")})
    bench.finetuned("svhn")
    with pytest.raises(MergeInputError, match="identical fine-tuned weights"):
        bench.finetuned("dtd")
    bench = _hf_bench(hf_setting, refs={**refs, "dtd": str(root / "theta0_dtd.safetensors")})
    with pytest.raises(MergeInputError, match="equals the pre-trained"):
        bench.finetuned("dtd")


def _check_results(res: dict[str, object], path: Path, T: int) -> None:
    assert path.is_file()
    saved = read_json(path)
    assert saved["ACC"] == pytest.approx(res["ACC"]) and len(saved["acc_matrix"]) == T
    assert all(0.0 <= a <= 1.0 for a in saved["a_Ti"]) and 0.0 <= saved["ACC"] <= 100.0
    assert saved["benchmark"]["benchmark"] == "clip"


@pytest.mark.parametrize("kind", ["hf", "open_clip"])
def test_protocol_end_to_end_on_tiny_clip(kind: str, hf_setting: dict[str, object],
                                          open_clip_setting: dict[str, object], tmp_path: Path) -> None:
    if kind == "hf":
        bench = _hf_bench(hf_setting)
    else:
        data = synthetic_image_data(TASKS, classes=3, n_test=12, n_train=12, seed=0)
        bench = CLIPBenchmark.from_open_clip(TASKS, open_clip_setting["refs"], model_name=open_clip_setting["name"],
                                             data=data)
        assert _same(bench.pretrained().state_dict(), open_clip_setting["theta0"])
    out = tmp_path / "runs"
    results = {}
    for method in ("made_it", "task_arithmetic", "opcm", "adamerging", "pretrained"):
        spec = RunSpec(method=method, group=f"clip-{kind}", tasks=TASKS, profile="test")
        results[method] = run_continual(spec, bench, out, show_progress=False)
        _check_results(results[method], out / "test" / f"clip-{kind}" / method / "seed42.json", len(TASKS))
    order = results["pretrained"]["order"]
    theta0 = bench.pretrained()
    assert results["pretrained"]["a_Ti"] == [bench.evaluate(theta0, t)["accuracy"] for t in order]
    # continual TA after the last task is θ0 + λ Σ τ: evaluate that model by hand
    lam = results["task_arithmetic"]["hparams"]["resolved_scaling_factor"]
    base = bench.pretrained().state_dict()
    merged = {k: v + lam * sum(bench.finetuned(t)[k] - v for t in TASKS) if v.is_floating_point() else v
              for k, v in base.items()}
    theta0.load_state_dict(merged)
    by_hand = [bench.evaluate(theta0, t)["accuracy"] for t in order]
    assert results["task_arithmetic"]["a_Ti"] == pytest.approx(by_hand, abs=1 / 12 + 1e-9)
    assert results["made_it"]["method_summary"] is not None and results["made_it"]["data_used"] == {}
    # the data-using path: 5 unlabeled test images per class, or all of a smaller class (3 classes of 4 here)
    assert results["adamerging"]["data_used"]["images_per_task"] == {f"{t}:test": 12 for t in TASKS}


def test_make_benchmark_clip_smoke_and_errors() -> None:
    bench, tasks = make_benchmark("clip", "clip-tiny-2")
    assert tasks == ["sun397", "stanford-cars"] and bench.tasks == tasks
    assert bench.describe()["model"].startswith("tiny-random-clip")
    assert bench.finetuned("sun397").keys() == bench.pretrained().state_dict().keys()
    with pytest.raises(MergeInputError, match="groups"):
        make_benchmark("clip", "clip-9")
    with pytest.raises(MergeInputError, match="profiles"):
        make_benchmark("clip", "clip-8", profile="offline")
    with pytest.raises(MergeInputError, match="state_dict"):
        OpenCLIPLoader().load_checkpoint("/nonexistent/finetuned.pt")
    with pytest.raises(MergeInputError, match="open_clip_config.json"):
        OpenCLIPLoader("local-dir:/nonexistent").load_pretrained()


# ----------------------------------------------------------------------------- data
def test_label_map_and_mirror_data(tmp_path: Path) -> None:
    mirror_fer = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
    assert label_map(mirror_fer, CLIP_TASKS["fer2013"].classnames) == [0, 1, 2, 3, 5, 6, 4]
    assert label_map([str(i) for i in range(10)], CLIP_TASKS["mnist"].classnames) == list(range(10))
    assert label_map(["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
                     CLIP_TASKS["kmnist"].classnames) == list(range(10))
    with pytest.raises(MergeInputError, match="7 class names"):
        label_map(mirror_fer[:6], CLIP_TASKS["fer2013"].classnames)
    folder = tmp_path / "fer2013"
    folder.mkdir()
    (folder / "meta.json").write_text(json.dumps({"classes": mirror_fer}), encoding="utf-8")
    x = np.arange(7 * 4 * 4, dtype=np.uint8).reshape(7, 4, 4, 1)
    np.savez_compressed(folder / "test.npz", x=x, y=np.arange(7))
    data = MirrorImageData(tmp_path)
    assert data.labels("fer2013", "test") == [0, 1, 2, 3, 5, 6, 4]
    assert torch.equal(data.images("fer2013", "test", [2, 0]), torch.from_numpy(x[[2, 0]]))
    with pytest.raises(MergeInputError, match="train.npz"):
        data.labels("fer2013", "train")
