"""Quantized models: the store's tensors handed to the library's own quantizing
loader.

diffusers and transformers quantize while they load (torchao, bitsandbytes, ...):
each weight read from a file is replaced by its quantized form on the way into the
model. The store holds weights as published, and quantizing is a way of loading
them: here the state dict of store views (zero-copy, as for any load) goes through
the very hooks the library's `from_pretrained` runs on a file's tensors: its
quantizer's checks, dtype and device rules, module replacement and per-weight
quantization. transformers takes a state dict in `from_pretrained` itself;
diffusers' `from_pretrained` reads files, so its steps around its
`_load_pretrained_model` (which takes a state dict) are followed here, as diffusers
0.42 runs them.

A model saved quantized (`quantization_config` in its config.json: a bitsandbytes
or torchao repo) goes the same way with the library's quantizer in its
"pre-quantized" mode, which takes the stored quantized tensors as they are. torchao
saves each of its tensor subclasses flattened into plain tensors and describes them
in the files' safetensors metadata (`Store.weights_metadata`); both libraries
reassemble them with torchao's `unflatten_tensor_state_dict` as they read the
files, and so does `_reassembled` before the state dict reaches them. A GGUF
or BFL fp8r/nvfp4 single file, converted once, is stored as such a model too
(quantized_files.py).

A quantized model's quantized weights are not tensors a pool may share (its
layers the quantizer leaves alone may still view the store): it is built afresh at
every load (no template), and a residency pool moves it with the library's own
`.to()`, never serving or sharing its tensors (residency.py).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from ..store import CompstoreError
from . import quantized_files
from .quantized_files import FILE_METHODS, file_method, quant_method


def check_pipeline_quantization(quantization_config: Any) -> None:
    """A pipeline's `quantization_config` is a `PipelineQuantizationConfig` or None.

    Raises:
        ValueError: anything else, diffusers' own refusal, word for word.
    """
    from diffusers import PipelineQuantizationConfig

    if quantization_config is not None and not isinstance(quantization_config, PipelineQuantizationConfig):
        raise ValueError("`quantization_config` must be an instance of `PipelineQuantizationConfig`.")


def _is_diffusers(cls: type) -> bool:
    from diffusers import ModelMixin

    return issubclass(cls, ModelMixin)


def model_quantization(quantization_config: Any, cls: type, slot: str) -> Any:
    """The quantization config of one model (of class `cls`) of a pipeline, as diffusers
    picks it: the pipeline's `PipelineQuantizationConfig` resolved for `slot` (None:
    as stored)."""
    if quantization_config is None:
        return None
    return quantization_config._resolve_quant_config(is_diffusers=_is_diffusers(cls), module_name=slot)


def saved_quantization(config: dict) -> Any:
    """The quantization config a model was saved with (its config.json's
    `quantization_config`), or None for a model saved unquantized."""
    return config.get("quantization_config") or None


def check_quantization(quantization_config: Any, cls: type, *, dtype: Any, where: str,
                       pre_quantized: bool = False) -> None:
    """What the library checks of a quantization config before it reads a weight (the
    backend installed, a GPU where it needs one), checked before a folder is ingested,
    so that a load that would fail leaves the store as it was: the library's own error.
    `pre_quantized`: the config is the one a model was saved with (`saved_quantization`).

    Raises:
        CompstoreError: not a quantization config; GGUF's or BFL's for weights not
            converted from such a file (they quantize nothing: they describe files), or for
            a class diffusers does not load such weights into.
    """
    method = quant_method(quantization_config)
    if method is None and pre_quantized:
        raise CompstoreError(f"{where}: the quantization_config of its config.json names no quant_method "
                             f"({quantization_config!r}): not a model saved quantized that a library loads")
    if method is None:
        raise CompstoreError(f"quantization_config={quantization_config!r} is not a quantization config "
                             "(it names no quant_method): pass one such as diffusers.TorchAoConfig(...) "
                             "(for a pipeline, a diffusers.PipelineQuantizationConfig)")
    in_file = file_method(quantization_config)
    if in_file is not None:
        if not pre_quantized:
            raise CompstoreError(f"{where}: a {in_file.upper()} quantization config loads "
                                 f"{FILE_METHODS[in_file]}, and these weights are not one: pass the file to the "
                                 "model class's from_single_file, or quantize stored weights with torchao or "
                                 "bitsandbytes")
        if not _is_diffusers(cls):
            raise CompstoreError(f"{where}: saved from {FILE_METHODS[in_file]}, which diffusers loads into "
                                 f"its own model classes only, not into {cls.__name__}")
        quantization_config = quantized_files.load_config(quantization_config, None)
    if _is_diffusers(cls):
        from diffusers.quantizers import DiffusersAutoQuantizer

        DiffusersAutoQuantizer.from_config(quantization_config, pre_quantized=pre_quantized).validate_environment(
            torch_dtype=dtype if isinstance(dtype, torch.dtype) else None, device_map=None)
    else:
        from transformers.quantizers import AutoHfQuantizer

        AutoHfQuantizer.from_config(quantization_config, pre_quantized=pre_quantized).validate_environment(
            device_map=None)


def quantized_model(cls: type, config: dict, sd: dict[str, torch.Tensor], *, quantization_config: Any,
                    dtype: torch.dtype | str | None, name_or_path: str,
                    file_metadata: dict[str, str] | None = None) -> torch.nn.Module:
    """A `cls` model of `config`, its weights `sd` (store views) quantized by the
    library's quantizer for `quantization_config`, as that library's
    `from_pretrained(..., quantization_config=...)` loads it from files. `dtype`: the
    load's (None as the library takes None: its quantizer picks).

    A model saved quantized (`saved_quantization(config)`) loads its stored quantized
    weights as the library loads them from its files; `quantization_config` may then
    be None (a given one is the library's to merge: the saved one wins, with its
    warning). `file_metadata` is its files' safetensors metadata
    (`Store.weights_metadata`)."""
    saved = saved_quantization(config)
    check_quantization(saved or quantization_config, cls, dtype=dtype, where=name_or_path,
                       pre_quantized=saved is not None)
    if saved is not None:
        sd = _reassembled(sd, file_metadata or {}, name_or_path, saved)
    if _is_diffusers(cls):
        return _diffusers_model(cls, config, sd, quantization_config, dtype, name_or_path)
    return _transformers_model(cls, config, sd, quantization_config, dtype, name_or_path)


def _reassembled(sd: dict[str, torch.Tensor], metadata: dict[str, str], where: str,
                 saved: Any) -> dict[str, torch.Tensor]:
    """`sd` of a model saved quantized with `saved`, its quantized tensors as the
    library reads them from its files: torchao's flattened tensor subclasses put back
    together, as diffusers 0.42 and transformers 5 do with a file's tensors
    (`unflatten_tensor_state_dict` on the files' metadata); a GGUF or BFL file's
    weights as diffusers reads them from the file (`quantized_files.reassembled`). A
    state dict without torchao's metadata (bitsandbytes keeps its quantized weights as
    plain tensors) is returned as it is.

    Raises:
        CompstoreError: pieces of a tensor the metadata names with no whole made of them;
            a file method's weights not as `quantized_files.reassembled` needs them.
    """
    if file_method(saved) is not None:
        return quantized_files.reassembled(sd, metadata, where, saved)
    if "tensor_names" not in metadata:  # torchao's mark; no torchao import for other backends
        return sd
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict
    from torchao.prototype.safetensors.safetensors_utils import is_metadata_torchao

    if not is_metadata_torchao(metadata):
        return sd
    # As diffusers does: tensors at the model's root (Wan's `scale_shift_table`) are
    # never pieces, and torchao's helper cannot parse their names.
    root = {name: t for name, t in sd.items() if "." not in name}
    names = [name for name in json.loads(metadata["tensor_names"]) if "." in name]
    whole, pieces = unflatten_tensor_state_dict({name: t for name, t in sd.items() if "." in name},
                                                {**metadata, "tensor_names": json.dumps(names)})
    if pieces:
        raise CompstoreError(f"{where}: stored pieces of torchao tensors with no whole made of them "
                             f"({', '.join(sorted(pieces)[:3])}): its files are not a complete "
                             "torchao checkpoint")
    return {**whole, **root}


def check_saved_pieces(headers: list, where: str, saved: Any) -> None:
    """`_reassembled` on meta stand-ins of a model's tensors, from its files' parsed
    safetensors headers (`SafetensorsHeader`), saved quantized with `saved`: a folder
    whose torchao pieces make no whole tensor, or whose GGUF weights are not as their
    metadata says, is refused before it is ingested, as its load would be refused.

    Raises:
        CompstoreError: as `_reassembled`.
    """
    from .tensors import TORCH_DTYPES

    metadata: dict[str, str] = {}
    for header in headers:
        metadata.update(header.metadata)
    _reassembled({e.name: torch.empty(e.shape, dtype=TORCH_DTYPES[e.dtype], device="meta")
                  for header in headers for e in header.tensors}, metadata, where, saved)


def _diffusers_model(cls, config: dict, sd: dict, quantization_config, dtype, name_or_path: str):
    """diffusers 0.42's `ModelMixin.from_pretrained` from "determine initial
    quantization config" on, minus file resolution, sharding and tensor parallelism."""
    from accelerate import dispatch_model, init_empty_weights
    from diffusers.models.modeling_utils import _determine_device_map, no_init_weights
    from diffusers.quantizers import DiffusersAutoQuantizer

    saved = saved_quantization(config)
    if file_method(saved) is not None:  # a given config of its method picks the compute dtype
        quantization_config = quantized_files.load_config(saved, quantization_config)
    elif saved is not None:  # the saved config wins; a given one is warned of
        quantization_config = DiffusersAutoQuantizer.merge_quantization_configs(saved, quantization_config)
    config = {**config, "quantization_config": quantization_config}
    quantizer = DiffusersAutoQuantizer.from_config(quantization_config, pre_quantized=saved is not None)
    device_map = None  # a device comes through the residency pool's move, as for any model
    quantizer.validate_environment(torch_dtype=dtype, device_map=device_map)
    dtype = quantizer.update_torch_dtype(dtype)
    device_map = quantizer.update_device_map(device_map)
    keep = []
    if cls._keep_in_fp32_modules is not None and getattr(quantizer, "use_keep_in_fp32_modules", False):
        keep = list(cls._keep_in_fp32_modules) if isinstance(cls._keep_in_fp32_modules, (list, tuple)) \
            else [cls._keep_in_fp32_modules]
    old_default = cls._set_default_torch_dtype(dtype) if isinstance(dtype, torch.dtype) else None
    try:
        with no_init_weights(), init_empty_weights():
            model = cls.from_config(config)
    finally:
        if old_default is not None:
            torch.set_default_dtype(old_default)
    sd = dict(sd)
    model._fix_state_dict_keys_on_load(sd)
    # GGUF's and BFL's quantizers replace the Linear layers whose weights in the state
    # dict are quantized ones (diffusers' from_single_file passes it the state dict too,
    # as its quantizer's `maybe_update_state_dict` made it: BFL's weights with their scales)
    quantizer.preprocess_model(model=model, device_map=device_map, keep_in_fp32_modules=keep,
                               **({"state_dict": quantizer.maybe_update_state_dict(dict(sd))}
                                  if file_method(quantization_config) else {}))
    device_map = _determine_device_map(model, device_map, None, dtype, keep, quantizer)
    quantizer.validate_environment(device_map=device_map)
    model = cls._load_pretrained_model(
        model, sd, [], name_or_path, list(sd), hf_quantizer=quantizer, low_cpu_mem_usage=True,
        dtype=dtype, keep_in_fp32_modules=keep, device_map=device_map)[0]
    if device_map is not None:
        dispatch_model(model, device_map=device_map)
    quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer
    model.register_to_config(_name_or_path=name_or_path, _pre_quantization_dtype=dtype)
    model.eval()
    return model


def _transformers_model(cls, config: dict, sd: dict, quantization_config, dtype, name_or_path: str):
    """transformers' own `from_pretrained`, which takes a state dict in place of files
    (and a config holding a saved `quantization_config` as one saved quantized)."""
    config_obj = cls.config_class.from_dict(config)
    kwargs = {} if dtype is None else {"dtype": dtype}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    model = cls.from_pretrained(None, config=config_obj, state_dict=dict(sd), **kwargs)
    model.name_or_path = model.config.name_or_path = name_or_path
    return model

