"""A GGUF file's layout, so that the store keeps it by its tensors.

A GGUF file (llama.cpp's format; diffusion transformers are published in it) is a
header (key-value metadata and a table of tensors) followed by a data section of
tensor bytes, each tensor starting at an offset aligned to the file's alignment (32
bytes unless it says otherwise). The store keeps it as it keeps a safetensors file
(objects/, files.kind "gguf"): the header bytes, up to the data section, then one
piece per tensor in offset order. A piece is the tensor's bytes and the padding up
to the next tensor (none where the tensor's size is a multiple of the alignment, as
for nearly every weight of a diffusion model): a GGUF weight's bytes are then the
very blob that compstore's conversion of the file stores (loader/quantized_files.py),
so a GGUF file and its conversion cost the store its bytes once.

The table is read with the gguf package's own reader; a file it cannot read (or
without the package installed) is kept as one raw blob, as any file: the store
holds any file a repo has, well-formed or not.
"""

from __future__ import annotations

import os

from .safetensors_header import SafetensorsHeader, TensorEntry

# What the gguf package's reader raises on a file that is not well-formed GGUF
# (a short file, a bad magic or version, counts and offsets past the end)
GGUF_READ_ERRORS = (ValueError, IndexError, KeyError, OSError, OverflowError, TypeError)


def read_gguf_layout(path: str) -> SafetensorsHeader | None:
    """The header bytes and tensor pieces of the GGUF file at `path`, or None to keep
    it as one blob (not readable as GGUF, or the gguf package not installed). Each
    piece is an entry of dtype "U8" and shape (its size,), named as the tensor.

    >>> read_gguf_layout("flux1-dev-Q4_K_S.gguf").tensors[0].name  # doctest: +SKIP
    'double_blocks.0.img_attn.norm.key_norm.scale'
    """
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    size = os.path.getsize(path)
    try:
        reader = GGUFReader(path)
        data_start = int(reader.data_offset)
        spans = sorted((int(t.data_offset) - data_start, int(t.n_bytes), t.name) for t in reader.tensors)
    except GGUF_READ_ERRORS:
        return None
    if not spans or spans[0][0] != 0 or not 0 < data_start <= size:
        return None
    entries = []
    for i, (begin, nbytes, name) in enumerate(spans):
        end = spans[i + 1][0] if i + 1 < len(spans) else size - data_start
        if end < begin + nbytes:  # overlapping or past the end: not a layout to rebuild the file from
            return None
        entries.append(TensorEntry(name, "U8", (end - begin,), begin, end))
    with open(path, "rb") as f:
        header = f.read(data_start)
    return SafetensorsHeader(header, tuple(entries), {})
