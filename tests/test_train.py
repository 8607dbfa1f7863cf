"""python -m vse_fast.train: options, CLI errors, exact resume, collapse warning, schedules (CPU)."""
import json
import math
import os
import re
import shutil

import pytest
import torch

from tests.tiny_data import random_batch, tiny_synthetic, write_tiny_bert_config
from vse_fast import train
from vse_fast.distributed import DistContext

pytestmark = pytest.mark.usefixtures("cpu_runs")  # training and evaluation on the CPU, GPU or not


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny synthetic dataset (240 training captions) and a 1-layer BERT config WITH dropout."""
    root = tmp_path_factory.mktemp("train_data")
    data, vocab_size = tiny_synthetic(root, seed=1)
    return data, write_tiny_bert_config(root / "bert.json", vocab_size)


def _args(tiny, run_dir, *extra):
    data, bert_config = tiny
    return ["--data_path", data, "--bert_config", bert_config, "--vocab_file", os.path.join(data, "vocab.txt"),
            "--embed_size", "32", "--batch_size", "40", "--num_epochs", "2", "--lr_update", "1",
            "--workers", "0", "--log_step", "2", "--eval_batch_size", "64", "--test_split", "test",
            "--run_dir", str(run_dir),
            "--progress", "off", *extra]


def _error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        train.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--data_path", "--resume", "--precision", "--local_negatives", "--max_steps", "--compile", "torchrun"):
        assert option in out


def test_defaults_published_with_data_path_and_small_demo_without(tmp_path):
    parser = train.build_parser()
    cfg = train.resolve_config(parser.parse_args(["--data_path", str(tmp_path), "--text_model", str(tmp_path)]),
                               parser, None)
    assert (cfg["embed_size"], cfg["margin"], cfg["batch_size"], cfg["learning_rate"], cfg["bert_lr_factor"],
            cfg["weight_decay"], cfg["num_epochs"], cfg["lr_update"], cfg["grad_clip"],
            cfg["vse_mean_warmup_epochs"], cfg["max_violation"], cfg["precomp_enc_type"]) == \
        (1024, 0.2, 128, 5e-4, 0.1, 1e-4, 25, 15, 2.0, 1, False, "basic")
    demo = train.resolve_config(parser.parse_args([]), parser, None)
    assert demo["data_path"] is None and demo["embed_size"] < 1024 and demo["test_split"] == "test"
    assert 0 < demo["vse_mean_warmup_epochs"] < demo["num_epochs"]  # VSE0 warm-up, then VSE++
    video = train.resolve_config(parser.parse_args(["--synthetic", "video"]), parser, None)
    assert video["vse_mean_warmup_epochs"] == video["num_epochs"]  # VSE0 throughout


@pytest.mark.parametrize("argv, expected", [
    (["--text_encoder", "gru"], 1e-2),  # published BiGRU branch, region features: torch AdamW's default
    (["--text_encoder", "gru", "--precomp_enc_type", "backbone"], 1e-4),
    (["--text_encoder", "gru", "--weight_decay", "0.5"], 0.5),
    (["--text_model", "."], 1e-4),
])
def test_weight_decay_default_follows_the_published_branch(tmp_path, argv, expected):
    parser = train.build_parser()
    for data_args in (["--data_path", str(tmp_path)], []):
        cfg = train.resolve_config(parser.parse_args(data_args + argv), parser, None)
        assert cfg["weight_decay"] == expected


def test_lr_schedule_and_warmup_switch():
    model = torch.nn.Linear(2, 2)
    model.param_groups = lambda lr, bert_lr_factor, weight_decay: [
        dict(params=[model.weight], lr=lr), dict(params=[model.bias], lr=lr * bert_lr_factor)]
    cfg = dict(train.PUBLISHED_DEFAULTS)
    opt = train.build_optimizer(model, cfg)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 1e-4]
    for epoch, factor in ((0, 1.0), (14, 1.0), (15, 0.1), (24, 0.1)):
        train.set_epoch_lr(opt, cfg, epoch)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4 * factor, 5e-5 * factor])
    assert [train.max_violation_for_epoch(cfg, e) for e in range(3)] == [False, True, True]
    assert train.max_violation_for_epoch(dict(cfg, max_violation=True), 0)


@pytest.mark.parametrize("max_violation", [False, True])
def test_collapse_loss_is_what_the_loss_gives_for_identical_embeddings(max_violation):
    from vse_fast.ops.contrastive import contrastive_loss

    b = 7
    emb = torch.nn.functional.normalize(torch.randn(1, 16), dim=-1).expand(b, 16)
    loss = contrastive_loss(emb, emb, margin=0.2, max_violation=max_violation)
    assert loss.item() == pytest.approx(train.collapse_expected_loss(b, 0.2, max_violation), rel=1e-5)


def test_in_batch_recall():
    b, e = 64, 32
    img = torch.nn.functional.normalize(torch.randn(b, e), dim=-1)
    assert train.in_batch_recall(img, img).item() == 1.0
    assert train.in_batch_recall(img, img.roll(1, dims=0)).item() == 0.0
    same = img[:1].expand(b, e)
    assert train.in_batch_recall(same, same).item() == 0.0  # all tied: a tie is a miss
    cap = img.clone()
    cap[3] = cap[5]  # image 3's caption duplicates caption 5: both images tie at their best score
    assert train.in_batch_recall(img, cap).item() == pytest.approx((b - 2) / b)
    assert train.in_batch_recall(img, img, max_rows=10).item() == 1.0
    assert train.in_batch_recall(img[:, :0], img[:, :0]).item() == 0.0
    # orthonormal pairs; pairs 3 and 5 show one item, and caption 5 repeats caption 3: image 3 ties with it
    # (a miss) unless items say it is no rival; image 5 (score 0 with its own caption) misses either way
    basis = torch.eye(b)
    sibling = basis.clone()
    sibling[5] = basis[3]
    items = torch.arange(b)
    items[5] = 3
    assert train.in_batch_recall(basis, sibling).item() == pytest.approx((b - 2) / b)
    assert train.in_batch_recall(basis, sibling, items=items).item() == pytest.approx((b - 1) / b)
    assert train.in_batch_recall(same, same, items=items).item() == 0.0


def test_collapse_criterion():
    b, e = 64, 256
    collapsed = train.collapse_expected_loss(b, 0.2, True)  # 25.6
    same = torch.nn.functional.normalize(torch.randn(1, e), dim=-1).expand(b, e)
    recall = train.in_batch_recall(same, same).item()
    assert train.is_collapsed(collapsed * 1.01, recall, b, b, 0.2, True)
    assert train.is_collapsed(collapsed, 2 / b, b, b, 0.2, True)
    assert not train.is_collapsed(collapsed, 3 / b, b, b, 0.2, True)
    assert not train.is_collapsed(collapsed * 0.5, 0.0, b, b, 0.2, True)  # learning
    assert not train.is_collapsed(0.0, 0.0, b, b, 0.0, True)  # margin 0: nothing to detect
    assert not train.is_collapsed(collapsed, 0.0, 4, b, 0.2, True)  # 4 local pairs: chance too high to tell
    # A learning model whose embeddings share most of their direction, with hardest negatives as close
    # as the positives (the synthetic demo's near-duplicate captions under VSE++): the loss sits at the
    # collapse value and the rows are alike, yet each image still finds its own caption. Not a collapse.
    common = torch.nn.functional.normalize(torch.randn(1, e), dim=-1)
    img = torch.nn.functional.normalize(common + 0.03 * torch.randn(b, e), dim=-1)
    cap = torch.nn.functional.normalize(img + 0.01 * torch.randn(b, e), dim=-1)
    recall = train.in_batch_recall(img, cap).item()
    assert recall > 0.5
    assert not train.is_collapsed(collapsed, recall, b, b, 0.2, True)


def test_collapse_criterion_at_a_large_margin_does_not_take_a_fresh_model():
    from vse_fast.ops.contrastive import contrastive_loss

    b, e, margin = 64, 256, 4.0  # margin >= 2: every hinge is active, each off the margin by at most 2
    gen = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(b, e, generator=gen), dim=-1)
    cap = torch.nn.functional.normalize(torch.randn(b, e, generator=gen), dim=-1)
    loss = contrastive_loss(img, cap, margin=margin, max_violation=True).item()
    collapsed = train.collapse_expected_loss(b, margin, True)
    assert abs(loss - collapsed) < 0.05 * collapsed  # within a tolerance relative to the margin
    assert not train.is_collapsed(loss, 0.0, b, b, margin, True)  # random embeddings are no collapse
    same = img[:1].expand(b, e)
    loss = contrastive_loss(same, same, margin=margin, max_violation=True).item()
    assert train.is_collapsed(loss, 0.0, b, b, margin, True)


def _overcommit_refuses_huge_allocations():
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            return f.read().strip() in ("0", "2")
    except OSError:
        return False


@pytest.mark.skipif(not _overcommit_refuses_huge_allocations(),
                    reason="needs Linux overcommit mode 0 or 2, where a 4 PB allocation fails at once")
def test_a_model_too_large_for_memory_is_an_error_naming_its_size(tiny, tmp_path, capsys):
    """--embed_size 2**40 ended in the CPU allocator's traceback (DefaultCPUAllocator: can't allocate)."""
    err = _error(capsys, _args(tiny, tmp_path / "r", "--embed_size", str(2 ** 40)))
    assert f"the model does not fit in cpu memory (--embed_size {2 ** 40}, features of dimension" in err
    assert "can't allocate memory" in err and "Traceback" not in err


def test_only_allocation_failures_count_as_out_of_memory():
    assert train._out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB"))
    assert train._out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8"))
    assert not train._out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_cli_errors_name_the_problem(tiny, tmp_path, capsys):
    data, bert_config = tiny
    missing = str(tmp_path / "nope")
    assert f"--data_path {missing!r} does not exist" in _error(capsys, ["--data_path", missing])
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    assert "is not a directory" in _error(capsys, ["--data_path", str(a_file), "--bert_config", bert_config])
    assert "needs --text_model" in _error(capsys, ["--data_path", data])
    assert "--resume" in _error(capsys, ["--resume", missing + ".pth"])
    assert "--batch_size must be >= 1, got 0" in _error(capsys, _args(tiny, tmp_path / "r", "--batch_size", "0"))
    assert "--bert_config configures the BERT text encoder; this run's text encoder is the BiGRU" in _error(
        capsys, _args(tiny, tmp_path / "r", "--text_encoder", "gru"))  # _args passes --bert_config
    assert "--text_model configures the BERT" in _error(capsys, ["--text_encoder", "gru", "--text_model", data])
    assert "--word_dim configures the BiGRU text encoder; this run's text encoder is BERT (--text_encoder bert)" \
        in _error(capsys, _args(tiny, tmp_path / "r", "--word_dim", "64"))
    assert "--num_layers configures the BiGRU" in _error(capsys, ["--text_model", data, "--num_layers", "2"])
    assert "--bert_lr_factor configures the BERT text encoder" in _error(
        capsys, ["--text_encoder", "gru", "--bert_lr_factor", "0.5"])
    (tmp_path / "bad.json").write_text("{not json")
    err = _error(capsys, _args(tiny, tmp_path / "r", "--bert_config", str(tmp_path / "bad.json")))
    assert f"--bert_config {tmp_path / 'bad.json'}: " in err and "Traceback" not in err
    assert "--batch_size must be >= 2, got 1" in _error(capsys, _args(tiny, tmp_path / "r", "--batch_size", "1"))
    assert "--embed_size must be >= 2 with --precomp_enc_type basic" in _error(
        capsys, _args(tiny, tmp_path / "r", "--embed_size", "1"))
    assert "--val_split must name a split, got ''" in _error(capsys, _args(tiny, tmp_path / "r", "--val_split", ""))
    assert "--test_split must name a split, got ''" in _error(capsys, _args(tiny, tmp_path / "r", "--test_split", ""))
    assert "--run_dir must name a directory, got ''" in _error(capsys, _args(tiny, tmp_path / "r", "--run_dir", ""))
    assert "--synthetic_dir must name a directory, got ''" in _error(capsys, ["--synthetic_dir", ""])
    assert "--grad_clip must be a number" in _error(capsys, _args(tiny, tmp_path / "r", "--grad_clip", "nan"))
    for option, message in (("--margin=-0.1", "--margin must be a non-negative number, got -0.1"),
                            ("--learning_rate=0", "--learning_rate must be a positive number, got 0.0"),
                            ("--learning_rate=inf", "--learning_rate must be a positive number, got inf"),
                            ("--weight_decay=-1e-4", "--weight_decay must be a non-negative number"),
                            ("--bert_lr_factor=-1", "--bert_lr_factor must be a non-negative number"),
                            ("--lr_update=-1", "--lr_update must be >= 0, got -1"),
                            ("--vse_mean_warmup_epochs=-1", "--vse_mean_warmup_epochs must be >= 0, got -1")):
        assert message in _error(capsys, _args(tiny, tmp_path / "r", option)), option
    assert "--feature_drop must be in [0, 1)" in _error(capsys, _args(tiny, tmp_path / "r", "--feature_drop", "1.5"))
    assert "invalid choice: 'fp8'" in _error(capsys, _args(tiny, tmp_path / "r", "--precision", "fp8"))
    assert "--seed must be in [0, 2**32), got -1" in _error(capsys, _args(tiny, tmp_path / "r", "--seed", "-1"))
    assert "--device 'meta': training runs on cpu or cuda devices" in _error(
        capsys, _args(tiny, tmp_path / "r", "--device", "meta"))
    assert "--device 'cpu:1': the CPU has no device index but 0" in _error(
        capsys, _args(tiny, tmp_path / "r", "--device", "cpu:1"))
    assert "--bert_config" in _error(capsys, _args(tiny, tmp_path / "r", "--bert_config", missing))
    assert "not both" in _error(capsys, ["--data_path", data, "--text_model", str(tmp_path), "--bert_config", bert_config])
    assert f"--run_dir {str(a_file / 'run')!r} cannot be created: Not a directory" in _error(
        capsys, _args(tiny, a_file / "run"))
    os.makedirs(tmp_path / "used")
    (tmp_path / "used" / "last.pth").write_bytes(b"")
    assert "already holds last.pth" in _error(capsys, _args(tiny, tmp_path / "used"))
    err = _error(capsys, _args(tiny, tmp_path / "big", "--batch_size", "4000"))
    assert "train_caps.txt: 240 training pairs (captions), fewer than one batch of 4000" in err
    assert "Traceback" not in err


def test_an_unwritable_synthetic_cache_is_an_error(tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("VSE_FAST_CACHE", str(tmp_path / "afile" / "cache"))
    err = _error(capsys, ["--run_dir", str(tmp_path / "r"), "--progress", "off"])
    assert "the synthetic dataset cannot be written to " in err and "afile/cache: Not a directory" in err
    assert "Traceback" not in err


def test_data_that_would_fail_later_is_named_before_training(tiny, tmp_path, capsys):
    """An evaluation split whose features have another size than the training split's (found at the first
    evaluation, after a whole epoch, as an error inside the model) and a vocabulary with more entries than
    the text encoder's word embedding (found as an IndexError inside it at the first batch)."""
    import numpy as np

    data, bert_config = tiny
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    dev = np.load(copy / "dev_ims.npy")
    np.save(copy / "dev_ims.npy", dev[..., : dev.shape[-1] - 1])
    args = _args(tiny, tmp_path / "r")
    args[args.index(data)] = str(copy)
    err = _error(capsys, args)
    assert f"dev_ims.npy: features of dimension {dev.shape[-1] - 1}, but the training split's" in err
    assert "Traceback" not in err and not os.path.exists(tmp_path / "r" / "last.pth")
    small = write_tiny_bert_config(tmp_path / "small_bert.json", vocab_size=10)
    err = _error(capsys, _args(tiny, tmp_path / "r2", "--bert_config", small))
    assert "vocab.txt: the vocabulary has" in err and "word embedding has 10 rows" in err
    no_weights = tmp_path / "bert_no_weights"  # a tokenizer but no model.safetensors
    no_weights.mkdir()
    shutil.copyfile(small, no_weights / "config.json")
    shutil.copyfile(os.path.join(data, "vocab.txt"), no_weights / "vocab.txt")
    args = _args(tiny, tmp_path / "r3", "--text_model", str(no_weights))
    del args[args.index("--bert_config"):args.index("--bert_config") + 2]
    err = _error(capsys, args)
    assert f"--text_model {no_weights}: " in err and "Traceback" not in err
    other = tmp_path / "bert_other_vocab"  # a tokenizer of other ids than --vocab_file's: refused
    other.mkdir()
    shutil.copyfile(small, other / "config.json")
    words = open(os.path.join(data, "vocab.txt")).read().splitlines()
    (other / "vocab.txt").write_text("\n".join(words[:5] + words[5:][::-1]) + "\n")
    args[args.index(str(no_weights))] = str(other)
    assert "hold different vocabularies" in _error(capsys, args)
    from transformers import BertConfig, BertModel

    broken = tmp_path / "bert_truncated"  # an interrupted copy: half a weights file
    BertModel(BertConfig.from_json_file(small)).save_pretrained(str(broken))
    shutil.copyfile(os.path.join(data, "vocab.txt"), broken / "vocab.txt")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    args[args.index(str(other))] = str(broken)
    err = _error(capsys, args)
    assert f"--text_model {broken}: " in err and "Traceback" not in err
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    err = _error(capsys, _args(tiny, tmp_path / "r4", "--bert_config", str(listed)))
    assert f"--bert_config {listed}: bert_config {str(listed)!r} holds a list, not a json object" in err and "Traceback" not in err


