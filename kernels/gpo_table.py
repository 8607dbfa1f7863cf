"""Triton kernels of the GPO coefficient table: the bidirectional GRU over the prefixes of every set size.

GPO scores a set of size n by running a bidirectional GRU over the position encodings pe[0..n-1].
The forward direction does not depend on n (one sequence over positions 0..K-1); the reverse
direction starts at position n-1, so each size n is its own sequence. For all sizes 1..K at once:

    out[0, p]      = forward state after position p                   (p < K)
    out[1 + r, p]  = reverse state at position p of the set of size r+1   (p <= r; 0 for p > r)

One GRU step of PyTorch's cell (gate order r, z, n), with gi = W_ih x + b_ih given per position:

    gh = W_hh h + b_hh
    r = sigmoid(gi_r + gh_r),  z = sigmoid(gi_z + gh_z),  c = tanh(gi_n + r * gh_n)
    h' = (1 - z) * c + z * h

Program 0 runs the forward direction (one row). Programs 1.. run the reverse direction for rows
[i * BLOCK_R, +BLOCK_R): at step t row r is at position r - t and stays active while t <= r. The hidden
states stay in registers for the whole recurrence (W_hh too); every step reads gi from a small
L1/L2-resident table and writes h. All arithmetic is fp32 with "ieee" dots (no TF32).

Backward (BPTT, same grid, steps in reverse order): the saved `out` gives every previous state h, the
gates are recomputed, and with dh = grad_out[row, p] + the carried gradient:

    dc = dh (1 - z),  dz = dh (h - c),  dc_pre = dc (1 - c^2)
    dr_pre = dc_pre gh_n r (1 - r),  dz_pre = dz z (1 - z)
    dgi = [dr_pre, dz_pre, dc_pre],   dgh = [dr_pre, dz_pre, dc_pre * r]
    carried dh_prev = dh z + dgh @ W_hh,  dW_hh += dgh^T h_prev,  db_hh += sum_rows dgh

dgi is written per (row, position) (the positions of one step are distinct within a program; the
launcher sums the rows), dW_hh / db_hh per program as fp32 partials: deterministic, no atomics.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# largest GRU hidden size of the kernels: W_hh lives in registers. At 64 the backward's W_hh, its
# transposes and the dW accumulators spilled (16-80 B per thread); larger GRUs use the packed-GRU table.
MAX_HIDDEN = 32
_BLOCK_R = 16  # reverse-direction rows per program (tl.dot needs >= 16)
_MIN_BLOCK_H = 16
_NUM_WARPS = 8
# The backward may use every register. Left to its own cap, ptxas stopped at 128 and spilled 8-16 B
# (H32: sm_80 16-aligned on 4 warps, sm_80/sm_90 on 8); with 255 on 4 warps it spilled 24-40 B on sm_90.
# 8 warps with this cap are spill-free everywhere; a table launch has only 1 + K / 16 programs.
_BWD_MAXNREG = 255


@dataclass(frozen=True)
class TableSettings:
    """Block sizes and warps of one launch; kept on the autograd ctx for the backward."""

    BLOCK_R: int
    BLOCK_H: int
    num_warps: int


def table_settings(hidden: int) -> TableSettings:
    if hidden > MAX_HIDDEN:
        raise ValueError(f"the Triton GPO table takes a GRU hidden size <= {MAX_HIDDEN}, got {hidden}")
    block_h = max(_MIN_BLOCK_H, triton.next_power_of_2(hidden))
    return TableSettings(_BLOCK_R, block_h, _NUM_WARPS)


@triton.jit
def _load_square(p_w, o_h, m_h, H):
    """[BH, BH] tile of a row-major (H, H) matrix, zero-padded beyond H."""
    return tl.load(p_w + o_h[:, None] * H + o_h[None, :], mask=m_h[:, None] & m_h[None, :], other=0.0)


@triton.jit
def _load_recurrent(whh_ptr, bhh_ptr, direction, o_h, m_h, H):
    """W_hh gate blocks [BH(out), BH(in)] (r, z, n) and b_hh gate vectors [BH] of one direction."""
    p_w = whh_ptr + direction * (3 * H * H)
    w_r = _load_square(p_w, o_h, m_h, H)
    w_z = _load_square(p_w + H * H, o_h, m_h, H)
    w_n = _load_square(p_w + 2 * H * H, o_h, m_h, H)
    p_b = bhh_ptr + direction * (3 * H)
    b_hr = tl.load(p_b + o_h, mask=m_h, other=0.0)
    b_hz = tl.load(p_b + H + o_h, mask=m_h, other=0.0)
    b_hn = tl.load(p_b + 2 * H + o_h, mask=m_h, other=0.0)
    return w_r, w_z, w_n, b_hr, b_hz, b_hn


@triton.jit
def _num_steps(i_prog, K, BLOCK_R: tl.constexpr):
    """Recurrence steps of a program: K for the forward direction, up to its largest size otherwise."""
    if i_prog == 0:
        n_steps = K
    else:
        n_steps = tl.minimum(K, i_prog * BLOCK_R)
    return n_steps


@triton.jit
def _row_positions(i_prog, t, K, BLOCK_R: tl.constexpr):
    """Rows of this program, their output row, position at step t and activity, all [BLOCK_R]."""
    o_r = (i_prog - 1) * BLOCK_R + tl.arange(0, BLOCK_R)  # reverse rows (sizes o_r + 1)
    if i_prog == 0:
        o_out = tl.zeros((BLOCK_R,), dtype=tl.int32)
        pos = tl.zeros((BLOCK_R,), dtype=tl.int32) + t
        active = tl.arange(0, BLOCK_R) == 0  # the loop runs t < K
    else:
        o_out = o_r + 1
        pos = o_r - t
        active = (o_r < K) & (pos >= 0)
    return o_out, pos, active


@triton.jit
def _tanh(x):
    """tanh in fp32: an odd Taylor polynomial below |x| = 0.125 (error < 2e-10 there), else
    (1 - e) / (1 + e) with e = exp(-2|x|) (absolute error a few 1e-7). The same code runs in the
    interpreter, which lacks libdevice."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    a2 = a * a
    small = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0))))
    t = tl.where(a < 0.125, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def _gates(b_gi_r, b_gi_z, b_gi_n, h, w_rt, w_zt, w_nt, b_hr, b_hz, b_hn):
    """r, z, c and gh_n of one GRU step for the rows of h [BR, BH]; w_*t = W_hh gate blocks transposed."""
    gh_r = tl.dot(h, w_rt, input_precision="ieee") + b_hr[None, :]
    gh_z = tl.dot(h, w_zt, input_precision="ieee") + b_hz[None, :]
    gh_n = tl.dot(h, w_nt, input_precision="ieee") + b_hn[None, :]
    r = tl.sigmoid(b_gi_r + gh_r)
    z = tl.sigmoid(b_gi_z + gh_z)
    c = _tanh(b_gi_n + r * gh_n)
    return r, z, c, gh_n


@triton.jit
def _load_gi(gi_ptr, pos, active, o_h, m_h, H):
    """gi rows at positions pos of one direction: three [BR, BH] gate blocks (0 where inactive)."""
    m = active[:, None] & m_h[None, :]
    p = gi_ptr + pos[:, None] * (3 * H) + o_h[None, :]
    return (tl.load(p, mask=m, other=0.0), tl.load(p + H, mask=m, other=0.0),
            tl.load(p + 2 * H, mask=m, other=0.0))


@triton.jit
def _gpo_table_fwd_kernel(gi_ptr, whh_ptr, bhh_ptr, out_ptr, K, H,
                          BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """gi (2, K, 3H), whh (2, 3H, H), bhh (2, 3H) fp32 contiguous -> out (K + 1, K, H) fp32 (module
    docstring); entries the recurrence never reaches are left as they are (the launcher zeroes them)."""
    i_prog = tl.program_id(0)
    direction = tl.minimum(i_prog, 1)
    o_h = tl.arange(0, BLOCK_H)
    m_h = o_h < H
    w_r, w_z, w_n, b_hr, b_hz, b_hn = _load_recurrent(whh_ptr, bhh_ptr, direction, o_h, m_h, H)
    w_rt = w_r.trans()  # W_hr^T [BH(in), BH(out)]
    w_zt = w_z.trans()
    w_nt = w_n.trans()
    p_gi = gi_ptr + direction * (3 * H * K)
    n_steps = _num_steps(i_prog, K, BLOCK_R)

    h = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
    for t in range(0, n_steps):
        o_out, pos, active = _row_positions(i_prog, t, K, BLOCK_R)
        b_gi_r, b_gi_z, b_gi_n = _load_gi(p_gi, pos, active, o_h, m_h, H)
        r, z, c, _ = _gates(b_gi_r, b_gi_z, b_gi_n, h, w_rt, w_zt, w_nt, b_hr, b_hz, b_hn)
        h_new = (1.0 - z) * c + z * h
        h = tl.where(active[:, None], h_new, h)
        p_out = out_ptr + (o_out.to(tl.int64)[:, None] * K + pos[:, None]) * H + o_h[None, :]
        tl.store(p_out, h, mask=active[:, None] & m_h[None, :])


@triton.jit
def _gpo_table_bwd_kernel(gi_ptr, whh_ptr, bhh_ptr, out_ptr, gout_ptr, dgi_ptr, dwhh_part_ptr, dbhh_part_ptr,
                          K, H, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """BPTT of `_gpo_table_fwd_kernel`. grad_out (K + 1, K, H) fp32 contiguous. Writes
    dgi (K + 1, K, 3H) per (row, position) (unvisited entries left as they are), and the program's
    partial dW_hh (3H, H) and db_hh (3H,) into dwhh_part[i_prog], dbhh_part[i_prog]."""
    i_prog = tl.program_id(0)
    direction = tl.minimum(i_prog, 1)
    o_h = tl.arange(0, BLOCK_H)
    m_h = o_h < H
    m_hh = m_h[:, None] & m_h[None, :]
    w_r, w_z, w_n, b_hr, b_hz, b_hn = _load_recurrent(whh_ptr, bhh_ptr, direction, o_h, m_h, H)
    w_rt = w_r.trans()
    w_zt = w_z.trans()
    w_nt = w_n.trans()
    p_gi = gi_ptr + direction * (3 * H * K)
    n_steps = _num_steps(i_prog, K, BLOCK_R)

    dh = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
    acc_wr = tl.zeros((BLOCK_H, BLOCK_H), dtype=tl.float32)
    acc_wz = tl.zeros((BLOCK_H, BLOCK_H), dtype=tl.float32)
    acc_wn = tl.zeros((BLOCK_H, BLOCK_H), dtype=tl.float32)
    acc_br = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc_bz = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc_bn = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for i in range(0, n_steps):
        t = n_steps - 1 - i
        o_out, pos, active = _row_positions(i_prog, t, K, BLOCK_R)
        if i_prog == 0:
            pos_prev = pos - 1
        else:
            pos_prev = pos + 1
        m_rh = active[:, None] & m_h[None, :]
        o_row = o_out.to(tl.int64)[:, None] * K
        has_prev = (tl.zeros((BLOCK_R,), dtype=tl.int32) + t) > 0  # the first step starts from h = 0
        p_prev = out_ptr + (o_row + pos_prev[:, None]) * H + o_h[None, :]
        h_prev = tl.load(p_prev, mask=m_rh & has_prev[:, None], other=0.0)
        b_gi_r, b_gi_z, b_gi_n = _load_gi(p_gi, pos, active, o_h, m_h, H)
        r, z, c, gh_n = _gates(b_gi_r, b_gi_z, b_gi_n, h_prev, w_rt, w_zt, w_nt, b_hr, b_hz, b_hn)
        g = tl.load(gout_ptr + (o_row + pos[:, None]) * H + o_h[None, :], mask=m_rh, other=0.0)
        dh_t = tl.where(m_rh, dh + g, 0.0)
        dc_pre = dh_t * (1.0 - z) * (1.0 - c * c)
        dz_pre = dh_t * (h_prev - c) * z * (1.0 - z)
        dr_pre = dc_pre * gh_n * r * (1.0 - r)
        dghn = dc_pre * r
        p_dgi = dgi_ptr + (o_row + pos[:, None]) * (3 * H) + o_h[None, :]
        tl.store(p_dgi, dr_pre, mask=m_rh)
        tl.store(p_dgi + H, dz_pre, mask=m_rh)
        tl.store(p_dgi + 2 * H, dc_pre, mask=m_rh)
        dh_prev = dh_t * z
        dh_prev += tl.dot(dr_pre, w_r, input_precision="ieee")
        dh_prev += tl.dot(dz_pre, w_z, input_precision="ieee")
        dh_prev += tl.dot(dghn, w_n, input_precision="ieee")
        dh = tl.where(active[:, None], dh_prev, dh)
        acc_wr += tl.dot(dr_pre.trans(), h_prev, input_precision="ieee")
        acc_wz += tl.dot(dz_pre.trans(), h_prev, input_precision="ieee")
        acc_wn += tl.dot(dghn.trans(), h_prev, input_precision="ieee")
        acc_br += tl.sum(dr_pre, axis=0)
        acc_bz += tl.sum(dz_pre, axis=0)
        acc_bn += tl.sum(dghn, axis=0)

    p_dw = dwhh_part_ptr + i_prog.to(tl.int64) * (3 * H * H) + o_h[:, None] * H + o_h[None, :]
    tl.store(p_dw, acc_wr, mask=m_hh)
    tl.store(p_dw + H * H, acc_wz, mask=m_hh)
    tl.store(p_dw + 2 * H * H, acc_wn, mask=m_hh)
    p_db = dbhh_part_ptr + i_prog.to(tl.int64) * (3 * H) + o_h
    tl.store(p_db, acc_br, mask=m_h)
    tl.store(p_db + H, acc_bz, mask=m_h)
    tl.store(p_db + 2 * H, acc_bn, mask=m_h)


def _num_programs(K: int, settings: TableSettings) -> int:
    return 1 + triton.cdiv(K, settings.BLOCK_R)


def _check(gi, whh, bhh):
    if gi.dim() != 3 or gi.shape[0] != 2 or gi.shape[2] % 3:
        raise ValueError(f"gi must be (2, K, 3H), got shape {tuple(gi.shape)}")
    K, H = gi.shape[1], gi.shape[2] // 3
    if whh.shape != (2, 3 * H, H) or bhh.shape != (2, 3 * H):
        raise ValueError(f"whh must be (2, {3 * H}, {H}) and bhh (2, {3 * H}), "
                         f"got {tuple(whh.shape)} and {tuple(bhh.shape)}")
    for name, t in (("gi", gi), ("whh", whh), ("bhh", bhh)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous float32, got {t.dtype}, strides {t.stride()}")
    return K, H


def gpo_table_fwd(gi: torch.Tensor, whh: torch.Tensor, bhh: torch.Tensor, settings: TableSettings = None):
    """States of the bidirectional GRU over every prefix size (module docstring).

    gi (2, K, 3H): input projections W_ih pe[p] + b_ih of the forward (0) and reverse (1) direction;
    whh (2, 3H, H), bhh (2, 3H): the recurrent weights. All fp32 contiguous, one device.
    Returns out (K + 1, K, H) fp32: row 0 the forward states, row 1 + r the reverse states of the set
    of size r + 1 (zero at positions > r).
    """
    K, H = _check(gi, whh, bhh)
    settings = settings or table_settings(H)
    out = torch.zeros((K + 1, K, H), dtype=torch.float32, device=gi.device)
    _gpo_table_fwd_kernel[(_num_programs(K, settings),)](
        gi, whh, bhh, out, K, H,
        BLOCK_R=settings.BLOCK_R, BLOCK_H=settings.BLOCK_H, num_warps=settings.num_warps,
    )
    return out


def gpo_table_bwd(gi, whh, bhh, out, grad_out, settings: TableSettings):
    """Gradients (d_gi (2, K, 3H), d_whh (2, 3H, H), d_bhh (2, 3H)), fp32, of `gpo_table_fwd` given
    its output `out` and grad_out (K + 1, K, H)."""
    K, H = _check(gi, whh, bhh)
    grad_out = grad_out.to(torch.float32).contiguous()
    P = _num_programs(K, settings)
    dgi = torch.zeros((K + 1, K, 3 * H), dtype=torch.float32, device=gi.device)
    dwhh_part = torch.empty((P, 3 * H, H), dtype=torch.float32, device=gi.device)
    dbhh_part = torch.empty((P, 3 * H), dtype=torch.float32, device=gi.device)
    _gpo_table_bwd_kernel[(P,)](
        gi, whh, bhh, out, grad_out, dgi, dwhh_part, dbhh_part, K, H,
        BLOCK_R=settings.BLOCK_R, BLOCK_H=settings.BLOCK_H, num_warps=settings.num_warps, maxnreg=_BWD_MAXNREG,
    )
    d_gi = torch.stack((dgi[0], dgi[1:].sum(0)))
    d_whh = torch.stack((dwhh_part[0], dwhh_part[1:].sum(0)))
    d_bhh = torch.stack((dbhh_part[0], dbhh_part[1:].sum(0)))
    return d_gi, d_whh, d_bhh


def compile_specializations() -> list:
    """The forward and backward kernels for every BLOCK_H bucket (16, 32) of `table_settings`."""
    specs = []
    for hidden in (16, 32):
        s = table_settings(hidden)
        consts = {"BLOCK_R": s.BLOCK_R, "BLOCK_H": s.BLOCK_H}
        for name, fn, ptrs in (
            ("fwd", _gpo_table_fwd_kernel, ("gi_ptr", "whh_ptr", "bhh_ptr", "out_ptr")),
            ("bwd", _gpo_table_bwd_kernel, ("gi_ptr", "whh_ptr", "bhh_ptr", "out_ptr", "gout_ptr", "dgi_ptr",
                                            "dwhh_part_ptr", "dbhh_part_ptr")),
        ):
            sig = {**{p: "*fp32" for p in ptrs}, "K": "i32", "H": "i32",
                   "BLOCK_R": "constexpr", "BLOCK_H": "constexpr"}
            spec = {"name": f"gpo_table_{name}-H{s.BLOCK_H}", "fn": fn,
                    "signature": {a: sig[a] for a in fn.arg_names}, "constexprs": consts,
                    "num_warps": s.num_warps, "num_stages": 1}
            if name == "bwd":
                spec["maxnreg"] = _BWD_MAXNREG
            specs.append(spec)
    return specs
