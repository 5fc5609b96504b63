"""What a notebook of the book calls: its runs, its results, the committed reference results.

- :class:`BuildResults` runs the protocol jobs a notebook needs (:mod:`madeit_core.bookplan`) with
  :func:`~madeit_core.reproduce.run_grid` into ``<results_dir>/lib-<library hash>/``. The folder is
  keyed by the hash of every library source file, so a change to ``madeit_core`` can never serve
  numbers computed by older code; notebooks of one build share the folder, so a run made by one
  notebook is read, not repeated, by the next (run_grid skips finished runs and resumes killed ones).
- :class:`ReferenceResults` reads the committed results of the reference profile from
  ``<reference_dir>/<profile>/`` (written by ``scripts/run_reference.py``) and says plainly when
  there are none.
- Both read results files by their exact path (:func:`madeit_core.protocol.results_path`), so every
  row carries the label of the :class:`~madeit_core.reproduce.MethodRun` that made it.

Relative paths are resolved against the repository root, whatever the kernel's working folder
(papermill runs in the repository, nbval in ``notebooks/_executed``).
"""

from __future__ import annotations

import contextlib
import html
import io
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from madeit_core.analysis import BankLayout, load_bank_layout, pairwise_scores, task_experts
from madeit_core.bookplan import Job
from madeit_core.booktables import source_label
from madeit_core.codehash import PACKAGE_DIR, json_hash, library_hash
from madeit_core.errors import MergeInputError
from madeit_core.io import read_json, write_json
from madeit_core.nbparams import PAPER_SEEDS, REFERENCE_PROFILE, parameter_set
from madeit_core.protocol import RunSpec, resolve_device, results_path, seed_for_run
from madeit_core.reproduce import MethodRun, run_grid

REPO_ROOT = PACKAGE_DIR.parent
SEED_BASE = seed_for_run(0)


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """``path`` if absolute, else relative to the repository root."""
    p = Path(path)
    return p if p.is_absolute() else REPO_ROOT / p


def build_root(results_dir: str | os.PathLike[str], lib_hash: str | None = None) -> Path:
    """``<results_dir>/lib-<first 12 hex of the library hash>``: the build's results folder."""
    return resolve_path(results_dir) / f"lib-{(lib_hash or library_hash())[:12]}"


def stale_build_roots(results_dir: str | os.PathLike[str], lib_hash: str | None = None) -> list[Path]:
    """The ``lib-*`` folders under ``results_dir`` made by other versions of the library."""
    base = resolve_path(results_dir)
    keep = build_root(results_dir, lib_hash).name
    return sorted(p for p in base.glob("lib-*") if p.is_dir() and p.name != keep) if base.is_dir() else []


def runs_for_seeds(seeds: Sequence[int]) -> list[int]:
    """Protocol run indices of order seeds (run r has seed 42 + r)."""
    bad = [s for s in seeds if int(s) < SEED_BASE]
    if bad:
        raise MergeInputError(f"order seeds start at {SEED_BASE} (run r uses seed {SEED_BASE} + r); got {bad}")
    return [int(s) - SEED_BASE for s in seeds]


def analysis_path(root: Path, profile: str, name: str) -> Path:
    return root / profile / "_analysis" / f"{name}.json"


