"""Device residency: where a store tensor reaches a device, and is kept there.

A `ResidencyPool` holds, per device, the store tensors already uploaded, keyed by
(blob xxh3, blob size, dtype, device). Moving a store-loaded module through the
pool uploads only the tensors not already resident; the rest are shared storage.
Tensors of a module the user dropped stay resident within a byte budget (LRU,
never evicting a tensor a live module uses), so A -> B -> A moves nearly nothing;
with a pinned tier (pinned.py), evicted tensors wait in pinned host memory for a fast
re-upload. Every move returns a `TransferReport`: per component, bytes reused,
bytes uploaded from the pinned tier and from the store, seconds. A module can
also be built on the device in the first place: `serve` hands out the device
tensors for a list of blobs and `claim` marks the module built on them as their
user (how template clones are made, `component._from_template`). A store-loaded
pipeline's own `pipe.to("cuda")` reaches `to_device` through routing.py.

Safety: a tensor whose contents changed in place (its version counter moved, e.g.
`fuse_lora`) is never served again as the store's tensor: on the host side it is
uploaded privately, on the device side its pool entry is dropped. Users who edit
weights and want private copies from the start call `to_device(..., private=True)`.

Uploads are batched per module through `upload.Uploader` (pinned staging
buffers, a side stream, several readers). A per-tensor copier can be injected
(`copier=`), which is how the pool's logic is tested on machines without a GPU.
On a CPU target the pool's "device memory" is the process's own memory: store
views (mmap'd packs) are copied into it, so CPU runs exercise the same path.
"""

from __future__ import annotations

import functools
import gc
import logging
import threading
import time
import weakref
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, NamedTuple

import torch
from accelerate.utils import convert_file_size_to_int

from ..store import CompstoreError
from ..store.reports import human
from ..store.settings import env_setting
from .loading import normal_tensors
from .pinned import PinnedTier
from .upload import Uploader, _copy

logger = logging.getLogger("compstore")

Key = tuple  # (xxh3, size, dtype name, device name)

# module attribute: a StoreKeys, tensor name -> StoreRecord: the address the pool keys the
# tensor by (its store blob, or for a clone's buffer the model computes itself, its
# template's bytes), and how to tell the bound tensor is still that
STORE_KEYS = "_compstore_keys"


class StoreRecord(NamedTuple):
    xxh3: str
    size: int
    version: int  # the tensor's version counter when bound: an in-place edit moves it
    tensor: weakref.ref  # the tensor bound: another put in its place is not the store's
    shape: torch.Size  # torch's own `.to()` keeps a tensor and sets its data: same bytes, same shape


class StoreKeys(dict):
    """A module's store records. A tensor put in the place of the one bound
    (`load_state_dict(assign=True)`, a new layer) is not the store's even where its
    version counter happens to match, as a new tensor's 0 matches a freshly loaded
    one's; nor is one whose data was set to another shape (`resize_token_embeddings`
    sets `weight.data`). (Until 2026-12-07 both were taken for the store's: a
    textual inversion's resized embedding made the next move fail.) A pickled or
    deep-copied model's tensors are copies: the copy gets no record."""

    def __reduce__(self):
        return StoreKeys, ()


def store_record(blob: tuple[str, int], tensor: torch.Tensor) -> StoreRecord:
    """The record that `tensor`, bound now, is the store's `blob`."""
    return StoreRecord(blob[0], blob[1], tensor._version, weakref.ref(tensor), tensor.shape)


def is_stores(record: StoreRecord | None, tensor: torch.Tensor) -> bool:
    """Whether `tensor` is still what `record` was made for: the same tensor, unchanged
    (an inference tensor, which keeps no version counter, set in its place by a
    conversion under `torch.inference_mode()`, is not)."""
    return (record is not None and record.tensor() is tensor and not tensor.is_inference()
            and tensor._version == record.version and tensor.shape == record.shape)


POOL = "_compstore_pool"  # pipeline/module attribute: the pool it was loaded or moved through
_PLACED = "_compstore_placed"  # module attribute until its first move: (pool, transfer) of `serve`


def record_store_keys(model: torch.nn.Module, blobs: dict[str, tuple[str, int]]) -> None:
    """Remember which store blob (xxh3, size) each of a freshly built model's tensors
    came from (a template clone gets its record from the template instead)."""
    setattr(model, STORE_KEYS, StoreKeys((name, store_record(blobs[name], t))
                                         for name, _, _, t in named_tensors(model) if name in blobs))


class _DtypeNames(dict):
    """str(dtype), computed once per dtype (it is asked ~3,000 times per SDXL move)."""

    def __missing__(self, dtype: torch.dtype) -> str:
        self[dtype] = str(dtype)
        return self[dtype]


_DTYPE_NAMES = _DtypeNames()


@dataclass
class ComponentTransfer:
    component: str
    tensors: int = 0
    bytes_reused: int = 0  # already resident on the device: no copy
    bytes_from_pinned: int = 0  # uploaded from the pinned host tier
    bytes_from_store: int = 0  # uploaded from store-mapped (or other host) memory
    seconds: float = 0.0  # in the pool; copies it left running are waited for in the report's

    @property
    def bytes_uploaded(self) -> int:
        return self.bytes_from_pinned + self.bytes_from_store