def test_data_errors_exit_cleanly_and_resume_keeps_the_synthetic_flavour(tiny, tmp_path, capsys):
    import numpy as np

    data, bert_config = tiny
    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "train_ims.npy", np.zeros((3, 2, 4), np.float32))
    (bad / "train_caps.txt").write_text("a\nb\nc\nd\n")
    err = _error(capsys, ["--data_path", str(bad), "--bert_config", bert_config, "--vocab_file",
                          os.path.join(data, "vocab.txt"), "--val_split", "train", "--run_dir", str(tmp_path / "r")])
    assert "train_caps.txt: 4 captions for 3 items" in err and "Traceback" not in err
    assert "cannot be combined with --data_path" in _error(capsys, ["--data_path", data, "--synthetic", "video"])
    parser = train.build_parser()
    saved = train.resolve_config(parser.parse_args(["--synthetic", "video"]), parser, None)
    assert train.resolve_config(parser.parse_args([]), parser, saved)["synthetic"] == "video"


def _final_state(run_dir):
    from vse_fast.checkpoint import load_checkpoint

    return load_checkpoint(os.path.join(run_dir, "last.pth"))


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("stop_at", [4, 6])  # mid-epoch / at an epoch boundary (6 steps per epoch)
def test_resume_gives_the_uninterrupted_result(tiny, tmp_path, capsys, stop_at):
    """BatchNorm region MLP, BERT with dropout, augmentation on: k steps, stop, resume == straight."""
    straight = train.main(_args(tiny, tmp_path / "a"))
    assert "rsum" in capsys.readouterr().out  # the recall table of the test split is printed
    stopped = train.main(_args(tiny, tmp_path / "b", "--max_steps", str(stop_at)))
    assert stopped["stopped"] and stopped["step"] == stop_at
    mid = _final_state(tmp_path / "b")
    assert mid["step"] == stop_at and mid["epoch"] * 6 + mid["epoch_step"] == stop_at
    assert "differs from the resumed checkpoint" in _error(
        capsys, ["--resume", str(tmp_path / "b" / "last.pth"), "--embed_size", "64"])
    if mid["epoch_step"]:
        assert "--batch_size 20 differs from the resumed run's 40" in _error(
            capsys, ["--resume", str(tmp_path / "b" / "last.pth"), "--batch_size", "20"])
        assert "--seed 3 differs from the resumed run's 0" in _error(  # the seed draws the epoch's order
            capsys, ["--resume", str(tmp_path / "b" / "last.pth"), "--seed", "3"])
        err = _error(capsys, ["--resume", str(tmp_path / "b" / "last.pth"), "--train_split", "dev"])
        assert "training pairs, but the resumed run had 240 and stopped inside epoch 0 (after 4 steps)" in err
        assert "dev_caps.txt: " in err and "Traceback" not in err
    else:  # at an epoch boundary the batch size may change
        train._check_resume(dict(mid["config"], batch_size=20), mid, train.build_parser())
    assert "cannot be combined with --data_path" in _error(
        capsys, ["--resume", str(tmp_path / "b" / "last.pth"), "--synthetic", "video"])
    assert "already holds last.pth" in _error(  # another run's directory is not overwritten
        capsys, ["--resume", str(tmp_path / "b" / "last.pth"), "--run_dir", str(tmp_path / "a")])
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copyfile(tmp_path / "b" / "last.pth", moved / "last.pth")
    resumed = train.main(["--resume", str(moved / "last.pth"), "--progress", "off", "--max_steps", str(stop_at + 1)])
    assert _final_state(moved)["step"] == stop_at + 1  # a resumed run writes beside its checkpoint
    assert _final_state(tmp_path / "b")["step"] == stop_at
    resumed = train.main(["--resume", str(tmp_path / "b" / "last.pth"), "--progress", "off"])
    assert resumed["step"] == straight["step"] == 12 and not resumed["stopped"]
    a, b = _final_state(tmp_path / "a"), _final_state(tmp_path / "b")
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["best_rsum"] == b["best_rsum"] and math.isfinite(a["best_rsum"])
    assert [m["rsum"] for m in _metrics(tmp_path / "a")] == [m["rsum"] for m in _metrics(tmp_path / "b")]
    assert os.path.exists(tmp_path / "a" / "best.pth") and os.path.exists(tmp_path / "a" / "train.log")
    assert resumed["test"]["rsum"] == straight["test"]["rsum"]


