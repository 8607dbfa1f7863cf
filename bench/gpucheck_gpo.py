"""GPU check section "gpo" (driven by bench/gpu_check.py): `run(ctx) -> dict` with "ok".

1. Triton pool forward + backward vs a float64 reference, every dtype, odd shapes (K = 1, 5, 36, 64, 100,
   512; D = 1, 33, 1024; non-contiguous inputs; outputs poisoned with NaN): max relative errors. Shapes
   with K <= 64 run with the rank kernels too, and two shapes with the sorting networks
   (VSE_FAST_GPO_POOL_KERNEL = sort, rank, net).
2. The no-sync encoder path GPO.pool, forward + backward, under torch.cuda.set_sync_debug_mode("error").
3. Pool forward + backward at B=512 K=64 D=1024 (bf16, fp32): Triton (sort kernels; "triton-rank": the
   rank-counting kernels; "triton-net": the sorting-network kernels) vs our torch path vs the published pool; GB/s over the minimal traffic (fwd reads x, writes out; bwd reads x and grad_out, writes grad_x)
   and its fraction of the card's copy bandwidth; peak extra memory.
4. Whole GPO forward + backward, ours (GPO.pool) vs the published module, B=128 K=36/64 and B=512 K=64,
   D=1024, bf16 and fp32; "ours_torch_table_ms": ours with the packed-GRU table instead of the Triton one.
5. The coefficient table over sizes 1..K: the fused Triton GRU kernels vs float64 (values and every
   parameter gradient), and its forward + backward time against the packed cuDNN GRU table.

They run in this order, so that a cut keeps what matters most: 1 on the core shapes (CORE_SHAPES and
the sorting networks' shapes), 2, 5, 3, 4, a profile of GPO.pool, then 1 on the other shapes. A case
past the section's deadline (gpu_check's budget) is skipped and listed in "skipped_for_time".

Smoke test of the logic on CPU (tiny shapes, Triton interpreter):
    TRITON_INTERPRET=1 python bench/gpucheck_gpo.py --smoke
"""
import contextlib
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "bench")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from gpu_check import SectionBudget  # noqa: E402
from tests.poison import poisoned_empty  # noqa: E402
from tests.published.gpo import PublishedGPO, published_pool  # noqa: E402
from vse_fast.modules.gpo import GPO  # noqa: E402
from vse_fast.kernels.gpo_pool import KERNEL_ENV, NET_MAX_K, RANK_MAX_K  # noqa: E402
from vse_fast.ops.gpo_pool import gpo_pool  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# max relative error (to the reference's max magnitude) allowed per dtype
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# (B, K, D, strided)
CHECK_SHAPES = [(1, 1, 1, False), (7, 5, 33, True), (3, 36, 1024, False), (128, 64, 1024, True),
                (5, 100, 33, False), (2, 512, 65, True), (1, 512, 1024, False)]
SMOKE_SHAPES = [(1, 1, 1, False), (2, 5, 3, True)]
MODULE_SHAPES = [(128, 36, 1024), (128, 64, 1024), (512, 64, 1024)]


def reference_pool(features, lengths, weights):
    """float64, vectorised: padding -inf, stable descending sort over the set axis, weighted sum of
    the first n ranks. Differentiable through torch's sort."""
    x = features.double()
    K = x.shape[1]
    valid = (torch.arange(K, device=x.device) < lengths.unsqueeze(1)).unsqueeze(-1)  # (B, K, 1)
    ordered = torch.sort(x.masked_fill(~valid, float("-inf")), dim=1, descending=True, stable=True).values
    w = torch.zeros(x.shape[:2], dtype=torch.float64, device=x.device)
    kw = min(K, weights.shape[1])
    w[:, :kw] = weights[:, :kw].double()
    return (torch.where(valid, ordered, 0.0) * w.unsqueeze(-1)).sum(1)


def _inputs(B, K, D, dtype, device, strided=False, kw_extra=0):
    if strided:
        features = torch.randn(B, D, K, device=device).to(dtype).transpose(1, 2)
        weights = torch.rand(B, 2 * (K + kw_extra), device=device)[:, ::2]
    else:
        features = torch.randn(B, K, D, device=device).to(dtype)
        weights = torch.rand(B, K + kw_extra, device=device)
    lengths = torch.randint(1, K + 1, (B,), device=device)
    lengths[0] = K
    lengths[-1] = 1 if B > 1 else lengths[-1]
    return features.requires_grad_(), lengths, weights.requires_grad_()


def _max_rel(actual, expected):
    actual, expected = actual.detach(), expected.detach().double()
    scale = expected.abs().max().clamp(min=1.0)
    return float(((actual.double() - expected).abs().max() / scale).nan_to_num(float("inf")))


