"""Does the zoo's encoder learn a rendered-text task when it gets more? Fine-tuning under variants.

The offline zoo's rendered sentiment tasks stay at chance after fine-tuning (the benchmark
chapter). :mod:`madeit_core.data.reading_ceiling` shows that the label *is* in the pixels (a perfect
word reader gets 63–66 % from the same rows). This module asks the other half: which change to the
data or the rendering would let EfficientNet-Lite0 learn to read it. Each :class:`Variant` changes
one thing against the profile's zoo recipe and repeats the zoo's procedure exactly (probe on θ0's
features of the leading rows, then fine-tuning with head and BatchNorm frozen,
:func:`madeit_core.zoo.finetune`):

- ``train_cap`` / ``steps``: more rows and more steps (the mirror holds 67k SST-2 rows);
- ``lr``: a larger learning rate (reading needs the early layers to change, not just the last);
- ``font_frac``: larger glyphs (fewer words shown);
- ``invert``: white text on black (ImageNet-normalised white backgrounds push many ReLU6 units
  into saturation; MNIST, which the encoder learns well, is white on black);
- ``train_head`` (a diagnostic, not the protocol): the probe head is trained with the encoder,
  which tells whether the frozen head is what stops it.

Scored on the task's whole test pool (``test_pool_cap`` rows, up to 1,000: a smaller noise band
than the zoo's 250 evaluated rows). Results go to a JSON file after every variant (atomically);
a rerun skips the variants already there with the same configuration.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from madeit_core.data.mirror import Mirror
from madeit_core.data.render import FONT_FRAC, render_cached, visible_text
from madeit_core.data.suites import TEXT_BASES, select_rows
from madeit_core.errors import MergeInputError
from madeit_core.io import read_json, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One change to the zoo's recipe for a rendered-text task (None: the profile's value)."""

    name: str
    train_cap: int | None = None
    steps: int | None = None
    lr: float | None = None
    font_frac: float = FONT_FRAC
    invert: bool = False
    train_head: bool = False    # diagnostic only (not the zoo's protocol): the probe head trains too


#: the variants the book reports (``madeit data learnability`` runs these by default)
DEFAULT_VARIANTS: tuple[Variant, ...] = (
    Variant("zoo recipe"),
    Variant("5x rows, 4x steps", train_cap=8000, steps=1200),
    Variant("lr 1e-3", lr=1e-3),
    Variant("16 px font", font_frac=0.25),
    Variant("white on black", invert=True),
    Variant("head trained too (diagnostic)", train_head=True),
)


