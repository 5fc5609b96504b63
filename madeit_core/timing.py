"""A small, opt-in timing context for the benchmark (``madeit bench``).

Library code marks its phases with ``with timed("svd"): ...``. Nothing is measured unless a
:class:`Recorder` is active (``with recording() as rec:``); otherwise :func:`timed` costs one
global lookup, so the marks change no behaviour and next to no time.

Times are *exclusive*: a region nested inside another is charged to the inner name only, and the
outer region gets its own time minus its children's. ``rec.totals`` maps names to seconds and
``rec.counts`` to the number of times each region ran. On a GPU, pass ``sync`` (e.g.
``torch.cuda.synchronize``) so each region boundary waits for the device's queued work.

:func:`patch_linalg` times code we do not instrument (the rival methods): calls to
``torch.linalg.{svd, svdvals, qr, eigh}`` made outside any named region are charged to
``"linalg"``.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch


class Recorder:
    """Accumulates exclusive seconds per region name (see the module docstring)."""

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.sync = sync
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self._stack: list[list[Any]] = []   # [name, start, children's seconds]

    @property
    def depth(self) -> int:
        return len(self._stack)

    def push(self, name: str) -> None:
        if self.sync is not None:
            self.sync()
        self._stack.append([name, time.perf_counter(), 0.0])

    def pop(self) -> None:
        if self.sync is not None:
            self.sync()
        name, start, children = self._stack.pop()
        elapsed = time.perf_counter() - start
        self.totals[name] += elapsed - children
        self.counts[name] += 1
        if self._stack:
            self._stack[-1][2] += elapsed

    def as_dict(self) -> dict[str, float]:
        return dict(self.totals)


_ACTIVE: Recorder | None = None


@contextlib.contextmanager
def timed(name: str) -> Iterator[None]:
    """Charge the enclosed block to ``name`` in the active recorder (no-op without one)."""
    rec = _ACTIVE
    if rec is None:
        yield
        return
    rec.push(name)
    try:
        yield
    finally:
        rec.pop()


@contextlib.contextmanager
def recording(sync: Callable[[], None] | None = None) -> Iterator[Recorder]:
    """Activate a fresh :class:`Recorder` for the enclosed block (restores the previous one)."""
    global _ACTIVE
    prev, rec = _ACTIVE, Recorder(sync)
    _ACTIVE = rec
    try:
        yield rec
    finally:
        _ACTIVE = prev


_LINALG = ("svd", "svdvals", "qr", "eigh")


@contextlib.contextmanager
def patch_linalg(name: str = "linalg") -> Iterator[None]:
    """Time ``torch.linalg.{svd, svdvals, qr, eigh}`` calls made outside any named region."""
    originals = {f: getattr(torch.linalg, f) for f in _LINALG}

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            rec = _ACTIVE
            if rec is None or rec.depth > 0:
                return fn(*args, **kwargs)
            rec.push(name)
            try:
                return fn(*args, **kwargs)
            finally:
                rec.pop()
        return inner

    for f, fn in originals.items():
        setattr(torch.linalg, f, wrap(fn))
    try:
        yield
    finally:
        for f, fn in originals.items():
            setattr(torch.linalg, f, fn)


__all__ = ["Recorder", "patch_linalg", "recording", "timed"]
