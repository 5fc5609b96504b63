#!/usr/bin/env bash
# Create (or update) the project's virtual environment and print its path.
# The environment lives outside the checkout (MADEIT_VENV, default ~/.cache/madeit/venv) so that
# clean clones on the same machine reuse it; a stamp of requirements.txt decides whether pip runs.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${MADEIT_VENV:-$HOME/.cache/madeit/venv}
py=${PYTHON:-python3.11}
if ! command -v "$py" >/dev/null 2>&1; then py=python3; fi
if [ ! -x "$venv/bin/python" ]; then
  echo "[env] creating $venv with $($py --version)" >&2
  mkdir -p "$(dirname "$venv")"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
fi
stamp="$venv/.madeit-requirements.sha256"
want=$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[env] installing requirements.txt into $venv (first time: several minutes)" >&2
  "$venv/bin/python" -m pip install -q -r "$here/requirements.txt" >&2
  echo "$want" > "$stamp"
fi
echo "$venv"
