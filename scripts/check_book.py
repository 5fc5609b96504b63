"""Open every page of the built book in headless Chromium, screenshot it and check what a reader sees.

Usage: python scripts/check_book.py [_build/html] [--out _build/screenshots] [--browser PATH]

Per page, the rendered DOM (after MathJax has finished) is probed for:
- math: every Sphinx math element (``span.math``/``div.math``) holds a typeset ``mjx-container``,
  no ``mjx-merror`` (a TeX error), and no raw ``\\(``, ``\\[``, ``$$`` or ``\\begin{`` left in the
  page's text outside code blocks;
- images: every ``<img>`` finished loading with a non-zero natural size;
- offline: no resource was requested from the network (only ``file:`` URLs);
- notebooks: no traceback output cell;
- width: no table wider than the page's content column (its last columns would hide behind a
  horizontal scroll bar, as the performance page's did); the probe lays the page out at
  ``--width``, like the screenshot.
A screenshot of each page goes to ``--out``. The probe works on a temporary copy of the page
placed beside it (so relative links resolve) and removed afterwards. Exit status 1 when any page
fails, 2 when no Chromium can be found (install Debian's ``chromium`` package).
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
PROBE_ID = "__book_check_probe__"
MAX_HEIGHT = 16000  # px: the tallest full-page screenshot
PROBE_JS = r"""
<script>
(function () {
  function rawMath() {
    var skip = {SCRIPT: 1, STYLE: 1, PRE: 1, CODE: 1, TEXTAREA: 1, "MJX-CONTAINER": 1, "MJX-ASSISTIVE-MML": 1};
    var hits = [];
    var walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT, {
      acceptNode: function (n) {
        for (var p = n.parentNode; p && p !== document.body; p = p.parentNode) {
          if (skip[p.nodeName] || (p.id === "__PROBE__")) return NodeFilter.FILTER_REJECT;
        }
        return NodeFilter.FILTER_ACCEPT;
      }
    });
    var re = /(\$\$|\\\(|\\\)|\\\[|\\\]|\\begin\{)/;
    while (walker.nextNode()) {
      var t = walker.currentNode.nodeValue;
      if (re.test(t)) hits.push(t.trim().slice(0, 120));
    }
    return hits;
  }
  function wideTables() {
    var article = document.querySelector("article.bd-article") || document.querySelector("main") || document.body;
    var right = article.getBoundingClientRect().right;
    function scroller(t) {
      for (var p = t.parentElement; p && p !== article; p = p.parentElement) {
        var o = getComputedStyle(p).overflowX;
        if (o === "auto" || o === "scroll" || o === "hidden") return p;
      }
      return null;
    }
    var out = [];
    Array.prototype.slice.call(article.querySelectorAll("table")).forEach(function (t) {
      var r = t.getBoundingClientRect(), box = scroller(t);
      if (r.width === 0) return;
      // the visible right edge: the scroll box's (a table may sit in one), else the article's
      var edge = box ? box.getBoundingClientRect().left + box.clientLeft + box.clientWidth : right;
      if (r.right <= edge + 8) return;  // a border's overhang hides no column
      var first = t.querySelector("th, td");
      out.push((first ? first.textContent.trim().slice(0, 60) : "") + ": " + Math.round(r.right - edge) +
               " of " + Math.round(r.width) + " px out of sight");
    });
    return out;
  }
  function report(mathjaxError) {
    var math = Array.prototype.slice.call(document.querySelectorAll("span.math, div.math"));
    var untypeset = math.filter(function (m) { return !m.querySelector("mjx-container"); })
                        .map(function (m) { return m.textContent.slice(0, 120); });
    var images = Array.prototype.slice.call(document.images);
    var badImages = images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                          .map(function (i) { return i.getAttribute("src"); });
    var network = performance.getEntriesByType("resource").map(function (e) { return e.name; })
                             .filter(function (u) { return !/^(file|data|blob|about):/.test(u); });
    var out = {
      title: document.title,
      h1: Array.prototype.slice.call(document.querySelectorAll("h1"))
                 .map(function (h) { return h.textContent.trim(); }),
      math_elements: math.length,
      mjx_containers: document.querySelectorAll("mjx-container").length,
      untypeset: untypeset,
      tex_errors: Array.prototype.slice.call(document.querySelectorAll("mjx-merror"))
                         .map(function (e) { return e.textContent.slice(0, 120); }),
      raw_math: rawMath(),
      images: images.length,
      bad_images: badImages,
      network: network,
      tracebacks: document.querySelectorAll(".output.traceback, .cell_output .traceback").length,
      wide_tables: wideTables(),
      mathjax_error: mathjaxError || null,
      height: Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)
    };
    var pre = document.createElement("pre");
    pre.id = "__PROBE__";
    pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  }
  window.addEventListener("load", function () {
    if (window.MathJax && window.MathJax.startup && window.MathJax.startup.promise) {
      window.MathJax.startup.promise.then(function () { report(null); },
                                          function (e) { report(String(e)); });
    } else if (document.querySelector("span.math, div.math")) {
      report("MathJax did not load");
    } else {
      report(null);
    }
  });
})();
</script>
""".replace("__PROBE__", PROBE_ID)


@dataclass
class PageResult:
    page: str
    screenshot: str | None = None
    problems: list[str] = field(default_factory=list)
    probe: dict | None = None


def find_browser(explicit: str | None) -> str | None:
    if explicit:
        return explicit if shutil.which(explicit) or Path(explicit).exists() else None
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def _chromium(browser: str, args: list[str], profile: str, timeout: float) -> subprocess.CompletedProcess[str]:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
           "--virtual-time-budget=20000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def probe_page(browser: str, page: Path, timeout: float, width: int = 1280, height: int = 900) -> dict:
    """The probe's JSON for ``page``, from a temporary copy with the probe script injected."""
    text = page.read_text(encoding="utf-8")
    if "</body>" not in text:
        raise RuntimeError("no </body> in the page")
    probe_copy = page.with_name(f".{page.stem}.check-probe.html")
    probe_copy.write_text(text.replace("</body>", PROBE_JS + "</body>", 1), encoding="utf-8")
    try:
        with tempfile.TemporaryDirectory(prefix="check-book-") as profile:
            res = _chromium(browser, [f"--window-size={width},{height}", "--dump-dom", probe_copy.as_uri()],
                            profile, timeout)
    finally:
        probe_copy.unlink(missing_ok=True)
    m = re.search(rf'<pre id="{PROBE_ID}"[^>]*>(.*?)</pre>', res.stdout, re.S)
    if not m:
        raise RuntimeError(f"the probe did not report (chromium exit {res.returncode}: {res.stderr.strip()[-300:]})")
    return json.loads(html.unescape(m.group(1)))


