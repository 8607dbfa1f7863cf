"""GPO (Generalized Pooling Operator, VSE-infinity) and fixed-weight pools over sorted features.

`GPO` is a drop-in for the published module (same constructor, parameter names, forward outputs):
`load_state_dict(strict=True)` of a published GPO state dict works both ways.

Coefficients: for a set of size n, sinusoidal position encodings of positions 0..n-1 run through a
bidirectional GRU (reverse direction starting at n-1), the two directions averaged, scored by a
bias-free linear layer, positions >= n scored -10000, softmax of score / 0.1 over positions.
The forward GRU direction is the same for all sizes; the reverse one starts at n-1. Coefficients are
computed once per size, never per sample, by one of two table backends (`table_backend`):

* "triton" (auto on CUDA): one fused kernel runs both directions of every size 1..K with the hidden
  states in registers, forward and hand-written backward (vse_fast.ops.gpo_table);
* "torch": one packed bidirectional GRU call over the prefixes pe[0..n-1] of the needed sizes.

* ``forward`` (drop-in, may sync with the host): the torch backend builds the distinct lengths of the
  batch, the Triton one every size up to max(lengths).
* ``coefficients`` / ``pool`` (no host sync; used by our encoders): a table over every size 1..K
  (K = features.shape[1], a Python int), gathered by length on the device. It runs the GRU over
  K (K + 1) / 2 positions: on the CPU, for K > ALL_SIZES_MAX_K (64; 512 when the eval cache keeps
  the table), the sizes present are built instead (the lengths are read on the host there anyway).

In eval mode, when no gradient to the parameters is needed, the table is cached (see GPO for what
invalidates it; `GPO.clear_cache()` drops it). Tables are computed with autocast disabled (in the
parameters' dtype on the torch path, float32 on the Triton path): a table built under autocast is
the same table as outside it (the pool consumes the weights in float32 either way).
"""
import math

import torch
import torch.nn as nn
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from torch.optim.optimizer import register_optimizer_step_post_hook

import vse_fast.ops.gpo_pool as _pool_ops
from vse_fast.ops.gpo_pool import check_gpo_pool_inputs, check_length_values, check_lengths_tensor, gpo_pool
from vse_fast.ops.gpo_table import triton_coefficient_table, torch_coefficient_table, use_triton_table

TABLE_BACKENDS = ("auto", "triton", "torch")
# Above this set size, GPO on the CPU builds the coefficients of the sizes present, not of every size 1..K;
# in eval mode without gradients (the table then cached) above the second
ALL_SIZES_MAX_K = 64
CACHED_ALL_SIZES_MAX_K = 512

# Steps of every torch.optim optimizer in this process, part of the eval-cache key: fused optimizers
# (AdamW(fused=True), the trainer's choice on CUDA) update parameters without bumping their versions.
_optimizer_steps = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _optimizer_steps[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def positional_encoding_1d(d_pe: int, length: int, device=None) -> torch.Tensor:
    """(length, d_pe) float32: channel 2i = sin(pos * f_i), channel 2i+1 = cos(pos * f_i),
    f_i = exp(-2i * ln(10000) / d_pe). Same operations as the published code (bitwise equal on CPU)."""
    if d_pe % 2:
        raise ValueError(f"sin/cos position encodings need an even d_pe, got d_pe={d_pe}")
    pe = torch.zeros(length, d_pe, device=device)
    position = torch.arange(0, length, device=device).unsqueeze(1).float()
    freq = torch.exp(torch.arange(0, d_pe, 2, dtype=torch.float, device=device) * -(math.log(10000.0) / d_pe))
    pe[:, 0::2] = torch.sin(position * freq)
    pe[:, 1::2] = torch.cos(position * freq)
    return pe


_WEIGHT_REBUILDING_HOOKS = (BasePruningMethod, WeightNorm, SpectralNorm)


def _reads_weights_as_called(module: nn.Module, kind: type) -> bool:
    """Whether reading the weights of ``module`` gives what calling it would compute: a plain ``kind``
    (not a subclass, a quantized or a parametrized layer), no forward or backward hooks of its own
    (global module hooks are not looked at), and only pre-hooks that rebuild
    its weights (prune, weight_norm, spectral_norm; run by _recompute_hooked_weights)."""
    return (type(module) is kind and not module._forward_hooks and not module._backward_hooks
            and not module._backward_pre_hooks
            and all(isinstance(h, _WEIGHT_REBUILDING_HOOKS) for h in module._forward_pre_hooks.values()))


def _recompute_hooked_weights(*modules: nn.Module) -> None:
    """Run the forward pre-hooks of torch.nn.utils.prune, weight_norm and spectral_norm, which rebuild a
    module's ``weight`` from its parameters before each call: the Triton table reads the weights of the
    gru and linear without calling them."""
    for module in modules:
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, _WEIGHT_REBUILDING_HOOKS):
                hook(module, ())


