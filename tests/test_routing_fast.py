"""The fast routing paths give the reference numbers: batched routing = :func:`route_path` per
sample, :func:`fpa_many` = :func:`fpa` per expert, the one-pass routed forward (samples grouped
per module, dense weights where cheaper) = one pass per path = dense per-sample models."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from madeit_core.errors import MergeInputError
from madeit_core.modules import as_matrix
from madeit_core.routing import RoutedModel, fpa, fpa_many, route_batch, route_path
from madeit_core.toy import ToyBenchmark


def _random_problem(seed: int, modules: int, tasks: int, batch: int, tie_grid: bool
                    ) -> tuple[dict[str, list[set[str]]], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    names = [f"t{i}" for i in range(tasks)]
    sets: dict[str, list[set[str]]] = {}
    for m in range(modules):
        labels = torch.randint(0, 3, (tasks,), generator=g).tolist()
        groups: dict[int, set[str]] = {}
        for t, lab in zip(names, labels):
            groups.setdefault(lab, set()).add(t)
        sets[f"m{m}"] = list(groups.values())
    scores = {}
    for m, s in sets.items():
        if len(s) < 2:
            continue                      # unscored, as RoutedModel.score leaves single-expert modules
        sc = torch.rand(batch, len(s), generator=g)
        scores[m] = (sc * 2).round() / 2 if tie_grid else sc   # a coarse grid makes many ties
    return sets, scores


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), modules=st.integers(1, 6), tasks=st.integers(1, 7),
       batch=st.integers(1, 9), tie_grid=st.booleans())
def test_route_batch_matches_route_path(seed: int, modules: int, tasks: int, batch: int, tie_grid: bool) -> None:
    sets, scores = _random_problem(seed, modules, tasks, batch, tie_grid)
    order = list(sets)
    paths, finals = route_batch(scores, sets, order, batch)
    for b in range(batch):
        per = {m: (scores[m][b].tolist() if m in scores else [0.0] * len(sets[m])) for m in order}
        chosen, C = route_path(per, sets, order)
        assert paths[b] == tuple(chosen[m] for m in order) and finals[b] == C


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), modules=st.integers(1, 6), tasks=st.integers(1, 7),
       batch=st.integers(1, 9), tie_grid=st.booleans())
def test_route_batch_matches_route_path_signed_anchor(seed: int, modules: int, tasks: int, batch: int,
                                                      tie_grid: bool) -> None:
    sets, scores = _random_problem(seed, modules, tasks, batch, tie_grid)
    order = list(sets)
    g = torch.Generator().manual_seed(seed + 1)
    signed = {m: torch.rand(batch, generator=g) < 0.5 for m in scores}   # unscored modules count as signed
    paths, finals = route_batch(scores, sets, order, batch, "signed", signed)
    for b in range(batch):
        per = {m: (scores[m][b].tolist() if m in scores else [0.0] * len(sets[m])) for m in order}
        chosen, C = route_path(per, sets, order, "signed", {m: bool(v[b]) for m, v in signed.items()})
        assert paths[b] == tuple(chosen[m] for m in order) and finals[b] == C
    # all signed, or no flags at all: the paper's rule
    same = route_batch(scores, sets, order, batch)
    everywhere = {m: torch.ones(batch, dtype=torch.bool) for m in scores}
    assert route_batch(scores, sets, order, batch, "signed", everywhere) == same
    assert route_batch(scores, sets, order, batch, "signed") == same


def test_route_batch_rejects_bad_scores() -> None:
    sets = {"m0": [{"a"}, {"b"}]}
    with pytest.raises(MergeInputError, match="m0"):
        route_batch({"m0": torch.zeros(3, 3)}, sets, ["m0"], 3)


@pytest.mark.parametrize("aggregation", ["mean", "cls", "token_mean"])
def test_fpa_many_matches_fpa(aggregation: str) -> None:
    g = torch.Generator().manual_seed(1)
    h = torch.randn(4, 5, 12, generator=g)
    Vs = [torch.linalg.qr(torch.randn(12, k, generator=g))[0] for k in (3, 1, 4)]
    Vs.insert(1, torch.zeros(12, 0))                                   # a zero expert
    ks = [V.shape[1] for V in Vs]
    seg = torch.zeros(sum(ks), len(ks))
    start = 0
    for j, k in enumerate(ks):
        seg[start:start + k, j] = 1
        start += k
    got = fpa_many(h, torch.cat(Vs, 1), seg, aggregation)  # type: ignore[arg-type]
    want = torch.stack([fpa(h, V, aggregation) for V in Vs], 1)  # type: ignore[arg-type]
    assert torch.allclose(got, want, atol=1e-6) and torch.all(got[:, 1] == 0)


def _mixed_batch(bench: ToyBenchmark) -> torch.Tensor:
    return torch.cat([bench.unlabeled_samples(t, 3, 0) for t in bench.tasks])


def test_one_pass_equals_per_path_and_dense_models(separate: tuple[ToyBenchmark, object]) -> None:
    bench, m = separate
    bank = m.bank  # type: ignore[attr-defined]
    x = _mixed_batch(bench)
    fast = RoutedModel(bench.pretrained(), bank)                       # grouping="module", the default
    slow = RoutedModel(bench.pretrained(), bank, grouping="path")
    theta0 = {k: v.clone() for k, v in fast.model.state_dict().items()}
    y_fast, y_slow = fast(x), slow(x)
    assert fast.path_counts[-1] > 1                                   # really a mixed batch
    assert torch.allclose(y_fast, y_slow, atol=1e-5)
    paths, _ = fast.route(x)
    for b in range(x.shape[0]):
        dense = copy.deepcopy(bench.pretrained())
        sd = dense.state_dict()
        with torch.no_grad():
            for spec, e_idx in zip(bank.specs, paths[b]):
                as_matrix(sd[spec.key]).add_(bank.modules[spec.key].experts[e_idx].delta())
            for k, v in bank.others_delta().items():
                sd[k].add_(v)
        assert torch.allclose(y_fast[b:b + 1], dense(x[b:b + 1]), atol=1e-5)
    # one path for the whole batch: every module has one expert and enough tokens, so weights go dense
    one = bench.unlabeled_samples(bench.tasks[0], 8, 0)
    p1 = [paths[0]] * one.shape[0]
    y_dense = fast.forward_with_paths(one, p1)
    assert fast.dense_modules[-1] > 0
    assert torch.allclose(y_dense, fast.forward_with_paths(one, p1, dense=False), atol=1e-5)
    after = fast.model.state_dict()
    others = set(bank.others_delta())
    assert all(torch.equal(after[k], theta0[k]) for k in theta0 if k not in others)   # θ0 weights restored


def test_weights_restored_when_a_module_fails(separate: tuple[ToyBenchmark, object]) -> None:
    bench, m = separate
    routed = RoutedModel(bench.pretrained(), m.bank)  # type: ignore[attr-defined]
    w0 = {s.key: routed._mods[s.key].weight.detach().clone() for s in routed.specs}
    x = bench.unlabeled_samples(bench.tasks[0], 8, 0)
    paths, _ = routed.route(x)
    last = routed._mods[routed.specs[-1].key]

    def boom(mod: torch.nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
        raise RuntimeError("boom")

    h = last.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            routed.forward_with_paths(x, paths)
    finally:
        h.remove()
    assert all(torch.equal(routed._mods[k].weight, w) for k, w in w0.items())
    with pytest.raises(MergeInputError, match="paths"):
        routed.forward_with_paths(x, paths[:-1])
    with pytest.raises(MergeInputError, match="grouping"):
        RoutedModel(bench.pretrained(), m.bank, grouping="nope")  # type: ignore[arg-type, attr-defined]


@pytest.mark.parametrize("kind", ["linear", "conv1x1"])
def test_add_lowrank_groups_in_one_copy(kind: str) -> None:
    """_add_lowrank adds each group's U diag(s) Vᵀh to its rows: the same numbers as summing
    group by group out of place, the module's own output untouched, its memory format kept."""
    from madeit_core.experts import Expert
    from madeit_core.routing import _add_lowrank

    g = torch.Generator().manual_seed(0)
    d_in, d_out, k, B = 6, 5, 2, 7

    def expert() -> Expert:
        return Expert(torch.randn(d_out, k, generator=g), torch.rand(k, generator=g),
                      torch.randn(d_in, k, generator=g), ["t"])

    if kind == "conv1x1":
        h = torch.randn(B, d_in, 3, 4, generator=g).contiguous(memory_format=torch.channels_last)
        output = torch.randn(B, d_out, 3, 4, generator=g).contiguous(memory_format=torch.channels_last)
    else:
        h, output = torch.randn(B, 3, d_in, generator=g), torch.randn(B, 3, d_out, generator=g)
    before = output.clone()
    e0, e1, e2 = expert(), expert(), expert()
    rows1, rows2 = torch.tensor([0, 2, 5]), torch.tensor([1, 3, 4, 6])

    def upd(e: Expert, x: torch.Tensor) -> torch.Tensor:
        if kind == "conv1x1":
            return torch.einsum("ok,bkhw->bohw", e.U * e.s, torch.einsum("ck,bchw->bkhw", e.V, x))
        return (x @ e.V) * e.s @ e.U.T

    for groups in ([(e0, None)], [(e1, rows1), (e2, rows2)], [(e0, None), (e1, rows1), (e2, rows2)]):
        want = before.clone()
        for e, rows in groups:
            if rows is None:
                want = want + upd(e, h)
            else:
                want = want.index_add(0, rows, upd(e, h[rows]))
        got = _add_lowrank(output, h, groups, kind)
        assert torch.allclose(got, want, atol=1e-5)
        assert torch.equal(output, before)
        if kind == "conv1x1" and groups[0][1] is not None:
            assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(_add_lowrank(output, h, [], kind), output)
