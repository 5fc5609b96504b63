"""Expert evolution: hand-built cases with known decisions, every option, the bank format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from madeit_core.errors import BankFormatError, MergeInputError
from madeit_core.experts import EvolutionConfig, ExpertBank
from madeit_core.modules import ModuleSpec

SPEC = ModuleSpec(name="lin", key="lin.weight", d_out=8, d_in=6, kind="linear", group="mlp", depth=0)
RHO = 1 / 3  # rank 2 for a 8 × 6 module


def _bases() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    QU, _ = torch.linalg.qr(torch.randn(8, 4, generator=g))
    QV, _ = torch.linalg.qr(torch.randn(6, 4, generator=g))
    return QU, QV


QU, QV = _bases()
D1 = (QU[:, :2] * torch.tensor([3.0, 2.0])) @ QV[:, :2].T     # rank 2
D2 = (QU[:, 2:4] * torch.tensor([2.5, 1.0])) @ QV[:, 2:4].T   # orthogonal to D1 on both sides
W0 = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
B0 = torch.zeros(8)
PRE = {"lin.weight": W0, "lin.bias": B0}


def ft(delta: torch.Tensor, bias: float = 0.0) -> dict[str, torch.Tensor]:
    return {"lin.weight": W0 + delta, "lin.bias": B0 + bias}


def run(deltas: list[torch.Tensor], **cfg: object) -> ExpertBank:
    bank = ExpertBank([SPEC], EvolutionConfig(rank_ratio=RHO, **cfg))  # type: ignore[arg-type]
    for i, d in enumerate(deltas):
        bank.absorb(f"t{i}", PRE, ft(d, bias=float(i)))
    return bank


def actions(bank: ExpertBank) -> list[str]:
    return [d.action for d in bank.decisions]


def test_identical_candidate_consolidates() -> None:
    bank = run([D1, D2, D1])
    assert actions(bank) == ["first", "create", "consolidate"]
    last = bank.decisions[-1]
    assert last.scores[0] == pytest.approx(1.0, abs=1e-6) and last.scores[1] == pytest.approx(0.0, abs=1e-6)
    # H = [0] + [1, 0]: threshold = mean + std = 1/3 + sqrt(2/9)
    assert last.threshold == pytest.approx(1 / 3 + (2 / 9) ** 0.5, abs=1e-6)
    assert bank.allocation() == {"lin.weight": [0, 1, 0]}
    assert bank.modules["lin.weight"].experts[0].tasks == ["t0", "t2"]


def test_orthogonal_candidate_creates_once_history_exists() -> None:
    bank = run([D1, D1, D2])
    # step 2: history holds one score (< min_history 2): create even though identical
    assert actions(bank) == ["first", "create", "create"]
    assert bank.decisions[-1].threshold is not None
    assert bank.num_experts() == {"lin.weight": 3}


def test_history_option_past_only() -> None:
    assert actions(run([D1, D2, D1], history="past")) == ["first", "create", "create"]
    assert actions(run([D1, D2, D1, D1], history="past"))[-1] == "consolidate"


def test_margin_option() -> None:
    assert actions(run([D1, D2, D1], margin=10.0))[-1] == "create"
    assert actions(run([D1, D2, D1], margin=0.0))[-1] == "consolidate"


def test_min_history_option() -> None:
    assert actions(run([D1, D2, D1], min_history=4))[-1] == "create"


def test_score_option_cosine_sees_sign() -> None:
    # -D1 spans the same subspaces as D1 (affinity 1) but its flattened cosine is -1
    assert actions(run([D1, D2, -D1], score="subspace"))[-1] == "consolidate"
    bank = run([D1, D2, -D1], score="cosine")
    assert bank.decisions[-1].scores[0] == pytest.approx(-1.0, abs=1e-6)
    assert actions(bank)[-1] == "create"


@pytest.mark.parametrize("rule", ["polar", "sum", "mean"])
def test_merge_rule_option(rule: str) -> None:
    bank = run([D1, D2, D1], merge_rule=rule)
    e = bank.modules["lin.weight"].experts[0]
    if rule == "sum":
        assert torch.allclose(e.delta(), 2 * D1, atol=1e-5)
    elif rule == "mean":
        assert torch.allclose(e.delta(), D1, atol=1e-5)
    else:
        assert not torch.allclose(e.delta(), 2 * D1, atol=1e-2)  # polar adds a spurious part
        assert torch.allclose(e.U.T @ e.U, torch.eye(2), atol=1e-5)


def test_others_option() -> None:
    deltas = [D1, D2, D1]
    assert run(deltas).others_delta()["lin.bias"] == pytest.approx(torch.full((8,), 1.0))  # mean of 0, 1, 2
    assert run(deltas, others="pretrained").others_delta() == {}
    ta = run(deltas, others="task_arithmetic", others_scale=0.5).others_delta()["lin.bias"]
    assert torch.allclose(ta, torch.full((8,), 1.5))


def test_randomized_svd_gives_same_decisions() -> None:
    assert actions(run([D1, D2, D1], svd="randomized")) == actions(run([D1, D2, D1]))


def test_zero_update_joins_zero_expert_without_touching_history() -> None:
    bank = run([D1, torch.zeros(8, 6), torch.zeros(8, 6), D2])
    assert actions(bank) == ["first", "zero", "zero", "create"]
    m = bank.modules["lin.weight"]
    assert m.experts[1].is_zero and m.experts[1].tasks == ["t1", "t2"]
    assert len(m.history) == 1  # only D2 was scored (against D1)


def test_every_task_in_exactly_one_expert() -> None:
    bank = run([D1, D2, D1, -D2, 0.5 * D1 + 0.1 * D2])
    for m in bank.modules.values():
        owners = [t for e in m.experts for t in e.tasks]
        assert sorted(owners) == sorted(bank.tasks)


def test_bad_config_and_input() -> None:
    with pytest.raises(MergeInputError, match="merge_rule"):
        EvolutionConfig(merge_rule="average")  # type: ignore[arg-type]
    with pytest.raises(MergeInputError, match="rank_ratio"):
        EvolutionConfig(rank_ratio=1.5)
    bank = run([D1])
    with pytest.raises(MergeInputError, match="duplicate task"):
        bank.absorb("t0", PRE, ft(D2))
    with pytest.raises(MergeInputError, match="shape mismatch at 'lin.weight'"):
        bank.absorb("x", PRE, {"lin.weight": torch.zeros(6, 8), "lin.bias": B0})
    with pytest.raises(MergeInputError, match="NaN or Inf in 'lin.bias'"):
        bank.absorb("x", PRE, {"lin.weight": W0, "lin.bias": torch.full((8,), float("nan"))})
    with pytest.raises(MergeInputError, match="missing \\['lin.bias'\\]"):
        bank.absorb("x", PRE, {"lin.weight": W0})
    assert bank.tasks == ["t0"]  # nothing was absorbed by the failed calls


def test_bank_round_trip(tmp_path: Path) -> None:
    bank = run([D1, D2, D1, torch.zeros(8, 6)])
    bank.save(tmp_path / "bank")
    back = ExpertBank.load(tmp_path / "bank")
    assert back.tasks == bank.tasks and back.allocation() == bank.allocation()
    assert [d.action for d in back.decisions] == actions(bank)
    for a, b in zip(bank.modules["lin.weight"].experts, back.modules["lin.weight"].experts):
        assert torch.equal(a.U, b.U) and torch.equal(a.s, b.s) and a.tasks == b.tasks
    assert torch.equal(back.others_sum["lin.bias"], bank.others_sum["lin.bias"])
    assert back.config == bank.config


def test_bank_corruption_is_detected(tmp_path: Path) -> None:
    run([D1, D2]).save(tmp_path / "bank")
    data = (tmp_path / "bank" / "experts.safetensors").read_bytes()
    (tmp_path / "bank" / "experts.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BankFormatError, match="checksum"):
        ExpertBank.load(tmp_path / "bank")
    (tmp_path / "bank" / "bank.json").write_text("{ truncated")
    with pytest.raises(BankFormatError, match="not valid JSON"):
        ExpertBank.load(tmp_path / "bank")
    (tmp_path / "bank" / "bank.json").unlink()
    with pytest.raises(BankFormatError, match="bank.json is missing"):
        ExpertBank.load(tmp_path / "bank")
    assert sorted(p.name for p in (tmp_path / "bank").iterdir()) == ["experts.safetensors"]  # no temp files
