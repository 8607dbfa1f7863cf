"""Gradient caching (``--chunk_size``, vse_fast.grad_cache): chunked steps against their exact references.

- BN-free, dropout-free model: the chunked step equals the unchunked step (loss, every gradient), both
  through an enabled GradScaler.
- BatchNorm (train mode) and dropout on: the chunked gradients equal those of encoding the same chunks
  WITH autograd from the same RNG stream (same dropout masks, per-chunk BN statistics), and the BN
  running statistics are updated once per chunk, not twice.
The DDP case (no_sync on all but the last chunk) is in tests/test_distributed.py.
"""
import os

import pytest
import torch

from tests.tiny_data import random_batch, tiny_synthetic, write_tiny_bert_config
from vse_fast import grad_cache, train
from vse_fast.distributed import DistContext, global_contrastive_loss
from vse_fast.model import build_model

pytestmark = pytest.mark.usefixtures("cpu_runs")  # training and evaluation on the CPU, GPU or not


def _model(tmp_path, precomp_enc_type, dropout, seed=0):
    config = write_tiny_bert_config(tmp_path / f"bert{dropout}.json", vocab_size=40, dropout=dropout)
    torch.manual_seed(seed)
    return build_model(dict(embed_size=24, img_dim=16, bert_config=config, precomp_enc_type=precomp_enc_type))


