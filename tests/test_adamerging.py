"""Continual layer-wise AdaMerging (baselines.md §5): 5A (MINGLE, default) and 5B (OPCM scripts)
with zero steps against the formulas of §5, clamping, the accumulate switch, entropy
minimisation moving the coefficients, determinism, the data record, protocol and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from madeit_core.errors import MergeInputError
from madeit_core.methods import get_method
from madeit_core.methods._lowrank_moe import entropy_loss
from madeit_core.methods.base import MergeContext
from madeit_core.protocol import RunSpec, run_continual
from madeit_core.toy import ToyBenchmark


@pytest.fixture(scope="module")
def bench() -> ToyBenchmark:
    b = ToyBenchmark(num_tasks=3, steps=15)
    for t in b.tasks:
        b.finetuned(t)
    return b


def ctx_for(bench: ToyBenchmark, data: bool = True, seed: int = 0) -> MergeContext:
    return MergeContext(modules=bench.modules(), num_tasks=len(bench.tasks), seed=seed,
                        heads={t: bench.head(t) for t in bench.tasks} if data else {},
                        unlabeled_samples=bench.unlabeled_samples if data else None, show_progress=False)


def run(bench: ToyBenchmark, tasks: list[str] | None = None, data: bool = True, seed: int = 0, **hp: object):
    m = get_method("adamerging", **hp)
    m.setup(bench.pretrained(), ctx_for(bench, data, seed))
    for t in tasks if tasks is not None else bench.tasks:
        m.absorb(t, bench.finetuned(t))
    return m


def theta0_taus(bench: ToyBenchmark) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    theta0 = {k: v.detach().clone() for k, v in bench.pretrained().state_dict().items()}
    return theta0, [{k: bench.finetuned(t)[k] - theta0[k] for k in theta0} for t in bench.tasks]


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_zero_steps_5a_keeps_only_the_current_task(bench: ToyBenchmark) -> None:
    theta0, taus = theta0_taus(bench)
    m = run(bench, data=False, max_steps=0)              # no data needed without TTA
    close(m.merged, {k: theta0[k] + 0.3 * taus[-1][k] for k in theta0})   # earlier tasks discarded [ref]
    assert m.data_used == {} and m.hparams()["variant"] == "5A" and m.hparams()["clamp_weights"] is True
    m = run(bench, data=False, max_steps=0, init_values=1.2)                # clamp to [0, 1]
    close(m.merged, {k: theta0[k] + taus[-1][k] for k in theta0})


def test_zero_steps_5b_pairwise_rounds(bench: ToyBenchmark) -> None:
    theta0, (t1, t2, t3) = theta0_taus(bench)
    m = run(bench, bench.tasks[:1], data=False, variant="5B", max_steps=0)
    close(m.merged, {k: theta0[k] + t1[k] for k in theta0})                 # θ^(1) = θ_1
    m.absorb(bench.tasks[1], bench.finetuned(bench.tasks[1]))
    close(m.merged, {k: theta0[k] + 0.3 * (t1[k] + t2[k]) for k in theta0})
    m.absorb(bench.tasks[2], bench.finetuned(bench.tasks[2]))
    close(m.merged, {k: theta0[k] + 0.09 * (t1[k] + t2[k]) + 0.3 * t3[k] for k in theta0})
    h = m.hparams()
    assert (h["clamp_weights"], h["lr"], h["per_class"]) == (False, 1e-3, "all")
    assert get_method("adamerging", variant="5B").hparams()["max_steps"] == 1000
    assert get_method("adamerging").hparams()["max_steps"] == 50


def test_zero_steps_accumulate_switch(bench: ToyBenchmark) -> None:
    theta0, taus = theta0_taus(bench)
    want = {k: theta0[k] + 0.3 * sum(tv[k] for tv in taus) for k in theta0}
    for mode in ("append", "on_merged"):
        m = run(bench, data=False, max_steps=0, accumulate=mode)
        close(m.merged, want)
    assert m.coef is None
    m = run(bench, data=False, max_steps=0, accumulate="append")
    assert m.coef is not None and tuple(m.coef.shape) == (3, len(m.keys))


def test_entropy_minimisation_moves_coefficients_and_lowers_loss(bench: ToyBenchmark) -> None:
    task = bench.tasks[0]
    # full-batch steps (20 images = 5 per class × 4 classes) so the logged loss is one objective
    m = run(bench, [task], max_steps=15, lr=1e-2, batch_size=20)
    coef = torch.tensor(m.coefficients[task])
    assert coef.shape == (1, len(m.keys)) and (coef - 0.3).abs().max() > 1e-3
    losses = m.tta_losses[task]
    assert len(losses) == 15 and losses[-1] < losses[0]
    x = bench.unlabeled_samples(task, 5, m.ctx.step_seed(0))
    with torch.no_grad():
        after = float(entropy_loss(bench.head(task)(m.merged_model()(x))))
    assert after < losses[0]


def test_deterministic_given_the_seed(bench: ToyBenchmark) -> None:
    a = run(bench, max_steps=4, seed=1)
    b = run(bench, max_steps=4, seed=1)
    assert all(torch.equal(a.merged[k], b.merged[k]) for k in a.merged)
    assert a.coefficients == b.coefficients and a.tta_losses == b.tta_losses
    c = run(bench, max_steps=4, seed=2)
    assert c.tta_losses != a.tta_losses


def test_data_used_records_what_was_seen(bench: ToyBenchmark) -> None:
    m = run(bench, max_steps=3)                          # 3 batches of 16 cover all 20 images
    recs = m.data_used["records"]
    assert [(r["step"], r["task"], r["count"], r["per_class"]) for r in recs] == \
        [(i + 1, t, 20, 5) for i, t in enumerate(bench.tasks)]
    assert all(r["split"] == "test" and r["labelled"] is False and r["distinct_images_used"] == 20 for r in recs)
    assert m.data_used["total_images_drawn"] == 60
    m = run(bench, max_steps=1, variant="5B")            # 5B: whole test splits of the two round tasks
    recs = m.data_used["records"]
    t0, t1, t2 = bench.tasks
    assert [(r["step"], r["task"], r["count"], r["per_class"]) for r in recs] == \
        [(2, t0, 80, "all"), (2, t1, 80, "all"), (3, t1, 80, "all"), (3, t2, 80, "all")]
    assert all(r["distinct_images_used"] == 16 for r in recs)   # one batch of 16 per task per step
    assert m.data_used["total_images_drawn"] == 320


def test_bad_hparams_and_missing_data(bench: ToyBenchmark) -> None:
    for bad, word in [({"variant": "5C"}, "variant"), ({"accumulate": "all"}, "accumulate"),
                      ({"variant": "5B", "accumulate": "append"}, "5A only"), ({"max_steps": -1}, "max_steps"),
                      ({"per_class": 0}, "per_class"), ({"lr": 0}, "lr"), ({"batch_size": 2.5}, "batch_size"),
                      ({"init_values": "x"}, "init_values")]:
        with pytest.raises(MergeInputError, match=word):
            get_method("adamerging", **bad)
    with pytest.raises(MergeInputError, match="unlabeled_samples"):
        run(bench, data=False, max_steps=2)


@pytest.mark.parametrize("hp", [{"max_steps": 3}, {"max_steps": 2, "variant": "5B", "per_class": 5},
                                {"max_steps": 2, "accumulate": "append"}])
def test_protocol_end_to_end_and_resume(bench: ToyBenchmark, tmp_path: Path, hp: dict) -> None:
    spec = RunSpec(method="adamerging", group="toy", tasks=bench.tasks, profile="test", hparams=hp)
    full = run_continual(spec, bench, tmp_path / "a", show_progress=False)
    saved = json.loads((tmp_path / "a" / "test" / "toy" / "adamerging" / "seed42.json").read_text())
    assert saved["ACC"] == full["ACC"] and 0 <= saved["ACC"] <= 100 and saved["needs_data"] is True
    assert saved["hparams"]["max_steps"] == hp["max_steps"] and saved["data_used"]["records"]
    part = run_continual(spec, bench, tmp_path / "b", show_progress=False, stop_after=2)
    assert part["completed_steps"] == 2
    resumed = run_continual(spec, bench, tmp_path / "b", show_progress=False)
    assert resumed["acc_matrix"] == full["acc_matrix"] and resumed["BWT"] == full["BWT"]
    assert resumed["data_used"] == full["data_used"]
    assert resumed["method_summary"] == full["method_summary"]
