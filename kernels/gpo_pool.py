"""Triton kernels of the GPO pool: sort each feature column of a set descending, weighted sum.

For a sample b with n = lengths[b] valid set elements and every feature column d:

    out[b, d] = sum_{r < n} w[b, r] * sort_desc(x[b, :n, d])[r]

One program handles one sample and a block of BLOCK_D feature columns: it loads the [BLOCK_D, BLOCK_K]
tile (BLOCK_K = a power of two >= K; positions >= n are padding) and sorts along the minor axis.

Forward: sorts fp32 values (padding = -inf, so it ranks last). Float compare-and-swap can lose a NaN,
so a column holding a NaN among its n valid entries is set to NaN explicitly.

Backward (nothing saved but the inputs): re-sorts packed integer keys
``(ordered(value) << IDX_BITS) | (BLOCK_K - 1 - k)``: ``ordered`` maps the float's bits to a signed
integer of the same order (NaN canonicalised to +NaN, the largest, -0.0 to +0.0, as torch's sort
treats them), the low bits hold the position so that ties keep their original order (a stable sort,
like ``torch.sort(stable=True)``) and padding (key below every real value) ranks last. The sorted
keys give the sorted values (grad of the weights) and the permutation; a second sort of
``(position << 16) | rank`` inverts it, so the gradient of x[b, j, d] = grad_out[b, d] * w[b, rank(j, d)]
is stored in original order with coalesced writes and without a B x K x D index tensor.
Keys are int32 for 16-bit dtypes (16 value bits + 16 index bits) and int64 for fp32.

The launchers pick BLOCK_K / BLOCK_D / num_warps from `pool_settings` (buckets by K only);
`compile_specializations()` lists exactly those specializations.
"""
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_K = 512  # largest set size the kernels take (BLOCK_K bucket 512)
_MIN_BLOCK_K = 16
_TILE = 4096  # elements per program tile: BLOCK_K * BLOCK_D
_NUM_WARPS_FWD = 4
_NUM_WARPS_BWD = 8
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class PoolSettings:
    """Block sizes and warps of one launch; kept on the autograd ctx for the backward."""

    BLOCK_K: int
    BLOCK_D: int
    num_warps_fwd: int
    num_warps_bwd: int
    num_stages: int = 1  # no pipelined loops


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pool_settings(K: int, D: int) -> PoolSettings:
    """Bucketed launch settings for set size K (1 <= K <= MAX_K), by K only:
    BLOCK_K = max(16, next_pow2(K)), BLOCK_D = 4096 // BLOCK_K (256 .. 8 columns).
    Under the Triton interpreter (TRITON_INTERPRET=1, CPU tests) tiles shrink to
    BLOCK_K = max(2, next_pow2(K)), BLOCK_D = min(16, next_pow2(D)): the interpreter's cost grows
    with the tile size, the kernels' arithmetic does not depend on it."""
    if not 1 <= K <= MAX_K:
        raise ValueError(f"the Triton GPO pool takes set sizes 1..{MAX_K}, got K={K}")
    if _interpreting():
        return PoolSettings(max(2, triton.next_power_of_2(K)), min(16, triton.next_power_of_2(max(D, 1))),
                            _NUM_WARPS_FWD, _NUM_WARPS_BWD)
    block_k = max(_MIN_BLOCK_K, triton.next_power_of_2(K))
    return PoolSettings(block_k, _TILE // block_k, _NUM_WARPS_FWD, _NUM_WARPS_BWD)


@triton.jit
def _gpo_pool_fwd_kernel(
    x_ptr, len_ptr, w_ptr, out_ptr,
    K, D, Kw,
    stride_xb, stride_xk, stride_xd,
    stride_wb, stride_wk,
    stride_ob, stride_od,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_b = tl.program_id(0)
    i_d = tl.program_id(1)
    n = tl.minimum(tl.maximum(tl.load(len_ptr + i_b), 0), K)  # clamped: memory-safe without validation
    o_k = tl.arange(0, BLOCK_K)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_k = o_k < n
    m_d = o_d < D

    p_x = x_ptr + i_b.to(tl.int64) * stride_xb + o_d[:, None] * stride_xd + o_k[None, :] * stride_xk
    b_x = tl.load(p_x, mask=m_d[:, None] & m_k[None, :], other=float("-inf")).to(tl.float32)  # [BD, BK]
    b_has_nan = tl.max((b_x != b_x).to(tl.int32), axis=1)  # [BD]
    b_s = tl.sort(b_x, dim=1, descending=True)  # [BD, BK], padding last
    b_w = tl.load(w_ptr + i_b.to(tl.int64) * stride_wb + o_k * stride_wk,
                  mask=m_k & (o_k < Kw), other=0.0).to(tl.float32)  # [BK]
    b_out = tl.sum(tl.where(m_k[None, :], b_s * b_w[None, :], 0.0), axis=1)  # [BD]
    b_out = tl.where(b_has_nan > 0, float("nan"), b_out)
    tl.store(out_ptr + i_b.to(tl.int64) * stride_ob + o_d * stride_od, b_out.to(out_ptr.dtype.element_ty), mask=m_d)


@triton.jit
def _ordered_key(b_x, o_k, m_valid, BLOCK_K: tl.constexpr):
    """Packed sort keys [BD, BK]: order-preserving integer of the value, then BLOCK_K-1-k; padding lowest.
    Integer-only bit manipulation: NaN -> the largest key, -0.0 -> +0.0."""
    if b_x.dtype.primitive_bitwidth == 16:
        INF_BITS: tl.constexpr = 0x7F80 if b_x.dtype == tl.bfloat16 else 0x7C00
        b_v = b_x.to(tl.int16, bitcast=True).to(tl.int32)  # sign-extended bits
        b_v = tl.where(b_v == -32768, 0, b_v)  # -0.0
        b_v = tl.where((b_v & 0x7FFF) > INF_BITS, 0x7FFF, b_v ^ ((b_v >> 15) & 0x7FFF))  # NaN -> largest
        b_v = tl.where(m_valid, b_v, -32768)  # padding: below every value
        return (b_v << 16) | (BLOCK_K - 1 - o_k)[None, :]
    else:
        b_v = b_x.to(tl.int32, bitcast=True)
        b_v = tl.where(b_v == -2147483648, 0, b_v)
        b_v = tl.where((b_v & 0x7FFFFFFF) > 0x7F800000, 0x7FFFFFFF, b_v ^ ((b_v >> 31) & 0x7FFFFFFF))
        b_v = tl.where(m_valid, b_v.to(tl.int64), -2147483648)
        return (b_v << 32) | (BLOCK_K - 1 - o_k)[None, :].to(tl.int64)


@triton.jit
def _decode_value(b_key, DTYPE: tl.constexpr):
    """The float32 value of sorted packed keys (NaN for canonicalised NaN; garbage for padding)."""
    if DTYPE.primitive_bitwidth == 16:
        b_v = (b_key >> 16).to(tl.int16)
        b_v = (b_v ^ ((b_v >> 15) & 0x7FFF)).to(tl.int16)
        return b_v.to(DTYPE, bitcast=True).to(tl.float32)
    else:
        b_v = (b_key >> 32).to(tl.int32)
        b_v = (b_v ^ ((b_v >> 31) & 0x7FFFFFFF)).to(tl.int32)
        return b_v.to(tl.float32, bitcast=True)


@triton.jit
def _gpo_pool_bwd_kernel(
    x_ptr, len_ptr, w_ptr, gout_ptr, gx_ptr, gw_part_ptr,
    K, D, Kw,
    stride_xb, stride_xk, stride_xd,
    stride_wb, stride_wk,
    stride_gob, stride_god,
    stride_gxb, stride_gxk, stride_gxd,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_b = tl.program_id(0)
    i_d = tl.program_id(1)
    n_d_blocks = tl.num_programs(1)
    n = tl.minimum(tl.maximum(tl.load(len_ptr + i_b), 0), K)
    o_k = tl.arange(0, BLOCK_K)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_k = o_k < n
    m_d = o_d < D
    m_tile = m_d[:, None] & m_k[None, :]

    p_x = x_ptr + i_b.to(tl.int64) * stride_xb + o_d[:, None] * stride_xd + o_k[None, :] * stride_xk
    b_x = tl.load(p_x, mask=m_tile, other=0.0)  # [BD, BK], input dtype
    b_g = tl.load(gout_ptr + i_b.to(tl.int64) * stride_gob + o_d * stride_god, mask=m_d, other=0.0).to(tl.float32)

    # sort 1: sorted values (for grad_w) and the permutation perm[d, r] = original position of rank r
    b_key = tl.sort(_ordered_key(b_x, o_k, m_tile, BLOCK_K), dim=1, descending=True)  # [BD, BK]
    b_s = _decode_value(b_key, x_ptr.dtype.element_ty)  # [BD, BK] fp32
    b_gw = tl.sum(tl.where(m_tile, b_s * b_g[:, None], 0.0), axis=0)  # [BK], rank r < n only
    p_gw = gw_part_ptr + (i_b.to(tl.int64) * n_d_blocks + i_d) * BLOCK_K + o_k
    tl.store(p_gw, b_gw)
    b_perm = (BLOCK_K - 1 - (b_key & (BLOCK_K - 1))).to(tl.int32)  # [BD, BK]

    # sort 2: invert the permutation; rank of the element at original position j, in column order j
    b_inv = tl.sort((b_perm << 16) | o_k[None, :], dim=1)  # [BD, BK]
    b_rank = b_inv & 0xFFFF
    b_w = tl.load(w_ptr + i_b.to(tl.int64) * stride_wb + b_rank * stride_wk,
                  mask=m_tile & (b_rank < Kw), other=0.0).to(tl.float32)  # [BD, BK] gather
    b_gx = tl.where(m_tile, b_g[:, None] * b_w, 0.0)
    p_gx = gx_ptr + i_b.to(tl.int64) * stride_gxb + o_d[:, None] * stride_gxd + o_k[None, :] * stride_gxk
    tl.store(p_gx, b_gx.to(gx_ptr.dtype.element_ty), mask=m_d[:, None] & (o_k < K)[None, :])


def _check_launch(x, lengths, w):
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton GPO pool takes float32/bfloat16/float16 features, got {x.dtype}")
    if lengths.dtype != torch.int32 or w.dtype != torch.float32:
        raise TypeError(f"launcher wants int32 lengths and float32 weights, got {lengths.dtype} and {w.dtype}")


def gpo_pool_fwd(x: torch.Tensor, lengths: torch.Tensor, w: torch.Tensor, settings: PoolSettings = None):
    """Launch the forward. x (B, K, D) fp32/bf16/fp16, any strides; lengths (B,) int32 in [1, K]
    (clamped to [0, K] in the kernel); w (B, Kw) float32 (positions >= min(n, Kw) read as 0).
    Returns (out (B, D) in x.dtype, settings)."""
    _check_launch(x, lengths, w)
    B, K, D = x.shape
    settings = settings or pool_settings(K, D)
    out = torch.empty((B, D), dtype=x.dtype, device=x.device)
    if B == 0 or D == 0:
        return out, settings
    grid = (B, triton.cdiv(D, settings.BLOCK_D))
    _gpo_pool_fwd_kernel[grid](
        x, lengths, w, out,
        K, D, w.shape[1],
        *x.stride(), *w.stride(), *out.stride(),
        BLOCK_K=settings.BLOCK_K, BLOCK_D=settings.BLOCK_D,
        num_warps=settings.num_warps_fwd, num_stages=settings.num_stages,
    )
    return out, settings


def gpo_pool_bwd(x, lengths, w, grad_out, settings: PoolSettings):
    """Launch the backward. Same x, lengths, w as the forward; grad_out (B, D), any strides.
    Returns grad_x (B, K, D) in x.dtype (0 at padding) and grad_w (B, Kw) float32 (0 at ranks >= n),
    the latter summed over D-blocks with torch (deterministic, no atomics)."""
    _check_launch(x, lengths, w)
    B, K, D = x.shape
    Kw = w.shape[1]
    n_d_blocks = triton.cdiv(D, settings.BLOCK_D)
    grad_x = torch.empty((B, K, D), dtype=x.dtype, device=x.device)
    gw_part = torch.empty((B, n_d_blocks, settings.BLOCK_K), dtype=torch.float32, device=x.device)
    if B == 0 or D == 0:
        return grad_x.zero_(), torch.zeros((B, Kw), dtype=torch.float32, device=x.device)
    _gpo_pool_bwd_kernel[(B, n_d_blocks)](
        x, lengths, w, grad_out, grad_x, gw_part,
        K, D, Kw,
        *x.stride(), *w.stride(), *grad_out.stride(), *grad_x.stride(),
        BLOCK_K=settings.BLOCK_K, BLOCK_D=settings.BLOCK_D,
        num_warps=settings.num_warps_bwd, num_stages=settings.num_stages,
    )
    gw_sum = gw_part.sum(dim=1)  # (B, BLOCK_K)
    if Kw <= settings.BLOCK_K:
        grad_w = gw_sum[:, :Kw]
    else:
        grad_w = torch.zeros((B, Kw), dtype=torch.float32, device=x.device)
        grad_w[:, : settings.BLOCK_K] = gw_sum
    return grad_x, grad_w


def _block_k_buckets():
    block_k = _MIN_BLOCK_K
    while block_k <= MAX_K:
        yield block_k
        block_k *= 2


def compile_specializations() -> list:
    """Every (kernel, dtype, BLOCK_K bucket) the launchers can pick, for an ahead-of-time compile check.
    Strides are given as in the common contiguous launch: unit strides as constexpr 1 (Triton
    specializes integer arguments equal to 1), the others i32."""
    specs = []
    for dtype, tdt in _TRITON_DTYPE.items():
        for block_k in _block_k_buckets():
            s = PoolSettings(block_k, _TILE // block_k, _NUM_WARPS_FWD, _NUM_WARPS_BWD)
            common = {"len_ptr": "*i32", "w_ptr": "*fp32", "K": "i32", "D": "i32", "Kw": "i32",
                      "stride_xb": "i32", "stride_xk": "i32", "stride_xd": "constexpr",
                      "stride_wb": "i32", "stride_wk": "constexpr",
                      "BLOCK_K": "constexpr", "BLOCK_D": "constexpr"}
            consts = {"stride_xd": 1, "stride_wk": 1, "BLOCK_K": s.BLOCK_K, "BLOCK_D": s.BLOCK_D}
            fwd_sig = {"x_ptr": f"*{tdt}", "out_ptr": f"*{tdt}", "stride_ob": "i32", "stride_od": "constexpr",
                       **common}
            bwd_sig = {"x_ptr": f"*{tdt}", "gout_ptr": f"*{tdt}", "gx_ptr": f"*{tdt}", "gw_part_ptr": "*fp32",
                       "stride_gob": "i32", "stride_god": "constexpr",
                       "stride_gxb": "i32", "stride_gxk": "i32", "stride_gxd": "constexpr", **common}
            for name, fn, sig, extra, warps in (
                ("fwd", _gpo_pool_fwd_kernel, fwd_sig, {"stride_od": 1}, s.num_warps_fwd),
                ("bwd", _gpo_pool_bwd_kernel, bwd_sig, {"stride_god": 1, "stride_gxd": 1}, s.num_warps_bwd),
            ):
                order = fn.arg_names
                specs.append({
                    "name": f"gpo_pool_{name}-{tdt}-K{s.BLOCK_K}-D{s.BLOCK_D}",
                    "fn": fn,
                    "signature": {a: sig[a] for a in order},
                    "constexprs": {**consts, **extra},
                    "num_warps": warps,
                    "num_stages": s.num_stages,
                })
    return specs
