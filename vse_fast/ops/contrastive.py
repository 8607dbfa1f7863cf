"""Fused similarity + hinge contrastive loss of VSE0 / VSE++ (published ``ContrastiveLoss``).

``contrastive_loss(im, s, margin, max_violation, positives=..., reduction=..., terms=...)``:

    S = im @ s.T                                    (N, M), never materialised on the Triton path
    pair j = (caption j, image p_j), p = positives  (default: p_j = j, needs N == M)
    d_j = S[p_j, j]
    i2t_j = agg_{j': p_j' != p_j} relu(margin + S[p_j, j'] - d_j)   (published cost_s, row p_j)
    t2i_j = agg_{i != p_j}        relu(margin + S[i, j]  - d_j)     (published cost_im, column j)
    agg = sum (VSE0) or max (VSE++, max over nothing = 0); loss = sum_j (i2t_j + t2i_j)  [/ M for "mean"]

Backends: "triton" (vse_fast.kernels.contrastive; CUDA, or CPU tensors under TRITON_INTERPRET=1) and
"torch" (one matmul, custom backward; the CPU path and an oracle); "auto" picks Triton for CUDA
fp32/bf16/fp16 tensors. `contrastive_loss_naive` is the plain autograd reference of the tests.
The loss is fp32 for fp32/bf16/fp16 inputs (fp64 for fp64, torch backend only). Double backward
(create_graph=True): exact on the torch backend; the Triton backend raises (once differentiable).
"""

import numbers
import warnings

import numpy as np
import torch
from torch.autograd.function import once_differentiable

import vse_fast.kernels as _kernel_package
from vse_fast.kernels import require_triton, triton_for_auto, triton_interpreting
from vse_fast.ops._autograd import refuse_create_graph

_REDUCTIONS = ("sum", "mean")
_TERMS = {"both": ("i2t", "t2i"), "i2t": ("i2t",), "t2i": ("t2i",)}
_BACKENDS = ("auto", "torch", "triton")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FLOAT_DTYPES = _TRITON_DTYPES + (torch.float64,)


# ---------------------------------------------------------------------------------------------------
# input checks


