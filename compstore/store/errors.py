"""Exception classes of compstore.

Every error compstore raises on purpose is a `CompstoreError`; its message is one
line that names the file or ref and says what to do next. The CLI prints that line
and exits non-zero; anything else reaching the user is a bug.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class CompstoreError(Exception):
    """Base class of every error compstore raises on purpose."""

    exit_code = 1


class InvalidInputError(CompstoreError):
    """The input folder or a file in it is malformed or unsafe; nothing was stored."""

    exit_code = 2

    def __init__(self, path: str, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class PickleRefusedError(InvalidInputError):
    """A pickle checkpoint (.bin/.ckpt/.pt/...) was found and pickles are not allowed."""


class RefNotFoundError(CompstoreError):
    """No ref of that name exists in the store."""

    def __init__(self, ref: str, store: str, refs: Iterable[str] = (), *, path: bool = False):
        self.ref = ref
        near = difflib.get_close_matches(ref, list(refs), n=3)  # a typo: name what was meant
        hint = f"; did you mean {' or '.join(map(repr, near))}?" if near else ""
        what = f"no folder {ref!r}, and no ref of that name" if path else f"no ref named {ref!r}"
        super().__init__(f"{what} in store {store} (see `compstore ls`){hint}")


class RefExistsError(CompstoreError):
    """A ref of that name already names another snapshot."""

    def __init__(self, ref: str, snapshot_id: str):
        self.ref = ref
        self.snapshot_id = snapshot_id
        super().__init__(f"ref {ref!r} already names snapshot {snapshot_id[:12]}; pick another name, "
                         f"or move it (force=True, `compstore tag --force`)")


class ComponentNotFoundError(CompstoreError):
    """The ref has no component in that slot (or not in that variant)."""


class VariantNotFoundError(ComponentNotFoundError, ValueError):
    """A `variant` was asked for that none of the weights come in. diffusers, too,
    refuses it (a ValueError) rather than loading other weights silently."""


class WeightsNotFoundError(ComponentNotFoundError, OSError):
    """A model's folder has its config.json but no weights (a download that left them
    out). diffusers and transformers refuse it too (an OSError: "no file named ...
    found"), rather than loading randomly initialised weights."""


class StoreBusyError(CompstoreError):
    """Another process holds the store's write lock for longer than the timeout."""


class CorruptStoreError(CompstoreError):
    """Stored bytes are missing or do not match their recorded hash."""


class ExportError(CompstoreError):
    """An export could not be written (target exists, bytes mismatch, ...)."""


class DiskFullError(CompstoreError):
    """The disk filled up while writing; nothing was stored."""


class ReadOnlyStoreError(CompstoreError):
    """A write was asked of a store opened read-only."""


class SettingError(CompstoreError):
    """A `COMPSTORE_*` environment variable holds a value compstore cannot use."""
