"""Content hashes that decide when a computed result is stale (the notebooks' guard).

- :func:`library_hash`: every ``madeit_core/**/*.py`` file (relative path and bytes), so any edit
  to the library, even one that a given notebook does not import, invalidates what was computed
  with the old code. Cheap: the library is a few hundred kB.
- :func:`json_hash`: a canonical JSON encoding (sorted keys) of parameters.
- :func:`files_hash`: a set of data files (relative path and bytes), e.g. committed reference
  results that a notebook shows.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent


def library_files(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Every ``*.py`` file under the package folder ``root`` (default: this package), sorted."""
    base = Path(root) if root is not None else PACKAGE_DIR
    return sorted(p for p in base.rglob("*.py") if "__pycache__" not in p.parts)


def files_hash(paths: Iterable[str | os.PathLike[str]], base: str | os.PathLike[str]) -> str:
    """SHA-256 over (path relative to ``base``, contents) of each file, in sorted path order."""
    h = hashlib.sha256()
    base = Path(base)
    entries = sorted((Path(p).resolve().relative_to(Path(base).resolve()).as_posix(), Path(p)) for p in paths)
    for rel, p in entries:
        h.update(rel.encode())
        h.update(b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def library_hash(root: str | os.PathLike[str] | None = None) -> str:
    """Hash of the library sources (see module docstring)."""
    base = Path(root) if root is not None else PACKAGE_DIR
    return files_hash(library_files(base), base)


def json_hash(obj: Any) -> str:
    """SHA-256 of the canonical JSON of ``obj`` (sorted keys; tuples read as lists)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


__all__ = ["PACKAGE_DIR", "files_hash", "json_hash", "library_files", "library_hash", "text_hash"]
