"""Settings taken from environment variables (`COMPSTORE_*`).

Each is read where it is used, when it is used, so that a test or a long-running
service can change it without re-importing compstore. A value that cannot be read
is a `SettingError` naming the variable, never a bare `ValueError` from deep inside.
"""

from __future__ import annotations

import os
from typing import Callable, TypeVar

from .errors import SettingError

N = TypeVar("N", int, float)


def env_setting(name: str, default: N | None, parse: Callable[[str], N] = int, *, minimum: N = 0,
                expected: str = "a whole number") -> N | None:
    """`$name` read with `parse`, or `default` when unset or empty.

    >>> env_setting("COMPSTORE_UPLOAD_READERS", 4, minimum=1)  # doctest: +SKIP
    4

    Raises:
        SettingError: the value does not parse, or is below `minimum`.
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = parse(raw)
    except ValueError:
        value = None
    if value is None or not value >= minimum:  # not >=: NaN is refused too
        raise SettingError(f"{name}={raw!r}: expected {expected}, at least {minimum}; "
                           "set it so, or unset it for the default")
    return value
