"""Module inputs of θ0's forward pass, remembered per (θ0, input batch) for routed inference.

MADE-IT's routing starts with a forward pass of the *pre-trained* model θ0 and scores the
experts of a few modules from the inputs those modules receive (:meth:`RoutedModel.score
<madeit_core.routing.RoutedModel.score>`). That pass depends on θ0 and the batch only, not on the
expert bank, so when the same batch comes back, with the bank of a later step, of another task
order or of an ablation, the inputs it would record are the ones recorded before. The protocol
evaluates every task's test images after the task arrives and again at the end, for every order
and variant, so in one process almost every pre-trained pass after the first is such a repeat
(about 40 % of MADE-IT's evaluation time on the offline benchmark).

:class:`ActivationCache` keeps those inputs, keyed by a θ0 tag, a hash of the batch's bytes and
the module, least recently used out first, within a byte budget; a module input larger than
``max_entry_bytes`` (default: a sixteenth of the budget) is not kept, so a bank whose scored
modules include one runs the pass as before. On EfficientNet-Lite0 at 64 px the 32 module inputs
of a batch of 256 test images take 230 MiB (the deeper half, 56 MiB); the paper's anchor rule
scores shallow project convs on some orders (:mod:`madeit_core.routing`), so all of them are
worth keeping: a budget of about 230 MiB per task (offline-20: 4.6 GiB) makes every repeat a
hit. Scores from a hit are computed from the very tensors the pass produced, so the results are
identical, bit for bit, with or without the cache (``tests/test_activation_cache.py``).

The process-wide instance that :class:`~madeit_core.methods.made_it.MadeIt` uses is
:func:`shared_activation_cache`; its budget is ``MADEIT_ACTIVATION_CACHE_MB`` (default 2048;
0 turns it off). MADE-IT uses it on the CPU only (on a GPU the pass is cheap and the memory
better spent).
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping

import torch

from madeit_core.errors import MergeInputError

DEFAULT_BUDGET_MB = 2048


class ActivationCache:
    """LRU store of module inputs: (θ0 tag, batch hash, module key) → tensor, within ``max_bytes``."""

    def __init__(self, max_bytes: int = DEFAULT_BUDGET_MB << 20, max_entry_bytes: int | None = None) -> None:
        max_entry_bytes = max_bytes // 16 if max_entry_bytes is None else max_entry_bytes
        if max_bytes < 0 or max_entry_bytes < 0:
            raise MergeInputError(f"activation cache budgets must be ≥ 0, got {max_bytes} and {max_entry_bytes}")
        self.max_bytes = int(max_bytes)
        self.max_entry_bytes = int(min(max_entry_bytes, max_bytes))
        self._store: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @staticmethod
    def batch_key(tag: str, x: torch.Tensor) -> str:
        """sha256 of the θ0 tag and the batch's dtype, shape and bytes."""
        t = x.detach().cpu().contiguous()
        h = hashlib.sha256(f"{tag}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def get(self, key: str, modules: Iterable[str]) -> dict[str, torch.Tensor] | None:
        """The inputs of every module in ``modules`` for batch ``key``, or None if any is missing."""
        out: dict[str, torch.Tensor] = {}
        for m in modules:
            t = self._store.get((key, m))
            if t is None:
                self.misses += 1
                return None
            out[m] = t
        for m in out:
            self._store.move_to_end((key, m))
        self.hits += 1
        return out

    def put(self, key: str, inputs: Mapping[str, torch.Tensor]) -> None:
        """Keep each input no larger than ``max_entry_bytes``; drop the least recently used beyond the budget."""
        if not self.enabled:
            return
        for m, t in inputs.items():
            size = t.numel() * t.element_size()
            if size > self.max_entry_bytes:
                continue
            old = self._store.pop((key, m), None)
            if old is not None:
                self.bytes -= old.numel() * old.element_size()
            self._store[(key, m)] = t
            self.bytes += size
        while self.bytes > self.max_bytes and self._store:
            _, t = self._store.popitem(last=False)
            self.bytes -= t.numel() * t.element_size()

    def clear(self) -> None:
        self._store.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._store)


_SHARED: ActivationCache | None = None


def shared_activation_cache() -> ActivationCache:
    """The process-wide cache (budget from ``MADEIT_ACTIVATION_CACHE_MB``, default 2048; 0: off)."""
    global _SHARED
    if _SHARED is None:
        raw = os.environ.get("MADEIT_ACTIVATION_CACHE_MB", str(DEFAULT_BUDGET_MB))
        try:
            mb = float(raw)
        except ValueError as exc:
            raise MergeInputError(f"MADEIT_ACTIVATION_CACHE_MB must be a number of MiB, got {raw!r}") from exc
        _SHARED = ActivationCache(int(mb * (1 << 20)))
    return _SHARED