class ResultsStore:
    """Results files of one profile under ``root`` (laid out by :func:`results_path`)."""

    def __init__(self, root: str | os.PathLike[str], profile: str) -> None:
        self.root = Path(root)
        self.profile = profile

    def path(self, group: str, run: MethodRun, seed: int) -> Path:
        spec = RunSpec(method=run.method, group=group, run=runs_for_seeds([seed])[0], profile=self.profile,
                       hparams=dict(run.hparams))
        return results_path(self.root, spec)

    def results(self, group: str, runs: Sequence[MethodRun], seeds: Sequence[int]) -> list[dict[str, Any]]:
        """The finished results of ``runs`` × ``seeds`` on ``group`` (missing ones are left out),
        each with its run's ``label``."""
        out = []
        for r in runs:
            for s in seeds:
                f = self.path(group, r, s)
                if f.is_file():
                    res = dict(read_json(f))
                    res["label"] = r.label
                    out.append(res)
        return out

    def results_for(self, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        return [res for j in jobs for res in self.results(j.group, j.runs, j.seeds)]

    def bank_layout(self, group: str, run: MethodRun, seed: int) -> BankLayout | None:
        folder = self.path(group, run, seed).with_suffix(".artifacts")
        return load_bank_layout(folder) if (folder / "bank.json").is_file() else None

    def analysis(self, name: str) -> Any | None:
        f = analysis_path(self.root, self.profile, name)
        return read_json(f)["value"] if f.is_file() else None

    def record(self, name: str) -> dict[str, Any] | None:
        """A results file kept aside from the grid (``<root>/<profile>/_records/<name>.json``), e.g.
        a run of an earlier code path kept to compare with; None when absent."""
        f = self.root / self.profile / "_records" / f"{name}.json"
        return dict(read_json(f)) if f.is_file() else None


def backbone_of(results: Sequence[Mapping[str, Any]], default: str = "unknown backbone") -> str:
    for r in results:
        b = (r.get("benchmark") or {}).get("backbone")
        if b:
            return str(b)
    return default


class BuildResults(ResultsStore):
    """The build's own results: runs what is missing, then reads it (see module docstring)."""

    def __init__(self, params: Mapping[str, Any], show_progress: bool = False) -> None:
        self.params = dict(params)
        self.library_hash = library_hash()
        super().__init__(build_root(params["results_dir"], self.library_hash), params["profile"])
        self.benchmark_name = params["benchmark"]
        self.device = resolve_device(params.get("device", "auto"))
        self.show_progress = show_progress
        self._benches: dict[str, tuple[Any, list[str]]] = {}

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:
        """Without ``show_progress``, keep progress bars (zoo building, fine-tuning, rendering) out
        of the notebook's outputs; what was written is shown if the block fails."""
        if self.show_progress:
            yield
            return
        buf = io.StringIO()
        try:
            with contextlib.redirect_stderr(buf):
                yield
        except BaseException:
            sys.stderr.write(buf.getvalue())
            raise

    def bench(self, group: str) -> tuple[Any, list[str]]:
        if group not in self._benches:
            from madeit_core.benchmarks import make_benchmark

            with self._quiet():
                self._benches[group] = make_benchmark(self.benchmark_name, group, profile=self.profile,
                                                      device=self.device)
        return self._benches[group]

    @property
    def backbone(self) -> str:
        return str(self.bench(self.params["groups"][0])[0].describe().get("backbone", self.benchmark_name))

    @property
    def source(self) -> str:
        return source_label("ours", self.profile, self.backbone)

    def run(self, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        """Run (or resume, or skip when done) every job; returns all their results."""
        for j in jobs:
            bench, tasks = self.bench(j.group)
            with self._quiet():
                run_grid(bench, j.group, tasks, list(j.runs), runs_for_seeds(j.seeds), self.root, self.profile,
                         device=self.device, eval_seen=j.eval_seen, show_progress=self.show_progress)
        return self.results_for(jobs)

    def cached(self, name: str, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()``, stored as JSON under the build folder and reused while ``key`` matches."""
        f = analysis_path(self.root, self.profile, name)
        k = json_hash(key)
        if f.is_file():
            doc = read_json(f)
            if doc.get("key") == k:
                return doc["value"]
        with self._quiet():
            value = compute()
        write_json(f, {"key": k, "value": value})
        return value

    def pairwise(self, group: str, rank_ratio: float = 0.1) -> dict[str, Any]:
        """Subspace affinity and cosine between the tasks' own experts (Fig. 4, 5), cached."""
        bench, tasks = self.bench(group)
        return self.cached(pairwise_name(group, rank_ratio), {"bench": bench.describe(), "rank_ratio": rank_ratio},
                           lambda: pairwise_for_benchmark(bench, tasks, rank_ratio))


def pairwise_name(group: str, rank_ratio: float) -> str:
    return f"pairwise-{group}-rho{rank_ratio:g}"


def pairwise_for_benchmark(bench: Any, tasks: Sequence[str], rank_ratio: float) -> dict[str, Any]:
    """:func:`pairwise_scores` of every task's own experts (before any consolidation), with the
    module groups of the flat score lists."""
    specs = bench.modules()
    theta0 = {k: v.detach().cpu() for k, v in bench.pretrained().state_dict().items()}
    finetuned = {t: bench.finetuned(t) for t in tasks}
    scores = pairwise_scores(task_experts(theta0, finetuned, specs, rank_ratio), specs)
    n = len(tasks)
    scores["pair_groups"] = [s.group for _ in range(n * (n - 1) // 2) for s in specs]
    scores["rank_ratio"] = rank_ratio
    return scores


class ReferenceResults(ResultsStore):
    """The committed reference results of :data:`REFERENCE_PROFILE` (or a message saying why not)."""

    def __init__(self, reference_dir: str | os.PathLike[str], profile: str = REFERENCE_PROFILE) -> None:
        super().__init__(resolve_path(reference_dir), profile)
        self.shown_dir = str(reference_dir)
        folder = self.root / profile
        self.available = folder.is_dir() and any(folder.glob("*/*/seed*.json"))
        manifest = folder / "manifest.json"
        self.manifest: dict[str, Any] | None = read_json(manifest) if manifest.is_file() else None
        m = self.manifest or {}
        full = parameter_set(profile, m.get("benchmark"))
        # the manifest says what the reference command ran; the profile's parameters fill the rest
        for k in ("groups", "seeds"):
            if m.get(k):
                full[k] = list(m[k])
        self.groups: list[str] = [g for g in full["groups"] if (folder / g).is_dir()]
        self.seeds: list[int] = list(full.get("seeds", PAPER_SEEDS))
        self.params = full

    @property
    def message(self) -> str:
        if self.available:
            where = (f"Committed reference results: profile `{self.profile}`, groups {', '.join(self.groups)}, "
                     f"from `{self.shown_dir}/{self.profile}`")
            m = self.manifest
            if m is None:
                return where + " (no manifest: not made by `scripts/run_reference.py`; each results file records " \
                               "its own commit)."
            lib, now = str(m.get("library_hash", "?"))[:12], library_hash()[:12]
            same = "the same library as this build" if lib == now else f"library {lib}, this build has {now}"
            return f"{where} (commit {str(m.get('git_commit') or '?')[:10]}; {same})."
        return (f"No committed reference results under `{self.shown_dir}/{self.profile}/` yet. They are made by "
                f"`scripts/run_reference.py --profile {self.profile}` (see the chapter on reproducing this book); "
                f"until then only this build's own numbers are shown.")

    def jobs(self, jobs_fn: Callable[[Mapping[str, Any]], list[Job]]) -> list[Job]:
        """The reference profile's jobs of a notebook, restricted to the groups present."""
        return [j for j in jobs_fn(self.params) if j.group in self.groups]

    def backbone(self, results: Sequence[Mapping[str, Any]]) -> str:
        return backbone_of(results, "efficientnet_lite0")

    def source(self, results: Sequence[Mapping[str, Any]]) -> str:
        return source_label("reference", self.profile, self.backbone(results))


def show_figure(fig: Any, dpi: int = 110) -> None:
    """Display a matplotlib figure as a PNG and close it (works whatever the kernel's backend)."""
    import io

    import matplotlib.pyplot as plt
    from IPython.display import Image, display

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    display(Image(buf.getvalue()))


#: Characters after which a table cell's text may break (``<wbr>``): identifiers such as
#: ``made_it_bank_parameters`` or ``subspace(oversample=max(10,k))`` have no spaces, and a column
#: no narrower than its longest one pushes a wide table's last columns behind a scroll bar.
SOFT_BREAK_AFTER = "_,(=:"
#: Where a soft break goes: after such a character with two word characters on either side, so
#: ``made_it_bank``, ``svd=exact`` and ``max(10`` may break but ``T=8``, ``(n=2)`` and
#: ``batch 128 (CPU)`` stay whole.
SOFT_BREAK = re.compile(f"(?<=\\w\\w)([{re.escape(SOFT_BREAK_AFTER)}])(?=\\w\\w)")


def soft_breaks(html_text: str) -> str:
    """``html_text`` with ``<wbr>`` after each :data:`SOFT_BREAK_AFTER` character in the text of
    table cells (``th``/``td``): tags, attributes and text outside tables are left as they are."""
    out, depth = [], 0
    for part in re.split(r"(<[^>]*>)", html_text):
        if part.startswith("<"):
            tag = re.match(r"</?\s*(\w+)", part)
            if tag and tag.group(1).lower() in ("td", "th"):
                depth += -1 if part.startswith("</") else 1
            out.append(part)
        else:
            out.append(SOFT_BREAK.sub(r"\1<wbr>", part) if depth > 0 else part)
    return "".join(out)


def markdown_html(text: str) -> str:
    """Markdown (CommonMark with tables) rendered to HTML; tables get the theme's ``table`` class
    and their cells soft breaks (:func:`soft_breaks`)."""
    from markdown_it import MarkdownIt

    rendered = MarkdownIt("commonmark").enable("table").render(text).replace("<table>", '<table class="table">')
    return soft_breaks(rendered)


def show_markdown(text: str) -> None:
    """Display markdown as both text/markdown and rendered text/html.

    The book prefers text/html, which renders tables whatever myst-nb's markdown format is set
    to (its default, CommonMark, has no tables); notebook front-ends may show either.
    """
    from IPython.display import display

    display({"text/markdown": text, "text/html": markdown_html(text), "text/plain": text}, raw=True)


def verdict_html(parts: Sequence[tuple[str, Mapping[str, Any] | None]]) -> str:
    """Claim verdicts as HTML (cross-page glue renders text/html): one paragraph per source that
    has a verdict, e.g. ``[("ours · smoke · toy_vit", v), ("reference · offline · …", None)]``."""
    out = []
    for source, v in parts:
        if v is None:
            continue
        out.append(f"<p><strong>{html.escape(v['verdict'])}</strong> ({html.escape(source)}): "
                   f"{html.escape(str(v['evidence']))}</p>")
    return "\n".join(out) or "<p>No verdict: no results.</p>"


__all__ = ["BuildResults", "REPO_ROOT", "ReferenceResults", "ResultsStore", "analysis_path", "backbone_of",
           "build_root", "markdown_html", "pairwise_for_benchmark", "pairwise_name", "resolve_path", "runs_for_seeds",
           "show_figure", "show_markdown", "stale_build_roots", "verdict_html"]