@contextlib.contextmanager
def kernel_impl(impl):
    """Set VSE_FAST_GPO_POOL_KERNEL to impl ("sort" | "rank") inside the block, restore it after."""
    old = os.environ.get(KERNEL_ENV)
    os.environ[KERNEL_ENV] = impl
    try:
        yield
    finally:
        if old is None:
            del os.environ[KERNEL_ENV]
        else:
            os.environ[KERNEL_ENV] = old


NET_CHECK_SHAPES = [(7, 5, 33, True), (128, 64, 1024, False)]  # the second shares its build with the timing
# Checked first: length 1, odd D, strided inputs at K = 5, 64 (the sorting-network limit) and 512 (the
# largest K). The rest of CHECK_SHAPES runs after the timings, as time allows.
CORE_SHAPES = {(1, 1, 1, False), (7, 5, 33, True), (128, 64, 1024, True), (2, 512, 65, True)}


def _cases(shapes):
    """(shape, impl, dtype name) to check: sort on every shape, rank on K <= 64, and the sorting networks
    on NET_CHECK_SHAPES (each shape's specialization is a separate build of a few seconds)."""
    cases = [(shape, "sort", name) for name in DTYPES for shape in shapes]
    cases += [(shape, "rank", name) for name in DTYPES for shape in shapes if shape[1] <= RANK_MAX_K]
    net_shapes = [shape for shape in NET_CHECK_SHAPES if shape[1] <= max(sh[1] for sh in shapes)]
    cases += [(shape, "net", name) for name in DTYPES for shape in net_shapes]
    return cases


def split_cases(cases):
    """The cases on CORE_SHAPES (and the sorting networks' shapes), then the others."""
    core = [c for c in cases if c[0] in CORE_SHAPES or c[1] == "net"]
    return core, [c for c in cases if c not in core]


def check_correctness(ctx, cases, what="pool correctness"):
    rows = []
    for (B, K, D, strided), impl, name in ctx.within(cases, what):
        dtype = DTYPES[name]
        features, lengths, weights = _inputs(B, K, D, dtype, ctx.device, strided, kw_extra=K % 3)
        with poisoned_empty(), kernel_impl(impl):
            out = gpo_pool(features, lengths, weights, backend="triton")
            grad_out = torch.randn(out.shape, device=ctx.device).to(dtype)
            gx, gw = torch.autograd.grad(out, (features, weights), grad_out)
        x64 = features.detach().double().requires_grad_()
        w64 = weights.detach().double().requires_grad_()
        ref = reference_pool(x64, lengths, w64)
        rgx, rgw = torch.autograd.grad(ref, (x64, w64), grad_out.double())
        errs = {"out": _max_rel(out, ref), "grad_x": _max_rel(gx, rgx), "grad_w": _max_rel(gw, rgw)}
        ok = max(errs.values()) <= TOLERANCE[dtype]
        rows.append({"dtype": name, "impl": impl, "shape": [B, K, D], "strided": strided, **errs, "ok": ok})
    return rows


def check_no_sync(device):
    if device.type != "cuda":
        return {"ok": True, "skipped": "needs CUDA"}
    gpo = GPO(32, 32).to(device)
    features = torch.randn(64, 36, 1024, device=device, requires_grad=True)
    lengths = torch.randint(1, 37, (64,), device=device).float()
    gpo.pool(features, lengths).sum().backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pooled = gpo.pool(features, lengths)
        pooled.backward(torch.ones_like(pooled))
        return {"ok": True}
    except RuntimeError as exc:
        return {"ok": False, "error": str(exc)[:300]}
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _fwd_bwd(fn, inputs):
    grad_out = torch.ones_like(fn())
    return lambda: torch.autograd.grad(fn(), inputs, grad_out)


def time_pool(ctx, B, K, D):
    """Pool fwd+bwd at (B, K, D), bf16 then fp32: each Triton kernel family, our torch path, the published pool."""
    impls = ["triton-net"] if K <= NET_MAX_K else []
    impls += ["triton", "torch", "published"] + (["triton-rank"] if K <= RANK_MAX_K else [])
    rows = []
    inputs = {}
    for name, impl in ctx.within([(n, i) for n in ("bf16", "fp32") for i in impls], f"pool timing {[B, K, D]}"):
        if name not in inputs:
            inputs = {name: _inputs(B, K, D, DTYPES[name], ctx.device)}
        features, lengths, weights = inputs[name]
        min_bytes = features.element_size() * (3 * B * K * D + 2 * B * D)
        kernel = impl.partition("-")[2] or "sort"  # VSE_FAST_GPO_POOL_KERNEL while it runs
        if impl == "torch":
            fn = lambda: gpo_pool(features, lengths, weights, backend="torch", validate=False)  # noqa: E731
        elif impl == "published":
            fn = lambda: published_pool(features, lengths, weights)  # noqa: E731
        else:
            fn = lambda: gpo_pool(features, lengths, weights, backend="triton", validate=False)  # noqa: E731
        with kernel_impl(kernel):
            rows.append(_time_one(ctx, impl, fn, features, weights, name, [B, K, D], min_bytes))
    return rows


