"""What the notebooks call: the run plan, result stores, comparison tables, bank layouts, the
reference command (on the toy benchmark), and the small helpers added for the book."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from madeit_core import bookplan, booktables, claims, nbsupport
from madeit_core.analysis import (
    BankLayout,
    allocation_matrix,
    experts_by_group,
    experts_growth,
    load_bank_layout,
    mean_summaries,
)
from madeit_core.errors import BankFormatError, MergeInputError
from madeit_core.experts import EvolutionConfig, ExpertBank
from madeit_core.modules import ModuleSpec
from madeit_core.nbparams import NOTEBOOKS, PARAMETER_SETS, collect, parameter_set
from madeit_core.paper_values import TABLE1, TABLE1_REFERENCE, TABLE2
from madeit_core.reference import reference_jobs, run_reference
from madeit_core.reproduce import MethodRun, routing_by_step, routing_per_task

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- plan
def test_made_it_variant_at_defaults_is_the_default_run() -> None:
    d = bookplan.made_it_variant()
    assert d == MethodRun("MADE-IT", "made_it", {})
    assert bookplan.made_it_variant(rank_ratio=0.1, margin=1, aggregation="mean").hparams == {}
    v = bookplan.made_it_variant(margin=2.0, merge_rule="sum")
    assert v.tag == "margin=2,merge_rule=sum" and v.hparams["margin"] == 2.0
    with pytest.raises(MergeInputError, match="bogus"):
        bookplan.made_it_variant(bogus=1)


def test_sweeps_share_the_default_run_and_refuse_duplicates() -> None:
    runs = bookplan.sensitivity_runs("rank_ratio", [0.05, 0.1])
    assert runs[1].hparams == {} and runs[0].hparams["rank_ratio"] == 0.05
    with pytest.raises(MergeInputError, match="duplicate"):
        bookplan.sensitivity_runs("margin", [1.0, 1.0])
    with pytest.raises(MergeInputError):
        bookplan.sensitivity_runs("rank", [0.1])


def test_ablations_change_one_choice_each() -> None:
    abl = bookplan.ablation_runs()
    assert set(abl) == set(bookplan.ABLATIONS)
    for choice, runs in abl.items():
        assert runs[0].hparams == {}                                   # the default first
        assert all(len([k for k in r.hparams if k != "tag"]) == 1 for r in runs[1:]), choice
    assert any(r.hparams.get("score") == "cosine" for r in abl["affinity score"])


def test_table1_rows_and_display_names() -> None:
    runs = bookplan.table1_runs(bookplan.TABLE1_METHODS)
    assert [r.method for r in runs] == list(bookplan.TABLE1_METHODS)
    labels = {r.method: r.label for r in runs}
    assert labels["made_it"] == "MADE-IT" and labels["swa"] == "Average (SWA)" and labels["odem"] == "ODE-M"
    assert labels["continual_finetuning"] == "C. Fine-Tuned"


def test_jobs_merge_shared_runs_and_cover_every_notebook() -> None:
    p = parameter_set("smoke", "toy")
    for name in NOTEBOOKS:
        for j in bookplan.notebook_jobs(name, p):
            assert j.group in p["groups"] and j.seeds == tuple(p["seeds"])
    merged = reference_jobs(p)
    first = next(j for j in merged if j.group == p["groups"][0])
    keys = [(r.method, r.tag) for r in first.runs]
    assert len(keys) == len(set(keys))                                 # each run once
    assert keys.count(("made_it", None)) == 1                          # table 1, figs, sweeps, ablations share it
    assert {"fig6_sensitivity", "ablations", "table1_acc_bwt"} <= set(first.notebooks)
    with pytest.raises(MergeInputError):
        bookplan.notebook_jobs("nope", p)


def test_parameter_sets_and_collect() -> None:
    for (profile, bench), p in PARAMETER_SETS.items():
        assert p["profile"] == profile and p["benchmark"] == bench
        assert all(s >= 42 for s in p["seeds"]) and p["groups"]
    assert parameter_set("offline")["seeds"] == list(range(42, 52))
    with pytest.raises(MergeInputError, match="no notebook parameters"):
        parameter_set("offline", "toy")
    ns = {k: 1 for k in ("profile", "benchmark", "groups", "seeds", "methods", "device", "results_dir",
                         "reference_dir")}
    assert set(collect(ns, "table1_acc_bwt")) == set(ns)
    with pytest.raises(MergeInputError, match="rho_values"):
        collect(ns, "fig6_sensitivity")


# ----------------------------------------------------------------------------- stores
def test_build_root_is_keyed_by_the_library_hash(tmp_path: Path) -> None:
    a = nbsupport.build_root(tmp_path, "a" * 64)
    assert a == tmp_path / f"lib-{'a' * 12}" and nbsupport.build_root(tmp_path, "b" * 64) != a
    assert nbsupport.resolve_path("runs/x") == nbsupport.REPO_ROOT / "runs/x"
    assert nbsupport.runs_for_seeds([42, 51]) == [0, 9]
    (tmp_path / f"lib-{'a' * 12}").mkdir()
    (tmp_path / f"lib-{'c' * 12}").mkdir()
    assert nbsupport.stale_build_roots(tmp_path, "a" * 64) == [tmp_path / f"lib-{'c' * 12}"]
    with pytest.raises(MergeInputError, match="42"):
        nbsupport.runs_for_seeds([7])


def test_results_store_reads_exact_paths_with_labels(tmp_path: Path) -> None:
    store = nbsupport.ResultsStore(tmp_path, "offline")
    run = bookplan.made_it_variant(score="cosine")
    f = store.path("offline-8", run, 43)
    assert f == tmp_path / "offline" / "offline-8" / "made_it-score=cosine" / "seed43.json"
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps({"method": "made_it", "group": "offline-8", "ACC": 1.0}))
    out = store.results("offline-8", [run, bookplan.made_it_variant()], [42, 43])
    assert len(out) == 1 and out[0]["label"] == run.label


def test_reference_results_say_plainly_when_absent(tmp_path: Path) -> None:
    ref = nbsupport.ReferenceResults(tmp_path / "none")
    assert not ref.available and "No committed reference results" in ref.message
    assert ref.results_for(ref.jobs(lambda p: bookplan.notebook_jobs("table1_acc_bwt", p))) == []
    # results made by `madeit run` alone (no manifest) are shown, and the page says so
    f = tmp_path / "cli" / "offline" / "offline-8" / "swa" / "seed42.json"
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps({"method": "swa", "group": "offline-8", "ACC": 1.0, "BWT": 0.0}))
    ref = nbsupport.ReferenceResults(tmp_path / "cli")
    assert ref.available and ref.groups == ["offline-8"] and "no manifest" in ref.message
    got = ref.results_for(ref.jobs(lambda p: bookplan.notebook_jobs("table1_acc_bwt", p)))
    assert [r["label"] for r in got] == ["Average (SWA)"]


def test_verdict_html_escapes_and_skips_missing() -> None:
    v = {"verdict": "partly", "evidence": "a < b"}
    html = nbsupport.verdict_html([("ours", v), ("reference", None)])
    assert "<strong>partly</strong>" in html and "a &lt; b" in html and "reference" not in html
    assert "No verdict" in nbsupport.verdict_html([])


def test_markdown_html_renders_tables() -> None:
    html = nbsupport.markdown_html("| a | b |\n|---|---|\n| 1 | 2 |")
    assert '<table class="table">' in html and "<td>2</td>" in html


# ----------------------------------------------------------------------------- tables
def test_paper_table1_columns_come_from_paper_values() -> None:
    labels = {r.label: r.method for r in bookplan.table1_runs(bookplan.TABLE1_METHODS)}
    cols = booktables.paper_table1_columns("ACC", "ViT-B/16", labels)
    assert [c.header for c in cols] == [f"paper · ViT-B/16 · T={t}" for t in (8, 14, 20)]
    m, s = TABLE1["ACC"]["MADE-IT (Ours)"]["ViT-B/16|14"]
    assert cols[1].cells["MADE-IT"] == f"{m:.1f}±{s:.1f}"
    assert cols[0].cells["Pre-Trained"] == f"{TABLE1_REFERENCE['Pre-Trained']['ViT-B/16|8']:.1f}"
    assert "ODE-M" not in cols[0].cells                                  # the paper does not report it
    bwt = booktables.paper_table1_columns("BWT", "ViT-B/16", labels)
    assert bwt[0].cells["Fine-Tuned"] == "0.0" and "Pre-Trained" not in bwt[0].cells
    with pytest.raises(KeyError):
        booktables.paper_table1_columns("ACC", "ViT-H/14", labels)


def test_metric_columns_and_markdown() -> None:
    rows = [{"method": "A", "group": "g1", "ACC": 50.0, "ACC_std": 1.25, "runs": 2},
            {"method": "B", "group": "g1", "ACC": 40.0, "ACC_std": 0.0, "runs": 1}]
    cols = booktables.metric_columns(rows, "ACC", ["g1", "g2"], "ours · smoke · toy")
    assert cols[0].cells == {"A": "50.0±1.2", "B": "40.0±0.0 (n=1)"} and cols[1].cells == {}
    ten = booktables.metric_columns(rows, "ACC", ["g1"], "reference", expected=10)
    assert ten[0].cells == {"A": "50.0±1.2 (n=2)", "B": "40.0±0.0 (n=1)"}          # a partial grid says so
    two = booktables.metric_columns(rows, "ACC", ["g1"], "ours", expected=2)
    assert two[0].cells["A"] == "50.0±1.2"
    md = booktables.markdown_table(["A", "B", "C|D"], cols, "method")
    lines = md.splitlines()
    assert lines[0] == "| method | ours · smoke · toy · g1 | ours · smoke · toy · g2 |"
    assert lines[-1] == "| C\\|D | – | – |"


def test_merged_row_labels_gives_a_reference_only_label_its_own_row() -> None:
    ours = {"Pre-Trained": "pretrained", "ODE-M (smoke sizes)": "odem", "MADE-IT": "made_it"}
    ref = {"Pre-Trained": "pretrained", "MADE-IT": "made_it", "ODE-M": "odem", "Extra": "extra"}
    merged = booktables.merged_row_labels(ours, ref)
    assert list(merged) == ["Pre-Trained", "ODE-M (smoke sizes)", "ODE-M", "MADE-IT", "Extra"]
    assert merged["ODE-M"] == "odem" and merged["Extra"] == "extra"
    assert booktables.merged_row_labels(ours, {}) == ours
    ref_cols = booktables.metric_columns([{"method": "ODE-M", "group": "g", "ACC": 51.0, "ACC_std": 0.0, "runs": 1}],
                                         "ACC", ["g"], "reference", expected=10)
    md = booktables.markdown_table(list(merged), ref_cols, "method")
    assert "| ODE-M | 51.0±0.0 (n=1) |" in md.splitlines()            # the reference value is shown
    assert "| ODE-M (smoke sizes) | – |" in md.splitlines()


def test_paper_table2_and_per_task() -> None:
    rows, cols = booktables.paper_table2_columns(["ViT-L/14"])
    assert rows == ["subspace", "cosine"] and len(cols) == 2
    assert cols[0].cells["cosine"] == "{:.1f}±{:.1f}".format(*TABLE2["cosine"]["ViT-L/14"]["ACC"])
    rows, cols = booktables.paper_per_task_columns("ViT-B/32", ["swa", "made_it", "odem"])
    assert len(rows) == 21 and rows[-1] == "average" and len(cols) == 2
    _, counted = booktables.per_task_columns({"X": {"t1": 1.0}, "Y": {"t1": 2.0}}, ["X", "Y"], "ref",
                                             {"X": 6, "Y": 10}, 10)
    assert [c.header for c in counted] == ["ref · X (n=6)", "ref · Y"]      # a partial column says so
    ordered, _ = booktables.per_task_columns({"X": {"t2": 1.0, "t1": 2.0, "t3": 3.0}}, ["X"], "ref",
                                             task_order=["t1", "t2", "absent"])
    assert ordered == ["t1", "t2", "t3", "average"]                       # the group's order, then the rest
    ours_rows, ours_cols = booktables.per_task_columns({"X": {"t1": 10.0, "t2": 20.0}}, ["X", "missing"], "ours")
    assert ours_rows == ["t1", "t2", "average"] and ours_cols[0].cells["average"] == "15.0"


# ----------------------------------------------------------------------------- analysis helpers
def _bank() -> ExpertBank:
    import torch

    specs = [ModuleSpec(name=f"blocks.{d}.{n}", key=f"blocks.{d}.{n}.weight", d_out=6, d_in=5, kind="linear",
                        group=n, depth=d) for d in (0, 1) for n in ("fc1", "fc2")]
    bank = ExpertBank(specs, EvolutionConfig(rank_ratio=0.4, margin=0.0))
    g = torch.Generator().manual_seed(0)
    theta0 = {s.key: torch.randn(6, 5, generator=g) for s in specs}
    base = {s.key: torch.randn(6, 5, generator=g) for s in specs}
    for t in range(4):
        ft = {k: v + base[k] * (1 if t % 2 == 0 else -1) + 0.05 * torch.randn(6, 5, generator=g)
              for k, v in theta0.items()}
        bank.absorb(f"t{t}", theta0, ft)
    return bank


def test_bank_layout_matches_the_bank(tmp_path: Path) -> None:
    bank = _bank()
    bank.save(tmp_path / "bank")
    (tmp_path / "bank" / "experts.safetensors").unlink()              # committed results carry no tensors
    layout = load_bank_layout(tmp_path / "bank")
    assert layout.allocation() == bank.allocation()
    assert allocation_matrix(layout) == allocation_matrix(bank)
    assert experts_by_group(layout) == experts_by_group(bank)
    growth = experts_growth(layout)
    assert set(growth) == {"fc1", "fc2"} and all(len(v) == 4 for v in growth.values())
    assert all(v[0] == 1 and all(b >= a for a, b in zip(v, v[1:])) for v in growth.values())
    assert all(v[-1] == pytest.approx(experts_by_group(bank)["by_group"][g]["experts_mean"])
               for g, v in growth.items())
    with pytest.raises(BankFormatError):
        load_bank_layout(tmp_path)
    with pytest.raises(BankFormatError):
        BankLayout({"format": "other"})


def test_mean_summaries() -> None:
    a = {"T": 4, "by_depth": {0: {"experts_mean": 1.0}, 1: {"experts_mean": 3.0}}}
    b = {"T": 4, "by_depth": {0: {"experts_mean": 2.0}}}
    m = mean_summaries([a, b])
    assert m == {"T": 4.0, "by_depth": {0: {"experts_mean": 1.5}, 1: {"experts_mean": 3.0}}}
    with pytest.raises(ValueError):
        mean_summaries([])


def test_routing_helpers() -> None:
    def res(steps, final):
        return {"steps": [{"task": t, "routing_accuracy": r} for t, r in steps], "routing_accuracy_final": final}

    r1 = res([("a", {"a": 1.0}), ("b", {"b": 0.5})], {"a": 1.0, "b": 0.5})
    r2 = res([("b", {"b": 0.0}), ("a", {"a": 1.0})], {"a": 0.5, "b": 0.5})
    assert routing_by_step([r1, r2]) == [50.0, 75.0]
    assert routing_per_task([r1, r2]) == {"a": 75.0, "b": 50.0}
    assert routing_by_step([res([("a", None)], None)]) == [None]


def test_combine_verdicts() -> None:
    R, P, N = ({"verdict": v, "evidence": v} for v in (claims.REPRODUCED, claims.PARTLY, claims.NOT))
    assert claims.combine([R, R])["verdict"] == claims.REPRODUCED
    assert claims.combine([N, N])["verdict"] == claims.NOT
    assert claims.combine([R, N])["verdict"] == claims.PARTLY
    assert claims.combine([P, P], ["ρ", "λ"])["evidence"].startswith("ρ: partly")
    assert claims.combine([])["verdict"] == claims.NOT
    with pytest.raises(ValueError):
        claims.combine([R], ["a", "b"])


# ----------------------------------------------------------------------------- the reference command
def test_run_reference_on_the_toy_benchmark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = {**parameter_set("smoke", "toy"), "groups": ["toy-3"], "seeds": [42], "methods": ["swa", "made_it"],
              "device": "cpu"}
    notebooks = ["table1_acc_bwt", "table2_affinity_cosine", "fig4_score_densities"]
    m = run_reference(params, tmp_path, notebooks, show_progress=False, command=["test"])
    keys = sorted(m["runs"])
    assert keys == ["toy-3/made_it-score=cosine/seed42.json", "toy-3/made_it/seed42.json", "toy-3/swa/seed42.json"]
    assert all(v["wall_s"] >= 0 and v["library_hash"] == m["library_hash"] for v in m["runs"].values())
    assert list(m["analysis"]) == ["pairwise-toy-3-rho0.1"]
    saved = json.loads((tmp_path / "smoke" / "manifest.json").read_text())
    assert saved["runs"] == m["runs"] and saved["command"] == ["test"]
    # the notebooks read it back as reference results
    ref = nbsupport.ReferenceResults(tmp_path, profile="smoke")
    assert ref.available and ref.groups == ["toy-3"]
    got = ref.results("toy-3", bookplan.table1_runs(["swa", "made_it"]), [42])
    assert [r["label"] for r in got] == ["Average (SWA)", "MADE-IT"]
    assert ref.bank_layout("toy-3", bookplan.made_it_variant(), 42) is not None
    assert ref.analysis("pairwise-toy-3-rho0.1")["tasks"] == ["toy0", "toy1", "toy2"]
    assert ref.record("odem-toy-3-seed42-contiguous") is None      # runs kept aside from the grid
    rec = tmp_path / "smoke" / "_records" / "odem-toy-3-seed42-contiguous.json"
    rec.parent.mkdir()
    rec.write_text(json.dumps({"method": "odem", "ACC": 1.0}))
    assert ref.record("odem-toy-3-seed42-contiguous") == {"method": "odem", "ACC": 1.0}
    # resuming runs nothing again
    m2 = run_reference(params, tmp_path, notebooks, show_progress=False, command=["test"])
    assert m2["runs"] == m["runs"]
    # a changed library is refused unless allowed
    monkeypatch.setattr("madeit_core.reference.library_hash", lambda: "f" * 64)
    with pytest.raises(MergeInputError, match="allow-code-change"):
        run_reference(params, tmp_path, notebooks, show_progress=False)
    m3 = run_reference(params, tmp_path, notebooks, allow_code_change=True, show_progress=False)
    assert m3["library_hashes"][-1] == "f" * 64 and len(m3["library_hashes"]) == 2


def test_run_reference_script_dry_run() -> None:
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "run_reference.py"), "--profile", "smoke",
                          "--benchmark", "toy", "--runs", "1", "--dry-run"], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "toy-4:" in out.stdout and "total:" in out.stdout


def test_run_reference_script_sets_the_thread_count(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("run_reference_script", REPO / "scripts" / "run_reference.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        args = ["--profile", "smoke", "--benchmark", "toy", "--runs", "1", "--dry-run"]
        assert script.main([*args, "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1           # the default a grid process runs with
        torch.set_num_threads(2)
        assert script.main([*args, "--threads", "0"]) == 0
        assert torch.get_num_threads() == 2           # 0 leaves torch alone
        with pytest.raises(SystemExit):
            script.main([*args, "--threads", "-1"])
        assert "--threads must be" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_build_results_keep_progress_bars_out_of_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = {**parameter_set("smoke", "toy"), "results_dir": str(tmp_path)}
    build = nbsupport.BuildResults(params)
    with build._quiet():
        print("bar 50%", file=sys.stderr)
    assert capsys.readouterr().err == ""
    with pytest.raises(RuntimeError), build._quiet():
        print("what happened", file=sys.stderr)
        raise RuntimeError("x")
    assert "what happened" in capsys.readouterr().err                # shown when the block fails
    loud = nbsupport.BuildResults(params, show_progress=True)
    with loud._quiet():
        print("bar 60%", file=sys.stderr)
    assert "bar 60%" in capsys.readouterr().err
    assert build.root.parent == tmp_path and build.root.name.startswith("lib-")


def test_reference_runs_cheapest_methods_first() -> None:
    from madeit_core.reference import COST_TIERS, run_order

    p = {**parameter_set("smoke", "toy"), "seeds": [42, 43]}
    order = run_order(reference_jobs(p))
    tiers = [COST_TIERS.get(run.method, 3) for _, run, _ in order]
    assert tiers == sorted(tiers) and tiers[0] == 0 and tiers[-1] == COST_TIERS["odem"]
    assert len(order) == sum(len(j.runs) * len(j.seeds) for j in reference_jobs(p))
    first = [(j.group, run.method, r) for j, run, r in order[:2]]
    assert first == [("toy-4", "pretrained", 0), ("toy-4", "individual", 0)]


def test_reference_manifest_scope_accumulates_over_invocations() -> None:
    """A run limited to one group must not drop the other groups from the manifest (the book reads
    the manifest's groups and seeds to find the committed results)."""
    from madeit_core.reference import merged_scope

    first = merged_scope({}, {"profile": "offline", "groups": ["offline-8", "offline-14", "offline-20"],
                              "seeds": [42, 43]}, ["table1_acc_bwt"])
    assert first == {"groups": ["offline-8", "offline-14", "offline-20"], "seeds": [42, 43],
                     "notebooks": ["table1_acc_bwt"]}
    later = merged_scope(first, {"profile": "offline", "groups": ["offline-8"], "seeds": [44, 42]},
                         ["fig2_allocation"])
    assert later == {"groups": ["offline-8", "offline-14", "offline-20"], "seeds": [42, 43, 44],
                     "notebooks": ["table1_acc_bwt", "fig2_allocation"]}
    out_of_order = merged_scope({"groups": ["offline-20"]}, {"profile": "offline", "groups": ["offline-8"],
                                                             "seeds": [42]}, None)
    assert out_of_order["groups"] == ["offline-8", "offline-20"]        # the profile's order


def test_manifest_writes_merge_concurrent_invocations(tmp_path: Path) -> None:
    """Two invocations that loaded the same manifest and then each saved their own runs: the file
    keeps both, scopes become the union, and an entry newer on disk beats a stale in-memory one."""
    from madeit_core.reference import save_manifest

    base = {"format": "madeit-reference/1", "profile": "offline", "runs": {"g/old/seed42.json": {"wall_s": 1.0}},
            "analysis": {}, "groups": ["offline-8"], "seeds": [42], "notebooks": ["table1_acc_bwt"],
            "commands": [["first"]], "library_hashes": ["a"]}
    save_manifest(tmp_path, json.loads(json.dumps(base)), {"runs": {}, "analysis": {}})
    a, b = json.loads(json.dumps(base)), json.loads(json.dumps(base))
    b["groups"], b["seeds"], b["notebooks"] = ["offline-14"], [43], ["ablations"]
    b["commands"].append(["second"])
    b["library_hashes"].append("b")
    save_manifest(tmp_path, a, {"runs": {"g/x/seed42.json": {"wall_s": 2.0},
                                         "g/old/seed42.json": {"wall_s": 5.0}}, "analysis": {"p": {"wall_s": 1}}})
    merged = save_manifest(tmp_path, b, {"runs": {"g/y/seed43.json": {"wall_s": 3.0}}, "analysis": {}})
    disk = json.loads((tmp_path / "manifest.json").read_text())
    assert disk == merged
    assert disk["runs"] == {"g/old/seed42.json": {"wall_s": 5.0}, "g/x/seed42.json": {"wall_s": 2.0},
                            "g/y/seed43.json": {"wall_s": 3.0}}
    assert disk["analysis"] == {"p": {"wall_s": 1}} and disk["wall_s_runs_total"] == 10.0
    assert disk["groups"] == ["offline-8", "offline-14"] and disk["seeds"] == [42, 43]
    assert disk["notebooks"] == ["table1_acc_bwt", "ablations"]
    assert disk["commands"] == [["first"], ["second"]] and disk["library_hashes"] == ["a", "b"]


def test_run_claims(tmp_path: Path) -> None:
    import os
    import socket

    from madeit_core.reference import claim_run

    path = tmp_path / "g" / "m" / "seed42.json"
    claim = claim_run(path)
    assert claim is not None and claim.read_text() == f"{socket.gethostname()} {os.getpid()}"
    assert claim_run(path) == claim                              # our own claim: still ours
    claim.write_text(f"{socket.gethostname()} {os.getppid()}")   # a live other process holds it
    assert claim_run(path) is None
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    claim.write_text(f"{socket.gethostname()} {gone.pid}")        # its process is gone: taken over
    assert claim_run(path) == claim and claim.read_text().endswith(f" {os.getpid()}")
    claim.write_text("half-writ")                                 # unreadable: taken over
    assert claim_run(path) == claim


def test_run_reference_skips_a_run_another_process_claimed(tmp_path: Path) -> None:
    import os
    import socket

    params = {**parameter_set("smoke", "toy"), "groups": ["toy-3"], "seeds": [42], "methods": ["swa", "ties"],
              "device": "cpu"}
    held = tmp_path / "smoke" / "toy-3" / "ties" / "seed42.claim"
    held.parent.mkdir(parents=True)
    held.write_text(f"{socket.gethostname()} {os.getppid()}")
    m = run_reference(params, tmp_path, ["table1_acc_bwt"], show_progress=False, analysis=False)
    assert "toy-3/swa/seed42.json" in m["runs"] and "toy-3/ties/seed42.json" not in m["runs"]
    entry = m["runs"]["toy-3/swa/seed42.json"]
    assert entry["wall_s_all_processes"] >= entry["wall_s"] > 0
    assert not (tmp_path / "smoke" / "toy-3" / "ties" / "seed42.json").exists()
    assert held.exists() and not (tmp_path / "smoke" / "toy-3" / "swa" / "seed42.claim").exists()


def test_grid_status_counts_orders_medians_and_time_left() -> None:
    from madeit_core.reference import grid_status, grid_status_markdown, run_key
    from madeit_core.reproduce import MethodRun

    swa, cos = MethodRun("Average (SWA)", "swa"), MethodRun("cosine", "made_it", {"score": "cosine", "tag": "cos"})
    jobs = [bookplan.Job("g8", (swa, cos), (42, 43, 44))]
    assert run_key("g8", cos, 1, "offline") == "g8/made_it-cos/seed43.json"
    manifest = {"runs": {run_key("g8", swa, 0, "offline"): {"wall_s": 10.0},
                         run_key("g8", swa, 2, "offline"): {"wall_s": 30.0},
                         "g8/other/seed42.json": {"wall_s": 99.0}}}
    rows = {r["label"]: r for r in grid_status(manifest, jobs, "offline")}
    assert (rows["Average (SWA)"]["done"], rows["Average (SWA)"]["planned"]) == (2, 3)
    assert rows["Average (SWA)"]["median_wall_s"] == 20.0 and rows["Average (SWA)"]["missing_s"] == 20.0
    assert rows["cosine"]["done"] == 0 and rows["cosine"]["missing_s"] is None
    md = grid_status_markdown(list(rows.values()))
    assert "| row | g8 |" in md and "| Average (SWA) | 2/3 · 20 s |" in md and "| cosine | 0/3 |" in md
    assert "2 of 6 protocol runs recorded; the rest would take about 20 s" in md
    assert "1 group row with no finished run anywhere is not counted" in md
    assert grid_status(None, jobs, "offline")[0]["done"] == 0
    # given the manifest's folder, a run counts only while its results file is there
    with tempfile.TemporaryDirectory() as d:
        kept = Path(d) / run_key("g8", swa, 2, "offline")
        kept.parent.mkdir(parents=True)
        kept.write_text("{}")
        on_disk = {r["label"]: r for r in grid_status(manifest, jobs, "offline", folder=d)}
    assert on_disk["Average (SWA)"]["done"] == 1 and on_disk["Average (SWA)"]["median_wall_s"] == 30.0
    # a row finished on one group only: its other groups' time is extrapolated in the number of tasks
    jobs2 = [*jobs, bookplan.Job("g20", (swa,), (42, 43, 44)), bookplan.Job("g14", (swa,), (42, 43, 44))]
    rows2 = grid_status(manifest, jobs2, "offline", tasks_per_group={"g8": 8, "g14": 14, "g20": 20})
    by = {(r["group"], r["label"]): r for r in rows2}
    assert by[("g20", "Average (SWA)")]["extrapolated_s"] == 20.0 * 20 / 8 * 3
    assert by[("g8", "Average (SWA)")]["extrapolated_s"] is None and by[("g8", "cosine")]["extrapolated_s"] is None
    md2 = grid_status_markdown(rows2)
    assert "2 group rows with no finished run yet would add roughly 4 min" in md2      # 105 + 150 s
    # ODE-M scales with its Euler steps, not with the number of tasks
    from madeit_core.reference import cost_units
    assert [cost_units("odem", t) for t in (8, 14, 20)] == [170.0, 222.0, 254.0]
    assert cost_units("swa", 14) == 14.0
    odem = MethodRun("ODE-M", "odem")
    jobs3 = [bookplan.Job("g8", (odem,), (42, 43)), bookplan.Job("g20", (odem,), (42, 43))]
    m3 = {"runs": {run_key("g8", odem, 0, "offline"): {"wall_s": 170.0}}}
    rows3 = {r["group"]: r for r in grid_status(m3, jobs3, "offline", tasks_per_group={"g8": 8, "g20": 20})}
    assert rows3["g20"]["extrapolated_s"] == pytest.approx(254.0 * 2)
    assert "1 group row with no finished run anywhere is not counted" in md2
    # a resumed run counts all its processes' time; a complete row leaves nothing "at the recorded pace"
    m4 = {"runs": {run_key("g8", swa, r, "offline"): {"wall_s": 5.0, "wall_s_all_processes": 50.0 + r}
                   for r in range(3)}}
    rows4 = [r for r in grid_status(m4, jobs, "offline") if r["label"] == "Average (SWA)"]
    assert rows4[0]["median_wall_s"] == 51.0 and rows4[0]["missing_s"] == 0.0
    md4 = grid_status_markdown(rows4)
    assert "3 of 3 protocol runs recorded; the rows with finished runs are complete." in md4
    assert "about 0 s" not in md4


def test_run_wall_time_counts_earlier_processes() -> None:
    from madeit_core.reference import entry_wall_s, run_wall_s

    assert run_wall_s({"timings": {"wall_s_all_processes": 70.0}}, 20.0) == 70.0
    # results from before the field: the sum of the step timings, never less than this invocation
    old = {"timings": {"absorb_s": 40.0, "eval_s": 25.0, "final_eval_s": 5.0, "wall_s_this_process": 20.0}}
    assert run_wall_s(old, 20.0) == 70.0 and run_wall_s(old, 90.0) == 90.0
    assert entry_wall_s({"wall_s": 3.0}) == 3.0 and entry_wall_s({"wall_s": 3.0, "wall_s_all_processes": 9.0}) == 9.0


def test_analysis_status_names_each_groups_pairwise_scores() -> None:
    from madeit_core.reference import analysis_status, analysis_status_markdown

    manifest = {"analysis": {"pairwise-g8-rho0.1": {"wall_s": 3.0}, "pairwise-g8-rho0.5": {"wall_s": 3.0}}}
    st = analysis_status(manifest, ["g8", "g14"])
    assert st == {"pairwise-g8-rho0.1": True, "pairwise-g14-rho0.1": False}     # the default rank ratio only
    md = analysis_status_markdown(st)
    assert md.startswith("Pairwise scores of Figures 4-5 (1 of 2)") and "`pairwise-g14-rho0.1` missing" in md
    assert analysis_status(None, ["g8"]) == {"pairwise-g8-rho0.1": False} and analysis_status_markdown({}) == ""


def test_routing_vs_acc() -> None:
    """One point per run with a recorded routing accuracy; Pearson r over ≥ 3 runs with spread."""
    from madeit_core.plots import routing_acc_figure
    from madeit_core.reproduce import routing_vs_acc

    def run(seed, routing, acc):
        return {"seed": seed, "ACC": acc, "routing_accuracy_final": routing}

    runs = [run(1, {"a": 1.0, "b": 0.5}, 70.0), run(2, {"a": 0.0, "b": 0.5}, 40.0),
            run(3, {"a": 0.5, "b": None}, 55.0), run(4, None, 90.0)]
    d = routing_vs_acc(runs)
    assert d["points"] == [(75.0, 70.0, 1), (25.0, 40.0, 2), (50.0, 55.0, 3)]
    assert d["r"] == pytest.approx(1.0)
    d2 = routing_vs_acc([run(1, {"a": 1.0}, 70.0), run(2, {"a": 0.0}, 80.0), run(3, {"a": 0.5}, 60.0)])
    assert d2["r"] == pytest.approx(-0.5)
    assert routing_vs_acc(runs[:2])["r"] is None                         # too few orders
    assert routing_vs_acc([run(i, {"a": 1.0}, 50.0 + i) for i in range(3)])["r"] is None   # no spread
    fig = routing_acc_figure({"g": d, "empty": routing_vs_acc([])}, title="t")
    assert len(fig.axes[0].collections) == 1 and "r = 1.00" in fig.axes[0].get_legend().get_texts()[0].get_text()


def test_check_zoo_refuses_a_zoo_that_is_not_the_committed_one(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from madeit_core.io import write_json
    from madeit_core.reference import check_zoo

    def manifest(task: str, ft: float) -> dict:
        return {"task": task, "key": f"k-{task}", "num_classes": 10, "data": {"n_train": 100, "n_test_eval": 50},
                "accuracy": {"probe": 0.5, "finetuned": ft}, "wall_s": {"total": 1.0}}

    for task, ft in (("a", 0.9), ("b", 0.8)):
        write_json(tmp_path / "cache" / task / "manifest.json", manifest(task, ft))
    bench = SimpleNamespace(zoo=SimpleNamespace(task_dir=lambda t: tmp_path / "cache" / t))
    summaries = tmp_path / "zoo"
    write_json(summaries / "g.json", {"tasks": [{"task": "a", "key": "k-a", "probe": 0.5, "finetuned": 0.9},
                                                {"task": "b", "key": "k-b", "probe": 0.5, "finetuned": 0.8}]})
    check_zoo(bench, ["a", "b"], "g", summaries)                     # the committed zoo: passes
    check_zoo(bench, ["a", "b"], "other", summaries)                 # no summary for the group: not checked
    check_zoo(bench, ["a", "b"], "g", None)                          # checking switched off
    write_json(tmp_path / "cache" / "b" / "manifest.json", manifest("b", 0.84))   # same key, other encoder
    with pytest.raises(MergeInputError, match=r"zoo of g is not the one(.|\n)*b: finetuned 0.8 → 0.84"):
        check_zoo(bench, ["a", "b"], "g", summaries)


def test_ablation_table_rows_per_group_and_variant() -> None:
    def res(label: str, group: str, acc: float, experts: float, routing: float | None) -> dict:
        return {"label": label, "method": "made_it", "group": group, "order": ["a", "b"], "ACC": acc, "BWT": -1.0,
                "routing_accuracy_final": {"a": routing, "b": routing} if routing is not None else None,
                "timings": {"absorb_s": 1.0}, "method_summary": {"experts_mean": experts}}

    by_group = {"g8": [res("default", "g8", 50.0, 2.0, 0.5), res("default", "g8", 52.0, 4.0, 0.7),
                       res("sum", "g8", 40.0, 3.0, None)],
                "g14": [res("default", "g14", 60.0, 5.0, 1.0)]}
    md = booktables.ablation_table(by_group, ["default", "sum", "never run"], expected=2).splitlines()
    assert md[0] == "| group · variant | ACC | BWT | experts per module | routing (%) |"
    assert md[2] == "| g8 · default | 51.0±1.4 | -1.0±0.0 | 3.00 | 60.0 |"
    assert md[3] == "| g8 · sum | 40.0±0.0 (n=1) | -1.0±0.0 (n=1) | 3.00 | – |"     # partial, no routing
    assert md[4].startswith("| g14 · default | 60.0±0.0 (n=1) |") and len(md) == 5   # no row for 'never run'


def test_beside_paper_interleaves_by_number_of_tasks() -> None:
    ours = [booktables.Column("ref · g8"), booktables.Column("ref · g20")]
    paper = booktables.paper_table1_columns("ACC", "ViT-B/32", {"MADE-IT": "made_it"})
    cols = booktables.beside_paper(ours, [8, 20], paper)
    assert [c.header for c in cols] == ["ref · g8", "paper · ViT-B/32 · T=8", "ref · g20",
                                        "paper · ViT-B/32 · T=20", "paper · ViT-B/32 · T=14"]
    with pytest.raises(ValueError, match="task counts"):
        booktables.beside_paper(ours, [8], paper)


def test_table2_long_rows_per_source_and_group() -> None:
    cols = [booktables.Column(h) for h in booktables.TABLE2_COLUMNS]
    rows = [{"method": "subspace", "group": "g8", "ACC": 50.0, "ACC_std": 1.0, "BWT": -2.0, "BWT_std": 0.5, "runs": 10},
            {"method": "cosine", "group": "g8", "ACC": 48.0, "ACC_std": 2.0, "BWT": -3.0, "BWT_std": 0.5, "runs": 4}]
    assert booktables.table2_long(rows, ["g8", "g20"], "ref", cols, expected=10) == ["ref · g8"]
    assert booktables.paper_table2_long(cols, ["ViT-L/14"]) == ["paper · ViT-L/14 · T=8"]
    md = booktables.markdown_table(["ref · g8", "paper · ViT-L/14 · T=8"], cols, "source · group").splitlines()
    assert md[0] == "| source · group | subspace · ACC | cosine · ACC | subspace · BWT | cosine · BWT |"
    assert md[2] == "| ref · g8 | 50.0±1.0 | 48.0±2.0 (n=4) | -2.0±0.5 | -3.0±0.5 (n=4) |"
    assert md[3].split(" | ")[2] == "{:.1f}±{:.1f}".format(*TABLE2["cosine"]["ViT-L/14"]["ACC"])


def test_table_cells_get_soft_breaks_and_nothing_else_does() -> None:
    md = ("see [ab_cd](https://x.org/ab_cd,ef) and made_it\n\n"
          "| made_it_bank_parameters | variant |\n|---|---|\n| [xx_yy](https://x.org/pp_qq) | max(10,kk) |")
    html = nbsupport.markdown_html(md)
    assert "<th>made_<wbr>it_<wbr>bank_<wbr>parameters</th>" in html
    assert "max(<wbr>10,<wbr>kk)" in html
    assert 'href="https://x.org/pp_qq"' in html and ">xx_<wbr>yy</a>" in html   # attributes untouched
    assert html.startswith("<p>see <a href=\"https://x.org/ab_cd,ef\">ab_cd</a> and made_it</p>")
    assert nbsupport.soft_breaks("<td>a_</td>") == "<td>a_</td>"               # nothing after: no break
    short = "<td>batch 128 (CPU), T=8 (n=2), x_1, svd=exact</td>"                # short or spaced: whole
    assert nbsupport.soft_breaks(short) == short.replace("svd=", "svd=<wbr>")
