"""gpo_pool (vse_fast.ops.gpo_pool): torch path and Triton kernels against a float64 reference.

CPU: the torch path on odd shapes and every dtype, fp64 gradcheck, the Triton kernels under the
interpreter on tiny shapes (few programs: the interpreter is slow), every validation error.
CUDA (skipped without a GPU): the Triton kernels over realistic shapes and the no-sync module path.
"""

import pytest
import torch

from tests.conftest import DTYPE_TOLERANCES, HAS_CUDA, requires_cuda
from vse_fast.kernels import triton_interpreting
from vse_fast.ops.gpo_pool import gpo_pool

KERNEL_ENV = "VSE_FAST_GPO_POOL_KERNEL"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INTERPRETING = triton_interpreting()
requires_interpreter = pytest.mark.skipif(not INTERPRETING, reason="Triton interpreter tests run only without a GPU")


def reference_pool(features, lengths, weights):
    """float64 oracle, written independently of the op: per sample, stable descending sort of the n
    valid rows along the set axis, weighted by weights[:n]. Differentiable (torch's sort backward)."""
    x = features.double()
    w = weights.double()
    rows = []
    for b in range(x.shape[0]):
        n = int(lengths[b])
        ordered = torch.sort(x[b, :n], dim=0, descending=True, stable=True).values  # (n, D)
        rows.append((ordered * w[b, :n].unsqueeze(1)).sum(0))
    return torch.stack(rows)


def make_inputs(B, K, D, dtype, *, device="cpu", kw_extra=0, lengths=None, strided=False, requires_grad=True):
    """Random features (B, K, D), lengths (B,) with 1 and K present (unsorted), weights (B, K + kw_extra).
    strided=True gives non-contiguous features (set axis innermost in memory) and weights (a column slice).
    Weights are float64 for float64 features, float32 otherwise (as GPO's coefficients)."""
    w_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if strided:
        features = torch.randn(B, D, K, device=device).to(dtype).transpose(1, 2)
        weights = torch.rand(B, 2 * (K + kw_extra), device=device, dtype=w_dtype)[:, ::2]
    else:
        features = torch.randn(B, K, D, device=device).to(dtype)
        weights = torch.rand(B, K + kw_extra, device=device, dtype=w_dtype)
    if lengths is None:
        lengths = torch.randint(1, K + 1, (B,), device=device)
        lengths[torch.randperm(B)[: min(B, 2)]] = torch.tensor([1, K], device=device)[: min(B, 2)]
    return features.requires_grad_(requires_grad), lengths, weights.requires_grad_(requires_grad)


def assert_close_scaled(actual, expected, dtype, what):
    """|actual - expected| <= atol * scale + rtol * |expected|, scale = max(1, max|expected|) so that
    sums over many terms get an error budget proportional to their magnitude."""
    atol, rtol = DTYPE_TOLERANCES.get(dtype, (1e-10, 1e-10))
    expected = expected.double()
    actual = actual.double()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual - expected).abs()
    bound = atol * scale + rtol * expected.abs()
    bad = ~(err <= bound)  # NaN counts as bad
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} of {bad.numel()} elements off; max err "
                                 f"{err.max().item():.3g} (atol {atol} x scale {scale:.3g}, rtol {rtol})")


def check_against_reference(features, lengths, weights, backend):
    out = gpo_pool(features, lengths, weights, backend=backend)
    assert out.dtype == features.dtype and out.shape == (features.shape[0], features.shape[2])
    # a transposed (non-contiguous) upstream gradient: the backward takes grad_out's strides
    grad_out = torch.randn(out.shape[::-1], device=out.device).to(out.dtype).t()
    grad_x, grad_w = torch.autograd.grad(out, (features, weights), grad_out)

    x_ref = features.detach().double().cpu().requires_grad_()
    w_ref = weights.detach().double().cpu().requires_grad_()
    ref = reference_pool(x_ref, lengths.cpu(), w_ref)
    ref_gx, ref_gw = torch.autograd.grad(ref, (x_ref, w_ref), grad_out.double().cpu())

    dtype = features.dtype
    assert_close_scaled(out.cpu(), ref, dtype, "output")
    assert grad_x.shape == features.shape and grad_x.dtype == dtype
    assert_close_scaled(grad_x.cpu(), ref_gx, dtype, "grad features")
    assert grad_w.shape == weights.shape and grad_w.dtype == weights.dtype
    # grad_w sums D products in fp32 (exact inputs): tolerance of the weights' dtype, scaled
    assert_close_scaled(grad_w.cpu(), ref_gw, weights.dtype, "grad weights")


# ---------------------------------------------------------------------------------------------- torch path
TORCH_CASES = [  # (B, K, D, kw_extra, strided)
    (1, 1, 1, 0, False),
    (2, 5, 3, 0, False),
    (7, 36, 33, 3, True),
    (3, 13, 64, 0, True),
    (5, 64, 17, 1, False),
]


@pytest.mark.parametrize("dtype", [*DTYPES.values(), torch.float64], ids=[*DTYPES, "fp64"])
@pytest.mark.parametrize("B,K,D,kw_extra,strided", TORCH_CASES,
                         ids=[f"B{b}-K{k}-D{d}-Kw+{e}{'-strided' if s else ''}" for b, k, d, e, s in TORCH_CASES])
