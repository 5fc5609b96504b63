"""ODE-M (baselines.md §8): grid, budget, QP, reduction to SWA, barrier along the path, replay,
post-refinement trust region, state round trip and the protocol."""

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
from madeit_core.methods.base import MergeContext
from madeit_core.methods.odem import barrier_budget, euler_times, solve_qp
from madeit_core.protocol import RunSpec, run_continual
from madeit_core.toy import ToyBenchmark

OFF = {"barrier": False, "qp": False, "dv_over_u_target": 0.0, "post_refine": False}


# ----------------------------------------------------------------------------- small problems
def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8))


def _train(net: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 150) -> dict:
    ft = copy.deepcopy(net)
    opt = torch.optim.Adam(ft.parameters(), lr=3e-2)
    for _ in range(steps):
        loss = F.cross_entropy(head(ft(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in ft.state_dict().items()}


def _labeled(data: dict):
    def fn(task: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = data[task]
        idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
        return x[idx], y[idx]
    return fn


@pytest.fixture(scope="module")
def tasks3() -> tuple:
    """Three Gaussian-cluster tasks on a 2-layer MLP, each with its own fixed head."""
    net = _net()
    g = torch.Generator().manual_seed(1)
    data, heads, fts = {}, {}, {}
    for j in range(3):
        t = f"t{j}"
        y = torch.arange(240) % 3
        x = (torch.randn(3, 6, generator=g) * 1.5)[y] + torch.randn(240, 6, generator=g)
        data[t] = (x, y)
        heads[t] = nn.Linear(8, 3).requires_grad_(False)
        fts[t] = _train(net, heads[t], x, y)
    return net, data, heads, fts


@pytest.fixture(scope="module")
def permuted() -> tuple:
    """Two 'tasks' with the same data and head whose fine-tuned models are hidden-unit
    permutations of each other: both endpoints are good, the straight path between them is not
    (a loss barrier), so the barrier constraint has work to do."""
    net = _net()
    g = torch.Generator().manual_seed(0)
    y = torch.arange(240) % 3
    x = (torch.randn(3, 6, generator=g) * 1.5)[y] + torch.randn(240, 6, generator=g)
    head = nn.Linear(8, 3).requires_grad_(False)
    a = _train(net, head, x, y)
    perm = torch.randperm(16, generator=g)
    b = dict(a)
    b["0.weight"], b["0.bias"], b["2.weight"] = a["0.weight"][perm], a["0.bias"][perm], a["2.weight"][:, perm]
    return net, {"a": (x, y), "b": (x, y)}, {"a": head, "b": head}, {"a": a, "b": b}


def _ctx(heads: dict, data: dict | None, num_tasks: int, seed: int = 0) -> MergeContext:
    return MergeContext(heads=heads, labeled_samples=_labeled(data) if data is not None else None,
                        num_tasks=num_tasks, seed=seed, show_progress=False)


def _run(problem: tuple, order: list[str], num_tasks: int | None = None, **hp: object):
    net, data, heads, fts = problem
    m = get_method("odem", **hp)
    m.setup(net, _ctx(heads, data, num_tasks or len(order)))
    for t in order:
        m.absorb(t, fts[t])
    return m


def _weights(m) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in zip(m.keys, m._tensors(m.model), strict=True)}


# ----------------------------------------------------------------------------- pieces
def test_grid_stops_at_reference_t_end() -> None:
    expected = [50, 33, 25, 20, 16, 14, 12, 11, 10, 9, 8, 7, 7, 6, 6, 5, 5, 5, 5]
    assert [len(euler_times(k)[0]) for k in range(2, 21)] == expected
    ts, hs = euler_times(8)
    assert ts[-1] + hs[-1] == pytest.approx(0.12, abs=1e-6)
    ts, hs = euler_times(3, stop_at="exact")
    assert len(ts) == 34 and ts[-1] + hs[-1] == pytest.approx(1 / 3, abs=1e-9)
    assert len(euler_times(1)[0]) == 100


def test_budget_values() -> None:
    assert barrier_budget(0.0) == pytest.approx(0.08)
    assert barrier_budget(0.5) == pytest.approx(0.02)
    assert barrier_budget(0.88) == pytest.approx(0.001152)


def _qp(g: list[list[float]], base: list[float], b: list[float], **kw: object):
    G = torch.tensor(g, dtype=torch.float64)
    bs = torch.tensor(base, dtype=torch.float64)
    lam, status = solve_qp(G @ G.T, G @ bs, torch.tensor(b, dtype=torch.float64), **kw)
    return lam, bs - lam @ G, status


@pytest.mark.parametrize("mode", ["exact", "reference"])
def test_qp_reference_examples(mode: str) -> None:
    lam, v, st = _qp([[10, 0, 0], [0, 10, 0]], [1, 1, 1], [0, -5], mode=mode)
    assert st == "ok" and torch.allclose(lam, torch.tensor([0.1, 0.15], dtype=torch.float64), atol=1e-8)
    assert torch.allclose(v, torch.tensor([0, -0.5, 1], dtype=torch.float64), atol=1e-7)
    lam, v, _ = _qp([[10, 0, 0], [0, 10, 0]], [1, -1, 1], [0, 0], mode=mode)
    assert torch.allclose(lam, torch.tensor([0.1, 0.0], dtype=torch.float64), atol=1e-8)
    assert torch.allclose(v, torch.tensor([0, -1, 1], dtype=torch.float64), atol=1e-7)


def test_qp_reference_drops_constraints_exact_keeps_them() -> None:
    lam, v, st = _qp([[1, 0, 0], [0, 1, 0]], [1, 1, 1], [0, -0.5], mode="reference")
    assert st == "dropped" and torch.equal(lam, torch.zeros(2, dtype=torch.float64))    # the [ref] quirk
    for scale in (1.0, 1e-4, 1e-2, 1e3):
        g = [[scale, 0, 0], [0, scale, 0]]
        b = [0.0, -0.5 * scale]
        lam, v, st = _qp(g, [1, 1, 1], b, mode="exact")
        G = torch.tensor(g, dtype=torch.float64)
        assert st == "ok", scale
        assert bool((G @ v <= torch.tensor(b, dtype=torch.float64) + 1e-9 * max(1.0, scale)).all()), scale
        assert torch.allclose(v, torch.tensor([0, -0.5, 1], dtype=torch.float64), atol=1e-8), scale
        _, _, st_ref = _qp(g, [1, 1, 1], b, mode="reference")
        if scale <= 1.0:
            assert st_ref == "dropped", scale


def test_qp_infeasible_gives_least_violation_not_nothing() -> None:
    # v0 ≤ −1 and v0 ≥ 1 cannot both hold; v1 ≤ −2 can. The reference drops all three; the exact
    # mode keeps the satisfiable one and splits the difference on the others.
    g, base, b = [[1, 0], [-1, 0], [0, 1]], [0, 0], [-1, -1, -2]
    lam, v, st = _qp(g, base, b, mode="exact")
    assert st == "least-violation"
    assert torch.allclose(v, torch.tensor([0.0, -2.0], dtype=torch.float64), atol=1e-8)
    lam, v, st = _qp(g, base, b, mode="reference")
    assert st == "dropped" and torch.equal(v, torch.zeros(2, dtype=torch.float64))


# ----------------------------------------------------------------------------- the path
def test_all_corrections_off_is_swa(tasks3: tuple) -> None:
    net, data, heads, fts = tasks3
    order = ["t0", "t1", "t2"]
    m = get_method("odem", **OFF)
    m.setup(net, _ctx(heads, None, 3))      # no data callback: none is needed
    prev = None
    for k, t in enumerate(order, start=1):
        m.absorb(t, fts[t])
        w = _weights(m)
        if k == 1:
            assert all(torch.equal(w[key], fts[t][key]) for key in w)
        else:
            t_end = math.floor(100 / k) / 100
            for key in w:
                assert torch.allclose(w[key], (1 - t_end) * prev[key] + t_end * fts[t][key], atol=1e-5), (k, key)
        prev = w
    assert m.data_used == {}
    exact = _run((net, None, heads, fts), order, **OFF, stop_at="exact")
    swa = get_method("swa")
    swa.setup(net, MergeContext(show_progress=False))
    for t in order:
        swa.absorb(t, fts[t])
    we = _weights(exact)
    assert all(torch.allclose(we[k], swa.merged[k], atol=1e-5) for k in we)
    assert not all(torch.allclose(prev[k], swa.merged[k], atol=1e-4) for k in we)   # grid t_end 0.33 ≠ 1/3


def test_barrier_holds_along_the_path(permuted: tuple) -> None:
    net, data, heads, fts = permuted
    m = _run(permuted, ["a", "b"], post_refine=False)
    log = m.path_log["b"]
    assert len(log) == 50 and log[-1]["t_next"] == pytest.approx(0.5, abs=1e-6)    # stops at t_end(k=2)
    L0 = {j: m._probe(m.model_with(fts["a"]), j, 8) for j in "ab"}
    L1 = {j: m._probe(m.model_with(fts["b"]), j, 8) for j in "ab"}
    accepted = [r for r in log if r["accepted"]]
    assert len(accepted) >= 40
    for r in log:
        tn = r["t_next"]
        for j in "ab":     # the bound is the interpolated end-point loss plus the budget
            assert r["L_max_next"][j] == pytest.approx((1 - tn) * L0[j] + tn * L1[j] + barrier_budget(tn), rel=1e-6)
    for r in accepted:
        assert all(r["L_accepted"][j] <= r["L_max_next"][j] for j in "ab")
    final = {j: m._probe(m.model, j, 8) for j in "ab"}
    assert all(final[j] <= log[-1]["L_max_next"][j] for j in "ab")
    # the straight path (every correction off) breaks that same bound: the test has teeth
    straight = _run(permuted, ["a", "b"], **OFF)
    straight.calib = m.calib
    assert any(straight._probe(straight.model, j, 8) > log[-1]["L_max_next"][j] + 0.01 for j in "ab")


def test_replay_is_nested_and_recorded(tasks3: tuple) -> None:
    net, data, heads, fts = tasks3
    m = get_method("odem", num_samples=120, post_refine=False, dv_over_u_target=0.0, qp=False)
    m.setup(net, _ctx(heads, data, 3))
    m.absorb("t0", fts["t0"])
    assert m.data_used == {}
    m.absorb("t1", fts["t1"])
    idx2 = {t: set(m.calib_idx[t].tolist()) for t in ("t0", "t1")}
    assert all(len(v) == 60 for v in idx2.values())
    m.absorb("t2", fts["t2"])
    for t in ("t0", "t1"):
        assert len(m.calib_idx[t]) == 40 and set(m.calib_idx[t].tolist()) <= idx2[t]
    recs = [(r["step"], r["task"], r["count"], r["split"], r["labelled"]) for r in m.data_used["records"]]
    assert recs == [(2, "t0", 60, "train", True), (2, "t1", 60, "train", True), (3, "t0", 40, "train", True),
                    (3, "t1", 40, "train", True), (3, "t2", 40, "train", True)]


def test_post_refinement_stays_in_trust_region(tasks3: tuple) -> None:
    order = ["t0", "t1"]
    hp = {"num_samples": 96, "dv_over_u_target": 0.24, "post_refine_lr": 1e-3, "post_refine_steps": 10}
    plain = _run(tasks3, order, **hp, post_refine=False)
    ref = _run(tasks3, order, **hp)
    a, r = _weights(plain), _weights(ref)
    params = [n for n, _ in plain.model.named_parameters()]
    dist = math.sqrt(sum(float(((r[k] - a[k]) ** 2).sum()) for k in params))
    radius = 1e-3 * math.sqrt(sum(float((a[k] ** 2).sum()) for k in params))
    assert 0 < dist <= radius * (1 + 1e-6)
    s = ref.refine_summary
    assert s["best_mean_loss"] <= s["start_mean_loss"] and ref.refined
    assert [x["purpose"] for x in ref.data_used["records"]][-2:] == ["post-refinement"] * 2


def test_per_task_refinement_backward_is_the_joint_one_bit_for_bit(tasks3: tuple) -> None:
    """``post_refine_backward="per_task"`` (bounded memory) reproduces the joint graph's run exactly."""
    order = ["t0", "t1", "t2"]
    hp = {"num_samples": 96, "post_refine_lr": 1e-3, "post_refine_steps": 10}
    joint = _run(tasks3, order, **hp, post_refine_backward="joint")
    per_task = _run(tasks3, order, **hp, post_refine_backward="per_task")
    wj, wp = _weights(joint), _weights(per_task)
    assert all(torch.equal(wj[k], wp[k]) for k in wj)
    assert joint.refine_summary == per_task.refine_summary and joint.refine_summary["improving_snapshots"] > 0
    with pytest.raises(MergeInputError, match="post_refine_backward"):
        get_method("odem", post_refine_backward="sum")


def test_refinement_gradient_matches_on_efficientnet() -> None:
    """On a conv net (random EfficientNet-Lite0, 3 tasks) the per-task gradient equals the joint
    one in every bit, while accumulating the same terms oldest first does not: the order matters
    and ``per_task`` follows autograd's (anchor, then newest task first)."""
    from madeit_core.backbones.efficientnet import efficientnet_lite0

    torch.manual_seed(0)
    net = efficientnet_lite0(pretrained=False, num_classes=0).eval()
    g = torch.Generator().manual_seed(5)
    tasks = ["a", "b", "c"]
    data = {t: (torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 4, (8,), generator=g)) for t in tasks}
    heads = {t: nn.Linear(1280, 4).requires_grad_(False) for t in tasks}
    grads = {}
    for mode in ("joint", "per_task", "oldest_first"):
        m = get_method("odem", post_refine_backward="joint" if mode == "joint" else "per_task")
        m.setup(net, _ctx(heads, data, 3))
        for t in tasks:
            m._draw(t, 8, 1)
        params = [p for p in m.model.parameters() if p.is_floating_point()]
        anchor = [p.detach().clone() for p in params]
        noise = torch.Generator().manual_seed(6)      # the same point θ ≠ θ_a in every mode
        with torch.no_grad():
            for p in params:
                p.add_(1e-2 * torch.randn(p.shape, generator=noise))
        a_norm = math.sqrt(sum(float((a.double() ** 2).sum()) for a in anchor))
        idx = {t: torch.arange(8) for t in tasks}
        if mode == "oldest_first":
            w = m.hp["post_refine_anchor"]
            (w * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True)) / a_norm ** 2).backward()
            for t in tasks:
                (m._task_loss(t, idx[t]) / len(tasks)).backward()
        else:
            m._refine_backward(params, anchor, a_norm, tasks, idx)
        grads[mode] = [p.grad.clone() for p in params]
    assert all(torch.equal(a, b) for a, b in zip(grads["joint"], grads["per_task"], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(grads["joint"], grads["oldest_first"], strict=True))


def test_state_restore_resumes_identically(tasks3: tuple) -> None:
    net, data, heads, fts = tasks3
    hp = {"num_samples": 96, "post_refine_steps": 5}
    full = _run(tasks3, ["t0", "t1", "t2"], **hp)
    part = _run(tasks3, ["t0", "t1"], num_tasks=3, **hp)
    tensors, meta = part.state()
    resumed = get_method("odem", **hp)
    resumed.setup(net, _ctx(heads, data, 3))
    resumed.restore(tensors, json.loads(json.dumps(meta)))
    resumed.absorb("t2", fts["t2"])
    wf, wr = _weights(full), _weights(resumed)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    x = data["t0"][0][:5]
    assert torch.equal(full.merged_model()(x), resumed.merged_model()(x))


def test_protocol_end_to_end_toy(tmp_path: Path) -> None:
    bench = ToyBenchmark(num_tasks=3, steps=30)
    spec = RunSpec(method="odem", group="toy", tasks=bench.tasks, profile="test",
                   hparams={"num_samples": 96, "post_refine_steps": 10})
    full = run_continual(spec, bench, tmp_path / "a", show_progress=False)
    saved = json.loads((tmp_path / "a" / "test" / "toy" / "odem" / "seed42.json").read_text())
    assert saved["ACC"] == full["ACC"] and 0 <= saved["ACC"] <= 100
    assert saved["method_summary"]["refined"] and len(saved["method_summary"]["steps"]) == 2
    assert {r["split"] for r in saved["data_used"]["records"]} == {"train"}
    part = run_continual(spec, bench, tmp_path / "b", show_progress=False, stop_after=2)
    assert part["completed_steps"] == 2
    resumed = run_continual(spec, bench, tmp_path / "b", show_progress=False)
    assert resumed["acc_matrix"] == full["acc_matrix"] and resumed["ACC"] == full["ACC"]


def test_missing_callback_and_bad_options_are_named(tasks3: tuple) -> None:
    net, data, heads, fts = tasks3
    with pytest.raises(MergeInputError, match="qp_mode"):
        get_method("odem", qp_mode="fast")
    m = get_method("odem")
    m.setup(net, _ctx(heads, None, 2))
    m.absorb("t0", fts["t0"])
    with pytest.raises(MergeInputError, match="labeled_samples"):
        m.absorb("t1", fts["t1"])


@pytest.fixture(scope="module")
def conv3() -> tuple:
    """Three tasks of 6x6 two-channel images on a small conv net (4-D weights, so layouts matter)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 6, 3, groups=2, padding=1),
                        nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    g = torch.Generator().manual_seed(3)
    data, heads, fts = {}, {}, {}
    for j in range(3):
        t = f"c{j}"
        y = torch.arange(120) % 3
        x = (torch.randn(3, 2, 6, 6, generator=g))[y] + 0.5 * torch.randn(120, 2, 6, 6, generator=g)
        data[t] = (x, y)
        heads[t] = nn.Linear(6, 3).requires_grad_(False)
        fts[t] = _train(net, heads[t], x, y, steps=60)
    return net, data, heads, fts


def test_memory_format_changes_the_layout_not_the_result(conv3: tuple) -> None:
    hp = {"num_samples": 96, "batch_size": 16, "post_refine_steps": 5}
    order = ["c0", "c1", "c2"]
    fast = _run(conv3, order, **hp)                                    # default: channels_last
    plain = _run(conv3, order, memory_format="contiguous", **hp)
    assert fast.model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not fast.model[0].weight.is_contiguous()
    assert plain.model[0].weight.is_contiguous()
    wf, wp = _weights(fast), _weights(plain)
    assert all(torch.allclose(wf[k], wp[k], rtol=1e-4, atol=1e-5) for k in wf), \
        max(float((wf[k] - wp[k]).abs().max()) for k in wf)
    assert fast.hparams()["memory_format"] == "channels_last"
    tensors, _ = fast.state()                                          # safetensors needs contiguous tensors
    assert all(t.is_contiguous() for t in tensors.values())
    x = conv3[1]["c0"][0][:4]
    assert torch.allclose(fast.merged_model()(x), plain.merged_model()(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(MergeInputError, match="memory_format"):
        get_method("odem", memory_format="nhwc")
