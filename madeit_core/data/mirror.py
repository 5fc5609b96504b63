"""Reader of the offline data mirror (format: ``shared/data/README.md``).

Layout, one folder per task::

    <root>/<task>/meta.json    task, kind (image|text), classes, image_size, channels, splits, ...
    <root>/<task>/train.npz    image tasks: x uint8 [N, H, W, C], y int64 [N]
    <root>/<task>/test.npz
    <root>/<task>/train.tsv    text tasks: '<label int><TAB><text>' per line, UTF-8, no header
    <root>/<task>/test.tsv
    <root>/SHA256SUMS          optional: sha256 of every data file

The root is ``$MADEIT_DATA`` when set, else ``../shared/data`` relative to the repository root
(the checkout's parent folder holds ``shared/``). Every problem raises :class:`MirrorError`,
whose message says which file was expected where, and how to get the data (``madeit data fetch``
on a machine with internet, or a pack made by ``madeit data pack``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from madeit_core.errors import MergeInputError

REPO_ROOT = Path(__file__).resolve().parents[2]
HOW_TO_GET = ("Get the data with `madeit data fetch --out DIR` on a machine with internet (or copy the "
              "shared/data mirror beside the checkout), then point MADEIT_DATA at it; `madeit data check` "
              "validates it.")


class MirrorError(MergeInputError):
    """The data mirror (or a pack) is missing, incomplete or damaged."""


def default_root() -> Path:
    """``$MADEIT_DATA`` if set, else ``<repo>/../shared/data``."""
    env = os.environ.get("MADEIT_DATA")
    if env:
        return Path(env).expanduser()
    return (REPO_ROOT.parent / "shared" / "data").resolve()


@dataclass(frozen=True)
class TaskMeta:
    task: str
    kind: str                      # "image" or "text"
    classes: tuple[str, ...]
    splits: dict[str, Any]
    image_size: tuple[int, int] | None = None
    channels: int | None = None
    raw: dict[str, Any] | None = None


class Mirror:
    """Read-only access to a mirror folder. Nothing is loaded until asked for."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()

    # ------------------------------------------------------------------ queries
    def exists(self) -> bool:
        return self.root.is_dir()

    def has_task(self, task: str) -> bool:
        return (self.root / task / "meta.json").is_file()

    def tasks(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob("*/meta.json"))

    def _missing(self, what: str, where: Path) -> MirrorError:
        return MirrorError(f"data mirror: {what} expected at {where}, not found (mirror root {self.root}). "
                           + HOW_TO_GET)

    def meta(self, task: str) -> TaskMeta:
        if not self.root.is_dir():
            raise self._missing("the mirror folder", self.root)
        folder = self.root / task
        if not folder.is_dir():
            raise self._missing(f"task folder {task!r}", folder)
        path = folder / "meta.json"
        if not path.is_file():
            raise self._missing(f"{task}/meta.json", path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MirrorError(f"data mirror: {path} is not valid JSON ({exc}). " + HOW_TO_GET) from exc
        for k in ("kind", "classes", "splits"):
            if k not in raw:
                raise MirrorError(f"data mirror: {path} lacks the field {k!r}")
        if raw["kind"] not in ("image", "text"):
            raise MirrorError(f"data mirror: {path}: kind must be 'image' or 'text', got {raw['kind']!r}")
        size = tuple(raw["image_size"]) if raw.get("image_size") else None
        return TaskMeta(task=task, kind=raw["kind"], classes=tuple(raw["classes"]), splits=dict(raw["splits"]),
                        image_size=size, channels=raw.get("channels"), raw=raw)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ loading
    def images(self, task: str, split: str) -> tuple[np.ndarray, np.ndarray]:
        """``(x uint8 [N, H, W, C], y int64 [N])`` of an image task, validated against meta.json."""
        meta = self.meta(task)
        if meta.kind != "image":
            raise MirrorError(f"data mirror: {task} is a {meta.kind} task, not an image task")
        path = self.root / task / f"{split}.npz"
        if not path.is_file():
            raise self._missing(f"{task}/{split}.npz", path)
        x, y = _load_npz(str(path), path.stat().st_mtime_ns)
        _check_images(x, y, len(meta.classes), str(path), meta)
        n = meta.splits.get(split, {}).get("n")
        if n is not None and n != len(y):
            raise MirrorError(f"data mirror: {path} holds {len(y)} rows but meta.json says {n}")
        return x, y

    def texts(self, task: str, split: str) -> tuple[list[str], np.ndarray]:
        """``(texts, labels int64)`` of a text task (``<label>\\t<text>`` lines)."""
        meta = self.meta(task)
        if meta.kind != "text":
            raise MirrorError(f"data mirror: {task} is an {meta.kind} task, not a text task")
        path = self.root / task / f"{split}.tsv"
        if not path.is_file():
            raise self._missing(f"{task}/{split}.tsv", path)
        texts: list[str] = []
        labels: list[int] = []
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                line = line.rstrip("\n")
                if not line:
                    continue
                head, sep, text = line.partition("\t")
                if not sep or not head.lstrip("-").isdigit():
                    raise MirrorError(f"data mirror: {path} line {i}: expected '<label>\\t<text>', got {line[:60]!r}")
                labels.append(int(head))
                texts.append(text)
        y = np.asarray(labels, dtype=np.int64)
        if len(y) and (y.min() < 0 or y.max() >= len(meta.classes)):
            bad = int(y.max()) if y.max() >= len(meta.classes) else int(y.min())
            raise MirrorError(f"data mirror: {path}: label {bad} out of range for {len(meta.classes)} classes")
        return texts, y

    # ------------------------------------------------------------------ checks
    def check(self, tasks: list[str] | None = None, verify_sha: bool = False) -> list[dict[str, Any]]:
        """Validate tasks (all by default): files present, shapes, labels; optionally sha256.

        Returns one row per (task, split) with counts; raises :class:`MirrorError` on the first
        problem.
        """
        if not self.root.is_dir():
            raise self._missing("the mirror folder", self.root)
        tasks = tasks if tasks is not None else self.tasks()
        sums = self._sha_sums() if verify_sha else {}
        rows = []
        for task in tasks:
            meta = self.meta(task)
            for split in meta.splits:
                if meta.kind == "image":
                    x, y = self.images(task, split)
                    shape = "x".join(map(str, x.shape[1:]))
                    fname = f"{task}/{split}.npz"
                else:
                    texts, y = self.texts(task, split)
                    shape = "text"
                    fname = f"{task}/{split}.tsv"
                if verify_sha:
                    expected = sums.get(fname)
                    if expected is None:
                        raise MirrorError(f"data mirror: {fname} is not listed in {self.root / 'SHA256SUMS'}")
                    got = sha256_file(self.root / fname)
                    if got != expected:
                        raise MirrorError(f"data mirror: sha256 of {self.root / fname} is {got}, "
                                          f"SHA256SUMS says {expected} (damaged or altered file). " + HOW_TO_GET)
                rows.append({"task": task, "split": split, "kind": meta.kind, "n": int(len(y)), "shape": shape,
                             "classes": len(meta.classes)})
        return rows

    def _sha_sums(self) -> dict[str, str]:
        path = self.root / "SHA256SUMS"
        if not path.is_file():
            raise self._missing("SHA256SUMS", path)
        out = {}
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                out[parts[1].lstrip("*")] = parts[0]
        return out


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@lru_cache(maxsize=8)
def _load_npz(path: str, mtime_ns: int) -> tuple[np.ndarray, np.ndarray]:
    """Load ``x``/``y`` of one npz (cached by path and modification time; arrays are read-only)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z.files or "y" not in z.files:
                raise MirrorError(f"data mirror: {path} must hold arrays 'x' and 'y', has {z.files}")
            x, y = z["x"], z["y"]
    except MirrorError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, ValueError, EOFError, OSError ...
        raise MirrorError(f"data mirror: {path} is not a readable npz file ({type(exc).__name__}: {exc}); "
                          "truncated or damaged? " + HOW_TO_GET) from exc
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _check_images(x: np.ndarray, y: np.ndarray, num_classes: int, where: str, meta: TaskMeta | None = None) -> None:
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise MirrorError(f"data mirror: {where}: x must be uint8 [N, H, W, C] with C in (1, 3), "
                          f"got {x.dtype} {list(x.shape)}")
    if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
        raise MirrorError(f"data mirror: {where}: y must be integer [N] with N = {x.shape[0]}, "
                          f"got {y.dtype} {list(y.shape)}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = int(y.max()) if int(y.max()) >= num_classes else int(y.min())
        raise MirrorError(f"data mirror: {where}: label {bad} out of range for {num_classes} classes")
    if meta is not None and meta.image_size is not None and tuple(x.shape[1:3]) != tuple(meta.image_size):
        raise MirrorError(f"data mirror: {where}: images are {list(x.shape[1:3])}, meta.json says "
                          f"{list(meta.image_size)}")
    if meta is not None and meta.channels is not None and x.shape[-1] != meta.channels:
        raise MirrorError(f"data mirror: {where}: {x.shape[-1]} channels, meta.json says {meta.channels}")


check_images = _check_images
