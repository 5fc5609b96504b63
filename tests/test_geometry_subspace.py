"""MADE-IT's default top-k SVD (``subspace``) against the exact one: the subspace (affinity),
the singular values, the reconstruction, the merged experts a bank builds from it; both ways of
applying the Gram operator; determinism for a seed; the exact fallbacks; the fused input checks."""

from __future__ import annotations

import math

import pytest
import torch

import madeit_core.geometry as geo
from madeit_core.errors import MergeInputError
from madeit_core.experts import EvolutionConfig, ExpertBank
from madeit_core.geometry import expert_affinity, extract_expert, extract_experts, subspace_affinity, top_k_svd
from madeit_core.modules import ModuleSpec
from madeit_core.statedict import check_compatible, first_nonfinite

#: the tolerances these tests hold the fast path to (results/perf/README.md quotes them)
MIN_AFFINITY = 0.99          # ½[a(U, U_exact) + a(V, V_exact)] on a spectrum without a gap at k
SINGULAR_RTOL = 5e-3         # relative error of s_1..s_k (the Ritz values approach them from below)
RECON_EXCESS = 1e-3          # ‖M − U S Vᵀ‖_F may exceed the best rank-k error by this fraction


def _spectrum_matrix(m: int, n: int, seed: int, alpha: float = 0.5, noise: float = 0.5,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Power-law singular values plus a noise bulk: no clean gap at any k (task-vector-like)."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n) // 2
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]
    low = (U * torch.arange(1, r + 1, dtype=torch.float64).pow(-alpha)) @ V.T
    N = torch.randn(m, n, generator=g, dtype=torch.float64)
    return (low + N * (noise * low.norm() / N.norm())).to(dtype)


