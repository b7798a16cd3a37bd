"""How a store-loaded pipeline's own methods reach the residency pool.

`route_through_pool` marks a pipeline (or module) and wraps its class's methods,
so that what users already write does the right thing: `pipe.to("cuda")` and a
module's `.cuda()` go through `residency.to_device` (only what is not resident is
uploaded), a move back to the CPU releases the pool's tensors (idle, kept within
the budget), casts (`.to(dtype)`, `.half()`) and `fuse_lora` / `unfuse_lora` mark
the tensors they change as no longer the store's. The pool itself is in
residency.py; this module only decides when to call it.

The wrappers are the class's (`_route_class`), and act only for marked instances
(`ROUTED` in the instance's `__dict__`); every other instance of the class gets the
class's own method. Until 2026-12-07 they were callables in the instance's
`__dict__`, holding it weakly (a strong hold is a reference cycle, freed only by the
cyclic collector): `from_pretrained(...).to("cuda")`, diffusers' own idiom, failed,
since the pipeline was gone by the time its `.to` ran ("type object 'NoneType' has
no attribute 'to'").
"""

from __future__ import annotations

import contextvars
import functools
import sys
from typing import Callable

import torch

from .residency import (POOL, STORE_KEYS, ResidencyPool, canonical_device, named_tensors, pipeline_modules,
                        pools_holding_tensors, storage_of, store_models_in, to_device, unrouted)

_MOVING = contextvars.ContextVar("compstore_moving", default=False)


def _release(obj, pool: ResidencyPool) -> None:
    """`obj` (a pipeline or module) moves off `pool`'s device: its modules stop
    holding pool tensors, which become idle (evictable) once nothing else uses them.
    A module that accelerate's offload hook moves off (`enable_model_cpu_offload`)
    gives its memory back at once: offloading is asked for to free device memory."""
    offloaded = hasattr(obj, "_hf_hook")  # (on the slot's module: a wrapper's models are inside it)
    for m in pipeline_modules(obj).values():
        pool.release(m, now=offloaded or hasattr(m, "_hf_hook"))
        if getattr(m, POOL, None) is pool:
            delattr(m, POOL)
    if getattr(obj, POOL, None) is pool:
        delattr(obj, POOL)


def route_through_pool(obj) -> None:
    """Make `obj.to(device)` (a store-loaded pipeline, or a store-built module) go
    through the device's residency pool first, so that tensors already resident are
    shared, not copied again; a module's `.cuda()` too. The original `.to` then does
    the rest (tensors not from the store). A dtype change bypasses the pool: it makes
    new tensors anyway, which are never the store's again (`_casting`; a module's
    `.half()`, `.float()` and `.bfloat16()` too). Inside a pipeline's move, its
    modules' `.to` calls do not route again (one report per move).

    Also `fuse_lora` and `unfuse_lora` (diffusers' pipelines and models): peft merges
    a LoRA into the base weights through `weight.data += delta`, which torch's version
    counters do not see, so the pool would go on serving the fused bytes as the
    store's. After either call, the weights of every LoRA-wrapped layer count as
    edited (`_mark_lora_merges`): never served again, private on later moves.
    And every module's `load_state_dict` (a model's, a wrapper's of models, a
    submodule's), which copies into its tensors in place (`_loading_state_dict`: into
    copies of its own)."""
    obj.__dict__[ROUTED] = _route_methods(type(obj))
    if not isinstance(obj, torch.nn.Module):  # a pipeline: also the wrappers diffusers made of its models
        for c in obj.components.values():  # (`controlnet=[canny, depth]`: an offload hook moves the wrapper)
            if (isinstance(c, torch.nn.Module) and not hasattr(c, STORE_KEYS)
                    and not _is_routed(c) and store_models_in(c)):
                route_through_pool(c)


ROUTED = "_compstore_routed"  # in an instance's __dict__ (a `_Routing`): its class's wrappers route it


def _route_methods(cls: type) -> "_Routing":
    """Wrap the methods of `cls` that route a marked instance; return the mark."""
    _route_class(cls, "to", _routed_to)
    if issubclass(cls, torch.nn.Module):
        _route_class(cls, "cuda", _routed_cuda)
        for name in ("half", "float", "bfloat16"):  # casts that do not go through `.to`
            _route_class(cls, name, _ROUTED_CASTS[name])
    for name in ("fuse_lora", "unfuse_lora"):
        if callable(getattr(cls, name, None)):
            _route_class(cls, name, _ROUTED_MERGES[name])
    # Every module's: a submodule's (`pipe.unet.conv_in.load_state_dict(...)`) writes
    # into a model's tensors too, and no instance of its class is marked.
    _route_class(torch.nn.Module, "load_state_dict", _loading_state_dict,
                 marked=lambda module: bool(pools_holding_tensors()))
    _route_compiled_wrappers()
    return _Routing(cls)


