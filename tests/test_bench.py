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
from madeit_core import bench_report as R
from madeit_core.cli import build_parser, main
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
    assert m["gpu_measured"] is False and "NOT measured" in m["gpu_note"] and "--device cuda" in m["gpu_note"]
    assert m["hardware"]["threads_requested"] == 1 and "OMP_NUM_THREADS" in m["hardware"]["thread_env"]
    assert "load average" in m["note"]
    assert on_disk["bounds"]["peak_flops"]["gflops"] > 0 and on_disk["bounds"]["bandwidth"]["gbs"] > 0
    sec = on_disk["sections"]
    assert set(sec) == set(B.SUITES)
    for shape in B.QUICK_SHAPES:
        a = sec["absorb"][shape]
        mi = a["methods"]["made_it"]["per_model"]
        assert mi["absorb_s"] > 0 and {"svd", "affinity", "io_load", "io_state", "validate"} <= set(mi["breakdown_s"])
        assert mi["svd_ratio_to_bound"] > 0 and mi["io_load_ratio_to_bound"] > 0
        assert a["bounds"]["made_it_exact_svd_bound_s"] > 0 and a["bounds"]["made_it_subspace_svd_bound_s"] > 0
        assert {"made_it", "made_it:svd=exact"} <= set(a["methods"])                 # the default and its ablation
        assert len(a["load_average"]["start"]) == 3 and a["load_average"]["torch_threads"] == 1
        assert "linalg" in a["methods"]["mingle:use_tta=false"]["per_model"]["breakdown_s"]
        op = a["methods"]["opcm"]["per_model"]
        assert op["absorb_s"] > 0 and op["svd_ratio_to_bound"] > 0 and "linalg" in op["breakdown_s"]
        r = sec["routed"][shape]["batches"]["8"]
        assert r["bound"] == 0.5 and math.isclose(r["ratio_to_bound"], r["throughput_ratio"] / 0.5)
        assert r["static"]["forward_flops"] > 0 and r["static"]["ratio_to_bound"] > 0
        assert {"pretrained_pass", "routing", "routed_pass"} <= set(r["routed"]["breakdown_s"])
        assert set(r["times"]) == {"static", "routed", "per_path", "one_path"}
        assert r["routed"]["latency_s"] == min(r["times"]["routed"]["all_s"])
        assert len(r["times"]["static"]["all_s"]) == 5
        for case in sec["svd"][shape]["cases"]:
            assert 0.0 <= case["randomized"][0]["affinity"] <= 1.0 + 1e-6 and case["exact_bound_s"] > 0
            sub = case["subspace"][0]
            assert sub["library_default"] and sub["steps"] == B.SUBSPACE_STEPS and sub["flops"] > 0
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


def test_targets_follow_the_measured_numbers(quick: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """Targets are recomputed from the sections: change a measurement and the verdict follows."""
    out, res = quick
    bench = B.Bench(B.BenchSettings.make(quick=True, device="cpu"), out)      # same key: loads the results
    assert bench.results["sections"] == res["sections"]
    absorb = bench.results["sections"]["absorb"]["tiny-vit"]["methods"]
    op = absorb["opcm"]["per_model"]["absorb_s"]
    t = bench.targets()["absorb_tiny-vit_made_it_vs_opcm"]
    assert t["value"] == pytest.approx(absorb["made_it"]["per_model"]["absorb_s"] / op)
    for factor, verdict in ((0.1, True), (0.5, False)):
        absorb["made_it"]["per_model"]["absorb_s"] = factor * op
        t = bench.targets()["absorb_tiny-vit_made_it_vs_opcm"]
        assert t["value"] == pytest.approx(factor) and t["pass"] is verdict
    r = bench.results["sections"]["routed"]["tiny-cnn"]["batches"]["8"]
    for ratio, verdict in ((0.45, True), (0.3, False)):
        r["throughput_ratio"] = ratio
        assert bench.targets()["routed_tiny-cnn_throughput_ratio_b8"]["pass"] is verdict
    mem = bench.results["sections"]["memory"]["tiny-vit"]["rows"][-1]
    mem["ratio_bank_total_to_mingle"] = 0.7
    assert bench.targets()["memory_tiny-vit_T4"]["pass"] is False


def test_svd_affinity_is_the_affinity_of_the_recorded_case(quick: tuple[Path, dict[str, Any]]) -> None:
    """Recompute one recorded case of the svd suite from its synthetic matrix."""
    _, res = quick
    case = next(c for c in res["sections"]["svd"]["tiny-vit"]["cases"] if c["reference_spectrum"])
    d_out, d_in = case["shape"]
    k, seed = case["k"], res["manifest"]["settings"]["seed"]
    m = B.synthetic_matrix(d_out, d_in, B._gen(seed, "svd", d_out, d_in, case["alpha"], case["noise"]),
                           case["alpha"], case["noise"])
    Ue, _, Ve = B.top_k_svd(m, k, "exact")
    Ug, _, Vg = B.top_k_svd(m, k, "gram")
    want = 0.5 * (B.subspace_affinity(Ue, Ug) + B.subspace_affinity(Ve, Vg))
    assert case["gram"]["affinity"] == pytest.approx(want, abs=1e-6)
    rnd = case["randomized"][0]
    assert rnd["library_default"] and rnd["oversample"] == max(10, k)
    assert 0 < rnd["affinity"] <= 1 + 1e-6 and rnd["seconds"] > 0 and rnd["bound_s"] > 0


def test_svd_suite_on_real_checkpoints(tmp_path: Path) -> None:
    """``--finetuned``: EfficientNet-Lite0 checkpoints (here θ0 plus low-rank updates) feed the
    affinity target; a checkpoint of another model is refused by name."""
    from madeit_core.backbones.efficientnet import EfficientNetLite0Adapter
    from madeit_core.io import save_tensors

    adapter = EfficientNetLite0Adapter()
    model = adapter.build(pretrained=True)
    specs = adapter.modules(model)[-3:]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for sp in specs:
        upd = B.synthetic_matrix(sp.d_out, sp.d_in, g, alpha=1.0, noise=0.1)
        sd[sp.key] = sd[sp.key] + (0.01 * upd).reshape(sd[sp.key].shape)
    ft = tmp_path / "task" / "key" / "finetuned.safetensors"
    save_tensors(ft, sd)
    settings = B.BenchSettings.make(suites=["svd"], shapes=["tiny-cnn"], quick=True, device="cpu",
                                    finetuned=[str(ft)])
    res = B.run_bench(settings, tmp_path / "real.json")
    real = res["sections"]["svd"]["real"]
    assert real["cases"]["layout"] == "columns"                    # the many real cases are stored columnar
    cases = R.case_rows(real["cases"])
    assert len(cases) == 3 and real["files"][0]["task"] == "task"       # only the updated modules
    t = res["targets"]["svd_randomized_affinity"]
    default = B._subspace_key(None, B.SUBSPACE_STEPS)                # MADE-IT's default top-k is the target
    assert t["method"] == default and "EfficientNet-Lite0" in t["source"] and t["value"] == pytest.approx(
        real["summary"][default]["min_affinity_stable_cases"])
    assert B._setting_key(None, 4) in t["other_settings"] and default in t["other_settings"]
    assert all(c["gram"]["affinity"] > 0.999 for c in cases)
    assert all(c["subspace"][0]["library_default"] and c["subspace"][0]["affinity"] > 0.99 for c in cases)
    # ... and compact: no derivable FLOP bounds, 6 significant digits, speed-ups rebuilt from the times
    assert "exact_flops" not in cases[0] and "flops" not in cases[0]["gram"] and real["cases_note"]
    assert all(float(f"{c['exact_s']:.6g}") == c["exact_s"] for c in cases)
    assert not any(c.endswith("speedup_vs_exact") for c in real["cases"]["columns"])
    assert cases[0]["gram"]["speedup_vs_exact"] == pytest.approx(cases[0]["exact_s"] / cases[0]["gram"]["seconds"])
    save_tensors(tmp_path / "other.safetensors", {"w": torch.zeros(2, 2)})
    bad = B.BenchSettings.make(suites=["svd"], shapes=["tiny-cnn"], quick=True, device="cpu",
                               finetuned=[str(tmp_path / "other.safetensors")])
    with pytest.raises(B.MergeInputError, match="other.safetensors"):
        B.run_bench(bad, tmp_path / "bad.json")


def test_slow_shapes_are_listed_as_skipped_on_the_cpu(tmp_path: Path) -> None:
    s = B.BenchSettings.make(shapes=["tiny-vit", "vit-l14"], quick=True, device="cpu")
    bench = B.Bench(s, tmp_path / "x.json")
    assert bench._units("absorb") == ["tiny-vit"] and bench._units("routed") == ["tiny-vit"]
    assert bench._units("svd") == ["tiny-vit", "vit-l14"]
    assert {(x["suite"], x["unit"]) for x in bench.skipped()} == {("absorb", "vit-l14"), ("routed", "vit-l14")}
    # asked for explicitly (the CLI's --absorb-shapes), ViT-L/14 absorbs on the CPU too
    s = B.BenchSettings.make(shapes=["tiny-vit", "vit-l14"], quick=True, device="cpu", absorb_shapes=["vit-l14"])
    bench = B.Bench(s, tmp_path / "y.json")
    assert bench._units("absorb") == ["vit-l14"] and bench._units("routed") == ["tiny-vit"]
    assert {(x["suite"], x["unit"]) for x in bench.skipped()} == {("absorb", "tiny-vit"), ("routed", "vit-l14")}
    args = build_parser().parse_args(["bench", "--absorb-shapes", "vit-l14", "--routed-shapes", "vit-b32,efficientnet"])
    assert args.absorb_shapes == "vit-l14" and args.routed_shapes == "vit-b32,efficientnet"


def test_absorb_targets_are_not_evaluated_on_other_full_shapes(quick: tuple[Path, dict[str, Any]]) -> None:
    """The ≤ 0.25× OPCM and ≤ 3 s limits name ViT-B/32: a ViT-L/14-only file gets no absorb target."""
    out, _ = quick
    bench = B.Bench(B.BenchSettings.make(quick=True, device="cpu"), out)
    sec = bench.results["sections"]
    absorb = sec["absorb"] = {"vit-l14": sec["absorb"]["tiny-vit"]}
    assert not [k for k in bench.targets() if k.startswith("absorb_")]
    absorb["vit-b32"] = absorb["vit-l14"]
    assert "absorb_vit-b32_made_it_absolute" in bench.targets()


# ============================================================================ the report helper
def test_report_tables_and_figures_read_the_file(quick: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    import io


    out, res = quick
    loaded = R.load_bench(out)
    t = R.tables(loaded)
    assert {"machine", "absorb", "routed", "memory", "scaling", "svd", "targets", "skipped"} <= set(t)
    row = next(r for r in t["absorb"] if r["shape"] == "tiny-vit" and r["method"] == "made_it")
    pm = res["sections"]["absorb"]["tiny-vit"]["methods"]["made_it"]["per_model"]
    op = res["sections"]["absorb"]["tiny-vit"]["methods"]["opcm"]["per_model"]["absorb_s"]
    assert row["absorb_s"] == pm["absorb_s"] and row["svd_s"] == pm["breakdown_s"]["svd"]
    assert row["vs_opcm"] == pytest.approx(pm["absorb_s"] / op)
    assert {(r["shape"], r["batch"]) for r in t["routed"]} == {(s, b) for s in B.QUICK_SHAPES for b in (1, 8)}
    assert [r["T"] for r in t["memory"]] == [2, 3, 4] and [r["T"] for r in t["scaling"]] == [1, 2, 3, 4]
    assert {r["name"] for r in t["targets"]} == set(res["targets"])
    assert t["machine"][0]["torch_threads"] == 1
    figs = R.figures(loaded)
    assert set(figs) == {"absorb_breakdown", "routed_throughput", "scaling", "memory", "svd_accuracy"}
    for f in figs.values():
        buf = io.BytesIO()
        f.savefig(buf, format="png")
        assert buf.tell() > 1000
    md = R.summary_markdown(loaded)
    assert "### Targets" in md and "svd_randomized_affinity" in md and md.count("\n| ") > 10
    assert R.markdown([{"a": 0.123456, "b": None, "c": True}]).endswith("| 0.123 | – | PASS |")
    # sections a run did not produce: empty tables, no figure
    only_svd = {**loaded, "sections": {"svd": loaded["sections"]["svd"]}, "targets": {}}
    assert R.tables(only_svd)["absorb"] == [] and set(R.figures(only_svd)) == {"svd_accuracy"}


def test_table_markdown_lifts_long_text_out_of_the_cells():
    shared = [{"m": "a", "s": 1.0, "over": "steps ≥ 2"}, {"m": "b", "s": 2.0, "over": "steps ≥ 2"}]
    md = R.table_markdown("absorb", shared)
    assert md.startswith("**absorb**\n\n| m | s |\n") and "| b | 2 |" in md
    assert md.endswith("*`over`* (every row): steps ≥ 2") and md.count("steps ≥ 2") == 1
    differ = [{"m": "a", "note": "first"}, {"m": "b", "note": None}, {"m": "c", "note": "third"}]
    md = R.table_markdown("targets", differ)
    assert "| m |\n" in md and "*Note*, row 1: first" in md and "*Note*, row 3: third" in md and "row 2" not in md
    grouped = [{"m": i, "over": "x" if i in (1, 2, 3, 5) else "y"} for i in range(1, 7)]
    md = R.table_markdown("absorb", grouped)
    assert md.endswith("*`over`*, rows 1–3, 5: x\n\n*`over`*, rows 4, 6: y")
    assert R.table_markdown("x", [{"m": "a", "note": None}]).endswith("| a | – |")   # an empty column stays


def test_report_refuses_other_files(tmp_path: Path, quick: tuple[Path, dict[str, Any]]) -> None:

    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"format": "something/1"}))
    with pytest.raises(B.MergeInputError, match="other.json.*not a madeit bench"):
        R.load_bench(bad)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(B.MergeInputError, match="broken.json"):
        R.load_bench(tmp_path / "broken.json")
    partial = json.loads(quick[0].read_text())
    partial["manifest"]["complete"] = False
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    with pytest.raises(B.MergeInputError, match="did not finish"):
        R.load_bench(tmp_path / "partial.json")
    assert R.load_bench(tmp_path / "partial.json", require_complete=False)["sections"]


