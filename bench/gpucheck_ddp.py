"""GPU check, section "ddp": the communication of a multi-GPU training step (needs >= 2 GPUs).

Two NCCL processes (loopback rendezvous) run ``vse_fast.train.train_step`` under DDP on a two-tower
model (Linear 2048 -> 1024 for images, 768 -> 1024 for captions, bf16 autocast, VSE++), 512 pairs per
GPU (global batch 1024, the example of docs/distributed.md), while every torch.distributed collective
is recorded (tests/ddp_comm.py, the same probe tests/test_distributed_comm.py runs with gloo on CPU).

ok: each global-negatives step makes exactly 2 all-gathers of (512, 1024) fp32 rows into (1024, 1024)
and their 2 reduce-scatters, plus DDP's gradient all-reduce of the parameters and nothing else; each
--local_negatives step only the all-reduce. Reported: bytes per step by collective, and the median
step time (CUDA events, measured inside the ranks, so ctx.bench is not used) with global vs local
negatives and of the embedding communication alone (2 all-gathers + 2 reduce-scatters).
On a machine with fewer than 2 GPUs the section is skipped (ok, "skipped").
"""
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.ddp_comm import ProbeConfig, communication_problems, spawn_comm_probe, step_summary  # noqa: E402

CFG = ProbeConfig(world=2, b_local=512, embed=1024, img_dim=2048, cap_dim=768, steps=3, time_reps=50,
                  warmup=10, precision="bf16", max_violation=True)


NEEDS_S = 20.0  # a guess until measured: the probe's processes start, build and time a few steps


def reserve_s(ctx) -> float:
    """Seconds gpu_check sets aside for this section (it cannot be cut short): none on one GPU."""
    return NEEDS_S if torch.cuda.device_count() >= 2 else 0.0


def run(ctx):
    n_gpus = torch.cuda.device_count()
    if n_gpus < 2:
        return {"ok": True, "skipped": "needs >= 2 GPUs", "gpus": n_gpus}
    if not ctx.has_time("ddp section (spawns the probe's processes)", NEEDS_S):
        return {"ok": True, "skipped": f"under {NEEDS_S} s of the budget left", "gpus": n_gpus}
    with tempfile.TemporaryDirectory() as out_dir:
        ranks = spawn_comm_probe(CFG, "nccl", out_dir)
    return {**report(ranks, CFG), "gpus": n_gpus}


def report(ranks, cfg):
    """The section's result from the probe's per-rank records (also checked on CPU/gloo by
    tests/test_distributed_comm.py)."""
    problems = [p for r in ranks for p in communication_problems(r, cfg)]
    result = {
        "ok": not problems,
        "setting": f"{cfg.world} processes x B_local={cfg.b_local} (B_global={cfg.b_global}), embed {cfg.embed}, "
                   f"Linear {cfg.img_dim}/{cfg.cap_dim} -> {cfg.embed} towers, {cfg.precision}, "
                   f"{'VSE++' if cfg.max_violation else 'VSE0'}, {ranks[0]['backend']}",
        "problems": problems[:20],
        "n_params": ranks[0]["n_params"],
        "b_global_squared_bytes_fp32": 4 * cfg.b_global ** 2,
    }
    for mode in ("global", "local"):
        last = ranks[0]["steps"][mode][-1]  # the last recorded step of rank 0
        result[f"{mode}_step_collectives"] = {k: {"count": v["count"], "bytes": v["bytes"]}
                                             for k, v in step_summary(last).items()}
        result[f"{mode}_step_max_payload_bytes"] = max((c["payload_bytes"] for c in last), default=0)
    if all(r["ms"] for r in ranks):  # slowest rank's median
        result["ms_global_step"] = max(r["ms"]["global"] for r in ranks)
        result["ms_local_step"] = max(r["ms"]["local"] for r in ranks)
        result["ms_embedding_comm"] = max(r["ms"]["gather"] for r in ranks)
        result["global_over_local"] = result["ms_global_step"] / result["ms_local_step"]
    result["losses_rank0"] = ranks[0]["losses"]
    return result
