"""The notebook runner's stale-results guard, and the notebooks' contract with the book."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from madeit_core.book import library_hash, paper_value, table1_rows

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "scripts" / "run_notebooks.py")
assert _spec is not None and _spec.loader is not None
run_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_notebooks)


def test_library_hash_follows_every_library_file(tmp_path):
    pkg = tmp_path / "madeit_core" / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / "madeit_core" / "a.py").write_text("x = 1\n")
    (pkg / "b.py").write_text("y = 2\n")
    h0 = library_hash(tmp_path)
    assert library_hash(tmp_path) == h0
    (pkg / "b.py").write_text("y = 3\n")
    h1 = library_hash(tmp_path)
    assert h1 != h0
    (pkg / "c.py").write_text("")
    assert library_hash(tmp_path) != h1
    (tmp_path / "madeit_core" / "notes.txt").write_text("not code")
    assert library_hash(tmp_path) == library_hash(tmp_path)


def _executed(path: Path, fp: dict, status: str = "ok") -> None:
    path.write_text(json.dumps({"cells": [], "metadata": {run_notebooks.META_KEY: {"fingerprint": fp,
                                                                                     "status": status}}}))


def test_fresh_only_with_the_same_fingerprint(tmp_path):
    fp = run_notebooks.fingerprint("table1_acc_bwt", {"profile": "smoke"})
    assert set(fp) == {"library", "notebook", "parameters"}
    assert run_notebooks.fingerprint("table1_acc_bwt", {"profile": "offline"})["parameters"] != fp["parameters"]
    assert run_notebooks.fingerprint("fig2_allocation", {"profile": "smoke"})["notebook"] != fp["notebook"]
    f = tmp_path / "nb.ipynb"
    assert not run_notebooks.is_fresh(f, fp)                      # missing
    _executed(f, fp)
    assert run_notebooks.is_fresh(f, fp)
    assert not run_notebooks.is_fresh(f, {**fp, "library": "0" * 16})   # the library changed
    _executed(f, fp, status="failed")
    assert not run_notebooks.is_fresh(f, fp)
    f.write_text("{truncated")
    assert not run_notebooks.is_fresh(f, fp)


def test_every_notebook_exists_with_title_and_parameters_and_is_in_the_toc():
    toc = (ROOT / "book" / "_toc.yml").read_text()
    for name in run_notebooks.NOTEBOOKS:
        src = (ROOT / "notebooks" / f"{name}.md").read_text()
        assert re.search(r"^# \S", src, re.M), f"{name}: no '# Title'"
        assert ":tags: [parameters]" in src, f"{name}: no parameters cell"
        assert "profile = " in src
        assert f"notebooks/_executed/{name}" in toc, f"{name} is not in book/_toc.yml"
    listed = set(re.findall(r"notebooks/_executed/(\w+)", toc))
    assert listed == set(run_notebooks.NOTEBOOKS)


def test_claim_glue_keys_are_produced_by_the_notebooks():
    used = set(re.findall(r"```\{glue\} (claim_\w+)", (ROOT / "book" / "claims.md").read_text()))
    produced = set()
    for name in run_notebooks.NOTEBOOKS:
        produced |= set(re.findall(r'glue\("(claim_\w+)"', (ROOT / "notebooks" / f"{name}.md").read_text()))
    assert used and used <= produced


def test_table1_rows_put_the_papers_values_beside_ours():
    res = [{"method": "made_it", "label": "MADE-IT (Ours)", "group": "g", "order": ["a", "b", "c", "d", "e", "f",
                                                                                     "g", "h"],
            "ACC": a, "BWT": b, "timings": {"absorb_s": 1.0}, "needs_data": False}
           for a, b in ((80.0, -1.0), (82.0, -3.0))]
    (row,) = table1_rows(res, "test")
    assert row["ACC"] == "81.0±1.4" and row["BWT"] == "-2.0±1.4" and row["orders"] == 2
    assert row["paper ACC (ViT-B/32)"] == paper_value("MADE-IT (Ours)", 8) != "–"
    assert paper_value("Pre-Trained", 8) == "48.1" and paper_value("Pre-Trained", 8, "BWT") == "–"
    assert paper_value("nonexistent", 8) == "–"


@pytest.mark.parametrize("text,expect", [("3.5", 3.5), ('["a"]', ["a"]), ("zoo", "zoo")])
def test_parameter_values(text, expect):
    assert run_notebooks.parse_value(text) == expect
