"""Numeric checks of every identity on the book's derivations page (book/derivations.md).

Each test names the lemma or proposition it checks. Everything runs in float64 on random cases
of several shapes, unequal ranks included, and calls the library functions the method uses
(``madeit_core.geometry``, ``madeit_core.routing.fpa``); the reference values are computed
independently, mostly from dense d × d projectors, which only a test may afford.
"""

from __future__ import annotations

import math

import pytest
import torch

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
)
from madeit_core.routing import fpa, route_path

# (d, k1, k2): equal and unequal ranks, thin and wide subspaces.
SHAPES = [(12, 3, 3), (20, 2, 5), (33, 7, 4), (64, 4, 4), (50, 1, 6), (9, 4, 9)]
SEEDS = [0, 1, 2]
CASES = [(d, k1, k2, seed) for (d, k1, k2) in SHAPES for seed in SEEDS]
DT = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orth(d: int, k: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=DT))
    return q


def proj(A: torch.Tensor) -> torch.Tensor:
    return A @ A.T


def close(a: float, b: float, tol: float = 1e-10) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def pair(d: int, k1: int, k2: int, seed: int, overlap: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Two orthonormal bases with a random, non-trivial overlap (B is pulled towards A)."""
    g = gen(seed)
    A = orth(d, k1, g)
    raw = torch.randn(d, k2, generator=g, dtype=DT)
    raw = raw + overlap * 3.0 * A @ torch.randn(k1, k2, generator=g, dtype=DT)
    B, _ = torch.linalg.qr(raw)
    return A, B


@pytest.mark.parametrize("d,k1,k2,seed", CASES)
def test_projector_facts(d: int, k1: int, k2: int, seed: int) -> None:
    """Lemma lem-projector: P symmetric, idempotent, tr P = ‖P‖_F² = k, P_{AQ} = P_A."""
    A, _ = pair(d, k1, k2, seed)
    P = proj(A)
    assert torch.allclose(P, P.T, atol=1e-12)
    assert torch.allclose(P @ P, P, atol=1e-12)
    assert close(float(torch.trace(P)), k1) and close(float((P * P).sum()), k1)
    Q = orth(k1, k1, gen(seed + 99))
    assert torch.allclose(proj(A @ Q), P, atol=1e-12)


@pytest.mark.parametrize("d,k1,k2,seed", CASES)
def test_trace_frobenius(d: int, k1: int, k2: int, seed: int) -> None:
    """Lemma lem-trace-frobenius: tr(P_A P_B) = ‖AᵀB‖_F², and the library's a = that / min(k1, k2)."""
    A, B = pair(d, k1, k2, seed)
    dense = float(torch.trace(proj(A) @ proj(B)))
    assert close(dense, float((A.T @ B).pow(2).sum()))
    assert close(subspace_affinity(A, B) * min(k1, k2), dense)


def _bases_with_angles(d: int, thetas: torch.Tensor, extra: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (k + extra columns) and B (k columns) whose principal angles are ``thetas`` (and nothing
    else), hidden by a random rotation of the ambient space and of each basis."""
    k = thetas.numel()
    assert 2 * k + extra <= d
    E = torch.eye(d, dtype=DT)
    A = E[:, : k + extra]
    B = torch.cos(thetas) * E[:, :k] + torch.sin(thetas) * E[:, k + extra: 2 * k + extra]
    g = gen(seed)
    R = orth(d, d, g)
    return R @ A @ orth(k + extra, k + extra, g), R @ B @ orth(k, k, g)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("d,k,extra", [(10, 3, 0), (16, 4, 2), (40, 6, 5), (7, 1, 3)])
def test_principal_angles_known(d: int, k: int, extra: int, seed: int) -> None:
    """Prop. prop-principal-angles: singular values of AᵀB are cos θ_i (prescribed angles are recovered)."""
    thetas = torch.sort(torch.rand(k, generator=gen(seed + 5), dtype=DT) * (math.pi / 2)).values
    A, B = _bases_with_angles(d, thetas, extra, seed)
    assert torch.allclose(principal_angles(A, B), thetas, atol=1e-7)
    assert torch.allclose(principal_angles(B, A), thetas, atol=1e-7)
    assert close(subspace_affinity(A, B), float(torch.cos(thetas).pow(2).mean()))


@pytest.mark.parametrize("d,k1,k2,seed", CASES)
def test_principal_angles_sines(d: int, k1: int, k2: int, seed: int) -> None:
    """Independent description (Björck–Golub): for k2 ≤ k1, σ((I − P_A)B) = sin θ_i; all θ in [0, π/2]."""
    A, B = pair(d, k1, k2, seed)
    if k2 > k1:
        A, B = B, A
    theta = principal_angles(A, B)
    assert theta.numel() == min(k1, k2)
    assert bool(torch.all(theta[1:] >= theta[:-1]))
    assert bool(torch.all((theta >= 0) & (theta <= math.pi / 2 + 1e-12)))
    sines = torch.sort(torch.linalg.svdvals((torch.eye(d, dtype=DT) - proj(A)) @ B)).values
    assert torch.allclose(torch.sort(torch.sin(theta)).values, sines, atol=1e-7)


@pytest.mark.parametrize("d,k1,k2,seed", CASES)
def test_affinity_is_mean_cos2(d: int, k1: int, k2: int, seed: int) -> None:
    """Prop. prop-principal-angles: a(A, B) = mean cos² θ_i over the min(k1, k2) angles; 0 ≤ a ≤ 1."""
    A, B = pair(d, k1, k2, seed)
    a = subspace_affinity(A, B)
    assert close(a, float(torch.cos(principal_angles(A, B)).pow(2).mean()), 1e-9)
    assert -1e-12 <= a <= 1.0 + 1e-12
    # The extremes: a subspace inside the other gives 1, orthogonal subspaces give 0.
    m = min(k1, k2)
    assert close(subspace_affinity(A, A[:, :m]), 1.0)
    if k1 + k2 <= d:
        C = orth(d, k1 + k2, gen(seed + 3))
        assert subspace_affinity(C[:, :k1], C[:, k1:]) < 1e-12


@pytest.mark.parametrize("d,k1,k2,seed", CASES)
def test_chordal_distance(d: int, k1: int, k2: int, seed: int) -> None:
    """Prop. prop-chordal: d_c² = ½‖P_A − P_B‖_F² = (k1 + k2)/2 − ‖AᵀB‖² = |k1 − k2|/2 + Σ sin² θ_i."""
    A, B = pair(d, k1, k2, seed)
    dc = chordal_distance(A, B)
    dense = math.sqrt(0.5 * float((proj(A) - proj(B)).pow(2).sum()))
    assert close(dc, dense, 1e-9)
    sines = float(torch.sin(principal_angles(A, B)).pow(2).sum())
    assert close(dc**2, abs(k1 - k2) / 2 + sines, 1e-9)
    assert close(chordal_distance(B, A), dc)


@pytest.mark.parametrize("d,k1,k2,seed", CASES)
def test_affinity_from_chordal(d: int, k1: int, k2: int, seed: int) -> None:
    """Prop. prop-chordal: a = ((k1 + k2)/2 − d_c²) / min(k1, k2); for k1 = k2 = k, a = 1 − d_c²/k."""
    A, B = pair(d, k1, k2, seed)
    a, dc = subspace_affinity(A, B), chordal_distance(A, B)
    assert close(a, ((k1 + k2) / 2 - dc**2) / min(k1, k2), 1e-9)
    B2 = orth(d, k1, gen(seed + 11))
    assert close(subspace_affinity(A, B2), 1 - chordal_distance(A, B2) ** 2 / k1, 1e-9)
    # Nested subspaces of unequal rank: a = 1 while d_c² = |k1 − k2| / 2 stays positive.
    if k1 != k2:
        big, small = (A, A[:, : min(k1, k2)]) if k1 > k2 else (B, B[:, : min(k1, k2)])
        assert close(subspace_affinity(big, small), 1.0)
        assert close(chordal_distance(big, small) ** 2, abs(k1 - k2) / 2, 1e-9)


def _expert(d_out: int, d_in: int, k: int, g: torch.Generator, task: str = "t") -> Expert:
    s = torch.sort(torch.rand(k, generator=g, dtype=DT) + 0.1, descending=True).values
    return Expert(orth(d_out, k, g), s, orth(d_in, k, g), [task])


@pytest.mark.parametrize("d,k1,k2,seed", CASES)
def test_invariance_and_symmetry(d: int, k1: int, k2: int, seed: int) -> None:
    """Prop. prop-invariance: a(AQ1, BQ2) = a(RA, RB) = a(B, A) = a(A, B); S is symmetric and ignores
    the SVD's sign choices. A basis-dependent statistic (sum of the entries of AᵀB) is the negative
    control: the same rotations must change it."""
    A, B = pair(d, k1, k2, seed)
    g = gen(seed + 17)
    Q1, Q2, R = orth(k1, k1, g), orth(k2, k2, g), orth(d, d, g)
    a = subspace_affinity(A, B)
    assert close(subspace_affinity(A @ Q1, B @ Q2), a)
    assert close(subspace_affinity(R @ A, R @ B), a)
    assert close(subspace_affinity(B, A), a)
    control = float((A.T @ B).sum())
    assert abs(float(((A @ Q1).T @ (B @ Q2)).sum()) - control) > 1e-6

    e1, e2 = _expert(d, d + 3, k1, g), _expert(d, d + 3, k2, g)
    S = expert_affinity(e1, e2)
    assert close(S, 0.5 * (subspace_affinity(e1.U, e2.U) + subspace_affinity(e1.V, e2.V)))
    assert close(expert_affinity(e2, e1), S)
    signs = torch.where(torch.rand(k2, generator=g) < 0.5, -1.0, 1.0).to(DT)
    flipped = Expert(e2.U * signs, e2.s, e2.V * signs, e2.tasks)
    assert torch.allclose(flipped.delta(), e2.delta(), atol=1e-12)  # the same update
    assert close(expert_affinity(e1, flipped), S)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("d,k,n_tokens", [(16, 3, 1), (24, 5, 7), (40, 1, 4)])
def test_fpa_is_cosine(d: int, k: int, n_tokens: int, seed: int) -> None:
    """Lemma lem-fpa: ‖Vᵀh‖/‖h‖ = ‖P_V h‖/‖h‖ = cos∠(h, P_V h) ∈ [0, 1] and FPA² + ‖(I − P_V)h‖²/‖h‖² = 1;
    the library's ``fpa`` averages this over tokens."""
    g = gen(seed)
    V = orth(d, k, g)
    h = torch.randn(5, n_tokens, d, generator=g, dtype=DT)
    h[0, 0] = V @ torch.randn(k, generator=g, dtype=DT)  # a token inside span(V): FPA = 1
    P = proj(V)
    ph = h @ P  # P is symmetric
    per_token = torch.linalg.vector_norm(ph, dim=-1) / torch.linalg.vector_norm(h, dim=-1)
    cos = (h * ph).sum(-1) / (torch.linalg.vector_norm(h, dim=-1) * torch.linalg.vector_norm(ph, dim=-1))
    assert torch.allclose(per_token, cos, atol=1e-12)
    rest = torch.linalg.vector_norm(h - ph, dim=-1) / torch.linalg.vector_norm(h, dim=-1)
    assert torch.allclose(per_token**2 + rest**2, torch.ones_like(rest), atol=1e-12)
    assert bool(torch.all((per_token >= 0) & (per_token <= 1 + 1e-12)))
    assert close(float(per_token[0, 0]), 1.0)
    assert torch.allclose(fpa(h, V), per_token.mean(dim=1), atol=1e-12)
    assert torch.allclose(fpa(h, V, aggregation="cls"), per_token[:, 0], atol=1e-12)


@pytest.mark.parametrize("d,k1,k2,seed", CASES)
def test_cosine_from_factors(d: int, k1: int, k2: int, seed: int) -> None:
    """Lemma lem-cosine-factors: ⟨ΔW1, ΔW2⟩_F = tr(S1 U1ᵀU2 S2 V2ᵀV1), ‖ΔW‖_F = ‖s‖."""
    g = gen(seed)
    d_in = d + 5
    U1 = orth(d, k1, g)
    e1 = _expert(d, d_in, k1, g)
    # a second expert that overlaps the first, so the cosine is far from 0
    raw_u = torch.randn(d, k2, generator=g, dtype=DT) + 2 * U1[:, :1] @ torch.ones(1, k2, dtype=DT)
    raw_v = torch.randn(d_in, k2, generator=g, dtype=DT) + 2 * e1.V[:, :1] @ torch.ones(1, k2, dtype=DT)
    e2 = Expert(torch.linalg.qr(raw_u)[0], torch.rand(k2, generator=g, dtype=DT) + 0.1,
                torch.linalg.qr(raw_v)[0], ["u"])
    W1, W2 = e1.delta(), e2.delta()
    assert close(float(torch.linalg.matrix_norm(W1)), float(torch.linalg.vector_norm(e1.s)))
    inner = float(torch.trace(torch.diag(e1.s) @ e1.U.T @ e2.U @ torch.diag(e2.s) @ e2.V.T @ e1.V))
    assert close(inner, float((W1 * W2).sum()))
    dense_cos = float((W1 * W2).sum() / (torch.linalg.matrix_norm(W1) * torch.linalg.matrix_norm(W2)))
    assert close(expert_cosine(e1, e2), dense_cos, 1e-9)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("d_out,d_in,rho", [(20, 12, 0.25), (7, 30, 0.3), (16, 16, 0.1), (9, 5, 1.0)])
def test_extraction_is_eckart_young(d_out: int, d_in: int, rho: float, seed: int) -> None:
    """Lemma lem-eckart-young: Eq. 5's expert is a best rank-k approximation, error² = Σ_{i>k} σ_i²,
    with k = max(1, round(ρ · min(d_out, d_in)))."""
    delta = torch.randn(d_out, d_in, generator=gen(seed), dtype=DT)
    e = extract_expert(delta, rank_ratio=rho)
    k = max(1, math.floor(rho * min(d_out, d_in) + 0.5))
    assert e.rank == k == rank_for(d_out, d_in, rho)
    sigma = torch.linalg.svdvals(delta)
    err = float(torch.linalg.matrix_norm(delta - e.delta()) ** 2)
    assert close(err, float(sigma[k:].pow(2).sum()), 1e-9)
    assert torch.allclose(e.U.T @ e.U, torch.eye(k, dtype=DT), atol=1e-10)
    assert torch.allclose(e.V.T @ e.V, torch.eye(k, dtype=DT), atol=1e-10)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("d_out,d_in,k1,k2", [(30, 20, 3, 3), (16, 40, 2, 5), (12, 12, 4, 2), (64, 48, 6, 6)])
def test_polar_merge_is_svd(d_out: int, d_in: int, k1: int, k2: int, seed: int) -> None:
    """Prop. prop-polar-svd: the polar factor has orthonormal columns; U⊥ diag(s_cat) V⊥ᵀ has singular
    values exactly s_cat, and the truncated merge is its Eckart–Young truncation."""
    g = gen(seed)
    e1, e2 = _expert(d_out, d_in, k1, g, "a"), _expert(d_out, d_in, k2, g, "b")
    e2 = Expert(e2.U, e2.s * 1.7, e2.V, e2.tasks)  # distinct scales: a clear spectral gap
    U_cat, V_cat = torch.cat([e1.U, e2.U], 1), torch.cat([e1.V, e2.V], 1)
    Up, Vp = polar_factor(U_cat), polar_factor(V_cat)
    r = k1 + k2
    assert torch.allclose(Up.T @ Up, torch.eye(r, dtype=DT), atol=1e-10)
    assert torch.allclose(Vp.T @ Vp, torch.eye(r, dtype=DT), atol=1e-10)
    s_cat = torch.cat([e1.s, e2.s])
    M = (Up * s_cat) @ Vp.T
    assert torch.allclose(torch.linalg.svdvals(M)[:r], torch.sort(s_cat, descending=True).values, atol=1e-10)

    full = merge_experts(e1, e2, rank=r, rule="polar")
    assert torch.allclose(full.delta(), M, atol=1e-10)
    assert full.tasks == ["a", "b"]
    k = max(k1, k2)
    merged = merge_experts(e1, e2, rank=k, rule="polar")
    assert torch.allclose(merged.U.T @ merged.U, torch.eye(k, dtype=DT), atol=1e-10)
    assert torch.allclose(merged.V.T @ merged.V, torch.eye(k, dtype=DT), atol=1e-10)
    Ud, sd, Vhd = torch.linalg.svd(M)
    best = (Ud[:, :k] * sd[:k]) @ Vhd[:k]
    assert torch.allclose(merged.delta(), best, atol=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("d_out,d_in,k", [(20, 16, 3), (64, 64, 4), (9, 30, 2)])
def test_polar_merge_of_identical_experts(d_out: int, d_in: int, k: int, seed: int) -> None:
    """Prop. prop-polar-coincide: merging an expert with a copy of itself gives M = USVᵀ + U'SV'ᵀ:
    UᵀMV = S (the mean, not the sum 2S), ‖M‖² = 2‖s‖², relative error 1/√2 against the sum."""
    e = _expert(d_out, d_in, k, gen(seed), "a")
    twin = Expert(e.U.clone(), e.s.clone(), e.V.clone(), ["b"])
    merged = merge_experts(e, twin, rank=2 * k, rule="polar")
    M = merged.delta()
    S = torch.diag(e.s)
    assert torch.allclose(e.U.T @ M @ e.V, S, atol=1e-9)
    assert close(float(M.pow(2).sum()), 2 * float(e.s.pow(2).sum()), 1e-9)
    total = 2 * e.delta()
    rel = float(torch.linalg.matrix_norm(M - total) / torch.linalg.matrix_norm(total))
    assert close(rel, 1 / math.sqrt(2), 1e-9)
    # The polar factor of [U | U]: its halves add up to √2·U whatever null-space basis the SVD picks.
    Up = polar_factor(torch.cat([e.U, e.U], 1))
    assert torch.allclose(Up[:, :k] + Up[:, k:], math.sqrt(2) * e.U, atol=1e-9)
    U_prime = (Up[:, :k] - Up[:, k:]) / math.sqrt(2)
    assert torch.allclose(e.U.T @ U_prime, torch.zeros(k, k, dtype=DT), atol=1e-9)
    # The exact rules get it right: sum doubles, mean keeps.
    assert torch.allclose(merge_experts(e, twin, rank=k, rule="sum").delta(), total, atol=1e-9)
    assert torch.allclose(merge_experts(e, twin, rank=k, rule="mean").delta(), e.delta(), atol=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("d_out,d_in,k1,k2", [(30, 20, 3, 3), (16, 40, 2, 5), (8, 8, 3, 4)])
def test_exact_merge_rules(d_out: int, d_in: int, k1: int, k2: int, seed: int) -> None:
    """Lemma lem-sum-merge: QR + small SVD gives an SVD of the exact sum (rule ``sum``) and of the
    task-count-weighted mean (rule ``mean``); truncation to k is the Eckart–Young one."""
    g = gen(seed)
    e1, e2 = _expert(d_out, d_in, k1, g, "a"), _expert(d_out, d_in, k2, g, "b")
    e1 = Expert(e1.U, e1.s, e1.V, ["a", "c"])  # e1 already holds two tasks
    total = e1.delta() + e2.delta()
    r = k1 + k2
    full = merge_experts(e1, e2, rank=r, rule="sum")
    assert torch.allclose(full.delta(), total, atol=1e-10)
    assert torch.allclose(full.U.T @ full.U, torch.eye(full.rank, dtype=DT), atol=1e-10)
    assert torch.allclose(full.s, torch.linalg.svdvals(total)[: full.rank], atol=1e-10)
    k = max(k1, k2)
    Ud, sd, Vhd = torch.linalg.svd(total)
    assert torch.allclose(merge_experts(e1, e2, rank=k, rule="sum").delta(), (Ud[:, :k] * sd[:k]) @ Vhd[:k],
                          atol=1e-9)
    mean = (2 * e1.delta() + 1 * e2.delta()) / 3
    assert torch.allclose(merge_experts(e1, e2, rank=r, rule="mean").delta(), mean, atol=1e-10)


@pytest.mark.parametrize("seed", range(6))
def test_route_follows_a_task_path(seed: int) -> None:
    """Prop. prop-route-path: with identity sets partitioning the tasks in every module, the final C
    is non-empty and, for every t in C, each module's chosen expert is the one holding t."""
    import random

    rng = random.Random(seed)
    for _ in range(60):
        T, M = rng.randint(1, 9), rng.randint(1, 7)
        tasks = [f"t{i}" for i in range(T)]
        order = [f"m{j}" for j in range(M)]
        task_sets, scores = {}, {}
        for m in order:
            n = rng.randint(1, T)
            owner = [rng.randrange(n) for _ in tasks]
            sets = [[t for t, o in zip(tasks, owner) if o == e] for e in range(n)]
            task_sets[m] = [s for s in sets if s]  # every expert holds at least one task
            scores[m] = [rng.random() for _ in task_sets[m]]
        chosen, C = route_path(scores, task_sets, order)
        assert C and set(C) <= set(tasks)
        for t in C:
            for m in order:
                holder = next(e for e, s in enumerate(task_sets[m]) if t in s)
                assert chosen[m] == holder, (m, t)
