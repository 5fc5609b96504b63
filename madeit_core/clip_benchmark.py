"""The paper's CLIP setting as a :class:`~madeit_core.benchmark.Benchmark` (profile ``clip``).

A :class:`CLIPBenchmark` is assembled from four parts:

- a backbone adapter (:class:`~madeit_core.backbones.hf_clip.HFCLIPVisionAdapter` or
  :class:`~madeit_core.backbones.open_clip_adapter.OpenCLIPVisionAdapter`) and the pre-trained
  encoder θ0 it built;
- the task list, and per task a frozen zero-shot head (:func:`zero_shot_head`, baselines.md §0.3:
  every class name in every template through the pre-trained text tower, each embedding
  L2-normalised, averaged over the templates, normalised again; logits =
  exp(logit_scale) · ẑ Wᵀ with ẑ the normalised image features);
- a checkpoint source: task → fine-tuned state dict. :func:`checkpoint_source` resolves a hub id
  (downloaded with ``huggingface_hub``) or a local file/folder per task; the adapter's
  ``normalise_keys`` maps the keys onto the encoder's, and two tasks whose weights are identical
  (or equal to θ0) are refused;
- an image data provider (:class:`ImageTaskData`): labels and uint8 images of a task's ``test``
  and ``train`` splits, preprocessed by the adapter batch by batch (CLIP's test sets do not fit in
  memory as float tensors). :class:`HFImageData` reads the Hugging Face datasets of
  :mod:`madeit_core.backbones.clip_tasks`; :class:`InMemoryImageData` holds tensors.

Constructors: :meth:`CLIPBenchmark.from_hub` is the real setting (needs the internet or a filled
Hugging Face cache, ``datasets`` and ``huggingface_hub``, and in practice a GPU; not run by the
tests). :meth:`CLIPBenchmark.tiny` builds everything offline in a second from a tiny random
``CLIPModel`` with the real key names: θ0, "fine-tuned" variants θ0 + small random deltas,
synthetic images, and zero-shot heads from the tiny random text tower with the tasks' real class
names and templates. Nothing the tiny benchmark yields is a result about real data.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from madeit_core.backbones.base import BackboneAdapter
from madeit_core.backbones.clip_tasks import (
    CLIP_TASKS,
    CLIPTask,
    check_checkpoint_mapping,
    default_checkpoints,
    get_task,
)
from madeit_core.benchmark import seed_subset
from madeit_core.errors import MergeInputError
from madeit_core.io import load_checkpoint
from madeit_core.methods.base import Head
from madeit_core.modules import ModuleSpec

log = logging.getLogger(__name__)

CheckpointSource = Callable[[str], Mapping[str, torch.Tensor]]
TextEncoder = Callable[[list[str]], torch.Tensor]

#: profile → pre-trained model of the real CLIP setting
CLIP_PROFILES: dict[str, str] = {
    "clip": "openai/clip-vit-base-patch32",
    "clip-b32": "openai/clip-vit-base-patch32",
    "clip-b16": "openai/clip-vit-base-patch16",
    "clip-l14": "openai/clip-vit-large-patch14",
}


# ----------------------------------------------------------------------------- zero-shot heads
class ZeroShotHead(nn.Module):
    """Frozen CLIP zero-shot classifier: logits = scale · (z / ‖z‖) Wᵀ, W = unit class embeddings."""

    def __init__(self, weight: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("scale", torch.tensor(float(scale)))

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z.float()
        return self.scale * (z / z.norm(dim=-1, keepdim=True)) @ self.weight.T


@torch.no_grad()
def zero_shot_weights(encode_text: TextEncoder, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """``[C, P]``: per class, the text embeddings of all its prompts, each L2-normalised, averaged
    over the templates and L2-normalised again (baselines.md §0.3)."""
    if not classnames or not templates:
        raise MergeInputError("a zero-shot head needs at least one class name and one template")
    texts = [t.format(c) for c in classnames for t in templates]
    emb = encode_text(texts).float()
    if emb.ndim != 2 or emb.shape[0] != len(texts):
        raise MergeInputError(f"text encoder returned {tuple(emb.shape)} for {len(texts)} prompts")
    emb = emb.view(len(classnames), len(templates), -1)
    emb = emb / emb.norm(dim=-1, keepdim=True)
    w = emb.mean(dim=1)
    return w / w.norm(dim=-1, keepdim=True)


def zero_shot_head(encode_text: TextEncoder, task: CLIPTask, logit_scale: float) -> ZeroShotHead:
    """The zero-shot head of ``task`` (``logit_scale`` = exp of the model's logit_scale, 100 for OpenAI)."""
    return ZeroShotHead(zero_shot_weights(encode_text, task.classnames, task.templates), logit_scale)


# ----------------------------------------------------------------------------- data
@runtime_checkable
class ImageTaskData(Protocol):
    """Labelled uint8 images per (task, split); split is ``"test"`` (evaluation) or ``"train"``."""

    def labels(self, task: str, split: str) -> list[int]: ...

    def images(self, task: str, split: str, indices: Sequence[int]) -> torch.Tensor | list[torch.Tensor]: ...


class InMemoryImageData:
    """``{(task, split): (uint8 images [N, H, W, C], labels [N])}``."""

    def __init__(self, data: Mapping[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.data = dict(data)

    def _get(self, task: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if (task, split) not in self.data:
            raise MergeInputError(f"no {split!r} data for task {task!r}")
        return self.data[(task, split)]

    def labels(self, task: str, split: str) -> list[int]:
        return [int(y) for y in self._get(task, split)[1].tolist()]

    def images(self, task: str, split: str, indices: Sequence[int]) -> torch.Tensor:
        return self._get(task, split)[0][torch.as_tensor(list(indices), dtype=torch.long)]


class HFImageData:  # pragma: no cover - needs the `datasets` package and the hub (or its cache)
    """Images and labels of the CLIP tasks from their Hugging Face datasets (``clip_tasks``).

    ``"test"`` reads the task's evaluation split (``validation`` for food101), ``"train"`` its
    train split. The image column is the first of ``image``/``img``/``jpg``/``png``, the label
    column the first of ``label``/``labels``/``fine_label``/``cls`` (booleans become 0/1).
    """

    IMAGE_COLUMNS = ("image", "img", "jpg", "png")
    LABEL_COLUMNS = ("label", "labels", "fine_label", "cls")

    def __init__(self, tasks: Mapping[str, CLIPTask] | None = None, cache_dir: str | None = None) -> None:
        self.tasks = dict(tasks) if tasks is not None else dict(CLIP_TASKS)
        self.cache_dir = cache_dir
        self._ds: dict[tuple[str, str], Any] = {}
        self._labels: dict[tuple[str, str], list[int]] = {}

    def _dataset(self, task: str, split: str) -> Any:
        if (task, split) not in self._ds:
            import datasets

            info = self.tasks[task]
            name = {"test": info.eval_split, "train": info.train_split}.get(split, split)
            ds = datasets.load_dataset(info.dataset, info.dataset_config, split=name, cache_dir=self.cache_dir)
            self._ds[(task, split)] = ds
        return self._ds[(task, split)]

    def _column(self, ds: Any, options: Sequence[str], what: str) -> str:
        for c in options:
            if c in ds.column_names:
                return c
        raise MergeInputError(f"dataset has no {what} column among {list(options)}: {ds.column_names}")

    def labels(self, task: str, split: str) -> list[int]:
        if (task, split) not in self._labels:
            ds = self._dataset(task, split)
            col = self._column(ds, self.LABEL_COLUMNS, "label")
            self._labels[(task, split)] = [int(y) for y in ds[col]]
        return self._labels[(task, split)]

    def images(self, task: str, split: str, indices: Sequence[int]) -> list[torch.Tensor]:
        import numpy as np

        ds = self._dataset(task, split)
        col = self._column(ds, self.IMAGE_COLUMNS, "image")
        rows = ds.select(list(indices))[col]
        return [torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()) for im in rows]


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_source(mapping: Mapping[str, str], cache_dir: str | None = None,
                      local_files_only: bool = False) -> CheckpointSource:
    """task → state dict, from a local file/folder (``madeit_core.io.load_checkpoint``) or a hub id
    (``huggingface_hub.snapshot_download`` of its safetensors, else its ``.bin``, and config)."""

    def load(task: str) -> Mapping[str, torch.Tensor]:
        if task not in mapping:
            raise MergeInputError(f"no checkpoint for task {task!r}")
        ref = mapping[task]
        if Path(ref).exists():
            return load_checkpoint(ref)
        from huggingface_hub import snapshot_download  # pragma: no cover - needs the hub or its cache

        folder = snapshot_download(ref, allow_patterns=["*.json", "*.safetensors"], cache_dir=cache_dir,
                                   local_files_only=local_files_only)
        if not any(Path(folder).glob("*.safetensors")):
            folder = snapshot_download(ref, allow_patterns=["*.json", "*.bin"], cache_dir=cache_dir,
                                       local_files_only=local_files_only)
        return load_checkpoint(folder)

    return load


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
    def from_hub(cls, tasks: Sequence[str], model_name: str = "openai/clip-vit-base-patch32",
                 checkpoints: Mapping[str, str] | None = None, data: ImageTaskData | None = None,
                 device: str = "cpu", batch_size: int = 128, cache_dir: str | None = None,
                 local_files_only: bool = False, check_mapping: bool = True) -> CLIPBenchmark:  # pragma: no cover
        """The paper's setting: ``model_name`` from the hub (or its cache), the FusionBench
        checkpoints ``tanganke/<model>_<task>`` (or ``checkpoints``: task → hub id / local path,
        checked with :func:`~madeit_core.backbones.clip_tasks.check_checkpoint_mapping`), the
        Hugging Face datasets, zero-shot heads from the pre-trained text tower."""
        from madeit_core.backbones.hf_clip import HFCLIPVisionAdapter, hf_logit_scale, hf_text_encoder

        for t in tasks:
            get_task(t)
        mapping = dict(checkpoints) if checkpoints is not None else default_checkpoints(tasks, model_name)
        missing = [t for t in tasks if t not in mapping]
        if missing:
            raise MergeInputError(f"no checkpoint given for task(s) {missing}")
        if check_mapping:
            check_checkpoint_mapping({t: mapping[t] for t in tasks}, model_name)
        adapter = HFCLIPVisionAdapter(model_name, cache_dir=cache_dir, local_files_only=local_files_only)
        clip = adapter.load_clip_model()
        encode_text = hf_text_encoder(clip, adapter.load_tokenizer(), device=device)
        scale = hf_logit_scale(clip)
        encoder = adapter.encoder_from_clip(clip)
        return cls(adapter, tasks, encoder, heads=lambda t: zero_shot_head(encode_text, get_task(t), scale),
                   checkpoints=checkpoint_source(mapping, cache_dir, local_files_only),
                   data=data if data is not None else HFImageData(cache_dir=cache_dir),
                   checkpoint_names=mapping, device=device, batch_size=batch_size,
                   info={"model": model_name, "heads": "zero-shot (text tower of the pre-trained CLIP)"})

    @classmethod
    def tiny(cls, tasks: Sequence[str] = ("sun397", "stanford-cars", "resisc45"), classes: int = 3,
             n_test: int = 24, n_train: int = 24, source_size: int = 40, delta_scale: float = 0.05, seed: int = 0,
             device: str = "cpu", batch_size: int = 128) -> CLIPBenchmark:
        """An offline CLIP benchmark on a tiny random ``CLIPModel`` (vision: hidden 32, 2 layers,
        4 heads, patch 8, 32×32 images; text: hidden 32, 2 layers; embeddings of size 16;
        exp(logit_scale) = 100). Per task: the first ``classes`` real class names and all real
        templates of the task when it is one of the 20 (else synthetic names), ``n_test``/``n_train``
        synthetic ``source_size``² uint8 images (class prototype + noise; resized and cropped by the
        CLIP preprocessing), and a fine-tuned variant θ0 + δ, δ ~ N(0, (delta_scale · std θ)²) per
        tensor, drawn from a per-task seed."""
        from transformers import CLIPConfig, CLIPModel

        from madeit_core.backbones.hf_clip import HFCLIPVisionAdapter, hf_logit_scale, hf_text_encoder

        vocab = 64
        text_cfg = {"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "max_position_embeddings": 16, "projection_dim": 16,
                    "pad_token_id": 0, "bos_token_id": vocab - 2, "eos_token_id": vocab - 1}
        vision_cfg = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "patch_size": 8, "image_size": 32, "projection_dim": 16}
        config = CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=16,
                            logit_scale_init_value=math.log(100.0))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            clip = CLIPModel(config).eval()
        adapter = HFCLIPVisionAdapter(config=config)
        adapter.name = "hf_clip_vision:tiny-random"
        encoder = adapter.encoder_from_clip(clip)
        encode_text = hf_text_encoder(clip, HashTokenizer(vocab, max_length=16))
        scale = hf_logit_scale(clip)

        task_info: dict[str, CLIPTask] = {}
        for t in tasks:
            if t in CLIP_TASKS:
                real = CLIP_TASKS[t]
                if real.num_classes < classes:
                    raise MergeInputError(f"task {t!r} has only {real.num_classes} classes")
                task_info[t] = CLIPTask(t, real.classnames[:classes], real.templates, real.dataset,
                                        real.dataset_config, real.eval_split)
            else:
                task_info[t] = CLIPTask(t, tuple(f"{t} thing {c}" for c in range(classes)),
                                        ("a photo of a {}.", "a drawing of a {}."), "synthetic", None, "test")
        heads = {t: zero_shot_head(encode_text, info, scale) for t, info in task_info.items()}

        theta0 = encoder.state_dict()
        finetuned: dict[str, dict[str, torch.Tensor]] = {}
        data: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for i, t in enumerate(tasks):
            g = torch.Generator().manual_seed(1_000_003 * (seed + 1) + i)
            sd = {}
            for k, v in theta0.items():
                if v.is_floating_point():
                    std = float(v.float().std()) if v.numel() > 1 else 0.0
                    std = std if std > 0 else 0.02
                    sd[k] = v + delta_scale * std * torch.randn(v.shape, generator=g, dtype=v.dtype)
                else:
                    sd[k] = v.clone()
            finetuned[t] = sd
            protos = torch.rand(classes, source_size, source_size, 3, generator=g) * 255
            for split, n in (("test", n_test), ("train", n_train)):
                y = torch.arange(n) % classes
                y = y[torch.randperm(n, generator=g)]
                x = protos[y] * 0.7 + torch.rand(n, source_size, source_size, 3, generator=g) * 255 * 0.3
                data[(t, split)] = (x.round().clamp(0, 255).to(torch.uint8), y)
        names = {t: f"tiny-random/{t}" for t in tasks}
        return cls(adapter, tasks, encoder, heads=heads, checkpoints=lambda t: finetuned[t],
                   data=InMemoryImageData(data), checkpoint_names=names, device=device, batch_size=batch_size,
                   info={"model": "tiny random CLIPModel", "seed": seed, "classes": classes, "n_test": n_test,
                         "delta_scale": delta_scale,
                         "note": "tiny randomly initialised CLIP, synthetic images and random task vectors; "
                                 "not a result about real data"})


class HashTokenizer:
    """A stand-in tokenizer for tiny random text towers (no vocabulary files, no download): words and
    punctuation → ids by CRC32 in [1, vocab − 3], wrapped in BOS (vocab − 2) … EOS (vocab − 1),
    padded with 0 to the longest text (truncated to ``max_length``). Returns ``input_ids`` and
    ``attention_mask`` as a Hugging Face tokenizer does."""

    def __init__(self, vocab_size: int, max_length: int) -> None:
        self.vocab_size, self.max_length = vocab_size, max_length
        self.bos, self.eos, self.pad = vocab_size - 2, vocab_size - 1, 0

    def __call__(self, texts: Sequence[str], **_: Any) -> dict[str, torch.Tensor]:
        rows = []
        for text in texts:
            words = re.findall(r"\w+|[^\w\s]", text.lower())
            ids = [1 + zlib.crc32(w.encode()) % (self.vocab_size - 3) for w in words][: self.max_length - 2]
            rows.append([self.bos, *ids, self.eos])
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [self.pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return {"input_ids": input_ids, "attention_mask": mask}


def make_clip_benchmark(group: str, profile: str = "clip", device: str = "cpu") -> tuple[CLIPBenchmark, list[str]]:
    """Factory behind ``make_benchmark("clip", group, profile)``.

    - ``clip-tiny-N`` (1 ≤ N ≤ 20), any profile: :meth:`CLIPBenchmark.tiny` on the first N tasks of
      TALL20 (config order), offline.
    - ``clip-8`` / ``clip-14`` / ``clip-20`` with profile ``smoke``: the same tiny offline benchmark
      on the group's tasks (for CI and notebook smoke runs);
      with profile ``clip`` (= ``clip-b32``), ``clip-b16`` or ``clip-l14``: the real setting,
      :meth:`CLIPBenchmark.from_hub` with ViT-B/32, B/16 or L/14.
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
