"""Distributed training on CPU (gloo, loopback, 2 processes spawned by the tests).

- The rank-split batch order equals the single-process order.
- all_gather_with_grad: values and the reduce-scatter backward.
- Global negatives: loss and every parameter gradient of a 2-process DDP step equal one process on the
  concatenated batch (VSE0 and VSE++; BatchNorm model in eval mode and a BN-free model in train mode,
  the two comparisons that are exact: train-mode BN uses per-rank batch statistics, see
  docs/distributed.md).
- Gradient caching under DDP (chunks of 1 of each rank's 3 pairs, BN-free model): the same loss and
  gradients as one process on the concatenated batch.
- --dedupe_items (an item with several captions in a batch enters the loss once, its captions are not
  negatives of each other): the loss against a written-out reference; under DDP, global and local
  negatives and gradient caching, equal to one process as above.
- A 2-process torchrun training run stops at --max_steps, resumes in 1 process and ends where a
  1-process run ends.
"""
import gc
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from tests.tiny_data import random_batch, tiny_synthetic, write_tiny_bert_config
from vse_fast import distributed as vdist
from vse_fast.distributed import EpochBatchSampler, epoch_permutation

pytestmark = pytest.mark.usefixtures("cpu_runs")  # training and evaluation on the CPU, GPU or not

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- batch order


@pytest.mark.parametrize("n_items,batch,world", [(23, 6, 2), (40, 12, 3), (7, 7, 1), (64, 8, 4)])
def test_rank_batches_concatenate_to_single_process_batches(n_items, batch, world):
    single = list(EpochBatchSampler(n_items, batch, seed=3, epoch=2))
    ranks = [list(EpochBatchSampler(n_items, batch, rank=r, world_size=world, seed=3, epoch=2)) for r in range(world)]
    assert len(single) == n_items // batch  # ragged tail dropped (published drop_last=True)
    for step, full in enumerate(single):
        assert sum((ranks[r][step] for r in range(world)), []) == full
        assert all(len(ranks[r][step]) == batch // world for r in range(world))
    flat = sum(single, [])
    assert len(set(flat)) == len(flat) and set(flat) <= set(range(n_items))


def test_batch_order_depends_on_seed_and_epoch_only_and_resumes_mid_epoch():
    a = list(EpochBatchSampler(50, 8, seed=1, epoch=0))
    assert a == list(EpochBatchSampler(50, 8, seed=1, epoch=0))
    assert a != list(EpochBatchSampler(50, 8, seed=1, epoch=1))
    assert a != list(EpochBatchSampler(50, 8, seed=2, epoch=0))
    sampler = EpochBatchSampler(50, 8, seed=1)
    sampler.set_epoch(0, start_step=4)
    assert list(sampler) == a[4:] and len(sampler) == len(a) - 4
    sampler.set_epoch(0, start_step=6)  # at the epoch's end (6 steps): nothing left
    assert list(sampler) == [] and len(sampler) == 0
    with pytest.raises(ValueError, match=r"start_step=7 outside \[0, 6\]"):  # not a negative len()
        sampler.set_epoch(0, start_step=7)
    assert torch.equal(epoch_permutation(50, 1, 0), epoch_permutation(50, 1, 0))


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_items=10, global_batch=4, world_size=3), "multiple of the number of processes 3"),
    (dict(n_items=3, global_batch=4), "fewer than one batch of 4"),
    (dict(n_items=10, global_batch=0), "positive multiple"),
    (dict(n_items=10, global_batch=4, rank=2, world_size=2), "invalid rank=2"),
    (dict(n_items=20, global_batch=4, start_step=6), r"start_step=6 outside \[0, 5\]"),
])
def test_sampler_errors_name_the_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EpochBatchSampler(**kwargs)


def test_single_process_context_and_identity_gather(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = vdist.init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.enabled, ctx.is_main) == (0, 1, False, True)
    x = torch.randn(3, 4)
    assert vdist.all_gather_with_grad(x, ctx) is x
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        vdist.init_distributed("cpu")


def test_item_pairing_keeps_each_items_first_row_in_batch_order():
    pairing = vdist.item_pairing(torch.tensor([5, 3, 5, 7, 3, 9]))
    assert pairing.keep.tolist() == [0, 1, 3, 5]
    assert pairing.positives.tolist() == [0, 1, 0, 2, 1, 3]
    distinct = vdist.item_pairing([4, 2, 8])
    assert distinct.keep.tolist() == distinct.positives.tolist() == [0, 1, 2]
    for bad in (torch.zeros(2, 2, dtype=torch.long), torch.tensor([], dtype=torch.long), torch.tensor([0.5, 1.0])):
        with pytest.raises(ValueError, match="items must be a non-empty 1-D integer tensor"):
            vdist.item_pairing(bad)


