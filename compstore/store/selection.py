"""Which of a repo's files a pull fetches: by default, what `from_pretrained` loads.

A published pipeline repo holds more than the pipeline: its weights in other
variants (fp16 beside fp32), single-file checkpoints and LoRAs at its root,
folders its model_index.json does not name (SDXL base 1.0: `vae_1_0`, ONNX and
OpenVINO exports), other frameworks' weights. diffusers' `from_pretrained`
downloads the pipeline, in one variant (and the loadable weights of folders its
index does not name, which it never loads); a pull downloads the pipeline:

1. Never: pickle checkpoints and other frameworks' weights (`NOT_PULLED`).
2. A pipeline repo (a `model_index.json` or `modular_model_index.json` at its
   root): the folders its index names, and the files at its root that are
   neither weights nor the model card's media (sample images and videos, often
   megabytes: `MEDIA`), less the files its index lists in `_ignore_files` (as
   diffusers). The README, license and any custom pipeline code come along.
   `include` globs choose from every folder instead (the index comes
   along: the folders pulled are still the pipeline's; a modular index always,
   since the folders asked for may be its entries' pointers to other repos).
3. In each folder, of the weights that diffusers and transformers load
   (`diffusion_pytorch_model…` and `model…` safetensors, shards and index json
   included), one variant's: `variant`'s where the folder has it, else the default
   weights, else all the folder has (no default to fall back on). Other weights
   beside loadable ones (a LoRA, a single-file checkpoint) are left out; a folder
   with none loadable keeps its own. A `variant` that no folder has is refused
   (`VariantNotFoundError`), as diffusers refuses it, rather than pulling default
   weights the caller did not ask for.

`all_files` drops rules 2 and 3: the repo as published, less rule 1.
"""

from __future__ import annotations

import fnmatch
from pathlib import PurePosixPath
from typing import Protocol, TypeVar

from .components import variant_names
from .errors import VariantNotFoundError
from .scan import PICKLE_SUFFIXES, PIPELINE_INDEXES, SHARD_RE, index_entries, variant_of

# Other frameworks' weights: Flax, Keras, ONNX, TensorFlow, Core ML, OpenVINO (.xml + .bin).
NOT_PULLED = PICKLE_SUFFIXES + (".msgpack", ".h5", ".onnx", ".onnx_data", ".pb", ".mlmodel", ".xml")
LOADABLE = ("diffusion_pytorch_model", "model")  # weight names `from_pretrained` reads
# What a model card shows at a repo's root (FLUX.1-dev's `dev_grid.jpg`, SDXL's `01.png`).
MEDIA = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".svg", ".pdf",
         ".mp4", ".webm", ".mov", ".avi", ".mkv", ".wav", ".mp3", ".flac")


class _HasPath(Protocol):
    path: str


F = TypeVar("F", bound=_HasPath)


def is_weights(path: str) -> bool:
    return path.endswith(".safetensors") or ".safetensors.index" in path


def _weights_or_media(path: str) -> bool:
    return is_weights(path) or path.lower().endswith(MEDIA)


def _loadable(path: str) -> bool:
    return SHARD_RE.sub("", PurePosixPath(path).name.split(".")[0]) in LOADABLE


def _folder(path: str) -> str:
    return str(PurePosixPath(path).parent)


def select_files(files: list[F], *, index: dict | None, variant: str | None = None,
                 include: list[str] | None = None, all_files: bool = False) -> list[F]:
    """The files (anything with a `.path`) a pull fetches, in their order; see the
    module docstring. `index`: the repo's pipeline index (None: not a pipeline repo).
    Raises `VariantNotFoundError` when `variant` is given and no folder has it.

    >>> [f.path for f in select_files(listed, index={"unet": ["diffusers", "UNet2DConditionModel"]},
    ...                               variant="fp16")]  # doctest: +SKIP
    ['model_index.json', 'unet/config.json', 'unet/diffusion_pytorch_model.fp16.safetensors']
    """
    chosen = [f for f in files if not f.path.lower().endswith(NOT_PULLED)]
    if include:
        matched = {f.path for f in chosen if any(fnmatch.fnmatch(f.path, g) for g in include)}
        # The index comes along: the pipeline's, with what matched; a modular one always,
        # as its entries may point at the matched folders in other repos.
        chosen = [f for f in chosen if f.path in matched or f.path == PIPELINE_INDEXES[1]
                  or (matched and f.path in PIPELINE_INDEXES)]
    elif index is not None and not all_files:
        slots = {slot for slot, _, _ in index_entries(index)}
        ignored = index.get("_ignore_files")  # what the publisher keeps out of downloads
        ignored = set(ignored) if isinstance(ignored, list) else set()
        chosen = [f for f in chosen if f.path not in ignored and (
            f.path.partition("/")[0] in slots or ("/" not in f.path and not _weights_or_media(f.path)))]
    if all_files:
        return chosen
    loadable: dict[str, set[str]] = {}  # folder -> the variants of its loadable weights
    for f in chosen:
        if is_weights(f.path) and _loadable(f.path):
            loadable.setdefault(_folder(f.path), set()).add(variant_of(f.path))
    if variant and loadable and not any(variant in have for have in loadable.values()):
        kinds = variant_names(v for have in loadable.values() for v in have)
        raise VariantNotFoundError(f"no {variant!r} weights (the weights come as: {kinds})")
    picked = {folder: ({variant} & have) or ({""} & have) or have for folder, have in loadable.items()}

    def keep(path: str) -> bool:
        if not is_weights(path) or _folder(path) not in picked:
            return True
        return _loadable(path) and variant_of(path) in picked[_folder(path)]

    return [f for f in chosen if keep(f.path)]


def pipeline_index_path(paths: set[str]) -> str | None:
    """The repo's pipeline index, if it is a pipeline repo."""
    return next((name for name in PIPELINE_INDEXES if name in paths), None)
