"""Implicit routing: FPA, hand-built paths (bifurcation, re-anchoring), routed forward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from madeit_core.errors import MergeInputError
from madeit_core.experts import EvolutionConfig, ExpertBank
from madeit_core.methods import get_method
from madeit_core.methods.base import MergeContext
from madeit_core.modules import as_matrix, discover_modules
from madeit_core.routing import RoutedModel, fpa, route_batch, route_path
from madeit_core.toy import ToyBenchmark


def test_fpa_values() -> None:
    V = torch.eye(4)[:, :2]
    inside = torch.tensor([[[1.0, 2.0, 0.0, 0.0]]])
    outside = torch.tensor([[[0.0, 0.0, 3.0, 0.0]]])
    assert fpa(inside, V).item() == pytest.approx(1.0)
    assert fpa(outside, V).item() == pytest.approx(0.0)
    half = torch.tensor([[[1.0, 0.0, 1.0, 0.0]]])
    assert fpa(half, V).item() == pytest.approx(2 ** -0.5)
    tokens = torch.cat([inside, outside], dim=1)  # one sample, two tokens
    assert fpa(tokens, V, "mean").item() == pytest.approx(0.5)
    assert fpa(tokens, V, "cls").item() == pytest.approx(1.0)
    mean_tok = (inside + outside) / 2
    assert fpa(tokens, V, "token_mean").item() == pytest.approx(fpa(mean_tok, V).item())
    assert fpa(tokens, torch.zeros(4, 0)).item() == 0.0
    with pytest.raises(MergeInputError):
        fpa(tokens, V, "max")  # type: ignore[arg-type]


def test_route_path_single_anchor() -> None:
    sets = {"m0": [{"a", "b", "c"}], "m1": [{"a", "b"}, {"c"}], "m2": [{"a"}, {"b"}, {"c"}]}
    scores = {"m0": [0.0], "m1": [0.9, 0.1], "m2": [0.1, 0.9, 0.2]}
    chosen, C = route_path(scores, sets, ["m0", "m1", "m2"])
    # m2 has the most experts: it anchors on {b}; m1 must then take {a, b} despite its own scores
    assert chosen == {"m0": 0, "m1": 0, "m2": 1} and C == {"b"}


def test_route_path_bifurcation_and_reanchoring() -> None:
    sets = {"m1": [{"a", "b"}, {"c"}], "m2": [{"a"}, {"b", "c"}]}
    scores = {"m1": [0.3, 0.6], "m2": [0.2, 0.8]}
    # tie in expert count: the deepest module (m2) anchors on {b, c}; both experts of m1 meet it,
    # so m1 re-anchors on its best candidate {c} and C = {b, c} ∩ {c}
    chosen, C = route_path(scores, sets, ["m1", "m2"])
    assert chosen == {"m1": 1, "m2": 1} and C == {"c"}
    # the same scores with the order reversed: m1 is now the deepest and anchors first
    chosen, C = route_path(scores, sets, ["m2", "m1"])
    assert chosen == {"m1": 1, "m2": 1} and C == {"c"}
    scores2 = {"m1": [0.6, 0.3], "m2": [0.2, 0.8]}
    chosen, C = route_path(scores2, sets, ["m1", "m2"])
    assert chosen == {"m1": 0, "m2": 1} and C == {"b"}


def test_route_path_signed_anchor() -> None:
    # a shallow module fed non-negative features (after a ReLU) holds the most experts, but its
    # FPA favours one expert for every input; the deeper module reads signed features
    sets = {"relu": [{"a"}, {"b"}, {"c"}], "lin": [{"a"}, {"b", "c"}]}
    scores = {"relu": [0.9, 0.5, 0.4], "lin": [0.2, 0.8]}
    order = ["relu", "lin"]
    # the paper: the module with the most experts anchors, whatever its input
    assert route_path(scores, sets, order) == ({"relu": 0, "lin": 0}, frozenset({"a"}))
    # signed first: lin anchors on {b, c}, then relu re-anchors among {b} and {c}
    chosen, C = route_path(scores, sets, order, "signed", {"relu": False, "lin": True})
    assert chosen == {"relu": 1, "lin": 1} and C == {"b"}
    # every input signed (or no sign information): the paper's rule
    for signed in ({"relu": True, "lin": True}, {"lin": True}, None):
        assert route_path(scores, sets, order, "signed", signed) == route_path(scores, sets, order)
    # no signed module with a choice left: the paper's order among the others
    assert route_path(scores, sets, order, "signed", {"relu": False, "lin": False}) == route_path(scores, sets, order)
    with pytest.raises(MergeInputError, match="anchor"):
        route_path(scores, sets, order, "widest")  # type: ignore[arg-type]


def test_route_path_all_single() -> None:
    sets = {"m0": [{"a", "b"}], "m1": [{"a", "b"}]}
    chosen, C = route_path({"m0": [0.0], "m1": [0.0]}, sets, ["m0", "m1"])
    assert chosen == {"m0": 0, "m1": 0} and C == {"a", "b"}


def test_route_path_constraint_never_empties() -> None:
    g = torch.Generator().manual_seed(0)
    tasks = [f"t{i}" for i in range(6)]
    for trial in range(50):
        sets = {}
        for m in range(5):
            labels = torch.randint(0, 3, (6,), generator=g).tolist()
            groups: dict[int, set[str]] = {}
            for t, lab in zip(tasks, labels):
                groups.setdefault(lab, set()).add(t)
            sets[f"m{m}"] = list(groups.values())
        scores = {m: torch.rand(len(s), generator=g).tolist() for m, s in sets.items()}
        chosen, C = route_path(scores, sets, list(sets))
        assert C, trial
        for m, e in chosen.items():
            assert C <= sets[m][e]


@pytest.fixture(scope="module")
def bench() -> ToyBenchmark:
    return ToyBenchmark(num_tasks=3, steps=30)


def _made_it(bench: ToyBenchmark, **kw: object) -> object:
    m = get_method("made_it", rank_ratio=0.5, **kw)
    m.setup(bench.pretrained(), MergeContext(modules=bench.modules()))
    for t in bench.tasks:
        m.absorb(t, bench.finetuned(t))
    return m


def test_routed_forward_equals_dense_weights(bench: ToyBenchmark) -> None:
    m = _made_it(bench, margin=100.0)  # never consolidate: one expert per task per module
    routed = m.merged_model()
    x = bench.unlabeled_samples(bench.tasks[0], 3, 0)
    paths, sets = routed.route(x)
    bank = m.bank
    for b in range(x.shape[0]):
        dense = copy.deepcopy(bench.pretrained())
        sd = dense.state_dict()
        with torch.no_grad():
            for spec, e_idx in zip(bank.specs, paths[b]):
                e = bank.modules[spec.key].experts[e_idx]
                as_matrix(sd[spec.key]).add_(e.delta())
            for k, v in bank.others_delta().items():
                sd[k].add_(v)
        expected = dense(x[b:b + 1])
        got = routed(x[b:b + 1])
        assert torch.allclose(got, expected, atol=1e-5)
    batch = routed(x)  # grouped by path, same numbers as one by one
    singles = torch.cat([routed(x[b:b + 1]) for b in range(x.shape[0])])
    assert torch.allclose(batch, singles, atol=1e-5)


def test_one_path_per_task_when_experts_never_merge(bench: ToyBenchmark) -> None:
    m = _made_it(bench, margin=100.0)
    routed = m.merged_model()
    x = bench.unlabeled_samples(bench.tasks[1], 4, 0)
    paths, sets = routed.route(x)
    for p, C in zip(paths, sets):
        assert len(C) == 1  # every module separates all tasks: the path is one task's experts
        (task,) = tuple(C)
        assert all(m.bank.modules[s.key].experts[e].tasks == [task] for s, e in zip(m.bank.specs, p))
    routed.reset_routing_log()
    routed(x)
    acc = routed.routing_accuracy(bench.tasks[1])
    assert acc == pytest.approx(sum(bench.tasks[1] in C for C in sets) / len(sets))


def test_signed_anchor_on_a_relu_model() -> None:
    """RoutedModel(anchor="signed") records which inputs have a negative entry and routes each
    sample as route_path does with those flags; on signed inputs it is the paper's rule."""
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 12), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 5))
    specs = discover_modules(model)
    bank = ExpertBank(specs, EvolutionConfig(rank_ratio=0.25, margin=100.0))   # never consolidate
    sd0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for t in ("a", "b", "c"):
        bank.absorb(t, sd0, {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in sd0.items()})
    x = torch.cat([torch.randn(6, 6, generator=g), torch.rand(3, 6, generator=g)])  # 3 non-negative inputs
    routed = RoutedModel(model, bank, anchor="signed")
    paths, finals = routed.route(x)
    flags = routed.last_signed
    keys = [s.key for s in specs]
    assert not flags[keys[2]].any()                        # after the ReLU: never signed
    assert flags[keys[0]].tolist() == [True] * 6 + [False] * 3 and flags[keys[1]].all()
    scores = routed.score(x)
    for b in range(x.shape[0]):
        per = {k: scores[k][b].tolist() for k in keys}
        chosen, C = route_path(per, bank_sets(bank), keys, "signed", {k: bool(flags[k][b]) for k in keys})
        assert paths[b] == tuple(chosen[k] for k in keys) and finals[b] == C
    paper = RoutedModel(model, bank)
    paper_paths, _ = paper.route(x)
    assert (paper_paths, _) == route_batch(scores, bank_sets(bank), keys, x.shape[0])
    assert not paper.last_signed                           # the paper's rule records no signs
    # the paper anchors on the deepest module (post-ReLU here); the signed rule does not
    assert any(p[2] != q[2] for p, q in zip(paths, paper_paths))
    with pytest.raises(MergeInputError, match="anchor"):
        RoutedModel(model, bank, anchor="widest")  # type: ignore[arg-type]


