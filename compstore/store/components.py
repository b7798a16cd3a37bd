"""Choosing a component of a snapshot: one rule for the loader and for modular pins."""

from __future__ import annotations

import logging

from .errors import ComponentNotFoundError

logger = logging.getLogger("compstore")


def pick_component(components: list[dict], slot: str, variant: str | None) -> dict:
    """The (slot, variant) row of `Store.components_of`, falling back to the default
    weights when that variant is absent (with a warning), as diffusers does.

    >>> pick_component(store.components_of(snap), "unet", "fp16")  # doctest: +SKIP
    """
    in_slot = {c["variant"]: c for c in components if c["slot"] == slot}
    if not in_slot:
        raise ComponentNotFoundError(f"no component in slot {slot!r} (slots: "
                                     f"{sorted({c['slot'] for c in components})})")
    if variant and variant in in_slot:
        return in_slot[variant]
    if "" in in_slot:
        if variant:
            logger.warning("%s: no %r variant stored, loading the default weights", slot, variant)
        return in_slot[""]
    if variant is None and len(in_slot) == 1:
        return next(iter(in_slot.values()))
    raise ComponentNotFoundError(
        f"slot {slot!r} has no default weights; pass variant= one of {sorted(in_slot)}")
