"""Loads run with Python's cyclic garbage collector paused.

A load creates hundreds of thousands of objects (module trees, a tokenizer's
vocabulary), and every few hundred allocations CPython may run a collection; the
oldest generation's walks the whole heap, which in a process holding torch,
diffusers, transformers and a pipeline is over a million objects. Measured on the
2-core development VM (the SDXL-shape pair of `benchmarks/switch_overhead.py`, a
cold load of A, alternating runs, median of 6): 1.74 s with the collector running,
0.72 s with it paused. Most of what a load makes is kept (it is the pipeline);
the few reference cycles it drops wait for the first collection after it returns,
and reference counting still frees everything that is not in a cycle.
"""

from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def gc_paused():
    """Pause automatic garbage collection inside the block (nested uses are fine).

    >>> with gc_paused():  # doctest: +SKIP
    ...     pipe = build_everything()
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
