"""OPCM (baselines.md §4): split rank, projection against explicit projector matrices, the
hand-computed two-task merge, the numerical sanity checks of §4 (g), both settings of the
diagonal quirk, non-leaf parameters, module discovery from the context, protocol and resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from madeit_core.errors import MergeInputError
from madeit_core.methods import get_method
from madeit_core.methods.base import MergeContext
from madeit_core.methods.opcm import project_task_vector, split_rank
from madeit_core.protocol import RunSpec, run_continual
from madeit_core.toy import ToyBenchmark


def explicit_projection(delta: torch.Tensor, tau: torch.Tensor, alpha: float, zero_diagonal: bool) -> torch.Tensor:
    """The definition, written the long way: full SVD, square U and V, P = Uᵀ τ V, zero the
    r × r leading block (and the diagonal), map back. Float64, a Python loop for r."""
    U, s, Vh = torch.linalg.svd(delta.double(), full_matrices=True)
    V = Vh.T
    shares, acc, r = [], 0.0, None
    for i, v in enumerate(s.tolist()):
        acc += v
        shares.append(acc / float(s.sum()))
        if r is None and shares[-1] > alpha:
            r = i
    r = 0 if r is None else r
    P = U.T @ tau.double() @ V
    for i in range(r):
        for j in range(r):
            P[i, j] = 0.0
    if zero_diagonal:
        for i in range(min(delta.shape)):
            P[i, i] = 0.0
    return U @ P @ V.T


def test_split_rank_reference_values() -> None:
    assert split_rank(torch.tensor([3.0, 1.0]), 0.5) == 0
    assert split_rank(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.5) == 2
    assert split_rank(torch.tensor([4.0, 3.0, 2.0, 1.0]), 0.5) == 1
    assert split_rank(torch.tensor([4.0, 3.0, 2.0, 1.0]), 1.0) == 0      # α ≥ 1: nothing passes ">"
    assert split_rank(torch.zeros(3), 0.5) == 0


@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (4, 4)])
@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.9, 1.0])
def test_closed_form_matches_explicit_projectors(shape: tuple[int, int], alpha: float) -> None:
    g = torch.Generator().manual_seed(sum(shape) + int(10 * alpha))
    delta, tau = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    for zd in (False, True):
        got, _ = project_task_vector(delta, tau, alpha, zd)
        torch.testing.assert_close(got.double(), explicit_projection(delta, tau, alpha, zd), atol=2e-5, rtol=1e-5)
    a, _ = project_task_vector(delta, tau, alpha, False)
    b, _ = project_task_vector(delta, tau, alpha, True)
    assert (a - b).abs().max() > 1e-3          # the diagonal coordinates are really removed


def two_task_linear(zero_diagonal: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(3, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(4, 3, generator=g))
        lin.bias.copy_(torch.randn(4, generator=g))
    theta0 = {k: v.detach().clone() for k, v in lin.state_dict().items()}
    taus = [{k: 0.5 * torch.randn(v.shape, generator=g) for k, v in theta0.items()} for _ in range(2)]
    m = get_method("opcm", zero_diagonal=zero_diagonal)
    m.setup(lin, MergeContext(show_progress=False))
    for i, tv in enumerate(taus):
        m.absorb(f"t{i}", {k: theta0[k] + tv[k] for k in theta0})
    # expected, by hand: λ_1 = 1, S = Δ + τ̃ (weight projected, bias added), rescaled to ā
    proj = explicit_projection(taus[0]["weight"], taus[1]["weight"], 0.5, zero_diagonal)
    S = {"weight": taus[0]["weight"].double() + proj, "bias": (taus[0]["bias"] + taus[1]["bias"]).double()}
    norm = lambda d: math.sqrt(sum(float(v.double().pow(2).sum()) for v in d.values()))  # noqa: E731
    mean_norm = (norm(taus[0]) + norm(taus[1])) / 2
    expected = {k: theta0[k].double() + S[k] * mean_norm / norm(S) for k in S}
    for k in expected:
        torch.testing.assert_close(m.merged[k].double(), expected[k], atol=1e-5, rtol=1e-5)
    assert m.lam == pytest.approx(norm(S) / mean_norm, rel=1e-5)
    return m.merged, theta0, mean_norm


def test_two_tasks_match_hand_projection_both_settings() -> None:
    with_diag, theta0, _ = two_task_linear(True)
    without, _, _ = two_task_linear(False)
    assert (with_diag["weight"] - without["weight"]).abs().max() > 1e-3


def diag_example(zero_diagonal: bool) -> tuple[torch.Tensor, float]:
    lin = nn.Linear(4, 4, bias=False)
    nn.init.zeros_(lin.weight)
    m = get_method("opcm", zero_diagonal=zero_diagonal)
    m.setup(lin, MergeContext(show_progress=False))
    tau = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0]))
    m.absorb("a", {"weight": tau})
    m.absorb("b", {"weight": tau.clone()})
    return m.merged["weight"], m.lam


def test_identical_task_vectors_both_quirk_settings() -> None:
    w, lam = diag_example(True)                          # FusionBench HEAD: τ̃ = 0
    torch.testing.assert_close(w, torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0])))
    assert lam == pytest.approx(1.0)
    w, lam = diag_example(False)                         # MINGLE fork (default): τ̃ = diag(0, 3, 2, 1)
    torch.testing.assert_close(w.diag(), torch.tensor([2.582, 3.873, 2.582, 1.291]), atol=1e-3, rtol=0)
    assert lam == pytest.approx(math.sqrt(72 / 30), rel=1e-6)
    assert get_method("opcm").hparams()["zero_diagonal"] is False


@pytest.mark.parametrize("zero_diagonal", [False, True])
def test_orthogonal_example_is_basis_independent(zero_diagonal: bool) -> None:
    lin = nn.Linear(3, 3, bias=False)
    nn.init.zeros_(lin.weight)
    m = get_method("opcm", zero_diagonal=zero_diagonal)
    m.setup(lin, MergeContext(show_progress=False))
    e = torch.eye(3)
    m.absorb("a", {"weight": torch.outer(e[0], e[0])})
    m.absorb("b", {"weight": torch.outer(e[0], e[1])})
    torch.testing.assert_close(m.merged["weight"], (torch.outer(e[0], e[0]) + torch.outer(e[0], e[1])) / math.sqrt(2))
    assert m.lam == pytest.approx(math.sqrt(2))


class Bias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(2))


def test_bookkeeping_non_linear_parameters_only() -> None:
    m = get_method("opcm")
    m.setup(Bias(), MergeContext(show_progress=False))
    expect = [([1.0, 0.0], 1.0), ([0.7071, 0.7071], math.sqrt(2)), ([0.8047, 0.8047], 2.4853)]
    for i, (v, (w, lam)) in enumerate(zip([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], expect)):
        m.absorb(f"t{i}", {"bias": torch.tensor(v)})
        assert m.merged["bias"].tolist() == pytest.approx(w, abs=1e-4)
        assert m.lam == pytest.approx(lam, abs=1e-4)


# ----------------------------------------------------------------------------- on the toy ViT
@pytest.fixture(scope="module")
def bench() -> ToyBenchmark:
    b = ToyBenchmark(num_tasks=3, steps=15)
    for t in b.tasks:
        b.finetuned(t)
    return b


def test_invariant_bookkeeping_and_non_leaf_parameters(bench: ToyBenchmark) -> None:
    theta0 = {k: v.detach().clone() for k, v in bench.pretrained().state_dict().items()}
    m = get_method("opcm")
    m.setup(bench.pretrained(), MergeContext(modules=bench.modules(), show_progress=False))
    norm = lambda d: math.sqrt(sum(float(v.double().pow(2).sum()) for v in d.values()))  # noqa: E731
    taus, prev, prev_lam = [], None, 1.0
    for t in bench.tasks:
        ft = bench.finetuned(t)
        taus.append({k: ft[k] - theta0[k] for k in theta0})
        m.absorb(t, ft)
        off = {k: m.merged[k] - theta0[k] for k in theta0}
        mean_norm = sum(norm(tv) for tv in taus) / len(taus)
        assert norm(off) == pytest.approx(mean_norm, rel=1e-5)              # ‖θ^(t) − θ0‖ = ā_t
        if prev is not None:
            # S_t = S_{t−1} + τ̃_t on leaf parameters (a Linear weight is projected, a bias is not)
            w, b = "layers.0.fc1.weight", "layers.0.fc1.bias"
            proj, _ = project_task_vector(prev[w], taus[-1][w], 0.5, False)
            torch.testing.assert_close(m.lam * off[w], prev_lam * prev[w] + proj, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(m.lam * off[b], prev_lam * prev[b] + taus[-1][b], atol=1e-5, rtol=1e-4)
            # parameters owned by the non-leaf root (class token, position table) are only shrunk [ref]
            for k in ("class_embedding", "position_embedding"):
                torch.testing.assert_close(off[k], prev[k] / m.lam, atol=1e-6, rtol=1e-5)
        prev, prev_lam = off, m.lam
    assert m.summary()["not_merged_after_step1"] == ["class_embedding", "position_embedding"]
    assert m.summary()["projected_modules"] == len(bench.modules())
    other = get_method("opcm", merge_nonleaf=True)
    other.setup(bench.pretrained(), MergeContext(modules=bench.modules(), show_progress=False))
    for t in bench.tasks:
        other.absorb(t, bench.finetuned(t))
    assert not torch.allclose(other.merged["class_embedding"], m.merged["class_embedding"])
    assert other.summary()["not_merged_after_step1"] == []


def test_projected_modules_come_from_the_context(bench: ToyBenchmark) -> None:
    theta0 = {k: v.detach().clone() for k, v in bench.pretrained().state_dict().items()}
    fc1 = [s for s in bench.modules() if s.name.endswith("fc1")]
    m = get_method("opcm")
    m.setup(bench.pretrained(), MergeContext(modules=fc1, show_progress=False))
    t0, t1 = bench.tasks[:2]
    m.absorb(t0, bench.finetuned(t0))
    m.absorb(t1, bench.finetuned(t1))
    assert m.summary()["projected_modules"] == len(fc1) == 2
    q = "layers.0.q_proj.weight"            # not listed: added unprojected
    plain = (bench.finetuned(t0)[q] - theta0[q]) + (bench.finetuned(t1)[q] - theta0[q])
    torch.testing.assert_close(m.merged[q] - theta0[q], plain / m.lam, atol=1e-6, rtol=1e-5)


def test_bad_hparams() -> None:
    for bad in [{"alpha": -0.1}, {"alpha": "half"}, {"alpha": float("nan")}]:
        with pytest.raises(MergeInputError, match="alpha"):
            get_method("opcm", **bad)


def test_protocol_end_to_end_and_resume(bench: ToyBenchmark, tmp_path: Path) -> None:
    spec = RunSpec(method="opcm", group="toy", tasks=bench.tasks, profile="test", eval_seen=True)
    full = run_continual(spec, bench, tmp_path / "a", show_progress=False)
    saved = json.loads((tmp_path / "a" / "test" / "toy" / "opcm" / "seed42.json").read_text())
    assert saved["ACC"] == full["ACC"] and 0 <= saved["ACC"] <= 100 and saved["needs_data"] is False
    assert saved["hparams"] == {"alpha": 0.5, "zero_diagonal": False, "merge_nonleaf": False, "include_buffers": False}
    assert len(saved["method_summary"]["lambda_per_step"]) == 3
    part = run_continual(spec, bench, tmp_path / "b", show_progress=False, stop_after=2)
    assert part["completed_steps"] == 2
    resumed = run_continual(spec, bench, tmp_path / "b", show_progress=False)
    assert resumed["acc_matrix"] == full["acc_matrix"] and resumed["BWT"] == full["BWT"]
    assert resumed["method_summary"]["lambda_per_step"] == full["method_summary"]["lambda_per_step"]