@dataclass
class TransferReport:
    device: str
    components: list[ComponentTransfer] = field(default_factory=list)
    seconds: float = 0.0  # the components' and the wait for copies they left running

    @property
    def bytes_reused(self) -> int:
        return sum(c.bytes_reused for c in self.components)

    @property
    def bytes_from_pinned(self) -> int:
        return sum(c.bytes_from_pinned for c in self.components)

    @property
    def bytes_from_store(self) -> int:
        return sum(c.bytes_from_store for c in self.components)

    @property
    def bytes_uploaded(self) -> int:
        return self.bytes_from_pinned + self.bytes_from_store

    def __str__(self) -> str:
        """What `print(compstore.last_transfer())` shows: the move, then a line per component.

        cuda:0: reused 2.8 MiB, uploaded 5.4 MiB (0 B from the pinned tier) in 0.012 s
          unet          reused 0 B, uploaded 5.4 MiB (0 B from the pinned tier)
          ...
        """
        def moved(t) -> str:
            return (f"reused {human(t.bytes_reused)}, uploaded {human(t.bytes_uploaded)} "
                    f"({human(t.bytes_from_pinned)} from the pinned tier)")
        width = max((len(c.component) for c in self.components), default=0)
        return "\n".join([f"{self.device}: {moved(self)} in {self.seconds:.3f} s",
                          *(f"  {c.component:<{width}}  {moved(c)}" for c in self.components)])

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(bytes_reused=self.bytes_reused, bytes_from_pinned=self.bytes_from_pinned,
                 bytes_from_store=self.bytes_from_store, bytes_uploaded=self.bytes_uploaded)
        return d


def _locked(method):
    """Run a pool method under the pool's lock: loads and `pipe.to(...)` calls in
    other threads change the same entries. Inference mode off (`loading.normal_tensors`):
    the tensors it makes are shared with later loads."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock, normal_tensors():
            return method(self, *args, **kwargs)
    return locked


@dataclass(eq=False)  # compared and hashed by identity: a user of pool entries
class Placement:
    """What `ResidencyPool.serve` handed out, with the transfer it took. Until
    `claim`, the placement itself uses the entries served, so that no eviction in
    between takes them; `claim` hands them to the module."""

    transfer: ComponentTransfer


@dataclass(eq=False)  # hashed by identity: a member of its users' sets
class _Entry:
    key: Key
    tensor: torch.Tensor
    nbytes: int
    version: int
    users: int = 0  # live modules (or placements) using it: never evicted while > 0


_A_SIZE = 'bytes or a size such as "10GiB" or "500MB"'


def _size(text: str) -> int:
    """Bytes, or a size written as accelerate's `max_memory` takes it."""
    return int(text) if text.isdigit() else convert_file_size_to_int(text)


def _budget(name: str, value: int) -> int:
    if value < 0:
        raise CompstoreError(f"{name}={value}: a budget is 0 bytes or more")
    return value