def test_paths_are_stored_absolute_so_a_run_resumes_from_any_directory(tiny, tmp_path, capsys, monkeypatch):
    from vse_fast.checkpoint import save_checkpoint

    data, bert_config = tiny
    monkeypatch.chdir(os.path.dirname(data))
    args = _args(tiny, "run", "--max_steps", "1", "--num_epochs", "1")
    args = [os.path.relpath(a) if a in (data, bert_config) or a.startswith(data + os.sep) else a for a in args]
    train.main(args)
    config = _final_state("run")["config"]
    for key in ("data_path", "bert_config", "vocab_file"):
        assert os.path.isabs(config[key]) and os.path.samefile(config[key], tiny[0] if key == "data_path" else
                                                              args[args.index(f"--{key}") + 1]), key
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    last = os.path.join(os.path.dirname(data), "run", "last.pth")
    # the same BERT config spelled as another path is the same model
    train.main(["--resume", last, "--progress", "off", "--max_steps", "2", "--bert_config", os.path.relpath(bert_config)])
    assert _final_state(os.path.dirname(last))["step"] == 2
    state = _final_state(os.path.dirname(last))  # a checkpoint of an earlier version held relative paths
    state["config"]["data_path"] = "data"
    os.makedirs(tmp_path / "old")
    save_checkpoint(str(tmp_path / "old" / "last.pth"), state)
    assert "the resumed run's --data_path 'data' does not exist" in _error(
        capsys, ["--resume", str(tmp_path / "old" / "last.pth")])


def test_non_finite_evaluation_features_are_an_error_before_training(tiny, tmp_path, capsys):
    """A NaN in the dev (or test) features is found before the first step, not by the evaluation
    after an epoch of training (which would end with a traceback and no checkpoint)."""
    import numpy as np

    copy = tmp_path / "data"
    shutil.copytree(tiny[0], copy)
    for split in ("dev", "test"):
        feats = np.load(copy / f"{split}_ims.npy")
        bad = feats.copy()
        bad[3, 0, 1] = np.nan
        np.save(copy / f"{split}_ims.npy", bad)
        err = _error(capsys, _args((str(copy), tiny[1]), tmp_path / split, "--vocab_file",
                                   str(copy / "vocab.txt")))
        assert f"{split}_ims.npy: the features of items [3] (1 in all) hold NaN or inf" in err
        assert "Traceback" not in err and not (tmp_path / split / "last.pth").exists()
        np.save(copy / f"{split}_ims.npy", feats)


def test_a_mid_epoch_resume_refuses_a_changed_training_split(tiny, tmp_path, capsys):
    """A training split that grew (same steps per epoch) reshuffles the epoch: the rest of it would
    repeat or skip pairs. At an epoch boundary it is allowed; the derived data_path_used is no option."""
    import numpy as np

    copy = tmp_path / "data"
    shutil.copytree(tiny[0], copy)
    train.main(_args((str(copy), tiny[1]), tmp_path / "r", "--vocab_file", str(copy / "vocab.txt"), "--max_steps", "4"))
    feats = np.load(copy / "train_ims.npy")
    np.save(copy / "train_ims.npy", np.concatenate([feats, feats[:1]]))  # one item (5 captions) more
    lens = copy / "train_lens.npy"
    if lens.exists():
        np.save(lens, np.concatenate([np.load(lens), np.load(lens)[:1]]))
    captions = (copy / "train_caps.txt").read_text().splitlines()
    (copy / "train_caps.txt").write_text("\n".join(captions + captions[:5]) + "\n")
    ids = copy / "train_ids.txt"
    if ids.exists():
        ids.write_text(ids.read_text() + "new-item\n")
    err = _error(capsys, ["--resume", str(tmp_path / "r" / "last.pth"), "--progress", "off"])
    assert "train_caps.txt: 245 training pairs, but the resumed run had 240 and stopped inside epoch 0 (after 4 " \
           "steps)" in err and "Traceback" not in err
    train.main(_args((str(copy), tiny[1]), tmp_path / "s", "--vocab_file", str(copy / "vocab.txt"), "--max_steps", "6"))
    result = train.main(["--resume", str(tmp_path / "s" / "last.pth"), "--progress", "off", "--max_steps", "7",
                         "--data_path", tiny[0]])  # an epoch boundary: another split is fine
    assert result["step"] == 7
    assert "--data_path_used" not in (tmp_path / "s" / "train.log").read_text()


def test_an_unusable_evaluation_caption_is_an_error_before_training(tiny, tmp_path, capsys, monkeypatch):
    """A dev/test caption the text encoder cannot take (nothing left after BERT's cleaning, or too
    long for its positions) is named before the first step, not by the evaluation after an epoch."""
    copy = tmp_path / "data"
    shutil.copytree(tiny[0], copy)
    steps = []
    monkeypatch.setattr(train, "train_step", lambda *a, **k: steps.append(1) / 0)
    for split, caption in (("dev", "\ufffd"), ("test", " ".join(["red"] * 600))):
        path = copy / f"{split}_caps.txt"
        lines = path.read_text().splitlines()
        path.write_text("\n".join(lines[:2] + [caption] + lines[3:]) + "\n")
        err = _error(capsys, _args((str(copy), tiny[1]), tmp_path / split, "--vocab_file", str(copy / "vocab.txt")))
        assert f"{split}_caps.txt:3: " in err and "Traceback" not in err and not steps
        path.write_text("\n".join(lines) + "\n")


