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

Three implementations, chosen per launch by the environment variable VSE_FAST_GPO_POOL_KERNEL:

- "sort" (default): the tl.sort kernels above, every K <= MAX_K.
- "rank" (K <= RANK_MAX_K = 64; larger K falls back to "sort"): rank counting, no sort and no layout
  change. The tile stays [BLOCK_K, BLOCK_D] as loaded (d contiguous); a loop over the n valid rows i
  (re-loaded from global memory, L1-resident) accumulates the stable descending rank of every element,
  rank[j, d] = #{i < n : key_i > key_j or (key_i == key_j and i < j)}, on order-preserving int32 keys
  of the values (NaN the largest and tied with other NaN, -0.0 == +0.0: the order of the sort kernels
  and of torch.sort(stable=True)). Forward: out[d] = sum_{j < n} x[j, d] * w[rank[j, d]] (w gathered
  by rank; a NaN propagates through the product). Backward: grad_x[j, d] = grad_out[d] * w[rank[j, d]],
  and grad_w[r] = sum of grad_out[d] * x[j, d] over the (j, d) of rank r, one tile reduction per rank
  r < n (deterministic, no atomics), written as the same (B, D-blocks, BLOCK_K) fp32 partials.
- "net" (K <= NET_MAX_K = 64; larger K falls back to "sort"): sorting networks in registers, one thread
  per feature column (two for 16-bit dtypes), no shuffles and no shared memory in the forward
  (vse_fast.kernels.gpo_pool_net). Forward: one network over the values (16-bit ones packed two
  columns per register); backward: one over the packed keys, one inverting the permutation.
  An unknown value raises ValueError. The choice is part of `PoolSettings` (kept for the backward).

