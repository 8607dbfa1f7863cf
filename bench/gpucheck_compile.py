"""GPU check, section "compile": the training step of section "train" with BERT under torch.compile
(``python -m vse_fast.train --compile``: ``VSEModel.compile_text_backbone``, inductor, dynamic shapes).

Section "train" times the eager step; its profile tells whether that step is bound by host launches
(BERT-base dispatches about 2800 aten ops per bf16 step). This section measures the remedy the trainer
offers: the same step, same batch, with BERT compiled. The eager step and the published fp32 step are
timed again in this run, so the ratios compare like with like.

ok: the compiled step's loss is finite and the compiled fp32 eval-mode loss equals the eager one
(rel 1e-3); a second caption length does not trigger a new compilation per length (dynamic shapes).
The 2x target of the train step is reported (meets_speedup_target), as in section "train".
Cost: the eval-mode forward compiles one graph (eval_compile_seconds), the first compiled training
step BERT-base forward + backward (compile_seconds; 8-28 s for the tiny setting in a CPU dry run).
Runs last: a cut-off run keeps the other sections. gpu_check sets NEEDS_S seconds aside for it
(reserve_s); should fewer be left when it starts, it is skipped and listed in "skipped_for_time".
"""
import time

import torch

from bench_train import make_our_step, make_published_step, make_setup

NEEDS_S = 60.0  # a guess until measured: two graph compilations of BERT-base and five timed steps


def reserve_s(ctx) -> float:
    """Seconds gpu_check sets aside for this section (it cannot be cut short)."""
    return NEEDS_S


def _loss_eval_fp32(model, batch):
    from vse_fast.ops.contrastive import contrastive_loss

    model.eval()
    with torch.no_grad():
        loss = float(contrastive_loss(*model(**batch), margin=0.2, max_violation=True))
    model.train()
    return loss


def _longer_captions(batch, t):
    """The batch with captions padded to t tokens (same tokens, lengths and images)."""
    captions = batch["captions"]
    padded = torch.zeros(captions.shape[0], t, dtype=captions.dtype, device=captions.device)
    padded[:, : captions.shape[1]] = captions
    return dict(batch, captions=padded)


def run(ctx):
    import torch._dynamo

    result = {"setting": "section train's step (B=128, 36x2048 regions, BERT-base, bf16, VSE++), BERT compiled"}
    if not ctx.has_time("compile section (BERT-base under torch.compile)", NEEDS_S):
        return {**result, "ok": True, "skipped": f"under {NEEDS_S} s of the budget left"}
    ours, published, batch = make_setup(ctx.device)  # the big setting on a GPU (a CPU dry run: the tiny one)
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)

    ms_eager = ctx.bench(make_our_step(ours, batch, "bf16"), warmup=200, rep=1000)
    ms_pub = ctx.bench(make_published_step(published, batch), warmup=200, rep=1000)
    del published
    loss_eager = _loss_eval_fp32(ours, batch)

    torch._dynamo.reset()
    ours.compile_text_backbone()
    start = time.perf_counter()
    loss_compiled = _loss_eval_fp32(ours, batch)  # same weights; eval mode, no grad: the first graph
    result["eval_compile_seconds"] = round(time.perf_counter() - start, 1)
    same_loss = abs(loss_compiled - loss_eager) <= 1e-3 * abs(loss_eager) + 1e-4
    step = make_our_step(ours, batch, "bf16")
    sync()
    start = time.perf_counter()
    first_loss = step()
    sync()
    result["compile_seconds"] = round(time.perf_counter() - start, 1)
    ms_compiled = ctx.bench(step, warmup=200, rep=1000)
    finite = bool(torch.isfinite(first_loss).item()) and bool(torch.isfinite(step()).item())
    result["profile_step_ours_bf16_compiled"] = ctx.profile(step, steps=5, top=15)

    # another caption length: dynamic shapes, so no compilation per length (seconds -> milliseconds)
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    longer = _longer_captions(batch, batch["captions"].shape[1] + 7)
    step_longer = make_our_step(ours, longer, "bf16")
    start = time.perf_counter()
    step_longer()
    sync()
    result["new_length_first_step_seconds"] = round(time.perf_counter() - start, 2)
    new_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames_before
    result["new_graphs_for_new_length"] = int(new_graphs)

    speedup = ms_pub / ms_compiled
    result.update(
        step_ms_ours_bf16_eager=round(ms_eager, 3), step_ms_ours_bf16_compiled=round(ms_compiled, 3),
        step_ms_published_fp32=round(ms_pub, 3), speedup_compiled_vs_eager=round(ms_eager / ms_compiled, 2),
        speedup_vs_published_fp32=round(speedup, 2), loss_eval_fp32_eager=loss_eager,
        loss_eval_fp32_compiled=loss_compiled, same_loss_fp32=same_loss, finite=finite,
        meets_speedup_target=speedup >= 2.0,
    )
    result["ok"] = bool(finite and same_loss and new_graphs == 0)
    print(f"  compiled BERT: step {ms_compiled:.2f} ms (eager {ms_eager:.2f} ms, published fp32 {ms_pub:.2f} ms) "
          f"-> {speedup:.2f}x the published step; compile {result['compile_seconds']} s; new length: "
          f"{new_graphs} new graphs, {result['new_length_first_step_seconds']} s; same loss {same_loss}")
    return result

