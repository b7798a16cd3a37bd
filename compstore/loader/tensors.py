"""Store tensors as torch tensors: views of privately mapped pack bytes.

On CPU with the stored dtype a tensor is a zero-copy view of the pack file, mapped
copy-on-write (MAP_PRIVATE): an in-place edit copies the touched page into the
process and never reaches the store. A dtype change happens tensor by tensor, so
a pipeline is never held twice. A blob one load binds twice is viewed once and
copied once: no two tensors of a pipeline share memory that diffusers would not.
"""

from __future__ import annotations

import os

import torch

from ..store import CorruptStoreError, Store
from ..store.store import TensorLocation
from ..store.objects import PackFiles

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "U16": torch.uint16, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32,
    "U32": torch.uint32, "F32": torch.float32, "I64": torch.int64, "U64": torch.uint64,
    "F64": torch.float64, "C64": torch.complex64,
    "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn,
}
if hasattr(torch, "float8_e8m0fnu"):
    TORCH_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu

class LoadMappings(PackFiles):
    """One load's copy-on-write mappings of the store's packs, which also remember the
    blobs they have handed out as tensors. Two tensors of one pipeline with the same
    bytes (a VAE's and a UNet's norm weights of ones, zero biases) are one blob: a
    second view of it would be the same memory, so that an in-place edit of one
    tensor (`fuse_lora`, an optimizer step) changed the other, where diffusers loads
    two tensors. The second gets a copy.

    `copies=True` (a load with `verify=True`): each blob is read once into memory of
    its own, and that copy is what is hashed and what the tensors are built on. A
    mapping shows the file as it is now: a pack changed on disk between the check
    and the use (a failing disk) would change a tensor that had passed."""

    def __init__(self, packs_dir, copies: bool = False):
        super().__init__(packs_dir, private=True)
        self._handed_out: set[tuple[str, int]] = set()
        self._copies: dict[tuple[str, int, int], bytearray] | None = {} if copies else None

    def view(self, pack: str, offset: int, size: int) -> memoryview:
        if self._copies is None:
            return super().view(pack, offset, size)
        copy = self._copies.get((pack, offset, size))
        if copy is None:
            copy = self._copies[pack, offset, size] = self._read(pack, offset, size)
        return memoryview(copy)

    def _read(self, pack: str, offset: int, size: int) -> bytearray:
        """A blob read with pread, not through a mapping: mapped pages would count in
        the process's RSS beside the copy (2x the pipeline: 4,143 MiB for SD 1.5's
        2 GB, where pread gives one copy)."""
        buf = bytearray(size)
        try:
            fd = os.open(self.path(pack), os.O_RDONLY)
        except FileNotFoundError:
            raise CorruptStoreError(f"pack {pack} is missing; run `compstore verify`") from None
        try:
            view, done = memoryview(buf), 0
            while done < size:  # one call reads at most ~2 GiB
                n = os.preadv(fd, [view[done:]], offset + done)
                if n == 0:
                    raise CorruptStoreError(f"pack {pack} ends inside a blob at {offset}; "
                                            "run `compstore verify`")
                done += n
        finally:
            os.close(fd)
        return buf

    def first_view(self, loc: TensorLocation) -> bool:
        """Whether this is the first tensor of this load on `loc`'s blob (and now it is not)."""
        place = (loc.pack, loc.offset)
        first = place not in self._handed_out
        self._handed_out.add(place)
        return first


def private_packs(store: Store, verified: bool = False) -> LoadMappings:
    """Fresh copy-on-write mappings of the store's packs, for one load.

    Each load maps anew: an in-place edit in one pipeline (fuse_lora, say) must
    not show in a pipeline loaded later. Unwritten pages stay shared with the page
    cache, so two loads of the same tensor still use its RAM once. `verified`: a
    load with `verify=True`, whose tensors are the copies it hashed (`LoadMappings`).
    """
    return LoadMappings(store.home / "objects" / "packs", copies=verified)


def stored_tensor(packs: LoadMappings, loc: TensorLocation) -> torch.Tensor:
    """A zero-copy, copy-on-write view of one stored tensor (it keeps its mapping alive),
    or a copy where this load has viewed the same blob before (`LoadMappings`).
    `packs` are writable, so torch has no read-only buffer to warn of."""
    dtype = TORCH_DTYPES[loc.dtype]
    if loc.size == 0:
        return torch.empty(loc.shape, dtype=dtype)
    t = torch.frombuffer(packs.view(loc.pack, loc.offset, loc.size), dtype=dtype).view(loc.shape)
    return t if packs.first_view(loc) else t.clone()


def keeps_fp32(name: str, keep_in_fp32: list[str] | None) -> bool:
    """diffusers/transformers rule: a tensor under a `_keep_in_fp32_modules` entry stays fp32."""
    if not keep_in_fp32:
        return False
    parts = name.split(".")
    return any(m in parts or name.startswith(m + ".") for m in keep_in_fp32)


def state_dict(
    packs: LoadMappings,
    locations: list[TensorLocation],
    dtype: torch.dtype | None = None,
    keep_in_fp32: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The component's tensors; floating ones cast to `dtype` (one tensor at a time)."""
    out: dict[str, torch.Tensor] = {}
    for loc in locations:
        t = stored_tensor(packs, loc)
        if t.is_floating_point():
            target = torch.float32 if keeps_fp32(loc.name, keep_in_fp32) and dtype is not None else dtype
            if target is not None and t.dtype != target:
                t = t.to(target)
        out[loc.name] = t
    return out