def _sibling_free_loss(img, cap, items, margin, max_violation):
    """--dedupe_items written out: caption j's image is the first row of its item; its negatives are
    the captions of other items (row side) and the first rows of other items (column side)."""
    first = {}
    for row, item in enumerate(items):
        first.setdefault(item, row)
    total = img.new_zeros(())
    for j, item in enumerate(items):
        own = img[first[item]]
        positive = own @ cap[j]
        terms = ([own @ cap[k] for k in range(len(items)) if items[k] != item],
                 [img[r] @ cap[j] for it, r in first.items() if it != item])
        for scores in filter(None, terms):
            hinge = (margin + torch.stack(scores) - positive).clamp(min=0)
            total = total + (hinge.max() if max_violation else hinge.sum())
    return total


@pytest.mark.parametrize("max_violation", [False, True])
def test_dedupe_items_loss_scores_each_item_once_and_no_sibling_as_negative(max_violation):
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    items = [3, 1, 3, 4, 1, 3, 0]
    img = torch.randn(len(items), 5, generator=g, dtype=torch.float64, requires_grad=True)
    cap = torch.randn(len(items), 5, generator=g, dtype=torch.float64, requires_grad=True)
    ctx = vdist.DistContext()
    loss = vdist.global_contrastive_loss(img, cap, ctx, margin=0.2, max_violation=max_violation,
                                         pairing=vdist.item_pairing(items), backend="torch")
    expected = _sibling_free_loss(img, cap, items, 0.2, max_violation)
    torch.testing.assert_close(loss, expected)
    grads = torch.autograd.grad(loss, (img, cap))
    torch.testing.assert_close(grads, torch.autograd.grad(expected, (img, cap)))
    assert (grads[0][[2, 4, 5]] == 0).all()  # later copies of an item take no part
    # all items distinct: the published pairing
    published = vdist.global_contrastive_loss(img, cap, ctx, margin=0.2, max_violation=max_violation)
    distinct = vdist.global_contrastive_loss(img, cap, ctx, margin=0.2, max_violation=max_violation,
                                             pairing=vdist.item_pairing(range(len(items))))
    torch.testing.assert_close(distinct, published)
    with pytest.raises(ValueError, match="the item pairing covers \\(6,\\) captions, the loss sees 7"):
        vdist.global_contrastive_loss(img, cap, ctx, margin=0.2, max_violation=max_violation,
                                      pairing=vdist.item_pairing(items[:6]))


def test_sampler_global_indices_are_the_ranks_batches_in_rank_order():
    samplers = [EpochBatchSampler(50, 12, rank=r, world_size=3, seed=4, epoch=2) for r in range(3)]
    per_rank = [list(s) for s in samplers]
    for step in range(samplers[0].steps_per_epoch):
        expected = sum((per_rank[r][step] for r in range(3)), [])
        for s in samplers:
            assert s.global_indices(step).tolist() == expected
    with pytest.raises(ValueError, match="step 4 outside"):
        samplers[0].global_indices(4)


# ----------------------------------------------------------------------------- 2-process checks


# (name, model options, train mode)
CASES = [
    ("bert-basicBN-eval", dict(text_encoder="bert", precomp_enc_type="basic"), False),
    ("gru-noBN-train", dict(text_encoder="gru", precomp_enc_type="backbone", vocab_size=40, word_dim=16), True),
]


def _build(opts, bert_config):
    from vse_fast.model import build_model

    return build_model(dict(embed_size=24, img_dim=16, bert_config=bert_config, **opts))


