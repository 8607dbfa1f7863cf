"""Gradient caching: one optimizer step on a batch whose activations do not fit, encoded in chunks.

The VSE loss needs every embedding of the batch at once (hardest negatives over the whole batch),
but only the embeddings: (B, E) floats. So (Gao et al., "Scaling Deep Contrastive Learning Batch Size
under Memory Limited Setup", 2021):

1. encode every chunk without autograd, keeping the RNG state each chunk started from;
2. the loss over the whole batch (all negatives) on the concatenated embeddings, backward to the
   embeddings only: d_img, d_cap (B, E);
3. encode each chunk again with autograd from its saved RNG state (same dropout masks) and
   backpropagate that chunk's rows of d_img / d_cap into the parameters (gradients accumulate).

The gradients equal those of the unchunked step on the same encoder outputs, so without dropout and
BatchNorm the step equals the unchunked step to float rounding. Differences by construction:

- dropout draws its masks per chunk (a chunk of n pairs draws what a batch of n would);
- BatchNorm (the region encoder's MLP) normalises each chunk with that chunk's statistics, as each
  process's local batch under DDP does, and its running statistics are updated once per chunk
  (the first pass restores them);
- each chunk is padded to its own longest set and caption, as the published collate pads a batch.

Memory: the activations of one chunk plus O(B E) embeddings and their gradients; compute: about one
extra forward per step (the first pass).
"""
from __future__ import annotations

import contextlib

import torch

from vse_fast import distributed as vdist


def split_batch(batch: dict, chunk_size: int) -> list:
    """Rows [i, i + chunk_size) of a collated CPU batch (images, img_lengths, captions, cap_lengths,
    any other per-row tensors), each chunk cut to its own longest set and caption. A last chunk of
    one pair joins the one before it (chunk_size + 1 pairs): cut to its own set size, a lone pair
    with a one-row set would give BatchNorm one value per channel, which it rejects in training."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if batch["img_lengths"].is_cuda or batch["cap_lengths"].is_cuda:
        raise ValueError("split_batch takes the loader's CPU batch (trimming reads the lengths on the host)")
    size = batch["images"].shape[0]
    bounds = list(range(0, size, chunk_size)) + [size]
    if chunk_size > 1 and len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    chunks = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        rows = slice(start, stop)
        chunk = {k: v[rows] if torch.is_tensor(v) else v for k, v in batch.items()}
        chunk["images"] = chunk["images"][:, : int(chunk["img_lengths"].max())]
        chunk["captions"] = chunk["captions"][:, : int(chunk["cap_lengths"].max())]
        chunks.append(chunk)
    return chunks


def encode(model, batch: dict, precision: str = "fp32"):
    """(img_emb, cap_emb) of a batch under the run's autocast precision."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.autocast(batch["images"].device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        return model(batch["images"], batch["img_lengths"], batch["captions"], batch["cap_lengths"])


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _batchnorm_buffers(model) -> list:
    return [b for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            for b in m.buffers()]


def cached_backward(model, chunks: list, scaler, ctx: vdist.DistContext, *, margin: float, max_violation: bool,
                    local_negatives: bool = False, precision: str = "fp32", loss_backend: str = "auto",
                    pairing=None):
    """Steps 1-3 of the module docstring for one (local) batch given as ``chunks`` (``split_batch``,
    on the device). Leaves the parameters' gradients (scaled by ``scaler`` and ``loss_scale(ctx)``,
    as ``loss.backward()`` of the unchunked step would) for the optimizer step. ``pairing``: the batch's
    ``vse_fast.distributed.ItemPairing`` (or None), as for ``global_contrastive_loss``. ``model`` may be
    wrapped in DistributedDataParallel: only the last chunk's backward all-reduces.

    Returns (loss, img_emb, cap_emb): the loss (0-d fp32, this rank's share, reduction "sum") and the
    batch's embeddings (B_local, E), detached."""
    device = chunks[0]["images"].device
    buffers = _batchnorm_buffers(model)
    saved_buffers = [b.clone() for b in buffers]
    states, img_parts, cap_parts = [], [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(_rng_state(device))
            img, cap = encode(model, chunk, precision)
            img_parts.append(img.float())
            cap_parts.append(cap.float())
    for b, saved in zip(buffers, saved_buffers):  # the second pass updates the running statistics
        b.copy_(saved)
    img_emb = torch.cat(img_parts).requires_grad_()
    cap_emb = torch.cat(cap_parts).requires_grad_()
    loss = vdist.global_contrastive_loss(img_emb, cap_emb, ctx, margin=margin, max_violation=max_violation,
                                         local_negatives=local_negatives, backend=loss_backend, pairing=pairing)
    scaler.scale(loss * vdist.loss_scale(ctx)).backward()
    d_img, d_cap = img_emb.grad, cap_emb.grad
    start = 0
    for k, (chunk, state) in enumerate(zip(chunks, states)):
        rows = slice(start, start + chunk["images"].shape[0])
        start = rows.stop
        last = k == len(chunks) - 1
        no_sync = model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext()
        _set_rng_state(state, device)
        with no_sync:
            img, cap = encode(model, chunk, precision)
            torch.autograd.backward([img.float(), cap.float()], [d_img[rows], d_cap[rows]])
    return loss.detach(), img_emb.detach(), cap_emb.detach()
