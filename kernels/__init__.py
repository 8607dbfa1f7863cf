"""Triton kernels of vse_fast, installed as `vse_fast.kernels`.

One file per op: the `@triton.jit` kernels and their launchers. The autograd Functions
that call them live in `vse_fast.ops`.
"""
