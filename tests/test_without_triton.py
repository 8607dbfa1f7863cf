"""Without the triton package (macOS, Windows, a CUDA torch that did not pull it in), or with one older
than the kernels need: "auto" takes the torch paths and says so once; an explicit Triton backend is a
ValueError naming the package or its version. Without the package both were a bare
ModuleNotFoundError from inside the op; under Triton 3.3 the sort pool gave wrong sums, 3.2 aborted in the loss."""
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


def _each_explicit_triton_backend_raises(reason):
    """gpo_pool, contrastive_loss and the GPO table, each asked for backend 'triton': a ValueError
    naming the call, then `reason` (a regex)."""
    x, n, w = torch.randn(2, 3, 4), torch.tensor([3, 1]), torch.rand(2, 3)
    with pytest.raises(ValueError, match=r"gpo_pool\(backend='triton'\) needs " + reason):
        gpo_pool(x, n, w, backend="triton")
    with pytest.raises(ValueError, match=r"contrastive_loss\(backend='triton'\) needs " + reason):
        contrastive_loss(torch.randn(3, 4), torch.randn(3, 4), backend="triton")
    with pytest.raises(ValueError, match=r"table_backend='triton' needs " + reason):
        GPO(8, 8, table_backend="triton").pool(x, n)


def test_an_explicit_triton_backend_names_the_missing_package(no_triton):
    _each_explicit_triton_backend_raises("the triton package")


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


@pytest.fixture
def triton_version(monkeypatch):
    """Sets the version the installed triton reports (vse_fast.kernels asks it once per process)."""
    import triton

    monkeypatch.setattr(vse_fast.kernels, "_warned_no_triton", [])

    def set_version(version):
        monkeypatch.setattr(triton, "__version__", version)
        vse_fast.kernels.triton_too_old.cache_clear()

    yield set_version
    vse_fast.kernels.triton_too_old.cache_clear()


@pytest.mark.parametrize("version, too_old", [("3.3.1", True), ("3.2.0+rocm6.2", True), ("2.3.1", True),
                                              ("3.4.0", False), ("3.5.1", False), ("3.10.0", False),
                                              ("4.0.0", False), ("3.9.0+git1a2b3c", False)])
def test_the_triton_version_is_compared_as_numbers(triton_version, version, too_old):
    triton_version(version)
    assert vse_fast.kernels.triton_too_old() == (version if too_old else "")


def test_a_triton_older_than_the_kernels_need_is_named(triton_version):
    triton_version("3.3.1")
    _each_explicit_triton_backend_raises(r"triton >= 3\.4, found triton 3\.3\.1")
    with pytest.warns(UserWarning, match=r"triton 3\.3\.1 is older than 3\.4, the oldest release vse_fast's kernels "
                                         r"run on: CUDA tensors take vse_fast's torch paths"):
        assert vse_fast.kernels.triton_for_auto() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert vse_fast.kernels.triton_for_auto() is False
    triton_version("3.4.0")
    assert vse_fast.kernels.triton_for_auto() is True
