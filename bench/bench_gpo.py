"""GPO benchmarks: ours next to the published re-implementation, same inputs, same run.

    pytest bench/bench_gpo.py --benchmark-only [--benchmark-group-by=group]

* gpo-module-*: whole GPO forward + backward (to the features and every parameter). Ours is the no-sync
  encoder path `GPO.pool`; the published module computes its weights per sample through a packed GRU.
* gpo-pool-*: the sort-and-weighted-sum alone, forward + backward (to features and weights). Ours is
  `gpo_pool` (backend "auto": torch on CPU, Triton on CUDA); the published-style pool is
  masked_fill / sort / masked_fill / mul / sum.
On CPU the float32 torch paths run (big cases with few rounds); on a GPU float32 and bfloat16. In
bfloat16 the published side returns float32 (its float32 weights promote the features: a float32 (B, K, D)
product), ours bfloat16; extra_info "out_dtype" records it. Before timing ours, each case checks its
output and gradients once (untimed) against the published computation in float64 (stable ties).
Lengths are random in 1..K with K present (padding exercised); the module also runs at B=128 K=36
with every set full (sets "full": 36 BUTD regions per image, the usual COCO case).
"""
import copy

import pytest
import torch

from reference_check import assert_matches_reference
from tests.published.gpo import PublishedGPO, published_pool
from vse_fast.modules.gpo import GPO
from vse_fast.ops.gpo_pool import gpo_pool

SHAPES = [(128, 36, 1024), (128, 64, 1024), (512, 64, 1024)]
ON_GPU = torch.cuda.is_available()
DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # relative error against float64, before timing


def _rounds(B, K, D):
    """CPU: a handful of rounds for the big cases (seconds each); GPU: pytest-benchmark's default."""
    if ON_GPU:
        return None
    return 3 if B * K * D > 128 * 36 * 1024 else 5


def _inputs(B, K, D, dtype, device, sets="random"):
    features = torch.randn(B, K, D, device=device).to(dtype).requires_grad_()
    if sets == "full":
        return features, torch.full((B,), K, device=device)
    lengths = torch.randint(1, K + 1, (B,), device=device)
    lengths[0] = K
    return features, lengths


def _fwd_bwd(fn, inputs):
    """Forward then backward to `inputs` with a fixed upstream gradient (no .grad accumulation)."""
    out = fn()
    grad_out = torch.ones_like(out)

    def step():
        result = fn()
        return torch.autograd.grad(result, inputs, grad_out)

    return step


def _outputs_and_grads(out, named_inputs):
    """{"out": out, "grad_<name>": d(sum of out * a fixed upstream)/d(input)} for named_inputs."""
    upstream = torch.linspace(-1, 1, out.numel(), device=out.device, dtype=torch.float64).view_as(out)
    grads = torch.autograd.grad(out, list(named_inputs.values()), upstream.to(out.dtype))
    return {"out": out, **{f"grad_{name}": g for name, g in zip(named_inputs, grads)}}


def _stable_pool(features, lengths, weights):
    """The published pooling in float64 with a stable sort: ties (many in bf16) take ranks in set
    order, as ours do; the published sort may order them otherwise (CPU torch.sort does), which gives
    each tied element another rank's weight: an equally valid gradient that would not compare."""
    longest = weights.shape[1]
    valid = (torch.arange(longest, device=features.device) < lengths.long().unsqueeze(1)).unsqueeze(-1)
    ordered = features[:, :longest].double().masked_fill(~valid, float("-inf"))
    ordered = ordered.sort(dim=1, descending=True, stable=True).values.masked_fill(~valid, 0)
    return (ordered * weights.double().unsqueeze(-1)).sum(1)