def variant_key(task: str, profile: str, v: Variant, theta0_hash: str) -> str:
    blob = json.dumps({"task": task, "profile": profile, "variant": asdict(v), "theta0": theta0_hash}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _rows(mirror: Mirror, base: str, split: str, cap: int, size: int, font_frac: float, cache_dir: Path | None,
          invert: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    texts, y = mirror.texts(base, split)
    idx = select_rows(len(y), cap)
    chosen = [texts[i] for i in idx]
    x = render_cached(chosen, size, cache_dir, name=f"{base}-{split}", font_frac=font_frac)
    if invert:
        x = 255 - x
    return x, y[idx].astype(np.int64), chosen


def run_variant(task: str, v: Variant, profile: str = "offline", mirror: str | os.PathLike[str] | None = None,
                device: str = "cpu", show_progress: bool = True, zoo: Any = None) -> dict[str, Any]:
    """The zoo's probe and fine-tuning for ``task`` under variant ``v``; accuracies on the test pool.
    ``zoo``: a :class:`madeit_core.zoo.Zoo` of ``profile`` to reuse (θ0 is loaded once per run)."""
    from madeit_core.zoo import Zoo, cache_root, evaluate_rows, features, finetune, fit_probe, probe_rows

    if task not in TEXT_BASES:
        raise MergeInputError(f"text learnability: {task!r} is not a rendered-text task ({sorted(TEXT_BASES)})")
    t_start = time.perf_counter()
    zoo = zoo if zoo is not None else Zoo(profile, device=device, show_progress=False, data=mirror)
    p = zoo.profile
    m = Mirror(mirror)
    cap = v.train_cap or p.train_cap
    cache = cache_root()
    x_tr, y_tr, _ = _rows(m, TEXT_BASES[task], "train", cap, p.render_size, v.font_frac, cache, v.invert)
    x_te, y_te, te_texts = _rows(m, TEXT_BASES[task], "test", p.test_pool_cap, p.render_size, v.font_frac, cache,
                                 v.invert)
    seed = zoo.task_seed(task)
    model = copy.deepcopy(zoo.theta0).to(device)
    n_probe = probe_rows(min(p.train_cap, len(y_tr)), p.probe_fraction)     # the zoo's probe rows, whatever the cap
    z = features(model, x_tr[:n_probe], zoo.preprocess, device, p.eval_batch)
    head, probe_report = fit_probe(z, torch.from_numpy(y_tr[:n_probe]), len(m.meta(TEXT_BASES[task]).classes),
                                   p.probe_l2, p.probe_holdout, seed)
    head = head.to(device)
    probe = evaluate_rows(model, head, x_te, y_te, zoo.preprocess, device, p.eval_batch)
    recipe = {**p.recipe(), "steps": v.steps or p.steps, "lr": v.lr or p.lr}
    train_model, train_head = model, head
    if v.train_head:
        linear = torch.nn.Linear(head.weight.shape[1], head.weight.shape[0]).to(device)
        with torch.no_grad():
            linear.weight.copy_(head.weight)
            linear.bias.copy_(head.bias)
        train_model, train_head = torch.nn.Sequential(model, linear), torch.nn.Identity()
    ft = finetune(train_model, train_head, x_tr[n_probe:], y_tr[n_probe:], recipe, seed, zoo.preprocess, device,
                  desc=f"{task}: {v.name}", show_progress=show_progress)
    tuned = evaluate_rows(train_model, train_head, x_te, y_te, zoo.preprocess, device, p.eval_batch)
    n = len(y_te)
    return {
        "task": task, "variant": asdict(v), "profile": p.name,
        "key": variant_key(task, p.name, v, zoo.theta0_hash),
        "rows": {"probe": int(n_probe), "finetune": int(len(y_tr) - n_probe), "test": int(n)},
        "steps": int(recipe["steps"]), "lr": recipe["lr"],
        "chars_shown_mean": float(np.mean([len(visible_text(t, p.render_size, v.font_frac)) for t in te_texts])),
        "chance": float(np.bincount(y_te).max() / n),
        "probe": probe["accuracy"], "finetuned": tuned["accuracy"],
        "gain": tuned["accuracy"] - probe["accuracy"],
        # 95 % band of a difference of two accuracies near 0.5 on n rows (independent-error bound)
        "noise95": float(1.96 * np.sqrt(2 * 0.25 / n)),
        "train_accuracy_last_fifth": ft["train_accuracy_last_fifth"],
        "probe_l2": probe_report.get("l2"),
        "seconds": time.perf_counter() - t_start,
    }


def run_learnability(tasks: list[str], variants: tuple[Variant, ...] = DEFAULT_VARIANTS, profile: str = "offline",
                     out: str | os.PathLike[str] | None = None, mirror: str | os.PathLike[str] | None = None,
                     device: str = "cpu", show_progress: bool = True) -> dict[str, Any]:
    """Every (task, variant); written to ``out`` after each one, resuming what is already there."""
    path = Path(out) if out is not None else None
    doc: dict[str, Any] = {"format": "madeit-text-learnability/1", "profile": profile, "rows": []}
    if path is not None and path.is_file():
        old = read_json(path)
        if old.get("format") == doc["format"] and old.get("profile") == profile:
            doc = old
    done = {r["key"] for r in doc["rows"]}
    from madeit_core.zoo import Zoo

    zoo = Zoo(profile, device=device, show_progress=False, data=mirror)
    for task in tasks:
        for v in variants:
            if variant_key(task, profile, v, zoo.theta0_hash) in done:
                log.info("text learnability: %s / %s already measured", task, v.name)
                continue
            log.info("text learnability: %s / %s", task, v.name)
            row = run_variant(task, v, profile, mirror, device, show_progress, zoo)
            doc["rows"].append(row)
            if path is not None:
                write_json(path, doc)
    return doc


__all__ = ["DEFAULT_VARIANTS", "Variant", "run_learnability", "run_variant", "variant_key"]