def test_a_checkpoint_step_checks_the_loss_before_replacing_last_pth(tiny, tmp_path, capsys, monkeypatch):
    """--save_steps off the --log_step cadence: a NaN loss stops the run before last.pth is written
    (it used to save the diverged weights, checked only at the next logged step)."""
    real = train.train_step
    calls = []

    def nan_after_two(*args, **kw):
        loss, img, cap = real(*args, **kw)
        calls.append(1)
        return (loss * float("nan") if len(calls) > 2 else loss), img, cap

    monkeypatch.setattr(train, "train_step", nan_after_two)
    err = _error(capsys, _args(tiny, tmp_path / "r", "--log_step", "5", "--save_steps", "2"))
    assert "the loss became NaN or inf at step 3 " in err  # the first NaN loss, checked at step 4
    state = _final_state(tmp_path / "r")
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_evaluating_the_training_split_is_warned_about(tiny, tmp_path):
    train.main(_args(tiny, tmp_path / "r", "--max_steps", "1", "--val_split", "train"))
    assert "--val_split train is the training split" in (tmp_path / "r" / "train.log").read_text()


def test_a_bigru_vocabulary_is_built_from_the_captions_of_a_precomp_folder(tiny, tmp_path):
    """Splits may lie in DIR/precomp/ (the published layout): the BiGRU vocabulary is then built from
    DIR/precomp/train_caps.txt, in training and when vse_fast.eval rebuilds it from --data_path."""
    from vse_fast import data as vdata
    from vse_fast.eval import resolve_tokenizer

    shutil.copytree(tiny[0], tmp_path / "d" / "precomp")
    train.main(["--data_path", str(tmp_path / "d"), "--text_encoder", "gru", "--embed_size", "16", "--batch_size",
                "40", "--num_epochs", "1", "--max_steps", "1", "--workers", "0", "--run_dir", str(tmp_path / "r"),
                "--progress", "off"])
    built = vdata.Vocabulary.from_caption_files([str(tmp_path / "d" / "precomp" / "train_caps.txt")])
    assert vdata.Vocabulary.load(str(tmp_path / "r" / "vocab.json")).word2idx == built.word2idx
    rebuilt = resolve_tokenizer({"text_encoder": "gru", "vocab_size": len(built)}, {}, str(tmp_path / "d"))
    assert rebuilt.word2idx == built.word2idx


def test_a_bigru_vocabulary_built_from_the_captions_is_kept_with_the_run(tiny, tmp_path, capsys):
    """Without --vocab_file the BiGRU's vocabulary is built from the training captions. It is written to
    the run directory and named in the checkpoint, so a resumed run and vse_fast.eval map words to the
    ids the model learned, even if the captions file changes later."""
    from vse_fast import data as vdata
    from vse_fast.eval import main as eval_main

    data, _ = tiny
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    args = ["--data_path", str(copy), "--text_encoder", "gru", "--embed_size", "16", "--batch_size", "40",
            "--num_epochs", "1", "--max_steps", "2", "--workers", "0", "--run_dir", str(tmp_path / "r"),
            "--progress", "off", "--test_split", "test"]
    train.main(args)
    saved = _final_state(tmp_path / "r")["config"]
    built = vdata.Vocabulary.from_caption_files([str(copy / "train_caps.txt")])
    assert saved["vocab_file"] == str(tmp_path / "r" / "vocab.json")
    assert vdata.Vocabulary.load(saved["vocab_file"]).word2idx == built.word2idx
    assert saved["vocab_size"] == len(built)
    caps = (copy / "train_caps.txt").read_text().splitlines()  # new words would shift a rebuilt vocabulary
    (copy / "train_caps.txt").write_text("\n".join(f"aardvark {c}" if i % 2 else c for i, c in enumerate(caps)) + "\n")
    assert len(vdata.Vocabulary.from_caption_files([str(copy / "train_caps.txt")])) != len(built)
    train.main(["--resume", str(tmp_path / "r" / "last.pth"), "--max_steps", "3", "--progress", "off",
                "--margin", "0.25"])
    assert _final_state(tmp_path / "r")["step"] == 3
    log = (tmp_path / "r" / "train.log").read_text()  # an override is logged to the run's log, once
    assert log.count("--margin 0.25 overrides the resumed run's 0.2") == 1 and "vocab_file" not in log
    other = vdata.Vocabulary.load(saved["vocab_file"])  # the same words under other ids: refused
    swapped = {w: (i if i < 4 else len(other.word2idx) + 3 - i) for w, i in other.word2idx.items()}
    other.word2idx, other.idx2word = swapped, {i: w for w, i in swapped.items()}
    other.save(str(tmp_path / "other.json"))
    with pytest.raises(SystemExit):
        train.main(["--resume", str(tmp_path / "r" / "last.pth"), "--max_steps", "4", "--progress", "off",
                    "--vocab_file", str(tmp_path / "other.json")])
    assert "other.json' holds another vocabulary than the resumed run's" in capsys.readouterr().err
    shutil.copyfile(saved["vocab_file"], tmp_path / "same.json")  # a copy of the run's: fine
    parser = train.build_parser()
    args = parser.parse_args(["--resume", str(tmp_path / "r" / "last.pth"), "--vocab_file", str(tmp_path / "same.json")])
    assert train.resolve_config(args, parser, saved)["vocab_file"] == str(tmp_path / "same.json")
    metrics = eval_main(["--checkpoint", str(tmp_path / "r" / "last.pth"), "--data_path", str(copy), "--split", "test"])
    assert metrics["rsum"] > 0
    moved = tmp_path / "moved"  # the run directory moved: its vocab.json is found beside the checkpoint
    shutil.move(str(tmp_path / "r"), moved)
    train.main(["--resume", str(moved / "last.pth"), "--max_steps", "4", "--progress", "off"])
    assert _final_state(moved)["step"] == 4 and _final_state(moved)["config"]["vocab_file"] == str(moved / "vocab.json")


def test_pooling_option_trains_evaluates_and_is_kept_on_resume(tiny, tmp_path, capsys):
    """--pooling kmax --pool_k 2 builds both encoders with the fixed pool (no GPO parameters), eval
    rebuilds it from the checkpoint, a resumed run cannot change it, and bad combinations are errors."""
    from vse_fast.eval import main as eval_main

    assert "--pooling kmax needs --pool_k >= 1, got None" in _error(capsys, _args(tiny, tmp_path / "e", "--pooling", "kmax"))
    assert "--pool_k is only used with --pooling kmax, not gpo" in _error(capsys, _args(tiny, tmp_path / "e", "--pool_k", "3"))
    train.main(_args(tiny, tmp_path / "r", "--pooling", "kmax", "--pool_k", "2", "--max_steps", "2"))
    state = _final_state(tmp_path / "r")
    assert (state["config"]["model"]["pooling"], state["config"]["model"]["pool_k"]) == ("kmax", 2)
    assert not [k for k in state["model"] if ".gpool." in k]
    metrics = eval_main(["--checkpoint", str(tmp_path / "r" / "last.pth"), "--data_path", tiny[0], "--split", "test"])
    assert metrics["rsum"] > 0
    assert "--pooling 'gpo' differs from the resumed checkpoint's 'kmax'" in _error(
        capsys, ["--resume", str(tmp_path / "r" / "last.pth"), "--pooling", "gpo"])
    from vse_fast.checkpoint import save_checkpoint  # a checkpoint from before --pooling pooled with GPO

    old = _final_state(tmp_path / "r")
    for entry in (old["config"], old["config"]["model"]):
        del entry["pooling"], entry["pool_k"]
    os.makedirs(tmp_path / "old")
    save_checkpoint(str(tmp_path / "old" / "last.pth"), old)
    assert "--pooling 'max' differs from the resumed checkpoint's 'gpo'" in _error(
        capsys, ["--resume", str(tmp_path / "old" / "last.pth"), "--pooling", "max"])


@pytest.mark.parametrize("dedupe", [False, True])
def test_dedupe_items_gives_the_loss_each_batchs_item_pairing(tiny, tmp_path, monkeypatch, dedupe):
    """--dedupe_items: every step's loss gets the pairing of its batch's items (each distinct item once, each
    caption pointing at its own item); without the flag, the published pairing (None)."""
    real, seen = train.compute_loss, []

    def spy(model, batch, ctx, **kw):
        pairing = kw["pairing"]  # on the training device (CUDA on a GPU machine), as the batch: compared on the CPU
        seen.append((batch["img_index"].cpu(), None if pairing is None else pairing.to("cpu")))
        return real(model, batch, ctx, **kw)

    monkeypatch.setattr(train, "compute_loss", spy)
    train.main(_args(tiny, tmp_path / "r", "--max_steps", "6", *(["--dedupe_items"] if dedupe else [])))
    assert len(seen) == 6 and _final_state(tmp_path / "r")["config"]["dedupe_items"] == dedupe
    if not dedupe:
        assert all(pairing is None for _, pairing in seen)
        return
    for items, pairing in seen:
        kept = items[pairing.keep]
        assert sorted(kept.tolist()) == sorted(set(items.tolist()))
        assert torch.equal(kept[pairing.positives], items)
    assert any(len(set(items.tolist())) < len(items) for items, _ in seen)  # 40 of 240 captions: items repeat


