"""The one-shot GPU check's host-side helpers (bench/gpu_check.py), on the CPU."""
import json
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


class _FakeClock:
    """time.monotonic and time.time that advance only when a fake case says so."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now

    def time(self):
        return self.now


class _Section:
    def __init__(self, run):
        self.run = run


def test_sections_share_the_budget_and_list_every_case_they_skip(monkeypatch, tmp_path):
    """The check must end in about five minutes whatever the card: a section that cannot be cut short
    (compile) has its seconds set aside; the others get their share of the rest (what one leaves unused
    passes on), skip the cases past their deadline, and name each of them in the JSON, whose
    "all_cases_ran" and "ok" then say that not everything ran, apart from "checks_passed"."""
    clock = _FakeClock()
    monkeypatch.setattr(gpu_check, "time", clock)
    case_s = {"gpo": 10.0}

    def gpo(ctx):  # its deadline: 0.45 / (0.45 + 0.30) of (100 - 60 reserved) = 24 s away
        ran = []
        for case in ctx.within([("bf16", k) for k in range(10)], "pool timing"):
            ran.append(case)
            clock.now += case_s["gpo"]
        return {"ok": True, "ran": len(ran)}

    def loss(ctx):  # what is left, less the 60 s reserved
        return {"ok": True, "left": round(ctx.time_left(), 1)}

    def compile_(ctx):
        if not ctx.has_time("compile section", 60.0):
            return {"ok": True, "skipped": "not enough time", "left": round(ctx.time_left(), 1)}
        return {"ok": True, "left": round(ctx.time_left(), 1)}

    sections = {"gpo": _Section(gpo), "loss": _Section(loss), "compile": _Section(compile_)}
    sections["compile"].reserve_s = lambda ctx: 60.0
    path = str(tmp_path / "check.json")

    def run():
        report, saves = {"sections": {}}, []

        def save(failed, complete=False):
            saves.append(complete)
            gpu_check._write(report, path, clock.now, failed, complete)

        failed = gpu_check.run_sections(gpu_check.SectionBudget(), ["gpo", "loss", "compile"], 100.0, report, save,
                                        load=sections.get)
        with open(path) as f:
            return failed, report["sections"], json.load(f), saves

    failed, got, written, saves = run()
    assert failed == [] and saves == [False, False, False, True]
    assert got["gpo"]["ran"] == 3 and got["gpo"]["seconds"] == 30.0
    assert got["gpo"]["skipped_for_time"] == [{"what": "pool timing", "cases": [f"bf16-{k}" for k in range(3, 10)]}]
    assert got["loss"]["left"] == 10.0 and got["loss"]["skipped_for_time"] == []
    assert got["compile"]["left"] == 70.0 and got["compile"]["skipped_for_time"] == []  # it got its 60 s
    assert written["complete"] and written["checks_passed"] and written["failed_sections"] == []
    assert not written["all_cases_ran"] and not written["ok"]

    case_s["gpo"] = 50.0  # a case that overruns the deadline by far eats into the reserve: compile is skipped
    failed, got, written, _ = run()
    assert got["gpo"]["ran"] == 1 and got["loss"]["left"] == 0.0 and got["compile"]["left"] == 50.0
    assert got["compile"]["skipped_for_time"] == [{"what": "compile section", "cases": [], "needs_s": 60.0}]
    assert written["checks_passed"] and not written["all_cases_ran"]

    sections["loss"] = _Section(lambda ctx: {"ok": False})
    report = {"sections": {}}
    failed = gpu_check.run_sections(gpu_check.SectionBudget(), ["loss"], 100.0, report, lambda *a, **k: None,
                                    load=sections.get)
    gpu_check._write(report, path, clock.now, failed, complete=True)
    with open(path) as f:
        written = json.load(f)
    assert written["all_cases_ran"] and not written["checks_passed"] and written["failed_sections"] == ["loss"]
    assert not written["ok"]


def test_a_cut_section_keeps_its_skipped_cases_and_the_cut_propagates(monkeypatch, tmp_path):
    """gpu_run.sh's hard cut (SIGINT) records the section as cut, with what it had skipped, and the
    sections after it as not started, and stops."""
    clock = _FakeClock()
    monkeypatch.setattr(gpu_check, "time", clock)

    def cut(ctx):
        for _ in ctx.within([1, 2], "cases"):
            clock.now += 100.0
        raise KeyboardInterrupt

    report = {"sections": {}}
    saved = []
    with pytest.raises(KeyboardInterrupt):
        gpu_check.run_sections(gpu_check.SectionBudget(), ["train", "compile"], 50.0, report,
                               lambda failed, complete=False: saved.append((list(failed), complete)),
                               load=lambda name: _Section(cut))
    assert report["sections"]["train"]["error"] == "cut off (time limit)"
    assert report["sections"]["train"]["skipped_for_time"] == [{"what": "cases", "cases": ["2"]}]
    assert report["sections"]["compile"]["error"] == "not started (cut off)"  # named, not missing
    assert saved == [(["train", "compile"], False)]


def test_gpo_section_runs_on_cpu_and_lists_what_a_spent_budget_skips():
    """The GPO section's logic, on the CPU under the Triton interpreter (tiny shapes), so a GPU lease is
    not spent on a broken script: with time it checks every case; with none it skips each one by name."""
    import gpucheck_gpo

    ctx = gpucheck_gpo._CPUContext()
    result = gpucheck_gpo.run(ctx, smoke=True)
    cases = gpucheck_gpo._cases(gpucheck_gpo.SMOKE_SHAPES)
    assert result["ok"] and ctx.skipped == []
    assert len(result["correctness"]) == len(cases) and len(result["table_correctness"]) == 2
    assert {r["impl"] for r in result["pool_timing"]} == {"triton", "triton-net", "triton-rank", "torch", "published"}

    ctx.start_section(0.0)
    result = gpucheck_gpo.run(ctx, smoke=True)
    assert result["correctness"] == result["pool_timing"] == result["module_timing"] == []
    skipped = {s["what"]: s["cases"] for s in ctx.skipped}
    assert len(skipped["pool correctness (core shapes)"]) + len(skipped["pool correctness (other shapes)"]) == len(cases)
    assert skipped["table correctness K"] == ["1", "5"] and len(skipped["pool timing [2, 5, 3]"]) == 10
