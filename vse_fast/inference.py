"""Inference with a trained model: embed feature sets and caption strings, top-k search.

Example::

    from vse_fast.inference import Encoder, search

    enc = Encoder.from_checkpoint("runs/x/best.pth", data_path="data/coco_precomp")
    gallery = enc.encode_images([feats_0, feats_1, ...])          # (N, E), each feats_i (k_i, img_dim)
    queries = enc.encode_captions(["a dog on a red sofa", "two men riding horses"])
    scores, indices = search(queries, gallery, k=5)                # text -> image
    scores, indices = search(gallery, queries, k=1)                # image -> text

Captions are tokenized exactly as the evaluation data pipeline does (vse_fast.data, eval mode: no
augmentation); embeddings are L2-normalised (unless the model was trained without), so the
scores are cosine similarities.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from vse_fast.checks import positive_int
from vse_fast.data import collate, is_blank_caption
from vse_fast.eval import _autocast, _check_finite, caption_position_limit, check_tokenizer, eval_mode
from vse_fast.evaluation import numpy_to_torch


def _as_feature_set(x, index: int, img_dim: int) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = numpy_to_torch(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"feature set {index} must be a numpy array or tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"feature set {index} must have shape (k >= 1, {img_dim}), got {tuple(x.shape)}")
    if x.shape[1] != img_dim:
        raise ValueError(f"feature set {index} has feature size {x.shape[1]}, the model expects {img_dim}")
    if not x.is_floating_point():
        raise TypeError(f"feature set {index} must be floating point, got {x.dtype}")
    return x


def _set_lengths(lengths, sets: list) -> list:
    """``lengths`` as a list of ints, checked against the padded sets (each (K, img_dim))."""
    lengths = np.asarray(lengths.cpu() if isinstance(lengths, torch.Tensor) else lengths)
    if lengths.shape != (len(sets),) or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"lengths must be ({len(sets)},) integers, one per set, got {lengths.dtype} "
                         f"{lengths.shape}")
    k = sets[0].shape[0] if sets else 0
    bad = np.flatnonzero((lengths < 1) | (lengths > k))
    if bad.size:
        raise ValueError(f"lengths must be in [1, {k}] (the array's K); sets {bad[:8].tolist()} have "
                         f"{lengths[bad[:8]].tolist()}")
    return lengths.tolist()


class Encoder:
    """A trained VSEModel with its caption tokenizer, on one device. Each encode call runs the model in
    eval mode (no dropout, BatchNorm running statistics) and gives it back in the mode it had.

    Args:
        model: a VSEModel; tokenizer: its BERT tokenizer / BiGRU Vocabulary (vse_fast.data);
        device: default the model's; batch_size: sets or captions per forward;
        precision: "fp32", or "bf16"/"fp16" autocast on the device (CUDA or CPU).
    """

    def __init__(self, model, tokenizer, *, device=None, batch_size: int = 128, precision: str = "fp32"):
        batch_size = positive_int(batch_size, "batch_size")
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device)
        from vse_fast.data import CaptionEncoder  # the evaluation pipeline's caption -> ids (no augmentation)

        check_tokenizer(model, tokenizer)

        self.tokenizer = tokenizer
        self._text = CaptionEncoder(tokenizer, position_limit=caption_position_limit(model))
        self.batch_size = batch_size
        self.precision = precision
        self.img_dim = model.opt["img_dim"]

    @classmethod
    def from_checkpoint(cls, path: str, *, device=None, published: bool | None = None, text_model: str | None = None,
                        vocab_file: str | None = None, data_path: str | None = None, tokenizer=None,
                        gpo_backend: str = "auto", **kwargs):
        """Load our checkpoint or a published one (detected); the tokenizer is found as by
        ``python -m vse_fast.eval`` (text_model / vocab_file / checkpoint config / data_path).
        ``gpo_backend`` ('auto', 'triton' or 'torch') is chosen here, not taken from training."""
        from vse_fast.checkpoint import load_any_checkpoint
        from vse_fast.eval import resolve_tokenizer

        model, config = load_any_checkpoint(path, published=published, text_model=text_model,
                                            gpo_backend=gpo_backend)
        if tokenizer is None:
            tokenizer = resolve_tokenizer(model.opt, config, data_path, text_model=text_model, vocab_file=vocab_file,
                                          checkpoint_path=path)
        return cls(model, tokenizer, device=device, **kwargs)

    def tokenize(self, caption: str) -> list[int]:
        """Token ids of one caption as the evaluation pipeline builds them; ValueError (a
        vse_fast.data.CaptionTooLongError) when it has more tokens than the text encoder's positions."""
        if not isinstance(caption, str):
            raise TypeError(f"captions must be strings, got {type(caption).__name__}")
        if is_blank_caption(caption):
            raise ValueError(f"cannot encode an empty caption {caption!r} (whitespace or invisible characters only)")
        try:
            caption.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate: a cut emoji, or bytes decoded with surrogateescape
            raise ValueError(f"the caption holds a lone surrogate {caption[err.start]!r} at character {err.start}, "
                             "which is no Unicode text (a cut-off emoji, or bytes decoded with "
                             "errors='surrogateescape')") from None
        ids = self._text(caption).tolist()
        if len(ids) <= 2:  # start and end only
            raise ValueError(f"cannot encode the caption {caption!r}: the tokenizer keeps none of its characters")
        return ids

    @torch.inference_mode()
    def encode_images(self, feature_sets: Sequence, lengths=None) -> torch.Tensor:
        """feature_sets: a list of (k_i, img_dim) arrays/tensors (k_i may differ), or one (N, K, img_dim)
        array: full sets, or padded ones with ``lengths`` (N,) ints in [1, K], the valid rows of each
        (a split's ``{split}_lens.npy``). Returns (N, E) float32 embeddings on the encoder's device;
        ValueError naming the sets whose embeddings are not finite (NaN/inf features)."""
        if isinstance(feature_sets, (np.ndarray, torch.Tensor)):
            if feature_sets.ndim != 3:
                raise ValueError(f"an array of feature sets must be (N, K, {self.img_dim}), "
                                 f"got {tuple(feature_sets.shape)}")
            feature_sets = list(feature_sets)
            if lengths is not None:
                feature_sets = [x[:k] for x, k in zip(feature_sets, _set_lengths(lengths, feature_sets))]
        elif lengths is not None:
            raise ValueError("lengths go with one padded (N, K, img_dim) array; a list holds each set's own rows")
        sets = [_as_feature_set(x, i, self.img_dim) for i, x in enumerate(feature_sets)]
        if not sets:
            raise ValueError("no feature sets to encode")
        dtype = next(self.model.parameters()).dtype  # float32, or a float64 model's own dtype
        with eval_mode(self.model):
            out = []
            for a in range(0, len(sets), self.batch_size):
                batch = collate([{"features": x.to(dtype)} for x in sets[a:a + self.batch_size]])
                with _autocast(self.device, self.precision):
                    out.append(self.model.encode_images(batch["images"].to(self.device),
                                                        batch["img_lengths"].to(self.device)).float())
        emb = torch.cat(out)
        _check_finite(emb, "the embeddings of feature sets",
                      f"their features hold NaN or inf (or values beyond {dtype}'s range), or the model's weights do")
        return emb

    @torch.inference_mode()
    def encode_captions(self, captions: Sequence[str]) -> torch.Tensor:
        """captions: strings. Returns (M, E) float32 embeddings on the encoder's device. A caption
        that cannot be encoded raises an error naming its index; ValueError naming the captions whose
        embeddings are not finite."""
        if isinstance(captions, str):
            raise TypeError("captions must be a list of strings, got one string")
        if isinstance(captions, (set, frozenset, dict)):  # rows would come in no defined order (a dict: its keys)
            raise TypeError(f"captions must be a sequence of strings (a list, tuple or array), got a "
                            f"{type(captions).__name__}, whose order is not the rows' order")
        tokens = []
        for index, caption in enumerate(captions):
            try:
                tokens.append(self.tokenize(caption))
            except (TypeError, ValueError) as err:
                raise type(err)(f"caption {index}: {err}") from None
        if not tokens:
            raise ValueError("no captions to encode")
        with eval_mode(self.model):
            out = []
            for a in range(0, len(tokens), self.batch_size):
                batch = collate([{"tokens": torch.tensor(t, dtype=torch.long)} for t in tokens[a:a + self.batch_size]])
                with _autocast(self.device, self.precision):
                    out.append(self.model.encode_captions(batch["captions"].to(self.device),
                                                          batch["cap_lengths"].to(self.device)).float())
        emb = torch.cat(out)
        _check_finite(emb, "the embeddings of captions", "the model's weights hold NaN or inf (or fp16 overflowed)")
        return emb


