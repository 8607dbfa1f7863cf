"""Contrastive loss (VSE0 / VSE++): drop-in parity with the published module, torch and Triton
paths against a float64 reference (values, gradients under a random upstream gradient, hardest
indices), positives with duplicates, rectangular and single-row batches, NaN/inf, input errors.
Triton runs under the interpreter on CPU (tiny shapes) and compiled on CUDA."""
import pytest
import torch

from tests.conftest import DTYPE_TOLERANCES, interpreter_only, requires_cuda
from tests.published.loss import PublishedContrastiveLoss
from vse_fast.modules.loss import ContrastiveLoss
from vse_fast.ops.contrastive import contrastive_loss, contrastive_loss_naive

MODES = [pytest.param(False, id="vse0"), pytest.param(True, id="vsepp")]


def _inputs(N, M, D, dtype, device="cpu", positives=False, noncontig=False):
    if noncontig:  # feature stride 2 for im, transposed storage for s
        im = torch.randn(N, 2 * D, device=device).to(dtype)[:, ::2]
        s = torch.randn(D, M, device=device).to(dtype).t()
        assert not im.is_contiguous() and not s.is_contiguous()
    else:
        im = torch.randn(N, D, device=device).to(dtype)
        s = torch.randn(M, D, device=device).to(dtype)
    pos = None
    if positives:  # every image used once, the rest duplicates: captions of one image are not negatives
        if M >= N:
            pos = torch.cat([torch.randperm(N, device=device), torch.randint(0, N, (M - N,), device=device)])
            pos = pos[torch.randperm(M, device=device)]
        else:
            pos = torch.randint(0, N, (M,), device=device)
    return im.requires_grad_(), s.requires_grad_(), pos


def _loss_and_grads(fn, im, s, upstream):
    out = fn(im, s)
    loss, extra = out if isinstance(out, tuple) else (out, None)
    dim, ds = torch.autograd.grad(loss * upstream, (im, s))
    return loss.detach(), dim, ds, extra


def _reference(im, s, upstream, **kw):
    im64 = im.detach().double().requires_grad_()
    s64 = s.detach().double().requires_grad_()
    return _loss_and_grads(lambda a, b: contrastive_loss_naive(a, b, **kw), im64, s64, upstream.double())


def _assert_close(actual, expected, dtype):
    atol, rtol = DTYPE_TOLERANCES.get(dtype, (1e-9, 1e-9))
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual.double(), expected, atol=atol * scale, rtol=rtol)


def _assert_grad_close(actual, expected, dtype, other):
    """Gradients: a hinge within rounding of 0 (VSE0) or two near-equal top similarities (VSE++)
    can decide differently in fp32 than in fp64; such a flip moves at most two rows of a gradient by
    at most 2 * max|other input|. With >= 100 rows, allow 2 + rows // 100 such rows; else none."""
    atol, rtol = DTYPE_TOLERANCES.get(dtype, (1e-9, 1e-9))
    scale = max(1.0, float(expected.abs().max()))
    err = (actual.double() - expected).abs()
    bad = (err > atol * scale + rtol * expected.abs()).any(1)
    allowed = 2 + expected.shape[0] // 100 if expected.shape[0] >= 100 else 0
    if int(bad.sum()) > allowed:
        _assert_close(actual, expected, dtype)  # fails with torch's report
    if bad.any():
        assert float(err[bad].max()) <= 2.5 * float(other.detach().abs().max()) + atol * scale


