"""The worker's environment switches (`DISAGGSERVE_CPU_KERNELS`, `DISAGGSERVE_KV_SHM`): one
parser, so every switch reads the same way (case and blanks ignored, empty means the default)
and a wrong value fails at startup saying which values there are."""

from __future__ import annotations

import os


def choice(name: str, choices: tuple[str, ...]) -> str:
    """The value of switch `name`, one of `choices` (the first is the default)."""
    value = os.environ.get(name, "").strip().lower() or choices[0]
    if value not in choices:
        raise ValueError(f"{name}={value!r}: use one of {', '.join(choices)}")
    return value
