"""Autograd ops of vse_fast: each has a Triton backend (vse_fast.kernels) and a torch reference."""
