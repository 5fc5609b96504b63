"""Geometry of experts: affinity properties, Lemma 1, Prop. 1, Prop. 2 and subspace merging."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from madeit_core.errors import MergeInputError
from madeit_core.geometry import (
    Expert,
    chordal_distance,
    expert_affinity,
    expert_cosine,
    extract_expert,
    merge_experts,
    polar_factor,
    principal_angles,
    rank_for,
    subspace_affinity,
    top_k_svd,
)


@pytest.fixture(autouse=True)
def _float64() -> object:
    """This file checks identities to 1e-8 and below: compute in float64, restore afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def orth(d: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    return q


def rotation(k: int, seed: int) -> torch.Tensor:
    return orth(k, k, seed + 1000)


dims = st.tuples(st.integers(4, 24), st.integers(1, 4), st.integers(1, 4), st.integers(0, 10_000))


@settings(max_examples=60, deadline=None)
@given(dims)
def test_affinity_range_symmetry_invariance(params: tuple[int, int, int, int]) -> None:
    d, k1, k2, seed = params
    A, B = orth(d, k1, seed), orth(d, k2, seed + 1)
    a = subspace_affinity(A, B)
    assert -1e-12 <= a <= 1 + 1e-12
    assert a == pytest.approx(subspace_affinity(B, A), abs=1e-12)
    a_rot = subspace_affinity(A @ rotation(k1, seed), B @ rotation(k2, seed + 7))
    assert a_rot == pytest.approx(a, abs=1e-10)


@settings(max_examples=30, deadline=None)
@given(dims)
def test_equal_and_orthogonal_subspaces(params: tuple[int, int, int, int]) -> None:
    d, k1, _, seed = params
    A = orth(d, k1, seed)
    assert subspace_affinity(A, A @ rotation(k1, seed)) == pytest.approx(1.0, abs=1e-10)
    if 2 * k1 <= d:
        Q = orth(d, 2 * k1, seed)
        assert subspace_affinity(Q[:, :k1], Q[:, k1:]) == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(dims)
def test_lemma1_trace_frobenius(params: tuple[int, int, int, int]) -> None:
    """Lemma 1: tr(P_A P_B) = ‖AᵀB‖_F² (the dense projections appear only in this test)."""
    d, k1, k2, seed = params
    A, B = orth(d, k1, seed), orth(d, k2, seed + 1)
    lhs = torch.trace((A @ A.T) @ (B @ B.T))
    rhs = torch.linalg.matrix_norm(A.T @ B) ** 2
    assert float(lhs) == pytest.approx(float(rhs), abs=1e-5)


@settings(max_examples=40, deadline=None)
@given(dims)
def test_prop1_principal_angles(params: tuple[int, int, int, int]) -> None:
    """Prop. 1: ‖AᵀB‖_F² = Σ cos² θ_i; for k1 = k2, a = mean cos² θ_i."""
    d, k1, k2, seed = params
    A, B = orth(d, k1, seed), orth(d, k2, seed + 1)
    theta = principal_angles(A, B)
    assert theta.numel() == min(k1, k2)
    assert torch.all(theta[1:] >= theta[:-1] - 1e-12)
    assert torch.all((theta >= 0) & (theta <= math.pi / 2 + 1e-9))
    fro = float(torch.linalg.matrix_norm(A.T @ B) ** 2)
    assert float(torch.sum(torch.cos(theta) ** 2)) == pytest.approx(fro, abs=1e-5)
    B2 = orth(d, k1, seed + 2)
    assert subspace_affinity(A, B2) == pytest.approx(float(torch.mean(torch.cos(principal_angles(A, B2)) ** 2)),
                                                      abs=1e-5)


@settings(max_examples=40, deadline=None)
@given(dims)
def test_prop2_chordal_distance(params: tuple[int, int, int, int]) -> None:
    """Prop. 2: d_c² = ½‖P_A − P_B‖_F² = k − ‖AᵀB‖_F², hence a = 1 − d_c²/k (k1 = k2 = k)."""
    d, k, _, seed = params
    A, B = orth(d, k, seed), orth(d, k, seed + 1)
    dense = 0.5 * torch.linalg.matrix_norm(A @ A.T - B @ B.T) ** 2
    dc = chordal_distance(A, B)
    assert dc**2 == pytest.approx(float(dense), abs=1e-5)
    assert subspace_affinity(A, B) == pytest.approx(1 - dc**2 / k, abs=1e-5)


def test_rank_rule() -> None:
    assert rank_for(768, 768, 0.1) == 77
    assert rank_for(3072, 768, 0.1) == 77
    assert rank_for(10, 3, 0.1) == 1
    assert rank_for(10, 5, 0.1) == 1  # 0.5 rounds half up
    assert rank_for(10, 15, 0.25) == 3  # 2.5 -> 3
    with pytest.raises(MergeInputError):
        rank_for(4, 4, 0.0)


def test_extract_expert_matches_truncated_svd() -> None:
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(20, 12, generator=g)
    e = extract_expert(delta, rank_ratio=0.25, task="a")
    assert e.rank == 3 and e.tasks == ["a"]
    U, s, Vh = torch.linalg.svd(delta, full_matrices=False)
    ref = (U[:, :3] * s[:3]) @ Vh[:3]
    assert torch.allclose(e.delta(), ref, atol=1e-10)
    assert torch.allclose(e.U.T @ e.U, torch.eye(3), atol=1e-10)


def test_extract_expert_half_precision_and_conv() -> None:
    delta = torch.randn(8, 6, 1, 1).to(torch.bfloat16)
    e = extract_expert(delta, rank_ratio=0.5)
    assert e.U.dtype == torch.float32 and e.U.shape == (8, 3)


def test_zero_update_gives_zero_expert() -> None:
    e = extract_expert(torch.zeros(5, 4), rank_ratio=0.5, task="z")
    assert e.is_zero and e.tasks == ["z"] and e.U.shape == (5, 0)
    assert subspace_affinity(e.U, orth(5, 2, 0)) == 0.0


@pytest.mark.parametrize("bad", [torch.tensor([[float("nan"), 0.0]]), torch.ones(2, 2, dtype=torch.int64),
                                 torch.ones(3)])
def test_extract_expert_rejects_bad_input(bad: torch.Tensor) -> None:
    with pytest.raises(MergeInputError):
        extract_expert(bad, rank_ratio=0.5)


def test_randomized_svd_keeps_the_subspace() -> None:
    g = torch.Generator().manual_seed(3)
    low = torch.randn(200, 10, generator=g) @ torch.randn(10, 150, generator=g)
    m = low + 0.01 * torch.randn(200, 150, generator=g)
    Ue, se, Ve = top_k_svd(m, 10, "exact")
    Ur, sr, Vr = top_k_svd(m, 10, "randomized")
    assert subspace_affinity(Ue, Ur) > 0.999 and subspace_affinity(Ve, Vr) > 0.999
    assert torch.allclose(se, sr, rtol=1e-6)
    # the same seed gives the same numbers
    assert torch.equal(top_k_svd(m, 10, "randomized")[0], Ur)


def random_expert(d_out: int, d_in: int, k: int, seed: int, task: str) -> Expert:
    g = torch.Generator().manual_seed(seed)
    s = torch.sort(torch.rand(k, generator=g, dtype=torch.float64) + 0.5, descending=True).values
    return Expert(orth(d_out, k, seed), s, orth(d_in, k, seed + 50), [task])


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 4))
def test_polar_merge_returns_orthonormal_bases_and_exact_product(seed: int, k: int) -> None:
    e1, e2 = random_expert(24, 18, k, seed, "a"), random_expert(24, 18, k, seed + 1, "b")
    merged = merge_experts(e1, e2, rank=2 * k)  # no truncation
    assert merged.tasks == ["a", "b"]
    eye = torch.eye(2 * k)
    assert torch.allclose(merged.U.T @ merged.U, eye, atol=1e-8)
    assert torch.allclose(merged.V.T @ merged.V, eye, atol=1e-8)
    Up = polar_factor(torch.cat([e1.U, e2.U], 1))
    Vp = polar_factor(torch.cat([e1.V, e2.V], 1))
    expected = (Up * torch.cat([e1.s, e2.s])) @ Vp.T
    assert torch.allclose(merged.delta(), expected, atol=1e-8)
    # truncated: the k largest entries of s_cat are kept
    trunc = merge_experts(e1, e2)
    assert trunc.rank == k
    assert torch.allclose(trunc.s, torch.sort(torch.cat([e1.s, e2.s]), descending=True).values[:k])