def test_case_columns_round_trip() -> None:
    """The columnar case table gives back every case as it was (speed-ups rebuilt from the times);
    settings shared by every case are stored once, varying ones per case."""
    def case(i: int, fallback: bool) -> dict:
        ex = 0.5 + i
        variant = lambda t, **kw: {"seconds": t, "speedup_vs_exact": ex / t, "affinity": 0.99 + i / 1000, **kw}  # noqa: E731
        return {"shape": [8 + i, 4], "k": 2 + i, "exact_s": ex, "s1_over_sk": None, "module": f"m{i}",
                "gram": variant(0.1), "subspace": [variant(0.2 * (i + 1), q=12 + i, steps=5, exact_fallback=fallback)],
                "randomized": [variant(0.3, oversample_rule="10", n_iter=4),
                               variant(0.4, oversample_rule="10", n_iter=8)]}
    rows = [case(0, True), case(1, False), case(2, True)]
    table = R.case_columns(rows)
    assert table["constant"]["randomized.1.n_iter"] == 8 and table["constant"]["s1_over_sk"] is None
    assert "subspace.0.q" in table["columns"] and "module" in table["columns"] and "gram.seconds" in table["constant"]
    back = R.case_rows(json.loads(json.dumps(table)))
    for a, b in zip(rows, back):
        assert _approx_nested(a, b)
    assert R.case_rows(rows) == rows                                  # the list layout passes through
    with pytest.raises(R.MergeInputError, match="columnar"):
        R.case_rows({"layout": "rows"})


