"""Drop-in replacement of the published VSE-infinity ``ContrastiveLoss`` (lib/loss.py)."""
import numbers

import numpy as np
import torch
from torch import nn

from vse_fast.ops.contrastive import _short, _type_name, check_loss_options, contrastive_loss


def _as_margin(margin) -> float:
    """margin as a Python float: a real number (int, float, numpy scalar) or a 0-d real tensor (read on
    the host). Strings, None, bools and other tensors raise TypeError; a tensor that requires grad
    raises ValueError (no gradient would reach it)."""
    if isinstance(margin, torch.Tensor):
        if margin.dim() != 0 or margin.dtype == torch.bool or margin.is_complex():
            raise TypeError(f"margin must be a real number, got a tensor of shape {tuple(margin.shape)} "
                            f"and dtype {margin.dtype}")
        if margin.requires_grad:  # read as a number, it would get no gradient: a learnt margin, silently fixed
            raise ValueError("margin is a tensor that requires grad: the margin is a fixed number here, not "
                             "learnt (pass margin.item() to fix it)")
        return float(margin.item())
    if isinstance(margin, (bool, np.bool_)) or not isinstance(margin, numbers.Real):
        raise TypeError(f"margin must be a real number (e.g. 0.2), got {_type_name(margin)} {margin!r}")
    try:
        return float(margin)
    except OverflowError:
        raise ValueError(f"margin must be finite and within the float32 range, got {_short(margin)}") from None


def _as_max_violation(max_violation) -> bool:
    """max_violation as a bool: True/False or a numpy bool; anything else (strings such as "False",
    ints) raises TypeError rather than being read as truthy."""
    if not isinstance(max_violation, (bool, np.bool_)):
        raise TypeError(f"max_violation must be a bool, got {_type_name(max_violation)} {max_violation!r}")
    return bool(max_violation)


class ContrastiveLoss(nn.Module):
    """Hinge triplet loss over a batch of image/caption embeddings: VSE0 (sum of violations) or
    VSE++ (hardest negative), fused on the GPU (see vse_fast.ops.contrastive.contrastive_loss).

    Accepts the published constructor, ``ContrastiveLoss(opt=opt, margin=opt.margin,
    max_violation=opt.max_violation)`` or positional ``(opt, margin, max_violation)``; ``opt`` is
    kept and unused. ``max_violation_on()`` / ``max_violation_off()`` switch modes (and print the
    published messages).

    Validated at construction (TypeError/ValueError naming the argument): margin a finite real
    number (int/float, numpy scalar or 0-d tensor; stored as a float), max_violation a bool (or
    numpy bool), reduction "sum"/"mean", backend "auto"/"torch"/"triton". ``margin`` and
    ``max_violation`` reassigned later are read the same way at each forward (a tensor margin
    then costs a host read per call).

    forward(im (N, D), s (M, D), positives=None) -> 0-dim loss (fp32 for fp32/bf16/fp16 inputs);
    with positives=None, N == M and pair i is (im[i], s[i]) as in the published module.
    """

    def __init__(self, opt=None, margin=0, max_violation=False, *, reduction="sum", backend="auto"):
        super().__init__()
        margin, max_violation = _as_margin(margin), _as_max_violation(max_violation)
        check_loss_options(margin, max_violation, reduction, backend)
        self.opt = opt
        self.margin = margin
        self.max_violation = max_violation
        self.reduction = reduction
        self.backend = backend

    def max_violation_on(self):
        self.max_violation = True
        print("Use VSE++ objective.")

    def max_violation_off(self):
        self.max_violation = False
        print("Use VSE0 objective.")

    def forward(self, im, s, positives=None):
        # coerced here too: the published module takes a margin or flag reassigned after construction
        return contrastive_loss(im, s, _as_margin(self.margin), _as_max_violation(self.max_violation),
                                positives=positives, reduction=self.reduction, backend=self.backend)

    def extra_repr(self):
        return f"margin={self.margin}, max_violation={self.max_violation}, reduction={self.reduction!r}"
