"""GPO pool as an autograd op: sort every feature column of a set descending, weighted sum over ranks.

    out[b, d] = sum_{r < n_b} weights[b, r] * sort_desc(features[b, :n_b, d])[r],   n_b = lengths[b]

Backends: "triton" (vse_fast.kernels.gpo_pool; CUDA, or CPU under TRITON_INTERPRET=1), "torch" (the
reference and the CPU path, with a hand-written backward) and "auto" (Triton for CUDA tensors of
float32/bfloat16/float16 with K <= 512 and D <= 524280, torch otherwise: float64, larger K or D, CPU).

Difference from the published VSE-infinity pool: the published code fills positions >= n with -10000
before sorting, so a valid feature below -10000 would sort after the padding; here only the n valid
entries are sorted (padding always ranks last). The results are identical whenever features > -10000.
Ties sort stably (original order first), NaN sorts first (as in torch.sort) and propagates.
"""

import torch
from torch.autograd.function import once_differentiable

import vse_fast.kernels as _kernel_package
from vse_fast.kernels import require_triton, triton_for_auto, triton_interpreting
from vse_fast.ops._autograd import refuse_create_graph

_BACKENDS = ("auto", "triton", "torch")
_TRITON_MAX_K = 512
_TRITON_MAX_D = 65535 * 8  # "auto": D-blocks within CUDA's grid axis at the narrowest tile (K > 256: 8 columns)
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FEATURE_DTYPES = (*_TRITON_DTYPES, torch.float64)  # float8 is floating point too, but has no sort


def check_gpo_pool_inputs(features, lengths, weights=None, backend="auto", validate=True):
    """Raise TypeError/ValueError naming the problem. Shape, dtype and device checks never sync;
    the value checks of `lengths` (finite whole numbers, 1 <= n <= K, n <= Kw) read the tensor on the host
    and run only with validate=True. weights=None checks features and lengths alone."""
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {_BACKENDS}")
    named = [("features", features), ("lengths", lengths)] + ([("weights", weights)] if weights is not None else [])
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if features.dim() != 3:
        raise ValueError(f"features must be (B, K, D), got shape {tuple(features.shape)}")
    if features.dtype not in _FEATURE_DTYPES:
        raise TypeError(f"features must be a float16/bfloat16/float32/float64 tensor, got {features.dtype}")
    check_lengths_tensor(lengths)
    B, K, D = features.shape
    if lengths.shape[0] != B:
        raise ValueError(f"batch sizes differ: features has B={B}, lengths has {lengths.shape[0]}")
    if K == 0:
        raise ValueError("features has an empty set axis (K=0); every set needs at least one element")
    if weights is not None:
        if weights.dim() != 2:
            raise ValueError(f"weights must be (B, Kw), got shape {tuple(weights.shape)}")
        if not weights.is_floating_point():
            raise TypeError(f"weights must be a floating-point tensor, got {weights.dtype}")
        if weights.shape[0] != B:
            raise ValueError(f"batch sizes differ: features has B={B}, weights has {weights.shape[0]}")
    devices = {t.device for _, t in named}
    if len(devices) != 1:
        raise ValueError("features, lengths and weights must be on one device, got "
                         + ", ".join(f"{name} on {t.device}" for name, t in named))
    if validate and B > 0:
        n_max = check_length_values(lengths, K)
        if weights is not None and weights.shape[1] < n_max:
            raise ValueError(f"weights has Kw={weights.shape[1]} positions, fewer than the longest set {n_max}")


# the wider unsigned and float8 dtypes lack the reductions the checks use (min, isfinite)
_LENGTH_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                  torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_lengths_tensor(lengths) -> None:
    """TypeError/ValueError unless `lengths` is a (B,) integer or float tensor (no host read)."""
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"lengths must be a torch.Tensor, got {type(lengths).__name__}")
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be (B,), got shape {tuple(lengths.shape)}")
    if lengths.dtype not in _LENGTH_DTYPES:
        raise TypeError(f"lengths must be an integer or float tensor (int8/16/32/64, uint8, float16/32/64, "
                        f"bfloat16), got {lengths.dtype}")


