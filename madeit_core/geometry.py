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
SvdMethod = Literal["exact", "gram", "randomized", "subspace"]
SVD_METHODS: tuple[str, ...] = ("exact", "gram", "randomized", "subspace")


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


#: ``subspace`` defaults: q = k + max(SUBSPACE_MIN_OVERSAMPLE, ⌈SUBSPACE_OVERSAMPLE_RATIO · k⌉)
#: columns and SUBSPACE_STEPS filtered steps (the cheapest setting tried that kept a min affinity ≥ 0.99 to the
#: exact top-k on every module of 44 real fine-tuned EfficientNet-Lite0 checkpoints: 0.9976; results/perf)
SUBSPACE_OVERSAMPLE_RATIO = 0.5
SUBSPACE_MIN_OVERSAMPLE = 10
SUBSPACE_STEPS = 5
#: shift of each filtered step: μ = min(SHIFT_BOTTOM · θ_q, ½ θ_k) over the current Ritz values θ
SUBSPACE_SHIFT_BOTTOM = 0.8
#: convergence fallback (step S5 of :func:`_top_k_subspace`): a matrix takes the exact SVD when its
#: Davis–Kahan estimate of the affinity loss (:func:`subspace_loss_estimate`) exceeds
#: SUBSPACE_MAX_LOSS and either its Ritz values θ_k, θ_(k+1) are closer than SUBSPACE_TIE_GAP · θ_k
#: (a near-tie) or the estimate exceeds SUBSPACE_FAR_LOSS (a spectrum too flat for the steps).
#: Calibrated on 600 modules of 20 real EfficientNet-Lite0 task vectors (exact losses against the
#: estimates): away from near-ties the estimate overshoots the loss about a hundredfold (estimates
#: up to 0.125, losses ≤ 0.0012), so it decides alone only far above that; at a near-tie one module
#: lost 0.052 (s_k / s_(k+1) = 1.001). 3 of the 600 are flagged; after the extra steps 1 takes the
#: exact SVD (min affinity 0.9988). On the bench's synthetic ViT-B/32 task vectors ~8 % are
#: flagged and all settle in the extra steps.
SUBSPACE_TIE_GAP = 0.005
SUBSPACE_MAX_LOSS = 0.01
SUBSPACE_FAR_LOSS = 0.25
#: flagged matrices first get this many more filtered steps (from their current block) and are
#: tested again; only those still flagged take the exact SVD
SUBSPACE_EXTRA_STEPS = 5


