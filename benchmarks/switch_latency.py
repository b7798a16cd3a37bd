"""Switch latency A -> B: plain diffusers vs compstore vs the hardware floor, one run.

    python benchmarks/switch_latency.py --size tiny                 # CPU, about a minute
    python benchmarks/switch_latency.py --size full --device cuda   # published shapes, GPU

The same as `compstore bench switch`; the logic is compstore/loader/switch_bench.py.
Writes report.json, report.md and switch.png into --out.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compstore.cli.main import cli  # noqa: E402

if __name__ == "__main__":
    cli(["bench", "switch", *sys.argv[1:]], prog_name="switch_latency.py")
