"""GPO coefficient table over every set size 1..K from one fused bidirectional-GRU recurrence.

    table[n - 1, p] = softmax_p(score_n[p] / 0.1),  score_n[p] = linear((fwd[p] + rev_n[p]) / 2) for p < n,
                      -10000 for p >= n

fwd = the forward GRU direction over pe[0..K-1] (the same for every n), rev_n = the reverse direction
started at position n - 1 (one sequence per size). Exactly the coefficients of the published GPO for
a set of size n (rows are zero beyond n after the softmax, as there).

Backends: "triton" (`vse_fast.kernels.gpo_table`: both directions of all K sequences in one launch,
hand-written BPTT backward; CUDA, or CPU under TRITON_INTERPRET=1) and "torch" (one packed cuDNN /
CPU GRU call over the K prefixes, `torch_coefficient_table`). The table is computed in float32 on the
Triton path (autocast off) and returned in the linear layer's dtype.
"""

import torch
from torch.autograd.function import once_differentiable
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import vse_fast.kernels as _kernel_package
from vse_fast.kernels import require_triton, triton_for_auto, triton_interpreting
from vse_fast.ops._autograd import refuse_create_graph

PAD_SCORE = -10000.0
TEMPERATURE = 0.1
_BACKENDS = ("auto", "triton", "torch")
_TRITON_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _gru_params(gru: torch.nn.GRU):
    return (gru.weight_ih_l0, gru.weight_ih_l0_reverse, gru.bias_ih_l0, gru.bias_ih_l0_reverse,
            gru.weight_hh_l0, gru.weight_hh_l0_reverse, gru.bias_hh_l0, gru.bias_hh_l0_reverse)


def check_table_backend(gru: torch.nn.GRU, backend: str) -> None:
    """Raise ValueError/TypeError when `backend` cannot compute the table of this GRU."""
    if backend not in _BACKENDS:
        raise ValueError(f"unknown table backend {backend!r}; choose one of {_BACKENDS}")
    if backend != "triton":
        return
    require_triton("table_backend='triton'")
    from vse_fast.kernels.gpo_table import MAX_HIDDEN

    if gru.hidden_size > MAX_HIDDEN:
        raise ValueError(f"the Triton GPO table takes d_hidden <= {MAX_HIDDEN}, got {gru.hidden_size}; "
                         "use table_backend='torch' (or 'auto', which falls back to it)")
    weight = gru.weight_ih_l0
    if weight.dtype not in _TRITON_PARAM_DTYPES:
        raise TypeError(f"the Triton GPO table takes float32/bfloat16/float16 parameters, got {weight.dtype}")
    if not weight.is_cuda and not triton_interpreting():
        raise ValueError(f"table_backend='triton' needs CUDA parameters (or TRITON_INTERPRET=1), got device "
                         f"{weight.device} (use 'torch' or 'auto')")


def use_triton_table(gru: torch.nn.GRU, backend: str) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        check_table_backend(gru, backend)
        return True
    weight = gru.weight_ih_l0
    if not (weight.is_cuda and weight.dtype in _TRITON_PARAM_DTYPES and triton_for_auto()):
        return False
    from vse_fast.kernels.gpo_table import MAX_HIDDEN

    return gru.hidden_size <= MAX_HIDDEN


class GRUPrefixStatesFunction(torch.autograd.Function):
    """out (K + 1, K, H) = the forward states (row 0) and the reverse states of every prefix size
    (row 1 + r: size r + 1) of a bidirectional GRU, from gi (2, K, 3H), whh (2, 3H, H), bhh (2, 3H),
    all fp32. The backward math is in the docstring of vse_fast.kernels.gpo_table. Differentiable
    once (a kernel backward): a backward with create_graph=True raises."""

    @staticmethod
    def forward(ctx, gi, whh, bhh):
        from vse_fast.kernels import gpo_table as kernels

        settings = kernels.table_settings(whh.shape[2])
        gi, whh, bhh = gi.contiguous(), whh.contiguous(), bhh.contiguous()
        with _kernel_package.launch_device(gi):
            out = kernels.gpo_table_fwd(gi, whh, bhh, settings)
        ctx.save_for_backward(gi, whh, bhh, out)
        ctx.settings = settings
        return out

    @staticmethod
    def backward(ctx, grad_out):
        refuse_create_graph("GPO's coefficient table (table_backend='triton')")
        return GRUPrefixStatesFunction._backward(ctx, grad_out)

    @staticmethod
    @once_differentiable
    def _backward(ctx, grad_out):
        from vse_fast.kernels import gpo_table as kernels

        gi, whh, bhh, out = ctx.saved_tensors
        with _kernel_package.launch_device(gi):
            return kernels.gpo_table_bwd(gi, whh, bhh, out, grad_out, ctx.settings)


def _scores_to_table(averaged, linear, sizes):
    """averaged (S, L, H), linear (the score layer: (..., H) -> (..., 1)), sizes (S,) on the device
    -> (S, L) softmax of the masked, scaled scores."""
    scores = linear(averaged).squeeze(-1)  # (S, L)
    valid = torch.arange(scores.shape[1], device=scores.device) < sizes.unsqueeze(1)
    return torch.softmax(scores.masked_fill(~valid, PAD_SCORE) / TEMPERATURE, 1)


def triton_coefficient_table(pe: torch.Tensor, gru: torch.nn.GRU, linear_weight: torch.Tensor) -> torch.Tensor:
    """(K, K) coefficient table for sizes 1..K (row n - 1), pe (K, d_pe): one fused GRU kernel."""
    K = pe.shape[0]
    dtype = linear_weight.dtype
    w_ih, w_ih_r, b_ih, b_ih_r, w_hh, w_hh_r, b_hh, b_hh_r = (p.float() for p in _gru_params(gru))
    with torch.autocast(pe.device.type, enabled=False):
        gi = torch.baddbmm(torch.stack((b_ih, b_ih_r)).unsqueeze(1), pe.float().expand(2, K, pe.shape[1]),
                           torch.stack((w_ih, w_ih_r)).transpose(1, 2))  # (2, K, 3H)
        out = GRUPrefixStatesFunction.apply(gi, torch.stack((w_hh, w_hh_r)), torch.stack((b_hh, b_hh_r)))
        averaged = (out[1:] + out[:1]) * 0.5  # (K, K, H): row n - 1 = size n
        sizes = torch.arange(1, K + 1, device=pe.device)
        weight = linear_weight.float()
        table = _scores_to_table(averaged, lambda x: torch.nn.functional.linear(x, weight), sizes)
    return table.to(dtype)


def torch_coefficient_table(pe: torch.Tensor, gru: torch.nn.Module, linear: torch.nn.Module, sizes: torch.Tensor,
                            device_sizes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(S, L) coefficients of the sizes `sizes` (S,) (CPU int64, descending, each <= L = pe.shape[0]),
    one packed bidirectional GRU call over the S prefixes (pe cast to `dtype`), scored by calling
    `linear`, as published (its hooks and wrappers apply); device_sizes = the same sizes on pe's device."""
    L, d_pe = pe.shape
    H = gru.hidden_size
    prefixes = pe.to(dtype).unsqueeze(0).expand(sizes.shape[0], L, d_pe)
    packed = pack_padded_sequence(prefixes, sizes, batch_first=True, enforce_sorted=True)
    out, _ = gru(packed)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=L)  # (S, L, 2H), 0 after n
    averaged = (out[:, :, :H] + out[:, :, H:]) / 2
    return _scores_to_table(averaged, linear, device_sizes)
