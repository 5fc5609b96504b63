"""Grids, tables and figure analyses on the toy benchmark."""

from __future__ import annotations

from pathlib import Path

import pytest

from madeit_core.analysis import allocation_matrix, experts_by_group, pairwise_scores, task_experts
from madeit_core.errors import MergeInputError
from madeit_core.experts import ExpertBank
from madeit_core.reproduce import MethodRun, load_results, per_task_means, run_difference, run_grid, summary_rows
from madeit_core.toy import ToyBenchmark


@pytest.fixture(scope="module")
def bench() -> ToyBenchmark:
    return ToyBenchmark(num_tasks=3, steps=30)


def test_grid_tables_and_artifacts(bench: ToyBenchmark, tmp_path: Path) -> None:
    methods = ["swa", MethodRun("MADE-IT", "made_it", {"rank_ratio": 0.5}),
               MethodRun("MADE-IT (cosine)", "made_it", {"rank_ratio": 0.5, "score": "cosine", "tag": "cosine"})]
    res = run_grid(bench, "toy-3", bench.tasks, methods, runs=[0, 1], out_dir=tmp_path, profile="test",
                   show_progress=False)
    assert len(res) == 6
    rows = summary_rows(res)
    assert {r["method"] for r in rows} == {"swa", "MADE-IT", "MADE-IT (cosine)"}
    swa = next(r for r in rows if r["method"] == "swa")
    accs = [r["ACC"] for r in res if r["label"] == "swa"]
    assert swa["ACC"] == pytest.approx(sum(accs) / 2) and swa["runs"] == 2
    made = next(r for r in rows if r["method"] == "MADE-IT")
    assert made["routing_accuracy"] is not None and 0 <= made["routing_accuracy"] <= 100
    assert len(load_results(tmp_path, "test", "toy-3")) == 6
    per = per_task_means(res)
    assert set(per["swa"]) == set(bench.tasks)
    bank = ExpertBank.load(tmp_path / "test" / "toy-3" / "made_it" / "seed42.artifacts")
    keys, tasks, rows_ = allocation_matrix(bank)
    assert len(keys) == 12 and len(tasks) == 3 and all(r[0] == 0 for r in rows_)
    groups = experts_by_group(bank)
    assert set(groups["by_group"]) == {"attention", "mlp"}
    assert all(0 <= g["reduction_rate"] < 1 for g in groups["by_group"].values())
    # the cosine variant wrote its own file
    assert (tmp_path / "test" / "toy-3" / "made_it-cosine" / "seed42.json").is_file()


def test_pairwise_scores(bench: ToyBenchmark) -> None:
    theta0 = bench.pretrained().state_dict()
    specs = bench.modules()
    experts = task_experts(theta0, {t: bench.finetuned(t) for t in bench.tasks}, specs, 0.25)
    out = pairwise_scores(experts, specs)
    n = len(bench.tasks)
    assert len(out["affinity_scores"]) == len(specs) * n * (n - 1) // 2
    for i in range(n):
        assert out["affinity"][i][i] == pytest.approx(1.0) and out["cosine"][i][i] == pytest.approx(1.0)
        for j in range(n):
            assert out["affinity"][i][j] == out["affinity"][j][i]
    assert all(0 <= a <= 1 + 1e-9 for a in out["affinity_scores"])
    assert all(-1 - 1e-9 <= c <= 1 + 1e-9 for c in out["cosine_scores"])


def test_plots_draw(bench: ToyBenchmark, tmp_path: Path) -> None:
    from madeit_core import plots
    from madeit_core.methods import get_method
    from madeit_core.methods.base import MergeContext

    m = get_method("made_it", rank_ratio=0.5)
    m.setup(bench.pretrained(), MergeContext(modules=bench.modules()))
    for t in bench.tasks:
        m.absorb(t, bench.finetuned(t))
    keys, tasks, rows = allocation_matrix(m.bank)
    figs = [plots.allocation_figure(keys, tasks, rows, max_modules=6)]
    g = experts_by_group(m.bank)
    figs.append(plots.experts_bar_figure(g["by_group"], g["by_depth"], g["T"]))
    figs.append(plots.score_density_figure([0.1, 0.5, 0.9], [0.0, 0.01, -0.02]))
    figs.append(plots.heatmap_pair_figure(tasks, [[1, 0.5, 0.2]] * 3, [[1, 0.0, 0.1]] * 3))
    figs.append(plots.sensitivity_figure([0.1, 0.2], [(50, 1), (55, 2)], [(-3, 1), (-2, 1)], "ρ", experts=[2, 3]))
    for i, f in enumerate(figs):
        f.savefig(tmp_path / f"f{i}.png")
        assert (tmp_path / f"f{i}.png").stat().st_size > 1000
    md = plots.table_markdown([{"a": 1, "b": 2}], ["a", "b"])
    assert md.splitlines()[2] == "| 1 | 2 |"


