"""Without the triton package (macOS, Windows, a CUDA torch that did not pull it in): "auto" takes the
torch paths and says so once; an explicit Triton backend is a ValueError naming the package. Both
were a bare ModuleNotFoundError from inside the op."""
import warnings

import pytest
import torch

import vse_fast.kernels
from vse_fast.modules.gpo import GPO
from vse_fast.ops.contrastive import contrastive_loss
from vse_fast.ops.gpo_pool import gpo_pool


@pytest.fixture
def no_triton(monkeypatch):
    monkeypatch.setattr(vse_fast.kernels, "HAS_TRITON", False)
    monkeypatch.setattr(vse_fast.kernels, "_warned_no_triton", [])


def test_an_explicit_triton_backend_names_the_missing_package(no_triton):
    x, n, w = torch.randn(2, 3, 4), torch.tensor([3, 1]), torch.rand(2, 3)
    with pytest.raises(ValueError, match=r"gpo_pool\(backend='triton'\) needs the triton package"):
        gpo_pool(x, n, w, backend="triton")
    with pytest.raises(ValueError, match=r"contrastive_loss\(backend='triton'\) needs the triton package"):
        contrastive_loss(torch.randn(3, 4), torch.randn(3, 4), backend="triton")
    with pytest.raises(ValueError, match=r"table_backend='triton' needs the triton package"):
        GPO(8, 8, table_backend="triton").pool(x, n)


def test_auto_is_told_to_take_torch_and_warns_once(no_triton):
    """triton_for_auto is what "auto" asks before it takes a kernel for CUDA tensors (not runnable here:
    CPU tensors take torch whatever is installed, as the last lines check)."""
    with pytest.warns(UserWarning, match="triton package is not installed: CUDA tensors take vse_fast's torch"):
        assert vse_fast.kernels.triton_for_auto() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert vse_fast.kernels.triton_for_auto() is False
        x, n, w = torch.randn(2, 3, 4), torch.tensor([3, 1]), torch.rand(2, 3)
        torch.testing.assert_close(gpo_pool(x, n, w), gpo_pool(x, n, w, backend="torch"))
