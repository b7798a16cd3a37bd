"""Build one weight-bearing component (a diffusers or transformers model) from the store.

The module is built from its config with empty (meta) weights, then bound to the
store's tensors with `load_state_dict(..., assign=True)`: no weight is initialised,
read or copied before it is used. Everything diffusers and transformers do on top
of that — dtype rules, fp32 modules, tied weights, eval mode, `_name_or_path`,
missing and unexpected keys — is done here the way they do it.
"""

from __future__ import annotations

import functools

import importlib
import inspect
import logging
import os
import re
import types
from contextlib import contextmanager
from typing import Any, Callable

import torch
from torch.nn.parameter import is_lazy

from ..store import (CompstoreError, ComponentNotFoundError, CorruptStoreError, Store,
                     WeightsNotFoundError)
from ..store.components import pick_component
from ..store.objects import blob_hash
from . import warm
from .loading import exclusive_load
from .names import checkpoint_renames
from .quantized import saved_quantization
from .residency import (STORE_KEYS, ResidencyPool, StoreKeys, as_shape, named_tensors, record_store_keys,
                        store_record, to_device)
from .routing import route_through_pool
from .tensors import TORCH_DTYPES, LoadMappings, private_packs, state_dict, stored_tensor

logger = logging.getLogger("compstore")


def resolve_class(library: str | None, class_name: str | None):
    """The Python class a model_index entry names, e.g. ("diffusers", "AutoencoderKL"),
    or ("stable_diffusion", "StableDiffusionSafetyChecker"): a diffusers pipeline
    module, as SD 1.5 names its safety checker."""
    if not library or not class_name:
        return None
    if library.startswith("diffusers.pipelines"):
        library = "diffusers"
    from diffusers import pipelines

    if hasattr(pipelines, library):  # diffusers' own rule (pipeline_loading_utils)
        return getattr(getattr(pipelines, library), class_name, None)
    try:
        module = importlib.import_module(library)
    except ImportError:
        return None
    return getattr(module, class_name, None)


def is_model_class(cls) -> bool:
    if cls is None or not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
        return False
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    return issubclass(cls, (ModelMixin, PreTrainedModel))


def no_weights(where: str, class_name: str) -> WeightsNotFoundError:
    """The refusal of a model whose folder has its config.json but no weights: a local
    folder's before it is ingested (`resolve_snapshot`), a stored one's as it is built."""
    return WeightsNotFoundError(
        f"{where}: a config.json but no weights for {class_name} (a download that left them "
        "out?); diffusers refuses it too. Ingest or pull it with its weights files")


def dtype_argument(kwargs: dict[str, Any]):
    """Pop `dtype` (or the older `torch_dtype`) from a load's keyword arguments: None,
    a torch dtype, a dtype's name ("float16", "torch.bfloat16"), "auto", or a
    per-slot dict of these ({"unet": torch.float16, "default": torch.float32}).
    "auto" is decided per model as its library decides it (`prepare_model`): the
    config's or checkpoint's dtype for transformers, float32 for diffusers.

    Raises:
        CompstoreError: a value that names no torch dtype (plain diffusers would
            ignore it and load float32), or a dtype that is not floating-point.
    """
    value = kwargs.pop("dtype", None)
    older = kwargs.pop("torch_dtype", None)
    value = older if value is None else value

    def one(v):
        if v == "auto":
            return v
        found = getattr(torch, v.removeprefix("torch."), None) if isinstance(v, str) else v
        if v is not None and not isinstance(found, torch.dtype):
            raise CompstoreError(f"dtype={v!r} is not a torch dtype: pass one such as torch.float16 "
                                 "(or its name, \"float16\")")
        if found is not None and not found.is_floating_point:  # weights are cast to it
            raise CompstoreError(f"dtype={v!r} is not a floating-point dtype: pass one such as "
                                 "torch.float16, torch.bfloat16 or torch.float32")
        return found

    return {slot: one(v) for slot, v in value.items()} if isinstance(value, dict) else one(value)


def _auto_dtype(config: dict, locations) -> torch.dtype:
    """transformers' dtype="auto": the config's dtype, else the checkpoint's first float."""
    name = config.get("dtype") or config.get("torch_dtype")
    if isinstance(name, str) and hasattr(torch, name):
        return getattr(torch, name)
    for loc in locations:
        dt = TORCH_DTYPES[loc.dtype]
        if dt.is_floating_point:
            return dt
    return torch.get_default_dtype()


