"""The one-shot GPU check's host-side helpers (bench/gpu_check.py), on the CPU."""
import os
import sys
import time

import pytest
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


def test_gradient_differences_compare_every_parameter_with_the_published_model():
    """gpucheck_train's gradient check: ours and the published model on the same weights agree to fp32
    rounding for every parameter (VSE0 and VSE++); a changed weight, a NaN gradient, BatchNorm on
    running statistics where training uses the batch's, or a gradient one model lacks shows."""
    import bench_train

    ours, published, batch = bench_train.make_setup(torch.device("cpu"), big=False)
    bn = ours.img_enc.mlp.bns[0]
    bn.running_mean.add_(0.5)  # not the batch statistics: the check must use the batch's, as training does
    published.img_enc.mlp.bns[0].running_mean.add_(0.5)
    running = bn.running_mean.clone()
    for max_violation in (False, True):
        diffs = bench_train.gradient_differences(ours, published, batch, max_violation=max_violation)
        assert set(diffs) == {name for name, _ in ours.named_parameters()}
        assert max(diffs.values()) < 1e-3, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
        assert all(p.grad is None for p in ours.parameters()) and ours.training  # cleared, mode restored
        assert torch.equal(bn.running_mean, running)  # the running statistics are put back
    assert any(name.startswith("img_enc.gpool.") for name in diffs)  # the GPO's GRU and linear are compared

    forward = type(bn).forward
    bn.forward = lambda x: torch.nn.functional.batch_norm(  # a BatchNorm that ignores train mode
        x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    assert max(bench_train.gradient_differences(ours, published, batch).values()) > 1e-3
    bn.forward = forward.__get__(bn)

    hook = ours.txt_enc.linear.weight.register_hook(lambda g: g.clone().fill_(float("nan")))
    diffs = bench_train.gradient_differences(ours, published, batch)
    assert diffs["txt_enc.linear.weight"] == float("inf")  # NaN never passes a <= test unnoticed
    hook.remove()
    with torch.no_grad():
        ours.img_enc.fc.weight.mul_(1.01)
    diffs = bench_train.gradient_differences(ours, published, batch)
    assert diffs["img_enc.fc.weight"] > 1e-3
    published.img_enc.fc.weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"img_enc.fc.weight: a gradient in one model only"):
        bench_train.gradient_differences(ours, published, batch)
