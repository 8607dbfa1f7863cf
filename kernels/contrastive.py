"""Triton kernels of the fused similarity + hinge (VSE0 / VSE++ hardest-negative) contrastive loss.

Inputs: images ``im`` (N, D), captions ``s`` (M, D), ``labels`` (M,) int64 = index of each caption's
image (``None``: the diagonal, N == M). Similarities S = im @ s.T are never written to memory.

Every positive pair (caption j, image p_j) has the threshold d_j = <im[p_j], s[j]> (fp32 pair dot,
`_pair_dot`) and two terms, each a reduction of the similarities of its negatives:

    i2t (caption retrieval): row p_j of S over captions c with labels[c] != p_j
    t2i (image retrieval):   column j of S over images c != p_j

VSE++ keeps the running max of the valid similarities and its index (first index on ties); since
relu is monotone, max_c relu(m + S_c - d_j) = relu(m + max_c S_c - d_j). VSE0 keeps the running
hinge sum sum_c relu(m + S_c - d_j) and the count of active hinges.

Three forward paths (`contrastive_path` picks one):

* "small" (labels None, both terms, N = M <= settings.SMALL_B): `_contrastive_small_fwd_kernel`, ONE
  launch of ONE program: the whole (B, B) tile of S (in `small_row_parts` row blocks, so that one
  block is live at a time), d from pair dots, both reductions (row = i2t, column = t2i, the latter
  running over the row blocks in order), the per-pair values, the scalar loss, and the gradient matrix
  A (B, B) in the input dtype with dim = g scale A @ s and ds = g scale A.T @ im:
      VSE0:  A = G_i2t + G_t2i - diag(c),  G_i2t[i, j] = [j != i and m + S_ij - d_i > 0],
             G_t2i[i, j] = [i != j and m + S_ij - d_j > 0],  c_i = active hinges of pair i (both terms)
      VSE++: A[i, a_i] += ok1_i,  A[b_j, j] += ok2_j,  A[i, i] -= ok1_i + ok2_i
             (a_i / b_j hardest caption / image, ok = [value > 0 and a negative exists])
  Entries are integers in [-2B + 2, 2]: exact in bf16 for B <= 129 (fp16: B <= 1025), hence
  SMALL_B <= 128. The backward is ONE launch, `_contrastive_small_bwd_kernel`: a program per
  D-block multiplies A and A.T by its block of s and im (a pipelined loop over SMALL_BLOCK_K columns
  of A), scales by g * scale and stores the final gradients in the input dtype (no recompute of S, no
  atomics, deterministic).
* "fused" (labels None, both terms, larger B): both terms from ONE pass over tiles of S = im @ s.T.
  `_contrastive_fused_fwd_kernel`, grid (row blocks of images, column splits): per row i it keeps the
  i2t running reduction over its columns (partial per (split, row)); per tile column j it reduces the
  tile's rows for t2i (partial per (row block, column)). VSE0 needs both thresholds inside the tile
  loop: `_contrastive_diag_kernel` writes d first (one more launch, O(BD)). `_contrastive_combine_kernel`
  reduces the i2t partials in column order and the t2i partials in row order (deterministic, first
  index on ties: strict > keeps the earlier part) and writes the per-pair values (scaled).
* "terms" (labels given, or one term): `_contrastive_fwd_kernel` once per term, rows = pairs j,
  X @ Y.T masked by a label test:
      i2t: X = im[labels] (gathered in-kernel), Y = s,  invalid where labels[c] == p_j
      t2i: X = s,                              Y = im, invalid where c == p_j
  grid (row blocks, column splits) so that small batches still fill the GPU, then the combine kernel
  (column order). VSE0 reads d_j inside the tile loop: `_contrastive_diag_kernel` (with the labels)
  writes it once before the term launches and the combine kernel reads it; VSE++ needs d only in the
  combine kernel, which computes it.

Non-finite inputs: a max reduction can drop a NaN, so every per-pair value gets ``+ 0 * d_j``: d_j is
non-finite iff im[p_j] or s[j] holds a NaN/inf (inf * 0 = NaN), which covers every caption and every
image that is some caption's positive (all of them when labels is None; the op layer checks the rest).
The VSE++ tile kernels drop NaN similarities from the max explicitly (the hardest indices are then
those of the non-NaN ones, -1 if none; the loss is NaN all the same). The VSE0 tile kernels set
invalid similarities to -inf before the hinges: m + (-inf) - d is -inf or NaN, never > 0, so invalid
pairs stay inactive whatever d and m are.

Registers: every kernel builds for sm_90 and sm_80 with no spills (`python -m vse_fast.compile_check
--filter contrastive`): the elementwise kernels run BLOCK_M x BLOCK_DB = 16 x 128 tiles on 4 warps
(16 elements per thread per tile), the tile kernels keep K-blocks of 32 (16-bit) / 16 (fp32) and
load per-tile vectors (column labels, thresholds) after the k-loop, not across it.

Backward, VSE++ ("fused"/"terms": `_contrastive_vsepp_bwd_kernel`, O((N + M) D), the dim side then the
ds side so that two [BLOCK_M, BLOCK_DB] tiles are live): with w = g * scale * [value > 0],
    i2t pair j, hardest caption a:  dim[p_j] += w (s[a] - s[j]),  ds[a] += w im[p_j],  ds[j] -= w im[p_j]
    t2i pair j, hardest image b:    dim[b] += w s[j],  dim[p_j] -= w s[j],  ds[j] += w (im[b] - im[p_j])
accumulated with fp32 atomic adds (a row can be the hardest negative of many pairs), so the last bits
of the gradient may differ between runs (1 + #pairs-it-is-hardest-for adds per row).

Backward, VSE0 ("terms"): G = [valid and m + T - d > 0] is recomputed tile by tile
(`_contrastive_vse0_mask_kernel`) into a bounded row chunk (the launcher caps it at 256 MB) that cuBLAS
multiplies: dX = G @ Y, dY = G.T @ X: three matmul-equivalents per term. With D ~ 1024 an on-chip dX
accumulator does not fit, and recomputing S once per D-block costs D / BLOCK_D extra matmuls.
Backward, VSE0 ("fused"): G_i2t + G_t2i (0/1/2, exact in every dtype) by image-row chunks, unpacked
(`_contrastive_vse0_unpack_kernel`) from the 2-bit mask the forward saved when a gradient is needed
(B^2 / 4 bytes, at most SAVED_MASK_MAX_BYTES; G chunks then shrink to 128 MB to keep the peak down),
else recomputed from S by the mask kernel with BOTH_TERMS; cuBLAS: dim[chunk] = G @ s,
ds += G.T @ im[chunk] (fp32 results); `_contrastive_vse0_epilogue_kernel` subtracts the threshold terms in fp32
(dim[i] -= c_i s[i], ds[j] -= c_j im[j]; the counts c up to 2B stay out of G: not exact in bf16),
scales by g * scale and writes the input dtype. One mask recompute + two matmuls.

Matmul-equivalents (B x B x D products) per forward + backward, labels None, both terms:
"terms" (the design before the fused paths) VSE0 2 + 6, VSE++ 2 + 0; "fused" VSE0 1 + 2 with the
saved mask (1 + 3 recomputing), VSE++ 1 + 0; "small" VSE0 1 + 2, VSE++ 1 + 2 (one program / a program per D-block; B <= 128 only).

Precision: tl.dot takes bf16/fp16 operands as they are (tensor cores) with fp32 accumulation. fp32
operands use ``input_precision="tf32x3"``: each product as three TF32 tensor-core products
(hi*hi + hi*lo + lo*hi), about 2^-21 relative error per product, close to fp32 (the published loss
runs fp32 cuBLAS with TF32 off) at several times the speed of FMA-based "ieee" dots. The VSE0
backward multiplies G by fp32 operands in cuBLAS fp32 (TF32 as torch's matmul settings say), and by
bf16/fp16 operands as they are with an fp32 result (`_mm_fp32`): a 16-bit G @ s would be rounded
before the threshold terms are subtracted, which cancels most of it when the embeddings cluster.
"""
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vse_fast.kernels import triton_interpreting

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_DOT_BLOCK_D = 64  # D-block of the pair dot products d_j (fixed: the same bits in every kernel)
_MASK_CHUNK_BYTES = 256 * 1024**2  # VSE0 backward: largest chunk of G held at once
_SAVED_MASK_CHUNK_BYTES = 128 * 1024**2  # the same when the forward saved the packed mask (it takes memory too)
SAVED_MASK_MAX_BYTES = 512 * 1024**2  # "fused" VSE0: largest packed mask the forward saves (B <= 46336)

# Label modes of the per-term row-reduction kernels (which side is gathered, where column labels come from).
NO_LABELS, I2T_LABELS, T2I_LABELS = 0, 1, 2
# Forward paths (see the module docstring).
SMALL, FUSED, TERMS = "small", "fused", "terms"

# TRITON_INTERPRET is read by triton when it is imported, so once is enough here too.
INTERPRETING = triton_interpreting()


def _interp_bf16(dtype) -> bool:
    """The interpreter's tl.dot multiplies bf16 tiles as raw uint16: upcast there (never on a GPU)."""
    return dtype == torch.bfloat16 and INTERPRETING


@dataclass(frozen=True)
class LossSettings:
    """Tile sizes and warps of the loss kernels; chosen once per dtype, kept on ctx for the backward."""

    BLOCK_R: int
    BLOCK_C: int
    BLOCK_D: int
    num_warps: int
    num_stages: int
    # The elementwise / gather / atomic kernels (combine, diag, VSE0 unpack and epilogue, VSE++ backward):
    # rows x columns per program and warps. 16 x 128 on 4 warps = 16 elements per thread per tile (a
    # [16, 64] pair-dot tile: 8), rows still 128 contiguous columns wide (a full 128-byte line of bf16,
    # 512 bytes of the fp32 accumulators). 128 x 128 spilled kilobytes per thread, 32 x 128 still some:
    # unvectorized, each element of a gathered row carries its own 64-bit address.
    BLOCK_M: int = 16  # pairs (rows) per program of those kernels
    BLOCK_DB: int = 128  # columns per program of the 2-D ones (features; G columns for the unpack)
    elem_warps: int = 4
    target_programs: int = 264  # the forward grid aims at about this many programs (2 x H100 SMs)
    SMALL_B: int = 128  # "small" path: the one-program tile (N = M <= SMALL_B); <= 128 (A exact in bf16)
    SMALL_BLOCK_D: int = 32  # "small" path: D-block of the forward tile loop and of a backward program
    SMALL_BLOCK_K: int = 32  # "small" backward: chunk of A's columns (the product's K) per loop step
    small_warps: int = 8
    small_row_parts: int = 2  # "small" forward: T in this many row blocks (>= 64 rows each: warpgroup MMA)
    interp_bf16: bool = False  # upcast bf16 dots (interpreter only)
    tf32x3: bool = False  # fp32 operands: 3xTF32 dots