The launchers pick BLOCK_K / BLOCK_D / num_warps from `pool_settings` (buckets by K only);
`compile_specializations()` lists exactly those specializations.
"""
import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vse_fast.kernels import triton_interpreting

MAX_K = 512  # largest set size the kernels take (BLOCK_K bucket 512)
_MIN_BLOCK_K = 16
_TILE = 4096  # elements per program tile: BLOCK_K * BLOCK_D
_NUM_WARPS_FWD = 4
_NUM_WARPS_BWD = 8
# Register cap of the sort forward at BLOCK_K >= 256. Left to itself, the ptxas of Triton 3.6 gave
# three of those builds 48-96 registers and spilled one (8 B per thread); 3.9's stays below 128 anyway.
_SORT_FWD_MAXNREG = 128
KERNEL_ENV = "VSE_FAST_GPO_POOL_KERNEL"
KERNEL_IMPLS = ("sort", "rank", "net")
RANK_MAX_K = 64  # largest set size of the rank-counting kernels (K^2 compares per column)
_RANK_TILE = 4096  # rank kernels: BLOCK_K * BLOCK_D
_RANK_NUM_WARPS_FWD = 8
_RANK_NUM_WARPS_BWD = 8
NET_MAX_K = 64  # largest set size of the sorting-network kernels (vse_fast.kernels.gpo_pool_net)
_NET_NUM_WARPS = 4  # one feature column per thread (two for 16-bit dtypes): BLOCK_D = 32 * warps (* 2)
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
    impl: str = "sort"  # "sort", "rank" or "net" (module docstring)
    maxnreg_fwd: int = None  # register cap of the forward (None: ptxas decides)

    def fwd_launch_options(self) -> dict:
        return {"maxnreg": self.maxnreg_fwd} if self.maxnreg_fwd else {}


def kernel_impl(K: int) -> str:
    """The implementation for set size K from VSE_FAST_GPO_POOL_KERNEL: "sort" (default, also when
    unset or empty), "rank" (used for K <= RANK_MAX_K) or "net" (used for K <= NET_MAX_K); larger K
    falls back to "sort". Unknown values raise ValueError."""
    impl = os.environ.get(KERNEL_ENV, "") or "sort"
    if impl not in KERNEL_IMPLS:
        raise ValueError(f"{KERNEL_ENV}={impl!r} is not a GPO pool kernel; choose one of {KERNEL_IMPLS}")
    if (impl == "rank" and K <= RANK_MAX_K) or (impl == "net" and K <= NET_MAX_K):
        return impl
    return "sort"


def pool_settings(K: int, D: int, impl: str = None, itemsize: int = 4) -> PoolSettings:
    """Bucketed launch settings for set size K (1 <= K <= MAX_K), by K only:
    BLOCK_K = max(16, next_pow2(K)), BLOCK_D = 4096 // BLOCK_K (256 .. 8 columns).
    impl: "sort" | "rank" | "net" | None (None: `kernel_impl(K)`, from the environment).
    "net": BLOCK_K = next_pow2(K) (the network size), one column per thread, two for 16-bit features
    (itemsize 2: two columns share each 32-bit register of the packed networks).
    Under the Triton interpreter (TRITON_INTERPRET=1, CPU tests) tiles shrink to
    BLOCK_K = max(2, next_pow2(K)), BLOCK_D = min(16, next_pow2(D)): the interpreter's cost grows
    with the tile size, the kernels' arithmetic does not depend on it."""
    if not 1 <= K <= MAX_K:
        raise ValueError(f"the Triton GPO pool takes set sizes 1..{MAX_K}, got K={K}")
    impl = kernel_impl(K) if impl is None else impl
    if impl not in KERNEL_IMPLS or (impl == "rank" and K > RANK_MAX_K) or (impl == "net" and K > NET_MAX_K):
        raise ValueError(f"impl {impl!r} cannot run K={K}; 'sort' takes K <= {MAX_K}, 'rank' K <= {RANK_MAX_K}, "
                         f"'net' K <= {NET_MAX_K}")
    if impl == "net":  # BLOCK_K = the network size, one column per thread
        block_k = max(2, triton.next_power_of_2(K))
        columns = 2 if itemsize == 2 else 1
        block_d = min(16, triton.next_power_of_2(max(D, 1))) if triton_interpreting() else 32 * _NET_NUM_WARPS * columns
        return PoolSettings(block_k, block_d, _NET_NUM_WARPS, _NET_NUM_WARPS, impl=impl)
    warps, tile = _tile_warps(impl, K, itemsize), (_RANK_TILE if impl == "rank" else _TILE)
    if triton_interpreting():
        return PoolSettings(max(2, triton.next_power_of_2(K)), min(16, triton.next_power_of_2(max(D, 1))),
                            *warps, impl=impl)
    block_k = max(_MIN_BLOCK_K, triton.next_power_of_2(K))
    return PoolSettings(block_k, tile // block_k, *warps, impl=impl, maxnreg_fwd=_fwd_maxnreg(impl, block_k))


def _fwd_maxnreg(impl: str, block_k: int):
    return _SORT_FWD_MAXNREG if impl == "sort" and block_k >= 256 else None


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
def _ordered_key(b_x, b_pos, m_valid):
    """Packed sort keys: the order-preserving integer of the value (`_rank_key`: NaN the largest,
    -0.0 == +0.0) above the position bits b_pos (BLOCK_K - 1 - k, broadcastable to b_x); padding
    (not m_valid) below every value. int32 for 16-bit dtypes, int64 for fp32."""
    b_v = _rank_key(b_x)
    if b_x.dtype.primitive_bitwidth == 16:
        b_v = tl.where(m_valid, b_v, -32768)
        return (b_v << 16) | b_pos
    else:
        b_v = tl.where(m_valid, b_v.to(tl.int64), -2147483648)
        return (b_v << 32) | b_pos


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
    b_key = tl.sort(_ordered_key(b_x, (BLOCK_K - 1 - o_k)[None, :], m_tile), dim=1, descending=True)  # [BD, BK]
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


@triton.jit
def _rank_key(b_x):
    """Order-preserving int32 key of each value (any shape): NaN -> the largest (all NaN tie),
    -0.0 -> +0.0. Integer-only bit manipulation."""
    if b_x.dtype.primitive_bitwidth == 16:
        INF_BITS: tl.constexpr = 0x7F80 if b_x.dtype == tl.bfloat16 else 0x7C00
        b_v = b_x.to(tl.int16, bitcast=True).to(tl.int32)  # sign-extended bits
        b_v = tl.where(b_v == -32768, 0, b_v)  # -0.0
        return tl.where((b_v & 0x7FFF) > INF_BITS, 0x7FFF, b_v ^ ((b_v >> 15) & 0x7FFF))
    else:
        b_v = b_x.to(tl.int32, bitcast=True)
        b_v = tl.where(b_v == -2147483648, 0, b_v)
        return tl.where((b_v & 0x7FFFFFFF) > 0x7F800000, 0x7FFFFFFF, b_v ^ ((b_v >> 31) & 0x7FFFFFFF))


@triton.jit
def _stable_desc_rank(x_ptr, b_key, o_k, o_d, m_d, n, stride_xk, stride_xd):
    """[BK, BD] int32: rank[j, d] = #{i < n : key_i > key_j or (key_i == key_j and i < j)}.
    x_ptr points at the sample's row 0; rows i < n are re-loaded (coalesced along d)."""
    b_rank = tl.zeros_like(b_key)  # int32
    p_row = x_ptr + o_d * stride_xd
    for i in range(0, n):
        b_ki = _rank_key(tl.load(p_row + i * stride_xk, mask=m_d, other=0.0))[None, :]  # [1, BD]
        b_rank += ((b_ki > b_key) | ((b_ki == b_key) & (i < o_k[:, None]))).to(tl.int32)
    return b_rank


@triton.jit
def _gpo_pool_rank_fwd_kernel(
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
    m_d = o_d < D
    m_tile = (o_k < n)[:, None] & m_d[None, :]

    x_b = x_ptr + i_b.to(tl.int64) * stride_xb
    b_x = tl.load(x_b + o_k[:, None] * stride_xk + o_d[None, :] * stride_xd, mask=m_tile, other=0.0)  # [BK, BD]
    b_rank = _stable_desc_rank(x_b, _rank_key(b_x), o_k, o_d, m_d, n, stride_xk, stride_xd)
    b_w = tl.load(w_ptr + i_b.to(tl.int64) * stride_wb + b_rank * stride_wk,
                  mask=m_tile & (b_rank < Kw), other=0.0)  # [BK, BD] gather by rank
    b_out = tl.sum(tl.where(m_tile, b_x.to(tl.float32) * b_w, 0.0), axis=0)  # [BD]; NaN propagates
    tl.store(out_ptr + i_b.to(tl.int64) * stride_ob + o_d * stride_od, b_out.to(out_ptr.dtype.element_ty), mask=m_d)


@triton.jit
def _gpo_pool_rank_bwd_kernel(
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
    m_d = o_d < D
    m_tile = (o_k < n)[:, None] & m_d[None, :]

    x_b = x_ptr + i_b.to(tl.int64) * stride_xb
    b_x = tl.load(x_b + o_k[:, None] * stride_xk + o_d[None, :] * stride_xd, mask=m_tile, other=0.0)  # [BK, BD]
    b_rank = _stable_desc_rank(x_b, _rank_key(b_x), o_k, o_d, m_d, n, stride_xk, stride_xd)
    b_g = tl.load(gout_ptr + i_b.to(tl.int64) * stride_gob + o_d * stride_god, mask=m_d, other=0.0).to(tl.float32)

    b_w = tl.load(w_ptr + i_b.to(tl.int64) * stride_wb + b_rank * stride_wk,
                  mask=m_tile & (b_rank < Kw), other=0.0)  # [BK, BD] gather by rank
    b_gx = tl.where(m_tile, b_g[None, :] * b_w, 0.0)
    p_gx = gx_ptr + i_b.to(tl.int64) * stride_gxb + o_k[:, None] * stride_gxk + o_d[None, :] * stride_gxd
    tl.store(p_gx, b_gx.to(gx_ptr.dtype.element_ty), mask=(o_k < K)[:, None] & m_d[None, :])

    # grad_w[r] = sum over the (j, d) of rank r of g[d] * x[j, d]: one tile reduction per rank r < n
    b_gxv = tl.where(m_tile, b_x.to(tl.float32) * b_g[None, :], 0.0)  # [BK, BD]
    b_gw = tl.zeros([BLOCK_K], dtype=tl.float32)
    for r in range(0, n):
        b_gw = tl.where(o_k == r, tl.sum(tl.sum(tl.where(b_rank == r, b_gxv, 0.0), axis=1), axis=0), b_gw)
    tl.store(gw_part_ptr + (i_b.to(tl.int64) * n_d_blocks + i_d) * BLOCK_K + o_k, b_gw)


def _check_launch(x, lengths, w):
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton GPO pool takes float32/bfloat16/float16 features, got {x.dtype}")
    if lengths.dtype != torch.int32 or w.dtype != torch.float32:
        raise TypeError(f"launcher wants int32 lengths and float32 weights, got {lengths.dtype} and {w.dtype}")


GRID_AXIS1_MAX = 65535  # CUDA's limit on grid axes 1 and 2: the D-blocks run on axis 1


def _check_grid(D: int, settings: PoolSettings) -> None:
    blocks = triton.cdiv(D, settings.BLOCK_D)
    if blocks > GRID_AXIS1_MAX:
        raise ValueError(f"features: D={D} makes {blocks} column blocks of {settings.BLOCK_D}, more than CUDA's "
                         f"grid limit {GRID_AXIS1_MAX}; use backend='torch' (or 'auto', which falls back to it)")


def _int32_row_offsets(t: torch.Tensor, name: str) -> torch.Tensor:
    """t, or its contiguous copy when an element offset within one batch row (the kernels compute the
    row's offset in int64, the rest in int32) would pass 2**31 - 1: strided views of huge tensors."""
    def extent(u):
        return sum((size - 1) * stride for size, stride in zip(u.shape[1:], u.stride()[1:]) if size > 0)

    if extent(t) < 2**31:
        return t
    t = t.contiguous()
    if extent(t) >= 2**31:
        raise ValueError(f"{name}: rows of {t[0].numel()} elements, more than the kernels' int32 offsets reach")
    return t


def _kernels(settings: PoolSettings):
    """(forward, backward) jit kernels of the settings' implementation."""
    if settings.impl == "net":
        from vse_fast.kernels.gpo_pool_net import net_kernels

        return net_kernels(settings.BLOCK_K)
    if settings.impl == "rank":
        return _gpo_pool_rank_fwd_kernel, _gpo_pool_rank_bwd_kernel
    return _gpo_pool_fwd_kernel, _gpo_pool_bwd_kernel


@functools.lru_cache(maxsize=None)
def _capability_major(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def _net_flags(settings: PoolSettings, x: torch.Tensor, backward: bool) -> dict:
    """The network kernels run their comparators as inline PTX when compiled, as tl code when
    interpreted. PACK_16X2 (16-bit features, two columns per thread): the forward sorts bf16x2/f16x2
    lanes (PTX min/max, sm_80+), the backward inverts its permutation on s16x2 lanes (sm_90+)."""
    if settings.impl != "net":
        return {}
    if triton_interpreting():
        return {"USE_ASM": False, "PACK_16X2": False}
    two_columns = settings.BLOCK_D == 64 * _NET_NUM_WARPS and x.element_size() == 2
    return {"USE_ASM": True, "PACK_16X2": two_columns and _capability_major(x.device) >= (9 if backward else 8)}


def gpo_pool_fwd(x: torch.Tensor, lengths: torch.Tensor, w: torch.Tensor, settings: PoolSettings = None):
    """Launch the forward. x (B, K, D) fp32/bf16/fp16, any strides (the 16-bit "net" forward copies an x
    whose feature stride is not 1); lengths (B,) int32 in [1, K]
    (clamped to [0, K] in the kernel); w (B, Kw) float32 (positions >= min(n, Kw) read as 0).
    settings=None takes `pool_settings(K, D, itemsize=...)` (implementation from VSE_FAST_GPO_POOL_KERNEL).
    Returns (out (B, D) in x.dtype, settings); pass the same settings to the backward."""
    _check_launch(x, lengths, w)
    B, K, D = x.shape
    settings = settings or pool_settings(K, D, itemsize=x.element_size())
    out = torch.empty((B, D), dtype=x.dtype, device=x.device)
    if B == 0 or D == 0:
        return out, settings
    _check_grid(D, settings)
    x, w, lengths = _int32_row_offsets(x, "features"), _int32_row_offsets(w, "weights"), lengths.contiguous()
    if settings.impl == "net" and x.element_size() == 2 and D > 1 and x.stride(2) != 1:
        # the 16-bit network forward loads columns 2t, 2t+1 as one 32-bit word (a contiguity hint that
        # holds only for unit feature stride): copy a tensor strided along D
        x = x.contiguous()
    grid = (B, triton.cdiv(D, settings.BLOCK_D))
    kernel = _kernels(settings)[0]
    kernel[grid](
        x, lengths, w, out,
        K, D, w.shape[1],
        *x.stride(), *w.stride(), *out.stride(),
        BLOCK_K=settings.BLOCK_K, BLOCK_D=settings.BLOCK_D, **_net_flags(settings, x, backward=False),
        num_warps=settings.num_warps_fwd, num_stages=settings.num_stages, **settings.fwd_launch_options(),
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
    x, grad_out = _int32_row_offsets(x, "features"), _int32_row_offsets(grad_out, "grad_out")
    w, lengths = _int32_row_offsets(w, "weights"), lengths.contiguous()
    if K * D >= 2**31:  # grad_x is contiguous even where x is a broadcast view
        raise ValueError(f"features: rows of {K * D} elements, more than the kernels' int32 offsets reach")
    _check_grid(D, settings)
    grad_x = torch.empty((B, K, D), dtype=x.dtype, device=x.device)
    gw_part = torch.empty((B, n_d_blocks, settings.BLOCK_K), dtype=torch.float32, device=x.device)
    if B == 0 or D == 0:
        return grad_x.zero_(), torch.zeros((B, Kw), dtype=torch.float32, device=x.device)
    kernel = _kernels(settings)[1]
    kernel[(B, n_d_blocks)](
        x, lengths, w, grad_out, grad_x, gw_part,
        K, D, Kw,
        *x.stride(), *w.stride(), *grad_out.stride(), *grad_x.stride(),
        BLOCK_K=settings.BLOCK_K, BLOCK_D=settings.BLOCK_D, **_net_flags(settings, x, backward=True),
        num_warps=settings.num_warps_bwd, num_stages=settings.num_stages,
    )
    gw_sum = gw_part.sum(dim=1)  # (B, BLOCK_K)
    if Kw <= settings.BLOCK_K:
        grad_w = gw_sum[:, :Kw]
    else:
        grad_w = torch.zeros((B, Kw), dtype=torch.float32, device=x.device)
        grad_w[:, : settings.BLOCK_K] = gw_sum
    return grad_x, grad_w


def _tile_warps(impl: str, K: int, itemsize: int) -> tuple:
    """(forward, backward) warps of the "sort" and "rank" kernels. Sort: fp32 tiles of 64+ rows take
    twice the warps in the forward, and the backward's int64 keys at BLOCK_K 128 and 256 too: with the
    defaults, ptxas spilled 8-16 B per thread there (sm_80/sm_90, plain or 16-aligned builds)."""
    if impl == "rank":
        return _RANK_NUM_WARPS_FWD, _RANK_NUM_WARPS_BWD
    block_k = max(_MIN_BLOCK_K, triton.next_power_of_2(K))
    if itemsize != 4:
        return _NUM_WARPS_FWD, _NUM_WARPS_BWD
    fwd = 2 * _NUM_WARPS_FWD if block_k >= 64 else _NUM_WARPS_FWD
    bwd = 2 * _NUM_WARPS_BWD if block_k in (128, 256) else _NUM_WARPS_BWD
    return fwd, bwd


def _block_k_buckets():
    block_k = _MIN_BLOCK_K
    while block_k <= MAX_K:
        yield block_k
        block_k *= 2


def compile_specializations() -> list:
    """Every (kernel, dtype, BLOCK_K bucket) the launchers can pick, for an ahead-of-time compile check:
    the sort kernels ("gpo_pool_fwd-..."/"gpo_pool_bwd-...", K buckets 16..512) and the rank kernels
    ("gpo_pool_rank_fwd-..."/"gpo_pool_rank_bwd-...", K buckets 16..64).
    Strides are given as in the common contiguous launch: unit strides as constexpr 1 (Triton
    specializes integer arguments equal to 1), the others i32."""
    specs = []
    kernels = {"sort": ("gpo_pool", _gpo_pool_fwd_kernel, _gpo_pool_bwd_kernel, _TILE),
               "rank": ("gpo_pool_rank", _gpo_pool_rank_fwd_kernel, _gpo_pool_rank_bwd_kernel, _RANK_TILE)}
    for impl, (prefix, fwd_fn, bwd_fn, tile) in kernels.items():
        for dtype, tdt in _TRITON_DTYPE.items():
            itemsize = torch.empty((), dtype=dtype).element_size()
            for block_k in _block_k_buckets():
                if impl == "rank" and block_k > RANK_MAX_K:
                    break
                s = PoolSettings(block_k, tile // block_k, *_tile_warps(impl, block_k, itemsize), impl=impl,
                                 maxnreg_fwd=_fwd_maxnreg(impl, block_k))
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
                for name, fn, sig, extra, num_warps, options in (
                    ("fwd", fwd_fn, fwd_sig, {"stride_od": 1}, s.num_warps_fwd, s.fwd_launch_options()),
                    ("bwd", bwd_fn, bwd_sig, {"stride_god": 1, "stride_gxd": 1}, s.num_warps_bwd, {}),
                ):
                    specs.append({**options,
                        "name": f"{prefix}_{name}-{tdt}-K{s.BLOCK_K}-D{s.BLOCK_D}",
                        "fn": fn,
                        "signature": {a: sig[a] for a in fn.arg_names},
                        "constexprs": {**consts, **extra},
                        "num_warps": num_warps,
                        "num_stages": s.num_stages,
                    })
    specs += _net_specializations()
    return specs


def _net_specializations() -> list:
    """The sorting-network kernels ("gpo_pool_net_fwd-..."/"gpo_pool_net_bwd-..."), every network size.
    16-bit dtypes: two columns per thread; the forward packs bf16x2/f16x2 (sm_80 and sm_90), the
    backward packs s16x2 on sm_90 only ("...-s16x2") and sorts int32 keys on sm_80 (the launcher's
    choice by capability, `_net_flags`)."""
    from vse_fast.kernels.gpo_pool_net import NET_SIZES, net_kernels

    specs = []
    for dtype, tdt in _TRITON_DTYPE.items():
        itemsize = torch.empty((), dtype=dtype).element_size()
        for block_k in NET_SIZES:
            s = pool_settings(block_k, 1024, impl="net", itemsize=itemsize) if not triton_interpreting() else None
            block_d = s.BLOCK_D if s else 32 * _NET_NUM_WARPS
            fwd_fn, bwd_fn = net_kernels(block_k)
            common = {"len_ptr": "*i32", "w_ptr": "*fp32", "K": "i32", "D": "i32", "Kw": "i32",
                      "stride_xb": "i32", "stride_xk": "i32", "stride_xd": "constexpr",
                      "stride_wb": "i32", "stride_wk": "constexpr", "BLOCK_K": "constexpr", "BLOCK_D": "constexpr",
                      "USE_ASM": "constexpr", "PACK_16X2": "constexpr"}
            consts = {"stride_xd": 1, "stride_wk": 1, "BLOCK_K": block_k, "BLOCK_D": block_d, "USE_ASM": True}
            fwd_sig = {"x_ptr": f"*{tdt}", "out_ptr": f"*{tdt}", "stride_ob": "i32", "stride_od": "constexpr", **common}
            bwd_sig = {"x_ptr": f"*{tdt}", "gout_ptr": f"*{tdt}", "gx_ptr": f"*{tdt}", "gw_part_ptr": "*fp32",
                       "stride_gob": "i32", "stride_god": "constexpr",
                       "stride_gxb": "i32", "stride_gxk": "i32", "stride_gxd": "constexpr", **common}
            packed = itemsize == 2
            bwd_consts = {"stride_god": 1, "stride_gxd": 1}
            variants = [("fwd", "", fwd_fn, fwd_sig, {"stride_od": 1, "PACK_16X2": packed}, None)]
            if packed:  # (suffix, PACK_16X2, arches): s16x2 lanes on sm_90, int32 keys on sm_80
                bwd_variants = [("-s16x2", True, (90,)), ("", False, (80,))]
            else:
                bwd_variants = [("", False, None)]
            variants += [("bwd", suffix, bwd_fn, bwd_sig, {**bwd_consts, "PACK_16X2": pack}, arches)
                         for suffix, pack, arches in bwd_variants]
            for name, suffix, fn, sig, extra, arches in variants:
                spec = {"name": f"gpo_pool_net_{name}-{tdt}-K{block_k}-D{block_d}{suffix}", "fn": fn,
                        "signature": {a: sig[a] for a in fn.arg_names}, "constexprs": {**consts, **extra},
                        "num_warps": _NET_NUM_WARPS, "num_stages": 1}
                if arches:
                    spec["arches"] = arches
                specs.append(spec)
    return specs