@pytest.mark.parametrize("rule", ["sum", "mean"])
def test_exact_rules_are_best_low_rank_approximations(rule: str) -> None:
    e1, e2 = random_expert(30, 20, 3, 1, "a"), random_expert(30, 20, 3, 2, "b")
    e1.tasks = ["a", "c"]  # e1 already holds two tasks: 'mean' weights it 2:1
    target = e1.delta() + e2.delta() if rule == "sum" else (2 * e1.delta() + e2.delta()) / 3
    full = merge_experts(e1, e2, rank=6, rule=rule)  # type: ignore[arg-type]
    assert torch.allclose(full.delta(), target, atol=1e-8)
    trunc = merge_experts(e1, e2, rank=3, rule=rule)  # type: ignore[arg-type]
    U, s, Vh = torch.linalg.svd(target, full_matrices=False)
    assert torch.allclose(trunc.delta(), (U[:, :3] * s[:3]) @ Vh[:3], atol=1e-8)
    assert trunc.tasks == ["a", "c", "b"]


def test_polar_merge_of_identical_subspaces_is_not_the_sum() -> None:
    """The caution of method.md §4: polar merging of coinciding subspaces adds a spurious part."""
    e = random_expert(64, 64, 4, 5, "a")
    twin = Expert(e.U, e.s, e.V, ["b"])
    polar = merge_experts(e, twin, rule="polar")
    exact = merge_experts(e, twin, rule="sum")
    target = 2 * e.delta()
    assert torch.allclose(exact.delta(), target, atol=1e-8)
    rel = float(torch.linalg.matrix_norm(polar.delta() - target) / torch.linalg.matrix_norm(target))
    assert rel > 0.3


def test_polar_merge_when_columns_exceed_dimension() -> None:
    e1, e2 = random_expert(5, 4, 3, 1, "a"), random_expert(5, 4, 3, 2, "b")
    merged = merge_experts(e1, e2, rank=3)
    assert merged.rank <= 3
    assert torch.allclose(merged.U.T @ merged.U, torch.eye(merged.rank), atol=1e-8)
    assert torch.allclose(merged.V.T @ merged.V, torch.eye(merged.rank), atol=1e-8)


def test_expert_scores() -> None:
    e1, e2 = random_expert(16, 12, 2, 1, "a"), random_expert(16, 12, 2, 2, "b")
    assert expert_affinity(e1, e1) == pytest.approx(1.0)
    assert expert_affinity(e1, e2) == pytest.approx(0.5 * (subspace_affinity(e1.U, e2.U) +
                                                           subspace_affinity(e1.V, e2.V)))
    flat = torch.nn.functional.cosine_similarity(e1.delta().flatten(), e2.delta().flatten(), dim=0)
    assert expert_cosine(e1, e2) == pytest.approx(float(flat), abs=1e-10)
    assert expert_cosine(e1, e1) == pytest.approx(1.0)