def _ddp_worker(rank, world, port, workdir):
    import torch.distributed as dist

    from vse_fast.grad_cache import cached_backward, split_batch
    from vse_fast.train import compute_loss

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ctx = vdist.init_distributed("cpu")
    inputs = torch.load(os.path.join(workdir, "inputs.pt"), weights_only=True)
    out = {}
    # all_gather_with_grad: y = cat(x_q); loss_r = sum(w_r * y) => dx_r = sum_q w_q[rows of r]
    x = inputs["gather_x"][rank].clone().requires_grad_(True)
    y = vdist.all_gather_with_grad(x, ctx)
    (inputs["gather_w"][rank] * y).sum().backward()
    out["gather_y"], out["gather_dx"] = y.detach(), x.grad
    b = inputs["batch"]["images"].shape[0] // world
    for name, opts, train_mode, dedupe, max_violation in _variants():
        model = _build(opts, inputs["bert_config"])
        model.load_state_dict(inputs[f"{name}/state"])
        model.train(train_mode)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        batch = {k: v[rank * b:(rank + 1) * b] for k, v in inputs["batch"].items()}
        items = inputs["items"]
        pairing = vdist.item_pairing(items) if dedupe else None  # the global batch's
        local_pairing = vdist.item_pairing(items[rank * b:(rank + 1) * b]) if dedupe else None
        loss, _, _ = compute_loss(ddp, batch, ctx, margin=0.2, max_violation=max_violation, pairing=pairing)
        (loss * vdist.loss_scale(ctx)).backward()
        key = _key(name, dedupe, max_violation)
        out[key + "/loss"] = vdist.all_reduce_sum(loss.detach(), ctx)
        out[key + "/grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        local, _, _ = compute_loss(ddp.module, batch, ctx, margin=0.2, max_violation=max_violation,
                                   local_negatives=True, pairing=local_pairing)
        out[key + "/local_loss"] = local.detach()
        if train_mode:  # gradient caching under DDP: no_sync on the first two chunks, all-reduce on the last
            model = _build(opts, inputs["bert_config"])
            model.load_state_dict(inputs[f"{name}/state"])
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            loss, _, _ = cached_backward(ddp, split_batch(batch, 1), torch.amp.GradScaler("cpu", enabled=False),
                                         ctx, margin=0.2, max_violation=max_violation, pairing=pairing)
            out[key + "/chunked_loss"] = vdist.all_reduce_sum(loss, ctx)
            out[key + "/chunked_grads"] = {n: p.grad.clone() for n, p in model.named_parameters()
                                           if p.grad is not None}
    torch.save(out, os.path.join(workdir, f"rank{rank}.pt"))
    del ddp, model  # the DDP wrapper holds the process group: release it before the teardown
    assert not ctx.owns_group  # this worker initialised the group: cleanup_distributed leaves it alone
    vdist.cleanup_distributed(ctx)
    assert dist.is_initialized()
    gc.collect()
    dist.destroy_process_group()


def _variants():
    """(name, options, train mode, --dedupe_items, max_violation) of the 2-process comparison."""
    return [(name, opts, train_mode, dedupe, max_violation) for name, opts, train_mode in CASES
            for dedupe in (False, True) for max_violation in (False, True)]


def _key(name, dedupe, max_violation):
    return f"{name}/dedupe{int(dedupe)}/mv{int(max_violation)}"


