"""The data layer: mirror reading and its errors, rendered text, the digits suite, caps, packs, fallbacks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from madeit_core.data.digits import DIGIT_VARIANTS, digits_base, digits_task, transform_images
from madeit_core.data.mirror import Mirror, MirrorError
from madeit_core.data.reading_ceiling import reading_ceiling
from madeit_core.data.render import render_cached, render_text, render_texts, visible_text
from madeit_core.data.suites import (
    GROUPS,
    OFFLINE_8,
    OFFLINE_14,
    OFFLINE_20,
    MirrorSource,
    PackSource,
    load_task,
    resolve_group,
    select_rows,
)
from madeit_core.errors import MergeInputError

SHARED = Path(os.environ.get("MADEIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_mirror = pytest.mark.skipif(not (SHARED / "mnist" / "meta.json").is_file(), reason="no data mirror beside")


def _fake_image_task(root: Path, task: str = "fake", n: int = 12, classes: int = 3, size: int = 8,
                     channels: int = 1, meta_n: int | None = None) -> None:
    rng = np.random.default_rng(0)
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    x = rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)
    y = (np.arange(n) % classes).astype(np.int64)
    np.savez_compressed(folder / "train.npz", x=x, y=y)
    np.savez_compressed(folder / "test.npz", x=x[: n // 2], y=y[: n // 2])
    meta = {"task": task, "kind": "image", "classes": [f"c{i}" for i in range(classes)], "image_size": [size, size],
            "channels": channels, "splits": {"train": {"n": meta_n if meta_n is not None else n},
                                             "test": {"n": n // 2}}}
    (folder / "meta.json").write_text(json.dumps(meta))


def _fake_text_task(root: Path, task: str = "faketext", lines: list[str] | None = None) -> None:
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    lines = lines if lines is not None else ["0\tgood film", "1\tbad film", "0\tfine", "1\tawful acting"]
    for split in ("train", "test"):
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    meta = {"task": task, "kind": "text", "classes": ["neg", "pos"],
            "splits": {"train": {"n": len(lines)}, "test": {"n": len(lines)}}}
    (folder / "meta.json").write_text(json.dumps(meta))


# ---------------------------------------------------------------------- the real mirror
@needs_mirror
def test_real_mirror_reads_and_matches_its_readme():
    m = Mirror(SHARED)
    x, y = m.images("cifar10", "train")
    assert x.shape == (4000, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    assert np.bincount(y).tolist() == [400] * 10
    texts, y = m.texts("sst2", "test")
    assert len(texts) == 872 and set(y.tolist()) == {0, 1}
    rows = m.check(["dtd10", "ag_news"])
    assert {(r["task"], r["split"], r["n"]) for r in rows} == {("dtd10", "train", 800), ("dtd10", "test", 400),
                                                              ("ag_news", "train", 6000), ("ag_news", "test", 1600)}


@needs_mirror
def test_real_mirror_sha256_check():
    assert Mirror(SHARED).check(["dtd10"], verify_sha=True)


@needs_mirror
def test_offline_groups_load_from_the_mirror_with_caps():
    src = MirrorSource(SHARED, cache_dir=None)
    assert resolve_group("offline-20", src) == (OFFLINE_20, None)
    d = load_task("gtsrb_grey", src, train_cap=50, test_cap=20)
    assert d.x_train.shape == (50, 32, 32, 1) and d.num_classes == 43
    full = load_task("gtsrb", src, train_cap=50, test_cap=20)
    assert np.array_equal(d.x_train, transform_images(full.x_train, "grey"))
    assert np.array_equal(d.y_train, full.y_train)


# ---------------------------------------------------------------------- errors
def test_missing_mirror_names_the_path_and_how_to_get_it(tmp_path):
    with pytest.raises(MirrorError, match=r"expected at .*nowhere.*madeit data fetch"):
        Mirror(tmp_path / "nowhere").images("mnist", "train")
    _fake_image_task(tmp_path)
    with pytest.raises(MirrorError, match=r"task folder 'mnist'.*expected at"):
        Mirror(tmp_path).images("mnist", "train")
    (tmp_path / "fake" / "test.npz").unlink()
    with pytest.raises(MirrorError, match=r"fake/test\.npz expected at"):
        Mirror(tmp_path).images("fake", "test")


def test_malformed_mirror_files_are_clear_errors(tmp_path):
    _fake_image_task(tmp_path, "wrongn", meta_n=99)
    with pytest.raises(MirrorError, match="holds 12 rows but meta.json says 99"):
        Mirror(tmp_path).images("wrongn", "train")
    _fake_image_task(tmp_path, "badlabel")
    z = dict(np.load(tmp_path / "badlabel" / "train.npz"))
    z["y"][0] = 7
    np.savez_compressed(tmp_path / "badlabel" / "train.npz", **z)
    with pytest.raises(MirrorError, match="label 7 out of range for 3 classes"):
        Mirror(tmp_path).images("badlabel", "train")
    _fake_image_task(tmp_path, "badshape")
    z = dict(np.load(tmp_path / "badshape" / "train.npz"))
    z["x"] = z["x"][:, :4]
    np.savez_compressed(tmp_path / "badshape" / "train.npz", **z)
    with pytest.raises(MirrorError, match=r"images are \[4, 8\], meta.json says \[8, 8\]"):
        Mirror(tmp_path).images("badshape", "train")
    _fake_image_task(tmp_path, "badjson")
    (tmp_path / "badjson" / "meta.json").write_text("{not json")
    with pytest.raises(MirrorError, match="badjson.*not valid JSON"):
        Mirror(tmp_path).meta("badjson")
    _fake_text_task(tmp_path, "badtsv", ["0\tfine", "no tab here"])
    with pytest.raises(MirrorError, match=r"badtsv.*train\.tsv line 2: expected '<label>\\t<text>'"):
        Mirror(tmp_path).texts("badtsv", "train")
    _fake_text_task(tmp_path, "badtext", ["0\tfine", "5\tfive"])
    with pytest.raises(MirrorError, match="label 5 out of range for 2 classes"):
        Mirror(tmp_path).texts("badtext", "train")
    with pytest.raises(MirrorError, match="is a text task, not an image task"):
        Mirror(tmp_path).images("badtext", "train")


def test_a_group_without_its_data_fails_clearly_and_smoke_falls_back(tmp_path):
    src = MirrorSource(tmp_path / "empty", cache_dir=None)
    with pytest.raises(MirrorError, match=r"task 'mnist' of group 'offline-8' needs the data 'mnist'"):
        resolve_group("offline-8", src)
    tasks, note = resolve_group("smoke-4", src)
    assert tasks == GROUPS["smoke-digits-4"] and "fell back to the embedded scikit-learn digits suite" in note


# ---------------------------------------------------------------------- rendered text
def test_rendering_is_deterministic_and_legible():
    a = render_text("a film worth seeing twice", 64)
    b = render_text("a film worth seeing twice", 64)
    assert a.dtype == np.uint8 and a.shape == (64, 64) and np.array_equal(a, b)
    assert a.max() == 255 and a.min() == 0                       # white page, black ink
    assert (a < 128).mean() > 0.02                                # there is text on it
    assert not np.array_equal(a, render_text("a film worth seeing once", 64))
    blank = render_text("", 64)
    assert (blank == 255).all()
    long = render_text("word " * 200, 64)                         # dropped lines, no overflow error
    assert long.shape == (64, 64)


def test_render_cache_round_trip(tmp_path):
    texts = ["good", "bad", "a much longer sentence that wraps over several lines of the image"]
    first = render_cached(texts, 32, tmp_path, name="t")
    files = list((tmp_path / "rendered").glob("t-32px-*.npy"))
    assert len(files) == 1
    assert np.array_equal(first, render_texts(texts, 32))
    files[0].write_bytes(b"garbage")                              # damaged cache: re-rendered
    assert np.array_equal(render_cached(texts, 32, tmp_path, name="t"), first)


def test_visible_text_is_what_the_image_shows():
    long = "a film that begins well and then loses its way in a swamp of cliches and noise " * 3
    shown = visible_text(long, 64)
    assert 0 < len(shown) < len(long) and long.startswith(shown[:20])
    assert np.array_equal(render_text(shown, 64), render_text(long, 64))   # the rest is not drawn
    assert visible_text("short one", 64) == "short one"


def test_reading_ceiling_sees_only_the_visible_words(tmp_path):
    filler = "and then the story goes on for a long while with many words about nothing"
    rng = np.random.default_rng(0)
    words = {0: ["awful", "dull", "boring"], 1: ["great", "superb", "lovely"]}
    front, back = [], []
    for i in range(160):
        y = int(i % 2)
        w = words[y][int(rng.integers(3))]
        front.append(f"{y}\t{w} {filler}")
        back.append(f"{y}\t{filler} {filler} {w}")
    for name, lines in (("front", front), ("back", back)):
        _fake_text_task(tmp_path / name, "sst2", lines)
    kw = {"train_cap": 160, "test_cap": 80, "test_pool_cap": 160, "render_size": 32, "probe_fraction": 0.3}
    seen = reading_ceiling("rendered_sst2", mirror=tmp_path / "front", **kw)
    hidden = reading_ceiling("rendered_sst2", mirror=tmp_path / "back", **kw)
    assert seen["visible"] == 1.0 and seen["full_text"] == 1.0          # the label word is drawn
    assert hidden["full_text"] == 1.0 and hidden["visible"] <= 0.6      # cut off: a reader is at chance
    assert hidden["chars_shown_mean"] < hidden["chars_full_mean"]
    assert seen["rows"] == {"finetune": 112, "test": 80, "mirror_train": 160, "all_rows": 160}
    assert reading_ceiling("rendered_sst2", mirror=tmp_path / "back", **kw) == hidden   # deterministic
    with pytest.raises(MergeInputError, match="not a rendered-text task"):
        reading_ceiling("mnist", mirror=tmp_path / "back", **kw)


# ---------------------------------------------------------------------- digits suite and caps
def test_digits_suite_split_and_variants():
    (xtr, ytr), (xte, yte), classes = digits_base()
    assert xtr.shape == (1352, 8, 8, 1) and xte.shape == (445, 8, 8, 1) and xtr.dtype == np.uint8
    assert classes == tuple(str(i) for i in range(10)) and xtr.max() == 255
    for name in DIGIT_VARIANTS:
        (a, ya), (b, yb), cls = digits_task(name)
        assert len(a) == 1352 and len(b) == 445 and ya.max() < len(cls)
    (inv, _), _, _ = digits_task("digits_inverted")
    assert np.array_equal(inv, 255 - xtr)
    (_, yp), _, cls = digits_task("digits_parity")
    assert cls == ("even", "odd") and np.array_equal(yp, ytr % 2)
    (n1, _), _, _ = digits_task("digits_noisy")
    (n2, _), _, _ = digits_task("digits_noisy")
    assert np.array_equal(n1, n2) and not np.array_equal(n1, xtr)


def test_transforms():
    x = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    assert transform_images(x, "rot90").shape == (2, 4, 3, 3)
    assert np.array_equal(transform_images(x, "mirror")[:, :, 0], x[:, :, -1])
    g = transform_images(x, "grey")
    assert g.shape == (2, 3, 4, 1)
    assert g[0, 0, 0, 0] == round(0.299 * x[0, 0, 0, 0] + 0.587 * x[0, 0, 0, 1] + 0.114 * x[0, 0, 0, 2])
    with pytest.raises(ValueError, match="unknown image transform 'blur'"):
        transform_images(x, "blur")


def test_select_rows_smaller_caps_are_prefixes():
    big, small = select_rows(1000, 300), select_rows(1000, 120)
    assert np.array_equal(big[:120], small) and len(set(big.tolist())) == 300
    assert np.array_equal(select_rows(10, None), np.arange(10))
    assert np.array_equal(select_rows(10, 50), np.arange(10))


def test_groups_are_the_issue_lists():
    assert OFFLINE_8 == ["mnist", "fashion_mnist", "kmnist", "cifar10", "gtsrb", "fer2013", "dtd10", "rendered_sst2"]
    assert len(OFFLINE_14) == 14 and len(OFFLINE_20) == 20 and len(set(OFFLINE_20)) == 20
    for t in ("oxford_pets3", "rendered_imdb", "rendered_agnews", "digits"):
        assert t in OFFLINE_14
    assert OFFLINE_20[:14] == OFFLINE_14 and OFFLINE_14[:8] == OFFLINE_8


# ---------------------------------------------------------------------- packs
def test_pack_serves_the_same_rows_as_the_mirror(tmp_path, monkeypatch):
    from madeit_core.data import pack
    from madeit_core.profiles import SMOKE

    _fake_image_task(tmp_path / "mirror", "mnist", n=40, classes=10, size=28)
    _fake_text_task(tmp_path / "mirror", "sst2")
    monkeypatch.setattr(pack, "pack_bases", lambda groups: [("image", "mnist"), ("text", "sst2")])
    prof = SMOKE.replace(name="tinypack", train_cap=20, test_pool_cap=10, render_size=16)
    monkeypatch.setitem(__import__("madeit_core.profiles", fromlist=["PROFILES"]).PROFILES, "tinypack", prof)
    out = tmp_path / "pack.npz"
    man = pack.write_pack(out, "tinypack", data=tmp_path / "mirror", groups=["smoke-4"], cache_dir=tmp_path / "c")
    assert out.is_file() and man["bytes"] == out.stat().st_size
    mirror_src = MirrorSource(tmp_path / "mirror", cache_dir=tmp_path / "c")
    pack_src = PackSource(out)
    for kind, base in (("image", "mnist"), ("text", "sst2")):
        a = mirror_src.split(kind, base, "train", 12, 16)
        b = pack_src.split(kind, base, "train", 12, 16)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    with pytest.raises(MirrorError, match="packed with cap 20, too small for cap 30"):
        pack_src.split("image", "mnist", "train", 30, 16)
    with pytest.raises(MirrorError, match="would be .* MiB, over the 0 MiB limit"):
        pack.write_pack(tmp_path / "big.npz", "tinypack", data=tmp_path / "mirror", max_mib=1e-9,
                        cache_dir=tmp_path / "c")
    assert not (tmp_path / "big.npz").exists()
    with pytest.raises(MirrorError, match="not found"):
        PackSource(tmp_path / "missing.npz")
