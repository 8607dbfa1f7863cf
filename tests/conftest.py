"""Shared test set-up.

Without a GPU, Triton kernels run under its interpreter: TRITON_INTERPRET must be set before
triton is first imported, so it is set here, before any test module imports vse_fast.kernels.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402

from tests.poison import poisoned_empty  # noqa: E402

# Fresh random inputs every run; VSE_TEST_SEED=<n> replays a run (the seed is in the header, and after
# failures also in the summary, which `-q` keeps).
BASE_SEED = int(os.environ.get("VSE_TEST_SEED", random.randrange(2**31)))

# (dtype, atol, rtol) for comparing a kernel against a float64 reference.
DTYPE_TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def pytest_report_header(config):
    return f"VSE_TEST_SEED={BASE_SEED} (set it to replay these random inputs)"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if terminalreporter.stats.get("failed") or terminalreporter.stats.get("error"):
        terminalreporter.write_line(f"VSE_TEST_SEED={BASE_SEED} replays the random inputs of this run")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Seed torch per test from the run's base seed and the test id."""
    torch.manual_seed(BASE_SEED ^ zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture
def cpu_runs(monkeypatch):
    """Keep a CPU test module's training and evaluation runs on the CPU on a GPU machine too (use it as
    ``pytestmark = pytest.mark.usefixtures("cpu_runs")``): their default device (cuda when available,
    cuda:LOCAL_RANK under torchrun) and precision (bf16 there) would change what they compare, and a
    2-process torchrun would ask for a second GPU. Hides CUDA from this process's availability checks
    and from the processes it starts."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture
def poison_empty():
    """torch.empty / empty_like return NaN-filled (floats) or extreme-valued (ints) buffers for the
    test's duration, so a kernel that leaves an output element unwritten fails the comparison."""
    with poisoned_empty():
        yield


# Interpreter tests launch Triton kernels on CPU tensors: only possible without a GPU (on a GPU
# machine TRITON_INTERPRET is not set and the CUDA tests cover the compiled kernels instead).
interpreter_only = pytest.mark.skipif(HAS_CUDA, reason="Triton interpreter tests run only on CPU-only machines")