def _check_against_reference(N, M, D, dtype, max_violation, *, positives=False, terms="both", reduction="sum",
                             backend="torch", device="cpu", noncontig=False, margin=0.2):
    im, s, pos = _inputs(N, M, D, dtype, device, positives, noncontig)
    upstream = torch.randn((), device=device)
    kw = dict(margin=margin, max_violation=max_violation, positives=pos, terms=terms, reduction=reduction)
    loss, dim, ds, idx = _loss_and_grads(
        lambda a, b: contrastive_loss(a, b, **kw, backend=backend, return_indices=max_violation), im, s, upstream)
    ref_loss, ref_dim, ref_ds, ref_idx = _reference(im, s, upstream, **kw)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert dim.dtype == dtype and ds.dtype == dtype and dim.shape == im.shape and ds.shape == s.shape
    _assert_close(loss, ref_loss, dtype)
    _assert_grad_close(dim, ref_dim, dtype, s)
    _assert_grad_close(ds, ref_ds, dtype, im)
    if max_violation:
        assert set(idx) == set(ref_idx) and all(idx[t].dtype == torch.int64 for t in idx)
    if max_violation and dtype in (torch.float32, torch.float64):  # 16-bit: near-ties may reorder
        for term in idx:  # fp32: a near-tie may pick the other index (as in the gradient check)
            mismatches = int((idx[term] != ref_idx[term]).sum())
            assert mismatches <= (0 if M < 100 else 1 + M // 100), (term, mismatches)


# ------------------------------------------------------------------------------------- drop-in parity


@pytest.mark.parametrize("max_violation", MODES)
@pytest.mark.parametrize("B,D", [(1, 8), (2, 3), (7, 33), (64, 40)], ids=lambda v: str(v))
def test_dropin_matches_published(B, D, max_violation):
    im, s, _ = _inputs(B, B, D, torch.float32)
    upstream = torch.randn(())
    opt = type("Opt", (), {"margin": 0.2, "max_violation": max_violation})()
    published = PublishedContrastiveLoss(opt=opt, margin=opt.margin, max_violation=opt.max_violation)
    for ours in (ContrastiveLoss(opt=opt, margin=opt.margin, max_violation=opt.max_violation),
                 ContrastiveLoss(opt, opt.margin, opt.max_violation)):
        assert ours.max_violation is max_violation and ours.margin == 0.2 and ours.opt is opt
        got = _loss_and_grads(ours, im, s, upstream)[:3]
        want = _loss_and_grads(published, im, s, upstream)[:3]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, float(b.abs().max())), rtol=1e-5)


def test_dropin_switches_and_defaults(capsys):
    im, s, _ = _inputs(9, 9, 5, torch.float32)
    ours, published = ContrastiveLoss(None), PublishedContrastiveLoss(None)
    assert ours.margin == 0 and ours.max_violation is False
    for switch in ("max_violation_on", "max_violation_off", "max_violation_on"):
        getattr(ours, switch)()
        getattr(published, switch)()
        assert ours.max_violation is published.max_violation
        torch.testing.assert_close(ours(im, s), published(im, s), atol=1e-5, rtol=1e-5)
    assert "Use VSE++ objective." in capsys.readouterr().out
    mean = ContrastiveLoss(None, 0.2, True, reduction="mean")(im, s)
    torch.testing.assert_close(mean * 9, ContrastiveLoss(None, 0.2, True)(im, s))


# ------------------------------------------------------------------------------------- torch path


TORCH_CASES = [
    pytest.param(7, 7, 13, False, id="N7-M7-D13"),
    pytest.param(5, 11, 9, True, id="N5-M11-D9-pos"),  # duplicates: two captions per image
    pytest.param(1, 1, 4, False, id="N1-M1"),
    pytest.param(1, 5, 3, True, id="N1-M5-pos"),  # no negative image at all
    pytest.param(6, 1, 3, True, id="N6-M1-pos"),
    pytest.param(31, 31, 1, False, id="N31-D1"),
]


