"""The zoo: probe heads, fine-tuning with frozen head and BatchNorm, the cache and resume, the benchmark.

A tiny profile on the embedded digits suite keeps every test at seconds and independent of the
data mirror.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from madeit_core import profiles
from madeit_core.errors import MergeInputError
from madeit_core.io import read_json
from madeit_core.protocol import RunSpec, run_continual
from madeit_core.zoo import Zoo, fit_probe, lr_at, make_benchmark, probe_rows

TINY = profiles.SMOKE.replace(name="tiny", image_size=32, train_cap=48, test_pool_cap=40, test_cap=30, steps=6,
                              batch_size=8, warmup_steps=2, probe_l2=(1e-2,), eval_batch=64,
                              groups=("smoke-digits-4",))


@pytest.fixture()
def tiny(monkeypatch, tmp_path):
    monkeypatch.setitem(profiles.PROFILES, "tiny", TINY)
    return tmp_path


def _zoo(tmp_path, **kw) -> Zoo:
    return Zoo(kw.pop("profile", TINY), cache_dir=tmp_path / "zoo", data=tmp_path / "no-mirror", show_progress=False,
               **kw)


def test_probe_recovers_a_separable_problem():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 5, generator=g) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0])
    y = (z[:, 1] > 0).long() + 2 * (z[:, 2] > 0).long()
    head, report = fit_probe(z, y, 4, (1e-4, 1e-1), holdout=0.2, seed=0)
    acc = float((head(z).argmax(-1) == y).float().mean())
    assert acc > 0.95 and report["train_accuracy"] > 0.95 and set(report["holdout_accuracy"]) == {"0.0001", "0.1"}
    head2, _ = fit_probe(z, y, 4, (1e-4, 1e-1), holdout=0.2, seed=0)
    assert torch.equal(head.weight, head2.weight)                      # deterministic


def test_probe_rows_and_schedule():
    assert probe_rows(1500, 0.3) == 450 and probe_rows(2, 0.3) == 1 and probe_rows(10, 0.99) == 9
    with pytest.raises(MergeInputError, match="at least 2 training rows"):
        probe_rows(1, 0.3)
    lrs = [lr_at(s, 10, 1.0, 2) for s in range(10)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[2] == 1.0 and lrs[-1] < 0.05
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_build_task_manifest_heads_and_frozen_parts(tiny):
    zoo = _zoo(tiny)
    m = zoo.build_task("digits")
    # what the manifest records
    for k in ("config", "accuracy", "wall_s", "versions", "hardware", "probe", "finetune", "data"):
        assert k in m
    assert m["data"]["n_probe_rows"] == probe_rows(48, TINY.probe_fraction)
    assert m["data"]["n_probe_rows"] + m["data"]["n_finetune_rows"] == 48
    assert m["config"]["lr"] == TINY.lr and m["config"]["steps"] == TINY.steps
    assert 0.0 <= m["accuracy"]["probe"] <= 1.0 and 0.0 <= m["accuracy"]["finetuned"] <= 1.0
    # the fine-tuned encoder moved, BatchNorm did not (statistics and affine parameters frozen)
    ft = zoo.finetuned("digits")
    th0 = zoo.theta0.state_dict()
    assert set(ft) == set(th0)
    bn = [k for k in th0 if "_bn" in k]
    conv = [k for k in th0 if k.endswith("_conv.weight") or k.endswith("_conv_head.weight")]
    assert bn and conv
    assert all(torch.equal(ft[k], th0[k]) for k in bn)
    assert sum(not torch.equal(ft[k], th0[k]) for k in conv) > len(conv) // 2
    head = zoo.head("digits")
    assert head.weight.shape == (10, 1280)


def test_build_is_deterministic(tiny):
    a = _zoo(tiny / "a").build_task("digits_inverted")
    b = _zoo(tiny / "b").build_task("digits_inverted")
    za, zb = _zoo(tiny / "a"), _zoo(tiny / "b")
    assert a["key"] == b["key"] and a["accuracy"] == b["accuracy"]
    fa, fb = za.finetuned("digits_inverted"), zb.finetuned("digits_inverted")
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


def test_cache_reuse_resume_and_config_keys(tiny):
    zoo = _zoo(tiny)
    first = zoo.build(["digits", "digits_rot90"])
    assert [m["cached"] for m in first] == [False, False]
    again = _zoo(tiny).build(["digits", "digits_rot90"])
    assert [m["cached"] for m in again] == [True, True]
    # a killed build: files written, manifest (written last) missing → rebuilt, same result
    folder = zoo.task_dir("digits_rot90")
    (folder / "manifest.json").unlink()
    z2 = _zoo(tiny)
    assert not z2.is_built("digits_rot90")
    redo = z2.build(["digits", "digits_rot90"])
    assert [m["cached"] for m in redo] == [True, False]
    assert redo[1]["accuracy"] == first[1]["accuracy"]
    # another recipe is another key (another folder); the first stays valid
    other = _zoo(tiny, profile=TINY.replace(steps=3))
    assert other.task_key("digits") != zoo.task_key("digits")
    assert other.task_dir("digits").parent == zoo.task_dir("digits").parent
    # a manifest of another key in the folder does not count as built
    bad = read_json(folder / "manifest.json")
    bad["key"] = "0" * 16
    (folder / "manifest.json").write_text(json.dumps(bad))
    assert not _zoo(tiny).is_built("digits_rot90")


def test_benchmark_through_the_protocol(tiny):
    bench, tasks = make_benchmark("smoke-4", TINY, cache_dir=tiny / "zoo", data=tiny / "no-mirror",
                                  show_progress=False)
    assert tasks == ["digits", "digits_inverted", "digits_rot90", "digits_noisy"]
    desc = bench.describe()
    assert desc["benchmark"] == "zoo" and "fell back" in desc.get("data_fallback", "")
    x = bench.unlabeled_samples("digits", 2, seed=3)
    assert x.shape[0] == 20 and x.shape[1:] == (3, 32, 32)
    xl, yl = bench.labeled_samples("digits", 5, seed=3)
    assert xl.shape[0] == 5 and yl.dtype == torch.int64
    ev = bench.evaluate(bench.pretrained(), "digits")
    assert ev["n"] == 30
    spec = RunSpec(method="made_it", group="smoke-4", profile="tiny", tasks=tasks)
    res = run_continual(spec, bench, out_dir=tiny / "results", show_progress=False)
    T = len(tasks)
    assert len(res["order"]) == T and np.isfinite(res["ACC"]) and np.isfinite(res["BWT"])
    files = list((tiny / "results").rglob("seed42.json"))
    assert len(files) == 1 and read_json(files[0])["ACC"] == res["ACC"]


def test_unknown_profile_and_clip_profile_are_clear(tiny):
    with pytest.raises(MergeInputError, match="unknown profile 'huge'"):
        profiles.get_profile("huge")
    with pytest.raises(MergeInputError, match="paper's CLIP setting"):
        Zoo("clip", cache_dir=tiny / "zoo", show_progress=False)


def test_zoo_report_checks(tiny):
    from madeit_core.zoo import zoo_report

    ms = _zoo(tiny).build(["digits", "digits_inverted"])
    rep = zoo_report(ms, "smoke-digits-4")
    assert [r["task"] for r in rep["tasks"]] == ["digits", "digits_inverted"]
    gain = rep["average"]["finetuned"] - rep["average"]["probe"]
    assert rep["average"]["gain"] == pytest.approx(gain) and rep["checks"]["gain_ok"] == (gain >= 0.10)
    assert rep["checks"]["every_finetuned_beats_probe"] == all(r["finetuned"] > r["probe"] for r in rep["tasks"])
    assert "cached" not in rep["tasks"][0] and rep["recipe"]["steps"] == TINY.steps
    forged = [dict(m, accuracy={"probe": 0.9, "finetuned": 0.5}) for m in ms]
    bad = zoo_report(forged, "g")
    assert not bad["checks"]["gain_ok"] and bad["checks"]["not_beating"] == ["digits", "digits_inverted"]
    with pytest.raises(MergeInputError, match="no manifests"):
        zoo_report([], "g")


def test_zoo_fine_tunes_through_the_padded_copy(tiny, monkeypatch):
    """Recipe 2's checkpoints were trained with explicit SAME padding: the zoo's fine-tuning runs
    inside ``explicit_same_padding`` (a rebuild then gives the same bits), C. Fine-Tuned outside it."""
    from madeit_core import zoo as Z
    from madeit_core.backbones import efficientnet as E

    seen = []
    real = Z.finetune

    def spy(*args, **kwargs):
        seen.append(E._explicit_padding)
        return real(*args, **kwargs)

    monkeypatch.setattr(Z, "finetune", spy)
    _zoo(tiny).build_task("digits")
    assert seen == [True] and not E._explicit_padding


def test_compare_to_report_and_cli_expect(tiny, capsys):
    """A rebuilt zoo is checked against a committed summary: same keys and accuracies, or the
    differing tasks named (and ``madeit zoo build --expect`` exits 1)."""
    from madeit_core.cli import main
    from madeit_core.io import write_json
    from madeit_core.zoo import compare_to_report, zoo_report

    ms = _zoo(tiny).build(["digits", "digits_inverted"])
    rep = zoo_report(ms, "g")
    assert compare_to_report(ms, rep) == []
    forged = json.loads(json.dumps(rep))
    forged["tasks"][1]["finetuned"] += 0.004
    forged["tasks"][0]["key"] = "0000"
    diffs = compare_to_report(ms, forged)
    assert len(diffs) == 2 and diffs[0].startswith("digits: key 0000 → ") and "finetuned" in diffs[1]
    assert compare_to_report(ms, {"tasks": rep["tasks"][:1]})[0].startswith("digits_inverted: not in the report")
    # the CLI, on the tiny profile's group (its cache is the one built above)
    args = ["zoo", "build", "--profile", "tiny", "--group", "smoke-digits-4", "--cache", str(tiny / "zoo"),
            "--data", str(tiny / "no-mirror"), "--device", "cpu"]
    assert main([*args, "--report", str(tiny / "rep.json")]) == 0
    assert main([*args, "--expect", str(tiny / "rep.json")]) == 0
    assert "matches" in capsys.readouterr().out
    bad = json.loads((tiny / "rep.json").read_text())
    bad["tasks"][0]["probe"] = 0.0
    write_json(tiny / "bad.json", bad)
    assert main([*args, "--expect", str(tiny / "bad.json")]) == 1
    assert "differs from" in capsys.readouterr().out
    assert main([*args, "--expect", str(tiny / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_tasks_are_built_with_the_pinned_thread_count(tiny, monkeypatch):
    """A caller on one thread (a grid process building a missing task) still builds with
    BUILD_THREADS: the bits of the fine-tuned encoder depend on the thread count."""
    from madeit_core import zoo as Z

    seen = []
    real = Z.finetune
    monkeypatch.setattr(Z, "finetune", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = _zoo(tiny).build_task("digits")
        assert seen == [Z.BUILD_THREADS] and m["hardware"]["torch_threads"] == Z.BUILD_THREADS
        assert torch.get_num_threads() == 1                      # restored
        with Z.build_threads("cuda"):
            assert torch.get_num_threads() == 1                  # a GPU build leaves the CPU setting alone
    finally:
        torch.set_num_threads(before)
