"""Choosing a component of a snapshot: one rule for the loader and for modular pins."""

from __future__ import annotations

import logging

from .errors import ComponentNotFoundError, VariantNotFoundError

logger = logging.getLogger("compstore")


def pick_component(components: list[dict], slot: str, variant: str | None,
                   *, fallback: bool = True, warn: bool = True) -> dict:
    """The (slot, variant) row of `Store.components_of`. Where the slot lacks that
    variant: its default weights, with a warning (unless `warn=False`: a look ahead
    of the pick that will warn), as diffusers loads a pipeline whose other folders
    have the variant; with `fallback=False` a `VariantNotFoundError`, as diffusers
    loads one model.

    >>> pick_component(store.components_of(snap), "unet", "fp16")  # doctest: +SKIP
    """
    in_slot = {c["variant"]: c for c in components if c["slot"] == slot}
    if not in_slot:
        raise ComponentNotFoundError(f"no component in slot {slot!r} (slots: "
                                     f"{sorted({c['slot'] for c in components})})")
    if variant and variant in in_slot:
        return in_slot[variant]
    if variant and not fallback:
        raise VariantNotFoundError(f"slot {slot!r} has no {variant!r} weights (it has: "
                                   f"{variant_names(in_slot)})")
    if "" in in_slot:
        if variant and warn:
            logger.warning("%s: no %r variant stored, loading the default weights", slot, variant)
        return in_slot[""]
    if variant is None and len(in_slot) == 1:
        return next(iter(in_slot.values()))
    raise ComponentNotFoundError(
        f"slot {slot!r} has no default weights; pass variant= one of {sorted(in_slot)}")


def require_variant(components: list[dict], variant: str | None, label: str) -> None:
    """Refuse a `variant` that none of a snapshot's models come in: diffusers raises
    a ValueError there too, rather than loading the default weights instead."""
    if variant and not any(c["variant"] == variant for c in components):
        raise VariantNotFoundError(
            f"{label} has no {variant!r} weights (its weights come as: "
            f"{variant_names(c['variant'] for c in components)}); "
            "load it without variant= for the default weights")


def variant_names(variants) -> str:
    """Variants as an error message lists them: "default, fp16"."""
    return ", ".join(sorted({v or "default" for v in variants}))
