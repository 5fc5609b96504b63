"""Expert evolution (paper §3.1.3; method.md §1, §3, §4).

Each module keeps a set of low-rank experts. When task t arrives, its update of module m is
compressed to an expert E_new (Eq. 5) and compared with the module's experts by the expert
affinity S (Eq. 6–7). With s* = max_j S_j and the distribution-aware threshold
τ_m = mean(H_m) + λ · std(H_m) over the module's score history H_m, E_new is consolidated into the
best expert when s* ≥ τ_m, else it becomes a new expert. Modules evolve independently; every
task belongs to exactly one expert of every module.

*Other* parameters (biases, norms, embeddings, depthwise/patch convolutions) are merged by a rule
the paper does not give (``others``): their running mean of task vectors by default.
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from madeit_core.errors import BankFormatError, MergeInputError
from madeit_core.geometry import (
    SVD_METHODS,
    Expert,
    MergeRule,
    SvdMethod,
    expert_affinity,
    expert_cosine,
    extract_expert,
    extract_experts,
    merge_experts,
    rank_for,
)
from madeit_core.io import load_tensors, read_json, save_tensors, write_json
from madeit_core.modules import ModuleSpec, as_matrix
from madeit_core.statedict import check_compatible, compute_dtype
from madeit_core.timing import timed

HistoryRule = Literal["past+current", "past"]
ScoreRule = Literal["subspace", "cosine"]
OthersRule = Literal["mean", "pretrained", "task_arithmetic"]
BANK_FORMAT = "madeit-bank/1"


@dataclass
class EvolutionConfig:
    """Hyper-parameters and open choices of expert evolution (method.md; defaults first).

    - ``rank_ratio`` ρ: expert rank k = max(1, round(ρ · min(d_out, d_in))) (Eq. 5).
    - ``margin`` λ: threshold τ = mean(H) + λ · std(H); larger λ → fewer consolidations.
    - ``history``: H holds past scores and this step's (``past+current``) or past scores only.
    - ``min_history``: while H has fewer scores than this, a new expert is created.
    - ``std_ddof``: 0 (population) or 1 (sample) standard deviation of H.
    - ``merge_rule``: ``polar`` (the paper), ``sum`` or ``mean`` (exact alternatives, §4).
    - ``score``: ``subspace`` affinity (the paper) or ``cosine`` of flattened updates (Table 2).
    - ``others``: ``mean`` (θ0 + mean τ), ``pretrained`` (θ0) or ``task_arithmetic``
      (θ0 + ``others_scale`` · Σ τ).
    - ``svd``: the top-k SVD of Eq. 5 (:func:`~madeit_core.geometry.top_k_svd`): ``subspace``
      (default: shifted subspace iteration with a Rayleigh–Ritz finish, affinity ≥ 0.997 to the
      exact top-k on every module of real fine-tuned checkpoints and about 6× faster than the
      full SVD on ViT-B/32 shapes), ``exact`` (the full thin SVD: the paper's Eq. 5 to the
      letter), ``gram`` (the exact top-k through the Gram matrix) or ``randomized`` (Halko et
      al.'s range finder). ``results/perf/README.md`` compares them.
    """

    rank_ratio: float = 0.1
    margin: float = 1.0
    history: HistoryRule = "past+current"
    min_history: int = 2
    std_ddof: int = 0
    merge_rule: MergeRule = "polar"
    score: ScoreRule = "subspace"
    others: OthersRule = "mean"
    others_scale: float = 0.3
    svd: SvdMethod = "subspace"

    def __post_init__(self) -> None:
        rank_for(1, 1, self.rank_ratio)  # validates the range
        choices = {"history": ("past+current", "past"), "merge_rule": ("polar", "sum", "mean"),
                   "score": ("subspace", "cosine"), "others": ("mean", "pretrained", "task_arithmetic"),
                   "svd": SVD_METHODS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise MergeInputError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        if self.min_history < 1:
            raise MergeInputError(f"min_history must be ≥ 1, got {self.min_history}")
        if self.std_ddof not in (0, 1):
            raise MergeInputError(f"std_ddof must be 0 or 1, got {self.std_ddof}")


@dataclass
class Decision:
    """One row of the decision log: what module ``module`` did with task ``task``."""

    task: str
    step: int
    module: str
    action: str                 # first | create | consolidate | zero
    expert: int                 # index of the expert the task now belongs to
    scores: list[float]         # S_j against the module's (non-zero) experts before the decision
    threshold: float | None     # τ_m, None when too little history
    history_mean: float | None
    history_std: float | None
    history_size: int
    experts_after: int


@dataclass
class ModuleExperts:
    """The expert set of one module and its score history H_m."""

    spec: ModuleSpec
    rank: int
    experts: list[Expert] = field(default_factory=list)
    history: list[float] = field(default_factory=list)

    def zero_index(self) -> int | None:
        return next((i for i, e in enumerate(self.experts) if e.is_zero), None)

    def absorb(self, task: str, delta: torch.Tensor | None, step: int, cfg: EvolutionConfig,
               new: Expert | None = None) -> Decision:
        """Evolve with task ``task``: its update ``delta``, or its expert ``new`` if already extracted."""
        if new is None:
            if delta is None:
                raise MergeInputError(f"module {self.spec.key}: absorb needs the update or its expert")
            with timed("svd"):
                new = extract_expert(delta, rank=self.rank, task=task, svd=cfg.svd)
        base = {"task": task, "step": step, "module": self.spec.key}
        if new.is_zero:
            z = self.zero_index()
            if z is None:
                self.experts.append(new)
                z = len(self.experts) - 1
            else:
                self.experts[z].tasks.append(task)
            return Decision(**base, action="zero", expert=z, scores=[], threshold=None, history_mean=None,
                            history_std=None, history_size=len(self.history), experts_after=len(self.experts))
        candidates = [i for i, e in enumerate(self.experts) if not e.is_zero]
        if not candidates:
            self.experts.append(new)
            return Decision(**base, action="first", expert=len(self.experts) - 1, scores=[], threshold=None,
                            history_mean=None, history_std=None, history_size=len(self.history),
                            experts_after=len(self.experts))
        score_fn = expert_affinity if cfg.score == "subspace" else expert_cosine
        with timed("affinity"):
            scores = [score_fn(self.experts[i], new) for i in candidates]
        H = self.history + scores if cfg.history == "past+current" else list(self.history)
        best = max(range(len(scores)), key=lambda j: (scores[j], -j))
        threshold = mean = std = None
        if len(H) >= cfg.min_history:
            mean = statistics.fmean(H)
            std = statistics.pstdev(H) if cfg.std_ddof == 0 else statistics.stdev(H)
            threshold = mean + cfg.margin * std
        if threshold is not None and scores[best] >= threshold:
            j = candidates[best]
            with timed("merge"):
                self.experts[j] = merge_experts(self.experts[j], new, rank=self.rank, rule=cfg.merge_rule)
            action, idx = "consolidate", j
        else:
            self.experts.append(new)
            action, idx = "create", len(self.experts) - 1
        self.history.extend(scores)
        return Decision(**base, action=action, expert=idx, scores=scores, threshold=threshold, history_mean=mean,
                        history_std=std, history_size=len(H), experts_after=len(self.experts))

    def expert_of(self, task: str) -> int:
        for i, e in enumerate(self.experts):
            if task in e.tasks:
                return i
        raise KeyError(f"task {task!r} has no expert in module {self.spec.key}")


class ExpertBank:
    """All modules' expert sets, the merged *other* parameters and the decision log."""

    def __init__(self, specs: list[ModuleSpec], config: EvolutionConfig | None = None,
                 batch_svd: bool | None = None) -> None:
        """``batch_svd``: extract all modules' experts with one batched SVD per stack of
        same-shaped updates (:func:`~madeit_core.geometry.extract_experts`); None (default) does
        so when the updates are on a GPU. Results equal the one-by-one path up to rounding."""
        if not specs:
            raise MergeInputError("no linear modules to build experts for (empty module list)")
        keys = [s.key for s in specs]
        if len(set(keys)) != len(keys):
            raise MergeInputError("duplicate module keys in the module list")
        self.config = config or EvolutionConfig()
        self.specs = list(specs)
        self.modules: dict[str, ModuleExperts] = {
            s.key: ModuleExperts(s, rank_for(s.d_out, s.d_in, self.config.rank_ratio)) for s in specs}
        self.tasks: list[str] = []
        self.others_sum: dict[str, torch.Tensor] = {}
        self.decisions: list[Decision] = []
        self.batch_svd = batch_svd

    # ------------------------------------------------------------------ evolution
    def absorb(self, task: str, pretrained: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor],
               validated: bool = False) -> list[Decision]:
        """Absorb one fine-tuned model (Algorithm 1, one step). Inputs are validated first
        (:func:`~madeit_core.statedict.check_compatible`) unless ``validated`` says the caller
        has just done so (MADE-IT's method class: the base class checks every model)."""
        if task in self.tasks:
            raise MergeInputError(f"duplicate task name {task!r}")
        with timed("validate"):
            if not validated:
                check_compatible(pretrained, finetuned, f"fine-tuned model of {task!r}")
            for s in self.specs:
                if s.key not in pretrained:
                    raise MergeInputError(f"module weight {s.key!r} is not in the model's state dict")
                shape = tuple(pretrained[s.key].shape[:2])
                if shape != (s.d_out, s.d_in) or not pretrained[s.key].is_floating_point():
                    raise MergeInputError(f"module {s.key!r}: expected a float ({s.d_out}, {s.d_in}) weight, "
                                          f"got {pretrained[s.key].dtype} {tuple(pretrained[s.key].shape)}")
        step = len(self.tasks) + 1
        decisions = []
        batch = self.batch_svd
        if batch is None:
            batch = any(finetuned[s.key].is_cuda for s in self.specs)
        if batch:
            with timed("delta"):
                deltas = [as_matrix(finetuned[s.key].to(compute_dtype(pretrained[s.key]))
                                    - pretrained[s.key].to(compute_dtype(pretrained[s.key]))) for s in self.specs]
            with timed("svd"):
                new = extract_experts(deltas, [self.modules[s.key].rank for s in self.specs], task, self.config.svd)
            del deltas
            for s, e in zip(self.specs, new, strict=True):
                decisions.append(self.modules[s.key].absorb(task, None, step, self.config, new=e))
        else:
            for s in self.specs:
                w0 = pretrained[s.key]
                with timed("delta"):
                    delta = as_matrix(finetuned[s.key].to(compute_dtype(w0)) - w0.to(compute_dtype(w0)))
                decisions.append(self.modules[s.key].absorb(task, delta, step, self.config))
        module_keys = set(self.modules)
        with timed("others"):
            for k, v in pretrained.items():
                if k in module_keys or not v.is_floating_point():
                    continue
                tau = finetuned[k].to(compute_dtype(v)) - v.to(compute_dtype(v))
                self.others_sum[k] = tau if k not in self.others_sum else self.others_sum[k] + tau
        self.tasks.append(task)
        self.decisions.extend(decisions)
        return decisions

    def others_delta(self) -> dict[str, torch.Tensor]:
        """Update of every *other* float parameter under the ``others`` rule."""
        n = len(self.tasks)
        if n == 0 or self.config.others == "pretrained":
            return {}
        scale = 1.0 / n if self.config.others == "mean" else self.config.others_scale
        return {k: v * scale for k, v in self.others_sum.items()}

    # ------------------------------------------------------------------ views
    def num_experts(self) -> dict[str, int]:
        return {k: len(m.experts) for k, m in self.modules.items()}

    def num_parameters(self) -> int:
        return sum(e.num_parameters() for m in self.modules.values() for e in m.experts)

    def allocation(self) -> dict[str, list[int]]:
        """Module key → expert index of each task, in arrival order (Fig. 2/7)."""
        return {k: [m.expert_of(t) for t in self.tasks] for k, m in self.modules.items()}

    def summary(self) -> dict[str, Any]:
        counts = self.num_experts()
        T = max(len(self.tasks), 1)
        return {"tasks": list(self.tasks), "modules": len(counts), "experts_total": sum(counts.values()),
                "experts_mean": sum(counts.values()) / max(len(counts), 1),
                "reduction_rate": 1 - sum(counts.values()) / (T * max(len(counts), 1)),
                "expert_parameters": self.num_parameters()}

    # ------------------------------------------------------------------ persistence
    def to_tensors_and_meta(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        modules_meta = []
        for mi, s in enumerate(self.specs):
            m = self.modules[s.key]
            experts_meta = []
            for ei, e in enumerate(m.experts):
                for part in ("U", "s", "V"):
                    tensors[f"m{mi}.e{ei}.{part}"] = getattr(e, part)
                experts_meta.append({"tasks": list(e.tasks), "rank": e.rank})
            modules_meta.append({"spec": s.to_dict(), "rank": m.rank, "history": m.history, "experts": experts_meta})
        others_keys = sorted(self.others_sum)
        for oi, k in enumerate(others_keys):
            tensors[f"o{oi}"] = self.others_sum[k]
        meta = {"format": BANK_FORMAT, "config": asdict(self.config), "tasks": list(self.tasks),
                "modules": modules_meta, "others_keys": others_keys,
                "decisions": [asdict(d) for d in self.decisions]}
        return tensors, meta

    @classmethod
    def from_tensors_and_meta(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                              source: str = "bank") -> ExpertBank:
        if meta.get("format") != BANK_FORMAT:
            raise BankFormatError(f"{source}: not an expert bank (format {meta.get('format')!r}, "
                                  f"expected {BANK_FORMAT!r})")
        try:
            bank = cls([ModuleSpec.from_dict(m["spec"]) for m in meta["modules"]], EvolutionConfig(**meta["config"]))
            bank.tasks = list(meta["tasks"])
            for mi, mm in enumerate(meta["modules"]):
                me = bank.modules[mm["spec"]["key"]]
                me.rank, me.history = int(mm["rank"]), [float(x) for x in mm["history"]]
                me.experts = [Expert(tensors[f"m{mi}.e{ei}.U"], tensors[f"m{mi}.e{ei}.s"], tensors[f"m{mi}.e{ei}.V"],
                                     list(em["tasks"])) for ei, em in enumerate(mm["experts"])]
            bank.others_sum = {k: tensors[f"o{oi}"] for oi, k in enumerate(meta["others_keys"])}
            bank.decisions = [Decision(**d) for d in meta["decisions"]]
        except KeyError as exc:
            raise BankFormatError(f"{source}: missing entry {exc} (truncated or corrupted bank)") from exc
        except (TypeError, ValueError) as exc:
            raise BankFormatError(f"{source}: malformed bank metadata: {exc}") from exc
        return bank

    def save(self, path: str | Path) -> Path:
        """Write the bank to the folder ``path``: ``experts.safetensors`` and ``bank.json``.

        Both files are written atomically; the JSON records the SHA-256 of the tensor file, so a
        bank whose two files do not belong together, or whose tensors are damaged, fails to load.
        """
        folder = Path(path)
        tensors, meta = self.to_tensors_and_meta()
        save_tensors(folder / "experts.safetensors", tensors)
        meta["experts_sha256"] = _sha256(folder / "experts.safetensors")
        write_json(folder / "bank.json", meta)
        return folder

    @classmethod
    def load(cls, path: str | Path) -> ExpertBank:
        folder = Path(path)
        meta_file, tensor_file = folder / "bank.json", folder / "experts.safetensors"
        for f in (meta_file, tensor_file):
            if not f.is_file():
                raise BankFormatError(f"{folder} is not an expert bank: {f.name} is missing")
        try:
            meta = read_json(meta_file)
        except MergeInputError as exc:
            raise BankFormatError(str(exc)) from exc
        if meta.get("experts_sha256") != _sha256(tensor_file):
            raise BankFormatError(f"{tensor_file}: checksum does not match bank.json (truncated or corrupted)")
        return cls.from_tensors_and_meta(load_tensors(tensor_file), meta, str(folder))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


__all__ = ["Decision", "EvolutionConfig", "ExpertBank", "ModuleExperts"]