def _affinity(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    return 0.5 * (subspace_affinity(a[0], b[0]) + subspace_affinity(a[2], b[2]))


@pytest.mark.parametrize("shape", [(600, 200), (200, 600), (300, 300)])
def test_subspace_agrees_with_the_exact_top_k(shape: tuple[int, int]) -> None:
    m = _spectrum_matrix(*shape, seed=4)
    k = 20
    s_all = torch.linalg.svdvals(m)
    assert float(s_all[k - 1] / s_all[k]) < 1.05                                    # no gap at k
    exact = top_k_svd(m, k, "exact")
    fast = top_k_svd(m, k, "subspace")
    U, s, V = fast
    assert U.shape == exact[0].shape and s.shape == (k,) and V.shape == exact[2].shape
    assert _affinity(fast, exact) >= MIN_AFFINITY
    assert torch.allclose(s, exact[1], rtol=SINGULAR_RTOL)
    eye = torch.eye(k)
    assert torch.allclose(U.T @ U, eye, atol=1e-5) and torch.allclose(V.T @ V, eye, atol=1e-5)
    best = float(torch.linalg.matrix_norm(m - (exact[0] * exact[1]) @ exact[2].T))
    got = float(torch.linalg.matrix_norm(m - (U * s) @ V.T))
    assert got <= best * (1 + RECON_EXCESS)


def test_the_shifted_steps_beat_the_plain_power_method(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same columns and steps: the Rayleigh–Ritz shifts (μ > 0) converge where μ = 0 lags
    (step S5's exact fallback off, so that both iterations are compared as they are)."""
    monkeypatch.setattr(geo, "SUBSPACE_MAX_LOSS", float("inf"))
    m = _spectrum_matrix(400, 300, seed=8, alpha=0.3, noise=0.6)
    k = 24
    exact = top_k_svd(m, k, "exact")
    shifted = _affinity(top_k_svd(m, k, "subspace", n_iter=3), exact)
    bottom = geo.SUBSPACE_SHIFT_BOTTOM
    try:
        geo.SUBSPACE_SHIFT_BOTTOM = 0.0                                            # μ = 0: plain subspace iteration
        plain = _affinity(top_k_svd(m, k, "subspace", n_iter=3), exact)
    finally:
        geo.SUBSPACE_SHIFT_BOTTOM = bottom
    assert 1 - shifted < 0.5 * (1 - plain)


def test_subspace_is_deterministic_for_a_seed() -> None:
    m = _spectrum_matrix(300, 200, seed=1)
    a = top_k_svd(m, 16, "subspace", generator_seed=3)
    b = top_k_svd(m, 16, "subspace", generator_seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    c = top_k_svd(m, 16, "subspace", generator_seed=4)                           # another start ...
    assert not torch.equal(a[0], c[0]) and _affinity(a, c) > MIN_AFFINITY        # ... the same subspace


@pytest.mark.parametrize("explicit", [True, False])
def test_forming_the_gram_or_applying_it_gives_the_same_factors(explicit: bool,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    m = _spectrum_matrix(500, 180, seed=2, dtype=torch.float64)
    ref = top_k_svd(m, 15, "subspace")
    monkeypatch.setattr(geo, "subspace_forms_gram", lambda *a: explicit)
    got = top_k_svd(m, 15, "subspace")
    assert torch.allclose(got[1], ref[1], rtol=1e-10)
    assert _affinity(got, ref) > 1 - 1e-10


def test_the_cost_model_forms_the_gram_for_tall_matrices_only() -> None:
    q = geo.subspace_columns(77)
    assert q == 77 + 39
    assert geo.subspace_forms_gram(3072, 768, 77, q, geo.SUBSPACE_STEPS)            # ViT-B/32 MLP weights
    assert not geo.subspace_forms_gram(768, 768, 77, q, geo.SUBSPACE_STEPS)         # its attention weights


def test_batched_subspace_equals_one_by_one() -> None:
    ms = torch.stack([_spectrum_matrix(240, 160, seed=s) for s in range(3)])
    U, s, V = top_k_svd(ms, 12, "subspace")
    assert U.shape == (3, 240, 12) and s.shape == (3, 12) and V.shape == (3, 160, 12)
    for i in range(3):
        one = top_k_svd(ms[i], 12, "subspace")
        assert torch.allclose(one[1], s[i], rtol=1e-5)
        assert _affinity(one, (U[i], s[i], V[i])) > 0.99999


def test_subspace_falls_back_to_exact() -> None:
    g = torch.Generator().manual_seed(2)
    low_rank = torch.randn(200, 3, generator=g) @ torch.randn(3, 150, generator=g)    # s_k / s_1 ≈ 0 at k = 8
    small = _spectrum_matrix(40, 30, seed=1)                                          # 2q > 30: no sketch
    for m, k in ((low_rank, 8), (small, 6)):
        fast, exact = top_k_svd(m, k, "subspace"), top_k_svd(m, k, "exact")
        assert all(torch.equal(x, y) for x, y in zip(fast, exact, strict=True))
    stack = torch.stack([low_rank, _spectrum_matrix(200, 150, seed=3)])              # only the first one
    U, s, V = top_k_svd(stack, 8, "subspace")
    assert torch.equal(s[0], top_k_svd(low_rank, 8, "exact")[1])
    assert _affinity((U[1], s[1], V[1]), top_k_svd(stack[1], 8, "exact")) >= MIN_AFFINITY
    with pytest.raises(MergeInputError, match="subspace"):
        top_k_svd(small, 2, "nope")  # type: ignore[arg-type]


def test_extract_experts_batched_subspace_equals_one_by_one() -> None:
    deltas = [_spectrum_matrix(160, 120, seed=s) for s in range(3)] + [torch.zeros(160, 120)]
    got = extract_experts(deltas, [12] * 4, "t", "subspace")
    for d, e in zip(deltas, got, strict=True):
        ref = extract_expert(d, rank=12, task="t", svd="subspace")
        assert e.rank == ref.rank and e.tasks == ["t"]
        if not ref.is_zero:
            assert torch.allclose(e.delta(), ref.delta(), atol=1e-4 * float(ref.s[0]))


def test_bank_with_the_fast_top_k_builds_the_exact_bank() -> None:
    """Four tasks in two clusters over three modules: the same decisions as with the full SVD, and
    every expert (first, created and consolidated) the same subspaces and update within tolerance."""
    specs = [ModuleSpec(name=f"l{i}", key=f"l{i}.weight", kind="linear", d_out=d_out, d_in=d_in, group="mlp",
                        depth=i) for i, (d_out, d_in) in enumerate([(240, 160), (160, 240), (200, 200)])]
    g = torch.Generator().manual_seed(7)
    w0 = {s.key: torch.randn(s.d_out, s.d_in, generator=g) for s in specs}
    base = {s.key: [_spectrum_matrix(s.d_out, s.d_in, seed=50 + 10 * c + i) for c in range(2)]
            for i, s in enumerate(specs)}
    banks = {}
    for svd in ("exact", "subspace"):
        bank = ExpertBank(specs, EvolutionConfig(rank_ratio=0.1, svd=svd))  # type: ignore[arg-type]
        for t in range(4):
            ft = {s.key: w0[s.key] + base[s.key][t % 2] + 0.05 * _spectrum_matrix(s.d_out, s.d_in, seed=900 + t)
                  for s in specs}
            bank.absorb(f"t{t}", w0, ft)
        banks[svd] = bank
    exact, fast = banks["exact"], banks["subspace"]
    assert [(d.module, d.action, d.expert) for d in fast.decisions] == \
        [(d.module, d.action, d.expert) for d in exact.decisions]
    assert any(d.action == "consolidate" for d in exact.decisions)
    for key in exact.modules:
        for ee, ef in zip(exact.modules[key].experts, fast.modules[key].experts, strict=True):
            assert ee.tasks == ef.tasks and expert_affinity(ee, ef) >= MIN_AFFINITY
            rel = torch.linalg.matrix_norm(ef.delta() - ee.delta()) / torch.linalg.matrix_norm(ee.delta())
            assert float(rel) < 0.05


def test_fused_finiteness_check_names_the_first_bad_tensor() -> None:
    sd = {"a": torch.ones(3), "b": torch.ones(2, 2), "c": torch.arange(4), "d": torch.ones(2).half()}
    assert first_nonfinite(sd) is None
    for bad in (float("nan"), float("inf"), -float("inf")):
        for key in ("b", "d"):
            broken = {k: v.clone() for k, v in sd.items()}
            broken[key][0] = bad
            assert first_nonfinite(broken) == key
            with pytest.raises(MergeInputError, match=f"NaN or Inf in '{key}'"):
                check_compatible(sd, broken)
    both = {k: v.clone() for k, v in sd.items()}
    both["a"][1], both["d"][0] = float("nan"), float("inf")
    assert first_nonfinite(both) == "a" and first_nonfinite(both, ["d", "a"]) == "d"
    assert first_nonfinite({"e": torch.zeros(0)}) is None


def test_update_kind_sees_zero_and_nonfinite_updates() -> None:
    assert geo._update_kind(torch.zeros(3, 2)) == "zero"
    assert geo._update_kind(torch.tensor([[0.0, -1e-30]])) == "finite"
    assert geo._update_kind(torch.tensor([[1.0, float("nan")]])) == "nonfinite"
    assert geo._update_kind(torch.tensor([[float("inf"), 0.0]])) == "nonfinite"
    with pytest.raises(MergeInputError, match="NaN or Inf"):
        extract_expert(torch.tensor([[1.0, float("-inf")]]), rank=1)
    assert extract_expert(torch.zeros(4, 3), rank=2).is_zero


def _designed_spectrum(s: torch.Tensor, m: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))[0]
    return ((U * s.double()) @ V.T).float()


@pytest.mark.parametrize("case", ["near_tie", "flat"])
def test_unconverged_matrices_take_the_exact_svd(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Step S5: where even ten steps cannot settle the k-th direction (s_k / s_(k+1) = 1.0005 on a
    slow spectrum, or a linear spectrum), the result is the exact top-k; with the check disabled
    it is not."""
    k = 30
    if case == "near_tie":
        s = torch.arange(1, 301, dtype=torch.float64).pow(-0.3)
        s[k] = s[k - 1] / 1.0005
    else:
        s = torch.linspace(1.0, 0.3, 300, dtype=torch.float64)
    ms = [_designed_spectrum(s, 400, 300, seed) for seed in range(3)]
    for m in ms:
        exact = top_k_svd(m, k, "exact")
        assert all(torch.equal(x, y) for x, y in zip(top_k_svd(m, k, "subspace"), exact, strict=True))
    U, sv, V = top_k_svd(torch.stack(ms), k, "subspace")                      # batched: the same
    assert torch.equal(sv[1], top_k_svd(ms[1], k, "exact")[1])
    monkeypatch.setattr(geo, "SUBSPACE_MAX_LOSS", float("inf"))
    worst = min(_affinity(top_k_svd(m, k, "subspace"), top_k_svd(m, k, "exact")) for m in ms)
    assert worst < 0.99                                                       # the check was needed


def test_converged_matrices_keep_the_fast_result() -> None:
    """Task-vector-like spectra do not trip step S5 (it would cost an exact SVD each)."""
    for seed in range(4):
        m = _spectrum_matrix(600, 200, seed=seed)
        fast, exact = top_k_svd(m, 20, "subspace"), top_k_svd(m, 20, "exact")
        assert not torch.equal(fast[1], exact[1])
        assert _affinity(fast, exact) >= MIN_AFFINITY


def test_loss_estimate_is_exact_for_a_known_rotation() -> None:
    """The Davis–Kahan estimate on a hand-made Ritz pair: G = diag(2, 1), v = (cos φ, sin φ)."""
    phi = 0.1
    G = torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64))
    v = torch.tensor([[math.cos(phi)], [math.sin(phi)]], dtype=torch.float64)
    theta = (v.T @ G @ v).reshape(1)
    est = geo.subspace_loss_estimate(G @ v, v, theta, torch.tensor(1.0, dtype=torch.float64))
    r = float(torch.linalg.norm(G @ v - v * theta))
    assert float(est) == pytest.approx(r ** 2 / (float(theta) - 1.0) ** 2)
    assert float(est) >= math.sin(phi) ** 2                                  # it bounds the true loss here


def test_flagged_matrices_get_more_steps_before_the_exact_svd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Step S5's first remedy: a near-tie (s_k / s_(k+1) = 1.001) on a faster spectrum is flagged
    after five steps and settled by the extra steps, without an exact SVD; with no extra steps
    it takes the exact SVD."""
    k = 30
    s = torch.arange(1, 301, dtype=torch.float64).pow(-0.5)
    s[k] = s[k - 1] / 1.001
    m = _designed_spectrum(s, 400, 300, 0)
    calls: list[tuple[bool, int]] = []
    ritz = geo._ritz

    def spy(*a, **kw):  # type: ignore[no-untyped-def]
        out = ritz(*a, **kw)
        calls.append((bool(kw.get("strict", False)), int(out[3].sum())))
        return out

    monkeypatch.setattr(geo, "_ritz", spy)
    fast, exact = top_k_svd(m, k, "subspace"), top_k_svd(m, k, "exact")
    assert calls == [(False, 1), (True, 0)]                       # flagged, then converged
    assert not torch.equal(fast[1], exact[1]) and _affinity(fast, exact) >= 0.9999
    monkeypatch.setattr(geo, "SUBSPACE_EXTRA_STEPS", 0)
    assert all(torch.equal(x, y) for x, y in zip(top_k_svd(m, k, "subspace"), exact, strict=True))
