"""Continual fine-tuning: the "C. Fine-Tuned" row of Table 1 (a reference row, not a merging method).

One model is fine-tuned on the tasks one after another in the run's arrival order: for task t,
the current weights (θ0 for the first task) are trained on ``ctx.labeled_samples(t, n, seed)``
(the *train* split) with task t's frozen head, using the zoo's recipe
(:func:`madeit_core.zoo.finetune`: AdamW, warm-up + cosine, BatchNorm frozen). The fine-tuned
checkpoints the protocol hands to ``absorb`` are ignored: only their task name is used. Earlier
tasks are forgotten as far as later training overwrites them, which is what the row measures.

**Recipe.** By default (``recipe="benchmark"``) the recipe is the benchmark's own
(``finetune_recipe()`` of :class:`madeit_core.zoo.ZooBenchmark`, reached through the
``labeled_samples`` callback it provides), so the row matches the zoo's individual fine-tuning
exactly; explicit hyper-parameters override single values. Without such a benchmark the smoke
profile's recipe is used.

**Cache.** Each step's result is cached on disk, content-addressed: the key hashes the weights
before the step, the task, the recipe, the step seed, the training rows and the head. The chain
of keys therefore identifies the order prefix, so re-running an order (or another method's grid
that repeats it) trains nothing twice. Files: ``<cache_dir>/<key>.safetensors`` (atomic), by
default ``$MADEIT_CACHE/continual`` (``~/.cache/madeit/continual``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from madeit_core.errors import MergeInputError
from madeit_core.io import load_tensors, save_tensors
from madeit_core.methods import register
from madeit_core.methods.base import StaticMergeMethod
from madeit_core.statedict import StateDict

log = logging.getLogger(__name__)

_RECIPE_KEYS = ("steps", "batch_size", "lr", "weight_decay", "warmup_steps", "n_train")


@register
class ContinualFinetuning(StaticMergeMethod):
    name = "continual_finetuning"
    needs_data = True

    def __init__(self, recipe: str = "benchmark", steps: int | None = None, batch_size: int | None = None,
                 lr: float | None = None, weight_decay: float | None = None, warmup_steps: int | None = None,
                 n_train: int | None = None, cache: bool = True, cache_dir: str | None = None) -> None:
        super().__init__()
        if recipe not in ("benchmark", "explicit"):
            raise MergeInputError(f"recipe must be 'benchmark' or 'explicit', got {recipe!r}")
        self.recipe_source = recipe
        self.overrides = {k: v for k, v in {"steps": steps, "batch_size": batch_size, "lr": lr,
                                            "weight_decay": weight_decay, "warmup_steps": warmup_steps,
                                            "n_train": n_train}.items() if v is not None}
        self.use_cache = cache
        self.cache_dir_arg = cache_dir
        self.recipe: dict[str, Any] = {}
        self.cache_dir: Path | None = None
        self.cache_hits = 0

    def setup(self, pretrained: torch.nn.Module, ctx: Any = None) -> None:
        super().setup(pretrained, ctx)
        from madeit_core.profiles import get_profile
        from madeit_core.zoo import cache_root

        recipe: dict[str, Any] = dict(get_profile("smoke").recipe())
        cache_dir = cache_root() / "continual"
        source = "smoke profile defaults"
        owner = getattr(self.ctx.labeled_samples, "__self__", None)
        if self.recipe_source == "benchmark" and callable(getattr(owner, "finetune_recipe", None)):
            bench_recipe = dict(owner.finetune_recipe())  # type: ignore[union-attr]
            if bench_recipe.get("cache_dir"):
                cache_dir = Path(bench_recipe.pop("cache_dir"))
            recipe.update({k: bench_recipe[k] for k in _RECIPE_KEYS if k in bench_recipe})
            source = "benchmark"
        recipe.update(self.overrides)
        self.recipe = recipe
        self.recipe_from = source + (" + overrides" if self.overrides else "")
        self.cache_dir = Path(self.cache_dir_arg) if self.cache_dir_arg else cache_dir
        self.cache_hits = 0

    def hparams(self) -> dict[str, Any]:
        return {**self.recipe, "recipe_from": getattr(self, "recipe_from", None)}

    def _absorb(self, task: str, finetuned: StateDict) -> None:
        from madeit_core.zoo import array_hash, finetune, state_hash

        if self.ctx.labeled_samples is None:
            raise MergeInputError("continual_finetuning needs ctx.labeled_samples (training data)")
        head = self.ctx.heads.get(task)
        if head is None:
            raise MergeInputError(f"continual_finetuning needs the head of task {task!r} in ctx.heads")
        step = len(self.tasks)
        seed = self.ctx.step_seed(step)
        current = self.merged if self.merged else self.theta0
        x, y = self.ctx.labeled_samples(task, int(self.recipe["n_train"]), seed)
        head_sd = head.state_dict() if isinstance(head, torch.nn.Module) else {}
        blob = json.dumps({"weights": state_hash(current), "task": task, "recipe": self.recipe, "seed": seed,
                           "data": array_hash(x, y), "head": state_hash(head_sd) if head_sd else repr(head)},
                          sort_keys=True)
        key = hashlib.sha256(blob.encode()).hexdigest()[:20]
        path = self.cache_dir / f"{key}.safetensors" if self.cache_dir is not None else None
        self.data_used[task] = {"split": "train", "labeled": True, "n": int(len(y)), "seed": seed}
        if self.use_cache and path is not None and path.is_file():
            try:
                self.merged = load_tensors(path)
                self.cache_hits += 1
                log.info("continual_finetuning: step %d (%s) from cache %s", step + 1, task, path)
                return
            except Exception as exc:  # damaged cache file: retrain
                log.warning("continual_finetuning: ignoring damaged cache %s (%s)", path, exc)
        model = self.model_with(current)
        report = finetune(model, head, x, y, self.recipe, seed, preprocess=None, device=self.ctx.device,
                          desc=f"C. fine-tuning {task}", show_progress=self.ctx.show_progress)
        self.data_used[task]["train_accuracy_last_fifth"] = report["train_accuracy_last_fifth"]
        self.merged = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if self.use_cache and path is not None:
            save_tensors(path, self.merged)

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = super()._state()
        return tensors, {**meta, "summary": {"cache_hits": self.cache_hits, "recipe": self.recipe}}
