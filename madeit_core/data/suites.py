"""Task registry: task name → (train x uint8 NHWC, train y, test x, test y, class names), and task groups.

Every task comes from one *base* and an optional transform:

- a mirror image task (``mnist``, ``fashion_mnist``, ``kmnist``, ``cifar10``, ``gtsrb``,
  ``fer2013``, ``dtd10``, ``oxford_pets3``), read from the data mirror or a pack;
- a mirror text task rendered as images (``rendered_sst2``, ``rendered_imdb``,
  ``rendered_agnews``; :mod:`madeit_core.data.render`);
- scikit-learn's digits and its variants (:mod:`madeit_core.data.digits`; no mirror needed).

**Caps.** A profile caps every split. Rows are chosen by :func:`select_rows`: the first ``cap``
entries of ``numpy.random.default_rng(0).permutation(N)`` (all rows, in file order, when
``cap >= N``). A smaller cap therefore always picks a prefix of a larger cap's rows, and a pack
made with larger caps serves every smaller one with identical rows in identical order. Text is
capped *before* rendering.

**Variants of real tasks** (for offline-14/20). The CLIP task lists that the paper merges
contain families of related tasks (MNIST, EMNIST, KMNIST, Fashion-MNIST; CIFAR-10, CIFAR-100,
STL-10), which is what lets merging share experts between tasks. The offline mirror has fewer
datasets, so the larger groups add label-preserving *appearance* variants of real tasks, each a
different input distribution with the same label semantics:

- ``mnist_inverted`` (255 − x): same digits, opposite contrast: low-level filters must change, the
  shape knowledge can be shared.
- ``fashion_mnist_rot90`` (rotated 90°): same garments in another orientation; CNN features are
  not rotation invariant, so this is a genuinely different task for the encoder.
- ``cifar10_grey`` (luma only): like STL-10 vs CIFAR-10, nearly the same task; colour cues go.
- ``gtsrb_grey`` (luma only): traffic signs without their strongly discriminative colours
  (red vs blue signs): a harder near-duplicate.
- ``kmnist_mirror`` (left ↔ right): Kuzushiji characters are not mirror-symmetric, so this is a new
  "script" with the same classes.
- ``fer2013_mirror`` (left ↔ right): faces are nearly mirror-symmetric: the closest duplicate in the
  suite (what happens when two tasks are almost the same).
- ``dtd10_rot90`` (rotated 90°): textures are largely orientation-free, except the oriented ones
  (banded, crosshatched): a near-duplicate with a few conflicting classes.

The groups (config order, which the protocol shuffles per run) are registered with
:func:`madeit_core.protocol.register_group`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from madeit_core.data.digits import DIGIT_VARIANTS, digits_task, transform_images
from madeit_core.data.mirror import HOW_TO_GET, Mirror, MirrorError, check_images
from madeit_core.data.render import render_cached
from madeit_core.protocol import register_group

log = logging.getLogger(__name__)

#: mirror image tasks
IMAGE_BASES = ("mnist", "fashion_mnist", "kmnist", "cifar10", "gtsrb", "fer2013", "dtd10", "oxford_pets3")
#: rendered text tasks → mirror text task
TEXT_BASES = {"rendered_sst2": "sst2", "rendered_imdb": "imdb", "rendered_agnews": "ag_news"}
#: variants of real tasks → (base, transform)
REAL_VARIANTS = {"mnist_inverted": ("mnist", "inverted"), "fashion_mnist_rot90": ("fashion_mnist", "rot90"),
                 "cifar10_grey": ("cifar10", "grey"), "gtsrb_grey": ("gtsrb", "grey"),
                 "kmnist_mirror": ("kmnist", "mirror"), "fer2013_mirror": ("fer2013", "mirror"),
                 "dtd10_rot90": ("dtd10", "rot90")}

OFFLINE_8 = ["mnist", "fashion_mnist", "kmnist", "cifar10", "gtsrb", "fer2013", "dtd10", "rendered_sst2"]
OFFLINE_14 = OFFLINE_8 + ["oxford_pets3", "rendered_imdb", "rendered_agnews", "digits", "mnist_inverted",
                          "fashion_mnist_rot90"]
OFFLINE_20 = OFFLINE_14 + ["cifar10_grey", "gtsrb_grey", "kmnist_mirror", "fer2013_mirror", "dtd10_rot90",
                           "digits_inverted"]
SMOKE_4 = ["mnist", "fashion_mnist", "cifar10", "gtsrb"]
SMOKE_8 = list(OFFLINE_8)
SMOKE_DIGITS_4 = ["digits", "digits_inverted", "digits_rot90", "digits_noisy"]
SMOKE_DIGITS_8 = SMOKE_DIGITS_4 + ["digits_mirror", "digits_transposed", "digits_parity", "digits_mod3"]

GROUPS: dict[str, list[str]] = {"offline-8": OFFLINE_8, "offline-14": OFFLINE_14, "offline-20": OFFLINE_20,
                                "smoke-4": SMOKE_4, "smoke-8": SMOKE_8, "smoke-digits-4": SMOKE_DIGITS_4,
                                "smoke-digits-8": SMOKE_DIGITS_8}
#: groups that fall back to the digits suite when the mirror is missing
FALLBACKS = {"smoke-4": "smoke-digits-4", "smoke-8": "smoke-digits-8"}

for _name, _tasks in GROUPS.items():
    register_group(_name, _tasks)


def all_tasks() -> list[str]:
    return list(IMAGE_BASES) + list(TEXT_BASES) + list(REAL_VARIANTS) + list(DIGIT_VARIANTS)


def task_base(task: str) -> tuple[str, str, str | None]:
    """``(kind, base, transform)`` with kind ``image`` | ``text`` | ``digits``."""
    if task in IMAGE_BASES:
        return "image", task, None
    if task in TEXT_BASES:
        return "text", TEXT_BASES[task], None
    if task in REAL_VARIANTS:
        base, how = REAL_VARIANTS[task]
        return "image", base, how
    if task in DIGIT_VARIANTS:
        return "digits", task, None
    raise MirrorError(f"unknown task {task!r}; known: {', '.join(all_tasks())}")


def select_rows(n: int, cap: int | None, seed: int = 0) -> np.ndarray:
    """Indices of the rows a cap keeps (see the module docstring)."""
    if cap is None or cap >= n:
        return np.arange(n)
    return np.random.default_rng(seed).permutation(n)[:cap]


@dataclass
class TaskData:
    """One task's capped splits (uint8 NHWC images, int64 labels) and where they came from."""

    name: str
    classes: tuple[str, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ---------------------------------------------------------------------- sources
class MirrorSource:
    """Task bases read from a mirror folder (text rendered on demand, cached under ``cache_dir``)."""

    kind = "mirror"

    def __init__(self, root: str | os.PathLike[str] | None = None, cache_dir: str | os.PathLike[str] | None = None):
        self.mirror = Mirror(root)
        self.cache_dir = cache_dir

    def available(self, base: str) -> bool:
        return self.mirror.has_task(base)

    def describe(self) -> dict[str, Any]:
        return {"source": "mirror", "root": str(self.mirror.root)}

    def split(self, kind: str, base: str, split: str, cap: int | None,
              render_size: int) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], int]:
        meta = self.mirror.meta(base)
        if kind == "image":
            x, y = self.mirror.images(base, split)
            idx = select_rows(len(y), cap)
            return x[idx], y[idx].astype(np.int64), meta.classes, len(y)
        texts, y = self.mirror.texts(base, split)
        idx = select_rows(len(y), cap)
        chosen = [texts[i] for i in idx]
        x = render_cached(chosen, render_size, self.cache_dir, name=f"{base}-{split}", show_progress=True)
        return x, y[idx], meta.classes, len(y)


