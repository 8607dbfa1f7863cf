"""Argument checks shared by the public functions and the CLIs."""
from __future__ import annotations

import numpy as np


def positive_int(value, name: str, *, numpy_ints: bool = True) -> int:
    """``value`` as an int when it is an integer >= 1, else ValueError naming ``name``. A bool (an int
    to Python) is refused, and so is a numpy integer when ``numpy_ints`` is False (options written to a
    json config or manifest, which cannot hold one)."""
    types = (int, np.integer) if numpy_ints else int
    if isinstance(value, bool) or not isinstance(value, types) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)
