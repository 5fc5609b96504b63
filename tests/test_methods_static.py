"""Data-free static rivals: SWA (baselines.md §1), continual Task Arithmetic (§2), continual
TIES-Merging (§3), and the reference rows "pretrained" / "individual" (§9.4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from madeit_core.errors import MergeInputError
from madeit_core.methods import get_method
from madeit_core.methods.base import MergeContext
from madeit_core.methods.ties import ties_merge
from madeit_core.protocol import RunSpec, run_continual
from madeit_core.toy import ToyBenchmark


class Vec(nn.Module):
    """A "model" that is one flat parameter vector (no modules): the hand examples of §1–3."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d))


def vec(values: list[float]) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=torch.float32)}


@pytest.fixture(scope="module")
def bench() -> ToyBenchmark:
    b = ToyBenchmark(num_tasks=3, steps=15)
    for t in b.tasks:
        b.finetuned(t)
    return b


def absorb_all(name: str, bench: ToyBenchmark, num_tasks: int | None = 3, **hp: object):
    m = get_method(name, **hp)
    m.setup(bench.pretrained(), MergeContext(modules=bench.modules(), num_tasks=num_tasks, show_progress=False))
    for t in bench.tasks:
        m.absorb(t, bench.finetuned(t))
    return m


def sd_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- SWA (§1)
def test_swa_scalar_sanity_and_mean_of_models(bench: ToyBenchmark) -> None:
    m = get_method("swa")
    m.setup(Vec(1), MergeContext(show_progress=False))
    got = []
    for i, v in enumerate([1.0, 2.0, 6.0]):
        m.absorb(f"t{i}", vec([v]))
        got.append(float(m.merged["w"]))
    assert got == pytest.approx([1.0, 1.5, 3.0])
    swa = absorb_all("swa", bench)
    fts = [bench.finetuned(t) for t in bench.tasks]
    for k in swa.merged:
        torch.testing.assert_close(swa.merged[k], sum(f[k] for f in fts) / 3, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- Task Arithmetic (§2)
@pytest.mark.parametrize("num_tasks, lam", [(8, 0.3), (14, 0.1), (20, 0.1), (3, 0.3), (None, 0.3)])
def test_task_arithmetic_lambda_from_group_size(num_tasks: int | None, lam: float) -> None:
    m = get_method("task_arithmetic")
    m.setup(Vec(2), MergeContext(num_tasks=num_tasks, show_progress=False))
    assert m.hparams()["resolved_scaling_factor"] == lam
    m2 = get_method("task_arithmetic", scaling_factor=0.7)
    m2.setup(Vec(2), MergeContext(num_tasks=num_tasks, show_progress=False))
    assert m2.hparams()["resolved_scaling_factor"] == 0.7 and m2.hparams()["scaling_factor_source"] == "explicit"


def test_task_arithmetic_equals_theta0_plus_lambda_sum(bench: ToyBenchmark) -> None:
    theta0 = sd_of(bench.pretrained())
    taus = [{k: bench.finetuned(t)[k] - theta0[k] for k in theta0} for t in bench.tasks]
    for num_tasks, lam in [(8, 0.3), (14, 0.1)]:
        m = absorb_all("task_arithmetic", bench, num_tasks=num_tasks)
        assert set(m.merged) == set(theta0)          # every parameter, class_embedding included
        for k in theta0:
            torch.testing.assert_close(m.merged[k], theta0[k] + lam * sum(tv[k] for tv in taus),
                                       rtol=1e-6, atol=1e-6)
    # the first model is θ0 + λ τ_1, not the fine-tuned model; τ twice → θ0 + 0.6 τ (§2 (g))
    m = get_method("task_arithmetic")
    m.setup(Vec(2), MergeContext(num_tasks=8, show_progress=False))
    m.absorb("a", vec([1.0, -2.0]))
    assert m.merged["w"].tolist() == pytest.approx([0.3, -0.6])
    m.absorb("b", vec([1.0, -2.0]))
    assert m.merged["w"].tolist() == pytest.approx([0.6, -1.2])


def test_task_arithmetic_bad_hparams() -> None:
    with pytest.raises(MergeInputError, match="scaling_factor"):
        get_method("task_arithmetic", scaling_factor="big")
    with pytest.raises(MergeInputError, match="finite"):
        get_method("ties", scaling_factor=float("nan"))


# ----------------------------------------------------------------------------- TIES (§3)
def test_ties_hand_examples() -> None:
    r1, r2 = [3.0, -1.0, 0.0, 2.0], [-2.0, -1.0, 4.0, 0.0]
    rows = torch.tensor([r1, r2])
    # K = 50 %, d = 4: the reference trim keeps ⌊2⌋ + 1 = 3 per row → rows unchanged here;
    # σ = sign([1, −2, 4, 2]) = [+, −, +, +]; column 0 keeps 3 only, column 1 both −1
    assert ties_merge(rows, 50, "sum").tolist() == [3.0, -2.0, 4.0, 2.0]
    assert ties_merge(rows, 50, "mean").tolist() == [3.0, -1.0, 4.0, 2.0]
    assert ties_merge(rows, 50, "max").tolist() == [3.0, -1.0, 4.0, 2.0]
    # exact top-k keeps 2 per row: [3, 0, 0, 2] and [−2, 0, 4, 0]
    assert ties_merge(rows, 50, "sum", trim="exact").tolist() == [3.0, 0.0, 4.0, 2.0]
    # a column whose kept entries cancel takes the global majority sign
    assert ties_merge(torch.tensor([[1.0, 2.0], [-1.0, 3.0]]), 100).tolist() == [1.0, 5.0]
    assert ties_merge(torch.tensor([[1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]]), 100).tolist() == [-1.0, -3.0, -4.0]
    # baselines.md §3 (g): rows [0.3 v, v], v = 1..10, keep 20 % → only the top 3 survive, as 1.3 v
    v = torch.arange(1.0, 11.0)
    torch.testing.assert_close(ties_merge(torch.stack([0.3 * v, v]), 20),
                               torch.tensor([0.0] * 7 + [10.4, 11.7, 13.0]))


DELTA = [0.5, -0.4, 0.3, 0.2, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0]
TAU2 = [-0.6, 0.1, 0.35, 0.0, 0.0, 0.05, 0.0, 0.0, 0.0, -0.2]


def _ties_two_steps(**hp: object) -> torch.Tensor:
    m = get_method("ties", scaling_factor=0.3, **hp)
    m.setup(Vec(10), MergeContext(show_progress=False))
    m.absorb("a", vec([x / 0.3 for x in DELTA]))          # θ^(1) − θ0 = 0.3 τ_1 = Δ
    torch.testing.assert_close(m.merged["w"], torch.tensor(DELTA))
    m.absorb("b", vec(TAU2))
    return m.merged["w"]


def test_continual_ties_increment_on_top_hand_example() -> None:
    # §3 (g): TIES(Δ, τ) = [−0.6, −0.4, 0.65, 0, …, −0.2]; new Δ = Δ + 0.3 · that
    torch.testing.assert_close(_ties_two_steps(), torch.tensor([0.32, -0.52, 0.495, 0.2, 0.1, 0, 0, 0, 0, -0.06]))


def test_continual_ties_replace_reading_differs_where_it_should() -> None:
    # θ^(2) = 0.3 · TIES([Δ/0.3; τ]): Δ/0.3 = [5/3, −4/3, 1, 2/3, 1/3, 0, …] trims to its top 3;
    # σ = [+, −, +, …, −] → [5/3, −4/3, 1.35, 0, …, −0.2] × 0.3. Δ's untrimmed 0.2 and 0.1 are gone.
    torch.testing.assert_close(_ties_two_steps(update="replace"),
                               torch.tensor([0.5, -0.4, 0.405, 0, 0, 0, 0, 0, 0, -0.06]))


def test_ties_defaults_and_bad_hparams(bench: ToyBenchmark) -> None:
    m = get_method("ties")
    assert m.hparams()["threshold"] == 20 and m.hparams()["merge_func"] == "sum"
    assert m.hparams()["update"] == "increment" and m.hparams()["trim"] == "reference"
    m.setup(Vec(2), MergeContext(show_progress=False))
    assert m.hparams()["resolved_scaling_factor"] == 0.5           # config default without num_tasks
    for bad in [{"threshold": 0}, {"threshold": 150}, {"merge_func": "median"}, {"update": "swap"},
                {"trim": "none"}]:
        with pytest.raises(MergeInputError):
            get_method("ties", **bad)
    first = absorb_all("ties", bench, num_tasks=8)
    theta0 = sd_of(bench.pretrained())
    t1 = bench.finetuned(bench.tasks[0])
    m1 = get_method("ties")
    m1.setup(bench.pretrained(), MergeContext(num_tasks=8, show_progress=False))
    m1.absorb(bench.tasks[0], t1)
    for k in theta0:   # step 1: θ0 + λ τ_1, no trimming
        torch.testing.assert_close(m1.merged[k], theta0[k] + 0.3 * (t1[k] - theta0[k]))
    assert first.summary()["increment_nonzero_per_task"][bench.tasks[1]] > 0


# ----------------------------------------------------------------------------- reference rows
def test_pretrained_and_individual_models(bench: ToyBenchmark) -> None:
    theta0 = sd_of(bench.pretrained())
    pre = absorb_all("pretrained", bench)
    ind = absorb_all("individual", bench)
    for t in bench.tasks:
        got = sd_of(pre.model_for_task(t))
        assert all(torch.equal(got[k], theta0[k]) for k in theta0)
        got = sd_of(ind.model_for_task(t))
        assert all(torch.equal(got[k], bench.finetuned(t)[k]) for k in theta0)
    last = sd_of(ind.merged_model())
    assert all(torch.equal(last[k], bench.finetuned(bench.tasks[-1])[k]) for k in theta0)
    with pytest.raises(MergeInputError, match="no fine-tuned model"):
        ind.model_for_task("nope")
    # state round trip
    tensors, meta = ind.state()
    again = get_method("individual")
    again.setup(bench.pretrained(), MergeContext(show_progress=False))
    again.restore(tensors, meta)
    got = sd_of(again.model_for_task(bench.tasks[1]))
    assert all(torch.equal(got[k], bench.finetuned(bench.tasks[1])[k]) for k in theta0)


# ----------------------------------------------------------------------------- protocol
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "pretrained", "individual"])
def test_protocol_end_to_end_and_resume(bench: ToyBenchmark, tmp_path: Path, method: str) -> None:
    spec = RunSpec(method=method, group="toy", tasks=bench.tasks, profile="test", eval_seen=True)
    full = run_continual(spec, bench, tmp_path / "a", show_progress=False)
    saved = json.loads((tmp_path / "a" / "test" / "toy" / method / "seed42.json").read_text())
    assert saved["ACC"] == full["ACC"] and 0 <= saved["ACC"] <= 100 and saved["needs_data"] is False
    assert saved["hparams"] == full["hparams"] and saved["data_used"] == {}
    assert all(v is not None for v in saved["acc_matrix"][-1])
    part = run_continual(spec, bench, tmp_path / "b", show_progress=False, stop_after=1)
    assert part == {"interrupted": True, "completed_steps": 1}
    resumed = run_continual(spec, bench, tmp_path / "b", show_progress=False)
    assert resumed["acc_matrix"] == full["acc_matrix"] and resumed["BWT"] == full["BWT"]
    if method == "individual":            # each task keeps its own model: a_{T,j} = a_{j,j}
        assert full["BWT"] == 0.0 and full["a_Ti"] == full["a_ii"]
    if method == "pretrained":
        assert full["BWT"] == 0.0


def test_float_buffers_stay_at_theta0_unless_included() -> None:
    """BatchNorm running statistics: not merged by default (the reference merges parameters
    only), merged with ``include_buffers``; the integer counter is never touched."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    theta0 = {k: v.clone() for k, v in net.state_dict().items()}
    ft = {k: (v + 0.5 if v.is_floating_point() else v.clone()) for k, v in theta0.items()}
    for name in ("task_arithmetic", "ties", "opcm", "adamerging"):
        for include in (False, True):
            hp: dict[str, object] = {"include_buffers": include}
            if name == "adamerging":
                hp["max_steps"] = 0
            m = get_method(name, **hp)
            m.setup(net, MergeContext(num_tasks=8, show_progress=False))
            m.absorb("a", ft)
            got = sd_of(m.merged_model())
            assert torch.equal(got["1.num_batches_tracked"], theta0["1.num_batches_tracked"])
            assert torch.equal(got["1.running_mean"], theta0["1.running_mean"]) is not include, (name, include)
            assert not torch.equal(got["1.weight"], theta0["1.weight"])
