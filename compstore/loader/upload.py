"""Where store bytes reach a device: the batched, overlapped upload of many tensors.

Store tensors are views of mmap'd packs: pageable memory, possibly not yet in the
page cache. Copying pageable memory to a GPU makes the driver bounce it through a
small pinned buffer of its own, one synchronous copy at a time. Instead, for CUDA:

    reader threads (several)          side stream
    pack pages -> pinned buffer k  ->  buffer k -> device (async), event k
                  pinned buffer k+1 ->  ...

Readers fill a ring of pinned staging buffers in parallel (page faults on the
packs are taken by several threads at once); the main thread issues each filled
buffer's host-to-device copies on a side stream and records an event, and a reader
refills a buffer only once its event has fired. Tensors already in pinned memory
(the pool's pinned tier) are copied straight from there. Nothing is copied in
full to pageable memory first. Each buffer is filled, and emptied, in one call
(`_copy`): a thread gets the GIL back after each long copy only once another
thread running Python lets it go, up to a switch interval (5 ms) later.

A batch is finished before `upload` returns (the side stream synchronised), except
a batch of pinned tensors uploaded with `wait=False`: its copies are only queued,
the caller's stream waits for them on the device (an event), and the caller goes
on with its Python work while they run, until `wait()`. (A staged batch is waited
for: its staging buffers are reused by the next batch.)

The way back (`copy_back`, an eviction into the pool's pinned tier) runs on a
stream of its own, so that it overlaps the uploads that follow it (the link
carries both directions at once), and the host does not wait for it: an upload
from the tensors it fills waits for its event on the device, and the device
memory it reads is not handed out again before it has (`record_stream`).

For a CPU target the readers copy straight into the destination tensors, in
parallel. `staged=True` forces the staging ring on CPU too, which is how its
chunking and buffer reuse are tested without a GPU.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from ..store import CompstoreError
from ..store.settings import env_setting

STAGING_BYTES = 32 << 20
PIECE_BYTES = 16 << 20  # a CPU reader's unit of work


def _dense(t: torch.Tensor) -> bool:
    """Whether `t`'s elements fill one run of memory: contiguous, or contiguous in a
    channels-last layout (`.to(memory_format=torch.channels_last)`, kept as is)."""
    return (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)
            or t.is_contiguous(memory_format=torch.channels_last_3d))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a dense tensor's bytes, in memory order."""
    return t.as_strided((t.numel(),), (1,)).view(torch.uint8)


Job = list[tuple[int, int, int, int]]  # slices (tensor, start, end, offset in the job) of flat bytes


def _cut(srcs: list[torch.Tensor], size: int) -> list[Job]:
    """The bytes of `srcs`, in order, cut into jobs of `size` bytes (the last one less)."""
    jobs: list[Job] = [[]]
    used = 0
    for i, s in enumerate(srcs):
        n, off = s.numel() * s.element_size(), 0
        while off < n:
            take = min(n - off, size - used)
            jobs[-1].append((i, off, off + take, used))
            used, off = used + take, off + take
            if used == size:
                jobs.append([])
                used = 0
    return [j for j in jobs if j]