def build_model(store: Store, component: dict, **kwargs: Any) -> torch.nn.Module:
    """A diffusers or transformers model bound to the stored tensors of `component`:
    both halves of `prepare_model` (which takes the same arguments) at once."""
    model = prepare_model(store, component, **kwargs)()
    if kwargs.get("pool") is not None:
        kwargs["pool"].settle()
        kwargs["pool"].wait_uploads()
    return model


def prepare_model(
    store: Store,
    component: dict,
    *,
    dtype: torch.dtype | str | None = None,
    name_or_path: str = "",
    packs: LoadMappings | None = None,
    verify: bool = False,
    pool: ResidencyPool | None = None,
    private: bool = False,
    quantization_config: Any = None,
) -> Callable[[], torch.nn.Module]:
    """A model of the stored tensors of `component`, in two halves: this call does
    the Python work and returns the function that binds the tensors and returns
    the model. Work done between the two (`_assemble` loads tokenizers there) runs
    while uploads do.

    `component` is a row of `Store.components_of` (component_id, library, class_name);
    `packs` are the private mappings of this load (made here if not given). The
    first build of a component in this process constructs its module tree on meta
    and keeps it as the template (`warm`); the model is a clone of it, as later
    loads' are, bound to the tensors `pool` holds on its device (resident ones
    reused, the rest uploaded) or, without a pool, to store views. A fresh build
    with a pool starts uploading what the pool lacks here (`pool.prefetch`); a
    caller that never calls the second half calls `pool.drop_prefetched()`.
    Copies from the pool's pinned tier may still run when the second half
    returns (`pool.serve` with `wait=False`: the Python work after it overlaps
    them); the caller calls `pool.settle()` and `pool.wait_uploads()` once it has
    built everything.
    `private=True` builds anew and leaves no template. A `quantization_config` has
    the library quantize the stored weights as it loads them (quantized.py), and a
    model saved quantized loads as its library loads it: a model built anew every
    time, whose quantized tensors no pool shares.
    """
    from diffusers import ModelMixin

    cls = resolve_class(component["library"], component["class_name"])
    if not is_model_class(cls):
        raise ComponentNotFoundError(
            f"{component['library']}.{component['class_name']} is not a diffusers or "
            "transformers model class")
    cid = component["component_id"]
    packs = packs or private_packs(store, verified=verify)
    key = (cid, f"{cls.__module__}.{cls.__qualname__}", str(dtype))
    quantized = quantization_config is not None  # built anew each time: no template
    template = None if private or verify or quantized else warm.template(key)
    if template is not None:
        return functools.partial(_from_template, template, _stored_views(store, cid, packs, template),
                                 pool, name_or_path)
    config = store.component_config(cid)
    if config is None:
        raise ComponentNotFoundError(f"component {cid[:12]} has no config.json")
    locations = store.tensor_locations(cid)
    if not locations:  # initialising every weight would be a random model
        raise no_weights(name_or_path or component.get("slot") or component["class_name"],
                         component["class_name"])
    if verify:
        check_tensors(packs, locations, component["class_name"])
    saved = saved_quantization(config)  # a model saved quantized is never a template either
    if quantized or saved is not None:
        model = _quantized(cls, config, packs, locations, dtype, name_or_path, quantization_config,
                           store.weights_metadata(cid) if saved is not None else None)
        return lambda: model
    blobs = {loc.name: (loc.xxh3, loc.size) for loc in locations}
    arch = warm.architecture(key[1], key[2], config, locations)
    template = None if private or verify else warm.sibling(key, arch, blobs)
    if template is not None:  # another component of this architecture was built before
        return functools.partial(_from_template, template,
                                 _stored_views(store, cid, packs, template, locations), pool, name_or_path)

    if issubclass(cls, ModelMixin):
        # diffusers: weights cast to `dtype`, else to the default dtype (fp32); "auto",
        # not a torch.dtype, is float32 ("Defaulting to `torch.float32`").
        target = torch.float32 if dtype == "auto" else dtype or torch.get_default_dtype()
        keep = _diffusers_kept_in_fp32(cls)
        make = functools.partial(cls.from_config, config)
    else:
        # transformers: dtype=None means "auto", the checkpoint's own dtype.
        target = _auto_dtype(config, locations) if dtype in (None, "auto") else dtype
        config_obj = cls.config_class.from_dict(config)
        subs = [getattr(config_obj, k, None) for k in getattr(config_obj, "sub_configs", {})]
        for c in [config_obj, *subs]:
            if c is not None:  # as transformers: the dtype on the config and its sub-configs
                c.dtype = target
        config_obj._name_or_path = name_or_path
        keep = _kept_in_fp32(cls, target)
        make = functools.partial(cls, config_obj)
    sd = state_dict(packs, locations, target, keep)
    if pool is not None and not private:  # the upload runs while the constructors do
        pool.prefetch([(blobs[name], t) for name, t in sd.items() if name in blobs])
    model, on_meta, renames = _instantiate(make, sd, target)  # patches process-wide state: see loading.py
    if renames:  # from here on, tensors go by the names the model loads them under
        blobs = {renames.get(name, name): blob for name, blob in blobs.items()}
    adoptable = (on_meta and not (private or verify) and _loads_the_default_way(model)
                 # a pair the checkpoint has both of: the library compares their bytes to tie
                 and not any(t in sd and s in sd for t, s in _tied_pairs(model).items()))
    if adoptable:
        # The constructed tree, bound to meta stand-ins, becomes the template; the
        # model handed out is its first clone, as every later load's is.
        template = _adopt(key, model, sd, blobs, arch, cls, name_or_path, renames)
        if template is not None:
            return functools.partial(_from_template, template, lambda: sd, pool, name_or_path)
    _bind(model, sd, cls, name_or_path, warn=not adoptable)  # (else _adopt's bind warned)
    missing = [name for name, _, _, t in named_tensors(model) if t.device.type == "meta"]
    if missing:  # a bug, not a user error: _instantiate should have built it for real
        raise RuntimeError(f"{cls.__name__}: weights left on the meta device: {missing[:10]}")
    _name(model, name_or_path)
    model.eval()
    record_store_keys(model, blobs)  # the blob of each tensor lets the pool share it on a device
    route_through_pool(model)  # model.to("cuda") / .cuda() go through it
    return lambda: model  # bound to store views: the caller's pool.move takes the prefetched uploads


