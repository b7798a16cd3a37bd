"""Single-file checkpoints: converted once by diffusers, then stored and loaded as
any pipeline (or model).

    >>> pipe = compstore.StableDiffusionXLPipeline.from_single_file("./juggernaut.safetensors")  # doctest: +SKIP
    >>> vae = compstore.AutoencoderKL.from_single_file("./sdxl_vae.safetensors")  # doctest: +SKIP

A fine-tune published as one original-format `.safetensors` file (the A1111 and
ComfyUI layout model sites host) holds the tensors of a diffusers pipeline under
other names, some in other shapes. Only diffusers' `from_single_file` knows these
layouts, so it converts the file, once; the converted pipeline is saved to a
scratch folder of the store and ingested under a ref (by default the file's
absolute path, as a folder's). Converted, a checkpoint's VAE and text encoders are
the very tensors of the diffusers repos they came from: a fine-tune that kept them
costs the store its UNet only, and it loads, shares and switches on a device as
every stored pipeline does. A second call with the same file (its sha256, what
model sites publish of it; not read again while the file's stat is unchanged, as
a folder's files are not) and config loads the stored pipeline without
converting again. A diffusers model class's `from_single_file` (a VAE, a UNet or
transformer published alone) is the same, with a model folder stored; so is a
model's GGUF or BFL fp8r/nvfp4 file, its quantized weights kept as they are
(quantized_files.py).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Collection

import torch

from ..store import CompstoreError, InvalidInputError, PickleRefusedError, Store
from ..store.hub import file_sha256, is_repo_id
from ..store.lock import scratch_folder
from ..store.safetensors_header import read_header
from ..store.store import check_ref_name
from . import quantized_files
from .quantized_files import FILE_METHODS, file_method, is_gguf
from .loading import warnings_dropped

logger = logging.getLogger("compstore")

# Written at the root of the converted pipeline: what it was converted from.
PROVENANCE = "compstore_single_file.json"

_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


@dataclass
class SingleFileResult:
    """What `ingest_single_file` did: `status` "converted" (a conversion was stored
    under `ref`; `written_bytes` new, `reused_bytes` already held) or "unchanged" (the
    ref holds this file's conversion: nothing converted, nothing written)."""
    ref: str
    snapshot: str
    status: str
    checkpoint: str
    sha256: str
    config: str
    seconds: float
    written_bytes: int
    reused_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def ingest_single_file(
    path: str | os.PathLike,
    pipeline_class: str | type,
    *,
    config: str | os.PathLike | None = None,
    subfolder: str | None = None,
    name: str | None = None,
    store: Store | str | os.PathLike | None = None,
    may_lack: Collection[str] = (),
    quantization_config: Any = None,
    **convert_kwargs: Any,
) -> SingleFileResult:
    """Convert a single-file checkpoint with diffusers' `pipeline_class.from_single_file`
    and ingest the pipeline it makes under ref `name` (default: the file's absolute
    path; for a model class, followed by `#` and the class name). Done once per file
    and config: a ref that holds this file's conversion with the same config is
    "unchanged", nothing converted.

    Args:
        path: a `.safetensors` checkpoint, or a model's `.gguf` (quantized_files.py);
            pickles (`.ckpt`) are refused. A Hub URL of one is pulled into the store first.
        pipeline_class: a diffusers pipeline class with `from_single_file`, or its name;
            or a diffusers model class that has one (`AutoencoderKL`): that model
            is converted and stored as a model folder.
        config: where the pipeline's configs, tokenizers and scheduler come from, as
            diffusers' `config=`: a store ref (its stored files, no network), a
            diffusers pipeline folder, or a Hub repo id (diffusers downloads its
            configs). Default: the repo diffusers infers from the checkpoint, taken
            from the store when a ref of that name is there.
        subfolder: a model class's folder in `config`. Default: the class's own ("vae"
            for `AutoencoderKL`, "transformer" for `FluxTransformer2DModel`) where
            `config` is a pipeline in the store or a folder, or inferred; none for
            a repo id, as diffusers.
        may_lack: a pipeline's slots whose models come from elsewhere (passed to the
            load, or None: diffusers' `vae=my_vae`, `text_encoder_3=None`). Where the
            checkpoint lacks one's weights, it is converted without these slots (as
            diffusers' `from_single_file` leaves passed components out), recorded as
            `without` in its provenance; a checkpoint that holds them all is
            converted whole, and that conversion serves every later call.
        quantization_config: for a model's file whose weights are quantized in it, its
            method's config: `BFLQuantizationConfig()` for a BFL fp8r or nvfp4 file (as
            diffusers needs it); a `.gguf` is GGUF's without one. The conversion
            computes in float32 whatever its compute dtype (a load's choice). Other
            methods quantize at load: pass them to `from_pretrained`.
        convert_kwargs: diffusers' other `from_single_file` arguments that shape the
            conversion: `original_config`, `local_files_only`, `token`, `revision`,
            `cache_dir`, `disable_mmap`.

    Each model is stored in the checkpoint's own dtype (diffusers would upcast an fp16
    file to float32); a checkpoint mixing dtypes stores each model in the narrowest
    of them that holds all its values exactly.

    >>> compstore.ingest_single_file("./dreamshaper.safetensors", "StableDiffusionPipeline").status  # doctest: +SKIP
    'converted'
    """
    from .pipeline import _skeleton_file, open_store

    t0 = time.perf_counter()
    store = open_store(store)
    target = _target_class(pipeline_class)
    is_model = not _is_pipeline(target)
    if subfolder is not None and not is_model:
        raise CompstoreError(f"subfolder={subfolder!r}: a pipeline's checkpoint holds all its models; "
                             "subfolder= picks a model class's folder in config=")
    may_lack = _slots(target, may_lack)
    started_ns = time.time_ns()
    method = _file_method(os.fspath(path), quantization_config)
    if method is not None and not is_model:
        raise InvalidInputError(os.fspath(path), f"{FILE_METHODS[method]} holds one model, not a "
                                f"{target.__name__}: load it with its model class, as diffusers does (transformer "
                                "= compstore.FluxTransformer2DModel.from_single_file(path, config=<ref>, "
                                "quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16))), and "
                                f"the pipeline with it passed in: compstore.{target.__name__}.from_pretrained(<ref>, "
                                "transformer=transformer)")
    with contextlib.ExitStack() as stack:
        @functools.cache
        def scratch() -> Path:  # made when first needed (a held conversion needs none), removed at the end
            store._writable()
            return stack.enter_context(scratch_folder(store.home, "single-file-"))

        hub = _hub_file(path)
        if hub is not None:  # pulled first: only what the store lacks is downloaded
            repo_id, revision, filename = hub  # a URL's revision, else `revision=`, as diffusers takes it
            source = _pulled_checkpoint(store, repo_id, revision or convert_kwargs.get("revision") or "main",
                                        filename, scratch, token=convert_kwargs.get("token"),
                                        local_files_only=convert_kwargs.get("local_files_only"))
        else:
            source = _local_checkpoint(path)
        # a malformed file is refused before anything is read; of a pulled GGUF file,
        # held, nothing is (reading its header takes a copy of it)
        @functools.cache
        def header():
            parsed = source.header()
            if not parsed.tensors:
                raise InvalidInputError(source.label, "holds no tensors: not a pipeline checkpoint")
            return parsed

        if source.path is not None or not is_gguf(source.name):
            header()
        # a model's conversion has a ref of its own: the file's VAE beside the file's pipeline
        ref = (check_ref_name(name) if name is not None
               else f"{source.label}#{target.__name__}" if is_model else source.label)
        known = source.sha256 or store.recorded_file_sha256(ref, source.path, started_ns)
        sha256 = known or file_sha256(source.path)
        inferred = config is None
        if inferred:  # the file's, as its conversion recorded it, or from its tensors
            config = _recorded_inference(store, ref, sha256) or _inferred_config(source.label, header())
        config, stored = _config_name(store, config)
        if is_model:
            subfolder = _model_subfolder(store, config, stored, target, subfolder, inferred)
            convert_kwargs["subfolder"] = subfolder
        held = _held_conversion(store, ref, sha256, config, subfolder, target.__name__ if is_model else None,
                                may_lack)
        if held is not None:
            if known is None:  # the next call reads none of it
                store.record_file_sha256(ref, held, source.path, sha256, started_ns)
            return SingleFileResult(ref, held, "unchanged", source.label, sha256, config,
                                    round(time.perf_counter() - t0, 3), 0, 0)
        store._writable()
        provenance = {"checkpoint": source.name, "sha256": sha256, "config": config,
                      ("model_class" if is_model else "pipeline_class"): target.__name__}
        if inferred:
            provenance["config_inferred"] = True
        if method is not None:
            provenance["quantization"] = method
        if subfolder is not None:
            provenance["subfolder"] = subfolder
        folder = scratch() / "converted"
        checkpoint = source.path or source.local_copy()
        if stored:  # a ref's files, read under the store's read guard (gc leaves them)
            snapshot = store.resolve(config)
            with store.reading_snapshot(snapshot, config):
                provenance["config_snapshot"] = snapshot
                skeleton = store.materialize(snapshot, _skeleton_file)
                converted = _convert_whole_or_without(target, checkpoint, source.label, header(), str(skeleton),
                                                      config, convert_kwargs, may_lack, provenance, method)
        else:
            converted = _convert_whole_or_without(target, checkpoint, source.label, header(), config, config,
                                                  convert_kwargs, may_lack, provenance, method)
        if method is not None:
            # diffusers' save_pretrained refuses these; each float tensor in the file's dtypes
            quantized_files.save(converted, folder, method, _float_dtypes(header()))
        else:
            with warnings_dropped("diffusers.pipelines.pipeline_utils", "self."):  # "self.vae=None ...
                converted.save_pretrained(folder)  # cannot be saved": a slot left out, as recorded
        del converted
        (folder / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
        result = store.ingest(folder, ref, source=source.label, consume_weights=True)
    if source.path is not None:
        store.record_file_sha256(ref, result.snapshot, source.path, sha256, started_ns)
    return SingleFileResult(ref, result.snapshot, "converted", source.label, sha256, config,
                            round(time.perf_counter() - t0, 3), result.written_bytes, result.reused_bytes)


@dataclass
class _Source:
    """Where a checkpoint is: a local file (`path`), or a file the store holds (a
    pull's: `sha256` known, `local_copy` rebuilds it for the conversion)."""
    label: str  # the file's absolute path, or `repo/file@commit`
    name: str
    header: Callable[[], Any]
    path: Path | None = None
    sha256: str | None = None
    local_copy: Callable[[], Path] | None = None


def _local_checkpoint(path: str | os.PathLike) -> _Source:
    checkpoint = _checkpoint(path)
    if is_gguf(checkpoint.name):
        return _Source(str(checkpoint), checkpoint.name,
                       lambda: quantized_files.read_gguf_header(checkpoint, str(checkpoint)), path=checkpoint)
    return _Source(str(checkpoint), checkpoint.name, lambda: read_header(str(checkpoint)), path=checkpoint)


# A file on the Hub as model cards link it (diffusers' from_single_file takes these):
# https://huggingface.co/<org>/<repo>/blob/<revision>/<path>, resolve/ too, or no revision
_HUB_URL = re.compile(r"(?:https?://)?(?:huggingface\.co|hf\.co)/([^/]+/[^/]+)/(?:(?:blob|resolve)/([^/]+)/)?(.+)")


def _hub_file(path) -> tuple[str, str | None, str] | None:
    """(repo id, revision if the URL names one, path in the repo) of a Hub file URL;
    None for anything else."""
    match = _HUB_URL.fullmatch(path) if isinstance(path, str) else None
    return (match.group(1), match.group(2), match.group(3)) if match else None


def _pulled_checkpoint(store: Store, repo_id: str, revision: str, filename: str, scratch: Callable[[], Path],
                       *, token=None, local_files_only: bool | None = None) -> _Source:
    """A Hub file, pulled into the store (its metadata first: a file the store holds is
    not downloaded, and of a Xet file only the chunks it lacks), or with no Hub, the
    store's pull of it. Its `local_copy` is written into `scratch()` once; a GGUF
    file's header is read from that copy (a safetensors header from the store)."""
    from ..store.export import file_pieces, write_file
    from ..store.hub import HubUnavailableError, hub_reachable
    from ..store.safetensors_header import parse_header

    refuse_other_formats(f"{repo_id}/{filename}")
    snapshot = None
    if not local_files_only and hub_reachable():
        try:
            snapshot = store.resolve(store.pull(repo_id, revision=revision, include=[glob.escape(filename)],
                                                token=token).ref)
        except HubUnavailableError as e:  # as diffusers falls back to its cache
            logger.warning("%s\nLoading the store's copy of %s/%s instead.", e, repo_id, filename)
    if snapshot is None:
        snapshot = _stored_pull(store, repo_id, revision, filename)
    commit = store.snapshot(snapshot)["revision"]
    (file_id, sha256, size), = [row[1:] for row in store.snapshot_files(snapshot) if row[0] == filename]
    label = f"{repo_id}/{filename}@{commit}"

    @functools.cache
    def local_copy() -> Path:
        with store.reading():
            write_file(store, file_id, sha256, scratch() / "checkpoint" / Path(filename).name)
        return scratch() / "checkpoint" / Path(filename).name

    def header():
        if is_gguf(filename):
            return quantized_files.read_gguf_header(local_copy(), label)
        with store.reading():
            return parse_header(label, bytes(next(file_pieces(store, file_id))), size)

    return _Source(label, Path(filename).name, header, sha256=sha256, local_copy=local_copy)


def _stored_pull(store: Store, repo_id: str, revision: str, filename: str) -> str:
    """The latest pull of `repo_id` that holds `filename` (at `revision`: the commit a
    pull at that name got, else a commit or its start), for a load without the Hub."""
    from ..store import RefNotFoundError
    from ..store.hub import revision_commit

    recorded = revision_commit(store, repo_id, revision)  # a branch, tag or PR: its commit then
    for _, snapshot in store.pulls(repo_id):
        if not any(path == filename for path, *_ in store.snapshot_files(snapshot)):
            continue
        commit = store.snapshot(snapshot)["revision"]
        if recorded is not None:
            if commit == recorded:
                return snapshot
            continue
        named = f"{repo_id}@{revision}"  # a branch or tag a pull named
        if (revision == "main" or (commit or "").startswith(revision)
                or (store.has_ref(named) and store.resolve(named) == snapshot)):
            return snapshot
    raise RefNotFoundError(f"{repo_id}/{filename}@{revision}", str(store.home), store.ref_names())


def _target_class(cls: str | type) -> type:
    """The diffusers pipeline or model class named, if it loads single-file checkpoints."""
    import diffusers

    target = getattr(diffusers, cls, None) if isinstance(cls, str) else cls
    target = getattr(target, "_loads_as", None) or target  # a compstore stand-in: its diffusers class
    if not (isinstance(target, type) and hasattr(target, "from_single_file")
            and issubclass(target, (diffusers.DiffusionPipeline, diffusers.ModelMixin))):
        raise CompstoreError(
            f"{getattr(cls, '__name__', cls)!r} is not a diffusers pipeline or model class that loads "
            "single-file checkpoints: name the one the checkpoint is for, e.g. StableDiffusionXLPipeline "
            "(compstore.StableDiffusionXLPipeline.from_single_file) or AutoencoderKL")
    return target


def _is_pipeline(target: type) -> bool:
    import diffusers

    return issubclass(target, diffusers.DiffusionPipeline)


def _default_subfolder(target: type) -> str | None:
    from diffusers.loaders.single_file_model import (SINGLE_FILE_LOADABLE_CLASSES,
                                                     _get_single_file_loadable_mapping_class)

    mapping = SINGLE_FILE_LOADABLE_CLASSES.get(_get_single_file_loadable_mapping_class(target) or "", {})
    return mapping.get("default_subfolder")


def _model_subfolder(store: Store, config: str, stored: bool, target: type, subfolder: str | None,
                     inferred: bool) -> str | None:
    """A model class's folder in `config`. Unnamed, the class's default one ("transformer"
    for FluxTransformer2DModel) where `config` is a repo diffusers inferred (as diffusers
    takes it) or a pipeline in the store or in a folder (where diffusers would fail for
    want of a config.json at its root). Refused, before any conversion, when that local
    folder has no config.json."""
    if subfolder is None and inferred:
        return _default_subfolder(target)
    if not stored and not Path(config).is_dir():
        return subfolder  # a repo id: diffusers fetches its config, and says what it lacks
    snapshot = store.resolve(config) if stored else None

    def has(path: str) -> bool:
        if snapshot is not None:
            return store.read_file(snapshot, path) is not None
        return (Path(config) / path).is_file()

    if subfolder is None and not has("config.json") and has("model_index.json"):
        subfolder = _default_subfolder(target)
    where = f"{subfolder}/config.json" if subfolder else "config.json"
    if not has(where):
        raise InvalidInputError(config, f"has no {where}: config= for {target.__name__} is a pipeline "
                                "(ref or folder) with subfolder= its folder, or the model's own folder")
    return subfolder


def _checkpoint(path: str | os.PathLike) -> Path:
    checkpoint = Path(path).expanduser()
    if not checkpoint.is_file():
        raise InvalidInputError(str(path), "no such file: pass the path of a single-file checkpoint "
                                "(.safetensors, or a model's .gguf), or the URL of one on the Hub "
                                "(https://huggingface.co/<org>/<repo>/blob/<revision>/<file>)")
    refuse_other_formats(str(path))
    return checkpoint.resolve()


def refuse_other_formats(name: str) -> None:
    """Only `.safetensors` and `.gguf` checkpoints are converted and stored."""
    if name.endswith(".safetensors") or is_gguf(name):
        return
    raise PickleRefusedError(name, "not a .safetensors file: compstore never loads pickle "
                             "checkpoints (.ckpt, .pt, .bin); convert it to safetensors first")


def _inferred_config(label: str, header) -> str:
    """The Hub repo whose configs diffusers would take for this checkpoint, found from
    its tensor names and shapes alone (meta tensors: nothing is read)."""
    from diffusers.loaders.single_file_utils import fetch_diffusers_config

    meta = {t.name: torch.empty(t.shape, dtype=_FLOAT_DTYPES.get(t.dtype, torch.uint8), device="meta")
            for t in header.tensors}
    try:
        return fetch_diffusers_config(meta)["pretrained_model_name_or_path"]
    except (KeyError, ValueError, RuntimeError, NotImplementedError) as e:  # a value it reads
        raise InvalidInputError(label, f"diffusers could not tell which pipeline it is a checkpoint of "
                                f"({type(e).__name__}: {e}): pass config= a store ref, a folder or "
                                "a Hub repo id of its family") from e


def _config_name(store: Store, config: str | os.PathLike) -> tuple[str, bool]:
    """(`config` as recorded, whether it is a store ref): a folder's absolute path (a
    folder first, as `from_pretrained` takes it), a ref's name, or a repo id."""
    name = os.fspath(config)
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve()), False
    if store.has_ref(name):
        return name, True
    if is_repo_id(name):
        return name, False
    raise InvalidInputError(name, "config= is neither a store ref, a folder nor a Hub repo id: pass "
                            "the ref or folder of a diffusers pipeline of the checkpoint's family")


def _file_method(path: str, quantization_config: Any) -> str | None:
    """"gguf" for a `.gguf` file, "bfl" for a file given `BFLQuantizationConfig`: the
    method whose quantizer converts it; None for any other file.

    Raises:
        CompstoreError: a `.gguf` with another method's config, another file with GGUF's.
    """
    if is_gguf(path):
        if quantization_config is not None and file_method(quantization_config) != "gguf":
            raise CompstoreError(f"quantization_config={quantization_config!r}: a GGUF file's weights are "
                                 "quantized already; pass GGUFQuantizationConfig(compute_dtype=...), or none "
                                 "(float32)")
        return "gguf"
    method = file_method(quantization_config) if quantization_config is not None else None
    if method == "gguf":
        raise CompstoreError(f"{path}: a GGUF quantization config loads {FILE_METHODS['gguf']}, and this file "
                             "is not one: quantize stored weights with torchao or bitsandbytes")
    return method


def _recorded_inference(store: Store, ref: str, sha256: str) -> str | None:
    """The config diffusers inferred for this file (its sha256) when `ref`'s conversion
    was made, as recorded: a later call infers nothing, so reads none of the file."""
    if not store.has_ref(ref):
        return None
    raw = store.read_file(store.resolve(ref), PROVENANCE)
    made = json.loads(raw) if raw is not None else {}
    return made["config"] if made.get("sha256") == sha256 and made.get("config_inferred") else None


def _held_conversion(store: Store, ref: str, sha256: str, config: str, subfolder: str | None,
                     model_class: str | None, may_lack: list[str]) -> str | None:
    """The snapshot of `ref` if it holds the conversion of this file with this config
    and subfolder, as a pipeline or as a model of `model_class` (and, for a config
    taken from the store, that ref's snapshot then and now), without no slot but
    those in `may_lack`."""
    if not store.has_ref(ref):
        return None
    snapshot = store.resolve(ref)
    raw = store.read_file(snapshot, PROVENANCE)
    if raw is None:
        return None
    made = json.loads(raw)
    if (made.get("sha256"), made.get("config"), made.get("subfolder"), made.get("model_class")) != (
            sha256, config, subfolder, model_class) or not set(made.get("without", [])) <= set(may_lack):
        return None
    if "config_snapshot" in made and not (store.has_ref(config) and store.resolve(config) == made["config_snapshot"]):
        return None
    return snapshot


def _slots(target: type, may_lack: Collection[str]) -> list[str]:
    """`may_lack`, sorted, each checked to be a slot of pipeline `target` (a model's,
    or a tokenizer's or scheduler's: diffusers takes any of them passed in)."""
    if not may_lack:
        return []
    if not _is_pipeline(target):
        raise CompstoreError(f"may_lack={list(may_lack)}: a model class's checkpoint is one model; "
                             "may_lack names slots of a pipeline")
    slots = target._get_signature_keys(target)[0]
    unknown = sorted(set(may_lack) - set(slots))
    if unknown:
        raise CompstoreError(f"{target.__name__} has no slot {', '.join(map(repr, unknown))}: "
                             f"its slots are {', '.join(sorted(slots))}")
    return sorted(set(may_lack))


class _ComponentMissing(InvalidInputError):
    """The checkpoint lacks the weights of one of the pipeline's models."""


def _convert_whole_or_without(target: type, checkpoint: Path, checkpoint_label: str, header, config: str,
                              label: str, kwargs: dict[str, Any], may_lack: list[str], provenance: dict,
                              method: str | None):
    """The whole checkpoint's conversion; where it lacks a model and `may_lack` names
    slots, the conversion without them (each None, as diffusers takes a passed None),
    recorded in `provenance`."""
    try:
        return _convert(target, checkpoint, checkpoint_label, header, config, label, kwargs, method)
    except _ComponentMissing:
        if not may_lack:
            raise
    provenance["without"] = may_lack
    return _convert(target, checkpoint, checkpoint_label, header, config, label,
                    {**kwargs, **dict.fromkeys(may_lack)}, method)


def _convert(target: type, checkpoint: Path, checkpoint_label: str, header, config: str, label: str,
             kwargs: dict[str, Any], method: str | None):
    """diffusers' conversion of the file at `checkpoint` to a pipeline (or model), with
    the configs of `config` (a folder or repo id; `label`: what the user named), in
    the checkpoint's dtype when it has one float dtype; a file whose weights are
    quantized in it (`method`, "gguf" or "bfl") through its method's quantizer."""
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    floats = _float_dtypes(header)
    dtype = next(iter(floats)) if len(floats) == 1 else None  # None: diffusers' float32
    if method is not None:  # its quantized weights as they are, its float ones unrounded
        kwargs = {**kwargs, "quantization_config": quantized_files.conversion_config(method)}
    try:
        # from_single_file casts each model with `.to(dtype)`, which warns that modules "should
        # be kept in float32": what is stored is the checkpoint's bytes, and each load
        # applies from_pretrained's dtype rules
        with warnings_dropped("diffusers.models.modeling_utils", "There are modules in "):
            converted = target.from_single_file(str(checkpoint), config=config,
                                           dtype=None if dtype == torch.float32 else dtype, **kwargs)
    except SingleFileComponentError as e:  # a UNet- or transformer-only file, say
        slot, model = _denoiser(target)
        raise _ComponentMissing(checkpoint_label, f"{e.message.splitlines()[0]} Nothing was stored. Pass "
                                "the models it lacks, as diffusers takes them (vae=my_vae, or None). A "
                                f"checkpoint of one model loads with its class ({slot} = compstore.{model}"
                                f".from_single_file(path, config=<ref>)), and the pipeline with it passed in: "
                                f"compstore.{target.__name__}.from_pretrained(<ref>, {slot}={slot})") from e
    except (KeyError, ValueError, RuntimeError, IndexError, AttributeError, TypeError) as e:
        scaled = method is None and any(t.name.endswith(".weight_scale") for t in header.tensors)
        raise InvalidInputError(checkpoint_label, f"diffusers' {target.__name__}.from_single_file could "
                                f"not convert it with config {label!r} ({type(e).__name__}: {e}); "
                                "nothing was stored. " + (
                                    "Its weights have scales (.weight_scale): a BFL fp8r or nvfp4 file "
                                    "converts with quantization_config=BFLQuantizationConfig() (CLI: --bfl)"
                                    if scaled else "Is it a checkpoint of this class? Pass config= a ref, "
                                    "folder or repo of its family")) from e
    if len(floats) > 1 and method is None:  # (a quantized file's: narrowed tensor by tensor as saved)
        modules = converted.components.values() if _is_pipeline(target) else [converted]
        for module in modules:
            if isinstance(module, torch.nn.Module):
                _narrow(module, sorted(floats, key=lambda d: d.itemsize))
    return converted


def _float_dtypes(header) -> set[torch.dtype]:
    """The float dtypes of a checkpoint's tensors."""
    return {_FLOAT_DTYPES[t.dtype] for t in header.tensors if t.dtype in _FLOAT_DTYPES}


def _denoiser(pipeline: type) -> tuple[str, str]:
    """The slot and class name of a pipeline's UNet or transformer, for its refusal's advice."""
    types = pipeline._get_signature_types()
    for slot in ("transformer", "unet", "prior", "decoder"):
        if types.get(slot) and isinstance(types[slot][0], type):
            return slot, types[slot][0].__name__
    return "unet", "UNet2DConditionModel"


def _narrow(module: torch.nn.Module, dtypes: list[torch.dtype]) -> None:
    """Cast `module` to the first of `dtypes` that holds every float tensor of it exactly."""
    tensors = [t for t in module.state_dict().values() if t.is_floating_point()]
    for dtype in dtypes:
        if all(t.dtype == dtype or torch.equal(t.to(dtype).to(t.dtype), t) for t in tensors):
            torch.nn.Module.to(module, dtype)  # not diffusers' `to`, which warns of fp32 modules
            return


def from_single_file(target: type, path: str | os.PathLike, store: Store, name: str | None,
                     kwargs: dict[str, Any], load) -> Any:
    """The drop-in `from_single_file` of a pipeline or model stand-in: the conversion
    (`ingest_single_file`) takes diffusers' arguments that shape it, `load(ref, kwargs)`
    the rest (a pipeline's `from_pretrained`, a model's `load_component`)."""
    convert = {k: kwargs.pop(k) for k in ("config", "subfolder", "original_config", "revision",
                                          "cache_dir", "disable_mmap") if k in kwargs}
    for k in ("local_files_only", "token"):
        if k in kwargs:
            convert[k] = kwargs[k]
    if _is_pipeline(target):  # models passed in (or None): the checkpoint may lack them; a
        # tokenizer or scheduler is never the checkpoint's, so it never needs leaving out
        slots = target._get_signature_keys(target)[0]
        convert["may_lack"] = [k for k, v in kwargs.items()
                               if k in slots and (v is None or isinstance(v, torch.nn.Module))]
    quantization = kwargs.get("quantization_config")
    in_file = _file_method(os.fspath(path), quantization)  # the conversion's: weights quantized in the file
    if in_file is not None:
        convert["quantization_config"] = quantization
    elif quantization is not None:  # a load that would fail is refused before the conversion is stored
        from .quantized import check_pipeline_quantization, check_quantization

        if _is_pipeline(target):
            check_pipeline_quantization(quantization)
        else:
            check_quantization(quantization, target, dtype=kwargs.get("dtype", kwargs.get("torch_dtype")),
                               where=os.fspath(path))
    ref = ingest_single_file(path, target, store=store, name=name, **convert).ref
    kwargs["local_files_only"] = True  # a ref: never a Hub repo of the same name
    if kwargs.get("dtype", kwargs.get("torch_dtype")) is None and in_file is None:
        # diffusers' from_single_file builds float32 models by default, where a
        # from_pretrained of the stored (say fp16) text encoder would keep fp16 (a
        # GGUF or BFL model's float weights take its compute dtype, as in diffusers)
        kwargs["dtype"] = torch.float32
    return load(ref, kwargs)
