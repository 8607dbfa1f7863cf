"""The fused GRU coefficient-table kernels (vse_fast.kernels.gpo_table via GPO(table_backend="triton"))
against the packed-GRU table computed in float64, values and every parameter gradient."""
import os

import pytest
import torch

from tests.conftest import interpreter_only, requires_cuda
from tests.published.gpo import PublishedGPO
from vse_fast.modules.gpo import GPO


def rel_err(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp(min=1e-30)).item()


def make_pair(d_pe, d_hidden, device):
    """(float64 torch-backend GPO on the CPU, fp32 triton-backend GPO on `device`) with equal parameters."""
    reference = GPO(d_pe, d_hidden, table_backend="torch").double()
    fused = GPO(d_pe, d_hidden, table_backend="triton").to(device)
    fused.load_state_dict({k: v.float() for k, v in reference.state_dict().items()})
    return reference, fused


def check_table_and_grads(reference, fused, K, value_tol, grad_tol):
    table = fused._table_over_all_sizes(K)
    expected = reference._table_over_all_sizes(K)
    assert table.shape == (K, K) and table.dtype == next(fused.parameters()).dtype
    assert rel_err(table.cpu(), expected) < value_tol
    upstream = torch.randn(K, K).to(table.dtype).double()  # the values both sides multiply by
    grads = torch.autograd.grad((table * upstream.to(table)).sum(), list(fused.parameters()))
    expected_grads = torch.autograd.grad((expected * upstream).sum(), list(reference.parameters()))
    for (name, _), grad, exp in zip(fused.named_parameters(), grads, expected_grads):
        if K == 1:  # one position: the coefficient is 1 whatever the parameters
            assert torch.count_nonzero(grad) == 0, name
        else:
            assert rel_err(grad.cpu(), exp) < grad_tol, name


# K: 1 (a single step), 2, 16 (exactly one reverse block), 17 and 37 (several blocks, partial last
# block); d_hidden: 32 (default), 20 (padded to 32), 16.
INTERP_CASES = [(1, 32, 32), (2, 8, 16), (16, 32, 16), (17, 32, 32), (37, 32, 20)]


@interpreter_only
@pytest.mark.parametrize("K,d_pe,d_hidden", INTERP_CASES, ids=[f"K{k}-pe{p}-H{h}" for k, p, h in INTERP_CASES])
def test_interpreter_table_matches_float64(K, d_pe, d_hidden, poison_empty):
    reference, fused = make_pair(d_pe, d_hidden, "cpu")
    check_table_and_grads(reference, fused, K, 1e-5, 1e-5)


@interpreter_only
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)], ids=["bf16", "fp16"])
def test_interpreter_table_of_16_bit_parameters_matches_float64(dtype, tol, poison_empty):
    """16-bit GPO parameters (a model cast with .half()/.bfloat16()) are read exactly and the table is
    computed in float32; the table and the gradients come back in their dtype (one rounding each)."""
    reference, fused = make_pair(32, 32, "cpu")
    fused = fused.to(dtype)
    reference.load_state_dict({k: v.double() for k, v in fused.state_dict().items()})  # the rounded values
    check_table_and_grads(reference, fused, 17, tol, tol)
    assert all(p.dtype == dtype for p in fused.parameters())


@interpreter_only
def test_interpreter_module_matches_published():
    """Drop-in forward and the no-sync pool with the Triton table equal the published module in fp32."""
    published = PublishedGPO(32, 32)
    ours = GPO(32, 32, table_backend="triton")
    ours.load_state_dict(published.state_dict(), strict=True)
    B, K, D = 6, 19, 5
    lengths = torch.tensor([19, 1, 7, 12, 19, 3]).float()
    features = torch.randn(B, K, D)
    x_pub, x_ours = features.clone().requires_grad_(), features.clone().requires_grad_()
    pooled_pub, weights_pub = published(x_pub, lengths)
    pooled_ours, weights_ours = ours(x_ours, lengths)
    assert weights_ours.shape == weights_pub.shape
    assert rel_err(weights_ours, weights_pub) < 1e-5 and rel_err(pooled_ours, pooled_pub) < 1e-5
    assert rel_err(ours.pool(features, lengths), pooled_pub) < 1e-5
    g = torch.randn(B, D)
    pooled_pub.backward(g)
    pooled_ours.backward(g)
    assert rel_err(x_ours.grad, x_pub.grad) < 1e-5
    params_pub = dict(published.named_parameters())
    for name, p in ours.named_parameters():
        assert rel_err(p.grad, params_pub[name].grad) < 1e-5, name


@interpreter_only
def test_interpreter_table_ignores_autocast():
    _, fused = make_pair(32, 32, "cpu")
    plain = fused._table_over_all_sizes(9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = fused._table_over_all_sizes(9)
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, plain, rtol=0, atol=0)


def test_table_backend_errors(monkeypatch):
    with pytest.raises(ValueError, match="table_backend"):
        GPO(32, 32, table_backend="cuda")
    features, lengths = torch.randn(2, 3, 4), torch.tensor([3, 1])
    with pytest.raises(ValueError, match="d_hidden <= 32"):
        GPO(32, 128, table_backend="triton").pool(features, lengths)
    with pytest.raises(TypeError, match="float32/bfloat16/float16"):
        GPO(32, 32, table_backend="triton").double().pool(features.double(), lengths)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            GPO(32, 32, table_backend="triton").pool(features, lengths)


def test_auto_uses_torch_table_on_cpu():
    """auto on CPU parameters is the packed-GRU path, bitwise equal to table_backend='torch'."""
    auto, plain = GPO(32, 32), GPO(32, 32, table_backend="torch")
    plain.load_state_dict(auto.state_dict())
    torch.testing.assert_close(auto._table_over_all_sizes(7), plain._table_over_all_sizes(7), rtol=0, atol=0)


@requires_cuda
@pytest.mark.parametrize("K", [1, 5, 16, 36, 64, 100])
@pytest.mark.parametrize("d_hidden", [32, 20, 16])
def test_cuda_table_matches_float64(K, d_hidden):
    reference, fused = make_pair(32, d_hidden, "cuda")
    check_table_and_grads(reference, fused, K, 2e-5, 2e-5)


@requires_cuda
def test_cuda_table_no_host_sync():
    _, fused = make_pair(32, 32, "cuda")
    features = torch.randn(8, 36, 64, device="cuda", requires_grad=True)
    lengths = torch.randint(1, 37, (8,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused.pool(features, lengths).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(p.grad is not None for p in fused.parameters())


@interpreter_only
def test_interpreter_table_refuses_create_graph():
    """The table's kernel backward is differentiable once: under create_graph=True it raises rather
    than hand back parameter gradients cut from the graph (the torch table is differentiable twice)."""
    reference, fused = make_pair(8, 16, "cpu")
    with pytest.raises(RuntimeError, match=r"coefficient table \(table_backend='triton'\) .* backend='torch'"):
        torch.autograd.grad(fused._table_over_all_sizes(3).sum(), list(fused.parameters()), create_graph=True)
    grads = torch.autograd.grad(reference._table_over_all_sizes(3).pow(2).sum(), list(reference.parameters()),
                                create_graph=True)
    assert all(g.requires_grad for g in grads)
