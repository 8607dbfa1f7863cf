"""GPU check of the contrastive loss kernels (section "loss" of bench/gpu_check.py).

Correctness: Triton vs a float64 reference (value, both gradients under a random upstream gradient,
hardest indices) for fp32/bf16/fp16, VSE0/VSE++, with and without positives, odd shapes covering the
"small" (B <= 128, one launch), "fused" (both terms from one pass over S) and "terms" (positives)
paths, with torch.empty poisoned to NaN; exact ties (integer inputs) resolve to the first index as in
the reference. No host sync in forward + backward (set_sync_debug_mode("error")).
Launches: device kernels per forward + backward at B = 128 and 129, bf16, ours and published
(torch.profiler, CUDA activity), in "launches_per_fwd_bwd".
Timing (fwd + bwd, median ms): ours vs the published re-implementation at B = 128, 4096, 16384
(D = 1024, bf16 and fp32), ours alone at 32768 bf16 with peak extra memory, and two cuBLAS bf16
matmuls B x D @ D x B (the FLOP floor of a forward that computes S twice) for the ratio.
Order, so that a cut keeps what matters most: correctness (small shapes first), no-sync, ties, the
bf16 timings (B = 128, 4096, 32768, 16384), the fp32 ones, then the launch counts and B = 128
diagnostics. A case past the section's deadline (gpu_check's budget) is skipped and listed in
"skipped_for_time".
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.poison import poisoned_empty  # noqa: E402
from tests.published.loss import PublishedContrastiveLoss  # noqa: E402
from vse_fast.ops.contrastive import contrastive_loss, contrastive_loss_naive  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}  # relative to max |ref|
SHAPES = [(1, 1, 1), (7, 7, 33), (1, 7, 33), (128, 128, 1024), (129, 129, 1024), (129, 1000, 1024),
          (1000, 1000, 33), (4096, 4096, 64)]
D_BENCH = 1024


def _rel_err(a, b):
    return float((a.detach().double() - b).abs().max() / max(1.0, float(b.abs().max())))


def _grad_err(a, b, other):
    """Relative error of a gradient ignoring up to 2 + rows // 100 rows that are off by at most
    2.5 * max|other| (a hinge or argmax decided differently in fp32 than in fp64 near a tie)."""
    err = (a.double() - b).abs()
    scale = max(1.0, float(b.abs().max()))
    row_err = err.amax(1)
    k = 2 + b.shape[0] // 100 if b.shape[0] >= 100 else 0
    if k:
        worst = row_err.topk(min(k, b.shape[0])).values
        flips_ok = bool((worst <= 2.5 * float(other.detach().abs().max()) + 1e-3 * scale).all())
        row_err = row_err.sort().values[:-k] if flips_ok else row_err
    return float(row_err.max() / scale) if row_err.numel() else 0.0


def _check_case(N, M, D, dtype, mv, device):
    im = torch.randn(N, D, device=device).to(dtype).requires_grad_()
    s = torch.randn(M, D, device=device).to(dtype).requires_grad_()
    pos = None if N == M else torch.randint(0, N, (M,), device=device)
    g = torch.randn((), device=device)
    with poisoned_empty():
        out = contrastive_loss(im, s, 0.2, mv, positives=pos, backend="triton", return_indices=mv)
        loss, idx = out if mv else (out, None)
        dim, ds = torch.autograd.grad(loss * g, (im, s))
    im64, s64 = im.detach().double().requires_grad_(), s.detach().double().requires_grad_()
    ref, ref_idx = contrastive_loss_naive(im64, s64, 0.2, mv, positives=pos)
    rdim, rds = torch.autograd.grad(ref * g.double(), (im64, s64))
    err = max(_rel_err(loss, ref), _grad_err(dim, rdim, s), _grad_err(ds, rds, im))
    idx_ok = True
    if mv and dtype == torch.float32:  # up to 1 + M // 100 near-tie mismatches when M >= 100
        idx_ok = all(int((idx[t] != ref_idx[t]).sum()) <= (0 if M < 100 else 1 + M // 100) for t in idx)
    return err, idx_ok


def _check_ties(device):
    """Integer inputs in {-2..2}: exact ties; hardest indices must equal the reference's (first index)."""
    ok = True
    for B in (128, 1000):
        for dtype in (torch.bfloat16, torch.float32):
            im = torch.randint(-2, 3, (B, 40), device=device).to(dtype)
            s = torch.randint(-2, 3, (B, 40), device=device).to(dtype)
            _, idx = contrastive_loss(im, s, 0.2, True, backend="triton", return_indices=True)
            _, ref = contrastive_loss_naive(im.double(), s.double(), 0.2, True)
            ok &= all(torch.equal(idx[t], ref[t]) for t in ref)
    return bool(ok)


