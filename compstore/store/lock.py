"""The store's locks, advisory `flock`s the kernel drops when the holder dies (even
by SIGKILL), so a crashed process never leaves the store locked.

- `<store>/lock`: one writer at a time (ingest, rm, gc).
- `<store>/readers.lock`: readers that follow the catalog to pack files (load,
  export, verify) hold it shared for the duration; gc takes it exclusively only to
  unlink packs the catalog no longer names. Readers never wait for writers.
- `<store>/pull.lock`: held shared by every running pull, waits included; gc
  takes it exclusively, without waiting, to clear what pulls leave (downloads/,
  pulls/) only when none runs.
- `<store>/pulls/<key>.lock`: what a pull fetches. A repo's (two pulls of one repo
  take turns: the second downloads only what the first did not bring), and, for
  each large file it downloads, its sha256's (`sha256-<prefix>`): a pull that
  wants bytes another pull is fetching (a base's VAE in two fine-tunes pulled at
  once) waits for that pull, then finds them in the store. Pulls that share no
  large file run side by side.
- `<store>/tmp/<prefix>*/.lock`: a scratch folder of a process that holds no write
  lock (a push writing its packs), locked through that file while in use. A writer
  clears tmp/ when it starts, all but the folders still locked: a crashed
  process's folder goes at the next write, a live one's stays.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import StoreBusyError
from .settings import env_setting

DEFAULT_TIMEOUT_S = 600.0

logger = logging.getLogger("compstore")


@contextmanager
def write_lock(home: Path, timeout_s: float | None = None) -> Iterator[None]:
    with _flock(home / "lock", fcntl.LOCK_EX, timeout_s,
                "another compstore process is writing to it"):
        yield


@contextmanager
def shared_readers(home: Path) -> Iterator[None]:
    """Held by a reader while it may open pack files named by the catalog (read-only
    stores take no lock: `Store.reading`)."""
    with _flock(home / "readers.lock", fcntl.LOCK_SH, None, "gc is removing packs"):
        yield


@contextmanager
def exclusive_readers(home: Path) -> Iterator[None]:
    with _flock(home / "readers.lock", fcntl.LOCK_EX, None, "a reader is loading from it"):
        yield


_pulling = threading.local()  # the (store, key) pull locks this thread holds


@contextmanager
def pulls_running(home: Path) -> Iterator[None]:
    """Held (shared) by a pull for its whole run, its waits included."""
    with _flock(home / "pull.lock", fcntl.LOCK_SH, math.inf, "gc is clearing what pulls left"):
        yield


@contextmanager
def no_pull_running(home: Path) -> Iterator[None]:
    """Held (exclusive) while no pull runs; raises `StoreBusyError` at once if one does."""
    with _flock(home / "pull.lock", fcntl.LOCK_EX, 0, "a pull is running"):
        yield


@contextmanager
def pull_lock(home: Path, key: str, waiting_for: str,
              on_wait: Callable[[str], None] = logger.info) -> Iterator[None]:
    """`pulls/<key>.lock`, held exclusively, under `pulls_running`. No timeout: a pull
    may download for an hour, and the kernel drops the lock if its holder dies.
    Taken again by the thread that holds it, it lets it through: a modular repo's
    ingest pulls the repos its entries point at. `on_wait` gets a line to show if
    it waits ("... waiting for `waiting_for`")."""
    held: set = _pulling.__dict__.setdefault("keys", set())
    token = (os.path.realpath(home), key)
    if token in held:
        yield
        return
    (home / "pulls").mkdir(exist_ok=True)
    with _flock(home / "pulls" / f"{key}.lock", fcntl.LOCK_EX, math.inf, waiting_for,
                on_wait=lambda: on_wait(f"store {home}: waiting for {waiting_for}")):
        held.add(token)
        try:
            yield
        finally:
            held.discard(token)


@contextmanager
def _flock(path: Path, mode: int, timeout_s: float | None, holder: str,
           on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """`flock(path, mode)` for the duration, polling up to `timeout_s` (None: the
    `COMPSTORE_LOCK_TIMEOUT` setting); `on_wait` is called once if it has to wait."""
    if timeout_s is None:
        timeout_s = env_setting("COMPSTORE_LOCK_TIMEOUT", DEFAULT_TIMEOUT_S, float, expected="seconds")
    home = path.parent
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreBusyError(
                        f"store {home} is busy: {holder} (waited {timeout_s:.0f} s); retry when "
                        "it finishes, or raise COMPSTORE_LOCK_TIMEOUT"
                    ) from None
                if on_wait is not None:
                    on_wait()
                    on_wait = None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def scratch_folder(home: Path, prefix: str) -> Iterator[Path]:
    """A new folder under `<store>/tmp/`, locked while in use (its `.lock` file, a
    regular file as the store's other locks are), removed after."""
    while True:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=home / "tmp"))
        try:
            fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # a starting writer cleared it before it was locked
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == os.stat(path / ".lock").st_ino:  # not cleared meanwhile
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def remove_unless_locked(path: Path) -> None:
    """Remove a folder of tmp/ unless a live process holds it (`scratch_folder`)."""
    try:  # made if missing: a `scratch_folder` starting now then waits, then makes another
        fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:  # the folder is gone
        return
    except OSError:  # no lock can be made in it, so nobody holds it
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return
    try:
        shutil.rmtree(path, ignore_errors=True)
    finally:
        os.close(fd)
