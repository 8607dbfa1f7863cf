"""Argument checks shared by the public functions and the CLIs."""
from __future__ import annotations

import numpy as np
import torch


def positive_int(value, name: str, *, numpy_ints: bool = True) -> int:
    """``value`` as an int when it is an integer >= 1, else ValueError naming ``name``. A bool (an int
    to Python) is refused, and so is a numpy integer when ``numpy_ints`` is False (options written to a
    json config or manifest, which cannot hold one)."""
    types = (int, np.integer) if numpy_ints else int
    if isinstance(value, bool) or not isinstance(value, types) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def device_option(text: str, job: str) -> torch.device:
    """``torch.device(text)`` for a --device option, else ValueError naming it: a string torch cannot
    parse, a device other than cpu or cuda (``job`` runs on those), or the CPU with an index but 0."""
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise ValueError(f"--device {text!r}: {err}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {text!r}: {job} runs on cpu or cuda devices")
    if device.type == "cpu" and device.index not in (None, 0):
        raise ValueError(f"--device {text!r}: the CPU has no device index but 0 (pass cpu)")
    return device
