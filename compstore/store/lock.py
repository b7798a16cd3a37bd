"""The store's write lock: one writer at a time (ingest, rm, gc), readers never wait.

An advisory `flock` on `<store>/lock`; the kernel drops it when the holder dies,
even by SIGKILL, so a crashed writer never leaves the store locked.
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import StoreBusyError

DEFAULT_TIMEOUT_S = 600.0


@contextmanager
def write_lock(home: Path, timeout_s: float | None = None) -> Iterator[None]:
    if timeout_s is None:
        timeout_s = float(os.environ.get("COMPSTORE_LOCK_TIMEOUT", DEFAULT_TIMEOUT_S))
    timeout = timeout_s
    path = home / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreBusyError(
                        f"store {home} is busy: another compstore process is writing to it "
                        f"(waited {timeout:.0f} s); retry when it finishes, or raise "
                        "COMPSTORE_LOCK_TIMEOUT"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock
