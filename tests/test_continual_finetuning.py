"""The C. Fine-Tuned row (sequential fine-tuning on the training data): cache, resume, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from madeit_core.errors import MergeInputError
from madeit_core.methods import get_method
from madeit_core.protocol import RunSpec, _make_context, run_continual
from madeit_core.toy import ToyBenchmark

HP = {"steps": 6, "n_train": 64, "batch_size": 16}


@pytest.fixture(scope="module")
def bench() -> ToyBenchmark:
    return ToyBenchmark(num_tasks=3, steps=30)


def _spec(bench: ToyBenchmark, cache_dir: Path, **extra: object) -> RunSpec:
    return RunSpec(method="continual_finetuning", group="toy", tasks=bench.tasks, profile="test",
                   hparams={**HP, "cache_dir": str(cache_dir), **extra})


def test_trains_in_sequence_from_the_previous_weights(bench: ToyBenchmark, tmp_path: Path) -> None:
    spec = _spec(bench, tmp_path / "cache")
    m = get_method("continual_finetuning", **spec.hparams)
    m.setup(bench.pretrained(), _make_context(bench, spec, "cpu", False))
    theta0 = {k: v.clone() for k, v in bench.pretrained().state_dict().items()}
    m.absorb(bench.tasks[0], bench.finetuned(bench.tasks[0]))
    first = {k: v.clone() for k, v in m.merged.items()}
    assert any(not torch.equal(first[k], theta0[k]) for k in theta0)            # it trained
    m.absorb(bench.tasks[1], bench.finetuned(bench.tasks[1]))
    assert any(not torch.equal(m.merged[k], first[k]) for k in first)
    # the hand-over checkpoints are ignored: only the task name matters
    ignored = get_method("continual_finetuning", **{**spec.hparams, "cache": False})
    ignored.setup(bench.pretrained(), _make_context(bench, spec, "cpu", False))
    ignored.absorb(bench.tasks[0], {k: torch.zeros_like(v) for k, v in theta0.items()})
    assert all(torch.equal(ignored.merged[k], first[k]) for k in first)
    assert m.hparams()["steps"] == 6 and m.hparams()["recipe_from"].endswith("+ overrides")
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


def test_cache_reuses_each_order_prefix_and_survives_damage(bench: ToyBenchmark, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = run_continual(_spec(bench, cache), bench, tmp_path / "a", show_progress=False)
    assert first["method_summary"]["cache_hits"] == 0 and first["needs_data"] is True
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 3                                  # one per step of the order
    again = run_continual(_spec(bench, cache), bench, tmp_path / "b", show_progress=False)
    assert again["method_summary"]["cache_hits"] == 3 and again["acc_matrix"] == first["acc_matrix"]
    # another order shares no prefix with this one past the first task
    other = dataclasses.replace(_spec(bench, cache), run=1)
    run_continual(other, bench, tmp_path / "c", show_progress=False)
    assert len(list(cache.glob("*.safetensors"))) > 3
    # a damaged cache file is retrained, with the same bits
    files[0].write_bytes(b"not a safetensors file")
    healed = run_continual(_spec(bench, cache), bench, tmp_path / "d", show_progress=False)
    assert healed["method_summary"]["cache_hits"] == 2 and healed["acc_matrix"] == first["acc_matrix"]


def test_killed_run_resumes_identically(bench: ToyBenchmark, tmp_path: Path) -> None:
    full = run_continual(_spec(bench, tmp_path / "c1", cache=False), bench, tmp_path / "a", show_progress=False)
    out = tmp_path / "b"
    part = run_continual(_spec(bench, tmp_path / "c2", cache=False), bench, out, show_progress=False, stop_after=1)
    assert part == {"interrupted": True, "completed_steps": 1}
    resumed = run_continual(_spec(bench, tmp_path / "c2", cache=False), bench, out, show_progress=False)
    assert resumed["acc_matrix"] == full["acc_matrix"] and resumed["ACC"] == full["ACC"]
    assert not list(tmp_path.glob("c2/*.safetensors"))      # cache=False writes none


def test_bad_input_is_named(bench: ToyBenchmark) -> None:
    with pytest.raises(MergeInputError, match="recipe must be"):
        get_method("continual_finetuning", recipe="zoo")
    spec = _spec(bench, Path("unused"))
    ctx = _make_context(bench, spec, "cpu", False)
    m = get_method("continual_finetuning", **spec.hparams)
    m.setup(bench.pretrained(), dataclasses.replace(ctx, labeled_samples=None))
    with pytest.raises(MergeInputError, match="labeled_samples"):
        m.absorb(bench.tasks[0], bench.finetuned(bench.tasks[0]))
    m = get_method("continual_finetuning", **spec.hparams)
    m.setup(bench.pretrained(), dataclasses.replace(ctx, heads={}))
    with pytest.raises(MergeInputError, match="head of task"):
        m.absorb(bench.tasks[0], bench.finetuned(bench.tasks[0]))
