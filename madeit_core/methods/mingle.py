"""MINGLE: mixtures of null-space gated low-rank experts (baselines.md §7).

θ0 stays frozen; every target module m (default: groups ``attention`` and ``mlp``; MINGLE* is
``lora_layer=["attn", "fc1"]``, substrings of the module name as in the reference) becomes a
:class:`~madeit_core.methods._lowrank_moe.LowRankMoE` with one expert per task. At step t:

1. τ_m = W_t − W_0 (weight only; biases, norms, embeddings stay θ0 [ref]).
2. For t ≥ 2, τ_m is projected away from the dominant subspace of D = Σ_{e<t} B_e A_e (the
   plain, ungated sum [ref]): with D = U diag(s) Vᵀ and the entropy effective rank
   r = ⌊exp(H(s/Σs))⌋ (0·log 0 = 0), τ̃ = τ − U_r U_rᵀ τ V_r V_rᵀ. The reference's attempt to also
   zero the diagonal is a no-op [ref]; ``zero_diagonal=True`` does it (OPCM/FusionBench style).
3. Expert: rank-``lora_r`` (64) truncated SVD of τ̃, B = U_r, A = diag(s_r) V_rᵀ.
4. Gate: previous rows frozen, a new trainable row N(0, 0.01²), bias ``init_lambda`` = 0.
5. TTA: 50 Adam(1e-4) steps on the new rows only, batches of ≤ 16 from the new task's seed
   subset (5 unlabeled test images per class), loss KD(T = 2) against the *current fine-tuned
   model*'s logits with the new task's head. With ``constraint_gate`` the gradient G of every
   new row weight is replaced by G − (G U) diag(λ) Uᵀ, λ_i = exp(−γ h_i), h the EMA (β = 0.99)
   of r_i = mean_rows |G u_i| / ‖G_row‖, reset at every task, updated before use; the bias
   gradient is not projected [ref]. γ = 0 turns relaxation off: an exact projection.
6. Subspace: Σ_m = Σ_images Σ_tokens x xᵀ of each module's input over the seed subset (one
   no-grad pass of the adapted model); U_m ← orth([U_m | top-``subspace_k`` left singular
   vectors of Σ_m]).

Inference is gated with token mean then batch mean [ref] (``batch_reduce=False``: per image).
Choices where the reference is silent or CLIP-specific: target modules come from
``ModuleSpec.group`` (falls back to every module when none matches, e.g. a convnet; recorded in
the summary); modules their parent never calls (``nn.MultiheadAttention.out_proj``) are skipped
and listed, since a wrapper there would do nothing; conv1x1 modules use spatial positions as
tokens; the TTA runs in eval mode (CLIP has no dropout); ``optimizer="sgd"`` exists only to test
that the update itself (not just the gradient) lies in the null space, which Adam's
per-coordinate scaling breaks [ref]. The summary's ``gates_after_tta`` records, per task, the
gates its seed subset gets right after its TTA.

**On the offline convnet (EfficientNet-Lite0, 64 px) the low offline-8 score (ACC 46.7 %, below
θ0's 60.8 %, for the order of seed 42) is the method, not the port.** Evidence (offline zoo, the
shortened order cifar10 → gtsrb → kmnist → mnist):

- The conv path is exact (see :mod:`madeit_core.methods.wemoe` and ``tests/test_moe_convnet.py``)
  and one task works: after cifar10 the KD-trained gates (0.8 on average) give 0.688, the
  fine-tuned model 0.70.
- The failures come from *old* gates firing on new tasks. The gate rows read raw channel means,
  and a row trained to open its expert on its own task opens it on the others too: the cifar10
  row gives 0.81 on cifar10 and 0.83 on kmnist; the gtsrb row 0.55 on gtsrb and 0.50 on kmnist.
  Nothing in the objective asks a row to stay closed elsewhere (the null-space constraint
  protects old tasks from the *new* row, not new tasks from old rows). So before its TTA the
  model already scores 0.20 on kmnist (θ0 0.54) and 0.20 on mnist (θ0 0.86), the KD loss starts
  at 13-20 (up to 120 in the full run), and 50 Adam steps at 1e-4 (a gate moves by at most
  ≈ 50 · lr · ‖x̄‖₁, with ‖x̄‖₁ ≈ 75-900) do not undo it: a_ii 0.29 on both.
  In the full seed-42 run the same holds (``gates_after_tta``): after kmnist's TTA the cifar10
  and gtsrb experts are open at 0.83 and 0.52 on kmnist images, kmnist's own at 0.05.
- With every gate row but the new task's zeroed at evaluation (oracle routing, a diagnostic
  only) the same experts give kmnist 0.63 and mnist 0.78 at those steps.
- A BatchNorm convnet in eval mode does not tolerate summed, scaled deltas well (θ0 + 2 × the
  mnist update scores 0.14 on mnist), unlike CLIP, whose LayerNorms renormalise the residual stream.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from madeit_core.errors import MergeInputError
from madeit_core.methods import register
from madeit_core.methods._lowrank_moe import (
    GatedModel,
    LowRankMoE,
    Router,
    bypassed_by_parent,
    gate_stats,
    kd_loss,
    lowrank_factors,
    record_data,
    run_tta,
    stateful_generator,
    wrap_modules,
)
from madeit_core.methods.base import ContinualMethod, MergeContext
from madeit_core.methods.wemoe import restore_experts
from madeit_core.modules import ModuleSpec, as_matrix
from madeit_core.statedict import StateDict


def effective_rank(s: torch.Tensor) -> int:
    """⌊exp(H)⌋ with H the entropy of s/Σs, using 0·log 0 = 0 (baselines.md §7 (b)2, (f))."""
    s = s.double().clamp_min(0)
    total = float(s.sum())
    if total <= 0:
        return 0
    p = s / total
    nz = p[p > 0]
    H = float(-(nz * nz.log()).sum())
    return int(math.floor(math.exp(H)))


def project_expert(D: torch.Tensor, tau: torch.Tensor, zero_diagonal: bool = False) -> tuple[torch.Tensor, int]:
    """τ̃ = τ − U_r U_rᵀ τ V_r V_rᵀ, r = effective rank of D; also zero the remaining diagonal
    coordinates u_iᵀ τ v_i (i ≥ r) when ``zero_diagonal``. Returns (τ̃, r)."""
    U, s, Vh = torch.linalg.svd(D.float(), full_matrices=False)
    r = min(effective_rank(s), s.numel())
    tau = tau.float()
    Ur, Vr = U[:, :r], Vh[:r].T
    out = tau - Ur @ (Ur.T @ tau @ Vr) @ Vr.T
    if zero_diagonal and r < s.numel():
        Uk, Vk = U[:, r:], Vh[r:].T
        coef = ((Uk.T @ tau) * Vk.T).sum(dim=1)
        out = out - (Uk * coef) @ Vk.T
    return out, r


def soft_project(G: torch.Tensor, U: torch.Tensor | None, h: torch.Tensor | None, gamma: float, beta: float
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Adaptive soft null-space projection of a gate gradient (baselines.md §7, "Adaptive soft
    projection"). Returns (projected G, updated EMA h)."""
    if U is None or G.ndim != 2 or U.shape[1] == 0:
        return G, h
    U = U.to(G.dtype)
    GU = G @ U                                                  # [o, k]
    r = (GU.abs() / (G.norm(dim=1, keepdim=True) + 1e-12)).mean(dim=0)
    h = (1 - beta) * r if h is None else beta * h + (1 - beta) * r
    lam = torch.exp(-gamma * h)
    return G - (GU * lam) @ U.T, h