def _lengths_as_long(lengths: torch.Tensor) -> torch.Tensor:
    return lengths.detach() if lengths.dtype == torch.long else lengths.detach().to(torch.long)


def _longest(n: torch.Tensor) -> int:
    """max(n) read on the host (a sync); 0 for an empty batch."""
    return int(n.max()) if n.numel() else 0


class _SortedPool(nn.Module):
    """Shared forward / pool of the pools over sorted features; subclasses define `coefficients`."""

    def coefficients(self, lengths: torch.Tensor, K: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, K) weight of each rank for sets of sizes lengths (B,); fixed pools build them in ``dtype``
        (float64 for float64 features), GPO in its parameters' dtype."""
        raise NotImplementedError

    @staticmethod
    def _weights_dtype(features: torch.Tensor) -> torch.dtype:
        return torch.float64 if features.dtype == torch.float64 else torch.float32

    def forward(self, features: torch.Tensor, lengths: torch.Tensor):
        """features (B, K, D), lengths (B,) int or float (whole numbers, 1..K, any order).
        Returns (pooled (B, D) in features.dtype, weights (B, L, 1)), L = max(lengths) (0 when B = 0).
        Validates lengths on the host (one sync), like the published module."""
        check_gpo_pool_inputs(features, lengths, validate=True)
        n = _lengths_as_long(lengths)
        longest = _longest(n)
        weights = self.coefficients(n, longest, self._weights_dtype(features))
        return self._pool_checked(features, n, weights), weights.unsqueeze(-1)

    def _pool_checked(self, features: torch.Tensor, n: torch.Tensor, weights: torch.Tensor = None,
                      backend: str = "auto") -> torch.Tensor:
        """pooled (B, D) of checked inputs: n (B,) long, weights (B, >= max(n)) from ``coefficients``
        (None: computed here); ``backend`` that of gpo_pool."""
        if weights is None:
            weights = self.coefficients(n, features.shape[1], self._weights_dtype(features))
        return gpo_pool(features, n, weights, backend=backend, validate=False)

    def pool(self, features: torch.Tensor, lengths: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
        """No-sync path: features (B, K, D), lengths (B,) on the features' device -> pooled (B, D).
        On a GPU the lengths are trusted (not range-checked: that would read them on the host); on the
        CPU, where the torch path reads them on the host anyway, they are checked as in forward.
        ``backend``: gpo_pool's, for the sort-and-weighted-sum (MaxPool and KMaxPool use torch ops)."""
        check_gpo_pool_inputs(features, lengths, backend=backend, validate=_pool_ops._sorts_by_length(features))
        return self._pool_checked(features, _lengths_as_long(lengths), backend=backend)



class GPO(_SortedPool):
    """Generalized Pooling Operator. Args: d_pe (even), d_hidden; table_backend (keyword, ours): how the
    coefficient table is computed: "triton" (one fused GRU kernel for every size, d_hidden <= 32),
    "torch" (one packed GRU call) or "auto" (Triton for CUDA parameters and d_hidden <= 32, torch otherwise).
    Parameters: gru (nn.GRU(d_pe, d_hidden, bidirectional, batch_first)), linear (d_hidden -> 1, no bias).

    forward(features (B, K, D), lengths (B,)) -> (pooled (B, D), weights (B, L, 1)), L = max(lengths).
    pool(features, lengths) -> pooled (B, D), without host syncs.

    Eval-mode table cache: in eval mode with no gradient to the parameters needed, the coefficient
    table is kept and reused. It is keyed on table_backend and each parameter's device, dtype,
    storage and version counter, so it is rebuilt after any change made through autograd-visible
    in-place ops (``p.mul_()`` under no_grad, ``p.detach().copy_()``, ``nn.init.*``), optimizer
    steps (any torch.optim optimizer's step, fused ones included, which do not bump versions),
    ``load_state_dict``, moving or casting the module (``.to``, ``.double()``), assigning a new
    parameter, or forward (pre-)hooks added to or removed from ``gru``/``linear``. Training mode never
    uses the cache, and ``train()`` drops it; parameters created under inference mode (no version
    counter) are never cached.
    NOT detected: writes through ``p.data`` (``p.data.mul_()``, ``p.data.copy_()``: ``.data`` has its
    own version counter) or through memory shared outside torch (numpy views): call
    ``clear_cache()`` after such writes.
    """

    def __init__(self, d_pe: int = 32, d_hidden: int = 32, *, table_backend: str = "auto"):
        super().__init__()
        if d_pe % 2:
            raise ValueError(f"GPO needs an even d_pe for sin/cos position encodings, got d_pe={d_pe}")
        if table_backend not in TABLE_BACKENDS:
            raise ValueError(f"unknown table_backend {table_backend!r}; choose one of {TABLE_BACKENDS}")
        self.d_pe, self.d_hidden = d_pe, d_hidden
        self.table_backend = table_backend
        self.gru = nn.GRU(d_pe, d_hidden, 1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(d_hidden, 1, bias=False)
        self._pe_cache = {}  # (device, length) -> (length, d_pe) float32
        self._eval_cache = None  # (key, table (M, M)) over sizes 1..M
        self.table_builds = 0  # how many coefficient tables were computed (observable cache behaviour)

    # -- coefficients -------------------------------------------------------------------------
    def _positional_encoding(self, length: int, device) -> torch.Tensor:
        key = (device, length)
        if key not in self._pe_cache:
            with torch.inference_mode(False):  # a cached inference tensor could not be saved for backward later
                self._pe_cache[key] = positional_encoding_1d(self.d_pe, length, device)
        return self._pe_cache[key]

    def _coefficient_table(self, sizes: torch.Tensor, longest: int, device_sizes: torch.Tensor) -> torch.Tensor:
        """Coefficients (S, longest) of the set sizes `sizes` (S,), a CPU int64 tensor in descending order,
        each <= longest: row i = softmax over positions of the GPO scores of a set of size sizes[i],
        exactly 0 at positions >= sizes[i]. `device_sizes`: the same sizes on the parameters' device.
        One packed bidirectional GRU call over the S prefixes pe[0..n-1] (sizes known on the host:
        no device sync)."""
        self.table_builds += 1
        device, dtype = self._param_device_dtype()
        pe = self._positional_encoding(longest, device)
        with torch.autocast(device.type, enabled=False):  # the parameters' dtype, as the Triton table (fp32)
            return torch_coefficient_table(pe, self.gru, self.linear, sizes, device_sizes, dtype)

    def _param_device_dtype(self):
        """Device and dtype of the GRU's parameters (of the linear layer's, or the default, without)."""
        for p in (*self.gru.parameters(), *self.linear.parameters()):
            return p.device, p.dtype
        return torch.device("cpu"), torch.get_default_dtype()

    def _use_triton_table(self) -> bool:
        """The fused table reads the weights of gru and linear; a wrapped, quantized or hooked layer is
        called instead (the torch table), as the published GPO calls them. table_backend="triton" with
        such a layer is an error."""
        plain = _reads_weights_as_called(self.gru, nn.GRU) and _reads_weights_as_called(self.linear, nn.Linear)
        if self.table_backend == "triton" and not plain:
            raise TypeError("table_backend='triton' reads the weights of a plain nn.GRU and nn.Linear without hooks "
                            f"(prune/weight_norm/spectral_norm allowed); got {type(self.gru).__name__} and "
                            f"{type(self.linear).__name__} with hooks or wrappers: use table_backend 'torch' or 'auto'")
        return plain and use_triton_table(self.gru, self.table_backend)

    def _table_over_all_sizes(self, K: int) -> torch.Tensor:
        """(K, K): row n-1 = coefficients of a set of size n, for n = 1..K. On the Triton path one fused
        kernel runs both GRU directions of all K prefixes; otherwise one packed GRU call."""
        device = self._param_device_dtype()[0]
        if self._use_triton_table():
            self.table_builds += 1
            _recompute_hooked_weights(self.linear, self.gru)
            return triton_coefficient_table(self._positional_encoding(K, device), self.gru, self.linear.weight)
        device_sizes = torch.arange(K, 0, -1, device=device)
        return self._coefficient_table(torch.arange(K, 0, -1), K, device_sizes).flip(0)

    def clear_cache(self) -> None:
        """Drop the eval-mode coefficient table; the next eval call rebuilds it. Needed only after
        parameter writes the cache cannot see (``p.data`` writes: see the class docstring)."""
        self._eval_cache = None

    def train(self, mode: bool = True):
        if mode:  # eval -> train -> eval (a training epoch) always rebuilds, whatever updated the parameters
            self._eval_cache = None
        return super().train(mode)

    def _cache_key(self):
        """What the table depends on. The cache entry holds the tensors themselves, so their ids and
        storages cannot be reused by a replacement while it is kept."""
        tensors = list(self.parameters()) + list(self.buffers())
        hooks = tuple(tuple(hook_dict) for m in (self.gru, self.linear)
                      for hook_dict in (m._forward_pre_hooks, m._forward_hooks))
        return (self.table_backend, _optimizer_steps[0], hooks) + tuple(
            (id(t), t.device, t.dtype, t.data_ptr(), t._version) for t in tensors), tensors

    def _cache_usable(self) -> bool:
        if self.training:
            return False
        params = list(self.parameters())
        if any(p.is_inference() for p in params):  # no version counter: in-place changes would go unseen
            return False
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in params))

    def _full_table(self, K: int) -> torch.Tensor:
        """(K', K') table over every size 1..K' (K' >= K; rows/columns beyond K unused)."""
        if not self._cache_usable():
            return self._table_over_all_sizes(K)
        key, tensors = self._cache_key()
        if self._eval_cache is not None:
            cached_key, table, _ = self._eval_cache
            if cached_key == key and table.shape[0] >= K:
                return table
        with torch.no_grad():
            table = self._table_over_all_sizes(K)
        self._eval_cache = (key, table, tensors)
        return table

    def coefficients(self, lengths: torch.Tensor, K: int, dtype: torch.dtype = None) -> torch.Tensor:
        """No-sync coefficients (B, K) for lengths (B,) (int or float, trusted to be in 1..K):
        row b = the GPO weights of a set of size lengths[b], zero at positions >= lengths[b]; in the
        parameters' dtype (``dtype`` is not used). Gathered from a table over every size 1..K, except
        on the CPU above K = ALL_SIZES_MAX_K, where the sizes present are built (see _only_sizes_present)."""
        n = _lengths_as_long(lengths)
        if self._only_sizes_present(n, K):  # lengths on the CPU: reading them costs no sync
            longest = _longest(n)
            return nn.functional.pad(self._table_of_sizes_present(n, longest), (0, K - longest))
        table = self._full_table(K)
        return table.index_select(0, (n - 1).clamp(0, K - 1))[:, :K]

    def _only_sizes_present(self, n: torch.Tensor, K: int) -> bool:
        """Whether to build the coefficients of the sizes in n only, not of every size 1..K: for K above
        ALL_SIZES_MAX_K with the lengths and the torch table on the CPU (above CACHED_ALL_SIZES_MAX_K
        when the eval cache keeps the table, built once: 0.7 s at K = 512). A table over every size runs
        the GRU over K (K + 1) / 2 positions: at K = 512 with gradients about 90 s on a 2-core CPU
        against 2 s for 128 sets of random sizes; at K = 1000 (a long caption) 14 s where the published
        module takes 0.2 s. The sizes present cost at most what the published per-set GRU costs."""
        if not (K > ALL_SIZES_MAX_K and n.numel() and n.device.type == "cpu") or self._use_triton_table():
            return False
        return K > CACHED_ALL_SIZES_MAX_K or not self._cache_usable()  # a cached table is built once

    def _table_of_sizes_present(self, n: torch.Tensor, longest: int) -> torch.Tensor:
        """(B, longest): row b = the coefficients of a set of size n[b], from one packed GRU call over the
        distinct sizes of n (read on the host)."""
        sizes, inverse = torch.unique(n.cpu(), return_inverse=True)  # ascending
        sizes = sizes.flip(0)
        table = self._coefficient_table(sizes, longest, sizes.to(self._param_device_dtype()[0]))  # descending size
        return table[(sizes.shape[0] - 1 - inverse).to(table.device)]

    def compute_pool_weights(self, lengths: torch.Tensor, features: torch.Tensor = None):
        """Published API: (weights (B, L, 1), mask (B, L, 1) bool), L = max(lengths) (0 when B = 0),
        for lengths (B,) int or float whole numbers >= 1 (<= K of ``features`` when given; the published
        code does not use them). Syncs with the host; bad lengths raise TypeError/ValueError."""
        check_lengths_tensor(lengths)
        if lengths.numel():
            check_length_values(lengths, features.shape[1] if isinstance(features, torch.Tensor) else None)
        return self._weights_and_mask(lengths)

    def _weights_and_mask(self, lengths: torch.Tensor):
        n = _lengths_as_long(lengths)
        longest = _longest(n)
        if n.numel() == 0:  # empty batch: no table to build
            device, dtype = self._param_device_dtype()
            weights = torch.zeros((0, 0), device=device, dtype=dtype)
        elif self._cache_usable() and not self._only_sizes_present(n, longest):
            weights = self._full_table(longest).index_select(0, n - 1)[:, :longest]
        elif self._use_triton_table():  # every size 1..longest in one kernel
            weights = self._table_over_all_sizes(longest).index_select(0, n - 1)
        else:  # once per distinct length (reads the lengths on the host; allowed here)
            weights = self._table_of_sizes_present(n, longest)
        mask = torch.arange(longest, device=n.device) < n.unsqueeze(1)
        return weights.unsqueeze(-1), mask.unsqueeze(-1)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor):
        """features (B, K, D), lengths (B,) int or float (whole numbers in 1..K, any order).
        Returns (pooled (B, D), weights (B, L, 1) float32 for float32 parameters). As published, pooled
        has the promoted dtype of features and weights: float32 for bf16/fp16 features (their values
        taken exactly; the encoders' ``pool`` keeps the features' dtype instead)."""
        check_gpo_pool_inputs(features, lengths, validate=True)
        weights, _ = self._weights_and_mask(lengths)
        pooled_dtype = torch.promote_types(features.dtype, weights.dtype)
        pooled = gpo_pool(features.to(pooled_dtype), _lengths_as_long(lengths), weights.squeeze(-1), validate=False)
        return pooled, weights

    def extra_repr(self) -> str:
        return f"d_pe={self.d_pe}, d_hidden={self.d_hidden}"


