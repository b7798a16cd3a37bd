"""Single files whose weights are quantized in the file: GGUF (llama.cpp's format,
as the Flux, SD 3.5 and Wan files of city96 and others publish them) and Black Forest
Labs' fp8r and nvfp4 safetensors. Converted once by diffusers with the method's
quantizer, stored as a model saved quantized, loaded as diffusers'
`from_single_file(path, quantization_config=...)` loads the file.

    >>> t = compstore.FluxTransformer2DModel.from_single_file("./flux1-dev-Q4_K_S.gguf", config="flux-dev",
    ...     quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16))  # doctest: +SKIP

A GGUF file holds one model's weights, most of them quantized in blocks (Q4_K,
Q8_0, ...). diffusers reads each quantized weight as a `GGUFParameter`: its raw
bytes (uint8, each row a run of blocks) tagged with its quantization type; its
quantizer puts a `GGUFLinear`, which dequantizes at every forward, in place of each
Linear layer that holds one. A BFL file holds each quantized Linear weight beside its
scales (`weight_scale`; nvfp4 also `weight_scale_2`, `input_scale`), which the
quantizer's `maybe_update_state_dict` pairs up; its Linear layers keep the scales as
buffers.

Neither quantizer can save a model ("not serializable"), so the store keeps what
diffusers' conversion makes, in its names and layout (`save`): GGUF weights' bytes
as uint8 tensors with their types in the safetensors metadata (`gguf_quant_types`,
a JSON object of tensor name to type name), BFL weights with their scales as the
file has them, the other weights as floats, and `quantization_config`
{"quant_method": ..., "compute_dtype": ...} in config.json. A load hands the stored
tensors (zero-copy views) to the method's quantizer as diffusers' single-file load
does (`reassembled`, then quantized.py), with the load's compute dtype.

The conversion runs once per file with float32 compute: the float weights of the
file reach the store unrounded (in the file's dtype, as for any single file), and a
load in any compute dtype casts them as diffusers' load of the file does.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..store import CompstoreError, InvalidInputError
from ..store.gguf_layout import GGUF_READ_ERRORS

METADATA_KEY = "gguf_quant_types"  # safetensors metadata: {tensor name: GGML type name}
WEIGHTS = "diffusion_pytorch_model.safetensors"
# The methods whose weights are quantized in a single file, and what their files are
FILE_METHODS = {"gguf": "a GGUF checkpoint (.gguf)", "bfl": "a BFL fp8r or nvfp4 checkpoint (.safetensors)"}
# BFL's scales: its quantizer keeps their dtype (float32), where it casts other floats
_SCALES = (".weight_scale", ".weight_scale_2", ".input_scale")


def is_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf")


@dataclass
class GGUFTensor:
    """A tensor of a GGUF file as diffusers reads it: a quantized one as uint8 bytes
    ("U8", its rows in bytes), a float one in its dtype ("F32", "F16")."""
    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class GGUFHeader:
    """The tensor table of a GGUF file (what `safetensors_header.read_header` gives of
    a safetensors file, as far as a conversion needs it)."""
    tensors: list[GGUFTensor]
    metadata: dict[str, str] = field(default_factory=dict)


def read_gguf_header(path: str | Path, label: str) -> GGUFHeader:
    """The tensors a GGUF file holds (its data is mapped, not read).

    Raises:
        InvalidInputError: not a GGUF file, or a tensor in a quantization type
            diffusers cannot dequantize (its list of those it can).
    """
    try:
        import gguf
    except ImportError:
        raise InvalidInputError(label, "a GGUF checkpoint: reading one takes the gguf package "
                                "(pip install 'gguf>=0.10.0'), as diffusers' own GGUF loading does") from None
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

    try:
        reader = gguf.GGUFReader(path)
    except GGUF_READ_ERRORS as e:
        raise InvalidInputError(label, f"not a readable GGUF file ({type(e).__name__}: {e})") from None
    plain = {gguf.GGMLQuantizationType.F32: "F32", gguf.GGMLQuantizationType.F16: "F16"}
    tensors = []
    for t in reader.tensors:
        kind = t.tensor_type
        if kind not in plain and kind not in SUPPORTED_GGUF_QUANT_TYPES:
            raise InvalidInputError(label, f"tensor {t.name} is quantized as {kind.name}, which diffusers cannot "
                                    "dequantize; it can: " + ", ".join(q.name for q in SUPPORTED_GGUF_QUANT_TYPES))
        tensors.append(GGUFTensor(t.name, tuple(t.data.shape), plain.get(kind, "U8")))
    return GGUFHeader(tensors)


def quant_method(quantization_config: Any) -> str | None:
    """The `quant_method` a quantization config names ("torchao", "gguf", ...), of a
    config object or a config.json's dict; None where it names none."""
    method = (quantization_config.get("quant_method") if isinstance(quantization_config, dict)
              else getattr(quantization_config, "quant_method", None))
    return None if method is None else str(getattr(method, "value", method))


