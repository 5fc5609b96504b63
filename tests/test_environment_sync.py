"""requirements.txt and environment.yml's pip section pin the same versions; .ci/run calls `make test`."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _reqs() -> dict[str, str]:
    out = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, ver = line.partition("==")
            assert ver, f"requirements.txt: {line!r} is not pinned with =="
            out[name.lower().replace("_", "-")] = ver
    return out


def test_environment_yml_matches_requirements() -> None:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    pinned = {}
    for item in pip:
        if item.startswith("-e"):
            continue
        name, _, ver = item.partition("==")
        pinned[name.lower().replace("_", "-")] = ver
    assert pinned == _reqs()
    assert "python=3.11" in env["dependencies"]


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    cmd = re.findall(r"^\s*(make test)\s*$", ci, re.M)
    assert cmd, ".ci/run must call `make test`"
    assert "make test" in readme