class AvgPool(_SortedPool):
    """Mean over the n valid set elements (weight 1/n at every rank < n)."""

    def coefficients(self, lengths: torch.Tensor, K: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n = _lengths_as_long(lengths).unsqueeze(1)
        ranks = torch.arange(K, device=lengths.device)
        return (ranks < n).to(dtype) / n.clamp(min=1).to(dtype)


def _mean_of_top(features: torch.Tensor, n: torch.Tensor, k: int) -> torch.Tensor:
    """(B, D) mean of the top min(k, n_b) of the n_b valid values of each feature of set b, accumulated
    in float32 (float64 for float64 features), returned in features.dtype. Unlike a weighted sum over
    every rank (gpo_pool), the ranks past min(k, n_b) are left out, not multiplied by 0: 0 * inf would
    make the max of [5, -inf, 1] NaN. A NaN among the valid values gives NaN (sorted first); padding
    never reaches the result or the gradient (a stable sort keeps valid -inf ahead of the padding)."""
    ranks = torch.arange(features.shape[1], device=features.device)
    padding = (ranks >= n.unsqueeze(1)).unsqueeze(-1)
    k = min(k, features.shape[1])
    top = features.masked_fill(padding, float("-inf")).sort(dim=1, descending=True, stable=True).values[:, :k]
    count = n.clamp(max=k)
    accumulate = torch.float64 if features.dtype == torch.float64 else torch.float32
    kept = torch.where((ranks[:k] < count.unsqueeze(1)).unsqueeze(-1), top.to(accumulate), 0)
    return (kept.sum(1) / count.unsqueeze(1).to(accumulate)).to(features.dtype)


class MaxPool(_SortedPool):
    """Maximum over the n valid set elements per feature (weight 1 at rank 0). Pooled without the
    zero-weight ranks, so that an inf among the values gives the maximum, not 0 * inf = NaN."""

    def coefficients(self, lengths: torch.Tensor, K: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        ranks = torch.arange(K, device=lengths.device)
        return (ranks == 0).to(dtype).expand(lengths.shape[0], K)

    def _pool_checked(self, features: torch.Tensor, n: torch.Tensor, weights: torch.Tensor = None,
                      backend: str = "auto") -> torch.Tensor:
        return _mean_of_top(features, n, 1)


class KMaxPool(_SortedPool):
    """Mean of the top min(k, n) values per feature (weight 1/min(k, n) at ranks < min(k, n)). Pooled
    without the zero-weight ranks, as MaxPool."""

    def __init__(self, k: int):
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"KMaxPool needs an integer k >= 1, got {k!r}")
        self.k = k

    def coefficients(self, lengths: torch.Tensor, K: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        top = _lengths_as_long(lengths).clamp(min=1, max=self.k).unsqueeze(1)
        ranks = torch.arange(K, device=lengths.device)
        return (ranks < top).to(dtype) / top.to(dtype)

    def _pool_checked(self, features: torch.Tensor, n: torch.Tensor, weights: torch.Tensor = None,
                      backend: str = "auto") -> torch.Tensor:
        return _mean_of_top(features, n, self.k)

    def extra_repr(self) -> str:
        return f"k={self.k}"
