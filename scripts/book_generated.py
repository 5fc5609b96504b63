"""Write the book's generated includes from committed results (``--check``: fail if stale).

    python scripts/book_generated.py           # book/_generated/zoo.md from results/zoo/*.json
    python scripts/book_generated.py --check   # exit 1 when the committed include is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from madeit_core.io import atomic_write, read_json  # noqa: E402
from madeit_core.zoo_tables import zoo_chapter_markdown  # noqa: E402

TARGET = ROOT / "book" / "_generated" / "zoo.md"


def zoo_include(results: Path = ROOT / "results" / "zoo") -> str:
    extra = ("reading_ceiling", "text_learnability")
    reports = {f.stem: read_json(f) for f in sorted(results.glob("*.json")) if not f.stem.startswith(extra)}
    ceiling_files = sorted(results.glob("reading_ceiling-*.json"))
    ceilings = read_json(ceiling_files[0]) if ceiling_files else None
    learn_files = sorted(results.glob("text_learnability-*.json"))
    learnability = read_json(learn_files[0]) if learn_files else None
    return zoo_chapter_markdown(reports, ceilings, learnability)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare with the committed include")
    a = ap.parse_args(argv)
    text = zoo_include()
    if a.check:
        current = TARGET.read_text(encoding="utf-8") if TARGET.is_file() else ""
        if current != text:
            print(f"{TARGET.relative_to(ROOT)} is stale: run python scripts/book_generated.py", file=sys.stderr)
            return 1
        print(f"{TARGET.relative_to(ROOT)} is current")
        return 0
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(TARGET, "w") as fh:
        fh.write(text)
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
