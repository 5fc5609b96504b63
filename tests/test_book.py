"""The book's own machinery: the toc, the derivations page against its tests, the diagrams'
captions against the library, and the screenshot checker's verdicts (no browser needed)."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"book_{name}", ROOT / "scripts" / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "book" / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries: list[dict]) -> None:
        for e in entries:
            if "file" in e:
                files.append(e["file"])
            walk(e.get("sections", []))
            walk(e.get("chapters", []))

    walk(toc.get("parts", []))
    return files


def test_every_prose_page_is_in_the_toc_and_exists() -> None:
    """only_build_toc_files silently drops a page missing from the toc; a toc entry without a file
    fails the build. Check both for the prose chapters."""
    files = _toc_files()
    prose = {f"book/{p.stem}" for p in (ROOT / "book").glob("*.md")}
    listed = {f for f in files if f.startswith("book/")}
    assert prose == listed, f"not in the toc: {sorted(prose - listed)}; missing files: {sorted(listed - prose)}"
    assert len(files) == len(set(files)), "a page is listed twice"


def test_toc_lists_each_notebook_once_as_executed_copy() -> None:
    notebooks = [f for f in _toc_files() if f.startswith("notebooks/")]
    assert notebooks and all(f.startswith("notebooks/_executed/") for f in notebooks)
    assert len(notebooks) == len(set(notebooks))


def test_derivations_page_and_tests_match() -> None:
    """Every test the derivations page names exists, and every test of test_derivations.py is named."""
    page = (ROOT / "book" / "derivations.md").read_text()
    named = set(re.findall(r"`(test_[a-z0-9_]+)`", page))
    tree = ast.parse((ROOT / "tests" / "test_derivations.py").read_text())
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
    assert named == defined, f"named only on the page: {named - defined}; only in the tests: {defined - named}"
    labels = set(re.findall(r":label: ((?:lem|prop)-[a-z-]+)", page))
    assert len(labels) >= 10


def test_diagram_captions_match_the_library(tmp_path: Path) -> None:
    """The method chapter describes the diagrams in words; the script stops when the library's
    decisions change, and here the decisions are checked directly too."""
    dd = _script("draw_diagrams")
    polar, _ = dd.evolution_log("polar")
    exact, snaps = dd.evolution_log("sum")
    assert [d.action for d in polar][:5] == ["first", "create", "consolidate", "create", "create"]
    assert {d.task: d.action for d in exact}["t5"] == "consolidate"
    assert ["t1", "t3", "t5", "t7"] in snaps[-1]
    from madeit_core.routing import route_path

    assert route_path(dd.ROUTING_FPA, dd.ROUTING_SETS, dd.ROUTING_ORDER) == dd.ROUTING_EXPECTED
    assert dd.main(["--out", str(tmp_path)]) == 0
    for name in ("pipeline", "expert_evolution", "routing"):
        svg = (tmp_path / f"{name}.svg").read_text()
        assert svg.lstrip().startswith("<?xml") and "<svg" in svg


def _probe(**over: object) -> dict:
    base = {"title": "t", "h1": ["t"], "math_elements": 3, "mjx_containers": 3, "untypeset": [],
            "tex_errors": [], "raw_math": [], "images": 1, "bad_images": [], "network": [], "tracebacks": 0,
            "mathjax_error": None, "height": 1000}
    base.update(over)
    return base


def test_check_book_verdicts() -> None:
    cb = _script("check_book")
    assert cb.problems_of(_probe()) == []
    cases = {"untypeset": ["\\(x\\)"], "tex_errors": ["Undefined control sequence"], "raw_math": ["$$x$$"],
             "bad_images": ["../_images/a.svg"], "network": ["https://cdn.example/x.js"], "tracebacks": 1,
             "mathjax_error": "MathJax did not load", "h1": [],
             "wide_tables": ["task (toy-6) (912 px, page 690 px)"]}
    for key, value in cases.items():
        assert len(cb.problems_of(_probe(**{key: value}))) == 1, key


def test_check_book_skips_the_redirect_stub(tmp_path: Path) -> None:
    cb = _script("check_book")
    (tmp_path / "index.html").write_text('<meta http-equiv="Refresh" content="0; url=book/intro.html" />')
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "intro.html").write_text("<html><body><h1>x</h1></body></html>")
    (tmp_path / "_static").mkdir()
    (tmp_path / "_static" / "x.html").write_text("<html></html>")
    assert [p.relative_to(tmp_path).as_posix() for p in cb.pages_of(tmp_path)] == ["book/intro.html"]


def test_generated_zoo_include_is_current() -> None:
    gen = _script("book_generated")
    committed = (ROOT / "book" / "_generated" / "zoo.md").read_text(encoding="utf-8")
    assert committed == gen.zoo_include(), "run python scripts/book_generated.py"
    assert "{include} _generated/zoo.md" in (ROOT / "book" / "benchmark.md").read_text(encoding="utf-8")


def test_zoo_tables_flag_gains_inside_the_noise() -> None:
    from madeit_core.zoo_tables import gain_noise, zoo_table

    def row(task: str, probe: float, ft: float) -> dict:
        return {"task": task, "classes": 2, "n_probe_rows": 3, "n_finetune_rows": 7, "n_test": 250,
                "probe": probe, "finetuned": ft, "wall_s": 1.0}

    rep = {"tasks": [row("clear", 0.60, 0.80), row("noise", 0.51, 0.49)],
           "average": {"probe": 0.555, "finetuned": 0.645, "gain": 0.09}, "wall_s_total": 2.0}
    table = zoo_table(rep)
    lines = {ln.split("|")[1].strip(): ln for ln in table.splitlines()[2:]}
    assert "(in noise)" not in lines["clear"] and "+20.0" in lines["clear"]
    assert "-2.0 (in noise)" in lines["noise"]
    assert "**+9.00**" in lines["**average**"]
    assert abs(gain_noise(0.5, 0.5, 250) - 1.96 * (0.5 / 250) ** 0.5) < 1e-12


def test_learnability_table_shows_each_variant_with_its_gain() -> None:
    from madeit_core.zoo_tables import learnability_table

    def row(name: str, probe: float, ft: float, steps: int) -> dict:
        return {"task": "rendered_sst2", "variant": {"name": name}, "rows": {"probe": 450, "finetune": 1050},
                "steps": steps, "lr": 3e-4, "chars_shown_mean": 51.2, "probe": probe, "finetuned": ft,
                "gain": ft - probe, "noise95": 0.047, "train_accuracy_last_fifth": 0.6, "seconds": 100.0}

    table = learnability_table({"rows": [row("zoo recipe", 0.523, 0.49, 300), row("more", 0.5, 0.61, 1200)]})
    lines = {ln.split("|")[1].strip(): ln.split("|") for ln in table.splitlines()[2:]}
    assert [c.strip() for c in lines["rendered_sst2: zoo recipe"][5:9]] == ["51", "52.3", "49.0", "-3.3 (±4.7)"]
    more = lines["rendered_sst2: more"]
    assert more[8].strip() == "+11.0 (±4.7)" and more[3].strip() == "1200"