def _parts(job: Job, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The job's slices of `tensors` (flat bytes)."""
    return [tensors[i][a:z] for i, a, z, _ in job]


def _spots(job: Job, buffer: torch.Tensor) -> list[torch.Tensor]:
    """Where the job's slices sit in a staging buffer."""
    return [buffer[at:at + z - a] for _, a, z, at in job]


def _copy(dsts: list[torch.Tensor], srcs: list[torch.Tensor], non_blocking: bool = False) -> None:
    """`d.copy_(s)` for each pair, in one call. A thread gives up the GIL for each
    copy that takes a while, and while another thread runs Python (a cold load's
    constructors, beside its background upload) it waits a switch interval (5 ms)
    to get it back: once per call, not once per tensor, keeps the copies going."""
    torch._foreach_copy_(dsts, srcs, non_blocking=non_blocking)


class Uploader:
    """Copies host tensors to one device, and evicted ones back (`copy_back`); see the
    module docstring.

    Args:
        device: the target.
        readers: threads reading store pages (default `$COMPSTORE_UPLOAD_READERS`, else
            half the CPU cores, 2 to 8).
        staging_bytes: size of one pinned staging buffer (the ring holds readers + 2).
        staged: use the staging ring (default: on CUDA targets only).
    """

    def __init__(self, device: str | torch.device, *, readers: int | None = None,
                 staging_bytes: int = STAGING_BYTES, staged: bool | None = None):
        self.device = torch.device(device)
        self.readers = readers or env_setting("COMPSTORE_UPLOAD_READERS", 0) or \
            min(8, max(2, (os.cpu_count() or 2) // 2))
        if self.readers < 1:
            raise CompstoreError(f"readers={readers}: an upload needs at least 1 reader thread")
        self.staging_bytes = staging_bytes
        self.staged = self.device.type == "cuda" if staged is None else staged
        self._threads = ThreadPoolExecutor(self.readers, thread_name_prefix="compstore-upload")
        self._ring: list[torch.Tensor] = []  # pinned buffers, made on first use
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._back = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None  # copies back
        self._in_flight: list[tuple] = []  # (event, sources) of queued batches: sources live until it fires

    def upload(self, srcs: list[torch.Tensor], *, wait: bool = True) -> list[torch.Tensor]:
        """New device tensors holding the bytes of `srcs` (same shapes and dtypes).
        `wait=False`: a batch of pinned tensors may still be copying when this
        returns (see the module docstring)."""
        srcs = [s if _dense(s) else s.contiguous() for s in srcs]
        # the same layout as the source (a byte copy needs it), as torch's `.to` keeps it
        dsts = [torch.empty_like(s, device=self.device) for s in srcs]
        if not srcs:
            return dsts
        pinned = {i for i, s in enumerate(srcs) if self._stream is not None and s.is_pinned()}
        rest = [i for i in range(len(srcs)) if i not in pinned]
        if self._stream is not None:
            current = torch.cuda.current_stream(self.device)
            # `dsts` may reuse memory that work queued on the current stream still
            # reads (a dropped pipeline's last kernels): the side stream waits for it.
            self._stream.wait_stream(current)
            with torch.cuda.stream(self._stream):
                if pinned:  # the pinned tier: no staging needed
                    _copy([dsts[i] for i in pinned], [srcs[i] for i in pinned], non_blocking=True)
            if not (wait or rest):
                done = torch.cuda.Event()
                done.record(self._stream)
                current.wait_event(done)  # on the device: the host goes on
                self._in_flight = [(e, s) for e, s in self._in_flight if not e.query()] + [(done, srcs)]
                return dsts
        if self.staged:
            self._staged([srcs[i] for i in rest], [dsts[i] for i in rest])
        else:
            self._direct([srcs[i] for i in rest], [dsts[i] for i in rest])
        if self._stream is not None:
            self._stream.synchronize()  # callers use the tensors on other streams
            self._in_flight = []  # queued batches ran before this one's copies
        return dsts

    def copy_on_host(self, dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
        """`d.copy_(s)` for host tensors, dense and alike, on the reader threads (store
        views into the pinned tier: `ResidencyPool.stage`). Done on return."""
        self._direct(srcs, dsts)

    def _direct(self, srcs, dsts) -> None:
        src_b, dst_b = [_bytes(s) for s in srcs], [_bytes(d) for d in dsts]

        def copy(job: Job) -> None:
            _copy(_parts(job, dst_b), _parts(job, src_b))

        for _ in self._threads.map(copy, _cut(srcs, PIECE_BYTES)):
            pass

    def _staging_ring(self) -> list[torch.Tensor]:
        if not self._ring:
            pin = self.device.type == "cuda"
            self._ring = [torch.empty(self.staging_bytes, dtype=torch.uint8, pin_memory=pin)
                          for _ in range(self.readers + 2)]
        return self._ring

    def _staged(self, srcs, dsts) -> None:
        jobs = _cut(srcs, self.staging_bytes)  # one staging buffer each
        src_b, dst_b = [_bytes(s) for s in srcs], [_bytes(d) for d in dsts]
        ring = self._staging_ring()
        events: list = [None] * len(ring)

        def fill(k: int) -> None:
            slot = k % len(ring)
            if events[slot] is not None:
                events[slot].synchronize()  # its previous contents reached the device
            _copy(_spots(jobs[k], ring[slot]), _parts(jobs[k], src_b))

        filling = {k: self._threads.submit(fill, k) for k in range(min(len(ring), len(jobs)))}
        for k in range(len(jobs)):
            filling.pop(k).result()
            slot = k % len(ring)
            parts, spots = _parts(jobs[k], dst_b), _spots(jobs[k], ring[slot])
            if self._stream is not None:
                with torch.cuda.stream(self._stream):
                    _copy(parts, spots, non_blocking=True)
                    events[slot] = torch.cuda.Event()
                    events[slot].record(self._stream)
            else:  # CPU (tests): a synchronous copy frees the buffer at once
                _copy(parts, spots)
            if k + len(ring) < len(jobs):
                filling[k + len(ring)] = self._threads.submit(fill, k + len(ring))

    def copy_back(self, hosts: list[torch.Tensor], tensors: list[torch.Tensor]) -> "torch.cuda.Event | None":
        """Copy device `tensors` into pinned `hosts`, in one call. On CUDA the copies are
        only queued, on the copy-back stream after the work queued so far on this
        thread's stream (the tensors' last uses); returns their event, which an
        upload from `hosts` must wait for on the device. Elsewhere: copied on return, None."""
        if self._back is None:
            _copy(hosts, tensors)
            return None
        self._back.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._back):
            _copy(hosts, tensors, non_blocking=True)
        for t in tensors:
            t.record_stream(self._back)  # its memory is not handed out again before the copy has read it
        done = torch.cuda.Event()
        done.record(self._back)
        return done

    def wait(self) -> None:
        """Wait for the batches `upload(wait=False)` left running."""
        for done, _ in self._in_flight:
            done.synchronize()
        self._in_flight = []

    def order_after_running(self) -> None:
        """Make the current stream's next work wait, on the device, for the batches
        `upload(wait=False)` left running (another thread's, on another stream)."""
        self.order_after([done for done, _ in self._in_flight])

    def order_after(self, events: list) -> None:
        """Make the current stream's next work wait, on the device, for `events` (the
        copies back into pinned memory that an upload is about to read, say)."""
        if events:
            current = torch.cuda.current_stream(self.device)
            for done in events:
                current.wait_event(done)

    def close(self) -> None:
        self._threads.shutdown(wait=True)
        for stream in (self._stream, self._back):
            if stream is not None:
                stream.synchronize()
        self._ring, self._in_flight = [], []
