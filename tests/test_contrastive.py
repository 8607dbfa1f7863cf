"""Contrastive loss (VSE0 / VSE++): drop-in parity with the published module, torch and Triton
paths against a float64 reference (values, gradients under a random upstream gradient, hardest
indices), positives with duplicates, rectangular and single-row batches, NaN/inf, input errors.
Triton runs under the interpreter on CPU (tiny shapes) and compiled on CUDA; its three paths ("small":
one program, "fused": both terms from one pass over S, "terms": per term) against the reference, each
other, exact ties (integer inputs) and the VSE0 backward in row chunks."""
import functools

import numpy as np
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


def _unstable_rows(im, s, upstream, kw):
    """(rows of d im, rows of d s) whose float64 reference gradient jumps when the margin moves by
    1e-5 or the inputs by 1e-5 of their size: a hinge within float32 rounding of 0 (VSE0) or two
    near-equal hardest negatives (VSE++), which fp32 may decide the other way. Seeded noise. On the
    CPU, whatever the inputs' device: the row masks and the noise are CPU tensors."""
    im, s, upstream = im.detach().cpu(), s.detach().cpu(), upstream.detach().cpu()
    kw = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    base = _reference(im, s, upstream, **kw)[1:3]
    generator = torch.Generator().manual_seed(0)
    moved = [torch.zeros(g.shape[0], dtype=torch.bool) for g in base]
    variants = [(im, s, dict(kw, margin=kw["margin"] + d)) for d in (-1e-5, 1e-5)]
    for _ in range(4):
        noise = [1e-5 * float(x.detach().abs().max()) * torch.randn(x.shape, generator=generator, dtype=torch.float64)
                 for x in (im, s)]
        variants.append((im.detach().double() + noise[0], s.detach().double() + noise[1], kw))
    for a, b, kwv in variants:
        for rows, g, g0 in zip(moved, _reference(a, b, upstream, **kwv)[1:3], base):
            rows |= ((g - g0).abs() > 1e-3 * max(1.0, float(g0.abs().max()))).any(1)
    return moved


def _assert_grad_close(actual, expected, dtype, other, unstable=None):
    """Gradients: a hinge within rounding of 0 (VSE0) or two near-equal top similarities (VSE++)
    can decide differently in fp32 than in fp64; such a flip moves at most two rows of a gradient by
    at most 2 * max|other input|. With >= 100 rows, allow 2 + rows // 100 such rows; with fewer, only
    the rows that ``unstable()`` (a bool row mask, computed when needed) finds at such a decision."""
    atol, rtol = DTYPE_TOLERANCES.get(dtype, (1e-9, 1e-9))
    scale = max(1.0, float(expected.abs().max()))
    assert torch.isfinite(actual).all(), "a non-finite gradient (an unwritten, poisoned element?)"
    err = (actual.double() - expected).abs()
    bad = (~(err <= atol * scale + rtol * expected.abs())).any(1)  # ~(<=): a NaN error is bad
    allowed = 2 + expected.shape[0] // 100 if expected.shape[0] >= 100 else 0
    if int(bad.sum()) > allowed and unstable is not None:
        bad &= ~unstable().to(bad.device)
    if int(bad.sum()) > allowed:
        _assert_close(actual, expected, dtype)  # fails with torch's report
    if bad.any():
        assert float(err[bad].max()) <= 2.5 * float(other.detach().abs().max()) + atol * scale


def _assert_grads_close(got, ref, dtype, im, s, upstream, kw):
    """_assert_grad_close on (loss, d im, d s, ...) against the float64 reference's, each allowed the
    rows _unstable_rows finds (computed once, on a mismatch only)."""
    unstable = functools.lru_cache(None)(lambda: _unstable_rows(im, s, upstream, kw))
    _assert_grad_close(got[1], ref[1], dtype, s, lambda: unstable()[0])
    _assert_grad_close(got[2], ref[2], dtype, im, lambda: unstable()[1])


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
    # the loss is float32 from the same 16-bit values the reference reads: float32 accuracy for every dtype
    _assert_close(loss, ref_loss, torch.float64 if dtype == torch.float64 else torch.float32)
    unstable = functools.lru_cache(None)(lambda: _unstable_rows(im, s, upstream, kw))
    _assert_grad_close(dim, ref_dim, dtype, s, lambda: unstable()[0])
    _assert_grad_close(ds, ref_ds, dtype, im, lambda: unstable()[1])
    if max_violation:
        assert set(idx) == set(ref_idx) and all(idx[t].dtype == torch.int64 for t in idx)
    if max_violation:  # S is float32 from the inputs' values in every dtype, so 16-bit inputs tie as fp32 do
        image_of = (pos if pos is not None else torch.arange(M, device=idx["i2t" if "i2t" in idx else "t2i"].device))
        for term in idx:  # a near-tie may pick the other index (as in the gradient check), per caption
            mismatches = idx[term] != ref_idx[term]
            limit = 0 if M < 100 else 1 + M // 100
            if int(mismatches.sum()) > limit:
                rows = unstable()[0][image_of.cpu()] if term == "i2t" else unstable()[1]
                mismatches &= ~rows.to(mismatches.device)
            assert int(mismatches.sum()) <= limit, (term, int(mismatches.sum()))


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


@pytest.mark.parametrize("kw,exc,match", [
    (dict(margin="0.2"), TypeError, "margin must be a real number.*str '0.2'"),
    (dict(margin=None), TypeError, "margin must be a real number.*NoneType"),
    (dict(margin=True), TypeError, "margin must be a real number.*bool"),
    (dict(margin=torch.ones(2)), TypeError, r"margin must be a real number, got a tensor of shape \(2,\)"),
    (dict(margin=float("nan")), ValueError, "margin must be finite and within the float32 range, got nan"),
    (dict(margin=float("inf")), ValueError, "margin must be finite and within the float32 range, got inf"),
    (dict(margin=10**400), ValueError, r"within the float32 range, got 1000.*\(401 digits\)"),
    (dict(margin=torch.tensor(0.2, requires_grad=True)), ValueError, "margin is a tensor that requires grad"),
    (dict(max_violation="False"), TypeError, "max_violation must be a bool, got str 'False'"),
    (dict(max_violation=1), TypeError, "max_violation must be a bool, got int 1"),
    (dict(max_violation=None), TypeError, "max_violation must be a bool"),
    (dict(reduction="avg"), ValueError, "reduction must be one of .*'avg'"),
    (dict(backend="cuda"), ValueError, "backend must be one of .*'cuda'"),
], ids=["margin-str", "margin-None", "margin-bool", "margin-vector", "margin-nan", "margin-inf", "margin-huge",
        "margin-requires-grad", "mv-str", "mv-int", "mv-None", "reduction", "backend"])
