"""The rendered-text learnability probe (madeit_core.text_learnability) on a tiny fake mirror:
the zoo's procedure under a variant, the variants really change the rows, results resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import madeit_core.text_learnability as tl
from madeit_core.data.mirror import Mirror
from madeit_core.errors import MergeInputError


def _mirror(root: Path, n: int = 96) -> Path:
    folder = root / "sst2"
    folder.mkdir(parents=True)
    words = {0: "awful dull", 1: "great superb"}
    lines = [f"{i % 2}\t{words[i % 2]} film number {i}" for i in range(n)]
    for split in ("train", "test"):
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    meta = {"task": "sst2", "kind": "text", "classes": ["negative", "positive"],
            "splits": {"train": {"n": n}, "test": {"n": n}}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return root


def test_variants_change_the_rows_they_claim(tmp_path: Path) -> None:
    m = Mirror(_mirror(tmp_path))
    base, y, texts = tl._rows(m, "sst2", "train", 16, 32, tl.FONT_FRAC, None, False)
    inv, y2, _ = tl._rows(m, "sst2", "train", 16, 32, tl.FONT_FRAC, None, True)
    big, _, _ = tl._rows(m, "sst2", "train", 16, 32, 0.3, None, False)
    assert np.array_equal(inv, 255 - base) and np.array_equal(y, y2) and len(texts) == 16
    assert base.mean() > 128 > inv.mean()                       # black on white, white on black
    assert not np.array_equal(big, base)


def test_learnability_runs_the_zoo_procedure_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _mirror(tmp_path / "mirror")
    monkeypatch.setenv("MADEIT_CACHE", str(tmp_path / "cache"))
    variants = (tl.Variant("zoo recipe", steps=4), tl.Variant("white on black", steps=4, invert=True),
                tl.Variant("head trained", steps=4, lr=1e-3, train_head=True))
    out = tmp_path / "learn.json"
    doc = tl.run_learnability(["rendered_sst2"], variants, "smoke", out, root, show_progress=False)
    assert [r["variant"]["name"] for r in doc["rows"]] == ["zoo recipe", "white on black", "head trained"]
    assert [r["lr"] for r in doc["rows"]] == [1e-4, 1e-4, 1e-3]               # smoke's lr unless the variant sets one
    for r in doc["rows"]:
        assert 0.0 <= r["probe"] <= 1.0 and 0.0 <= r["finetuned"] <= 1.0
        assert r["gain"] == pytest.approx(r["finetuned"] - r["probe"])
        assert r["steps"] == 4 and r["rows"]["test"] == 96 and r["chance"] == 0.5
    assert json.loads(out.read_text())["rows"] == doc["rows"]

    def boom(*_a, **_k):  # a resumed run must not fine-tune again
        raise AssertionError("re-ran a measured variant")

    real = tl.run_variant
    monkeypatch.setattr(tl, "run_variant", boom)
    again = tl.run_learnability(["rendered_sst2"], variants, "smoke", out, root, show_progress=False)
    assert again["rows"] == doc["rows"]
    with pytest.raises(MergeInputError, match="not a rendered-text task"):
        real("mnist", variants[0], "smoke", root)
