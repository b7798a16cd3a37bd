"""A short run of benchmarks/torture.py: random SIGKILLs and fuzzed input (the full run
is in the README, with its figures)."""

import importlib.util
from pathlib import Path


def test_short_torture_run(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "torture.py"
    spec = importlib.util.spec_from_file_location("torture", path)
    torture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(torture)
    figures = torture.main(["--seconds", "20", "--fuzz-cases", "300", "--workdir", str(tmp_path)])
    kill, fuzz = figures["kill"], figures["fuzz"]
    assert kill["killed"] >= 5, kill
    assert kill["bytes_lost"] == 0 and kill["rerun_failures"] == 0, kill
    assert kill["extra_bytes_after_gc"] == 0 and kill["tmp_leftovers"] == 0, kill
    assert fuzz["cases"] >= 280 and fuzz["failures"] == 0, fuzz
    assert fuzz["refused"] > 0 and fuzz["ingested"] > 0, fuzz
    assert figures["ok"]
