"""Continual LoRA-WEMoE, as MINGLE's ``c_wemoe`` (baselines.md §6).

At every step t (t = 1 included):

1. *Attention by continual task arithmetic*: every module of ``ta_groups`` (weight and bias)
   gets θ ← θ + λ τ_t with the fixed λ = ``init_lambda`` = 0.3, whatever T is [ref].
2. *Experts*: every module of ``expert_groups`` gets a truncated-SVD expert of its weight update
   (rank ``first_rank`` = 64 at t = 1, ``rank`` = 16 afterwards [ref]); no projection.
3. *Routers*: one linear router per MLP block (``router_scope="block"``: the modules of one
   ``expert_groups`` group at one depth share it; it reads the input of the block's first module,
   i.e. fc1's input, and the same gate scales fc1's and fc2's experts, as the reference does).
   A new row N(0, 0.01²) with bias ``init_lambda`` is appended; **all rows stay trainable** [ref]
   (``train_old_rows=False`` freezes the old rows instead).
4. *TTA*: only the routers train, Adam(lr 1e-4), 50 steps, batches of ≤ 16 from the new task's
   seed subset (5 unlabeled test images per class), entropy loss (§0.4) with the new task's head.

Everything else (embeddings, norms, the biases of expert modules, modules in neither group)
stays at θ0 [ref]. Inference is gated: token mean then *batch* mean of the router output, so
one weight set per forward batch [ref] (``batch_reduce=False`` gates per image).

Choices where the reference is CLIP-specific: which modules are "attention" and "MLP" comes
from ``ModuleSpec.group``; a depth of −1 makes a module its own block. The reference adds λτ to
*every* parameter of ``self_attn``; beyond the attention modules' weights and biases this also
covers parameters that are not Linear modules but whose name says attention (open_clip's
``attn.in_proj_weight``/``in_proj_bias``; norms excluded) unless ``ta_extra_params=False``. When no module is in
``expert_groups`` (e.g. a convnet), every module outside ``ta_groups`` gets experts, each with
its own router (recorded in the summary). The TTA runs with the encoder in eval mode (CLIP has
no dropout, so this equals the reference). The summary's ``gates_after_tta`` records, per task,
the gates its seed subset gets right after its TTA.

**On the offline convnet (EfficientNet-Lite0, 64 px) the method collapses, and that is the
method, not the port** (evidence from the offline zoo, offline-8 order of seed 42, where the
reference recipe scores ACC 17 % with a_ii near chance from task 2 on):

- The conv path is exact: with the gates forced to 1 the MoE model scores what θ0 + the rank-r
  update of every 1×1 conv scores (cifar10 0.684 / 0.696 at rank 16 / 64, the fine-tuned model
  0.70; updating the 1×1 convs alone already gives 0.696), and ``tests/test_moe_convnet.py``
  checks exactness on a small BatchNorm convnet.
- With the routers fixed (``use_tta=False``, ``router_init_std=0``: every gate 0.3) the run is
  plain task arithmetic at 0.3 on the 1×1 convs: ACC 58.2 (continual task arithmetic: 57.9).
  The random router rows alone (``use_tta=False``) give 51.5: N(0, 0.01²) rows times channel means
  of norm ‖x̄‖₂ ≈ 12-60 put noise of ±0.1-0.6 on each gate.
- The entropy TTA is what breaks it. The router reads raw channel means, mostly non-negative
  (post-ReLU6 inputs of the project convs) with ‖x̄‖₁ ≈ 75-900; Adam moves every weight by ≈ lr per
  step in the sign of its gradient, so a gate moves by up to lr · ‖x̄‖₁ per step, 0.4-4.4 over the
  50 steps. Entropy falls as the deltas are scaled up (sharper logits), so the gates grow: after
  task 1 the cifar10 gate is 1.1 on average over the 32 modules and up to 3.7; after task 3 up
  to 7, and after task 7 up to 19 (the summary's ``gates_after_tta`` of that run). All rows
  train on the new task's images, and the channel means of different tasks point in much the
  same direction (cosine ≥ 0.7 between task means at the project convs), so the old experts'
  gates grow on every task, not only on their own.
- A BatchNorm convnet in eval mode does not tolerate scaled-up deltas: θ0 + g · (rank-64 update)
  scores, for g = 0.3 / 1 / 2 / 3 / 5, cifar10 0.66 / 0.70 / 0.68 / 0.55 / 0.31 and mnist
  0.86 / 0.89 / 0.14 / 0.11 / 0.10. With gates of 3-7 on old experts the features collapse and
  the model predicts nearly one class (the TTA entropy of task 4 starts at 1e-39).
- At lr 1e-5 the gates stay within ≈ 3 and the first three a_ii are 0.65 / 0.54 / 0.67 (no TTA:
  0.64 / 0.59 / 0.70), so the TTA brings nothing on this backbone even when it does not diverge.

In the reference's CLIP the router reads LayerNorm outputs and scaled MLP deltas pass through
later LayerNorms, which plausibly keeps it from collapsing; a BatchNorm convnet in eval mode has
no such renormalisation. Nothing here is changed to rescue
the method: the offline numbers are what the reference recipe does on this backbone.
"""

