"""ODE-M: merging by integrating a barrier-constrained velocity field (baselines.md §8).

Step 1: θ ← θ_1. Step k ≥ 2, with θ_new the new fine-tuned model:

1. *Calibration replay* (labelled **train** images, via ``ctx.labeled_samples``): every seen
   task holds ⌊N/k⌋ images (N = ``num_samples`` = 2048); an old task's set is a random subset of
   its previous set (nested, torch ``randperm`` order kept), the new task's set is a fresh draw.
   Task 1's first draw happens at step 2: a direct draw of ⌊N/2⌋ images, which has the
   distribution of the reference's subsample of its whole training split.
2. Probe losses ℓ_j (mean over the first 8 batches of 128 of the batch-mean CE under task j's
   head; a partial batch counts as a full one [ref]); L0_j = ℓ_j(θ), L1_j = ℓ_j(θ_new).
3. Euler steps on the grid t_i = i·h of ``linspace(0, 1, ⌈1/h⌉ + 1)`` (float32) up to the last
   point ≤ 1/k, i.e. t_end = ⌊100/k⌋/100 for h = 0.01 [ref] (``stop_at="exact"`` adds a final
   partial step to exactly 1/k). Each step, with rem = max(1 − t, 1e-8):
   base field u = (θ_new − θ)/rem; barrier L_max_j(t) = (1 − t) L0_j + t L1_j + 0.08 (1 − t)²;
   constraint set C = the 2 largest excesses ℓ_j − L_max_j(t) (whatever their sign [ref]) plus
   up to 2 tasks with the largest positive sensitivity ∇ℓ_j^{(1)}·u (first batch of 128);
   bounds b_j = min((L_max_j(t') − ℓ_j)/h, 0); macro gradient g_M = mean_j G_j/‖G_j‖^0.25 (G_j:
   sum of the first 8 batch gradients [ref]); η = 0.24 ‖u‖/‖g_M‖; the small QP
   min ½‖v − (u − η g_M)‖² s.t. g_j·v ≤ b_j (active-set enumeration, at most 16 sets); a
   backtracking line search (s = 1, 0.7, …, 0.7⁷) accepts the first θ + h s v with every
   ℓ_j ≤ L_max_j(t'), else s = 0 (θ stays, t advances [ref]).
4. After the last task (known from ``ctx.num_tasks``; without it there is no refinement),
   *post-refinement*: 80 AdamW(1e-6) steps on the mean
   per-task CE of shuffled batches of 128 plus 1e-3‖θ − θ_a‖²/‖θ_a‖², gradient clipping 1.0,
   projection onto ‖θ − θ_a‖ ≤ 1e-3‖θ_a‖ (norm of all weights [ref]), returning the best
   snapshot whose probe losses all stay within 0.02 of their start. The gradient is accumulated
   one task at a time (``post_refine_backward``; same bits as one joint graph, bounded memory).

**QP** (``qp_mode``): the reference solves each active set with a 1e-6 ridge and an absolute
1e-6 feasibility tolerance and, when no candidate survives, drops *every* constraint (λ = 0);
with small gradients the ridge residual alone exceeds the tolerance (baselines.md §8 (f), (g)).
``qp_mode="exact"`` (default) keeps the constraints: each row is normalised by ‖g_j‖, the
active-set systems are solved without ridge (least squares when singular), feasibility is
checked with a tolerance relative to the row's scale, and if no set is feasible the candidate
with the smallest worst violation is used instead of dropping everything.
``qp_mode="reference"`` reproduces the reference exactly.

Choices where the reference is silent or CLIP-specific: every float entry of the state dict is
integrated (parameters get the full field; float buffers, which CLIP does not have, have zero
gradient and so follow the straight line); losses and refinement run with the model in eval mode
(CLIP has no dropout); the task order is the protocol's (§9.3 lists the reference's own); with
``barrier``, ``qp`` and ``post_refine`` off and ``dv_over_u_target=0`` no data is drawn and the
method is SWA with weight t_end (exactly SWA with ``stop_at="exact"``).
``memory_format`` (default ``"channels_last"``) is the layout of the working model and its image
batches: a speed choice, not a method one (``"contiguous"`` gives the same maths with other bits).
The protocol evaluates the newest task right after its step, so a_{T,T} is post-refinement here
while the reference prints it before refinement; ACC and BWT do not use a_{T,T}'s pre-refinement
value, so they are unaffected (baselines.md §8 (f)).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from madeit_core.errors import MergeInputError
from madeit_core.methods import register
from madeit_core.methods._lowrank_moe import cycle_batches, record_data, stateful_generator
from madeit_core.methods.base import ContinualMethod, MergeContext
from madeit_core.statedict import StateDict

Vec = list[torch.Tensor]
EPS = 1e-12
#: ``memory_format`` choices: the layout of the working model and its image batches. Pure speed: the
#: maths is the same, the bits are not (other convolution kernels, other summation orders). On a CPU
#: a forward+backward of EfficientNet-Lite0 at 64 px, batch 128, one thread, takes 1.3 s in channels_last
#: against 2.2 s, and ODE-M is such passes almost throughout (one offline-8 merge step: 108 s against 175 s).
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
#: ``post_refine_backward`` choices: how a refinement step's gradient is built. ``"joint"`` builds one
#: autograd graph over a batch of every seen task and calls ``backward`` once, so its memory grows
#: with the number of tasks (about 12.6 GB on offline-14 at 64 px); ``"per_task"`` (default) calls
#: ``backward`` on the anchor term and then on ℓ_j/T one task at a time, newest first, so only one
#: task's activations are alive. Same gradient, same bits: the joint backward runs the anchor branch
#: first and the task branches newest first (autograd's sequence-number order), and adds their
#: contributions in that order, which is the order ``per_task`` accumulates ``.grad`` in
#: (checked bit for bit in ``tests/test_odem.py``).
REFINE_BACKWARDS = ("per_task", "joint")


# ----------------------------------------------------------------------------- pieces
def euler_times(k: int, step_size: float = 0.01, stop_at: str = "grid") -> tuple[list[float], list[float]]:
    """(t_i, h_i) of the Euler steps for merge step k (baselines.md §8 (b)4).

    ``grid``: the float32 grid ``linspace(0, 1, ⌈1/h⌉ + 1)`` up to the last point ≤ 1/k
    (``searchsorted(right=True) − 1``), so t_end = ⌊100/k⌋/100 for h = 0.01 [ref].
    ``exact``: the same steps plus one partial step ending exactly at 1/k.
    """
    if k < 1:
        raise MergeInputError(f"merge step must be ≥ 1, got {k}")
    if not 0 < step_size <= 1:
        raise MergeInputError(f"step_size must be in (0, 1], got {step_size}")
    n_full = math.ceil(1.0 / step_size)
    grid = torch.linspace(0.0, 1.0, n_full + 1)
    i_max = max(int(torch.searchsorted(grid, torch.tensor(1.0 / k), right=True)) - 1, 0)
    ts = [float(grid[i]) for i in range(i_max)]
    hs = [float(grid[i + 1] - grid[i]) for i in range(i_max)]
    if stop_at == "exact":
        t_last = float(grid[i_max])
        if 1.0 / k - t_last > 1e-9:
            ts.append(t_last)
            hs.append(1.0 / k - t_last)
    elif stop_at != "grid":
        raise MergeInputError(f"stop_at must be 'grid' or 'exact', got {stop_at!r}")
    return ts, hs


def barrier_budget(t: float, budget: float = 0.08, power: float = 2.0) -> float:
    """B(t) = budget · (1 − t)^power."""
    return budget * max(1.0 - t, 0.0) ** power


def solve_qp(K: torch.Tensor, c: torch.Tensor, b: torch.Tensor, reg: float = 1e-6, tol: float = 1e-6,
             mode: str = "exact") -> tuple[torch.Tensor, str]:
    """λ for min ½‖v − base‖² s.t. g_i·v ≤ b_i, v = base − Σ λ_i g_i, given K = [g_i·g_j],
    c = [g_i·base], b (baselines.md §8 (b)5k). Returns (λ, status) with status ``"ok"``,
    ``"dropped"`` (reference fallback λ = 0) or ``"least-violation"`` (exact mode, infeasible)."""
    K, c, b = K.double().cpu(), c.double().cpu(), b.double().cpu()
    m = int(c.numel())
    if m == 0:
        return torch.zeros(0, dtype=torch.float64), "ok"
    if mode == "reference":
        best, best_obj = None, None
        for mask in range(1 << m):
            idx = [i for i in range(m) if (mask >> i) & 1]
            lam = torch.zeros(m, dtype=torch.float64)
            if idx:
                Kss = K[idx][:, idx] + reg * torch.eye(len(idx), dtype=torch.float64)
                try:
                    sol = torch.linalg.solve(Kss, c[idx] - b[idx])
                except RuntimeError:
                    continue
                if bool((sol < -tol).any()):
                    continue
                lam[idx] = sol.clamp_min(0.0)
            if bool((c - K @ lam > b + tol).any()):
                continue
            obj = 0.5 * float(lam @ K @ lam)
            if best_obj is None or obj < best_obj:
                best, best_obj = lam, obj
        return (best, "ok") if best is not None else (torch.zeros(m, dtype=torch.float64), "dropped")
    if mode != "exact":
        raise MergeInputError(f"qp_mode must be 'exact' or 'reference', got {mode!r}")
    norms = K.diagonal().clamp_min(0).sqrt()
    live = norms > 0                      # a zero gradient gives the constant constraint 0 ≤ b: nothing to solve
    scale = torch.where(live, 1.0 / torch.where(live, norms, torch.ones_like(norms)), torch.zeros_like(norms))
    Kh, ch, bh = scale[:, None] * K * scale[None, :], scale * c, scale * b
    tolv = tol * torch.maximum(torch.ones_like(ch), torch.maximum(ch.abs(), bh.abs()))
    best, best_obj, least, least_viol = None, None, None, None
    live_idx = [i for i in range(m) if bool(live[i])]
    for mask in range(1 << len(live_idx)):
        idx = [live_idx[j] for j in range(len(live_idx)) if (mask >> j) & 1]
        lam = torch.zeros(m, dtype=torch.float64)
        if idx:
            sol = torch.linalg.lstsq(Kh[idx][:, idx], (ch[idx] - bh[idx])[:, None], driver="gelsd").solution[:, 0]
            if bool((sol < -tol).any()):
                continue
            lam[idx] = sol.clamp_min(0.0)
        viol = float(((ch - Kh @ lam) - bh)[live].max()) if live_idx else 0.0
        rel = ((ch - Kh @ lam) - bh - tolv)[live]
        if least_viol is None or viol < least_viol:
            least, least_viol = lam, viol
        if live_idx and bool((rel > 0).any()):
            continue
        obj = 0.5 * float(lam @ Kh @ lam)
        if best_obj is None or obj < best_obj:
            best, best_obj = lam, obj
    status = "ok"
    if best is None:
        best, status = least, "least-violation"
    assert best is not None
    return best * scale, status


def _dot(a: Vec, b: Vec) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)))


def _norm(a: Vec) -> float:
    return math.sqrt(max(_dot(a, a), EPS))


@register
class ODEMerging(ContinualMethod):
    name = "odem"
    needs_data = True

    def __init__(self, num_samples: int = 2048, batch_size: int = 128, step_size: float = 0.01,
                 stop_at: str = "grid", barrier: bool = True, barrier_budget: float = 0.08,
                 barrier_tight_power: float = 2.0, barrier_probe_batches: int = 8, protect_old_only: bool = False,
                 qp: bool = True, qp_num_constraints: int = 2, qp_sens_constraints: int = 2, qp_reg: float = 1e-6,
                 qp_tol: float = 1e-6, qp_mode: str = "exact", dv_over_u_target: float = 0.24,
                 dv_over_u_ramp: float = 0.0, eta_max: float = 1e6, eta_min: float = 0.0,
                 macro_grad_batches: int = 8, sens_grad_batches: int = 1, constraint_grad_batches: int = 1,
                 allowed_inc_per_step: float = 0.0, step_backtrack_steps: int = 8, step_shrink: float = 0.7,
                 step_min: float = 1e-4, step_max: float = 1.0, step_grow: float = 1.25, macro_w_old: float = 1.0,
                 macro_w_new: float = 1.0, macro_grad_norm_power: float = 0.25, post_refine: bool = True,
                 post_refine_steps: int = 80, post_refine_lr: float = 1e-6, post_refine_anchor: float = 1e-3,
                 post_refine_radius: float = 1e-3, post_refine_task_tol: float = 0.02,
                 post_refine_grad_clip: float = 1.0, post_refine_probe_batches: int = 4885,
                 post_refine_backward: str = "per_task", memory_format: str = "channels_last") -> None:
        super().__init__()
        self.hp: dict[str, Any] = dict(locals())
        del self.hp["self"]
        self.hp.pop("__class__", None)
        if qp_mode not in ("exact", "reference"):
            raise MergeInputError(f"odem: qp_mode must be 'exact' or 'reference', got {qp_mode!r}")
        if memory_format not in MEMORY_FORMATS:
            raise MergeInputError(f"odem: memory_format must be one of {sorted(MEMORY_FORMATS)}, got {memory_format!r}")
        if post_refine_backward not in REFINE_BACKWARDS:
            raise MergeInputError(f"odem: post_refine_backward must be one of {REFINE_BACKWARDS}, "
                                  f"got {post_refine_backward!r}")
        if stop_at not in ("grid", "exact"):
            raise MergeInputError(f"odem: stop_at must be 'grid' or 'exact', got {stop_at!r}")
        if num_samples < 1 or batch_size < 1:
            raise MergeInputError("odem: num_samples and batch_size must be ≥ 1")
        self.path_log: dict[str, list[dict[str, Any]]] = {}

    def hparams(self) -> dict[str, Any]:
        return dict(self.hp)

    @property
    def uses_data(self) -> bool:
        h = self.hp
        return bool(h["barrier"] or h["qp"] or h["post_refine"] or h["dv_over_u_target"] > 0)

    # ------------------------------------------------------------------ set-up
    def setup(self, pretrained: nn.Module, ctx: MergeContext | None = None) -> None:
        super().setup(pretrained, ctx)
        self.model = self._layout(copy.deepcopy(pretrained).to(self.ctx.device).eval())
        for p in self.model.parameters():
            p.requires_grad_(p.is_floating_point())
        self.keys = [k for k, v in self.model.state_dict().items() if v.is_floating_point()]
        self.calib: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.calib_idx: dict[str, torch.Tensor] = {}
        self.calib_draw: dict[str, list[int]] = {}     # task -> [n drawn, seed]
        self.path_log = {}
        self.step_summary: list[dict[str, Any]] = []
        self.refined = False

    def _layout(self, x: Any) -> Any:
        """``x`` (a module, or a 4-D image batch) in the working memory format; anything else as is."""
        fmt = MEMORY_FORMATS[self.hp["memory_format"]]
        if isinstance(x, nn.Module):
            return x.to(memory_format=fmt)
        return x.contiguous(memory_format=fmt) if x.dim() == 4 else x

    def _tensors(self, model: nn.Module) -> Vec:
        sd = model.state_dict(keep_vars=True)
        return [sd[k] for k in self.keys]

    def _load(self, values: Vec) -> None:
        with torch.no_grad():
            for p, v in zip(self._tensors(self.model), values, strict=True):
                p.copy_(v)

    # ------------------------------------------------------------------ data
    def _draw(self, task: str, n: int, seed: int) -> None:
        if self.ctx.labeled_samples is None:
            raise MergeInputError("odem needs labelled training images (calibration replay): the context has no "
                                  "labeled_samples callback")
        x, y = self.ctx.labeled_samples(task, n, seed)
        if x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise MergeInputError(f"odem: labeled_samples({task!r}, {n}) returned {x.shape[0]} images and "
                                  f"{y.shape[0]} labels")
        self.calib_draw[task] = [int(n), int(seed)]
        self.calib_idx[task] = torch.arange(x.shape[0])
        self.calib[task] = (x.to(self.ctx.device), y.to(self.ctx.device))

    def _resample(self, tasks: list[str], n: int, step: int, seed: int) -> None:
        """Nested re-subsampling of old sets and a fresh draw for new ones (baselines.md §8 (b)1)."""
        gen = stateful_generator(seed)
        for j, task in enumerate(tasks):
            if task not in self.calib:
                self._draw(task, n, (seed + 7919 * (j + 1)) % 2**32)
            else:
                x, y = self.calib[task]
                perm = torch.randperm(x.shape[0], generator=gen)[: min(n, x.shape[0])]
                self.calib_idx[task] = self.calib_idx[task][perm]
                self.calib[task] = (x[perm.to(x.device)], y[perm.to(y.device)])
            record_data(self.data_used, step=step, task=task, split="train", count=int(self.calib[task][0].shape[0]),
                        labelled=True, purpose="calibration replay (barrier, QP, macro gradient, refinement)")

    def _batches(self, task: str, limit: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.calib[task]
        bs = self.hp["batch_size"]
        out = []
        for i in range(0, int(x.shape[0]), bs):
            if len(out) >= limit:
                break
            out.append((self._layout(x[i:i + bs]), y[i:i + bs]))
        return out

    def _head(self, task: str) -> Any:
        if task not in self.ctx.heads:
            raise MergeInputError(f"odem: no head for task {task!r} in the context")
        return self.ctx.heads[task]

    @torch.no_grad()
    def _probe(self, model: nn.Module, task: str, limit: int) -> float:
        batches = self._batches(task, limit)
        head = self._head(task)
        if not batches:
            return 0.0
        return sum(float(F.cross_entropy(head(model(xb)).float(), yb)) for xb, yb in batches) / len(batches)

    def _grad(self, task: str, limit: int) -> Vec:
        """Σ over the first ``limit`` batches of ∇ (batch-mean CE) (zero for float buffers)."""
        return self._grads(task, limit, limit)[1]

    def _grads(self, task: str, first: int, limit: int) -> tuple[Vec, Vec]:
        """(Σ over the first ``first`` batches, Σ over the first ``limit``) of ∇ (batch-mean CE), one
        backward per batch (``first`` ≤ ``limit``): the same sums, in the same order, as two
        :meth:`_grad` calls, for the price of the longer one."""
        head = self._head(task)
        tensors = self._tensors(self.model)
        for p in tensors:
            p.grad = None

        def snapshot() -> Vec:
            return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in tensors]

        prefix: Vec | None = None
        for i, (xb, yb) in enumerate(self._batches(task, max(first, limit))):
            F.cross_entropy(head(self.model(xb)).float(), yb).backward()
            if i + 1 == first and first < limit:
                prefix = snapshot()
        total = snapshot()
        return (prefix if prefix is not None else total), total

    def _macro_add(self, acc: Vec, G: Vec, task: str, tasks: list[str]) -> float:
        """acc += w G / (‖G‖ + ε)^p for one task of the macro gradient; returns its weight w."""
        hp = self.hp
        scale = (_norm(G) + EPS) ** hp["macro_grad_norm_power"]
        w = hp["macro_w_new"] if task == tasks[-1] else hp["macro_w_old"]
        for a, gj in zip(acc, G, strict=True):
            a.add_(gj, alpha=w / scale)
        return w

    # ------------------------------------------------------------------ absorb
    def _absorb(self, task: str, finetuned: StateDict) -> None:
        step = len(self.tasks) + 1          # k
        seed = self.ctx.step_seed(step - 1)
        new = [finetuned[k].to(self.ctx.device) for k in self.keys]
        if step == 1:
            self._load(new)
        else:
            tasks = [*self.tasks, task]
            if self.uses_data:
                self._resample(tasks, self.hp["num_samples"] // step, step, seed)
            self._integrate(step, tasks, finetuned, new)
        last = self.ctx.num_tasks is not None and step == self.ctx.num_tasks
        if last and self.hp["post_refine"] and self.hp["post_refine_steps"] > 0:
            tasks = [*self.tasks, task]
            if step == 1:      # a single task: its refinement set is a draw of N images
                self._resample(tasks, self.hp["num_samples"], step, seed)
            self._post_refine(tasks, seed)

    def _integrate(self, k: int, tasks: list[str], finetuned: StateDict, new: Vec) -> None:
        hp = self.hp
        ts, hs = euler_times(k, hp["step_size"], hp["stop_at"])
        theta = self._tensors(self.model)
        protect = tasks[:-1] if hp["protect_old_only"] and len(tasks) > 1 else list(tasks)
        pb = hp["barrier_probe_batches"]
        use_probe = hp["barrier"] or hp["qp"]
        if use_probe:
            L0 = {j: self._probe(self.model, j, pb) for j in tasks}
            target = self._layout(self.model_with(finetuned))
            L1 = {j: self._probe(target, j, pb) for j in tasks}
            del target
        log: list[dict[str, Any]] = []
        t_end = ts[-1] + hs[-1] if ts else 0.0
        # the probe losses at the current θ: at t = 0 they are L0; after a step, the line search's
        # losses at the point it accepted (or the same θ again when it rejected every scale)
        L_here: dict[str, float] | None = {j: L0[j] for j in protect} if use_probe else None
        for t, h in tqdm(list(zip(ts, hs, strict=True)), desc=f"odem step {k}", disable=not self.ctx.show_progress,
                         leave=False):
            t_next, rem = t + h, max(1.0 - t, 1e-8)
            with torch.no_grad():
                u = [(n_ - p.detach()) / rem for n_, p in zip(new, theta, strict=True)]
            u_norm = _norm(u)
            rec: dict[str, Any] = {"t": t, "t_next": t_next, "h": h}
            L_max_next: dict[str, float] = {}
            C: list[str] = []
            grads: dict[str, Vec] = {}
            b: dict[str, float] = {}
            if use_probe:
                B_t = barrier_budget(t, hp["barrier_budget"], hp["barrier_tight_power"])
                B_n = barrier_budget(t_next, hp["barrier_budget"], hp["barrier_tight_power"])
                L_cur = L_here if L_here is not None else {j: self._probe(self.model, j, pb) for j in protect}
                L_max_t = {}
                for j in protect:
                    old_only = hp["protect_old_only"] and j != tasks[-1]
                    L_max_t[j] = (L0[j] if old_only else (1 - t) * L0[j] + t * L1[j]) + B_t
                    L_max_next[j] = (L0[j] if old_only else (1 - t_next) * L0[j] + t_next * L1[j]) + B_n
                rec.update(L_cur=L_cur, L_max_t=L_max_t, L_max_next=L_max_next)
            eta, g_macro, total_w = 0.0, None, 0.0
            # the sensitivity gradient (first batches) is a prefix of the macro gradient's sum:
            # one backward pass per batch serves both when every task is protected
            fuse = (hp["qp"] and hp["qp_sens_constraints"] > 0 and hp["dv_over_u_target"] > 0
                    and protect == tasks and hp["sens_grad_batches"] <= hp["macro_grad_batches"])
            if fuse:
                g_macro = [torch.zeros_like(p) for p in theta]
            if hp["qp"]:
                ex = sorted(protect, key=lambda j: L_cur[j] - L_max_t[j], reverse=True)
                excess = ex[: max(1, min(hp["qp_num_constraints"], len(ex)))]
                sens: list[tuple[str, float]] = []
                if hp["qp_sens_constraints"] > 0:
                    for j in protect:
                        if g_macro is not None:
                            g, G = self._grads(j, hp["sens_grad_batches"], hp["macro_grad_batches"])
                            total_w += self._macro_add(g_macro, G, j, tasks)
                            del G
                        else:
                            g = self._grad(j, hp["sens_grad_batches"])
                        sens.append((j, _dot(g, u)))
                        if hp["sens_grad_batches"] == hp["constraint_grad_batches"]:
                            grads[j] = g
                        top = [jj for jj, d in sorted(sens, key=lambda x: x[1], reverse=True) if d > 0]
                        keep = set(excess) | set(top[: hp["qp_sens_constraints"]])
                        grads = {jj: gg for jj, gg in grads.items() if jj in keep}
                sens.sort(key=lambda x: x[1], reverse=True)
                sens_tasks = [j for j, d in sens if d > 0][: hp["qp_sens_constraints"]]
                for j in excess + sens_tasks:
                    if j not in C:
                        C.append(j)
                inc = hp["allowed_inc_per_step"] / max(h, EPS)
                b = {j: min((L_max_next[j] - L_cur[j]) / max(h, EPS), inc) for j in C}
                rec["sensitivity"] = dict(sens)
            if hp["dv_over_u_target"] > 0:
                if g_macro is None:
                    g_macro = [torch.zeros_like(p) for p in theta]
                    for j in tasks:
                        total_w += self._macro_add(g_macro, self._grad(j, hp["macro_grad_batches"]), j, tasks)
                if total_w > 0:
                    for acc in g_macro:
                        acc.mul_(1.0 / total_w)
                dv = hp["dv_over_u_target"] * (1.0 + hp["dv_over_u_ramp"] * (t / max(t_end, EPS)))
                eta = float(min(hp["eta_max"], max(hp["eta_min"], dv * u_norm / (_norm(g_macro) + EPS))))
            with torch.no_grad():
                base = [ui - eta * gm for ui, gm in zip(u, g_macro, strict=True)] if g_macro is not None else u
            lam: list[float] = []
            status = "ok"
            if C:
                gl = [grads[j] if j in grads else self._grad(j, hp["constraint_grad_batches"]) for j in C]
                m = len(C)
                K = torch.tensor([[_dot(gl[i], gl[j]) for j in range(m)] for i in range(m)], dtype=torch.float64)
                cvec = torch.tensor([_dot(g, base) for g in gl], dtype=torch.float64)
                bvec = torch.tensor([b[j] for j in C], dtype=torch.float64)
                lam_t, status = solve_qp(K, cvec, bvec, hp["qp_reg"], hp["qp_tol"], hp["qp_mode"])
                lam = [float(x) for x in lam_t]
                with torch.no_grad():
                    v = [x.clone() for x in base]
                    for li, g in zip(lam, gl, strict=True):
                        if li != 0.0:
                            for vi, gi in zip(v, g, strict=True):
                                vi.add_(gi, alpha=-li)
            else:
                v = base
            s, losses = self._line_search(theta, v, h, protect, L_max_next, pb)
            if not use_probe:
                L_here = None
            elif s == 0.0:
                L_here = L_cur                      # θ is back where it was
            else:
                L_here = losses if losses is not None and set(losses) == set(protect) else None
            rec.update(constraints=C, b=b, lam=lam, qp_status=status, eta=eta, s=s, accepted=s > 0,
                       L_accepted=losses)
            log.append(rec)
        self.path_log[tasks[-1]] = log
        self.step_summary.append({
            "step": k, "task": tasks[-1], "euler_steps": len(ts), "t_end": t_end,
            "accepted": sum(1 for r in log if r["accepted"]),
            "mean_step_scale": (sum(r["s"] for r in log) / len(log)) if log else None,
            "qp_not_ok": sum(1 for r in log if r["qp_status"] != "ok")})

    def _line_search(self, theta: Vec, v: Vec, h: float, protect: list[str], L_max_next: dict[str, float],
                     pb: int) -> tuple[float, dict[str, float] | None]:
        hp = self.hp
        backup = [p.detach().clone() for p in theta]

        def trial(s: float) -> tuple[bool, dict[str, float]]:
            with torch.no_grad():
                for p, p0, vi in zip(theta, backup, v, strict=True):
                    p.copy_(p0 + (h * s) * vi)
            if not hp["barrier"]:
                return True, {}
            losses = {j: self._probe(self.model, j, pb) for j in protect}
            return all(losses[j] - L_max_next[j] <= 0.0 for j in protect), losses

        s, accepted, losses = 1.0, False, None
        for _ in range(hp["step_backtrack_steps"] if hp["barrier"] else 1):
            ok, ls = trial(s)
            if ok:
                accepted, losses = True, ls
                break
            s *= hp["step_shrink"]
            if s < hp["step_min"]:
                break
        if not accepted:
            s = 0.0
        elif hp["step_max"] > 1.0:
            while True:
                nxt = min(s * hp["step_grow"], hp["step_max"])
                if nxt <= s + 1e-12:
                    break
                ok, ls = trial(nxt)
                if not ok:
                    break
                s, losses = nxt, ls
        with torch.no_grad():
            for p, p0, vi in zip(theta, backup, v, strict=True):
                p.copy_(p0 + (h * s) * vi)
        return s, losses

    # ------------------------------------------------------------------ refinement
    def _post_refine(self, tasks: list[str], seed: int) -> None:
        hp = self.hp
        params = [p for p in self.model.parameters() if p.is_floating_point()]
        for p in params:
            p.requires_grad_(True)
        pb = hp["post_refine_probe_batches"]
        base_losses = {j: self._probe(self.model, j, pb) for j in tasks}
        best = sum(base_losses.values()) / len(tasks)
        anchor = [p.detach().clone() for p in params]
        a_norm = math.sqrt(max(sum(float((a.double() ** 2).sum()) for a in anchor), EPS))
        radius = hp["post_refine_radius"] * a_norm
        best_params = [a.clone() for a in anchor]
        gen = stateful_generator(seed + 1)
        loaders = {j: cycle_batches(int(self.calib[j][0].shape[0]), hp["batch_size"], gen) for j in tasks}
        opt = torch.optim.AdamW(params, lr=hp["post_refine_lr"], weight_decay=0.0)
        accepted = 0
        for _ in tqdm(range(hp["post_refine_steps"]), desc="odem refine", disable=not self.ctx.show_progress,
                      leave=False):
            opt.zero_grad(set_to_none=True)
            idxs = {j: next(loaders[j]).to(self.calib[j][0].device) for j in tasks}   # draws in task order
            self._refine_backward(params, anchor, a_norm, tasks, idxs)
            if hp["post_refine_grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(params, hp["post_refine_grad_clip"])
            opt.step()
            with torch.no_grad():
                dn = math.sqrt(sum(float(((p.double() - a.double()) ** 2).sum()) for p, a in zip(params, anchor,
                                                                                                 strict=True)))
                if dn > radius and dn > EPS:
                    for p, a in zip(params, anchor, strict=True):
                        p.copy_(a + (p - a) * (radius / dn))
            cur = {j: self._probe(self.model, j, pb) for j in tasks}
            avg = sum(cur.values()) / len(tasks)
            if all(cur[j] <= base_losses[j] + hp["post_refine_task_tol"] for j in tasks) and avg < best:
                best, best_params, accepted = avg, [p.detach().clone() for p in params], accepted + 1
        with torch.no_grad():
            for p, bp in zip(params, best_params, strict=True):
                p.copy_(bp)
        for p in params:
            p.grad = None
        self.refined = True
        self.refine_summary = {"start_mean_loss": sum(base_losses.values()) / len(tasks), "best_mean_loss": best,
                               "improving_snapshots": accepted}
        for j in tasks:
            record_data(self.data_used, step=len(tasks), task=j, split="train",
                        count=int(self.calib[j][0].shape[0]), labelled=True, purpose="post-refinement")

    def _task_loss(self, j: str, idx: torch.Tensor) -> torch.Tensor:
        x, y = self.calib[j]
        return F.cross_entropy(self._head(j)(self.model(self._layout(x[idx]))).float(), y[idx])

    @staticmethod
    def _anchor_term(params: Vec, anchor: Vec, w: float, a2: float) -> torch.Tensor:
        """w‖θ − θ_a‖²/‖θ_a‖² (``a2`` = ‖θ_a‖²)."""
        return w * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True)) / a2

    def _refine_backward(self, params: Vec, anchor: Vec, a_norm: float, tasks: list[str],
                         idxs: dict[str, torch.Tensor]) -> None:
        """Gradient of mean_j ℓ_j + c‖θ − θ_a‖²/‖θ_a‖² into ``p.grad`` (see :data:`REFINE_BACKWARDS`)."""
        w, a2 = self.hp["post_refine_anchor"], max(a_norm ** 2, EPS)
        if self.hp["post_refine_backward"] == "joint":
            loss = torch.zeros((), device=self.ctx.device)
            for j in tasks:
                loss = loss + self._task_loss(j, idxs[j])
            # the anchor term is built after the task losses, as before the option: autograd then runs it first
            (loss / len(tasks) + self._anchor_term(params, anchor, w, a2)).backward()
            return
        self._anchor_term(params, anchor, w, a2).backward()
        for j in reversed(tasks):
            (self._task_loss(j, idxs[j]) / len(tasks)).backward()

    # ------------------------------------------------------------------ model and state
    def merged_model(self) -> nn.Module:
        return self.model_with(dict(zip(self.keys, [p.detach() for p in self._tensors(self.model)], strict=True)))

    def summary(self) -> dict[str, Any]:
        return {"steps": self.step_summary, "refined": self.refined,
                "refinement": getattr(self, "refine_summary", None)}

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"theta.{k}": p.detach().cpu().contiguous().clone()
                   for k, p in zip(self.keys, self._tensors(self.model), strict=True)}
        for t, idx in self.calib_idx.items():
            tensors[f"calib_idx.{t}"] = idx.clone()
        meta = {"calib_draw": self.calib_draw, "calib_order": list(self.calib), "refined": self.refined,
                "step_summary": self.step_summary, "summary": self.summary()}
        return tensors, meta

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        missing = [k for k in self.keys if f"theta.{k}" not in tensors]
        if missing:
            raise MergeInputError(f"odem: saved state lacks merged weights {missing[:3]}")
        self._load([tensors[f"theta.{k}"].to(self.ctx.device) for k in self.keys])
        self.calib, self.calib_idx, self.calib_draw = {}, {}, {}
        for t in meta.get("calib_order", []):
            n, seed = meta["calib_draw"][t]
            self._draw(t, n, seed)
            idx = tensors[f"calib_idx.{t}"]
            x, y = self.calib[t]
            self.calib_idx[t] = idx.clone()
            self.calib[t] = (x[idx.to(x.device)], y[idx.to(y.device)])
        self.refined = bool(meta.get("refined", False))
        self.step_summary = list(meta.get("step_summary", []))


__all__ = ["ODEMerging", "barrier_budget", "euler_times", "solve_qp"]