def _top_k_lower_index_first(scores: torch.Tensor, k: int):
    """torch.topk over dim 1 of finite float32 scores (Q, G), with equal scores in index order: topk
    leaves both their order and which of them fill the last places unspecified (it changed with k)."""
    values, indices = scores.topk(k, dim=1)
    kth = values[:, -1:]
    straddling = torch.nonzero((scores == kth).sum(1) > (values == kth).sum(1)).squeeze(1)
    if straddling.numel():  # more rows tie with the k-th score than topk kept: take the first ones
        bits = (scores[straddling] + 0.0).view(torch.int32)  # + 0.0: -0.0 as 0.0
        ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)  # float order as integers
        position = torch.arange(scores.shape[1], device=scores.device)
        keys = ordered * 2**32 + (2**32 - 1 - position)  # higher score first, then the lower index
        indices[straddling] = keys.topk(k, dim=1).indices
        values[straddling] = scores[straddling].gather(1, indices[straddling])
    by_index = indices.argsort(dim=1)
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    by_score = values.argsort(dim=1, descending=True, stable=True)
    return values.gather(1, by_score), indices.gather(1, by_score)


@torch.no_grad()
def search(query_emb: torch.Tensor, gallery_emb: torch.Tensor, k: int = 10, *, block: int = 4096):
    """Top-k gallery rows for each query by inner product (cosine for normalised embeddings), in
    either direction (captions against images or images against captions).

    Args: query_emb (Q, E), gallery_emb (G >= 1, E) finite float tensors or arrays on one device;
        1 <= k <= G (int or numpy integer); block: queries scored per matmul (peak extra memory block * G).
    Returns: (scores (Q, k) float32, indices (Q, k) int64), best first; equal scores in gallery order
        (the lower index first, also where ties straddle the k-th place: the result does not depend on k).
    """
    query_emb, gallery_emb = (numpy_to_torch(x) if isinstance(x, np.ndarray) else torch.as_tensor(x)
                              for x in (query_emb, gallery_emb))
    for name, x in (("query_emb", query_emb), ("gallery_emb", gallery_emb)):
        if x.dim() != 2 or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating (count, embed) matrix, got shape {tuple(x.shape)} "
                             f"dtype {x.dtype}")
    if query_emb.shape[1] != gallery_emb.shape[1]:
        raise ValueError(f"embedding sizes differ: queries {query_emb.shape[1]}, gallery {gallery_emb.shape[1]}")
    if query_emb.device != gallery_emb.device:
        raise ValueError(f"query_emb is on {query_emb.device}, gallery_emb on {gallery_emb.device}")
    if gallery_emb.shape[0] == 0:
        raise ValueError("gallery_emb is empty (0 rows): there is nothing to search")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= gallery_emb.shape[0]:
        raise ValueError(f"k must be an int in [1, {gallery_emb.shape[0]}] (gallery size), got {k!r}")
    block = positive_int(block, "block")
    queries, gallery = query_emb.float(), gallery_emb.float()  # scored in float32
    for name, given, x in (("query_emb", query_emb, queries), ("gallery_emb", gallery_emb, gallery)):
        bad = torch.nonzero(~torch.isfinite(x).all(dim=1))
        if bad.numel():
            beyond = " (or values beyond float32's range)" if given.dtype == torch.float64 else ""
            raise ValueError(f"{name} row {int(bad[0])} contains NaN or inf{beyond} ({bad.numel()} such rows)")
    k = int(k)
    scores, indices = [], []
    for a in range(0, query_emb.shape[0], block):
        s, i = _top_k_lower_index_first(queries[a:a + block] @ gallery.T, k)
        scores.append(s)
        indices.append(i)
    if not scores:
        return torch.empty(0, k, device=gallery.device), torch.empty(0, k, dtype=torch.long, device=gallery.device)
    return torch.cat(scores), torch.cat(indices)
