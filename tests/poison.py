"""Poisoned allocation: torch.empty / empty_like return NaN-filled (floats) or extreme-valued (ints)
buffers, so a kernel that leaves an output element unwritten fails the comparison. Used by the
`poison_empty` fixture and by the one-shot GPU check sections."""
import contextlib

import torch


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype != torch.bool:
        t.fill_(torch.iinfo(t.dtype).max)
    return t


@contextlib.contextmanager
def poisoned_empty():
    real_empty, real_empty_like = torch.empty, torch.empty_like
    torch.empty = lambda *a, **k: _poison(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: _poison(real_empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like
