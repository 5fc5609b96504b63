"""The continual evaluation protocol (paper §4.1, Appendix C.2; method.md "Protocol"; baselines.md §9).

- Task orders: run r uses seed s = 42 + r and ``random.seed(s); random.shuffle(order)`` on the
  group's config order (matches the reference scripts exactly).
- After absorbing task i the merged model is evaluated on task i (a_{i,i}); optionally on every
  task seen so far (the reference's per-step report). After the last task: all tasks (a_{T,i}).
- ACC = mean_i a_{T,i}; BWT = mean_{i<T} (a_{T,i} − a_{i,i}) (both × 100, as the paper reports).
- One JSON results file per (method, profile, group, seed), written atomically. After every step
  the method's state and the partial results are saved, so a killed run resumes where it stopped
  and ends with the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import random
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import madeit_core
from madeit_core.benchmark import Benchmark
from madeit_core.errors import MergeInputError
from madeit_core.io import load_tensors, read_json, save_tensors, write_json
from madeit_core.methods import get_method
from madeit_core.methods.base import ContinualMethod, MergeContext

log = logging.getLogger(__name__)

# Config orders of the reference task groups (baselines.md §9.1).
CLIP_TA8 = ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
CLIP_TALL14 = CLIP_TA8 + ["oxford_flowers102", "pcam", "fer2013", "oxford-iiit-pet", "stl10", "cifar100"]
CLIP_TALL20 = CLIP_TALL14 + ["cifar10", "food101", "fashion_mnist", "emnist_letters", "kmnist", "rendered-sst2"]
TASK_GROUPS: dict[str, list[str]] = {"clip-8": CLIP_TA8, "clip-14": CLIP_TALL14, "clip-20": CLIP_TALL20}


def register_group(name: str, tasks: Sequence[str]) -> None:
    """Make a task group (config order) available to :func:`group_tasks` (used by the zoo)."""
    if len(set(tasks)) != len(tasks):
        raise MergeInputError(f"task group {name!r} has duplicate tasks")
    TASK_GROUPS[name] = list(tasks)


def group_tasks(name: str) -> list[str]:
    if name not in TASK_GROUPS:
        raise MergeInputError(f"unknown task group {name!r}; known: {', '.join(sorted(TASK_GROUPS))}")
    return list(TASK_GROUPS[name])


def seed_for_run(run: int) -> int:
    return 42 + run


def task_order(tasks: Sequence[str], seed: int) -> list[str]:
    """``random.seed(seed); random.shuffle(order)`` on a copy of the config order.

    Uses a private ``random.Random`` with the same seed, which yields the same permutation as
    the global generator without disturbing it.
    """
    order = list(tasks)
    random.Random(seed).shuffle(order)
    return order


def acc_bwt(acc: Sequence[Sequence[float | None]]) -> tuple[float, float]:
    """ACC and BWT (in %) from a T × T accuracy matrix a[i][j] (step i, task j; 0-based).

    Only a[i][i] and a[T−1][j] are needed; other entries may be None. BWT averages over the
    first T − 1 tasks (MINGLE's definition; 0 when T = 1).
    """
    T = len(acc)
    if T == 0 or any(len(r) != T for r in acc):
        raise MergeInputError("accuracy matrix must be square and non-empty")
    final = [acc[T - 1][j] for j in range(T)]
    diag = [acc[i][i] for i in range(T)]
    if any(v is None for v in final) or any(v is None for v in diag):
        raise MergeInputError("accuracy matrix lacks a diagonal or final-row entry")
    ACC = 100.0 * sum(final) / T  # type: ignore[arg-type]
    BWT = 0.0 if T == 1 else 100.0 * sum(final[i] - diag[i] for i in range(T - 1)) / (T - 1)  # type: ignore[operator]
    return ACC, BWT


def resolve_device(device: str = "auto") -> str:
    """``auto`` → ``cuda`` when a GPU is present, else ``cpu``; anything else is returned as is."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    return info


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


@dataclass
class RunSpec:
    """One protocol run: a method with hyper-parameters on a task group and an order seed."""

    method: str
    group: str
    run: int = 0
    profile: str = "smoke"
    hparams: dict[str, Any] = field(default_factory=dict)
    tasks: list[str] | None = None       # config order; default: the group's
    eval_seen: bool = False              # evaluate all seen tasks after every step (full matrix)

    @property
    def seed(self) -> int:
        return seed_for_run(self.run)

    def config_tasks(self) -> list[str]:
        return list(self.tasks) if self.tasks is not None else group_tasks(self.group)

    def order(self) -> list[str]:
        return task_order(self.config_tasks(), self.seed)

    def key(self, bench_desc: dict[str, Any]) -> str:
        blob = json.dumps({"spec": asdict(self), "bench": bench_desc}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def results_path(out_dir: str | os.PathLike[str], spec: RunSpec) -> Path:
    tag = spec.hparams.get("tag") if isinstance(spec.hparams.get("tag"), str) else None
    name = spec.method if tag is None else f"{spec.method}-{tag}"
    return Path(out_dir) / spec.profile / spec.group / name / f"seed{spec.seed}.json"


def _make_context(bench: Benchmark, spec: RunSpec, device: str, show_progress: bool) -> MergeContext:
    order = spec.order()
    return MergeContext(
        modules=bench.modules(), num_tasks=len(order), device=device, seed=spec.seed,
        heads={t: bench.head(t) for t in order},
        unlabeled_samples=bench.unlabeled_samples, labeled_samples=bench.labeled_samples,
        show_progress=show_progress)


class EvalCache:
    """Evaluations already made of the very same weights on the same benchmark task.

    Keyed by the method's :meth:`~madeit_core.methods.base.ContinualMethod.eval_fingerprint`, the
    task, the benchmark's description and the device; held in memory and, with ``folder``, as one
    small JSON file per key (atomic), so that θ0, the individual models and order-independent merges
    are evaluated once across orders and processes. Methods without a fingerprint (MADE-IT's routed
    model, the MoE rivals, ODE-M) are always evaluated.
    """

    def __init__(self, folder: str | os.PathLike[str] | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.mem: dict[str, dict[str, Any]] = {}
        self.hits = 0

    @staticmethod
    def key(fingerprint: str, task: str, bench_hash: str, device: str) -> str:
        return hashlib.sha256(f"{fingerprint}|{task}|{bench_hash}|{device}".encode()).hexdigest()[:32]

    def get(self, key: str) -> dict[str, Any] | None:
        if key in self.mem:
            return dict(self.mem[key])
        if self.folder is not None:
            f = self.folder / f"{key}.json"
            if f.is_file():
                try:
                    self.mem[key] = read_json(f)
                    return dict(self.mem[key])
                except MergeInputError:
                    log.warning("evaluation cache: ignoring damaged %s", f)
        return None

    def put(self, key: str, res: dict[str, Any]) -> None:
        self.mem[key] = dict(res)
        if self.folder is not None:
            write_json(self.folder / f"{key}.json", res)


def _evaluate(method: ContinualMethod, bench: Benchmark, task: str, cache: EvalCache | None = None,
              cache_ctx: tuple[str, str] | None = None) -> dict[str, Any]:
    fp = method.eval_fingerprint(task) if cache is not None and cache_ctx is not None else None
    key = None
    if fp is not None and cache is not None and cache_ctx is not None:
        key = EvalCache.key(fp, task, *cache_ctx)
        hit = cache.get(key)
        if hit is not None:
            cache.hits += 1
            return hit
    res = _evaluate_now(method, bench, task)
    if key is not None and cache is not None:
        cache.put(key, {k: v for k, v in res.items() if isinstance(v, (int, float, str)) or v is None})
    return res


def _evaluate_now(method: ContinualMethod, bench: Benchmark, task: str) -> dict[str, Any]:
    model = method.model_for_task(task)
    reset = getattr(model, "reset_routing_log", None)
    if callable(reset):
        reset()
    res = dict(bench.evaluate(model, task))
    routing = getattr(model, "routing_accuracy", None)
    if callable(routing):
        res["routing_accuracy"] = routing(task)
    return res


_CACHES: dict[str, EvalCache] = {}


def _shared_cache(out_dir: str | os.PathLike[str] | None) -> EvalCache:
    """One cache per results folder, shared by the runs of a process; a fresh in-memory one per run
    without a folder."""
    if out_dir is None:
        return EvalCache(None)
    k = str(Path(out_dir).resolve())
    if k not in _CACHES:
        _CACHES[k] = EvalCache(Path(out_dir) / "_evalcache")
    return _CACHES[k]


def run_continual(spec: RunSpec, bench: Benchmark, out_dir: str | os.PathLike[str] | None = None,
                  method: ContinualMethod | None = None, device: str = "cpu", resume: bool = True,
                  show_progress: bool = True, stop_after: int | None = None,
                  eval_cache: EvalCache | bool = True) -> dict[str, Any]:
    """Run ``spec`` on ``bench``; write and return the results dict.

    ``eval_cache``: reuse evaluations of identical weights (:class:`EvalCache`; with ``out_dir``
    they persist in ``<out_dir>/_evalcache``); False evaluates everything afresh. The numbers are
    the same either way: a hit returns what evaluating those weights gave.

    With ``out_dir`` set, the partial results and the method state are saved after every step
    (``<file>.partial.json`` and ``<file>.state.safetensors``) and a later call with the same spec
    resumes from them. ``stop_after`` ends the run after that many steps (simulates a kill).
    """
    device = resolve_device(device)
    order = spec.order()
    T = len(order)
    if T == 0:
        raise MergeInputError("empty task sequence: nothing to merge")
    missing = [t for t in order if t not in bench.tasks]
    if missing:
        raise MergeInputError(f"benchmark has no task(s) {missing}; it has {bench.tasks}")
    bench_desc = bench.describe()
    key = spec.key(bench_desc)
    if eval_cache is True:
        cache: EvalCache | None = _shared_cache(out_dir)
    else:
        cache = eval_cache or None
    bench_hash = hashlib.sha256(json.dumps(bench_desc, sort_keys=True, default=str).encode()).hexdigest()
    cache_ctx = (bench_hash, str(device))
    hits0 = cache.hits if cache is not None else 0
    path = results_path(out_dir, spec) if out_dir is not None else None
    partial = path.with_suffix(".partial.json") if path else None
    state_file = path.with_suffix(".state.safetensors") if path else None

    method = method if method is not None else get_method(spec.method, **{k: v for k, v in spec.hparams.items()
                                                                         if k != "tag"})
    method.setup(bench.pretrained(), _make_context(bench, spec, device, show_progress))
    if resume and path is not None and path.is_file():
        done = read_json(path)
        if done.get("key") == key:
            log.info("%s already done: %s", spec.method, path)
            return done
    acc: list[list[float | None]] = [[None] * T for _ in range(T)]
    steps: list[dict[str, Any]] = []
    start = 0
    elapsed_before = 0.0    # wall time of earlier processes of this run, up to their last saved step
    if resume and partial is not None and partial.is_file() and state_file is not None and state_file.is_file():
        saved = read_json(partial)
        if saved.get("key") == key:
            method.restore(load_tensors(state_file), saved["method_state"])
            acc, steps, start = saved["acc_matrix"], saved["steps"], saved["completed_steps"]
            # files saved before ``elapsed_s`` existed: the steps' own timings are the best record
            elapsed_before = float(saved.get("elapsed_s", sum(s["absorb_s"] + s["eval_s"] for s in steps)))
            log.info("resuming %s at step %d/%d from %s", spec.method, start, T, partial)
        else:
            log.warning("ignoring %s: it belongs to another configuration", partial)

    t_run = time.perf_counter()
    bar = tqdm(range(start, T), desc=f"{spec.method} {spec.group} s{spec.seed}", disable=not show_progress,
               initial=start, total=T, leave=False)
    for i in bar:
        task = order[i]
        bar.set_postfix_str(task)
        t0 = time.perf_counter()
        method.absorb(task, bench.finetuned(task))
        t_absorb = time.perf_counter() - t0
        t0 = time.perf_counter()
        evaluated = order[: i + 1] if spec.eval_seen else [task]
        routing: dict[str, float] = {}
        for j, t in enumerate(order):
            if t in evaluated:
                res = _evaluate(method, bench, t, cache, cache_ctx)
                acc[i][j] = res["accuracy"]
                if "routing_accuracy" in res:
                    routing[t] = res["routing_accuracy"]
        steps.append({"step": i + 1, "task": task, "absorb_s": t_absorb, "eval_s": time.perf_counter() - t0,
                      "routing_accuracy": routing or None})
        if partial is not None and state_file is not None:
            tensors, meta = method.state()
            save_tensors(state_file, tensors)
            write_json(partial, {"key": key, "completed_steps": i + 1, "acc_matrix": acc, "steps": steps,
                                 "method_state": meta,
                                 "elapsed_s": elapsed_before + time.perf_counter() - t_run})
        if stop_after is not None and i + 1 >= stop_after and i + 1 < T:
            return {"interrupted": True, "completed_steps": i + 1}

    t0 = time.perf_counter()
    final_routing: dict[str, float] = {}
    for j, t in enumerate(order):
        if acc[T - 1][j] is None:
            res = _evaluate(method, bench, t, cache, cache_ctx)
            acc[T - 1][j] = res["accuracy"]
            if "routing_accuracy" in res:
                final_routing[t] = res["routing_accuracy"]
    t_final = time.perf_counter() - t0
    if steps and steps[-1].get("routing_accuracy"):
        final_routing = {**steps[-1]["routing_accuracy"], **final_routing}
    ACC, BWT = acc_bwt(acc)
    _, meta = method.state()
    results = {
        "method": spec.method, "hparams": method.hparams(), "profile": spec.profile, "group": spec.group,
        "run": spec.run, "seed": spec.seed, "order": order, "acc_matrix": acc,
        "a_ii": [acc[i][i] for i in range(T)], "a_Ti": acc[T - 1], "ACC": ACC, "BWT": BWT,
        "routing_accuracy_final": final_routing or None,
        "data_used": meta.get("data_used", {}), "needs_data": method.needs_data,
        "method_summary": meta.get("summary"),
        "steps": steps,
        "timings": {"absorb_s": sum(s["absorb_s"] for s in steps), "eval_s": sum(s["eval_s"] for s in steps),
                    "final_eval_s": t_final, "wall_s_this_process": time.perf_counter() - t_run,
                    "wall_s_all_processes": elapsed_before + time.perf_counter() - t_run, "resumed_at_step": start,
                    "eval_cache_hits_this_process": (cache.hits - hits0) if cache is not None else 0},
        "benchmark": bench_desc, "key": key,
        "manifest": {"library_version": madeit_core.__version__, "git_commit": git_commit(),
                     "hardware": hardware(), "device": device,
                     "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }
    if path is not None:
        method.save_artifacts(path.with_suffix(".artifacts"))
        write_json(path, results)
        for f in (partial, state_file):
            if f is not None and f.exists():
                f.unlink()
    return results


def aggregate(results: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof = 1) of ACC and BWT over runs (baselines.md §9.4)."""
    import statistics

    accs = [r["ACC"] for r in results]
    bwts = [r["BWT"] for r in results]
    sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)  # noqa: E731
    return {"ACC_mean": statistics.fmean(accs), "ACC_std": sd(accs), "BWT_mean": statistics.fmean(bwts),
            "BWT_std": sd(bwts), "runs": len(results)}


def remove_run(out_dir: str | os.PathLike[str], spec: RunSpec) -> None:
    """Delete a run's results and resume files (used by ``--force``)."""
    path = results_path(out_dir, spec)
    for f in (path, path.with_suffix(".partial.json"), path.with_suffix(".state.safetensors")):
        if f.exists():
            f.unlink()
    if path.with_suffix(".artifacts").is_dir():
        shutil.rmtree(path.with_suffix(".artifacts"))
    if path.parent.exists() and not any(path.parent.iterdir()):
        shutil.rmtree(path.parent)