def file_method(quantization_config: Any) -> str | None:
    """"gguf" or "bfl" for a config of a method whose weights are quantized in a file
    (a config object or a config.json's dict), else None."""
    method = quant_method(quantization_config)
    return method if method in FILE_METHODS else None


def _config_class(method: str) -> type:
    from diffusers import BFLQuantizationConfig, GGUFQuantizationConfig

    return {"gguf": GGUFQuantizationConfig, "bfl": BFLQuantizationConfig}[method]


def conversion_config(method: str) -> Any:
    """The quantization config a file of `method` is converted with: float32 compute,
    so that no float weight is rounded on its way into the store."""
    return _config_class(method)(compute_dtype=torch.float32)


def save(model: torch.nn.Module, folder: Path, method: str, float_dtypes: set[torch.dtype]) -> None:
    """Write a model diffusers converted from a file of `method` as a model folder the
    store ingests (diffusers' `save_pretrained` refuses these: "not serializable").
    Its saved compute dtype is the method's default (GGUF float32, BFL bfloat16). Each
    float tensor (float32 after the conversion) is saved in the narrowest of the file's
    `float_dtypes` that holds it exactly (BFL's scales aside): a GGUF file's F16
    weights beside its F32 norms stay F16, as a load casts each to its compute dtype
    anyway."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    default = _config_class(method)().compute_dtype
    config["quantization_config"] = {"quant_method": method, "compute_dtype": str(default).removeprefix("torch.")}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors, kinds = {}, {}
    for name, t in model.state_dict().items():
        if method == "gguf" and getattr(t, "quant_type", None) is not None:  # a GGUFParameter
            kinds[name] = t.quant_type.name
            t = t.as_tensor()
        t = t.detach()
        if t.is_floating_point() and not name.endswith(_SCALES):
            t = next((t.to(d) for d in sorted(float_dtypes, key=lambda d: d.itemsize)
                      if d.itemsize < t.element_size() and torch.equal(t.to(d).to(t.dtype), t)), t)
        # views of one tensor (a fused qkv split) are written each as its own bytes
        tensors[name] = t.contiguous()
    metadata = {"format": "pt"}
    if method == "gguf":
        metadata[METADATA_KEY] = json.dumps(kinds, sort_keys=True)
    save_file(tensors, folder / WEIGHTS, metadata=metadata)


def load_config(saved: dict, given: Any) -> Any:
    """The quantization config a stored model of a file's method loads with: a given
    config of that method (its compute dtype is the load's choice, as with the file),
    else the saved one.

    Raises:
        CompstoreError: the saved compute dtype is not a torch dtype.
    """
    method = file_method(saved)
    if given is not None and file_method(given) == method:
        return given
    if given is not None:  # as diffusers sets aside a config given for a model saved quantized
        warnings.warn(f"quantization_config={given!r} was passed, but the model was stored from "
                      f"{FILE_METHODS[method]}: its weights are loaded as they are, with the saved config")
    if not isinstance(saved, dict):  # a config object already
        return saved
    dtype = saved.get("compute_dtype") or str(_config_class(method)().compute_dtype).removeprefix("torch.")
    if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise CompstoreError(f"the saved {method} quantization_config names compute_dtype {dtype!r}, "
                             "not a torch dtype")
    return _config_class(method)(compute_dtype=getattr(torch, dtype))


def reassembled(sd: dict[str, torch.Tensor], metadata: dict[str, str], where: str,
                config: Any) -> dict[str, torch.Tensor]:
    """`sd` of a model stored from a file of `config`'s method, its quantized weights
    as diffusers reads them from the file (zero-copy): GGUF bytes wrapped as
    `GGUFParameter`s of their types (`_gguf_reassembled`). BFL weights stay beside
    their scales, as in the file: the BFL quantizer pairs them up itself
    (`maybe_update_state_dict`, which diffusers' loading calls), here on a copy, to
    check that it can.

    Raises:
        CompstoreError: tensors that are not what the method's files hold (the
            quantizer's words, or `_gguf_reassembled`'s).
    """
    if file_method(config) == "gguf":
        return _gguf_reassembled(sd, metadata, where)
    from diffusers.quantizers.bfl.bfl_quantizer import BFLQuantizer

    try:
        BFLQuantizer(load_config(config, None)).maybe_update_state_dict(dict(sd))
    except ValueError as e:
        raise CompstoreError(f"{where}: its tensors are not a BFL checkpoint's: {e}") from None
    # the quantizer takes a quantized weight without its scales for a plain one (whose
    # values it would then cast): a file that lost them
    unscaled = [name for name, t in sd.items() if name.endswith(".weight")
                and t.dtype in (torch.float8_e4m3fn, torch.uint8) and name + "_scale" not in sd]
    if unscaled:
        raise CompstoreError(f"{where}: its tensors are not a BFL checkpoint's: {unscaled[0]} is "
                             f"{sd[unscaled[0]].dtype}, a quantized weight, with no {unscaled[0]}_scale")
    return sd


def _gguf_reassembled(sd: dict[str, torch.Tensor], metadata: dict[str, str], where: str) -> dict[str, torch.Tensor]:
    """`sd` with the stored bytes of each quantized weight wrapped as the
    `GGUFParameter` diffusers reads from a GGUF file (zero-copy).

    Raises:
        CompstoreError: the metadata is not a JSON object of names to types, or names a
            tensor the model lacks, one not uint8, a type diffusers cannot dequantize
            or bytes that are not whole blocks of it.
    """
    import gguf
    from diffusers.quantizers.gguf.utils import GGML_QUANT_SIZES, SUPPORTED_GGUF_QUANT_TYPES, GGUFParameter

    try:
        kinds = json.loads(metadata.get(METADATA_KEY, ""))
    except ValueError:
        kinds = None
    if not isinstance(kinds, dict) or not all(isinstance(v, str) for v in kinds.values()):
        raise CompstoreError(f"{where}: its {METADATA_KEY} metadata is not a JSON object of tensor names "
                             "to GGUF types: not a GGUF model compstore stored")
    sd = dict(sd)
    for name, kind in kinds.items():
        t = sd.get(name)
        quant = getattr(gguf.GGMLQuantizationType, kind, None)
        problem = ("is not among its tensors" if t is None
                   else f"is {t.dtype}, not the uint8 bytes of a GGUF weight" if t.dtype != torch.uint8
                   else f"names type {kind!r}, which diffusers cannot dequantize"
                   if quant not in SUPPORTED_GGUF_QUANT_TYPES
                   else f"rows of {t.shape[-1] if t.ndim else 0} bytes are not whole {kind} blocks"
                   if t.ndim == 0 or t.shape[-1] % GGML_QUANT_SIZES[quant][1] else None)
        if problem:
            raise CompstoreError(f"{where}: GGUF weight {name} {problem}")
        sd[name] = GGUFParameter(t, quant_type=quant)
    return sd