def test_torch_path_matches_reference(poison_empty, B, K, D, kw_extra, strided, dtype):
    features, lengths, weights = make_inputs(B, K, D, dtype, kw_extra=kw_extra, strided=strided)
    check_against_reference(features, lengths, weights, "torch")


def test_torch_path_float_lengths_and_unsorted():
    features, lengths, weights = make_inputs(6, 9, 5, torch.float32)
    lengths = torch.tensor([9, 1, 4, 9, 2, 7])
    out_int = gpo_pool(features, lengths, weights, backend="torch")
    out_float = gpo_pool(features, lengths.float(), weights, backend="torch")
    assert torch.equal(out_int, out_float)
    check_against_reference(features, lengths.float(), weights, "torch")


@pytest.mark.parametrize("dtype", [*DTYPES.values(), torch.float64], ids=[*DTYPES, "fp64"])
def test_cpu_sort_by_length_groups_equals_one_padded_sort(dtype):
    """The torch path sorts CPU sets in groups of one length (_sort_sets); the one-sort path (other
    devices) must give the very same values and positions: ties (stable), NaN, -inf, lengths 0 and
    > K (clamped, as validate=False may pass), one length for the whole batch, strided features."""
    from vse_fast.ops.gpo_pool import _sort_sets

    B, K, D = 9, 7, 5
    features = torch.randn(B, 2 * D, K, dtype=torch.float64).round().to(dtype).transpose(1, 2)[:, :, ::2]  # ties
    features[1, 0, 0], features[2, 3, 1], features[3, 2, 2] = float("nan"), float("-inf"), float("inf")
    for n in (torch.tensor([7, 1, 4, 7, 0, 3, 9, 4, 1]), torch.full((B,), 4), torch.full((B,), K)):
        grouped, single = _sort_sets(features, n, grouped=True), _sort_sets(features, n, grouped=False)
        assert torch.equal(grouped[1], single[1]), n
        torch.testing.assert_close(grouped[0], single[0], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [*DTYPES.values(), torch.float64], ids=[*DTYPES, "fp64"])
def test_cpu_full_sets_take_the_unmasked_path_with_the_same_numbers(dtype):
    """Every set full: the CPU torch path sorts without padding and its backward masks nothing. Its
    output and gradients equal those of the same sets with one padding position more (exactly; NaN
    where NaN, whatever its payload bits), the masked path, with ties, NaN and inf in grad_out, and
    the gradient is contiguous."""
    B, K, D = 6, 5, 7
    features = torch.randn(B, K, D, dtype=torch.float64).round().to(dtype)  # ties
    padded = torch.cat([features, torch.randn(B, 1, D).to(dtype)], dim=1)
    weights = torch.randn(B, K + 1).softmax(1)
    grad_out = torch.randn(B, D).to(dtype)
    grad_out[0, 1], grad_out[2, 3] = float("nan"), float("inf")
    results = []
    for x in (features, padded):
        x = x.clone().requires_grad_()
        w = weights.clone().requires_grad_()
        out = gpo_pool(x, torch.full((B,), K), w, backend="torch")
        grad_x, grad_w = torch.autograd.grad(out, [x, w], grad_out)
        assert grad_x.is_contiguous()
        results.append((out, grad_x, grad_w))
    (out, grad_x, grad_w), (out_p, grad_x_p, grad_w_p) = results
    torch.testing.assert_close(out, out_p, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(grad_x, grad_x_p[:, :K], rtol=0, atol=0, equal_nan=True)
    assert not grad_x_p[:, K:].any() and not grad_x_p[:, K:].isnan().any()  # padding: 0 though grad_out is NaN
    torch.testing.assert_close(grad_w, grad_w_p, rtol=0, atol=0, equal_nan=True)


def test_torch_path_gradcheck_fp64():
    features, lengths, weights = make_inputs(3, 6, 4, torch.float64, kw_extra=2)
    assert torch.autograd.gradcheck(lambda x, w: gpo_pool(x, lengths, w, backend="torch"), (features, weights))
    # a gradient penalty: second-order gradients, as the published module's autograd gives them
    assert torch.autograd.gradgradcheck(lambda x, w: gpo_pool(x, lengths, w, backend="torch"), (features, weights))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_create_graph_backward_keeps_padding_gradients_zero_for_nonfinite_grad_out(dtype):
    """The differentiable backward (create_graph=True, a gradient penalty) gives the padding ranks 0
    where grad_out is inf or NaN, as the plain backward does: without its padding mask, grad_out times
    a padding rank's zero weight made them NaN."""
    x = torch.randn(2, 4, 3, dtype=dtype, requires_grad=True)
    w = torch.rand(2, 4, dtype=dtype, requires_grad=True)
    lengths = torch.tensor([2, 4])
    grad_out = torch.ones(2, 3, dtype=dtype)
    grad_out[0, 1], grad_out[1, 2] = float("inf"), float("nan")
    plain = torch.autograd.grad(gpo_pool(x, lengths, w, backend="torch"), x, grad_out)[0]
    twice = torch.autograd.grad(gpo_pool(x, lengths, w, backend="torch"), x, grad_out, create_graph=True)[0]
    assert twice.requires_grad
    assert not plain[0, 2:].any() and not plain[0, 2:].isnan().any()
    assert not twice[0, 2:].any() and not twice[0, 2:].isnan().any(), twice[0, 2:]
    torch.testing.assert_close(twice.detach(), plain, equal_nan=True)


TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"  # the compiled kernels, else the interpreter
requires_triton = pytest.mark.skipif(not (HAS_CUDA or INTERPRETING), reason="needs a GPU or the Triton interpreter")


@pytest.mark.parametrize("impl", ["sort", "rank", "net"])
def test_padding_never_leaks(monkeypatch, impl):
    """Huge or NaN values at padding positions and NaN weights beyond n change nothing. The Triton
    backend runs on the GPU where there is one (it ran under the interpreter only)."""
    monkeypatch.setenv(KERNEL_ENV, impl)
    features, lengths, weights = make_inputs(4, 7, 6, torch.float32)
    lengths = torch.tensor([3, 7, 1, 5])
    dirty_x, dirty_w = features.detach().clone(), weights.detach().clone()
    for b, n in enumerate(lengths.tolist()):
        dirty_x[b, n:] = float("nan") if b % 2 else 1e30
        dirty_w[b, n:] = float("nan")
    for backend in ("torch",) + (("triton",) if INTERPRETING or HAS_CUDA else ()):
        device = TRITON_DEVICE if backend == "triton" else "cpu"
        features, lengths, weights = (t.detach().to(device) for t in (features, lengths, weights))
        dirty_x, dirty_w = (t.detach().to(device).requires_grad_() for t in (dirty_x, dirty_w))
        clean = gpo_pool(features, lengths, weights, backend=backend)
        dirty = gpo_pool(dirty_x, lengths, dirty_w, backend=backend)
        torch.testing.assert_close(dirty, clean, rtol=0, atol=0)
        g = torch.randn_like(clean)
        gx, gw = torch.autograd.grad(dirty, (dirty_x, dirty_w), g)
        assert torch.isfinite(gx).all() and torch.isfinite(gw).all()
        for b, n in enumerate(lengths.tolist()):
            assert not gx[b, n:].any() and not gw[b, n:].any(), f"padding got a gradient ({backend})"


def _nan_and_tie_inputs(dtype):
    # sample 0: a NaN among the valid entries of column 0; sample 1: many ties and -inf, -0.0 / +0.0
    x = torch.tensor([[[float("nan"), 1.0], [2.0, 3.0], [0.5, -1.0]],
                      [[1.0, -0.0], [1.0, 0.0], [float("-inf"), 0.0]]]).to(dtype)
    w = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]])
    return x.requires_grad_(), torch.tensor([3, 3]), w.requires_grad_()