@pytest.mark.parametrize("max_violation", MODES)
@pytest.mark.parametrize("N,M,D,positives", TORCH_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
def test_torch_path_matches_reference(N, M, D, positives, dtype, max_violation):
    _check_against_reference(N, M, D, dtype, max_violation, positives=positives)


@pytest.mark.parametrize("max_violation", MODES)
@pytest.mark.parametrize("terms", ["i2t", "t2i"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_torch_path_terms_and_reduction(terms, reduction, max_violation):
    _check_against_reference(6, 10, 7, torch.float64, max_violation, positives=True, terms=terms, reduction=reduction)


@pytest.mark.parametrize("max_violation", MODES)
@pytest.mark.parametrize("positives", [False, True], ids=["diag", "pos"])
def test_torch_path_gradcheck(max_violation, positives):
    im, s, pos = _inputs(5, 8 if positives else 5, 4, torch.float64, positives=positives)
    assert torch.autograd.gradcheck(
        lambda a, b: contrastive_loss(a, b, 0.3, max_violation, positives=pos, backend="torch"), (im, s))


@pytest.mark.parametrize("max_violation", MODES)
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter_only)])
def test_terms_identity(backend, max_violation):
    """loss_both(im, s) == loss_t2i(im, s) + loss_t2i(s, im): the distributed helper relies on it."""
    im, s, _ = _inputs(9, 9, 17, torch.float32)
    upstream = torch.randn(())

    def split(a, b):
        kw = dict(margin=0.2, max_violation=max_violation, terms="t2i", reduction="mean", backend=backend)
        return contrastive_loss(a, b, **kw) + contrastive_loss(b, a, **kw)

    both = _loss_and_grads(lambda a, b: contrastive_loss(a, b, 0.2, max_violation, reduction="mean",
                                                         backend=backend), im, s, upstream)
    summed = _loss_and_grads(split, im, s, upstream)
    for a, b in zip(both[:3], summed[:3]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_positives_none_equals_arange():
    im, s, _ = _inputs(8, 8, 6, torch.float64)
    for mv in (False, True):
        a = contrastive_loss(im, s, 0.2, mv, backend="torch")
        b = contrastive_loss(im, s, 0.2, mv, positives=torch.arange(8), backend="torch")
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------- NaN / inf


NONFINITE = [
    pytest.param("im", 2, float("nan"), False, id="nan-im"),
    pytest.param("s", 4, float("inf"), False, id="inf-s"),
    pytest.param("s", 0, float("-inf"), True, id="neginf-s-pos"),
    pytest.param("im", 5, float("-inf"), True, id="neginf-unused-image"),  # image 5 is no positive
]


def _nonfinite_case(where, row, value, positives, device="cpu"):
    im = torch.randn(6, 8, device=device)
    s = torch.randn(6, 8, device=device)
    (im if where == "im" else s)[row, 3] = value
    pos = torch.tensor([0, 1, 2, 3, 4, 0], device=device) if positives else None
    return im, s, pos


def _assert_nonfinite(im, s, pos, backend):
    for mv in (False, True):
        for terms in ("both", "i2t", "t2i"):
            loss = contrastive_loss(im, s, 0.2, mv, positives=pos, terms=terms, backend=backend)
            assert not torch.isfinite(loss), (mv, terms, loss)


@pytest.mark.parametrize("where,row,value,positives", NONFINITE)
def test_nonfinite_inputs_give_nonfinite_loss_torch(where, row, value, positives):
    _assert_nonfinite(*_nonfinite_case(where, row, value, positives), "torch")


@interpreter_only
@pytest.mark.parametrize("where,row,value,positives", NONFINITE)
def test_nonfinite_inputs_give_nonfinite_loss_triton(where, row, value, positives):
    _assert_nonfinite(*_nonfinite_case(where, row, value, positives), "triton")


# ------------------------------------------------------------------------------------- errors


def _error_cases():
    im, s = torch.randn(4, 3), torch.randn(4, 3)
    return [
        ("list", dict(im=[[1.0]]), TypeError, "im must be a torch.Tensor"),
        ("int", dict(im=torch.ones(4, 3, dtype=torch.int64)), TypeError, "dtype torch.int64"),
        ("rank", dict(s=torch.randn(4, 3, 1)), ValueError, r"2-D .* \(4, 3, 1\)"),
        ("D", dict(s=torch.randn(4, 5)), ValueError, "same feature size"),
        ("dtype", dict(s=s.double()), TypeError, "same dtype"),
        ("empty", dict(im=torch.randn(0, 3), s=torch.randn(0, 3)), ValueError, "at least one row"),
        ("NneM", dict(s=torch.randn(5, 3)), ValueError, "4 rows and s has 5"),
        ("pos-dtype", dict(positives=torch.arange(4, dtype=torch.int32)), TypeError, "int64"),
        ("pos-shape", dict(positives=torch.arange(3)), ValueError, r"shape \(4,\)"),
        ("pos-range", dict(positives=torch.tensor([0, 1, 4, -1])), ValueError, r"\[0, 4\).*\[4, -1\]"),
        ("pos-type", dict(positives=[0, 1, 2, 3]), TypeError, "positives must be a torch.Tensor"),
        ("reduction", dict(reduction="avg"), ValueError, "'avg'"),
        ("terms", dict(terms="all"), ValueError, "'all'"),
        ("backend", dict(backend="cuda"), ValueError, "'cuda'"),
        ("margin", dict(margin=torch.tensor(0.2)), TypeError, "margin"),
        ("margin-nan", dict(margin=float("nan")), ValueError, "finite"),
        ("mv", dict(max_violation=1), TypeError, "bool"),
        ("indices-vse0", dict(return_indices=True), ValueError, "max_violation=True"),
        ("triton-fp64", dict(im=im.double(), s=s.double(), backend="triton"), TypeError, "float64"),
    ]


@pytest.mark.parametrize("case", _error_cases(), ids=lambda c: c[0])
def test_errors_name_the_problem(case):
    _, overrides, exc, match = case
    kw = dict(im=torch.randn(4, 3), s=torch.randn(4, 3), margin=0.2, max_violation=False)
    kw.update(overrides)
    im, s = kw.pop("im"), kw.pop("s")
    with pytest.raises(exc, match=match):
        contrastive_loss(im, s, **kw)


def test_error_on_different_devices():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU for a second device")
    with pytest.raises(ValueError, match="same device"):
        contrastive_loss(torch.randn(4, 3), torch.randn(4, 3, device="cuda"))


# ------------------------------------------------------------------------------------- Triton (interpreter)


INTERP_CASES = [
    pytest.param(37, 37, 40, False, False, id="N37-D40"),
    pytest.param(13, 29, 19, True, False, id="N13-M29-D19-pos"),
    pytest.param(20, 20, 17, False, True, id="N20-D17-noncontig"),
    pytest.param(1, 1, 5, False, False, id="N1"),
    pytest.param(1, 6, 5, True, False, id="N1-M6-pos"),
]


@interpreter_only
@pytest.mark.parametrize("max_violation", MODES)
@pytest.mark.parametrize("N,M,D,positives,noncontig", INTERP_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_triton_interpreter_matches_reference(N, M, D, positives, noncontig, dtype, max_violation, poison_empty):
    if dtype != torch.float32 and N == 1:
        pytest.skip("single-row shapes are covered in fp32")
    _check_against_reference(N, M, D, dtype, max_violation, positives=positives, noncontig=noncontig,
                             backend="triton")


@interpreter_only
@pytest.mark.parametrize("max_violation", MODES)
@pytest.mark.parametrize("terms,reduction", [("i2t", "mean"), ("t2i", "sum")])
def test_triton_interpreter_terms(terms, reduction, max_violation, poison_empty):
    _check_against_reference(11, 23, 16, torch.float32, max_violation, positives=True, terms=terms,
                             reduction=reduction, backend="triton")


@interpreter_only
def test_triton_interpreter_matches_torch_path():
    im, s, pos = _inputs(17, 30, 24, torch.float32, positives=True)
    for mv in (False, True):
        a = contrastive_loss(im, s, 0.25, mv, positives=pos, backend="triton")
        b = contrastive_loss(im, s, 0.25, mv, positives=pos, backend="torch")
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------- CUDA


CUDA_CASES = [(1, 1, 1), (7, 7, 33), (129, 129, 1024), (1000, 1000, 33), (300, 1000, 64)]


@requires_cuda
@pytest.mark.parametrize("max_violation", MODES)
@pytest.mark.parametrize("N,M,D", CUDA_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cuda_triton_matches_reference(N, M, D, dtype, max_violation, poison_empty):
    _check_against_reference(N, M, D, dtype, max_violation, positives=N != M, backend="triton", device="cuda")


@requires_cuda
@pytest.mark.parametrize("max_violation", MODES)
def test_cuda_triton_noncontiguous_and_terms(max_violation):
    _check_against_reference(257, 257, 96, torch.bfloat16, max_violation, noncontig=True, backend="triton",
                             device="cuda")
    _check_against_reference(100, 333, 65, torch.float32, max_violation, positives=True, terms="t2i",
                             reduction="mean", backend="triton", device="cuda")


@requires_cuda
@pytest.mark.parametrize("where,row,value,positives", NONFINITE)
def test_cuda_nonfinite_inputs(where, row, value, positives):
    _assert_nonfinite(*_nonfinite_case(where, row, value, positives, device="cuda"), "triton")


@requires_cuda
@pytest.mark.parametrize("max_violation", MODES)
@pytest.mark.parametrize("positives", [False, True], ids=["diag", "pos"])
def test_cuda_no_host_sync(max_violation, positives):
    im, s, pos = _inputs(300, 300, 64, torch.bfloat16, "cuda", positives)

    def step():
        loss = contrastive_loss(im, s, 0.2, max_violation, positives=pos)
        loss.backward()

    step()  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
