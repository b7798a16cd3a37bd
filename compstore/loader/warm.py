"""Warm loads: what a later load in the same process reuses instead of rebuilding.

Module templates: a component built once is cloned, not rebuilt, the next time.

Building a diffusers or transformers model runs its Python constructors: ~0.12 s
for the SDXL UNet's 1,930 modules even with empty (meta) weights, as long as
uploading a few GB. The first build of a component in a process constructs its
module tree with meta tensors and keeps it as the *template* (`adopt`), which
nobody else ever holds; the model that build returns is already a clone of it.
Later builds of the same component (same stored config and tensors, same dtype)
clone the template too, and bind tensors to the clone — with a residency pool, device
tensors (`ResidencyPool.serve`: resident ones reused, the rest uploaded first);
without one, store views — in about a tenth of the time (the four SDXL-shape
models on the 2-core VM: 16 ms against 0.14 s; `clone_module` with a plan
computed once per template).

A clone is a fresh model, as a rebuild would be: every module object, attribute
container (hook tables, dicts, lists) and config object is new, so a hook, an
attention processor or a config edit on one reaches neither the template nor any
other clone. Only tensor storage is shared, as the residency pool already shares
it.

Small parts: tokenizers, schedulers and processors loaded from the same stored
files (`part`). A CLIP tokenizer takes 0.05-0.3 s to load and ~0.1 s to deep-copy,
so each pipeline gets a shallow copy of a tokenizer loaded once (~10 µs): its
backend (the vocabulary, in Rust) is shared, as `DiffusionPipeline.from_pipe`
shares a tokenizer, until tokens are added to it (a textual inversion): then that
pipeline's tokenizer becomes a deep copy first (`_OwnBackendFirst`), and no other
pipeline sees the new tokens. Every other part (a scheduler keeps per-run state)
is a deep copy, each pipeline its own.

`clear_caches()` forgets both; `from_pretrained(..., private=True)` uses neither.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import hashlib
import json
import types
import weakref
from collections import OrderedDict
from typing import Callable

import torch

from ..store.objects import blob_hash
from .loading import exclusive_load, gc_paused
from .residency import PLAIN_TYPES, named_tensors

# Attribute values that are never changed in place: shared by template and clones.
_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, type, range, torch.dtype,
              torch.device, enum.Enum, types.FunctionType, types.BuiltinFunctionType)
_IMMUTABLE_TYPES = frozenset(_IMMUTABLE)
_TREE = ("_parameters", "_buffers", "_modules")


def _frozen(value) -> bool:
    if type(value) in _IMMUTABLE_TYPES or isinstance(value, _IMMUTABLE):
        return True
    if isinstance(value, (tuple, frozenset)):
        return all(_frozen(v) for v in value)
    return isinstance(value, _frozen_dict())  # diffusers configs refuse item assignment


@functools.cache
def _frozen_dict() -> type:
    from diffusers.configuration_utils import FrozenDict

    return FrozenDict


# How each attribute of a module is cloned.
_SHARE, _SHALLOW, _DEEP = 0, 1, 2


def _how(value) -> int:
    """Immutable values are shared; containers of immutable values (most are hook
    tables, empty) are copied shallowly; anything else is deep-copied."""
    kind = type(value)
    if kind in _IMMUTABLE_TYPES:
        return _SHARE
    if kind in _CONTAINERS:
        return _SHALLOW if not value or all(
            _frozen(v) for v in (value.values() if isinstance(value, dict) else value)) else _DEEP
    return _SHARE if _frozen(value) else _DEEP


_CONTAINERS = frozenset((dict, OrderedDict, list, set))


@dataclasses.dataclass
class _Step:
    """How one module of a tree is cloned."""

    module: torch.nn.Module  # the original
    params: tuple[tuple[str, int | None], ...]  # attribute -> index in Plan.tensors (None: None)
    buffers: tuple[tuple[str, int | None], ...]
    children: tuple[tuple[str, int | None], ...]  # attribute -> index in Plan.steps
    shallow: tuple[str, ...]  # containers of immutable values (hook tables, mostly empty)
    deep: tuple[str, ...]  # anything else that may change in place


@dataclasses.dataclass
class Plan:
    """What `clone_module` does for a tree, computed once (`clone_plan`). Its tensors
    are in the order `clone_module` asks for them, each once (tied ones too)."""

    steps: list[_Step]
    tensors: list[tuple[str, torch.Tensor]]  # (first name, original tensor)

    @functools.cached_property
    def parameters(self) -> list[bool | None]:
        """Per tensor, its `requires_grad` if it is a Parameter (None: a buffer), asked
        once: a clone of an SDXL UNet makes ~2,600 Parameters."""
        return [t.requires_grad if isinstance(t, torch.nn.Parameter) else None for _, t in self.tensors]


def clone_plan(root: torch.nn.Module) -> Plan:
    """What `clone_module` must do per module of `root` (computed once per template)."""
    modules = list(root.named_modules(remove_duplicate=True))
    index = {id(m): i for i, (_, m) in enumerate(modules)}
    tensors: list[tuple[str, torch.Tensor]] = []
    seen: dict[int, int] = {}

    def slots(path, table):
        out = []
        for attr, t in table.items():
            if t is not None and id(t) not in seen:
                seen[id(t)] = len(tensors)
                tensors.append((f"{path}.{attr}" if path else attr, t))
            out.append((attr, None if t is None else seen[id(t)]))
        return tuple(out)

    steps = []
    for path, m in modules:
        how = {k: _how(v) for k, v in m.__dict__.items() if type(v) not in _IMMUTABLE_TYPES and k not in _TREE}
        steps.append(_Step(
            m, slots(path, m._parameters), slots(path, m._buffers),
            tuple((k, None if c is None else index[id(c)]) for k, c in m._modules.items()),
            tuple(k for k, h in how.items() if h == _SHALLOW), tuple(k for k, h in how.items() if h == _DEEP)))
    return Plan(steps, tensors)


def clone_module(root: torch.nn.Module,
                 tensor_for: Callable[[str, torch.Tensor], torch.Tensor],
                 plan: Plan | None = None) -> torch.nn.Module:
    """A new module tree with `root`'s structure and attributes, and new tensors.

    `tensor_for(name, tensor)` gives the data of each parameter and buffer (once per
    tensor: tied ones stay tied). Module objects are new; other attributes are
    shared when immutable and copied otherwise, with one copy per original object
    (a config shared by many submodules stays shared within the clone). `plan`
    (from `clone_plan(root)`) saves classifying every attribute again; it is only
    valid while `root` is unchanged, which holds for a template.

    >>> clone = clone_module(model, lambda name, t: torch.empty_like(t, device="meta"))  # doctest: +SKIP
    """
    plan = plan or clone_plan(root)
    return _clone(plan, [tensor_for(name, t) for name, t in plan.tensors])[0]


def _clone(plan: Plan, data: list[torch.Tensor]) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """The clone of `plan`'s tree with `data` (in `plan.tensors` order) as its tensors;
    also returns the clone's tensors (parameters wrapped as the originals were)."""
    new, made = _clone_all(plan, data)
    return new[0], made


