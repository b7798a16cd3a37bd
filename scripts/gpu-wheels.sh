#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (it has torch, transformers, huggingface_hub,
# safetensors, accelerate, numpy, matplotlib, click, tqdm, tabulate, fsspec, xxhash;
# Python 3.12, no network), torchao, bitsandbytes and gguf for test_cuda.py's quantized loads
# included (51 MB in all; a carry holds 64 MiB). Downloads them into .whl/ (ignored by
# git); carry .whl to the device and run the command in docs/gpu-residency.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl diffusers==0.42.1 sqlite-utils==4.2.1 sqlite-fts4==1.0.3 click-default-group==1.2.4 \
    importlib_metadata==10.2.0 lazy-importer==0.1.0 torchao==0.18.0 bitsandbytes==0.50.2 gguf==0.19.0
ls .whl