def _check_inputs(im, s, margin, max_violation, positives, reduction, terms, return_indices, backend):
    """Validate everything a caller can get wrong; returns (labels or None, terms tuple, backend)."""
    for name, t in (("im", im), ("s", s)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float16/bfloat16/float32/float64 tensor, got dtype {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (rows, D), got shape {tuple(t.shape)}")
    if im.device != s.device:
        raise ValueError(f"im and s must be on the same device, got {im.device} and {s.device}")
    (N, D), (M, Ds) = im.shape, s.shape
    if D != Ds:
        raise ValueError(f"im and s must have the same feature size D, got im {tuple(im.shape)} and s {tuple(s.shape)}")
    if N < 1 or M < 1 or D < 1:
        raise ValueError(f"im and s need at least one row and one feature, got im {tuple(im.shape)}, s {tuple(s.shape)}")
    check_loss_options(margin, max_violation, reduction, backend)
    if not isinstance(terms, str) or terms not in _TERMS:
        raise ValueError(f"terms must be one of {tuple(_TERMS)}, got {terms!r}")
    if not isinstance(return_indices, bool):
        raise TypeError(f"return_indices must be a bool, got {_type_name(return_indices)}")
    if return_indices and not max_violation:
        raise ValueError("return_indices=True needs max_violation=True (VSE0 has no hardest negative)")
    labels = _check_positives(positives, N, M, im.device)
    return labels, _TERMS[terms], _pick_backend(backend, im, max_violation)


def _type_name(value) -> str:
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _short(number) -> str:
    text = repr(number)
    return text if len(text) <= 24 else f"{text[:12]}...({len(text)} digits)"


_FP32_MAX = torch.finfo(torch.float32).max


def check_loss_options(margin, max_violation, reduction="sum", backend="auto"):
    """Raise TypeError/ValueError unless margin is a real number (Python or numpy int/float, not a
    bool or tensor) within the float32 range (the loss is computed in fp32), max_violation a bool,
    reduction in ("sum", "mean") and backend in ("auto", "torch", "triton")."""
    if isinstance(margin, (bool, np.bool_)) or not isinstance(margin, numbers.Real):
        raise TypeError(f"margin must be a real number (a Python or numpy int/float), got {_type_name(margin)}")
    value = float(margin) if not isinstance(margin, int) else margin  # numpy floats: no overflow warnings
    if not (value == value and -_FP32_MAX <= value <= _FP32_MAX):  # inf, NaN, or beyond fp32 (ints too)
        raise ValueError(f"margin must be finite and within the float32 range, got {_short(margin)}")
    if not isinstance(max_violation, bool):
        raise TypeError(f"max_violation must be a bool, got {_type_name(max_violation)}")
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not isinstance(backend, str) or backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")


def _check_positives(positives, N, M, device):
    if positives is None:
        if N != M:
            raise ValueError(f"im has {N} rows and s has {M}: without positives they must be equal "
                             f"(pass positives (M,) int64 = the image index of each caption)")
        return None
    if not isinstance(positives, torch.Tensor):
        raise TypeError(f"positives must be a torch.Tensor, got {type(positives).__name__}")
    if positives.dtype != torch.int64:
        raise TypeError(f"positives must be int64, got dtype {positives.dtype}")
    if positives.shape != (M,):
        raise ValueError(f"positives must have shape ({M},) (one image index per caption), got {tuple(positives.shape)}")
    if positives.device != device:
        raise ValueError(f"positives must be on {device} like im and s, got {positives.device}")
    in_range = (positives >= 0) & (positives < N)
    if positives.is_cuda:
        # No host sync: a device-side assert (fails at a later launch and ends the CUDA context).
        torch._assert_async(in_range.all(), f"contrastive_loss: positives must lie in [0, {N})")
    elif not bool(in_range.all()):
        bad = positives[~in_range][:5].tolist()
        raise ValueError(f"positives must lie in [0, {N}) (im has {N} rows), got out-of-range values {bad}")
    return positives.contiguous()


def _alert_nondeterministic(what: str) -> None:
    """As torch's own nondeterministic ops do under torch.use_deterministic_algorithms(True): raise
    RuntimeError, or warn with warn_only=True."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (f"{what} does not have a deterministic implementation, but you set "
               "'torch.use_deterministic_algorithms(True)': use backend='torch' (or 'auto', which picks it then)")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, stacklevel=3)
    else:
        raise RuntimeError(message)


def _int32_feature_offsets(x: torch.Tensor) -> torch.Tensor:
    """x, or a contiguous copy of it when its largest feature offset (D - 1) * stride(1) passes int32
    (column-major storage of more than 2**31 elements): the kernels widen row offsets to int64, not
    feature offsets."""
    return x.contiguous() if (x.shape[1] - 1) * x.stride(1) >= _INT32_OFFSETS else x


_INT32_OFFSETS = 2**31


def _pick_backend(backend, im, max_violation):
    if backend == "torch":
        return "torch"
    if backend == "triton":
        require_triton("contrastive_loss(backend='triton')")
        if im.dtype not in _TRITON_DTYPES:
            raise TypeError(f"backend='triton' takes float32/bfloat16/float16, got {im.dtype} (use backend='torch')")
        if not im.is_cuda and not triton_interpreting():
            raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got device {im.device}")
        return "triton"
    if max_violation and torch.are_deterministic_algorithms_enabled():
        return "torch"  # the Triton VSE++ backward adds with fp32 atomics (run-to-run last-bit differences)
    return "triton" if im.is_cuda and im.dtype in _TRITON_DTYPES and triton_for_auto() else "torch"


# ---------------------------------------------------------------------------------------------------
# torch backend


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class TorchContrastiveFunction(torch.autograd.Function):
    """One matmul S = im @ s.T (fp32, fp64 for fp64) and row/column reductions; custom backward.

    VSE++ saves the hardest indices a (i2t) and b (t2i) and backpropagates with gathers/index_add_:
        w = g * scale * [value > 0]
        i2t: dim[p_j] += w (s[a_j] - s[j]),  ds[a_j] += w im[p_j],  ds[j] -= w im[p_j]
        t2i: dim[b_j] += w s[j],  dim[p_j] -= w s[j],  ds[j] += w (im[b_j] - im[p_j])
    VSE0 saves the active-hinge masks and builds dS = g * scale * (G_t2i + scatter_rows_p(G_i2t)
    - diag_p(count)), then dim = dS @ s, ds = dS.T @ im.
    The backward is plain differentiable torch ops on the saved inputs (indices and masks fixed):
    a double backward gives the exact second-order gradients of the piecewise-bilinear loss.
    """

    @staticmethod
    def forward(ctx, im, s, labels, margin, max_violation, terms, scale):
        cdt = _compute_dtype(im.dtype)
        im_c, s_c = im.to(cdt), s.to(cdt)
        N, M = im.shape[0], s.shape[0]
        p = labels if labels is not None else torch.arange(M, device=im.device)
        S = im_c @ s_c.t()  # (N, M)
        E = torch.arange(N, device=im.device)[:, None] == p[None, :]  # E[i, j]: i is caption j's image
        d = S.gather(0, p[None, :]).squeeze(0)  # (M,)
        vals, auxs, masks = [], [], []
        if max_violation:
            S.masked_fill_(E, float("-inf"))
            for term in terms:
                if term == "i2t":
                    best, arg = S.max(1)
                    best, arg = best[p], arg[p]
                else:
                    best, arg = S.max(0)
                vals.append((margin + best - d).clamp_min(0))
                auxs.append(torch.where(best == float("-inf"), -1, arg))
        else:
            for term in terms:
                if term == "i2t":
                    SA = S if labels is None else S.index_select(0, p)  # (M, M): row j is S[p_j]
                    EA = E if labels is None else p[:, None] == p[None, :]
                    H = (SA - d[:, None] + margin).clamp_min_(0).masked_fill_(EA, 0)
                    vals.append(H.sum(1))
                    masks.append(H > 0)
                    auxs.append(masks[-1].sum(1).to(cdt))
                else:
                    H = (S - d[None, :] + margin).clamp_min_(0).masked_fill_(E, 0)
                    vals.append(H.sum(0))
                    masks.append(H > 0)
                    auxs.append(masks[-1].sum(0).to(cdt))
        val = torch.stack(vals) * scale + d * 0  # + 0 * d: NaN when im[p_j] or s[j] is not finite
        aux = torch.stack(auxs)
        # the inputs themselves (not their casts): a double backward then differentiates the casts too
        ctx.save_for_backward(im, s, labels, val, aux, *masks)
        ctx.cfg = (max_violation, terms, scale, im.dtype, s.dtype)
        ctx.mark_non_differentiable(aux)
        return val.sum(), aux

    @staticmethod
    def backward(ctx, grad_loss, _grad_aux):
        im, s, labels, val, aux, *masks = ctx.saved_tensors
        max_violation, terms, scale, im_dtype, s_dtype = ctx.cfg
        cdt = _compute_dtype(im_dtype)
        with torch.autocast(im.device.type, enabled=False):  # a backward called under autocast inherits it
            im, s = im.to(cdt), s.to(cdt)
            g = grad_loss.to(cdt) * scale
            if max_violation:
                dim, ds = _torch_vsepp_grads(im, s, labels, val, aux, terms, g)
            else:
                dim, ds = _torch_vse0_grads(im, s, labels, aux, masks, terms, g)
        return dim.to(im_dtype), ds.to(s_dtype), None, None, None, None, None


def _torch_vsepp_grads(im, s, labels, val, idx, terms, g):
    M = s.shape[0]
    p = labels if labels is not None else torch.arange(M, device=im.device)
    im_p = im[p]
    dim, ds = torch.zeros_like(im), torch.zeros_like(s)
    for t, term in enumerate(terms):
        w = (g * (val[t] > 0))[:, None]
        k = idx[t].clamp_min(0)
        if term == "i2t":
            dim.index_add_(0, p, w * (s[k] - s))
            ds.index_add_(0, k, w * im_p)
            ds -= w * im_p
        else:
            dim.index_add_(0, k, w * s)
            dim.index_add_(0, p, -w * s)
            ds += w * (im[k] - im_p)
    return dim, ds


def _torch_vse0_grads(im, s, labels, cnt, masks, terms, g):
    N, M = im.shape[0], s.shape[0]
    p = labels if labels is not None else torch.arange(M, device=im.device)
    dS = torch.zeros((N, M), dtype=im.dtype, device=im.device)
    for term, G in zip(terms, masks):
        if term == "t2i":
            dS += G
        elif labels is None:
            dS += G
        else:
            dS.index_add_(0, p, G.to(im.dtype))
    dS.index_put_((p, torch.arange(M, device=im.device)), -cnt.sum(0), accumulate=True)
    dS *= g
    return dS @ s, dS.t() @ im


# ---------------------------------------------------------------------------------------------------
# Triton backend


_KERNELS = None


def _kernels():
    """vse_fast.kernels.contrastive, imported on first use (triton is only needed on this path)."""
    global _KERNELS
    if _KERNELS is None:
        from vse_fast.kernels import contrastive

        _KERNELS = contrastive
    return _KERNELS


class ContrastiveLossFunction(torch.autograd.Function):
    """Triton forward and backward; the path is chosen from the shapes (vse_fast.kernels.contrastive):

    "small" (positives None, both terms, B <= 128): one launch forward (loss, per-pair values, and the
    integer gradient matrix A (B, B)), one launch backward: dim = g scale A @ s, ds = g scale A.T @ im.
    "fused" (positives None, both terms): one pass over tiles of S for both terms (+ a threshold kernel
    for VSE0) and a combine kernel; VSE0 with a gradient to compute also saves the active hinges as a
    2-bit packed mask (B^2 / 4 bytes, up to SAVED_MASK_MAX_BYTES). Backward VSE++: gathers + atomic adds,
    O((N + M) D); VSE0: G_i2t + G_t2i unpacked from that mask (else recomputed from S) by row chunks,
    two cuBLAS matmuls and an epilogue kernel.
    "terms" (positives or one term): a tile kernel per term and the combine kernel; backward VSE++ as
    above, VSE0 a mask recompute and two cuBLAS matmuls per term. Differentiable once (kernels in the
    backward): a backward with create_graph=True raises; the torch backend supports it."""

    @staticmethod
    def forward(ctx, im, s, labels, margin, max_violation, terms, scale):
        with _kernel_package.launch_device(im):
            return ContrastiveLossFunction._forward(ctx, im, s, labels, margin, max_violation, terms, scale)

    @staticmethod
    def _forward(ctx, im, s, labels, margin, max_violation, terms, scale):
        K = _kernels()
        settings = K.loss_settings(im.dtype)
        path = K.contrastive_path(im.shape[0], s.shape[0], labels, terms, settings)
        if path == K.SMALL:
            loss, _, aux, A = K.contrastive_small_fwd(im, s, margin, max_violation, scale, settings)
            ctx.save_for_backward(im, s, A)
        else:
            if max_violation and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
                _alert_nondeterministic("contrastive_loss(backend='triton', max_violation=True) backward outside "
                                        f"its small path (positives None, both terms, B <= {settings.SMALL_B}): "
                                        "fp32 atomic adds")
            save_mask = not max_violation and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
            val, aux, d, mask = K.contrastive_fwd(im, s, labels, margin, max_violation, terms, scale, settings,
                                                  save_mask=save_mask)
            loss = val.sum()
            ctx.save_for_backward(im, s, labels, val, aux, d, mask)
        ctx.cfg = (path, margin, max_violation, terms, scale, settings)
        ctx.mark_non_differentiable(aux)
        ctx.set_materialize_grads(False)  # no zeros for the aux output's (unused) gradient
        return loss, aux

    @staticmethod
    def backward(ctx, grad_loss, _grad_aux):
        refuse_create_graph("contrastive_loss(backend='triton')")
        return ContrastiveLossFunction._backward(ctx, grad_loss, _grad_aux)

    @staticmethod
    @once_differentiable
    def _backward(ctx, grad_loss, _grad_aux):
        if grad_loss is None:
            return None, None, None, None, None, None, None
        K = _kernels()
        path, margin, max_violation, terms, scale, settings = ctx.cfg
        with torch.autocast(grad_loss.device.type, enabled=False), _kernel_package.launch_device(grad_loss):
            if path == K.SMALL:  # (autocast off: the backward's matmuls keep their dtypes)
                im, s, A = ctx.saved_tensors
                dim, ds = K.contrastive_small_bwd(grad_loss, im, s, A, scale, settings)
            else:
                im, s, labels, val, aux, d, mask = ctx.saved_tensors
                if max_violation:
                    dim, ds = K.contrastive_vsepp_bwd(grad_loss, im, s, labels, val, aux, terms, scale, settings)
                else:
                    dim, ds = K.contrastive_vse0_bwd(grad_loss, im, s, labels, aux, d, margin, terms, scale,
                                                     settings, mask=mask)
        return dim, ds, None, None, None, None, None


class _NonFiniteInputsGiveNaN(torch.autograd.Function):
    """loss + (0 if im and s are finite else NaN); the same term reaches the gradients of im and s, so
    that a non-finite input also makes a gradient non-finite (a GradScaler then skips the step). With
    positives, an image that is no caption's positive may hold a NaN that neither the loss's other terms
    nor the backward touch (a hardest negative drops NaN scores)."""

    @staticmethod
    def forward(ctx, loss, im, s):
        flag = ((im - im).sum() + (s - s).sum()).float()  # 0, or NaN (inf - inf, NaN - NaN): 2 ops a tensor
        ctx.save_for_backward(flag)
        ctx.dtypes = (im.dtype, s.dtype)
        ctx.shapes = (im.shape, s.shape)
        return loss + flag.to(loss.dtype)

    @staticmethod
    def backward(ctx, grad):
        (flag,) = ctx.saved_tensors
        poison = grad * flag.to(grad.dtype)
        grads = [poison.to(dtype).expand(shape) if needed else None
                 for needed, dtype, shape in zip(ctx.needs_input_grad[1:], ctx.dtypes, ctx.shapes)]
        return grad, *grads


# ---------------------------------------------------------------------------------------------------
# public API


def contrastive_loss(im, s, margin=0.2, max_violation=False, *, positives=None, reduction="sum",
                     terms="both", return_indices=False, backend="auto"):
    """Hinge-based triplet loss of VSE0 (sum over negatives) or VSE++ (hardest negative only).

    Args:
        im: (N, D) image embeddings; s: (M, D) caption embeddings. fp32/bf16/fp16 (fp64: torch only),
            same device, any strides; two dtypes are promoted to the wider (as autocast's mixed
            outputs reach the published loss).
        margin: hinge margin (a real number). max_violation: False = VSE0, True = VSE++.
        positives: (M,) int64, the image row of each caption (captions of one image are not negatives
            of each other); None means the diagonal and needs N == M. Range-checked without a host
            sync on CUDA (device-side assert), with a ValueError on CPU.
        reduction: "sum" (published) or "mean" (divided by M, the number of positive pairs).
        terms: "both", "i2t" (published cost_s, image query) or "t2i" (cost_im, caption query).
            With positives=None: loss(im, s) == loss(im, s, terms="t2i") + loss(s, im, terms="t2i").
        return_indices: VSE++ only; also return {"i2t": (M,), "t2i": (M,)} int64 hardest negatives
            (caption index for i2t, image index for t2i, -1 where there is no negative). Ties take
            the first index where the similarities are bitwise equal: equal rows can still differ in
            the last bit of a BLAS product (CPU). Unspecified when the inputs hold NaN.
        backend: "auto" | "torch" | "triton". "auto" takes Triton for CUDA tensors, except for VSE++
            under ``torch.use_deterministic_algorithms(True)``: the Triton VSE++ backward adds with fp32
            atomics outside its small path (positives None, both terms, B <= 128), and "triton" there
            raises (warns with warn_only).

    Returns:
        The 0-dim loss (fp32; fp64 for fp64 inputs), non-finite if im or s holds a NaN/inf (and so is
        the gradient of im or s, so that a GradScaler skips the step); and
        the indices dict when return_indices.

    Example::

        loss = contrastive_loss(img_emb, cap_emb, margin=0.2, max_violation=True)
    """
    if isinstance(im, torch.Tensor) and isinstance(s, torch.Tensor) and im.dtype != s.dtype \
            and im.is_floating_point() and s.is_floating_point():
        common = torch.promote_types(im.dtype, s.dtype)
        im, s = im.to(common), s.to(common)
    labels, term_tuple, which = _check_inputs(im, s, margin, max_violation, positives, reduction, terms,
                                              return_indices, backend)
    scale = 1.0 / s.shape[0] if reduction == "mean" else 1.0
    if which == "triton":
        im, s = _int32_feature_offsets(im), _int32_feature_offsets(s)
    fn = ContrastiveLossFunction if which == "triton" else TorchContrastiveFunction
    with torch.autocast(im.device.type, enabled=False):  # computed as documented (fp32), also under autocast
        loss, aux = fn.apply(im, s, labels, float(margin), max_violation, term_tuple, scale)
    if labels is not None:
        # Images that are no caption's positive are not covered by the in-kernel 0 * d_j check.
        loss = _NonFiniteInputsGiveNaN.apply(loss, im, s)
    if return_indices:
        return loss, {term: aux[t].long() for t, term in enumerate(term_tuple)}
    return loss


def contrastive_loss_naive(im, s, margin=0.2, max_violation=False, *, positives=None, reduction="sum",
                           terms="both"):
    """Plain autograd reference (materialises every (N, M) intermediate, like the published loss);
    the tests' oracle in float64. Returns (loss, {term: hardest index (M,), -1 if none})."""
    N, M = im.shape[0], s.shape[0]
    p = positives if positives is not None else torch.arange(M, device=im.device)
    S = im @ s.t()
    E = torch.arange(N, device=im.device)[:, None] == p[None, :]
    d = S[p, torch.arange(M, device=im.device)]
    total, hardest = 0, {}
    for term in _TERMS[terms]:
        if term == "i2t":
            H = (margin + S[p] - d[:, None]).clamp(min=0).masked_fill(p[:, None] == p[None, :], 0)
            masked = S[p].masked_fill(p[:, None] == p[None, :], float("-inf"))
            agg = H.max(1).values if max_violation else H.sum(1)
            best, arg = masked.max(1)
        else:
            H = (margin + S - d[None, :]).clamp(min=0).masked_fill(E, 0)
            masked = S.masked_fill(E, float("-inf"))
            agg = H.max(0).values if max_violation else H.sum(0)
            best, arg = masked.max(0)
        total = total + agg.sum()
        hardest[term] = torch.where(best == float("-inf"), -1, arg)
    if reduction == "mean":
        total = total / M
    return total, hardest