def _batch(n, seed):
    return random_batch(n, torch.Generator().manual_seed(seed), max_set=6, max_caption=9)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(actual, expected):
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        atol = max(1e-6, 1e-5 * grad.abs().max().item())  # summation order differs (chunks)
        torch.testing.assert_close(actual[name], grad, rtol=1e-4, atol=atol,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_split_batch_rows_and_per_chunk_padding():
    batch = _batch(7, seed=1)
    batch["index"] = torch.arange(7)
    # the second chunk's longest set and caption below the batch's (the seed's lengths put a full-length
    # set and caption in both chunks, where the cut to each chunk's own longest is a no-op)
    batch["img_lengths"] = torch.tensor([2, 6, 1, 3, 2, 2, 1])
    batch["cap_lengths"] = torch.tensor([9, 4, 8, 3, 5, 7, 4])
    chunks = grad_cache.split_batch(batch, 3)
    assert [c["images"].shape[0] for c in chunks] == [3, 4]  # a last chunk of one pair joins the one before
    assert [c["images"].shape[1] for c in chunks] == [6, 3] and [c["captions"].shape[1] for c in chunks] == [9, 7]
    assert [c["images"].shape[0] for c in grad_cache.split_batch(batch, 2)] == [2, 2, 3]
    assert [c["images"].shape[0] for c in grad_cache.split_batch(batch, 1)] == [1] * 7
    assert [c["images"].shape[0] for c in grad_cache.split_batch(batch, 6)] == [7]
    for i, chunk in enumerate(chunks):
        rows = slice(3 * i, 3 * i + chunk["images"].shape[0])
        k, t = int(batch["img_lengths"][rows].max()), int(batch["cap_lengths"][rows].max())
        assert torch.equal(chunk["images"], batch["images"][rows, :k])
        assert torch.equal(chunk["captions"], batch["captions"][rows, :t])
        assert torch.equal(chunk["index"], batch["index"][rows])
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        grad_cache.split_batch(batch, 0)


@pytest.mark.parametrize("max_violation", [False, True])
def test_chunked_step_equals_the_unchunked_scaled_step_without_dropout_and_bn(tmp_path, max_violation):
    """Under an enabled GradScaler (fp16) both backwards go through scaler.scale: a chunked backward
    without it would leave gradients 1/scale of the unchunked ones once the scaler unscales them."""
    batch = _batch(8, seed=2)
    full, chunked = _model(tmp_path, "backbone", 0.0), _model(tmp_path, "backbone", 0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    loss, img_emb, _ = train.compute_loss(full, batch, DistContext(), margin=0.2, max_violation=max_violation)
    scaler.scale(loss).backward()
    c_loss, c_img, _ = grad_cache.cached_backward(chunked, grad_cache.split_batch(batch, 3), scaler, DistContext(),
                                                  margin=0.2, max_violation=max_violation)
    torch.testing.assert_close(c_loss, loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c_img, img_emb.detach(), rtol=1e-5, atol=1e-6)
    _assert_same_grads(_grads(chunked), _grads(full))


def test_a_lone_pair_with_a_one_row_set_never_forms_a_batchnorm_chunk(tmp_path):
    """Cut to its own set size, a chunk of one pair whose set has one row would give the region MLP's
    BatchNorm one value per channel (an error in training): that pair joins the chunk before it."""
    batch = _batch(5, seed=4)
    batch["img_lengths"] = torch.tensor([2, 6, 1, 3, 1])
    model = _model(tmp_path, "basic", 0.0).train()
    chunks = grad_cache.split_batch(batch, 2)
    assert [c["images"].shape[0] for c in chunks] == [2, 3]
    loss, _, _ = grad_cache.cached_backward(model, chunks, torch.amp.GradScaler("cpu", enabled=False), DistContext(),
                                            margin=0.2, max_violation=True)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("max_violation", [False, True])
def test_chunked_gradients_replay_dropout_and_per_chunk_batchnorm(tmp_path, max_violation):
    batch = _batch(8, seed=3)
    chunks = grad_cache.split_batch(batch, 3)
    reference, chunked = _model(tmp_path, "basic", 0.3), _model(tmp_path, "basic", 0.3)
    reference.train(), chunked.train()
    torch.manual_seed(11)
    parts = [grad_cache.encode(reference, chunk) for chunk in chunks]  # with autograd, one RNG stream
    loss = global_contrastive_loss(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                                   DistContext(), margin=0.2, max_violation=max_violation)
    loss.backward()
    after_reference = torch.get_rng_state()
    torch.manual_seed(11)
    c_loss, _, _ = grad_cache.cached_backward(chunked, chunks, torch.amp.GradScaler("cpu", enabled=False),
                                              DistContext(), margin=0.2, max_violation=max_violation)
    assert torch.equal(torch.get_rng_state(), after_reference)  # the RNG moves as one pass would move it
    torch.testing.assert_close(c_loss, loss.detach(), rtol=1e-5, atol=1e-6)
    _assert_same_grads(_grads(chunked), _grads(reference))
    bn = dict(chunked.named_buffers())
    assert int(bn["img_enc.mlp.bns.0.num_batches_tracked"]) == len(chunks)  # once per chunk, not twice
    for name, buffer in reference.named_buffers():
        torch.testing.assert_close(bn[name], buffer, rtol=1e-5, atol=1e-6, msg=name)


def test_cli_chunk_size_trains_like_the_unchunked_run(tmp_path, capsys):
    """``--chunk_size`` on a BN-free, dropout-free model: same weights as the unchunked run after 3
    steps (AdamW amplifies rounding where a gradient is tiny: atol 2e-5 = 4% of one lr-5e-4 step)."""
    data, vocab_size = tiny_synthetic(tmp_path / "data", seed=1)
    bert_config = write_tiny_bert_config(tmp_path / "bert.json", vocab_size, dropout=0.0)
    args = ["--data_path", data, "--bert_config", bert_config, "--vocab_file", os.path.join(data, "vocab.txt"),
            "--precomp_enc_type", "backbone", "--embed_size", "32", "--batch_size", "40", "--num_epochs", "1",
            "--workers", "0", "--max_steps", "3", "--progress", "off"]
    train.main(args + ["--run_dir", str(tmp_path / "chunked"), "--chunk_size", "16"])
    train.main(args + ["--run_dir", str(tmp_path / "full")])
    from vse_fast.checkpoint import load_checkpoint

    a = load_checkpoint(str(tmp_path / "full" / "last.pth"))
    b = load_checkpoint(str(tmp_path / "chunked" / "last.pth"))
    assert b["config"]["chunk_size"] == 16 and a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-5, atol=2e-5,
                                   msg=lambda m, key=key: f"{key}: {m}")
    for bad in ("0", "1"):
        with pytest.raises(SystemExit):
            train.main(args + ["--run_dir", str(tmp_path / "bad"), "--chunk_size", bad])
        assert f"--chunk_size must be >= 2, got {bad}" in capsys.readouterr().err
