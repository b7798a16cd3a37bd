"""`compstore.DiffusionPipeline.from_pretrained`: a drop-in for diffusers', from the store.

    >>> import compstore, torch
    >>> pipe = compstore.DiffusionPipeline.from_pretrained("sdxl-base", dtype=torch.float16)

How a pipeline is put together:
1. `name_or_path` becomes a snapshot: a local folder, ingested on the way (under a
   ref named by its absolute path); a Hub repo id, pulled on the way (only what
   the store lacks is downloaded; `local_files_only=True` uses the store's ref
   and never touches the network); or any other ref of the store.
2. Every weight-bearing slot of model_index.json is built by `prepare_model` (a
   clone of the component's template, `warm`) from deduplicated store tensors:
   zero-copy views on CPU, device tensors through a residency pool, bound only
   after step 3 has loaded the tokenizers, so that uploads run behind them.
3. The small files (model_index.json, scheduler/, tokenizer*/ ...) are written once
   per snapshot to a skeleton folder, and diffusers' own pipeline class loads the
   rest from there with the built models passed in: the returned object is the
   ordinary diffusers pipeline.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ..store import ComponentNotFoundError, CompstoreError, InvalidInputError, RefNotFoundError, Store
from ..store.hub import HubUnavailableError, hub_reachable, is_repo_id, revision_commit
from ..store.modular import components_with_pins, missing_slots
from ..store.scan import FolderScan
from ..store.components import pick_component, require_variant
from . import warm
from .component import (StandIn, dtype_argument, is_model_class, no_weights, prepare_model,
                        refuse_pickle_loading, resolve_class)
from .loading import exclusive_load, warnings_dropped
from .quantized import (check_pipeline_quantization, check_quantization, check_saved_pieces, model_quantization,
                        saved_quantization)
from .residency import POOL, ResidencyPool, TransferReport, pool_for, record_report, usable_device
from .routing import route_through_pool
from .tensors import private_packs

logger = logging.getLogger("compstore")

_WEIGHT_FILE = re.compile(r"(\.safetensors|\.safetensors\.index(\.[^.]+)?\.json|\.bin|\.ckpt|\.pt|\.pth|\.pkl|\.pickle)$")


def open_store(store: Store | str | os.PathLike | None) -> Store:
    return store if isinstance(store, Store) else Store(store)


def resolve_snapshot(
    store: Store,
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    local_files_only: bool | None = None,
    variant: str | None = None,
    token: str | bool | None = None,
    slot: str | None = None,
    skip: Iterable[str] = (),
    check: Callable[[list[dict]], object] | None = None,
    index: tuple[str, ...] = (),
    **_: Any,
) -> tuple[str, str]:
    """(snapshot id, label) for a local folder (ingested on the way), a Hub repo id
    (pulled on the way, with `token` if given; if the Hub gives no metadata for it,
    the store's copy, with a warning) or a store ref.

    `slot`: only that model of a pipeline is wanted, so a pull fetches its folder
    alone (as diffusers' `subfolder=` downloads it alone). `skip`: folders not
    wanted, the components a load is given (or given None): a pull leaves them out,
    as diffusers' download does. `check(components)` (rows
    as `Store.components_of` gives them) raises for what the caller refuses, a
    variant or a slot the pipeline lacks; a folder's is checked before its ingest,
    as is whether a model saved quantized can load here, so that a refused load
    leaves the store as it was. Its last call is always on
    the rows of the snapshot returned, pinned models included. `index`: a folder
    must hold one of these files at its root (a pipeline's model_index.json), or it
    is refused before it is even walked.
    """
    label = os.fspath(name_or_path)
    if not label.strip():  # Path("") is the working folder: never ingest that by accident
        raise InvalidInputError(repr(label), "an empty name: pass a store ref, a folder or a Hub repo id")
    path = Path(label).expanduser()
    if path.is_dir() and index and not any((path / name).is_file() for name in index):
        hint = (" (it is a modular pipeline: use compstore.ModularPipeline)"
                if (path / "modular_model_index.json").is_file() else "")
        raise InvalidInputError(label, f"not a diffusers pipeline folder: it holds no "
                                f"{' or '.join(index)}{hint}")
    if path.is_dir():
        skipped = set(skip)

        def check_folder(scan: FolderScan) -> None:
            if scan.kind == "modular":  # checked once its pointers are pulled, its models as built
                return
            configs = {c.slot: scan.config(c.slot) for c in scan.components}  # each file read once
            saved = {s: saved_quantization(config or {}) for s, config in configs.items()}
            for c in scan.components:  # the models to build: loadable here, none without weights
                if c.slot in skipped or (slot and c.slot != slot):
                    continue
                where = f"{label}/{c.slot}" if c.slot else label
                if configs[c.slot] is None or not is_model_class(model := resolve_class(c.library, c.class_name)):
                    continue
                if not c.weight_files:
                    raise no_weights(where, c.class_name)
                if saved[c.slot] is not None:  # its library's checks (bitsandbytes: a GPU), its tensors whole
                    check_quantization(saved[c.slot], model, dtype=None, where=where, pre_quantized=True)
                    check_saved_pieces([scan.files[path].header for path in c.weight_files], where,
                                       saved[c.slot])
            if check is not None:
                check([{"slot": c.slot, "variant": c.variant, "library": c.library, "class_name": c.class_name,
                        "saved_quantized": saved[c.slot] is not None} for c in scan.components])

        snapshot_id = store.ingest(path, str(path.resolve()), token=token, check=check_folder).snapshot
    elif is_repo_id(label) and not local_files_only and hub_reachable():
        # A repo id: the Hub names the commit; only what the store lacks is downloaded.
        try:
            pulled = store.pull(label, revision=revision, variant=variant, token=token,
                                include=[f"{slot}/*"] if slot else None,
                                exclude=[f"{s}/*" for s in skip] or None)
            snapshot_id = store.resolve(pulled.ref)
        except HubUnavailableError as e:  # as diffusers falls back to its cache
            try:
                snapshot_id = _stored_snapshot(store, label, revision, variant, slot, set(skip))
            except RefNotFoundError:
                raise e from None
            logger.warning("%s\nLoading the store's %s (commit %s) instead.", e, label,
                           store.snapshot(snapshot_id)["revision"] or "unknown")
    else:
        try:
            snapshot_id = _stored_snapshot(store, label, revision, variant, slot, set(skip))
        except RefNotFoundError:
            if not _looks_like_a_path(label):
                raise
            raise RefNotFoundError(label, str(store.home), path=True) from None  # a mistyped folder, most likely
    if check is not None:
        check(components_with_pins(store, snapshot_id))
    return snapshot_id, label


def _looks_like_a_path(label: str) -> bool:
    """A name no Hub repo id or ref of a pull has: "./my-pipe", "/models/x", "~/x", "a/b/c"."""
    return label.startswith((".", "/", "~")) or label.count("/") > 1 or "\\" in label


def _stored_snapshot(store: Store, label: str, revision: str | None, variant: str | None,
                     slot: str | None, skip: set[str]) -> str:
    """The snapshot of a ref named `label`, as pulls name them: `label@revision`, the
    latest pull's `label` (`label[variant]` for a variant), and, for a load that
    wants part of a pipeline (one `slot`, or all but `skip`), the latest pull of
    that part (`label@<commit>`, which such pulls make and do not move `label`).
    With a `revision`, `label` only if it was pulled at that commit, or the revision
    is "main" (a pull without one), for a short commit the pull of the commit it
    starts, and for a branch, tag or PR the pulls of the commit a pull at that name
    got (`revision_commit`): never another commit than the one asked for."""
    candidates = [f"{label}@{revision}", label] if revision else [label]
    if variant:  # a pull in that variant made `repo@commit[variant]` and `repo[variant]`
        candidates = [ref for c in candidates for ref in (f"{c}[{variant}]", c)]
    for ref in candidates:
        if store.has_ref(ref):
            snapshot_id = store.resolve(ref)
            if (ref.startswith(f"{label}@") or revision in (None, "main")
                    or (store.snapshot(snapshot_id)["revision"] or "").startswith(revision)):
                return snapshot_id
    if revision and re.fullmatch(r"[0-9a-f]{7,39}", revision):  # a short commit: its pull's ref
        whole = re.compile(re.escape(revision) + r"[0-9a-f]{%d}" % (40 - len(revision))
                           + (rf"(\[{re.escape(variant)}\])?" if variant else ""))
        for name, snapshot_id in sorted(store.pulls(label), reverse=True):  # `[variant]` sorts first
            if whole.fullmatch(name[len(label) + 1:]):
                return snapshot_id
    commit = revision_commit(store, label, revision) if revision else None
    if commit is not None:  # a branch, tag or PR a pull named: that commit's pulls, parts too
        try:
            return _stored_snapshot(store, label, commit, variant, slot, skip)
        except RefNotFoundError:
            pass
    if (slot or skip) and not revision:
        suffix = f"[{variant}]" if variant else ""
        for name, snapshot_id in store.pulls(label):
            if name.endswith(suffix) and _holds(store, snapshot_id, slot, skip):
                return snapshot_id
    raise RefNotFoundError(f"{label}@{revision}" if revision else label, str(store.home), store.ref_names())


def saved_quantized(store: Store, row: dict) -> bool:
    """Whether the model of `row` (a folder's, checked before its ingest, or a row of
    `Store.components_of`) was saved quantized. A quantization config given for it is
    then the library's to set aside (the saved one wins, with a warning), not one to
    check: a GGUF or bitsandbytes config named for a torchao model loads it, as in
    diffusers."""
    if "saved_quantized" in row:
        return row["saved_quantized"]
    config = store.component_config(row["component_id"]) if row.get("component_id") else None
    return saved_quantization(config or {}) is not None


def _holds(store: Store, snapshot_id: str, slot: str | None, skip: set[str]) -> bool:
    """Whether a snapshot holds `slot`, or else its pipeline but (at most) `skip`."""
    if slot:
        return any(c["slot"] == slot for c in components_with_pins(store, snapshot_id))
    return store.snapshot(snapshot_id)["kind"] == "pipeline" and missing_slots(store, snapshot_id) <= skip


def per_slot(value, slot: str, missing=None):
    """A per-slot argument as diffusers takes it: a value, or {"unet": v, "default": w}.
    A dict that names neither the slot nor "default" gives `missing`: None (the
    library's own default) for a modular pipeline's `load_components`, as diffusers'
    does; a classic pipeline passes float32 for `dtype`, as diffusers' `from_pretrained`
    does (a text encoder whose config says float16 then loads as float32, not float16)."""
    if isinstance(value, dict):
        return value.get(slot, value.get("default", missing))
    return value


def _skeleton_file(path: str) -> bool:
    return not _WEIGHT_FILE.search(path)


class DiffusionPipeline(metaclass=StandIn):
    """Loads diffusers pipelines from a compstore store; see `from_pretrained`.
    `isinstance(pipe, compstore.DiffusionPipeline)` is diffusers' isinstance."""

    # The diffusers class a load assembles: None, the one model_index.json names; in
    # the stand-ins `pipeline_class(name)` makes, diffusers' class of that name.
    _loads_as: type | None = None

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        store: Store | str | os.PathLike | None = None,
        **kwargs: Any,
    ):
        """Drop-in for `diffusers.DiffusionPipeline.from_pretrained`, from deduplicated weights.

        Args:
            pretrained_model_name_or_path: a local pipeline folder (ingested on the
                way), a Hub repo id (pulled on the way), or a store ref.
            store: a `Store` or its folder (default: `$COMPSTORE_HOME`).
            **kwargs: as diffusers: `dtype`/`torch_dtype` (a dtype, its name, "auto", or a
                per-slot dict),
                `variant`, `revision`, `use_safetensors`, `low_cpu_mem_usage`,
                `device_map`, `local_files_only`, `quantization_config` (a
                `PipelineQuantizationConfig`: the models it names are quantized as
                diffusers quantizes them, quantized.py), components by slot name (`None`
                skips one), and pipeline config overrides. compstore adds `verify=True`:
                re-hash every tensor and refuse corrupted ones (`CorruptStoreError`);
                `pool=`: the `ResidencyPool` to load onto (default: the device's own
                for `device_map="cuda"`); `private=True`: build every model anew, load
                tokenizers and schedulers anew, and upload private device copies
                (for users who edit weights in place).

        With a device (`device_map` or `pool`), models are built onto it through its
        residency pool: tensors already resident are reused, only the rest are
        uploaded, and the report is `compstore.last_transfer()`. A component loaded
        before in this process is cloned from its template instead of rebuilt, and
        tokenizers loaded from the same files are shared, as `from_pipe` shares them
        (docs/gpu-residency.md).

        Returns:
            The diffusers pipeline class named in model_index.json, e.g.
            `StableDiffusionPipeline`; for a stand-in of a class
            (`compstore.StableDiffusionXLImg2ImgPipeline`, `pipeline_class`), that
            class, or for an AutoPipelineFor*, the class diffusers' picks.

        >>> pipe = compstore.DiffusionPipeline.from_pretrained("tiny-sd", dtype=torch.float16)  # doctest: +SKIP
        """
        dtype = dtype_argument(kwargs)
        if dtype == "auto":  # not a torch.dtype: diffusers' pipelines load float32, and say so
            logger.warning("dtype='auto' is not a torch.dtype: loading float32, as diffusers does "
                           "(a per-slot {'text_encoder': 'auto'} is transformers' \"auto\")")
            dtype = torch.float32
        store = open_store(store)
        variant = kwargs.pop("variant", None)
        verify = kwargs.pop("verify", False)
        private = kwargs.pop("private", False)
        device_map = kwargs.pop("device_map", None)
        if kwargs.pop("low_cpu_mem_usage", None) is False and device_map is not None:
            raise ValueError(  # diffusers' refusal, word for word (binding is always low-memory)
                f"You cannot set `low_cpu_mem_usage` to False while using device_map={device_map} "
                "for loading and dispatching. Please make sure to set `low_cpu_mem_usage=True`.")
        pool = target_pool(device_map, kwargs.pop("pool", None))
        refuse_pickle_loading(kwargs.pop("use_safetensors", None))
        quantization = kwargs.pop("quantization_config", None)
        check_pipeline_quantization(quantization)  # before any ingest
        label = os.fspath(pretrained_model_name_or_path)
        target = cls._loads_as

        def check(rows: list[dict]) -> None:  # a folder's rows: before its ingest
            require_variant(rows, variant, label)
            refuse_missing_modules(target, {row["slot"] for row in rows}, kwargs, label)
            refuse_unknown_classes(rows, kwargs, label)
            for row in rows if quantization is not None else ():
                model = resolve_class(row["library"], row["class_name"])
                if row["slot"] not in kwargs and is_model_class(model) and not saved_quantized(store, row):
                    q = model_quantization(quantization, model, row["slot"])
                    if q is not None:
                        check_quantization(q, model, where=f"{label}/{row['slot']}",
                                           dtype=per_slot(dtype, row["slot"], torch.float32))

        snapshot_id, label = resolve_snapshot(  # an ingest or a download: other threads' loads go on
            store, label, revision=kwargs.pop("revision", None),
            local_files_only=kwargs.pop("local_files_only", None), variant=variant,
            token=kwargs.get("token"), skip=kwargs,  # components passed in: not pulled
            check=check, index=("model_index.json",))
        with exclusive_load():  # one load at a time per process, the collector paused (loading.py)
            return _assemble(store, snapshot_id, label, dtype=dtype, variant=variant, verify=verify,
                             private=private, pool=pool, target=target, quantization=quantization,
                             kwargs=kwargs)

    @classmethod
    def from_single_file(
        cls,
        pretrained_model_link_or_path: str | os.PathLike,
        *,
        store: Store | str | os.PathLike | None = None,
        name: str | None = None,
        **kwargs: Any,
    ):
        """Drop-in for diffusers' `from_single_file` of this class: the checkpoint (a
        `.safetensors` file, or a Hub URL of one, pulled into the store first) is
        converted by diffusers once and stored (`compstore.ingest_single_file`, under
        ref `name`, default the file's absolute path), then loaded from the store as
        `from_pretrained` loads that ref, with the other arguments (`dtype`,
        `device_map`, components as keyword arguments, ...). No dtype: float32, as
        diffusers' `from_single_file` gives it.

        `config`, `original_config`, `local_files_only`, `token`, `revision`,
        `cache_dir` and `disable_mmap` are diffusers' and go to the conversion;
        `config` may also name a store ref (its stored configs: no network).

        >>> pipe = compstore.StableDiffusionXLPipeline.from_single_file("./model.safetensors", dtype=torch.float16)  # doctest: +SKIP
        """
        from .single_file import from_single_file

        if cls._loads_as is None:
            raise CompstoreError(
                "compstore.DiffusionPipeline.from_single_file: a single-file checkpoint does not "
                "name its pipeline class, as diffusers' DiffusionPipeline has no from_single_file: "
                "call it on the class, e.g. compstore.StableDiffusionXLPipeline.from_single_file")
        store = open_store(store)
        return from_single_file(cls._loads_as, pretrained_model_link_or_path, store, name, kwargs,
                                lambda ref, kw: cls.from_pretrained(ref, store=store, **kw))

    @classmethod
    def from_pipe(cls, pipeline, **kwargs: Any):
        """Drop-in for diffusers' `from_pipe`: diffusers' own, for this class (for
        `compstore.DiffusionPipeline`, diffusers'; for an AutoPipelineFor*, the class
        it picks), sharing `pipeline`'s models, none loaded again. The new pipeline's
        `.to(device)` goes through the residency pool, as the original's does. As in
        diffusers, its models are cast to `dtype` (float32 if not given) in place, so
        pass the dtype `pipeline` has.

        >>> img2img = compstore.AutoPipelineForImage2Image.from_pipe(pipe, dtype=torch.float16)  # doctest: +SKIP
        """
        pipe = cls._diffusers_class().from_pipe(pipeline, **kwargs)
        route_through_pool(pipe)
        if getattr(pipeline, POOL, None) is not None:
            setattr(pipe, POOL, getattr(pipeline, POOL))
        return pipe


@functools.cache
def pipeline_class(name: str) -> type[DiffusionPipeline]:
    """compstore's stand-in for the diffusers pipeline class `name`, for code that
    names its class (`from compstore import StableDiffusionXLImg2ImgPipeline`, or
    `AutoPipelineForImage2Image`): its `from_pretrained` loads from the store into
    that class, as diffusers' `from_pretrained` of that class loads into it (an SDXL
    base repo as an img2img pipeline; an AutoPipelineFor* picks the class diffusers
    picks). An AttributeError for a name that is not a diffusers pipeline class.

    >>> pipe = compstore.pipeline_class("StableDiffusionXLImg2ImgPipeline").from_pretrained("sdxl-base")  # doctest: +SKIP
    """
    import diffusers

    if name == "DiffusionPipeline":
        return DiffusionPipeline
    target, auto = getattr(diffusers, name, None), name.startswith("AutoPipelineFor")
    if not (isinstance(target, type) and (issubclass(target, diffusers.DiffusionPipeline) or auto)):
        raise AttributeError(
            f"{name!r} is not a pipeline class of diffusers {diffusers.__version__}: compstore stands in for "
            "diffusers' pipeline and AutoPipelineFor* classes (a model: compstore.<its diffusers class> "
            "or compstore.load_component; a modular pipeline: compstore.ModularPipeline)")
    doc = (f"Loads `diffusers.{name}` from a compstore store: `from_pretrained` takes "
           "compstore.DiffusionPipeline.from_pretrained's arguments.")
    return type(name, (DiffusionPipeline,), {"_loads_as": target, "__doc__": doc, "__module__": "compstore"})


def refuse_unknown_classes(rows: list[dict], given: dict, label: str) -> None:
    """Refuse a model whose class neither diffusers nor transformers has: the repo's own
    code (`trust_remote_code`), or a class of a newer release. Until 2026-12-07 such a
    slot was taken for a tokenizer's and failed with "no file named
    diffusion_pytorch_model.bin found in directory .../skeletons/..."."""
    import diffusers
    import transformers

    for row in rows:
        if row["slot"] in given or not row["library"] or resolve_class(row["library"], row["class_name"]):
            continue
        raise CompstoreError(
            f"{label}/{row['slot']}: {row['library']}.{row['class_name']} is not a class of diffusers "
            f"{diffusers.__version__} or transformers {transformers.__version__}: the repo's own code "
            f"(trust_remote_code), or a newer release's class. compstore builds those libraries' models "
            f"only: upgrade them, or load this pipeline with diffusers")


def refuse_missing_modules(target: type | None, slots: set[str], kwargs: dict, label: str) -> None:
    """A pipeline class needs modules the pipeline has no folder for (`slots`), and
    neither are they passed nor optional: diffusers raises a ValueError once it has
    loaded the others; this one is raised before any load."""
    import diffusers

    if target is None or not issubclass(target, diffusers.DiffusionPipeline):
        return  # the class model_index.json names, or the one an AutoPipelineFor* picks
    expected, _ = target._get_signature_keys(target)
    missing = set(expected) - slots - set(kwargs) - set(target._optional_components)
    if missing:
        raise ComponentNotFoundError(
            f"{label} does not load as {target.__name__}: that class needs {sorted(missing)}, which "
            f"the pipeline does not hold (it has {sorted(slots)}); pass them as keyword arguments, "
            "or load it as compstore.DiffusionPipeline (the class model_index.json names)")


def _assemble(store: Store, snapshot_id: str, label: str, **options: Any):
    """The pipeline of a snapshot (`_build`), read under `store.reading()` from start to
    end: meanwhile gc deletes neither the snapshot's catalog rows nor its packs or
    skeleton. One removed (rm, then gc) since its name was resolved is a
    `RefNotFoundError`: before, the load failed wherever it next read the catalog."""
    with store.reading_snapshot(snapshot_id, label):
        return _build(store, snapshot_id, label, **options)


def _build(store: Store, snapshot_id: str, label: str, *, dtype, variant: str | None,
           verify: bool, private: bool, pool: ResidencyPool | None, target: type | None,
           quantization: Any, kwargs: dict[str, Any]):
    """The pipeline of a snapshot: its models built (onto `pool`'s device, if any),
    its small parts loaded, and diffusers' own class putting them together: `target`,
    else the class model_index.json names."""
    import diffusers

    raw_index = store.read_file(snapshot_id, "model_index.json")
    if raw_index is None:
        hint = (" (it is a modular pipeline: use compstore.ModularPipeline)"
                if store.read_file(snapshot_id, "modular_model_index.json") else "")
        raise CompstoreError(f"{label} has no model_index.json{hint}")
    index = json.loads(raw_index)
    pipeline_cls = target or getattr(diffusers, str(index.get("_class_name")), None)
    if target is None and not (isinstance(pipeline_cls, type)
                               and issubclass(pipeline_cls, diffusers.DiffusionPipeline)):
        raise CompstoreError(
            f"{label}: model_index.json names the pipeline class {index.get('_class_name')!r}, "
            f"which diffusers {diffusers.__version__} does not have; upgrade diffusers, or "
            "fix _class_name in the pipeline's model_index.json and ingest it again")

    rows = store.components_of(snapshot_id)
    packs = private_packs(store, verified=verify)  # one set of mappings for this pipeline
    skeleton = store.materialize(snapshot_id, _skeleton_file)
    built: dict[str, Any] = {}
    files = None  # the snapshot's (path, file id, sha256, size), read when first needed
    report = TransferReport(str(pool.device)) if pool else None
    with contextlib.ExitStack() as cleanup:
        if pool is not None:  # uploads a failed load started are dropped
            cleanup.callback(pool.drop_prefetched)
        # Only the modules the class takes (an AutoPipelineFor*'s classes take the index's).
        takes = (set(pipeline_cls._get_signature_keys(pipeline_cls)[0])
                 if issubclass(pipeline_cls, diffusers.DiffusionPipeline) else set(index))
        slots = {slot: resolve_class(*entry[:2]) for slot, entry in index.items()
                 if not (slot.startswith("_") or slot in kwargs or not isinstance(entry, list)
                         or entry[0] is None or slot not in takes)}
        models = {slot: prepare_model(  # with a pool, each fresh build starts its upload ...
            store, pick_component(rows, slot, variant), dtype=per_slot(dtype, slot, torch.float32),
            name_or_path=f"{label}/{slot}", packs=packs, verify=verify, pool=pool, private=private,
            quantization_config=model_quantization(quantization, cls, slot))
            for slot, cls in slots.items() if is_model_class(cls)}
        for slot, cls in slots.items():  # ... which runs on while tokenizers, schedulers load
            if slot not in models:
                files = files if files is not None else store.snapshot_files(snapshot_id)
                part = small_part(files, skeleton, slot, cls, private)
                if part is not None:
                    built[slot] = part
        for slot, finish in models.items():  # resident and uploaded tensors bound
            built[slot] = finish()
            if pool is not None:
                report.components.append(pool.move(built[slot], slot, private=private, wait=False, settle=False))
                setattr(built[slot], POOL, pool)

    # diffusers warns that it "cannot verify" a component passed in whose class is in a
    # pipeline module (SD 1.5's safety checker), and prints the whole module: the class
    # is the one the index names, built here (a user's own component keeps the warning)
    ours = tuple(f"You have passed a non-standard module {m}." for m in built.values()
                 if type(m).__module__.startswith("diffusers.pipelines."))
    with warnings_dropped("diffusers.pipelines.pipeline_loading_utils", ours):
        pipe = pipeline_cls.from_pretrained(skeleton, **built, **kwargs)
    pipe.register_to_config(_name_or_path=label)
    if quantization is not None:  # as diffusers records it
        from diffusers.pipelines.pipeline_loading_utils import _maybe_warn_for_wrong_component_in_quant_config

        _maybe_warn_for_wrong_component_in_quant_config(pipe.components, quantization)
        pipe.quantization_config = quantization
    route_through_pool(pipe)
    if pool is not None:
        t0 = time.perf_counter()
        pool.settle()  # only now: every model holds what it reuses
        pool.wait_uploads()  # copies from the pinned tier ran behind the Python work since
        setattr(pipe, POOL, pool)  # later pipe.to(device) moves go through it too
        report.seconds = round(sum(c.seconds for c in report.components) + time.perf_counter() - t0, 6)
        record_report(pool, report)
    return pipe


def target_pool(device_map, pool: ResidencyPool | None) -> ResidencyPool | None:
    """The residency pool a load goes through: `pool`, else the process-wide pool of a
    non-CPU `device_map` device, else none (the pipeline stays on CPU)."""
    if device_map is not None:
        if not isinstance(device_map, (str, torch.device)) or device_map in ("balanced", "auto"):
            raise CompstoreError(f"device_map={device_map!r} is not supported yet; pass a "
                                 "device such as 'cuda'")
        device_map = usable_device(device_map, "device_map=")
    if pool is not None:
        if not isinstance(pool, ResidencyPool):
            raise CompstoreError(f"pool={pool!r} is not a ResidencyPool: pass compstore.pool_for(device) "
                                 "or your own ResidencyPool(device)")
        if device_map is not None and device_map != pool.device:
            raise CompstoreError(f"device_map={str(device_map)!r} and pool (on {pool.device}) disagree")
        return pool
    if device_map is None or device_map.type == "cpu":
        return None
    return pool_for(device_map)


def small_part(snapshot_files: list, skeleton: Path, slot: str, cls, private: bool):
    """A tokenizer, scheduler or processor slot, loaded as diffusers loads it
    (`cls.from_pretrained(<folder>/<slot>)`), through `warm.part` unless `private`;
    None leaves the slot to diffusers (no class, or no files)."""
    files = tuple((path, sha) for path, _, sha, _ in snapshot_files if path.startswith(slot + "/"))
    if cls is None or not hasattr(cls, "from_pretrained") or not files:
        return None
    load = functools.partial(cls.from_pretrained, skeleton / slot)
    return load() if private else warm.part((cls.__module__, cls.__qualname__, files), load)
