"""Communication of a DDP training step (gloo, 2 CPU processes): what docs/distributed.md states.

Two processes run ``vse_fast.train.train_step`` (via tests/ddp_comm.py, the same probe that
bench/gpucheck_ddp.py runs with NCCL on 2 GPUs) while every torch.distributed collective is recorded:

- global negatives, per step: exactly 2 all-gathers of (B_local, E) rows into (B_global, E), exactly
  2 reduce-scatters of (B_global, E) into (B_local, E), DDP's gradient all-reduce (all parameters
  once), nothing else;
- no payload reaches B_local x B_global elements (a rank's block of similarities), let alone
  B_global^2: the sizes are chosen so that every legitimate payload is smaller;
- --local_negatives: no all-gather or reduce-scatter at all, only DDP's all-reduce;
- --dedupe_items with global negatives: the same collectives as global negatives (each rank reads the
  global batch's items from the shared sample order, nothing is sent for them).
"""
import pytest
import torch

from tests.ddp_comm import (CollectiveRecorder, ProbeConfig, communication_problems, spawn_comm_probe,
                            step_summary)

# B_global = 32: B_global^2 = 1024 and B_local * B_global = 512, while the largest legitimate payload is
# an all-gathered (32, 8) = 256 elements and the model has 12*8+8 + 10*8+8 = 192 parameters.
CFG = ProbeConfig(world=2, b_local=16, embed=8, img_dim=12, cap_dim=10, steps=2, time_reps=2, warmup=1)


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    return spawn_comm_probe(CFG, "gloo", str(tmp_path_factory.mktemp("comm")))


def test_sizes_make_the_b_squared_check_meaningful(probe):
    legit = max(CFG.b_global * CFG.embed, probe[0]["n_params"])
    assert legit < CFG.b_local * CFG.b_global < CFG.b_global ** 2


def test_global_negatives_step_communicates_two_gathers_their_reduce_scatters_and_ddp_grads(probe):
    b_local, b_global, e = CFG.b_local, CFG.b_global, CFG.embed
    for result in probe:
        assert len(result["steps"]["global"]) == CFG.steps
        for calls in result["steps"]["global"]:
            summary = step_summary(calls)
            assert set(summary) == {"all_gather", "reduce_scatter", "all_reduce"}, calls
            gathers = [c for c in calls if c["kind"] == "all_gather"]
            scatters = [c for c in calls if c["kind"] == "reduce_scatter"]
            assert len(gathers) == 2 and len(scatters) == 2
            assert all(c["shapes"] == [[b_global, e], [b_local, e]] for c in gathers), gathers  # (out, in)
            assert all(c["shapes"] == [[b_local, e], [b_global, e]] for c in scatters), scatters
            assert all(c["payload_bytes"] == b_global * e * 4 for c in gathers + scatters)  # fp32 rows
            assert summary["all_reduce"]["numel"] == result["n_params"]  # DDP: every gradient once
        assert communication_problems(result, CFG) == []


def test_dedupe_items_communicates_exactly_what_global_negatives_do(probe):
    for result in probe:
        assert len(result["steps"]["global_dedupe"]) == CFG.steps
        for dedupe, plain in zip(result["steps"]["global_dedupe"], result["steps"]["global"]):
            assert [(c["kind"], c["shapes"]) for c in dedupe] == [(c["kind"], c["shapes"]) for c in plain]
        assert torch.isfinite(torch.tensor(result["losses"]["global_dedupe"])).all()
        assert communication_problems(result, CFG) == []


def test_no_payload_of_similarity_size(probe):
    for result in probe:
        for mode in ("global", "local", "global_dedupe"):
            for calls in result["steps"][mode]:
                assert calls and max(c["payload_numel"] for c in calls) < CFG.b_local * CFG.b_global, calls


def test_local_negatives_step_has_no_embedding_collectives(probe):
    for result in probe:
        for calls in result["steps"]["local"]:
            assert {c["kind"] for c in calls} == {"all_reduce"}, calls
            assert step_summary(calls)["all_reduce"]["numel"] == result["n_params"]


def test_probe_steps_are_real_training_steps_and_timed(probe):
    for mode in ("global", "local"):  # every rank sees a finite loss; ranks hold different batches
        losses = [r["losses"][mode] for r in probe]
        assert all(torch.isfinite(torch.tensor(v)).all() for v in losses)
    assert all(set(r["ms"]) == {"global", "local", "gather"} and min(r["ms"].values()) > 0 for r in probe)


def test_problem_checker_flags_extra_or_missing_traffic(probe):
    result = {**probe[0], "steps": {"global": [list(probe[0]["steps"]["global"][0])], "local": []}}
    assert communication_problems(result, CFG) == []
    b2 = CFG.b_global ** 2
    result["steps"]["global"][0].append(dict(name="all_gather_single", kind="all_gather",
                                             shapes=[[CFG.b_global, CFG.b_global], [CFG.b_local, CFG.b_global]],
                                             payload_numel=b2, payload_bytes=4 * b2))
    problems = communication_problems(result, CFG)
    assert any("3 all_gather calls" in p for p in problems) and any("[[32, 32], [16, 32]]" in p for p in problems)
    result["steps"]["global"] = [[c for c in probe[0]["steps"]["global"][0] if c["kind"] != "reduce_scatter"]]
    assert any("0 reduce_scatter calls" in p for p in communication_problems(result, CFG))


def test_recorder_restores_every_patched_function():
    import torch.distributed as dist

    from vse_fast import distributed as vdist

    before = (dist.all_reduce, dist.all_gather_into_tensor, vdist._all_gather_flat, vdist._reduce_scatter_flat)
    with CollectiveRecorder():
        assert vdist._all_gather_flat is not before[2] and dist.all_reduce is not before[0]
    assert (dist.all_reduce, dist.all_gather_into_tensor, vdist._all_gather_flat, vdist._reduce_scatter_flat) == before


def _gpucheck_ddp():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "gpucheck_ddp.py")
    spec = importlib.util.spec_from_file_location("gpucheck_ddp", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpucheck_ddp_report_of_the_gloo_probe(probe):
    report = _gpucheck_ddp().report(probe, CFG)
    rows = CFG.b_global * CFG.embed * 4
    assert report["ok"] and report["problems"] == []
    assert report["global_step_collectives"] == {
        "all_gather": {"count": 2, "bytes": 2 * rows}, "reduce_scatter": {"count": 2, "bytes": 2 * rows},
        "all_reduce": {"count": report["global_step_collectives"]["all_reduce"]["count"],
                       "bytes": 4 * probe[0]["n_params"]}}
    assert set(report["local_step_collectives"]) == {"all_reduce"}
    assert report["global_step_max_payload_bytes"] == rows < report["b_global_squared_bytes_fp32"]
    assert report["ms_global_step"] > 0 and report["global_over_local"] > 0


def test_gpucheck_ddp_skips_below_two_gpus(monkeypatch):
    module = _gpucheck_ddp()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert module.run(None) == {"ok": True, "skipped": "needs >= 2 GPUs", "gpus": 1}
