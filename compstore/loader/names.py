"""Checkpoint names -> the names a model loads them under.

A stored tensor keeps the name its file gave it (exports stay byte-identical), but
the libraries rename some names on load:

- diffusers: the weights of its deprecated attention blocks (`query`, `key`,
  `value`, `proj_attn` -> `to_q`, `to_k`, `to_v`, `to_out.0`), as SD 1.x and 2.x
  VAEs are published (`ModelMixin._fix_state_dict_keys_on_load`);
- transformers 5: each model's conversion mapping, e.g. CLIPTextModel no longer
  has its `text_model.` level, which every published CLIP text encoder's names
  start with; legacy `LayerNorm.gamma`/`beta`; adding or removing the
  `base_model_prefix` (`transformers.core_model_loading.rename_source_key`).

Both are asked of the library itself, on the model built on meta, so that names
bind as `from_pretrained` binds them. transformers' conversions that merge or
split tensors (fused MoE experts, qkv) make new tensors: those are refused.
"""

from __future__ import annotations

import re

import torch

from ..store import CompstoreError

_DEPRECATED_ATTENTION = re.compile(r"\.(query|key|value|proj_attn)\.(weight|bias)$")


def checkpoint_renames(model: torch.nn.Module, names: list[str]) -> dict[str, str]:
    """{stored name: model name} of the `names` the library loads under another name.

    >>> checkpoint_renames(clip_text_model_on_meta, ["text_model.final_layer_norm.weight"])  # doctest: +SKIP
    {'text_model.final_layer_norm.weight': 'final_layer_norm.weight'}
    """
    from diffusers import ModelMixin

    if isinstance(model, ModelMixin):
        fix = getattr(model, "_fix_state_dict_keys_on_load", None)  # as diffusers 0.42 names it
        if fix is None or not any(_DEPRECATED_ATTENTION.search(name) for name in names):
            return {}
        renamed = fix({name: name for name in names})  # new name -> stored name
        return {old: new for new, old in renamed.items() if old != new}
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # transformers 4: no conversion mapping
        return {}
    own = model.state_dict()
    if all(name in own for name in names):  # a checkpoint in today's names (conversions leave them)
        return {}
    try:
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        renamed = {name: _renamed(name, renamings, converters, model.base_model_prefix, own)
                   for name in names}
    except (TypeError, AttributeError) as e:  # another transformers 5 release's internals
        import transformers

        raise CompstoreError(
            f"{type(model).__name__}: its stored names need transformers' renaming on load, and "
            f"transformers {transformers.__version__}'s internals are not the ones compstore uses "
            f"({e}); install transformers 5.23") from None
    out = {}
    for name, (new, converted) in renamed.items():
        if converted is not None:
            raise CompstoreError(
                f"{type(model).__name__}: transformers converts the stored tensor {name!r} into "
                f"another ({converted!r} -> {new!r}), which compstore does not do; load this "
                "model with transformers' own from_pretrained (and pass it to the pipeline as a "
                "keyword argument)")
        if new != name:
            out[name] = new
    return out


def _renamed(name, renamings, converters, prefix, own):
    """(new name, converter pattern or None), as transformers'
    `convert_and_load_state_dict_in_model` renames a checkpoint key."""
    from transformers.core_model_loading import rename_source_key

    new, converted = rename_source_key(name, renamings, converters, prefix, own)
    if new not in own and name in own:
        new, converted = rename_source_key(name, [], [], prefix, own)  # positional: 5.0 names them otherwise
    return new, converted