class ResidencyPool:
    """Store tensors resident on one device, shared by every module moved through it.

    Args:
        device: the target device, e.g. "cuda" or "cuda:1".
        budget_bytes: bytes of tensors no live module uses that may stay resident
            (LRU). Default: `$COMPSTORE_VRAM_BUDGET`, else 50% of the device's free
            memory when the pool is made (`free_bytes`; unlimited for the host).
        pinned_budget_bytes: pinned host memory for evicted tensors, kept for a fast
            re-upload (default `$COMPSTORE_PINNED_BUDGET`, else 0: off); counted in
            whole slabs of up to 256 MiB (see pinned.py).
        Both variables take bytes or a size as accelerate's `max_memory` does
        ("10GiB", "500MB").
        copier: `(tensor, device) -> tensor`, one tensor's upload (default: batched
            through the uploader).
        offloader: `(host tensors, device tensors) -> event or None`, one eviction's
            copies into the pinned tier (default `Uploader.copy_back`: one call,
            on a stream of its own, not waited for on the host).
        uploader: what uploads a batch of tensors (default: an `upload.Uploader`:
            pinned staging, side stream, several readers); a stand-in has its
            `upload(srcs, wait=...)`, `wait()`, `order_after_running()`, unless
            `offloader` is given `copy_back(hosts, tensors)`, and where copies back
            return events `order_after(events)`.

    >>> pool = ResidencyPool("cuda")  # doctest: +SKIP
    >>> report = to_device(pipe, "cuda", pool=pool)  # doctest: +SKIP
    """

    def __init__(self, device: str | torch.device, budget_bytes: int | None = None,
                 pinned_budget_bytes: int | None = None,
                 copier: Callable[[torch.Tensor, torch.device], torch.Tensor] | None = None,
                 offloader: Callable[[list[torch.Tensor], list[torch.Tensor]], object] | None = None,
                 uploader: Uploader | None = None):
        self.device = canonical_device(device)
        self._device_name = str(self.device)  # part of every key: str() per tensor is slow
        if budget_bytes is None:
            budget_bytes = env_setting("COMPSTORE_VRAM_BUDGET", None, _size, expected=_A_SIZE)
        if budget_bytes is None:
            free = free_bytes(self.device)
            budget_bytes = free // 2 if free is not None else 1 << 62
        if pinned_budget_bytes is None:
            pinned_budget_bytes = env_setting("COMPSTORE_PINNED_BUDGET", 0, _size, expected=_A_SIZE)
        self.budget_bytes = _budget("budget_bytes", budget_bytes)
        self.copier = copier
        self._uploader = uploader  # made on first use (`_transfers`)
        self._making_uploader = threading.Lock()
        self._tier = PinnedTier(_budget("pinned_budget_bytes", pinned_budget_bytes), pin=self.device.type == "cuda",
                                copy_back=offloader or self._copy_back)
        self._resident: OrderedDict[Key, _Entry] = OrderedDict()
        self._resident_bytes = 0  # kept by _keep/_drop: summing ~3,000 entries per move is slow
        self._prefetched: dict[Key, tuple[Future, int]] = {}  # uploading in the background
        # user (module or placement) -> the entries it uses. A user counts once in each
        # entry's `users`; a set per user, not a WeakSet per entry: one weak reference per
        # user instead of one per (tensor, user), ~2,600 fewer per SDXL switch.
        self._uses: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._gone: deque[set[_Entry]] = deque()  # the sets of users that died, not yet counted down
        self._upload_lock = threading.Lock()  # one batch at a time through the uploader
        self._background: ThreadPoolExecutor | None = None
        self._lock = threading.RLock()  # entries change under loads and moves of any thread
        self.last_report: TransferReport | None = None
        with _EVERY_POOL_LOCK:
            _EVERY_POOL.add(self)

    def __deepcopy__(self, memo):  # the device's pool: a copied pipeline goes on using it
        return self

    def __reduce__(self):  # pickled with a pipeline: the same device's pool where it is unpickled
        return pool_for, (self._device_name,)

    # -- bookkeeping -------------------------------------------------------------
    @property
    def resident_bytes(self) -> int:
        return self._resident_bytes

    @property
    def idle_bytes(self) -> int:
        """Resident bytes no live module uses (what the budget bounds)."""
        with self._lock:
            self._count_gone()
            return sum(e.nbytes for e in self._resident.values() if not e.users)

    def keys_used_by(self, module: torch.nn.Module) -> set[Key]:
        """The keys of the resident tensors `module` keeps from eviction."""
        with self._lock:
            return {e.key for e in self._uses.get(module, ()) if self._resident.get(e.key) is e}

    # -- users: what a live module uses is never evicted ---------------------------
    def _entries_of(self, user) -> set[_Entry]:
        """The entries `user` uses (an empty set on first call); when `user` dies,
        they are counted down."""
        uses = self._uses.get(user)
        if uses is None:
            uses = self._uses[user] = set()
            # Only queued: the last reference may drop in any thread, one holding the
            # upload lock say, so taking the pool's lock here could deadlock.
            weakref.finalize(user, self._gone.append, uses).atexit = False
        return uses

    def _count_gone(self) -> None:
        """Count down the entries of users that died since the last call."""
        while self._gone:
            for entry in self._gone.popleft():
                entry.users -= 1

    @staticmethod
    def _use(uses: set[_Entry], entry: _Entry) -> None:
        if entry not in uses:
            uses.add(entry)
            entry.users += 1

    @property
    def pinned_bytes(self) -> int:
        """Host memory the pinned tier holds (whole slabs)."""
        return self._tier.held_bytes

    @property
    def pinned_budget_bytes(self) -> int:
        return self._tier.budget_bytes

    @pinned_budget_bytes.setter
    @_locked
    def pinned_budget_bytes(self, value: int) -> None:
        self._tier.budget_bytes = _budget("pinned_budget_bytes", value)
        self._tier.fit()

    def _keep(self, key: Key, entry: _Entry) -> None:
        self._drop(key)
        self._resident[key] = entry
        self._resident_bytes += entry.nbytes

    def _drop(self, key: Key) -> _Entry | None:
        entry = self._resident.pop(key, None)
        if entry is not None:
            self._resident_bytes -= entry.nbytes
        return entry

    def _evict(self, budget: int | None = None, collect: bool = False) -> int:
        """Drop least recently used idle tensors until the idle bytes fit `budget`
        (default: the pool's); returns the bytes dropped. `collect`: run the cyclic
        collector first, for modules of the user's that only it frees (a full
        collection: ~0.4 s in a process holding two SDXL-size pipelines; a dropped
        compstore pipeline needs none, reference counting frees it)."""
        budget = self.budget_bytes if budget is None else budget
        if collect:
            gc.collect()
        # Every settle, within the budget too: each module that died left its set of
        # entries queued, and a process that never exceeds its budget would keep them all
        # (until 2026-12-07: 3 sets per switch of the tiny family, 780 after 260 switches).
        self._count_gone()
        if self._resident_bytes <= budget:
            return 0
        idle = start = self.idle_bytes  # summed once (~2,600 entries), then counted down per eviction
        if idle <= budget:
            return 0
        evicted = []
        for key, entry in self._resident.items():
            if idle <= budget:
                break
            if not entry.users:
                evicted.append(key)
                idle -= entry.nbytes
        self._evict_entries(evicted)
        return start - idle

    def _evict_entries(self, keys: list[Key]) -> None:
        """Drop idle entries; those still the store's tensors go to the pinned tier,
        in one batch."""
        dropped = [self._drop(key) for key in keys]
        self._tier.keep([(e.key, e.tensor) for e in dropped if e is not None and e.tensor._version == e.version])

    @_locked
    def trim(self, idle_bytes: int = 0) -> int:
        """Evict idle tensors (no live module uses them), least recently used first,
        until at most `idle_bytes` of them stay on the device; returns the bytes
        evicted. They go to the pinned tier if it has room. Call it before work that
        needs the device memory; uploads that run out of memory do it themselves.

        A module that put a tensor of its own in the place of a pool tensor without a
        cast or a move (a textual inversion's resized embedding,
        `load_state_dict(assign=True)`, a layer replaced) still counted it in use; here
        every live module's uses are checked against what it holds.

        >>> compstore.pool_for("cuda").trim()  # doctest: +SKIP
        """
        gc.collect()  # modules of the user's that only the collector frees
        for user in list(self._uses.keys()):
            if isinstance(user, torch.nn.Module):  # (not a `Placement`: its module is being built)
                self._forget_replaced(user)
        return self._evict(idle_bytes)

    def _copy_back(self, hosts: list[torch.Tensor], tensors: list[torch.Tensor]) -> object:
        self._after_running_uploads()  # the tensors may be on their way still
        return self._transfers().copy_back(hosts, tensors)

    def _copy_on_host(self, hosts: list[torch.Tensor], tensors: list[torch.Tensor]) -> None:
        uploader = self._transfers()
        if isinstance(uploader, Uploader):  # its reader threads (a stand-in's own copies: one call)
            uploader.copy_on_host(hosts, tensors)
        else:
            _copy(hosts, tensors)

    def _after_running_uploads(self) -> None:
        """Order this thread's stream after copies a `wait=False` upload left running:
        their tensors are resident already, and may be handed out or copied back."""
        if self._uploader is not None:
            self._uploader.order_after_running()

    # -- moving ------------------------------------------------------------------
    def _transfers(self) -> Uploader:
        with self._making_uploader:  # uploads (a background one too) and copies back ask for it
            if self._uploader is None:
                self._uploader = Uploader(self.device)
            return self._uploader

    def _upload(self, srcs: list[torch.Tensor], wait: bool = True) -> list[torch.Tensor]:
        with self._upload_lock:
            if self.copier is not None:
                return [self.copier(t, self.device) for t in srcs]
            return self._transfers().upload(srcs, wait=wait)

    def wait_uploads(self) -> None:
        """Wait until the copies that `serve` or `move` with `wait=False` left running
        are done: their tensors are then ready for any stream, and the host.

        >>> pool.wait_uploads()  # doctest: +SKIP
        """
        with self._upload_lock:
            if self._uploader is not None:
                self._uploader.wait()

    def _upload_making_room(self, srcs: list[torch.Tensor], wait: bool = True) -> list[torch.Tensor]:
        """`_upload`; when the device is out of memory, evict idle tensors and try
        again: first as many bytes as the upload needs (least recently used first),
        then all of them, after a full collection. The budget bounds idle tensors,
        but the device's free memory shrinks under everything else that runs on it."""
        needed = sum(t.numel() * t.element_size() for t in srcs)
        for make_room in (lambda: self._evict(max(0, self.idle_bytes - needed)),
                          lambda: self._evict(0, collect=True)):
            try:
                return self._upload(srcs, wait)
            except torch.OutOfMemoryError:
                if not make_room():
                    raise
        return self._upload(srcs, wait)

    def stage(self, pipe_or_module) -> int:
        """Copy into the pinned tier the store tensors of `pipe_or_module`, loaded on
        the host, that the pool holds neither resident nor pinned; return the bytes
        staged. Its move to the device then uploads them from pinned memory at the
        link's speed, with no store reads: for a service that knows which pipeline
        comes next, load it on the host (mapped views of the packs: cheap), stage it
        while the current one generates, move it when its turn comes.

        The tier's budget (`pinned_budget_bytes`, 0 by default) bounds what is staged:
        older entries go first, and what does not fit is not staged. Tensors edited
        since they were loaded, and a quantized model's, are not the store's: their
        move uploads them as before. The copies run outside the pool's lock: moves in
        other threads go on meanwhile (one of the same pipeline reads the store).

        >>> pool = compstore.pool_for("cuda")  # doctest: +SKIP
        >>> nxt = compstore.DiffusionPipeline.from_pretrained("B", dtype=torch.float16)  # doctest: +SKIP
        >>> pool.stage(nxt)     # while A generates  # doctest: +SKIP
        >>> nxt.to("cuda")      # B's delta from pinned memory  # doctest: +SKIP

        Raises:
            CompstoreError: `pipe_or_module` is neither a pipeline nor a module.
        """
        if not isinstance(pipe_or_module, torch.nn.Module) and not isinstance(
                getattr(pipe_or_module, "components", None), dict):
            raise CompstoreError(f"stage: expected a pipeline or a module loaded from the store, got "
                                 f"{type(pipe_or_module).__name__}")
        if not self._tier.budget_bytes:
            logger.warning("stage: the pinned tier of the %s pool is off (pinned_budget_bytes=0): nothing "
                           "staged; set COMPSTORE_PINNED_BUDGET or the pool's pinned_budget_bytes", self.device)
            return 0
        with self._lock, normal_tensors():
            sources = self._not_held(pipe_or_module)
            versions = {key: t._version for key, t in sources.items()}
            reserved = self._tier.reserve(list(sources.items()))
        try:
            self._copy_on_host([kept.host for _, kept, _ in reserved], [t for _, _, t in reserved])
        except BaseException:
            with self._lock:
                self._tier.commit(reserved, wanted=lambda key: False)  # the regions go back
            raise

        def wanted(key: Key) -> bool:  # not made resident by another thread meanwhile, nor edited
            return self._resident_entry(key) is None and sources[key]._version == versions[key]

        with self._lock:
            return self._tier.commit(reserved, wanted)

    def _not_held(self, pipe_or_module) -> dict[Key, torch.Tensor]:
        """The host tensors of `pipe_or_module` that are the store's and that the pool
        holds neither resident nor pinned, by pool key (a repeated blob once)."""
        wanted: dict[Key, torch.Tensor] = {}
        for module in pipeline_modules(pipe_or_module).values():
            keys = getattr(module, STORE_KEYS, {})
            tensors = list(named_tensors(module))
            if any(type(t) not in PLAIN_TYPES for _, _, _, t in tensors):
                continue  # a quantized model: moved whole, never pooled (`_move_whole`)
            for name, _, _, t in tensors:
                record = keys.get(name)
                if not (is_stores(record, t) and t.is_contiguous() and t.device.type == "cpu"):
                    continue
                key = (record[0], record[1], _DTYPE_NAMES[t.dtype], self._device_name)
                if key not in wanted and key not in self._tier and self._resident_entry(key) is None:
                    wanted[key] = t.detach()
        return wanted

    @_locked
    def prefetch(self, tensors: list[tuple[tuple[str, int], torch.Tensor]]) -> None:
        """Start uploading, in a background thread, the store tensors `(blob, host
        tensor)` that the pool holds neither resident nor pinned, so that the upload
        overlaps the Python work of building the module they are for (a freshly built
        SDXL UNet: ~0.1-0.3 s of constructors). The next `move` of a module with
        these tensors takes the uploaded copies instead of uploading again;
        `drop_prefetched` forgets those no move took."""
        wanted: dict[Key, torch.Tensor] = {}  # a repeated blob is uploaded once
        for blob, t in tensors:
            key = (*blob, _DTYPE_NAMES[t.dtype], self._device_name)
            if key in wanted or key in self._prefetched or key in self._tier or \
                    self._resident_entry(key) is not None:
                continue
            wanted[key] = t.detach()
        if not wanted:
            return
        if self._background is None:
            self._background = ThreadPoolExecutor(1, thread_name_prefix="compstore-prefetch")
        future = self._background.submit(self._upload, list(wanted.values()))
        self._prefetched.update((key, (future, i)) for i, key in enumerate(wanted))

    @_locked
    def drop_prefetched(self) -> None:
        """Forget background uploads no move took (a load that failed midway)."""
        for future, _ in self._prefetched.values():
            future.exception()  # wait: its tensors are freed only once it is done
        self._prefetched.clear()

    def _take_prefetched(self, key: Key | None, like: torch.Tensor) -> torch.Tensor | None:
        found = self._prefetched.pop(key, None) if key is not None else None
        if found is None:
            return None
        if isinstance(found[0].exception(), torch.OutOfMemoryError):
            return None  # uploaded again with the rest, making room first
        return as_shape(found[0].result()[found[1]], like.shape)  # raises the upload's error, if any

    def _hold(self, key: Key, data: torch.Tensor, uses: set[_Entry]) -> torch.Tensor:
        """Keep a just-uploaded device tensor resident, used by the user of `uses` (a
        module, or a `Placement` until its module is built)."""
        entry = _Entry(key, data, data.numel() * data.element_size(), data._version)
        self._keep(key, entry)
        self._use(uses, entry)
        return data

    def _resident_entry(self, key: Key) -> _Entry | None:
        entry = self._resident.get(key)
        if entry is not None and entry.tensor._version != entry.version:
            self._drop(key)  # changed in place on the device: no longer the store's
            return None
        return entry

    def _serve(self, keys: list[Key | None], likes: list[torch.Tensor],
               host: Callable[[list[int]], list[torch.Tensor]], rep: ComponentTransfer,
               uses: set[_Entry], wait: bool) -> list[torch.Tensor]:
        """Device tensors for `keys` (None: not the store's, a private copy), each in
        the dtype and shape of its `likes` entry: resident ones are reused, the rest
        uploaded, each key once, in two batches (pinned tier, then host memory:
        see `upload.Uploader`). `host(indices)` gives the host tensors of those
        indices that are neither resident nor pinned (store views, say). Every pooled
        tensor served joins `uses`, the entries of its user (a module, or a `Placement`).
        `wait=False`: the copies from the pinned tier may still run on return
        (`Uploader.upload`); the caller's stream is ordered after them.

        One call serves one model's distinct tensors (tied ones are one). Two of them
        with the same bytes (a zero bias and another) get a device copy each after
        the first, as a CPU load gives them (`tensors.stored_tensor`): no two weights
        of a model share memory, which `save_pretrained` refuses ("Some tensors share
        memory") and diffusers never does. Models share the pool's tensor."""
        self._after_running_uploads()
        served: list[torch.Tensor | None] = [None] * len(keys)
        same_as: dict[int, int] = {}  # identical bytes again: a device copy of the first
        first: dict[Key, int] = {}  # key -> the index that serves it in this call
        pinned: list[tuple[int, Key]] = []
        from_host: list[int] = []
        for i, (key, like) in enumerate(zip(keys, likes)):
            nbytes = like.numel() * like.element_size()
            if key is not None and key in first:
                same_as[i] = first[key]
                rep.bytes_reused += nbytes  # (copied on the device, not uploaded)
                continue
            if key is not None:
                first[key] = i
            entry = self._resident_entry(key) if key is not None else None
            if entry is not None:
                self._resident.move_to_end(key)
                self._use(uses, entry)
                served[i] = entry.tensor
                rep.bytes_reused += nbytes
            elif key is not None and key in self._tier:
                pinned.append((i, key))
                rep.bytes_from_pinned += nbytes
            else:  # from the store, or not the store's (edited since loading): a private copy
                early = self._take_prefetched(key, like)
                if early is not None:  # uploaded while the module was being built
                    served[i] = self._hold(key, early, uses)
                    rep.bytes_from_store += nbytes
                else:
                    from_host.append(i)
        copies = self._tier.copies_of([key for _, key in pinned])  # an eviction's copies may run still:
        if copies:
            self._transfers().order_after(copies)  # the uploads wait for them on the device
        from_pinned = [(i, key, self._tier.take(key)) for i, key in pinned]
        uploads = []
        for i, src in zip(from_host, host(from_host) if from_host else []):
            if keys[i] is None and src.device == self.device:
                served[i] = src  # a private tensor already there (a CPU target's own buffers)
                continue
            uploads.append((i, keys[i], src))
            rep.bytes_from_store += src.numel() * src.element_size()
        for batch, batch_wait in ((from_pinned, wait), (uploads, True)):  # host memory: staged, waited for
            if not batch:  # nothing to wait for: a background upload may hold the uploader
                continue
            for (i, key, _), data in zip(batch, self._upload_making_room([src for _, _, src in batch], batch_wait)):
                served[i] = data if key is None else self._hold(key, data, uses)
        for i, j in same_as.items():  # on this stream: after any copy still running into `served[j]`
            served[i] = served[j].clone()
        return [as_shape(t, like.shape) for t, like in zip(served, likes)]

    @_locked
    def serve(self, blobs: list[tuple[str, int] | None], likes: list[torch.Tensor],
              host: Callable[[list[int]], list[torch.Tensor]],
              wait: bool = True) -> tuple[list[torch.Tensor], "Placement"]:
        """Device tensors for a module about to be built on this device, as `move`
        would leave them: per tensor its store blob (None: not the store's), a
        tensor of its dtype and shape (meta will do), and `host(indices)` for the
        host tensors of those the pool can serve neither resident nor pinned.
        Build the module on the returned tensors, then `claim` it. `wait=False`:
        copies from the pinned tier may still run on return, so that the Python
        work after it overlaps them; work queued on this stream runs after them,
        and `wait_uploads()` waits for them (a load calls it before it returns).

        A template clone is built this way (`component._from_template`): no host
        module is walked and moved afterwards, the clone is born on the device."""
        t0 = time.perf_counter()
        rep = ComponentTransfer("", tensors=len(blobs))
        keys = [None if blob is None else (*blob, _DTYPE_NAMES[like.dtype], self._device_name)
                for blob, like in zip(blobs, likes)]
        placement = Placement(rep)
        data = self._serve(keys, likes, host, rep, self._entries_of(placement), wait)  # in use by it until `claim`
        rep.seconds = round(time.perf_counter() - t0, 6)
        return data, placement

    @_locked
    def claim(self, module: torch.nn.Module, placement: "Placement") -> None:
        """`module` was built on `serve`d tensors: it uses them (they are never
        evicted while it lives), and its next `move` here has nothing to do."""
        uses, handed = self._entries_of(module), self._uses.get(placement, set())
        for entry in handed & uses:  # the module counts once
            entry.users -= 1
        uses |= handed  # the placement's uses become the module's
        handed.clear()
        module.__dict__[_PLACED] = (self, placement.transfer)

    @_locked
    def settle(self) -> int:
        """Evict idle tensors over the budget, least recently used first; returns the
        bytes evicted. A load or `to_device` of several modules calls it once, at its
        end: evicting after each module would take idle tensors that a later module
        of the same pipeline reuses (A's VAE, dropped just before loading B, say)."""
        return self._evict()

    @_locked
    def move(self, module: torch.nn.Module, component: str = "", private: bool = False,
             wait: bool = True, settle: bool = True) -> ComponentTransfer:
        """Move one module to the pool's device; store tensors go through the pool.
        `wait` as in `serve`; `settle=False` leaves the budget to the caller's
        `settle()` (a move of one of several modules).

        Three steps: find every distinct tensor (a walk of the module tree) and
        keep those already where they belong, get device tensors for the others
        (`_serve`: resident, or uploaded from the pinned tier or the store; private
        copies for tensors not the store's), then point the module at them.
        """
        module = compiled_module(module)
        placed = module.__dict__.pop(_PLACED, None)
        if placed is not None and placed[0] is self and not private:  # built here by `serve`
            placed[1].component = component
            return placed[1]
        t0 = time.perf_counter()
        rep = ComponentTransfer(component)
        device = self._device_name
        keys = getattr(module, STORE_KEYS, {})
        uses = self._entries_of(module)
        places: dict[int, list[tuple[torch.nn.Module, str, torch.Tensor]]] = {}  # id -> uses
        pooled_names: dict[int, list[str]] = {}  # id -> names whose record follows the move
        wanted: list[Key | None] = []  # per entry of `places`: its pool key (None: private)
        sources: list[torch.Tensor] = []
        staying: set[int] = set()  # ids of tensors already where they belong
        held_keys: set[Key] = set()  # the pool keys of the tensors it holds after the move
        for name, owner, attr, tensor in named_tensors(module):
            if type(tensor) not in PLAIN_TYPES:  # a quantized model's: see _move_whole
                return self._move_whole(module, component, t0)
            rep.tensors += 1
            if id(tensor) in places:  # tied: one move, every use points at it
                places[id(tensor)].append((owner, attr, tensor))
                if id(tensor) in pooled_names and name in keys:
                    pooled_names[id(tensor)].append(name)
                continue
            if id(tensor) in staying:
                continue
            key_info = keys.get(name)
            pooled = (is_stores(key_info, tensor) and not private
                      and tensor.is_contiguous())  # (the store's layout; channels-last copies are not)
            if pooled:
                pooled_names[id(tensor)] = [name]
            key = (key_info[0], key_info[1], _DTYPE_NAMES[tensor.dtype], device) if pooled else None
            if pooled:
                held_keys.add(key)
            if tensor.device == self.device:
                staying.add(id(tensor))
                held = self._resident_entry(key) if pooled else None
                if held is not None and held.tensor.data_ptr() == tensor.data_ptr():
                    self._use(uses, held)  # bound to the resident tensor already
                    self._resident.move_to_end(key)
                    rep.bytes_reused += tensor.numel() * tensor.element_size()
                    continue
                if not (pooled and self.device.type == "cpu"):
                    continue  # already there (a CPU target pools store views into its own memory)
                staying.discard(id(tensor))
            places[id(tensor)] = [(owner, attr, tensor)]
            wanted.append(key)
            sources.append(tensor.detach())
        served = self._serve(wanted, sources, lambda indices: [sources[i] for i in indices], rep, uses, wait)
        for bindings, data in zip(places.values(), served):
            old = bindings[0][2]
            new = (torch.nn.Parameter(data, requires_grad=old.requires_grad)
                   if isinstance(old, torch.nn.Parameter) else data)
            for owner, attr, _ in bindings:
                if isinstance(old, torch.nn.Parameter):
                    owner._parameters[attr] = new
                else:
                    owner._buffers[attr] = new
            for name in pooled_names.get(id(old), ()):  # still the store's, at the new tensor's version
                keys[name] = store_record(keys[name][:2], new)
        if len(uses) > len(held_keys):  # it put tensors of its own in the place of some since
            self._forget_replaced(module)  # (a textual inversion's resized embedding, say)
        if settle:
            self._evict()
        rep.seconds = round(time.perf_counter() - t0, 6)
        return rep

    def _move_whole(self, module: torch.nn.Module, component: str, t0: float) -> ComponentTransfer:
        """Move a module that holds tensors of other kinds than torch's own with its own
        `.to()`: a quantized model's (torchao's tensor subclasses, bitsandbytes'
        parameters, which carry their quantization state beside their bytes), for which
        a copy of the bytes is not a copy of the tensor, and whose library checks what
        may move. Its quantized weights are not the store's (quantized.py); none of its
        tensors is served from the pool or kept in it; its bytes count as uploaded
        from host memory."""
        rep = ComponentTransfer(component)
        moving = {id(t): t for _, _, _, t in named_tensors(module) if t.device != self.device}
        if moving:  # (older bitsandbytes refuse any .to() of a model it placed as it loaded)
            unrouted(type(module).to)(module, self.device)  # the class's own: not the pool again
        rep.tensors = len(moving)
        rep.bytes_from_store = sum(_nbytes(t) for t in moving.values())
        rep.seconds = round(time.perf_counter() - t0, 6)
        return rep

    @_locked
    def release_replaced(self, module: torch.nn.Module) -> None:
        """Forget the pool tensors `module` no longer holds: a conversion (a cast,
        `.to(memory_format=...)`) replaced them with new ones. Those no other module
        uses become idle, kept within the budget; the ones it still holds stay in use."""
        self._forget_replaced(compiled_module(module))
        self._count_gone()
        self._evict()

    @_locked
    def own_copies(self, module: torch.nn.Module, tensors: list[torch.Tensor]) -> None:
        """Give `module` (a model, a wrapper of models, or any module inside one) copies
        of its own of those `tensors` (its parameters or buffers) that are pool tensors,
        before it edits them in place: an edit of a shared tensor would reach every model
        that holds it (`fuse_lora`, `load_state_dict`: routing.py). The pool's tensors
        stay, idle if no other module uses them: a later load of the same weights
        reuses them."""
        module = compiled_module(module)
        if not any(t.device == self.device for t in tensors):  # (a module on the host, new layers)
            return
        pooled = {storage_of(e.tensor): e for e in (*self._resident.values(),
                                                    *(e for uses in self._uses.values() for e in uses))}
        wanted = {id(t): pooled[s] for t in tensors if (s := storage_of(t)) in pooled}
        if not wanted:  # (a LoRA's `load_state_dict`: its own tensors only)
            return
        copies: dict[int, torch.Tensor] = {}  # a tied tensor: one copy, every use points at it
        for _, owner, attr, t in named_tensors(module):
            if id(t) in wanted:
                # A new tensor, not `t.data = ...`: a parameter shares its version counter
                # with the pool's tensor, which the merge's mark must not reach.
                if id(t) not in copies:
                    copies[id(t)] = (torch.nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)
                                     if isinstance(t, torch.nn.Parameter) else t.detach().clone())
                (owner._parameters if attr in owner._parameters else owner._buffers)[attr] = copies[id(t)]
        # The models using those entries: the one `module` is (in), which no longer holds
        # them, and any other sharing them, which still does (`_forget_replaced` tells).
        replaced = set(wanted.values())
        for user, uses in list(self._uses.items()):
            if isinstance(user, torch.nn.Module) and not uses.isdisjoint(replaced):
                self._forget_replaced(user)
        self._count_gone()
        self._evict()

    def _forget_replaced(self, module: torch.nn.Module) -> None:
        """`module` stops using the entries whose tensors it no longer holds."""
        uses = self._uses.get(module)
        if not uses:
            return
        held = {storage_of(t) for _, _, _, t in named_tensors(module)}
        for entry in [e for e in uses if storage_of(e.tensor) not in held]:
            uses.discard(entry)
            entry.users -= 1

    @_locked
    def release(self, module: torch.nn.Module, now: bool = False) -> None:
        """Forget that `module` uses pool tensors (it is being moved elsewhere). Those
        no other module uses become idle, kept within the budget; `now=True` evicts
        them at once instead (to the pinned tier if it has room)."""
        uses = self._uses.get(module, set())
        for entry in uses:
            entry.users -= 1
        self._count_gone()
        freed = [entry.key for entry in uses if now and not entry.users and self._resident.get(entry.key) is entry]
        uses.clear()  # kept: the module's finalizer will count down this set
        self._evict_entries(freed)
        self._evict()


