"""Shared machinery of the gated rivals (Continual LoRA-WEMoE, baselines.md §6; MINGLE, §7).

- :func:`entropy_loss`, :func:`kd_loss`: the test-time losses of baselines.md §0.4.
- :func:`lowrank_factors`: a truncated-SVD expert ΔW ≈ B A with B = U_r, A = diag(s_r) V_rᵀ.
- :class:`Router`: a linear gate with a frozen block of rows and a trainable block of rows.
- :class:`LowRankMoE`: a drop-in wrapper of one ``nn.Linear`` or 1×1 ``nn.Conv2d``:
  y = base(x) + Σ_e ḡ_e B_e (A_e x), where ḡ is the router output averaged over tokens (every
  position between the batch and the feature axis; the spatial positions of a conv) and, with
  ``batch_reduce`` (the reference), over the whole forward batch. The deltas are frozen buffers.
- :class:`GatedModel`: the encoder with its wrapped modules; clears the routers' cached gate
  before every forward so a module that reuses another module's gate (WEMoE's fc2 reuses the
  gate computed at fc1) can never read a stale one.
- :func:`cycle_batches`: the seed-subset loader of baselines.md §0.4 (shuffled each pass with a
  seeded generator, last batch kept, cycled forever).
- :func:`gate_stats`: per-expert gate statistics on a batch (recorded after every TTA).

Convolutions: a 1×1 conv is a linear map on the channel vector of every spatial position, so its
tokens are the H×W positions, the router reads the per-image channel mean x̄ = mean_{H,W} x, and
the expert runs as two 1×1 convs (A with the base conv's stride, padding and dilation, then B),
which equals the conv with weight W0 + Σ_e ḡ_e B_e A_e and the base bias
(``tests/test_moe_convnet.py``: zero delta gives the conv exactly; gate 1 gives θ0 + the rank-r
update, the fine-tuned net at full rank, BatchNorm and stride included).

Nothing here is specific to CLIP: which modules get wrapped comes from the caller's
:class:`~madeit_core.modules.ModuleSpec` list.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from madeit_core.errors import MergeInputError
from madeit_core.modules import ModuleSpec, as_matrix


# ----------------------------------------------------------------------------- losses
def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of −Σ_c p_c log(p_c + 1e-8), p = softmax(logits) (baselines.md §0.4)."""
    p = logits.float().softmax(dim=-1)
    return -(p * torch.log(p + 1e-8)).sum(dim=-1).mean()


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Soft-target cross-entropy at temperature T, no T² factor (baselines.md §0.4)."""
    t = (teacher.detach().float() / temperature).softmax(dim=-1)
    return -(t * (student.float() / temperature).log_softmax(dim=-1)).sum(dim=-1).mean()


# ----------------------------------------------------------------------------- experts
def lowrank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B = U[:, :r] (d_out × r) and A = diag(s[:r]) V[:, :r]ᵀ (r × d_in), r ≤ min(shape)."""
    if rank < 1:
        raise MergeInputError(f"expert rank must be ≥ 1, got {rank}")
    m = delta.float()
    U, s, Vh = torch.linalg.svd(m, full_matrices=False)
    r = min(rank, s.numel())
    return U[:, :r].contiguous(), (s[:r, None] * Vh[:r]).contiguous()


def check_target(model: nn.Module, spec: ModuleSpec) -> nn.Module:
    """The submodule ``spec.name`` of ``model``, checked to be a Linear or an ungrouped 1×1 conv."""
    try:
        mod = model.get_submodule(spec.name)
    except AttributeError as exc:
        raise MergeInputError(f"module {spec.name!r} (from the module list) is not in the model") from exc
    if isinstance(mod, LowRankMoE):
        return mod
    ok = isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.kernel_size == (1, 1) and mod.groups == 1)
    if not ok:
        raise MergeInputError(f"module {spec.name!r} is a {type(mod).__name__}; experts need an nn.Linear or a "
                              "1×1 ungrouped nn.Conv2d")
    return mod


