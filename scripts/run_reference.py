#!/usr/bin/env python
"""Regenerate the committed reference results that every notebook shows beside its own.

    scripts/run_reference.py --profile offline --runs 10 --out results/reference

runs every protocol run and analysis the notebooks read (Table 1's methods, Table 2, the
ablations, the ρ/λ sweeps, the pairwise scores of Figs. 4-5) on the profile's groups (offline:
offline-8, offline-14, offline-20) and the first N orders (seeds 42 .. 42+N-1), writing
results/reference/<profile>/... and a manifest with timings. It is resumable: run the same
command again after an interruption. Only JSON is meant for git (the .gitignore leaves out the
expert tensors, resume states and the evaluation cache). Each process uses one torch thread unless
``--threads`` says otherwise: run one process per core (they share the folder safely), and re-run
a committed file with the thread count its manifest records to get it bit for bit.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from madeit_core.errors import MergeInputError  # noqa: E402
from madeit_core.nbparams import NOTEBOOKS, parameter_set  # noqa: E402
from madeit_core.nbsupport import SEED_BASE  # noqa: E402
from madeit_core.reference import reference_jobs, run_reference  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="offline")
    p.add_argument("--benchmark", help="toy | zoo (default: the profile's)")
    p.add_argument("--groups", nargs="+", help="task groups (default: the profile's)")
    p.add_argument("--runs", type=int, help="number of orders: seeds 42 .. 42+N-1 (default: the profile's)")
    p.add_argument("--methods", nargs="+", help="Table 1's methods (default: all)")
    p.add_argument("--notebooks", nargs="+", choices=NOTEBOOKS, help="only the runs these notebooks need")
    p.add_argument("--out", default="results/reference")
    p.add_argument("--device", default="auto")
    p.add_argument("--allow-code-change", action="store_true",
                   help="resume although the library changed since the manifest was started")
    p.add_argument("--no-analysis", action="store_true", help="skip the pairwise scores of Figs. 4-5")
    p.add_argument("--dry-run", action="store_true", help="list the jobs and exit")
    p.add_argument("--activation-cache-mb", type=float, default=5120,
                   help="budget of MADE-IT's cache of θ0's module inputs, shared by the runs of this process "
                        "(madeit_core.activation_cache; 5120 keeps every offline-20 test set; 0: off)")
    p.add_argument("--zoo-summaries", default="results/zoo",
                   help="committed zoo summaries (<group>.json) the zoo must match before any run (default "
                        "results/zoo; a group without one is not checked)")
    p.add_argument("--allow-zoo-mismatch", action="store_true",
                   help="run although the zoo differs from its committed summary")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of this process (default 1, as most committed runs: the bits of a run "
                        "depend on it, and each run's file records it under manifest.hardware.torch_threads; "
                        "0 keeps torch's default)")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    if a.threads < 0:
        p.error(f"--threads must be ≥ 0, got {a.threads}")
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    os.environ["MADEIT_ACTIVATION_CACHE_MB"] = str(a.activation_cache_mb)   # read at the cache's first use
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        params = parameter_set(a.profile, a.benchmark)
        if a.groups:
            params["groups"] = a.groups
        if a.runs:
            params["seeds"] = [SEED_BASE + r for r in range(a.runs)]
        if a.methods:
            params["methods"] = a.methods
        params["device"] = a.device
        jobs = reference_jobs(params, a.notebooks)
        n = sum(len(j.runs) * len(j.seeds) for j in jobs)
        if a.dry_run:
            for j in jobs:
                print(f"{j.group}: {len(j.runs)} runs x {len(j.seeds)} orders  ({', '.join(r.label for r in j.runs)})")
            print(f"total: {n} protocol runs")
            return 0
        out = Path(a.out) if Path(a.out).is_absolute() else REPO / a.out
        summaries = None if a.allow_zoo_mismatch else (
            Path(a.zoo_summaries) if Path(a.zoo_summaries).is_absolute() else REPO / a.zoo_summaries)
        m = run_reference(params, out, a.notebooks, allow_code_change=a.allow_code_change,
                          analysis=not a.no_analysis, command=["scripts/run_reference.py", *sys.argv[1:]],
                          zoo_summaries=summaries)
        print(f"reference {a.profile}: {len(m['runs'])} runs recorded, {m['wall_s_last_invocation']:.0f} s this "
              f"invocation, {m['wall_s_runs_total']:.0f} s of runs in all; "
              f"manifest {out / a.profile / 'manifest.json'}")
        return 0
    except MergeInputError as exc:
        print(f"run_reference: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