def as_shape(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """`t` as `shape`. Pool keys are bytes and dtype, not shape: the same bytes may be
    a (320, 320) linear weight in one model and a (320, 320, 1, 1) 1x1 conv in
    another. A view shares the storage and the version counter."""
    return t if t.shape == shape else t.view(shape)


PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)  # a tensor whose bytes are all there is to it


def unrouted(method: Callable) -> Callable:
    """A class's method as it was before `routing.route_through_pool` wrapped it."""
    return getattr(method, "__compstore_unrouted__", method)


def storage_of(t: torch.Tensor) -> int:
    """Which storage `t` views (meta tensors too, whose data_ptr is always 0): how a
    conversion that replaced a tensor's data is told from one that kept it."""
    return t.untyped_storage()._cdata


def _nbytes(t: torch.Tensor) -> int:
    """The bytes of a tensor, or of the tensors a wrapper subclass is made of."""
    if hasattr(t, "__tensor_flatten__"):
        return sum(_nbytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def named_tensors(module: torch.nn.Module, stored_names: bool = True):
    """(state_dict-style name, owner module, attribute, tensor) of every parameter and
    buffer, through every path (tied and shared ones once per path): the one walk of
    a module's tensors that binding, store keys, templates and moves share.

    A layer that peft wrapped to add a LoRA (`to_q` -> `to_q.base_layer`) keeps its
    weights' stored names here: they are still the store's tensors, and a move or a
    cast must find their records (until 2026-12-07 a loaded, unfused LoRA made them
    private: every move uploaded them again). `stored_names=False`: the names the
    module's own `state_dict` has (`to_q.base_layer.weight`)."""
    for owner_name, owner in module.named_modules(remove_duplicate=False):
        if stored_names and "base_layer" in owner_name:
            owner_name = ".".join(part for part in owner_name.split(".") if part != "base_layer")
        prefix = f"{owner_name}." if owner_name else ""
        for table in (owner._parameters, owner._buffers):
            for attr, tensor in table.items():
                if tensor is not None:
                    yield prefix + attr, owner, attr, tensor


_POOLS: dict[str, ResidencyPool] = {}
_POOLS_LOCK = threading.Lock()
_EVERY_POOL: "weakref.WeakSet[ResidencyPool]" = weakref.WeakSet()  # `pool_for`'s and those users made
_EVERY_POOL_LOCK = threading.Lock()


def pools_holding_tensors() -> list[ResidencyPool]:
    """The pools of this process that hold tensors (resident, or used by a module)."""
    with _EVERY_POOL_LOCK:
        return [pool for pool in _EVERY_POOL if pool._resident or len(pool._uses)]


def free_bytes(device: torch.device) -> int | None:
    """The device's free memory, as its torch backend tells it: `mem_get_info` (CUDA,
    XPU), or Apple's MPS' recommended working set less what its driver holds (unified
    memory, shared with the host); None for the host and devices torch cannot tell of.
    (Until 2026-12-07 every device but CUDA got an unlimited budget: on a Mac, a
    switching process kept every dropped pipeline's tensors.)"""
    backend = getattr(torch, device.type, None) if device.type not in ("cpu", "meta") else None
    if hasattr(backend, "mem_get_info"):
        return backend.mem_get_info(device)[0]
    if hasattr(backend, "recommended_max_memory") and hasattr(backend, "driver_allocated_memory"):
        return max(0, backend.recommended_max_memory() - backend.driver_allocated_memory())
    return None


def canonical_device(device: str | torch.device) -> torch.device:
    """`device` with its index, as its tensors report it. `torch.device("cuda")` is not
    equal to `torch.device("cuda:0")`, the device of every tensor on it: without the
    index a pool would not see its own tensors as already there, and "cuda" and
    "cuda:0" would get two pools for one GPU.

    >>> canonical_device("cuda")  # doctest: +SKIP
    device(type='cuda', index=0)
    """
    device = torch.device(device)
    if device.index is not None or device.type in ("cpu", "meta"):
        return device
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.xpu, ...
    index = backend.current_device() if hasattr(backend, "current_device") else 0
    return torch.device(device.type, index)


def usable_device(device: str | torch.device, label: str) -> torch.device:
    """`canonical_device(device)`, or a `CompstoreError` naming the argument (`label`,
    e.g. "device_map=") when this torch cannot use it: a misspelt type, a backend
    torch was built without, a GPU that is not there."""
    try:
        found = canonical_device(device)
        if found.type == "cuda":
            torch.cuda.get_device_name(found)  # raises for a GPU that is not there
        elif found.type not in ("cpu", "meta"):
            torch.empty(0, device=found)  # mps, xpu ...: raises for a backend that is not there
    except (RuntimeError, AssertionError, NotImplementedError) as e:  # torch asserts for a backend
        first = str(e).splitlines()[0]                                # it was built without
        raise CompstoreError(f"{label}{device!r} is not a device this torch can use: {first}") from None
    return found


def pool_for(device: str | torch.device) -> ResidencyPool:
    """The process-wide pool of a device (made on first use, with default budgets)."""
    key = str(canonical_device(device))
    with _POOLS_LOCK:  # two threads asking at once get one pool
        if key not in _POOLS:
            _POOLS[key] = ResidencyPool(device)
        return _POOLS[key]


_LAST: list[TransferReport] = []


def last_transfer() -> TransferReport | None:
    """The report of the most recent `to_device` (or device load) in this process."""
    return _LAST[-1] if _LAST else None


def record_report(pool: ResidencyPool, report: TransferReport) -> None:
    pool.last_report = report
    _LAST[:] = [report]


def pipeline_modules(obj) -> dict[str, torch.nn.Module]:
    """The models a move, release or cast of `obj` acts on: a pipeline's by slot, or
    the module itself (under ""); a compiled one's own module (`compiled_module`); and
    the store-loaded models inside a module that is not one (`_store_models`)."""
    if isinstance(obj, torch.nn.Module):
        return _store_models("", compiled_module(obj))
    out = {}
    for name, c in obj.components.items():
        if isinstance(c, torch.nn.Module):
            out.update(_store_models(name, compiled_module(c)))
    return out


def _store_models(name: str, module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """`module`, after the store-loaded models it holds if it is not one itself: a
    wrapper of models loaded one by one, as `controlnet=[canny, depth]` becomes a
    `MultiControlNetModel`. Each of those moves with its own store records, then
    the wrapper moves what is left. (Until 2026-12-07 the wrapper moved alone, with
    no records: its ControlNets were private copies, uploaded again at every move.)"""
    inner = {} if hasattr(module, STORE_KEYS) else store_models_in(module)
    return {**{f"{name}.{path}" if name else path: sub for path, sub in inner.items()}, name: module}


def store_models_in(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The outermost store-loaded models among `module`'s submodules, by path."""
    inner = {}
    for path, sub in module.named_modules():
        if path and hasattr(sub, STORE_KEYS) and not any(path.startswith(f"{p}.") for p in inner):
            inner[path] = compiled_module(sub)
    return inner


def compiled_module(module: torch.nn.Module) -> torch.nn.Module:
    """The module `torch.compile(module)` wraps (`pipe.unet = torch.compile(pipe.unet)`).
    The wrapper holds the same tensors under `_orig_mod.` names, which are not the
    names the store's keys go by, and it is a new object, not the user the pool
    counts: moved as the wrapper, a compiled UNet was never shared (A -> B -> A
    uploaded all of it again). (Matched by name: importing torch._dynamo costs.)"""
    while type(module).__name__ == "OptimizedModule" and "_orig_mod" in module._modules:
        module = module._modules["_orig_mod"]
    return module


def to_device(pipe_or_module, device: str | torch.device, *, pool: ResidencyPool | None = None,
              private: bool = False) -> TransferReport:
    """Move a pipeline (or one module) to `device`, uploading only what is not resident.

    >>> report = compstore.to_device(pipe, "cuda")  # doctest: +SKIP
    >>> report.bytes_uploaded, report.bytes_reused  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    device = canonical_device(device)
    pool = pool or pool_for(device)
    if pool.device != device:
        raise CompstoreError(f"to_device: the pool is on {pool.device}, not {device}; pass "
                             f"pool_for({str(device)!r}) or leave pool out")
    report = TransferReport(str(device))
    for name, module in pipeline_modules(pipe_or_module).items():  # each module's Python runs behind the last one's copies
        report.components.append(pool.move(module, name, private=private, wait=False, settle=False))
        setattr(module, POOL, pool)  # its move elsewhere (`.to("cpu")`) releases what it holds
    if not isinstance(pipe_or_module, torch.nn.Module):
        setattr(pipe_or_module, POOL, pool)
    pool.settle()  # every module holds what it reuses by now
    pool.wait_uploads()
    report.seconds = round(time.perf_counter() - t0, 6)
    record_report(pool, report)
    return report
