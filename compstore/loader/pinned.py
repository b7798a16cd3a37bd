"""The pinned tier: evicted store tensors kept in host memory for a fast re-upload.

A `ResidencyPool` evicts idle tensors, least recently used first. With a pinned
budget, those still the store's wait here, in page-locked ("pinned") host memory,
from which a re-upload runs at the link's speed with no staging
(`upload.Uploader`); `ResidencyPool.stage` puts a host-loaded pipeline's tensors
here ahead of its move (`reserve`, filled outside the pool's lock, then `commit`).
The tier drops its own oldest entries to stay within budget.

Memory comes in slabs, each entry a view of one. torch's pinned allocator rounds
every allocation up to a power of two (`CachingHostAllocator`) and keeps freed
blocks cached by that size: one allocation per tensor would pin up to twice the
tensors' bytes, more than the budget said. A slab is a power of two (`SLAB_BYTES`,
or the next power of two of a larger tensor), filled front to back and never
written twice: a region already handed out for an upload may still be copying to
the device. A slab's memory goes back when no entry uses it any more. What the
tier holds (`held_bytes`, bounded by the budget) counts whole slabs.

An eviction's tensors come back in one batch (`keep`): one copy call, not a
synchronous copy per tensor. On a GPU the host does not wait for it
(`Uploader.copy_back`): each entry keeps its batch's event, which an upload
from it waits for on the device (`copies_of`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch

from .upload import _copy

SLAB_BYTES = 256 << 20
ALIGN = 512  # where each entry starts in its slab: a multiple of every element size


@dataclass(eq=False)
class _Slab:
    memory: torch.Tensor  # uint8
    used: int = 0  # bytes handed out, from the front
    live: int = 0  # entries in it
    typed: dict = field(default_factory=dict)  # dtype -> `memory` viewed as it

    def region(self, at: int, like: torch.Tensor) -> torch.Tensor:
        """A contiguous tensor of `like`'s dtype and shape at byte `at`: one
        `as_strided` call (an eviction makes ~1,700 of these for an SDXL UNet)."""
        typed = self.typed.get(like.dtype)
        if typed is None:
            typed = self.typed[like.dtype] = self.memory.view(like.dtype)
        return typed.as_strided(like.shape, _contiguous_strides(like.shape), at // like.element_size())


@dataclass(eq=False)
class _Kept:
    host: torch.Tensor  # a view of its slab
    slab: _Slab
    copy: object = None  # the event of the copy back that fills it (None: done on return)


def _contiguous_strides(shape: torch.Size) -> list[int]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return strides[::-1]


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class PinnedTier:
    """Host copies of evicted tensors by pool key, within `budget_bytes` of slabs.

    Args:
        budget_bytes: host memory the tier may hold, in whole slabs (0: off).
        pin: page-lock the slabs (for a CUDA device).
        copy_back: `(host tensors, device tensors) -> event or None`, one eviction's
            copies; an event if they may still run on return (`Uploader.copy_back`).
            Default: a plain copy, done on return (tests on the meta device pass one
            that copies nothing).

    >>> tier = PinnedTier(8 << 30, pin=True)  # doctest: +SKIP
    >>> tier.keep([(key, device_tensor)]); host = tier.take(key)  # doctest: +SKIP
    """

    def __init__(self, budget_bytes: int, pin: bool,
                 copy_back: Callable[[list[torch.Tensor], list[torch.Tensor]], object] = _copy):
        self.budget_bytes = budget_bytes
        self._pin = pin
        self._copy_back = copy_back
        self._entries: OrderedDict[tuple, _Kept] = OrderedDict()  # oldest first
        self._open: _Slab | None = None  # the slab being filled
        self.held_bytes = 0  # the slabs with an entry in them

    def __contains__(self, key: tuple) -> bool:
        return key in self._entries

    def tensors(self) -> list[torch.Tensor]:
        return [kept.host for kept in self._entries.values()]

    def keep(self, items: list[tuple[tuple, torch.Tensor]]) -> None:
        """Copy `(key, device tensor)` pairs into the tier, in one batch; the oldest
        entries go to make room, and a tensor the budget cannot hold is not kept."""
        if not self.budget_bytes:  # off
            return
        placed: list[_Kept] = []
        srcs = []
        for key, t in items:
            self.take(key)
            kept = self._region(t)
            if kept is None:
                continue
            self._entries[key] = kept
            placed.append(kept)
            srcs.append(t)
        if placed:
            done = self._copy_back([kept.host for kept in placed], srcs)
            for kept in placed:
                kept.copy = done

    def reserve(self, items: list[tuple[tuple, torch.Tensor]]) -> list[tuple[tuple, _Kept, torch.Tensor]]:
        """Regions for `(key, host tensor)` pairs, to be filled by the caller outside
        its lock and then `commit`ted; until then they are no entries (nothing is
        served from them) but count against the budget. Those the budget cannot
        hold are left out. (`ResidencyPool.stage`: other threads' moves do not wait
        for its copies.)"""
        if not self.budget_bytes:
            return []
        reserved = []
        for key, t in items:
            kept = self._region(t)
            if kept is not None:
                reserved.append((key, kept, t))
        return reserved

    def commit(self, reserved: list[tuple[tuple, _Kept, torch.Tensor]], wanted: Callable[[tuple], bool]) -> int:
        """Make filled `reserve`d regions entries, for the keys still `wanted` and not
        kept meanwhile; the other regions go back. Returns the bytes of the entries made."""
        made = 0
        for key, kept, t in reserved:
            if key in self._entries or not wanted(key):
                self._release(kept.slab)
                continue
            self._entries[key] = kept
            made += t.numel() * t.element_size()
        return made

    def take(self, key: tuple) -> torch.Tensor | None:
        """Remove `key`'s host tensor from the tier and return it (None: not here)."""
        kept = self._entries.pop(key, None)
        if kept is None:
            return None
        self._release(kept.slab)
        return kept.host

    def _release(self, slab: _Slab) -> None:
        """One region of `slab` is no longer the tier's: with the last, its memory goes back."""
        slab.live -= 1
        if not slab.live:
            self.held_bytes -= slab.memory.numel()
            if slab is self._open:
                self._open = None

    def _region(self, like: torch.Tensor) -> _Kept | None:
        """A region for a copy of `like` (None: an empty tensor, which costs nothing to
        upload, or over the budget)."""
        nbytes = like.numel() * like.element_size()
        spot = self._spot(nbytes) if nbytes else None
        if spot is None:
            return None
        slab, at = spot
        return _Kept(slab.region(at, like), slab)

    def copies_of(self, keys: list[tuple]) -> list:
        """The events of the copies back that fill `keys`' entries (each batch once),
        for an upload from them to wait for on the device."""
        copies = {id(kept.copy): kept.copy for key in keys
                  if (kept := self._entries.get(key)) is not None and kept.copy is not None}
        return list(copies.values())

    def fit(self, extra: int = 0) -> None:
        """Drop the oldest entries until the slabs held, and `extra` bytes more, fit
        the budget (after the budget was lowered, say)."""
        while self._entries and self.held_bytes + extra > self.budget_bytes:
            self.take(next(iter(self._entries)))

    def _spot(self, nbytes: int) -> tuple[_Slab, int] | None:
        """A slab with room for `nbytes` (the open one, else a new one) and the byte
        offset of the region there (None: over budget)."""
        size = -(-nbytes // ALIGN) * ALIGN
        slab = self._open
        if slab is None or slab.used + size > slab.memory.numel():
            slab_bytes = max(self._slab_bytes(), _power_of_two_at_least(size))
            if slab_bytes > self.budget_bytes:
                return None  # more than the whole tier
            self.fit(slab_bytes)
            if self.held_bytes + slab_bytes > self.budget_bytes:
                return None  # the rest is reserved (`reserve`), not yet entries to drop
            slab = self._open = _Slab(torch.empty(slab_bytes, dtype=torch.uint8, pin_memory=self._pin))
            self.held_bytes += slab_bytes
        at = slab.used
        slab.used += size
        slab.live += 1
        return slab, at

    def _slab_bytes(self) -> int:
        """`SLAB_BYTES`, or the largest power of two within a smaller budget."""
        return min(SLAB_BYTES, 1 << max(0, self.budget_bytes.bit_length() - 1))
