"""A toy benchmark that runs in seconds: a tiny ViT and synthetic image tasks.

It exists so that every method, the protocol and the notebooks can be exercised end to end on a
CPU in tests. The encoder has the structure the paper merges (pre-LN transformer blocks with
q/k/v/out projections and a two-layer MLP, a class token, token features ``[B, N, d]``), so
routing and module grouping behave as on CLIP. Tasks are synthetic: each has its own image
"style" (a fixed random pattern added to every image) and class prototypes; fine-tuned models are
really trained (Adam, head frozen), so task vectors have the structure of real ones.
Nothing here is a result about real data.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from madeit_core.backbones.base import BackboneAdapter
from madeit_core.benchmark import evaluate_classifier, seed_subset
from madeit_core.methods.base import Head
from madeit_core.modules import ModuleSpec, discover_modules


class ToyBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.heads = heads
        self.layer_norm1 = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.layer_norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.layer_norm1(x)
        q, k, v = (p(h).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        x = x + self.out_proj((att @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.layer_norm2(x))))


class TinyViT(nn.Module):
    """Patch embedding (an *other* parameter) + class token + pre-LN blocks; CLS feature out."""

    def __init__(self, image_size: int = 8, patch: int = 4, dim: int = 16, depth: int = 2, heads: int = 2,
                 mlp: int = 32) -> None:
        super().__init__()
        self.patch = patch
        n = (image_size // patch) ** 2
        self.patch_embedding = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.class_embedding = nn.Parameter(torch.zeros(dim))
        self.position_embedding = nn.Parameter(torch.zeros(n + 1, dim))
        self.layers = nn.ModuleList(ToyBlock(dim, heads, mlp) for _ in range(depth))
        self.post_layernorm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch_embedding(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(t.shape[0], 1, -1)
        h = torch.cat([cls, t], dim=1) + self.position_embedding
        for layer in self.layers:
            h = layer(h)
        return self.post_layernorm(h[:, 0])


class ToyAdapter(BackboneAdapter):
    """Adapter of :class:`TinyViT` (random weights from a fixed seed: there is no pre-training)."""

    name = "toy_vit"

    def __init__(self, image_size: int = 8, dim: int = 16, depth: int = 2, seed: int = 0) -> None:
        self._image_size, self.dim, self.depth, self.seed = image_size, dim, depth, seed

    @property
    def feature_dim(self) -> int:
        return self.dim

    @property
    def image_size(self) -> int:
        return self._image_size

    def build(self, pretrained: bool = True) -> nn.Module:
        torch.manual_seed(self.seed)
        model = TinyViT(self._image_size, dim=self.dim, depth=self.depth, mlp=2 * self.dim)
        with torch.no_grad():
            model.position_embedding.normal_(0, 0.1)
            model.class_embedding.normal_(0, 0.1)
        return model.eval()

    def modules(self, model: nn.Module) -> list[ModuleSpec]:
        return discover_modules(model)


@dataclass
class _TaskData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


class LinearHead(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.weight.T + self.bias


class ToyBenchmark:
    """Synthetic tasks on :class:`TinyViT`; implements :class:`madeit_core.benchmark.Benchmark`.

    Each task: ``classes`` classes, images = task style + class prototype + noise. The head is a
    linear probe fitted on θ0's features (closed-form ridge regression on one-hot targets); the
    fine-tuned model is θ0 trained with the head frozen (Adam, ``steps`` steps).
    """

    def __init__(self, num_tasks: int = 4, classes: int = 4, n_train: int = 128, n_test: int = 80,
                 steps: int = 60, lr: float = 3e-3, seed: int = 0, image_size: int = 8, dim: int = 16,
                 depth: int = 2, device: str = "cpu") -> None:
        self.tasks = [f"toy{i}" for i in range(num_tasks)]
        self.classes, self.steps, self.lr, self.seed, self.device = classes, steps, lr, seed, device
        self.adapter = ToyAdapter(image_size, dim, depth, seed)
        self._theta0 = self.adapter.build()
        self._data = {t: self._make_data(i, n_train, n_test) for i, t in enumerate(self.tasks)}
        self._heads: dict[str, LinearHead] = {}
        self._finetuned: dict[str, dict[str, torch.Tensor]] = {}
        self.probe_accuracy: dict[str, float] = {}
        self.finetuned_accuracy: dict[str, float] = {}

    # ------------------------------------------------------------------ data
    def _make_data(self, index: int, n_train: int, n_test: int) -> _TaskData:
        g = torch.Generator().manual_seed(10_000 * (self.seed + 1) + index)
        s = self.adapter.image_size
        style = torch.randn(3, s, s, generator=g) * 1.5
        protos = torch.randn(self.classes, 3, s, s, generator=g)

        def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            y = torch.arange(n) % self.classes
            y = y[torch.randperm(n, generator=g)]
            x = style + 0.6 * protos[y] + 1.5 * torch.randn(n, 3, s, s, generator=g)
            return x, y

        xtr, ytr = draw(n_train)
        xte, yte = draw(n_test)
        return _TaskData(xtr, ytr, xte, yte)

    # ------------------------------------------------------------------ Benchmark
    def pretrained(self) -> nn.Module:
        return copy.deepcopy(self._theta0).to(self.device)

    def modules(self) -> list[ModuleSpec]:
        return self.adapter.modules(self._theta0)

    def head(self, task: str) -> Head:
        if task not in self._heads:
            self._heads[task] = self._fit_probe(task)
        return self._heads[task].to(self.device)

    def finetuned(self, task: str) -> dict[str, torch.Tensor]:
        if task not in self._finetuned:
            self._finetuned[task] = self._finetune(task)
        return self._finetuned[task]

    def evaluate(self, model: nn.Module, task: str) -> dict[str, Any]:
        d = self._data[task]
        return evaluate_classifier(model, self.head(task), d.x_test, d.y_test, device=self.device)

    def unlabeled_samples(self, task: str, per_class: int, seed: int) -> torch.Tensor:
        d = self._data[task]
        return d.x_test[seed_subset(d.y_test.tolist(), per_class, seed)]

    def labeled_samples(self, task: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = self._data[task]
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(d.y_train.numel(), generator=g)[:n]
        return d.x_train[idx], d.y_train[idx]

    def describe(self) -> dict[str, Any]:
        return {"benchmark": "toy", "backbone": self.adapter.name, "tasks": list(self.tasks),
                "classes": self.classes, "steps": self.steps, "seed": self.seed,
                "note": "synthetic tasks on a randomly initialised tiny ViT; not a result about real data"}

    # ------------------------------------------------------------------ zoo
    @torch.no_grad()
    def _fit_probe(self, task: str) -> LinearHead:
        d = self._data[task]
        z = self._theta0(d.x_train)
        z1 = torch.cat([z, torch.ones(z.shape[0], 1)], 1)
        target = nn.functional.one_hot(d.y_train, self.classes).float() * 2 - 1
        w = torch.linalg.solve(z1.T @ z1 + 1e-2 * torch.eye(z1.shape[1]), z1.T @ target)
        head = LinearHead(w[:-1].T.contiguous() * 3.0, w[-1].contiguous() * 3.0)
        self.probe_accuracy[task] = evaluate_classifier(self._theta0, head, d.x_test, d.y_test)["accuracy"]
        return head

    def _finetune(self, task: str) -> dict[str, torch.Tensor]:
        d = self._data[task]
        head = self.head(task).cpu()
        model = copy.deepcopy(self._theta0).train()
        idx = self.tasks.index(task)
        g = torch.Generator().manual_seed(7919 * (self.seed + 1) + idx)
        with torch.random.fork_rng():
            torch.manual_seed(7919 * (self.seed + 1) + idx)
            opt = torch.optim.Adam(model.parameters(), lr=self.lr)
            for _ in range(self.steps):
                b = torch.randint(0, d.y_train.numel(), (32,), generator=g)
                loss = nn.functional.cross_entropy(head(model(d.x_train[b])), d.y_train[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        self.finetuned_accuracy[task] = evaluate_classifier(model, head, d.x_test, d.y_test)["accuracy"]
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