def _make_settings(dtype: torch.dtype) -> LossSettings:
    """The GPU settings (`_gpu_settings`), or under the interpreter tiny tiles that exercise the
    multi-tile / multi-split paths (and a 16 x 16 "small" tile)."""
    if INTERPRETING:
        return LossSettings(16, 16, 16, 4, 1, BLOCK_M=16, BLOCK_DB=16, target_programs=4, SMALL_B=16,
                            SMALL_BLOCK_D=16, SMALL_BLOCK_K=16, small_warps=4, small_row_parts=1,
                            interp_bf16=_interp_bf16(dtype),
                            tf32x3=dtype == torch.float32)
    return _gpu_settings(dtype)


def _gpu_settings(dtype: torch.dtype) -> LossSettings:
    """Tiles per dtype: 16-bit operands run 128 x 128 x 32 tensor-core tiles (8 warps, 4 stages); fp32
    (3xTF32) 64 x 64 x 16 (4 warps, 4 stages). The one-program "small" tile is 128 x 128 with 8 warps
    (two 64-row blocks; D-block 32 for 16-bit, 16 for fp32).

    Why these: 16 warps cap a thread at 128 registers (and split a 128-row 16-bit tile into 64 x 64
    warpgroup MMAs), and 8 warps on a 64-row 3xTF32 tile duplicate the MMAs on sm_80 (its chained
    dots put the warps along M), so the K-block shrinks instead (64 -> 32 / 32 -> 16): half the
    operand elements (and their addresses) per thread per step, same output tile, same MMA shapes,
    one more pipeline stage for the same bytes in flight."""
    if dtype == torch.float32:
        return LossSettings(64, 64, 16, 4, 4, SMALL_B=128, SMALL_BLOCK_D=16, small_warps=8, tf32x3=True)
    return LossSettings(128, 128, 32, 8, 4, SMALL_B=128, SMALL_BLOCK_D=32, small_warps=8)


_SETTINGS = {dtype: _make_settings(dtype) for dtype in SUPPORTED_DTYPES}


def loss_settings(dtype: torch.dtype) -> LossSettings:
    """The cached settings of `dtype` (fp32 / bf16 / fp16)."""
    return _SETTINGS[dtype]


def contrastive_path(N: int, M: int, labels, terms: tuple, settings: LossSettings) -> str:
    """SMALL, FUSED or TERMS (see the module docstring); decided on host values only (no sync)."""
    if labels is not None or len(terms) != 2:
        return TERMS
    return SMALL if M <= settings.SMALL_B else FUSED


# ---------------------------------------------------------------------------------------------------
# jit helpers


@triton.jit
def _row_indices(lab_ptr, o_r, m_r, LABEL_MODE: tl.constexpr):
    """Row label (= the pair's image), X row and partner row of rows o_r, all int64."""
    o_r64 = o_r.to(tl.int64)
    if LABEL_MODE == 0:
        lab_r = o_r64
        o_xr = o_r64
        o_pr = o_r64
    else:
        lab_r = tl.load(lab_ptr + o_r, mask=m_r, other=-1)
        if LABEL_MODE == 1:  # i2t: X = im[labels], partner = s[r]
            o_xr = lab_r
            o_pr = o_r64
        else:  # t2i: X = s[r], partner = im[labels]
            o_xr = o_r64
            o_pr = lab_r
    return lab_r, o_xr, o_pr


@triton.jit
def _col_labels(lab_ptr, o_c, m_c, LABEL_MODE: tl.constexpr):
    """Column labels: the caption's image for i2t with labels, else the column index."""
    if LABEL_MODE == 1:
        lab_c = tl.load(lab_ptr + o_c, mask=m_c, other=-1)
    else:
        lab_c = o_c.to(tl.int64)
    return lab_c


@triton.jit
def _pair_dot(x_ptr, p_ptr, o_xr, o_pr, m_r, D, stride_xr, stride_xd, stride_pr, stride_pd,
              BLOCK_R: tl.constexpr, DOT_BLOCK_D: tl.constexpr):
    """d[r] = <x[o_xr[r]], p[o_pr[r]]> with fp32 products and sums, [BLOCK_R]."""
    d = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, D, DOT_BLOCK_D):
        o_d = k0 + tl.arange(0, DOT_BLOCK_D)
        m = m_r[:, None] & (o_d < D)[None, :]
        b_x = tl.load(x_ptr + o_xr[:, None] * stride_xr + o_d[None, :] * stride_xd, mask=m, other=0.0)
        b_p = tl.load(p_ptr + o_pr[:, None] * stride_pr + o_d[None, :] * stride_pd, mask=m, other=0.0)
        d += tl.sum(b_x.to(tl.float32) * b_p.to(tl.float32), axis=1)  # [BR]
    return d


@triton.jit
def _mma(a, b, acc, TF32X3: tl.constexpr, INTERP_BF16: tl.constexpr):
    """acc + a @ b in fp32: tensor cores for bf16/fp16, 3xTF32 for fp32 (see the module docstring)."""
    if INTERP_BF16:  # the interpreter multiplies bf16 as raw uint16 bits: upcast (products are exact)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif TF32X3:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _sim_tile(x_ptr, y_ptr, o_xr, m_r, o_c, m_c, D, stride_xr, stride_xd, stride_yr, stride_yd,
              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, TF32X3: tl.constexpr,
              INTERP_BF16: tl.constexpr):
    """T[r, c] = <x[o_xr[r]], y[o_c[c]]> in fp32, [BLOCK_R, BLOCK_C]; operands stay in their dtype."""
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    p_x = x_ptr + o_xr[:, None] * stride_xr  # [BR, 1]
    p_y = y_ptr + o_c.to(tl.int64)[None, :] * stride_yr  # [1, BC]
    for k0 in range(0, D, BLOCK_D):
        o_d = k0 + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_x = tl.load(p_x + o_d[None, :] * stride_xd, mask=m_r[:, None] & m_d[None, :], other=0.0)  # [BR, BD]
        b_yt = tl.load(p_y + o_d[:, None] * stride_yd, mask=m_d[:, None] & m_c[None, :], other=0.0)  # [BD, BC]
        acc = _mma(b_x, b_yt, acc, TF32X3, INTERP_BF16)
    return acc


@triton.jit
def _first_argmax(b, b_max, AXIS: tl.constexpr, N: tl.constexpr):
    """int32 index along AXIS (of size N) of the first element equal to b_max (the max along AXIS, no
    NaN): what tl.argmax returns, as a second plain min-reduction instead of a (value, index) pair one,
    which keeps fewer registers live on a large tile."""
    o_n = tl.arange(0, N)
    if AXIS == 0:
        return tl.min(tl.where(b == b_max[None, :], o_n[:, None], N), axis=0)
    else:
        return tl.min(tl.where(b == b_max[:, None], o_n[None, :], N), axis=1)


@triton.jit
def _store_partials(part_val_ptr, part_aux_ptr, o_out, b_val, b_aux, mask):
    """Per-row partials of one column split: value (max or hinge sum) and aux (argmax or count)."""
    tl.store(part_val_ptr + o_out, b_val, mask=mask)
    tl.store(part_aux_ptr + o_out, b_aux, mask=mask)


# ---------------------------------------------------------------------------------------------------
# kernels