def _quantized(cls, config: dict, packs: LoadMappings, locations, dtype, name_or_path: str,
               quantization_config: Any, file_metadata: dict[str, str] | None) -> torch.nn.Module:
    """`prepare_model` with a `quantization_config`, or of a model saved quantized: the
    stored tensors, in their stored dtypes and names as a file holds them, quantized
    (or taken as quantized) by the library as it loads them."""
    from diffusers import ModelMixin

    from .quantized import quantized_model

    if dtype == "auto" and issubclass(cls, ModelMixin):
        dtype = torch.float32  # as for any diffusers model (see prepare_model)
    model = quantized_model(cls, config, state_dict(packs, locations), quantization_config=quantization_config,
                            dtype=dtype, name_or_path=name_or_path, file_metadata=file_metadata)
    route_through_pool(model)  # model.to("cuda"): the pool moves it with the library's own .to()
    return model


def _diffusers_kept_in_fp32(cls) -> list[str]:
    """The modules a diffusers model keeps in fp32 whatever the dtype it is loaded in
    (0.42: `_keep_in_fp32_modules` for any dtype, not only fp16 as older releases did:
    Wan's `scale_shift_table` stays fp32 in a bf16 load)."""
    keep = getattr(cls, "_keep_in_fp32_modules", None) or []
    return [keep] if isinstance(keep, str) else list(keep)


def _kept_in_fp32(cls, dtype: torch.dtype) -> list[str]:
    """The modules a transformers model keeps in fp32 when loaded in `dtype`, as the
    installed transformers decides: 5.17 and 5.23 by `_get_dtype_plan`
    (`_keep_in_fp32_modules` for fp16, `_keep_in_fp32_modules_strict` for fp16 and
    bf16); 5.0 keeps both lists in fp32 whatever the dtype."""
    plan = getattr(cls, "_get_dtype_plan", None)
    if plan is not None:
        return list(plan(cls, dtype))  # reads class attributes only
    return [*(getattr(cls, "_keep_in_fp32_modules", None) or []),
            *(getattr(cls, "_keep_in_fp32_modules_strict", None) or [])]