def _approx_nested(a: object, b: object) -> bool:
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (a, b)
        return all(_approx_nested(a[k], b[k]) for k in a)
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), (a, b)
        return all(_approx_nested(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-12), (a, b)
        return True
    assert a == b, (a, b)
    return True


def test_memory_suite_on_saved_banks(tmp_path: Path) -> None:
    """--banks: every bank is labelled with its configuration's departures from the defaults,
    summarised per (variant, T), and the target reads the worst default bank at the largest T
    (an ablation's larger bank does not count)."""
    from madeit_core.experts import EvolutionConfig, ExpertBank
    from madeit_core.modules import ModuleSpec

    spec = ModuleSpec(name="lin", key="lin.weight", d_out=12, d_in=10, kind="linear", group="mlp", depth=0)
    w0 = {"lin.weight": torch.zeros(12, 10), "lin.bias": torch.zeros(12)}

    def bank(folder: str, T: int, seed: int, **cfg: Any) -> None:
        g = torch.Generator().manual_seed(seed)
        b = ExpertBank([spec], EvolutionConfig(**cfg))
        for t in range(T):
            ft = {"lin.weight": torch.randn(12, 10, generator=g), "lin.bias": torch.randn(12, generator=g)}
            b.absorb(f"task{t}", w0, ft)
        b.save(tmp_path / folder)

    bank("g/made_it/seed42", 3, 0)
    bank("g/made_it/seed43", 3, 1)
    bank("g/made_it/seed44", 2, 2)
    bank("g/made_it-rank_ratio=1/seed42", 3, 0, rank_ratio=1.0)
    bank("g/made_it-anchor=signed/seed42", 3, 0)                      # the same bank as made_it/seed42
    bank("g/made_it-others=pretrained/seed42", 3, 0, others="pretrained")   # the same tensors, another variant
    settings = B.BenchSettings.make(suites=["memory"], shapes=["tiny-vit"], quick=True, device="cpu",
                                    banks=str(tmp_path))
    res = B.run_bench(settings, tmp_path / "mem.json")
    sec = res["sections"]["memory"]["banks"]
    assert sorted(r["variant"] for r in sec["rows"]) == ["default"] * 3 + ["others=pretrained", "rank_ratio=1"]
    (dup,) = sec["duplicates_skipped"]                                  # the identical bank is read once
    assert {Path(dup["bank"]).parent.name, Path(dup["same_as"]).parent.name} == {"made_it", "made_it-anchor=signed"}
    summ = {(r["variant"], r["T"]): r for r in sec["summary"]}
    assert set(summ) == {("default", 2), ("default", 3), ("others=pretrained", 3), ("rank_ratio=1", 3)}
    assert summ[("default", 3)]["banks"] == 2
    default3 = [r for r in sec["rows"] if r["variant"] == "default" and r["T"] == 3]
    ratios = [r["ratio_bank_total_to_mingle"] for r in default3]
    assert summ[("default", 3)]["ratio_bank_total_to_mingle_max"] == max(ratios)
    variant = next(r for r in sec["rows"] if r["variant"] == "rank_ratio=1")
    assert variant["ratio_bank_total_to_mingle"] > max(ratios)         # full-rank experts: a larger bank ...
    t = res["targets"]["memory_banks_T3"]
    assert t["value"] == max(ratios) and t["banks"] == 2                # ... that the target does not read
    rows = R.tables(res)["memory"]
    assert [(r["T"], r["banks"]) for r in rows] == [(2, 1), (3, 2)]
    assert rows[1]["ratio_to_mingle_max"] == max(ratios)
    # a file written before banks were labelled: every bank counts, and the table says so
    old = json.loads(json.dumps(res))
    sec_old = old["sections"]["memory"]["banks"]
    del sec_old["summary"]
    for r in sec_old["rows"]:
        del r["variant"]
    rows_old = R.tables(old)["memory"]
    assert [(r["T"], r["banks"]) for r in rows_old] == [(2, 1), (3, 4)] and "predates" in rows_old[1]["note"]
    assert B.config_variant(EvolutionConfig(margin=0.5, svd="exact")) == "margin=0.5,svd=exact"


def test_summary_leaves_out_suites_the_run_did_not_include(quick: tuple[Path, dict[str, Any]]) -> None:
    _, res = quick
    full = R.summary_markdown(res)
    assert "### Routed inference" in full and "### Absorb cost" in full
    part = {**res, "sections": {k: v for k, v in res["sections"].items() if k == "absorb"}}
    text = R.summary_markdown(part)
    assert "### Absorb cost" in text and "### Routed inference" not in text and "### Top-k SVD" not in text


def test_wide_tables_split_into_page_wide_parts():
    rows = [{"shape": s, "method": m, **{f"measurement_{i}_s": 0.123 * i for i in range(8)}}
            for s in ("vit-b32", "efficientnet") for m in ("made_it", "opcm")]
    md = R.markdown(rows)
    tables = md.split("\n\n")
    assert len(tables) > 1
    seen = []
    for t in tables:
        head = [c.strip() for c in t.splitlines()[0].strip("|").split("|")]
        assert head[:2] == ["shape", "method"]           # shape alone repeats: the key is two columns
        seen += head[2:]
        assert sum(R.column_width_px(rows, c) for c in head) <= R.PAGE_PX
        assert len(t.splitlines()) == 2 + len(rows)
    assert seen == [f"measurement_{i}_s" for i in range(8)]  # every column once, in order
    assert "\n\n" not in R.markdown(rows, width=None)
    narrow = [{"m": "a", "s": 1.0}]
    assert R.markdown(narrow) == "| m | s |\n|---|---|\n| a | 1 |"
    assert R.key_columns([{"a": 1, "b": 1}, {"a": 1, "b": 2}], ["a", "b"]) == ["a", "b"]
    assert R._text_width("MADE-IT absorb ≤ 0.25× OPCM's, same run") == R.WRAP_CHARS
    assert R._text_width("abcdefghijklmnopqrstuvwxyz0123") == 30                       # no break: whole
    assert R._text_width("absorb_vit-b32_made_it_randomized_vs_opcm") == R.WRAP_CHARS   # breaks after - and _
    assert R._text_width("a_very_long_piece:" + "x" * 25) == 25                       # its longest piece