def _clone_all(plan: Plan, data: list[torch.Tensor]) -> tuple[list[torch.nn.Module], list[torch.Tensor]]:
    """`_clone`, with every new module (in `plan.steps` order) instead of the root."""
    with gc_paused():  # ~40k new objects: a collection midway costs more than the clone
        # Parameter(d, grad) is this call for a plain tensor `d`, less its checks
        made = [d if grad is None else torch.Tensor._make_subclass(torch.nn.Parameter, d, grad)
                if type(d) in PLAIN_TYPES else torch.nn.Parameter(d, requires_grad=grad)
                for grad, d in zip(plan.parameters, data)]
        new = [s.module.__class__.__new__(s.module.__class__) for s in plan.steps]
        memo = None  # for deep copies that point back into the tree (bound methods, say)
        for s, m in zip(plan.steps, new):
            state = s.module.__dict__.copy()  # immutable values: shared
            state["_parameters"] = {a: None if i is None else made[i] for a, i in s.params} if s.params else {}
            state["_buffers"] = {a: None if i is None else made[i] for a, i in s.buffers} if s.buffers else {}
            state["_modules"] = {a: None if i is None else new[i] for a, i in s.children} if s.children else {}
            for key in s.shallow:
                state[key] = state[key].copy()
            if s.deep:
                if memo is None:
                    memo = {id(o.module): c for o, c in zip(plan.steps, new)}
                    memo.update((id(t), c) for (_, t), c in zip(plan.tensors, made))
                for key in s.deep:
                    state[key] = copy.deepcopy(state[key], memo)
            object.__setattr__(m, "__dict__", state)
    return new, made


