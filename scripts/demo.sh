#!/usr/bin/env bash
# The main job on an embedded default: build a tiny family of pipelines, ingest
# it, show dedup, export, verify, load and switch pipelines, print the report.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/compstore demo "$@"