def test_signed_anchor_equals_paper_on_signed_features(bench: ToyBenchmark) -> None:
    # the toy ViT's modules read LayerNorm / GELU / attention outputs: signed for every sample
    m = _made_it(bench, margin=0.0)
    x = torch.cat([bench.unlabeled_samples(t, 3, 0) for t in bench.tasks])
    signed = RoutedModel(bench.pretrained(), m.bank, anchor="signed")  # type: ignore[attr-defined]
    got = signed.route(x)
    assert all(bool(f.all()) for f in signed.last_signed.values())
    assert got == RoutedModel(bench.pretrained(), m.bank).route(x)  # type: ignore[attr-defined]
    made = get_method("made_it", anchor="signed")
    assert made.hparams()["anchor"] == "signed" and get_method("made_it").hparams()["anchor"] == "experts"
    with pytest.raises(MergeInputError, match="anchor"):
        get_method("made_it", anchor="widest")


def bank_sets(bank: ExpertBank) -> dict[str, list[frozenset[str]]]:
    return {k: [frozenset(e.tasks) for e in m.experts] for k, m in bank.modules.items()}


def test_routed_model_rejects_foreign_bank(bench: ToyBenchmark) -> None:
    m = _made_it(bench)
    other = ExpertBank([s for s in m.bank.specs], EvolutionConfig())
    other.specs[0] = type(other.specs[0])(**{**other.specs[0].to_dict(), "name": "nope"})
    with pytest.raises(MergeInputError, match="no module"):
        RoutedModel(bench.pretrained(), other)
