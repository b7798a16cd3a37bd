"""What every load runs under: one load at a time, Python's collector paused,
torch's inference mode off.

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
makes is kept (it is the pipeline), and reference counting still frees
everything it drops that is not in a cycle.

What a load made joins the collector's oldest generation unexamined
(`_age_young_objects`). Left in the youngest, all of it is examined by the first
young collection after the load and again by the next middle one, and its
survivors count towards the next full collection, which a cold SDXL-shape load's
~400k objects then trigger within the next few hundred thousand allocations of
the user's (~0.35 s on the VM; with the aging, no collection at all in the same
300k allocations: `benchmarks/switch_overhead.py`'s "collector after" figure).
They are the pipeline, long-lived by design; the few cycles among them (and
among the caller's objects young at that moment, which join the oldest
generation too) wait for the next full collection, as long-lived objects' do.
A load that fails is not aged: its garbage (a traceback's frames) goes at the
next young collection.

Inference mode off (`normal_tensors`). A service loads where it serves, often under
`torch.inference_mode()`, where every tensor made is an inference tensor: it keeps
no version counter, which is how compstore tells a store tensor from one edited
in place, and a thread outside the mode (the uploader's readers) may not write it.
Until 2026-12-07 every compstore load under it failed: "Inference tensors do not
track version counter", or with a pool "Inplace update to inference tensor outside
InferenceMode is not allowed". Loads and moves make normal tensors, which inference
mode reads as it reads its own (diffusers' own load there makes inference tensors).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading

import torch

_LOADS = threading.RLock()  # re-entrant: a load may load parts through another entry point
# Objects frozen beyond this many are the process's own (`gc.freeze()` of its heap before
# forking workers, say): aging would thaw them. Fewer are not: CPython 3.12 starts with
# 375 tuples of its own frozen (3.11 and 3.13 with none), and thawing a few costs nothing.
_FEW_FROZEN = 10_000


@contextlib.contextmanager
def gc_paused():
    """Pause automatic garbage collection inside the block (nested uses are fine);
    what the block made joins the oldest generation when it ends without an error.

    >>> with gc_paused():  # doctest: +SKIP
    ...     pipe = build_everything()
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    except BaseException:
        if was_enabled:
            gc.enable()
        raise
    if was_enabled:
        _age_young_objects()
        gc.enable()


def _age_young_objects() -> None:
    """Move every object the collector tracks into its oldest generation without
    examining it (`gc.freeze()` then `gc.unfreeze()`: two list splices). Skipped
    when the process froze objects itself (before forking workers, say): unfreezing
    would undo that (`_FEW_FROZEN`)."""
    if gc.get_freeze_count() <= _FEW_FROZEN:
        gc.freeze()
        gc.unfreeze()


@contextlib.contextmanager
def exclusive_load():
    """A load: wait for any other thread's load to finish, then run with the
    collector paused. Also usable as a decorator.

    Public as `compstore.exclusive_load` for the other loads of a process that
    loads from several threads: diffusers and transformers build models under
    accelerate's `init_empty_weights` too, which patches torch for every thread,
    so a plain `from_pretrained` beside a compstore load can come out with weights
    on the meta device (or make the compstore load's do so). Under it they take
    turns with compstore's.

    >>> with compstore.exclusive_load():  # doctest: +SKIP
    ...     controlnet = diffusers.ControlNetModel.from_pretrained("./my-controlnet")
    """
    with _LOADS, gc_paused(), normal_tensors():
        yield


def normal_tensors():
    """torch's inference mode off inside the block (see the module's docstring): what
    a load, a move or a cast makes is shared with later loads and moves."""
    return torch.inference_mode(False)


@contextlib.contextmanager
def warnings_dropped(logger: str, starts: str | tuple[str, ...]):
    """The library warnings from `logger` that begin with `starts` (one prefix or
    several) dropped while the block runs: warnings about steps compstore takes for
    the user, not the user's (a cast diffusers' `from_single_file` makes, a component
    compstore built and passed in)."""
    log = logging.getLogger(logger)

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(starts)

    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)