def bypassed_by_parent(model: nn.Module, spec: ModuleSpec) -> bool:
    """True when the module's parent never calls it (``nn.MultiheadAttention`` reads
    ``out_proj.weight`` directly), so a wrapper swapped in would silently do nothing."""
    parent_name = spec.name.rpartition(".")[0]
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        return False
    return isinstance(parent, nn.MultiheadAttention)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# ----------------------------------------------------------------------------- routing
def token_mean(x: torch.Tensor, conv: bool) -> torch.Tensor:
    """[B, d]: the mean of ``x`` over its token positions (conv: over H, W)."""
    if conv:
        return x.mean(dim=(2, 3))
    if x.ndim == 2:
        return x
    return x.reshape(x.shape[0], -1, x.shape[-1]).mean(dim=1)


def tokens(x: torch.Tensor, conv: bool) -> torch.Tensor:
    """Every token feature of ``x`` as rows of a [n, d] matrix."""
    if conv:
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


class Router(nn.Module):
    """Linear gate [frozen rows | trainable rows] : R^d → R^E (baselines.md §6 (b)4, §7 (b)4).

    ``current`` caches the reduced gate of the ongoing forward pass ([E] with batch reduction,
    [B, E] without); :class:`GatedModel` clears it around every forward and leaves a detached
    copy in ``last_gate``.
    """

    def __init__(self, d_in: int, batch_reduce: bool = True) -> None:
        super().__init__()
        self.d_in = d_in
        self.batch_reduce = batch_reduce
        self.w_frozen = nn.Parameter(torch.zeros(0, d_in), requires_grad=False)
        self.b_frozen = nn.Parameter(torch.zeros(0), requires_grad=False)
        self.w_train = nn.Parameter(torch.zeros(0, d_in))
        self.b_train = nn.Parameter(torch.zeros(0))
        self.current: torch.Tensor | None = None
        self.last_gate: torch.Tensor | None = None   # the reduced gate of the last forward, detached

    @property
    def num_experts(self) -> int:
        return int(self.w_frozen.shape[0] + self.w_train.shape[0])

    def set_rows(self, w_frozen: torch.Tensor, b_frozen: torch.Tensor, w_train: torch.Tensor,
                 b_train: torch.Tensor) -> None:
        dev = self.w_frozen.device
        self.w_frozen = nn.Parameter(w_frozen.detach().float().clone().to(dev), requires_grad=False)
        self.b_frozen = nn.Parameter(b_frozen.detach().float().clone().to(dev), requires_grad=False)
        self.w_train = nn.Parameter(w_train.detach().float().clone().to(dev))
        self.b_train = nn.Parameter(b_train.detach().float().clone().to(dev))

    def all_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.cat([self.w_frozen, self.w_train]).detach(), torch.cat([self.b_frozen, self.b_train]).detach())

    def forward(self, x_mean: torch.Tensor) -> torch.Tensor:
        x = x_mean.float()
        g = torch.cat([F.linear(x, self.w_frozen, self.b_frozen), F.linear(x, self.w_train, self.b_train)], dim=-1)
        return g.mean(dim=0) if self.batch_reduce else g


