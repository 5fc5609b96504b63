"""Grassmann geometry of low-rank experts (paper §3.1; method.md §1, §2, §4).

An *expert* is a truncated SVD ΔW ≈ U diag(s) Vᵀ of one module's task update, with U (d_out × k)
and V (d_in × k) orthonormal. Subspaces are compared through their bases only: no d × d
projection matrix is ever formed, so every affinity costs O(d · k1 · k2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from madeit_core.errors import MergeInputError

MergeRule = Literal["polar", "sum", "mean"]
SvdMethod = Literal["exact", "gram", "randomized"]


@dataclass
class Expert:
    """A low-rank expert E = (U, s, V) and its identity set A (the tasks it serves).

    ``tasks`` keeps arrival order. A rank-0 expert (empty U, s, V) is a module's *zero expert*:
    the tasks whose update of that module is exactly zero (method.md §1).
    """

    U: torch.Tensor
    s: torch.Tensor
    V: torch.Tensor
    tasks: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return int(self.s.numel())

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.U.shape[0]), int(self.V.shape[0])

    def delta(self) -> torch.Tensor:
        """The dense update U diag(s) Vᵀ (for tests and small models only)."""
        return (self.U * self.s) @ self.V.T

    def num_parameters(self) -> int:
        return int(self.U.numel() + self.s.numel() + self.V.numel())


def rank_for(d_out: int, d_in: int, rank_ratio: float) -> int:
    """k = max(1, round(ρ · min(d_out, d_in))), rounding halves up (Eq. 5; the paper's ρ was lost)."""
    if not 0.0 < rank_ratio <= 1.0:
        raise MergeInputError(f"rank_ratio must be in (0, 1], got {rank_ratio}")
    return max(1, int(math.floor(rank_ratio * min(d_out, d_in) + 0.5)))


#: below this s_k / s_1 the Gram route is no longer accurate to an affinity of about 0.9999 in
#: float32 (λ = s² squares the condition number; measured on power-law spectra): ``gram`` then
#: falls back to the exact SVD for that matrix
GRAM_MIN_RATIO = {torch.float32: 1e-2, torch.float64: 1e-6}


def top_k_svd(m: torch.Tensor, k: int, method: SvdMethod = "exact", oversample: int | None = None,
              n_iter: int = 4, generator_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k leading singular triplets of ``m`` (U: d_out × k, s: k, V: d_in × k), s descending.

    - ``exact``: a full thin SVD (O(mn·min(m, n)) with a large constant).
    - ``gram``: exact top-k through the smaller Gram matrix: the leading eigenvectors of
      G = MᵀM (or MMᵀ) span the leading right (left) singular subspace; a Rayleigh–Ritz step on
      M itself, the thin SVD of M V_2k (the 2k leading eigenvectors, so that rounding in G only
      mixes directions the step then separates), gives U, s, V with orthonormal columns. One
      GEMM and one symmetric eigensolve of the smaller side: 2–5× cheaper than ``exact``.
      Squaring the spectrum costs precision, so a matrix whose s_k / s_1 is below
      :data:`GRAM_MIN_RATIO` goes to ``exact`` instead.
    - ``randomized``: Halko et al.'s range finder with ``oversample`` extra columns (default
      max(10, k), i.e. a sketch of about 2k) and ``n_iter`` power iterations (QR-stabilised),
      seeded by ``generator_seed`` so results repeat exactly on the CPU.

    ``m`` may carry leading batch dimensions (a stack of same-shaped matrices): every method
    then runs batched (one call per step for the whole stack; on a GPU that is the fast way).
    """
    k = min(k, min(m.shape[-2:]))
    if method not in ("exact", "gram", "randomized"):
        raise MergeInputError(f"unknown SVD method {method!r} (use 'exact', 'gram' or 'randomized')")
    if method == "gram":
        return _top_k_gram(m, k)
    p = max(10, k) if oversample is None else oversample
    if method == "exact" or k + p >= min(m.shape[-2:]):
        U, s, Vh = torch.linalg.svd(m, full_matrices=False)
        return U[..., :k], s[..., :k], Vh[..., :k, :].mT
    gen = torch.Generator(device=m.device).manual_seed(generator_seed)
    q = k + p
    omega = torch.randn(m.shape[-1], q, generator=gen, device=m.device, dtype=m.dtype)
    Q, _ = torch.linalg.qr(m @ omega)
    for _ in range(n_iter):
        Z, _ = torch.linalg.qr(m.mT @ Q)
        Q, _ = torch.linalg.qr(m @ Z)
    Ub, s, Vh = torch.linalg.svd(Q.mT @ m, full_matrices=False)
    return (Q @ Ub)[..., :k], s[..., :k], Vh[..., :k, :].mT


def _top_k_gram(m: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``top_k_svd(m, k, "gram")`` (see there)."""
    wide = m.shape[-2] < m.shape[-1]
    a = m.mT if wide else m                                  # tall: rows ≥ columns
    lam, W = torch.linalg.eigh(a.mT @ a)                     # ascending eigenvalues
    lam_k, lam_1 = lam[..., -k].clamp_min(0), lam[..., -1]
    limit = GRAM_MIN_RATIO.get(m.dtype, 1e-3)
    if bool(torch.any(lam_k < (limit ** 2) * lam_1)) or not bool(torch.all(lam_1 > 0)):
        return top_k_svd(m, k, "exact")
    q = min(2 * k, a.shape[-1])
    Vq = W[..., -q:].flip(-1)                                # leading right singular subspace of a
    Ub, s, Zh = torch.linalg.svd(a @ Vq, full_matrices=False)   # Rayleigh–Ritz: a Vq = Ub S Zᵀ
    U, s, V = Ub[..., :k], s[..., :k], Vq @ Zh[..., :k, :].mT
    return (V, s, U) if wide else (U, s, V)


def extract_expert(delta: torch.Tensor, rank_ratio: float | None = None, task: str | None = None,
                   rank: int | None = None, svd: SvdMethod = "exact") -> Expert:
    """Eq. 5: the rank-k truncated SVD of a module update ΔW = W_t − W_0.

    ``delta`` is d_out × d_in (a 1×1 conv weight is reshaped). Half precision is computed in
    fp32; factors are returned in fp32. An exactly zero ``delta`` gives the rank-0 zero expert.
    """
    if delta.ndim == 4 and delta.shape[2:] == (1, 1):
        delta = delta.reshape(delta.shape[0], delta.shape[1])
    if delta.ndim != 2:
        raise MergeInputError(f"extract_expert needs a 2-D update, got shape {tuple(delta.shape)}")
    if not delta.is_floating_point():
        raise MergeInputError(f"extract_expert needs a float update, got {delta.dtype}")
    if not torch.isfinite(delta).all():
        raise MergeInputError("extract_expert: NaN or Inf in the update")
    d = delta.float() if delta.dtype in (torch.float16, torch.bfloat16) else delta
    tasks = [task] if task is not None else []
    if not torch.any(d):
        return zero_expert(d.shape[0], d.shape[1], tasks, dtype=d.dtype, device=d.device)
    if rank is None:
        if rank_ratio is None:
            raise MergeInputError("extract_expert needs rank_ratio or rank")
        rank = rank_for(d.shape[0], d.shape[1], rank_ratio)
    U, s, V = top_k_svd(d, rank, svd)
    keep = s > 0
    return Expert(U[:, keep].contiguous(), s[keep].contiguous(), V[:, keep].contiguous(), tasks)


def extract_experts(deltas: list[torch.Tensor], ranks: list[int], task: str | None = None,
                    svd: SvdMethod = "exact", max_stack_bytes: int = 1 << 28) -> list[Expert]:
    """:func:`extract_expert` for many modules, with one batched SVD per stack of same-shaped
    updates (same rank, at most ``max_stack_bytes`` per stack): the fast way on a GPU, where
    one call per module would leave the device idle between small kernels.

    Zero, non-finite or malformed updates take the one-by-one path (same errors, same zero
    experts). Each stack's factors equal :func:`extract_expert`'s up to rounding.
    """
    if len(deltas) != len(ranks):
        raise MergeInputError(f"extract_experts: {len(deltas)} updates for {len(ranks)} ranks")
    out: list[Expert | None] = [None] * len(deltas)
    groups: dict[tuple[Any, ...], list[int]] = {}
    mats: list[torch.Tensor | None] = [None] * len(deltas)
    for i, d in enumerate(deltas):
        if d.ndim == 4 and d.shape[2:] == (1, 1):
            d = d.reshape(d.shape[0], d.shape[1])
        if d.ndim != 2 or not d.is_floating_point() or not torch.isfinite(d).all() or not torch.any(d):
            out[i] = extract_expert(d, rank=ranks[i], task=task, svd=svd)   # raises or gives the zero expert
            continue
        d = d.float() if d.dtype in (torch.float16, torch.bfloat16) else d
        mats[i] = d
        groups.setdefault((tuple(d.shape), d.dtype, d.device, ranks[i]), []).append(i)
    tasks = [task] if task is not None else []
    for (shape, dtype, _, rank), idx in groups.items():
        per = shape[0] * shape[1] * torch.finfo(dtype).bits // 8
        step = max(1, max_stack_bytes // max(per, 1))
        for j in range(0, len(idx), step):
            chunk = idx[j:j + step]
            if len(chunk) == 1:
                out[chunk[0]] = extract_expert(mats[chunk[0]], rank=rank, task=task, svd=svd)  # type: ignore[arg-type]
                continue
            U, s, V = top_k_svd(torch.stack([mats[i] for i in chunk]), rank, svd)  # type: ignore[misc]
            for b, i in enumerate(chunk):
                keep = s[b] > 0
                out[i] = Expert(U[b][:, keep].contiguous(), s[b][keep].contiguous(), V[b][:, keep].contiguous(),
                                list(tasks))
    return [e for e in out if e is not None]


def zero_expert(d_out: int, d_in: int, tasks: list[str] | None = None,
                dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Expert:
    return Expert(torch.zeros(d_out, 0, dtype=dtype, device=device), torch.zeros(0, dtype=dtype, device=device),
                  torch.zeros(d_in, 0, dtype=dtype, device=device), list(tasks or []))


def _check_bases(A: torch.Tensor, B: torch.Tensor) -> None:
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[0]:
        raise MergeInputError(f"bases must be d × k matrices of the same d, got {tuple(A.shape)} and {tuple(B.shape)}")


def subspace_affinity(A: torch.Tensor, B: torch.Tensor) -> float:
    """Eq. 6–7: a(A, B) = ‖AᵀB‖_F² / min(k1, k2) ∈ [0, 1] for orthonormal bases A, B.

    Equals tr(P_A P_B) / min(k1, k2) (Lemma 1) and the mean squared cosine of the principal
    angles when k1 = k2 (Prop. 1). Zero when either basis is empty.
    """
    _check_bases(A, B)
    k = min(A.shape[1], B.shape[1])
    if k == 0:
        return 0.0
    c = A.T @ B
    return float(torch.sum(c * c) / k)


def expert_affinity(e1: Expert, e2: Expert) -> float:
    """S(E_i, E_new) = ½ [a(U_i, U_new) + a(V_i, V_new)] (method.md §2)."""
    return 0.5 * (subspace_affinity(e1.U, e2.U) + subspace_affinity(e1.V, e2.V))


def expert_cosine(e1: Expert, e2: Expert) -> float:
    """Cosine similarity of the flattened updates vec(ΔW_1)·vec(ΔW_2) / (‖ΔW_1‖‖ΔW_2‖).

    The baseline score of the paper's Table 2, computed from the factors:
    ⟨ΔW_1, ΔW_2⟩_F = tr(S_1 U_1ᵀ U_2 S_2 V_2ᵀ V_1) and ‖ΔW‖_F = ‖s‖.
    """
    if e1.is_zero or e2.is_zero:
        return 0.0
    inner = torch.sum(((e1.U.T @ e2.U) * e1.s[:, None] * e2.s[None, :]) * (e1.V.T @ e2.V))
    return float(inner / (torch.linalg.vector_norm(e1.s) * torch.linalg.vector_norm(e2.s)))


def principal_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Principal angles between span(A) and span(B), in radians, ascending (Prop. 1).

    The singular values of AᵀB are cos θ_i; there are min(k1, k2) of them.
    """
    _check_bases(A, B)
    cos = torch.linalg.svdvals(A.T @ B).clamp(-1.0, 1.0)
    return torch.sort(torch.arccos(cos)).values


def chordal_distance(A: torch.Tensor, B: torch.Tensor) -> float:
    """d_c(A, B) = sqrt(½‖P_A − P_B‖_F²) = sqrt(½(k1 + k2) − ‖AᵀB‖_F²) (Prop. 2), from the bases."""
    _check_bases(A, B)
    c = A.T @ B
    sq = 0.5 * (A.shape[1] + B.shape[1]) - float(torch.sum(c * c))
    return math.sqrt(max(sq, 0.0))


def polar_factor(X: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor W Zᵀ of X = W Σ Zᵀ (thin SVD): the nearest matrix with
    orthonormal columns (when X has at most as many columns as rows)."""
    W, _, Zh = torch.linalg.svd(X, full_matrices=False)
    return W @ Zh


def _lowrank_best(U_cat: torch.Tensor, s_cat: torch.Tensor, V_cat: torch.Tensor, k: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-k approximation of U_cat diag(s_cat) V_catᵀ through QR factors and a small SVD.

    Cost O(d · r²) with r = the number of columns; no d_out × d_in matrix is formed.
    """
    Q1, R1 = torch.linalg.qr(U_cat)
    Q2, R2 = torch.linalg.qr(V_cat)
    core = (R1 * s_cat[None, :]) @ R2.T
    Uc, sc, Vch = torch.linalg.svd(core, full_matrices=False)
    k = min(k, int((sc > sc.max() * 1e-12).sum()) if sc.numel() else 0)
    return (Q1 @ Uc[:, :k]).contiguous(), sc[:k].contiguous(), (Q2 @ Vch[:k].T).contiguous()


def merge_experts(e_ref: Expert, e_new: Expert, rank: int | None = None, rule: MergeRule = "polar") -> Expert:
    """Consolidate ``e_new`` into ``e_ref`` (method.md §4). The identity sets are joined.

    - ``polar`` (the paper): U⊥, V⊥ = polar factors of [U_i | U_new], [V_i | V_new];
      M = U⊥ diag([s_i; s_new]) V⊥ᵀ is already an SVD, so the k largest entries of s with their
      columns are kept. When the concatenation has more columns than min(d_out, d_in), U⊥ cannot
      have orthonormal columns and M is re-factored exactly (QR + small SVD) before truncation.
    - ``sum``: the best rank-k approximation of ΔW_i + ΔW_new.
    - ``mean``: the same for (|A_i| ΔW_i + |A_new| ΔW_new) / (|A_i| + |A_new|).

    ``rank`` defaults to the larger of the two ranks.
    """
    if e_ref.shape != e_new.shape:
        raise MergeInputError(f"cannot merge experts of shapes {e_ref.shape} and {e_new.shape}")
    tasks = list(e_ref.tasks) + [t for t in e_new.tasks if t not in e_ref.tasks]
    k = rank if rank is not None else max(e_ref.rank, e_new.rank)
    if e_new.is_zero and rule != "mean":
        return Expert(e_ref.U, e_ref.s, e_ref.V, tasks)
    if e_ref.is_zero and rule != "mean":
        return Expert(e_new.U, e_new.s, e_new.V, tasks)
    U_cat = torch.cat([e_ref.U, e_new.U], dim=1)
    V_cat = torch.cat([e_ref.V, e_new.V], dim=1)
    if rule == "polar":
        s_cat = torch.cat([e_ref.s, e_new.s])
        if U_cat.shape[1] > min(U_cat.shape[0], V_cat.shape[0]):
            U, s, V = _lowrank_best(polar_factor(U_cat), s_cat, polar_factor(V_cat), k)
            return Expert(U, s, V, tasks)
        Up, Vp = polar_factor(U_cat), polar_factor(V_cat)
        order = torch.argsort(s_cat, descending=True, stable=True)[:k]
        return Expert(Up[:, order].contiguous(), s_cat[order].contiguous(), Vp[:, order].contiguous(), tasks)
    if rule == "sum":
        s_cat = torch.cat([e_ref.s, e_new.s])
    elif rule == "mean":
        n_ref, n_new = max(len(e_ref.tasks), 1), max(len(e_new.tasks), 1)
        w_ref, w_new = n_ref / (n_ref + n_new), n_new / (n_ref + n_new)
        s_cat = torch.cat([e_ref.s * w_ref, e_new.s * w_new])
        if s_cat.numel() == 0:
            return Expert(e_ref.U, e_ref.s, e_ref.V, tasks)
    else:
        raise MergeInputError(f"unknown merge rule {rule!r} (use 'polar', 'sum' or 'mean')")
    U, s, V = _lowrank_best(U_cat, s_cat, V_cat, k)
    return Expert(U, s, V, tasks)