def test_loss_switches_can_be_turned_off_on_resume_and_are_logged(tiny, tmp_path, capsys):
    """--dedupe_items / --max_violation / --local_negatives have --no- forms, so a resumed run can turn
    them off; overrides are logged, also against a checkpoint from before an option existed."""
    from vse_fast.checkpoint import save_checkpoint

    train.main(_args(tiny, tmp_path / "r", "--max_steps", "1", "--dedupe_items", "--max_violation"))
    log = (tmp_path / "r" / "train.log").read_text()
    assert "VSE++ (hardest negatives) loss, each item once (--dedupe_items)" in log
    train.main(["--resume", str(tmp_path / "r" / "last.pth"), "--max_steps", "2", "--no-dedupe_items",
                "--no-max_violation", "--progress", "off"])
    state = _final_state(tmp_path / "r")
    assert state["step"] == 2 and not state["config"]["dedupe_items"] and not state["config"]["max_violation"]
    log = (tmp_path / "r" / "train.log").read_text()
    assert "--dedupe_items False overrides the resumed run's True" in log
    assert "--max_violation False overrides the resumed run's True" in log
    assert "VSE0 (sum) loss, 5 steps" in log
    del state["config"]["dedupe_items"]  # written before the option existed: the run had the default
    os.makedirs(tmp_path / "old")
    save_checkpoint(str(tmp_path / "old" / "last.pth"), state)
    train.main(["--resume", str(tmp_path / "old" / "last.pth"), "--max_steps", "3", "--dedupe_items",
                "--progress", "off"])
    assert "--dedupe_items True overrides the resumed run's False" in (tmp_path / "old" / "train.log").read_text()


def test_a_warmup_given_on_resume_of_a_max_violation_run_is_an_error(tiny, tmp_path, capsys):
    """The resumed --max_violation overrode it: the log said the new warm-up took effect, and it did not."""
    train.main(_args(tiny, tmp_path / "mv", "--max_steps", "1", "--max_violation"))
    resume = ["--resume", str(tmp_path / "mv" / "last.pth"), "--max_steps", "2", "--progress", "off"]
    err = _error(capsys, resume + ["--vse_mean_warmup_epochs", "2"])
    assert "started with --max_violation" in err and "--vse_mean_warmup_epochs 2 would have no effect" in err
    train.main(resume + ["--vse_mean_warmup_epochs", "2", "--no-max_violation"])
    assert "VSE0 (sum) loss" in (tmp_path / "mv" / "train.log").read_text()


def test_a_warmup_over_every_epoch_is_warned_about(tiny, tmp_path):
    train.main(_args(tiny, tmp_path / "w", "--max_steps", "1", "--vse_mean_warmup_epochs", "2"))
    assert "--vse_mean_warmup_epochs 2 is not below --num_epochs 2" in (tmp_path / "w" / "train.log").read_text()


def test_the_pairs_left_out_of_each_epoch_are_logged(tiny, tmp_path):
    train.main(_args(tiny, tmp_path / "p", "--max_steps", "1", "--batch_size", "50"))
    log = (tmp_path / "p" / "train.log").read_text()
    assert "240 training pairs, 4 steps/epoch (40 pairs per epoch left out" in log


def test_fp16_steps_skipped_by_the_scaler_are_logged_and_its_scale_is_resumed(tiny, tmp_path):
    """The loss is a sum over the batch, so the first fp16 steps overflow at the initial scale 2**16
    and the GradScaler skips their updates: the log said nothing, and --max_steps counts them. The
    scale those skips lowered is part of the resumed state: without it a resumed run restarts at 2**16,
    skips the overflow steps again and ends elsewhere than the uninterrupted run."""
    fast = ("--pooling", "mean", "--loss_backend", "torch")  # neither matters here; GPO's table dominates CPU time
    train.main(_args(tiny, tmp_path / "f", "--precision", "fp16", "--max_steps", "6", "--log_step", "3", *fast))
    state = _final_state(tmp_path / "f")
    applied = int(next(s["step"] for s in state["optimizer"]["state"].values()))
    log = (tmp_path / "f" / "train.log").read_text()
    assert applied < 6  # the premise: some steps were skipped
    assert f"{6 - applied} of 6 steps in all" in log
    train.main(_args(tiny, tmp_path / "g", "--precision", "fp16", "--max_steps", "3", "--log_step", "3", *fast))
    assert _final_state(tmp_path / "g")["scaler"]["scale"] < 2.0 ** 16  # the premise: the stop lowered it
    train.main(["--resume", str(tmp_path / "g" / "last.pth"), "--max_steps", "6", "--progress", "off"])
    resumed = _final_state(tmp_path / "g")
    assert resumed["step"] == state["step"] == 6 and resumed["scaler"] == state["scaler"]
    for key in state["model"]:
        assert torch.equal(resumed["model"][key], state["model"][key]), key