class PackSource:
    """Task bases read from a pack file written by :func:`madeit_core.data.pack.write_pack`."""

    kind = "pack"

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.is_file():
            raise MirrorError(f"data pack {self.path} not found. Make one with `madeit data pack --profile offline "
                              f"--out FILE` on a machine that has the mirror. " + HOW_TO_GET)
        try:
            self._z = np.load(self.path, allow_pickle=False)
            self.manifest = json.loads(bytes(self._z["__manifest__"]).decode("utf-8"))
        except Exception as exc:
            raise MirrorError(f"data pack {self.path} is not readable ({type(exc).__name__}: {exc})") from exc
        self.entries: dict[str, Any] = self.manifest["entries"]

    def available(self, base: str) -> bool:
        return any(e["base"] == base for e in self.entries.values())

    def describe(self) -> dict[str, Any]:
        return {"source": "pack", "path": str(self.path), "profile": self.manifest.get("profile"),
                "pack_format": self.manifest.get("format")}

    def split(self, kind: str, base: str, split: str, cap: int | None,
              render_size: int) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], int]:
        key = entry_key(kind, base, split, render_size)
        if key not in self.entries:
            raise MirrorError(f"data pack {self.path} has no {key!r} (it holds {sorted(self.entries)}); "
                              "make the pack with the profile you run")
        e = self.entries[key]
        want = select_rows(int(e["n_total"]), cap)
        stored = self._z[f"{key}__idx"]
        pos = {int(v): i for i, v in enumerate(stored)}
        missing = [int(i) for i in want if int(i) not in pos]
        if missing:
            raise MirrorError(f"data pack {self.path}: {key} was packed with cap {len(stored)}, too small for "
                              f"cap {cap}; re-pack with larger caps")
        rows = np.asarray([pos[int(i)] for i in want], dtype=np.int64)
        x = self._z[f"{key}__x"][rows]
        y = self._z[f"{key}__y"][rows].astype(np.int64)
        check_images(x, y, len(e["classes"]), f"{self.path}:{key}")
        return x, y, tuple(e["classes"]), int(e["n_total"])


