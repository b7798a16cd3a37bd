"""Progress bars (tqdm) for long store work: shown on a terminal, silent otherwise."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from tqdm import tqdm


def want_progress(json_output: bool) -> bool:
    """Bars only for a person watching: not under --json, not when output is piped."""
    return not json_output and sys.stdout.isatty() and sys.stderr.isatty()


@contextmanager
def progress_bar(total: int, desc: str, enabled: bool) -> Iterator[tqdm]:
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
              disable=not enabled, leave=False, file=sys.stderr) as bar:
        yield bar


def say(line: str) -> None:
    """A line for the person watching the bars, printed above them."""
    tqdm.write(line, file=sys.stderr)
