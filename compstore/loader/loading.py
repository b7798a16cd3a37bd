"""What every load runs under: one load at a time, Python's collector paused.

One at a time. While a model is built, accelerate's `init_empty_weights` patches
`nn.Module.register_parameter` for the whole process, and compstore's
`_no_init_on_meta` and `torch_default_dtype` patch `torch.nn.init` and the default
dtype: a constructor or a `load_state_dict` running in another thread meanwhile
puts real weights on meta, or undoes the patches (a test loading from three
threads saw "weights left on the meta device" within a few loads). diffusers'
lazy module also resolved `diffusers.StableDiffusionPipeline` to an
AttributeError for threads importing it at once. So loads in one process take
turns (`exclusive_load`, around the building and assembling, not around the
ingest or download that may come first); the Python work of a load cannot run in
parallel under the GIL anyway, and uploads started by one load run on while the
next waits.

The collector paused. A load creates hundreds of thousands of objects (module
trees, a tokenizer's vocabulary), and every few hundred allocations CPython may
run a collection; the oldest generation's walks the whole heap, which in a
process holding torch, diffusers, transformers and a pipeline is over a million
objects. Measured on the 2-core development VM (the SDXL-shape pair of
`benchmarks/switch_overhead.py`, a cold load of A, alternating runs, median of
6): 1.74 s with the collector running, 0.72 s with it paused. Most of what a load
makes is kept (it is the pipeline); the few reference cycles it drops wait for
the first collection after it returns, and reference counting still frees
everything that is not in a cycle.
"""

from __future__ import annotations

import contextlib
import gc
import threading

_LOADS = threading.RLock()  # re-entrant: a load may load parts through another entry point


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


@contextlib.contextmanager
def exclusive_load():
    """A load: wait for any other thread's load to finish, then run with the
    collector paused. Also usable as a decorator.

    >>> @exclusive_load()  # doctest: +SKIP
    ... def from_pretrained(...): ...
    """
    with _LOADS, gc_paused():
        yield
