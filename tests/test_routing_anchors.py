"""FPA only where a path can anchor (:func:`anchor_modules`): the routing never reads another
module's scores, so routing with those modules unscored gives exactly the paths of full scoring."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from madeit_core import routing
from madeit_core.methods import get_method
from madeit_core.methods.base import MergeContext
from madeit_core.routing import RoutedModel, anchor_modules, route_batch, route_path
from madeit_core.toy import ToyBenchmark

PATTERNS = ("random", "separate", "merged", "nested", "first_separate")


def _bank_sets(seed: int, modules: int, tasks: int, pattern: str) -> dict[str, list[set[str]]]:
    """Per module a partition of the tasks (the experts' identity sets), by consolidation pattern:
    ``random`` groups, ``separate`` (one expert per task), ``merged`` (one expert), ``nested``
    (coarser with depth: prefixes of a chain of merges) or ``first_separate`` (random, except one
    module with one expert per task)."""
    g = torch.Generator().manual_seed(seed)
    names = [f"t{i}" for i in range(tasks)]
    sets: dict[str, list[set[str]]] = {}
    special = int(torch.randint(0, modules, (1,), generator=g))
    for m in range(modules):
        if pattern == "separate" or (pattern == "first_separate" and m == special):
            labels = list(range(tasks))
        elif pattern == "merged":
            labels = [0] * tasks
        elif pattern == "nested":
            groups = max(1, tasks - m)
            labels = [min(i, groups - 1) for i in range(tasks)]
        else:
            k = int(torch.randint(1, tasks + 1, (1,), generator=g))
            labels = torch.randint(0, k, (tasks,), generator=g).tolist()
        parts: dict[int, set[str]] = {}
        for t, lab in zip(names, labels):
            parts.setdefault(lab, set()).add(t)
        sets[f"m{m}"] = list(parts.values())
    return sets


class _Reads(list):  # type: ignore[type-arg]
    """A score list that records whether the routing read any of its entries."""

    def __init__(self, values: list[float], log: set[str], name: str) -> None:
        super().__init__(values)
        self.log, self.name = log, name

    def __getitem__(self, i):  # type: ignore[no-untyped-def]
        self.log.add(self.name)
        return super().__getitem__(i)


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 10_000), modules=st.integers(1, 7), tasks=st.integers(1, 7),
       batch=st.integers(1, 12), pattern=st.sampled_from(PATTERNS), tie_grid=st.booleans(),
       anchor=st.sampled_from(routing.ANCHOR_RULES))
def test_pruned_scoring_gives_the_same_paths(seed: int, modules: int, tasks: int, batch: int, pattern: str,
                                             tie_grid: bool, anchor: str) -> None:
    sets = _bank_sets(seed, modules, tasks, pattern)
    order = list(sets)
    multi = {m for m in order if len(sets[m]) > 1}
    need = anchor_modules(sets, order, anchor)  # type: ignore[arg-type]
    assert need <= multi
    if anchor == "signed":
        assert need == multi
    g = torch.Generator().manual_seed(seed + 7)
    full = {m: torch.rand(batch, len(sets[m]), generator=g) for m in multi}
    if tie_grid:
        full = {m: (s * 2).round() / 2 for m, s in full.items()}
    signed = {m: torch.rand(batch, generator=g) < 0.5 for m in multi} if anchor == "signed" else None
    want = route_batch(full, sets, order, batch, anchor, signed)  # type: ignore[arg-type]
    pruned = {m: s for m, s in full.items() if m in need}
    assert route_batch(pruned, sets, order, batch, anchor, signed) == want  # type: ignore[arg-type]
    # garbage instead of nothing at the other modules: still the same paths
    noisy = {**full, **{m: -full[m] for m in multi - need}}
    assert route_batch(noisy, sets, order, batch, anchor, signed) == want  # type: ignore[arg-type]
    # sample by sample, the reference routing reads scores at modules of `need` only
    for b in range(batch):
        read: set[str] = set()
        per = {m: _Reads(full[m][b].tolist() if m in full else [0.0], read, m) for m in order}
        flags = None if signed is None else {m: bool(v[b]) for m, v in signed.items()}
        chosen, C = route_path(per, sets, order, anchor, flags)  # type: ignore[arg-type]
        assert read <= need
        assert want[0][b] == tuple(chosen[m] for m in order) and want[1][b] == C


@pytest.mark.parametrize("first", [0, 2, 4])
def test_first_anchor_with_one_expert_per_task_needs_one_module(first: int) -> None:
    tasks = ["a", "b", "c", "d"]
    g = torch.Generator().manual_seed(first)
    sets: dict[str, list[set[str]]] = {}
    for m in range(5):
        if m == first:
            sets[f"m{m}"] = [{t} for t in tasks]
        else:                                          # consolidated: at most 3 experts
            labels = torch.randint(0, 3, (4,), generator=g).tolist()
            parts: dict[int, set[str]] = {}
            for t, lab in zip(tasks, labels):
                parts.setdefault(lab, set()).add(t)
            sets[f"m{m}"] = list(parts.values())
    order = list(sets)
    assert anchor_modules(sets, order) == {f"m{first}"}
    assert anchor_modules(sets, order, "signed") == {m for m in order if len(sets[m]) > 1}
    # every module one expert per task: the deepest anchors alone; a single-expert bank needs none
    assert anchor_modules({m: [{t} for t in tasks] for m in order}, order) == {"m4"}
    assert anchor_modules({m: [set(tasks)] for m in order}, order) == frozenset()


def test_reanchoring_needs_more_modules() -> None:
    # m2 anchors; its expert {a, b} leaves m1 two candidates, so m1 re-anchors; m0 is always resolved
    sets = {"m0": [{"a", "b"}, {"c", "d"}], "m1": [{"a"}, {"b"}, {"c", "d"}], "m2": [{"a", "b"}, {"c"}, {"d"}]}
    assert anchor_modules(sets, list(sets)) == {"m2", "m1"}


@pytest.fixture(scope="module")
def bench() -> ToyBenchmark:
    return ToyBenchmark(num_tasks=4, steps=20)


def _bank(bench: ToyBenchmark, margin: float) -> object:
    m = get_method("made_it", rank_ratio=0.5, margin=margin)
    m.setup(bench.pretrained(), MergeContext(modules=bench.modules()))
    for t in bench.tasks:
        m.absorb(t, bench.finetuned(t))
    return m.bank  # type: ignore[attr-defined]


@pytest.mark.parametrize("margin", [0.0, 1.0, 100.0])
@pytest.mark.parametrize("anchor", routing.ANCHOR_RULES)
def test_routed_model_scores_only_anchor_modules(bench: ToyBenchmark, margin: float, anchor: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    bank = _bank(bench, margin)
    x = torch.cat([bench.unlabeled_samples(t, 3, 0) for t in bench.tasks])
    fast = RoutedModel(bench.pretrained(), bank, anchor=anchor)  # type: ignore[arg-type]
    scores = fast.score(x)
    assert set(scores) == fast.fpa_modules
    if margin == 100.0 and anchor == "experts":   # one expert per task everywhere: one anchor
        assert len(fast.fpa_modules) == 1
    # the previous behaviour: score every multi-expert module
    monkeypatch.setattr(routing, "anchor_modules",
                        lambda sets, order, rule: frozenset(m for m in order if len(sets[m]) > 1))
    full = RoutedModel(bench.pretrained(), bank, anchor=anchor)  # type: ignore[arg-type]
    full_scores = full.score(x)
    assert set(full_scores) >= set(scores)
    assert all(torch.equal(scores[m], full_scores[m]) for m in scores)
    assert fast.route(x) == full.route(x)
