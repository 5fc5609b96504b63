"""An embedded image suite that needs no download: scikit-learn's ``load_digits`` and variants.

``load_digits`` ships with scikit-learn: 1,797 handwritten digits, 8 × 8 pixels, values 0..16
(UCI "Optical Recognition of Handwritten Digits", test part). It lets the smoke profile and the
tests run with no data mirror at all.

- **Pixels**: ``round(v · 255 / 16)`` → uint8, one grey channel, native 8 × 8 (the backbone
  adapter resizes to its input size).
- **Split**: per class, indices permuted with ``numpy.random.default_rng(0)``; the first 25 %
  (rounded down) go to test, the rest to train; rows of each split in a fixed random order
  (the same generator), so prefixes are roughly class-balanced. Train 1,352, test 445.

Variants (``DIGIT_VARIANTS``) transform the images or the labels so that the suite has several
related but different tasks, as the real suites have (MNIST / KMNIST / Fashion-MNIST):

- ``digits``: as above.
- ``digits_inverted``: 255 − pixel (white digit on black becomes black on white).
- ``digits_rot90``: every image rotated 90° counter-clockwise.
- ``digits_mirror``: every image mirrored left ↔ right.
- ``digits_transposed``: every image transposed (rows ↔ columns).
- ``digits_noisy``: Gaussian pixel noise, σ = 48 grey levels, clipped to 0..255, drawn with
  ``default_rng(1)`` for train and ``default_rng(2)`` for test (fixed, so the task is fixed).
- ``digits_parity``: the same images, labels even (0) / odd (1): the same inputs, another
  label space.
- ``digits_mod3``: labels = digit mod 3 (3 classes).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

DIGIT_VARIANTS = ("digits", "digits_inverted", "digits_rot90", "digits_mirror", "digits_transposed", "digits_noisy",
                  "digits_parity", "digits_mod3")

Split = tuple[np.ndarray, np.ndarray]


@lru_cache(maxsize=1)
def digits_base() -> tuple[Split, Split, tuple[str, ...]]:
    """((x_train, y_train), (x_test, y_test), class names) of the unmodified digits suite."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]  # [N, 8, 8, 1]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        k = len(idx) // 4
        test_idx.append(idx[:k])
        train_idx.append(idx[k:])
    tr = np.concatenate(train_idx)
    te = np.concatenate(test_idx)
    tr = tr[rng.permutation(len(tr))]
    te = te[rng.permutation(len(te))]
    return (x[tr], y[tr]), (x[te], y[te]), tuple(str(i) for i in range(10))


def transform_images(x: np.ndarray, how: str, seed: int = 0) -> np.ndarray:
    """Image transforms shared by the digit variants and the real-task variants (NHWC uint8).

    ``inverted`` (255 − x), ``rot90`` (90° counter-clockwise), ``mirror`` (left ↔ right),
    ``transposed`` (H ↔ W), ``noisy`` (Gaussian σ = 48, ``default_rng(seed)``), ``grey``
    (ITU-R 601 luma, 0.299 R + 0.587 G + 0.114 B, kept as one channel).
    """
    if how == "inverted":
        return 255 - x
    if how == "rot90":
        return np.ascontiguousarray(np.rot90(x, k=1, axes=(1, 2)))
    if how == "mirror":
        return np.ascontiguousarray(x[:, :, ::-1])
    if how == "transposed":
        return np.ascontiguousarray(x.transpose(0, 2, 1, 3))
    if how == "noisy":
        noise = np.random.default_rng(seed).normal(0.0, 48.0, size=x.shape)
        return np.clip(x.astype(np.float64) + noise, 0, 255).round().astype(np.uint8)
    if how == "grey":
        if x.shape[-1] == 1:
            return x
        w = np.array([0.299, 0.587, 0.114])
        return np.rint(x.astype(np.float64) @ w).clip(0, 255).astype(np.uint8)[..., None]
    raise ValueError(f"unknown image transform {how!r}")


def digits_task(name: str) -> tuple[Split, Split, tuple[str, ...]]:
    """One task of the digits suite (see the module docstring)."""
    if name not in DIGIT_VARIANTS:
        raise KeyError(f"unknown digits task {name!r}; known: {', '.join(DIGIT_VARIANTS)}")
    (xtr, ytr), (xte, yte), classes = digits_base()
    if name in ("digits_inverted", "digits_rot90", "digits_mirror", "digits_transposed"):
        how = name.split("_", 1)[1]
        return (transform_images(xtr, how), ytr), (transform_images(xte, how), yte), classes
    if name == "digits_noisy":
        return (transform_images(xtr, "noisy", 1), ytr), (transform_images(xte, "noisy", 2), yte), classes
    if name == "digits_parity":
        return (xtr, ytr % 2), (xte, yte % 2), ("even", "odd")
    if name == "digits_mod3":
        return (xtr, ytr % 3), (xte, yte % 3), ("0 mod 3", "1 mod 3", "2 mod 3")
    return (xtr, ytr), (xte, yte), classes
