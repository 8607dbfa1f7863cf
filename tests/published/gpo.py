"""Faithful re-implementation of the published VSE-infinity GPO (woodfrog/vse_infty,
lib/modules/aggr/gpo.py), written for this project: the parity oracle of tests/test_gpo_module.py and
the baseline of bench/bench_gpo.py.

Behaviour reproduced: sinusoidal position encodings built on the CPU in float32 and cached per length;
a bidirectional GRU run on a packed batch (one sequence per sample, its own length, so the reverse
direction starts at position n-1); the two directions averaged; a bias-free linear score per position;
positions >= n scored -10000; softmax of score / 0.1 over positions; the features cut to the longest
set, padding filled with -10000, sorted descending over the set axis per feature dimension, padding
zeroed, summed with the weights. Returns (pooled (B, D), weights (B, L, 1)).
"""
import math

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


def sinusoid_table(d_pe, length):
    """(length, d_pe) float32: even channels sin(pos * f_i), odd channels cos(pos * f_i),
    f_i = exp(-2i * ln(10000) / d_pe)."""
    if d_pe % 2:
        raise ValueError(f"sin/cos position encodings need an even dimension, got {d_pe}")
    table = torch.zeros(length, d_pe)
    pos = torch.arange(0, length).unsqueeze(1).float()
    freq = torch.exp(torch.arange(0, d_pe, 2, dtype=torch.float) * -(math.log(10000.0) / d_pe))
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


class PublishedGPO(nn.Module):
    def __init__(self, d_pe, d_hidden):
        super().__init__()
        self.d_pe, self.d_hidden = d_pe, d_hidden
        self.pe_database = {}
        self.gru = nn.GRU(d_pe, d_hidden, 1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(d_hidden, 1, bias=False)

    def get_pe(self, length):
        length = int(length)
        if length not in self.pe_database:
            self.pe_database[length] = sinusoid_table(self.d_pe, length)
        return self.pe_database[length]

    def compute_pool_weights(self, lengths, features):
        batch = lengths.size(0)
        longest = int(lengths.max())
        pes = self.get_pe(longest).unsqueeze(0).repeat(batch, 1, 1).to(lengths.device)
        mask = torch.arange(longest).expand(batch, longest).to(lengths.device)
        mask = (mask < lengths.long().unsqueeze(1)).unsqueeze(-1)  # (B, L, 1)
        pes = pes.masked_fill(mask == 0, 0)

        self.gru.flatten_parameters()
        packed = pack_padded_sequence(pes, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out_emb, _ = pad_packed_sequence(out, batch_first=True)
        half = out_emb.size(2) // 2
        out_emb = (out_emb[:, :, :half] + out_emb[:, :, half:]) / 2
        scores = self.linear(out_emb)
        scores[torch.where(mask == 0)] = -10000
        return torch.softmax(scores / 0.1, 1), mask

    def forward(self, features, lengths):
        weights, mask = self.compute_pool_weights(lengths, features)
        features = features[:, : int(lengths.max()), :]
        ordered = features.masked_fill(mask == 0, -10000)
        ordered = ordered.sort(dim=1, descending=True)[0]
        ordered = ordered.masked_fill(mask == 0, 0)
        return (ordered * weights).sum(1), weights


def published_pool(features, lengths, weights):
    """The published pooling step alone: features (B, K, D), lengths (B,), weights (B, L) over ranks,
    L = max(lengths). Returns (B, D)."""
    longest = weights.shape[1]
    mask = (torch.arange(longest, device=features.device) < lengths.long().unsqueeze(1)).unsqueeze(-1)
    ordered = features[:, :longest].masked_fill(mask == 0, -10000)
    ordered = ordered.sort(dim=1, descending=True)[0].masked_fill(mask == 0, 0)
    return (ordered * weights.unsqueeze(-1)).sum(1)