@pytest.mark.parametrize("backend,impl", [("torch", "sort"), pytest.param("triton", "sort", marks=requires_triton),
                                          pytest.param("triton", "rank", marks=requires_triton),
                                          pytest.param("triton", "net", marks=requires_triton)],
                         ids=["torch", "triton-sort", "triton-rank", "triton-net"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_nan_propagates_and_ties_are_stable(monkeypatch, backend, impl, dtype):
    """NaN sorts first (as in torch.sort) and propagates; tied values take ranks in their original
    order (stable), so each receives the weight of its own rank, as with torch.sort(stable=True).
    The Triton cases run on the GPU where there is one."""
    monkeypatch.setenv(KERNEL_ENV, impl)
    x, n, w = _nan_and_tie_inputs(dtype)
    if backend == "triton":
        x, n, w = (t.detach().to(TRITON_DEVICE) for t in (x, n, w))
        x.requires_grad_(), w.requires_grad_()
    out = gpo_pool(x, n, w, backend=backend)
    assert torch.isnan(out[0, 0]) and not torch.isnan(out[0, 1]) and not torch.isnan(out[1]).any()
    g = torch.ones_like(out)
    gx, _ = torch.autograd.grad(out, (x, w), g)
    # NaN ranks first: weight 0.5; then 2.0 (0.3), 0.5 (0.2)
    gx = gx.cpu()
    torch.testing.assert_close(gx[0, :, 0].float(), torch.tensor([0.5, 0.3, 0.2]), rtol=1e-2, atol=1e-3)
    # column 0 of sample 1: 1.0 (pos 0) rank 0, 1.0 (pos 1) rank 1, -inf rank 2
    torch.testing.assert_close(gx[1, :, 0].float(), torch.tensor([0.6, 0.3, 0.1]), rtol=1e-2, atol=1e-3)
    # column 1: -0.0 and 0.0 tie (positions 0, 1, 2 in order)
    torch.testing.assert_close(gx[1, :, 1].float(), torch.tensor([0.6, 0.3, 0.1]), rtol=1e-2, atol=1e-3)


# -------------------------------------------------------------------------------- Triton (interpreter)
INTERP_CASES = [  # (B, K, D, kw_extra, strided, lengths): 1-4 programs each
    (1, 1, 1, 0, False, None),
    (2, 5, 3, 2, False, [1, 5]),
    (2, 9, 20, 3, True, [9, 4]),  # two D-blocks, Kw > K, non-contiguous features and weights
    (2, 4, 5, 1, True, [4, 3]),  # the 4-input network
    (2, 23, 20, 1, True, [23, 1]),  # K in 17..32 (caption lengths): the 32-wide blocks and network
]
KERNEL_IMPLS = ["sort", "rank", "net"]  # values of VSE_FAST_GPO_POOL_KERNEL


@requires_interpreter
@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("B,K,D,kw_extra,strided,lengths", INTERP_CASES,
                         ids=[f"B{c[0]}-K{c[1]}-D{c[2]}-Kw+{c[3]}{'-strided' if c[4] else ''}" for c in INTERP_CASES])
def test_triton_interpreter_matches_reference(poison_empty, monkeypatch, B, K, D, kw_extra, strided, lengths, dtype,
                                              impl):
    monkeypatch.setenv(KERNEL_ENV, impl)
    lengths = None if lengths is None else torch.tensor(lengths)
    features, lengths, weights = make_inputs(B, K, D, dtype, kw_extra=kw_extra, strided=strided, lengths=lengths)
    check_against_reference(features, lengths, weights, "triton")


@requires_interpreter
@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_triton_interpreter_many_ties_bf16(monkeypatch, impl):
    """bf16 values from a 5-value alphabet: ranks of tied values must match the stable torch path."""
    monkeypatch.setenv(KERNEL_ENV, impl)
    x = torch.randint(-2, 3, (2, 7, 4)).to(torch.bfloat16).requires_grad_()
    n, w = torch.tensor([7, 5]), torch.rand(2, 7).requires_grad_()
    g = torch.randn(2, 4).to(torch.bfloat16)
    results = []
    for backend in ("torch", "triton"):
        out = gpo_pool(x, n, w, backend=backend)
        results.append((out, *torch.autograd.grad(out, (x, w), g)))
    for ours, ref, what in zip(results[1], results[0], ("output", "grad features", "grad weights")):
        torch.testing.assert_close(ours.float(), ref.float(), rtol=1e-2, atol=1e-2, msg=what)


@requires_interpreter
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("K,lengths", [(33, [33, 17]), (64, [64, 2])], ids=["K33", "K64"])
def test_triton_interpreter_net_largest_networks(poison_empty, monkeypatch, K, lengths, dtype):
    """The 64-input sorting network (K = 33 pads to it, K = 64 fills it), non-contiguous, Kw > K."""
    monkeypatch.setenv(KERNEL_ENV, "net")
    features, lengths, weights = make_inputs(2, K, 3, dtype, kw_extra=2, strided=True, lengths=torch.tensor(lengths))
    check_against_reference(features, lengths, weights, "triton")


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_sorting_networks_sort_every_zero_one_input(n):
    """0-1 principle: a comparator network that sorts all 2^n zero-one inputs sorts every input."""
    from vse_fast.kernels.gpo_pool_net import batcher_pairs

    pairs = batcher_pairs(n)
    bits = (torch.arange(2 ** n)[:, None] >> torch.arange(n)[None, :]) & 1  # (2^n, n)
    v = bits.clone()
    for i, j in pairs:
        v[:, i], v[:, j] = torch.maximum(v[:, i], v[:, j]), torch.minimum(v[:, i], v[:, j])
    assert torch.equal(v, bits.sort(dim=1, descending=True).values)


@pytest.mark.parametrize("n,comparators", [(32, 191), (64, 543)])
def test_sorting_networks_large_sizes(n, comparators):
    from vse_fast.kernels.gpo_pool_net import batcher_pairs

    pairs = batcher_pairs(n)
    assert len(pairs) == comparators and all(i < j for i, j in pairs)
    v = torch.randn(2000, n)
    v[:100, : n // 2] = v[:100, n // 2:]  # ties
    x = v.clone()
    for i, j in pairs:
        x[:, i], x[:, j] = torch.maximum(x[:, i], x[:, j]), torch.minimum(x[:, i], x[:, j])
    assert torch.equal(x, v.sort(dim=1, descending=True).values)


def _run_ptx(ptx, inputs):
    """Execute the mov/max/min PTX of `network_ptx` on Python numbers: $0..$n-1 outputs, $n.. inputs.
    A packed type's register is a tuple of its lanes: max/min act lane by lane, mov copies the tuple."""
    import re

    n = len(inputs)
    reg = {f"${n + i}": v for i, v in enumerate(inputs)}
    for op, ptx_type, dst, srcs in re.findall(r"(mov|max|min)\.(\w+) (\S+), ([^;]+);", ptx):
        vals = [reg[r.strip()] for r in srcs.split(",")]
        if op == "mov":
            reg[dst] = vals[0]
        elif ptx_type.endswith("x2"):
            pick = max if op == "max" else min
            reg[dst] = tuple(pick(a, b) for a, b in zip(*vals))
        else:
            reg[dst] = max(vals) if op == "max" else min(vals)
    return [reg[f"${i}"] for i in range(n)]


@pytest.mark.parametrize("n", [2, 8, 64])
@pytest.mark.parametrize("descending", [True, False], ids=["desc", "asc"])
def test_network_ptx_sorts(n, descending):
    """The inline PTX the compiled kernels run is the comparator network, in both directions."""
    from vse_fast.kernels.gpo_pool_net import batcher_pairs, network_ptx

    ptx = network_ptx(n, batcher_pairs(n), descending, "s32")
    assert ptx.count("max.s32") == ptx.count("min.s32") == len(batcher_pairs(n))
    gen = torch.Generator().manual_seed(n)
    for _ in range(20):
        values = torch.randint(-50, 50, (n,), generator=gen).tolist()
        assert _run_ptx(ptx, values) == sorted(values, reverse=descending)


@pytest.mark.parametrize("ptx_type", ["bf16x2", "f16x2", "s16x2"])
@pytest.mark.parametrize("descending", [True, False], ids=["desc", "asc"])
def test_network_ptx_sorts_packed_lanes(ptx_type, descending):
    """The packed networks (two feature columns per 32-bit register) sort each lane on its own."""
    from vse_fast.kernels.gpo_pool_net import batcher_pairs, network_ptx

    n = 64
    ptx = network_ptx(n, batcher_pairs(n), descending, ptx_type)
    assert ptx.count(f"max.{ptx_type}") == ptx.count(f"min.{ptx_type}") == len(batcher_pairs(n))
    assert ".reg .b32 t;" in ptx and ".b16 " not in ptx
    gen = torch.Generator().manual_seed(7)
    for _ in range(10):
        lanes = torch.randint(-20, 20, (2, n), generator=gen).tolist()  # ties in both lanes
        out = _run_ptx(ptx, list(zip(*lanes)))
        assert [list(lane) for lane in zip(*out)] == [sorted(lane, reverse=descending) for lane in lanes]


def test_generated_net_module_is_cached_by_source(tmp_path, monkeypatch):
    import vse_fast.kernels.gpo_pool_net as net

    monkeypatch.setenv("VSE_FAST_CACHE", str(tmp_path))
    monkeypatch.setattr(net, "_MODULE", None)
    module = net.generated_module()
    files = list(tmp_path.glob("gpo_pool_net_*.py"))
    assert len(files) == 1 and files[0].read_text() == net.module_source()
    for size in net.NET_SIZES:
        fwd, bwd = net.net_kernels(size)
        assert fwd.fn.__name__ == f"gpo_pool_net{size}_fwd_kernel" and bwd.fn.__module__ == module.__name__
    with pytest.raises(ValueError, match="no sorting network for BLOCK_K=128"):
        net.net_kernels(128)


def test_kernel_impl_selection(monkeypatch):
    """VSE_FAST_GPO_POOL_KERNEL: unset/"sort" -> sort; "rank" / "net" -> that for K <= 64, sort above."""
    from vse_fast.kernels.gpo_pool import NET_MAX_K, RANK_MAX_K, pool_settings

    monkeypatch.delenv(KERNEL_ENV, raising=False)
    assert pool_settings(RANK_MAX_K, 8).impl == "sort"
    monkeypatch.setenv(KERNEL_ENV, "rank")
    assert pool_settings(1, 8).impl == "rank" and pool_settings(RANK_MAX_K, 8).impl == "rank"
    assert pool_settings(RANK_MAX_K + 1, 8).impl == "sort"
    monkeypatch.setenv(KERNEL_ENV, "net")
    assert pool_settings(1, 8).impl == "net" and pool_settings(NET_MAX_K, 8).impl == "net"
    assert pool_settings(NET_MAX_K + 1, 8).impl == "sort"
    monkeypatch.setenv(KERNEL_ENV, "sort")
    assert pool_settings(5, 8).impl == "sort"


def test_net_compiled_settings_and_packing_flags(monkeypatch):
    """Compiled "net" launches: one column per thread (BLOCK_D 128) for fp32, two for 16-bit dtypes
    (BLOCK_D 256), and the packed networks only where PTX has them: bf16x2/f16x2 min/max from sm_80
    (forward), s16x2 from sm_90 (backward)."""
    import vse_fast.kernels.gpo_pool as gp

    monkeypatch.setattr(gp, "triton_interpreting", lambda: False)
    fp32 = gp.pool_settings(64, 1024, impl="net", itemsize=4)
    half = gp.pool_settings(33, 1024, impl="net", itemsize=2)
    assert (fp32.BLOCK_K, fp32.BLOCK_D, half.BLOCK_K, half.BLOCK_D) == (64, 128, 64, 256)
    x16, x32 = torch.empty(1, 1, 1, dtype=torch.bfloat16), torch.empty(1, 1, 1)
    for major, fwd, bwd in ((7, False, False), (8, True, False), (9, True, True), (10, True, True)):
        monkeypatch.setattr(gp, "_capability_major", lambda device, major=major: major)
        assert gp._net_flags(half, x16, backward=False) == {"USE_ASM": True, "PACK_16X2": fwd}
        assert gp._net_flags(half, x16, backward=True) == {"USE_ASM": True, "PACK_16X2": bwd}
        assert gp._net_flags(fp32, x32, backward=False) == {"USE_ASM": True, "PACK_16X2": False}
    assert gp._net_flags(gp.pool_settings(64, 1024, impl="sort"), x16, backward=False) == {}


def test_launch_copies_views_whose_row_offsets_pass_int32():
    """The kernels compute a batch row's offset in int64 and offsets within it in int32: a strided view
    whose row spans 2**31 elements or more is copied (meta tensors: shapes and strides, no memory)."""
    from vse_fast.kernels.gpo_pool import _int32_row_offsets

    small = torch.empty_strided((2, 3, 4), (12, 1, 3), device="meta")
    assert _int32_row_offsets(small, "x") is small
    huge = torch.empty_strided((2, 3, 4), (1, 2**31, 2), device="meta")  # (K - 1) * stride_k >= 2**31
    fixed = _int32_row_offsets(huge, "x")
    assert fixed.stride() == (12, 4, 1)
    with pytest.raises(ValueError, match="more than the kernels' int32 offsets reach"):
        _int32_row_offsets(torch.empty_strided((1, 512, 2**23), (1, 1, 512), device="meta"), "features")


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_launchers_guard_the_weights_offsets_and_the_grid(direction, monkeypatch):
    """The weights' offsets are int32 in the kernels too (a transposed view of a (Kw, B) tensor with
    B > 4.2M passes 2**31 at K = 512), and D-blocks run on grid axis 1, which CUDA caps at 65535:
    both were unchecked (meta tensors: shapes and strides, no memory)."""
    import vse_fast.kernels.gpo_pool as gp

    B, K = 2, 4
    settings = gp.pool_settings(K, 8, impl="sort")
    lengths = torch.full((B,), K, dtype=torch.int32, device="meta")

    def launch(D):
        x = torch.empty((B, K, D), device="meta")
        w = torch.empty((B, K), device="meta")
        if direction == "fwd":
            return gp.gpo_pool_fwd(x, lengths, w, settings)
        return gp.gpo_pool_bwd(x, lengths, w, torch.empty((B, D), device="meta"), settings)

    with pytest.raises(ValueError, match=r"column blocks of .*more than CUDA's grid limit 65535"):
        launch(settings.BLOCK_D * gp.GRID_AXIS1_MAX + 1)
    guarded = []

    def spy(t, name):
        guarded.append(name)
        if name == "weights":
            raise RuntimeError("weights guarded")
        return t

    monkeypatch.setattr(gp, "_int32_row_offsets", spy)
    with pytest.raises(RuntimeError, match="weights guarded"):
        launch(8)
    assert "features" in guarded


def test_backward_refuses_grad_rows_past_int32_of_a_broadcast_view():
    """grad_x is written contiguous: a broadcast x (row extent 0) whose K * D passes 2**31 is refused
    before any launch (meta tensors: no memory)."""
    from vse_fast.kernels.gpo_pool import gpo_pool_bwd, pool_settings

    B, K, D = 1, 512, 2**22
    x = torch.empty((1, 1, 1), dtype=torch.float16, device="meta").expand(B, K, D)
    lengths = torch.empty((B,), dtype=torch.int32, device="meta")
    w, grad_out = torch.empty((B, K), device="meta"), torch.empty((B, D), dtype=torch.float16, device="meta")
    with pytest.raises(ValueError, match="rows of 2147483648 elements"):
        gpo_pool_bwd(x, lengths, w, grad_out, pool_settings(K, D))


@pytest.mark.parametrize("dtype, impl, copied", [(torch.bfloat16, "net", True), (torch.float16, "net", True),
                                                 (torch.float32, "net", False), (torch.bfloat16, "sort", False)])
def test_net_forward_gets_unit_feature_stride_for_16_bit(monkeypatch, dtype, impl, copied):
    """The 16-bit network forward hints that columns 2t, 2t+1 are adjacent in memory (one 32-bit load):
    the launcher hands it a copy when the feature stride is not 1 (a stride of 64 here, which Triton
    would otherwise mark divisible by 16 and load as pairs). Other kernels take the strides as given."""
    import vse_fast.kernels.gpo_pool as gp

    seen = {}

    class Launch:
        def __getitem__(self, grid):
            return lambda x, *args, **kw: seen.update(x=x)

    monkeypatch.setattr(gp, "_kernels", lambda settings: (Launch(), None))
    monkeypatch.setattr(gp, "_net_flags", lambda *a, **kw: {})
    x, n, w = make_inputs(3, 64, 8, dtype, strided=True, requires_grad=False)
    settings = gp.pool_settings(64, 8, impl=impl, itemsize=x.element_size())
    gp.gpo_pool_fwd(x, n.to(torch.int32), w, settings)
    assert (seen["x"].stride(2) == 1) == copied and (seen["x"] is x) != copied
    assert torch.equal(seen["x"], x)


@requires_interpreter
def test_unknown_kernel_impl_raises(monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, "bitonic")
    x, n, w = _valid()
    with pytest.raises(ValueError, match=f"{KERNEL_ENV}='bitonic'.*'sort', 'rank'"):
        gpo_pool(x, n, w, backend="triton")


# ------------------------------------------------------------------------------------------------- errors
def _valid():
    return torch.randn(2, 4, 3), torch.tensor([4, 2]), torch.rand(2, 4)


@pytest.mark.parametrize("mutate,error,match", [
    (lambda x, n, w: (x[0], n, w), ValueError, r"features must be \(B, K, D\)"),
    (lambda x, n, w: (x, n[:, None], w), ValueError, r"lengths must be \(B,\)"),
    (lambda x, n, w: (x, n, w[0]), ValueError, r"weights must be \(B, Kw\)"),
    (lambda x, n, w: (x, n[:1], w), ValueError, "batch sizes differ.*lengths has 1"),
    (lambda x, n, w: (x, n, w[:1]), ValueError, "batch sizes differ.*weights has 1"),
    (lambda x, n, w: (x, torch.tensor([0, 2]), w), ValueError, r"in \[1, K=4\].*min 0"),
    (lambda x, n, w: (x, torch.tensor([5, 2]), w), ValueError, r"in \[1, K=4\].*max 5"),
    (lambda x, n, w: (x, torch.tensor([2.5, 2.0]), w), ValueError, "whole numbers"),
    (lambda x, n, w: (x, torch.tensor([float("nan"), 2.0]), w), ValueError, r"lengths must hold finite.*\[nan\]"),
    (lambda x, n, w: (x, torch.tensor([float("inf"), 2.0]), w), ValueError, r"lengths must hold finite.*\[inf\]"),
    (lambda x, n, w: (x, torch.tensor([2.0, -float("inf")]), w), ValueError, r"lengths must hold finite.*\[-inf\]"),
    (lambda x, n, w: (x, n, w[:, :3]), ValueError, "Kw=3.*longest set 4"),
    (lambda x, n, w: (x.long(), n, w), TypeError, "features must be a float16/bfloat16/float32/float64.*torch.int64"),
    (lambda x, n, w: (x.to(torch.float8_e4m3fn), n, w), TypeError, "features must be a float16/.*float8_e4m3fn"),
    (lambda x, n, w: (x, n, w.long()), TypeError, "weights must be a floating-point"),
    (lambda x, n, w: (x, n.bool(), w), TypeError, "lengths must be an integer or float"),
    (lambda x, n, w: (x, n.tolist(), w), TypeError, "lengths must be a torch.Tensor, got list"),
    (lambda x, n, w: (x, n, None), TypeError, "weights must be a torch.Tensor"),
    (lambda x, n, w: (x[:, :0], n, w), ValueError, "empty set axis"),
    (lambda x, n, w: (x.to("meta"), n, w), ValueError, "one device.*features on meta"),
], ids=["features-rank", "lengths-rank", "weights-rank", "B-lengths", "B-weights", "length-0", "length-gt-K",
        "fractional-length", "nan-length", "inf-length", "neg-inf-length", "Kw-short", "int-features", "fp8-features", "int-weights", "bool-lengths", "list-lengths",
        "no-weights", "K-0", "devices"])
def test_validation_errors(mutate, error, match):
    with pytest.raises(error, match=match):
        gpo_pool(*mutate(*_valid()))


def test_backend_errors():
    x, n, w = _valid()
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        gpo_pool(x, n, w, backend="cuda")
    with pytest.raises(TypeError, match="float32/bfloat16/float16 features, got torch.float64"):
        gpo_pool(x.double(), n, w, backend="triton")
    with pytest.raises(ValueError, match="K <= 512, got K=513"):
        gpo_pool(torch.randn(1, 513, 2), torch.tensor([3]), torch.rand(1, 513), backend="triton")


@requires_interpreter
def test_triton_double_backward_raises():
    """The kernel backward is not differentiable: a backward with create_graph=True raises instead of
    returning second-order gradients with terms missing (the torch backend gives them). Under
    ``pooled.sum()`` (a constant incoming gradient) it once returned a gradient cut from the graph: a
    penalty built on it trained without its gradient, silently."""
    x, n, w = _valid()
    x.requires_grad_(), w.requires_grad_()
    for reduce in (lambda p: p.pow(2).sum(), lambda p: p.sum()):
        with pytest.raises(RuntimeError, match=r"gpo_pool\(backend='triton'\) .* use backend='torch'"):
            torch.autograd.grad(reduce(gpo_pool(x, n, w, backend="triton")), x, create_graph=True)
    (gx,) = torch.autograd.grad(gpo_pool(x, n, w, backend="torch").sum(), x, create_graph=True)
    assert gx.requires_grad  # the torch backend is differentiable twice
    (gx,) = torch.autograd.grad(gpo_pool(x, n, w, backend="triton").sum(), x)  # first order: as before
    torch.testing.assert_close(gx, torch.autograd.grad(gpo_pool(x, n, w, backend="torch").sum(), x)[0])


def test_validate_false_skips_only_value_checks():
    x, n, w = _valid()
    gpo_pool(x, torch.tensor([4, 2]), w[:, :4], validate=False)
    with pytest.raises(ValueError, match="batch sizes differ"):
        gpo_pool(x, n[:1], w, validate=False)


def test_validate_false_clamps_out_of_range_lengths_on_the_cpu():
    """validate=False clamps out-of-range lengths to [0, K] (their rows' values are unspecified) and the
    other rows stay right. Without the clamp the CPU torch path, which groups the sets by length with
    torch.bincount, raised on a negative length."""
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    w = torch.rand(3, 4, dtype=torch.float64)
    out = gpo_pool(x, torch.tensor([-3, 2, 7]), w, backend="torch", validate=False)
    assert out.shape == (3, 5)
    torch.testing.assert_close(out[1:2], gpo_pool(x[1:2], torch.tensor([2]), w[1:2], backend="torch"))


# ------------------------------------------------------------------------------------------------- CUDA
CUDA_SHAPES = [(B, K, D) for B in (1, 7, 128) for K in (1, 5, 36, 64, 100) for D in (1, 33, 1024)]


def _by_coverage(cases):
    """The cases in rounds: each round takes one shape of every (kernel family, K), the odd (7, K, 33)
    first, then (128, K, 1024). A time-limited GPU session that stops early has then checked every
    family at every K (each a separate build) rather than the sort kernels alone."""
    groups = {}
    for case in cases:
        groups.setdefault((case[0], case[2]), []).append(case)
    for group in groups.values():
        group.sort(key=lambda c: {(7, 33): 0, (128, 1024): 1}.get((c[1], c[3]), 2))
    return [group[r] for r in range(max(map(len, groups.values()))) for group in groups.values() if r < len(group)]


# (impl, B, K, D): the sort kernels on every shape, the rank and net kernels on the shapes with K <= 64
# plus K = 23 and 200: the 32- and 256-wide blocks (and the 16/32-input networks) no other shape compiles
CUDA_CASES = _by_coverage([("sort", *shape) for shape in CUDA_SHAPES + [(3, 512, 65), (2, 300, 1024), (3, 200, 65)]]
                          + [(impl, B, K, D) for impl in ("rank", "net") for B, K, D in CUDA_SHAPES if K <= 64]
                          + [(impl, 7, 23, 33) for impl in ("sort", "rank", "net")])


@requires_cuda
@pytest.mark.parametrize("major", [7, 8, 9], ids=["unpacked", "fwd-packed", "both-packed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_cuda_net_packed_and_unpacked_paths(poison_empty, monkeypatch, major, dtype):
    """Every PACK_16X2 combination the launcher can pick (as on sm_75/sm_80/sm_90), forced on this GPU
    where it supports them: random inputs with many ties (a 9-value alphabet) and a -0.0 column against
    the float64 reference, then NaN, -inf and -0.0 / +0.0 ties (NaN out, stable ranks in the gradient)."""
    import vse_fast.kernels.gpo_pool as gp

    if major > torch.cuda.get_device_capability()[0]:
        pytest.skip(f"this GPU has no sm_{major}0 packed instructions")
    monkeypatch.setenv(KERNEL_ENV, "net")
    monkeypatch.setattr(gp, "_capability_major", lambda device: major)
    features, lengths, weights = make_inputs(7, 64, 300, dtype, device="cuda", kw_extra=1)
    with torch.no_grad():
        features.copy_(torch.randint(-4, 5, features.shape, device="cuda").to(dtype) / 2)
        features[1, :, 3] = -0.0
    check_against_reference(features, lengths, weights, "triton")
    x, n, w = _nan_and_tie_inputs(dtype)
    x, n, w = (t.detach().cuda().requires_grad_(t.requires_grad) for t in (x, n, w))
    out = gpo_pool(x, n, w, backend="triton")
    assert torch.isnan(out[0, 0]) and not torch.isnan(out[0, 1]) and not torch.isnan(out[1]).any()
    gx, _ = torch.autograd.grad(out, (x, w), torch.ones_like(out))
    expected = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.6, 0.3, 0.1]])
    torch.testing.assert_close(torch.stack([gx[0, :, 0], gx[1, :, 0], gx[1, :, 1]]).float().cpu(), expected,
                               rtol=1e-2, atol=1e-3)


@requires_cuda
def test_auto_backend_picks_triton_on_cuda():
    from vse_fast.ops.gpo_pool import TritonGPOPoolFunction

    features, lengths, weights = make_inputs(2, 5, 8, torch.bfloat16, device="cuda")
    out = gpo_pool(features, lengths, weights)
    assert out.grad_fn is not None and out.grad_fn.__class__.__name__.startswith(TritonGPOPoolFunction.__name__)


@requires_cuda
def test_gpo_pool_path_has_no_host_sync():
    from vse_fast.modules.gpo import GPO

    gpo = GPO(32, 32).cuda()
    features = torch.randn(16, 36, 256, device="cuda", requires_grad=True)
    lengths = torch.randint(1, 37, (16,), device="cuda").float()
    gpo.pool(features, lengths).sum().backward()  # warm-up: compilation, position-encoding cache
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pooled = gpo.pool(features, lengths)
        pooled.backward(torch.randn_like(pooled))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert features.grad is not None and gpo.linear.weight.grad is not None


# The sweep runs after the few tests above (a time-limited GPU session runs tests in file order).
@requires_cuda
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("impl,B,K,D", CUDA_CASES, ids=[f"{i}-B{b}-K{k}-D{d}" for i, b, k, d in CUDA_CASES])
def test_triton_cuda_matches_reference(poison_empty, monkeypatch, impl, B, K, D, dtype):
    monkeypatch.setenv(KERNEL_ENV, impl)
    features, lengths, weights = make_inputs(B, K, D, dtype, device="cuda", kw_extra=K % 3, strided=(B + K) % 2 == 0)
    check_against_reference(features, lengths, weights, "triton")


@pytest.mark.parametrize("value, interpreted", [("1", True), ("true", True), ("On", True), ("0", False),
                                                ("", False), ("false", False), ("2", False)])
def test_triton_interpreting_reads_the_variable_as_triton_does(monkeypatch, value, interpreted):
    """TRITON_INTERPRET means what it means to Triton ("true" interprets, "2" does not), in every op."""
    knobs = pytest.importorskip("triton.knobs")
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert knobs.runtime.interpret is interpreted
    assert triton_interpreting() is interpreted


@requires_interpreter
def test_triton_backend_on_cpu_under_any_interpreter_spelling(monkeypatch):
    """The ops' CPU check follows Triton: TRITON_INTERPRET=true runs the kernels, =false refuses CPU tensors."""
    features, lengths, weights = torch.randn(2, 3, 4), torch.tensor([3, 1]), torch.rand(2, 3)
    monkeypatch.setenv("TRITON_INTERPRET", "true")
    expected = gpo_pool(features, lengths, weights, backend="torch")
    torch.testing.assert_close(gpo_pool(features, lengths, weights, backend="triton"), expected)
    monkeypatch.setenv("TRITON_INTERPRET", "false")
    with pytest.raises(ValueError, match="needs CUDA"):
        gpo_pool(features, lengths, weights, backend="triton")
