#!/usr/bin/env bash
# Set-up shared by the two README commands: a .venv with CPU-only torch and
# compstore installed editable, at the versions in constraints.txt; `setup.sh test`
# adds the test dependencies (torchao among them, whose import diffusers makes at
# every start, with warnings about CUDA kernels a CPU torch cannot load: the demo
# on a fresh machine goes without it). Idempotent: re-runs only when
# pyproject.toml, constraints.txt or the mode change.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
target=.
[ "${1:-}" = test ] && target=".[test]"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
want="$(cat pyproject.toml constraints.txt | sha256sum) $target"
stamp=.venv/.compstore-setup
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    # Pinned CPU build first: an unpinned torch would pull a multi-GB CUDA build.
    .venv/bin/python -m pip install -q torch==2.13.0
    .venv/bin/python -m pip install -q -c constraints.txt -e "$target"
    echo "$want" > "$stamp"
fi