@register
class MINGLE(ContinualMethod):
    name = "mingle"
    needs_data = True

    def __init__(self, lora_r: int = 64, groups: tuple[str, ...] | list[str] = ("attention", "mlp"),
                 lora_layer: list[str] | None = None, init_lambda: float = 0.0, gate_init_std: float = 0.01,
                 constraint_gate: bool = True, subspace_k: int = 3, gamma: float = 1.0, beta: float = 0.99,
                 batch_reduce: bool = True, lr: float = 1e-4, max_steps: int = 50, batch_size: int = 16,
                 per_class: int = 5, temperature: float = 2.0, zero_diagonal: bool = False, use_tta: bool = True,
                 optimizer: str = "adam") -> None:
        super().__init__()
        self.lora_r, self.groups = int(lora_r), tuple(groups)
        self.lora_layer = list(lora_layer) if lora_layer is not None else None
        self.init_lambda, self.gate_init_std = float(init_lambda), float(gate_init_std)
        self.constraint_gate, self.subspace_k = bool(constraint_gate), int(subspace_k)
        self.gamma, self.beta = float(gamma), float(beta)
        self.batch_reduce, self.lr, self.max_steps = bool(batch_reduce), float(lr), int(max_steps)
        self.batch_size, self.per_class, self.temperature = int(batch_size), int(per_class), float(temperature)
        self.zero_diagonal, self.use_tta, self.optimizer = bool(zero_diagonal), bool(use_tta), optimizer
        if optimizer not in ("adam", "sgd"):
            raise MergeInputError(f"mingle: optimizer must be 'adam' or 'sgd', got {optimizer!r}")

    def hparams(self) -> dict[str, Any]:
        return {"lora_r": self.lora_r, "groups": list(self.groups), "lora_layer": self.lora_layer,
                "init_lambda": self.init_lambda, "gate_init_std": self.gate_init_std,
                "constraint_gate": self.constraint_gate, "subspace_k": self.subspace_k, "gamma": self.gamma,
                "beta": self.beta, "batch_reduce": self.batch_reduce, "lr": self.lr, "max_steps": self.max_steps,
                "batch_size": self.batch_size, "per_class": self.per_class, "temperature": self.temperature,
                "zero_diagonal": self.zero_diagonal, "use_tta": self.use_tta, "optimizer": self.optimizer}

    # ------------------------------------------------------------------ build
    def setup(self, pretrained: nn.Module, ctx: MergeContext | None = None) -> None:
        super().setup(pretrained, ctx)
        self._build()

    def _targets(self) -> list[ModuleSpec]:
        assert self.pretrained is not None
        self.skipped = [s.name for s in self.ctx.modules if bypassed_by_parent(self.pretrained, s)]
        specs = [s for s in self.ctx.modules if s.name not in self.skipped]
        if self.lora_layer is not None:
            out = [s for s in specs if any(sub in s.name for sub in self.lora_layer)]
            if not out:
                raise MergeInputError(f"mingle: no module name contains any of {self.lora_layer}")
            return out
        out = [s for s in specs if s.group in self.groups]
        self.fallback = not out
        return out or list(specs)

    def _build(self) -> None:
        assert self.pretrained is not None
        self.fallback = False
        self.targets = self._targets()
        encoder = copy.deepcopy(self.pretrained).to(self.ctx.device).eval()
        self.routers, self.wrappers = wrap_modules(encoder, [[s] for s in self.targets], self.batch_reduce)
        self.gated = GatedModel(encoder, self.routers).eval()
        self.gated.requires_grad_(False)
        self.bases: dict[str, torch.Tensor] = {}
        self.ema: dict[str, torch.Tensor] = {}
        self.r_eff: dict[str, list[int]] = {}
        self.tta_losses: dict[str, list[float]] = {}
        #: per task, max over TTA steps and modules of ‖G′U‖ / ‖G‖ (residual in the protected subspace)
        self.constraint_residual: dict[str, float] = {}
        #: per task, :func:`gate_stats` of the gates on its seed subset right after its TTA
        self.gates_after_tta: dict[str, dict[str, list[float]]] = {}

    # ------------------------------------------------------------------ absorb
    def _absorb(self, task: str, finetuned: StateDict) -> None:
        step = len(self.tasks)
        seed = self.ctx.step_seed(step)
        gen = stateful_generator(seed)
        dev = self.ctx.device
        r_eff: dict[str, int] = {}
        for s in self.targets:
            w = self.wrappers[s.name]
            tau = (as_matrix(finetuned[s.key]).float() - as_matrix(self.theta0[s.key]).float()).to(dev)
            if w.num_experts > 0:
                tau, r_eff[s.name] = project_expert(w.delta_sum(), tau, self.zero_diagonal)
            B, A = lowrank_factors(tau, self.lora_r)
            w.add_expert(B, A)
            router = self.routers[s.name]
            w_old, b_old = router.all_rows()
            router.set_rows(w_old, b_old, torch.randn(1, router.d_in, generator=gen) * self.gate_init_std,
                            torch.full((1,), self.init_lambda))
        self.r_eff[task] = [r_eff.get(s.name, 0) for s in self.targets]
        if self.use_tta and self.max_steps > 0:
            self._tta(task, step, seed, gen, finetuned)
        for router in self.routers.values():   # the new row joins the frozen block
            w_all, b_all = router.all_rows()
            router.set_rows(w_all, b_all, w_all[:0], b_all[:0])

    def _tta(self, task: str, step: int, seed: int, gen: torch.Generator, finetuned: StateDict) -> None:
        if self.ctx.unlabeled_samples is None:
            raise MergeInputError("mingle needs unlabeled test images for its gate TTA: the context has no "
                                  "unlabeled_samples callback (or pass use_tta=False)")
        if task not in self.ctx.heads:
            raise MergeInputError(f"mingle: no head for task {task!r} in the context")
        head = self.ctx.heads[task]
        x = self.ctx.unlabeled_samples(task, self.per_class, seed).to(self.ctx.device)
        record_data(self.data_used, step=step + 1, task=task, split="test", count=int(x.shape[0]), labelled=False,
                    purpose="gate TTA (KD against the fine-tuned model's logits) and feature subspace",
                    per_class=self.per_class, labels_used_for="class-stratified selection only")
        teacher = self.model_with(finetuned)
        teacher.requires_grad_(False)

        def loss_fn(xb: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                t_logits = head(teacher(xb))
            return kd_loss(head(self.gated(xb)), t_logits, self.temperature)

        self.ema = {}
        residual = [0.0]

        def constrain() -> None:
            for name, w in self.wrappers.items():
                router = w.shared_router
                G = router.w_train.grad
                U = self.bases.get(name)
                if G is None or U is None:
                    continue
                Gp, h = soft_project(G, U, self.ema.get(name), self.gamma, self.beta) if self.constraint_gate \
                    else (G, self.ema.get(name))
                if h is not None:
                    self.ema[name] = h
                router.w_train.grad = Gp
                gn = float(G.norm())
                if gn > 0:
                    residual[0] = max(residual[0], float((Gp @ U.to(Gp.dtype)).norm()) / gn)

        params = [p for r in self.routers.values() for p in (r.w_train, r.b_train)]
        self.gated.eval()
        self.tta_losses[task] = run_tta(
            params, loss_fn, x, steps=self.max_steps, batch_size=self.batch_size, lr=self.lr, generator=gen,
            desc=f"mingle TTA {task}", show_progress=self.ctx.show_progress, after_backward=constrain,
            optimizer=self.optimizer)
        self.constraint_residual[task] = residual[0]
        self.gates_after_tta[task] = gate_stats(self.gated, x)
        self._update_subspaces(x)

    @torch.no_grad()
    def _update_subspaces(self, x: torch.Tensor) -> None:
        mods = list(self.wrappers.values())
        for w in mods:
            w.capture, w.second_moment = True, None
        try:
            for i in range(0, int(x.shape[0]), self.batch_size):
                self.gated(x[i:i + self.batch_size])
        finally:
            for w in mods:
                w.capture = False
        for w in mods:
            S, w.second_moment = w.second_moment, None
            assert S is not None
            Q = torch.linalg.svd(S.double(), full_matrices=False)[0][:, : self.subspace_k].float()
            U = self.bases.get(w.name)
            self.bases[w.name] = Q if U is None else torch.linalg.qr(torch.cat([U, Q.to(U.device)], dim=1))[0]

    # ------------------------------------------------------------------ model
    def merged_model(self) -> nn.Module:
        """The live gated encoder (changes with the next ``absorb``; deepcopy it to keep it)."""
        return self.gated.eval()

    def summary(self) -> dict[str, Any]:
        return {"targets": [s.name for s in self.targets], "fallback_all_modules": self.fallback,
                "skipped_not_called_by_parent": self.skipped,
                "experts_per_module": {n: w.num_experts for n, w in self.wrappers.items()},
                "expert_parameters": int(sum(w.A_cat.numel() + w.B_cat.numel() for w in self.wrappers.values())),
                "basis_columns": {n: int(U.shape[1]) for n, U in self.bases.items()},
                "effective_rank_per_task": self.r_eff, "constraint_residual": self.constraint_residual,
                "tta_loss_first_last": {t: [v[0], v[-1]] for t, v in self.tta_losses.items() if v},
                "gates_after_tta": self.gates_after_tta}

    # ------------------------------------------------------------------ state
    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        for name, w in self.wrappers.items():
            tensors[f"A.{name}"] = w.A_cat.detach().cpu()
            tensors[f"B.{name}"] = w.B_cat.detach().cpu()
            gw, gb = self.routers[name].all_rows()
            tensors[f"gate_w.{name}"], tensors[f"gate_b.{name}"] = gw.cpu(), gb.cpu()
        for name, U in self.bases.items():
            tensors[f"basis.{name}"] = U.detach().cpu()
        for name, h in self.ema.items():
            tensors[f"ema.{name}"] = h.detach().cpu()
        meta = {"ranks": {n: list(w.ranks) for n, w in self.wrappers.items()}, "r_eff": self.r_eff,
                "tta_losses": self.tta_losses, "constraint_residual": self.constraint_residual,
                "gates_after_tta": self.gates_after_tta, "summary": self.summary()}
        return tensors, meta

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self._build()
        restore_experts(self.wrappers, tensors, meta["ranks"])
        dev = self.ctx.device
        for name, router in self.routers.items():
            w, b = tensors[f"gate_w.{name}"], tensors[f"gate_b.{name}"]
            router.set_rows(w, b, w[:0], b[:0])
        self.bases = {k[len("basis."):]: v.to(dev) for k, v in tensors.items() if k.startswith("basis.")}
        self.ema = {k[len("ema."):]: v.to(dev) for k, v in tensors.items() if k.startswith("ema.")}
        self.r_eff = {k: list(v) for k, v in meta.get("r_eff", {}).items()}
        self.tta_losses = {k: list(v) for k, v in meta.get("tta_losses", {}).items()}
        self.constraint_residual = dict(meta.get("constraint_residual", {}))
        self.gates_after_tta = dict(meta.get("gates_after_tta", {}))


__all__ = ["MINGLE", "Router", "LowRankMoE", "effective_rank", "project_expert", "soft_project"]
