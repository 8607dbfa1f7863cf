"""The VSE-infinity model for precomputed feature sets: image encoder, text encoder, joint embedding.

Structure and parameter names follow the published code (woodfrog/vse_infty, lib/encoders.py,
lib/modules/mlp.py, and the BiGRU text encoder of its `bigru` branch), so a published state dict
loads with ``strict=True`` (see vse_fast.checkpoint.load_published_checkpoint)::

    img_enc.fc.{weight,bias}                    Linear(img_dim, embed_size), Xavier-uniform init
    img_enc.mlp.layers.{0,1}.{weight,bias}      Linear(img_dim, embed/2), Linear(embed/2, embed)
    img_enc.mlp.bns.{0,1}.*                     BatchNorm1d(embed/2), BatchNorm1d(embed)
    img_enc.gpool.{gru,linear}.*                GPO(32, 32)
    txt_enc.bert.*, txt_enc.linear.*, txt_enc.gpool.*                   (text_encoder="bert")
    txt_enc.embed.weight, txt_enc.rnn.*, txt_enc.gpool.*                 (text_encoder="gru")

Published behaviour kept on purpose (parity of outputs and of loaded weights):

- The residual MLP applies BatchNorm to every position of the zero-padded (B, K, D) batch, padding
  included, exactly as the published ``MLP.forward`` (reshape to (B*K, D)). In train mode the batch
  statistics therefore depend on the padding of the batch (K = longest set of the batch, as the
  published collate pads); in eval mode (running statistics) padding has no effect on valid rows.
- ``mlp.bns.1`` exists but is never applied (the published MLP skips BN after its last layer), and
  the BERT pooler is computed by ``BertModel`` but its output unused. Their parameters are kept
  for strict loading and marked ``requires_grad=False``: they never receive a gradient in the
  published model either (AdamW skips them), and frozen they do not trip DDP's unused-parameter check.
- L2 normalisation is ``x / (||x||_2 + 1e-8)`` as published; we compute it in float32, so the
  embeddings are float32 also under autocast.
- BERT attention mask is ``captions != 0`` (pad id 0), pooled lengths are ``cap_lengths``. It is
  passed to BERT in 4-D form (3-D on transformers 4), which avoids transformers' host-side
  ``mask.all()`` check.

Differences (documented, not silent):

- No host synchronisation in ``forward``: pooling uses ``GPO.pool`` (lengths stay tensors) and the
  BiGRU runs on the padded batch with each sequence reversed within its length for the backward
  direction instead of ``pack_padded_sequence(lengths.cpu())``. Same outputs at valid positions.
- With ``use_bi_gru=False`` the published code averages the two halves of a one-directional output
  (an embed_size/2 embedding); here the one direction is used as is.
- ``pooling`` (ours; default ``"gpo"``, the published model): ``"mean"``, ``"max"`` or ``"kmax"`` (with
  ``pool_k``) puts the paper's fixed baselines in place of GPO in both encoders (the ``gpool``
  attribute; they have no parameters, so the state dict has no ``gpool.*`` entries).
- Precomputed grid/frame features: ``precomp_enc_type="backbone"`` (or ``"none"``) is the published
  fc-only aggregation (``EncoderImageFull.image_encoder`` without the CNN); the CNN is not part of
  vse_fast, features must be precomputed.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from vse_fast.checks import positive_int

PRECOMP_ENC_TYPES = ("basic", "backbone", "none")
TEXT_ENCODERS = ("bert", "gru")
GPO_BACKENDS = ("auto", "triton", "torch")
POOLINGS = ("gpo", "mean", "max", "kmax")  # GPO (published) and the paper's fixed baselines (ours)


def model_defaults() -> dict:
    """Model options with their published names and defaults (arguments.py of vse_infty)."""
    return dict(
        embed_size=1024,
        img_dim=2048,
        precomp_enc_type="basic",
        no_imgnorm=False,
        no_txtnorm=False,
        text_encoder="bert",
        text_model=None,  # local BERT directory (config + weights), loaded offline
        bert_config=None,  # path of a BertConfig json: random init
        bert_config_dict=None,  # the BertConfig as a dict (stored in our checkpoints)
        vocab_size=None,  # BiGRU vocabulary size
        word_dim=300,
        num_layers=1,
        use_bi_gru=True,
        gpo_backend="auto",
        pooling="gpo",  # ours: "mean", "max", "kmax" (mean of the top pool_k) replace GPO in both encoders
        pool_k=None,  # k of pooling="kmax"
    )


def resolve_model_options(opt: Any = None, **overrides) -> dict:
    """Defaults updated with the model options found in ``opt`` (an argparse.Namespace, a dict or
    None; other keys are ignored) and ``overrides``, then validated. Returns a dict of plain types."""
    if opt is None:
        given = {}
    elif isinstance(opt, argparse.Namespace):
        given = vars(opt)
    elif isinstance(opt, Mapping):
        given = dict(opt)
    else:
        raise TypeError(f"opt must be an argparse.Namespace, a dict or None, got {type(opt).__name__}")
    options = model_defaults()
    for key in options:
        if key in given:
            options[key] = given[key]
    unknown = sorted(set(overrides) - set(options))
    if unknown:
        raise TypeError(f"unknown model option(s) {unknown}; known: {sorted(options)}")
    options.update(overrides)
    _validate_options(options)
    return options


def _validate_options(o: dict) -> None:
    for key in ("embed_size", "img_dim", "word_dim", "num_layers"):
        positive_int(o[key], f"model option {key}", numpy_ints=False)
    for key in ("no_imgnorm", "no_txtnorm", "use_bi_gru"):
        value = o[key]
        if not isinstance(value, bool):  # a string such as "false" would be truthy
            raise ValueError(f"model option {key} must be a bool (True/False), got {type(value).__name__} {value!r}")
    if o["precomp_enc_type"] not in PRECOMP_ENC_TYPES:
        raise ValueError(f"precomp_enc_type must be one of {PRECOMP_ENC_TYPES}, got {o['precomp_enc_type']!r}")
    if o["precomp_enc_type"] == "basic" and o["embed_size"] < 2:
        raise ValueError(f"precomp_enc_type='basic' needs embed_size >= 2 (MLP hidden = embed_size // 2), "
                         f"got {o['embed_size']}")
    if o["text_encoder"] not in TEXT_ENCODERS:
        raise ValueError(f"text_encoder must be one of {TEXT_ENCODERS}, got {o['text_encoder']!r}")
    if o["gpo_backend"] not in GPO_BACKENDS:
        raise ValueError(f"gpo_backend must be one of {GPO_BACKENDS}, got {o['gpo_backend']!r}")
    if o["pooling"] not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {o['pooling']!r}")
    k = o["pool_k"]
    if o["pooling"] == "kmax" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"pooling='kmax' needs pool_k, a positive int; got {k!r}")
    if o["pooling"] != "kmax" and k is not None:
        raise ValueError(f"pool_k={k!r} is only used by pooling='kmax', not {o['pooling']!r}")
    if o["text_encoder"] == "bert":
        if not (o["text_model"] or o["bert_config"] or o["bert_config_dict"]):
            raise ValueError("text_encoder='bert' needs text_model (a local BERT directory), bert_config "
                             "(a BertConfig json file) or bert_config_dict")
    else:
        size = o["vocab_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"text_encoder='gru' needs vocab_size, a positive int; got {size!r}")


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """Published L2 normalisation ``x / (||x|| + eps)``, computed and returned in float32."""
    x = x.float()
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + eps)


def _make_pool(pooling: str = "gpo", pool_k: int | None = None, gpo_backend: str = "auto") -> nn.Module:
    """The set pooling of an encoder (attribute ``gpool``): the published GPO(32, 32), or a fixed
    baseline without parameters (AvgPool, MaxPool, KMaxPool(pool_k)). gpo_backend "torch" keeps the
    GPO coefficient table on torch too (no Triton anywhere); "auto" and "triton" build it with Triton
    on CUDA."""
    from vse_fast.modules.gpo import GPO, AvgPool, KMaxPool, MaxPool

    if pooling == "gpo":
        return GPO(32, 32, table_backend="torch" if gpo_backend == "torch" else "auto")
    if pooling == "kmax":
        return KMaxPool(pool_k)
    return AvgPool() if pooling == "mean" else MaxPool()


def _check_on_host(t: torch.Tensor) -> bool:
    """Whether values of `t` may be read on the host: CPU tensors yes (no sync), CUDA tensors no."""
    return not t.is_cuda


def _check_length_values(lengths: torch.Tensor, longest: int, name: str, axis: str) -> None:
    """Every entry of `lengths` (B,) must be a whole number in [1, longest] (NaN/inf fail);
    `longest` = the padded size, named `axis` in the messages.
    CPU tensors: a ValueError naming the first offending values. CUDA tensors: no host sync, a
    device-side assert (as contrastive_loss does for positives): a bad value fails at a later
    synchronisation with this message and ends the CUDA context. A few elementwise ops on (B,)."""
    if lengths.dtype == torch.bool or lengths.is_complex():
        raise TypeError(f"{name} must be an integer or float tensor, got {lengths.dtype}")
    n = lengths.detach()
    ok = (n >= 1) & (n <= longest)
    if n.is_floating_point():
        ok &= n == n.round()
    if not _check_on_host(n):
        torch._assert_async(ok.all(), f"{name} must hold whole numbers in [1, {axis}={longest}]")
    elif not bool(ok.all()):
        raise ValueError(f"{name} must hold whole numbers in [1, {axis}={longest}] ({axis} = the padded "
                         f"size), got {n[~ok][:5].tolist()}")


def _check_sets(images: torch.Tensor, lengths: torch.Tensor, img_dim: int) -> None:
    if not isinstance(images, torch.Tensor) or not isinstance(lengths, torch.Tensor):
        raise TypeError(f"images and img_lengths must be tensors, got {type(images).__name__} and "
                        f"{type(lengths).__name__}")
    if images.dim() != 3 or not images.is_floating_point():
        raise ValueError(f"images must be a floating (B, K, D) tensor, got shape {tuple(images.shape)} "
                         f"dtype {images.dtype}")
    if images.shape[-1] != img_dim:
        raise ValueError(f"images have feature size {images.shape[-1]}, the model expects img_dim={img_dim}")
    if lengths.dim() != 1 or lengths.shape[0] != images.shape[0]:
        raise ValueError(f"img_lengths must have shape ({images.shape[0]},), got {tuple(lengths.shape)}")
    if lengths.device != images.device:
        raise ValueError(f"img_lengths must be on the images' device {images.device}, got {lengths.device}")
    _check_length_values(lengths, images.shape[1], "img_lengths", "K")


def _check_captions(captions: torch.Tensor, lengths: torch.Tensor) -> None:
    if not isinstance(captions, torch.Tensor) or not isinstance(lengths, torch.Tensor):
        raise TypeError(f"captions and cap_lengths must be tensors, got {type(captions).__name__} and "
                        f"{type(lengths).__name__}")
    if captions.dim() != 2 or captions.is_floating_point() or captions.is_complex():
        raise ValueError(f"captions must be an integer (B, T) tensor of token ids, got shape "
                         f"{tuple(captions.shape)} dtype {captions.dtype}")
    if lengths.dim() != 1 or lengths.shape[0] != captions.shape[0]:
        raise ValueError(f"cap_lengths must have shape ({captions.shape[0]},), got {tuple(lengths.shape)}")
    if lengths.device != captions.device:
        raise ValueError(f"cap_lengths must be on the captions' device {captions.device}, got {lengths.device}")
    _check_length_values(lengths, captions.shape[1], "cap_lengths", "T")


class MLP(nn.Module):
    """Published residual-branch MLP: ``layers[i]`` Linear, ``bns[i]`` BatchNorm1d (the last never
    applied). (B, K, D_in) -> (B, K, D_out); BN statistics over all B*K positions (padding included)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        self.output_dim = output_dim
        self.num_layers = num_layers
        hidden = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + hidden, hidden + [output_dim]))
        self.bns = nn.ModuleList(nn.BatchNorm1d(k) for k in hidden + [output_dim])
        self.bns[-1].requires_grad_(False)  # never applied (published quirk), kept for strict loading

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, k, dim = x.shape
        x = x.reshape(batch * k, dim)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(self.bns[i](x))
        return x.view(batch, k, self.output_dim)