def _time_one(ctx, impl, fn, features, weights, dtype_name, shape, min_bytes):
    """One timing row of the pool forward + backward (and the split for the Triton implementations)."""
    step = _fwd_bwd(fn, [features, weights])
    ms = ctx.bench(step)
    row = {"what": "pool fwd+bwd", "impl": impl, "dtype": dtype_name, "shape": shape, "ms": ms,
           "gbs": min_bytes / (ms * 1e-3) / 1e9,
           "out_dtype": str(fn().dtype)}  # float32 weights: the published pool promotes bf16 to float32
    row["frac_copy_bw"] = row["gbs"] / ctx.copy_gbs if ctx.copy_gbs else None
    row["peak_extra_mb"] = ctx.peak_extra_memory(step) / 2**20
    if impl.startswith("triton"):
        out = fn()
        g = torch.ones_like(out)
        row["fwd_ms"] = ctx.bench(fn)
        row["bwd_ms"] = ctx.bench(lambda: torch.autograd.grad(out, [features, weights], g, retain_graph=True))
    return row


def time_module(ctx, shapes):
    rows = []
    for name, (B, K, D) in ctx.within([(n, sh) for sh in shapes for n in ("bf16", "fp32")], "GPO module timing"):
        published = PublishedGPO(32, 32).to(ctx.device)
        ours = GPO(32, 32).to(ctx.device)
        ours.load_state_dict(published.state_dict())
        ours_torch_table = GPO(32, 32, table_backend="torch").to(ctx.device)
        ours_torch_table.load_state_dict(published.state_dict())
        features, lengths, _ = _inputs(B, K, D, DTYPES[name], ctx.device)
        ms, out_dtypes = {}, {}
        for impl, module, fn in (("ours", ours, lambda: ours.pool(features, lengths)),
                                 ("ours_torch_table", ours_torch_table,
                                  lambda: ours_torch_table.pool(features, lengths)),
                                 ("published", published, lambda: published(features, lengths)[0])):
            ms[impl] = ctx.bench(_fwd_bwd(fn, [features, *module.parameters()]))
            out_dtypes[impl] = str(fn().dtype)
        # the published module promotes bf16 features to float32 (its weights); GPO.pool keeps bf16
        rows.append({"what": "GPO fwd+bwd", "dtype": name, "shape": [B, K, D], "ours_ms": ms["ours"],
                     "ours_out_dtype": out_dtypes["ours"], "published_out_dtype": out_dtypes["published"],
                     "ours_torch_table_ms": ms["ours_torch_table"],
                     "published_ms": ms["published"], "speedup": ms["published"] / ms["ours"]})
    return rows


TABLE_CHECK_K = [1, 5, 36, 64, 100]
TABLE_TIME_K = [36, 64]


def _table_pair(K_seed, device):
    torch.manual_seed(K_seed)
    reference = GPO(32, 32, table_backend="torch").double()
    fused = GPO(32, 32, table_backend="triton").to(device)
    fused.load_state_dict({k: v.float() for k, v in reference.state_dict().items()})
    return reference, fused


def check_table(ctx, Ks):
    """Max relative errors of the Triton table and its parameter gradients against float64."""
    rows = []
    for K in ctx.within(Ks, "table correctness K"):
        reference, fused = _table_pair(K, ctx.device)
        with poisoned_empty():
            table = fused._table_over_all_sizes(K)
            upstream = torch.randn(K, K, dtype=torch.float64)
            grads = torch.autograd.grad((table * upstream.to(table)).sum(), list(fused.parameters()))
        expected = reference._table_over_all_sizes(K)
        exp_grads = torch.autograd.grad((expected * upstream).sum(), list(reference.parameters()))
        grad_err = max(_max_rel(g.cpu(), e) for g, e in zip(grads, exp_grads))
        errs = {"table": _max_rel(table.cpu(), expected), "grads": grad_err}
        rows.append({"K": K, **errs, "ok": max(errs.values()) <= 2e-5})
    return rows


def time_table(ctx, Ks):
    """Coefficient table fwd+bwd over sizes 1..K: Triton kernels vs one packed cuDNN GRU call."""
    rows = []
    for K in ctx.within(Ks, "table timing K"):
        _, fused = _table_pair(K, "cpu")
        fused = fused.to(ctx.device)
        ms = {}
        for backend in ("triton", "torch"):
            fused.table_backend = backend
            params = list(fused.parameters())
            ms[backend] = ctx.bench(_fwd_bwd(lambda: fused._table_over_all_sizes(K), params))
        rows.append({"what": "table fwd+bwd", "K": K, "triton_ms": ms["triton"], "torch_ms": ms["torch"],
                     "speedup": ms["torch"] / ms["triton"]})
    return rows


