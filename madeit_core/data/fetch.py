"""``madeit data fetch``: fill a mirror folder from the internet (torchvision and Hugging Face datasets).

For users whose machine can download: it writes the mirror layout (``meta.json``,
``train/test.npz`` or ``.tsv``; see :mod:`madeit_core.data.mirror`) so that everything else works
unchanged. It cannot run on the offline machines this project is developed on; there it fails
with a clear message.

What it fetches, and how it differs from the shared mirror (whose subsets came from offline
sources; ``shared/data/README.md``): the **official** splits where the shared mirror had only
parts of them. Subsets are then drawn as the shared mirror drew them (per class with
``numpy.random.default_rng(0)``, rows in a fixed random order) to the same sizes, so the tasks
have the same shape but not the same rows: numbers are comparable in kind, not identical. The
zoo's cache keys hash the data, so a fetched mirror never reuses caches of the shared one.

=================  =============================================  ==============================
task               source                                         sizes (train / test)
=================  =============================================  ==============================
mnist              torchvision.datasets.MNIST                     60,000 / 10,000
fashion_mnist      torchvision.datasets.FashionMNIST              60,000 / 10,000
kmnist             torchvision.datasets.KMNIST                    8,000 / 2,000 (subsampled)
cifar10            torchvision.datasets.CIFAR10                   4,000 / 10,000 (train subsampled)
gtsrb              torchvision.datasets.GTSRB, resized to 32×32    9,000 / all test
fer2013            torchvision.datasets.FER2013 (needs the Kaggle  8,500 / 3,589 (PrivateTest
                   files in ``root``; torchvision cannot download  when available)
                   them)
dtd10              torchvision.datasets.DTD, first 10 classes,    80 / 40 per class
                   centre crop, 64×64
oxford_pets3       torchvision.datasets.OxfordIIITPet, classes    150 / 50 per class
                   0-2, centre crop, 64×64
sst2               Hugging Face ``glue``/``sst2`` (train, dev)    67,349 / 872
imdb               Hugging Face ``imdb``, first 400 characters    10,000 / 5,000 (balanced)
ag_news            Hugging Face ``ag_news``                       6,000 / 1,600 (balanced)
=================  =============================================  ==============================
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from madeit_core.data.mirror import MirrorError
from madeit_core.io import atomic_write

log = logging.getLogger(__name__)

FETCHABLE = ("mnist", "fashion_mnist", "kmnist", "cifar10", "gtsrb", "fer2013", "dtd10", "oxford_pets3", "sst2",
             "imdb", "ag_news")

OFFLINE_HINT = ("`madeit data fetch` needs the internet (torchvision / Hugging Face downloads). On an offline "
                "machine copy a mirror folder (e.g. shared/data) or a pack (`madeit data pack`) instead.")


def per_class_subset(y: np.ndarray, per_class: int | dict[int, int] | None, seed: int = 0) -> np.ndarray:
    """Indices: per class (label order) a ``default_rng(seed)`` permutation's first ``per_class``;
    all rows then shuffled with the same generator (a prefix is roughly balanced)."""
    if per_class is None:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        k = per_class if isinstance(per_class, int) else per_class.get(int(c), len(idx))
        out.append(idx[:k])
    sel = np.concatenate(out)
    return sel[rng.permutation(len(sel))]


def _write_image_task(root: Path, task: str, classes: list[str], splits: dict[str, tuple[np.ndarray, np.ndarray]],
                      source: str, notes: str) -> None:
    folder = root / task
    meta: dict[str, Any] = {"task": task, "kind": "image", "classes": classes, "source": source,
                            "licence": "see the original dataset", "notes": notes, "splits": {}}
    for split, (x, y) in splits.items():
        x = np.ascontiguousarray(x.astype(np.uint8))
        if x.ndim == 3:
            x = x[..., None]
        meta["image_size"], meta["channels"] = list(x.shape[1:3]), int(x.shape[3])
        with atomic_write(folder / f"{split}.npz", "wb") as fh:
            np.savez_compressed(fh, x=x, y=y.astype(np.int64))
        meta["splits"][split] = {"n": int(len(y)), "class_counts": np.bincount(y, minlength=len(classes)).tolist()}
    with atomic_write(folder / "meta.json", "w") as fh:
        fh.write(json.dumps(meta, indent=2))


def _write_text_task(root: Path, task: str, classes: list[str], splits: dict[str, tuple[list[str], np.ndarray]],
                     source: str, notes: str) -> None:
    folder = root / task
    meta: dict[str, Any] = {"task": task, "kind": "text", "classes": classes, "source": source,
                            "licence": "see the original dataset", "notes": notes, "splits": {}}
    for split, (texts, y) in splits.items():
        with atomic_write(folder / f"{split}.tsv", "w") as fh:
            for t, label in zip(texts, y):
                fh.write(f"{int(label)}\t{' '.join(str(t).split())}\n")
        meta["splits"][split] = {"n": int(len(y)), "class_counts": np.bincount(y, minlength=len(classes)).tolist()}
    with atomic_write(folder / "meta.json", "w") as fh:
        fh.write(json.dumps(meta, indent=2))


def _tv(name: str) -> Any:
    try:
        import torchvision.datasets as tvd
    except ImportError as exc:
        raise MirrorError("`madeit data fetch` needs torchvision (pip install torchvision)") from exc
    return getattr(tvd, name)


def _pil_square(img: Any, size: int) -> np.ndarray:
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def _tv_arrays(ds: Any, resize: int | None = None, square: bool = False) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    xs, ys = [], []
    for img, label in ds:
        if square:
            xs.append(_pil_square(img, resize or 64))
        elif resize:
            xs.append(np.asarray(img.convert("RGB").resize((resize, resize), Image.BILINEAR), dtype=np.uint8))
        else:
            xs.append(np.asarray(img, dtype=np.uint8))
        ys.append(int(label))
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def _fetch_mnist_like(root: Path, task: str, cls: str, cache: Path, per_class: tuple[int | None, int | None]) -> None:
    D = _tv(cls)
    tr = D(str(cache), train=True, download=True)
    te = D(str(cache), train=False, download=True)
    xtr, ytr = tr.data.numpy(), tr.targets.numpy().astype(np.int64)
    xte, yte = te.data.numpy(), te.targets.numpy().astype(np.int64)
    itr, ite = per_class_subset(ytr, per_class[0]), per_class_subset(yte, per_class[1])
    _write_image_task(root, task, list(tr.classes), {"train": (xtr[itr], ytr[itr]), "test": (xte[ite], yte[ite])},
                      f"torchvision.datasets.{cls}", "official split (subsampled per class where noted)")


def _fetch_one(task: str, root: Path, cache: Path) -> None:
    if task == "mnist":
        _fetch_mnist_like(root, task, "MNIST", cache, (None, None))
    elif task == "fashion_mnist":
        _fetch_mnist_like(root, task, "FashionMNIST", cache, (None, None))
    elif task == "kmnist":
        _fetch_mnist_like(root, task, "KMNIST", cache, (800, 200))
    elif task == "cifar10":
        D = _tv("CIFAR10")
        tr, te = D(str(cache), train=True, download=True), D(str(cache), train=False, download=True)
        ytr, yte = np.asarray(tr.targets), np.asarray(te.targets)
        itr = per_class_subset(ytr, 400)
        _write_image_task(root, task, list(tr.classes), {"train": (tr.data[itr], ytr[itr]), "test": (te.data, yte)},
                          "torchvision.datasets.CIFAR10", "train: 400 per class; test: all 10,000")
    elif task == "gtsrb":
        D = _tv("GTSRB")
        xtr, ytr = _tv_arrays(D(str(cache), split="train", download=True), resize=32)
        xte, yte = _tv_arrays(D(str(cache), split="test", download=True), resize=32)
        counts = np.bincount(ytr, minlength=43)
        quota = {c: int(round(9000 * counts[c] / counts.sum())) for c in range(43)}
        itr = per_class_subset(ytr, quota)
        _write_image_task(root, task, [str(i) for i in range(43)], {"train": (xtr[itr], ytr[itr]), "test": (xte, yte)},
                          "torchvision.datasets.GTSRB", "resized to 32x32; train: 9,000 in proportion to classes")
    elif task == "fer2013":
        D = _tv("FER2013")
        try:
            tr = D(str(cache), split="train")
            te = D(str(cache), split="test")
        except RuntimeError as exc:
            raise MirrorError(f"FER2013 cannot be downloaded automatically: put the Kaggle files in {cache}/fer2013 "
                              f"({exc})") from exc
        xtr, ytr = _tv_arrays(tr)
        xte, yte = _tv_arrays(te)
        counts = np.bincount(ytr, minlength=7)
        quota = {c: int(round(8500 * counts[c] / counts.sum())) for c in range(7)}
        itr = per_class_subset(ytr, quota)
        _write_image_task(root, task, ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"],
                          {"train": (xtr[itr], ytr[itr]), "test": (xte, yte)}, "torchvision.datasets.FER2013",
                          "train: 8,500 in proportion to classes")
    elif task in ("dtd10", "oxford_pets3"):
        if task == "dtd10":
            D, keep, per = _tv("DTD"), 10, (80, 40)
            parts = [D(str(cache), split=s, download=True) for s in ("train", "val", "test")]
        else:
            D, keep, per = _tv("OxfordIIITPet"), 3, (150, 50)
            parts = [D(str(cache), split=s, download=True) for s in ("trainval", "test")]
        xs, ys = zip(*[_tv_arrays(p, resize=64, square=True) for p in parts])
        x, y = np.concatenate(xs), np.concatenate(ys)
        m = y < keep
        x, y = x[m], y[m]
        rng = np.random.default_rng(0)
        tr_idx, te_idx = [], []
        for c in range(keep):
            idx = np.flatnonzero(y == c)
            idx = idx[rng.permutation(len(idx))]
            te_idx.append(idx[:per[1]])
            tr_idx.append(idx[per[1]:per[1] + per[0]])
        itr, ite = np.concatenate(tr_idx), np.concatenate(te_idx)
        itr, ite = itr[rng.permutation(len(itr))], ite[rng.permutation(len(ite))]
        classes = [str(c) for c in parts[0].classes[:keep]]
        _write_image_task(root, task, classes, {"train": (x[itr], y[itr]), "test": (x[ite], y[ite])},
                          f"torchvision.datasets.{D.__name__}", "centre-cropped, 64x64, per-class split")
    elif task in ("sst2", "imdb", "ag_news"):
        try:
            from datasets import load_dataset  # type: ignore[import-not-found]
        except ImportError as exc:
            raise MirrorError("fetching text tasks needs the Hugging Face `datasets` package") from exc
        if task == "sst2":
            ds = load_dataset("glue", "sst2", cache_dir=str(cache))
            splits = {"train": ds["train"], "test": ds["validation"]}
            field, classes, per = "sentence", ["negative", "positive"], (None, None)
        elif task == "imdb":
            ds = load_dataset("imdb", cache_dir=str(cache))
            splits = {"train": ds["train"], "test": ds["test"]}
            field, classes, per = "text", ["negative", "positive"], (5000, 2500)
        else:
            ds = load_dataset("ag_news", cache_dir=str(cache))
            splits = {"train": ds["train"], "test": ds["test"]}
            field, classes, per = "text", ["World", "Sports", "Business", "Sci/Tech"], (1500, 400)
        out: dict[str, tuple[list[str], np.ndarray]] = {}
        for (name, part), cap in zip(splits.items(), per):
            y = np.asarray(part["label"], dtype=np.int64)
            idx = per_class_subset(y, cap)
            texts = [str(part[int(i)][field]).replace("<br />", " ") for i in idx]
            if task == "imdb":
                texts = [" ".join(t.split())[:400] for t in texts]
            out[name] = (texts, y[idx])
        _write_text_task(root, task, classes, out, f"Hugging Face datasets: {task}", "official splits, subsampled")
    else:
        raise MirrorError(f"cannot fetch {task!r}; fetchable: {', '.join(FETCHABLE)}")


def fetch(out: str | os.PathLike[str], tasks: list[str] | None = None,
          downloader: Callable[[str, Path, Path], None] | None = None) -> list[str]:
    """Fill ``out`` with the mirror layout for ``tasks`` (default all); returns the tasks written."""
    root = Path(out)
    cache = root / ".downloads"
    cache.mkdir(parents=True, exist_ok=True)
    done = []
    for task in tasks or list(FETCHABLE):
        if task not in FETCHABLE:
            raise MirrorError(f"cannot fetch {task!r}; fetchable: {', '.join(FETCHABLE)}")
        log.info("fetching %s", task)
        try:
            (downloader or _fetch_one)(task, root, cache)
        except MirrorError:
            raise
        except (OSError, RuntimeError, ConnectionError) as exc:
            raise MirrorError(f"fetching {task} failed ({type(exc).__name__}: {exc}). " + OFFLINE_HINT) from exc
        done.append(task)
    return done