def _adopt(key: tuple, model: torch.nn.Module, sd: dict[str, torch.Tensor], blobs: dict,
           arch: str, cls, name_or_path: str, renames: dict[str, str]) -> warm.Template | None:
    """Make a freshly constructed (meta) `model`, one that loads the default way, the
    template of its component: bound to meta stand-ins of its store tensors `sd` the
    way `_bind` binds them (the library's warnings included), then kept by
    `warm.adopt`. None when a tensor of the bound tree is not one store tensor (a tie
    left a parameter unfilled, or ties two names stored with different bytes); the
    model, still meta, is then the caller's to bind."""
    _bind(model, {name: t.to("meta") for name, t in sd.items()}, cls, name_or_path, default_way=True)
    model.eval()
    return warm.adopt(key, model, blobs, arch, renames)


def _stored_views(store: Store, cid: str, packs: LoadMappings, template: warm.Template,
                  locations=None) -> Callable[[], dict[str, torch.Tensor]]:
    """`views` for `_from_template`: the component's store views (stored dtypes), by
    the names the template's model loads them under."""
    renames = template.renames
    return lambda: {renames.get(loc.name, loc.name): stored_tensor(packs, loc)
                    for loc in locations or store.tensor_locations(cid)}


def _name(model: torch.nn.Module, name_or_path: str) -> None:
    """Record where the model came from, where each library keeps it."""
    from diffusers import ModelMixin

    if isinstance(model, ModelMixin):
        model.register_to_config(_name_or_path=name_or_path)
    else:  # a template clone's config is its own copy: setting it reaches no other model
        model.name_or_path = model.config.name_or_path = name_or_path


def _from_template(template: warm.Template, views: Callable[[], dict[str, torch.Tensor]],
                   pool: ResidencyPool | None, name_or_path: str) -> torch.nn.Module:
    """A clone of `template` bound to store views (cast to the template's dtypes) and
    copies of the template's own buffers; with a pool, a clone born on its device
    (`pool.serve`): resident tensors are reused (the template's own buffers too,
    addressed by their bytes) and only the rest uploaded.
    `views()` gives the component's host tensors by name, read only if needed."""
    likes = [t for _, t in template.plan.tensors]

    def host(indices: list[int]) -> list[torch.Tensor]:
        stored = {}
        if any(template.blobs[i] is not None for i in indices):
            sd = views()
            stored = {i: sd[name] for name, i in template.names.items() if name in sd}  # tied: any name
        out = []
        for i in indices:
            like = likes[i]
            if template.blobs[i] is None:
                out.append(like.clone())
                continue
            t = stored[i]
            t = t.to(like.dtype) if t.is_floating_point() and t.dtype != like.dtype else t
            out.append(as_shape(t, like.shape))  # an old checkpoint's (1,) scalar is bound as ()
        return out

    if pool is None:
        model, made = template.clone(host(list(range(len(likes)))))
    else:
        data, placement = pool.serve(template.pool_blobs, likes, host, wait=False)  # see prepare_model
        model, made = template.clone(data)
        pool.claim(model, placement)
    _name(model, name_or_path)
    keys = template.pool_blobs  # the template's own buffers too: shared on a device like the store's
    setattr(model, STORE_KEYS, StoreKeys((name, store_record(keys[i], made[i]))
                                         for name, i in template.pool_names.items()))
    route_through_pool(model)
    return model


def check_tensors(packs: LoadMappings, locations, what: str) -> None:
    """Re-hash each tensor's stored bytes; refuse the component on any mismatch."""
    for loc in locations:
        if blob_hash(packs.view(loc.pack, loc.offset, loc.size)) != loc.xxh3:
            raise CorruptStoreError(
                f"{what}: stored bytes of tensor {loc.name!r} do not match their hash (pack "
                f"{loc.pack}); run `compstore verify` and re-ingest the affected refs")


