"""The paper's CLIP setting as a :class:`~madeit_core.benchmark.Benchmark` (profile ``clip``).

A :class:`CLIPBenchmark` is assembled from four parts:

- a :class:`~madeit_core.backbones.clip_loaders.CLIPLoader`, the only thing that touches the hub:
  it gives the backbone adapter, the pre-trained vision encoder θ0, the text tower and the logit
  scale (:class:`~madeit_core.backbones.clip_loaders.CLIPParts`), and loads each task's fine-tuned
  checkpoint from its reference (hub id or local path);
- the task list and, per task, a frozen zero-shot head
  (:func:`~madeit_core.backbones.zero_shot.zero_shot_head`: class names × templates through the
  pre-trained text tower, normalised, averaged, normalised; logits = exp(logit_scale) · ẑ Wᵀ),
  all built once when the benchmark is made, after which the text tower is released;
- the task → checkpoint mapping, checked with
  :func:`~madeit_core.backbones.clip_tasks.check_checkpoint_mapping` before anything is merged
  (duplicates, a checkpoint named for another task or architecture); at load time a checkpoint
  equal to θ0 or to another task's is refused as well;
- an :class:`~madeit_core.clip_data.ImageTaskData` (Hugging Face datasets, the offline mirror, or
  tensors), preprocessed by the adapter batch by batch.

Constructors: :meth:`CLIPBenchmark.from_loader` (any loader and data), :meth:`CLIPBenchmark.from_hub`
(the paper's setting: HF CLIP ``openai/clip-vit-*``, the FusionBench checkpoints
``tanganke/<model>_<task>``, the HF datasets; needs the internet or a filled cache and in practice a
GPU), :meth:`CLIPBenchmark.from_open_clip` (open_clip towers and local task-vector checkpoints) and
:meth:`CLIPBenchmark.tiny` (offline: a tiny random CLIP with the real key names, random task
vectors, synthetic images and the tasks' real class names and templates; nothing it yields is a
result about real data).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from madeit_core.backbones.base import BackboneAdapter
from madeit_core.backbones.clip_loaders import CLIPLoader, HFCLIPLoader, OpenCLIPLoader
from madeit_core.backbones.clip_tasks import CLIP_TASKS, CLIPTask, check_checkpoint_mapping, default_checkpoints
from madeit_core.backbones.zero_shot import zero_shot_head
from madeit_core.benchmark import seed_subset
from madeit_core.clip_data import HFImageData, ImageTaskData, synthetic_image_data
from madeit_core.errors import MergeInputError
from madeit_core.methods.base import Head
from madeit_core.modules import ModuleSpec

log = logging.getLogger(__name__)

CheckpointSource = Callable[[str], Mapping[str, torch.Tensor]]

#: profile → pre-trained model of the real CLIP setting
CLIP_PROFILES: dict[str, str] = {
    "clip": "openai/clip-vit-base-patch32",
    "clip-b32": "openai/clip-vit-base-patch32",
    "clip-b16": "openai/clip-vit-base-patch16",
    "clip-l14": "openai/clip-vit-large-patch14",
}


def fingerprint(sd: Mapping[str, torch.Tensor]) -> str:
    """A hash of every floating-point tensor (names, shapes, bytes): equal weights, equal hash."""
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(sd):
        v = sd[k]
        if not v.is_floating_point():
            continue
        t = v.detach().to("cpu", torch.float32).contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def resolve_tasks(tasks: Sequence[str], task_info: Mapping[str, CLIPTask] | None = None) -> dict[str, CLIPTask]:
    """Task name → :class:`CLIPTask` (``task_info`` first, then the 20 known tasks)."""
    info = dict(task_info or {})
    out = {}
    for t in tasks:
        if t in info:
            out[t] = info[t]
        elif t in CLIP_TASKS:
            out[t] = CLIP_TASKS[t]
        else:
            raise MergeInputError(f"unknown CLIP task {t!r}; known: {', '.join(CLIP_TASKS)} (or pass task_info)")
    return out


# ----------------------------------------------------------------------------- benchmark
class CLIPBenchmark:
    """The CLIP setting (see the module docstring); implements :class:`~madeit_core.benchmark.Benchmark`.

    ``heads``: a mapping task → head, or a callable building a task's head on first use.
    ``checkpoints``: a :data:`CheckpointSource`; ``checkpoint_names`` (task → id or path) is what
    ``describe`` records. ``info``: extra JSON-able entries for ``describe``.
    """

    def __init__(self, adapter: BackboneAdapter, tasks: Sequence[str], pretrained: nn.Module,
                 heads: Mapping[str, Head] | Callable[[str], Head], checkpoints: CheckpointSource,
                 data: ImageTaskData, checkpoint_names: Mapping[str, str] | None = None, device: str = "cpu",
                 batch_size: int = 128, info: Mapping[str, Any] | None = None) -> None:
        if len(set(tasks)) != len(tasks):
            raise MergeInputError(f"duplicate tasks in {list(tasks)}")
        self.adapter = adapter
        self.tasks = list(tasks)
        self._theta0 = pretrained.eval()
        self._head_source = heads
        self._heads: dict[str, Head] = {}
        self._checkpoints = checkpoints
        self.checkpoint_names = dict(checkpoint_names or {})
        self.data = data
        self.device = device
        self.batch_size = int(batch_size)
        self.info = dict(info or {})
        self._modules: list[ModuleSpec] | None = None
        self._theta0_print = fingerprint(self._theta0.state_dict())
        self._prints: dict[str, str] = {}

    # ------------------------------------------------------------------ Benchmark
    def pretrained(self) -> nn.Module:
        return copy.deepcopy(self._theta0).to(self.device).eval()

    def modules(self) -> list[ModuleSpec]:
        if self._modules is None:
            self._modules = self.adapter.modules(self._theta0)
        return list(self._modules)

    def head(self, task: str) -> Head:
        self._check_task(task)
        if task not in self._heads:
            src = self._head_source
            head = src[task] if isinstance(src, Mapping) else src(task)
            self._heads[task] = head.to(self.device) if isinstance(head, nn.Module) else head
        return self._heads[task]

    def finetuned(self, task: str) -> dict[str, torch.Tensor]:
        """The task's fine-tuned encoder weights, keys normalised onto θ0's, dtypes cast to θ0's.

        Refuses a checkpoint equal to θ0 or to another task's (a wrong or duplicated mapping)."""
        self._check_task(task)
        sd = self.adapter.normalise_keys(self._checkpoints(task), self._theta0)
        ref = self._theta0.state_dict()
        cast = [k for k, v in sd.items() if v.is_floating_point() and v.dtype != ref[k].dtype]
        if cast:
            log.info("%s: casting %d tensors (e.g. %s, %s) to the pre-trained dtype %s", task, len(cast), cast[0],
                     sd[cast[0]].dtype, ref[cast[0]].dtype)
            sd = {k: (v.to(ref[k].dtype) if k in cast else v) for k, v in sd.items()}
        fp = fingerprint(sd)
        if fp == self._theta0_print:
            raise MergeInputError(f"the checkpoint of task {task!r} ({self.checkpoint_names.get(task, '?')}) equals "
                                  "the pre-trained model: wrong mapping?")
        for other, ofp in self._prints.items():
            if ofp == fp and other != task:
                raise MergeInputError(f"tasks {other!r} and {task!r} have identical fine-tuned weights "
                                      f"({self.checkpoint_names.get(task, '?')}): duplicated mapping?")
        self._prints[task] = fp
        return sd

    @torch.no_grad()
    def evaluate(self, model: nn.Module, task: str) -> dict[str, Any]:
        """Micro accuracy and mean cross-entropy on the task's test split (batches of ``batch_size``,
        in index order; baselines.md §9.4)."""
        self._check_task(task)
        head = self.head(task)
        labels = self.data.labels(task, "test")
        model.eval()
        correct, loss, n = 0, 0.0, len(labels)
        for i in range(0, n, self.batch_size):
            idx = list(range(i, min(i + self.batch_size, n)))
            x = self.adapter.preprocess(self.data.images(task, "test", idx)).to(self.device)
            y = torch.as_tensor(labels[i:i + len(idx)], device=self.device)
            logits = head(model(x))
            correct += int((logits.argmax(-1) == y).sum())
            loss += float(nn.functional.cross_entropy(logits.float(), y, reduction="sum"))
        return {"accuracy": correct / max(n, 1), "loss": loss / max(n, 1), "n": n}

    def unlabeled_samples(self, task: str, per_class: int, seed: int) -> torch.Tensor:
        """Preprocessed test images, ``per_class`` per class (:func:`~madeit_core.benchmark.seed_subset`)."""
        self._check_task(task)
        idx = seed_subset(self.data.labels(task, "test"), per_class, seed)
        return self.adapter.preprocess(self.data.images(task, "test", idx))

    def labeled_samples(self, task: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` preprocessed train images and labels, drawn without replacement with ``seed``."""
        self._check_task(task)
        labels = self.data.labels(task, "train")
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(labels), generator=g)[:n].tolist()
        x = self.adapter.preprocess(self.data.images(task, "train", idx))
        return x, torch.tensor([labels[i] for i in idx])

    def describe(self) -> dict[str, Any]:
        return {"benchmark": "clip", "backbone": self.adapter.name, "tasks": list(self.tasks),
                "checkpoints": {t: self.checkpoint_names.get(t) for t in self.tasks},
                "pretrained_fingerprint": self._theta0_print, **self.info}

    def _check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise MergeInputError(f"benchmark has no task {task!r}; it has {self.tasks}")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_loader(cls, tasks: Sequence[str], loader: CLIPLoader, checkpoints: Mapping[str, str],
                    data: ImageTaskData, device: str = "cpu", batch_size: int = 128,
                    task_info: Mapping[str, CLIPTask] | None = None, check_mapping: bool = True,
                    strict_mapping: bool = True, info: Mapping[str, Any] | None = None) -> CLIPBenchmark:
        """The CLIP setting from any loader: θ0 and the text tower from ``loader.load_pretrained``,
        every task's zero-shot head (class names and templates from ``task_info`` or
        :data:`~madeit_core.backbones.clip_tasks.CLIP_TASKS`), fine-tuned weights from
        ``loader.load_checkpoint(checkpoints[task])`` on demand.

        With ``check_mapping`` the mapping is checked first
        (:func:`~madeit_core.backbones.clip_tasks.check_checkpoint_mapping` against
        ``loader.model_name``; ``strict_mapping``: a checkpoint whose name and metadata name no task
        is refused rather than logged)."""
        infos = resolve_tasks(tasks, task_info)
        missing = [t for t in tasks if t not in checkpoints]
        if missing:
            raise MergeInputError(f"no checkpoint given for task(s) {missing}")
        mapping = {t: str(checkpoints[t]) for t in tasks}
        verified: dict[str, str] = {}
        if check_mapping:
            verified = check_checkpoint_mapping(mapping, loader.model_name,
                                                known_tasks=sorted(set(CLIP_TASKS) | set(tasks)),
                                                strict=strict_mapping)
        parts = loader.load_pretrained(device=device)
        heads = {t: zero_shot_head(parts.encode_text, infos[t], parts.logit_scale) for t in tasks}
        desc = {"model": loader.model_name, "heads": "zero-shot (pre-trained text tower)",
                "logit_scale": parts.logit_scale, "mapping_check": verified or "off",
                "classes": {t: infos[t].num_classes for t in tasks}, **dict(info or {})}
        return cls(parts.adapter, tasks, parts.encoder, heads=heads,
                   checkpoints=lambda t: loader.load_checkpoint(mapping[t]), data=data,
                   checkpoint_names=mapping, device=device, batch_size=batch_size, info=desc)

    @classmethod
    def from_hub(cls, tasks: Sequence[str], model_name: str = "openai/clip-vit-base-patch32",
                 checkpoints: Mapping[str, str] | None = None, data: ImageTaskData | None = None,
                 device: str = "cpu", batch_size: int = 128, cache_dir: str | None = None,
                 local_files_only: bool = False, check_mapping: bool = True) -> CLIPBenchmark:
        """The paper's setting: ``model_name`` (hub id or local folder) through
        :class:`~madeit_core.backbones.clip_loaders.HFCLIPLoader`, the FusionBench checkpoints
        ``tanganke/<model>_<task>`` (or ``checkpoints``: task → hub id / local path), the Hugging
        Face datasets (or ``data``)."""
        mapping = dict(checkpoints) if checkpoints is not None else default_checkpoints(tasks, model_name)
        loader = HFCLIPLoader(model_name, cache_dir=cache_dir, local_files_only=local_files_only)
        return cls.from_loader(tasks, loader, mapping, data if data is not None else HFImageData(cache_dir=cache_dir),
                               device=device, batch_size=batch_size, check_mapping=check_mapping)

    @classmethod
    def from_open_clip(cls, tasks: Sequence[str], checkpoints: Mapping[str, str], model_name: str = "ViT-B-32",
                       pretrained: str | None = "openai", data: ImageTaskData | None = None, device: str = "cpu",
                       batch_size: int = 128, cache_dir: str | None = None, check_mapping: bool = True,
                       strict_mapping: bool = True) -> CLIPBenchmark:
        """open_clip towers (:class:`~madeit_core.backbones.clip_loaders.OpenCLIPLoader`) with local
        fine-tuned state-dict files (``checkpoints``: task → path), e.g. the task-vector
        checkpoints saved as state dicts; data from the Hugging Face datasets unless ``data``."""
        loader = OpenCLIPLoader(model_name, pretrained, cache_dir=cache_dir)
        data = data if data is not None else HFImageData(cache_dir=cache_dir)
        return cls.from_loader(tasks, loader, checkpoints, data, device=device, batch_size=batch_size,
                               check_mapping=check_mapping, strict_mapping=strict_mapping)

    @classmethod
    def tiny(cls, tasks: Sequence[str] = ("sun397", "stanford-cars", "resisc45"), classes: int = 3,
             n_test: int = 24, n_train: int = 24, delta_scale: float = 0.05, seed: int = 0,
             device: str = "cpu", batch_size: int = 128) -> CLIPBenchmark:
        """Offline: :class:`~madeit_core.backbones.tiny_clip.TinyHFCLIPLoader` (tiny random CLIP,
        random task vectors of relative size ``delta_scale``), per task the first ``classes`` real
        class names with all real templates (synthetic names for unknown tasks) and
        :func:`~madeit_core.clip_data.synthetic_image_data`."""
        from madeit_core.backbones.tiny_clip import TinyHFCLIPLoader

        info: dict[str, CLIPTask] = {}
        for t in tasks:
            if t in CLIP_TASKS:
                real = CLIP_TASKS[t]
                if real.num_classes < classes:
                    raise MergeInputError(f"task {t!r} has only {real.num_classes} classes")
                info[t] = CLIPTask(t, real.classnames[:classes], real.templates, real.dataset,
                                   real.dataset_config, real.eval_split)
            else:
                info[t] = CLIPTask(t, tuple(f"{t} thing {c}" for c in range(classes)),
                                   ("a photo of a {}.", "a drawing of a {}."), "synthetic", None, "test")
        return cls.from_loader(tasks, TinyHFCLIPLoader(seed, delta_scale), {t: f"tiny-random/{t}" for t in tasks},
                               synthetic_image_data(tasks, classes, n_test, n_train, seed=seed), device=device,
                               batch_size=batch_size, task_info=info,
                               info={"seed": seed, "n_test": n_test, "delta_scale": delta_scale,
                                     "note": "tiny randomly initialised CLIP, synthetic images and random task "
                                             "vectors; not a result about real data"})


def make_clip_benchmark(group: str, profile: str = "clip", device: str = "cpu") -> tuple[CLIPBenchmark, list[str]]:
    """Factory behind ``make_benchmark("clip", group, profile)``.

    - ``clip-tiny-N`` (1 ≤ N ≤ 20), any profile: :meth:`CLIPBenchmark.tiny` on the first N tasks of
      TALL20 (config order), offline.
    - ``clip-8`` / ``clip-14`` / ``clip-20`` with profile ``smoke``: the same tiny offline benchmark
      on the group's tasks (CI and notebook smoke runs); with profile ``clip`` (= ``clip-b32``),
      ``clip-b16`` or ``clip-l14``: the real setting, :meth:`CLIPBenchmark.from_hub` with ViT-B/32,
      B/16 or L/14 (``HF_HOME``/``HF_HUB_OFFLINE`` as usual for Hugging Face).
    """
    from madeit_core.protocol import CLIP_TALL20, TASK_GROUPS, register_group

    m = re.fullmatch(r"clip-tiny-(\d+)", group)
    if m:
        n = int(m.group(1))
        if not 1 <= n <= len(CLIP_TALL20):
            raise MergeInputError(f"clip-tiny-N needs 1 ≤ N ≤ {len(CLIP_TALL20)}, got {group!r}")
        tasks = CLIP_TALL20[:n]
        register_group(group, tasks)
        return CLIPBenchmark.tiny(tasks, device=device), list(tasks)
    if group not in ("clip-8", "clip-14", "clip-20"):
        raise MergeInputError(f"clip benchmark groups are clip-8, clip-14, clip-20 and clip-tiny-N, got {group!r}")
    tasks = list(TASK_GROUPS[group])
    if profile == "smoke":
        return CLIPBenchmark.tiny(tasks, device=device), tasks
    if profile not in CLIP_PROFILES:
        raise MergeInputError(f"clip benchmark profiles are smoke (tiny, offline) and {', '.join(CLIP_PROFILES)}; "
                              f"got {profile!r}")
    return CLIPBenchmark.from_hub(tasks, CLIP_PROFILES[profile], device=device), tasks  # pragma: no cover
