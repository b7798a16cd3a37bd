"""compstore: a content-addressed local store for diffusion pipeline weights.

    >>> import compstore
    >>> store = compstore.Store()                  # $COMPSTORE_HOME or ~/.cache/compstore
    >>> store.ingest("./my-pipeline", name="mine")
    >>> pipe = compstore.DiffusionPipeline.from_pretrained("mine")   # needs torch + diffusers

The loader names (`DiffusionPipeline`, `load_component`, ...) import torch on first
use only, so `import compstore` stays fast for store-only work.
"""

from .store import (
    CompstoreError,
    PinChangedError,
    ComponentNotFoundError,
    CorruptStoreError,
    DiskFullError,
    ExportError,
    HubError,
    HubUnavailableError,
    InvalidInputError,
    PickleRefusedError,
    ReadOnlyStoreError,
    RefExistsError,
    RefNotFoundError,
    SettingError,
    Store,
    StoreBusyError,
    VariantNotFoundError,
    WeightsNotFoundError,
    restore_catalog,
)

__version__ = "0.1.0"

_LOADER_NAMES = {"DiffusionPipeline", "ModularPipeline", "ResidencyPool", "TransferReport",
                 "exclusive_load", "ingest_single_file", "last_transfer", "load_component", "model_class", "pipeline_class",
                 "pool_for", "SingleFileResult", "to_device"}


def __getattr__(name: str):
    if name in _LOADER_NAMES:
        from . import loader

        return getattr(loader, name)
    # `from compstore import StableDiffusionXLPipeline` (or AutoencoderKL): a stand-in
    # for diffusers' class of that name, whose from_pretrained loads from the store
    if name.endswith("Pipeline") or name.startswith("AutoPipelineFor"):
        from .loader import pipeline_class

        return pipeline_class(name)
    if name[:1].isupper():
        from .loader import model_class

        try:
            return model_class(name)
        except AttributeError:
            pass
    raise AttributeError(f"module 'compstore' has no attribute {name!r}")


__all__ = [
    "Store", "CompstoreError", "ComponentNotFoundError", "CorruptStoreError", "ExportError",
    "InvalidInputError", "PickleRefusedError", "PinChangedError", "RefExistsError", "RefNotFoundError",
    "StoreBusyError",
    "DiskFullError", "ReadOnlyStoreError", "SettingError", "HubError", "HubUnavailableError",
    "VariantNotFoundError", "WeightsNotFoundError", "restore_catalog",
    *sorted(_LOADER_NAMES),
]