@triton.jit(do_not_specialize=["R", "C", "COLS_PER_SPLIT"])
def _contrastive_fwd_kernel(
    x_ptr, y_ptr, d_ptr, lab_ptr, part_val_ptr, part_aux_ptr,
    R, C, D, COLS_PER_SPLIT,
    stride_xr, stride_xd, stride_yr, stride_yd,
    margin,
    LABEL_MODE: tl.constexpr, MAX_VIOLATION: tl.constexpr, TF32X3: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One term, rows [i_r * BLOCK_R, +BLOCK_R), columns of split i_s. Writes part_val[i_s, r]
    (running max of valid T, or hinge sum) and part_aux[i_s, r] (int32 argmax or -1, or fp32 count).
    VSE0 reads the thresholds d[r] (`_contrastive_diag_kernel`, written once for both terms)."""
    i_r = tl.program_id(0)
    i_s = tl.program_id(1)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < R
    lab_r, o_xr, _ = _row_indices(lab_ptr, o_r, m_r, LABEL_MODE)
    c_start = i_s * COLS_PER_SPLIT
    c_end = tl.minimum(c_start + COLS_PER_SPLIT, C)

    if MAX_VIOLATION:
        run_max = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
        run_idx = tl.full((BLOCK_R,), -1, dtype=tl.int32)
    else:
        b_d = tl.load(d_ptr + o_r, mask=m_r, other=0.0)  # [BR]
        run_sum = tl.zeros((BLOCK_R,), dtype=tl.float32)
        run_cnt = tl.zeros((BLOCK_R,), dtype=tl.float32)

    for c0 in range(c_start, c_end, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        m_c = o_c < c_end
        b_t = _sim_tile(x_ptr, y_ptr, o_xr, m_r, o_c, m_c, D, stride_xr, stride_xd, stride_yr, stride_yd,
                        BLOCK_R, BLOCK_C, BLOCK_D, TF32X3, INTERP_BF16)  # [BR, BC]
        lab_c = _col_labels(lab_ptr, o_c, m_c, LABEL_MODE)  # after the tile: not live across its k-loop
        m_valid = m_r[:, None] & m_c[None, :] & (lab_r[:, None] != lab_c[None, :])
        if MAX_VIOLATION:
            b_t = tl.where(m_valid & (b_t == b_t), b_t, float("-inf"))  # NaN drops out (module docstring)
            t_max = tl.max(b_t, axis=1)
            t_arg = _first_argmax(b_t, t_max, 1, BLOCK_C)  # first index among equal maxima
            upd = t_max > run_max  # strict: earlier columns win ties
            run_idx = tl.where(upd, c0 + t_arg, run_idx)
            run_max = tl.where(upd, t_max, run_max)
        else:
            b_h = margin + tl.where(m_valid, b_t, float("-inf")) - b_d[:, None]  # invalid: -inf or NaN, never > 0
            m_act = b_h > 0
            run_sum += tl.sum(tl.where(m_act, b_h, 0.0), axis=1)
            run_cnt += tl.sum(m_act.to(tl.float32), axis=1)

    o_out = i_s.to(tl.int64) * R + o_r
    if MAX_VIOLATION:
        _store_partials(part_val_ptr, part_aux_ptr, o_out, run_max, run_idx, m_r)
    else:
        _store_partials(part_val_ptr, part_aux_ptr, o_out, run_sum, run_cnt, m_r)


@triton.jit(do_not_specialize=["B", "COLS_PER_SPLIT", "NUM_SPLITS"])
def _contrastive_fused_fwd_kernel(
    im_ptr, s_ptr, d_ptr, part_val_ptr, part_aux_ptr, mask_ptr,
    B, D, COLS_PER_SPLIT, NUM_SPLITS, W,
    stride_imr, stride_imd, stride_sr, stride_sd,
    margin,
    MAX_VIOLATION: tl.constexpr, SAVE_MASK: tl.constexpr, TF32X3: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Both terms of the diagonal pairs (labels None) from one pass over tiles T = im[rows] @ s[cols].T:
    image rows [i_r * BLOCK_R, +BLOCK_R), caption columns of split i_s. Writes
      i2t partial of row i:                 part[i_s, i]               (reduction over the split's j != i)
      t2i partial of column j (row block):  part[NUM_SPLITS + i_r, j]  (reduction over the block's i != j)
    part_val = max of valid T (VSE++) or hinge sum (VSE0, relative to d_i resp. d_j from d_ptr);
    part_aux = int32 argmax (-1 if none) or fp32 active count. part_* are (NUM_SPLITS + row blocks, B).
    SAVE_MASK (VSE0): also the active hinges, packed: bit 2 (j % 16) of mask[i, j // 16] = i2t hinge (i, j)
    active, bit 2 (j % 16) + 1 = t2i hinge active; mask is (B, W = cdiv(B, 16)) int32. Splits and tiles
    start at multiples of BLOCK_C (a multiple of 16), so every word is written by exactly one tile."""
    i_r = tl.program_id(0)
    i_s = tl.program_id(1)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < B
    c_start = i_s * COLS_PER_SPLIT
    c_end = tl.minimum(c_start + COLS_PER_SPLIT, B)
    p_col = (NUM_SPLITS + i_r).to(tl.int64) * B  # this row block's t2i partial row
    if MAX_VIOLATION:
        run_max = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
        run_idx = tl.full((BLOCK_R,), -1, dtype=tl.int32)
    else:
        run_sum = tl.zeros((BLOCK_R,), dtype=tl.float32)
        run_cnt = tl.zeros((BLOCK_R,), dtype=tl.float32)

    for c0 in range(c_start, c_end, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        m_c = o_c < c_end
        # rows + min(c0, 0) = the rows (c0 >= 0), written per tile so that the compiler derives the image
        # row pointers again for each tile instead of keeping them live across the tile's epilogue
        o_xr = (o_r + tl.minimum(c0, 0)).to(tl.int64)
        b_t = _sim_tile(im_ptr, s_ptr, o_xr, m_r, o_c, m_c, D, stride_imr, stride_imd,
                        stride_sr, stride_sd, BLOCK_R, BLOCK_C, BLOCK_D, TF32X3, INTERP_BF16)  # [BR, BC]
        m_valid = m_r[:, None] & m_c[None, :] & (o_r[:, None] != o_c[None, :])
        if MAX_VIOLATION:
            # NaN similarities drop out of the max (their pairs' values are NaN through 0 * d)
            b_t = tl.where(m_valid & (b_t == b_t), b_t, float("-inf"))
            t_max = tl.max(b_t, axis=1)
            t_arg = _first_argmax(b_t, t_max, 1, BLOCK_C)  # first index among equal maxima
            upd = t_max > run_max  # strict: earlier columns win ties
            run_idx = tl.where(upd, c0 + t_arg, run_idx)
            run_max = tl.where(upd, t_max, run_max)
            c_max = tl.max(b_t, axis=0)  # [BC]
            c_arg = _first_argmax(b_t, c_max, 0, BLOCK_R)  # first row among equal maxima
            c_idx = tl.where(c_max > float("-inf"), i_r * BLOCK_R + c_arg, -1)
            tl.store(part_val_ptr + p_col + o_c, c_max, mask=m_c)
            tl.store(part_aux_ptr + p_col + o_c, c_idx, mask=m_c)
        else:
            b_t = tl.where(m_valid, b_t, float("-inf"))  # invalid hinges: -inf or NaN, never > 0
            b_dr = tl.load(d_ptr + o_r, mask=m_r, other=0.0)  # [BR] (per tile: not live across the k-loop)
            b_h = margin + b_t - b_dr[:, None]
            m_act = b_h > 0
            run_sum += tl.sum(tl.where(m_act, b_h, 0.0), axis=1)
            run_cnt += tl.sum(m_act.to(tl.float32), axis=1)
            b_dc = tl.load(d_ptr + o_c, mask=m_c, other=0.0)  # [BC]
            b_h = margin + b_t - b_dc[None, :]  # t2i hinges: T dies here
            m_col = b_h > 0
            if SAVE_MASK:  # between the two reductions: fewest tiles live at once
                b_bits = (m_act.to(tl.int32) | (m_col.to(tl.int32) << 1)) << (2 * (tl.arange(0, BLOCK_C) % 16))[None, :]
                b_words = tl.sum(tl.reshape(b_bits, (BLOCK_R, BLOCK_C // 16, 16)), axis=2)  # disjoint bits: sum = or
                o_w = c0 // 16 + tl.arange(0, BLOCK_C // 16)
                p_w = mask_ptr + (o_r[:, None] * W + o_w[None, :])  # int32: B * W <= SAVED_MASK_MAX_BYTES / 4
                tl.store(p_w, b_words, mask=m_r[:, None] & (o_w < W)[None, :])
            tl.store(part_val_ptr + p_col + o_c, tl.sum(tl.where(m_col, b_h, 0.0), axis=0), mask=m_c)
            tl.store(part_aux_ptr + p_col + o_c, tl.sum(m_col.to(tl.float32), axis=0), mask=m_c)

    o_out = i_s.to(tl.int64) * B + o_r
    if MAX_VIOLATION:
        _store_partials(part_val_ptr, part_aux_ptr, o_out, run_max, run_idx, m_r)
    else:
        _store_partials(part_val_ptr, part_aux_ptr, o_out, run_sum, run_cnt, m_r)


@triton.jit(do_not_specialize=["M"])
def _contrastive_diag_kernel(
    im_ptr, s_ptr, lab_ptr, d_ptr, M, D, stride_imr, stride_imd, stride_sr, stride_sd,
    HAS_LABELS: tl.constexpr, BLOCK_M: tl.constexpr, DOT_BLOCK_D: tl.constexpr,
):
    """d[j] = <im[p_j], s[j]> (fp32) for j in [i_m * BLOCK_M, +BLOCK_M), p_j = labels[j] or j: the
    thresholds of the VSE0 tile kernels, written once before them."""
    o_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    o_m64 = o_m.to(tl.int64)
    if HAS_LABELS:
        o_p = tl.load(lab_ptr + o_m, mask=m_m, other=0)
    else:
        o_p = o_m64
    b_d = _pair_dot(im_ptr, s_ptr, o_p, o_m64, m_m, D, stride_imr, stride_imd, stride_sr, stride_sd,
                    BLOCK_M, DOT_BLOCK_D)
    tl.store(d_ptr + o_m, b_d, mask=m_m)


@triton.jit(do_not_specialize=["M", "PARTS0", "PARTS1"])
def _contrastive_combine_kernel(
    im_ptr, s_ptr, lab_ptr, part_val_ptr, part_aux_ptr, val_ptr, aux_ptr, d_ptr,
    M, D, PARTS0, PARTS1,
    stride_imr, stride_imd, stride_sr, stride_sd,
    margin, scale,
    HAS_LABELS: tl.constexpr, NUM_TERMS: tl.constexpr, MAX_VIOLATION: tl.constexpr, LOAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr, DOT_BLOCK_D: tl.constexpr,
):
    """Reduce the partials of each term in order (term 0: rows [0, PARTS0) of part_*, term 1: the
    next PARTS1 rows; each row holds M values) and write, per pair j:
    val[t, j] = scale * relu(m + max - d_j) (VSE++) or scale * hinge sum (VSE0), plus 0 * d_j;
    aux[t, j] = hardest index (int32, -1 if none) or active count (fp32).
    d[j] = <im[p_j], s[j]> is computed and written, or read from d_ptr when LOAD_D."""
    i_m = tl.program_id(0)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    o_m64 = o_m.to(tl.int64)
    if LOAD_D:
        b_d = tl.load(d_ptr + o_m, mask=m_m, other=0.0)
    else:
        if HAS_LABELS:
            o_p = tl.load(lab_ptr + o_m, mask=m_m, other=0)
        else:
            o_p = o_m64
        b_d = _pair_dot(im_ptr, s_ptr, o_p, o_m64, m_m, D, stride_imr, stride_imd, stride_sr, stride_sd,
                        BLOCK_M, DOT_BLOCK_D)
        tl.store(d_ptr + o_m, b_d, mask=m_m)
    nan_flag = b_d * 0.0  # NaN when im[p_j] or s[j] is not finite
    for t in tl.static_range(NUM_TERMS):
        if t == 0:
            base = 0
            n_parts = PARTS0
        else:
            base = PARTS0.to(tl.int64) * M
            n_parts = PARTS1
        # int64 running offset: k * M passes 2**31 in int32 at B ~ 370k (fp32 tiles)
        o_part = o_m.to(tl.int64) + base
        if MAX_VIOLATION:
            best = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
            arg = tl.full((BLOCK_M,), -1, dtype=tl.int32)
            for k in range(n_parts):
                pv = tl.load(part_val_ptr + o_part, mask=m_m, other=float("-inf"))
                pa = tl.load(part_aux_ptr + o_part, mask=m_m, other=-1)
                o_part += M
                upd = pv > best  # strict: earlier parts (columns / rows) win ties
                best = tl.where(upd, pv, best)
                arg = tl.where(upd, pa, arg)
            val = tl.maximum(margin + best - b_d, 0.0)
            tl.store(aux_ptr + t * M + o_m, arg, mask=m_m)
        else:
            val = tl.zeros((BLOCK_M,), dtype=tl.float32)
            cnt = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for k in range(n_parts):
                val += tl.load(part_val_ptr + o_part, mask=m_m, other=0.0)
                cnt += tl.load(part_aux_ptr + o_part, mask=m_m, other=0.0)
                o_part += M
            tl.store(aux_ptr + t * M + o_m, cnt, mask=m_m)
        tl.store(val_ptr + t * M + o_m, val * scale + nan_flag, mask=m_m)


@triton.jit(do_not_specialize=["B"])
def _contrastive_small_fwd_kernel(
    im_ptr, s_ptr, loss_ptr, val_ptr, aux_ptr, a_ptr,
    B, D,
    stride_imr, stride_imd, stride_sr, stride_sd,
    margin, scale,
    MAX_VIOLATION: tl.constexpr, TF32X3: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, DOT_BLOCK_D: tl.constexpr, ROW_PARTS: tl.constexpr,
):
    """The whole "small" forward (labels None, both terms, B <= BLOCK_B) in one program: T = im @ s.T
    (a [BLOCK_B, BLOCK_B] tile, computed and reduced ROW_PARTS row blocks at a time so that a block of
    T, not all of it, is live per thread), d from pair dots, i2t = row reductions, t2i = column
    reductions (running over the row blocks in order: first index on ties). Writes val (2, B) fp32
    (scaled, + 0 * d), aux (2, B) (int32 hardest index / -1, or fp32 count), loss (0-dim fp32) = sum
    of val, and a (B, B) = the gradient matrix A (module docstring), stored in a's dtype (integers in
    [-2B + 2, 2], exact; int32 offsets: B * B <= BLOCK_B^2). val[1] holds d until the t2i values
    overwrite it, and the row values are read back to build A: the block's threads exchange them
    through global memory (tl.debug_barrier = bar.sync orders those accesses)."""
    BLOCK_H: tl.constexpr = BLOCK_B // ROW_PARTS
    o_j = tl.arange(0, BLOCK_B)  # captions (columns of T)
    m_j = o_j < B
    for h in tl.static_range(ROW_PARTS):  # d of the block's rows, parked in val[1]
        o_h = h * BLOCK_H + tl.arange(0, BLOCK_H)
        m_h = o_h < B
        b_dh = _pair_dot(im_ptr, s_ptr, o_h.to(tl.int64), o_h.to(tl.int64), m_h, D, stride_imr, stride_imd,
                         stride_sr, stride_sd, BLOCK_H, DOT_BLOCK_D)
        tl.store(val_ptr + B + o_h, b_dh, mask=m_h)
    tl.debug_barrier()
    if MAX_VIOLATION:
        c_max = tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32)
        c_idx = tl.full((BLOCK_B,), -1, dtype=tl.int32)
    else:
        v_c = tl.zeros((BLOCK_B,), dtype=tl.float32)
        n_c = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for h in tl.static_range(ROW_PARTS):
        o_h = h * BLOCK_H + tl.arange(0, BLOCK_H)  # images (rows of T)
        m_h = o_h < B
        b_dr = tl.load(val_ptr + B + o_h, mask=m_h, other=0.0)  # [BH] d_i of the rows
        b_t = _sim_tile(im_ptr, s_ptr, o_h.to(tl.int64), m_h, o_j, m_j, D, stride_imr, stride_imd, stride_sr,
                        stride_sd, BLOCK_H, BLOCK_B, BLOCK_D, TF32X3, INTERP_BF16)  # [BH(i), BB(j)]
        m_valid = m_h[:, None] & m_j[None, :] & (o_h[:, None] != o_j[None, :])
        if MAX_VIOLATION:
            b_t = tl.where(m_valid & (b_t == b_t), b_t, float("-inf"))  # NaN: as in the fused kernel
            r_max = tl.max(b_t, axis=1)
            r_idx = tl.where(r_max > float("-inf"), _first_argmax(b_t, r_max, 1, BLOCK_B), -1)  # hardest caption
            v_r = tl.maximum(margin + r_max - b_dr, 0.0) * scale + b_dr * 0.0
            tl.store(aux_ptr + o_h, r_idx, mask=m_h)
            h_max = tl.max(b_t, axis=0)  # [BB]
            h_arg = h * BLOCK_H + _first_argmax(b_t, h_max, 0, BLOCK_H)
            upd = h_max > c_max  # strict: earlier row blocks win ties
            c_idx = tl.where(upd, h_arg, c_idx)
            c_max = tl.where(upd, h_max, c_max)
        else:
            b_t = tl.where(m_valid, b_t, float("-inf"))  # invalid hinges: -inf or NaN, never > 0
            b_h = margin + b_t - b_dr[:, None]
            m_act = b_h > 0  # G_i2t
            v_r = tl.sum(tl.where(m_act, b_h, 0.0), axis=1) * scale + b_dr * 0.0
            tl.store(aux_ptr + o_h, tl.sum(m_act.to(tl.float32), axis=1), mask=m_h)
            b_a = m_act.to(tl.float32)
            b_dc = tl.load(val_ptr + B + o_j, mask=m_j, other=0.0)  # [BB] d_j of the columns
            b_h = margin + b_t - b_dc[None, :]
            m_act = b_h > 0  # G_t2i
            v_c += tl.sum(tl.where(m_act, b_h, 0.0), axis=0)
            n_c += tl.sum(m_act.to(tl.float32), axis=0)
            b_a += m_act.to(tl.float32)
            # A = G_i2t + G_t2i here (0 on the diagonal): the diagonal needs the complete counts, below
            tl.store(a_ptr + (o_h[:, None] * B + o_j[None, :]), b_a.to(a_ptr.dtype.element_ty),
                     mask=m_h[:, None] & m_j[None, :])
        tl.store(val_ptr + o_h, v_r, mask=m_h)
    b_dc = tl.load(val_ptr + B + o_j, mask=m_j, other=0.0)  # the last read of d: before the barrier
    tl.debug_barrier()  # then val[1] (d) and A's diagonal are overwritten, the row values read back
    if MAX_VIOLATION:
        c_idx = tl.where(c_max > float("-inf"), c_idx, -1)  # hardest image
        v_c = tl.maximum(margin + c_max - b_dc, 0.0) * scale + b_dc * 0.0
        ok_c = ((v_c > 0) & (c_idx >= 0)).to(tl.float32)
        tl.store(aux_ptr + B + o_j, c_idx, mask=m_j)
        for h in tl.static_range(ROW_PARTS):
            o_h = h * BLOCK_H + tl.arange(0, BLOCK_H)
            m_h = o_h < B
            r_idx = tl.load(aux_ptr + o_h, mask=m_h, other=-1)
            ok_r = ((tl.load(val_ptr + o_h, mask=m_h, other=0.0) > 0) & (r_idx >= 0)).to(tl.float32)
            b_a = tl.where(o_j[None, :] == r_idx[:, None], ok_r[:, None], 0.0)
            b_a += tl.where(o_h[:, None] == c_idx[None, :], ok_c[None, :], 0.0)
            b_a -= tl.where(o_h[:, None] == o_j[None, :], ok_r[:, None] + ok_c[None, :], 0.0)
            tl.store(a_ptr + (o_h[:, None] * B + o_j[None, :]), b_a.to(a_ptr.dtype.element_ty),
                     mask=m_h[:, None] & m_j[None, :])
    else:
        v_c = v_c * scale + b_dc * 0.0
        tl.store(aux_ptr + B + o_j, n_c, mask=m_j)
        n_r = tl.load(aux_ptr + o_j, mask=m_j, other=0.0)
        tl.store(a_ptr + o_j * (B + 1), (0.0 - (n_r + n_c)).to(a_ptr.dtype.element_ty), mask=m_j)  # A[i, i]
    tl.store(val_ptr + B + o_j, v_c, mask=m_j)
    v_r = tl.load(val_ptr + o_j, mask=m_j, other=0.0)
    tl.store(loss_ptr, tl.sum(tl.where(m_j, v_r, 0.0), axis=0) + tl.sum(tl.where(m_j, v_c, 0.0), axis=0))


@triton.jit(do_not_specialize=["B"])
def _contrastive_small_bwd_kernel(
    im_ptr, s_ptr, a_ptr, g_ptr, dim_ptr, ds_ptr,
    B, D,
    stride_imr, stride_imd, stride_sr, stride_sd,
    scale,
    TF32X3: tl.constexpr, INTERP_BF16: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """"small" backward, features [i_d * BLOCK_D, +BLOCK_D): dim = g scale A @ s, ds = g scale A.T @ im,
    stored in dim/ds's dtype; dim and ds are contiguous (B, D), a is contiguous (B, B) (int32 offsets:
    B * B <= BLOCK_B^2)."""
    i_d = tl.program_id(0)
    o_i = tl.arange(0, BLOCK_B)
    m_i = o_i < B
    o_i64 = o_i.to(tl.int64)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    m_bd = m_i[:, None] & m_d[None, :]
    g = tl.load(g_ptr).to(tl.float32) * scale
    o_out = o_i64[:, None] * D + o_d[None, :]
    # one product at a time, over j in BLOCK_K chunks (pipelined): a [BB, BK] block of A live, not [BB, BB]
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for j0 in range(0, B, BLOCK_K):
        o_j = j0 + tl.arange(0, BLOCK_K)
        m_j = o_j < B
        b_a = tl.load(a_ptr + (o_i[:, None] * B + o_j[None, :]), mask=m_i[:, None] & m_j[None, :], other=0.0)  # A
        b_s = tl.load(s_ptr + o_j.to(tl.int64)[:, None] * stride_sr + o_d[None, :] * stride_sd,
                      mask=m_j[:, None] & m_d[None, :], other=0.0)  # [BK, BD]
        acc = _mma(b_a, b_s, acc, TF32X3, INTERP_BF16)
    tl.store(dim_ptr + o_out, (acc * g).to(dim_ptr.dtype.element_ty), mask=m_bd)
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for j0 in range(0, B, BLOCK_K):
        o_j = j0 + tl.arange(0, BLOCK_K)
        m_j = o_j < B
        b_at = tl.load(a_ptr + (o_j[None, :] * B + o_i[:, None]), mask=m_i[:, None] & m_j[None, :], other=0.0)  # A.T
        b_im = tl.load(im_ptr + o_j.to(tl.int64)[:, None] * stride_imr + o_d[None, :] * stride_imd,
                       mask=m_j[:, None] & m_d[None, :], other=0.0)  # [BK, BD]
        acc = _mma(b_at, b_im, acc, TF32X3, INTERP_BF16)
    b_ds = acc * g
    tl.store(ds_ptr + o_out, b_ds.to(ds_ptr.dtype.element_ty), mask=m_bd)


@triton.jit(do_not_specialize=["M"])
def _contrastive_vsepp_bwd_kernel(
    im_ptr, s_ptr, lab_ptr, val_ptr, idx_ptr, g_ptr, dim_ptr, ds_ptr,
    M, D,
    stride_imr, stride_imd, stride_sr, stride_sd,
    scale,
    HAS_LABELS: tl.constexpr, HAS_I2T: tl.constexpr, HAS_T2I: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_DB: tl.constexpr,
):
    """VSE++ gradients of pairs [i_m * BLOCK_M, +BLOCK_M) and features [i_d * BLOCK_DB, +BLOCK_DB),
    atomically added to the fp32 accumulators dim (N, D) and ds (M, D), both contiguous. One gradient
    at a time (dim side from s rows, then ds side from im rows), so that at most two [BM, BDB] tiles
    are live: the sums are those of the backward in the module docstring, in the same order."""
    i_m = tl.program_id(0)
    i_d = tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    o_m64 = o_m.to(tl.int64)
    o_d = i_d * BLOCK_DB + tl.arange(0, BLOCK_DB)
    m_d = o_d < D
    m_md = m_m[:, None] & m_d[None, :]
    if HAS_LABELS:
        o_p = tl.load(lab_ptr + o_m, mask=m_m, other=0)
    else:
        o_p = o_m64
    g = tl.load(g_ptr).to(tl.float32) * scale
    if HAS_I2T:  # hardest caption a of pair j, weight w1 = g scale [value > 0]
        v = tl.load(val_ptr + o_m, mask=m_m, other=0.0)
        a = tl.load(idx_ptr + o_m, mask=m_m, other=-1).to(tl.int64)
        ok = m_m & (a >= 0) & (v > 0)
        w1 = tl.where(ok, g, 0.0)[:, None]
        m_a = ok[:, None] & m_d[None, :]
    if HAS_T2I:  # hardest image b of pair j, weight w2
        t_off = M if HAS_I2T else 0
        v = tl.load(val_ptr + t_off + o_m, mask=m_m, other=0.0)
        b = tl.load(idx_ptr + t_off + o_m, mask=m_m, other=-1).to(tl.int64)
        ok = m_m & (b >= 0) & (v > 0)
        w2 = tl.where(ok, g, 0.0)[:, None]
        m_b = ok[:, None] & m_d[None, :]

    # dim side: dim[b] += w2 s[j];  dim[p_j] += w1 (s[a] - s[j]) - w2 s[j]
    b_sj = tl.load(s_ptr + o_m64[:, None] * stride_sr + o_d[None, :] * stride_sd, mask=m_md, other=0.0)
    b_sj = b_sj.to(tl.float32)  # [BM, BDB] s[j]
    acc = tl.zeros((BLOCK_M, BLOCK_DB), dtype=tl.float32)
    if HAS_I2T:
        b_sa = tl.load(s_ptr + a[:, None] * stride_sr + o_d[None, :] * stride_sd, mask=m_a, other=0.0)
        acc += w1 * (b_sa.to(tl.float32) - b_sj)
    if HAS_T2I:
        acc -= w2 * b_sj
        tl.atomic_add(dim_ptr + b[:, None] * D + o_d[None, :], w2 * b_sj, mask=m_b, sem="relaxed")
    tl.atomic_add(dim_ptr + o_p[:, None] * D + o_d[None, :], acc, mask=m_md, sem="relaxed")

    # ds side: ds[a] += w1 im[p_j];  ds[j] += -w1 im[p_j] + w2 (im[b] - im[p_j])
    b_imp = tl.load(im_ptr + o_p[:, None] * stride_imr + o_d[None, :] * stride_imd, mask=m_md, other=0.0)
    b_imp = b_imp.to(tl.float32)  # [BM, BDB] im[p_j]
    acc = tl.zeros((BLOCK_M, BLOCK_DB), dtype=tl.float32)
    if HAS_I2T:
        acc -= w1 * b_imp
        tl.atomic_add(ds_ptr + a[:, None] * D + o_d[None, :], w1 * b_imp, mask=m_a, sem="relaxed")
    if HAS_T2I:
        b_imb = tl.load(im_ptr + b[:, None] * stride_imr + o_d[None, :] * stride_imd, mask=m_b, other=0.0)
        acc += w2 * (b_imb.to(tl.float32) - b_imp)
    tl.atomic_add(ds_ptr + o_m64[:, None] * D + o_d[None, :], acc, mask=m_md, sem="relaxed")


@triton.jit(do_not_specialize=["R", "C", "ROW0", "ROWS"])
def _contrastive_vse0_mask_kernel(
    x_ptr, y_ptr, lab_ptr, d_ptr, g_ptr,
    ROW0, ROWS, R, C, D,
    stride_xr, stride_xd, stride_yr, stride_yd, stride_gr,
    margin,
    LABEL_MODE: tl.constexpr, BOTH_TERMS: tl.constexpr, TF32X3: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """G[r - ROW0, c] = [valid(r, c) and m + T[r, c] - d[r] > 0] for rows ROW0 .. ROW0 + ROWS - 1,
    stored in g's dtype (0/1 exact in bf16/fp16/fp32); g is (ROWS, C) with unit column stride.
    BOTH_TERMS (labels None, X = im, Y = s): G = G_i2t + G_t2i, adding [valid and m + T - d[c] > 0]
    (values 0/1/2, exact in every dtype). Grid (column blocks, row blocks): C is unbounded, and
    grid axis 1 takes at most 65535 programs (the launcher caps the chunk rows)."""
    i_c = tl.program_id(0)
    i_r = tl.program_id(1)
    o_rl = i_r * BLOCK_R + tl.arange(0, BLOCK_R)  # rows within the chunk
    o_r = ROW0 + o_rl
    m_r = (o_rl < ROWS) & (o_r < R)
    lab_r, o_xr, o_pr = _row_indices(lab_ptr, o_r, m_r, LABEL_MODE)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    b_t = _sim_tile(x_ptr, y_ptr, o_xr, m_r, o_c, m_c, D, stride_xr, stride_xd, stride_yr, stride_yd,
                    BLOCK_R, BLOCK_C, BLOCK_D, TF32X3, INTERP_BF16)  # [BR, BC]
    lab_c = _col_labels(lab_ptr, o_c, m_c, LABEL_MODE)  # after the tile: not live across its k-loop
    b_d = tl.load(d_ptr + o_r, mask=m_r, other=0.0)
    m_valid = m_r[:, None] & m_c[None, :] & (lab_r[:, None] != lab_c[None, :])
    b_t = tl.where(m_valid, b_t, float("-inf"))  # invalid: m + T - d is -inf or NaN, never > 0
    b_g = ((margin + b_t - b_d[:, None]) > 0).to(tl.float32)
    if BOTH_TERMS:
        b_dc = tl.load(d_ptr + o_c, mask=m_c, other=0.0)
        b_g += ((margin + b_t - b_dc[None, :]) > 0).to(tl.float32)
    b_g = b_g.to(g_ptr.dtype.element_ty)
    p_g = g_ptr + o_rl.to(tl.int64)[:, None] * stride_gr + o_c[None, :]
    tl.store(p_g, b_g, mask=m_r[:, None] & m_c[None, :])


@triton.jit(do_not_specialize=["ROW0", "ROWS", "B", "W"])
def _contrastive_vse0_unpack_kernel(
    mask_ptr, g_ptr,
    ROW0, ROWS, B, W, stride_gr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """G[r - ROW0, c] = G_i2t + G_t2i (0/1/2) of rows ROW0 .. ROW0 + ROWS - 1 from the packed mask the
    "fused" VSE0 forward saved (see `_contrastive_fused_fwd_kernel`), in g's dtype. Grid (column
    blocks, row blocks), as the mask kernel's."""
    i_c = tl.program_id(0)
    i_r = tl.program_id(1)
    o_rl = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    o_r = ROW0 + o_rl
    m_r = (o_rl < ROWS) & (o_r < B)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < B
    m = m_r[:, None] & m_c[None, :]
    b_w = tl.load(mask_ptr + o_r.to(tl.int64)[:, None] * W + (o_c // 16)[None, :], mask=m, other=0)
    b_bits = (b_w >> (2 * (o_c % 16))[None, :]) & 3
    b_g = ((b_bits & 1) + (b_bits >> 1)).to(tl.float32).to(g_ptr.dtype.element_ty)
    tl.store(g_ptr + o_rl.to(tl.int64)[:, None] * stride_gr + o_c[None, :], b_g, mask=m)


@triton.jit(do_not_specialize=["B"])
def _contrastive_vse0_epilogue_kernel(
    mm_dim_ptr, mm_ds_ptr, im_ptr, s_ptr, cnt_ptr, g_ptr, dim_ptr, ds_ptr,
    B, D,
    stride_imr, stride_imd, stride_sr, stride_sd,
    scale,
    BLOCK_M: tl.constexpr, BLOCK_DB: tl.constexpr,
):
    """"fused" VSE0 backward epilogue, rows [i_m * BLOCK_M, +BLOCK_M), features of block i_d:
    dim[i] = g scale (mm_dim[i] - c_i s[i]),  ds[j] = g scale (mm_ds[j] - c_j im[j]),  in fp32, stored
    in dim/ds's dtype; c = cnt[0] + cnt[1] (active hinges of both terms); mm_*, dim, ds contiguous (B, D)."""
    i_m = tl.program_id(0)
    i_d = tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < B
    o_m64 = o_m.to(tl.int64)
    o_d = i_d * BLOCK_DB + tl.arange(0, BLOCK_DB)
    m_md = m_m[:, None] & (o_d < D)[None, :]
    g = tl.load(g_ptr).to(tl.float32) * scale
    c = tl.load(cnt_ptr + o_m, mask=m_m, other=0.0) + tl.load(cnt_ptr + B + o_m, mask=m_m, other=0.0)
    o_out = o_m64[:, None] * D + o_d[None, :]
    b_s = tl.load(s_ptr + o_m64[:, None] * stride_sr + o_d[None, :] * stride_sd, mask=m_md, other=0.0)
    b_mm = tl.load(mm_dim_ptr + o_out, mask=m_md, other=0.0).to(tl.float32)
    tl.store(dim_ptr + o_out, ((b_mm - c[:, None] * b_s.to(tl.float32)) * g).to(dim_ptr.dtype.element_ty), mask=m_md)
    b_im = tl.load(im_ptr + o_m64[:, None] * stride_imr + o_d[None, :] * stride_imd, mask=m_md, other=0.0)
    b_mm = tl.load(mm_ds_ptr + o_out, mask=m_md, other=0.0).to(tl.float32)
    tl.store(ds_ptr + o_out, ((b_mm - c[:, None] * b_im.to(tl.float32)) * g).to(ds_ptr.dtype.element_ty), mask=m_md)


# ---------------------------------------------------------------------------------------------------
# launchers


_DUMMY_LABELS = {}


def _labels_or_dummy(labels, device):
    """labels, or a cached one-element int64 tensor standing in for the pointer (never read)."""
    if labels is not None:
        return labels
    if device not in _DUMMY_LABELS:
        _DUMMY_LABELS[device] = torch.zeros(1, dtype=torch.int64, device=device)
    return _DUMMY_LABELS[device]


def _term_operands(im, s, labels, term):
    """(X, Y, partner, label mode, C) of one term (see the module docstring)."""
    if term == "i2t":
        return im, s, s, (NO_LABELS if labels is None else I2T_LABELS), s.shape[0]
    return s, im, im, (NO_LABELS if labels is None else T2I_LABELS), im.shape[0]


def _num_splits(settings: LossSettings, M: int, C_max: int) -> int:
    n_row_blocks = triton.cdiv(M, settings.BLOCK_R)
    n_col_blocks = triton.cdiv(C_max, settings.BLOCK_C)
    return max(1, min(n_col_blocks, triton.cdiv(settings.target_programs, n_row_blocks)))


def contrastive_small_fwd(im, s, margin: float, max_violation: bool, scale: float, settings: LossSettings):
    """"small" path forward, ONE launch: im, s (B, D) with B <= settings.SMALL_B, labels None, both terms.

    Returns loss (0-dim fp32), val (2, B) fp32 per-pair values (scaled), aux (2, B) (VSE++: int32
    hardest index or -1; VSE0: fp32 active count) and A (B, B) in the input dtype, the gradient matrix
    of `contrastive_small_bwd` (module docstring)."""
    B, D = im.shape
    dev = im.device
    loss = torch.empty((), dtype=torch.float32, device=dev)
    val = torch.empty((2, B), dtype=torch.float32, device=dev)
    aux = torch.empty((2, B), dtype=torch.int32 if max_violation else torch.float32, device=dev)
    A = torch.empty((B, B), dtype=im.dtype, device=dev)
    _contrastive_small_fwd_kernel[(1,)](
        im, s, loss, val, aux, A,
        B, D,
        im.stride(0), im.stride(1), s.stride(0), s.stride(1),
        margin, scale,
        MAX_VIOLATION=max_violation, TF32X3=settings.tf32x3, INTERP_BF16=settings.interp_bf16,
        BLOCK_B=settings.SMALL_B, BLOCK_D=settings.SMALL_BLOCK_D, DOT_BLOCK_D=_DOT_BLOCK_D,
        ROW_PARTS=settings.small_row_parts, num_warps=settings.small_warps, num_stages=settings.num_stages,
    )
    return loss, val, aux, A


def contrastive_small_bwd(grad_loss, im, s, A, scale: float, settings: LossSettings):
    """"small" path backward, ONE launch (a program per D-block): dim = g scale A @ s, ds = g scale A.T @ im
    in the input dtype; grad_loss is the 0-dim fp32 upstream gradient (read on the device, no sync)."""
    B, D = im.shape
    dim = torch.empty((B, D), dtype=im.dtype, device=im.device)
    ds = torch.empty((B, D), dtype=s.dtype, device=s.device)
    _contrastive_small_bwd_kernel[(triton.cdiv(D, settings.SMALL_BLOCK_D),)](
        im, s, A, grad_loss, dim, ds,
        B, D,
        im.stride(0), im.stride(1), s.stride(0), s.stride(1),
        scale,
        TF32X3=settings.tf32x3, INTERP_BF16=settings.interp_bf16,
        BLOCK_B=settings.SMALL_B, BLOCK_D=settings.SMALL_BLOCK_D, BLOCK_K=settings.SMALL_BLOCK_K,
        num_warps=settings.small_warps, num_stages=settings.num_stages,
    )
    return dim, ds


def _fused_block_c(settings: LossSettings, max_violation: bool, save_mask: bool) -> int:
    """Columns per tile of the fused forward. VSE0 keeps both hinge reductions of a tile live: 32 for
    fp32 (3xTF32) VSE0 and 64 for 16-bit VSE0 that also packs the mask; with the full tile ptxas
    spilled 8 B per thread there (sm_80 fp32, sm_90 16-bit; the contiguous, 16-aligned builds)."""
    if max_violation:
        return settings.BLOCK_C
    if settings.tf32x3:
        return min(settings.BLOCK_C, 32)
    return min(settings.BLOCK_C, 64) if save_mask else settings.BLOCK_C


def _fused_fwd(im, s, margin, max_violation, scale, settings, save_mask):
    """"fused" path forward (labels None, both terms): [diag kernel (VSE0)] + fused tile kernel + combine.
    Returns (val, aux, d, mask): mask = the packed active hinges (VSE0 with save_mask, when at most
    SAVED_MASK_MAX_BYTES), else None."""
    B, D = im.shape
    dev = im.device
    splits = _num_splits(settings, B, B)
    row_blocks = triton.cdiv(B, settings.BLOCK_R)
    aux_dtype = torch.int32 if max_violation else torch.float32
    d = torch.empty((B,), dtype=torch.float32, device=dev)
    if not max_violation:  # the hinges of both terms need d_i and d_j inside the tile loop
        _diag(im, s, None, d, settings)
    part_val = torch.empty((splits + row_blocks, B), dtype=torch.float32, device=dev)
    part_aux = torch.empty((splits + row_blocks, B), dtype=aux_dtype, device=dev)
    words = triton.cdiv(B, 16)
    save_mask = save_mask and not max_violation and B * words * 4 <= SAVED_MASK_MAX_BYTES
    block_c = _fused_block_c(settings, max_violation, save_mask)
    cols_per_split = triton.cdiv(triton.cdiv(B, block_c), splits) * block_c
    mask = torch.empty((B, words), dtype=torch.int32, device=dev) if save_mask else part_val
    _contrastive_fused_fwd_kernel[(row_blocks, splits)](
        im, s, d, part_val, part_aux, mask,
        B, D, cols_per_split, splits, words,
        im.stride(0), im.stride(1), s.stride(0), s.stride(1),
        margin,
        MAX_VIOLATION=max_violation, SAVE_MASK=save_mask, TF32X3=settings.tf32x3, INTERP_BF16=settings.interp_bf16,
        BLOCK_R=settings.BLOCK_R, BLOCK_C=block_c, BLOCK_D=settings.BLOCK_D,
        num_warps=settings.num_warps, num_stages=settings.num_stages,
    )
    val, aux, d = _combine(im, s, None, part_val, part_aux, d, splits, row_blocks, 2, margin, max_violation, scale,
                           settings, load_d=not max_violation)
    return val, aux, d, (mask if save_mask else None)


def _diag(im, s, labels, d, settings):
    """d[j] = <im[p_j], s[j]> (`_contrastive_diag_kernel`)."""
    M, D = s.shape
    _contrastive_diag_kernel[(triton.cdiv(M, settings.BLOCK_M),)](
        im, s, _labels_or_dummy(labels, im.device), d, M, D, im.stride(0), im.stride(1), s.stride(0), s.stride(1),
        HAS_LABELS=labels is not None, BLOCK_M=settings.BLOCK_M, DOT_BLOCK_D=_DOT_BLOCK_D,
        num_warps=settings.elem_warps,
    )


def _combine(im, s, labels, part_val, part_aux, d, parts0, parts1, T, margin, max_violation, scale, settings,
             load_d):
    M, D = s.shape
    val = torch.empty((T, M), dtype=torch.float32, device=im.device)
    aux = torch.empty((T, M), dtype=part_aux.dtype, device=im.device)
    _contrastive_combine_kernel[(triton.cdiv(M, settings.BLOCK_M),)](
        im, s, _labels_or_dummy(labels, im.device), part_val, part_aux, val, aux, d,
        M, D, parts0, parts1,
        im.stride(0), im.stride(1), s.stride(0), s.stride(1),
        margin, scale,
        HAS_LABELS=labels is not None, NUM_TERMS=T, MAX_VIOLATION=max_violation, LOAD_D=load_d,
        BLOCK_M=settings.BLOCK_M, DOT_BLOCK_D=_DOT_BLOCK_D, num_warps=settings.elem_warps,
    )
    return val, aux, d


def contrastive_fwd(im, s, labels, margin: float, max_violation: bool, terms: tuple, scale: float,
                    settings: LossSettings, save_mask: bool = False):
    """Forward of the selected terms ("i2t", "t2i" in that order) on the "fused" path (labels None and
    both terms) or the "terms" path (else); the "small" path is `contrastive_small_fwd`.

    im (N, D), s (M, D): fp32/bf16/fp16, same dtype and device, any strides; labels (M,) int64 or None.
    Returns val (T, M) fp32 per-pair loss values (scaled), aux (T, M) (VSE++: int32 hardest index or
    -1; VSE0: fp32 active count), d (M,) fp32 = <im[p_j], s[j]>, and the packed hinge mask for the
    backward (int32 (N, cdiv(N, 16)); "fused" VSE0 with save_mask only, else None).
    """
    if labels is None and len(terms) == 2:
        return _fused_fwd(im, s, margin, max_violation, scale, settings, save_mask)
    N, D = im.shape
    M = s.shape[0]
    T = len(terms)
    dev = im.device
    lab = _labels_or_dummy(labels, dev)
    splits = _num_splits(settings, M, max(N, M))
    aux_dtype = torch.int32 if max_violation else torch.float32
    part_val = torch.empty((T, splits, M), dtype=torch.float32, device=dev)
    part_aux = torch.empty((T, splits, M), dtype=aux_dtype, device=dev)
    d = torch.empty((M,), dtype=torch.float32, device=dev)
    if not max_violation:  # VSE0 hinges need d inside the tile loop: once for both terms
        _diag(im, s, labels, d, settings)
    for t, term in enumerate(terms):
        X, Y, _, mode, C = _term_operands(im, s, labels, term)
        cols_per_split = triton.cdiv(triton.cdiv(C, settings.BLOCK_C), splits) * settings.BLOCK_C
        grid = (triton.cdiv(M, settings.BLOCK_R), splits)
        _contrastive_fwd_kernel[grid](
            X, Y, d, lab, part_val[t], part_aux[t],
            M, C, D, cols_per_split,
            X.stride(0), X.stride(1), Y.stride(0), Y.stride(1),
            float(margin),
            LABEL_MODE=mode, MAX_VIOLATION=max_violation, TF32X3=settings.tf32x3, INTERP_BF16=settings.interp_bf16,
            BLOCK_R=settings.BLOCK_R, BLOCK_C=settings.BLOCK_C, BLOCK_D=settings.BLOCK_D,
            num_warps=settings.num_warps, num_stages=settings.num_stages,
        )
    val, aux, d = _combine(im, s, labels, part_val, part_aux, d, splits, splits, T, margin, max_violation, scale,
                           settings, load_d=not max_violation)
    return val, aux, d, None


def contrastive_vsepp_bwd(grad_loss, im, s, labels, val, idx, terms: tuple, scale: float,
                          settings: LossSettings):
    """VSE++ gradients (dim (N, D), ds (M, D) in the input dtype) from the saved per-pair values and
    hardest indices; grad_loss is the 0-dim upstream gradient (read on the device, no sync)."""
    N, D = im.shape
    M = s.shape[0]
    dim = torch.zeros((N, D), dtype=torch.float32, device=im.device)
    ds = torch.zeros((M, D), dtype=torch.float32, device=im.device)
    lab = _labels_or_dummy(labels, im.device)
    grid = (triton.cdiv(M, settings.BLOCK_M), triton.cdiv(D, settings.BLOCK_DB))
    _contrastive_vsepp_bwd_kernel[grid](
        im, s, lab, val, idx, grad_loss, dim, ds,
        M, D,
        im.stride(0), im.stride(1), s.stride(0), s.stride(1),
        scale,
        HAS_LABELS=labels is not None, HAS_I2T="i2t" in terms, HAS_T2I="t2i" in terms,
        BLOCK_M=settings.BLOCK_M, BLOCK_DB=settings.BLOCK_DB, num_warps=settings.elem_warps,
    )
    return dim.to(im.dtype), ds.to(s.dtype)


def _chunk_rows(settings: LossSettings, R: int, C: int, itemsize: int, max_bytes: int = None) -> int:
    """Rows of G per backward chunk: about max_bytes of G in whole BLOCK_R row blocks, and no more row
    blocks than grid axis 1 takes (BLOCK_R rows per program in the mask kernel, BLOCK_M in the
    unpack kernel)."""
    rows = max(1, (_MASK_CHUNK_BYTES if max_bytes is None else max_bytes) // max(1, C * itemsize))
    rows = max(settings.BLOCK_R, rows // settings.BLOCK_R * settings.BLOCK_R)
    rows = min(rows, _GRID_AXIS1_MAX * min(settings.BLOCK_R, settings.BLOCK_M))
    return min(rows, R)


_GRID_AXIS1_MAX = 65535  # CUDA's limit on grid axes 1 and 2


def _launch_mask(X, Y, lab, d, G, r0, n, R, C, margin, mode, both_terms, settings, block_c=None):
    block_c = block_c or settings.BLOCK_C
    grid = (triton.cdiv(C, block_c), triton.cdiv(n, settings.BLOCK_R))
    _contrastive_vse0_mask_kernel[grid](
        X, Y, lab, d, G,
        r0, n, R, C, X.shape[1],
        X.stride(0), X.stride(1), Y.stride(0), Y.stride(1), G.stride(0),
        margin,
        LABEL_MODE=mode, BOTH_TERMS=both_terms, TF32X3=settings.tf32x3, INTERP_BF16=settings.interp_bf16,
        BLOCK_R=settings.BLOCK_R, BLOCK_C=block_c, BLOCK_D=settings.BLOCK_D,
        num_warps=settings.num_warps, num_stages=settings.num_stages,
    )


# torch >= 2.8 on CUDA: fp16/bf16 matmuls with an fp32 result (cuBLAS keeps its fp32 accumulator).
# The device types it is tried on; emptied after a first failure (then fp32 copies are multiplied).
_MM_OUT_DTYPE_DEVICES = {"cuda"} if hasattr(torch.ops.aten.mm, "dtype") else set()


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in float32. 16-bit operands are multiplied as they are, and the product is not rounded
    to 16 bits: the VSE0 backward subtracts threshold terms of similar size from it (cancellation).
    On CUDA through cuBLAS with an fp32 output; elsewhere (CPU, torch < 2.8), or should that call
    fail (a warning says so, once), on fp32 copies."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    if a.device.type in _MM_OUT_DTYPE_DEVICES and a.dtype == b.dtype:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, NotImplementedError) as err:
            _MM_OUT_DTYPE_DEVICES.discard(a.device.type)
            warnings.warn(f"torch.mm(..., out_dtype=torch.float32) failed for {a.dtype} on {a.device.type} "
                          f"({str(err).splitlines()[0][:200]}): the VSE0 backward multiplies float32 copies "
                          "instead", RuntimeWarning, stacklevel=2)
    return a.float() @ b.float()


def _fused_vse0_bwd(grad_loss, im, s, cnt, d, margin, scale, settings, mask=None):
    """"fused" VSE0 backward (labels None, both terms): per image-row chunk G = G_i2t + G_t2i, unpacked
    from the forward's saved mask (or, without one, from a recompute of S), dim[chunk] = G @ s and
    ds += G.T @ im[chunk] (cuBLAS), then the epilogue kernel."""
    B, D = im.shape
    lab = _labels_or_dummy(None, im.device)

    def fill(G, r0, n):
        if mask is None:
            # the forward's tile width: its hinge counts and this mask then come from the same products
            _launch_mask(im, s, lab, d, G, r0, n, B, B, margin, NO_LABELS, True, settings,
                         block_c=_fused_block_c(settings, False, False))
        else:
            grid = (triton.cdiv(B, settings.BLOCK_DB), triton.cdiv(n, settings.BLOCK_M))
            _contrastive_vse0_unpack_kernel[grid](mask, G, r0, n, B, mask.shape[1], G.stride(0),
                                                  BLOCK_R=settings.BLOCK_M, BLOCK_C=settings.BLOCK_DB,
                                                  num_warps=settings.elem_warps)

    chunk_bytes = _MASK_CHUNK_BYTES if mask is None else _SAVED_MASK_CHUNK_BYTES
    rows = _chunk_rows(settings, B, B, im.element_size(), chunk_bytes)
    G_rows = torch.empty((rows, B), dtype=im.dtype, device=im.device)  # one buffer for every chunk
    if rows >= B:  # one chunk: the matmul outputs go straight to the epilogue
        fill(G_rows, 0, B)
        mm_dim, mm_ds = _mm_fp32(G_rows, s), _mm_fp32(G_rows.t(), im)
    else:
        mm_dim = torch.empty((B, D), dtype=torch.float32, device=im.device)
        mm_ds = torch.zeros((B, D), dtype=torch.float32, device=im.device)
        for r0 in range(0, B, rows):
            n = min(rows, B - r0)
            G = G_rows[:n]
            fill(G, r0, n)
            mm_dim[r0:r0 + n] = _mm_fp32(G, s)
            mm_ds += _mm_fp32(G.t(), im[r0:r0 + n])
        del G
    del G_rows
    dim = torch.empty((B, D), dtype=im.dtype, device=im.device)
    ds = torch.empty((B, D), dtype=s.dtype, device=s.device)
    grid = (triton.cdiv(B, settings.BLOCK_M), triton.cdiv(D, settings.BLOCK_DB))
    _contrastive_vse0_epilogue_kernel[grid](
        mm_dim, mm_ds, im, s, cnt, grad_loss, dim, ds,
        B, D,
        im.stride(0), im.stride(1), s.stride(0), s.stride(1),
        scale,
        BLOCK_M=settings.BLOCK_M, BLOCK_DB=settings.BLOCK_DB, num_warps=settings.elem_warps,
    )
    return dim, ds


def contrastive_vse0_bwd(grad_loss, im, s, labels, cnt, d, margin: float, terms: tuple, scale: float,
                         settings: LossSettings, mask=None):
    """VSE0 gradients; labels None with both terms: `_fused_vse0_bwd`. Else per term and row chunk:
    G (rows, C) from `_contrastive_vse0_mask_kernel`, then dX = G @ Y and dY += G.T @ X (cuBLAS). The
    threshold terms of all pairs, with c_j = total active count of pair j: dim[p_j] -= c_j s[j],
    ds[j] -= c_j im[p_j]. All times g * scale. With labels, the i2t rows and the threshold terms are
    scattered into dim by index_add_ (atomic on CUDA when labels repeat)."""
    if labels is None and len(terms) == 2:
        return _fused_vse0_bwd(grad_loss, im, s, cnt, d, margin, scale, settings, mask)
    N, D = im.shape
    M = s.shape[0]
    dim = torch.zeros((N, D), dtype=torch.float32, device=im.device)
    ds = torch.zeros((M, D), dtype=torch.float32, device=im.device)
    lab = _labels_or_dummy(labels, im.device)
    for term in terms:
        X, Y, _, mode, C = _term_operands(im, s, labels, term)
        dX_acc, dY_acc = (dim, ds) if term == "i2t" else (ds, dim)
        rows = _chunk_rows(settings, M, C, im.element_size())
        G_rows = torch.empty((rows, C), dtype=im.dtype, device=im.device)  # one buffer for every chunk
        for r0 in range(0, M, rows):
            n = min(rows, M - r0)
            G = G_rows[:n]
            _launch_mask(X, Y, lab, d, G, r0, n, M, C, margin, mode, False, settings)
            if term == "i2t" and labels is not None:
                Xc = X.index_select(0, labels[r0:r0 + n])
                dim.index_add_(0, labels[r0:r0 + n], _mm_fp32(G, Y))
            else:
                Xc = X[r0:r0 + n]
                dX_acc[r0:r0 + n] += _mm_fp32(G, Y)
            dY_acc += _mm_fp32(G.t(), Xc)
        del G, G_rows
    c = cnt.sum(0)  # (M,)
    im_p = im if labels is None else im.index_select(0, labels)
    ds -= c[:, None] * im_p.float()
    if labels is None:
        dim -= c[:, None] * s.float()
    else:
        dim.index_add_(0, labels, -c[:, None] * s.float())
    g = grad_loss.to(torch.float32) * scale
    return (dim * g).to(im.dtype), (ds * g).to(s.dtype)


# ---------------------------------------------------------------------------------------------------
# ahead-of-time compile list


def compile_specializations() -> list:
    """Every (kernel, dtype, flag combination) the launchers can pick, with the GPU tile configs of
    `loss_settings` (no autotuning: one config per dtype). Strides as in a contiguous launch: unit
    feature strides as constexpr 1 (Triton specializes integer arguments equal to 1), the rest i32.
    The tile kernels of bf16/fp16 (forward, fused forward, small forward/backward, VSE0 mask) are
    marked tensor_cores=True."""
    specs = []
    for dtype, tdt in _TRITON_DTYPE.items():
        st = _gpu_settings(dtype)
        tc = dtype != torch.float32
        blocks = {"BLOCK_R": st.BLOCK_R, "BLOCK_C": st.BLOCK_C, "BLOCK_D": st.BLOCK_D}
        strides = {"stride_imr": "i32", "stride_imd": "constexpr", "stride_sr": "i32", "stride_sd": "constexpr"}
        unit = {"stride_imd": 1, "stride_sd": 1}
        prec = {"TF32X3": not tc, "INTERP_BF16": False}
        for mode in (NO_LABELS, I2T_LABELS, T2I_LABELS):
            for mv in (True, False):
                sig = {"x_ptr": f"*{tdt}", "y_ptr": f"*{tdt}", "d_ptr": "*fp32", "lab_ptr": "*i64",
                       "part_val_ptr": "*fp32", "part_aux_ptr": "*i32" if mv else "*fp32",
                       "R": "i32", "C": "i32", "D": "i32", "COLS_PER_SPLIT": "i32",
                       "stride_xr": "i32", "stride_xd": "constexpr", "stride_yr": "i32", "stride_yd": "constexpr",
                       "margin": "fp32", "LABEL_MODE": "constexpr", "MAX_VIOLATION": "constexpr",
                       "TF32X3": "constexpr", "INTERP_BF16": "constexpr", "BLOCK_R": "constexpr",
                       "BLOCK_C": "constexpr", "BLOCK_D": "constexpr"}
                consts = {"stride_xd": 1, "stride_yd": 1, "LABEL_MODE": mode, "MAX_VIOLATION": mv, **prec, **blocks}
                specs.append(_spec(f"contrastive_fwd-{tdt}-L{mode}-{'vsepp' if mv else 'vse0'}",
                                   _contrastive_fwd_kernel, sig, consts, st.num_warps, st.num_stages, tc))
            for both in ((False, True) if mode == NO_LABELS else (False,)):
                sig = {"x_ptr": f"*{tdt}", "y_ptr": f"*{tdt}", "lab_ptr": "*i64", "d_ptr": "*fp32", "g_ptr": f"*{tdt}",
                       "ROW0": "i32", "ROWS": "i32", "R": "i32", "C": "i32", "D": "i32",
                       "stride_xr": "i32", "stride_xd": "constexpr", "stride_yr": "i32", "stride_yd": "constexpr",
                       "stride_gr": "i32", "margin": "fp32", "LABEL_MODE": "constexpr", "BOTH_TERMS": "constexpr",
                       "TF32X3": "constexpr", "INTERP_BF16": "constexpr", "BLOCK_R": "constexpr",
                       "BLOCK_C": "constexpr", "BLOCK_D": "constexpr"}
                consts = {"stride_xd": 1, "stride_yd": 1, "LABEL_MODE": mode, "BOTH_TERMS": both, **prec, **blocks}
                if both:  # the fused backward's recompute, at the fused forward's tile width
                    consts["BLOCK_C"] = _fused_block_c(st, False, False)
                specs.append(_spec(f"contrastive_vse0_mask-{tdt}-L{mode}{'-both' if both else ''}",
                                   _contrastive_vse0_mask_kernel, sig, consts, st.num_warps, st.num_stages, tc))
        for mv, save_mask in ((True, False), (False, False), (False, True)):
            mode_name = ("vsepp" if mv else "vse0") + ("-mask" if save_mask else "")
            sig = {"im_ptr": f"*{tdt}", "s_ptr": f"*{tdt}", "d_ptr": "*fp32", "part_val_ptr": "*fp32",
                   "part_aux_ptr": "*i32" if mv else "*fp32", "mask_ptr": "*i32" if save_mask else "*fp32",
                   "B": "i32", "D": "i32", "COLS_PER_SPLIT": "i32",
                   "NUM_SPLITS": "i32", "W": "i32", **strides, "margin": "fp32", "MAX_VIOLATION": "constexpr",
                   "SAVE_MASK": "constexpr", "TF32X3": "constexpr", "INTERP_BF16": "constexpr", "BLOCK_R": "constexpr",
                   "BLOCK_C": "constexpr", "BLOCK_D": "constexpr"}
            consts = {**unit, "MAX_VIOLATION": mv, "SAVE_MASK": save_mask, **prec, **blocks,
                      "BLOCK_C": _fused_block_c(st, mv, save_mask)}
            specs.append(_spec(f"contrastive_fused_fwd-{tdt}-{mode_name}", _contrastive_fused_fwd_kernel, sig,
                               consts, st.num_warps, st.num_stages, tc))
        sig = {"mask_ptr": "*i32", "g_ptr": f"*{tdt}", "ROW0": "i32", "ROWS": "i32", "B": "i32", "W": "i32",
               "stride_gr": "i32", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}
        specs.append(_spec(f"contrastive_vse0_unpack-{tdt}", _contrastive_vse0_unpack_kernel, sig,
                           {"BLOCK_R": st.BLOCK_M, "BLOCK_C": st.BLOCK_DB}, st.elem_warps, 1, False))
        for mv in (True, False):
            mode_name = "vsepp" if mv else "vse0"
            sig = {"im_ptr": f"*{tdt}", "s_ptr": f"*{tdt}", "loss_ptr": "*fp32", "val_ptr": "*fp32",
                   "aux_ptr": "*i32" if mv else "*fp32", "a_ptr": f"*{tdt}", "B": "i32", "D": "i32", **strides,
                   "margin": "fp32", "scale": "fp32", "MAX_VIOLATION": "constexpr", "TF32X3": "constexpr",
                   "INTERP_BF16": "constexpr", "BLOCK_B": "constexpr", "BLOCK_D": "constexpr",
                   "DOT_BLOCK_D": "constexpr", "ROW_PARTS": "constexpr"}
            consts = {**unit, "MAX_VIOLATION": mv, **prec, "BLOCK_B": st.SMALL_B, "BLOCK_D": st.SMALL_BLOCK_D,
                      "DOT_BLOCK_D": _DOT_BLOCK_D, "ROW_PARTS": st.small_row_parts}
            specs.append(_spec(f"contrastive_small_fwd-{tdt}-{mode_name}", _contrastive_small_fwd_kernel, sig,
                               consts, st.small_warps, st.num_stages, tc))
        sig = {"im_ptr": f"*{tdt}", "s_ptr": f"*{tdt}", "a_ptr": f"*{tdt}", "g_ptr": "*fp32", "dim_ptr": f"*{tdt}",
               "ds_ptr": f"*{tdt}", "B": "i32", "D": "i32", **strides, "scale": "fp32", "TF32X3": "constexpr",
               "INTERP_BF16": "constexpr", "BLOCK_B": "constexpr", "BLOCK_D": "constexpr", "BLOCK_K": "constexpr"}
        consts = {**unit, **prec, "BLOCK_B": st.SMALL_B, "BLOCK_D": st.SMALL_BLOCK_D, "BLOCK_K": st.SMALL_BLOCK_K}
        specs.append(_spec(f"contrastive_small_bwd-{tdt}", _contrastive_small_bwd_kernel, sig, consts,
                           st.small_warps, st.num_stages, tc))
        for has_labels in (False, True):
            sig = {"im_ptr": f"*{tdt}", "s_ptr": f"*{tdt}", "lab_ptr": "*i64", "d_ptr": "*fp32", "M": "i32",
                   "D": "i32", **strides, "HAS_LABELS": "constexpr", "BLOCK_M": "constexpr", "DOT_BLOCK_D": "constexpr"}
            consts = {**unit, "HAS_LABELS": has_labels, "BLOCK_M": st.BLOCK_M, "DOT_BLOCK_D": _DOT_BLOCK_D}
            specs.append(_spec(f"contrastive_diag-{tdt}{'-lab' if has_labels else ''}", _contrastive_diag_kernel,
                               sig, consts, st.elem_warps, 1, False))
        sig = {"mm_dim_ptr": "*fp32", "mm_ds_ptr": "*fp32", "im_ptr": f"*{tdt}", "s_ptr": f"*{tdt}",  # fp32 matmuls
               "cnt_ptr": "*fp32", "g_ptr": "*fp32", "dim_ptr": f"*{tdt}", "ds_ptr": f"*{tdt}",
               "B": "i32", "D": "i32", **strides, "scale": "fp32", "BLOCK_M": "constexpr", "BLOCK_DB": "constexpr"}
        specs.append(_spec(f"contrastive_vse0_epilogue-{tdt}", _contrastive_vse0_epilogue_kernel,
                           sig, {**unit, "BLOCK_M": st.BLOCK_M, "BLOCK_DB": st.BLOCK_DB}, st.elem_warps, 1, False))
        for has_labels in (False, True):
            for mv in (True, False):
                for n_terms in (1, 2):
                    # VSE0 reads the d that the diag kernel wrote before the tile kernels (LOAD_D)
                    for load_d in (not mv,):
                        sig = {"im_ptr": f"*{tdt}", "s_ptr": f"*{tdt}", "lab_ptr": "*i64", "part_val_ptr": "*fp32",
                               "part_aux_ptr": "*i32" if mv else "*fp32", "val_ptr": "*fp32",
                               "aux_ptr": "*i32" if mv else "*fp32", "d_ptr": "*fp32",
                               "M": "i32", "D": "i32", "PARTS0": "i32", "PARTS1": "i32", **strides,
                               "margin": "fp32", "scale": "fp32", "HAS_LABELS": "constexpr", "NUM_TERMS": "constexpr",
                               "MAX_VIOLATION": "constexpr", "LOAD_D": "constexpr", "BLOCK_M": "constexpr",
                               "DOT_BLOCK_D": "constexpr"}
                        consts = {**unit, "HAS_LABELS": has_labels, "NUM_TERMS": n_terms, "MAX_VIOLATION": mv,
                                  "LOAD_D": load_d, "BLOCK_M": st.BLOCK_M, "DOT_BLOCK_D": _DOT_BLOCK_D}
                        specs.append(_spec(
                            f"contrastive_combine-{tdt}-{'lab' if has_labels else 'diag'}-T{n_terms}-"
                            f"{'vsepp' if mv else 'vse0'}{'-loadd' if load_d else ''}",
                            _contrastive_combine_kernel, sig, consts, st.elem_warps, 1, False))
            for i2t, t2i in ((True, True), (True, False), (False, True)):
                sig = {"im_ptr": f"*{tdt}", "s_ptr": f"*{tdt}", "lab_ptr": "*i64", "val_ptr": "*fp32",
                       "idx_ptr": "*i32", "g_ptr": "*fp32", "dim_ptr": "*fp32", "ds_ptr": "*fp32",
                       "M": "i32", "D": "i32", **strides,
                       "scale": "fp32", "HAS_LABELS": "constexpr", "HAS_I2T": "constexpr", "HAS_T2I": "constexpr",
                       "BLOCK_M": "constexpr", "BLOCK_DB": "constexpr"}
                consts = {**unit, "HAS_LABELS": has_labels, "HAS_I2T": i2t,
                          "HAS_T2I": t2i, "BLOCK_M": st.BLOCK_M, "BLOCK_DB": st.BLOCK_DB}
                terms = "both" if i2t and t2i else ("i2t" if i2t else "t2i")
                specs.append(_spec(f"contrastive_vsepp_bwd-{tdt}-{'lab' if has_labels else 'diag'}-{terms}",
                                   _contrastive_vsepp_bwd_kernel, sig, consts, st.elem_warps, 1, False))
    return specs


def _spec(name, fn, sig, consts, num_warps, num_stages, tensor_cores):
    spec = {"name": name, "fn": fn, "signature": {a: sig[a] for a in fn.arg_names}, "constexprs": consts,
            "num_warps": num_warps, "num_stages": num_stages}
    if tensor_cores:
        spec["tensor_cores"] = True
    return spec