def _check_module(module, published, features, lengths):
    """Ours (GPO.pool) against the published module's coefficients (its float32 GRU, cuDNN without
    TF32) pooled in float64 by _stable_pool, on the same weights and inputs."""
    reference = copy.deepcopy(published)
    x64 = features.detach().double().requires_grad_()
    ours = _outputs_and_grads(module.pool(features, lengths),
                              {"features": features, **dict(module.named_parameters())})
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the GRU in true float32 (TF32 alone is ~2e-4 off)
    try:
        weights = reference.compute_pool_weights(lengths, x64)[0].squeeze(-1)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    expected = _outputs_and_grads(_stable_pool(x64, lengths, weights),
                                  {"features": x64, **dict(reference.named_parameters())})
    pooling = ("out", "grad_features")
    assert_matches_reference({k: ours.pop(k) for k in pooling}, {k: expected.pop(k) for k in pooling},
                             TOLERANCE[features.dtype])
    # the parameters' gradients cancel (softmax over ranks): float32 sums of 128 sets reach ~3e-3
    assert_matches_reference(ours, expected, max(TOLERANCE[features.dtype], 2e-2))


def _check_pool(fn, features, lengths, weights):
    """Ours against the published pooling in float64 (stable sort: _stable_pool) on the same inputs."""
    x64, w64 = features.detach().double().requires_grad_(), weights.detach().double().requires_grad_()
    ours = _outputs_and_grads(fn(), {"features": features, "weights": weights})
    longest = int(lengths.max())
    expected = _outputs_and_grads(_stable_pool(x64, lengths, w64[:, :longest]), {"features": x64, "weights": w64})
    assert_matches_reference(ours, expected, TOLERANCE[features.dtype])


MODULE_CASES = [(*shape, "random") for shape in SHAPES] + [(128, 36, 1024, "full")]


@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_NAMES[d] for d in DTYPES])
@pytest.mark.parametrize("B,K,D,sets", MODULE_CASES,
                         ids=[f"B{b}-K{k}-D{d}" + ("-full" if sets == "full" else "") for b, k, d, sets in MODULE_CASES])
@pytest.mark.parametrize("impl", ["ours", "published"])
def test_gpo_module_fwd_bwd(run_bench, bench_device, impl, B, K, D, sets, dtype):
    torch.manual_seed(0)
    published = PublishedGPO(32, 32).to(bench_device)
    features, lengths = _inputs(B, K, D, dtype, bench_device, sets)
    if impl == "ours":
        module = GPO(32, 32).to(bench_device)
        module.load_state_dict(published.state_dict())
        fn = lambda: module.pool(features, lengths)  # noqa: E731
        _check_module(module, published, features, lengths)
    else:
        module = published
        fn = lambda: module(features, lengths)[0]  # noqa: E731
    step = _fwd_bwd(fn, [features, *module.parameters()])
    full = "-full" if sets == "full" else ""
    run_bench(step, group=f"gpo-module-B{B}-K{K}-D{D}{full}-{DTYPE_NAMES[dtype]}", impl=impl,
              rounds=_rounds(B, K, D), shape=[B, K, D], dtype=str(dtype), sets=sets, out_dtype=str(fn().dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_NAMES[d] for d in DTYPES])
@pytest.mark.parametrize("B,K,D", SHAPES, ids=[f"B{b}-K{k}-D{d}" for b, k, d in SHAPES])
@pytest.mark.parametrize("impl", ["ours", "published"])
def test_gpo_pool_fwd_bwd(run_bench, bench_device, impl, B, K, D, dtype):
    torch.manual_seed(0)
    features, lengths = _inputs(B, K, D, dtype, bench_device)
    weights = torch.softmax(torch.randn(B, K, device=bench_device), 1)
    weights = weights.masked_fill(torch.arange(K, device=bench_device) >= lengths[:, None], 0).requires_grad_()
    if impl == "ours":
        fn = lambda: gpo_pool(features, lengths, weights, validate=False)  # noqa: E731
        _check_pool(fn, features, lengths, weights)
    else:
        fn = lambda: published_pool(features, lengths, weights)  # noqa: E731
    step = _fwd_bwd(fn, [features, weights])
    # minimal traffic: forward reads x, writes out; backward reads x and grad_out, writes grad_x
    elem = features.element_size()
    min_bytes = elem * (2 * B * K * D + B * D) + elem * (B * K * D + B * D)
    run_bench(step, group=f"gpo-pool-B{B}-K{K}-D{D}-{DTYPE_NAMES[dtype]}", impl=impl,
              rounds=_rounds(B, K, D), shape=[B, K, D], dtype=str(dtype), min_bytes=min_bytes,
              out_dtype=str(fn().dtype))
