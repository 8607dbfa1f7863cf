"""Triton kernels of vse_fast, installed as `vse_fast.kernels`.

One file per op: the `@triton.jit` kernels and their launchers. The autograd Functions
that call them live in `vse_fast.ops`.
"""
import contextlib
import functools
import importlib.util
import os
import re
import warnings

HAS_TRITON = importlib.util.find_spec("triton") is not None
# The oldest Triton release the kernels are checked on (interpreter tests, sm_90/sm_80 builds). Under
# 3.3 the sort pool kernels give wrong sums in the interpreter and 353 of 784 builds fail to compile;
# 3.2's interpreter aborts in the loss backward.
MIN_TRITON = (3, 4)


@functools.lru_cache(maxsize=None)
def triton_too_old() -> str:
    """The installed triton's version when it is older than MIN_TRITON, else "" (also for a version
    string that does not start with major.minor). Imports triton; asked once per process."""
    import triton

    match = re.match(r"(\d+)\.(\d+)", getattr(triton, "__version__", ""))
    return triton.__version__ if match and tuple(map(int, match.groups())) < MIN_TRITON else ""


def _min_triton() -> str:
    return ".".join(map(str, MIN_TRITON))


def require_triton(what: str) -> None:
    """ValueError naming ``what`` (an explicit backend='triton') when the triton package is missing or
    older than MIN_TRITON."""
    if not HAS_TRITON:
        raise ValueError(f"{what} needs the triton package (pip install triton, Linux; or vse_fast[triton]); "
                         "use the 'torch' backend, or 'auto', which falls back to it")
    old = triton_too_old()
    if old:
        raise ValueError(f"{what} needs triton >= {_min_triton()}, found triton {old} "
                         f"(pip install 'triton>={_min_triton()}', which may need a newer torch); "
                         "use the 'torch' backend, or 'auto', which falls back to it")


_warned_no_triton = []


def triton_for_auto() -> bool:
    """Whether backend 'auto' may take the Triton kernels (asked for CUDA tensors): without the triton
    package, or with one older than MIN_TRITON, it takes the torch paths, and says so once."""
    if not HAS_TRITON:
        reason = "the triton package is not installed"
    else:
        old = triton_too_old()
        reason = f"triton {old} is older than {_min_triton()}, the oldest release vse_fast's kernels run on" if old else ""
    if reason and not _warned_no_triton:
        _warned_no_triton.append(True)
        warnings.warn(f"{reason}: CUDA tensors take vse_fast's torch paths (slower); "
                      f"pip install 'triton>={_min_triton()}' (Linux) for the fused kernels", stacklevel=3)
    return not reason


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
