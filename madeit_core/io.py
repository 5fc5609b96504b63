"""Atomic file writes and checkpoint loading.

Every result, cache and bank in the project is written through :func:`atomic_write`: the
content goes to a temporary file in the same folder, is flushed and fsync'ed, then renamed over
the target. A killed process therefore leaves either the old file or the new one, never a
partial one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from madeit_core.errors import MergeInputError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[Any]:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` on success."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON (indented unless ``indent`` is None: one compact line), atomically."""
    seps = None if indent is not None else (",", ":")
    text = json.dumps(obj, indent=indent, separators=seps, sort_keys=False, default=_json_default)
    with atomic_write(path, "w") as fh:
        fh.write(text + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"expected a JSON file at {p}, found none")
    with open(p, encoding="utf-8") as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as exc:
            raise MergeInputError(f"{p} is not valid JSON (truncated or corrupted?): {exc}") from exc


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def save_tensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> None:
    """Save a flat dict of tensors as safetensors, atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        # clone: safetensors refuses tensors that share storage (views of one parameter)
        contiguous = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
        save_file(contiguous, tmp, metadata=dict(metadata) if metadata else None)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"expected a safetensors file at {p}, found none")
    try:
        return load_file(str(p))
    except Exception as exc:  # safetensors raises several types for damaged files
        raise MergeInputError(f"{p} is not a readable safetensors file (truncated or corrupted?): {exc}") from exc


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a state dict from a torch ``.pt/.pth/.bin`` file, a ``.safetensors`` file, or a
    Hugging Face model folder (``model.safetensors``, ``pytorch_model.bin`` or a sharded index).

    A torch file holding ``{"state_dict": ...}`` (Lightning) or ``{"model": ...}`` is unwrapped.
    """
    p = Path(path)
    if p.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (p / name).is_file():
                return load_checkpoint(p / name)
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (p / index).is_file():
                weight_map = read_json(p / index)["weight_map"]
                out: dict[str, torch.Tensor] = {}
                for shard in sorted(set(weight_map.values())):
                    out.update(load_checkpoint(p / shard))
                return out
        raise MergeInputError(
            f"{p} is a folder but holds no model.safetensors, pytorch_model.bin or shard index")
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if p.suffix == ".safetensors":
        return load_tensors(p)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MergeInputError(f"{p} is not a readable torch checkpoint: {exc}") from exc
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model", "model_state_dict"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
    raise MergeInputError(f"{p} does not hold a state dict (a mapping of names to tensors)")
