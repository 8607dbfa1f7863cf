"""Drop-in replacement of the published VSE-infinity ``ContrastiveLoss`` (lib/loss.py)."""
from torch import nn

from vse_fast.ops.contrastive import contrastive_loss


class ContrastiveLoss(nn.Module):
    """Hinge triplet loss over a batch of image/caption embeddings: VSE0 (sum of violations) or
    VSE++ (hardest negative), fused on the GPU (see vse_fast.ops.contrastive.contrastive_loss).

    Accepts the published constructor, ``ContrastiveLoss(opt=opt, margin=opt.margin,
    max_violation=opt.max_violation)`` or positional ``(opt, margin, max_violation)``; ``opt`` is
    kept and unused. ``max_violation_on()`` / ``max_violation_off()`` switch modes (and print the
    published messages).

    forward(im (N, D), s (M, D), positives=None) -> 0-dim loss (fp32 for fp32/bf16/fp16 inputs);
    with positives=None, N == M and pair i is (im[i], s[i]) as in the published module.
    """

    def __init__(self, opt=None, margin=0, max_violation=False, *, reduction="sum", backend="auto"):
        super().__init__()
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
        return contrastive_loss(im, s, float(self.margin), bool(self.max_violation), positives=positives,
                                reduction=self.reduction, backend=self.backend)

    def extra_repr(self):
        return f"margin={self.margin}, max_violation={self.max_violation}, reduction={self.reduction!r}"
