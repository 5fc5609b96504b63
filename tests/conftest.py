"""Shared fixtures."""

from __future__ import annotations

import pytest

from madeit_core.methods import get_method
from madeit_core.methods.base import MergeContext
from madeit_core.toy import ToyBenchmark


@pytest.fixture(scope="module")
def separate() -> tuple[ToyBenchmark, object]:
    bench = ToyBenchmark(num_tasks=3, steps=30)
    m = get_method("made_it", rank_ratio=0.5, margin=100.0)   # never consolidate: paths differ by task
    m.setup(bench.pretrained(), MergeContext(modules=bench.modules()))
    for t in bench.tasks:
        m.absorb(t, bench.finetuned(t))
    return bench, m