def top_k_svd(m: torch.Tensor, k: int, method: SvdMethod = "exact", oversample: int | None = None,
              n_iter: int | None = None, generator_seed: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
      max(10, k), i.e. a sketch of about 2k) and ``n_iter`` power iterations (default 4;
      QR-stabilised), seeded by ``generator_seed`` so results repeat exactly on the CPU.
    - ``subspace`` (MADE-IT's default, :func:`_top_k_subspace`): shifted subspace iteration on
      the Gram operator G of the smaller side with a Rayleigh–Ritz finish: q = k + ``oversample``
      columns (default k + max(10, ⌈k/2⌉)), ``n_iter`` steps (default 5), one QR per step; G is
      formed once or applied as two products with M, whichever costs fewer FLOPs. Seeded like
      ``randomized``.

    ``randomized`` and ``subspace`` fall back to ``exact`` where the sketch would not be smaller
    than the matrix. ``m`` may carry leading batch dimensions (a stack of same-shaped matrices):
    every method then runs batched (one call per step for the whole stack), with the numbers of
    one-by-one calls up to rounding (the random start does not depend on the stack).
    """
    k = min(k, min(m.shape[-2:]))
    if method not in SVD_METHODS:
        raise MergeInputError(f"unknown SVD method {method!r} (use {', '.join(repr(x) for x in SVD_METHODS)})")
    if method == "gram":
        return _top_k_gram(m, k)
    if method == "subspace":
        return _top_k_subspace(m, k, oversample, SUBSPACE_STEPS if n_iter is None else n_iter, generator_seed)
    p = max(10, k) if oversample is None else oversample
    if method == "exact" or k + p >= min(m.shape[-2:]):
        return _top_k_exact(m, k)
    gen = torch.Generator(device=m.device).manual_seed(generator_seed)
    q = k + p
    omega = torch.randn(m.shape[-1], q, generator=gen, device=m.device, dtype=m.dtype)
    Q, _ = torch.linalg.qr(m @ omega)
    for _ in range(4 if n_iter is None else n_iter):
        Z, _ = torch.linalg.qr(m.mT @ Q)
        Q, _ = torch.linalg.qr(m @ Z)
    Ub, s, Vh = torch.linalg.svd(Q.mT @ m, full_matrices=False)
    return (Q @ Ub)[..., :k], s[..., :k], Vh[..., :k, :].mT


def _top_k_exact(m: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    U, s, Vh = torch.linalg.svd(m, full_matrices=False)
    return U[..., :k], s[..., :k], Vh[..., :k, :].mT


def subspace_columns(k: int, oversample: int | None = None) -> int:
    """q, the number of columns ``top_k_svd(..., "subspace")`` iterates for rank k."""
    if oversample is None:
        oversample = max(SUBSPACE_MIN_OVERSAMPLE, math.ceil(SUBSPACE_OVERSAMPLE_RATIO * k))
    return k + max(0, oversample)


def subspace_forms_gram(rows: int, n: int, k: int, q: int, steps: int) -> bool:
    """Whether ``subspace`` forms G = AᵀA (A: rows × n, rows ≥ n) rather than applying it as
    two products with A: the cheaper in FLOPs of 1.5·rows·n² (the blocked Gram: ⅝ of a GEMM's FLOPs, in
    smaller GEMMs that run slower; measured on the CPU) + (steps + 1)
    products G·X (2n²q) + U = A·V (2·rows·n·k), and steps products AᵀA·X (4·rows·n·q) + the
    final A·X (2·rows·n·q)."""
    explicit = 1.5 * rows * n * n + (steps + 1) * 2.0 * n * n * q + 2.0 * rows * n * k
    implicit = steps * 4.0 * rows * n * q + 2.0 * rows * n * q
    return explicit < implicit


def _gram(a: torch.Tensor, min_block: int = 128) -> torch.Tensor:
    """aᵀa for a (…, rows, n). G is symmetric, so it is built from its n/2 blocks, the diagonal
    ones recursively: G_12 = a_1ᵀa_2 once, G_21 = G_12ᵀ (down to blocks of ``min_block``
    columns: ⅝ of a GEMM's FLOPs for n = 768)."""
    n = a.shape[-1]
    if n < 2 * min_block:
        return a.mT @ a
    h = n // 2
    a1, a2 = a[..., :h], a[..., h:]
    g12 = a1.mT @ a2
    return torch.cat([torch.cat([_gram(a1, min_block), g12], -1), torch.cat([g12.mT, _gram(a2, min_block)], -1)], -2)


def _top_k_subspace(m: torch.Tensor, k: int, oversample: int | None, steps: int, seed: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``top_k_svd(m, k, "subspace")``: the factors of Eq. 5 (rank-k truncated SVD) by shifted
    subspace iteration with Rayleigh–Ritz (Rutishauser's simultaneous iteration, randomly started
    as in Halko, Martinsson & Tropp 2011, Alg. 4.4; the shift is a degree-one Chebyshev filter).

    (S1) A = m or mᵀ, whichever is tall (n = its columns); G = AᵀA, whose top-k eigenvectors
         span the right singular subspace of A; X_0 = Ω, an n × q Gaussian (seeded, shared by a
         whole stack), q = k + max(10, ⌈k/2⌉) (:func:`subspace_columns`).
    (S2) For j = 0..s−1 (s = ``steps``, default :data:`SUBSPACE_STEPS`):
         Z_j = G X_j,  X_(j+1) = orth(Z_j − μ_j X_j)  (one Householder QR per step).
    (S3) μ_0 = 0 (a power step); for j ≥ 1, μ_j = min(c · θ_q, ½ θ_k) with θ_1 ≥ … ≥ θ_q the Ritz
         values of G on span(X_j) (eigenvalues of X_jᵀ Z_j) and c = :data:`SUBSPACE_SHIFT_BOTTOM`.
    (S4) Rayleigh–Ritz: X_sᵀ G X_s = W Θ Wᵀ; V = X_s W_(:, 1..k), s_i = √θ_i, U = A V diag(s)⁻¹.
    (S5) Convergence check: a matrix whose Davis–Kahan estimate of the affinity loss
         (:func:`subspace_loss_estimate`) exceeds :data:`SUBSPACE_MAX_LOSS` at a near-tie
         (θ_k − θ_(k+1) < :data:`SUBSPACE_TIE_GAP` · θ_k), or exceeds :data:`SUBSPACE_FAR_LOSS`
         anywhere, is not converged (the steps have not separated the k-th direction from the
         (k+1)-th, or the spectrum is too flat for them): it gets :data:`SUBSPACE_EXTRA_STEPS` more
         steps (S2–S4) and, if its estimate is still above :data:`SUBSPACE_MAX_LOSS`, the exact SVD.

    Why the shift: an unwanted eigenvector (λ ≤ λ_(q+1)) loses, per step, the factor
    |λ − μ| / (λ_k − μ) ≤ max(μ, λ_(q+1) − μ) / (λ_k − μ) against the wanted ones, where the
    power method (μ = 0) has λ_(q+1) / λ_k; task vectors have flat spectra around k (s_(q+1)/s_k of
    0.6–0.8 on real checkpoints), where this halves the steps. Because θ_k ≤ λ_k, μ ≤ ½ λ_k and
    the factor stays below 1 on any spectrum (no step can lose the wanted subspace).

    G is formed once (:func:`_gram`) or applied as Aᵀ(A X), whichever costs fewer FLOPs
    (:func:`subspace_forms_gram`); both give the same factors up to rounding. Matrices whose
    s_k / s_1 is below :data:`GRAM_MIN_RATIO` (a squared spectrum loses them in rounding) or whose
    factors are not finite take the exact SVD, and so does a sketch not smaller than the matrix
    (2q > n).
    """
    wide = m.shape[-2] < m.shape[-1]
    a = m.mT if wide else m                                   # tall: rows ≥ n
    rows, n = a.shape[-2], a.shape[-1]
    q = subspace_columns(k, oversample)
    if k < 1 or 2 * q > n:
        return _top_k_exact(m, k)
    G = _gram(a) if subspace_forms_gram(rows, n, k, q, steps) else None
    gen = torch.Generator(device=m.device).manual_seed(seed)
    X = torch.randn(n, q, generator=gen, device=m.device, dtype=m.dtype)   # step 0 needs no orthonormal X
    if m.ndim > 2:
        X = X.expand(*m.shape[:-2], n, q)
    X = _subspace_steps(a, G, X, k, steps, first=True)
    U, s, V, unconverged = _ritz(a, G, X, k)
    if SUBSPACE_EXTRA_STEPS > 0 and bool(unconverged.any()):
        # (S5) more steps for the flagged matrices only, from where they are
        idx = unconverged if m.ndim > 2 else slice(None)
        a2, G2 = a[idx], None if G is None else G[idx]
        X2 = _subspace_steps(a2, G2, X[idx], k, SUBSPACE_EXTRA_STEPS, first=False)
        U2, s2, V2, still = _ritz(a2, G2, X2, k, strict=True)
        if m.ndim > 2:
            U, s, V = U.clone(), s.clone(), V.clone()
            U[idx], s[idx], V[idx] = U2, s2, V2
            unconverged = unconverged.clone()
            unconverged[idx] = still
        else:
            U, s, V, unconverged = U2, s2, V2, still
    U, s, V = (V, s, U) if wide else (U, s, V)
    return _exact_where_unreliable(m, k, U, s, V, unconverged)


def _subspace_steps(a: torch.Tensor, G: torch.Tensor | None, X: torch.Tensor, k: int, steps: int, first: bool
                    ) -> torch.Tensor:
    """Steps (S2)–(S3) of :func:`_top_k_subspace`; ``first``: X is the random start (unshifted step 0)."""
    q = X.shape[-1]
    for step in range(steps):
        Z = G @ X if G is not None else a.mT @ (a @ X)
        if step > 0 or not first:
            theta = torch.linalg.eigvalsh(_sym(X.mT @ Z))                 # ascending
            mu = torch.minimum(SUBSPACE_SHIFT_BOTTOM * theta[..., 0], 0.5 * theta[..., q - k]).clamp_min(0)
            Z = Z - mu[..., None, None] * X
        X = torch.linalg.qr(Z)[0]
    if steps < 1 and first:
        X = torch.linalg.qr(X)[0]
    return X


def _ritz(a: torch.Tensor, G: torch.Tensor | None, X: torch.Tensor, k: int, strict: bool = False
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step (S4) and the convergence test of (S5): U, s, V of the tall ``a`` and the matrices flagged
    (``strict``, the test after the extra steps: every estimate above :data:`SUBSPACE_MAX_LOSS`)."""
    q = X.shape[-1]
    if G is not None:
        GX = G @ X
        theta_all, W = torch.linalg.eigh(_sym(X.mT @ GX))
        W, theta = W[..., -k:].flip(-1), theta_all[..., -k:].flip(-1)
        s = theta.clamp_min(0).sqrt()
        V = X @ W
        U = (a @ V) / s[..., None, :]
        GV = GX @ W
    else:
        Y = a @ X
        theta_all, W = torch.linalg.eigh(_sym(Y.mT @ Y))
        W, theta = W[..., -k:].flip(-1), theta_all[..., -k:].flip(-1)
        s = theta.clamp_min(0).sqrt()
        V = X @ W
        AV = Y @ W
        U = AV / s[..., None, :]
        GV = a.mT @ AV
    theta_next = theta_all[..., q - k - 1]
    near_tie = (theta[..., -1] - theta_next) < SUBSPACE_TIE_GAP * theta[..., -1]
    est = subspace_loss_estimate(GV, V, theta, theta_next)
    flagged = est > SUBSPACE_MAX_LOSS
    return U, s, V, flagged if strict else flagged & (near_tie | (est > SUBSPACE_FAR_LOSS))


def subspace_loss_estimate(GV: torch.Tensor, V: torch.Tensor, theta: torch.Tensor, theta_next: torch.Tensor
                           ) -> torch.Tensor:
    """Estimated loss of projection affinity, 1 − ‖V*ᵀV‖²_F / k, of the Ritz subspace V (k
    columns, Ritz values ``theta`` descending) to the exact top-k eigenspace V* of G.

    The loss is exactly (1/k) Σ_i ‖(I − V*V*ᵀ) v_i‖², and for each Ritz pair the Davis–Kahan
    sin θ bound gives ‖(I − V*V*ᵀ) v_i‖ ≤ ‖r_i‖ / (θ_i − λ_(k+1)) with r_i = G v_i − θ_i v_i.
    λ_(k+1) is estimated by the next Ritz value θ_(k+1) (``theta_next``; a lower bound of it).
    Everything comes from products the Rayleigh–Ritz step has already formed. Near-degenerate
    gaps (s_k ≈ s_(k+1)) with unconverged vectors give large estimates: there the top-k subspace
    is barely defined and the exact SVD decides it."""
    k = theta.shape[-1]
    r2 = (GV - V * theta[..., None, :]).square().sum(-2)                  # ‖r_i‖², (..., k)
    gap = (theta - theta_next[..., None]).clamp_min(0)
    tiny = torch.finfo(theta.dtype).tiny
    return (r2 / (gap.square() + tiny)).clamp(max=1.0).sum(-1) / k


def _sym(c: torch.Tensor) -> torch.Tensor:
    return 0.5 * (c + c.mT)


def _exact_where_unreliable(m: torch.Tensor, k: int, U: torch.Tensor, s: torch.Tensor, V: torch.Tensor,
                            unconverged: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace, by the exact top-k, every matrix of the stack whose s_k / s_1 is below
    :data:`GRAM_MIN_RATIO`, whose factors are not finite, or that ``unconverged`` marks."""
    limit = GRAM_MIN_RATIO.get(m.dtype, 1e-3)
    finite = torch.isfinite(U.sum((-2, -1)) + V.sum((-2, -1)))     # NaN and Inf survive a sum
    bad = ~(s[..., -1] >= limit * s[..., 0]) | ~finite
    if unconverged is not None:
        bad = bad | unconverged
    if not bool(bad.any()):
        return U, s, V
    if m.ndim == 2:
        return _top_k_exact(m, k)
    Ue, se, Ve = _top_k_exact(m[bad], k)
    U, s, V = U.clone(), s.clone(), V.clone()
    U[bad], s[bad], V[bad] = Ue, se, Ve
    return U, s, V


def _top_k_gram(m: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``top_k_svd(m, k, "gram")`` (see there)."""
    wide = m.shape[-2] < m.shape[-1]
    a = m.mT if wide else m                                  # tall: rows ≥ columns
    lam, W = torch.linalg.eigh(a.mT @ a)                     # ascending eigenvalues
    lam_k, lam_1 = lam[..., -k].clamp_min(0), lam[..., -1]
    limit = GRAM_MIN_RATIO.get(m.dtype, 1e-3)
    if bool(torch.any(lam_k < (limit ** 2) * lam_1)) or not bool(torch.all(lam_1 > 0)):
        return _top_k_exact(m, k)
    q = min(2 * k, a.shape[-1])
    Vq = W[..., -q:].flip(-1)                                # leading right singular subspace of a
    Ub, s, Zh = torch.linalg.svd(a @ Vq, full_matrices=False)   # Rayleigh–Ritz: a Vq = Ub S Zᵀ
    U, s, V = Ub[..., :k], s[..., :k], Vq @ Zh[..., :k, :].mT
    return (V, s, U) if wide else (U, s, V)


def _update_kind(d: torch.Tensor) -> Literal["finite", "zero", "nonfinite"]:
    """One pass over a float update: ``nonfinite`` (a NaN or Inf), ``zero`` (all zero) or ``finite``.

    ``torch.aminmax`` keeps NaN and ±Inf and sees an all-zero matrix as min = max = 0, so one
    reduction (and one host sync) replaces ``isfinite(d).all()`` and ``any(d)``.
    """
    if d.numel() == 0:
        return "zero"
    lo, hi = torch.stack(torch.aminmax(d)).tolist()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "nonfinite"
    return "zero" if lo == 0 and hi == 0 else "finite"


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
    kind = _update_kind(delta)
    if kind == "nonfinite":
        raise MergeInputError("extract_expert: NaN or Inf in the update")
    d = delta.float() if delta.dtype in (torch.float16, torch.bfloat16) else delta
    tasks = [task] if task is not None else []
    if kind == "zero":
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
        if d.ndim != 2 or not d.is_floating_point() or _update_kind(d) != "finite":
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


def _polar_columns(X: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``polar_factor(X)[:, cols]`` without forming the other columns: W (Zᵀ)[:, cols]."""
    W, _, Zh = torch.linalg.svd(X, full_matrices=False)
    return W @ Zh[:, cols]


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
        order = torch.argsort(s_cat, descending=True, stable=True)[:k]
        return Expert(_polar_columns(U_cat, order), s_cat[order].contiguous(), _polar_columns(V_cat, order), tasks)
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