def test_dropin_constructor_validates(kw, exc, match):
    """Checked at construction: a string max_violation is not read as truthy, "0.2" is no margin."""
    with pytest.raises(exc, match=match):
        ContrastiveLoss(None, **kw)


def test_dropin_constructor_accepts_numeric_scalars():
    import argparse

    import numpy as np

    im, s, _ = _inputs(6, 6, 5, torch.float32)
    opt = argparse.Namespace(margin=0.2, max_violation=True)  # the published call
    want = ContrastiveLoss(opt=opt, margin=opt.margin, max_violation=opt.max_violation)(im, s)
    for margin, mv in ((torch.tensor(0.2), True), (np.float64(0.2), np.bool_(True))):
        loss = ContrastiveLoss(None, margin, mv)
        assert type(loss.margin) is float and loss.max_violation is True
        torch.testing.assert_close(loss(im, s), want, atol=1e-6, rtol=1e-6)
    loss = ContrastiveLoss(None, 0.2)
    loss.max_violation = "yes"  # reassigned after construction: checked by contrastive_loss
    with pytest.raises(TypeError, match="max_violation must be a bool"):
        loss(im, s)


def test_dropin_switches_and_defaults(capsys):
    im, s, _ = _inputs(9, 9, 5, torch.float32)
    ours, published = ContrastiveLoss(None), PublishedContrastiveLoss(None)
    assert ours.margin == 0 and ours.max_violation is False
    for switch in ("max_violation_on", "max_violation_off", "max_violation_on"):
        getattr(ours, switch)()
        printed = capsys.readouterr().out  # ours alone: the published module prints the same lines
        assert printed == ("Use VSE++ objective.\n" if switch.endswith("on") else "Use VSE0 objective.\n")
        getattr(published, switch)()
        assert capsys.readouterr().out == printed
        assert ours.max_violation is published.max_violation
        torch.testing.assert_close(ours(im, s), published(im, s), atol=1e-5, rtol=1e-5)
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
@pytest.mark.parametrize("positives", [False, True], ids=["diag", "pos"])
@pytest.mark.parametrize("terms", ["both", "i2t", "t2i"])
def test_torch_path_gradgradcheck(max_violation, positives, terms):
    """Double backward through the torch path is exact (its backward is differentiable torch ops)."""
    im, s, pos = _inputs(4, 6 if positives else 4, 3, torch.float64, positives=positives)
    assert torch.autograd.gradgradcheck(
        lambda a, b: contrastive_loss(a, b, 0.5, max_violation, positives=pos, terms=terms, reduction="mean",
                                      backend="torch"), (im, s))


@pytest.mark.parametrize("max_violation", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_torch_path_double_backward_16bit(dtype, max_violation):
    """16-bit inputs: the second-order gradients equal the naive loss's on the same values in fp32
    (the fp32 casts are made from the saved inputs, so they are part of the double-backward graph)."""
    im, s, _ = _inputs(5, 5, 4, dtype)
    v = torch.randn(5, 4)

    def second_order(loss_fn):
        gim, gs = torch.autograd.grad(loss_fn(im, s), (im, s), create_graph=True)
        return torch.autograd.grad((gim.float() * v).sum() + (gs.float() * v).sum(), (im, s))

    got = second_order(lambda a, b: contrastive_loss(a, b, 0.5, max_violation, backend="torch"))
    want = second_order(lambda a, b: contrastive_loss_naive(a.float(), b.float(), 0.5, max_violation)[0])
    for a, b in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


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


@pytest.mark.parametrize("max_violation", MODES)
@pytest.mark.parametrize("positives", [False, True], ids=["diagonal", "positives"])
@pytest.mark.parametrize("device,backend", [
    ("cpu", "torch"), pytest.param("cpu", "triton", marks=interpreter_only),
    pytest.param("cuda", "torch", marks=requires_cuda), pytest.param("cuda", "triton", marks=requires_cuda)])
def test_autocast_does_not_lower_the_loss_precision(device, backend, positives, max_violation):
    """Under autocast (bf16), fp32 embeddings are still scored in fp32 as documented, in the forward and
    in a backward called inside the autocast region: loss and gradients equal the plain call's exactly."""
    im, s, pos = _inputs(9, 13 if positives else 9, 17, torch.float32, device=device, positives=positives)
    upstream = torch.randn((), device=device)

    def loss(a, b):
        return contrastive_loss(a, b, 0.2, max_violation, positives=pos, backend=backend)

    plain = _loss_and_grads(loss, im, s, upstream)
    with torch.autocast(device, dtype=torch.bfloat16):
        under = _loss_and_grads(loss, im, s, upstream)
    assert under[0].dtype == torch.float32
    # On CUDA the Triton "terms" path (positives) adds gradient rows atomically: last bits vary between runs.
    atomic = device == "cuda" and backend == "triton" and positives
    for a, b in zip(under[:3], plain[:3]):
        if atomic:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(a, b)


def test_torch_func_transforms_raise_the_documented_error():
    """README: the loss is a custom autograd.Function without setup_context; torch.func names that."""
    im, s, _ = _inputs(4, 4, 3, torch.float32)
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda a: ContrastiveLoss(margin=0.2)(a, s.detach()))(im.detach())


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
    pytest.param("im", 5, float("nan"), True, id="nan-unused-image"),
]


def _nonfinite_case(where, row, value, positives, device="cpu", B=6):
    im = torch.randn(B, 8, device=device)
    s = torch.randn(B, 8, device=device)
    (im if where == "im" else s)[row if B == 6 else B - 1 - row, 3] = value
    pos = torch.tensor([0, 1, 2, 3, 4, 0], device=device) if positives else None
    return im, s, pos