def test_wide_grids_fit_the_page(tmp_path: Path) -> None:
    """On 20 tasks and 33 modules the Fig. 2 grid and the Fig. 5 pair are drawn no wider than the
    book shows unscaled (tick labels would shrink to illegibility otherwise); saved with
    ``bbox_inches='tight'`` as the notebooks do, their width stays within the page's too."""
    import numpy as np
    from PIL import Image

    from madeit_core import plots

    tasks = [f"task_with_a_long_name_{i}" for i in range(20)]
    keys = [f"_blocks.{i}._project_conv.weight" for i in range(33)]
    rows = np.random.default_rng(0).integers(0, 12, size=(33, 20)).tolist()
    mat = np.eye(20).tolist()
    figs = {"grid": plots.allocation_figure(keys, tasks, rows),
            "pair": plots.heatmap_pair_figure(tasks, mat, mat, title="t")}
    small = plots.heatmap_pair_figure(tasks[:4], np.eye(4).tolist(), np.eye(4).tolist())
    assert small.get_size_inches()[0] > small.get_size_inches()[1]      # few tasks: side by side
    for name, fig in figs.items():
        assert fig.get_size_inches()[0] <= plots.PAGE_WIDTH_IN + 1e-9, name
        fig.savefig(tmp_path / f"{name}.png", dpi=110, bbox_inches="tight")
        width = Image.open(tmp_path / f"{name}.png").size[0]
        assert width <= 110 * plots.PAGE_WIDTH_IN * 1.1, (name, width)


def test_run_difference_compares_one_order_of_one_method() -> None:
    a = {"method": "odem", "group": "g", "order": ["x", "y", "z"], "a_Ti": [0.5, 0.25, 0.75], "ACC": 50.0,
         "BWT": -2.0, "hparams": {"step_size": 0.01}}
    b = {**a, "a_Ti": [0.5, 0.2, 0.8], "ACC": 50.0, "BWT": -1.5,
         "hparams": {"step_size": 0.01, "memory_format": "channels_last"}}
    d = run_difference(a, b)
    assert [t for t, *_ in d["final"]] == ["x", "y", "z"]
    assert d["final"][1] == pytest.approx(("y", 25.0, 20.0, -5.0))
    assert d["tasks_changed"] == 2 and d["max_abs_final"] == pytest.approx(5.0)
    assert d["BWT"] == pytest.approx((-2.0, -1.5, 0.5)) and d["ACC"][2] == pytest.approx(0.0)
    assert d["hparams"] == {"memory_format": (None, "channels_last")} and d["absorb_s"] is None
    timed = run_difference({**a, "timings": {"absorb_s": 200.0}}, {**b, "timings": {"absorb_s": 150.0}})
    assert timed["absorb_s"] == pytest.approx((200.0, 150.0, 0.75))
    assert run_difference(a, a)["tasks_changed"] == 0 and run_difference(a, a)["hparams"] == {}
    with pytest.raises(MergeInputError, match="'order'"):
        run_difference(a, {**b, "order": ["y", "x", "z"]})


def test_expert_colours_stay_distinct_past_twenty() -> None:
    """Fig. 2's grid colours expert indices; ``get_cmap("tab20", n)`` repeats its 20 colours."""
    import matplotlib.pyplot as plt
    import numpy as np

    from madeit_core import plots

    assert len({tuple(c) for c in plt.get_cmap("tab20", 25)(np.arange(25))}) == 20     # the old map
    for n in (1, 7, 20, 25, 60, 90):
        colours = plots.expert_colours(n)(np.arange(n))
        assert len({tuple(np.round(c, 6)) for c in colours}) == n, n
    assert tuple(plots.expert_colours(25)(0)) == tuple(plt.get_cmap("tab20")(0))       # same look up to 20