def _instantiate(make, sd: dict[str, torch.Tensor],
                 dtype: torch.dtype) -> tuple[torch.nn.Module, bool, dict[str, str]]:
    """The model with empty (meta) weights, or, when the checkpoint lacks weights it
    needs, built for real so they get their initial values: diffusers and transformers
    both initialise missing weights (with a warning) rather than refuse. The flag
    says whether the weights are meta. `sd` is renamed in place to the names the
    model loads its tensors under (`names.checkpoint_renames`, returned)."""
    from accelerate import init_empty_weights

    with init_empty_weights(), _no_init_on_meta():
        model = make()
    renames = checkpoint_renames(model, list(sd))
    if renames:
        renamed = {renames.get(name, name): t for name, t in sd.items()}
        sd.clear()
        sd.update(renamed)
    if not _missing_after_ties(model, sd):
        return model, True, renames
    with torch_default_dtype(dtype if dtype.is_floating_point else torch.float32):
        return make(), False, renames


_INIT_FUNCTIONS = ("uniform_", "normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_",
                   "trunc_normal_", "orthogonal_", "sparse_")


@contextmanager
def _no_init_on_meta():
    """Make weight-init functions return at once for meta tensors. Initialising a meta
    tensor computes nothing, but torch runs it through Python reference kernels, ~1 ms
    a call: 0.15 s of a 0.47 s tiny SDXL load went there. Real tensors (e.g. buffers
    such as CLIP's position_ids, set in `_init_weights`) are initialised as before."""
    import torch.nn.init as torch_init

    def skip_meta(fn):
        @functools.wraps(fn)
        def init(*args, **kwargs):
            t = args[0] if args else kwargs.get("tensor")
            return t if isinstance(t, torch.Tensor) and t.device.type == "meta" else fn(*args, **kwargs)
        return init

    try:
        from transformers.initialization import TORCH_INIT_FUNCTIONS as hf_table
    except ImportError:
        hf_table = {}
    saved_torch = {n: getattr(torch_init, n) for n in _INIT_FUNCTIONS if hasattr(torch_init, n)}
    saved_hf = dict(hf_table)
    try:
        for name, fn in saved_torch.items():
            setattr(torch_init, name, skip_meta(fn))
        hf_table.update({name: skip_meta(fn) for name, fn in saved_hf.items()})
        yield
    finally:
        for name, fn in saved_torch.items():
            setattr(torch_init, name, fn)
        hf_table.update(saved_hf)