def _assert_nonfinite(im, s, pos, backend):
    """The loss and a gradient are non-finite (a GradScaler then skips the step), in every mode."""
    for mv in (False, True):
        for terms in ("both", "i2t", "t2i"):
            im_, s_ = im.detach().requires_grad_(), s.detach().requires_grad_()
            loss = contrastive_loss(im_, s_, 0.2, mv, positives=pos, terms=terms, backend=backend)
            assert not torch.isfinite(loss), (mv, terms, loss)
            loss.backward()
            assert not (torch.isfinite(im_.grad).all() and torch.isfinite(s_.grad).all()), (mv, terms)


@pytest.mark.parametrize("where,row,value,positives", NONFINITE)
def test_nonfinite_inputs_give_nonfinite_loss_torch(where, row, value, positives):
    _assert_nonfinite(*_nonfinite_case(where, row, value, positives), "torch")


@interpreter_only
@pytest.mark.parametrize("where,row,value,positives", NONFINITE)
def test_nonfinite_inputs_give_nonfinite_loss_triton(where, row, value, positives):
    _assert_nonfinite(*_nonfinite_case(where, row, value, positives), "triton")


@interpreter_only
@pytest.mark.parametrize("where,row,value", [("im", 2, float("nan")), ("s", 4, float("inf"))], ids=["nan-im", "inf-s"])
def test_nonfinite_inputs_give_nonfinite_loss_triton_fused(where, row, value):
    _assert_nonfinite(*_nonfinite_case(where, row, value, False, B=20), "triton")  # 20 > 16: "fused" path


NO_ACTIVE_HINGE = [  # (im, s) whose NaN / inf reaches no hinge that stays above 0
    pytest.param([[1.0, 2.0]], [[float("nan"), 1.0]], id="nan-s-one-pair"),
    pytest.param([[float("nan"), 2.0]], [[1.0, 1.0]], id="nan-im-one-pair"),
    pytest.param([[1.0, 2.0]], [[float("inf"), 1.0]], id="inf-s-one-pair"),
    pytest.param([[1.0], [-1.0]], [[float("inf")], [1.0]], id="inf-s-hinges-clamped"),  # S = [[inf, 1], [-inf, -1]]
]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter_only)])
@pytest.mark.parametrize("im,s", NO_ACTIVE_HINGE)
def test_nonfinite_inputs_that_reach_no_active_hinge_give_nonfinite_loss(im, s, backend):
    """A batch of one pair has no negatives, and a hinge at -inf clamps to 0 (here every image's and
    caption 0's): the NaN / inf reaches no hinge, and the loss must still be non-finite. In the torch
    forward only the diagonal's `+ 0 * d` term carries it; without that term the loss was 0 (2.2 for
    the two pairs: caption 1's finite hinge)."""
    _assert_nonfinite(torch.tensor(im), torch.tensor(s), None, backend)


# ------------------------------------------------------------------------------------- errors


def _error_cases():
    im, s = torch.randn(4, 3), torch.randn(4, 3)
    return [
        ("list", dict(im=[[1.0]]), TypeError, "im must be a torch.Tensor"),
        ("int", dict(im=torch.ones(4, 3, dtype=torch.int64)), TypeError, "dtype torch.int64"),
        ("rank", dict(s=torch.randn(4, 3, 1)), ValueError, r"2-D .* \(4, 3, 1\)"),
        ("D", dict(s=torch.randn(4, 5)), ValueError, "same feature size"),
        ("empty", dict(im=torch.randn(0, 3), s=torch.randn(0, 3)), ValueError, "at least one row"),
        ("no-features", dict(im=torch.randn(4, 0), s=torch.randn(4, 0)), ValueError, "one row and one feature"),
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
        ("margin-numpy-bool", dict(margin=np.bool_(True)), TypeError, "margin must be a real number"),
        ("margin-huge-int", dict(margin=10**400), ValueError, r"within the float32 range, got 1000.*401 digits"),
        ("margin-past-fp32", dict(margin=1e39), ValueError, "within the float32 range, got 1e[+]39"),
        ("margin-below-fp32", dict(margin=-1e39), ValueError, "within the float32 range, got -1e[+]39"),
        ("terms-list", dict(terms=["i2t"]), ValueError, r"terms must be one of .*\['i2t'\]"),
        ("reduction-array", dict(reduction=np.array([1, 2])), ValueError, "reduction must be one of"),
        ("indices-str", dict(return_indices="no", max_violation=True), TypeError, "return_indices must be a bool"),
        ("mv-numpy", dict(max_violation=np.bool_(True)), TypeError, "bool, got numpy.bool"),
        ("mv", dict(max_violation=1), TypeError, "bool"),
        ("indices-vse0", dict(return_indices=True), ValueError, "max_violation=True"),
        ("triton-fp64", dict(im=im.double(), s=s.double(), backend="triton"), TypeError, "float64"),
    ]


def test_functional_margin_takes_numpy_numbers():
    im, s, _ = _inputs(5, 5, 4, torch.float64)
    want = contrastive_loss(im, s, 0.25, True, backend="torch")
    for margin in (np.float32(0.25), np.float64(0.25), np.float16(0.25)):
        torch.testing.assert_close(contrastive_loss(im, s, margin, True, backend="torch"), want)
    torch.testing.assert_close(contrastive_loss(im, s, np.int64(1), True, backend="torch"),
                               contrastive_loss(im, s, 1, True, backend="torch"))


@pytest.mark.parametrize("case", _error_cases(), ids=lambda c: c[0])
def test_errors_name_the_problem(case):
    _, overrides, exc, match = case
    kw = dict(im=torch.randn(4, 3), s=torch.randn(4, 3), margin=0.2, max_violation=False)
    kw.update(overrides)
    im, s = kw.pop("im"), kw.pop("s")
    with pytest.raises(exc, match=match):
        contrastive_loss(im, s, **kw)


def test_cuda_error_on_different_devices():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU for a second device")
    with pytest.raises(ValueError, match="same device"):
        contrastive_loss(torch.randn(4, 3), torch.randn(4, 3, device="cuda"))


# ------------------------------------------------------------------------------------- Triton (interpreter)


