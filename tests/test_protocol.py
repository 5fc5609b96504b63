"""The continual protocol: reference orders, ACC/BWT, results files, resume after a kill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from madeit_core.errors import MergeInputError
from madeit_core.protocol import RunSpec, acc_bwt, aggregate, group_tasks, run_continual, task_order
from madeit_core.toy import ToyBenchmark


def test_reference_orders_clip8() -> None:
    tasks = group_tasks("clip-8")
    assert task_order(tasks, 42) == ["eurosat", "svhn", "mnist", "dtd", "resisc45", "gtsrb", "sun397",
                                     "stanford-cars"]
    assert task_order(tasks, 43) == ["mnist", "dtd", "svhn", "eurosat", "stanford-cars", "gtsrb", "resisc45",
                                     "sun397"]


def test_reference_orders_clip14_and_20() -> None:
    assert task_order(group_tasks("clip-14"), 42)[:4] == ["oxford_flowers102", "stl10", "dtd", "mnist"]
    assert task_order(group_tasks("clip-20"), 51)[-3:] == ["emnist_letters", "fashion_mnist", "dtd"]


def test_order_does_not_disturb_global_random() -> None:
    import random

    random.seed(1)
    a = random.random()
    random.seed(1)
    task_order(group_tasks("clip-8"), 42)
    assert random.random() == a


def test_acc_bwt_hand_matrix() -> None:
    acc = [[0.9, None, None], [0.8, 0.7, None], [0.6, 0.5, 1.0]]
    ACC, BWT = acc_bwt(acc)
    assert ACC == pytest.approx(100 * (0.6 + 0.5 + 1.0) / 3)
    assert BWT == pytest.approx(100 * ((0.6 - 0.9) + (0.5 - 0.7)) / 2)
    assert acc_bwt([[0.4]]) == (pytest.approx(40.0), 0.0)
    with pytest.raises(MergeInputError):
        acc_bwt([[0.1, None], [None, 0.2]])


def test_aggregate_uses_sample_std() -> None:
    agg = aggregate([{"ACC": 1.0, "BWT": 0.0}, {"ACC": 3.0, "BWT": -2.0}])
    assert agg["ACC_mean"] == 2.0 and agg["ACC_std"] == pytest.approx(2 ** 0.5)


@pytest.fixture(scope="module")
def bench() -> ToyBenchmark:
    return ToyBenchmark(num_tasks=3, steps=30)


def test_run_writes_results_and_resumes_identically(bench: ToyBenchmark, tmp_path: Path) -> None:
    spec = RunSpec(method="swa", group="toy", tasks=bench.tasks, run=0, profile="test", eval_seen=True)
    full = run_continual(spec, bench, tmp_path / "a", show_progress=False)
    f = tmp_path / "a" / "test" / "toy" / "swa" / "seed42.json"
    saved = json.loads(f.read_text())
    assert saved["ACC"] == full["ACC"] and len(saved["order"]) == 3
    assert all(v is not None for v in saved["acc_matrix"][2])
    assert saved["manifest"]["hardware"]["cpu_count"] >= 1
    # simulated kill after one step, then resume
    out = tmp_path / "b"
    part = run_continual(spec, bench, out, show_progress=False, stop_after=1)
    assert part == {"interrupted": True, "completed_steps": 1}
    partial = out / "test" / "toy" / "swa" / "seed42.partial.json"
    elapsed = json.loads(partial.read_text())["elapsed_s"]
    assert elapsed > 0
    resumed = run_continual(spec, bench, out, show_progress=False)
    # the wall time counts the killed process's time up to its last saved step
    t, t_full = resumed["timings"], full["timings"]
    assert t["resumed_at_step"] == 1 and t_full["resumed_at_step"] == 0
    assert t["wall_s_all_processes"] == pytest.approx(elapsed + t["wall_s_this_process"], abs=1e-3)
    assert t_full["wall_s_all_processes"] == pytest.approx(t_full["wall_s_this_process"], abs=1e-3)
    assert resumed["acc_matrix"] == full["acc_matrix"]
    assert resumed["ACC"] == full["ACC"] and resumed["BWT"] == full["BWT"]
    assert not (out / "test" / "toy" / "swa" / "seed42.partial.json").exists()


def test_bad_runs(bench: ToyBenchmark) -> None:
    with pytest.raises(MergeInputError, match="empty task sequence"):
        run_continual(RunSpec(method="swa", group="toy", tasks=[]), bench, show_progress=False)
    with pytest.raises(MergeInputError, match="no task"):
        run_continual(RunSpec(method="swa", group="toy", tasks=["nope"]), bench, show_progress=False)
    with pytest.raises(MergeInputError, match="unknown method"):
        run_continual(RunSpec(method="nope", group="toy", tasks=bench.tasks), bench, show_progress=False)


def test_evaluation_cache_reuses_identical_weights_only(tmp_path):
    from madeit_core.protocol import EvalCache

    bench = ToyBenchmark(num_tasks=3, steps=30)
    tasks = list(bench.tasks)
    calls: list[str] = []
    real = bench.evaluate

    def counting(model, task):
        calls.append(task)
        return real(model, task)

    bench.evaluate = counting  # type: ignore[method-assign]
    # θ0 is the same model at every step: each task is evaluated once, then served from the cache
    # (a run makes 2T − 1 evaluations: a_ii at each step, then a_Ti for the T − 1 earlier tasks)
    spec = RunSpec(method="pretrained", group="g", tasks=tasks)
    cached = run_continual(spec, bench, tmp_path / "a", show_progress=False)
    assert sorted(calls) == sorted(tasks) and cached["timings"]["eval_cache_hits_this_process"] == 2
    calls.clear()
    fresh = run_continual(spec, bench, None, show_progress=False, eval_cache=False)
    assert len(calls) == 5 and fresh["acc_matrix"] == cached["acc_matrix"]
    # the individual models: each evaluated once over all orders
    calls.clear()
    ind = [run_continual(RunSpec(method="individual", group="g", run=r, tasks=tasks), bench, tmp_path / "b",
                         show_progress=False) for r in (0, 1)]
    assert ind[0]["order"] != ind[1]["order"] and len(calls) == 3
    # SWA's running mean in another order is not bit-identical: no false reuse, the same numbers as without cache
    calls.clear()
    swa = [run_continual(RunSpec(method="swa", group="g", run=r, tasks=tasks), bench, tmp_path / "b",
                         show_progress=False) for r in (0, 1)]
    # 2 × 5 evaluations, less the two first steps: SWA of one model is that fine-tuned model, bit for bit,
    # which the individual runs above already evaluated
    assert len(calls) == 8
    again = run_continual(RunSpec(method="swa", group="g", run=1, tasks=tasks), bench, None, show_progress=False,
                          eval_cache=False)
    assert again["acc_matrix"] == swa[1]["acc_matrix"]
    # persisted: a new process (a new cache object on the same folder) hits the files
    c = EvalCache(tmp_path / "a" / "_evalcache")
    assert len(list((tmp_path / "a" / "_evalcache").glob("*.json"))) == 3
    # MADE-IT's routed model has no fingerprint: always evaluated
    calls.clear()
    run_continual(RunSpec(method="made_it", group="g", tasks=tasks), bench, tmp_path / "c", show_progress=False)
    assert len(calls) == 5 and c.hits == 0
