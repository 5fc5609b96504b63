"""``madeit data pack``: a compact, single-file copy of the data a profile uses.

GPU machines often cannot see the mirror. A pack holds, for every task base that the profile's
groups need, exactly the rows the profile's caps select (:func:`madeit_core.data.suites.select_rows`),
at native resolution (rendered text at the profile's ``render_size``), so a zoo built from the
pack is byte-for-byte the zoo built from the mirror (the zoo's cache keys hash the data, so
both share cache entries). Use it with ``MADEIT_DATA=pack.npz`` or ``--data pack.npz``.

Format: one ``np.savez_compressed`` file. ``__manifest__`` is UTF-8 JSON (as a uint8 array)
with the profile, caps and one entry per ``<base>__<split>`` (``<base>@<size>px__<split>`` for
rendered text): kind, classes, stored rows, total rows, shape. Arrays per entry: ``<key>__x``
(uint8 NHWC), ``<key>__y`` (int64) and ``<key>__idx`` (the rows' indices in the full split).
The digits suite is not stored: scikit-learn ships it.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from madeit_core.data.mirror import MirrorError
from madeit_core.data.render import render_cached
from madeit_core.data.suites import MirrorSource, entry_key, select_rows, task_base
from madeit_core.io import atomic_write

PACK_FORMAT = 1
MAX_MIB = 64.0


def pack_bases(groups: list[str]) -> list[tuple[str, str]]:
    """(kind, base) pairs the groups' tasks need, in first-use order (digits excluded)."""
    from madeit_core.protocol import group_tasks

    out: list[tuple[str, str]] = []
    for g in groups:
        for task in group_tasks(g):
            kind, base, _ = task_base(task)
            if kind != "digits" and (kind, base) not in out:
                out.append((kind, base))
    return out


def write_pack(out: str | os.PathLike[str], profile: str = "offline", data: str | os.PathLike[str] | None = None,
               groups: list[str] | None = None, max_mib: float = MAX_MIB,
               cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Write the pack of ``profile`` (its groups unless ``groups``); returns its manifest plus ``bytes``.

    Raises :class:`MirrorError` (and leaves no file) when the pack would exceed ``max_mib``.
    """
    import madeit_core.data.suites  # noqa: F401  (registers the groups)
    from madeit_core.profiles import get_profile
    from madeit_core.zoo import cache_root

    prof = get_profile(profile)
    groups = list(groups) if groups else list(prof.groups)
    source = MirrorSource(data, cache_dir if cache_dir is not None else cache_root())
    mirror = source.mirror
    arrays: dict[str, np.ndarray] = {}
    entries: dict[str, Any] = {}
    caps = {"train": prof.train_cap, "test": prof.test_pool_cap}
    for kind, base in pack_bases(groups):
        meta = mirror.meta(base)
        for split, cap in caps.items():
            key = entry_key(kind, base, split, prof.render_size)
            if kind == "image":
                x, y = mirror.images(base, split)
                idx = select_rows(len(y), cap)
                xs = x[idx]
            else:
                texts, y = mirror.texts(base, split)
                idx = select_rows(len(y), cap)
                xs = render_cached([texts[i] for i in idx], prof.render_size, source.cache_dir,
                                   name=f"{base}-{split}", show_progress=True)
            arrays[f"{key}__x"] = np.ascontiguousarray(xs)
            arrays[f"{key}__y"] = y[idx].astype(np.int64)
            arrays[f"{key}__idx"] = idx.astype(np.int64)
            entries[key] = {"base": base, "kind": kind, "split": split, "classes": list(meta.classes),
                            "n": int(len(idx)), "n_total": int(len(y)), "shape": list(xs.shape[1:]),
                            "render_size": prof.render_size if kind == "text" else None}
    manifest = {"format": PACK_FORMAT, "profile": prof.name, "groups": groups, "caps": caps,
                "render_size": prof.render_size, "source": str(mirror.root), "entries": entries}
    arrays["__manifest__"] = np.frombuffer(json.dumps(manifest, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    size = buf.tell()
    if size > max_mib * 2 ** 20:
        raise MirrorError(f"the pack of profile {prof.name} would be {size / 2 ** 20:.1f} MiB, over the "
                          f"{max_mib:.0f} MiB limit; lower the profile's caps or pack fewer groups")
    with atomic_write(Path(out), "wb") as fh:
        fh.write(buf.getbuffer())
    return {**manifest, "bytes": size}
