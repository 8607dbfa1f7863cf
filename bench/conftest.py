"""Benchmarks: ours next to the published re-implementation, in the same run.

On CPU they run the torch paths; on a GPU the Triton paths. Run: pytest bench/ --benchmark-only
"""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # for tests.published (the baselines)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads)"


@pytest.fixture
def bench_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def run_bench(benchmark, bench_device):
    """run_bench(fn, group=..., impl=..., **extra): time fn with pytest-benchmark, synchronizing
    the GPU after each call, and record the device and peak memory in extra_info."""

    def _run(fn, *, group, impl, rounds=None, **extra):
        def call():
            out = fn()
            if bench_device.type == "cuda":
                torch.cuda.synchronize()
            return out

        benchmark.group = group
        benchmark.extra_info.update(device=device_name(), impl=impl, **extra)
        call()  # warm-up (compilation, caches)
        if bench_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        if rounds is None:
            result = benchmark(call)
        else:
            result = benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
        if bench_device.type == "cuda":
            benchmark.extra_info["peak_extra_mem_bytes"] = torch.cuda.max_memory_allocated() - base
        return result

    return _run
