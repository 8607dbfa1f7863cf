"""The one-shot GPU check's host-side helpers (bench/gpu_check.py), on the CPU."""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import gpu_check  # noqa: E402


def test_profile_wall_time_is_the_steps_not_the_profilers_start_and_stop():
    """wall_us_per_step_profiled is compared with the device-busy time to tell a host-bound step: it
    once timed the profiler's start-up, shutdown and event parsing too (6-35x the steps here)."""
    x = torch.zeros(4)

    def many_small_ops():
        y = x
        for _ in range(2000):
            y = y + 1
        return y

    many_small_ops()
    start = time.perf_counter()
    for _ in range(3):
        many_small_ops()
    plain_us = (time.perf_counter() - start) * 1e6 / 3
    report = gpu_check.profile_breakdown(many_small_ops, steps=3, top=2)
    assert 0 < report["wall_us_per_step_profiled"] < 4 * plain_us, (report["wall_us_per_step_profiled"], plain_us)
    assert report["device_busy_us_per_step"] == 0 and report["top"] == [] and report["top_host"]
