"""The activation cache of routed inference: an LRU within its budget, and results bit for bit
equal with and without it, the pre-trained pass skipped on a repeat."""

from __future__ import annotations

import pytest
import torch

from madeit_core.activation_cache import ActivationCache, shared_activation_cache
from madeit_core.errors import MergeInputError
from madeit_core.methods import get_method
from madeit_core.methods.base import MergeContext
from madeit_core.routing import RoutedModel
from madeit_core.toy import ToyBenchmark


def _t(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.float32)          # 4n bytes


def test_lru_budget_entry_limit_and_all_or_nothing() -> None:
    c = ActivationCache(max_bytes=100, max_entry_bytes=40)
    c.put("a", {"m1": _t(5), "m2": _t(5), "big": _t(11)})          # 44 bytes > entry limit: not kept
    assert len(c) == 2 and c.bytes == 40
    assert c.get("a", ["m1", "big"]) is None and c.misses == 1       # one missing: nothing
    got = c.get("a", ["m1", "m2"])
    assert got is not None and set(got) == {"m1", "m2"} and c.hits == 1
    c.put("b", {"m1": _t(10), "m2": _t(10)})                         # 80 more: evict least recently used
    assert c.bytes == 100                                            # a.m1 went, a.m2 still fits
    assert c.get("a", ["m1"]) is None and c.get("a", ["m2"]) is not None
    assert c.get("b", ["m1", "m2"]) is not None
    c.put("b", {"m1": _t(10)})                                       # replacing keeps the byte count right
    assert c.bytes == 100 and len(c) == 3
    c.clear()
    assert len(c) == 0 and c.bytes == 0


def test_batch_key_tracks_tag_dtype_shape_and_bytes() -> None:
    x = torch.arange(6.0).reshape(2, 3)
    k = ActivationCache.batch_key("t", x)
    assert k == ActivationCache.batch_key("t", x.clone())
    y = x.clone()
    y[1, 2] += 1e-6
    assert len({k, ActivationCache.batch_key("u", x), ActivationCache.batch_key("t", y),
                ActivationCache.batch_key("t", x.reshape(3, 2)), ActivationCache.batch_key("t", x.double())}) == 5


def test_bad_budget_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(MergeInputError, match="≥ 0"):
        ActivationCache(max_bytes=-1)
    import madeit_core.activation_cache as ac
    monkeypatch.setattr(ac, "_SHARED", None)
    monkeypatch.setenv("MADEIT_ACTIVATION_CACHE_MB", "lots")
    with pytest.raises(MergeInputError, match="MADEIT_ACTIVATION_CACHE_MB"):
        shared_activation_cache()
    monkeypatch.setenv("MADEIT_ACTIVATION_CACHE_MB", "0")
    monkeypatch.setattr(ac, "_SHARED", None)
    assert not shared_activation_cache().enabled
    monkeypatch.setattr(ac, "_SHARED", None)


def _count_passes(routed: RoutedModel) -> list[int]:
    calls = [0]
    routed.model.register_forward_pre_hook(lambda mod, inp: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("anchor", ["experts", "signed"])
def test_routed_results_identical_and_pass_skipped(separate: tuple[ToyBenchmark, object], anchor: str) -> None:
    bench, m = separate
    bank = m.bank  # type: ignore[attr-defined]
    x = torch.cat([bench.unlabeled_samples(t, 4, 0) for t in bench.tasks])
    plain = RoutedModel(bench.pretrained(), bank, anchor=anchor)            # type: ignore[arg-type]
    cache = ActivationCache(max_bytes=64 << 20)
    cached = RoutedModel(bench.pretrained(), bank, anchor=anchor, activation_cache=cache)  # type: ignore[arg-type]
    assert cached.fpa_modules
    passes = _count_passes(cached)
    y0 = plain(x)
    s0 = plain.score(x)
    y1 = cached(x)                     # miss: pre-trained pass + routed pass
    assert passes[0] == 2 and cache.misses == 1 and len(cache) == len(cached.specs)
    y2 = cached(x)                     # hit: routed pass only
    assert passes[0] == 3 and cache.hits == 1
    s2 = cached.score(x)
    assert torch.equal(y0, y1) and torch.equal(y0, y2)
    assert s0.keys() == s2.keys() and all(torch.equal(s0[k], s2[k]) for k in s0)
    if anchor == "signed":
        assert cached.last_signed.keys() == plain.last_signed.keys()
        assert all(torch.equal(cached.last_signed[k], plain.last_signed[k]) for k in plain.last_signed)
    # a bank of another step shares the hit: same θ0, same batch
    other = RoutedModel(bench.pretrained(), bank, anchor=anchor, activation_cache=cache,  # type: ignore[arg-type]
                        theta0_tag=cached.theta0_tag)
    assert torch.equal(other(x), y0) and cache.hits == 3


def test_other_theta0_never_hits(separate: tuple[ToyBenchmark, object]) -> None:
    bench, m = separate
    bank = m.bank  # type: ignore[attr-defined]
    x = bench.unlabeled_samples(bench.tasks[0], 4, 0)
    cache = ActivationCache(max_bytes=64 << 20)
    a = RoutedModel(bench.pretrained(), bank, activation_cache=cache)    # type: ignore[arg-type]
    shifted = bench.pretrained()
    with torch.no_grad():
        for p in shifted.parameters():
            p.add_(0.01)
    b = RoutedModel(shifted, bank, activation_cache=cache)               # type: ignore[arg-type]
    assert a.theta0_tag != b.theta0_tag
    a(x)
    yb = b(x)
    assert cache.hits == 0 and cache.misses == 2
    assert torch.equal(yb, RoutedModel(shifted, bank)(x))               # type: ignore[arg-type]


def test_single_expert_bank_skips_the_pretrained_pass() -> None:
    bench = ToyBenchmark(num_tasks=1, steps=10)
    m = get_method("made_it", rank_ratio=0.5)
    m.setup(bench.pretrained(), MergeContext(modules=bench.modules()))
    m.absorb(bench.tasks[0], bench.finetuned(bench.tasks[0]))
    routed = RoutedModel(bench.pretrained(), m.bank)                    # type: ignore[attr-defined]
    assert not routed.fpa_modules
    passes = _count_passes(routed)
    routed(bench.unlabeled_samples(bench.tasks[0], 4, 0))
    assert passes[0] == 1
