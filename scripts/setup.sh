#!/usr/bin/env bash
# Set-up shared by the two README commands: a .venv with CPU-only torch and
# compstore installed editable, at the versions in constraints.txt. Idempotent:
# re-runs only when pyproject.toml or constraints.txt change.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
want="$(cat pyproject.toml constraints.txt | sha256sum)"
stamp=.venv/.compstore-setup
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    # Pinned CPU build first: an unpinned torch would pull a multi-GB CUDA build.
    .venv/bin/python -m pip install -q torch==2.13.0
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
    echo "$want" > "$stamp"
fi