def profile_module(ctx, B, K, D, dtype):
    """Profiler breakdown of our GPO.pool forward+backward (coefficient table vs pool kernels)."""
    ours = GPO(32, 32).to(ctx.device)
    features, lengths, _ = _inputs(B, K, D, dtype, ctx.device)
    breakdown = ctx.profile(_fwd_bwd(lambda: ours.pool(features, lengths), [features, *ours.parameters()]))
    print(f"profile GPO.pool fwd+bwd {[B, K, D]} {dtype}:", flush=True)
    for row in breakdown.get("top", []):
        print(f"  {row['self_device_us_per_step']:>9.1f} us  x{row['calls_per_step']:<5g} {row['name']}", flush=True)
    return {"shape": [B, K, D], "dtype": str(dtype), **breakdown}


def _table(result):
    lines = ["correctness (max rel err: out / grad_x / grad_w)"]
    for r in result["correctness"]:
        lines.append(f"  {r['dtype']:<5} {r['impl']:<5} {str(r['shape']):<16} {'strided' if r['strided'] else '':<8} "
                     f"{r['out']:.2e} {r['grad_x']:.2e} {r['grad_w']:.2e}  {'ok' if r['ok'] else 'FAIL'}")
    lines.append(f"no-sync GPO.pool fwd+bwd: {result['no_sync']}")
    for r in result["pool_timing"]:
        frac = f"{100 * r['frac_copy_bw']:.0f}% of copy" if r["frac_copy_bw"] else ""
        split = f" (fwd {r['fwd_ms']:.3f} / bwd {r['bwd_ms']:.3f})" if "fwd_ms" in r else ""
        lines.append(f"  pool {r['dtype']} {r['shape']} {r['impl']:<11} {r['ms']:.3f} ms {r['gbs']:.0f} GB/s {frac} "
                     f"peak +{r['peak_extra_mb']:.0f} MiB{split}")
    for r in result["module_timing"]:
        lines.append(f"  GPO {r['dtype']} {r['shape']} ours {r['ours_ms']:.3f} ms (torch table "
                     f"{r['ours_torch_table_ms']:.3f}), published {r['published_ms']:.3f} ms -> {r['speedup']:.1f}x")
    for r in result["table_correctness"]:
        lines.append(f"  table K={r['K']}: rel err {r['table']:.2e}, grads {r['grads']:.2e} {'ok' if r['ok'] else 'FAIL'}")
    for r in result["table_timing"]:
        lines.append(f"  table fwd+bwd K={r['K']}: triton {r['triton_ms']:.3f} ms, packed GRU {r['torch_ms']:.3f} ms"
                     f" -> {r['speedup']:.1f}x")
    return "\n".join(lines)


def run(ctx, smoke=False) -> dict:
    """The checks in order of priority under ctx's section budget (see gpu_check.SectionBudget)."""
    torch.manual_seed(0)
    core, extended = split_cases(_cases(SMOKE_SHAPES if smoke else CHECK_SHAPES))
    result = {"correctness": check_correctness(ctx, core, "pool correctness (core shapes)")}
    result["no_sync"] = check_no_sync(ctx.device)
    result["table_correctness"] = check_table(ctx, [1, 5] if smoke else TABLE_CHECK_K)
    result["table_timing"] = time_table(ctx, [5] if smoke else TABLE_TIME_K)
    result["pool_timing"] = time_pool(ctx, *((2, 5, 3) if smoke else (512, 64, 1024)))
    result["module_timing"] = time_module(ctx, [(2, 5, 3)] if smoke else MODULE_SHAPES)
    if not smoke and ctx.has_time("profile of GPO.pool"):
        result["profile"] = profile_module(ctx, 128, 36, 1024, torch.bfloat16)
    result["correctness"] += check_correctness(ctx, extended, "pool correctness (other shapes)")
    result["ok"] = (all(r["ok"] for r in result["correctness"] + result["table_correctness"])
                    and result["no_sync"]["ok"])
    print(_table(result), flush=True)
    return result


class _CPUContext(SectionBudget):
    """Minimal stand-in for gpu_check.Context on CPU (smoke test only)."""

    device = torch.device("cpu")
    copy_gbs = None

    @staticmethod
    def bench(fn):
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    @staticmethod
    def peak_extra_memory(fn):
        fn()
        return 0


if __name__ == "__main__":
    if "--smoke" not in sys.argv:
        sys.exit("run through bench/gpu_check.py --only gpo, or with --smoke on CPU (TRITON_INTERPRET=1)")
    sys.exit(0 if run(_CPUContext(), smoke=True)["ok"] else 1)
