"""Execute the book's notebooks with papermill, and never show a stale one.

A notebook (``notebooks/<name>.md``, jupytext MyST) is executed into
``notebooks/_executed/<name>.ipynb`` with its profile's parameters injected. The executed copy's
metadata records a *fingerprint*:

- ``library``: the hash of every ``madeit_core/**/*.py`` file (:func:`~madeit_core.codehash.library_hash`);
- ``source``: the hash of the notebook's source text;
- ``parameters``: the hash of the injected parameters;
- ``inputs``: the hash of the data files the notebook shows besides its own runs (the committed
  reference results; for ``performance`` the perf results).

The runner re-executes a notebook when any of the four differs from the executed copy's (or the
copy is missing, was written by another format, or failed), and skips it otherwise. jupyter-cache
would hash only the cells, so an edit to the library would leave old numbers on the page; here it
cannot. A failed execution removes the previous executed copy (the book then fails loudly instead
of showing old outputs) and keeps the failed notebook as ``<name>.failed.ipynb`` for inspection.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from madeit_core.codehash import files_hash, json_hash, library_hash, text_hash
from madeit_core.errors import MergeInputError
from madeit_core.io import atomic_write
from madeit_core.nbparams import REFERENCE_PROFILE

FORMAT = "madeit-nb/1"
META_KEY = "madeit"
PERF_DIR = "results/perf"
FINGERPRINT_KEYS = ("library", "source", "parameters", "inputs")


def input_files(name: str, params: Mapping[str, Any], repo_root: str | os.PathLike[str]) -> list[Path]:
    """The data files notebook ``name`` reads besides its own runs (see module docstring)."""
    root = Path(repo_root)
    if name == "performance":
        folder = root / PERF_DIR
        return sorted(folder.glob("*.json")) if folder.is_dir() else []
    ref = Path(params.get("reference_dir", "results/reference"))
    folder = (ref if ref.is_absolute() else root / ref) / REFERENCE_PROFILE
    return sorted(p for p in folder.rglob("*.json") if p.is_file()) if folder.is_dir() else []


def fingerprint(name: str, source: str, params: Mapping[str, Any], repo_root: str | os.PathLike[str],
                lib_hash: str | None = None) -> dict[str, str]:
    """The four hashes that decide whether an executed copy is current."""
    files = input_files(name, params, repo_root)
    return {"library": lib_hash or library_hash(), "source": text_hash(source),
            "parameters": json_hash(dict(params)),
            "inputs": files_hash(files, repo_root) if files else "none"}


def recorded(nb: Any) -> dict[str, Any] | None:
    meta = nb.get("metadata", {}).get(META_KEY)
    return dict(meta) if isinstance(meta, Mapping) else None


def staleness(executed: str | os.PathLike[str], fp: Mapping[str, str]) -> str | None:
    """None when the executed copy at ``executed`` is current for ``fp``; else the reason."""
    import nbformat

    path = Path(executed)
    if not path.is_file():
        return "not executed yet"
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as exc:  # unreadable copy: execute again
        return f"executed copy unreadable ({exc.__class__.__name__})"
    meta = recorded(nb)
    if meta is None or meta.get("format") != FORMAT:
        return "executed copy has no fingerprint"
    if meta.get("status") != "ok":
        return "previous execution failed"
    old = meta.get("fingerprint") or {}
    changed = [k for k in FINGERPRINT_KEYS if old.get(k) != fp.get(k)]
    return f"changed: {', '.join(changed)}" if changed else None


def read_source(path: str | os.PathLike[str]) -> tuple[str, Any]:
    """(source text, notebook) of a jupytext MyST notebook, checked for one ``parameters`` cell."""
    import jupytext

    text = Path(path).read_text(encoding="utf-8")
    nb = jupytext.reads(text, fmt="md:myst")
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        raise MergeInputError(f"{path}: expected exactly one cell tagged 'parameters', found {len(tagged)}")
    return text, nb


def check_parameters(nb: Any, params: Mapping[str, Any], source: str) -> None:
    """Every injected parameter must be assigned in the notebook's ``parameters`` cell."""
    cell = next(c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", []))
    names = set()
    for line in cell.source.splitlines():
        head = line.split("=", 1)[0].strip()
        if "=" in line and head.isidentifier():
            names.add(head)
    missing = sorted(set(params) - names)
    if missing:
        raise MergeInputError(f"{source}: its parameters cell does not define {missing}")


def execute(name: str, source_path: str | os.PathLike[str], params: Mapping[str, Any],
            out_dir: str | os.PathLike[str], repo_root: str | os.PathLike[str], fp: Mapping[str, str],
            kernel: str = "python3", timeout: int | None = None, log_output: bool = False) -> dict[str, Any]:
    """Execute one notebook with papermill into ``out_dir/<name>.ipynb`` (see module docstring)."""
    import nbformat
    import papermill

    _, nb = read_source(source_path)
    check_parameters(nb, params, str(source_path))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target, failed = out / f"{name}.ipynb", out / f"{name}.failed.ipynb"
    nb.metadata["kernelspec"] = {"name": kernel, "display_name": "Python 3", "language": "python"}
    nb.metadata.pop("jupytext", None)
    tmp_in, tmp_out = out / f".{name}.input.ipynb", out / f".{name}.output.ipynb"
    nbformat.write(nb, tmp_in)
    env_path = os.environ.get("PYTHONPATH", "")
    root = str(Path(repo_root).resolve())
    if root not in env_path.split(os.pathsep):
        os.environ["PYTHONPATH"] = root + (os.pathsep + env_path if env_path else "")
    t0 = time.perf_counter()
    status, error = "ok", None
    try:
        papermill.execute_notebook(str(tmp_in), str(tmp_out), parameters=dict(params), kernel_name=kernel,
                                   cwd=root, progress_bar=False, log_output=log_output,
                                   execution_timeout=timeout)
    except Exception as exc:  # papermill raises PapermillExecutionError, timeouts, kernel deaths
        status, error = "failed", f"{exc.__class__.__name__}: {exc}"
    wall = time.perf_counter() - t0
    tmp_in.unlink(missing_ok=True)
    info = {"format": FORMAT, "status": status, "fingerprint": dict(fp), "parameters": dict(params),
            "wall_s": round(wall, 2), "executed_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "error": error}
    if tmp_out.is_file():
        executed = nbformat.read(tmp_out, as_version=4)
        executed.metadata[META_KEY] = info
        hide_default_parameters(executed)
        dest = target if status == "ok" else failed
        with atomic_write(dest, "w") as fh:
            nbformat.write(executed, fh)
        tmp_out.unlink()
    if status == "ok":
        failed.unlink(missing_ok=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
    return info


def hide_default_parameters(nb: Any) -> None:
    """Tag the source's ``parameters`` cell ``remove-cell`` when papermill injected the values in use
    (the book then shows the injected cell only, not two parameter cells that may disagree)."""
    def tags(c: Any) -> list[str]:
        return list(c.get("metadata", {}).get("tags", []))

    if any("injected-parameters" in tags(c) for c in nb.cells):
        for c in nb.cells:
            if "parameters" in tags(c) and "remove-cell" not in tags(c):
                c.metadata["tags"] = tags(c) + ["remove-cell"]


def select(names: Sequence[str], only: Sequence[str] | None) -> list[str]:
    if not only:
        return list(names)
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise MergeInputError(f"unknown notebook(s) {unknown}; known: {', '.join(names)}")
    return [n for n in names if n in only]


__all__ = ["FINGERPRINT_KEYS", "FORMAT", "META_KEY", "check_parameters", "execute", "fingerprint",
           "hide_default_parameters", "input_files", "read_source", "recorded", "select", "staleness"]
