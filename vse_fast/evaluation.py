"""Retrieval metrics for image/video-text matching: recall@K, median and mean rank, rsum.

Two entry points:

* `i2t` / `t2i`: drop-ins for the published VSE-infinity functions (lib/evaluation.py) working on a
  precomputed similarity matrix ``sims`` (npts, caps_per_item * npts) numpy. Same return values, but
  vectorised and blocked: the rank of a query is the number of gallery items scoring strictly
  higher than its best positive, counted a block of rows (or columns) at a time, so no argsort (but
  for tied queries, below) and no full-size temporaries (a 5000 x 25000 float32 matrix stays the
  only 500 MB buffer).
* `retrieval_metrics` / `coco_5fold`: the same metrics straight from embeddings (torch tensors, CPU
  or CUDA), never holding the full similarity matrix: blocks of images compute ``img_block @ cap.T``
  and count both directions from it (a second pass recomputes the same blocks for text->image, whose
  positives must come from that very arithmetic). Ensembles (several (img, cap) pairs)
  average their similarities. Similarities are float64 by default, as published (its encode_data
  keeps the embeddings in float64 numpy arrays), so the numbers equal the published evaluation's.

Tie rule, as published: a query's ranking is ``np.argsort(scores)[::-1]``, and its rank is the first
position of a positive in it. Where no other gallery item ties exactly with the best positive, that
is the number of items scoring strictly higher, which is what is counted. The few queries with such
a tie (identical captions of different images, duplicated images), or with a tie at the top score
(``top1`` is the argsort's first entry, not np.argmax's), are ranked by that very np.argsort call on
that very row, so ties resolve as the published code resolves them on the same machine (numpy's
argsort order among equal scores depends on its version and on the CPU's SIMD sort).

Ranks are 0-based as published: R@K = 100 * mean(rank < K), medr = floor(median(rank)) + 1,
meanr = mean(rank) + 1, rsum = R@1 + R@5 + R@10 of both directions.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from vse_fast.checks import positive_int

__all__ = ["i2t", "t2i", "retrieval_metrics", "coco_5fold", "format_table", "METRIC_KEYS"]

METRIC_KEYS = tuple(f"{d}_{m}" for d in ("i2t", "t2i") for m in ("r1", "r5", "r10", "medr", "meanr")) + ("rsum",)

# Elements of one comparison block in the numpy drop-ins (~4M: 16-32 MB per temporary).
_NUMPY_BLOCK_ELEMS = 1 << 22
# Scores of tied captions' columns gathered per extra pass of retrieval_metrics (or a block's, if
# more): 32M, 256 MB in float64. Every column of COCO 5K (125M scores) ties only if the image
# embeddings collapse; that takes 4 extra passes.
_TIED_COLUMN_ELEMS = 1 << 25


def _resolve_caps_per_item(mode, caps_per_item):
    if caps_per_item is None:
        return 5 if mode == "coco" else 1
    return positive_int(caps_per_item, "caps_per_item")


def _check_sims(npts, sims, caps):
    positive_int(npts, "npts")
    if isinstance(sims, torch.Tensor):
        if sims.dtype in (torch.float16, torch.bfloat16):  # numpy has no bfloat16; fp32 keeps every order
            sims = sims.float()
        sims = sims.detach().cpu().numpy()
    sims = np.asarray(sims)
    if sims.ndim != 2 or sims.shape != (npts, caps * npts):
        hint = ""
        if sims.ndim == 2 and sims.shape[0] == npts and sims.shape[1] % npts == 0 and sims.shape[1] != caps * npts:
            hint = (f" ({sims.shape[1] // npts} captions per item? pass caps_per_item={sims.shape[1] // npts}; "
                    f"mode 'coco' means 5, any other mode 1)")
        raise ValueError(
            f"sims must have shape (npts, caps_per_item * npts) = ({npts}, {caps * npts}), got {sims.shape}{hint}"
        )
    raw = sims  # what the published code would argsort: tied queries are ranked on it
    if np.issubdtype(sims.dtype, np.integer):  # scores as the published functions take them: compared as numbers
        if sims.size and max(-int(sims.min()), int(sims.max())) > 2**53:
            raise ValueError(f"sims of dtype {sims.dtype} hold values beyond 2**53, which float64 does not keep apart")
        sims = sims.astype(np.float64)
    if not np.issubdtype(sims.dtype, np.floating):
        raise TypeError(f"sims must be a floating-point or integer array, got dtype {sims.dtype}")
    return sims, raw


def _summary(ranks):
    """(r1, r5, r10, medr, meanr) from 0-based ranks (float64), with the published formulas."""
    n = len(ranks)
    r1 = 100.0 * int(np.count_nonzero(ranks < 1)) / n
    r5 = 100.0 * int(np.count_nonzero(ranks < 5)) / n
    r10 = 100.0 * int(np.count_nonzero(ranks < 10)) / n
    medr = np.floor(np.median(ranks)) + 1
    meanr = ranks.mean() + 1
    return r1, r5, r10, medr, meanr


def _argsort_rank(scores, positives):
    """(rank, top1) of one query as the published code finds them: ``order = np.argsort(scores)[::-1]``,
    rank = the first position in order of any index in positives, top1 = order[0].
    scores: 1-D numpy array (any dtype, any stride: np.argsort sorts a contiguous copy of a strided
    row, so a column of sims ranks as the published ``sims.T[j]`` does)."""
    order = np.argsort(scores)[::-1]
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    return int(position[positives].min()), int(order[0])


def _raise_nan(direction, index):
    raise ValueError(f"sims contains NaN (found in the {direction} query {index}); ranks would be meaningless")


def i2t(npts, sims, return_ranks=False, mode="coco", *, caps_per_item=None):
    """Image -> text retrieval (image annotation), drop-in for the published ``i2t``.

    Args:
        npts: number of images N.
        sims: (N, C*N) float or integer numpy array (or CPU tensor; fp16/bf16 are compared in
            float32, integers in float64), image i's captions are columns i*C .. i*C+C-1.
        return_ranks: also return ``(ranks, top1)``, float64 arrays of shape (N,).
        mode: "coco" means C = 5 captions per image, anything else C = 1 (as published).
        caps_per_item: C, overrides ``mode`` (e.g. 20 for MSR-VTT, 10 for VATEX).

    Returns:
        ``(r1, r5, r10, medr, meanr)`` and, with return_ranks, ``(ranks, top1)``: ranks[i] = 0-based
        rank of image i's best-ranked caption (the number of captions scoring strictly higher, or
        where a caption of another image ties with it, its position in the published
        ``np.argsort(sims[i])[::-1]``), top1[i] = that argsort's first index (np.argmax's unless
        the top score ties).

    Example:
        >>> r, (ranks, top1) = i2t(1000, sims, return_ranks=True)
    """
    caps = _resolve_caps_per_item(mode, caps_per_item)
    sims, raw = _check_sims(npts, sims, caps)
    ranks = np.empty(npts, dtype=np.float64)
    top1 = np.empty(npts, dtype=np.float64)
    rows_per_block = max(1, _NUMPY_BLOCK_ELEMS // sims.shape[1])
    cap_offsets = np.arange(caps)
    tied = []
    for r0 in range(0, npts, rows_per_block):
        r1 = min(npts, r0 + rows_per_block)
        block = sims[r0:r1]  # view, (b, C*N)
        local = np.arange(r1 - r0)
        own = block[local[:, None], np.arange(r0, r1)[:, None] * caps + cap_offsets]  # (b, C)
        best = own.max(axis=1)
        argmax = block.argmax(axis=1)  # np.argmax stops at the first NaN: finds NaNs in the same pass
        top = block[local, argmax]
        nan_rows = np.flatnonzero(np.isnan(top) | np.isnan(best))
        if nan_rows.size:
            _raise_nan("image", r0 + int(nan_rows[0]))
        ranks[r0:r1] = np.count_nonzero(block > best[:, None], axis=1)
        top1[r0:r1] = argmax
        # an item of another image at the best positive's score, or (for top1) two at the top score:
        # argsort decides
        tied_rows = np.count_nonzero(block == best[:, None], axis=1) > np.count_nonzero(own == best[:, None], axis=1)
        if return_ranks:
            tied_rows |= np.count_nonzero(block == top[:, None], axis=1) > 1
        tied.extend(r0 + np.flatnonzero(tied_rows))
    for image in tied:
        ranks[image], top1[image] = _argsort_rank(raw[image], np.arange(image * caps, image * caps + caps))
    summary = _summary(ranks)
    return (summary, (ranks, top1)) if return_ranks else summary


def t2i(npts, sims, return_ranks=False, mode="coco", *, caps_per_item=None):
    """Text -> image retrieval (image search), drop-in for the published ``t2i``.

    Args and mode as `i2t`; sims (N, C*N). Caption j's positive image is j // C.

    Returns:
        ``(r1, r5, r10, medr, meanr)`` and, with return_ranks, ``(ranks, top1)`` float64 of shape
        (C*N,): ranks[j] = number of images scoring strictly higher than caption j's image (on
        ties, its position in ``np.argsort(sims[:, j])[::-1]``, as published), top1[j] = that
        argsort's first index.
    """
    caps = _resolve_caps_per_item(mode, caps_per_item)
    sims, raw = _check_sims(npts, sims, caps)
    n_caps = caps * npts
    captions = np.arange(n_caps)
    positive = sims[captions // caps, captions]  # (C*N,)
    if np.isnan(positive).any():
        _raise_nan("caption", int(np.flatnonzero(np.isnan(positive))[0]))
    # Row blocks keep the memory access contiguous; counts and the running argmax accumulate.
    counts = np.zeros(n_caps, dtype=np.int64)
    at_positive = np.zeros(n_caps, dtype=np.int64)  # images scoring exactly the positive's score (itself too)
    best = np.full(n_caps, -np.inf, dtype=sims.dtype)
    at_best = np.zeros(n_caps, dtype=np.int64)  # images scoring exactly the running maximum
    top1 = np.zeros(n_caps, dtype=np.float64)
    rows_per_block = max(1, _NUMPY_BLOCK_ELEMS // n_caps)
    for r0 in range(0, npts, rows_per_block):
        block = sims[r0:r0 + rows_per_block]  # view, (b, C*N)
        counts += np.count_nonzero(block > positive, axis=0)
        at_positive += np.count_nonzero(block == positive, axis=0)
        block_best = block.max(axis=0)  # NaN propagates
        if np.isnan(block_best).any():
            _raise_nan("caption", int(np.flatnonzero(np.isnan(block_best))[0]))
        if return_ranks:  # top1: the count of images at the running maximum finds a tied top
            block_at_best = np.count_nonzero(block == block_best, axis=0)
            at_best[block_best == best] += block_at_best[block_best == best]
        improved = np.flatnonzero(block_best > best)  # np.argmax's; a tied top is argsorted below
        if improved.size:
            best[improved] = block_best[improved]
            if return_ranks:
                at_best[improved] = block_at_best[improved]
            top1[improved] = r0 + block[:, improved].argmax(axis=0)
    ranks = counts.astype(np.float64)
    # another image at the positive's score, or two at the top score: argsort decides, as published
    for caption in np.flatnonzero((at_positive > 1) | (at_best > 1)):
        ranks[caption], top1[caption] = _argsort_rank(raw[:, caption], caption // caps)
    summary = _summary(ranks)
    return (summary, (ranks, top1)) if return_ranks else summary


# ----------------------------------------------------------------------------------------------
# From embeddings (torch)
# ----------------------------------------------------------------------------------------------


def numpy_to_torch(x: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` for any numeric array: a non-native byte order (``>f4`` on x86) or negative
    strides (``x[::-1]``), which it rejects, are copied into a native contiguous array first."""
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    if any(stride < 0 for stride in x.strides):
        x = x.copy(order="C")  # not ascontiguousarray: a one-row reversed view counts as contiguous
    if x.flags.writeable:
        return torch.from_numpy(x)
    with warnings.catch_warnings():  # a read-only array (np.load(..., mmap_mode="r")): only ever read here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(x)


