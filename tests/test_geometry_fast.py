"""Fast top-k SVDs: the Gram route is the exact top-k, the randomized one keeps the subspace on
a spectrum without a gap at k, and every method runs batched with the numbers of the loop."""

from __future__ import annotations

import pytest
import torch

from madeit_core.errors import MergeInputError
from madeit_core.experts import EvolutionConfig, ExpertBank
from madeit_core.geometry import GRAM_MIN_RATIO, subspace_affinity, top_k_svd
from madeit_core.modules import ModuleSpec


def _spectrum_matrix(m: int, n: int, seed: int, alpha: float = 1.0, noise: float = 0.3) -> torch.Tensor:
    """Power-law singular values plus a noise bulk: no clean gap at any k (task-vector-like)."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n) // 2
    U = torch.linalg.qr(torch.randn(m, r, generator=g))[0]
    V = torch.linalg.qr(torch.randn(n, r, generator=g))[0]
    low = (U * torch.arange(1, r + 1).float().pow(-alpha)) @ V.T
    N = torch.randn(m, n, generator=g)
    return low + N * (noise * low.norm() / N.norm())


@pytest.mark.parametrize("shape", [(300, 80), (80, 300), (120, 120)])
def test_gram_is_the_exact_top_k(shape: tuple[int, int]) -> None:
    m = _spectrum_matrix(*shape, seed=1)
    k = 12
    Ue, se, Ve = top_k_svd(m, k, "exact")
    Ug, sg, Vg = top_k_svd(m, k, "gram")
    assert Ug.shape == Ue.shape and Vg.shape == Ve.shape
    assert torch.allclose(sg, se, rtol=1e-4)
    assert subspace_affinity(Ue, Ug) > 0.9999 and subspace_affinity(Ve, Vg) > 0.9999
    eye = torch.eye(k)
    assert torch.allclose(Ug.T @ Ug, eye, atol=1e-5) and torch.allclose(Vg.T @ Vg, eye, atol=1e-5)
    assert torch.allclose((Ug * sg) @ Vg.T, (Ue * se) @ Ve.T, atol=1e-4 * float(se[0]))


def test_gram_keeps_a_steep_spectrum_with_no_gap_at_k() -> None:
    """s_1/s_k = 90 (inside the Gram route's range) and s_k/s_(k+1) = 1.002: rounding in MᵀM mixes
    the k-th direction with the next ones, which the Rayleigh–Ritz step on 2k columns undoes."""
    g = torch.Generator().manual_seed(0)
    m_, n_, k = 600, 200, 20
    U = torch.linalg.qr(torch.randn(m_, n_, generator=g))[0]
    V = torch.linalg.qr(torch.randn(n_, n_, generator=g))[0]
    head = torch.logspace(0, -float(torch.log10(torch.tensor(90.0))), k)
    s = torch.cat([head, head[-1] / 1.002 * torch.logspace(0, -1, n_ - k)])
    m = (U * s) @ V.T
    Ue, _, Ve = top_k_svd(m, k, "exact")
    Ug, _, Vg = top_k_svd(m, k, "gram")
    assert 0.5 * (subspace_affinity(Ue, Ug) + subspace_affinity(Ve, Vg)) > 0.99999


def test_gram_falls_back_to_exact_when_rank_deficient() -> None:
    g = torch.Generator().manual_seed(2)
    m = torch.randn(100, 3, generator=g) @ torch.randn(3, 40, generator=g)   # rank 3 < k
    k = 8
    Ug, sg, Vg = top_k_svd(m, k, "gram")
    Ue, se, Ve = top_k_svd(m, k, "exact")
    assert float(se[k - 1] / se[0]) < GRAM_MIN_RATIO[torch.float32]
    assert torch.equal(Ug, Ue) and torch.equal(sg, se) and torch.equal(Vg, Ve)       # the exact route


def test_randomized_default_keeps_the_subspace_without_a_gap() -> None:
    m = _spectrum_matrix(600, 200, seed=4, alpha=0.5, noise=0.5)
    k = 20
    s = torch.linalg.svdvals(m)
    assert float(s[k - 1] / s[k]) < 1.05                                          # no gap at k
    Ue, _, Ve = top_k_svd(m, k, "exact")
    Ur, _, Vr = top_k_svd(m, k, "randomized")
    assert 0.5 * (subspace_affinity(Ue, Ur) + subspace_affinity(Ve, Vr)) >= 0.99
    Ul, _, Vl = top_k_svd(m, k, "randomized", oversample=2, n_iter=0)        # a thin sketch does not
    assert 0.5 * (subspace_affinity(Ue, Ul) + subspace_affinity(Ve, Vl)) < 0.99


@pytest.mark.parametrize("method", ["exact", "gram", "randomized", "subspace"])
def test_batched_equals_loop(method: str) -> None:
    ms = torch.stack([_spectrum_matrix(90, 60, seed=s) for s in range(3)])
    U, s, V = top_k_svd(ms, 10, method)  # type: ignore[arg-type]
    assert U.shape == (3, 90, 10) and s.shape == (3, 10) and V.shape == (3, 60, 10)
    for i in range(3):
        Ui, si, Vi = top_k_svd(ms[i], 10, method)  # type: ignore[arg-type]
        assert torch.allclose(si, s[i], rtol=1e-5)
        assert subspace_affinity(Ui, U[i]) > 0.99999 and subspace_affinity(Vi, V[i]) > 0.99999


def test_unknown_method_and_bank_with_gram() -> None:
    with pytest.raises(MergeInputError, match="nope"):
        top_k_svd(torch.randn(5, 4), 2, "nope")  # type: ignore[arg-type]
    spec = ModuleSpec(name="lin", key="lin.weight", kind="linear", d_out=30, d_in=20, group="mlp", depth=0)
    g = torch.Generator().manual_seed(5)
    w0 = {"lin.weight": torch.randn(30, 20, generator=g)}
    banks = {}
    for svd in ("exact", "gram"):
        bank = ExpertBank([spec], EvolutionConfig(rank_ratio=0.25, svd=svd))  # type: ignore[arg-type]
        for t in range(3):
            bank.absorb(f"t{t}", w0, {"lin.weight": w0["lin.weight"] + _spectrum_matrix(30, 20, seed=10 + t)})
        banks[svd] = bank
    assert [d.action for d in banks["gram"].decisions] == [d.action for d in banks["exact"].decisions]


@pytest.mark.parametrize("svd", ["exact", "gram", "randomized", "subspace"])
def test_extract_experts_batched_equals_one_by_one(svd: str) -> None:
    from madeit_core.geometry import extract_expert, extract_experts

    deltas = [_spectrum_matrix(40, 30, seed=s) for s in range(4)]                # one stack of 4 ...
    deltas.insert(2, _spectrum_matrix(30, 40, seed=9).reshape(30, 40, 1, 1))     # ... a 1×1 conv ...
    deltas.append(torch.zeros(40, 30))                                          # ... and a zero update
    deltas.append(_spectrum_matrix(40, 30, seed=7).half())                      # half precision joins fp32 stack
    ranks = [6] * len(deltas)
    for cap in (1 << 28, 2 * 40 * 30 * 4):                                      # one stack; stacks of two
        got = extract_experts(deltas, ranks, "t", svd, max_stack_bytes=cap)  # type: ignore[arg-type]
        for d, e in zip(deltas, got, strict=True):
            ref = extract_expert(d, rank=6, task="t", svd=svd)  # type: ignore[arg-type]
            assert e.tasks == ["t"] and e.rank == ref.rank and e.U.dtype == ref.U.dtype
            if ref.is_zero:
                continue
            assert torch.allclose(e.s, ref.s, rtol=1e-4)
            assert torch.allclose(e.delta(), ref.delta(), atol=1e-4 * float(ref.s[0]))
    bad = [deltas[0], torch.full((40, 30), float("nan"))]
    with pytest.raises(MergeInputError, match="NaN"):
        extract_experts(bad, [6, 6])
    with pytest.raises(MergeInputError, match="ranks"):
        extract_experts(bad, [6])


def test_bank_batched_svd_gives_the_same_bank() -> None:
    specs = [ModuleSpec(name=f"l{i}", key=f"l{i}.weight", kind="linear", d_out=30, d_in=20, group="mlp", depth=i)
             for i in range(3)]
    g = torch.Generator().manual_seed(6)
    w0 = {s.key: torch.randn(30, 20, generator=g) for s in specs}
    banks = []
    for batch in (False, True):
        bank = ExpertBank(specs, EvolutionConfig(rank_ratio=0.25), batch_svd=batch)
        for t in range(4):
            ft = {k: v + _spectrum_matrix(30, 20, seed=100 * t + i) for i, (k, v) in enumerate(w0.items())}
            bank.absorb(f"t{t}", w0, ft)
        banks.append(bank)
    a, b = banks
    def log(bank: ExpertBank) -> list[tuple[str, str, int]]:
        return [(d.module, d.action, d.expert) for d in bank.decisions]

    assert log(a) == log(b)
    for key in a.modules:
        for ea, eb in zip(a.modules[key].experts, b.modules[key].experts, strict=True):
            assert ea.tasks == eb.tasks and torch.allclose(ea.delta(), eb.delta(), atol=1e-5)
