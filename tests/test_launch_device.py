"""Triton launches on the current CUDA device (and its stream), not on its arguments' device: every
Triton autograd Function makes its inputs' device current around its launches, forward and backward
(a loss or GPO on cuda:1 in a single process ran on cuda:0 against cuda:1 memory)."""
import contextlib

import pytest
import torch

import vse_fast.kernels
from tests.conftest import interpreter_only
from vse_fast.modules.gpo import GPO
from vse_fast.ops.contrastive import contrastive_loss
from vse_fast.ops.gpo_pool import gpo_pool


@pytest.fixture
def entered(monkeypatch):
    """The tensors whose device each launch_device call made current, in call order."""
    calls = []

    def recording(tensor):
        calls.append(tensor)
        return contextlib.nullcontext()

    monkeypatch.setattr(vse_fast.kernels, "launch_device", recording)
    return calls


def test_launch_device_is_a_no_op_off_cuda():
    with vse_fast.kernels.launch_device(torch.zeros(1)):
        pass


@interpreter_only
def test_gpo_pool_launches_on_its_inputs_device(entered):
    x = torch.randn(3, 4, 5, requires_grad=True)
    w = torch.rand(3, 4, requires_grad=True)
    gpo_pool(x, torch.tensor([4, 1, 2]), w, backend="triton").sum().backward()
    assert len(entered) == 2 and all(t.device == x.device and t.shape == x.shape for t in entered)


@interpreter_only
def test_gpo_table_launches_on_its_inputs_device(entered):
    gpo = GPO(8, 16, table_backend="triton")
    gpo._table_over_all_sizes(3).sum().backward()
    assert len(entered) == 2 and all(t.device.type == "cpu" for t in entered)


@interpreter_only
@pytest.mark.parametrize("B", [4, 20], ids=["small-path", "fused-path"])
@pytest.mark.parametrize("max_violation", [False, True], ids=["vse0", "vsepp"])
def test_contrastive_loss_launches_on_its_inputs_device(entered, B, max_violation):
    im, s = torch.randn(B, 8, requires_grad=True), torch.randn(B, 8, requires_grad=True)
    contrastive_loss(im, s, 0.2, max_violation, backend="triton").backward()
    assert len(entered) == 2 and all(t.device == im.device for t in entered)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_triton_ops_on_the_second_gpu_equal_the_cpu():
    torch.manual_seed(0)
    x, w = torch.randn(5, 7, 9), torch.rand(5, 7)
    lengths = torch.tensor([7, 1, 3, 5, 2])
    im, s = torch.randn(40, 16), torch.randn(40, 16)
    with torch.cuda.device(0):
        dev = torch.device("cuda:1")
        pooled = gpo_pool(x.to(dev), lengths.to(dev), w.to(dev), backend="triton")
        loss = contrastive_loss(im.to(dev), s.to(dev), 0.2, True, backend="triton")
    torch.testing.assert_close(pooled.cpu(), gpo_pool(x, lengths, w, backend="torch"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.cpu(), contrastive_loss(im, s, 0.2, True, backend="torch"), rtol=1e-4, atol=1e-4)
