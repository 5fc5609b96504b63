"""Text rendered as images: Rendered SST-2 re-made the way OpenAI made it, and the same for IMDB and AG News.

OpenAI's Rendered SST2 (CLIP paper, "to evaluate the model's capability on optical character
recognition") shows each SST-2 sentence as black text on a white square image (448 × 448 px in
their release); the label is the sentence's sentiment. We re-make it from the mirror's text
(the original images are not in the mirror) with these documented choices:

- **Image**: ``size × size`` pixels, one grey channel (uint8 ``[N, size, size, 1]``), white
  background (255), black text (0), anti-aliased by FreeType. ``size`` comes from the profile
  (``render_size``): 64 px in the offline profile, 32 px in smoke.
- **Font**: DejaVu Sans, the TrueType font bundled with matplotlib (found with
  ``matplotlib.font_manager.findfont``; no system fonts are used, so every machine with the same
  matplotlib and Pillow renders identical bytes), drawn with Pillow's ``ImageFont.truetype`` at
  ``font_px = max(min_font_px, round(font_frac · size))`` pixels (defaults: ``font_frac = 0.14``,
  ``min_font_px = 6``: 9 px at 64, 6 px at 32; OpenAI's images use a similar ~7 % of the side
  per line of text).
- **Layout**: a margin of ``max(1, size // 32)`` px on every side; text starts at the top left.
  Lines are wrapped greedily at spaces to the width the font measures
  (``ImageFont.getlength``); a word longer than a line is broken between characters. Line pitch
  = the font's ascent + descent.
- **Truncation**: lines that do not fit in the height are dropped (at 64 px: 5 lines of about
  12 characters, i.e. about the first 60 characters; SST-2 test sentences average 105, IMDB
  reviews 392, AG News items 236). Nothing else is changed in the text.
- **Determinism**: no randomness; the cache file name hashes the texts, every parameter, the
  renderer version and the Pillow/matplotlib versions and font file size.

Rendering tens of thousands of sentences takes a while, so the profile caps each split before
rendering (:mod:`madeit_core.data.suites`) and the result is cached on disk, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from madeit_core.io import atomic_write

log = logging.getLogger(__name__)

RENDER_VERSION = 1
FONT_FRAC = 0.14
MIN_FONT_PX = 6


@lru_cache(maxsize=1)
def font_path() -> str:
    """Path of matplotlib's bundled DejaVuSans.ttf."""
    import matplotlib
    from matplotlib import font_manager

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    if path.is_file():
        return str(path)
    return font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"), fallback_to_default=False)


@lru_cache(maxsize=8)
def _font(px: int):  # type: ignore[no-untyped-def]
    from PIL import ImageFont

    return ImageFont.truetype(font_path(), px)


def font_px_for(size: int, font_frac: float = FONT_FRAC, min_font_px: int = MIN_FONT_PX) -> int:
    return max(min_font_px, round(font_frac * size))


def wrap(text: str, font, width: float) -> list[str]:  # type: ignore[no-untyped-def]
    """Greedy word wrap to ``width`` pixels; over-long words are broken between characters."""
    lines: list[str] = []
    cur = ""
    for word in text.split():
        cand = word if not cur else f"{cur} {word}"
        if font.getlength(cand) <= width:
            cur = cand
            continue
        if cur:
            lines.append(cur)
            cur = ""
        while font.getlength(word) > width and len(word) > 1:
            k = len(word)
            while k > 1 and font.getlength(word[:k]) > width:
                k -= 1
            lines.append(word[:k])
            word = word[k:]
        cur = word
    if cur:
        lines.append(cur)
    return lines


def visible_lines(text: str, size: int, font_frac: float = FONT_FRAC, min_font_px: int = MIN_FONT_PX) -> list[str]:
    """The lines of ``text`` that :func:`render_text` draws at ``size`` (the rest is truncated)."""
    font = _font(font_px_for(size, font_frac, min_font_px))
    margin = max(1, size // 32)
    ascent, descent = font.getmetrics()
    max_lines = max(1, (size - 2 * margin) // (ascent + descent))
    return wrap(text, font, size - 2 * margin)[:max_lines]


def visible_text(text: str, size: int, font_frac: float = FONT_FRAC, min_font_px: int = MIN_FONT_PX) -> str:
    """The part of ``text`` a rendered image shows, lines joined by spaces (words broken across
    lines stay broken, as on the image)."""
    return " ".join(visible_lines(text, size, font_frac, min_font_px))


def render_text(text: str, size: int, font_frac: float = FONT_FRAC, min_font_px: int = MIN_FONT_PX) -> np.ndarray:
    """One text as a ``[size, size]`` uint8 image (black on white; see the module docstring)."""
    from PIL import Image, ImageDraw

    font = _font(font_px_for(size, font_frac, min_font_px))
    margin = max(1, size // 32)
    ascent, descent = font.getmetrics()
    pitch = ascent + descent
    lines = visible_lines(text, size, font_frac, min_font_px)
    img = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((margin, margin + i * pitch), line, fill=0, font=font)
    return np.asarray(img, dtype=np.uint8)


def render_texts(texts: list[str], size: int, font_frac: float = FONT_FRAC,
                 min_font_px: int = MIN_FONT_PX, show_progress: bool = False) -> np.ndarray:
    """Render many texts: uint8 ``[N, size, size, 1]``."""
    from tqdm.auto import tqdm

    out = np.empty((len(texts), size, size, 1), dtype=np.uint8)
    for i, t in enumerate(tqdm(texts, desc=f"rendering {len(texts)} texts at {size}px", disable=not show_progress,
                               leave=False)):
        out[i, :, :, 0] = render_text(t, size, font_frac, min_font_px)
    return out


def render_key(texts: list[str], size: int, font_frac: float = FONT_FRAC, min_font_px: int = MIN_FONT_PX) -> str:
    import matplotlib
    import PIL

    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    cfg = {"v": RENDER_VERSION, "size": size, "font_frac": font_frac, "min_font_px": min_font_px,
           "pillow": PIL.__version__, "matplotlib": matplotlib.__version__,
           "font_bytes": os.path.getsize(font_path()), "n": len(texts), "texts": h.hexdigest()}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:20]


def render_cached(texts: list[str], size: int, cache_dir: str | os.PathLike[str] | None, name: str = "texts",
                  font_frac: float = FONT_FRAC, min_font_px: int = MIN_FONT_PX,
                  show_progress: bool = False) -> np.ndarray:
    """:func:`render_texts` with an on-disk cache ``<cache_dir>/rendered/<name>-<key>.npy`` (atomic)."""
    if cache_dir is None:
        return render_texts(texts, size, font_frac, min_font_px, show_progress)
    path = Path(cache_dir) / "rendered" / f"{name}-{size}px-{render_key(texts, size, font_frac, min_font_px)}.npy"
    if path.is_file():
        try:
            arr = np.load(path, allow_pickle=False)
            if arr.shape == (len(texts), size, size, 1) and arr.dtype == np.uint8:
                return arr
        except (ValueError, OSError, EOFError):
            pass
        log.warning("re-rendering: cache file %s is damaged", path)
    log.info("rendering %d texts (%s) at %d px", len(texts), name, size)
    arr = render_texts(texts, size, font_frac, min_font_px, show_progress)
    with atomic_write(path, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)
    return arr