def check_length_values(lengths, K=None) -> int:
    """ValueError unless the (B,) tensor `lengths` (B > 0) holds finite whole numbers in [1, K] (K None:
    no upper bound). Reads it on the host; returns max(lengths)."""
    n = lengths.detach()
    if n.is_floating_point():
        whole = torch.isfinite(n) & (n == n.round())
        if not bool(whole.all()):
            raise ValueError(f"lengths must hold finite whole numbers, got {n[~whole][:5].tolist()}")
    n_min, n_max = int(n.min()), int(n.max())
    if n_min < 1 or (K is not None and n_max > K):
        bound = f"[1, K={K}]" if K is not None else ">= 1"
        raise ValueError(f"every length must be {'in ' if K is not None else ''}{bound}, got min {n_min}, max {n_max}")
    return n_max


def _use_triton(features, backend):
    if backend == "torch":
        return False
    if backend == "triton":
        require_triton("gpo_pool(backend='triton')")
        if features.dtype not in _TRITON_DTYPES:
            raise TypeError(f"the Triton GPO pool takes float32/bfloat16/float16 features, got {features.dtype}")
        if not features.is_cuda and not triton_interpreting():
            raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got device "
                             f"{features.device} (use backend='torch' or 'auto')")
        if features.shape[1] > _TRITON_MAX_K:
            raise ValueError(f"the Triton GPO pool takes K <= {_TRITON_MAX_K}, got K={features.shape[1]}; "
                             "use backend='torch' (or 'auto', which falls back to it)")
        return True
    return (features.is_cuda and features.dtype in _TRITON_DTYPES and features.shape[1] <= _TRITON_MAX_K
            and features.shape[2] <= _TRITON_MAX_D and triton_for_auto())


def _sorts_by_length(features) -> bool:
    """Whether the torch path groups sets by length (reading the group sizes on the host): on the CPU."""
    return features.device.type == "cpu"


def _sort_sets(features, n, grouped=None):
    """(s, idx), both (B, D, K): each column's n_b valid values sorted descending (stable), then zeros;
    idx their positions, then n_b..K-1 (the padding, in order): what one stable sort of the whole
    axis with -inf padding gives. n: (B,) int64, clamped to [0, K] (a set of length 0 is all padding).

    On the CPU the sets are sorted in groups of one length, so the padding is never sorted (about half
    the work when lengths spread over 1..K); the group sizes are read on the host. Elsewhere one sort
    of the padded axis, with no host synchronisation. ``grouped`` overrides that choice (tests)."""
    B, K, D = features.shape
    n = n.clamp(0, K)
    grouped = _sorts_by_length(features) if grouped is None else grouped
    counts = torch.bincount(n, minlength=K + 1).tolist() if grouped else None
    if grouped and counts[K] == B:  # every set full: no padding to mask or skip
        return torch.sort(features.transpose(1, 2).contiguous(), dim=2, descending=True, stable=True)
    if not grouped:  # one sort of the padded axis
        valid = torch.arange(K, device=features.device) < n.unsqueeze(1)
        x = torch.where(valid.unsqueeze(1), features.transpose(1, 2), float("-inf")).contiguous()
        s, idx = torch.sort(x, dim=2, descending=True, stable=True)
        return s.masked_fill_(~valid.unsqueeze(1), 0.0), idx
    s = features.new_zeros((B, D, K))
    idx = torch.arange(K).expand(B, D, K).clone()
    order = torch.argsort(n, stable=True)
    start = 0
    for length, count in enumerate(counts):
        rows, start = order[start:start + count], start + count
        if length == 0 or count == 0:
            continue
        if count == B:
            rows = slice(None)  # one length for the whole batch: no gather
        values = features[rows, :length].transpose(1, 2).contiguous()  # sorted along the contiguous axis
        s[rows, :, :length], idx[rows, :, :length] = torch.sort(values, dim=2, descending=True, stable=True)
    return s, idx