def entry_key(kind: str, base: str, split: str, render_size: int) -> str:
    return f"{base}@{render_size}px__{split}" if kind == "text" else f"{base}__{split}"


def open_source(data: str | os.PathLike[str] | None = None,
                cache_dir: str | os.PathLike[str] | None = None) -> MirrorSource | PackSource:
    """A pack when ``data`` (or ``$MADEIT_DATA``) names a ``.npz`` file, else the mirror folder."""
    if data is None:
        data = os.environ.get("MADEIT_DATA") or None
    if data is not None and str(data).endswith(".npz"):
        return PackSource(data)
    return MirrorSource(data, cache_dir)


# ---------------------------------------------------------------------- loading
def load_task(task: str, source: MirrorSource | PackSource | None = None, train_cap: int | None = None,
              test_cap: int | None = None, render_size: int = 64) -> TaskData:
    """Load one task with caps applied (see the module docstring)."""
    kind, base, how = task_base(task)
    if kind == "digits":
        (xtr, ytr), (xte, yte), classes = digits_task(base)
        itr, ite = select_rows(len(ytr), train_cap), select_rows(len(yte), test_cap)
        info = {"source": "sklearn.datasets.load_digits", "base": "digits", "transform": task,
                "n_train_total": len(ytr), "n_test_total": len(yte)}
        return TaskData(task, classes, xtr[itr], ytr[itr], xte[ite], yte[ite], info)
    if source is None:
        source = open_source()
    xtr, ytr, classes, ntr = source.split(kind, base, "train", train_cap, render_size)
    xte, yte, _, nte = source.split(kind, base, "test", test_cap, render_size)
    if how is not None:
        seed_tr, seed_te = 1, 2
        xtr = transform_images(xtr, how, seed_tr)
        xte = transform_images(xte, how, seed_te)
    info = {**source.describe(), "base": base, "transform": how, "n_train_total": ntr, "n_test_total": nte}
    if kind == "text":
        info["render_size"] = render_size
    return TaskData(task, tuple(classes), xtr, ytr, xte, yte, info)


def source_has(source: MirrorSource | PackSource, task: str) -> bool:
    kind, base, _ = task_base(task)
    return True if kind == "digits" else source.available(base)


def resolve_group(group: str, source: MirrorSource | PackSource) -> tuple[list[str], str | None]:
    """The group's tasks, and a note when it fell back to the digits suite (no mirror)."""
    from madeit_core.protocol import group_tasks

    tasks = group_tasks(group)
    missing = [t for t in tasks if not source_has(source, t)]
    if not missing:
        return tasks, None
    if group in FALLBACKS:
        where = source.describe()
        note = (f"no data mirror ({where}; missing {', '.join(missing)}): group {group} fell back to the "
                f"embedded scikit-learn digits suite {FALLBACKS[group]} ({', '.join(GROUPS[FALLBACKS[group]])})")
        return list(GROUPS[FALLBACKS[group]]), note
    kind, base, _ = task_base(missing[0])
    raise MirrorError(f"task {missing[0]!r} of group {group!r} needs the data {base!r}, which "
                      f"{source.describe()} lacks. " + HOW_TO_GET)