def test_learning_rate_and_weight_decay_given_on_resume_take_effect(tiny, tmp_path, capsys):
    """The optimizer state restores AdamW's moments, not the resumed run's lr or decay: those follow
    --learning_rate / --weight_decay given with --resume (and are kept when not given)."""
    train.main(_args(tiny, tmp_path / "r", "--max_steps", "1", "--learning_rate", "1e-3", "--weight_decay", "0.01"))
    groups = _final_state(tmp_path / "r")["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.01] * 3
    train.main(["--resume", str(tmp_path / "r" / "last.pth"), "--max_steps", "2", "--learning_rate", "2e-3",
                "--weight_decay", "0.05", "--progress", "off"])
    state = _final_state(tmp_path / "r")
    assert state["step"] == 2 and state["config"]["weight_decay"] == 0.05
    groups = {g["name"]: g for g in state["optimizer"]["param_groups"]}
    assert {name: g["weight_decay"] for name, g in groups.items()} == {"text": 0.05, "bert": 0.05, "image": 0.05}
    assert groups["text"]["lr"] == groups["image"]["lr"] == 2e-3
    assert groups["bert"]["lr"] == pytest.approx(2e-4)
    assert "--weight_decay 0.05 overrides the resumed run's 0.01" in (tmp_path / "r" / "train.log").read_text()
    train.main(["--resume", str(tmp_path / "r" / "last.pth"), "--max_steps", "3", "--progress", "off"])
    groups = _final_state(tmp_path / "r")["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05] * 3 and groups[0]["lr"] == 2e-3


def test_a_run_resumed_into_another_directory_keeps_its_best_checkpoint(tiny, tmp_path, capsys):
    """The end-of-run test evaluation reads best.pth. Resumed into --run_dir NEW, the run copies the
    resumed run's best.pth (same best rsum) and evaluates it; a last.pth copied alone is resumed with
    warnings that no best.pth exists and the test split was not evaluated; and --resume RUN/best.pth
    does not overwrite RUN's newer last.pth."""
    run = tmp_path / "r"
    train.main(_args(tiny, run, "--max_steps", "6"))  # one whole epoch (evaluated, best.pth), then stops
    saved = _final_state(run)
    assert (saved["epoch"], saved["epoch_step"]) == (1, 0) and math.isfinite(saved["best_rsum"])
    best_bytes = (run / "best.pth").read_bytes()
    new = tmp_path / "new"
    resumed = train.main(["--resume", str(run / "last.pth"), "--run_dir", str(new), "--num_epochs", "1",
                          "--progress", "off"])
    assert (new / "best.pth").read_bytes() == best_bytes
    assert "copied the resumed run's best.pth" in (new / "train.log").read_text()
    # the test split evaluated from best.pth, as the original run would have
    evaluated = train.main(["--resume", str(run / "last.pth"), "--num_epochs", "1", "--progress", "off"])
    assert resumed["test"] == evaluated["test"] and resumed["test"]["rsum"] > 0
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copyfile(run / "last.pth", alone / "last.pth")
    result = train.main(["--resume", str(alone / "last.pth"), "--num_epochs", "1", "--progress", "off"])
    assert "test" not in result and not (alone / "best.pth").exists()
    log = (alone / "train.log").read_text()
    assert f"{alone} holds no best.pth, and no best.pth with the resumed run's best rsum" in log
    assert "--test_split test was not evaluated" in log
    assert "nothing to train (raise --num_epochs to continue it)" in (new / "train.log").read_text()
    train.main(["--resume", str(run / "last.pth"), "--max_steps", "7", "--progress", "off"])
    assert _final_state(run)["step"] == 7
    err = _error(capsys, ["--resume", str(run / "last.pth"), "--num_epochs", "1", "--progress", "off"])
    assert "--num_epochs 1: the resumed run is at epoch 1 (after 1 steps of it); pass --num_epochs 2" in err
    err = _error(capsys, ["--resume", str(run / "best.pth"), "--max_steps", "8", "--progress", "off"])
    assert "already holds last.pth (resuming" in err and "would overwrite it with an earlier state" in err
    assert _final_state(run)["step"] == 7


def test_too_few_items_or_pairs_per_process_are_errors(tmp_path, capsys, monkeypatch):
    """One training item gives no negatives; one pair per process (global batch 2 over 2 processes)
    would give the region MLP's BatchNorm one value per channel."""
    import numpy as np

    rng = np.random.default_rng(0)
    for split, n in (("train", 1), ("dev", 2)):
        np.save(tmp_path / f"{split}_ims.npy", rng.standard_normal((n, 3, 8)).astype(np.float32))
        (tmp_path / f"{split}_caps.txt").write_text("".join(f"a red dog number {i}\n" for i in range(5 * n)))
    args = ["--data_path", str(tmp_path), "--text_encoder", "gru", "--embed_size", "8", "--batch_size", "4",
            "--workers", "0", "--progress", "off"]
    err = _error(capsys, args + ["--run_dir", str(tmp_path / "r1")])
    assert "train_ims.npy: 1 training item" in err and "at least 2" in err
    monkeypatch.setattr(train.vdist, "init_distributed", lambda device: DistContext(world_size=2))
    err = _error(capsys, args + ["--run_dir", str(tmp_path / "r2"), "--batch_size", "2"])
    assert "--batch_size 2 over 2 processes leaves one pair per process" in err


def test_errors_raised_in_loader_workers_print_their_own_message():
    from torch._utils import ExceptionWrapper

    from vse_fast.data import DataError, error_message

    try:
        raise DataError("/data/train_caps.txt:7: empty caption")
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataError) as exc:
        wrapped.reraise()
    assert str(exc.value).startswith("Caught DataError")
    assert error_message(exc.value) == "/data/train_caps.txt:7: empty caption"
    assert error_message(DataError("plain")) == "plain"


def test_the_published_dev_cut_is_logged(tiny, tmp_path, monkeypatch):
    """vse_fast.eval evaluates "dev" on its first DEV_CAPTION_LIMIT captions (COCO's published 5000), in
    whole items: a run validating on a larger dev split says so."""
    import vse_fast.eval

    monkeypatch.setattr(vse_fast.eval, "DEV_CAPTION_LIMIT", 27)  # the tiny dev split: 12 items x 5 captions
    train.main(_args(tiny, tmp_path / "r", "--max_steps", "0"))
    log = (tmp_path / "r" / "train.log").read_text()
    assert "split dev is evaluated on its first 5 items (25 of 60 captions)" in log


def test_collapse_is_warned_in_the_training_loop_under_vse_plus_plus_only(tiny, tmp_path, monkeypatch):
    """Under VSE0 the check would warn at every logged step of the warm-up (VSE0's loss of identical
    embeddings is also within reach of a fresh model)."""
    real = train.compute_loss

    def collapsed(model, batch, ctx, **kw):  # every embedding identical (keeps the graph)
        _, img, cap = real(model, batch, ctx, **kw)
        same = img * 0 + img.shape[1] ** -0.5
        from vse_fast.distributed import global_contrastive_loss

        loss = global_contrastive_loss(same, cap * 0 + img.shape[1] ** -0.5, ctx, margin=kw["margin"],
                                       max_violation=kw["max_violation"])
        return loss, same, same

    monkeypatch.setattr(train, "compute_loss", collapsed)
    # epoch 0 (steps 1-6): the published VSE0 warm-up, where a fresh model sits near that loss too and
    # no warning is due; epoch 1: VSE++, warned at its first logged step
    train.main(_args(tiny, tmp_path / "c", "--max_steps", "8", "--pooling", "mean", "--loss_backend", "torch"))
    log = (tmp_path / "c" / "train.log").read_text()
    assert "VSE0 (sum) loss" in log and "VSE++ (hardest negatives) loss" in log
    assert log.count("training has collapsed") == 1
    assert "collapsed at step 8" in log and "2*B*margin" in log


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_non_finite_loss_stops_training(tiny, tmp_path, monkeypatch, capsys, precision):
    """Every precision stops at the next logged step and names the first bad one: the loss is fp32
    from l2-normalised embeddings, so NaN means a NaN forward, which fp16's GradScaler cannot undo
    (it went on for 17 skipped steps, with NaN BatchNorm statistics)."""
    real = train.compute_loss

    def nan_loss(*args, **kw):
        loss, img, cap = real(*args, **kw)
        return loss * float("nan"), img, cap

    monkeypatch.setattr(train, "compute_loss", nan_loss)
    err = _error(capsys, _args(tiny, tmp_path / "n", "--precision", precision, "--batch_size", "8", "--max_steps", "30"))
    assert "error: the loss became NaN or inf at step 1 (epoch 0)" in err and "Traceback" not in err
    assert ("fp16 overflow" in err) == (precision == "fp16")
    assert "ERROR the loss became NaN or inf at step 1 " in (tmp_path / "n" / "train.log").read_text()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_nan_training_feature_is_named_by_file_and_item(tiny, tmp_path, capsys, precision):
    """A NaN feature in one batch, at a step that is not logged: fp16's GradScaler skipped that step
    and training went on with NaN BatchNorm statistics, found (if at all) at the epoch's end as weights
    gone non-finite; then the next logged step named the step of the NaN loss, not the data. Now the
    first batch that reads the item stops the run with the file and the item."""
    import numpy as np

    copy = tmp_path / "data"
    shutil.copytree(tiny[0], copy)
    feats = np.load(copy / "train_ims.npy")
    feats[:, 0, 0] = np.nan  # every item: the first step's batch holds one
    np.save(copy / "train_ims.npy", feats)
    err = _error(capsys, _args((str(copy), tiny[1]), tmp_path / "r", "--vocab_file", str(copy / "vocab.txt"),
                               "--precision", precision, "--log_step", "3", "--max_steps", "5"))
    assert re.search(r"error: .*train_ims\.npy: item \d+ holds NaN or inf in its valid rows", err), err
    assert "Traceback" not in err
    assert not (tmp_path / "r" / "last.pth").exists()


def test_an_fp16_nan_loss_skipped_by_the_scaler_still_stops_training(tiny, tmp_path, monkeypatch, capsys):
    """One NaN loss at an unlogged step: fp16's GradScaler skips that step, so the weights and the
    next logged loss stay finite; the device-side record of the first bad step still stops the run."""
    real = train.compute_loss
    calls = []

    def nan_once(*args, **kw):
        loss, img, cap = real(*args, **kw)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 1 else loss), img, cap

    monkeypatch.setattr(train, "compute_loss", nan_once)
    err = _error(capsys, _args(tiny, tmp_path / "n", "--precision", "fp16", "--log_step", "3", "--max_steps", "5"))
    assert "error: the loss became NaN or inf at step 1 (epoch 0)" in err and "fp16 overflow" in err
    log = (tmp_path / "n" / "train.log").read_text()
    assert "step 3/6 (total 3) loss nan" not in log and "ERROR the loss became NaN or inf at step 1 " in log


def test_an_epoch_end_writes_best_pth_before_last_pth(tiny, tmp_path, monkeypatch):
    """Each written atomically, best first: a kill between them never leaves a last.pth recording a best
    rsum that best.pth does not hold (it replays the epoch instead)."""
    import vse_fast.checkpoint as checkpoint

    written, real = [], checkpoint.save_checkpoint

    def recording(path, state):
        written.append((os.path.basename(path), state["best_rsum"]))
        return real(path, state)

    monkeypatch.setattr(checkpoint, "save_checkpoint", recording)
    train.main(_args(tiny, tmp_path / "r", "--num_epochs", "1"))
    best = [i for i, (name, _) in enumerate(written) if name == "best.pth"]
    assert best and written[best[-1] + 1][0] == "last.pth" and written[best[-1] + 1][1] == written[best[-1]][1]
    assert not list((tmp_path / "r").glob("*.tmp"))


def test_best_pth_follows_the_best_rsum_so_far_and_a_tie_keeps_the_earlier_epoch(tmp_path):
    """Published: is_best = rsum > best_rsum, best_rsum = max(rsum, best_rsum). Keeping the last epoch's
    rsum let a worse epoch that beats the one before overwrite best.pth; >= let a tie (recalls are
    multiples of 100/N) replace it. Trainer.fit on stubbed training, evaluation and saving."""
    rsums = iter([10.0, 12.0, 11.0, 12.0, 9.0])
    t = train.Trainer.__new__(train.Trainer)
    t.cfg = dict(train.PUBLISHED_DEFAULTS, num_epochs=5, run_dir=str(tmp_path), lr_update=100)
    t.ctx = DistContext()
    t.optimizer = torch.optim.AdamW([dict(params=[torch.nn.Parameter(torch.zeros(1))], lr=1.0, base_lr=1.0)])
    t.epoch = t.epoch_step = t.step = 0
    t.steps_per_epoch = 1
    t.best_rsum = -math.inf
    t.train_epoch = lambda max_violation: True
    t.evaluate = lambda split: {"rsum": next(rsums)}
    saves = []
    t.save = lambda *names: saves.append((t.epoch - 1, names, t.best_rsum))
    result = t.fit()
    assert [epoch for epoch, names, _ in saves if "best.pth" in names] == [0, 1]  # not 3, which ties 1
    assert [best for _, _, best in saves] == [10.0, 12.0, 12.0, 12.0, 12.0]
    assert result["best_rsum"] == 12.0