INTERP_CASES = [
    pytest.param(37, 37, 40, False, False, id="N37-D40"),
    pytest.param(13, 29, 19, True, False, id="N13-M29-D19-pos"),
    pytest.param(13, 29, 19, True, True, id="N13-M29-D19-pos-noncontig"),  # the terms path (DDP, dedupe)
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


# ------------------------------------------------------------------------------------- Triton paths
# Under the interpreter the tiles are 16 x 16 (vse_fast.kernels.contrastive._make_settings): B <= 16 runs
# the one-program "small" path, larger B the "fused" path (B = 37: 3 row blocks x 2 column splits).


def _kernels():
    from vse_fast.kernels import contrastive

    return contrastive


def _integer_inputs(B, D, dtype, device="cpu", noncontig=False):
    """Entries in {-2, ..., 2}: every similarity is an exact integer in every dtype, so equal
    similarities (ties) are frequent and exact, and no hinge m + S - d (m = 0.2) sits at 0."""
    im = torch.randint(-2, 3, (B, 2 * D if noncontig else D), device=device).to(dtype)
    s = torch.randint(-2, 3, (B, D), device=device).to(dtype)
    if noncontig:
        im, s = im[:, ::2], s.t().contiguous().t()
    return im.requires_grad_(), s.requires_grad_()


def test_path_selection():
    K = _kernels()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        gpu = K._gpu_settings(dtype)
        assert gpu.SMALL_B <= 128  # A's diagonal counts up to 2B - 2 must be exact in bf16
        st = K.loss_settings(dtype)
        both = ("i2t", "t2i")
        assert K.contrastive_path(st.SMALL_B, st.SMALL_B, None, both, st) == K.SMALL
        assert K.contrastive_path(1, 1, None, both, st) == K.SMALL
        assert K.contrastive_path(st.SMALL_B + 1, st.SMALL_B + 1, None, both, st) == K.FUSED
        assert K.contrastive_path(5, 5, torch.arange(5), both, st) == K.TERMS
        assert K.contrastive_path(5, 5, None, ("t2i",), st) == K.TERMS


PATH_CASES = [
    pytest.param(1, 5, False, id="small-B1"),
    pytest.param(7, 33, False, id="small-B7-D33"),
    pytest.param(16, 20, True, id="small-B16-noncontig"),
    pytest.param(17, 16, False, id="fused-B17"),
    pytest.param(37, 19, True, id="fused-B37-D19-noncontig"),
]


@interpreter_only
@pytest.mark.parametrize("max_violation", MODES)
@pytest.mark.parametrize("B,D,noncontig", PATH_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_triton_interpreter_small_and_fused_paths(B, D, noncontig, dtype, max_violation, poison_empty):
    _check_against_reference(B, B, D, dtype, max_violation, noncontig=noncontig, backend="triton",
                             reduction="mean" if B % 2 else "sum")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter_only)])
