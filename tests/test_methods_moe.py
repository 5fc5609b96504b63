"""Gated rivals: shared low-rank MoE wrappers, continual LoRA-WEMoE (baselines.md §6), MINGLE (§7)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from madeit_core.errors import MergeInputError
from madeit_core.methods import get_method
from madeit_core.methods import mingle as mingle_mod
from madeit_core.methods._lowrank_moe import (
    GatedModel,
    LowRankMoE,
    Router,
    entropy_loss,
    kd_loss,
    lowrank_factors,
    wrap_modules,
)
from madeit_core.methods.base import MergeContext
from madeit_core.methods.mingle import effective_rank, project_expert, soft_project
from madeit_core.methods.wemoe import make_units
from madeit_core.modules import ModuleSpec, discover_modules
from madeit_core.protocol import RunSpec, run_continual
from madeit_core.toy import ToyBenchmark


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def bench() -> ToyBenchmark:
    b = ToyBenchmark(num_tasks=3, steps=30)
    for t in b.tasks:
        b.finetuned(t)
    return b


def ctx_for(bench: ToyBenchmark, seed: int = 0) -> MergeContext:
    return MergeContext(modules=bench.modules(), num_tasks=len(bench.tasks), seed=seed,
                        heads={t: bench.head(t) for t in bench.tasks}, unlabeled_samples=bench.unlabeled_samples,
                        labeled_samples=bench.labeled_samples, show_progress=False)


def images(bench: ToyBenchmark, n: int = 24, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g)


def run(method_name: str, bench: ToyBenchmark, tasks: list[str], seed: int = 0, **hp: object):
    m = get_method(method_name, **hp)
    m.setup(bench.pretrained(), ctx_for(bench, seed))
    for t in tasks:
        m.absorb(t, bench.finetuned(t))
    return m


# ----------------------------------------------------------------------------- shared pieces
def test_losses_reference_values() -> None:
    assert float(kd_loss(torch.zeros(1, 2), torch.zeros(1, 2))) == pytest.approx(math.log(2), abs=1e-6)
    assert float(entropy_loss(torch.zeros(3, 2))) == pytest.approx(math.log(2), abs=1e-6)
    assert float(entropy_loss(torch.tensor([[100.0, 0.0]]))) < 1e-6


def test_lowrank_factors_rank2_of_diag() -> None:
    B, A = lowrank_factors(torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0])), 2)
    assert torch.allclose(B @ A, torch.diag(torch.tensor([4.0, 3.0, 0.0, 0.0])), atol=1e-6)
    with pytest.raises(MergeInputError):
        lowrank_factors(torch.eye(2), 0)


def _one_expert_linear(batch_reduce: bool) -> tuple[GatedModel, LowRankMoE]:
    model = nn.Sequential(nn.Linear(1, 1))
    with torch.no_grad():
        model[0].weight.fill_(2.0)
        model[0].bias.fill_(0.5)
    spec = discover_modules(model)
    routers, wrappers = wrap_modules(model, [spec], batch_reduce)
    r = routers["0"]
    r.set_rows(torch.ones(1, 1), torch.zeros(1), torch.zeros(0, 1), torch.zeros(0))
    w = wrappers["0"]
    w.add_expert(torch.ones(1, 1), torch.full((1, 1), 10.0))
    return GatedModel(model, routers), w


def test_gate_reduction_token_then_batch_mean() -> None:
    # router outputs per token [[1, 3], [5, 7]] (identity router on 1-d tokens): per image [2, 6], batch mean 4
    x = torch.tensor([[[1.0], [3.0]], [[5.0], [7.0]]])
    gm, w = _one_expert_linear(batch_reduce=True)
    y = gm(x)
    assert torch.allclose(w.shared_router.last_gate, torch.tensor([4.0]))
    assert torch.allclose(y, x * (2.0 + 4.0 * 10.0) + 0.5)
    gm2, w2 = _one_expert_linear(batch_reduce=False)
    y2 = gm2(x)
    assert torch.allclose(w2.shared_router.last_gate[:, 0], torch.tensor([2.0, 6.0]))
    assert torch.allclose(y2[0], x[0] * (2.0 + 20.0) + 0.5) and torch.allclose(y2[1], x[1] * (2.0 + 60.0) + 0.5)


def test_wrapper_equals_dense_weight_linear_and_strided_conv() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    conv = nn.Conv2d(6, 5, kernel_size=1, stride=2)
    x_lin = torch.randn(3, 4, 6)
    x_conv = torch.randn(3, 6, 5, 5)
    for base, x in ((lin, x_lin), (conv, x_conv)):
        holder = nn.Sequential(copy.deepcopy(base))
        routers, wrappers = wrap_modules(holder, [discover_modules(holder)], batch_reduce=True)
        router, w = routers["0"], wrappers["0"]
        experts = [(torch.randn(5, 2), torch.randn(2, 6)), (torch.randn(5, 3), torch.randn(3, 6))]
        for B, A in experts:
            w.add_expert(B, A)
        router.set_rows(torch.randn(2, 6), torch.randn(2), torch.zeros(0, 6), torch.zeros(0))
        y = GatedModel(holder, routers)(x)
        xm = x.mean(dim=(2, 3)) if x.ndim == 4 else x.mean(dim=1)
        g = F.linear(xm, router.w_frozen, router.b_frozen).mean(0)
        W = base.weight.reshape(5, 6) + sum(g[e] * B @ A for e, (B, A) in enumerate(experts))
        ref = (F.conv2d(x, W[:, :, None, None], base.bias, stride=2) if x.ndim == 4 else F.linear(x, W, base.bias))
        assert torch.allclose(y, ref, atol=1e-5), type(base).__name__


def test_follower_before_leader_is_a_clear_error(bench: ToyBenchmark) -> None:
    model = bench.pretrained()
    specs = [s for s in bench.modules() if s.name in ("layers.0.fc1", "layers.0.fc2")]
    routers, wrappers = wrap_modules(model, [list(reversed(specs))], True)  # fc2 leads, fc1 follows: wrong
    for w in wrappers.values():
        w.add_expert(torch.zeros(w.d_out, 1), torch.zeros(1, w.d_in))
    routers["layers.0.fc2"].set_rows(torch.zeros(1, 32), torch.zeros(1), torch.zeros(0, 32), torch.zeros(0))
    with pytest.raises(MergeInputError, match="layers.0.fc1"):
        GatedModel(model, routers)(images(bench, 2))


def test_make_units_blocks_by_group_and_depth(bench: ToyBenchmark) -> None:
    mlp = [s for s in bench.modules() if s.group == "mlp"]
    units = make_units(mlp, "block")
    assert [[s.name for s in u] for u in units] == [["layers.0.fc1", "layers.0.fc2"], ["layers.1.fc1", "layers.1.fc2"]]
    assert len(make_units(mlp, "module")) == 4


# ----------------------------------------------------------------------------- WEMoE
def test_wemoe_no_tta_zero_router_is_task_arithmetic_at_0_3(bench: ToyBenchmark) -> None:
    tasks = bench.tasks[:2]
    m = run("wemoe", bench, tasks, use_tta=False, router_init_std=0.0, first_rank=64, rank=64)
    theta0 = m.theta0
    expect = dict(theta0)
    for s in bench.modules():   # attention (weights + biases) and MLP weights: θ0 + 0.3 Σ τ; MLP biases θ0
        keys = [s.key] + ([f"{s.name}.bias"] if s.group == "attention" else [])
        for k in keys:
            expect[k] = theta0[k] + 0.3 * sum(bench.finetuned(t)[k] - theta0[k] for t in tasks)
    ref = m.model_with(expect)
    x = images(bench)
    assert torch.allclose(m.merged_model()(x), ref(x), atol=1e-5)
    assert not torch.allclose(m.merged_model()(x), bench.pretrained()(x), atol=1e-3)
    # expert ranks: first_rank for task 1, rank afterwards
    m2 = run("wemoe", bench, tasks, use_tta=False)
    assert m2.wrappers["layers.0.fc1"].ranks == [16, 16]  # min(64, 16) then min(16, 16) on the toy's 32×16 fc1
    m3 = run("wemoe", bench, tasks, use_tta=False, first_rank=8, rank=3)
    assert m3.wrappers["layers.0.fc1"].ranks == [8, 3]


def test_wemoe_routers_train_entropy_decreases_and_is_deterministic(bench: ToyBenchmark) -> None:
    task = bench.tasks[0]
    hp = {"lr": 1e-2, "max_steps": 30}
    off = run("wemoe", bench, [task], use_tta=False, **hp)
    on = run("wemoe", bench, [task], **hp)
    x = bench.unlabeled_samples(task, 5, off.ctx.step_seed(0))
    head = bench.head(task)
    with torch.no_grad():
        h_off = float(entropy_loss(head(off.merged_model()(x))))
        h_on = float(entropy_loss(head(on.merged_model()(x))))
    assert h_on < h_off - 0.05, (h_off, h_on)
    again = run("wemoe", bench, [task], **hp)
    t1, _ = on.state()
    t2, _ = again.state()
    assert all(torch.equal(t1[k], t2[k]) for k in t1)
    other = run("wemoe", bench, [task], seed=1, **hp)
    t3, _ = other.state()
    assert not torch.equal(t1["router_w.layers.0.fc1"], t3["router_w.layers.0.fc1"])


def test_wemoe_old_rows_train_by_default_and_can_be_frozen(bench: ToyBenchmark) -> None:
    a, b = bench.tasks[:2]
    first = run("wemoe", bench, [a], lr=1e-2, max_steps=10)
    row0 = first.state()[0]["router_w.layers.0.fc1"][0].clone()
    ref = run("wemoe", bench, [a, b], lr=1e-2, max_steps=10)
    frozen = run("wemoe", bench, [a, b], lr=1e-2, max_steps=10, train_old_rows=False)
    assert not torch.equal(ref.state()[0]["router_w.layers.0.fc1"][0], row0)        # [ref]: old rows keep training
    assert torch.equal(frozen.state()[0]["router_w.layers.0.fc1"][0], row0)


def test_wemoe_state_restore_and_resume_identical(bench: ToyBenchmark) -> None:
    a, b, c = bench.tasks
    full = run("wemoe", bench, [a, b, c], max_steps=5)
    part = run("wemoe", bench, [a, b], max_steps=5)
    tensors, meta = part.state()
    meta = json.loads(json.dumps(meta))
    resumed = get_method("wemoe", max_steps=5)
    resumed.setup(bench.pretrained(), ctx_for(bench))
    resumed.restore(tensors, meta)
    x = images(bench)
    assert torch.equal(resumed.merged_model()(x), part.merged_model()(x))
    resumed.absorb(c, bench.finetuned(c))
    assert torch.equal(resumed.merged_model()(x), full.merged_model()(x))
    recs = full.data_used["records"]
    assert [(r["task"], r["split"], r["labelled"], r["count"]) for r in recs] == [(t, "test", False, 20) for t in
                                                                                 (a, b, c)]


def test_wemoe_fallback_on_a_convnet_without_mlp_group() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 6, 1), nn.ReLU(), nn.Conv2d(6, 4, 1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    specs = discover_modules(net)
    assert {s.group for s in specs} == {"conv"}
    ft = copy.deepcopy(net)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.1 * torch.randn_like(p))
    m = get_method("wemoe", use_tta=False)
    m.setup(net, MergeContext(show_progress=False))
    m.absorb("a", ft)
    assert m.fallback and sorted(m.wrappers) == ["1", "3"]
    assert m.merged_model()(torch.randn(2, 3, 5, 5)).shape == (2, 4)
    with pytest.raises(MergeInputError, match="unlabeled_samples"):
        m2 = get_method("wemoe")
        m2.setup(net, MergeContext(show_progress=False))
        m2.absorb("a", ft)


# ----------------------------------------------------------------------------- MINGLE pieces
def test_effective_rank_reference_values() -> None:
    assert effective_rank(torch.tensor([3.0, 2.0, 1.0])) == 2
    assert effective_rank(torch.tensor([2.0, 1.0, 1.0])) == 2
    assert effective_rank(torch.tensor([3.0, 2.0, 0.0])) == 1      # 0·log 0 = 0, no NaN
    assert effective_rank(torch.zeros(3)) == 0


def test_project_expert_reference_example() -> None:
    D = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    out, r = project_expert(D, torch.ones(3, 3))
    assert r == 2
    assert torch.allclose(out, torch.tensor([[0.0, 0, 1], [0, 0, 1], [1, 1, 1]]), atol=1e-6)
    out_d, _ = project_expert(D, torch.ones(3, 3), zero_diagonal=True)
    assert torch.allclose(out_d, torch.tensor([[0.0, 0, 1], [0, 0, 1], [1, 1, 0]]), atol=1e-6)


def test_soft_projection_reference_values() -> None:
    U = torch.tensor([[1.0], [0.0]])
    G = torch.tensor([[1.0, 1.0]])
    g1, h = soft_project(G, U, None, 1.0, 0.99)
    assert float(h[0]) == pytest.approx(0.007071, abs=1e-6)
    assert torch.allclose(g1, torch.tensor([[0.00705, 1.0]]), atol=1e-5)
    g2, h = soft_project(G, U, h, 1.0, 0.99)
    assert float(h[0]) == pytest.approx(0.01407, abs=1e-5)
    assert torch.allclose(g2, torch.tensor([[0.01397, 1.0]]), atol=1e-5)
    g0, _ = soft_project(G, U, None, 0.0, 0.99)
    assert torch.equal(g0, torch.tensor([[0.0, 1.0]]))
    assert soft_project(G, None, None, 1.0, 0.99)[0] is G


def test_null_space_projection_removes_protected_component() -> None:
    gen = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(10, 3, generator=gen))[0]
    G = torch.randn(1, 10, generator=gen)
    exact, _ = soft_project(G, U, None, 0.0, 0.99)
    assert float((exact @ U).norm()) < 1e-6 and float((G @ U).norm()) > 0.1
    assert torch.allclose((G - exact) @ (torch.eye(10) - U @ U.T), torch.zeros(1, 10), atol=1e-6)  # only in span U
    soft, _ = soft_project(G, U, None, 1.0, 0.99)
    assert 0 < float((soft @ U).norm()) < float((G @ U).norm())
    assert torch.allclose(soft @ (torch.eye(10) - U @ U.T), G @ (torch.eye(10) - U @ U.T), atol=1e-6)


# ----------------------------------------------------------------------------- MINGLE end to end
def _capture_tta(monkeypatch: pytest.MonkeyPatch) -> tuple[list[dict], list[Router]]:
    """Spy on MINGLE's TTA: per call, the gate gradients (after the projection) of every router
    in ``routers`` at every step, and the trainable parameters before and after."""
    calls: list[dict] = []
    routers: list[Router] = []
    orig = mingle_mod.run_tta

    def spy(params, loss_fn, x, **kw):  # type: ignore[no-untyped-def]
        inner = kw["after_backward"]
        info: dict = {"before": [p.detach().clone() for p in params], "frozen_grads": [], "train_grads": [],
                      "frozen_rows": [(r.w_frozen.shape[0], r.w_frozen.requires_grad) for r in routers]}

        def after() -> None:
            inner()
            info["frozen_grads"].append([r.w_frozen.grad for r in routers])
            info["train_grads"].append([r.w_train.grad.clone() for r in routers])

        kw["after_backward"] = after
        out = orig(params, loss_fn, x, **kw)
        info["after"] = [p.detach().clone() for p in params]
        calls.append(info)
        return out

    monkeypatch.setattr(mingle_mod, "run_tta", spy)
    return calls, routers


def test_mingle_old_gates_get_no_gradient_and_stay_fixed(bench: ToyBenchmark, monkeypatch) -> None:
    calls, routers = _capture_tta(monkeypatch)
    a, b = bench.tasks[:2]
    m = get_method("mingle", max_steps=5, lr=1e-2)
    m.setup(bench.pretrained(), ctx_for(bench))
    routers.extend(m.routers.values())
    m.absorb(a, bench.finetuned(a))
    rows_after_a = {n: r.all_rows()[0].clone() for n, r in m.routers.items()}
    m.absorb(b, bench.finetuned(b))
    second = calls[1]
    assert all(g is None for step in second["frozen_grads"] for g in step)            # old rows: no gradient
    assert second["frozen_rows"] == [(1, False)] * len(routers)
    assert any(float(g.abs().sum()) > 0 for step in second["train_grads"] for g in step)
    for n, r in m.routers.items():                                                     # old rows bit-identical
        assert r.num_experts == 2 and torch.equal(r.all_rows()[0][:1], rows_after_a[n])
    assert all(int(U.shape[1]) == 6 for U in m.bases.values())
    for U in m.bases.values():
        assert torch.allclose(U.T @ U, torch.eye(6), atol=1e-5)


def test_mingle_exact_constraint_without_relaxation(bench: ToyBenchmark, monkeypatch) -> None:
    calls, routers = _capture_tta(monkeypatch)
    a, b = bench.tasks[:2]
    m = get_method("mingle", max_steps=5, lr=1e-1, gamma=0.0, optimizer="sgd")
    m.setup(bench.pretrained(), ctx_for(bench))
    routers.extend(m.routers.values())
    m.absorb(a, bench.finetuned(a))
    bases = {n: U.clone() for n, U in m.bases.items()}
    m.absorb(b, bench.finetuned(b))
    info = calls[1]
    names = list(m.routers)
    for step in info["train_grads"]:                       # projected gradients: exactly in the null space
        for n, g in zip(names, step, strict=True):
            assert float((g @ bases[n]).norm()) <= 1e-5 * max(float(g.norm()), 1e-12)
    before, after = info["before"], info["after"]          # with SGD the weight update too
    moved = 0.0
    for i, n in enumerate(names):
        dw = after[2 * i] - before[2 * i]
        moved += float(dw.norm())
        assert float((dw @ bases[n]).norm()) <= 1e-5 * max(float(dw.norm()), 1e-12)
    assert moved > 0
    assert m.constraint_residual[b] < 1e-5
    monkeypatch.undo()
    relaxed = run("mingle", bench, [a, b], max_steps=5, lr=1e-1, gamma=1.0)
    free = run("mingle", bench, [a, b], max_steps=5, lr=1e-1, constraint_gate=False)
    assert 1e-3 < relaxed.constraint_residual[b] < free.constraint_residual[b]


def test_mingle_star_and_projection_of_experts(bench: ToyBenchmark) -> None:
    a, b = bench.tasks[:2]
    star = run("mingle", bench, [a, b], use_tta=False, lora_layer=["q_proj", "k_proj", "v_proj", "out_proj", "fc1"])
    assert sorted(star.wrappers) == sorted(s.name for s in bench.modules() if "fc2" not in s.name)
    m = run("mingle", bench, [a, b], use_tta=False)
    w = m.wrappers["layers.0.fc1"]
    (B1, A1), (B2, A2) = w.experts()
    r = m.r_eff[b][[s.name for s in m.targets].index("layers.0.fc1")]
    assert r >= 1
    U, _, Vh = torch.linalg.svd(B1 @ A1)
    core = U[:, :r].T @ (B2 @ A2) @ Vh[:r].T                # new expert has no component in the old top-r block
    assert float(core.norm()) < 1e-4 * float((B2 @ A2).norm())


def test_mingle_first_model_starts_near_theta0_and_tta_moves_it(bench: ToyBenchmark) -> None:
    a = bench.tasks[0]
    x = images(bench)
    m0 = run("mingle", bench, [a], use_tta=False, gate_init_std=0.0)
    assert torch.allclose(m0.merged_model()(x), bench.pretrained()(x), atol=1e-6)      # gate bias 0 [ref]
    m1 = run("mingle", bench, [a], lr=1e-2, max_steps=20)
    assert not torch.allclose(m1.merged_model()(x), bench.pretrained()(x), atol=1e-3)
    losses = m1.tta_losses[a]
    assert sum(losses[-5:]) < sum(losses[:5])


def test_mingle_state_restore_resume_and_data(bench: ToyBenchmark) -> None:
    a, b, c = bench.tasks
    full = run("mingle", bench, [a, b, c], max_steps=5)
    part = run("mingle", bench, [a, b], max_steps=5)
    tensors, meta = part.state()
    assert any(k.startswith("basis.") for k in tensors) and any(k.startswith("ema.") for k in tensors)
    resumed = get_method("mingle", max_steps=5)
    resumed.setup(bench.pretrained(), ctx_for(bench))
    resumed.restore(tensors, json.loads(json.dumps(meta)))
    x = images(bench)
    assert torch.equal(resumed.merged_model()(x), part.merged_model()(x))
    resumed.absorb(c, bench.finetuned(c))
    assert torch.equal(resumed.merged_model()(x), full.merged_model()(x))
    assert full.data_used["records"][2]["task"] == c and full.data_used["records"][2]["count"] == 20
    with pytest.raises(MergeInputError, match="saved state"):
        bad = get_method("mingle")
        bad.setup(bench.pretrained(), ctx_for(bench))
        bad.restore(tensors, {**meta, "ranks": {}})


# ----------------------------------------------------------------------------- protocol
@pytest.mark.parametrize("method", ["wemoe", "mingle"])
def test_protocol_end_to_end_and_resume(bench: ToyBenchmark, tmp_path: Path, method: str) -> None:
    spec = RunSpec(method=method, group="toy", tasks=bench.tasks, profile="test", hparams={"max_steps": 10})
    full = run_continual(spec, bench, tmp_path / "a", show_progress=False)
    saved = json.loads((tmp_path / "a" / "test" / "toy" / method / "seed42.json").read_text())
    assert saved["ACC"] == full["ACC"] and 0 <= saved["ACC"] <= 100 and saved["needs_data"] is True
    assert len(saved["data_used"]["records"]) == 3 and saved["method_summary"]["expert_parameters"] > 0
    part = run_continual(spec, bench, tmp_path / "b", show_progress=False, stop_after=2)
    assert part["completed_steps"] == 2
    resumed = run_continual(spec, bench, tmp_path / "b", show_progress=False)
    assert resumed["acc_matrix"] == full["acc_matrix"] and resumed["BWT"] == full["BWT"]


def test_unknown_module_is_named() -> None:
    m = get_method("mingle")
    spec = ModuleSpec(name="nope", key="nope.weight", d_out=2, d_in=2, kind="linear", group="mlp", depth=0)
    with pytest.raises(MergeInputError, match="nope"):
        m.setup(nn.Sequential(nn.Linear(2, 2)), MergeContext(modules=[spec], show_progress=False))


class _OpenClipLikeBlock(nn.Module):
    """Attention through nn.MultiheadAttention (its in-projection is a bare parameter) + c_fc/c_proj MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.ln_2 = nn.LayerNorm(8)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(8, 16))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return (x + self.mlp(self.ln_2(x))).mean(dim=1)