def test_a_max_steps_stop_checks_the_loss_before_writing_last_pth(tiny, tmp_path, monkeypatch, capsys):
    """The --max_steps stop writes last.pth: its step is a logged one, so a NaN loss there is an error
    and no NaN model is saved (step 1 is not a --log_step 2 step)."""
    real = train.compute_loss

    def nan_loss(*args, **kw):
        loss, img, cap = real(*args, **kw)
        return loss * float("nan"), img, cap

    monkeypatch.setattr(train, "compute_loss", nan_loss)
    err = _error(capsys, _args(tiny, tmp_path / "m", "--max_steps", "1"))
    assert "error: the loss became nan at step 1 " in err
    assert not (tmp_path / "m" / "last.pth").exists()


def test_the_default_precision_on_the_cpu_is_fp32():
    """--precision help: bf16 by default only on CUDA GPUs that support it; a CPU default of bf16 would
    autocast every CPU run silently (the bf16 run below passes --precision)."""
    assert train._choose_precision({"precision": None}, torch.device("cpu")) == "fp32"
    for precision in ("fp32", "bf16", "fp16"):  # an explicit choice is kept
        assert train._choose_precision({"precision": precision}, torch.device("cpu")) == precision


def test_bf16_autocast_runs_on_cpu(tiny, tmp_path):
    result = train.main(_args(tiny, tmp_path / "bf", "--precision", "bf16", "--max_steps", "2"))
    assert result["step"] == 2
    state = _final_state(tmp_path / "bf")
    assert state["config"]["precision_used"] == "bf16"
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("enc_type, scheme, extra, rates", [
    ("basic", "row", [], (0.2, 0.2)),  # published size / caption augmentation
    ("backbone", "grid", ["--feature_drop", "0.3", "--token_aug", "0.1"], (0.3, 0.1)),
])
def test_training_set_augments_with_the_options_and_the_encoders_published_scheme(tiny, tmp_path, monkeypatch,
                                                                                  enc_type, scheme, extra, rates):
    """--feature_drop / --token_aug reach the training set: passing 0 instead turned the published
    augmentation off with nothing else changed."""
    from vse_fast import data

    real, seen = data.PrecomputedDataset, []

    def recording(*args, **kw):
        seen.append((kw["feature_drop_scheme"], kw["feature_drop"], kw["token_aug"]))
        return real(*args, **kw)

    monkeypatch.setattr(data, "PrecomputedDataset", recording)
    train.main(_args(tiny, tmp_path / enc_type, "--precomp_enc_type", enc_type, "--max_steps", "1", *extra))
    assert seen == [(scheme, *rates)]


def test_validation_runs_in_fp32_whatever_the_training_precision(tiny, tmp_path, monkeypatch):
    """As the published validate(): each epoch's evaluation (which selects best.pth) and the final test
    encode in fp32, also when training autocasts to bf16."""
    import vse_fast.eval

    real, seen = vse_fast.eval.evaluate, []

    def recording(*args, **kw):
        seen.append(kw["precision"])
        return real(*args, **kw)

    monkeypatch.setattr(vse_fast.eval, "evaluate", recording)
    train.main(_args(tiny, tmp_path / "v", "--precision", "bf16", "--num_epochs", "1"))
    assert seen == ["fp32", "fp32"]  # the epoch's dev evaluation, then the test split


def test_compute_loss_single_process_is_the_batch_loss():
    from vse_fast.model import build_model
    from vse_fast.ops.contrastive import contrastive_loss

    model = build_model(dict(embed_size=16, img_dim=8, text_encoder="gru", vocab_size=20, word_dim=8))
    batch = dict(images=torch.randn(5, 3, 8), img_lengths=torch.tensor([3, 1, 2, 3, 2]),
                 captions=torch.randint(1, 20, (5, 4)), cap_lengths=torch.tensor([4, 2, 3, 1, 4]))
    loss, img, cap = train.compute_loss(model, batch, DistContext(), margin=0.2, max_violation=True)
    torch.testing.assert_close(loss, contrastive_loss(img, cap, margin=0.2, max_violation=True))


@pytest.mark.parametrize("scale", [None, 2.0 ** 4])  # fp32 (scaler off), fp16's GradScaler
def test_train_step_clips_the_unscaled_gradient_norm_to_grad_clip(scale):
    """The optimizer gets the gradients scaled down to norm grad_clip, direction kept. Nothing compared
    train_step's gradients with anything but another train_step: a clip at another value, no clip, or
    (fp16) a clip of the still-scaled gradients, which shrinks every step by the scale, all passed."""
    from vse_fast.model import build_model

    batch = random_batch(8, torch.Generator().manual_seed(5), max_set=5, max_caption=7)

    def step(grad_clip):
        torch.manual_seed(0)
        model = build_model(dict(embed_size=16, img_dim=16, text_encoder="gru", vocab_size=40, word_dim=8,
                                 precomp_enc_type="backbone", pooling="mean"))
        scaler = torch.amp.GradScaler("cpu", enabled=scale is not None, init_scale=scale or 1.0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: p.grad is what the step was given
        train.train_step(model, batch, optimizer, scaler, DistContext(), margin=0.2, max_violation=False,
                         grad_clip=grad_clip, loss_backend="torch")
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return grads, torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])).item()

    raw, raw_norm = step(0.0)  # no clipping
    clip = raw_norm / 8
    clipped, norm = step(clip)
    assert norm == pytest.approx(clip, rel=1e-4)
    for name, grad in raw.items():
        torch.testing.assert_close(clipped[name], grad * (clip / raw_norm), rtol=1e-4, atol=1e-9)


def test_resume_after_a_kill_mid_save_tidies_the_run_dir(tiny, tmp_path):
    """A kill after an epoch's metrics.jsonl line but before its last.pth, or during a save, leaves a
    duplicate-to-be line, a cut-off line and hidden temporaries: the resumed run drops the lines past
    its checkpoint and removes our temporaries (only those), so each epoch is listed once."""
    run = tmp_path / "r"
    train.main(_args(tiny, run, "--max_steps", "6"))  # epoch 0 evaluated and saved; last.pth at epoch 1
    assert [m["epoch"] for m in _metrics(run)] == [0]
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 1, "step": 12, "rsum": 1.0}) + "\n" + '{"epoch": 2, "st')
    stale = [run / f".last.pth.{'a' * 32}.tmp", run / f".best.pth.{'0' * 32}.tmp"]
    other = run / ".last.pth.mine.tmp"
    for path in stale + [other]:
        path.write_bytes(b"partial")
    train.main(["--resume", str(run / "last.pth"), "--progress", "off"])
    assert [m["epoch"] for m in _metrics(run)] == [0, 1] and _metrics(run)[1]["rsum"] != 1.0
    assert not any(path.exists() for path in stale) and other.exists()
    log = (run / "train.log").read_text()
    assert "dropped 2 line(s) past the resumed checkpoint (epoch 1)" in log
    assert f"removed {stale[0]}, left by a save of last.pth that was interrupted" in log


def test_weights_gone_non_finite_in_an_epochs_last_step_are_named(tiny, tmp_path, capsys):
    """The logged loss precedes the step, so a step that makes the weights NaN/inf at an epoch's end
    reached the evaluation, which blamed the features in a traceback."""
    err = _error(capsys, _args(tiny, tmp_path / "r", "--batch_size", "200", "--num_epochs", "1",
                               "--learning_rate", "1e37", "--grad_clip", "0"))
    assert "the model's weights became NaN or inf by step 1 (epoch 0), before evaluating dev" in err
    assert "Traceback" not in err
    err = _error(capsys, _args(tiny, tmp_path / "s", "--batch_size", "40", "--learning_rate", "1e37",
                               "--grad_clip", "0", "--save_steps", "1"))  # never a last.pth to resume into NaN
    assert "before writing last.pth: lower --learning_rate" in err and not (tmp_path / "s" / "last.pth").exists()


def test_resume_with_another_val_split_chooses_the_best_anew(tiny, tmp_path):
    """A best rsum measured on dev is not compared with rsums on test."""
    run = tmp_path / "r"
    train.main(_args(tiny, run, "--batch_size", "80", "--num_epochs", "1"))
    dev_best = _final_state(run)["best_rsum"]
    result = train.main(["--resume", str(run / "last.pth"), "--num_epochs", "2", "--val_split", "test",
                         "--progress", "off"])
    assert result["best_rsum"] == result["val"]["rsum"] and math.isfinite(dev_best)
    log = (run / "train.log").read_text()
    assert f"the resumed run's best rsum {dev_best:.2f} was measured on dev; the best checkpoint is chosen anew" in log