from __future__ import annotations

import copy
import re
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
    entropy_loss,
    gate_stats,
    lowrank_factors,
    record_data,
    run_tta,
    stateful_generator,
    wrap_modules,
)
from madeit_core.methods.base import ContinualMethod, MergeContext
from madeit_core.modules import ATTENTION_PAT, ModuleSpec, as_matrix
from madeit_core.statedict import StateDict, compute_dtype

_NORM_PAT = re.compile(r"(norm|ln_|layernorm)", re.I)


def make_units(specs: list[ModuleSpec], scope: str) -> list[list[ModuleSpec]]:
    """Group expert modules into routing units: per (group, depth) block, or one per module."""
    if scope not in ("block", "module"):
        raise MergeInputError(f"router_scope must be 'block' or 'module', got {scope!r}")
    units: dict[Any, list[ModuleSpec]] = {}
    for s in specs:
        key = (s.group, s.depth) if scope == "block" and s.depth >= 0 else s.name
        units.setdefault(key, []).append(s)
    return list(units.values())


@register
class ContinualWEMoE(ContinualMethod):
    name = "wemoe"
    needs_data = True

    def __init__(self, init_lambda: float = 0.3, first_rank: int = 64, rank: int = 16, lr: float = 1e-4,
                 max_steps: int = 50, batch_size: int = 16, per_class: int = 5, batch_reduce: bool = True,
                 use_tta: bool = True, router_init_std: float = 0.01, train_old_rows: bool = True,
                 ta_groups: tuple[str, ...] | list[str] = ("attention",),
                 expert_groups: tuple[str, ...] | list[str] = ("mlp",), router_scope: str = "block",
                 ta_extra_params: bool = True) -> None:
        super().__init__()
        self.init_lambda, self.first_rank, self.rank = float(init_lambda), int(first_rank), int(rank)
        self.lr, self.max_steps, self.batch_size, self.per_class = float(lr), int(max_steps), int(batch_size), \
            int(per_class)
        self.batch_reduce, self.use_tta, self.router_init_std = bool(batch_reduce), bool(use_tta), \
            float(router_init_std)
        self.train_old_rows = bool(train_old_rows)
        self.ta_groups, self.expert_groups = tuple(ta_groups), tuple(expert_groups)
        self.router_scope = router_scope
        self.ta_extra_params = bool(ta_extra_params)
        self.tta_losses: dict[str, list[float]] = {}

    def hparams(self) -> dict[str, Any]:
        return {"init_lambda": self.init_lambda, "first_rank": self.first_rank, "rank": self.rank, "lr": self.lr,
                "max_steps": self.max_steps, "batch_size": self.batch_size, "per_class": self.per_class,
                "batch_reduce": self.batch_reduce, "use_tta": self.use_tta,
                "router_init_std": self.router_init_std, "train_old_rows": self.train_old_rows,
                "ta_groups": list(self.ta_groups), "expert_groups": list(self.expert_groups),
                "router_scope": self.router_scope, "ta_extra_params": self.ta_extra_params}

    # ------------------------------------------------------------------ build
    def setup(self, pretrained: nn.Module, ctx: MergeContext | None = None) -> None:
        super().setup(pretrained, ctx)
        self._build()

    def _build(self) -> None:
        assert self.pretrained is not None
        specs = self.ctx.modules
        self.ta_specs = [s for s in specs if s.group in self.ta_groups]
        self.skipped = [s.name for s in specs if s.group not in self.ta_groups
                        and bypassed_by_parent(self.pretrained, s)]
        expert_specs = [s for s in specs if s.group in self.expert_groups and s.name not in self.skipped]
        self.fallback = False
        scope = self.router_scope
        if not expert_specs:
            expert_specs = [s for s in specs if s.group not in self.ta_groups and s.name not in self.skipped]
            self.fallback, scope = True, "module"
        if not expert_specs:
            raise MergeInputError(f"wemoe: no module outside the task-arithmetic groups {self.ta_groups} to put "
                                  "experts on")
        self.expert_specs = expert_specs
        self.units = make_units(expert_specs, scope)
        self.ta_keys = []
        for s in self.ta_specs:
            self.ta_keys.append(s.key)
            if f"{s.name}.bias" in self.theta0:
                self.ta_keys.append(f"{s.name}.bias")
        if self.ta_extra_params and "attention" in self.ta_groups:
            owned = {k for s in specs for k in (s.key, f"{s.name}.bias")}
            params = {n for n, _ in self.pretrained.named_parameters()}
            self.ta_keys += [k for k in self.theta0 if k in params and k not in owned
                             and self.theta0[k].is_floating_point() and ATTENTION_PAT.search(k)
                             and not _NORM_PAT.search(k)]
        self.ta_sum: StateDict = {}
        encoder = copy.deepcopy(self.pretrained).to(self.ctx.device).eval()
        self.routers, self.wrappers = wrap_modules(encoder, self.units, self.batch_reduce)
        self.gated = GatedModel(encoder, self.routers).eval()
        self.gated.requires_grad_(False)
        self.tta_losses = {}
        #: per task, :func:`gate_stats` of the gates on its seed subset right after its TTA
        self.gates_after_tta: dict[str, dict[str, list[float]]] = {}

    def _set_ta(self) -> None:
        """Write θ0 + Σ λ τ into the task-arithmetic modules of the encoder."""
        enc = self.gated.encoder
        with torch.no_grad():
            for k, delta in self.ta_sum.items():
                mod_name, _, attr = k.rpartition(".")
                p = getattr(enc.get_submodule(mod_name) if mod_name else enc, attr)
                p.copy_((self.theta0[k].to(delta.dtype) + delta).to(p.dtype).to(p.device))

    # ------------------------------------------------------------------ absorb
    def _absorb(self, task: str, finetuned: StateDict) -> None:
        step = len(self.tasks)
        seed = self.ctx.step_seed(step)
        gen = stateful_generator(seed)
        # 1. attention: continual task arithmetic at the fixed init_lambda
        for k in self.ta_keys:
            dt = compute_dtype(self.theta0[k])
            tau = finetuned[k].to(dt) - self.theta0[k].to(dt)
            self.ta_sum[k] = self.ta_sum[k] + self.init_lambda * tau if k in self.ta_sum else self.init_lambda * tau
        self._set_ta()
        # 2. one low-rank expert per expert module
        r = self.first_rank if step == 0 else self.rank
        dev = self.ctx.device
        for s in self.expert_specs:
            delta = as_matrix(finetuned[s.key]).float() - as_matrix(self.theta0[s.key]).float()
            B, A = lowrank_factors(delta.to(dev), r)
            self.wrappers[s.name].add_expert(B, A)
        # 3. a new router row per unit: N(0, std²), bias init_lambda
        for unit in self.units:
            router = self.routers[unit[0].name]
            w_old, b_old = router.all_rows()
            w_new = torch.randn(1, router.d_in, generator=gen) * self.router_init_std
            b_new = torch.full((1,), self.init_lambda)
            if self.train_old_rows:
                router.set_rows(w_old[:0], b_old[:0], torch.cat([w_old.cpu(), w_new]), torch.cat([b_old.cpu(), b_new]))
            else:
                router.set_rows(w_old, b_old, w_new, b_new)
        # 4. test-time adaptation of the routers (entropy minimisation)
        if self.use_tta and self.max_steps > 0:
            self._tta(task, step, seed, gen)
        self._freeze_routers()

    def _freeze_routers(self) -> None:
        """Between steps every row is simply stored; trainability is decided at the next step."""
        for router in self.routers.values():
            w, b = router.all_rows()
            router.set_rows(w, b, w[:0], b[:0])

    def _tta(self, task: str, step: int, seed: int, gen: torch.Generator) -> None:
        if self.ctx.unlabeled_samples is None:
            raise MergeInputError("wemoe needs unlabeled test images for its router TTA: the context has no "
                                  "unlabeled_samples callback (or pass use_tta=False)")
        if task not in self.ctx.heads:
            raise MergeInputError(f"wemoe: no head for task {task!r} in the context")
        head = self.ctx.heads[task]
        x = self.ctx.unlabeled_samples(task, self.per_class, seed).to(self.ctx.device)
        record_data(self.data_used, step=step + 1, task=task, split="test", count=int(x.shape[0]), labelled=False,
                    purpose="router TTA (entropy)", per_class=self.per_class,
                    labels_used_for="class-stratified selection only")
        params = [p for r in self.routers.values() for p in (r.w_train, r.b_train) if p.numel() > 0]
        self.gated.eval()
        self.tta_losses[task] = run_tta(
            params, lambda xb: entropy_loss(head(self.gated(xb))), x, steps=self.max_steps,
            batch_size=self.batch_size, lr=self.lr, generator=gen, desc=f"wemoe TTA {task}",
            show_progress=self.ctx.show_progress)
        self.gates_after_tta[task] = gate_stats(self.gated, x)

    # ------------------------------------------------------------------ model
    def merged_model(self) -> nn.Module:
        """The live gated encoder (changes with the next ``absorb``; deepcopy it to keep it)."""
        return self.gated.eval()

    def summary(self) -> dict[str, Any]:
        return {"experts_per_module": {s.name: self.wrappers[s.name].num_experts for s in self.expert_specs},
                "expert_parameters": int(sum(w.A_cat.numel() + w.B_cat.numel() for w in self.wrappers.values())),
                "router_parameters": int(sum(r.w_frozen.numel() + r.b_frozen.numel() + r.w_train.numel()
                                             + r.b_train.numel() for r in self.routers.values())),
                "units": [[s.name for s in u] for u in self.units], "fallback_all_non_ta_modules": self.fallback,
                "skipped_not_called_by_parent": self.skipped,
                "ta_modules": [s.name for s in self.ta_specs], "ta_keys": list(self.ta_keys),
                "tta_loss_first_last": {t: [v[0], v[-1]] for t, v in self.tta_losses.items() if v},
                "gates_after_tta": self.gates_after_tta}

    # ------------------------------------------------------------------ state
    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        for k, v in self.ta_sum.items():
            tensors[f"ta.{k}"] = v.detach().cpu()
        for name, w in self.wrappers.items():
            tensors[f"A.{name}"] = w.A_cat.detach().cpu()
            tensors[f"B.{name}"] = w.B_cat.detach().cpu()
        for uid, r in self.routers.items():
            w, b = r.all_rows()
            tensors[f"router_w.{uid}"] = w.cpu()
            tensors[f"router_b.{uid}"] = b.cpu()
        meta = {"ranks": {n: list(w.ranks) for n, w in self.wrappers.items()},
                "tta_losses": self.tta_losses, "gates_after_tta": self.gates_after_tta, "summary": self.summary()}
        return tensors, meta

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self._build()
        restore_experts(self.wrappers, tensors, meta["ranks"])
        for uid, r in self.routers.items():
            w, b = tensors[f"router_w.{uid}"], tensors[f"router_b.{uid}"]
            r.set_rows(w, b, w[:0], b[:0])
        self.ta_sum = {k[len("ta."):]: v.clone() for k, v in tensors.items() if k.startswith("ta.")}
        self._set_ta()
        self.tta_losses = {k: list(v) for k, v in meta.get("tta_losses", {}).items()}
        self.gates_after_tta = dict(meta.get("gates_after_tta", {}))


def restore_experts(wrappers: dict[str, LowRankMoE], tensors: dict[str, torch.Tensor],
                    ranks: dict[str, list[int]]) -> None:
    """Refill every wrapper's experts from ``A.<name>`` / ``B.<name>`` and the per-expert ranks."""
    for name, w in wrappers.items():
        if name not in ranks:
            raise MergeInputError(f"saved state has no experts for module {name!r}")
        A, B = tensors[f"A.{name}"], tensors[f"B.{name}"]
        start = 0
        for r in ranks[name]:
            w.add_expert(B[:, start:start + r], A[start:start + r])
            start += r
        if start != A.shape[0]:
            raise MergeInputError(f"saved experts of {name!r}: ranks {ranks[name]} do not add up to {A.shape[0]}")


__all__ = ["ContinualWEMoE", "Router", "make_units", "restore_experts"]