class ImageEncoder(nn.Module):
    """Published ``EncoderImageAggr``: fc (+ residual MLP for region features) -> GPO -> L2 norm.

    forward(images (B, K, img_dim) float, lengths (B,) int or float, valid rows first) -> (B, embed) fp32.
    """

    def __init__(self, img_dim: int, embed_size: int, precomp_enc_type: str = "basic",
                 no_imgnorm: bool = False, gpo_backend: str = "auto", *, pooling: str = "gpo",
                 pool_k: int | None = None):
        super().__init__()
        self.img_dim = img_dim
        self.embed_size = embed_size
        self.no_imgnorm = no_imgnorm
        self.precomp_enc_type = precomp_enc_type
        self.fc = nn.Linear(img_dim, embed_size)
        self.mlp = MLP(img_dim, embed_size // 2, embed_size, 2) if precomp_enc_type == "basic" else None
        self.gpool = _make_pool(pooling, pool_k, gpo_backend)
        self.gpo_backend = gpo_backend
        bound = math.sqrt(6.0) / math.sqrt(img_dim + embed_size)  # published Xavier init of fc
        with torch.no_grad():
            self.fc.weight.uniform_(-bound, bound)
            self.fc.bias.zero_()

    def forward(self, images: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        _check_sets(images, lengths, self.img_dim)
        features = self.fc(images)
        if self.mlp is not None:
            features = self.mlp(images) + features
        pooled = self.gpool.pool(features, lengths, backend=self.gpo_backend)
        return pooled.float() if self.no_imgnorm else l2norm(pooled)


def _bert_attention_mask(captions: torch.Tensor, bert: nn.Module) -> torch.Tensor:
    """Published mask ``captions != 0`` in a form BERT takes without a host sync. Transformers 5
    returns a 4-D mask as is, while from a 2-D one it builds the 4-D mask after asking ``mask.all()``
    on the host (to drop the mask when nothing is padded). Transformers 4 refuses a 4-D mask and asks
    the same of a 2-D one under SDPA; from a 3-D (B, T, T) mask it builds the 4-D additive mask
    without asking. Same attention in every form."""
    keep = captions != 0
    if _transformers_major() < 5:
        return keep[:, None, :].expand(-1, keep.shape[1], -1).long()  # (B, T, T), one row per query
    keep = keep[:, None, None, :]  # (B, 1, 1, T)
    implementation = getattr(bert.config, "_attn_implementation", None)
    if implementation == "sdpa":
        return keep  # boolean: True = attend
    if implementation == "eager":
        return torch.zeros(keep.shape, device=captions.device).masked_fill_(~keep, torch.finfo(torch.float32).min)
    return keep.squeeze(1).squeeze(1).long()  # other kernels (flash attention ...) take the 2-D mask


@functools.lru_cache(maxsize=None)
def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".", 1)[0])