def test_ddp_global_negatives_match_single_process(tmp_path):
    from vse_fast.ops.contrastive import contrastive_loss
    from vse_fast.train import compute_loss

    world, n = 2, 6
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    bert_config = write_tiny_bert_config(tmp_path / "bert.json")
    # --dedupe_items: items 0 and 1 each have a caption on both ranks, item 0 twice on rank 0
    inputs = {"bert_config": bert_config, "batch": random_batch(n, g), "items": torch.tensor([0, 1, 0, 2, 1, 0]),
              "gather_x": torch.randn(world, 3, 4, generator=g),
              "gather_w": torch.randn(world, world * 3, 4, generator=g)}
    for name, opts, _ in CASES:
        model = _build(opts, bert_config)
        if opts["precomp_enc_type"] == "basic":  # non-trivial running statistics for eval mode
            with torch.no_grad():
                model.train()
                model(**{k: v for k, v in inputs["batch"].items()})
        inputs[f"{name}/state"] = model.state_dict()
    torch.save(inputs, tmp_path / "inputs.pt")
    mp.spawn(_ddp_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]

    xs, ws = inputs["gather_x"], inputs["gather_w"]
    for r in range(world):
        torch.testing.assert_close(outs[r]["gather_y"], xs.reshape(world * 3, 4))
        torch.testing.assert_close(outs[r]["gather_dx"], ws.sum(0)[r * 3:(r + 1) * 3])

    ctx1 = vdist.DistContext()
    for name, opts, train_mode, dedupe, max_violation in _variants():
        model = _build(opts, bert_config)
        model.load_state_dict(inputs[f"{name}/state"])
        model.train(train_mode)
        items = inputs["items"]
        loss, img_emb, cap_emb = compute_loss(model, inputs["batch"], ctx1, margin=0.2, max_violation=max_violation,
                                              pairing=vdist.item_pairing(items) if dedupe else None)
        loss.backward()
        key = _key(name, dedupe, max_violation)
        for r in range(world):
            expected = {p_name: p.grad for p_name, p in model.named_parameters() if p.grad is not None}
            # chunks of 1 (local batches of 3: three chunks), BN-free train-mode model only
            variants = ["", "chunked_"] if train_mode else [""]
            for variant in variants:
                torch.testing.assert_close(outs[r][key + f"/{variant}loss"], loss.detach(), rtol=1e-5, atol=1e-6)
                grads = outs[r][key + f"/{variant}grads"]
                assert grads.keys() == expected.keys(), key
                for p_name, grad in expected.items():
                    # summation order differs (two halves + all-reduce): error relative to the largest
                    # entry, as a sum over many tokens (an embedding row's gradient) can cancel to near 0
                    atol = max(1e-6, 1e-5 * grad.abs().max().item())
                    torch.testing.assert_close(grads[p_name], grad, rtol=1e-4, atol=atol,
                                               msg=f"{key} {variant}{p_name}")
            # --local_negatives: the rank's own block only
            b = n // world
            sl = slice(r * b, (r + 1) * b)
            local = vdist.global_contrastive_loss(
                img_emb[sl].detach(), cap_emb[sl].detach(), ctx1, margin=0.2, max_violation=max_violation,
                pairing=vdist.item_pairing(items[sl]) if dedupe else None)
            if not dedupe:
                torch.testing.assert_close(local, contrastive_loss(img_emb[sl].detach(), cap_emb[sl].detach(),
                                                                   margin=0.2, max_violation=max_violation))
            torch.testing.assert_close(outs[r][key + "/local_loss"], local, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_synthetic")
    path, vocab_size = tiny_synthetic(root, seed=0)
    bert_config = write_tiny_bert_config(root / "bert_nodrop.json", vocab_size=vocab_size, dropout=0.0)
    return path, bert_config


def _train_args(data, bert_config, run_dir, *extra):
    return ["--data_path", data, "--bert_config", bert_config, "--vocab_file", os.path.join(data, "vocab.txt"),
            "--precomp_enc_type", "backbone", "--embed_size", "32", "--batch_size", "16", "--num_epochs", "2",
            "--lr_update", "1", "--workers", "0", "--log_step", "1", "--eval_batch_size", "64",
            "--test_split", "test", "--run_dir", str(run_dir), "--progress", "off", *extra]


@pytest.mark.parametrize("options", [(), ("--dedupe_items",)], ids=["published", "dedupe_items"])
def test_torchrun_two_processes_then_resume_in_one(tiny_data, tmp_path, options):
    """With --dedupe_items the 2-process run reads the global batch's items from the sampler (about two
    items per batch of 16 have two captions in it)."""
    from vse_fast.checkpoint import load_checkpoint
    from vse_fast.train import main

    data, bert_config = tiny_data  # 240 captions / 16 = 15 steps per epoch
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "vse_fast.train",
           *_train_args(data, bert_config, tmp_path / "ddp", "--max_steps", "20", *options)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stopped = load_checkpoint(str(tmp_path / "ddp" / "last.pth"))
    steps_per_epoch = stopped["step"] - stopped["epoch_step"]
    assert stopped["step"] == 20 and stopped["epoch"] == 1 and steps_per_epoch > 0
    assert stopped["rng"]["world_size"] == 2 and len(stopped["rng"]["per_rank"]) == 2
    assert not any(k.startswith("module.") for k in stopped["model"])
    assert stopped["config"]["dedupe_items"] == bool(options)

    resumed = main(["--resume", str(tmp_path / "ddp" / "last.pth"), "--progress", "off"])
    straight = main(_train_args(data, bert_config, tmp_path / "single", *options))
    assert not resumed["stopped"] and resumed["step"] == straight["step"] == 2 * steps_per_epoch
    a = load_checkpoint(str(tmp_path / "ddp" / "last.pth"))["model"]
    b = load_checkpoint(str(tmp_path / "single" / "last.pth"))["model"]
    for key in b:  # BN-free, dropout-free model: 2 processes + resume in 1 == 1 process throughout
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_torchrun_usage_errors_reach_every_rank(tiny_data, tmp_path):
    """An error found on rank 0 alone (another run's last.pth in --run_dir) ends every rank with its
    message (rank 1 died in a gloo collective before); one pair per process with --local_negatives
    (no negative anywhere: nothing trains) is refused."""
    data, bert_config = tiny_data
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "last.pth").write_bytes(b"")
    cases = [(("--run_dir", str(tmp_path / "taken")), "already holds last.pth (it belongs to another run)"),
             (("--batch_size", "2", "--local_negatives"), "with --local_negatives a process's own pairs are its only")]
    for extra, message in cases:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "vse_fast.train",
               *_train_args(data, bert_config, tmp_path / "run", *extra)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0
        assert proc.stderr.count(message) == 2, proc.stderr[-3000:]  # both ranks
        assert "Connection closed" not in proc.stderr and "gloo" not in proc.stderr.lower(), proc.stderr[-3000:]


