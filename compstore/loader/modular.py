"""`compstore.ModularPipeline.from_pretrained`: diffusers modular pipelines from the store.

    >>> pipe = compstore.ModularPipeline.from_pretrained("my-modular-sdxl")
    >>> pipe.load_components(torch_dtype=torch.float16)

The pipeline is diffusers' own (e.g. `StableDiffusionXLModularPipeline`), built
from a skeleton folder whose index points every slot at the skeleton itself; its
specs then record, as diffusers' do, where the repo's own index points (another
repo, a pinned revision), so load ids and `save_pretrained` are diffusers'. Its
`load_components` is replaced, on this instance only, by one that builds models
from the store: a slot's own weights, or the component pinned for it when the
repo pointed elsewhere. Tokenizers and schedulers load from the skeleton. After
it, the pipeline's `.to(device)` goes through the residency pool as a classic
pipeline's does: one move, one report, the budget settled once.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from types import MethodType
from typing import Any

from ..store import Store
from ..store.components import pick_component
from ..store.modular import components_with_pins
from .component import build_model, dtype_argument, is_model_class
from .loading import exclusive_load
from .pipeline import _skeleton_file, open_store, per_slot, resolve_snapshot
from .routing import route_through_pool
from .tensors import private_packs

logger = logging.getLogger("compstore")


class ModularPipeline:
    """Loads diffusers modular pipelines from a compstore store; see `from_pretrained`."""

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        store: Store | str | os.PathLike | None = None,
        **kwargs: Any,
    ):
        """Drop-in for `diffusers.ModularPipeline.from_pretrained`, from the store.

        `pretrained_model_name_or_path` is a ref or a local folder (ingested, its
        pointers pinned). Returns diffusers' modular pipeline class; call
        `load_components(...)` on it as usual (dtype, variant per name or "default").

        >>> pipe = compstore.ModularPipeline.from_pretrained("tiny-sdxl-modular")  # doctest: +SKIP
        >>> pipe.load_components(torch_dtype=torch.float32)  # doctest: +SKIP
        """
        import diffusers

        store = open_store(store)
        snapshot_id, label = resolve_snapshot(
            store, pretrained_model_name_or_path, revision=kwargs.pop("revision", None),
            local_files_only=kwargs.pop("local_files_only", None), token=kwargs.get("token"),
            index=("modular_model_index.json", "model_index.json"))
        skeleton = store.materialize(snapshot_id, _skeleton_file)
        with exclusive_load():  # diffusers resolves the blocks' classes (lazy imports)
            pipe = diffusers.ModularPipeline.from_pretrained(str(skeleton), **kwargs)
        here = _record_published_specs(pipe, store, snapshot_id, os.fspath(pretrained_model_name_or_path),
                                       str(skeleton))
        pipe.load_components = MethodType(_store_load_components(store, snapshot_id, label, here), pipe)
        return pipe


_LOADING_FIELDS = ("pretrained_model_name_or_path", "subfolder", "variant", "revision")


def _record_published_specs(pipe, store: Store, snapshot_id: str, given: str, skeleton: str) -> dict[str, dict]:
    """Make the pipeline record, as diffusers' does, where the repo's own index says
    each component comes from (another repo, at a pinned revision), not the skeleton
    it is loaded from; a classic pipeline's components come from the name the load
    was `given`, with their folders. Each loaded component's load id is then the one
    diffusers gives it, and `save_pretrained(..., overwrite_modular_index=False)`
    keeps the repo's pointers (until 2026-12-07 it wrote the skeleton's). Returns the
    skeleton's loading fields per slot, where `load_components` reads small parts from."""
    raw = store.read_file(snapshot_id, "modular_model_index.json")
    published = json.loads(raw) if raw else None
    here: dict[str, dict] = {}
    for name, spec in pipe._component_specs.items():
        entry = (published or {}).get(name)
        if isinstance(entry, list) and len(entry) == 3 and isinstance(entry[2], dict):
            fields = {field: entry[2].get(field) for field in _LOADING_FIELDS}
        elif published is None and spec.pretrained_model_name_or_path == skeleton:
            fields = {"pretrained_model_name_or_path": given, "subfolder": spec.subfolder,
                      "variant": spec.variant, "revision": None}
        else:
            continue
        here[name] = {field: getattr(spec, field) for field in _LOADING_FIELDS}
        for field, value in fields.items():
            setattr(spec, field, value)
        if name in pipe.config:
            library, class_name, _ = pipe.config[name]
            pipe.register_to_config(**{name: (library, class_name, pipe._component_spec_to_dict(spec))})
    return here


def _store_load_components(store: Store, snapshot_id: str, label: str, here: dict[str, dict]):
    @exclusive_load()
    def load_components(self, names: list[str] | str | None = None, workflow: str | None = None,
                        **kwargs: Any) -> None:
        """Load components as diffusers' `load_components` does, models from the store."""
        if workflow is not None and names is not None:
            raise ValueError("Pass either `names` or `workflow`, not both.")
        specs = self._component_specs
        if names is None:
            names = [n for n, spec in specs.items()
                     if spec.default_creation_method == "from_pretrained"
                     and spec.pretrained_model_name_or_path is not None
                     and getattr(self, n, None) is None]
        elif isinstance(names, str):
            names = [names]
        if workflow is not None:
            wanted = {s.name for s in self.blocks.get_workflow(workflow).expected_components}
            names = [n for n in names if n in wanted]
        dtype = dtype_argument(kwargs)
        variant = kwargs.pop("variant", None)
        quantization = kwargs.pop("quantization_config", None)  # one config, or one per name as dtype
        packs = private_packs(store)
        loaded = {}
        with store.reading_snapshot(snapshot_id, label):  # gc deletes no row, unlinks no pack
            rows = components_with_pins(store, snapshot_id)  # a slot's own model, else its pin
            for name in names:
                spec = specs.get(name)
                if spec is None:
                    continue
                if per_slot(variant, name) is not None:  # as diffusers' spec.load records it
                    spec.variant = per_slot(variant, name)
                if is_model_class(spec.type_hint):
                    comp = pick_component(rows, name, per_slot(variant, name))
                    loaded[name] = build_model(store, comp, dtype=per_slot(dtype, name),
                                               name_or_path=f"{label}/{name}", packs=packs,
                                               quantization_config=per_slot(quantization, name))
                elif spec.pretrained_model_name_or_path:
                    local = copy.copy(spec)  # tokenizers, schedulers: from the skeleton
                    for field, value in here.get(name, {}).items():
                        setattr(local, field, value)
                    try:
                        loaded[name] = local.load(**{k: per_slot(v, name) for k, v in kwargs.items()})
                    except Exception as e:  # diffusers, too, only warns and goes on
                        logger.warning("Failed to create component %s: %s", name, e)
                        continue
                else:
                    continue
                loaded[name]._diffusers_load_id = spec.load_id  # where the repo says it is from
        self.register_components(**loaded)
        route_through_pool(self)  # pipe.to("cuda"): one move of every model through the pool

    return load_components
