"""Faithful re-implementation of the published VSE-infinity ``ContrastiveLoss`` (lib/loss.py).

Same arithmetic as the published module: the full (B, B) score matrix, hinge matrices for both
directions, the diagonal cleared with an identity mask built on the CPU each call and copied to
the scores' device (the published code moves it to CUDA whenever CUDA is available), and either
the sum of all violations (VSE0) or the hardest violation per row / column (VSE++).
"""
import torch
from torch import nn


class PublishedContrastiveLoss(nn.Module):
    """forward(im (B, D), s (B, D)) -> cost_s.sum() + cost_im.sum(), in the input dtype."""

    def __init__(self, opt=None, margin=0, max_violation=False):
        super().__init__()
        self.opt = opt
        self.margin = margin
        self.max_violation = max_violation

    def max_violation_on(self):
        self.max_violation = True
        print("Use VSE++ objective.")

    def max_violation_off(self):
        self.max_violation = False
        print("Use VSE0 objective.")

    def forward(self, im, s):
        scores = im.mm(s.t())
        diagonal = scores.diag().view(im.size(0), 1)
        row_threshold = diagonal.expand_as(scores)  # d[i] along row i
        col_threshold = diagonal.t().expand_as(scores)  # d[j] along column j
        cost_s = (self.margin + scores - row_threshold).clamp(min=0)  # caption retrieval
        cost_im = (self.margin + scores - col_threshold).clamp(min=0)  # image retrieval
        identity = (torch.eye(scores.size(0)) > 0.5).to(scores.device)
        cost_s = cost_s.masked_fill_(identity, 0)
        cost_im = cost_im.masked_fill_(identity, 0)
        if self.max_violation:
            cost_s = cost_s.max(1)[0]
            cost_im = cost_im.max(0)[0]
        return cost_s.sum() + cost_im.sum()