def test_wemoe_task_arithmetic_covers_bare_attention_parameters() -> None:
    torch.manual_seed(0)
    net = _OpenClipLikeBlock().eval()
    ft = copy.deepcopy(net)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m = get_method("wemoe", use_tta=False, router_init_std=0.0)
    m.setup(net, MergeContext(show_progress=False))
    m.absorb("a", ft)
    assert "attn.in_proj_weight" in m.ta_keys and "attn.in_proj_bias" in m.ta_keys
    assert not any("ln_2" in k or "c_fc" in k for k in m.ta_keys)
    sd0, sd1 = net.state_dict(), ft.state_dict()
    expect = {k: sd0[k] + 0.3 * (sd1[k] - sd0[k]) if (k.startswith("attn.") or k.endswith("weight") and "mlp" in k)
              else sd0[k] for k in sd0}
    x = torch.randn(3, 5, 8)
    assert torch.allclose(m.merged_model()(x), m.model_with(expect)(x), atol=1e-5)
    legacy = get_method("wemoe", use_tta=False, ta_extra_params=False)
    legacy.setup(net, MergeContext(show_progress=False))
    assert "attn.in_proj_weight" not in legacy.ta_keys


def test_mingle_skips_modules_their_parent_never_calls() -> None:
    torch.manual_seed(0)
    net = _OpenClipLikeBlock().eval()
    ft = copy.deepcopy(net)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m = get_method("mingle", use_tta=False, gate_init_std=0.0, init_lambda=1.0)
    m.setup(net, MergeContext(show_progress=False))
    m.absorb("a", ft)
    assert m.summary()["skipped_not_called_by_parent"] == ["attn.out_proj"]
    assert sorted(m.wrappers) == ["mlp.c_fc", "mlp.c_proj"]
    # gate 1 and a full-rank expert: the wrapped MLP weights act as the fine-tuned ones
    sd0, sd1 = net.state_dict(), ft.state_dict()
    expect = {k: sd1[k] if k in ("mlp.c_fc.weight", "mlp.c_proj.weight") else sd0[k] for k in sd0}
    x = torch.randn(3, 5, 8)
    assert torch.allclose(m.merged_model()(x), m.model_with(expect)(x), atol=1e-5)


@pytest.mark.parametrize("method", ["wemoe", "mingle"])
def test_batch_composition_dependence_and_deepcopy(bench: ToyBenchmark, method: str) -> None:
    a, b = bench.tasks[:2]
    x = images(bench, 12)
    ref = run(method, bench, [a, b], max_steps=5, lr=1e-2)
    full, part = ref.merged_model()(x)[:4], ref.merged_model()(x[:4])
    assert not torch.allclose(full, part, atol=1e-6)              # [ref] one gate per forward batch
    per_image = run(method, bench, [a, b], max_steps=5, lr=1e-2, batch_reduce=False)
    assert torch.allclose(per_image.merged_model()(x)[:4], per_image.merged_model()(x[:4]), atol=1e-6)
    frozen = copy.deepcopy(ref.merged_model())
    assert torch.equal(frozen(x), ref.merged_model()(x))
    ref.absorb(bench.tasks[2], bench.finetuned(bench.tasks[2]))
    assert not torch.allclose(frozen(x), ref.merged_model()(x), atol=1e-6)    # the copy kept the old model