def test_the_weights_are_checked_once_per_epoch_end_and_the_test_split_gets_best_pth(tiny, tmp_path, monkeypatch):
    """The epoch's evaluation and its checkpoint see the same weights: one walk over them, not two.
    Epoch 0 is made the best (dev rsum 100, then 50): the final test evaluation must load best.pth's
    weights, not keep the last epoch's (in runs whose last epoch is also the best they agree)."""
    import vse_fast.eval
    from vse_fast.checkpoint import load_checkpoint

    walks = []
    real = train.Trainer._weights_finite
    monkeypatch.setattr(train.Trainer, "_weights_finite", lambda self: walks.append(self.step) or real(self))
    real_evaluate, dev_rsums, tested = vse_fast.eval.evaluate, iter([100.0, 50.0]), []

    def evaluate(model, data_path, split, **kw):
        metrics = real_evaluate(model, data_path, split, **kw)
        if split == "dev":
            metrics["rsum"] = next(dev_rsums)
        else:
            tested.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return metrics

    monkeypatch.setattr(vse_fast.eval, "evaluate", evaluate)
    result = train.main(_args(tiny, tmp_path / "r", "--batch_size", "120", "--pooling", "mean",
                              "--loss_backend", "torch"))
    assert walks == [2, 4]
    assert result["best_rsum"] == 100.0 and len(tested) == 1
    best = load_checkpoint(str(tmp_path / "r" / "best.pth"))["model"]
    last = _final_state(tmp_path / "r")["model"]
    assert any(not torch.equal(best[k], last[k]) for k in best)  # the premise: epoch 1 changed the weights
    for key, value in best.items():
        assert torch.equal(tested[0][key], value), key


def test_kmax_with_k_at_least_every_set_says_it_is_mean_pooling(tiny, tmp_path):
    train.main(_args(tiny, tmp_path / "k", "--pooling", "kmax", "--pool_k", "1000", "--max_steps", "1"))
    log = (tmp_path / "k" / "train.log").read_text()
    assert "--pool_k 1000 is not below the largest training set" in log and "is mean pooling" in log
    train.main(_args(tiny, tmp_path / "j", "--pooling", "kmax", "--pool_k", "2", "--max_steps", "1"))
    assert "is not below the largest training set" not in (tmp_path / "j" / "train.log").read_text()


def test_a_run_dir_holding_another_runs_records_is_refused(tiny, tmp_path, capsys):
    """Only another run's last.pth used to protect a --run_dir: a fresh run appended its metrics to an
    earlier run's metrics.jsonl, and a run resumed into a directory holding another run's best.pth kept
    that file and reported its test figures from those weights."""
    run = tmp_path / "r"
    train.main(_args(tiny, run, "--max_steps", "6"))  # one whole epoch: best.pth, metrics.jsonl, last.pth
    stale = tmp_path / "stale"
    stale.mkdir()
    shutil.copyfile(run / "metrics.jsonl", stale / "metrics.jsonl")
    err = _error(capsys, _args(tiny, stale))
    assert f"--run_dir '{stale}' holds metrics.jsonl of another run (and no last.pth to continue it)" in err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    shutil.copyfile(run / "best.pth", foreign / "best.pth")
    err = _error(capsys, ["--resume", str(run / "last.pth"), "--run_dir", str(foreign), "--progress", "off"])
    assert "holds best.pth of another run" in err
    assert (stale / "metrics.jsonl").read_text() == (run / "metrics.jsonl").read_text()  # left as it was


def test_default_run_dirs_of_runs_started_in_the_same_second_differ(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train.time, "strftime", lambda fmt: "20261129-120000")
    first, second = train._new_default_run_dir(), train._new_default_run_dir()
    assert (first, second) == (os.path.join("runs", "20261129-120000"), os.path.join("runs", "20261129-120000-2"))
    assert os.path.isdir(first) and os.path.isdir(second)


def test_resume_on_another_dataset_says_so_and_chooses_the_best_anew(tiny, tmp_path):
    """A changed --data_path was taken silently, and the best rsum of the old data compared with the new."""
    data, bert_config = tiny
    other = tmp_path / "other"
    shutil.copytree(data, other)  # another dataset (here a copy, at another path that still has the old one)
    run = tmp_path / "r"
    train.main(_args(tiny, run, "--batch_size", "80", "--num_epochs", "1"))
    best = _final_state(run)["best_rsum"]
    result = train.main(["--resume", str(run / "last.pth"), "--num_epochs", "2", "--data_path", str(other),
                         "--progress", "off"])
    assert result["best_rsum"] == result["val"]["rsum"] and math.isfinite(best)
    log = (run / "train.log").read_text()
    assert (f"--data_path {other}: the resumed run trained on {data}; its best rsum {best:.2f} was measured "
            "there, so the best checkpoint is chosen anew") in log


def test_a_bigru_run_resumed_into_another_directory_takes_its_vocabulary_along(tiny, tmp_path):
    """The vocabulary built from the captions is written beside the run's checkpoints: resumed into
    --run_dir NEW, the new checkpoints named the old directory's vocab.json, and evaluation and resume
    failed once that directory was removed."""
    from vse_fast.eval import main as eval_main

    data, _ = tiny
    old, new = tmp_path / "old", tmp_path / "new"
    args = ["--data_path", data, "--text_encoder", "gru", "--embed_size", "16", "--batch_size", "40",
            "--num_epochs", "1", "--lr_update", "1", "--max_steps", "2", "--workers", "0", "--progress", "off"]
    train.main(args + ["--run_dir", str(old)])
    train.main(["--resume", str(old / "last.pth"), "--run_dir", str(new), "--max_steps", "3", "--progress", "off"])
    assert _final_state(new)["config"]["vocab_file"] == str(new / "vocab.json")
    assert (new / "vocab.json").read_bytes() == (old / "vocab.json").read_bytes()
    shutil.rmtree(old)
    assert eval_main(["--checkpoint", str(new / "last.pth"), "--data_path", data, "--split", "test"])["rsum"] > 0


def test_options_that_would_have_no_effect_are_refused_or_warned(tiny, tmp_path, capsys):
    err = _error(capsys, _args(tiny, tmp_path / "a", "--max_violation", "--vse_mean_warmup_epochs", "2"))
    assert "--max_violation takes hardest negatives from the first epoch, so --vse_mean_warmup_epochs 2" in err
    run = tmp_path / "r"
    train.main(_args(tiny, run, "--max_steps", "2", "--num_epochs", "1", "--local_negatives", "--chunk_size", "39"))
    log = (run / "train.log").read_text()
    assert "--local_negatives has no effect in a single process" in log
    assert "--chunk_size 39 leaves the per-process batch of 40 pairs in one piece" in log
    assert "--lr_update 1 is not below --num_epochs 1: the learning rate is never decayed" in log
    err = _error(capsys, ["--resume", str(run / "last.pth"), "--max_steps", "1", "--progress", "off"])
    assert "--max_steps 1: the resumed run has made 2 steps already" in err


def test_a_bert_directory_must_agree_with_the_vocab_file_on_a_fresh_run_only_and_trains_in_train_mode(
        tiny, tmp_path, capsys, monkeypatch):
    """--text_model DIR --vocab_file V with another vocabulary in DIR would index DIR's pretrained word
    embeddings by V's ids: refused on a fresh run. A resumed run's embeddings come from its checkpoint,
    trained with V's ids, so it continues (runs started before the check existed).
    from_pretrained returns BERT in eval mode: without train_epoch's train() the first epoch (and a
    resumed one) would train without dropout; a --bert_config BERT starts in train mode and cannot tell."""
    from transformers import BertConfig, BertModel

    data, bert_config = tiny
    bert_dir = tmp_path / "bert"
    BertModel(BertConfig.from_json_file(bert_config)).save_pretrained(str(bert_dir))
    words = open(os.path.join(data, "vocab.txt")).read().splitlines()
    (bert_dir / "vocab.txt").write_text("\n".join(words[:5] + words[5:][::-1]) + "\n")
    args = _args(tiny, tmp_path / "r", "--text_model", str(bert_dir), "--max_steps", "2")
    del args[args.index("--bert_config"):args.index("--bert_config") + 2]
    assert "hold different vocabularies" in _error(capsys, args)
    real, modes = train.train_step, []

    def spy(model, *a, **kw):
        modes.append(all(m.training for m in model.modules()))
        return real(model, *a, **kw)

    monkeypatch.setattr(train, "train_step", spy)
    shutil.copyfile(os.path.join(data, "vocab.txt"), bert_dir / "vocab.txt")  # agreeing: trains
    train.main(args)
    assert modes == [True, True]
    (bert_dir / "vocab.txt").write_text("\n".join(words[:5] + words[5:][::-1]) + "\n")  # as an older run
    train.main(["--resume", str(tmp_path / "r" / "last.pth"), "--max_steps", "3", "--progress", "off"])
    assert _final_state(tmp_path / "r")["step"] == 3 and modes == [True, True, True]