def _missing_after_ties(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> list[str]:
    """Keys the model needs that neither the checkpoint nor a weight tie provides."""
    given = _given_by_ties(model, sd)
    needed = [name for name, _, _, t in named_tensors(model) if t.device.type == "meta"]
    return [n for n in needed if n not in sd and n not in given]


def _tied_pairs(model: torch.nn.Module) -> dict[str, str | None]:
    """{target: source} of the weights a transformers model ties (source None: a
    plain list of targets, as older models declare them)."""
    pairs = getattr(model, "all_tied_weights_keys", None)
    if pairs is None:
        pairs = getattr(model, "_tied_weights_keys", None) or {}
    return dict(pairs) if isinstance(pairs, dict) else dict.fromkeys(pairs)


def _given_by_ties(model: torch.nn.Module, present) -> set[str]:
    """Names a tie fills from a tensor the checkpoint has. transformers 5 ties
    symmetrically: of a pair, the name the checkpoint lacks gets the other's."""
    given = set()
    for target, source in _tied_pairs(model).items():
        if source is None or source in present:
            given.add(target)
        if source is not None and target in present:
            given.add(source)
    return given


@contextmanager
def torch_default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _bind(model: torch.nn.Module, sd: dict[str, torch.Tensor], cls, name_or_path: str,
          warn: bool = True, default_way: bool | None = None) -> None:
    """Assign the store tensors; report unexpected and missing keys as the library does
    (unless `warn` is off: a second bind of the same model). `default_way`:
    `_loads_the_default_way(model)`, where the caller has it already."""
    slots = _state_slots(model)
    unexpected = [k for k in sd if k not in slots]
    reported = _not_ignored(model, cls, unexpected=unexpected)
    if reported and warn:
        logger.warning("Some weights of the checkpoint at %s were not used when initializing "
                       "%s: %s", name_or_path, cls.__name__, reported)
    for k in unexpected:
        sd.pop(k)
    initialised = [k for k in slots if k not in sd]
    for name, t in list(sd.items()):
        module, table, attr = slots[name]
        old = getattr(module, table)[attr]
        if old.dim() == 0 and t.shape == (1,):  # an old checkpoint's scalar: torch accepts it
            sd[name] = t = t[0]
        if t.shape != old.shape and not is_lazy(old):
            raise CompstoreError(
                f"{name_or_path}: tensor {name!r} is {tuple(t.shape)} in the store but "
                f"{tuple(old.shape)} in the {cls.__name__} its config.json builds: the "
                "component's config and weights disagree; re-ingest it from a consistent source")
    if default_way is None:
        default_way = _loads_the_default_way(model)
    if default_way:
        for name, t in sd.items():  # what load_state_dict(sd, strict=False, assign=True) does
            module, table, attr = slots[name]
            old = getattr(module, table)[attr]
            getattr(module, table)[attr] = (torch.nn.Parameter(t, requires_grad=old.requires_grad)
                                            if table == "_parameters" else t)
    else:
        model.load_state_dict(sd, strict=False, assign=True)
    if hasattr(model, "all_tied_weights_keys"):  # transformers 5, as its from_pretrained ties
        model.tie_weights(missing_keys=set(initialised), recompute_mapping=False)
    elif hasattr(model, "tie_weights"):
        model.tie_weights()
    given = _given_by_ties(model, sd)
    newly = _not_ignored(model, cls, missing=[k for k in initialised if k not in given])
    if newly and warn:
        logger.warning("Some weights of %s were not initialized from the model checkpoint at "
                       "%s and are newly initialized: %s", cls.__name__, name_or_path, newly)


def _not_ignored(model: torch.nn.Module, cls, *, unexpected: list[str] = (),
                 missing: list[str] = ()) -> list[str]:
    """The unexpected or missing keys the library would warn about: transformers' own
    rules (`_keys_to_ignore_on_load_*`, and old checkpoints' `position_ids` and
    `inv_freq` buffers), else the class's `_keys_to_ignore_on_load_unexpected`."""
    adjust = getattr(model, "_adjust_missing_and_unexpected_keys", None)
    if adjust is not None:
        if len(inspect.signature(adjust).parameters) == 1:  # transformers 5.17, 5.23: one info object
            info = types.SimpleNamespace(missing_keys=set(missing), unexpected_keys=set(unexpected))
            adjust(info)
            kept = info.missing_keys | info.unexpected_keys
        else:  # transformers 5.0: (missing, unexpected) -> (missing, unexpected)
            kept = set().union(*adjust(set(missing), set(unexpected)))
        return [k for k in [*unexpected, *missing] if k in kept]
    ignore = getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or []
    return [*[k for k in unexpected if not any(re.search(p, k) for p in ignore)], *missing]


def _state_slots(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, str, str]]:
    """Where each `state_dict()` key lives: (module, "_parameters" or "_buffers",
    attribute), every path of a shared module included, as state_dict names them."""
    return {name: (module, "_parameters" if attr in module._parameters else "_buffers", attr)
            for name, module, attr, _ in named_tensors(model)
            if attr in module._parameters or attr not in module._non_persistent_buffers_set}


def _loads_the_default_way(model: torch.nn.Module) -> bool:
    """Whether `load_state_dict(assign=True)` would just assign each tensor: no module
    loads or saves its state its own way (hooks, overrides, extra state) and no
    process-wide registration hook or swap-tensors mode is on. Then `_bind` assigns
    directly: ~4x faster for the SDXL UNet than the recursive load (34 ms)."""
    from torch.nn.modules import module as torch_module

    Module = torch.nn.Module
    if (torch_module._global_parameter_registration_hooks or torch_module._global_buffer_registration_hooks
            or torch.__future__.get_swap_module_params_on_conversion()):
        return False
    return all(type(m)._load_from_state_dict is Module._load_from_state_dict
               and type(m).get_extra_state is Module.get_extra_state
               and not (m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks
                        or m._state_dict_hooks or m._state_dict_pre_hooks)
               for m in model.modules())


def refuse_pickle_loading(use_safetensors) -> None:
    """`use_safetensors=False` asks for pickle checkpoints, which compstore never loads."""
    if use_safetensors is False:
        raise CompstoreError("use_safetensors=False: compstore stores and loads safetensors "
                             "only (pickle checkpoints are never loaded)")


# diffusers/transformers `from_pretrained` arguments about fetching or reading files,
# which the store decides: accepted and ignored, so that calls carry over unchanged.
_IGNORED_ARGUMENTS = ("cache_dir", "force_download", "proxies", "low_cpu_mem_usage", "disable_mmap",
                      "use_safetensors")


