"""Implicit routing (paper §3.2; method.md §5): no gate, no training, no data beyond the input.

1. Forward x through θ0 and, at each module, score every expert by feature projection
   alignment FPA(h, E) = ‖Vᵀh‖ / ‖h‖ (Eq. 8), aggregated over tokens. Only modules that can
   anchor a path for some input need it (:func:`anchor_modules`; exact, computed from the bank).
2. :func:`route_path`: the module with the most experts anchors the path (ties: the deepest); its
   best expert fixes the constraint set C = A_e. Every other module keeps the experts whose
   identity sets meet C; the most ambiguous module re-anchors (C ← C ∩ A_e) until each module has
   one expert.
3. Forward x again with W_m = W_0,m + U diag(s) Vᵀ of the chosen experts, applied as low-rank
   updates, and the merged *other* parameters. Samples with the same path share one pass.

**Why the paper's anchor fails on a convnet (offline benchmark: EfficientNet-Lite0 at 64 px,
offline-8, orders of seeds 42 and 43; diagnosis on the real banks with 100–200 test images per
task).** The implementation follows the paper; the failure is the method's on this backbone.

- A project 1×1 conv reads the output of ReLU6: its input is non-negative for every image, while
  every expand conv and the head conv read signed features (100 % of images either way). For
  non-negative inputs the eight tasks' mean features nearly coincide (pairwise cosine 0.82–0.98
  at the 16 project convs, against −0.06–0.64 at the expand/head convs) and the common mean
  carries most of each input (‖mean‖ / rms 0.62–0.90, against 0.15–0.64). FPA(h, E) there mostly
  measures how much of that shared direction span V_E holds, the same for every input: on the
  final bank of seed 43 one expert takes 95–100 % of all images at 5 project convs, and the share
  of images whose best expert holds their own task is 0.13–0.68 at the project convs against
  0.86–0.97 at the expand convs of blocks 6–15 and 0.93 at the head conv (chance 1/n_experts).
- Evolution keeps the most experts at shallow project convs here (each module's threshold is
  relative to its own score history), so the paper's anchor (most experts, ties deepest) is a
  project conv: ``_blocks.3._project_conv`` (d_in 144, rank 4) from step 4 of seed 43 on, where
  the expert of rendered_sst2 (its V holds the common direction best: cosine 0.82 against
  0.70–0.77) wins for all 200 images of every later task. cifar10, fashion_mnist, fer2013 and
  kmnist reach their own experts for 0 % of their images right after they arrive.
- Every lost sample is lost at the *first* anchor: once it kept the true task, propagation never
  dropped it. Consolidated experts are not favoured: all experts of a module have the same rank,
  and the polar merge slightly lowers a consolidated expert's mean FPA (0.58 against 0.60 for its
  members alone; the exact ``sum`` merge gives 0.62). FPA of the pixel-mean feature
  (``token_mean``) routes worse than the default mean of per-pixel FPA; centring each sample's
  pixels before FPA helps at the project convs but hurts at the signed ones (not offered).

``anchor="signed"`` (an option; the default ``"experts"`` is the paper's rule) ranks, per sample,
the modules whose input has a negative entry before those whose input is non-negative, and keeps
the paper's order (most candidates, ties deepest) within each class. On a model whose module
inputs all have negative entries (a transformer's LayerNorm and GELU outputs) it is the paper's
rule. Protocol runs (250 test images per task, 1 CPU thread), paper → signed: routing accuracy
right after arrival, mean over the 8 steps, 0.39 → 0.97 (seed 43) and 0.62 → 0.99 (seed 42);
mean a_ii 0.39 → 0.68 and 0.53 → 0.70, equal to the oracle path's (each task's own experts:
0.68 and 0.70); ACC 48.3 → 58.6 and 60.6 → 58.8 (oracle 62.2 and 63.8). The final routing stays
imperfect (0.38 → 0.79 and 0.84 → 0.82): on seed 42, 189 of 200 kmnist images take the head
conv's {gtsrb, kmnist, mnist} expert and are then sent to mnist by the next anchor, a shallow
expand conv (block 4), whose FPA does not tell the two digit sets apart.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from typing import Literal

import torch
from torch import nn

from madeit_core.activation_cache import ActivationCache
from madeit_core.errors import MergeInputError
from madeit_core.experts import ExpertBank
from madeit_core.geometry import Expert
from madeit_core.modules import ModuleSpec
from madeit_core.statedict import state_fingerprint
from madeit_core.timing import timed

Aggregation = Literal["mean", "cls", "token_mean"]
AnchorRule = Literal["experts", "signed"]
ANCHOR_RULES: tuple[str, ...] = ("experts", "signed")


def check_anchor_rule(anchor: str) -> None:
    """Raise a clear error for an anchor rule other than :data:`ANCHOR_RULES`."""
    if anchor not in ANCHOR_RULES:
        raise MergeInputError(f"unknown anchor rule {anchor!r} ({', '.join(ANCHOR_RULES)})")


def _tokens(h: torch.Tensor, kind: str) -> torch.Tensor:
    """Module input → [B, N, d_in] (a 1×1 conv's pixels are its tokens)."""
    if kind == "conv1x1":
        return h.flatten(2).transpose(1, 2)
    if h.ndim == 2:
        return h[:, None, :]
    return h.reshape(h.shape[0], -1, h.shape[-1])


def _tokens_for(h: torch.Tensor, aggregation: Aggregation) -> torch.Tensor:
    """The [B, N, d] tokens FPA reads under ``aggregation`` (all, token 0, or their mean)."""
    t = h[:, None, :] if h.ndim == 2 else h
    if aggregation == "cls":
        return t[:, :1]
    if aggregation == "token_mean":
        return t.mean(dim=1, keepdim=True)
    if aggregation != "mean":
        raise MergeInputError(f"unknown FPA aggregation {aggregation!r} (mean, cls, token_mean)")
    return t


def fpa(h: torch.Tensor, V: torch.Tensor, aggregation: Aggregation = "mean", eps: float = 1e-12) -> torch.Tensor:
    """Eq. 8 per sample: FPA(h, E) = ‖Vᵀh‖ / ‖h‖ for tokens h ([B, N, d] or [B, d]).

    ``aggregation``: ``mean`` of the per-token FPA (default), ``cls`` (token 0 only) or
    ``token_mean`` (FPA of the mean token). An empty V (the zero expert) scores 0.
    """
    t = _tokens_for(h, aggregation)
    if V.shape[1] == 0:
        return torch.zeros(t.shape[0], dtype=t.dtype, device=t.device)
    num = torch.linalg.vector_norm(t @ V.to(t.dtype), dim=-1)
    den = torch.linalg.vector_norm(t, dim=-1).clamp_min(eps)
    return (num / den).mean(dim=1)


def route_path(scores: Mapping[str, Sequence[float]], task_sets: Mapping[str, Sequence[Collection[str]]],
               module_order: Sequence[str], anchor_rule: AnchorRule = "experts",
               signed: Mapping[str, bool] | None = None) -> tuple[dict[str, int], frozenset[str]]:
    """Choose one expert per module for one sample (method.md §5, steps 3–4).

    ``scores[m][e]`` is the FPA of expert e of module m, ``task_sets[m][e]`` its identity set,
    ``module_order`` lists modules shallow to deep. Returns (module → chosen expert, final C).
    ``anchor_rule``: ``experts`` (the paper: most candidates, ties deepest) or ``signed`` (modules
    whose input has a negative entry, ``signed[m]``, first; a module missing there counts as
    signed; then the paper's order; see the module docstring).
    """
    check_anchor_rule(anchor_rule)
    depth = {m: i for i, m in enumerate(module_order)}
    sign = {m: True if signed is None else bool(signed.get(m, True)) for m in module_order}
    cands: dict[str, list[int]] = {m: list(range(len(task_sets[m]))) for m in module_order}
    for m in module_order:
        if not cands[m]:
            raise MergeInputError(f"module {m!r} has no experts")
        if len(scores[m]) != len(task_sets[m]):
            raise MergeInputError(f"module {m!r}: {len(scores[m])} scores for {len(task_sets[m])} experts")
    chosen: dict[str, int] = {}
    C: frozenset[str] | None = None
    while True:
        if C is not None:
            for m in module_order:
                if m not in chosen:
                    cands[m] = [e for e in cands[m] if C & frozenset(task_sets[m][e])]
                    if len(cands[m]) == 1:
                        chosen[m] = cands[m][0]
        open_modules = [m for m in module_order if m not in chosen]
        if not open_modules:
            break
        if anchor_rule == "experts":
            anchor = max(open_modules, key=lambda m: (len(cands[m]), depth[m]))
        else:
            anchor = max(open_modules, key=lambda m: (len(cands[m]) > 1, sign[m], len(cands[m]), depth[m]))
        if C is None and len(cands[anchor]) == 1:  # every module has a single expert
            for m in open_modules:
                chosen[m] = cands[m][0]
            break
        e = max(cands[anchor], key=lambda j: (scores[anchor][j], -j))
        chosen[anchor] = e
        A = frozenset(task_sets[anchor][e])
        C = A if C is None else C & A
    if C is None:
        all_tasks: set[str] = set()
        for m in module_order:
            for s in task_sets[m]:
                all_tasks |= set(s)
        C = frozenset(all_tasks)
    return chosen, C


def route_batch(scores: Mapping[str, torch.Tensor], task_sets: Mapping[str, Sequence[Collection[str]]],
                module_order: Sequence[str], batch: int, anchor_rule: AnchorRule = "experts",
                signed: Mapping[str, torch.Tensor] | None = None
                ) -> tuple[list[tuple[int, ...]], list[frozenset[str]]]:
    """:func:`route_path` for a whole batch at once; the same paths and sets, sample by sample.

    ``scores[m]`` is a [batch, n_experts] tensor (a module missing from ``scores`` scores 0 for
    every expert, as in :meth:`RoutedModel.route`). The only sample-dependent step of
    :func:`route_path` is the anchor's argmax; everything else (candidates, the next anchor, C)
    depends on the choices made so far. Samples that made the same choices therefore share one
    state, and each state needs one vectorised argmax (ties go to the lowest index, as in
    :func:`route_path`). Cost: one argmax per distinct partial path instead of a Python walk
    over the modules per sample.

    ``anchor_rule``/``signed`` as in :func:`route_path`, with ``signed[m]`` a [batch] bool tensor
    (a module missing from it counts as signed). With ``signed`` the anchor itself may differ
    between the samples of a state; they are split by anchor before the argmax.
    """
    check_anchor_rule(anchor_rule)
    depth = {m: i for i, m in enumerate(module_order)}
    sets = {m: [frozenset(a) for a in task_sets[m]] for m in module_order}
    for m in module_order:
        if not sets[m]:
            raise MergeInputError(f"module {m!r} has no experts")
        if m in scores and tuple(scores[m].shape) != (batch, len(sets[m])):
            raise MergeInputError(f"module {m!r}: scores of shape {tuple(scores[m].shape)}, expected "
                                  f"({batch}, {len(sets[m])})")
    all_tasks = frozenset().union(*(a for m in module_order for a in sets[m]))
    paths: list[tuple[int, ...] | None] = [None] * batch
    finals: list[frozenset[str] | None] = [None] * batch
    # a state: (sample indices, candidates per module, chosen per module, C)
    stack: list[tuple[torch.Tensor, dict[str, list[int]], dict[str, int], frozenset[str] | None]] = [
        (torch.arange(batch), {m: list(range(len(sets[m]))) for m in module_order}, {}, None)]
    while stack:
        idx, cands, chosen, C = stack.pop()
        if C is not None:
            for m in module_order:
                if m not in chosen:
                    cands[m] = [e for e in cands[m] if C & sets[m][e]]
                    if len(cands[m]) == 1:
                        chosen[m] = cands[m][0]
        open_modules = [m for m in module_order if m not in chosen]
        if open_modules:
            anchor = max(open_modules, key=lambda m: (len(cands[m]), depth[m]))
            if C is None and len(cands[anchor]) == 1:
                for m in open_modules:
                    chosen[m] = cands[m][0]
                open_modules = []
        if not open_modules:
            path = tuple(chosen[m] for m in module_order)
            for i in idx.tolist():
                paths[i], finals[i] = path, (C if C is not None else all_tasks)
            continue
        groups = [(anchor, idx)]
        if anchor_rule == "signed":
            # per sample: the first module of the paper's order whose input is signed
            ranked = sorted((m for m in open_modules if len(cands[m]) > 1), key=lambda m: (len(cands[m]), depth[m]),
                            reverse=True)
            which = torch.full((idx.numel(),), -1, dtype=torch.long)
            for j, m in enumerate(ranked):
                if signed is None or m not in signed:
                    which[which < 0] = j
                    break
                which[(which < 0) & signed[m].detach().cpu().bool()[idx]] = j
            which[which < 0] = 0
            groups = [(ranked[j], idx[which == j]) for j in torch.unique(which).tolist()]
        for anchor, sub in groups:
            cand = cands[anchor]
            if anchor in scores:
                sc = scores[anchor].detach()[sub.to(scores[anchor].device)][:, cand]
                pick = torch.argmax(sc.float(), dim=1).cpu()
            else:
                pick = torch.zeros(sub.numel(), dtype=torch.long)
            for j in torch.unique(pick).tolist():
                e = cand[j]
                A = sets[anchor][e]
                stack.append((sub[pick == j], {m: list(v) for m, v in cands.items()}, {**chosen, anchor: e},
                              A if C is None else C & A))
    return [p for p in paths if p is not None], [c for c in finals if c is not None]


def anchor_modules(task_sets: Mapping[str, Sequence[Collection[str]]], module_order: Sequence[str],
                   anchor_rule: AnchorRule = "experts") -> frozenset[str]:
    """The modules whose FPA :func:`route_path` / :func:`route_batch` can ever read, for any input.

    The routing reads a module's scores only when that module is the anchor, and (rule
    ``experts``) which module anchors depends on the bank alone: on the candidates left in each
    module, which depend on C and on the modules resolved so far, which depend on the experts the
    earlier anchors picked. The input enters only through those picks (an argmax of FPA among the
    anchor's candidates). So walk the routing's own state machine with *every* candidate of the
    anchor as a possible pick instead of the argmax: the reachable states are a superset of the
    states any input reaches, and the anchors met on the way a superset of the anchors any input
    uses. Scoring only these modules therefore gives every input the same anchors, the same
    argmaxes and the same path as scoring every module (bit-identical: each module's FPA is
    computed by the same call as before). A state's future depends only on C, on which modules
    are still open and on their candidates, so states are memoised on that.

    Rule ``signed``: the anchor is the first module, in the paper's order, whose input has a
    negative entry for that sample, so every module with several candidates at the first step can
    anchor for some sign pattern; the set is every multi-expert module (no saving).

    A bank whose first anchor has one expert per task fixes C to a single task at once, resolving
    every other module: the set is that one module.
    """
    check_anchor_rule(anchor_rule)
    sets = {m: [frozenset(a) for a in task_sets[m]] for m in module_order}
    multi = frozenset(m for m in module_order if len(sets[m]) > 1)
    if anchor_rule == "signed" or not multi:
        return multi
    depth = {m: i for i, m in enumerate(module_order)}
    anchors: set[str] = set()
    seen: set[tuple[frozenset[str], tuple[tuple[str, tuple[int, ...]], ...]]] = set()
    # a state as in route_batch, less the samples and the choices: (C, candidates of the open modules)
    stack: list[tuple[frozenset[str] | None, dict[str, list[int]]]] = [
        (None, {m: list(range(len(sets[m]))) for m in module_order})]
    while stack:
        C, open_cands = stack.pop()
        if C is not None:
            open_cands = {m: [e for e in c if C & sets[m][e]] for m, c in open_cands.items()}
            open_cands = {m: c for m, c in open_cands.items() if len(c) != 1}      # resolved
            key = (C, tuple(sorted((m, tuple(c)) for m, c in open_cands.items())))
            if key in seen:
                continue
            seen.add(key)
        if not open_cands:
            continue
        anchor = max(open_cands, key=lambda m: (len(open_cands[m]), depth[m]))
        if len(open_cands[anchor]) < 2:   # every module has a single expert (or none left)
            continue
        anchors.add(anchor)
        rest = {m: c for m, c in open_cands.items() if m != anchor}
        for e in open_cands[anchor]:
            stack.append((sets[anchor][e] if C is None else C & sets[anchor][e], rest))
    return frozenset(anchors)


def fpa_many(h: torch.Tensor, V_cat: torch.Tensor, segments: torch.Tensor, aggregation: Aggregation = "mean",
             eps: float = 1e-12) -> torch.Tensor:
    """FPA of several experts at once: [B, n_experts], column e equal to ``fpa(h, V_e)``.

    ``V_cat`` holds the experts' bases side by side (d × Σk) and ``segments`` (Σk × n_experts)
    is 1 where a column belongs to an expert, so ‖V_eᵀh‖² = ((hᵀV_cat)²  · segments)_e: one
    product with all bases instead of one per expert. A zero expert has an empty segment (FPA 0).
    """
    t = _tokens_for(h, aggregation)
    if V_cat.shape[1] == 0:
        return torch.zeros(t.shape[0], segments.shape[1], dtype=t.dtype, device=t.device)
    proj = t @ V_cat.to(t.dtype)
    num = (proj * proj) @ segments.to(t.dtype)
    den = torch.linalg.vector_norm(t, dim=-1).clamp_min(eps)
    return (num.clamp_min(0).sqrt() / den[..., None]).mean(dim=1)


Grouping = Literal["module", "path"]


class RoutedModel(nn.Module):
    """θ0 wrapped with an expert bank for routed inference (images → features).

    ``forward`` records, per sample, the final constraint set; :meth:`routing_accuracy` gives the
    share of samples since :meth:`reset_routing_log` whose set contains a given task (the
    diagnostic the paper lacks).

    Cost: two forward passes per batch, the fewest the method allows. The pre-trained pass
    scores every expert from the activations it records (:func:`fpa_many`, one product per
    module), only at the modules that can anchor some path (:func:`anchor_modules`, the rest's
    FPA is never read); :func:`route_batch` routes the batch with one argmax per distinct partial path; the
    routed pass then runs, with ``grouping="module"`` (default), once for the whole batch: at
    every module the samples are grouped by the expert their path picks. A module whose samples
    all use one expert and see many tokens gets θ0 + U diag(s) Vᵀ written into its weight for
    the pass (cheaper than the low-rank product when tokens · (d_in + d_out) > d_in · d_out);
    otherwise the expert is applied as a low-rank update, h ↦ W0 h + U (s ⊙ Vᵀh), for the
    samples that chose it. ``grouping="path"`` runs one pass per distinct path instead (the
    simple scheme; same numbers up to rounding).

    ``anchor``: the anchor rule of :func:`route_path` (``experts``, the paper's, by default;
    ``signed`` also records, in the pre-trained pass, whether each sample's input to each scored
    module has a negative entry).
    """

    def __init__(self, pretrained: nn.Module, bank: ExpertBank, aggregation: Aggregation = "mean",
                 copy_model: bool = True, grouping: Grouping = "module", anchor: AnchorRule = "experts",
                 activation_cache: ActivationCache | None = None, theta0_tag: str | None = None) -> None:
        super().__init__()
        if grouping not in ("module", "path"):
            raise MergeInputError(f"unknown grouping {grouping!r} (module, path)")
        check_anchor_rule(anchor)
        self.anchor: AnchorRule = anchor
        self.grouping: Grouping = grouping
        self.model = copy.deepcopy(pretrained) if copy_model else pretrained
        self.model.eval()
        self.bank = bank
        self.aggregation: Aggregation = aggregation
        self.specs = list(bank.specs)
        named = dict(self.model.named_modules())
        missing = [s.name for s in self.specs if s.name not in named]
        if missing:
            raise MergeInputError(f"model has no module(s) {missing[:5]} named in the bank")
        self._mods = {s.key: named[s.name] for s in self.specs}
        self._kinds = {s.key: s.kind for s in self.specs}
        device = next(self.model.parameters()).device
        self._experts: dict[str, list[Expert]] = {}
        for s in self.specs:
            w = self._mods[s.key].weight
            if tuple(w.shape[:2]) != (s.d_out, s.d_in):
                raise MergeInputError(f"module {s.name!r}: model weight {tuple(w.shape)} vs bank ({s.d_out}, {s.d_in})")
            self._experts[s.key] = [Expert(e.U.to(device, w.dtype), e.s.to(device, w.dtype), e.V.to(device, w.dtype),
                                           list(e.tasks)) for e in bank.modules[s.key].experts]
        self._task_sets = {k: [frozenset(e.tasks) for e in v] for k, v in self._experts.items()}
        # the modules that can anchor some input's path: the only ones whose FPA routing reads
        self.fpa_modules = anchor_modules(self._task_sets, [s.key for s in self.specs], anchor)
        # all bases of such a module side by side, for one FPA product per module
        self._fpa_bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key, experts in self._experts.items():
            if key not in self.fpa_modules:
                continue
            ks = [e.rank for e in experts]
            seg = torch.zeros(sum(ks), len(ks), dtype=experts[0].V.dtype, device=device)
            start = 0
            for j, k in enumerate(ks):
                seg[start:start + k, j] = 1.0
                start += k
            self._fpa_bases[key] = (torch.cat([e.V for e in experts], dim=1).contiguous(), seg)
        sd = self.model.state_dict()
        delta = bank.others_delta()
        unknown = [k for k in delta if k not in sd]
        if unknown:
            raise MergeInputError(f"bank holds other parameter(s) {unknown[:5]} that the model lacks")
        self._others_pre = {k: sd[k].detach().clone() for k in delta}
        self._others_merged = {k: (sd[k].to(delta[k].dtype) + delta[k].to(sd[k].device)).to(sd[k].dtype)
                               for k in delta}
        self.activation_cache = activation_cache if activation_cache is not None and activation_cache.enabled else None
        self.theta0_tag = theta0_tag
        if self.activation_cache is not None and self.theta0_tag is None:
            self.theta0_tag = state_fingerprint(sd)   # the weights of the pre-trained pass
        self._route_log: list[frozenset[str]] = []
        self.path_counts: list[int] = []
        self.dense_modules: list[int] = []
        self.last_signed: dict[str, torch.Tensor] = {}

    # ----------------------------------------------------------------- diagnostics
    def reset_routing_log(self) -> None:
        self._route_log = []
        self.path_counts = []
        self.dense_modules = []

    def routing_accuracy(self, task: str) -> float | None:
        if not self._route_log:
            return None
        return sum(task in c for c in self._route_log) / len(self._route_log)

    # ----------------------------------------------------------------- passes
    def _load_others(self, which: Mapping[str, torch.Tensor]) -> None:
        if not which:
            return
        sd = self.model.state_dict()
        with torch.no_grad():
            for k, v in which.items():
                sd[k].copy_(v)

    def score(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pass 1: FPA of every expert at every module of :attr:`fpa_modules`, [B, n_experts] each.

        :attr:`fpa_modules` (:func:`anchor_modules`, computed once per bank when the model is built)
        holds the modules that can anchor some input's path; routing never reads the others' FPA,
        so they are neither recorded nor scored, and with none (every module has one expert) the
        pass is skipped. With ``anchor="signed"`` it is every multi-expert module, and
        :attr:`last_signed` gets a [B] bool tensor per such module: whether the sample's input to
        that module has a negative entry.

        With an :class:`~madeit_core.activation_cache.ActivationCache`, a batch seen before (same
        θ0, same bytes) is scored from the module inputs the pass recorded then, without a pass;
        a pass that runs records every module input the cache will hold."""
        out: dict[str, torch.Tensor] = {}
        signed: dict[str, torch.Tensor] = {}
        self.last_signed = signed
        if not self._fpa_bases:
            return out
        cache, batch = self.activation_cache, None
        if cache is not None:
            assert self.theta0_tag is not None
            batch = cache.batch_key(f"{self.theta0_tag}|{x.device}", x)
            hit = cache.get(batch, self._fpa_bases)
            if hit is not None:
                for key, h in hit.items():
                    self._score_module(key, h, out, signed)
                return out
        recorded: dict[str, torch.Tensor] = {}
        handles = []
        for s in self.specs:
            scored = s.key in self._fpa_bases
            if not scored and cache is None:
                continue

            def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], key: str = s.key, scored: bool = scored) -> None:
                h = inp[0]
                if cache is not None and h.numel() * h.element_size() <= cache.max_entry_bytes:
                    recorded[key] = h.detach().clone()   # a later in-place op must not change it
                if scored:
                    self._score_module(key, h, out, signed)

            handles.append(self._mods[s.key].register_forward_pre_hook(hook))
        try:
            with timed("pretrained_pass"), torch.no_grad():
                self._load_others(self._others_pre)
                self.model(x)
        finally:
            for h in handles:
                h.remove()
        if batch is not None:
            assert cache is not None
            cache.put(batch, recorded)
        return out

    def _score_module(self, key: str, h: torch.Tensor, out: dict[str, torch.Tensor],
                      signed: dict[str, torch.Tensor]) -> None:
        """FPA of module ``key``'s experts on its θ0 input ``h`` (and, for ``signed``, the sign record)."""
        with timed("fpa"):
            V_cat, seg = self._fpa_bases[key]
            out[key] = fpa_many(_tokens(h, self._kinds[key]), V_cat, seg, self.aggregation)
            if self.anchor == "signed":
                signed[key] = (h.detach() < 0).flatten(1).any(dim=1).cpu()

    def route(self, x: torch.Tensor) -> tuple[list[tuple[int, ...]], list[frozenset[str]]]:
        """Paths (one expert index per module, in bank order) and constraint sets per sample."""
        scores = self.score(x)
        with timed("routing"):
            return route_batch(scores, self._task_sets, [s.key for s in self.specs], x.shape[0], self.anchor,
                               self.last_signed if self.anchor == "signed" else None)

    def forward_with_path(self, x: torch.Tensor, path: Sequence[int]) -> torch.Tensor:
        """Pass 2 for samples sharing ``path``: low-rank updates on θ0 plus merged others."""
        return self.forward_with_paths(x, [tuple(path)] * x.shape[0], dense=False)

    def forward_with_paths(self, x: torch.Tensor, paths: Sequence[Sequence[int]], dense: bool = True
                           ) -> torch.Tensor:
        """Pass 2 for a batch whose samples may follow different paths, in one forward.

        At each module the samples are grouped by the expert their path picks. With ``dense``, a
        module whose samples all pick one expert and whose input has enough tokens runs with the
        dense weight W0 + U diag(s) Vᵀ (restored to W0 right after the module ran); otherwise each
        group adds its expert's low-rank update to the module's θ0 output.
        """
        if len(paths) != x.shape[0]:
            raise MergeInputError(f"{len(paths)} paths for a batch of {x.shape[0]}")
        sel = torch.tensor([list(p) for p in paths], dtype=torch.long).reshape(x.shape[0], len(self.specs))
        handles = []
        swapped: dict[str, torch.Tensor] = {}
        n_dense = [0]
        for mi, s in enumerate(self.specs):
            column = sel[:, mi]
            used = torch.unique(column).tolist()
            experts = self._experts[s.key]
            groups = [(experts[e], None if len(used) == 1 else (column == e).nonzero().flatten().to(x.device))
                      for e in used if not experts[e].is_zero]
            if not groups:
                continue
            mod = self._mods[s.key]
            if dense and len(groups) == 1 and groups[0][1] is None and mod.weight.is_contiguous():
                def pre(m: nn.Module, inp: tuple[torch.Tensor, ...], e: Expert = groups[0][0], key: str = s.key,
                        spec: ModuleSpec = s) -> None:
                    h = inp[0]
                    n = h.numel() // spec.d_in
                    if n * (spec.d_in + spec.d_out) > spec.d_in * spec.d_out:
                        with timed("dense_expert"):
                            w = m.weight.data
                            swapped[key] = w.clone()
                            w.view(spec.d_out, spec.d_in).addmm_(e.U * e.s, e.V.T)
                            n_dense[0] += 1

                def post(m: nn.Module, inp: tuple[torch.Tensor, ...], output: torch.Tensor,
                         e: Expert = groups[0][0], key: str = s.key, kind: str = s.kind) -> torch.Tensor:
                    w0 = swapped.pop(key, None)
                    if w0 is not None:
                        m.weight.data.copy_(w0)
                        return output
                    return _add_lowrank(output, inp[0], [(e, None)], kind)

                handles.append(mod.register_forward_pre_hook(pre))
                handles.append(mod.register_forward_hook(post))
            else:
                def post_many(m: nn.Module, inp: tuple[torch.Tensor, ...], output: torch.Tensor,
                              groups: list[tuple[Expert, torch.Tensor | None]] = groups,
                              kind: str = s.kind) -> torch.Tensor:
                    return _add_lowrank(output, inp[0], groups, kind)

                handles.append(mod.register_forward_hook(post_many))
        try:
            self._load_others(self._others_merged)
            y = self.model(x)
        finally:
            for h in handles:
                h.remove()
            with torch.no_grad():
                for key, w0 in swapped.items():   # only after an exception inside a module
                    self._mods[key].weight.data.copy_(w0)
        self.dense_modules.append(n_dense[0])
        return y

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paths, sets = self.route(x)
        self._route_log.extend(sets)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, p in enumerate(paths):
            groups[p].append(i)
        self.path_counts.append(len(groups))
        if self.grouping == "module" or len(groups) == 1:
            with timed("routed_pass"):
                return self.forward_with_paths(x, paths)
        out: torch.Tensor | None = None
        for p, idx in groups.items():
            with timed("routed_pass"):
                ids = torch.tensor(idx, device=x.device)
                y = self.forward_with_path(x[ids], p)
                if out is None:
                    out = y.new_empty((x.shape[0], *y.shape[1:]))
                out[ids] = y
        assert out is not None
        return out


def _add_lowrank(output: torch.Tensor, h: torch.Tensor, groups: Sequence[tuple[Expert, torch.Tensor | None]],
                 kind: str) -> torch.Tensor:
    """output + U diag(s) Vᵀ h for each (expert, sample rows) group (rows None: all samples).

    The module's output is copied once and the groups are added into the copy in place (an
    out-of-place ``index_add`` per group copied the whole activation once per group: about a
    fifth of routed evaluation time on EfficientNet with several paths per batch). The copy keeps
    the output's memory format (channels-last convolution outputs stay channels-last, which the
    next layers run faster on; the old out-of-place sum made them contiguous, so features agree
    with it only to rounding, about 3e-5 on EfficientNet features of size 6)."""
    with timed("lowrank_apply"):
        out: torch.Tensor | None = None
        for e, rows in groups:
            hs = h if rows is None else h.index_select(0, rows)
            if kind == "conv1x1":
                z = torch.einsum("bchw,ck->bkhw", hs, e.V) * e.s[None, :, None, None]
                upd = torch.einsum("bkhw,ok->bohw", z, e.U)
            else:
                upd = ((hs @ e.V) * e.s) @ e.U.T
            if out is None:
                if rows is None:
                    out = output + upd
                    continue
                out = output.clone()
            if rows is None:
                out.add_(upd)
            else:
                out.index_add_(0, rows, upd)
        return output if out is None else out


def wrap(pretrained: nn.Module, bank: ExpertBank, aggregation: Aggregation = "mean",
         anchor: AnchorRule = "experts") -> RoutedModel:
    """Wrap a pre-trained model with an expert bank for routed inference (the documented API)."""
    return RoutedModel(pretrained, bank, aggregation, anchor=anchor)
