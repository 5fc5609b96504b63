"""Images and labels for the CLIP benchmark, per (task, split), as uint8 ``[H, W, C]`` images.

The benchmark asks an :class:`ImageTaskData` for a split's labels and for the images at given
indices, a batch at a time (CLIP's test sets do not fit in memory as float tensors); the backbone
adapter does the preprocessing. Splits: ``"test"`` (evaluation and the unlabeled test-time samples)
and ``"train"`` (ODE-M's labelled calibration samples).

- :class:`HFImageData`: the Hugging Face datasets of the 20 tasks (:mod:`madeit_core.backbones.clip_tasks`).
- :class:`MirrorImageData`: the offline data mirror's ``<root>/<task>/<split>.npz`` files (tasks that
  exist there under the CLIP name: mnist, fashion_mnist, kmnist, cifar10, gtsrb, fer2013; labels
  remapped to the CLIP class order where the names show a different order).
- :class:`InMemoryImageData` and :func:`synthetic_image_data`: tensors in memory (tests, smoke runs).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from madeit_core.backbones.clip_tasks import CLIP_TASKS, CLIPTask
from madeit_core.errors import MergeInputError

log = logging.getLogger(__name__)


@runtime_checkable
class ImageTaskData(Protocol):
    """Labelled uint8 images per (task, split)."""

    def labels(self, task: str, split: str) -> list[int]: ...

    def images(self, task: str, split: str, indices: Sequence[int]) -> torch.Tensor | list[torch.Tensor]: ...


class InMemoryImageData:
    """``{(task, split): (uint8 images [N, H, W, C], labels [N])}``."""

    def __init__(self, data: Mapping[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]) -> None:
        for key, (x, y) in data.items():
            if x.dtype != torch.uint8 or x.ndim != 4 or y.ndim != 1 or x.shape[0] != y.shape[0]:
                raise MergeInputError(f"data {key}: expected uint8 images [N, H, W, C] and labels [N], got "
                                      f"{x.dtype} {tuple(x.shape)} and {tuple(y.shape)}")
        self.data = dict(data)

    def _get(self, task: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if (task, split) not in self.data:
            raise MergeInputError(f"no {split!r} data for task {task!r}")
        return self.data[(task, split)]

    def labels(self, task: str, split: str) -> list[int]:
        return [int(y) for y in self._get(task, split)[1].tolist()]

    def images(self, task: str, split: str, indices: Sequence[int]) -> torch.Tensor:
        return self._get(task, split)[0][torch.as_tensor(list(indices), dtype=torch.long)]


def synthetic_image_data(tasks: Sequence[str], classes: int, n_test: int = 24, n_train: int = 24, size: int = 40,
                         seed: int = 0) -> InMemoryImageData:
    """Per task, ``classes`` random RGB prototypes of ``size``² pixels; an image of class c is
    0.7 · prototype_c + 0.3 · uniform noise; labels cycle over the classes in a seeded random order."""
    data: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for i, t in enumerate(tasks):
        g = torch.Generator().manual_seed(7919 * (seed + 1) + i)
        protos = torch.rand(classes, size, size, 3, generator=g) * 255
        for split, n in (("test", n_test), ("train", n_train)):
            y = (torch.arange(n) % classes)[torch.randperm(n, generator=g)]
            x = protos[y] * 0.7 + torch.rand(n, size, size, 3, generator=g) * 255 * 0.3
            data[(t, split)] = (x.round().clamp(0, 255).to(torch.uint8), y)
    return InMemoryImageData(data)


class HFImageData:  # pragma: no cover - needs the `datasets` package and the hub (or its cache)
    """Images and labels of the CLIP tasks from their Hugging Face datasets (``clip_tasks``).

    ``"test"`` reads the task's evaluation split (``validation`` for food101), ``"train"`` its
    train split. The image column is the first of ``image``/``img``/``jpg``/``png``, the label
    column the first of ``label``/``labels``/``fine_label``/``cls``.
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
            try:
                import datasets
            except ImportError as exc:
                raise MergeInputError("the CLIP setting reads its data with the `datasets` package: "
                                      "pip install datasets") from exc
            info = self.tasks[task]
            name = {"test": info.eval_split, "train": info.train_split}.get(split, split)
            self._ds[(task, split)] = datasets.load_dataset(info.dataset, info.dataset_config, split=name,
                                                            cache_dir=self.cache_dir)
        return self._ds[(task, split)]

    @staticmethod
    def _column(ds: Any, options: Sequence[str], what: str) -> str:
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


def _norm(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "", name.lower())


def label_map(source: Sequence[str], target: Sequence[str]) -> list[int]:
    """Index in ``target`` of each class of ``source``: by name when every source name is a prefix
    (alphanumerics, case ignored) of exactly one target name and those are all different
    (``fear`` → ``fearful``); otherwise the identity when the counts agree (same dataset, names
    spelled differently: kmnist's romaji and hiragana). Different counts raise."""
    if len(source) != len(target):
        raise MergeInputError(f"{len(source)} classes in the data but {len(target)} class names in the task")
    hits = [[j for j, t in enumerate(target) if _norm(t).startswith(_norm(s))] for s in source]
    if all(len(h) == 1 for h in hits) and len({h[0] for h in hits}) == len(source):
        return [h[0] for h in hits]
    return list(range(len(source)))


class MirrorImageData:
    """The offline data mirror (``<root>/<task>/{train,test}.npz``: ``x`` uint8 ``[N, H, W, C]``, ``y``).

    ``root``: the mirror folder (default ``$MADEIT_DATA``). ``names``: CLIP task → mirror task
    name where they differ. Labels are remapped to the CLIP class order with :func:`label_map`
    (fer2013 stores angry, disgust, fear, happy, sad, surprise, neutral; the CLIP task lists
    neutral fifth). The mirror's splits are subsets or re-splits of the official ones: accuracies
    on them are not comparable with the paper's.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, names: Mapping[str, str] | None = None) -> None:
        root = root if root is not None else os.environ.get("MADEIT_DATA")
        if root is None:
            raise MergeInputError("no data mirror given: pass root or set MADEIT_DATA to the mirror folder")
        self.root = Path(root)
        self.names = dict(names or {})
        self._cache: dict[tuple[str, str], tuple[Any, list[int]]] = {}

    def _load(self, task: str, split: str) -> tuple[Any, list[int]]:
        if (task, split) not in self._cache:
            import json

            import numpy as np

            folder = self.root / self.names.get(task, task)
            f = folder / f"{split}.npz"
            if not f.is_file():
                raise MergeInputError(f"no {split!r} split of task {task!r} in the data mirror: expected {f}")
            with np.load(f) as z:
                x, y = z["x"], z["y"]
            classes = json.loads((folder / "meta.json").read_text(encoding="utf-8"))["classes"]
            mapping = label_map(classes, CLIP_TASKS[task].classnames) if task in CLIP_TASKS else \
                list(range(len(classes)))
            if mapping != list(range(len(classes))):
                log.info("%s: mirror labels remapped to the CLIP class order %s", task, mapping)
            self._cache[(task, split)] = (x, [mapping[int(v)] for v in y])
        return self._cache[(task, split)]

    def labels(self, task: str, split: str) -> list[int]:
        return list(self._load(task, split)[1])

    def images(self, task: str, split: str, indices: Sequence[int]) -> torch.Tensor:
        x = self._load(task, split)[0]
        return torch.from_numpy(x[list(indices)].copy())
