"""``madeit bench``: the quick suite runs on tiny shapes, writes every section with its bounds and
the manifest, resumes after an interruption and never leaves a partial file; the timing context."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from madeit_core import bench as B
from madeit_core.cli import main
from madeit_core.timing import Recorder, patch_linalg, recording, timed


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    res = B.run_bench(B.BenchSettings.make(quick=True, device="cpu"), out)
    return out, res


def test_quick_writes_every_section_with_bounds(quick: tuple[Path, dict[str, Any]]) -> None:
    out, res = quick
    on_disk = json.loads(out.read_text())
    assert on_disk["key"] == res["key"] and on_disk["format"] == B.FORMAT
    m = on_disk["manifest"]
    assert m["complete"] and m["git_commit"] is not None and m["wall_s_total"] > 0
    assert m["hardware"]["cpu_count"] and "cuda" in m["hardware"] and m["hardware"]["torch_threads"] == 1
    assert m["versions"]["torch"] == torch.__version__ and m["settings"]["quick"] is True
    assert on_disk["bounds"]["peak_flops"]["gflops"] > 0 and on_disk["bounds"]["bandwidth"]["gbs"] > 0
    sec = on_disk["sections"]
    assert set(sec) == set(B.SUITES)
    for shape in B.QUICK_SHAPES:
        a = sec["absorb"][shape]
        mi = a["methods"]["made_it"]["per_model"]
        assert mi["absorb_s"] > 0 and {"svd", "affinity", "io_load", "io_state", "validate"} <= set(mi["breakdown_s"])
        assert mi["svd_ratio_to_bound"] > 0 and mi["io_load_ratio_to_bound"] > 0
        assert a["bounds"]["made_it_exact_svd_bound_s"] > 0
        assert "linalg" in a["methods"]["mingle:use_tta=false"]["per_model"]["breakdown_s"]
        op = a["methods"]["opcm"]["per_model"]
        assert op["absorb_s"] > 0 and op["svd_ratio_to_bound"] > 0 and "linalg" in op["breakdown_s"]
        r = sec["routed"][shape]["batches"]["8"]
        assert r["bound"] == 0.5 and math.isclose(r["ratio_to_bound"], r["throughput_ratio"] / 0.5)
        assert r["static"]["forward_flops"] > 0 and r["static"]["ratio_to_bound"] > 0
        assert {"pretrained_pass", "routing", "routed_pass"} <= set(r["routed"]["breakdown_s"])
        for case in sec["svd"][shape]["cases"]:
            assert 0.0 <= case["randomized"][0]["affinity"] <= 1.0 + 1e-6 and case["exact_bound_s"] > 0
    mem = sec["memory"]["tiny-vit"]
    assert mem["source"] == "synthetic" and [r["T"] for r in mem["rows"]] == [2, 3, 4]
    assert all(r["mingle_parameters"]["experts"] > 0 and r["full_models_parameters"] > 0 for r in mem["rows"])
    sc = sec["scaling"]["tiny-vit"]["rows"]
    assert [r["T"] for r in sc] == [1, 2, 3, 4] and all(r["expert_parameters"] > 0 for r in sc)
    t = on_disk["targets"]
    assert t["svd_randomized_affinity"]["pass"] in (True, False)
    assert any(k.startswith("routed_tiny-vit") for k in t) and any(k.startswith("memory_") for k in t)
    assert all("pass" in v and "threshold" in v for v in t.values())


def test_rerun_resumes_and_interrupted_run_leaves_valid_file(quick: tuple[Path, dict[str, Any]], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    out, res = quick
    again = B.run_bench(B.BenchSettings.make(quick=True, device="cpu"), out)
    assert again["manifest"]["resumed"] and again["sections"] == res["sections"]

    settings = B.BenchSettings.make(suites=["svd", "routed"], shapes=["tiny-cnn"], quick=True, device="cpu")
    path = tmp_path / "partial.json"

    def boom(self: B.Bench, unit: str) -> dict[str, Any]:
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(B.Bench, "_suite_routed", boom)
    with pytest.raises(KeyboardInterrupt):
        B.run_bench(settings, path)
    saved = json.loads(path.read_text())          # a complete, valid JSON with the finished unit
    assert saved["manifest"]["complete"] is False and saved["sections"]["svd"]["tiny-cnn"]["done"]
    assert "routed" not in saved["sections"]
    assert [p.name for p in tmp_path.iterdir()] == ["partial.json"]   # no temporary file left behind
    monkeypatch.undo()
    done = B.run_bench(settings, path)
    assert done["manifest"]["complete"] and done["manifest"]["resumed"]
    assert done["sections"]["svd"] == saved["sections"]["svd"]       # kept, not recomputed
    assert done["sections"]["routed"]["tiny-cnn"]["done"]
    other = B.run_bench(B.BenchSettings.make(suites=["svd"], shapes=["tiny-cnn"], quick=True, device="cpu",
                                             rank_ratio=0.5), path)
    assert not other["manifest"]["resumed"] and "routed" not in other["sections"]   # other settings: afresh


def test_cli_bench(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.json"
    assert main(["bench", "--quick", "--suite", "svd", "--shapes", "tiny-cnn", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "svd_randomized_affinity" in text and out.is_file()
    assert main(["bench", "--suite", "nope", "--out", str(out)]) == 2


def test_timing_regions_are_exclusive_and_optional() -> None:
    with timed("nothing"):            # no recorder: a no-op
        pass
    with recording() as rec:
        with timed("outer"):
            x = torch.randn(64, 64)
            with timed("inner"):
                torch.linalg.svd(x)
        with patch_linalg():
            torch.linalg.qr(x)            # outside any region: charged to linalg
            with timed("named"):
                torch.linalg.qr(x)        # inside a region: charged to that region
    assert set(rec.totals) == {"outer", "inner", "linalg", "named"} and rec.counts["linalg"] == 1
    assert all(v >= 0 for v in rec.totals.values())
    assert torch.linalg.svd.__module__ != __name__ and not hasattr(torch.linalg.svd, "__wrapped__")
    r = Recorder()
    r.push("a")
    r.push("b")
    r.pop()
    r.pop()
    assert r.totals["a"] >= 0 and r.counts == {"a": 1, "b": 1}


def test_flop_counts_and_synthetic_spectra() -> None:
    n = 100
    assert B.svd_flops_exact(n, n) == 22 * n ** 3
    assert B.svd_flops_exact(4 * n, n) == B.svd_flops_exact(n, 4 * n) == 6 * 4 * n ** 3 + 20 * n ** 3
    assert B.svd_flops_randomized(300, 200, 10) < B.svd_flops_exact(300, 200)
    assert B.svd_flops_randomized(30, 20, 15) == B.svd_flops_exact(30, 20)    # falls back to exact
    g = torch.Generator().manual_seed(0)
    m = B.synthetic_matrix(120, 80, g, alpha=1.0, noise=0.0, signal_frac=0.25)
    s = torch.linalg.svdvals(m)
    assert int((s > 1e-4 * s[0]).sum()) == 20                                   # rank = signal_frac · 80
    assert B.parse_method("mingle:use_tta=false,lora_r=8") == ("mingle", {"use_tta": False, "lora_r": 8})
    assert B.parse_method("made_it:svd=randomized") == ("made_it", {"svd": "randomized"})


def test_task_factory_is_reproducible_and_clustered() -> None:
    bb = B.build_backbone("tiny-cnn")
    theta0 = bb.model.state_dict()
    f = B.TaskFactory(theta0, bb.specs, seed=1, clusters=2)
    a, b = f.finetuned(0), f.finetuned(0)
    assert all(torch.equal(a[k], b[k]) for k in a)
    key = bb.specs[0].key
    d = [(f.finetuned(t)[key] - theta0[key]).flatten() for t in range(3)]
    cos = torch.nn.functional.cosine_similarity
    assert float(cos(d[0], d[2], dim=0)) > float(cos(d[0], d[1], dim=0)) + 0.2   # same cluster: closer