@dataclasses.dataclass
class Template:
    """A built component's module tree, tensors on meta, and where each tensor's data
    comes from: a store blob, or (a buffer the model makes itself, e.g. CLIP's
    position_ids) the template's own copy."""

    plan: Plan  # of the template's own tree
    blobs: list[tuple[str, int] | None]  # per tensor of `plan.tensors`: its blob, None if not the store's
    names: dict[str, int]  # every name of a store tensor (tied ones too) -> its index in `plan.tensors`
    renames: dict[str, str] = dataclasses.field(default_factory=dict)  # stored name -> name in `names`

    @property
    def module(self) -> torch.nn.Module:
        return self.plan.steps[0].module

    @functools.cached_property
    def pool_blobs(self) -> list[tuple[str, int]]:
        """`blobs`, with the template's own buffers addressed by their content as
        store blobs are (xxh3-128, size): a residency pool keeps one device copy of
        each and shares it between clones, as it shares store tensors, so a switch
        back to a resident pipeline copies nothing at all."""
        return [blob if blob is not None else (blob_hash(_bytes_of(t)), t.numel() * t.element_size())
                for blob, (_, t) in zip(self.blobs, self.plan.tensors)]

    @functools.cached_property
    def pool_names(self) -> dict[str, int]:
        """`names`, and the (first) name of each of the template's own buffers: every
        name a clone records a `pool_blobs` address for."""
        own = {name: i for i, (name, _) in enumerate(self.plan.tensors) if self.blobs[i] is None}
        return {**own, **self.names}

    def clone(self, data: list[torch.Tensor]) -> tuple[torch.nn.Module, list[torch.Tensor]]:
        """A clone with `data` as its tensors (in `plan.tensors` order), and the
        clone's tensors in that order."""
        return _clone(self.plan, data)


