"""The store layer: bytes and catalog. Never imports torch.

Where a byte enters: `ingest.Ingestor.put_blob`. Where it lives: `objects` (packs)
and `catalog` (the SQLite index). `Store` is the public API.
"""

from .errors import (
    CompstoreError,
    ComponentNotFoundError,
    CorruptStoreError,
    DiskFullError,
    ExportError,
    InvalidInputError,
    PickleRefusedError,
    ReadOnlyStoreError,
    RefExistsError,
    RefNotFoundError,
    SettingError,
    StoreBusyError,
    VariantNotFoundError,
    WeightsNotFoundError,
)
from .catalog_backup import CatalogBackup, CatalogRestore, restore_catalog
from .hub import HubError, HubUnavailableError, PullResult
from .modular import PinChangedError
from .remote import Remote, RemoteBusyError, RemoteError
from .remote_sync import FetchResult, PushResult
from .store import IngestResult, Store, default_home

__all__ = [
    "Store", "IngestResult", "default_home", "CompstoreError", "ComponentNotFoundError",
    "CorruptStoreError", "ExportError", "InvalidInputError", "PickleRefusedError",
    "RefExistsError", "RefNotFoundError", "StoreBusyError", "PinChangedError", "DiskFullError", "ReadOnlyStoreError",
    "SettingError", "HubError", "HubUnavailableError", "VariantNotFoundError",
    "WeightsNotFoundError", "PullResult",
    "Remote", "RemoteError", "RemoteBusyError", "PushResult", "FetchResult",
    "CatalogBackup", "CatalogRestore", "restore_catalog",
]
