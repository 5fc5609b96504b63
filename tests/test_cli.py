"""The CLI: merging people's checkpoints in every format, inspecting banks, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from madeit_core.cli import main, merge_checkpoints
from madeit_core.errors import MergeInputError
from madeit_core.experts import ExpertBank
from madeit_core.methods import get_method
from madeit_core.methods.base import MergeContext
from madeit_core.routing import wrap
from madeit_core.toy import ToyBenchmark


@pytest.fixture(scope="module")
def bench() -> ToyBenchmark:
    return ToyBenchmark(num_tasks=3, steps=30)


@pytest.fixture()
def ckpts(bench: ToyBenchmark, tmp_path: Path) -> tuple[Path, list[Path]]:
    pre = tmp_path / "pre.pt"
    torch.save(bench.pretrained().state_dict(), pre)
    paths = []
    for i, t in enumerate(bench.tasks):
        sd = bench.finetuned(t)
        if i == 0:
            p = tmp_path / f"{t}.safetensors"
            save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
        elif i == 1:
            p = tmp_path / t
            p.mkdir()
            save_file({k: v.contiguous() for k, v in sd.items()}, str(p / "model.safetensors"))
        else:
            p = tmp_path / f"{t}.bin"
            torch.save({"state_dict": sd}, p)  # a Lightning-style wrapper
        paths.append(p)
    return pre, paths


def test_merge_matches_the_method_and_routes(bench: ToyBenchmark, ckpts: tuple[Path, list[Path]],
                                            tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pre, paths = ckpts
    out = tmp_path / "bank"
    rc = main(["merge", "--pretrained", str(pre), "--finetuned", *map(str, paths), "--out", str(out),
               "--rank-ratio", "0.5", "--margin", "0.5", "--exclude", "patch_embedding"])
    assert rc == 0
    bank = ExpertBank.load(out)
    assert bank.tasks == bench.tasks
    method = get_method("made_it", rank_ratio=0.5, margin=0.5)
    method.setup(bench.pretrained(), MergeContext(modules=bench.modules()))
    for t in bench.tasks:
        method.absorb(t, bench.finetuned(t))
    assert bank.allocation() == method.bank.allocation()
    x = bench.unlabeled_samples(bench.tasks[0], 2, 0)
    assert torch.allclose(wrap(bench.pretrained(), bank)(x), method.merged_model()(x), atol=1e-6)
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "layers.0.q_proj.weight" in text and "reduction rate" in text
    assert main(["inspect", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["summary"]["tasks"] == bench.tasks


def test_merge_bad_inputs_leave_nothing(bench: ToyBenchmark, ckpts: tuple[Path, list[Path]], tmp_path: Path) -> None:
    pre, paths = ckpts
    out = tmp_path / "bank"
    with pytest.raises(MergeInputError, match="empty model sequence"):
        merge_checkpoints(pre, [], out)
    with pytest.raises(MergeInputError, match="duplicate task names"):
        merge_checkpoints(pre, paths[:2], out, names=["a", "a"])
    bad = tmp_path / "bad.pt"
    sd = dict(bench.finetuned(bench.tasks[0]))
    sd["layers.0.fc1.weight"] = torch.zeros(3, 3)
    torch.save(sd, bad)
    with pytest.raises(MergeInputError, match=r"shape mismatch at 'layers.0.fc1.weight'.*\(32, 16\) vs \(3, 3\)"):
        merge_checkpoints(pre, [paths[0], bad], out, show_progress=False)
    half = tmp_path / "half.pt"
    torch.save({k: v.half() for k, v in bench.finetuned(bench.tasks[0]).items()}, half)
    with pytest.raises(MergeInputError, match="mixed dtypes"):
        merge_checkpoints(pre, [half], out, show_progress=False)
    ints = tmp_path / "int.pt"
    torch.save({**bench.finetuned(bench.tasks[0]), "extra": torch.ones(2, dtype=torch.int64)}, ints)
    with pytest.raises(MergeInputError, match="unexpected \\['extra'\\]"):
        merge_checkpoints(pre, [ints], out, show_progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        merge_checkpoints(pre, [tmp_path / "missing.pt"], out, show_progress=False)
    assert not out.exists()


def test_half_precision_checkpoints(bench: ToyBenchmark, tmp_path: Path) -> None:
    pre = tmp_path / "pre.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in bench.pretrained().state_dict().items()}, str(pre))
    fts = []
    for t in bench.tasks[:2]:
        p = tmp_path / f"{t}.safetensors"
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in bench.finetuned(t).items()}, str(p))
        fts.append(p)
    bank = merge_checkpoints(pre, fts, tmp_path / "b", show_progress=False, rank_ratio=0.5)
    e = bank.modules["layers.0.fc1.weight"].experts[0]
    assert e.U.dtype == torch.float32  # computed in fp32
    model = bench.pretrained().to(torch.bfloat16)
    y = wrap(model, bank)(bench.unlabeled_samples(bench.tasks[0], 1, 0).to(torch.bfloat16))
    assert y.dtype == torch.bfloat16  # returned in the input dtype


def test_cli_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "b").mkdir()
    assert main(["inspect", str(tmp_path / "b")]) == 2
    assert "bank.json is missing" in capsys.readouterr().err


def test_cli_run_toy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--method", "swa", "--benchmark", "toy", "--group", "toy-2", "--out", str(tmp_path)]) == 0
    assert "ACC" in capsys.readouterr().out
    assert (tmp_path / "smoke" / "toy-2" / "swa" / "seed42.json").is_file()