def _route_compiled_wrappers() -> None:
    """`torch.compile(model)` wraps `model` in an OptimizedModule, whose `.to()` is
    torch's: it moves `model`'s tensors itself (`_apply`), past `model`'s routed
    `.to()`. For a routed model, the wrapper's `.to()`, `.cuda()` and casts are the
    model's own, and return the wrapper. Until 2026-12-07 `pipe.unet =
    torch.compile(pipe.unet)` then `pipe.unet.to("cuda")` uploaded the whole UNet,
    shared nothing and made no report. (diffusers imports torch._dynamo: when it is
    not imported, nothing has been compiled yet, and the next routing looks again.)"""
    cls = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    if cls is not None:
        for name in ("to", "cuda", "half", "float", "bfloat16"):
            _route_class(cls, name, functools.partial(_through_compiled, name), marked=_wraps_a_routed_model)


def _wraps_a_routed_model(wrapper) -> bool:
    model = wrapper.__dict__["_modules"].get("_orig_mod")
    return model is not None and _is_routed(model)


def _through_compiled(name: str, wrapper, *args, **kwargs):
    getattr(wrapper._orig_mod, name)(*args, **kwargs)
    return wrapper


class _Routing:
    """The mark of a routed instance. A deep copy or a pickle of the instance is routed
    too: unpickled in another process, the mark wraps its class's methods there."""

    def __init__(self, cls: type):
        self.cls = cls

    def __reduce__(self):
        return _route_methods, (self.cls,)


def _is_routed(obj) -> bool:
    return bool(obj.__dict__.get(ROUTED))


def _route_class(cls: type, name: str, routed: Callable, marked: Callable[[object], bool] = _is_routed) -> None:
    """Make `cls.<name>` call `routed(self, ...)` for `marked` instances (by default
    those marked `ROUTED`), and the method it had for every other instance (a plain
    diffusers pipeline of the same class included). Once per class and name; a
    subclass whose method is a parent's wrapper already has it."""
    current = getattr(cls, name)
    if unrouted(current) is not current:
        return

    @functools.wraps(current)
    def method(self, *args, **kwargs):
        if marked(self):
            return routed(self, *args, **kwargs)
        return current(self, *args, **kwargs)

    method.__compstore_unrouted__ = current  # (`residency.unrouted`)
    setattr(cls, name, method)


def _merging_lora(name: str, obj, *args, **kwargs):
    for module, tensors in _lora_base_tensors(obj).items():  # copy-on-write: merged into a copy
        pool = getattr(module, POOL, None) or getattr(obj, POOL, None)
        if pool is not None:  # (loaded on the host: copy-on-write views of its own already)
            pool.own_copies(module, tensors)
    try:
        return unrouted(getattr(type(obj), name))(obj, *args, **kwargs)
    finally:
        _mark_lora_merges(obj)


_ROUTED_MERGES = {name: functools.partial(_merging_lora, name) for name in ("fuse_lora", "unfuse_lora")}


def _lora_base_tensors(obj) -> dict[torch.nn.Module, list[torch.Tensor]]:
    """Per model of `obj` (a pipeline or a module), the base-layer parameters of its
    peft LoRA layers: what `fuse_lora` and `unfuse_lora` edit in place."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft: diffusers fuses no LoRA
        return {}
    found = {}
    for module in pipeline_modules(obj).values():
        tensors = [t for layer in module.modules() if isinstance(layer, BaseTunerLayer)
                   for t in layer.get_base_layer().parameters()]
        if tensors:
            found[module] = tensors
    return found


def _mark_lora_merges(obj) -> None:
    """Bump the version counter of every base-layer tensor of every peft LoRA layer
    in `obj` (a pipeline or a module): their store records no longer match, so they
    are never taken for the store's again and every later move moves them as private
    tensors. (Before the merge, `_merging_lora` gave the model copies of its own of
    those that were pool tensors, so no other model sees the merge.)"""
    for tensors in _lora_base_tensors(obj).values():
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def _loading_state_dict(module, state_dict, strict: bool = True, assign: bool = False):
    """`module.load_state_dict(sd)` copies into the module's tensors in place: those
    that are pool tensors, shared with other models, become copies of the module's own
    first (as for `fuse_lora`), so that the other models keep the store's weights and
    the pool goes on serving them. (`assign=True` puts new tensors in place: nothing
    is written into the pool's. A LoRA's state dict names only its own tensors.)
    Until 2026-12-07 loading a fine-tune's weights into one pipeline's UNet (or into a
    wrapper of models, `controlnet=[canny, depth]`, or a submodule,
    `pipe.unet.conv_in.load_state_dict(...)`) changed every live pipeline sharing it,
    and the next load uploaded those tensors again. Routed on `torch.nn.Module`, it
    acts only while some pool holds tensors, and a module's state-dict names (a LoRA's
    `to_q.base_layer.weight` too) find its tensors."""
    if not assign:
        names = set(state_dict)
        loaded = [t for name, _, _, t in named_tensors(module, stored_names=False) if name in names]
        for pool in pools_holding_tensors():
            pool.own_copies(module, loaded)
    return unrouted(torch.nn.Module.load_state_dict)(module, state_dict, strict=strict, assign=assign)


def _is_device(a) -> bool:
    """A device as `.to()` takes it: "cuda", torch.device, or an accelerator's index (`.to(0)`)."""
    return isinstance(a, (str, torch.device)) or (isinstance(a, int) and not isinstance(a, bool))


