"""Execute the book's notebooks with papermill into notebooks/_executed/<name>.ipynb.

Usage: python scripts/run_notebooks.py [--profile smoke] [--only NAME ...] [--force] [-p key=value ...]

Each notebook (jupytext MyST ``notebooks/<name>.md``) is converted to ipynb and executed with the
profile injected into its ``parameters`` cell. **Stale-results guard**: the executed notebook's
metadata records a fingerprint of (every ``madeit_core/**/*.py`` file, the notebook source, the
parameters); a notebook is re-executed whenever that fingerprint differs and skipped otherwise.
(jupyter-cache hashes only a notebook's own cells, so a library change would go unnoticed.)
The results the notebooks compute are themselves stored under the library hash
(:func:`madeit_core.book.runs_dir`), so notebooks share runs without ever reusing stale ones.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from madeit_core.book import library_hash  # noqa: E402

NOTEBOOKS = ["table1_acc_bwt", "tables4_6_per_task", "table2_affinity_cosine", "fig2_allocation",
             "fig3_experts_kept", "fig4_score_densities", "fig5_task_heatmaps", "fig6_sensitivity",
             "ablations", "routing_accuracy", "performance"]
META_KEY = "madeit"
log = logging.getLogger("run_notebooks")


def fingerprint(name: str, params: dict[str, Any], src_dir: Path = ROOT / "notebooks") -> dict[str, str]:
    src = (src_dir / f"{name}.md").read_bytes()
    return {"library": library_hash(ROOT), "notebook": hashlib.sha256(src).hexdigest()[:16],
            "parameters": hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]}


def is_fresh(executed: Path, fp: dict[str, str]) -> bool:
    """True when ``executed`` exists, finished, and carries exactly the fingerprint ``fp``."""
    if not executed.is_file():
        return False
    try:
        nb = json.loads(executed.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    meta = nb.get("metadata", {}).get(META_KEY, {})
    return meta.get("fingerprint") == fp and meta.get("status") == "ok"


def execute(name: str, params: dict[str, Any], out_dir: Path, force: bool = False) -> str:
    import jupytext
    import nbformat
    import papermill

    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{name}.ipynb"
    fp = fingerprint(name, params)
    if not force and is_fresh(target, fp):
        log.info("%s: up to date (library %s)", name, fp["library"])
        return "cached"
    nb = jupytext.read(ROOT / "notebooks" / f"{name}.md")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"{name}.ipynb"
        nbformat.write(nb, src)
        partial = Path(tmp) / f"{name}.out.ipynb"
        t0 = time.perf_counter()
        papermill.execute_notebook(str(src), str(partial), parameters=params, cwd=str(ROOT / "notebooks"),
                                   progress_bar=False, kernel_name="python3")
        done = nbformat.read(partial, as_version=4)
        done.metadata[META_KEY] = {"fingerprint": fp, "status": "ok", "parameters": params,
                                   "seconds": round(time.perf_counter() - t0, 1)}
        tmp_target = target.with_suffix(".ipynb.tmp")
        nbformat.write(done, tmp_target)
        os.replace(tmp_target, target)
    log.info("%s: executed in %.0f s", name, done.metadata[META_KEY]["seconds"])
    return "executed"


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--only", nargs="*", help="notebook names (default: all)")
    ap.add_argument("--force", action="store_true", help="execute even when up to date")
    ap.add_argument("-p", "--param", action="append", default=[], help="extra parameter key=value (JSON value)")
    ap.add_argument("--out", default=str(ROOT / "notebooks" / "_executed"))
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # the kernels import the library from this checkout
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    names = a.only or NOTEBOOKS
    unknown = [n for n in names if n not in NOTEBOOKS]
    if unknown:
        ap.error(f"unknown notebook(s) {unknown}; known: {NOTEBOOKS}")
    params: dict[str, Any] = {"profile": a.profile}
    for kv in a.param:
        k, _, v = kv.partition("=")
        params[k] = parse_value(v)
    timings = {}
    for name in names:
        t0 = time.perf_counter()
        status = execute(name, params, Path(a.out), force=a.force)
        timings[name] = (status, round(time.perf_counter() - t0, 1))
    for name, (status, s) in timings.items():
        print(f"{name:<24} {status:<9} {s:>7.1f} s")
    print(f"{'total':<34} {sum(s for _, s in timings.values()):>7.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
