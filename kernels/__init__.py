"""Triton kernels of vse_fast, installed as `vse_fast.kernels`.

One file per op: the `@triton.jit` kernels and their launchers. The autograd Functions
that call them live in `vse_fast.ops`.
"""
import contextlib
import importlib.util
import os
import warnings

HAS_TRITON = importlib.util.find_spec("triton") is not None


def require_triton(what: str) -> None:
    """ValueError naming ``what`` (an explicit backend='triton') when the triton package is missing."""
    if not HAS_TRITON:
        raise ValueError(f"{what} needs the triton package (pip install triton, Linux; or vse_fast[triton]); "
                         "use the 'torch' backend, or 'auto', which falls back to it")


_warned_no_triton = []


def triton_for_auto() -> bool:
    """Whether backend 'auto' may take the Triton kernels (asked for CUDA tensors): without the triton
    package it takes the torch paths, and says so once."""
    if not HAS_TRITON and not _warned_no_triton:
        _warned_no_triton.append(True)
        warnings.warn("the triton package is not installed: CUDA tensors take vse_fast's torch paths (slower); "
                      "pip install triton (Linux) for the fused kernels", stacklevel=3)
    return HAS_TRITON


def triton_interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter: TRITON_INTERPRET read as Triton reads it
    (its `knobs` since 3.4 take 1/true/yes/on in any case; earlier versions only "1")."""
    try:
        from triton import knobs
    except ImportError:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


def launch_device(tensor):
    """Context that makes ``tensor``'s CUDA device the current one: Triton launches on the current
    device (and its current stream) whatever device the arguments are on. A no-op off CUDA."""
    if tensor.is_cuda:
        import torch

        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