class BertTextEncoder(nn.Module):
    """Published ``EncoderText`` (BERT): BERT -> linear -> GPO over the first cap_lengths tokens -> L2 norm.

    forward(captions (B, T) int64 ids, pad 0, [CLS] ... [SEP]; lengths (B,)) -> (B, embed) fp32.
    """

    def __init__(self, bert: nn.Module, embed_size: int, no_txtnorm: bool = False, gpo_backend: str = "auto", *,
                 pooling: str = "gpo", pool_k: int | None = None):
        super().__init__()
        self.embed_size = embed_size
        self.no_txtnorm = no_txtnorm
        self.bert = bert
        if getattr(self.bert, "pooler", None) is not None:
            self.bert.pooler.requires_grad_(False)  # computed by BertModel, output unused (as published)
        self.linear = nn.Linear(bert.config.hidden_size, embed_size)
        self.gpool = _make_pool(pooling, pool_k, gpo_backend)
        self.gpo_backend = gpo_backend

    def forward(self, captions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        _check_captions(captions, lengths)
        hidden = self.bert(input_ids=captions, attention_mask=_bert_attention_mask(captions, self.bert))[0]
        pooled = self.gpool.pool(self.linear(hidden), lengths, backend=self.gpo_backend)
        return pooled.float() if self.no_txtnorm else l2norm(pooled)


def _reverse_within_length(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """x (B, T, C): position t < n_b gets x[b, n_b-1-t], positions >= n_b stay. An involution."""
    steps = torch.arange(x.shape[1], device=x.device)
    n = lengths.to(device=x.device, dtype=torch.long).unsqueeze(1)
    index = torch.where(steps < n, n - 1 - steps, steps)  # (B, T)
    return x.gather(1, index.unsqueeze(-1).expand_as(x))


class GRUTextEncoder(nn.Module):
    """Published BiGRU ``EncoderText``: embed -> (Bi)GRU -> directions averaged -> GPO -> L2 norm.

    The GRU runs on the padded batch without packing (no host sync): the forward direction is
    unaffected by trailing padding; the backward direction runs forward over each sequence reversed
    within its length. forward(captions (B, T) int64, lengths (B,)) -> (B, embed) fp32.
    """

    def __init__(self, vocab_size: int, embed_size: int, word_dim: int, num_layers: int,
                 use_bi_gru: bool = True, no_txtnorm: bool = False, gpo_backend: str = "auto", *,
                 pooling: str = "gpo", pool_k: int | None = None):
        super().__init__()
        self.embed_size = embed_size
        self.no_txtnorm = no_txtnorm
        self.use_bi_gru = use_bi_gru
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True, bidirectional=use_bi_gru)
        self.gpool = _make_pool(pooling, pool_k, gpo_backend)
        self.gpo_backend = gpo_backend
        with torch.no_grad():
            self.embed.weight.uniform_(-0.1, 0.1)
        # One-layer one-direction GRUs run with the parameters of self.rnn (functional_call); not
        # registered as submodules, so the state dict keeps the published names only.
        self._cells = [nn.GRU(word_dim if layer == 0 else embed_size * (2 if use_bi_gru else 1), embed_size,
                              1, batch_first=True) for layer in range(num_layers)]

    def _direction(self, layer: int, x: torch.Tensor, suffix: str) -> torch.Tensor:
        cell = self._cells[layer]  # its own parameters are all replaced below
        params = {f"{name}_l0": getattr(self.rnn, f"{name}_l{layer}{suffix}")
                  for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
        return functional_call(cell, params, (x,))[0]

    def run_rnn(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T, word_dim) embedded tokens -> (B, T, embed) GRU outputs (directions averaged),
        zero at positions >= length."""
        for layer in range(self.rnn.num_layers):
            forward = self._direction(layer, x, "")
            if self.use_bi_gru:
                backward = _reverse_within_length(
                    self._direction(layer, _reverse_within_length(x, lengths), "_reverse"), lengths)
                x = torch.cat([forward, backward], dim=-1)
            else:
                x = forward
        if self.use_bi_gru:
            x = (x[..., : self.embed_size] + x[..., self.embed_size:]) / 2
        valid = torch.arange(x.shape[1], device=x.device) < lengths.to(x.device).unsqueeze(1)
        return x * valid.unsqueeze(-1).to(x.dtype)

    def forward(self, captions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        _check_captions(captions, lengths)
        hidden = self.run_rnn(self.embed(captions), lengths)
        pooled = self.gpool.pool(hidden, lengths, backend=self.gpo_backend)
        return pooled.float() if self.no_txtnorm else l2norm(pooled)


def _bert_config(options: dict, transformers_module):
    BertConfig = transformers_module.BertConfig
    if options["bert_config_dict"]:
        return BertConfig.from_dict(dict(options["bert_config_dict"]))
    if options["bert_config"]:
        path = options["bert_config"]
        if not os.path.isfile(path):
            raise ValueError(f"bert_config {path!r} is not a file (expected a BertConfig json)")
        with open(path, encoding="utf-8") as f:
            fields = json.load(f)
        if not isinstance(fields, dict):
            raise ValueError(f"bert_config {path!r} holds a {type(fields).__name__}, not a json object of "
                             "BertConfig fields")
        return BertConfig.from_dict(fields)
    path = options["text_model"]
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"text_model {path!r} has no config.json (expected a local BERT directory)")
    return BertConfig.from_pretrained(path, local_files_only=True)


def build_bert(options: dict, load_pretrained: bool = True) -> nn.Module:
    """BertModel for the options: pretrained weights from ``text_model`` (offline) when
    ``load_pretrained`` and no config override is given, else random init from the config."""
    import transformers

    text_model = options["text_model"]
    if load_pretrained and text_model and not options["bert_config_dict"] and not options["bert_config"]:
        if not os.path.isdir(text_model):
            raise ValueError(f"text_model {text_model!r} is not a directory (expected a local BERT "
                             "directory saved with save_pretrained; nothing is downloaded)")
        # float32 weights whatever dtype the directory was saved in (transformers >= 5 keeps a saved
        # bf16/fp16 dtype; the published code, on transformers 4, always got float32)
        return transformers.BertModel.from_pretrained(text_model, local_files_only=True).float()
    return transformers.BertModel(_bert_config(options, transformers))


def _plain(obj):
    """JSON round trip: plain types only (safe for weights_only checkpoints)."""
    return json.loads(json.dumps(obj, default=str))


class VSEModel(nn.Module):
    """Image and text encoders into one joint space.

    forward(images (B, K, img_dim) float, img_lengths (B,), captions (B, T) int64, cap_lengths (B,))
    -> (img_emb (B, embed) fp32, cap_emb (B, embed) fp32), L2-normalised unless no_imgnorm/no_txtnorm.
    No host synchronisation. The length values are checked (whole numbers in [1, K] / [1, T]): a
    ValueError for CPU tensors, a device-side assert (no sync) for CUDA tensors. ``opt`` holds the
    resolved model options (plain types, incl. the BERT config as ``bert_config_dict``): store it in
    checkpoints, ``build_model(opt)`` rebuilds the model.

    Example::

        model = build_model(dict(embed_size=64, img_dim=32, text_encoder="gru", vocab_size=100))
        img_emb, cap_emb = model(images, img_lengths, captions, cap_lengths)
    """

    def __init__(self, img_enc: nn.Module, txt_enc: nn.Module, opt: dict):
        super().__init__()
        self.img_enc = img_enc
        self.txt_enc = txt_enc
        self.opt = dict(opt)

    def encode_images(self, images: torch.Tensor, img_lengths: torch.Tensor) -> torch.Tensor:
        return self.img_enc(images, img_lengths)

    def encode_captions(self, captions: torch.Tensor, cap_lengths: torch.Tensor) -> torch.Tensor:
        return self.txt_enc(captions, cap_lengths)

    def forward(self, images, img_lengths, captions, cap_lengths):
        return self.img_enc(images, img_lengths), self.txt_enc(captions, cap_lengths)

    def compile_text_backbone(self, **compile_kwargs) -> None:
        """Compile BERT in place with ``torch.compile`` (``nn.Module.compile``; dynamic shapes, as
        caption lengths vary by batch). Parameter names, state dicts and checkpoints are unchanged.
        The rest of the model stays eager: its few ops are our Triton kernels and a handful of
        matmuls. ``compile_kwargs`` go to ``torch.compile`` (e.g. ``mode``, ``backend``)."""
        bert = getattr(self.txt_enc, "bert", None)
        if bert is None:
            raise ValueError("compile_text_backbone compiles BERT; this model's text encoder is "
                             f"{type(self.txt_enc).__name__}, which has no BERT")
        bert.compile(**{"dynamic": True, **compile_kwargs})

    def param_groups(self, lr: float, bert_lr_factor: float = 0.1, weight_decay: float = 1e-4) -> list[dict]:
        """AdamW parameter groups as published: text (non-BERT) at lr, BERT at lr*bert_lr_factor,
        image encoder at lr, one weight decay. Parameters with requires_grad=False are left out."""
        def trainable(params):
            return [p for p in params if p.requires_grad]

        bert = getattr(self.txt_enc, "bert", None)
        bert_ids = {id(p) for p in bert.parameters()} if bert is not None else set()
        groups = [dict(name="text", params=trainable(p for p in self.txt_enc.parameters() if id(p) not in bert_ids),
                       lr=lr, weight_decay=weight_decay)]
        if bert is not None:
            groups.append(dict(name="bert", params=trainable(bert.parameters()), lr=lr * bert_lr_factor,
                               weight_decay=weight_decay))
        groups.append(dict(name="image", params=trainable(self.img_enc.parameters()), lr=lr,
                           weight_decay=weight_decay))
        return groups


def build_model(opt: Any = None, *, load_pretrained: bool = True, **overrides) -> VSEModel:
    """VSEModel from options (argparse.Namespace, dict or None; see ``model_defaults``).

    BERT: pretrained weights from ``text_model`` (a local directory, offline) when
    ``load_pretrained``; random init from ``bert_config_dict`` / ``bert_config`` / text_model's
    config.json otherwise (checkpoint loaders pass ``load_pretrained=False``).
    """
    options = resolve_model_options(opt, **overrides)
    pool = dict(pooling=options["pooling"], pool_k=options["pool_k"])
    img_enc = ImageEncoder(options["img_dim"], options["embed_size"], options["precomp_enc_type"],
                           options["no_imgnorm"], options["gpo_backend"], **pool)
    if options["text_encoder"] == "bert":
        bert = build_bert(options, load_pretrained=load_pretrained)
        options["bert_config_dict"] = _plain(bert.config.to_dict())
        txt_enc = BertTextEncoder(bert, options["embed_size"], options["no_txtnorm"], options["gpo_backend"], **pool)
    else:
        txt_enc = GRUTextEncoder(options["vocab_size"], options["embed_size"], options["word_dim"],
                                 options["num_layers"], options["use_bi_gru"], options["no_txtnorm"],
                                 options["gpo_backend"], **pool)
    return VSEModel(img_enc, txt_enc, _plain(options))
