#!/usr/bin/env python
"""Execute the book's notebooks with papermill into notebooks/_executed/ (stale ones only).

    scripts/run_notebooks.py --profile smoke                 # every notebook, toy benchmark
    scripts/run_notebooks.py --profile smoke --only fig2_allocation
    scripts/run_notebooks.py --profile smoke --benchmark zoo # the offline benchmark's smoke groups
    scripts/run_notebooks.py --profile offline               # the reference sizes (long)

A notebook is executed again only when the library, its source, its parameters or the reference
results it shows changed since its executed copy was made (madeit_core/nbrun.py explains why this
guard and not jupyter-cache). The protocol runs behind the notebooks are cached on disk under
<results_dir>/lib-<library hash>/, shared by all notebooks of a build. Exit status 1 if any
notebook failed (its failed copy is kept as notebooks/_executed/<name>.failed.ipynb).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from madeit_core.codehash import library_hash  # noqa: E402
from madeit_core.errors import MergeInputError  # noqa: E402
from madeit_core.nbparams import NOTEBOOKS, notebook_parameters  # noqa: E402
from madeit_core.nbrun import execute, fingerprint, read_source, select, staleness  # noqa: E402
from madeit_core.nbsupport import stale_build_roots  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default=os.environ.get("PROFILE", "smoke"), help="smoke | offline")
    p.add_argument("--benchmark", default=os.environ.get("MADEIT_NB_BENCHMARK") or None,
                   help="toy | zoo (default: the profile's; env MADEIT_NB_BENCHMARK)")
    p.add_argument("--only", action="append", help="run only this notebook (repeatable)")
    p.add_argument("--force", action="store_true", help="execute even when the executed copy is current")
    p.add_argument("--list", action="store_true", help="print each notebook's state and exit")
    p.add_argument("--out", default=str(REPO / "notebooks" / "_executed"))
    p.add_argument("--results-dir", help="override the parameters' results_dir (build cache)")
    p.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds")
    p.add_argument("--log-output", action="store_true", help="stream the notebooks' outputs to the console")
    p.add_argument("--prune", action="store_true",
                   help="delete the build caches (<results_dir>/lib-*) of other library versions first")
    p.add_argument("--threads", type=int, help="torch/OpenMP threads of the kernels (default: OMP_NUM_THREADS, "
                                                 "else 1 on the toy benchmark, whose tiny matrices only lose time "
                                                 "to threading, else torch's default)")
    a = p.parse_args(argv)
    try:
        names = select(NOTEBOOKS, a.only)
        bench = notebook_parameters(names[0], a.profile, a.benchmark)["benchmark"] if names else None
        threads = a.threads or (None if "OMP_NUM_THREADS" in os.environ else 1 if bench == "toy" else None)
        if threads:
            os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
        lib = library_hash()
        if a.prune and names:
            rdir = a.results_dir or notebook_parameters(names[0], a.profile, a.benchmark)["results_dir"]
            for old in stale_build_roots(rdir, lib):
                print(f"[notebooks] removing the build cache of another library version: {old}")
                shutil.rmtree(old)
        failures, t_all = [], time.perf_counter()
        for name in names:
            params = notebook_parameters(name, a.profile, a.benchmark)
            if a.results_dir:
                params["results_dir"] = a.results_dir
            src = REPO / "notebooks" / f"{name}.md"
            text, _ = read_source(src)
            fp = fingerprint(name, text, params, REPO, lib)
            reason = staleness(Path(a.out) / f"{name}.ipynb", fp)
            if a.list:
                print(f"{name:<24} {'current' if reason is None else reason}")
                continue
            if reason is None and not a.force:
                print(f"[notebooks] {name}: current, skipped", flush=True)
                continue
            print(f"[notebooks] {name}: executing ({'forced' if reason is None else reason}) ...", flush=True)
            info = execute(name, src, params, a.out, REPO, fp, timeout=a.timeout, log_output=a.log_output)
            print(f"[notebooks] {name}: {info['status']} in {info['wall_s']:.1f} s", flush=True)
            if info["status"] != "ok":
                failures.append(name)
                print(f"[notebooks] {name}: {info['error']}", file=sys.stderr)
        if not a.list:
            print(f"[notebooks] done in {time.perf_counter() - t_all:.1f} s; "
                  f"{len(failures)} failed{': ' + ', '.join(failures) if failures else ''}")
        return 1 if failures else 0
    except MergeInputError as exc:
        print(f"run_notebooks: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
