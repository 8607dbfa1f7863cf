"""Triton kernels of vse_fast, installed as `vse_fast.kernels`.

One file per op: the `@triton.jit` kernels and their launchers. The autograd Functions
that call them live in `vse_fast.ops`.
"""
import contextlib
import os


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