def _finite_weights_worker(rank, world, port, result_dir):
    import types

    import torch.distributed as dist

    from vse_fast.train import Trainer

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ctx = vdist.init_distributed("cpu")
    trainer = types.SimpleNamespace(model=torch.nn.BatchNorm1d(3), ctx=ctx, step=5, epoch=1)
    trainer._broadcast = lambda value: Trainer._broadcast(trainer, value)
    trainer._weights_finite = lambda: Trainer._weights_finite(trainer)
    outcomes = []
    for bad_rank in (1, 0):  # a non-finite BatchNorm buffer on one rank only
        trainer._weights_checked_at = None  # (checked once per step)
        with torch.no_grad():
            trainer.model.running_mean.fill_(float("inf") if rank == bad_rank else 0.0)
        try:
            Trainer._check_finite_weights(trainer, "writing last.pth")
            outcomes.append("ok")
        except FloatingPointError:
            outcomes.append("raised")
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(outcomes, f)
    dist.barrier()  # neither rank leaves while the other still uses the gloo pair (abort at exit)
    dist.destroy_process_group()  # this worker initialised the group: cleanup_distributed would leave it


def test_the_finite_weights_check_is_rank_0s_verdict_on_every_rank(tmp_path):
    """BatchNorm buffers differ between ranks after a step (DDP broadcasts rank 0's at the next forward):
    a check on each rank's own weights raised on one rank alone, and the others hung in the next collective.
    Rank 0's buffers are the checkpoint's: its verdict ends (or continues) every rank."""
    mp.spawn(_finite_weights_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    outcomes = [json.load(open(tmp_path / f"rank{rank}.json")) for rank in range(2)]
    assert outcomes == [["ok", "raised"], ["ok", "raised"]]


def test_device_choice_checks_the_gpu_exists_and_is_not_shared(monkeypatch):
    """The default device under torchrun skipped the GPU-count check (a raw CUDA error from set_device
    when more processes than GPUs were launched), and --device cuda:K put every rank on GPU K."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for device in (None, "auto", "cuda"):
        with pytest.raises(ValueError, match=r"'cuda:1' does not exist: 1 CUDA device\(s\) visible \(LOCAL_RANK=1"):
            vdist._pick_device(device, local_rank=1, distributed=True, local_world_size=2)
        assert vdist._pick_device(device, local_rank=0, distributed=True, local_world_size=2) == torch.device("cuda:0")
    assert vdist._pick_device(None, local_rank=0, distributed=False) == torch.device("cuda:0")
    with pytest.raises(ValueError, match="'cuda:0' names one GPU for all 2 processes of this node: pass --device cuda"):
        vdist._pick_device("cuda:0", local_rank=1, distributed=True, local_world_size=2)
    assert vdist._pick_device("cuda:0", local_rank=0, distributed=True, local_world_size=1) == torch.device("cuda:0")
    assert vdist._pick_device("cpu", local_rank=1, distributed=True, local_world_size=2) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert vdist._pick_device("auto", local_rank=1, distributed=True, local_world_size=2) == torch.device("cpu")


def test_only_rank_0_logs_warnings(capsys):
    """A run-wide warning (a collapse, an overridden option) printed once per process under torchrun."""
    from vse_fast.train import _setup_logging, logger

    for rank, printed in ((0, True), (1, False)):
        _setup_logging(None, vdist.DistContext(rank=rank, world_size=2, is_main=rank == 0))
        logger.warning("the run has collapsed")
        logger.error("rank %d cannot read its shard", rank)
        out = capsys.readouterr().out
        assert ("the run has collapsed" in out) == printed and f"rank {rank} cannot read its shard" in out
    _setup_logging(None, vdist.DistContext())
