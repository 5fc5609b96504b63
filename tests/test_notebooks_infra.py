"""The notebook runner's stale guard: hashes, fingerprints, and when an executed copy is current.

Most tests build fake executed notebooks with nbformat (no kernel); one executes two tiny
notebooks with papermill to check what the runner writes on success and on failure.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

from madeit_core import nbrun
from madeit_core.codehash import files_hash, json_hash, library_files, library_hash
from madeit_core.errors import MergeInputError
from madeit_core.nbparams import COMMON_KEYS, NOTEBOOK_EXTRAS, NOTEBOOKS, PARAMETER_SETS, notebook_parameters

REPO = Path(__file__).resolve().parent.parent

TINY_MD = """---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---

# tiny

```{code-cell} ipython3
:tags: [parameters]

x = 1
```

```{code-cell} ipython3
y = 10 * x
print("y =", y)
```
"""


# ----------------------------------------------------------------------------- hashes
def _package(tmp_path: Path) -> Path:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("A = 1\n")
    (pkg / "sub" / "b.py").write_text("B = 2\n")
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "a.cpython-311.py").write_text("junk\n")
    (pkg / "notes.txt").write_text("not code\n")
    return pkg


def test_library_hash_covers_every_python_file_and_nothing_else(tmp_path: Path) -> None:
    pkg = _package(tmp_path)
    assert [p.relative_to(pkg).as_posix() for p in library_files(pkg)] == ["a.py", "sub/b.py"]
    h0 = library_hash(pkg)
    assert library_hash(pkg) == h0                       # deterministic
    (pkg / "notes.txt").write_text("changed\n")
    (pkg / "__pycache__" / "a.cpython-311.py").write_text("other junk\n")
    assert library_hash(pkg) == h0                       # non-sources and caches do not count
    (pkg / "sub" / "b.py").write_text("B = 3\n")
    h1 = library_hash(pkg)
    assert h1 != h0                                      # a deep file's edit counts
    (pkg / "sub" / "c.py").write_text("")
    assert library_hash(pkg) != h1                       # so does a new (even empty) file
    (pkg / "sub" / "c.py").unlink()
    (pkg / "sub" / "b.py").rename(pkg / "sub" / "b2.py")
    assert library_hash(pkg) != h1                       # and a rename


def test_library_hash_of_the_real_package_matches_its_files() -> None:
    files = library_files()
    assert any(f.name == "nbrun.py" for f in files) and all(f.suffix == ".py" for f in files)
    assert library_hash() == files_hash(files, REPO / "madeit_core")


def test_json_hash_is_canonical() -> None:
    assert json_hash({"a": 1, "b": [1, 2]}) == json_hash({"b": [1, 2], "a": 1})
    assert json_hash({"a": (1, 2)}) == json_hash({"a": [1, 2]})
    assert json_hash({"a": 1}) != json_hash({"a": 1.5})


# ----------------------------------------------------------------------------- fingerprints
def _params() -> dict:
    return notebook_parameters("table1_acc_bwt", "smoke", "toy")


def test_fingerprint_changes_with_each_input(tmp_path: Path) -> None:
    params = _params()
    params["reference_dir"] = "ref"
    base = nbrun.fingerprint("table1_acc_bwt", "source", params, tmp_path, lib_hash="L")
    assert base["inputs"] == "none"
    assert nbrun.fingerprint("table1_acc_bwt", "source", params, tmp_path, lib_hash="L") == base
    assert nbrun.fingerprint("table1_acc_bwt", "source", params, tmp_path, lib_hash="M")["library"] != base["library"]
    assert nbrun.fingerprint("table1_acc_bwt", "source!", params, tmp_path, lib_hash="L")["source"] != base["source"]
    changed = {**params, "seeds": [42]}
    assert nbrun.fingerprint("table1_acc_bwt", "source", changed, tmp_path, lib_hash="L")["parameters"] != \
        base["parameters"]
    # committed reference results are an input: adding or editing one changes the fingerprint
    f = tmp_path / "ref" / "offline" / "offline-8" / "made_it" / "seed42.json"
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps({"ACC": 1.0}))
    with_ref = nbrun.fingerprint("table1_acc_bwt", "source", params, tmp_path, lib_hash="L")
    assert with_ref["inputs"] != base["inputs"]
    f.write_text(json.dumps({"ACC": 2.0}))
    assert nbrun.fingerprint("table1_acc_bwt", "source", params, tmp_path, lib_hash="L")["inputs"] != \
        with_ref["inputs"]


def test_performance_notebook_reads_the_perf_files_not_the_reference(tmp_path: Path) -> None:
    params = notebook_parameters("performance", "smoke", "toy")
    params["reference_dir"] = "ref"
    (tmp_path / "ref" / "offline").mkdir(parents=True)
    (tmp_path / "ref" / "offline" / "x.json").write_text("{}")
    assert nbrun.input_files("performance", params, tmp_path) == []
    perf = tmp_path / "results" / "perf"
    perf.mkdir(parents=True)
    (perf / "cpu.json").write_text("{}")
    assert [p.name for p in nbrun.input_files("performance", params, tmp_path)] == ["cpu.json"]
    assert [p.name for p in nbrun.input_files("table1_acc_bwt", params, tmp_path)] == ["x.json"]


# ----------------------------------------------------------------------------- staleness
def _executed(path: Path, fp: dict | None, status: str = "ok", fmt: str = nbrun.FORMAT) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("1"))
    if fp is not None:
        nb.metadata[nbrun.META_KEY] = {"format": fmt, "status": status, "fingerprint": fp}
    nbformat.write(nb, path)


FP = {"library": "l", "source": "s", "parameters": "p", "inputs": "i"}


def test_staleness_current_and_each_reason(tmp_path: Path) -> None:
    path = tmp_path / "nb.ipynb"
    assert nbrun.staleness(path, FP) == "not executed yet"
    _executed(path, FP)
    assert nbrun.staleness(path, FP) is None
    for key in nbrun.FINGERPRINT_KEYS:
        assert nbrun.staleness(path, {**FP, key: "other"}) == f"changed: {key}"
    assert nbrun.staleness(path, {**FP, "library": "x", "inputs": "y"}) == "changed: library, inputs"
    _executed(path, FP, status="failed")
    assert nbrun.staleness(path, FP) == "previous execution failed"
    _executed(path, None)
    assert nbrun.staleness(path, FP) == "executed copy has no fingerprint"
    _executed(path, FP, fmt="madeit-nb/0")
    assert nbrun.staleness(path, FP) == "executed copy has no fingerprint"
    path.write_text("{ truncated")
    assert nbrun.staleness(path, FP).startswith("executed copy unreadable")


def test_a_library_edit_makes_every_executed_notebook_stale(tmp_path: Path) -> None:
    pkg = _package(tmp_path)
    params = _params()
    fp = nbrun.fingerprint("table1_acc_bwt", "src", params, tmp_path, lib_hash=library_hash(pkg))
    path = tmp_path / "table1_acc_bwt.ipynb"
    _executed(path, fp)
    assert nbrun.staleness(path, nbrun.fingerprint("table1_acc_bwt", "src", params, tmp_path,
                                                   lib_hash=library_hash(pkg))) is None
    (pkg / "a.py").write_text("A = 2  # a change the notebook never imports still counts\n")
    fp2 = nbrun.fingerprint("table1_acc_bwt", "src", params, tmp_path, lib_hash=library_hash(pkg))
    assert nbrun.staleness(path, fp2) == "changed: library"


# ----------------------------------------------------------------------------- sources and parameters
def test_read_source_requires_exactly_one_parameters_cell(tmp_path: Path) -> None:
    good = tmp_path / "good.md"
    good.write_text(TINY_MD)
    text, nb = nbrun.read_source(good)
    assert text == TINY_MD and len(nb.cells) >= 2
    none = tmp_path / "none.md"
    none.write_text(TINY_MD.replace(":tags: [parameters]\n", ""))
    with pytest.raises(MergeInputError, match="found 0"):
        nbrun.read_source(none)
    two = tmp_path / "two.md"
    two.write_text(TINY_MD.replace("```{code-cell} ipython3\ny", "```{code-cell} ipython3\n:tags: [parameters]\n\ny"))
    with pytest.raises(MergeInputError, match="found 2"):
        nbrun.read_source(two)


def test_check_parameters_names_the_missing_one(tmp_path: Path) -> None:
    f = tmp_path / "t.md"
    f.write_text(TINY_MD)
    _, nb = nbrun.read_source(f)
    nbrun.check_parameters(nb, {"x": 2}, "t.md")
    with pytest.raises(MergeInputError, match="'z'"):
        nbrun.check_parameters(nb, {"x": 2, "z": 3}, "t.md")


def test_every_notebook_exists_and_defines_every_parameter_of_every_profile() -> None:
    on_disk = sorted(p.stem for p in (REPO / "notebooks").glob("*.md") if p.name != "README.md")
    assert on_disk == sorted(NOTEBOOKS)
    for name in NOTEBOOKS:
        _, nb = nbrun.read_source(REPO / "notebooks" / f"{name}.md")
        for profile, bench in PARAMETER_SETS:
            params = notebook_parameters(name, profile, bench)
            assert set(params) == set(COMMON_KEYS) | set(NOTEBOOK_EXTRAS.get(name, ()))
            nbrun.check_parameters(nb, params, name)
        assert not any(c.get("outputs") for c in nb.cells), f"{name}: outputs in the source"


def test_select_checks_names() -> None:
    assert nbrun.select(NOTEBOOKS, None) == list(NOTEBOOKS)
    assert nbrun.select(NOTEBOOKS, ["ablations", "table1_acc_bwt"]) == ["table1_acc_bwt", "ablations"]
    with pytest.raises(MergeInputError, match="nope"):
        nbrun.select(NOTEBOOKS, ["nope"])


def test_every_glue_key_used_in_prose_is_glued() -> None:
    for name in NOTEBOOKS:
        text = (REPO / "notebooks" / f"{name}.md").read_text()
        used = set(re.findall(r"\{glue:text\}`([A-Za-z0-9_]+)", text))
        glued = set(re.findall(r"glue\(\"([A-Za-z0-9_]+)\"", text))
        assert used <= glued, f"{name}: {sorted(used - glued)} used but never glued"


def test_claims_are_glued_under_the_keys_the_claims_page_reads() -> None:
    claims_page = (REPO / "book" / "claims.md").read_text()
    wanted = re.findall(r"```\{glue\} (\w+)\n:doc: \.\./notebooks/_executed/(\w+)\.ipynb", claims_page)
    assert wanted
    for key, name in wanted:
        assert f'glue("{key}", HTML(' in (REPO / "notebooks" / f"{name}.md").read_text(), (key, name)


# ----------------------------------------------------------------------------- one real execution
def test_execute_records_the_fingerprint_and_a_failure_removes_the_old_copy(tmp_path: Path) -> None:
    src = tmp_path / "tiny.md"
    src.write_text(TINY_MD)
    out = tmp_path / "_executed"
    info = nbrun.execute("tiny", src, {"x": 4}, out, REPO, FP)
    assert info["status"] == "ok", info["error"]
    nb = nbformat.read(out / "tiny.ipynb", as_version=4)
    assert nbrun.recorded(nb)["fingerprint"] == FP
    assert "y = 40" in "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert nbrun.staleness(out / "tiny.ipynb", FP) is None
    tags = [c.metadata.get("tags", []) for c in nb.cells if c.cell_type == "code"]
    assert ["parameters", "remove-cell"] in tags and ["injected-parameters"] in tags   # only the values used show
    assert not list(out.glob(".*"))                                  # no temporary files left
    src.write_text(TINY_MD.replace("y = 10 * x", "y = 10 / (x - x)"))
    info = nbrun.execute("tiny", src, {"x": 4}, out, REPO, {**FP, "source": "s2"})
    assert info["status"] == "failed" and "ZeroDivisionError" in info["error"]
    assert not (out / "tiny.ipynb").exists()                         # never a stale copy
    failed = nbformat.read(out / "tiny.failed.ipynb", as_version=4)
    assert nbrun.recorded(failed)["status"] == "failed"