@pytest.mark.parametrize("max_violation", MODES)
@pytest.mark.parametrize("B,noncontig", [(13, False), (37, True)], ids=["small-B13", "fused-B37-noncontig"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ties_take_the_first_index(B, noncontig, dtype, max_violation, backend, poison_empty):
    """Integer inputs: exact ties everywhere; hardest indices (first index on ties), loss and
    gradients must equal the float64 reference exactly up to the output rounding. The torch backend
    (the CPU default) had no tie test: a last-index tie-break survived every test."""
    im, s = _integer_inputs(B, 8, dtype, noncontig=noncontig)
    upstream = torch.randn(())
    kw = dict(margin=0.2, max_violation=max_violation)
    out = _loss_and_grads(lambda a, b: contrastive_loss(a, b, **kw, backend=backend, return_indices=max_violation),
                          im, s, upstream)
    ref = _reference(im, s, upstream, **kw)
    for got, want in zip(out[:3], ref[:3]):
        _assert_close(got, want, dtype)  # no near-tie allowance: ties are exact and resolved alike
    if max_violation:
        for term in ("i2t", "t2i"):
            torch.testing.assert_close(out[3][term], ref[3][term], rtol=0, atol=0)


@interpreter_only
@pytest.mark.parametrize("max_violation", MODES)
@pytest.mark.parametrize("B", [9, 37], ids=["small-B9", "fused-B37"])
def test_triton_interpreter_paths_agree_per_pair(B, max_violation, poison_empty):
    """Per-pair values and hardest indices / counts of the chosen path ("small" or "fused") equal
    those of the per-term kernels ("terms" path, one launch per term) on integer inputs."""
    K = _kernels()
    im, s = (t.detach() for t in _integer_inputs(B, 12, torch.float32))
    st = K.loss_settings(torch.float32)
    if B <= st.SMALL_B:
        loss, val, aux, A = K.contrastive_small_fwd(im, s, 0.2, max_violation, 0.5, st)
        torch.testing.assert_close(loss, val.sum())
        assert A.shape == (B, B) and A.dtype == im.dtype
        # A holds the gradient of the loss (scale 1) with respect to S = im @ s.T
        S = (im.double() @ s.double().t()).requires_grad_()
        ref = _loss_of_similarities(S, 0.2, max_violation)
        torch.testing.assert_close(A.double(), torch.autograd.grad(ref, S)[0], rtol=0, atol=0)
    else:
        val, aux, _, _ = K.contrastive_fwd(im, s, None, 0.2, max_violation, ("i2t", "t2i"), 0.5, st)
    for t, term in enumerate(("i2t", "t2i")):
        v, a, _, _ = K.contrastive_fwd(im, s, None, 0.2, max_violation, (term,), 0.5, st)
        torch.testing.assert_close(val[t], v[0], rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(aux[t], a[0], rtol=0, atol=0)


def _loss_of_similarities(S, margin, max_violation):
    """The published loss written on the similarity matrix S (rows images, columns captions)."""
    d = S.diagonal()
    eye = torch.eye(S.shape[0], dtype=torch.bool)
    cost_s = (margin + S - d[:, None]).clamp(min=0).masked_fill(eye, 0)
    cost_im = (margin + S - d[None, :]).clamp(min=0).masked_fill(eye, 0)
    if max_violation:
        return cost_s.max(1).values.sum() + cost_im.max(0).values.sum()
    return cost_s.sum() + cost_im.sum()


@interpreter_only
@pytest.mark.parametrize("max_violation", MODES)
@pytest.mark.parametrize("B,D", [(128, 72), (300, 40)], ids=["small-B128", "fused-B300"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_interpreter_gpu_tile_sizes(B, D, dtype, max_violation, monkeypatch, poison_empty):
    """The GPU tiles (128 x 128 "small" tile, 128- / 64-row fused tiles) on the interpreter."""
    import dataclasses

    K = _kernels()
    monkeypatch.setitem(K._SETTINGS, dtype, dataclasses.replace(K._gpu_settings(dtype),
                                                                interp_bf16=K._interp_bf16(dtype)))
    st = K.loss_settings(dtype)
    assert K.contrastive_path(B, B, None, ("i2t", "t2i"), st) == (K.SMALL if B <= 128 else K.FUSED)
    _check_against_reference(B, B, D, dtype, max_violation, backend="triton")


@interpreter_only
@pytest.mark.parametrize("saved_mask,noncontig", [(True, False), (False, False), (False, True)],
                         ids=["saved-mask", "recompute", "recompute-noncontig"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_interpreter_vse0_backward_in_chunks(dtype, saved_mask, noncontig, monkeypatch, poison_empty):
    """The "fused" VSE0 backward with G split into row chunks (fp32 accumulation of ds) gives the
    one-chunk gradients, with G unpacked from the forward's mask or recomputed from S."""
    K = _kernels()
    B = 37
    if not saved_mask:
        monkeypatch.setattr(K, "SAVED_MASK_MAX_BYTES", 0)
    im, s, _ = _inputs(B, B, 24, dtype, noncontig=noncontig)
    upstream = torch.randn(())
    one = _loss_and_grads(lambda a, b: contrastive_loss(a, b, 0.2, False, backend="triton"), im, s, upstream)
    monkeypatch.setattr(K, "_MASK_CHUNK_BYTES", 16 * B * im.element_size())  # chunks of 16 image rows
    monkeypatch.setattr(K, "_SAVED_MASK_CHUNK_BYTES", 16 * B * im.element_size())
    assert K._chunk_rows(K.loss_settings(dtype), B, B, im.element_size()) == 16
    chunked = _loss_and_grads(lambda a, b: contrastive_loss(a, b, 0.2, False, backend="triton"), im, s, upstream)
    torch.testing.assert_close(chunked[0], one[0], rtol=0, atol=0)
    for a, b in zip(chunked[1:3], one[1:3]):
        atol, rtol = DTYPE_TOLERANCES[dtype]
        torch.testing.assert_close(a, b, atol=atol * max(1.0, float(b.abs().max())), rtol=rtol)
    ref = _reference(im, s, upstream, margin=0.2, max_violation=False)
    _assert_grads_close(chunked, ref, dtype, im, s, upstream, dict(margin=0.2, max_violation=False))


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_interpreter_vse0_terms_backward_in_chunks(dtype, monkeypatch, poison_empty):
    """The per-term VSE0 backward (explicit positives, N != M) with G in row chunks of one reused
    buffer gives the one-chunk gradients: every chunk's G is written in full before its matmuls."""
    K = _kernels()
    N, M, D = 11, 45, 24
    im, s, pos = _inputs(N, M, D, dtype, positives=True)
    upstream = torch.randn(())
    fn = lambda a, b: contrastive_loss(a, b, 0.2, False, positives=pos, backend="triton")  # noqa: E731
    one = _loss_and_grads(fn, im, s, upstream)
    monkeypatch.setattr(K, "_MASK_CHUNK_BYTES", 16 * N * im.element_size())  # chunks of 16 caption rows
    assert [K._chunk_rows(K.loss_settings(dtype), M, C, im.element_size()) for C in (M, N)] == [16, 16]
    buffers = []  # the storage each chunk's G is written to
    real_launch = K._launch_mask
    monkeypatch.setattr(K, "_launch_mask", lambda X, Y, lab, d, G, *a: buffers.append(G._base) or
                        real_launch(X, Y, lab, d, G, *a))
    chunked = _loss_and_grads(fn, im, s, upstream)
    assert len(buffers) == 6 and all(b is not None for b in buffers)  # 2 terms x 3 chunks: views of
    assert all(b is buffers[0] for b in buffers[:3]) and all(b is buffers[3] for b in buffers[3:])  # one buffer each
    torch.testing.assert_close(chunked[0], one[0], rtol=0, atol=0)
    for a, b in zip(chunked[1:3], one[1:3]):
        atol, rtol = DTYPE_TOLERANCES[dtype]
        torch.testing.assert_close(a, b, atol=atol * max(1.0, float(b.abs().max())), rtol=rtol)
    ref = _reference(im, s, upstream, margin=0.2, max_violation=False, positives=pos)
    _assert_grads_close(chunked, ref, dtype, im, s, upstream, dict(margin=0.2, max_violation=False, positives=pos))


@interpreter_only
@pytest.mark.parametrize("B", [17, 37], ids=["B17", "B37"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_triton_interpreter_saved_mask_equals_recomputed_mask(B, dtype, poison_empty):
    """The 2-bit mask the fused VSE0 forward packs, unpacked, is exactly the G_i2t + G_t2i that the
    backward would otherwise recompute from S (several row blocks, column splits, a partial last word)."""
    K = _kernels()
    st = K.loss_settings(dtype)
    im, s, _ = _inputs(B, B, 24, dtype)
    val, aux, d, mask = K.contrastive_fwd(im, s, None, 0.2, False, ("i2t", "t2i"), 1.0, st, save_mask=True)
    assert mask is not None and mask.shape == (B, (B + 15) // 16) and mask.dtype == torch.int32
    unpacked = torch.empty((B, B), dtype=dtype)
    grid = ((B + st.BLOCK_R - 1) // st.BLOCK_R, (B + st.BLOCK_C - 1) // st.BLOCK_C)
    K._contrastive_vse0_unpack_kernel[grid](mask, unpacked, 0, B, B, mask.shape[1], unpacked.stride(0),
                                            BLOCK_R=st.BLOCK_R, BLOCK_C=st.BLOCK_C)
    recomputed = torch.empty((B, B), dtype=dtype)
    K._launch_mask(im, s, K._labels_or_dummy(None, im.device), d, recomputed, 0, B, B, B, 0.2, K.NO_LABELS, True, st)
    assert torch.equal(unpacked, recomputed)
    assert (recomputed == 2).any() and (recomputed == 1).any()
    assert float(aux.sum()) == float(recomputed.float().sum())  # every active hinge counted once
    # no mask without a gradient to compute, or for VSE++
    assert K.contrastive_fwd(im, s, None, 0.2, False, ("i2t", "t2i"), 1.0, st)[3] is None
    assert K.contrastive_fwd(im, s, None, 0.2, True, ("i2t", "t2i"), 1.0, st, save_mask=True)[3] is None


# ------------------------------------------------------------------------------------- CUDA


CUDA_CASES = [(1, 1, 1), (7, 7, 33), (129, 129, 1024), (1000, 1000, 33), (300, 1000, 64)]


@requires_cuda
@pytest.mark.parametrize("max_violation", MODES)
@pytest.mark.parametrize("N,M,D", CUDA_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cuda_triton_matches_reference(N, M, D, dtype, max_violation, poison_empty):
    _check_against_reference(N, M, D, dtype, max_violation, positives=N != M, backend="triton", device="cuda")


PATH_B = [1, 7, 128, 129, 1000, 4096]  # small (<= 128) and fused paths, one and several tiles


@requires_cuda
@pytest.mark.parametrize("max_violation", MODES)
@pytest.mark.parametrize("B", PATH_B, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cuda_small_and_fused_paths(B, dtype, max_violation, poison_empty):
    _check_against_reference(B, B, 1024 if B <= 129 else 256, dtype, max_violation, backend="triton", device="cuda",
                             noncontig=B in (7, 1000))


@requires_cuda
@pytest.mark.parametrize("max_violation", MODES)
@pytest.mark.parametrize("B", [128, 129, 1000], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_ties_take_the_first_index(B, dtype, max_violation, poison_empty):
    im, s = _integer_inputs(B, 40, dtype, device="cuda")
    upstream = torch.randn((), device="cuda")
    kw = dict(margin=0.2, max_violation=max_violation)
    out = _loss_and_grads(lambda a, b: contrastive_loss(a, b, **kw, backend="triton", return_indices=max_violation),
                          im, s, upstream)
    ref = _reference(im, s, upstream, **kw)
    for got, want in zip(out[:3], ref[:3]):
        _assert_close(got, want, dtype)
    if max_violation:
        for term in ("i2t", "t2i"):
            torch.testing.assert_close(out[3][term], ref[3][term], rtol=0, atol=0)


@requires_cuda
@pytest.mark.parametrize("max_violation", MODES)
@pytest.mark.parametrize("B", [128, 1000], ids=lambda b: f"B{b}")
def test_cuda_paths_are_deterministic(B, max_violation):
    """Same bits twice: the loss always (ordered combines), the gradients where no atomics are used
    (the "small" path, and the VSE0 "fused" backward)."""
    im, s, _ = _inputs(B, B, 256, torch.bfloat16, "cuda")
    one = torch.ones((), device="cuda")
    runs = [_loss_and_grads(lambda a, b: contrastive_loss(a, b, 0.2, max_violation), im, s, one) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    if B <= 128 or not max_violation:
        assert torch.equal(runs[0][1], runs[1][1]) and torch.equal(runs[0][2], runs[1][2])


@requires_cuda
@pytest.mark.parametrize("saved_mask", [True, False], ids=["saved-mask", "recompute"])
def test_cuda_vse0_backward_in_chunks(saved_mask, monkeypatch):
    """The fused VSE0 backward in 4 row chunks of G (the matmuls counted: 2 per chunk) gives the
    one-chunk loss and the reference gradients; with the forward's saved mask or a recompute of S.
    (It once patched only the recompute's chunk size, so with the saved mask it ran one chunk.)"""
    K = _kernels()
    B = 1000
    if not saved_mask:
        monkeypatch.setattr(K, "SAVED_MASK_MAX_BYTES", 0)
    im, s, _ = _inputs(B, B, 128, torch.bfloat16, "cuda")
    upstream = torch.randn((), device="cuda")
    one = _loss_and_grads(lambda a, b: contrastive_loss(a, b, 0.2, False), im, s, upstream)
    matmuls = []
    mm_fp32 = K._mm_fp32
    monkeypatch.setattr(K, "_mm_fp32", lambda a, b: matmuls.append(1) or mm_fp32(a, b))
    monkeypatch.setattr(K, "_MASK_CHUNK_BYTES", 256 * B * im.element_size())  # 4 chunks of 256 rows
    monkeypatch.setattr(K, "_SAVED_MASK_CHUNK_BYTES", 256 * B * im.element_size())
    chunked = _loss_and_grads(lambda a, b: contrastive_loss(a, b, 0.2, False), im, s, upstream)
    assert len(matmuls) == 8
    ref = _reference(im, s, upstream, margin=0.2, max_violation=False)
    torch.testing.assert_close(chunked[0], one[0], rtol=0, atol=0)
    _assert_grads_close(chunked, ref, torch.bfloat16, im, s, upstream, dict(margin=0.2, max_violation=False))


@requires_cuda
@pytest.mark.parametrize("max_violation", MODES)
def test_cuda_triton_noncontiguous_and_terms(max_violation):
    _check_against_reference(257, 257, 96, torch.bfloat16, max_violation, noncontig=True, backend="triton",
                             device="cuda")
    _check_against_reference(100, 333, 65, torch.float32, max_violation, positives=True, terms="t2i",
                             reduction="mean", backend="triton", device="cuda", noncontig=True)


@requires_cuda
@pytest.mark.parametrize("B", [6, 300], ids=["small", "fused"])
@pytest.mark.parametrize("where,row,value,positives", NONFINITE)
def test_cuda_nonfinite_inputs(where, row, value, positives, B):
    _assert_nonfinite(*_nonfinite_case(where, row, value, positives and B == 6, device="cuda", B=B), "triton")


@requires_cuda
@pytest.mark.parametrize("max_violation", MODES)
@pytest.mark.parametrize("B,positives", [(128, False), (300, False), (300, True)],
                         ids=["small-B128", "fused-B300", "terms-B300-pos"])
def test_cuda_no_host_sync(B, max_violation, positives):
    im, s, pos = _inputs(B, B, 64, torch.bfloat16, "cuda", positives)

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


@interpreter_only
@pytest.mark.parametrize("path", ["fused", "fused-chunks", "terms"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_interpreter_vse0_16bit_gradients_of_clustered_embeddings(dtype, path, monkeypatch, poison_empty):
    """Early in training the embeddings cluster: the VSE0 gradient sum_j G_ij s_j - c_i s_i cancels.
    The Triton backward keeps G @ s in fp32 up to that subtraction, so its error stays near the torch
    path's (16-bit G @ s products lost up to 17x more before)."""
    K = _kernels()
    torch.manual_seed(0)
    B, D = 48, 32
    center = torch.randn(D)
    im, s = (torch.nn.functional.normalize(center + 0.05 * torch.randn(B, D), dim=1).to(dtype) for _ in range(2))
    positives = torch.arange(B) if path == "terms" else None  # explicit positives: the per-term path
    if path == "fused-chunks":
        monkeypatch.setattr(K, "_SAVED_MASK_CHUNK_BYTES", 16 * B * im.element_size())
    exact = [t.double().requires_grad_() for t in (im, s)]
    contrastive_loss(*exact, backend="torch").backward()
    errors = {}
    for backend in ("torch", "triton"):
        a, b = (t.clone().requires_grad_() for t in (im, s))
        contrastive_loss(a, b, positives=positives, backend=backend).backward()
        errors[backend] = [float((g.grad.double() - e.grad).abs().max() / e.grad.abs().max())
                           for g, e in ((a, exact[0]), (b, exact[1]))]
    assert all(t <= 2.5 * max(r, 1e-3) for t, r in zip(errors["triton"], errors["torch"])), errors


def test_mixed_dtypes_are_promoted_as_autocast_outputs_reach_the_published_loss():
    """Under autocast an encoder's bf16 output can meet an fp32 one; the published loss takes them (its
    matmul autocasts). Ours promotes to the wider dtype; the gradients keep each input's dtype. On the
    CPU bf16 + fp32 computes in fp32 with or without the promotion; fp32 + fp64 shows it (the loss was
    computed in fp32 without it)."""
    torch.manual_seed(0)
    im, s = torch.randn(6, 8).bfloat16().requires_grad_(), torch.randn(6, 8).requires_grad_()
    for mv in (False, True):
        loss = contrastive_loss(im, s, 0.2, mv)
        expected = contrastive_loss(im.detach().float(), s.detach(), 0.2, mv)
        torch.testing.assert_close(loss, expected, rtol=0, atol=0)
        im.grad = s.grad = None
        loss.backward()
        assert im.grad.dtype == torch.bfloat16 and s.grad.dtype == torch.float32
    im32, s64 = torch.randn(6, 8), torch.randn(6, 8, dtype=torch.float64)
    for mv in (False, True):
        loss = contrastive_loss(im32, s64, 0.2, mv, backend="torch")
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss, contrastive_loss(im32.double(), s64, 0.2, mv, backend="torch"),
                                   rtol=1e-12, atol=1e-12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        published = PublishedContrastiveLoss(None, 0.2, True)(im.detach(), s.detach())
        ours = ContrastiveLoss(None, 0.2, True)(im.detach(), s.detach())
    torch.testing.assert_close(ours, published.float(), rtol=2e-2, atol=2e-2)


def test_dropin_reads_a_reassigned_margin_and_flag_as_published():
    """The published module takes margin/max_violation reassigned after construction (numpy scalars,
    0-d tensors); they are coerced at each forward, not rejected there."""
    im, s = torch.randn(5, 4), torch.randn(5, 4)
    loss = ContrastiveLoss(None, 0.2, False)
    loss.margin, loss.max_violation = np.float32(0.3), np.bool_(True)
    expected = contrastive_loss(im, s, float(np.float32(0.3)), True)
    torch.testing.assert_close(loss(im, s), expected, rtol=0, atol=0)
    loss.margin = torch.tensor(0.3)
    torch.testing.assert_close(loss(im, s), contrastive_loss(im, s, float(torch.tensor(0.3)), True), rtol=0, atol=0)


@interpreter_only
def test_triton_vsepp_backward_follows_torch_deterministic_mode(poison_empty):
    """Its fp32 atomic adds make the last bits vary between runs: under use_deterministic_algorithms
    the Triton VSE++ loss with a gradient raises (warns with warn_only) as torch's own such ops do; the
    single-program small path (no atomics), VSE0 and "auto" (which takes the torch backend) are fine."""
    im, s = torch.randn(20, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
            contrastive_loss(im, s, 0.2, True, backend="triton")
        contrastive_loss(im[:8], s[:8], 0.2, True, backend="triton").backward()  # small path
        contrastive_loss(im, s, 0.2, False, backend="triton").backward()
        contrastive_loss(im.detach(), s.detach(), 0.2, True, backend="triton")  # no gradient: no atomics
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="does not have a deterministic implementation"):
            contrastive_loss(im, s, 0.2, True, backend="triton").backward()
    finally:
        torch.use_deterministic_algorithms(False)


def test_feature_offsets_past_int32_take_a_contiguous_copy_for_the_kernels():
    """Column-major storage of > 2**31 elements: (D - 1) * stride(1) would wrap in the kernels'
    int32 feature offsets; the Triton path gets a row-major copy (row offsets are int64)."""
    from vse_fast.ops.contrastive import _int32_feature_offsets

    big = torch.empty(1024, 2**21 + 2**12, device="meta").t()  # 1023 * (2**21 + 2**12) > 2**31
    fixed = _int32_feature_offsets(big)
    assert fixed.is_contiguous() and fixed.shape == big.shape
    fits = torch.empty(1024, 2**21 - 1, device="meta").t()  # largest offset 1023 * (2**21 - 1) < 2**31
    assert _int32_feature_offsets(fits) is fits
    rows = torch.empty(2**22, 1024, device="meta")  # row-major: the offsets are row offsets (int64)
    assert _int32_feature_offsets(rows) is rows


@interpreter_only
def test_the_triton_loss_gets_row_major_copies_of_inputs_past_int32_feature_offsets(monkeypatch, poison_empty):
    import vse_fast.ops.contrastive as C

    monkeypatch.setattr(C, "_INT32_OFFSETS", 16)  # a (9, 5) column-major input: offsets up to 4 * 9
    seen = []
    real = C.ContrastiveLossFunction.apply
    monkeypatch.setattr(C.ContrastiveLossFunction, "apply", lambda im, s, *a: seen.append((im, s)) or real(im, s, *a))
    im, s = torch.randn(5, 9).t().requires_grad_(), torch.randn(9, 5).requires_grad_()
    upstream = torch.randn(())
    got = _loss_and_grads(lambda a, b: contrastive_loss(a, b, 0.2, True, backend="triton"), im, s, upstream)
    assert seen[0][0].is_contiguous() and seen[0][1] is s
    ref = _reference(im, s, upstream, margin=0.2, max_violation=True)
    _assert_close(got[0], ref[0], torch.float32)
    _assert_grads_close(got, ref, torch.float32, im, s, upstream, dict(margin=0.2, max_violation=True))


def test_backward_chunks_keep_grid_axis_1_within_cuda_limits():
    """The VSE0 backward's mask/unpack kernels put column blocks on grid axis 0 (no limit) and row
    blocks on axis 1 (65535 at most): with C = 10**7 columns the grid was (rows, 78125) before."""
    K = _kernels()
    for dtype in (torch.float32, torch.bfloat16):
        st = K._gpu_settings(dtype)
        for R, C in ((10**8, 1), (10**7, 10**7), (4096, 4096)):
            rows = K._chunk_rows(st, R, C, 4)
            assert 1 <= rows <= R and -(-rows // min(st.BLOCK_R, st.BLOCK_M)) <= 65535


@interpreter_only
@pytest.mark.parametrize("positives", [False, True], ids=["fused", "terms"])
def test_triton_interpreter_vse0_backward_with_few_row_programs_per_launch(positives, monkeypatch, poison_empty):
    """Grid axis 1 capped at 2 row programs: more, smaller chunks; the same gradients (float64)."""
    K = _kernels()
    monkeypatch.setattr(K, "_GRID_AXIS1_MAX", 2)
    monkeypatch.setattr(K, "SAVED_MASK_MAX_BYTES", 0 if positives else K.SAVED_MASK_MAX_BYTES)
    N = M = 45
    im, s, pos = _inputs(N, M, 24, torch.float32, positives=positives)
    grids = []
    real_mask, real_unpack = K._contrastive_vse0_mask_kernel, K._contrastive_vse0_unpack_kernel

    class Recording:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            grids.append(grid)
            return self.kernel[grid]

    monkeypatch.setattr(K, "_contrastive_vse0_mask_kernel", Recording(real_mask))
    monkeypatch.setattr(K, "_contrastive_vse0_unpack_kernel", Recording(real_unpack))
    upstream = torch.randn(())
    got = _loss_and_grads(lambda a, b: contrastive_loss(a, b, 0.2, False, positives=pos, backend="triton"),
                          im, s, upstream)
    st = K.loss_settings(torch.float32)
    assert grids and all(g[1] <= 2 for g in grids)
    assert {g[0] for g in grids} <= {-(-45 // st.BLOCK_C), -(-45 // st.BLOCK_DB)}  # column blocks on axis 0
    ref = _reference(im, s, upstream, margin=0.2, max_violation=False, positives=pos)
    _assert_grads_close(got, ref, torch.float32, im, s, upstream, dict(margin=0.2, max_violation=False, positives=pos))


@interpreter_only
@pytest.mark.parametrize("max_violation", MODES)
def test_triton_backward_refuses_create_graph(max_violation):
    """A gradient penalty on the Triton loss once trained without its gradient: under create_graph=True
    the kernel backward (differentiable once) returned gradients cut from the graph, since the loss's
    incoming gradient is a constant. It raises now; the torch backend is differentiable twice."""
    im, s, _ = _inputs(5, 5, 8, torch.float32)
    im.requires_grad_(), s.requires_grad_()
    with pytest.raises(RuntimeError, match=r"contrastive_loss\(backend='triton'\) .* use backend='torch'"):
        torch.autograd.grad(contrastive_loss(im, s, 0.2, max_violation, backend="triton"), (im, s), create_graph=True)
    gim, _ = torch.autograd.grad(contrastive_loss(im, s, 0.2, max_violation, backend="torch"), (im, s),
                                 create_graph=True)
    assert gim.requires_grad


def test_mm_fp32_falls_back_to_float32_copies_once_the_out_dtype_matmul_fails(monkeypatch):
    """The VSE0 backward's 16-bit matmuls with an fp32 result (torch.mm(..., out_dtype=float32), cuBLAS)
    have not run on a GPU here: should that call fail there, the backward warns once and multiplies
    float32 copies, the CPU's path, rather than crash a training run or the GPU check."""
    from vse_fast.kernels import contrastive as kernels

    a, b = torch.randn(6, 5).bfloat16(), torch.randn(5, 3).bfloat16()
    expected = a.float() @ b.float()
    if tuple(map(int, torch.__version__.split(".")[:2])) >= (2, 9):  # torch 2.8's meta mm takes no out_dtype
        meta = torch.mm(a.to("meta"), b.to("meta"), out_dtype=torch.float32)  # the call as made on CUDA
        assert meta.dtype == torch.float32 and meta.shape == (6, 3)
    devices = {"cpu"}  # the CPU has no such kernel: the call fails as it might on a GPU
    monkeypatch.setattr(kernels, "_MM_OUT_DTYPE_DEVICES", devices)
    with pytest.warns(RuntimeWarning, match="out_dtype=torch.float32\\) failed for torch.bfloat16 on cpu"):
        got = kernels._mm_fp32(a, b)
    assert got.dtype == torch.float32 and torch.equal(got, expected) and devices == set()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: later calls take the copies without trying again
        assert torch.equal(kernels._mm_fp32(a, b), expected)