def _count_launches(fn, steps=3):
    """Device kernels (and memsets/copies) per call of fn, from torch.profiler's CUDA activity, with
    their names; the host-side launch API calls per call as a cross-check."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    events = prof.events()
    device = [e.name for e in events if e.device_type == DeviceType.CUDA]
    api = [e.name for e in events if e.device_type == DeviceType.CPU and "LaunchKernel" in e.name]
    names = {}
    for n in device:
        names[n[:60]] = names.get(n[:60], 0) + 1
    return {"device_ops_per_call": len(device) / steps, "launch_api_calls_per_call": len(api) / steps,
            "names": {k: v / steps for k, v in sorted(names.items())}}


def _check_no_sync(device):
    for mv in (False, True):
        for positives in (False, True):
            im = torch.randn(300, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
            s = torch.randn(300, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
            pos = torch.randint(0, 300, (300,), device=device) if positives else None
            contrastive_loss(im, s, 0.2, mv, positives=pos).backward()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                contrastive_loss(im, s, 0.2, mv, positives=pos).backward()
            finally:
                torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return True


def _step(fn, im, s):
    return lambda: torch.autograd.grad(fn(im, s), (im, s))


def _time(ctx, B, dtype, mv, published: bool):
    gen = torch.Generator(device=ctx.device).manual_seed(B)  # the same inputs for ours and the published loss
    im = torch.randn(B, D_BENCH, device=ctx.device, generator=gen).to(dtype).requires_grad_()
    s = torch.randn(B, D_BENCH, device=ctx.device, generator=gen).to(dtype).requires_grad_()
    big = B >= 16384
    warm, rep = (2, 30) if big else (10, 60)
    if big and published:  # ~0.25 s a call: do_bench would time a single call within 30 ms
        rep = 1000
    if published:
        fn = PublishedContrastiveLoss(None, 0.2, mv)
    else:
        fn = lambda a, b: contrastive_loss(a, b, 0.2, mv)  # noqa: E731
    step = _step(fn, im, s)
    step()
    ms = ctx.bench(step, warmup=warm, rep=rep)
    mem = ctx.peak_extra_memory(step)
    del im, s
    torch.cuda.empty_cache()
    return ms, mem


def _matmul_floor(ctx, B):
    a = torch.randn(B, D_BENCH, device=ctx.device, dtype=torch.bfloat16)
    b = torch.randn(B, D_BENCH, device=ctx.device, dtype=torch.bfloat16)
    ms = ctx.bench(lambda: (a @ b.t(), a @ b.t()), warmup=5, rep=40)
    del a, b
    torch.cuda.empty_cache()
    return ms


def run(ctx) -> dict:
    """The checks in order of priority under ctx's section budget (see gpu_check.SectionBudget):
    correctness, no-sync and ties; the timings of the README's targets (bf16 first); diagnostics."""
    device = ctx.device
    result = {"correctness": [], "timings": [], "ok": False}
    ok = True
    cases = [(shape, dtype, mv) for shape in SHAPES for dtype in (torch.float32, torch.bfloat16, torch.float16)
             for mv in (False, True)]
    for (N, M, D), dtype, mv in ctx.within(cases, "loss correctness"):
        err, idx_ok = _check_case(N, M, D, dtype, mv, device)
        good = err <= TOL[dtype] and idx_ok
        ok &= good
        result["correctness"].append(dict(dtype=str(dtype), vsepp=mv, N=N, M=M, D=D, rel_err=err,
                                          indices_ok=idx_ok, ok=good))
    bad = [c for c in result["correctness"] if not c["ok"]]
    print(f"loss correctness: {len(result['correctness']) - len(bad)}/{len(result['correctness'])} ok; "
          f"worst rel err {max((c['rel_err'] for c in result['correctness']), default=float('nan')):.2e}", flush=True)
    for c in bad:
        print("  FAIL", c, flush=True)
    try:
        result["no_sync"] = _check_no_sync(device)
    except RuntimeError as exc:
        result["no_sync"] = False
        result["no_sync_error"] = str(exc)[:300]
        ok = False
    print(f"loss no host sync: {result['no_sync']}", flush=True)
    result["ties_first_index_ok"] = _check_ties(device)
    ok &= result["ties_first_index_ok"]
    print(f"loss ties -> first index: {result['ties_first_index_ok']}", flush=True)

    floors = {}
    result["cublas_two_bf16_matmuls_ms"] = floors
    head = (f"{'B':>6} {'dtype':>8} {'mode':>5} {'ours ms':>9} {'pub ms':>9} {'speedup':>8} {'x floor':>8} "
            f"{'ours MiB':>8} {'pub MiB':>8}")
    print(head, flush=True)
    bf16, fp32 = torch.bfloat16, torch.float32
    plan = [(B, bf16, mv) for B in (128, 4096, 32768, 16384) for mv in (False, True)]  # the targets' cases first
    plan += [(B, fp32, mv) for B in (128, 4096, 16384) for mv in (False, True)]
    for B, dtype, mv in ctx.within(plan, "loss timing"):
        if dtype == bf16 and B >= 4096 and B not in floors:
            floors[B] = _matmul_floor(ctx, B)
        ours_ms, ours_mem = _time(ctx, B, dtype, mv, published=False)
        pub_ms = pub_mem = None
        if B <= 16384:
            pub_ms, pub_mem = _time(ctx, B, dtype, mv, published=True)
        row = dict(B=B, dtype=str(dtype).replace("torch.", ""), mode="vsepp" if mv else "vse0", ours_ms=ours_ms,
                   published_ms=pub_ms, speedup=(pub_ms / ours_ms) if pub_ms else None,
                   ours_peak_extra_bytes=ours_mem, published_peak_extra_bytes=pub_mem,
                   x_two_bf16_matmuls=(ours_ms / floors[B]) if (B in floors and dtype == bf16) else None)
        result["timings"].append(row)
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"{B:>6} {row['dtype']:>8} {row['mode']:>5} {ours_ms:>9.3f} {fmt(pub_ms, '9.3f'):>9} "
              f"{fmt(row['speedup'], '8.2f'):>8} {fmt(row['x_two_bf16_matmuls'], '8.2f'):>8} "
              f"{ours_mem / 2**20:>8.0f} {fmt(pub_mem and pub_mem / 2**20, '8.0f'):>8}", flush=True)
    big = [r for r in result["timings"] if r["B"] == 32768]
    # None: not measured (skipped for time)
    result["memory_32768_bf16_under_1GB"] = all(r["ours_peak_extra_bytes"] < 2**30 for r in big) if big else None
    result["ok"] = bool(ok)
    if not ctx.has_time("loss diagnostics (launch counts, B=128 forward only, profile)"):
        return result
    launches = {}
    for B in (128, 129):  # the "small" path and the smallest "fused" one, bf16
        im = torch.randn(B, D_BENCH, device=device, dtype=torch.bfloat16, requires_grad=True)
        s = torch.randn(B, D_BENCH, device=device, dtype=torch.bfloat16, requires_grad=True)
        for mode, mv in (("vse0", False), ("vsepp", True)):
            for impl, fn in (("ours", lambda a, b: contrastive_loss(a, b, 0.2, mv)),
                             ("published", PublishedContrastiveLoss(None, 0.2, mv))):
                key = f"B{B}-bf16-{mode}-{impl}"
                try:
                    launches[key] = _count_launches(_step(fn, im, s))
                except Exception as exc:  # the profiler is a diagnostic: never fail the section on it
                    launches[key] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    result["launches_per_fwd_bwd"] = launches
    print("loss kernels per fwd+bwd: " + ", ".join(
        f"{k} {v.get('device_ops_per_call', v.get('error'))}" for k, v in launches.items()), flush=True)
    # Host-bound regime (B = 128): forward alone, and one tiny torch op for the host's per-launch cost.
    im = torch.randn(128, D_BENCH, device=device, dtype=torch.bfloat16, requires_grad=True)
    s = torch.randn(128, D_BENCH, device=device, dtype=torch.bfloat16, requires_grad=True)
    one = torch.ones(1, device=device)
    result["b128_forward_only_ms"] = {
        mode: ctx.bench(lambda: contrastive_loss(im, s, 0.2, mv)) for mode, mv in (("vse0", False), ("vsepp", True))}
    result["one_tiny_torch_op_ms"] = ctx.bench(lambda: one.add(1))
    result["profile_b128_vsepp_bf16"] = ctx.profile(lambda: contrastive_loss(im, s, 0.2, True).backward())
    print(f"B=128 bf16 forward only: {result['b128_forward_only_ms']}; one tiny torch op "
          f"{result['one_tiny_torch_op_ms']:.4f} ms", flush=True)
    return result