def _as_tensor(x, name):
    if isinstance(x, np.ndarray):
        x = numpy_to_torch(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (count, embed), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    return x.detach()


def _embedding_pairs(img_emb, cap_emb):
    """Normalise the arguments to a list of (img (N,E), cap (M,E)) tensors on one device."""
    if isinstance(img_emb, (list, tuple)) and cap_emb is None:
        pairs = list(img_emb)
        if not pairs:
            raise ValueError("the ensemble list of (img_emb, cap_emb) pairs is empty")
        for k, pair in enumerate(pairs):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise TypeError(f"ensemble member {k} must be an (img_emb, cap_emb) pair, got {type(pair).__name__}")
    elif cap_emb is None:
        raise TypeError("cap_emb is required unless img_emb is a list of (img_emb, cap_emb) pairs")
    else:
        pairs = [(img_emb, cap_emb)]
    out = []
    for k, (img, cap) in enumerate(pairs):
        img, cap = _as_tensor(img, f"img_emb[{k}]"), _as_tensor(cap, f"cap_emb[{k}]")
        if img.shape[1] != cap.shape[1]:
            raise ValueError(f"pair {k}: img_emb dim {img.shape[1]} != cap_emb dim {cap.shape[1]}")
        out.append((img, cap))
    n_img, n_cap, device = out[0][0].shape[0], out[0][1].shape[0], out[0][0].device
    for k, (img, cap) in enumerate(out):
        if img.shape[0] != n_img or cap.shape[0] != n_cap:
            raise ValueError(
                f"ensemble member {k} has {img.shape[0]} images / {cap.shape[0]} captions, "
                f"member 0 has {n_img} / {n_cap}"
            )
        if img.device != device or cap.device != device:
            raise ValueError(f"all embeddings must be on one device, got {img.device} and {cap.device} vs {device}")
    if n_img == 0:
        raise ValueError("no images to evaluate (img_emb has 0 rows)")
    return out


def nonfinite_rows(emb: torch.Tensor) -> torch.Tensor:
    """Indices of the rows of emb (count, E) that hold NaN or inf (a host sync)."""
    return torch.nonzero(~torch.isfinite(emb).all(dim=1)).flatten()


def _check_finite(pairs):
    """ValueError naming the first rows with NaN or inf (and the ensemble member, when there are several)."""
    for k, (img, cap) in enumerate(pairs):
        for name, emb in (("img_emb", img), ("cap_emb", cap)):
            bad = nonfinite_rows(emb)
            if bad.numel():
                member = f" of ensemble member {k}" if len(pairs) > 1 else ""
                raise ValueError(f"{name}{member} rows {bad[:8].tolist()} ({bad.numel()} in all) contain NaN or inf")


def _compute_dtype(pairs, dtype):
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float64 (published) or torch.float32, got {dtype!r}")
    for img, cap in pairs:
        dtype = torch.promote_types(dtype, torch.promote_types(img.dtype, cap.dtype))
    return dtype


def _count_above_and_at(sims, threshold, dim):
    """Numbers of entries of sims greater than, and equal to, threshold (broadcast) along dim, int64.
    On the CPU numpy counts about 10x faster than torch's boolean sum."""
    if sims.device.type == "cpu":
        scores, bound = sims.numpy(), threshold.numpy()
        return (torch.from_numpy(np.count_nonzero(scores > bound, axis=dim).astype(np.int64)),
                torch.from_numpy(np.count_nonzero(scores == bound, axis=dim).astype(np.int64)))
    return (sims > threshold).sum(dim), (sims == threshold).sum(dim)


def _block_sims(pairs, a, b):
    """S[a:b] = sum_k img_k[a:b] @ cap_k.T, (b-a, C*N). Every score either direction compares comes from
    this one computation (same blocks, same shapes), so equal embeddings give bit-identical scores."""
    sims = pairs[0][0][a:b] @ pairs[0][1].T
    for img, cap in pairs[1:]:
        sims.addmm_(img[a:b], cap.T)
    return sims


def _retrieval_ranks(pairs, caps, block, dtype):
    """0-based ranks (int64, on the embeddings' device): i2t (N,), t2i (C*N,). Two passes over image
    blocks, and more for the columns of tied captions when there are any (one unless the tied
    columns hold over _TIED_COLUMN_ELEMS scores and a block's).

    S = sum_k img_k @ cap_k.T (the ensemble average up to the factor 1/K, which keeps every rank).
    i2t: rank_i = #{j : S[i,j] > max_c S[i, i*C+c]}.
    t2i: rank_j = #{i : S[i,j] > pos_j}, pos_j = S[j//C, j] gathered from the first pass's block
         products; an elementwise dot would round differently from the matmul and break ties
         (a duplicate of the positive image must tie with it, not outrank it).
    A query with another gallery item exactly at its best positive's score is ranked by np.argsort
    of its row (column) of S, as published (`_argsort_rank`).
    """
    dtype = _compute_dtype(pairs, dtype)
    n_img = pairs[0][0].shape[0]
    n_cap = caps * n_img
    device = pairs[0][0].device
    pairs = [(img.to(dtype), cap.to(dtype)) for img, cap in pairs]
    positive = torch.empty(n_cap, dtype=dtype, device=device)
    rank_i2t = torch.empty(n_img, dtype=torch.int64, device=device)
    rank_t2i = torch.zeros(n_cap, dtype=torch.int64, device=device)
    at_positive = torch.zeros(n_cap, dtype=torch.int64, device=device)
    offsets = torch.arange(caps, device=device)
    for a in range(0, n_img, block):
        b = min(n_img, a + block)
        sims = _block_sims(pairs, a, b)  # (b-a, n_cap)
        rows = torch.arange(b - a, device=device)
        own = sims[rows[:, None], (rows[:, None] + a) * caps + offsets]  # (b-a, C)
        best = own.amax(1, keepdim=True)
        rank_i2t[a:b], at_best = _count_above_and_at(sims, best, dim=1)
        tied = torch.nonzero(at_best.to(device) > (own == best).sum(1)).flatten()
        if tied.numel():  # a caption of another image at the best positive's score: argsort decides, as published
            scores, images = sims[tied].cpu().numpy(), tied + a
            rank_i2t[images] = torch.tensor(
                [_argsort_rank(row, np.arange(i * caps, i * caps + caps))[0] for row, i in zip(scores, images.tolist())],
                dtype=torch.int64).to(device)
        positive[a * caps:b * caps] = own.reshape(-1)
    for a in range(0, n_img, block):
        above, at = _count_above_and_at(_block_sims(pairs, a, min(n_img, a + block)), positive[None, :], dim=0)
        rank_t2i += above.to(device)
        at_positive += at.to(device)
    tied = torch.nonzero(at_positive > 1).flatten()  # another image at the positive's score (itself counts 1)
    per_pass = max(1, max(block * n_cap, _TIED_COLUMN_ELEMS) // n_img)  # tied columns gathered per pass
    for t0 in range(0, tied.numel(), per_pass):  # more passes gather them from the same block products
        columns = tied[t0:t0 + per_pass]
        scores = torch.cat([_block_sims(pairs, a, min(n_img, a + block))[:, columns]
                            for a in range(0, n_img, block)]).cpu().numpy()  # (N, columns)
        rank_t2i[columns] = torch.tensor(
            [_argsort_rank(scores[:, k], caption // caps)[0] for k, caption in enumerate(columns.tolist())],
            dtype=torch.int64).to(device)
    return rank_i2t, rank_t2i


def _resolve_caption_count(n_img, n_cap, caps_per_item):
    """Captions per item: caps_per_item, or inferred from the counts when None; checked against them."""
    if n_cap == 0:
        raise ValueError("no captions to evaluate (cap_emb has 0 rows)")
    if caps_per_item is None:
        if n_cap % n_img:
            raise ValueError(f"{n_cap} captions is not a multiple of {n_img} images; pass caps_per_item")
        caps_per_item = n_cap // n_img
    caps = _resolve_caps_per_item(None, caps_per_item)
    if n_cap != caps * n_img:
        raise ValueError(f"expected caps_per_item * images = {caps} * {n_img} captions, got {n_cap}")
    return caps


def retrieval_metrics(img_emb, cap_emb=None, caps_per_item=None, *, block=1024, return_ranks=False,
                      dtype=torch.float64):
    """Recall@{1,5,10}, medr, meanr in both directions and rsum, from embeddings.

    Args:
        img_emb: (N, E) float tensor (any device) or numpy array, one row per image/video; or a list
            of (img_emb, cap_emb) pairs (cap_emb then None): an ensemble, scored by the average of
            the members' similarities (as the published eval_ensemble).
        cap_emb: (C*N, E), caption j describes image j // C.
        caps_per_item: C; None infers it from the counts (must divide).
        block: images per block; peak extra memory about block * C*N * 8 bytes (float64).
        return_ranks: also return {"i2t": (N,), "t2i": (C*N,)} float64 numpy 0-based ranks.
        dtype: the similarities' dtype: torch.float64 (default), as published (its encode_data
            stores the embeddings in float64 arrays), or torch.float32 (about 1.5x faster on a CPU,
            4.1 s against 6.3 s at 5K (README); a rank may move by one where two scores differ by a
            float32 rounding).

    Returns:
        dict with METRIC_KEYS ("i2t_r1", ..., "t2i_meanr", "rsum"), Python floats. Similarities are
        computed in ``dtype`` (float64 whenever the embeddings are float64); a query's rank counts strictly
        higher scores, and ties resolve in the published argsort order. The ranks are exactly those of
        `i2t` / `t2i` (and of the published functions) on the
        matrix of the block products ``img[a:b] @ cap.T``: duplicated images (captions) tie wherever
        the matmul gives them equal scores (BLAS may round a row differently at another block position).

    Example:
        >>> m = retrieval_metrics(img_emb, cap_emb, 5)
        >>> m["rsum"]
    """
    pairs = _embedding_pairs(img_emb, cap_emb)
    caps = _resolve_caption_count(pairs[0][0].shape[0], pairs[0][1].shape[0], caps_per_item)
    block = positive_int(block, "block")
    _check_finite(pairs)
    with torch.no_grad():
        rank_i2t, rank_t2i = _retrieval_ranks(pairs, caps, block, dtype)
    ranks = {"i2t": rank_i2t.cpu().numpy().astype(np.float64), "t2i": rank_t2i.cpu().numpy().astype(np.float64)}
    metrics = {}
    for direction in ("i2t", "t2i"):
        for name, value in zip(("r1", "r5", "r10", "medr", "meanr"), _summary(ranks[direction])):
            metrics[f"{direction}_{name}"] = float(value)
    metrics["rsum"] = sum(metrics[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return (metrics, ranks) if return_ranks else metrics


def coco_5fold(img_emb, cap_emb=None, caps_per_item=None, *, n_folds=5, block=1024, dtype=torch.float64):
    """COCO 1K protocol: metrics on n_folds consecutive folds of N / n_folds images (and their
    captions), averaged over folds as published (rsum = mean of the fold rsums).

    Args: as `retrieval_metrics` (ensembles too; caps_per_item None infers it from the counts; dtype);
        N must be divisible by n_folds (5000 -> 5 x 1000).
    Returns: dict with METRIC_KEYS (fold means) plus "folds": list of per-fold metric dicts.
    The 5K numbers are `retrieval_metrics` on all the embeddings.
    """
    pairs = _embedding_pairs(img_emb, cap_emb)
    n_img = pairs[0][0].shape[0]
    caps = _resolve_caption_count(n_img, pairs[0][1].shape[0], caps_per_item)
    n_folds = positive_int(n_folds, "n_folds")
    if n_img % n_folds:
        raise ValueError(f"{n_img} images cannot be split into {n_folds} equal folds")
    _check_finite(pairs)  # rows named in the whole arrays, not within a fold
    size = n_img // n_folds
    folds = []
    for f in range(n_folds):
        fold_pairs = [(img[f * size:(f + 1) * size], cap[f * size * caps:(f + 1) * size * caps]) for img, cap in pairs]
        folds.append(retrieval_metrics(fold_pairs, None, caps, block=block, dtype=dtype))
    mean = {key: float(np.mean([fold[key] for fold in folds])) for key in METRIC_KEYS}
    mean["folds"] = folds
    return mean


def format_table(metrics, title=None):
    """Recall table of a `retrieval_metrics` / `coco_5fold` dict, as text.

    Example output::

                      R@1    R@5   R@10   medr   meanr
        image->text  42.1   71.0   81.3    2.0    12.4
        text->image  30.5   60.2   72.9    4.0    20.1
        rsum 357.9
    """
    missing = [k for k in METRIC_KEYS if k not in metrics]
    if missing:
        raise ValueError(f"metrics lacks {missing}")
    lines = [title] if title else []
    lines.append(f"{'':12s} {'R@1':>6s} {'R@5':>6s} {'R@10':>6s} {'medr':>6s} {'meanr':>7s}")
    for direction, label in (("i2t", "image->text"), ("t2i", "text->image")):
        values = [metrics[f"{direction}_{m}"] for m in ("r1", "r5", "r10", "medr")]
        lines.append(f"{label:12s} " + " ".join(f"{v:6.1f}" for v in values) + f" {metrics[direction + '_meanr']:7.1f}")
    folds = metrics.get("folds")
    suffix = f" (mean of {len(folds)} folds: " + ", ".join(f"{f['rsum']:.1f}" for f in folds) + ")" if folds else ""
    lines.append(f"rsum {metrics['rsum']:.1f}{suffix}")
    return "\n".join(lines)
