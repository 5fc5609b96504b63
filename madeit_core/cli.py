"""Command line: ``madeit merge``, ``madeit inspect``, ``madeit run`` (and more from other modules).

``madeit merge`` folds fine-tuned checkpoints (given in arrival order) into an expert bank
against a pre-trained checkpoint. Every checkpoint is validated before its experts are built and
the bank is written only at the end, atomically: a bad input leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from madeit_core.errors import MergeInputError
from madeit_core.experts import EvolutionConfig, ExpertBank
from madeit_core.geometry import SVD_METHODS
from madeit_core.io import load_checkpoint
from madeit_core.modules import modules_from_state_dict
from madeit_core.statedict import check_compatible, check_pretrained

log = logging.getLogger("madeit")


def merge_checkpoints(pretrained: str | Path, finetuned: Sequence[str | Path], out: str | Path,
                      names: Sequence[str] | None = None, include: str | None = None,
                      exclude: str | None = None, force: bool = False, show_progress: bool = True,
                      **evolution: Any) -> ExpertBank:
    """Python form of ``madeit merge``: build and save the expert bank of ``finetuned``."""
    if not finetuned:
        raise MergeInputError("no fine-tuned checkpoints given (empty model sequence)")
    names = list(names) if names else [Path(p).stem if Path(p).suffix else Path(p).name for p in finetuned]
    if len(names) != len(finetuned):
        raise MergeInputError(f"{len(names)} task names for {len(finetuned)} checkpoints")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise MergeInputError(f"duplicate task names {dup}; pass --names to tell the tasks apart")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise MergeInputError(f"{out} exists and is not empty; use --force to overwrite")
    config = EvolutionConfig(**evolution)
    theta0 = load_checkpoint(pretrained)
    check_pretrained(theta0)
    specs = modules_from_state_dict(theta0, include=include, exclude=exclude)
    if not specs:
        raise MergeInputError(f"{pretrained}: no linear modules found (use --include to name them)")
    log.info("pre-trained %s: %d tensors, %d linear modules", pretrained, len(theta0), len(specs))
    bank = ExpertBank(specs, config)
    for name, path in tqdm(list(zip(names, finetuned)), desc="absorbing", disable=not show_progress):
        sd = load_checkpoint(path)
        check_compatible(theta0, sd, f"{path}")
        bank.absorb(name, theta0, sd)
        del sd
    bank.save(out)
    return bank


def format_bank(bank: ExpertBank) -> str:
    """A human-readable account of a bank: settings, experts per module, allocation."""
    s = bank.summary()
    lines = [f"tasks ({len(bank.tasks)}, arrival order): {', '.join(bank.tasks)}",
             "config: " + ", ".join(f"{k}={v}" for k, v in vars(bank.config).items()),
             f"modules: {s['modules']}   experts: {s['experts_total']} (mean {s['experts_mean']:.2f} per module)"
             f"   reduction rate: {s['reduction_rate']:.3f}   expert parameters: {s['expert_parameters']:,}",
             "", f"{'module':<60} {'rank':>4} {'experts':>7}  allocation (expert of each task)"]
    alloc = bank.allocation()
    for spec in bank.specs:
        m = bank.modules[spec.key]
        lines.append(f"{spec.key:<60} {m.rank:>4} {len(m.experts):>7}  {' '.join(map(str, alloc[spec.key]))}")
    return "\n".join(lines)


def _evolution_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rank-ratio", type=float, default=0.1, help="ρ: expert rank = round(ρ·min(d_out, d_in))")
    p.add_argument("--margin", type=float, default=1.0, help="λ: threshold = mean(H) + λ·std(H)")
    p.add_argument("--history", choices=["past+current", "past"], default="past+current")
    p.add_argument("--min-history", type=int, default=2)
    p.add_argument("--merge-rule", choices=["polar", "sum", "mean"], default="polar")
    p.add_argument("--score", choices=["subspace", "cosine"], default="subspace")
    p.add_argument("--others", choices=["mean", "pretrained", "task_arithmetic"], default="mean")
    p.add_argument("--svd", choices=list(SVD_METHODS), default=EvolutionConfig.svd,
                   help="top-k SVD of Eq. 5: subspace (default, fast), exact (full SVD), gram, randomized")


def _evolution_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    return {"rank_ratio": a.rank_ratio, "margin": a.margin, "history": a.history, "min_history": a.min_history,
            "merge_rule": a.merge_rule, "score": a.score, "others": a.others, "svd": a.svd}


def _cmd_merge(a: argparse.Namespace) -> int:
    bank = merge_checkpoints(a.pretrained, a.finetuned, a.out, names=a.names, include=a.include,
                             exclude=a.exclude, force=a.force, **_evolution_kwargs(a))
    print(f"wrote {a.out}: {bank.summary()['experts_total']} experts over {len(bank.specs)} modules")
    return 0


def _cmd_inspect(a: argparse.Namespace) -> int:
    bank = ExpertBank.load(a.bank)
    if a.json:
        print(json.dumps({"summary": bank.summary(), "num_experts": bank.num_experts(),
                          "allocation": bank.allocation()}, indent=2))
    else:
        print(format_bank(bank))
    return 0


def _cmd_run(a: argparse.Namespace) -> int:
    from madeit_core.benchmarks import make_benchmark
    from madeit_core.protocol import RunSpec, remove_run, resolve_device, run_continual

    a.device = resolve_device(a.device)
    bench, group_tasks = make_benchmark(a.benchmark, a.group, profile=a.profile, device=a.device)
    hp = json.loads(a.hparams) if a.hparams else {}
    for r in a.runs:
        spec = RunSpec(method=a.method, group=a.group, run=r, profile=a.profile, hparams=hp, tasks=group_tasks,
                       eval_seen=a.eval_seen)
        if a.force:
            remove_run(a.out, spec)
        res = run_continual(spec, bench, a.out, device=a.device)
        print(f"{a.method} {a.group} seed {spec.seed}: ACC {res['ACC']:.2f}  BWT {res['BWT']:.2f}")
    return 0


def _cmd_zoo_build(a: argparse.Namespace) -> int:
    import torch

    from madeit_core.io import read_json, write_json
    from madeit_core.protocol import resolve_device
    from madeit_core.zoo import format_table, make_benchmark, summary_row

    expected = read_json(a.expect) if a.expect else None   # read first: a wrong path fails before the build
    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    bench, tasks = make_benchmark(a.group, profile=a.profile, device=device, cache_dir=a.cache, data=a.data)
    print(f"zoo: profile {a.profile}, group {a.group}, backbone {bench.zoo.adapter.name} at "
          f"{bench.zoo.adapter.image_size} px, cache {bench.zoo.cache}, data {bench.zoo.source.describe()}")
    manifests = bench.zoo.build(tasks, force=a.force)
    print(format_table([summary_row(m) for m in manifests]))
    if a.report:
        from madeit_core.zoo import zoo_report

        rep = zoo_report(manifests, a.group)
        write_json(a.report, rep)
        c = rep["checks"]
        print(f"wrote {a.report}: fine-tuned − probe = {100 * rep['average']['gain']:+.2f} points "
              f"(≥ {100 * c['min_gain']:.0f}: {c['gain_ok']}); every fine-tuned beats its probe: "
              f"{c['every_finetuned_beats_probe']}"
              + (f" (not: {', '.join(c['not_beating'])})" if c["not_beating"] else ""))
    if expected is not None:
        from madeit_core.zoo import compare_to_report

        diffs = compare_to_report(manifests, expected)
        if diffs:
            print(f"differs from {a.expect} in {len(diffs)} of {len(manifests)} tasks:\n  " + "\n  ".join(diffs))
            return 1
        print(f"matches {a.expect}: {len(manifests)} tasks with the same cache keys and accuracies")
    return 0


def _cmd_data_check(a: argparse.Namespace) -> int:
    from madeit_core.data.mirror import Mirror
    from madeit_core.data.suites import PackSource

    if a.data and str(a.data).endswith(".npz"):
        pack = PackSource(a.data)
        print(f"pack {pack.path}: profile {pack.manifest.get('profile')}, {len(pack.entries)} entries")
        for key, e in sorted(pack.entries.items()):
            print(f"  {key:<32} {e['n']:>6} rows of {e['n_total']:>6}  {e['shape']}")
        return 0
    mirror = Mirror(a.data)
    rows = mirror.check(tasks=a.tasks, verify_sha=a.sha256)
    print(f"mirror {mirror.root}: {len(rows)} splits OK{' (sha256 verified)' if a.sha256 else ''}")
    for r in rows:
        print(f"  {r['task']:<16} {r['split']:<6} {r['kind']:<6} {r['n']:>7} rows  {r['shape']:<9} "
              f"{r['classes']} classes")
    return 0


def _cmd_data_pack(a: argparse.Namespace) -> int:
    from madeit_core.data.pack import write_pack

    info = write_pack(a.out, profile=a.profile, data=a.data, groups=a.groups)
    print(f"wrote {a.out}: {info['bytes'] / 2 ** 20:.1f} MiB, {len(info['entries'])} entries "
          f"(profile {a.profile}); use it with MADEIT_DATA={a.out} or --data {a.out}")
    return 0


def _cmd_data_learnability(a: argparse.Namespace) -> int:
    from madeit_core.text_learnability import DEFAULT_VARIANTS, run_learnability

    variants = tuple(v for v in DEFAULT_VARIANTS if not a.variants or v.name in a.variants)
    if not variants:
        raise MergeInputError(f"no variant named {a.variants}; known: {[v.name for v in DEFAULT_VARIANTS]}")
    doc = run_learnability(a.tasks, variants, a.profile, a.out, a.data, a.device)
    print(f"rendered-text fine-tuning under variants (profile {a.profile}; test pool accuracy):")
    print(f"{'task':16s} {'variant':20s} {'probe':>6s} {'tuned':>6s} {'gain':>6s} {'±95%':>5s} {'train':>6s}")
    for r in doc["rows"]:
        print(f"{r['task']:16s} {r['variant']['name']:20s} {r['probe']:6.3f} {r['finetuned']:6.3f} {r['gain']:+6.3f} "
              f"{r['noise95']:5.3f} {r['train_accuracy_last_fifth']:6.3f}")
    if a.out:
        print(f"wrote {a.out}")
    return 0


def _cmd_data_ceiling(a: argparse.Namespace) -> int:
    from madeit_core.data.reading_ceiling import profile_reading_ceilings
    from madeit_core.io import write_json

    rows = profile_reading_ceilings(a.profile, a.tasks, a.data)
    print(f"bag-of-words accuracy on the text the rendered images show (profile {a.profile}):")
    print(f"{'task':18s} {'chance':>7s} {'visible':>8s} {'full':>7s} {'all rows':>9s}  chars shown/full")
    for r in rows:
        print(f"{r['task']:18s} {r['chance']:7.3f} {r['visible']:8.3f} {r['full_text']:7.3f} "
              f"{r['visible_all_rows']:9.3f}  {r['chars_shown_mean']:.0f}/{r['chars_full_mean']:.0f}")
    if a.out:
        write_json(a.out, {"profile": a.profile, "tasks": rows})
        print(f"wrote {a.out}")
    return 0


def _cmd_data_fetch(a: argparse.Namespace) -> int:
    from madeit_core.data.fetch import fetch

    done = fetch(a.out, tasks=a.tasks)
    print(f"fetched {len(done)} task(s) into {a.out}: {', '.join(done)}")
    return 0


def _cmd_bench(a: argparse.Namespace) -> int:
    from madeit_core.bench import BenchSettings, default_out, run_bench

    csv = (lambda v: [x.strip() for x in v.split(",") if x.strip()] if v else None)  # noqa: E731
    settings = BenchSettings.make(suites=csv(a.suite), shapes=csv(a.shapes), device=a.device, quick=a.quick,
                                  banks=a.banks, methods=csv(a.methods),
                                  batch_sizes=[int(x) for x in csv(a.batch_sizes)] if a.batch_sizes else None,
                                  scaling_tasks=a.scaling_tasks, threads=a.threads,
                                  absorb_shapes=csv(a.absorb_shapes), routed_shapes=csv(a.routed_shapes),
                                  finetuned=[str(p) for p in a.finetuned] if a.finetuned else None)
    if a.steps is not None:
        settings.steps = {k: a.steps for k in settings.shapes}
    if a.repeats is not None:
        settings.repeats = {k: a.repeats for k in settings.shapes}
    out = a.out or default_out(settings.device)
    res = run_bench(settings, out, force=a.force, log=(lambda m: print(m, flush=True)) if not a.quiet else None)
    print(f"wrote {out} ({res['manifest']['wall_s_total']:.0f} s)")
    for name, t in res["targets"].items():
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[t.get("pass")]
        value = t.get("value")
        print(f"  {verdict:4}  {name}: {value if value is None else f'{value:.3g}'} ({t['target']})")
    return 0


def _runs(text: str) -> list[int]:
    if ".." in text:
        lo, hi = text.split("..")
        return list(range(int(lo), int(hi) + 1))
    return [int(x) for x in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="madeit", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="fold fine-tuned checkpoints into an expert bank")
    m.add_argument("--pretrained", required=True, help="pre-trained checkpoint (.pt/.bin/.safetensors/HF folder)")
    m.add_argument("--finetuned", required=True, nargs="+", help="fine-tuned checkpoints, in arrival order")
    m.add_argument("--names", nargs="+", help="task names (default: file names)")
    m.add_argument("--out", required=True, help="output bank folder")
    m.add_argument("--include", help="regex of weight keys that are modules (overrides the guess)")
    m.add_argument("--exclude", help="regex of weight keys to leave out of the modules")
    m.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    _evolution_args(m)
    m.set_defaults(func=_cmd_merge)

    i = sub.add_parser("inspect", help="print the experts per module and the allocation of a bank")
    i.add_argument("bank")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_cmd_inspect)

    r = sub.add_parser("run", help="run a method through the continual protocol")
    r.add_argument("--method", required=True)
    r.add_argument("--benchmark", default="toy", help="toy | zoo (the offline benchmark) | clip")
    r.add_argument("--group", default="toy-4")
    r.add_argument("--profile", default="smoke")
    r.add_argument("--runs", type=_runs, default=[0], help="run indices: '0..9' or '0,3'")
    r.add_argument("--hparams", help="JSON dict of method hyper-parameters")
    r.add_argument("--out", default="runs")
    r.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    r.add_argument("--eval-seen", action="store_true", help="evaluate all seen tasks after every step")
    r.add_argument("--force", action="store_true", help="discard earlier results and resume files")
    r.set_defaults(func=_cmd_run)

    z = sub.add_parser("zoo", help="the offline model zoo (heads and fine-tuned encoders)")
    zsub = z.add_subparsers(dest="zoo_command", required=True)
    zb = zsub.add_parser("build", help="build (or reuse) every task of a group and print the table")
    zb.add_argument("--profile", default="smoke", help="smoke | offline")
    zb.add_argument("--group", default="smoke-4", help="e.g. smoke-4, smoke-8, offline-8, offline-14, offline-20")
    zb.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    zb.add_argument("--data", help="mirror folder or pack .npz (default $MADEIT_DATA, else ../shared/data)")
    zb.add_argument("--cache", help="zoo cache folder (default $MADEIT_CACHE/zoo or ~/.cache/madeit/zoo)")
    zb.add_argument("--threads", type=int, help="torch CPU threads outside the build (each task is built with "
                                                "zoo.BUILD_THREADS, the count the committed zoo was built with)")
    zb.add_argument("--force", action="store_true", help="rebuild tasks that are cached")
    zb.add_argument("--report", help="write the zoo's summary JSON (accuracies, times, recipe; no weights) here")
    zb.add_argument("--expect", help="a committed summary (e.g. results/zoo/offline-20.json): exit 1 unless every "
                                     "task has its cache key and accuracies")
    zb.set_defaults(func=_cmd_zoo_build)

    d = sub.add_parser("data", help="the offline data: check the mirror, make a pack, fetch from the internet")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dc = dsub.add_parser("check", help="validate the mirror (or a pack): files, shapes, labels")
    dc.add_argument("--data", help="mirror folder or pack .npz (default $MADEIT_DATA, else ../shared/data)")
    dc.add_argument("--tasks", nargs="+", help="only these mirror tasks")
    dc.add_argument("--sha256", action="store_true", help="also verify every file against SHA256SUMS")
    dc.set_defaults(func=_cmd_data_check)
    dp = dsub.add_parser("pack", help="write a compact pack of a profile's data (for GPU machines)")
    dp.add_argument("--profile", default="offline")
    dp.add_argument("--out", required=True, help="output .npz file")
    dp.add_argument("--data", help="mirror folder (default $MADEIT_DATA, else ../shared/data)")
    dp.add_argument("--groups", nargs="+", help="task groups to include (default: the profile's)")
    dp.set_defaults(func=_cmd_data_pack)
    dl = dsub.add_parser("ceiling", help="what a perfect word reader learns from the rendered-text rows")
    dl.add_argument("--profile", default="offline")
    dl.add_argument("--tasks", nargs="+", help="rendered-text tasks (default: all)")
    dl.add_argument("--data", help="mirror folder (default $MADEIT_DATA or ../shared/data)")
    dl.add_argument("--out", help="write the numbers as JSON here")
    dl.set_defaults(func=_cmd_data_ceiling)
    dn = dsub.add_parser("learnability", help="fine-tune a rendered-text task under recipe/rendering variants")
    dn.add_argument("--profile", default="offline")
    dn.add_argument("--tasks", nargs="+", default=["rendered_sst2"], help="rendered-text tasks")
    dn.add_argument("--variants", nargs="+", help="only these variant names (default: all)")
    dn.add_argument("--data", help="mirror folder (default $MADEIT_DATA or ../shared/data)")
    dn.add_argument("--device", default="cpu")
    dn.add_argument("--out", help="JSON results file (resumed when it exists)")
    dn.set_defaults(func=_cmd_data_learnability)
    df = dsub.add_parser("fetch", help="fill a mirror folder from torchvision / Hugging Face (needs internet)")
    df.add_argument("--out", required=True, help="mirror folder to fill")
    df.add_argument("--tasks", nargs="+", help="only these tasks (default: all)")
    df.set_defaults(func=_cmd_data_fetch)
    b = sub.add_parser("bench", help="measure absorb cost, routed throughput, memory, scaling and SVD accuracy")
    b.add_argument("--suite", help="comma list of absorb,routed,memory,scaling,svd (default: all)")
    b.add_argument("--shapes", help="comma list of vit-b32,vit-l14,efficientnet (quick: tiny-vit,tiny-cnn)")
    b.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    b.add_argument("--out", help="results JSON (default results/perf/<host>-<device>.json)")
    b.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (seconds; for tests)")
    b.add_argument("--banks", help="folder with expert banks (runs' .artifacts) for the memory suite")
    b.add_argument("--methods", help="comma list of method specs, e.g. made_it,made_it:svd=randomized,opcm")
    b.add_argument("--steps", type=int, help="models absorbed per sequence (all shapes)")
    b.add_argument("--repeats", type=int, help="sequences per method (all shapes)")
    b.add_argument("--batch-sizes", help="comma list (default 1,128)")
    b.add_argument("--absorb-shapes", help="shapes the absorb suite runs (default: --shapes; vit-l14 only on a GPU)")
    b.add_argument("--routed-shapes", help="shapes the routed suite runs (default: --shapes; vit-l14 only on a GPU)")
    b.add_argument("--scaling-tasks", type=int, help="T of the scaling suite (default 20)")
    b.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 on a shared machine)")
    b.add_argument("--finetuned", nargs="+", metavar="SAFETENSORS",
                   help="fine-tuned EfficientNet-Lite0 checkpoints: the svd suite also checks real task vectors")
    b.add_argument("--force", action="store_true", help="recompute everything (default: resume)")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(a.func(a))
    except (MergeInputError, FileNotFoundError) as exc:
        print(f"madeit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