def _of_class(component: dict, model_class: type | None, name_or_path: str, slot: str) -> dict:
    """`component` (a row of `Store.components_of`), if it is a `model_class` model."""
    cls = resolve_class(component.get("library"), component.get("class_name"))
    if model_class is not None and not (isinstance(cls, type) and issubclass(cls, model_class)):
        where = f"{name_or_path}/{slot}" if slot else name_or_path
        stored = component.get("class_name") or "no model class"
        as_stand_in = (f"compstore.{stored}.from_pretrained or "
                       if component.get("library") in ("diffusers", "transformers") else "")
        raise ComponentNotFoundError(
            f"{where} holds {stored}, not {model_class.__name__}: load it with {as_stand_in}"
            "compstore.load_component")
    return component


class StandIn(type):
    """The metaclass of compstore's stand-ins for diffusers' classes: `isinstance(x,
    compstore.AutoencoderKL)` asks diffusers' class (`_loads_as`), calling one
    constructs it, and its other class attributes are its, as code written for
    diffusers expects of the name it imports; only the loading methods are compstore's."""

    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, cls._diffusers_class())

    def __call__(cls, *args, **kwargs):
        """`compstore.StableDiffusionXLPipeline(vae=vae, ...)` constructs diffusers' class,
        as code that imports the name from diffusers expects."""
        return cls._diffusers_class()(*args, **kwargs)

    def __getattr__(cls, name: str):
        """What compstore does not replace (`from_config`, `load_config`,
        `_optional_components`, ...) is diffusers' class's. Not `download`, which fills
        the Hugging Face cache, not the store."""
        if name.startswith("__") or name == "_diffusers_class":
            raise AttributeError(name)
        if name == "download":
            raise AttributeError(f"{cls.__name__}.download: compstore downloads into its store: "
                                 "use compstore.Store().pull(repo_id), or from_pretrained(repo_id)")
        return getattr(cls._diffusers_class(), name)

    def _diffusers_class(cls) -> type:
        import diffusers

        return cls._loads_as or diffusers.DiffusionPipeline


@functools.cache
def model_class(name: str) -> type:
    """compstore's stand-in for the diffusers (or transformers) model class `name`, for
    code that names its class (`from compstore import AutoencoderKL`, or
    `CLIPTextModel`): its `from_pretrained` is `load_component(..., model_class=<that
    class>)`, a model of that class loaded from the store, as the library's
    `from_pretrained` of that class loads it. An AttributeError for a name that is
    neither library's model class.

    >>> vae = compstore.AutoencoderKL.from_pretrained("org/sdxl-vae", dtype=torch.float16)  # doctest: +SKIP
    >>> te = compstore.CLIPTextModel.from_pretrained("sdxl-base", subfolder="text_encoder")  # doctest: +SKIP
    """
    import diffusers
    import transformers

    target = getattr(diffusers, name, None)
    # diffusers' AutoModel (`AutoModel.from_pretrained(repo, subfolder="transformer")`, as
    # model cards write it) loads the class the pipeline's index or the model's config
    # names: `load_component` with no class wanted does just that.
    auto = name == "AutoModel" and isinstance(target, type)
    if not (auto or isinstance(target, type) and issubclass(target, diffusers.ModelMixin)):
        try:
            target = getattr(transformers, name, None) if name[:1].isupper() else None
        except (ImportError, RuntimeError):  # a class whose backend is not installed
            target = None
    if not (auto or isinstance(target, type) and is_model_class(target)):
        raise AttributeError(f"{name!r} is not a model class of diffusers {diffusers.__version__} "
                             f"or transformers {transformers.__version__}")

    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, **kwargs):
        path = os.fspath(pretrained_model_name_or_path)
        model = load_component(path, subfolder=subfolder, model_class=None if auto else target, **kwargs)
        if auto:  # as diffusers' AutoModel marks it: a modular pipeline's update_components reads it
            model._diffusers_load_id = "|".join(
                "null" if part is None else part
                for part in (path, subfolder, kwargs.get("variant"), kwargs.get("revision")))
        return model

    def from_single_file(cls, pretrained_model_link_or_path_or_dict, *, store: Store | str | None = None,
                         name: str | None = None, **kwargs):
        """diffusers' `from_single_file` of this class: the checkpoint converted once and
        stored (`compstore.ingest_single_file`), then `load_component` of it."""
        from .pipeline import open_store
        from .single_file import from_single_file as convert_and_load

        store = open_store(store)
        return convert_and_load(target, pretrained_model_link_or_path_or_dict, store, name, kwargs,
                                lambda ref, kw: load_component(ref, store=store, model_class=target, **kw))

    doc = (f"Loads `{target.__module__.split('.')[0]}.{name}` models from a compstore store: "
           "`from_pretrained` takes compstore.load_component's arguments.")
    methods = {"from_pretrained": classmethod(from_pretrained)}
    if hasattr(target, "from_single_file"):
        methods["from_single_file"] = classmethod(from_single_file)
    return StandIn(name, (), {**methods, "_loads_as": target, "__doc__": doc, "__module__": "compstore"})


