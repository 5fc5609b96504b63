"""Continual merging methods behind one interface (:class:`~madeit_core.methods.base.ContinualMethod`).

Each method lives in its own module and registers itself with :func:`register`; every module of
this package is imported on first use of :func:`get_method` / :func:`available_methods`, so adding
a method needs no edit here.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from madeit_core.errors import MergeInputError
from madeit_core.methods.base import ContinualMethod, MergeContext, StaticMergeMethod

_REGISTRY: dict[str, type[ContinualMethod]] = {}
_LOADED = False


def register(cls: type[ContinualMethod]) -> type[ContinualMethod]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise RuntimeError(f"two methods registered as {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    _LOADED = True


def available_methods() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_method(name: str, **hparams: Any) -> ContinualMethod:
    """Instantiate the method registered as ``name`` with its hyper-parameters."""
    _load_all()
    if name not in _REGISTRY:
        raise MergeInputError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**hparams)


__all__ = ["ContinualMethod", "MergeContext", "StaticMergeMethod", "available_methods", "get_method", "register"]