def screenshot(browser: str, page: Path, dest: Path, width: int, height: int, timeout: float) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="check-book-") as profile:
        res = _chromium(browser, [f"--window-size={width},{height}", f"--screenshot={dest}", page.as_uri()],
                        profile, timeout)
    if not dest.exists() or dest.stat().st_size == 0:
        raise RuntimeError(f"no screenshot written (chromium exit {res.returncode})")


def problems_of(probe: dict) -> list[str]:
    out = []
    if probe.get("mathjax_error"):
        out.append(f"MathJax: {probe['mathjax_error']}")
    if probe["untypeset"]:
        out.append(f"{len(probe['untypeset'])} math element(s) not typeset, e.g. {probe['untypeset'][0]!r}")
    if probe["tex_errors"]:
        out.append(f"TeX error(s): {probe['tex_errors'][:3]}")
    if probe["raw_math"]:
        out.append(f"raw TeX delimiters in the text: {probe['raw_math'][:3]}")
    if probe["bad_images"]:
        out.append(f"image(s) not loaded: {probe['bad_images'][:5]}")
    if probe["network"]:
        out.append(f"network request(s): {probe['network'][:5]}")
    if probe["tracebacks"]:
        out.append(f"{probe['tracebacks']} traceback output(s)")
    if probe.get("wide_tables"):
        out.append(f"{len(probe['wide_tables'])} table(s) wider than the page, e.g. {probe['wide_tables'][:3]}")
    if not probe["h1"]:
        out.append("no <h1> title")
    return out


def check_page(browser: str, root: Path, page: Path, out: Path, width: int, height: int,
               timeout: float, full_page: bool = True) -> PageResult:
    rel = page.relative_to(root).as_posix()
    result = PageResult(rel)
    try:
        result.probe = probe_page(browser, page, timeout, width, height)
        result.problems = problems_of(result.probe)
    except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        result.problems.append(f"probe failed: {exc}")
    shot = out / (rel[: -len(".html")].replace("/", "__") + ".png")
    if full_page and result.probe and result.probe.get("height"):
        height = int(min(max(height, result.probe["height"]), MAX_HEIGHT))
    try:
        screenshot(browser, page, shot, width, height, timeout)
        result.screenshot = str(shot)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        result.problems.append(f"screenshot failed: {exc}")
    return result


def pages_of(root: Path) -> list[Path]:
    skip_dirs = {"_static", "_sources", "_images", "_sphinx_design_static"}
    pages = []
    for p in sorted(root.rglob("*.html")):
        rel = p.relative_to(root)
        if rel.parts[0] in skip_dirs or p.name.startswith("."):
            continue
        if 'http-equiv="refresh"' in p.read_text(encoding="utf-8", errors="replace")[:2000].lower():
            continue  # the redirect stub index.html
        pages.append(p)
    return pages


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html", nargs="?", default="_build/html", help="the built HTML folder")
    ap.add_argument("--out", default="_build/screenshots", help="where screenshots and report.json go")
    ap.add_argument("--browser", help=f"Chromium executable (default: the first of {', '.join(BROWSERS)} on PATH)")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=900, help="minimum screenshot height (px)")
    ap.add_argument("--viewport-only", action="store_true",
                    help="screenshot the first --height pixels instead of the whole page")
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds per browser call")
    ap.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    args = ap.parse_args(argv)

    root = Path(args.html).resolve()
    if not (root / "index.html").exists():
        print(f"check_book: {root} holds no built book (run `make book` first)", file=sys.stderr)
        return 1
    browser = find_browser(args.browser)
    if browser is None:
        print("check_book: no Chromium found; install Debian's `chromium` package or pass --browser",
              file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    pages = pages_of(root)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda p: check_page(browser, root, p, out, args.width, args.height,
                                                      args.timeout, not args.viewport_only), pages))
    report = out / "report.json"
    tmp = report.with_suffix(".json.tmp")
    tmp.write_text(json.dumps([asdict(r) for r in results], indent=1), encoding="utf-8")
    tmp.replace(report)
    bad = [r for r in results if r.problems]
    n_math = sum((r.probe or {}).get("mjx_containers", 0) for r in results)
    n_img = sum((r.probe or {}).get("images", 0) for r in results)
    for r in results:
        status = "FAIL" if r.problems else "ok"
        print(f"{status:4} {r.page}" + "".join(f"\n       - {p}" for p in r.problems))
    print(f"check_book: {len(results)} pages, {n_math} typeset formulas, {n_img} images, "
          f"{len(bad)} page(s) with problems; screenshots and report.json in {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