class LowRankMoE(nn.Module):
    """y = base(x) + Σ_e ḡ_e B_e (A_e x) for one Linear / 1×1 conv (see module docstring).

    ``leader``: this module computes the router's gate from its own input; otherwise it reuses
    the gate its router computed earlier in the same forward (WEMoE's fc2). ``capture`` makes
    the forward accumulate Σ x xᵀ over every token of its input (MINGLE's subspace update).
    """

    def __init__(self, base: nn.Module, name: str, router: Router, leader: bool = True) -> None:
        super().__init__()
        for p in base.parameters():
            p.requires_grad_(False)
        self.base = base
        self.name = name
        self.conv = isinstance(base, nn.Conv2d)
        self.router = router if leader else None
        self._shared_router = [router]  # not a submodule when this module is a follower
        self.leader = leader
        self.num_experts = 0
        self.ranks: list[int] = []
        self.register_buffer("A_cat", torch.zeros(0, self.d_in))
        self.register_buffer("B_cat", torch.zeros(self.d_out, 0))
        self.register_buffer("col_expert", torch.zeros(0, dtype=torch.long))
        self.capture = False
        self.second_moment: torch.Tensor | None = None

    @property
    def d_in(self) -> int:
        return int(self.base.weight.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.base.weight.shape[0])

    @property
    def shared_router(self) -> Router:
        return self._shared_router[0]

    def add_expert(self, B: torch.Tensor, A: torch.Tensor) -> None:
        if B.shape[0] != self.d_out or A.shape[1] != self.d_in or B.shape[1] != A.shape[0]:
            raise MergeInputError(f"{self.name}: expert shapes B {tuple(B.shape)}, A {tuple(A.shape)} do not fit a "
                                  f"{self.d_out}×{self.d_in} module")
        dev = self.A_cat.device
        self.A_cat = torch.cat([self.A_cat, A.float().to(dev)])
        self.B_cat = torch.cat([self.B_cat, B.float().to(dev)], dim=1)
        self.col_expert = torch.cat([self.col_expert, torch.full((A.shape[0],), self.num_experts, device=dev)])
        self.ranks.append(int(A.shape[0]))
        self.num_experts += 1

    def experts(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out, start = [], 0
        for r in self.ranks:
            out.append((self.B_cat[:, start:start + r], self.A_cat[start:start + r]))
            start += r
        return out

    def delta_sum(self) -> torch.Tensor:
        """Σ_e B_e A_e, the plain ungated sum (MINGLE's projection, baselines.md §7 (b)2)."""
        return self.B_cat @ self.A_cat

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        router = self.shared_router
        if self.leader:
            router.current = router(token_mean(x, self.conv))
        elif router.current is None:
            raise MergeInputError(
                f"{self.name}: this module reuses the gate of an earlier module of its block, but that module has "
                "not run yet in this forward (modules listed out of forward order?); use router_scope='module'")
        return router.current  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.capture:
            t = tokens(x.detach(), self.conv).float()
            m = t.T @ t
            self.second_moment = m if self.second_moment is None else self.second_moment + m
        y = self.base(x)
        if self.num_experts == 0:
            return y
        g = self.gate(x)
        if g.shape[-1] != self.num_experts:
            raise MergeInputError(f"{self.name}: router gives {g.shape[-1]} gates for {self.num_experts} experts")
        scale = g[..., self.col_expert].to(x.dtype)  # [R] or [B, R]
        A, B = self.A_cat.to(x.dtype), self.B_cat.to(x.dtype)
        if self.conv:
            conv = self.base
            z = F.conv2d(x, A[:, :, None, None], stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
            z = z * (scale[:, :, None, None] if scale.ndim == 2 else scale[None, :, None, None])
            return y + F.conv2d(z, B[:, :, None, None])
        z = x @ A.T
        if scale.ndim == 2:
            scale = scale.reshape(scale.shape[0], *([1] * (x.ndim - 2)), scale.shape[1])
        return y + (z * scale) @ B.T


class GatedModel(nn.Module):
    """The encoder with its wrapped modules (images → features); clears cached gates per forward."""

    def __init__(self, encoder: nn.Module, routers: dict[str, Router]) -> None:
        super().__init__()
        self.encoder = encoder
        self.routers = nn.ModuleDict({_safe(k): r for k, r in routers.items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.routers.values():
            r.current = None
        try:
            return self.encoder(x)
        finally:      # keep no graph-carrying tensor on the module (deepcopy, memory); a detached copy stays
            for r in self.routers.values():
                r.last_gate = r.current.detach() if r.current is not None else None
                r.current = None

    def moe_modules(self) -> list[LowRankMoE]:
        return [m for m in self.encoder.modules() if isinstance(m, LowRankMoE)]


def _safe(name: str) -> str:
    return name.replace(".", "__") or "_root"


def wrap_modules(model: nn.Module, units: list[list[ModuleSpec]], batch_reduce: bool
                 ) -> tuple[dict[str, Router], dict[str, LowRankMoE]]:
    """Swap every module of ``units`` for a :class:`LowRankMoE`; one :class:`Router` per unit,
    computed at the unit's first module (its *leader*). Returns (routers by unit id, wrappers by
    module name)."""
    routers: dict[str, Router] = {}
    wrappers: dict[str, LowRankMoE] = {}
    for unit in units:
        leader = unit[0]
        base = check_target(model, leader)
        dev = base.weight.device
        router = Router(int(as_matrix(base.weight).shape[1]), batch_reduce).to(dev)
        routers[leader.name] = router
        for i, spec in enumerate(unit):
            mod = check_target(model, spec)
            w = LowRankMoE(mod, spec.name, router, leader=(i == 0)).to(dev)
            set_submodule(model, spec.name, w)
            wrappers[spec.name] = w
    return routers, wrappers


def cycle_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches over ``range(n)``: a fresh shuffle each pass, last partial batch kept."""
    if n <= 0:
        raise MergeInputError("empty seed subset: the data callback returned no images")
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n, batch_size):
            yield perm[i:i + batch_size]


def unit_id(unit: list[ModuleSpec]) -> str:
    return unit[0].name


def run_tta(params: list[nn.Parameter], loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *,
            steps: int, batch_size: int, lr: float, generator: torch.Generator, desc: str = "TTA",
            show_progress: bool = True, after_backward: Callable[[], None] | None = None,
            optimizer: str = "adam") -> list[float]:
    """Test-time training of ``params``: ``steps`` optimiser steps, one seed-subset batch each.

    ``after_backward`` may rewrite the gradients before the step (MINGLE's null-space
    projection). Returns the loss of every step (before its update).
    """
    if not params:
        raise MergeInputError("test-time adaptation has no trainable parameters")
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr)
    else:
        raise MergeInputError(f"unknown optimizer {optimizer!r} (use 'adam' or 'sgd')")
    batches = cycle_batches(int(x.shape[0]), batch_size, generator)
    losses: list[float] = []
    for _ in tqdm(range(steps), desc=desc, disable=not show_progress, leave=False):
        xb = x[next(batches).to(x.device)]
        loss = loss_fn(xb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def record_data(data_used: dict[str, Any], *, step: int, task: str, split: str, count: int, labelled: bool,
                purpose: str, **extra: Any) -> None:
    """Append one record of the data a method saw (results files report ``data_used``)."""
    rec = {"step": step, "task": task, "split": split, "count": int(count), "labelled": labelled,
           "purpose": purpose}
    rec.update(extra)
    data_used.setdefault("records", []).append(rec)
    totals = data_used.setdefault("images_per_task", {})
    key = f"{task}:{split}"
    totals[key] = max(int(totals.get(key, 0)), int(count))


@torch.no_grad()
def gate_stats(gated: GatedModel, x: torch.Tensor, batch_size: int = 128) -> dict[str, list[float]]:
    """Per expert, the mean, min and max of the gates that forwards of ``x`` (in task-pure batches
    of ``batch_size``, as evaluation runs) give, over routing units, batches and (without batch
    reduction) images.

    Recorded after every TTA so a results file shows how far the unbounded gates went from their
    start (on EfficientNet-Lite0 WEMoE's reach 3-7 within three tasks: see
    :mod:`madeit_core.methods.wemoe`)."""
    rows: list[torch.Tensor] = []
    for i in range(0, int(x.shape[0]), batch_size):
        gated(x[i:i + batch_size])
        rows += [r.last_gate.reshape(-1, r.last_gate.shape[-1]) for r in gated.routers.values()
                 if r.last_gate is not None and r.last_gate.numel() > 0]
    if not rows:
        return {"mean": [], "min": [], "max": []}
    g = torch.cat(rows).float()
    return {"mean": [round(float(v), 4) for v in g.mean(0)], "min": [round(float(v), 4) for v in g.min(0).values],
            "max": [round(float(v), 4) for v in g.max(0).values]}


def stateful_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))