class TorchGPOPoolFunction(torch.autograd.Function):
    """Torch path. Forward: each set's valid values sorted per feature column, descending and stable
    (``_sort_sets``: (B, D, K), zeros after rank n), one batched matmul with the weights. Backward
    (s = sorted values, zero at ranks >= n; idx = their original positions; w' = weights zeroed at
    ranks >= n):

        grad_weights[b, r] = sum_d s[b, d, r] * grad_out[b, d]            (ranks < n)
        grad_features[b, idx[b, d, r], d] = grad_out[b, d] * w'[b, r]      (one scatter; 0 at padding)

    Under create_graph (a gradient penalty) the backward is built from differentiable ops on the
    inputs (s gathered from features by idx), so a double backward gives the exact second-order
    gradients of this piecewise-linear map, as the published module's autograd does.
    """

    @staticmethod
    def forward(ctx, features, n, weights):
        with torch.autocast(features.device.type, enabled=False):  # the bmm in fp32, not autocast's bf16
            return TorchGPOPoolFunction._forward(ctx, features, n, weights)

    @staticmethod
    def _forward(ctx, features, n, weights):
        B, K, D = features.shape
        acc = torch.float64 if features.dtype == torch.float64 else torch.float32
        valid = torch.arange(K, device=features.device) < n.unsqueeze(1)  # (B, K): position / rank < n
        w = weights.new_zeros((B, K), dtype=acc)
        kw = min(K, weights.shape[1])
        w[:, :kw] = weights[:, :kw]
        w.masked_fill_(~valid, 0.0)
        s, idx = _sort_sets(features, n)  # (B, D, K)
        if s.dtype != acc:
            s = s.to(acc)
        out = torch.bmm(s, w.unsqueeze(2)).squeeze(2)  # (B, D)
        ctx.save_for_backward(s, idx, w, valid, features, weights)
        # every rank valid: the backward masks nothing. Read on the host only where the sort reads the
        # set sizes there anyway (the CPU); elsewhere the mask runs, with no host sync.
        ctx.all_valid = _sorts_by_length(features) and bool(valid.all())
        ctx.weights_shape, ctx.weights_dtype = weights.shape, weights.dtype
        ctx.features_dtype = features.dtype
        return out.to(features.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            if torch.is_grad_enabled():  # create_graph=True
                return TorchGPOPoolFunction._differentiable_backward(ctx, grad_out)
            return TorchGPOPoolFunction._backward(ctx, grad_out)

    @staticmethod
    def _differentiable_backward(ctx, grad_out):
        _, idx, _, valid, features, weights = ctx.saved_tensors
        B, D, K = idx.shape
        acc = torch.float64 if features.dtype == torch.float64 else torch.float32
        s = features.transpose(1, 2).gather(2, idx).to(acc).masked_fill(~valid.unsqueeze(1), 0.0)  # (B, D, K)
        kw = min(K, weights.shape[1])
        w = torch.nn.functional.pad(weights[:, :kw].to(acc), (0, K - kw)).masked_fill(~valid, 0.0)  # (B, K)
        g = grad_out.to(acc)
        grad_features = grad_weights = None
        if ctx.needs_input_grad[0]:
            gs = (g.unsqueeze(2) * w.unsqueeze(1)).masked_fill(~valid.unsqueeze(1), 0.0)  # (B, D, K)
            grad_features = torch.zeros_like(gs).scatter(2, idx, gs).transpose(1, 2).to(ctx.features_dtype)
        if ctx.needs_input_grad[2]:
            gw = torch.bmm(g.unsqueeze(1), s).squeeze(1).masked_fill(~valid, 0.0)  # (B, K)
            grad_weights = torch.nn.functional.pad(gw[:, :kw], (0, ctx.weights_shape[1] - kw)).to(ctx.weights_dtype)
        return grad_features, None, grad_weights

    @staticmethod
    @once_differentiable
    def _backward(ctx, grad_out):
        s, idx, w, valid, _, _ = ctx.saved_tensors
        B, D, K = s.shape
        g = grad_out.to(s.dtype)
        grad_features = grad_weights = None
        if ctx.needs_input_grad[0]:
            gs = g.unsqueeze(2) * w.unsqueeze(1)  # (B, D, K)
            if not ctx.all_valid:  # padding ranks get 0 even where grad_out is NaN or inf
                gs.masked_fill_(~valid.unsqueeze(1), 0.0)
            grad_t = torch.empty((B, D, K), dtype=ctx.features_dtype, device=s.device)
            # scattered along the contiguous axis, then one transposing copy: faster than a strided scatter
            grad_features = grad_t.scatter_(2, idx, gs.to(ctx.features_dtype)).transpose(1, 2).contiguous()
        if ctx.needs_input_grad[2]:
            gw = torch.bmm(g.unsqueeze(1), s).squeeze(1).masked_fill_(~valid, 0.0)  # (B, K)
            grad_weights = gw.new_zeros(ctx.weights_shape)
            kw = min(K, ctx.weights_shape[1])
            grad_weights[:, :kw] = gw[:, :kw]
            grad_weights = grad_weights.to(ctx.weights_dtype)
        return grad_features, None, grad_weights


class TritonGPOPoolFunction(torch.autograd.Function):
    """Triton path: see vse_fast.kernels.gpo_pool for the kernels. Saves only the inputs; the backward
    re-sorts (no B x K x D index tensor). Same gradients as TorchGPOPoolFunction."""

    @staticmethod
    def forward(ctx, features, n, weights):
        from vse_fast.kernels.gpo_pool import gpo_pool_fwd

        n32 = n.to(torch.int32)
        w32 = weights.to(torch.float32)
        with _kernel_package.launch_device(features):
            out, settings = gpo_pool_fwd(features, n32, w32)
        ctx.save_for_backward(features, n32, w32)
        ctx.settings, ctx.weights_dtype = settings, weights.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        refuse_create_graph("gpo_pool(backend='triton')")
        return TritonGPOPoolFunction._backward(ctx, grad_out)

    @staticmethod
    @once_differentiable
    def _backward(ctx, grad_out):
        from vse_fast.kernels.gpo_pool import gpo_pool_bwd

        features, n32, w32 = ctx.saved_tensors
        with _kernel_package.launch_device(features):
            grad_x, grad_w = gpo_pool_bwd(features, n32, w32, grad_out.to(features.dtype), ctx.settings)
        return grad_x, None, grad_w.to(ctx.weights_dtype) if ctx.needs_input_grad[2] else None


def gpo_pool(features, lengths, weights, *, backend="auto", validate=True):
    """Sort-and-weighted-sum pool of GPO.

    Args:
        features: (B, K, D) float tensor, any strides. Output and grad_features have its dtype
            (fp32 accumulation for 16-bit dtypes).
        lengths: (B,) integer or float tensor of finite whole numbers, 1 <= lengths[b] <= K, any order.
        weights: (B, Kw) float tensor, Kw >= max(lengths): weight of each rank; positions >= lengths[b]
            are ignored (treated as 0, gradient 0).
        backend: "auto" | "triton" | "torch" (module docstring).
        validate: True checks the values of `lengths` on the host (a device sync). False skips only
            those checks (the no-sync path of GPO.pool); out-of-range lengths are then clamped to [0, K]
            by the kernels for memory safety, with unspecified results.

    Returns:
        (B, D) tensor, differentiable w.r.t. features and weights: twice on the torch backend (a
        gradient penalty), once on the Triton backend (a kernel backward: a backward with create_graph=True raises).

    Example:
        >>> x = torch.tensor([[[1.0], [3.0], [2.0]]])          # B=1, K=3, D=1
        >>> gpo_pool(x, torch.tensor([2]), torch.tensor([[0.75, 0.25, 9.0]]))
        tensor([[2.5000]])                                    # 0.75 * 3 + 0.25 * 1
    """
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a torch.Tensor, got {type(weights).__name__}")
    check_gpo_pool_inputs(features, lengths, weights, backend, validate)
    n = lengths.detach().to(torch.long) if lengths.dtype != torch.long else lengths.detach()
    if _use_triton(features, backend):
        return TritonGPOPoolFunction.apply(features, n, weights)
    return TorchGPOPoolFunction.apply(features, n, weights)
