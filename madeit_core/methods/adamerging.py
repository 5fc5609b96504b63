"""Continual layer-wise AdaMerging (baselines.md §5): one coefficient per parameter tensor,
tuned by test-time entropy minimisation (§0.4) on unlabeled test images.

Merged weights are θ(c) = base + Σ_i c_i ⊙ v_i, c_i ∈ R^L with L the number of merged tensors
(199 for CLIP ViT-B/32); the forward pass is a functional call of θ0's architecture with these
weights, so gradients reach c. Each optimiser step draws one batch per task from its images
(shuffled each pass with a seeded generator, last batch kept, §0.4), sums the entropy losses
under each task's head and takes one Adam step on c.

**5A, MINGLE's ``c_adamerging`` (default, ``variant="5A"``).** At step t: base = θ0, v = [τ_t],
c = 0.3 (``init_values``), clamped to [0, 1]; 50 Adam(1e-4) steps, batch 16, on 5 unlabeled test
images per class of the current task; θ^(t) = θ0 + clamp(c*) ⊙ τ_t. The previous merged model
is discarded [ref] (``accumulate="none"``). ``accumulate="append"``: v = [τ_1..τ_t], earlier
rows keep their learned values, a new row starts at 0.3, all rows train (the reference's unused
helper; keeps every task vector, O(T)); ``accumulate="on_merged"``: base = θ^(t−1), v = [τ_t].

**5B, the OPCM scripts' pairwise rounds (``variant="5B"``).** θ^(1) = θ_1 (nothing to merge yet:
the script's round 1 merges θ_1 with θ_2, i.e. τ'_1 = θ^(1) − θ0 = τ_1). Step t ≥ 2: base = θ0,
v = [θ^(t−1) − θ0, τ_t], c ∈ R^{2×L} = 0.3, not clamped; 1000 Adam(1e-3) steps, batch 16 per task
per step, on the whole test split (``per_class="all"``) of the previous step's task and the new
task. With ``max_steps=0``: θ^(2) = θ0 + 0.3(τ_1 + τ_2), θ^(3) = θ0 + 0.09(τ_1 + τ_2) + 0.3 τ_3.

``max_steps`` (default: the reference's 50 / 1000) can be lowered for the smoke profile; with 0 no
data is drawn. Data come only through ``ctx.unlabeled_samples`` (labels used for the
class-stratified choice only); ``data_used`` records, per step and task, the images drawn, the
per-class count asked for and how many distinct images the batches actually contained. Each
step is seeded from ``ctx.step_seed(step)``, so a resumed run repeats the same numbers.
Merged entries are the float parameters (float buffers stay θ0 unless ``include_buffers``; the
reference merges every parameter tensor, all 199 for CLIP).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from madeit_core.errors import MergeInputError
from madeit_core.methods import register
from madeit_core.methods._lowrank_moe import cycle_batches, entropy_loss, record_data, stateful_generator
from madeit_core.methods.base import MergeContext, StaticMergeMethod
from madeit_core.methods.task_arithmetic import merge_keys
from madeit_core.statedict import StateDict, compute_dtype

VARIANTS = {
    # clamp_weights, lr, max_steps, per_class  (baselines.md §5A (c), §5B hyper-parameters)
    "5A": (True, 1e-4, 50, 5),
    "5B": (False, 1e-3, 1000, "all"),
}
ACCUMULATE = ("none", "append", "on_merged")
ALL_PER_CLASS = 2**31 - 1   # "all": larger than any class, so every test image is returned


@register
class ContinualAdaMerging(StaticMergeMethod):
    """Layer-wise AdaMerging run continually (baselines.md §5A, §5B)."""

    name = "adamerging"
    needs_data = True

    def __init__(self, variant: str = "5A", accumulate: str = "none", init_values: float = 0.3,
                 clamp_weights: bool | None = None, lr: float | None = None, max_steps: int | None = None,
                 batch_size: int = 16, per_class: int | str | None = None, include_buffers: bool = False) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise MergeInputError(f"adamerging: variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        if accumulate not in ACCUMULATE:
            raise MergeInputError(f"adamerging: accumulate must be one of {ACCUMULATE}, got {accumulate!r}")
        if variant == "5B" and accumulate != "none":
            raise MergeInputError("adamerging: accumulate applies to variant 5A only (5B always merges the previous "
                                  "merged model with the new one)")
        clamp0, lr0, steps0, pc0 = VARIANTS[variant]
        self.variant, self.accumulate = variant, accumulate
        self.init_values = _number("init_values", init_values)
        self.clamp_weights = clamp0 if clamp_weights is None else bool(clamp_weights)
        self.lr = lr0 if lr is None else _number("lr", lr)
        self.max_steps = steps0 if max_steps is None else _count("max_steps", max_steps, 0)
        self.batch_size = _count("batch_size", batch_size, 1)
        pc = pc0 if per_class is None else per_class
        if pc != "all":
            pc = _count("per_class", pc, 1)
        self.per_class: int | str = pc
        if self.lr <= 0:
            raise MergeInputError(f"adamerging: lr must be > 0, got {lr!r}")
        self.include_buffers = bool(include_buffers)
        self.coefficients: dict[str, list[list[float]]] = {}
        self.tta_losses: dict[str, list[float]] = {}

    def hparams(self) -> dict[str, Any]:
        return {"variant": self.variant, "accumulate": self.accumulate, "init_values": self.init_values,
                "clamp_weights": self.clamp_weights, "lr": self.lr, "optimizer": "adam", "max_steps": self.max_steps,
                "batch_size": self.batch_size, "per_class": self.per_class, "include_buffers": self.include_buffers}

    # ------------------------------------------------------------------ set-up
    def setup(self, pretrained: nn.Module, ctx: MergeContext | None = None) -> None:
        super().setup(pretrained, ctx)
        self.keys = merge_keys(pretrained, self.theta0, self.include_buffers)
        self.model = copy.deepcopy(pretrained).to(self.ctx.device).eval()
        self.model.requires_grad_(False)
        self.merged = {}
        self.vectors: list[dict[str, torch.Tensor]] = []   # accumulate="append": every τ_i
        self.coef: torch.Tensor | None = None              # accumulate="append": the whole matrix
        self.coefficients, self.tta_losses = {}, {}

    def _tau(self, finetuned: StateDict) -> dict[str, torch.Tensor]:
        out = {}
        for k in self.keys:
            a = self.theta0[k]
            dt = compute_dtype(a)
            out[k] = finetuned[k].to(dt) - a.to(dt)
        return out

    def _theta0(self) -> dict[str, torch.Tensor]:
        return {k: self.theta0[k].to(compute_dtype(self.theta0[k])) for k in self.keys}

    # ------------------------------------------------------------------ update
    def _absorb(self, task: str, finetuned: StateDict) -> None:
        step = len(self.tasks)
        tau = self._tau(finetuned)
        theta0 = self._theta0()
        if self.variant == "5B":
            if step == 0:
                self.merged = {k: theta0[k] + tau[k] for k in self.keys}
                return
            prev = self.tasks[-1]
            base, vectors = theta0, [{k: self.merged[k] - theta0[k] for k in self.keys}, tau]
            init = torch.full((2, len(self.keys)), self.init_values)
            data_tasks = [prev, task]
        else:
            if self.accumulate == "append":
                base, vectors = theta0, self.vectors + [tau]
                new_row = torch.full((1, len(self.keys)), self.init_values)
                init = new_row if self.coef is None else torch.cat([self.coef, new_row])
            else:
                base = self.merged if (self.accumulate == "on_merged" and self.merged) else theta0
                vectors, init = [tau], torch.full((1, len(self.keys)), self.init_values)
            data_tasks = [task]
        coef = self._tta(step, task, data_tasks, base, vectors, init)
        self.coefficients[task] = coef.tolist()
        with torch.no_grad():
            merged = self._weights(base, vectors, self._effective(coef), device=None)
        self.merged = {k: v.detach() for k, v in merged.items()}
        if self.variant == "5A" and self.accumulate == "append":
            self.vectors, self.coef = vectors, coef

    def _effective(self, coef: torch.Tensor) -> torch.Tensor:
        return coef.clamp(0.0, 1.0) if self.clamp_weights else coef

    def _weights(self, base: dict[str, torch.Tensor], vectors: list[dict[str, torch.Tensor]], coef: torch.Tensor,
                 device: str | None) -> dict[str, torch.Tensor]:
        """base + Σ_i coef[i, j] v_i for the j-th merged key."""
        out = {}
        for j, k in enumerate(self.keys):
            w = base[k] if device is None else base[k].to(device)
            for i, v in enumerate(vectors):
                vk = v[k] if device is None else v[k].to(device)
                w = w + coef[i, j].to(device=w.device, dtype=w.dtype) * vk
            out[k] = w
        return out

    def _draw(self, step: int, task: str, seed: int) -> torch.Tensor:
        if self.ctx.unlabeled_samples is None:
            raise MergeInputError("adamerging needs unlabeled test images for its entropy minimisation: the context "
                                  "has no unlabeled_samples callback (or pass max_steps=0)")
        if task not in self.ctx.heads:
            raise MergeInputError(f"adamerging: no head for task {task!r} in the context")
        pc = ALL_PER_CLASS if self.per_class == "all" else int(self.per_class)
        x = self.ctx.unlabeled_samples(task, pc, seed)
        if not isinstance(x, torch.Tensor) or x.shape[0] == 0:
            raise MergeInputError(f"adamerging: the data callback returned no images for task {task!r}")
        return x.to(self.ctx.device)

    def _tta(self, step: int, task: str, data_tasks: list[str], base: dict[str, torch.Tensor],
             vectors: list[dict[str, torch.Tensor]], init: torch.Tensor) -> torch.Tensor:
        """Entropy minimisation of the coefficients; returns the learned (unclamped) matrix."""
        if self.max_steps == 0:
            return init.clone()
        seed = self.ctx.step_seed(step)
        gen = stateful_generator(seed)
        dev = self.ctx.device
        data = [(t, self._draw(step, t, seed), self.ctx.heads[t]) for t in data_tasks]
        base_d = {k: v.to(dev) for k, v in base.items()}
        vec_d = [{k: v.to(dev) for k, v in vec.items()} for vec in vectors]
        coef = nn.Parameter(init.clone().float().to(dev))
        opt = torch.optim.Adam([coef], lr=self.lr)
        iters = [cycle_batches(int(x.shape[0]), self.batch_size, gen) for _, x, _ in data]
        seen: list[set[int]] = [set() for _ in data]
        losses: list[float] = []
        bar = tqdm(range(self.max_steps), desc=f"adamerging {self.variant} {task}",
                   disable=not self.ctx.show_progress, leave=False)
        for _ in bar:
            weights = self._weights(base_d, vec_d, self._effective(coef), device=None)
            total = torch.zeros((), device=dev)
            for (_, x, head), it, used in zip(data, iters, seen):
                idx = next(it)
                used.update(idx.tolist())
                total = total + entropy_loss(head(functional_call(self.model, weights, (x[idx.to(x.device)],))))
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            losses.append(float(total.detach()))
        self.tta_losses[task] = losses
        for (t, x, _), used in zip(data, seen):
            record_data(self.data_used, step=step + 1, task=t, split="test", count=int(x.shape[0]), labelled=False,
                        purpose=f"AdaMerging {self.variant} coefficient TTA (entropy)", per_class=self.per_class,
                        distinct_images_used=len(used), labels_used_for="class-stratified selection only")
        self.data_used["total_images_drawn"] = sum(r["count"] for r in self.data_used.get("records", []))
        return coef.detach().cpu()

    # ------------------------------------------------------------------ state
    def summary(self) -> dict[str, Any]:
        return {"variant": self.variant, "accumulate": self.accumulate, "num_coefficients_per_row": len(self.keys),
                "tta_loss_first_last": {t: [v[0], v[-1]] for t, v in self.tta_losses.items() if v},
                "coefficient_mean_per_task": {t: [sum(r) / len(r) for r in rows]
                                              for t, rows in self.coefficients.items() if rows and rows[0]}}

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, _ = super()._state()
        if self.coef is not None:
            tensors["coef"] = self.coef
        for i, vec in enumerate(self.vectors):
            tensors.update({f"tau{i}.{k}": v for k, v in vec.items()})
        meta = {"coefficients": self.coefficients, "tta_losses": self.tta_losses, "summary": self.summary()}
        return tensors, meta

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super()._restore(tensors, meta)
        self.coef = tensors.get("coef")
        self.vectors = []
        if self.variant == "5A" and self.accumulate == "append":
            for i in range(len(self.tasks)):
                prefix = f"tau{i}."
                vec = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                if set(vec) != set(self.keys):
                    raise MergeInputError(f"adamerging: saved state lacks the task vector of step {i + 1}")
                self.vectors.append(vec)
        self.coefficients = {t: [list(r) for r in rows] for t, rows in meta.get("coefficients", {}).items()}
        self.tta_losses = {t: list(v) for t, v in meta.get("tta_losses", {}).items()}


def _number(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise MergeInputError(f"adamerging: {name} must be a number, got {value!r}") from exc
    if v != v or v in (float("inf"), float("-inf")):
        raise MergeInputError(f"adamerging: {name} must be finite, got {value!r}")
    return v


def _count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MergeInputError(f"adamerging: {name} must be an integer ≥ {minimum}, got {value!r}")
    return int(value)


__all__ = ["ContinualAdaMerging"]