def load_component(
    name_or_path: str,
    slot: str = "",
    *,
    dtype: torch.dtype | None = None,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
    store: Store | str | None = None,
    device_map: str | torch.device | None = None,
    pool: ResidencyPool | None = None,
    verify: bool = False,
    subfolder: str | None = None,
    revision: str | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
    model_class: type | None = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """Load one model from a ref (or a folder, ingested on the way, or a Hub repo id,
    of which only the model's folder is pulled on the way) without the pipeline.

    `slot` (or diffusers' `subfolder`) names the model in a pipeline (in a modular
    one whose entry points at another repo, the model pinned for it). `device_map`
    (or `pool`) puts it on a device through its residency pool, as `to_device`
    does. `verify=True` re-hashes its tensors first and raises `CorruptStoreError`
    on damage. `model_class`: the class wanted (`compstore.AutoencoderKL` passes
    its own); a model of another class is refused (`ComponentNotFoundError`) before
    a folder is ingested. `quantization_config` (a torchao or bitsandbytes config of
    the model's library) quantizes the stored weights as the library's
    `from_pretrained` quantizes a file's (quantized.py). Arguments about fetching
    files (`cache_dir`, `force_download`, ...) are accepted and ignored; any other
    raises a TypeError.

    >>> unet = compstore.load_component("sdxl-base", "unet", dtype=torch.float16)  # doctest: +SKIP
    >>> vae = compstore.load_component("my-vae", device_map="cuda")  # doctest: +SKIP
    """
    from .pipeline import open_store, resolve_snapshot, saved_quantized, target_pool
    from .quantized import check_quantization

    if subfolder is not None and slot and subfolder != slot:
        raise CompstoreError(f"load_component: slot={slot!r} and subfolder={subfolder!r} disagree")
    slot = slot or subfolder or ""
    refuse_pickle_loading(kwargs.get("use_safetensors"))
    quantization_config = kwargs.pop("quantization_config", None)
    unknown = sorted(set(kwargs) - set(_IGNORED_ARGUMENTS))
    if unknown:
        raise TypeError(f"load_component() got unexpected keyword arguments {unknown}")
    dtype = dtype_argument({"dtype": dtype, "torch_dtype": torch_dtype})
    pool = target_pool(device_map, pool)
    store = open_store(store)
    picked: list[dict] = []  # check's last call is on the stored snapshot's rows

    def check(rows: list[dict]) -> None:  # a folder's rows: before its ingest
        picked.append(_of_class(pick_component(rows, slot, variant, fallback=False), model_class,
                                name_or_path, slot))
        if quantization_config is not None and not saved_quantized(store, picked[-1]):
            check_quantization(quantization_config, resolve_class(picked[-1]["library"], picked[-1]["class_name"]),
                               dtype=dtype, where=f"{name_or_path}/{slot}" if slot else name_or_path)

    snapshot_id, label = resolve_snapshot(  # a Hub repo: only the slot's folder is pulled
        store, name_or_path, revision=revision, variant=variant, local_files_only=local_files_only,
        token=token, slot=slot, check=check)
    comp = picked[-1]
    name = f"{label}/{slot}" if slot else label
    with exclusive_load(), store.reading_snapshot(snapshot_id, label):  # one load at a time; gc waits
        model = build_model(store, comp, dtype=dtype, name_or_path=name, verify=verify,
                            quantization_config=quantization_config)
    if pool is not None:
        to_device(model, pool.device, pool=pool)
    return model
