"""Generate the committed reference results: every protocol run and analysis the notebooks show.

``scripts/run_reference.py`` is the command; this module does the work. The plan is the union of
the notebooks' jobs (:func:`madeit_core.bookplan.notebook_jobs`) under the profile's parameters,
so the reference holds exactly what the book reads. Runs go through
:func:`~madeit_core.reproduce.run_grid` into ``<out>/<profile>/<group>/<method>/seed<s>.json``,
the zoo's models first, then the runs cheapest methods first (:data:`COST_TIERS`), so a run stopped
early leaves whole rows; finished runs are skipped, killed ones resume. A manifest (``<out>/<profile>/manifest.json``,
written atomically after every run) records the library hash, commit, hardware, command and the
wall time of every run; resuming under a different library is refused unless asked for, and the
manifest then lists every library that contributed.

Several invocations may share one folder at once (e.g. ``--methods mingle`` and ``--notebooks
ablations`` on a 2-core machine, one thread each): every manifest write re-reads the file under a
lock and merges (runs and analyses by key, groups/seeds/notebooks/commands by union), and a run
is claimed by a ``<file>.claim`` holding the claimant's host and pid before it starts, so two
processes never run the same one; a claim whose process is gone is taken over.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from madeit_core.bookplan import MADE_IT_DEFAULTS, Job, merge_jobs, notebook_jobs
from madeit_core.codehash import json_hash, library_hash
from madeit_core.errors import MergeInputError
from madeit_core.io import read_json, write_json
from madeit_core.nbparams import NOTEBOOKS
from madeit_core.nbsupport import analysis_path, pairwise_for_benchmark, pairwise_name, runs_for_seeds
from madeit_core.protocol import RunSpec, git_commit, group_tasks, hardware, resolve_device, results_path
from madeit_core.reproduce import MethodRun, run_grid

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "madeit-reference/1"
#: notebooks whose figures need the tasks' own experts (pairwise scores), not protocol runs
PAIRWISE_NOTEBOOKS = ("fig4_score_densities", "fig5_task_heatmaps")


#: Rough cost order of the methods (cheapest first), so an interrupted reference run has finished
#: the most rows: weight arithmetic, MADE-IT, test-time adaptation and training, ODE-M.
COST_TIERS: dict[str, int] = {"pretrained": 0, "individual": 0, "swa": 0, "task_arithmetic": 0, "ties": 0,
                              "opcm": 0, "made_it": 1, "adamerging": 2, "wemoe": 2, "continual_finetuning": 2,
                              "mingle": 3, "odem": 4}


def reference_jobs(params: Mapping[str, Any], notebooks: Sequence[str] | None = None) -> list[Job]:
    names = list(notebooks) if notebooks else list(NOTEBOOKS)
    return merge_jobs(j for n in names for j in notebook_jobs(n, params))


def run_order(jobs: Sequence[Job]) -> list[tuple[Job, MethodRun, int]]:
    """Every (job, run, protocol run index), cheapest methods first; within a cost tier by group
    (in the jobs' order), then by order seed, then by the plan's order of runs."""
    items = []
    for gi, j in enumerate(jobs):
        for ri, run in enumerate(j.runs):
            for r in runs_for_seeds(j.seeds):
                items.append(((COST_TIERS.get(run.method, 3), gi, r, ri), (j, run, r)))
    return [it for _, it in sorted(items, key=lambda x: x[0])]


def _utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def load_manifest(folder: Path, params: Mapping[str, Any], lib: str, allow_code_change: bool) -> dict[str, Any]:
    f = folder / "manifest.json"
    if not f.is_file():
        return {"format": MANIFEST_FORMAT, "profile": params["profile"], "benchmark": params["benchmark"],
                "library_hash": lib, "library_hashes": [lib], "started_utc": _utc(), "runs": {}, "analysis": {}}
    m = read_json(f)
    if m.get("format") != MANIFEST_FORMAT:
        raise MergeInputError(f"{f}: not a reference manifest (format {m.get('format')!r})")
    if m.get("profile") != params["profile"] or m.get("benchmark") != params["benchmark"]:
        raise MergeInputError(f"{f} belongs to profile {m.get('profile')!r} / benchmark {m.get('benchmark')!r}, "
                              f"not {params['profile']!r} / {params['benchmark']!r}")
    if m.get("library_hash") != lib:
        if not allow_code_change:
            raise MergeInputError(
                f"{f} was started with library {str(m.get('library_hash'))[:12]}, this is {lib[:12]}: the results "
                "would mix two versions of the code. Pass --allow-code-change to continue anyway (the manifest then "
                "lists both), or --force to start over.")
        m["library_hash"] = lib
        m.setdefault("library_hashes", []).append(lib)
    return m


@contextlib.contextmanager
def _manifest_lock(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".manifest.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def save_manifest(folder: Path, manifest: dict[str, Any], mine: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Write ``manifest`` after merging what other invocations wrote meanwhile; returns the merge.

    ``mine``: ``{"runs": {...}, "analysis": {...}}``, the entries this invocation made; they win
    over the file's for the same key, the file's win over what this invocation read at its start. Groups, seeds and
    notebooks become the union (:func:`merged_scope`), commands and library hashes too."""
    f = folder / "manifest.json"
    with _manifest_lock(folder):
        if f.is_file():
            disk = read_json(f)
            for part in ("runs", "analysis"):
                manifest[part] = {**manifest.get(part, {}), **disk.get(part, {}), **mine.get(part, {})}
            scope = {"profile": manifest.get("profile"), "groups": manifest.get("groups", []),
                     "seeds": manifest.get("seeds", [])}
            manifest.update(merged_scope(disk, scope, manifest.get("notebooks") or None))
            for part in ("commands", "library_hashes"):
                merged: list[Any] = []
                for item in [*disk.get(part, []), *manifest.get(part, [])]:
                    if item not in merged:
                        merged.append(item)
                manifest[part] = merged
        manifest["wall_s_runs_total"] = round(sum(entry_wall_s(v) for v in manifest["runs"].values()), 3)
        manifest["updated_utc"] = _utc()
        write_json(f, manifest)
    return manifest


def run_wall_s(results: Mapping[str, Any], wall_this_invocation: float) -> float:
    """A run's wall time over every process that worked on it: a run killed and resumed records
    the earlier processes' time up to their last saved step (``timings.wall_s_all_processes``);
    results files from before that field fall back to the sum of their step timings, and never
    less than this invocation's own wall time."""
    t = results.get("timings", {})
    if "wall_s_all_processes" in t:
        return max(float(t["wall_s_all_processes"]), wall_this_invocation)
    steps = sum(float(t.get(k, 0.0)) for k in ("absorb_s", "eval_s", "final_eval_s"))
    return max(steps, wall_this_invocation)


def entry_wall_s(entry: Mapping[str, Any]) -> float:
    """A manifest run entry's wall time over all its processes (``wall_s`` for older entries)."""
    return float(entry.get("wall_s_all_processes", entry["wall_s"]))


def _disk_runs(folder: Path) -> dict[str, Any]:
    f = folder / "manifest.json"
    with _manifest_lock(folder):
        return dict(read_json(f).get("runs", {})) if f.is_file() else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_run(path: Path) -> Path | None:
    """Claim the run whose results go to ``path``: the claim file, or None when a live process on
    this host holds it. A claim left by a process that is gone (killed run) is taken over."""
    claim = path.with_suffix(".claim")
    claim.parent.mkdir(parents=True, exist_ok=True)
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                host, pid = claim.read_text().split()
                alive = host != socket.gethostname() or _pid_alive(int(pid))
            except (OSError, ValueError):
                alive = False              # unreadable or half-written: the claimant died writing it
            if alive and f"{host} {pid}" != me:
                return None
            claim.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(me)
        return claim
    return None


def _manifest_key(path: Path) -> str:
    """``<group>/<method[-tag]>/seed<s>.json`` of a results path."""
    return f"{path.parent.parent.name}/{path.parent.name}/{path.name}"


def run_key(group: str, run: MethodRun, r: int, profile: str) -> str:
    """The manifest key of protocol run ``r`` of ``run`` on ``group``: ``<group>/<method[-tag]>/seed<s>.json``."""
    spec = RunSpec(method=run.method, group=group, run=r, profile=profile, hparams=dict(run.hparams))
    return _manifest_key(results_path(Path("."), spec))


def grid_status(manifest: Mapping[str, Any] | None, jobs: Sequence[Job], profile: str,
                tasks_per_group: Mapping[str, int] | None = None,
                folder: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Per planned (group, row): orders recorded in ``manifest`` of those planned, the median wall
    time of a recorded run, and the time the missing ones would take at that median (None when
    no run of the row has finished). The plan is ``jobs`` (e.g. :func:`reference_jobs`).

    A row with no finished run on its group gets ``extrapolated_s``: the same row's median on the
    group with the nearest number of tasks, scaled by :func:`cost_units` from that number of tasks
    to this one, times the missing runs: a rough guess, None when no group has a finished run.
    ``tasks_per_group`` defaults to the task groups' sizes. With ``folder`` (the manifest's own), a
    run counts only while its results file is there (one moved aside or deleted to be re-run is not
    done, whatever the manifest still says)."""
    runs = (manifest or {}).get("runs", {})
    base = Path(folder) if folder is not None else None
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for j in jobs:
        for run in j.runs:
            row = rows.setdefault((j.group, run.label), {"group": j.group, "label": run.label, "method": run.method,
                                                         "planned": 0, "done": 0, "walls": []})
            for r in runs_for_seeds(j.seeds):
                key = run_key(j.group, run, r, profile)
                row["planned"] += 1
                if key in runs and (base is None or (base / key).is_file()):
                    row["done"] += 1
                    row["walls"].append(entry_wall_s(runs[key]))
    out = []
    for row in rows.values():
        walls = row.pop("walls")
        med = statistics.median(walls) if walls else None
        row["median_wall_s"] = med
        row["missing_s"] = None if med is None else med * (row["planned"] - row["done"])
        out.append(row)

    def size(group: str) -> int | None:
        if tasks_per_group is not None:
            return tasks_per_group.get(group)
        try:
            return len(group_tasks(group))
        except MergeInputError:
            return None

    import madeit_core.data.suites  # noqa: F401  (registers the offline task groups)

    sizes = {g: size(g) for g in {r["group"] for r in out}}
    for row in out:
        row["extrapolated_s"] = None
        t = sizes[row["group"]]
        if row["median_wall_s"] is not None or t is None:
            continue
        known = [(abs(sizes[o["group"]] - t), sizes[o["group"]], o["median_wall_s"]) for o in out
                 if o["label"] == row["label"] and o["median_wall_s"] is not None and sizes[o["group"]]]
        if known:
            _, t0, med = min(known)
            unit = cost_units(row["method"], t) / cost_units(row["method"], t0)
            row["extrapolated_s"] = med * unit * (row["planned"] - row["done"])
    return out


def cost_units(method: str, num_tasks: int) -> float:
    """What a run's time grows with, in arbitrary units, for :func:`grid_status`'s extrapolation:
    ODE-M's merge steps are Euler steps of about equal cost (each a pass over the same 2,048
    calibration images whatever the number of tasks), Σ_k ⌊100/k⌋ of them at its default step of
    0.01 (170 for 8 tasks, 222 for 14, 254 for 20); every other method does about the same work
    per task, so its units are the number of tasks."""
    if method == "odem":
        from madeit_core.methods.odem import euler_times

        return float(sum(len(euler_times(k)[0]) for k in range(2, num_tasks + 1)))
    return float(num_tasks)


def grid_status_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The status table: a line per row label, a column per group, each cell "orders done / planned
    · median seconds per run"; then the totals and the time left at the recorded pace."""
    def fmt_s(v: float) -> str:
        return f"{v / 3600:.1f} h" if v >= 3600 else f"{v / 60:.0f} min" if v >= 60 else f"{v:.0f} s"

    groups = list(dict.fromkeys(r["group"] for r in rows))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    cell = {(r["label"], r["group"]): r for r in rows}
    lines = ["| row | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    for label in labels:
        cells = []
        for g in groups:
            r = cell.get((label, g))
            if r is None:
                cells.append("")
                continue
            med = "" if r["median_wall_s"] is None else f" · {r['median_wall_s']:.0f} s"
            cells.append(f"{r['done']}/{r['planned']}{med}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    done, planned = sum(r["done"] for r in rows), sum(r["planned"] for r in rows)
    known = sum(r["missing_s"] for r in rows if r["missing_s"] is not None)
    unknown = [r for r in rows if r["median_wall_s"] is None]
    guessed = [r["extrapolated_s"] for r in unknown if r.get("extrapolated_s") is not None]
    tail = ""
    def rows_(n: int) -> str:
        return f"{n} group row{'s' if n != 1 else ''}"

    if guessed:
        tail += (f"; {rows_(len(guessed))} with no finished run yet would add roughly {fmt_s(sum(guessed))} "
                 "(the same row's median on the group with the nearest number of tasks, scaled to this one's: by "
                 "the number of Euler steps for ODE-M, by the number of tasks otherwise)")
    if len(unknown) > len(guessed):
        n = len(unknown) - len(guessed)
        tail += f"; {rows_(n)} with no finished run anywhere {'are' if n != 1 else 'is'} not counted"
    rest = (f"the rest would take about {fmt_s(known)} at the recorded pace" if known > 0 else
            "the rows with finished runs are complete")
    return ("\n".join(lines) + "\n\nCells: orders done / planned · median wall time of a finished run (all its "
            f"processes, for a run that was killed and resumed). {done} of {planned} protocol runs recorded; "
            f"{rest}{tail}.\n")

def analysis_status(manifest: Mapping[str, Any] | None, groups: Sequence[str]) -> dict[str, bool]:
    """Planned analysis (the pairwise scores of Figs. 4-5 per group, at MADE-IT's default rank
    ratio) → whether ``manifest`` records it."""
    done = (manifest or {}).get("analysis", {})
    names = [pairwise_name(g, MADE_IT_DEFAULTS["rank_ratio"]) for g in groups]
    return {n: n in done for n in names}


def analysis_status_markdown(status: Mapping[str, bool]) -> str:
    """One sentence: which planned analyses the reference holds."""
    if not status:
        return ""
    parts = [f"`{n}` {'recorded' if ok else 'missing'}" for n, ok in status.items()]
    return f"Pairwise scores of Figures 4-5 ({sum(status.values())} of {len(status)}): " + ", ".join(parts) + ".\n"


def merged_scope(manifest: Mapping[str, Any], params: Mapping[str, Any], notebooks: Sequence[str] | None
                 ) -> dict[str, list[Any]]:
    """The groups, seeds and notebooks a reference folder covers after one more invocation: the
    union of what the manifest already lists and what this one runs (groups in the profile's order,
    seeds ascending). An invocation limited to one group or notebook must not hide the others'
    committed results from the book, which reads the manifest's groups and seeds."""
    from madeit_core.profiles import PROFILES

    order = list(PROFILES[params["profile"]].groups) if params.get("profile") in PROFILES else []
    seen = list(dict.fromkeys([*manifest.get("groups", []), *params["groups"]]))
    groups = sorted(seen, key=lambda g: (order.index(g) if g in order else len(order), seen.index(g)))
    seeds = sorted({int(x) for x in [*manifest.get("seeds", []), *params["seeds"]]})
    nbs = list(dict.fromkeys([*manifest.get("notebooks", []), *(notebooks or NOTEBOOKS)]))
    return {"groups": groups, "seeds": seeds, "notebooks": nbs}


def check_zoo(bench: Any, tasks: Sequence[str], group: str, summaries: str | os.PathLike[str] | None) -> None:
    """Refuse a zoo whose models are not the committed ones.

    ``summaries``: a folder of committed zoo summaries (``results/zoo``); when it holds
    ``<group>.json``, every task's cache key, probe and fine-tuned accuracy must match it
    (:func:`madeit_core.zoo.compare_to_report`). A cache key alone is not enough: a rebuild of
    the same recipe under another code path or thread count gave other encoders under the same key.
    """
    if summaries is None:
        return
    f = Path(summaries) / f"{group}.json"
    if not f.is_file():
        log.info("no committed zoo summary %s: the zoo of %s is not checked", f, group)
        return
    from madeit_core.zoo import compare_to_report

    manifests = [read_json(bench.zoo.task_dir(t) / "manifest.json") for t in tasks]
    diffs = compare_to_report(manifests, read_json(f))
    if diffs:
        raise MergeInputError(f"the zoo of {group} is not the one the committed results were made on ({f}); "
                              f"new runs would not belong beside them. Differences in {len(diffs)} of {len(tasks)} "
                              "tasks:\n  " + "\n  ".join(diffs) + "\nRebuild it (madeit zoo build --force "
                              f"--expect {f}) or pass --allow-zoo-mismatch to run on it anyway.")
    log.info("zoo of %s matches %s (%d tasks)", group, f, len(tasks))


def run_reference(params: Mapping[str, Any], out: str | os.PathLike[str], notebooks: Sequence[str] | None = None,
                  allow_code_change: bool = False, analysis: bool = True, show_progress: bool = True,
                  command: Sequence[str] | None = None, zoo_summaries: str | os.PathLike[str] | None = None
                  ) -> dict[str, Any]:
    """Run every job of ``notebooks`` (default: all) under ``params`` into ``out``; returns the manifest.

    ``zoo_summaries``: a folder of committed zoo summaries to check the zoo against before any
    run (:func:`check_zoo`); None checks nothing."""
    from tqdm.auto import tqdm

    from madeit_core.benchmarks import make_benchmark

    out = Path(out)
    folder = out / params["profile"]
    lib = library_hash()
    manifest = load_manifest(folder, params, lib, allow_code_change)
    device = resolve_device(params.get("device", "auto"))
    jobs = reference_jobs(params, notebooks)
    cmd = list(command) if command is not None else list(sys.argv)
    manifest.update(merged_scope(manifest, params, notebooks))
    manifest.setdefault("commands", []).append(cmd)
    manifest.update({"command": cmd, "git_commit": git_commit(), "hardware": hardware(), "device": device,
                     "python": platform.python_version()})
    total = sum(len(j.runs) * len(j.seeds) for j in jobs)
    mine: dict[str, dict[str, Any]] = {"runs": {}, "analysis": {}}   # what this invocation adds
    benches: dict[str, tuple[Any, list[str]]] = {}

    def bench(group: str) -> tuple[Any, list[str]]:
        if group not in benches:
            if params["benchmark"] == "zoo":   # build (or check) every fine-tuned model before any run
                from madeit_core import zoo

                benches[group] = zoo.make_benchmark(group, profile=params["profile"], device=device, build=True,
                                                    show_progress=show_progress)
                check_zoo(*benches[group], group, zoo_summaries)
            else:
                benches[group] = make_benchmark(params["benchmark"], group, profile=params["profile"], device=device)
        return benches[group]

    t_start = time.perf_counter()
    for g in params["groups"]:                       # the zoo first: every group's models exist before any run
        bench(g)
    bar = tqdm(total=total, desc=f"reference {params['profile']}", disable=not show_progress)
    for j, run, r in run_order(jobs):
        spec = RunSpec(method=run.method, group=j.group, run=r, profile=params["profile"], hparams=dict(run.hparams))
        path = results_path(out, spec)
        key = _manifest_key(path)
        bar.set_postfix_str(key)
        if path.is_file() and (key in manifest["runs"] or key in _disk_runs(folder)):
            bar.update(1)
            continue
        claim = claim_run(path)
        if claim is None:                  # another invocation is running it
            log.info("%s is being run by another process; skipped", key)
            bar.update(1)
            continue
        try:
            existed = path.is_file()
            b, tasks = bench(j.group)
            t0 = time.perf_counter()
            res = run_grid(b, j.group, tasks, [run], [r], out, params["profile"], device=device,
                           eval_seen=j.eval_seen, show_progress=show_progress)[0]
            wall = time.perf_counter() - t0
            mine["runs"][key] = {"label": run.label, "wall_s": round(wall, 3),
                                 "wall_s_all_processes": round(run_wall_s(res, wall), 3),
                                 "ACC": res["ACC"], "BWT": res["BWT"], "library_hash": lib,
                                 "existed_before": existed, "finished_utc": _utc()}
            manifest = save_manifest(folder, manifest, mine)
        finally:
            claim.unlink(missing_ok=True)
        bar.update(1)
    bar.close()
    if analysis and (not notebooks or any(n in PAIRWISE_NOTEBOOKS for n in notebooks)):
        rho = MADE_IT_DEFAULTS["rank_ratio"]
        for g in params["groups"]:
            b, tasks = bench(g)
            name = pairwise_name(g, rho)
            key = json_hash({"bench": b.describe(), "rank_ratio": rho})
            f = analysis_path(out, params["profile"], name)
            if f.is_file() and read_json(f).get("key") == key:
                continue
            t0 = time.perf_counter()
            write_json(f, {"key": key, "value": pairwise_for_benchmark(b, tasks, rho)})
            mine["analysis"][name] = {"wall_s": round(time.perf_counter() - t0, 3), "library_hash": lib,
                                      "finished_utc": _utc()}
            manifest = save_manifest(folder, manifest, mine)
    manifest["wall_s_last_invocation"] = round(time.perf_counter() - t_start, 3)
    return save_manifest(folder, manifest, mine)


__all__ = ["COST_TIERS", "MANIFEST_FORMAT", "analysis_status", "analysis_status_markdown", "check_zoo", "claim_run",
           "cost_units", "entry_wall_s", "grid_status",
           "grid_status_markdown", "load_manifest", "reference_jobs", "run_key", "run_order", "run_reference",
           "run_wall_s", "save_manifest"]
