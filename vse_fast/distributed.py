"""Multi-process training helpers: process-group set-up, an autograd-aware all-gather, the
global-negatives contrastive loss and a resumable, rank-split batch order.

One process per device, launched by ``torchrun`` (it sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT). Without those variables everything here degrades to a single process:
``init_distributed()`` returns a disabled context, ``all_gather_with_grad`` is the identity and
``global_contrastive_loss`` is the plain batch loss.

Gradient bookkeeping for global negatives (see docs/distributed.md)::

    global loss L = sum_r L_r,   L_r = t2i(im=img_global, s=cap_r, positives=offset_r + arange(B_r))
                                     + t2i(im=cap_global, s=img_r, positives=offset_r + arange(B_r))

The backward of the all-gather sums, over ranks, the gradient each rank's loss sends to every
gathered row (a reduce-scatter), so rank r's embeddings receive dL/d(emb_r) of the WHOLE global
loss. DDP then averages parameter gradients over ranks; multiplying the loss by the world size
before backward (``loss_scale(ctx)``) turns that average into the sum, which equals the gradient
of one process holding the whole global batch.
"""
from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch
import torch.distributed as dist

__all__ = [
    "DistContext",
    "init_distributed",
    "cleanup_distributed",
    "all_gather_with_grad",
    "global_contrastive_loss",
    "ItemPairing",
    "item_pairing",
    "loss_scale",
    "all_reduce_sum",
    "all_gather_object",
    "barrier",
    "epoch_permutation",
    "EpochBatchSampler",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its node,
    the ``device`` it computes on, ``is_main`` (rank 0: logging, progress, checkpoints) and
    ``enabled`` (a process group is initialised and world_size > 1), ``owns_group`` (this context
    initialised it: ``cleanup_distributed`` destroys only such a group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    is_main: bool = True
    enabled: bool = False
    owns_group: bool = False


def _env_int(name: str, default: Optional[int]) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _pick_device(device, local_rank: int, distributed: bool, local_world_size: Optional[int] = None) -> torch.device:
    """The process's device: "auto"/None is cuda:LOCAL_RANK under torchrun (the current CUDA device
    alone), else cpu; "cuda" is cuda:LOCAL_RANK under torchrun. ValueError for a GPU that is not there,
    and for one numbered GPU that several processes of a node would share (NCCL refuses that)."""
    if device is None or device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        device = "cuda" if distributed else f"cuda:{torch.cuda.current_device()}"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
        if distributed and device.index is None:
            device = torch.device("cuda", local_rank)
        elif distributed and (local_world_size or 1) > 1:
            raise ValueError(f"device {str(device)!r} names one GPU for all {local_world_size} processes of this node: "
                             "pass --device cuda (each process takes cuda:LOCAL_RANK)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {str(device)!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible"
                + (f" (LOCAL_RANK={local_rank}: launch at most that many processes per node)" if distributed else "")
            )
    return device


def init_distributed(device=None, backend: Optional[str] = None, timeout_minutes: float = 30.0) -> DistContext:
    """Initialise the default process group from torchrun's environment, or describe a single process.

    Args:
        device: "auto"/None (cuda:LOCAL_RANK when CUDA is available, else cpu), or a device string.
        backend: None picks "nccl" for CUDA devices and "gloo" for CPU.
        timeout_minutes: collective timeout (rank 0 evaluates while the others wait at a barrier).

    Returns:
        DistContext. A process group that is already initialised (e.g. by a test) is reused.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
        local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid RANK={rank} / WORLD_SIZE={world_size} in the environment")
    distributed = world_size > 1
    dev = _pick_device(device, local_rank, distributed, _env_int("LOCAL_WORLD_SIZE", None))
    if not distributed:
        return DistContext(0, 1, 0, dev, True, False)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this build")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns_group = not dist.is_initialized()
    if owns_group:
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise ValueError(f"WORLD_SIZE={world_size} but {var} is not set: launch with torchrun")
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            **({"device_id": dev} if dev.type == "cuda" else {}),
        )
    return DistContext(rank, world_size, local_rank, dev, rank == 0, True, owns_group)


def cleanup_distributed(ctx: DistContext) -> None:
    """Destroy the process group if this context initialised one (a group the caller initialised is
    left to the caller). Unreachable DDP wrappers (which hold the group and its gloo work objects) are
    collected first: left to interpreter shutdown, gloo's worker threads can abort the process
    ("terminate called without an active exception")."""
    if ctx.owns_group and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


# torch >= 2.12 renamed the flat collectives; the GPU machine may run an older torch.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class AllGatherWithGrad(torch.autograd.Function):
    """y = cat([x_0, ..., x_{W-1}], dim=0) over the ranks of ``group``; every x_r has the same shape
    and dtype. Not checked (a check would cost a collective per call): a mismatch fails inside the
    collective (gloo aborts the processes; NCCL may hang or read garbage). The trainer's equal
    per-rank batches always match.

    Backward: dx_r = sum_q dy_q[r*B:(r+1)*B] (a reduce-scatter with SUM), i.e. rank r's rows
    receive the gradient that every rank's loss sent to them.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        world = dist.get_world_size(group)
        ctx.group = group
        x = x.contiguous()
        out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
        _all_gather_flat(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        world = dist.get_world_size(ctx.group)
        grad_out = grad_out.contiguous()
        grad_in = grad_out.new_empty((grad_out.shape[0] // world,) + tuple(grad_out.shape[1:]))
        _reduce_scatter_flat(grad_in, grad_out, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad_in, None


def all_gather_with_grad(x: torch.Tensor, ctx: Optional[DistContext] = None, group=None) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from all ranks along dim 0 -> (W*B, ...), differentiable.

    Every rank must pass the same shape (the batch sampler drops the ragged last batch so they do).
    Rank r's rows sit at [r*B, (r+1)*B). Identity in a single process.
    """
    if ctx is not None and not ctx.enabled:
        return x
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return x
    return AllGatherWithGrad.apply(x, group)


def loss_scale(ctx: DistContext) -> float:
    """Factor for the loss before backward so DDP's gradient AVERAGE equals the single-process sum."""
    return float(ctx.world_size)


def global_contrastive_loss(
    img_emb: torch.Tensor,
    cap_emb: torch.Tensor,
    ctx: DistContext,
    *,
    margin: float,
    max_violation: bool,
    local_negatives: bool = False,
    backend: str = "auto",
    pairing: Optional["ItemPairing"] = None,
) -> torch.Tensor:
    """This rank's share of the VSE loss (reduction "sum"), so that sum over ranks = global loss.

    Args:
        img_emb, cap_emb: (B_local, E) embeddings of this rank's pairs (row i of each is a positive pair);
            B_local, E and the dtype must be the same on every rank (see AllGatherWithGrad).
        ctx: the DistContext. Single process (``ctx.enabled`` False): the published batch loss.
        margin, max_violation: VSE margin; VSE++ hardest negatives (True) or VSE0 sum (False).
        local_negatives: True = each rank's loss uses only its own batch as negatives (no communication).
        backend: passed to ``vse_fast.ops.contrastive.contrastive_loss``.
        pairing: None (published: row i of img_emb is caption i's own image copy, every other row and
            caption a negative), or an ``ItemPairing`` (``item_pairing``) of the batch the loss sees: the
            global batch (rows in rank order) under global negatives, else the local one. Then each item
            enters once (its first row) and captions of one item are not negatives of each other.

    Global negatives: all-gather both modalities with gradient (one all-gather per modality forward,
    a reduce-scatter backward; nothing of size B^2 is communicated) and compute, for the local rows
    against the global columns, t2i(im=img_g, s=cap_local) + t2i(im=cap_g, s=img_local) with
    positives = rank * B_local + arange(B_local). Summed over ranks this equals the loss of one
    process on the concatenated batch, and so do the gradients reaching each rank's embeddings.
    Scale by ``loss_scale(ctx)`` before backward under DDP (see the module docstring).
    """
    from vse_fast.ops.contrastive import contrastive_loss

    if img_emb.dim() != 2 or cap_emb.dim() != 2 or img_emb.shape != cap_emb.shape:
        raise ValueError(
            f"img_emb and cap_emb must both be (B, E) with the same shape, got "
            f"{tuple(img_emb.shape)} and {tuple(cap_emb.shape)}"
        )
    single = not ctx.enabled or local_negatives
    if pairing is not None:
        rows = img_emb.shape[0] * (1 if single else ctx.world_size)
        if pairing.positives.shape != (rows,):
            raise ValueError(f"the item pairing covers {tuple(pairing.positives.shape)} captions, the loss sees "
                             f"{rows} ({'local' if single else 'global'} batch)")
    if single:
        if pairing is None:
            return contrastive_loss(img_emb, cap_emb, margin=margin, max_violation=max_violation, backend=backend)
        return contrastive_loss(img_emb.index_select(0, pairing.keep), cap_emb, margin=margin,
                                max_violation=max_violation, positives=pairing.positives, backend=backend)
    img_global = all_gather_with_grad(img_emb, ctx)
    cap_global = all_gather_with_grad(cap_emb, ctx)
    n_local = img_emb.shape[0]
    if pairing is not None:
        # t2i for this rank's captions against every distinct item; the i2t term of a caption needs its item's
        # row against ALL captions, so each rank computes the whole batch's i2t term and keeps 1/world of it
        # (the all-gather's backward sums the ranks' gradients: together, exactly the global i2t gradient).
        items = img_global.index_select(0, pairing.keep)
        own = pairing.positives[ctx.rank * n_local:(ctx.rank + 1) * n_local]
        kw = dict(margin=margin, max_violation=max_violation, backend=backend)
        return (contrastive_loss(items, cap_emb, positives=own, terms="t2i", **kw)
                + contrastive_loss(items, cap_global, positives=pairing.positives, terms="i2t", **kw) / ctx.world_size)
    positives = torch.arange(n_local, device=img_emb.device) + ctx.rank * n_local
    kw = dict(margin=margin, max_violation=max_violation, positives=positives, terms="t2i", backend=backend)
    return contrastive_loss(img_global, cap_emb, **kw) + contrastive_loss(cap_global, img_emb, **kw)


@dataclass(frozen=True)
class ItemPairing:
    """How a batch's pairs map onto its distinct items (images, videos) when an item can come with several
    of its captions in one batch (``--dedupe_items``; ``item_pairing`` builds it).

    keep: (U,) int64, the batch row of each distinct item's first pair, in batch order.
    positives: (B,) int64, for each pair's caption, the index into ``keep`` of its item.
    """

    keep: torch.Tensor
    positives: torch.Tensor

    def to(self, device: torch.device) -> "ItemPairing":
        non_blocking = torch.device(device).type == "cuda"
        return ItemPairing(self.keep.to(device, non_blocking=non_blocking),
                           self.positives.to(device, non_blocking=non_blocking))


def item_pairing(items) -> ItemPairing:
    """The ``ItemPairing`` of a batch whose pair j shows item ``items[j]`` ((B,) ints; on the host, where
    the loader's batch is, so the trainer's step needs no device synchronisation)."""
    items = torch.as_tensor(items)
    if items.dim() != 1 or items.numel() == 0 or items.dtype.is_floating_point or items.dtype == torch.bool:
        raise ValueError(f"items must be a non-empty 1-D integer tensor, got {items.dtype} {tuple(items.shape)}")
    items = items.cpu().long()
    rows = torch.arange(items.numel())
    distinct, item_of_row = torch.unique(items, return_inverse=True)
    first_row = torch.full((distinct.numel(),), items.numel()).scatter_reduce_(0, item_of_row, rows, "amin")
    order = torch.argsort(first_row)  # the distinct items in the order of their first pair
    slot = torch.empty_like(order)
    slot[order] = torch.arange(order.numel())
    return ItemPairing(keep=first_row[order], positives=slot[item_of_row])


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``t`` over ranks (a copy; identity in a single process). For logging, not for gradients."""
    if not ctx.enabled:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj, ctx: DistContext) -> list:
    """Picklable ``obj`` from every rank, as a list indexed by rank ([obj] in a single process)."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        if ctx.device.type == "cuda":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


# ----------------------------------------------------------------------------- batch order


def epoch_permutation(n_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of ``n_items`` for ``epoch``: a function of (seed, epoch) only, so a resumed
    run, and a run under any number of processes, see the same order."""
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(epoch) * 7919 + 12345) % (2**63 - 1))
    return torch.randperm(n_items, generator=g)


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of dataset indices for one rank: a DistributedSampler-equivalent with a global batch.

    Step s of an epoch takes the global batch ``perm[s*G:(s+1)*G]`` (G = ``global_batch``) of
    ``epoch_permutation(n_items, seed, epoch)``, and rank r gets its slice
    ``[r*G/W, (r+1)*G/W)``. The ragged tail (n_items % G) is dropped (published drop_last=True), so
    every rank runs the same number of equally-sized steps, and the concatenation of the ranks'
    batches is exactly the single-process batch. ``start_step`` skips batches already consumed
    (mid-epoch resume).
    """

    def __init__(self, n_items: int, global_batch: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, epoch: int = 0, start_step: int = 0):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank={rank} for world_size={world_size}")
        if global_batch < 1 or global_batch % world_size:
            raise ValueError(
                f"batch size {global_batch} must be a positive multiple of the number of processes {world_size}"
            )
        if n_items < global_batch:
            raise ValueError(
                f"the training split has {n_items} items, fewer than one batch of {global_batch}: lower --batch_size"
            )
        self.n_items, self.global_batch = int(n_items), int(global_batch)
        self.rank, self.world_size, self.seed = rank, world_size, int(seed)
        self.local_batch = global_batch // world_size
        self._perm, self._perm_key = None, None
        self.set_epoch(epoch, start_step)

    @property
    def steps_per_epoch(self) -> int:
        return self.n_items // self.global_batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step={start_step} outside [0, {self.steps_per_epoch}]")
        self.epoch, self.start_step = int(epoch), int(start_step)

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def _permutation(self) -> torch.Tensor:
        """``epoch_permutation`` of the current epoch, drawn once per epoch."""
        if self._perm_key != (self.seed, self.epoch):
            self._perm, self._perm_key = epoch_permutation(self.n_items, self.seed, self.epoch), (self.seed, self.epoch)
        return self._perm

    def global_indices(self, step: int) -> torch.Tensor:
        """(global_batch,) int64: the dataset indices of step ``step`` of the current epoch over all ranks,
        in rank order (rank r's batch is rows [r*G/W, (r+1)*G/W))."""
        if not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"step {step} outside [0, {self.steps_per_epoch})")
        return self._permutation()[step * self.global_batch:(step + 1) * self.global_batch]

    def __iter__(self) -> Iterator[List[int]]:
        perm = self._permutation()
        lo = self.rank * self.local_batch
        for step in range(self.start_step, self.steps_per_epoch):
            start = step * self.global_batch + lo
            yield perm[start:start + self.local_batch].tolist()
