"""Published-style VSE-infinity encoders (woodfrog/vse_infty lib/encoders.py, lib/modules/mlp.py and
the BiGRU text encoder of its `bigru` branch), re-implemented for this project's tests and benches.

Same modules, parameter names, initialisation and forward computations as published, built from
the published-style GPO of tests/published/gpo.py: ``lengths`` go to the host (``.cpu()``,
``int(lengths.max())``), the BiGRU packs its sequences, BatchNorm runs over every padded position.
``published_state_dicts(model)`` / ``load_into_published`` convert between our VSEModel state dict
and the published ``[img_state, txt_state]`` pair.
"""
import argparse

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from tests.published import gpo as _published_gpo

PublishedGPO = getattr(_published_gpo, "PublishedGPO", None) or getattr(_published_gpo, "GPO")


def l2norm(x, dim, eps=1e-8):
    return torch.div(x, torch.pow(x, 2).sum(dim=dim, keepdim=True).sqrt() + eps)


class PublishedMLP(nn.Module):
    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        self.output_dim = output_dim
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))
        self.bns = nn.ModuleList(nn.BatchNorm1d(k) for k in h + [output_dim])

    def forward(self, x):
        b, n, d = x.size()
        x = x.reshape(b * n, d)
        for i, (bn, layer) in enumerate(zip(self.bns, self.layers)):
            x = F.relu(bn(layer(x))) if i < self.num_layers - 1 else layer(x)
        return x.view(b, n, self.output_dim)


class PublishedEncoderImageAggr(nn.Module):
    def __init__(self, img_dim, embed_size, precomp_enc_type="basic", no_imgnorm=False):
        super().__init__()
        self.embed_size = embed_size
        self.no_imgnorm = no_imgnorm
        self.fc = nn.Linear(img_dim, embed_size)
        self.precomp_enc_type = precomp_enc_type
        if precomp_enc_type == "basic":
            self.mlp = PublishedMLP(img_dim, embed_size // 2, embed_size, 2)
        self.gpool = PublishedGPO(32, 32)
        r = np.sqrt(6.0) / np.sqrt(self.fc.in_features + self.fc.out_features)
        self.fc.weight.data.uniform_(-r, r)
        self.fc.bias.data.fill_(0)

    def forward(self, images, image_lengths):
        features = self.fc(images)
        if self.precomp_enc_type == "basic":
            features = self.mlp(images) + features
        features, _ = self.gpool(features, image_lengths)
        if not self.no_imgnorm:
            features = l2norm(features, dim=-1)
        return features


class PublishedEncoderTextBert(nn.Module):
    """``bert`` is a transformers BertModel (published: from_pretrained('bert-base-uncased'))."""

    def __init__(self, bert, embed_size, no_txtnorm=False):
        super().__init__()
        self.embed_size = embed_size
        self.no_txtnorm = no_txtnorm
        self.bert = bert
        self.linear = nn.Linear(bert.config.hidden_size, embed_size)
        self.gpool = PublishedGPO(32, 32)

    def forward(self, x, lengths):
        bert_attention_mask = (x != 0).float()
        bert_emb = self.bert(x, bert_attention_mask)[0]
        cap_emb = self.linear(bert_emb)
        pooled, _ = self.gpool(cap_emb, lengths.to(cap_emb.device))
        if not self.no_txtnorm:
            pooled = l2norm(pooled, dim=-1)
        return pooled


class PublishedEncoderTextBiGRU(nn.Module):
    def __init__(self, vocab_size, embed_size, word_dim, num_layers, use_bi_gru=True, no_txtnorm=False):
        super().__init__()
        self.embed_size = embed_size
        self.no_txtnorm = no_txtnorm
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True, bidirectional=use_bi_gru)
        self.gpool = PublishedGPO(32, 32)
        self.embed.weight.data.uniform_(-0.1, 0.1)

    def forward(self, x, lengths):
        x_emb = self.embed(x)
        # published: sorted batches, pack_padded_sequence(..., lengths.cpu()); unsorted allowed here
        packed = pack_padded_sequence(x_emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        cap_emb, cap_len = pad_packed_sequence(out, batch_first=True)
        cap_emb = (cap_emb[:, :, : cap_emb.size(2) // 2] + cap_emb[:, :, cap_emb.size(2) // 2:]) / 2
        pooled, _ = self.gpool(cap_emb, cap_len.to(cap_emb.device))
        if not self.no_txtnorm:
            pooled = l2norm(pooled, dim=-1)
        return pooled


class PublishedVSE(nn.Module):
    """The two published encoders; ``state_dict_pair()`` is the published checkpoint's 'model' entry."""

    def __init__(self, img_enc, txt_enc):
        super().__init__()
        self.img_enc = img_enc
        self.txt_enc = txt_enc

    def forward(self, images, img_lengths, captions, cap_lengths):
        return self.img_enc(images, img_lengths), self.txt_enc(captions, cap_lengths)

    def encode_images(self, images, img_lengths):
        return self.img_enc(images, img_lengths)

    def encode_captions(self, captions, cap_lengths):
        return self.txt_enc(captions, cap_lengths)

    def state_dict_pair(self):
        return [self.img_enc.state_dict(), self.txt_enc.state_dict()]


def build_published(embed_size, img_dim, precomp_enc_type="basic", *, bert=None, vocab_size=None,
                    word_dim=300, num_layers=1, use_bi_gru=True, no_imgnorm=False, no_txtnorm=False):
    """Published-style model: BERT text encoder when ``bert`` is given, BiGRU otherwise."""
    img_enc = PublishedEncoderImageAggr(img_dim, embed_size, precomp_enc_type, no_imgnorm)
    if bert is not None:
        txt_enc = PublishedEncoderTextBert(bert, embed_size, no_txtnorm)
    else:
        txt_enc = PublishedEncoderTextBiGRU(vocab_size, embed_size, word_dim, num_layers, use_bi_gru, no_txtnorm)
    return PublishedVSE(img_enc, txt_enc)


def published_opt(**kwargs):
    """An argparse.Namespace like the published checkpoints' 'opt' (a subset of arguments.py)."""
    opt = dict(data_name="coco_precomp", margin=0.2, num_epochs=25, batch_size=128, word_dim=300,
               embed_size=1024, grad_clip=2.0, learning_rate=5e-4, lr_update=15, optim="adam",
               max_violation=True, img_dim=2048, no_imgnorm=False, no_txtnorm=False,
               precomp_enc_type="basic", vse_mean_warmup_epochs=1, logger_name="runs/x/log",
               model_name="runs/x/checkpoint", vocab_size=30522)
    opt.update(kwargs)
    return argparse.Namespace(**opt)


def published_checkpoint(model, opt, *, data_parallel=False, epoch=3, best_rsum=321.5, eiters=1234):
    """The dict published train.py saves: {'epoch', 'model': [img, txt], 'best_rsum', 'opt', 'Eiters'};
    ``data_parallel`` adds the "module." prefix nn.DataParallel gives the keys."""
    pair = model.state_dict_pair()
    if data_parallel:
        pair = [{"module." + k: v for k, v in sd.items()} for sd in pair]
    return {"epoch": epoch, "model": pair, "best_rsum": best_rsum, "opt": opt, "Eiters": eiters}