def _bytes_of(t: torch.Tensor):
    """A (host, real) tensor's bytes, for hashing."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


_TEMPLATES: OrderedDict[tuple, Template] = OrderedDict()
MAX_TEMPLATES = 16  # a template is Python objects and meta tensors: a few MB at most
_BY_ARCHITECTURE: dict[str, tuple] = {}  # `architecture(...)` -> key of a template built with it


def architecture(class_name: str, dtype: str, config: dict | None, locations) -> str:
    """What makes two components' builds the same but for their tensors' data: model
    class, dtype, config (its `_name_or_path` aside) and each stored tensor's name,
    dtype and shape. Fine-tunes of one base share it, e.g. every SDXL UNet."""
    config = {k: v for k, v in (config or {}).items() if k != "_name_or_path"}
    manifest = sorted((loc.name, loc.dtype, list(loc.shape)) for loc in locations)
    text = json.dumps([class_name, dtype, config, manifest], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def sibling(key: tuple, arch: str, blobs: dict[str, tuple[str, int]]) -> Template | None:
    """A template for `key` from another component's of the same architecture: that
    template's module tree (shared: templates are never changed), this component's
    blobs (`blobs`: stored name -> blob). Building B's UNet after A's, both fine-tunes of one
    base, is then a clone, not a rebuild (~0.2 s of constructors for SDXL's).
    The template is kept under `key` too."""
    found = _TEMPLATES.get(_BY_ARCHITECTURE.get(arch))
    if found is None:
        return None
    blobs = {found.renames.get(name, name): blob for name, blob in blobs.items()}  # loader/names.py
    mine: list[tuple[str, int] | None] = [None] * len(found.blobs)
    for name, i in found.names.items():
        blob = blobs.get(name)
        if blob is None or mine[i] not in (None, blob):
            return None  # tied in the model but stored twice, differently: build anew
        mine[i] = blob
    _keep(key, Template(found.plan, mine, found.names, found.renames))
    return _TEMPLATES[key]


def _keep(key: tuple, template: Template) -> None:
    _TEMPLATES[key] = template
    _TEMPLATES.move_to_end(key)
    while len(_TEMPLATES) > MAX_TEMPLATES:
        _TEMPLATES.popitem(last=False)


def adopt(key: tuple, model: torch.nn.Module, blobs: dict[str, tuple[str, int]],
          arch: str | None = None, renames: dict[str, str] | None = None) -> Template | None:
    """Keep `model` itself as the template for `key`, and for components of its
    architecture `arch` (see `sibling`): a freshly constructed model whose store
    tensors are meta stand-ins (`blobs`: name -> blob of each store tensor; `renames`:
    stored name -> that name, where they differ), never
    handed out. None, and nothing kept, when a parameter is not the store's (newly
    initialised: each build draws its own), a meta tensor has no blob, or tied
    names hold different bytes."""
    blob_of: dict[int, tuple[str, int]] = {}
    named = list(named_tensors(model))
    for name, _, _, t in named:
        blob = blobs.get(name)
        if blob is not None and blob_of.setdefault(id(t), blob) != blob:
            return None
    if any(id(t) not in blob_of and (attr in owner._parameters or t.device.type == "meta")
           for _, owner, attr, t in named):
        return None
    plan = clone_plan(model)
    index = {id(t): i for i, (_, t) in enumerate(plan.tensors)}
    found = Template(plan, [blob_of.get(id(t)) for _, t in plan.tensors],
                     {name: index[id(t)] for name, _, _, t in named if name in blobs}, renames or {})
    _keep(key, found)
    if arch is not None:
        _BY_ARCHITECTURE[arch] = key
    return found


def template(key: tuple) -> Template | None:
    found = _TEMPLATES.get(key)
    if found is not None:
        _TEMPLATES.move_to_end(key)
    return found


_PARTS: OrderedDict[tuple, tuple[object, int]] = OrderedDict()  # key -> (part, len at load)
MAX_PARTS = 32


def part(key: tuple, load: Callable[[], object]):
    """The small part stored under `key` (its class and the hashes of its files):
    loaded once, then a copy each call: a tokenizer's shares its backend until
    tokens are added to it (`_shallow_tokenizer`), anything else is deep."""
    from transformers import PreTrainedTokenizerBase

    cached = _PARTS.get(key)
    if cached is not None and isinstance(cached[0], PreTrainedTokenizerBase) and len(cached[0]) != cached[1]:
        cached = None  # its backend gained tokens past `_OwnBackendFirst` (a user's direct edit)
    if cached is None:
        loaded = load()
        cached = _PARTS[key] = (loaded, len(loaded) if isinstance(loaded, PreTrainedTokenizerBase) else 0)
        while len(_PARTS) > MAX_PARTS:
            _PARTS.popitem(last=False)
    _PARTS.move_to_end(key)
    found = cached[0]
    return _shallow_tokenizer(found) if isinstance(found, PreTrainedTokenizerBase) else copy.deepcopy(found)


def _shallow_tokenizer(tokenizer):
    """A tokenizer of its own for one pipeline, sharing `tokenizer`'s backend: its
    attributes are its own (their dicts and lists copied), and it gets a deep copy of
    everything before tokens are added to it (`_OwnBackendFirst`)."""
    own = copy.copy(tokenizer)
    own.__dict__.update({k: copy.copy(v) for k, v in vars(tokenizer).items() if isinstance(v, (dict, list, set))})
    own._add_tokens = _OwnBackendFirst(own)
    return own


class _OwnBackendFirst:
    """`tokenizer._add_tokens` (where `add_tokens` and `add_special_tokens` change the
    vocabulary) of a tokenizer that shares its backend with other pipelines': the
    tokenizer first becomes a deep copy of itself (~0.1 s for a CLIP tokenizer), then
    the class's own method adds the tokens. Until 2026-12-07 pipelines shared one
    tokenizer object: a textual inversion loaded into one pipeline added its token to
    every other pipeline's tokenizer too, whose text encoder had no row for it (and
    whose own `load_textual_inversion` of it then failed: "already in tokenizer
    vocabulary"). Holds the tokenizer weakly: a strong hold would be a reference cycle."""

    def __init__(self, tokenizer):
        self._tokenizer = weakref.ref(tokenizer)

    def __call__(self, *args, **kwargs):
        tokenizer = self._tokenizer()
        del tokenizer.__dict__["_add_tokens"]  # from now on the class's: the copy is its own
        tokenizer.__dict__.update(copy.deepcopy(tokenizer).__dict__)
        return tokenizer._add_tokens(*args, **kwargs)

    def __deepcopy__(self, memo):  # the deep copy of its tokenizer's: made before its attributes
        return _OwnBackendFirst(memo.get(id(self._tokenizer()), self._tokenizer()))

    def __reduce__(self):  # pickled with its tokenizer (which gets a backend of its own)
        return _OwnBackendFirst, (self._tokenizer(),)


def clear_caches() -> None:
    """Forget every template and small part: the next load builds everything anew.

    >>> compstore.loader.clear_caches()  # doctest: +SKIP
    """
    with exclusive_load():  # not under a load in another thread
        _TEMPLATES.clear()
        _BY_ARCHITECTURE.clear()
        _PARTS.clear()