def _routed_to(self, *args, **kwargs):
    original_to = functools.partial(unrouted(type(self).to), self)
    args = tuple(a for a in args if a is not None)  # diffusers' pipelines call `module.to(device, dtype)`, dtype None
    dtype = kwargs.get("dtype", next((a for a in args if isinstance(a, torch.dtype)), None))
    device = kwargs.get("device", next((a for a in args if _is_device(a)), None))
    if _MOVING.get() or any(not (_is_device(a) or isinstance(a, torch.dtype)) for a in args):
        return original_to(*args, **kwargs)  # inside a move, or `.to(tensor)` and the like
    if dtype is None and device is None:  # `.to(memory_format=torch.channels_last)`: new tensors
        return _casting(self, functools.partial(original_to, *args, **kwargs))
    rest = {k: v for k, v in kwargs.items() if k not in ("device", "dtype")}
    if dtype is not None:  # cast where it is, then move
        out = _casting(self, functools.partial(original_to, dtype=dtype, **rest))
        if device is None:
            return out
    own = getattr(self, POOL, None)
    if torch.device(device).type == "cpu" and own is None:
        return original_to(device, **rest)
    token = _MOVING.set(True)
    try:
        if own and own.device != canonical_device(device):
            _release(self, own)  # leaving its pool: those tensors are no longer used here
            own = None
        if torch.device(device).type != "cpu" or own:
            to_device(self, device, pool=own)
        return original_to(device, **rest)
    finally:
        _MOVING.reset(token)


def _casting(obj, cast: Callable):
    """`obj.to(dtype)`, or another conversion (`.to(memory_format=...)`), past the pool.
    A conversion gives a tensor new storage but may keep its version counter (torch
    sets `param.data`), and converted copies are not the store's (fp32 -> fp16 -> fp32
    loses bits): the names whose storage it replaced lose their store record (private
    on every later move), and the module stops holding the pool tensors it no longer
    uses (idle: kept within the budget, shared with later loads). SDXL's pipeline
    casts its VAE to fp32 and back at every fp16 generation; without the release, the
    pool would hold the VAE's old tensors in use for as long as the pipeline lives.
    Likewise `pipe.unet.to(memory_format=torch.channels_last)` after `pipe.to("cuda")`
    (diffusers' recipe before `torch.compile`): until 2026-12-07 the pool went on
    counting the replaced conv weights as in use, a second copy of them on the device
    for as long as the pipeline lived."""
    modules = list(pipeline_modules(obj).values())
    before = [{name: storage_of(t) for name, _, _, t in named_tensors(m)} for m in modules]
    token = _MOVING.set(True)  # a pipeline's modules: handled here, not again each
    try:
        out = cast()
    finally:
        _MOVING.reset(token)
    for module, was in zip(modules, before):
        keys = getattr(module, STORE_KEYS, None) or {}
        changed = [name for name, _, _, t in named_tensors(module)
                   if name in keys and storage_of(t) != was.get(name)]
        for name in changed:
            keys[name] = keys[name]._replace(version=-1)  # matches no version: never the store's again
        pool = getattr(module, POOL, None) or getattr(obj, POOL, None)
        if changed and pool is not None:
            pool.release_replaced(module)
    return out


def _routed_cast(name: str, obj, *args, **kwargs):
    return _casting(obj, functools.partial(unrouted(getattr(type(obj), name)), obj, *args, **kwargs))


_ROUTED_CASTS = {name: functools.partial(_routed_cast, name) for name in ("half", "float", "bfloat16")}


def _routed_cuda(self, device=None):
    return self.to(torch.device("cuda", device) if isinstance(device, int) else (device or "cuda"))
