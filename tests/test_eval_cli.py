"""`python -m vse_fast.eval`, `evaluate()` and the inference API on a tiny handwritten split:
embeddings against an independent per-item encoding, metrics against the published functions,
5-fold, other caption counts, ensembles, published checkpoints, clear errors."""
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from tests.published.evaluation import compute_sim, ensemble_sims, evaluate_sims, fold5
from tests.published.model import build_published, published_checkpoint, published_opt
from vse_fast import data
from vse_fast.checkpoint import (FORMAT, load_any_checkpoint, load_model_checkpoint, load_published_checkpoint,
                                 save_checkpoint)
from vse_fast.eval import encode_split, evaluate, main
from vse_fast.inference import Encoder, search
from vse_fast.model import build_model

pytestmark = pytest.mark.usefixtures("cpu_runs")  # training and evaluation on the CPU, GPU or not

transformers = pytest.importorskip("transformers")

WORDS = ["a", "red", "blue", "green", "dog", "cat", "car", "man", "on", "the", "grass", "street", "sofa", "with"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [".", ","]
IMG_DIM, K = 13, 6
METRICS = ["i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr", "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr",
           "t2i_meanr"]


def write_split(root, split, n_items, caps, rng):
    feats = rng.standard_normal((n_items, K, IMG_DIM)).astype(np.float32)
    lens = rng.integers(1, K + 1, n_items)
    lens[0], lens[-1] = K, 1
    for i, n in enumerate(lens):
        feats[i, n:] = 0
    np.save(root / f"{split}_ims.npy", feats)
    np.save(root / f"{split}_lens.npy", lens.astype(np.int64))
    lines = []
    while len(lines) < n_items * caps:  # distinct captions: no exact ties, whose order a last-bit difference
        # between our encoding and the independent one would decide
        line = " ".join(rng.choice(WORDS, rng.integers(2, 8))) + ("." if len(lines) % 2 else "")
        if line not in lines:
            lines.append(line)
    (root / f"{split}_caps.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    write_split(root, "train", 6, 5, rng)
    write_split(root, "test", 10, 5, rng)  # 5 captions per item: coco mode, 5 folds of 2
    write_split(root, "pairs", 7, 2, rng)  # 2 captions per item
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return root


def bert_config():
    return transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=37, max_position_embeddings=32)


def bert_model(seed=0):
    torch.manual_seed(seed)
    return build_model(dict(embed_size=16, img_dim=IMG_DIM, bert_config_dict=bert_config().to_dict()),
                       gpo_backend="torch").eval()


def save_ours(model, path, **config):
    save_checkpoint(str(path), {"format": FORMAT, "model": model.state_dict(), "epoch": 1, "step": 5,
                                "config": {"model": model.opt, **config}})
    return str(path)


def independent_embeddings(model, root, split, tokenizer):
    """One forward per item and per caption (no padding), captions tokenized by the HF tokenizer."""
    feats, lens = np.load(root / f"{split}_ims.npy"), np.load(root / f"{split}_lens.npy")
    caps = (root / f"{split}_caps.txt").read_text().splitlines()
    with torch.no_grad():
        img = torch.cat([model.encode_images(torch.from_numpy(f[None, :n]), torch.tensor([n]))
                         for f, n in zip(feats, lens)])
        ids = [torch.tensor(tokenizer(c)["input_ids"]) for c in caps]
        cap = torch.cat([model.encode_captions(t[None], torch.tensor([len(t)])) for t in ids])
    return img, cap


def as_dict(numbers):
    return dict(zip(METRICS + ["ar", "ari", "rsum"], numbers))


def assert_metrics_equal(got, expected):
    for key in METRICS + ["rsum"]:
        assert got[key] == pytest.approx(expected[key], abs=1e-9), key


def test_help():
    out = subprocess.run([sys.executable, "-m", "vse_fast.eval", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--checkpoint", "--data_path", "--split", "--fold5", "--published", "--text_model", "--gpo_backend"):
        assert flag in out.stdout


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_precision_applies_on_the_cpu_too(dataset, precision):
    """As training's --precision: autocast on the model's device, CPU included (it was silently fp32
    there). The embeddings move by 16-bit rounding, no more."""
    model = bert_model()
    tok = data.load_tokenizer(vocab_file=str(dataset / "vocab.txt"))
    full = encode_split(model, str(dataset), "test", tok)
    half = encode_split(model, str(dataset), "test", tok, precision=precision)
    for a, b in zip(half[:2], full[:2]):
        assert a.dtype == torch.float32 and not torch.equal(a, b)
        torch.testing.assert_close(a, b, atol=5e-2, rtol=0)
    enc = Encoder(model, tok, precision=precision)
    assert not torch.equal(enc.encode_captions(["a red dog"]), Encoder(model, tok).encode_captions(["a red dog"]))


def test_evaluate_matches_published_protocol(dataset):
    model = bert_model()
    tok = data.load_tokenizer(vocab_file=str(dataset / "vocab.txt"))
    img, cap, caps = encode_split(model, str(dataset), "test", tok, batch_size=3)
    assert caps == 5 and img.shape == (10, 16) and cap.shape == (50, 16)
    ref_img, ref_cap = independent_embeddings(model, dataset, "test", tok)
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cap, ref_cap, atol=1e-5, rtol=1e-5)
    whole = encode_split(model, str(dataset), "test", tok, batch_size=2**63)  # beyond sys.maxsize: the whole split
    torch.testing.assert_close(whole[:2], (img, cap), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="device meta differs from the model's device cpu: move the model"):
        encode_split(model, str(dataset), "test", tok, device="meta")
    sims = compute_sim(img.double().numpy(), cap.double().numpy())
    model.train()
    metrics = evaluate(model, str(dataset), "test", batch_size=4)  # tokenizer found in data_path
    assert model.training  # mode restored
    assert_metrics_equal(metrics, as_dict(evaluate_sims(10, sims, caps=5)))
    folds = evaluate(model, str(dataset), "test", batch_size=4, tokenizer=tok, fold5=True)
    mean, per_fold = fold5(img.double().numpy(), cap.double().numpy(), caps=5)
    assert_metrics_equal(folds, as_dict(mean))
    assert [f["rsum"] for f in folds["folds"]] == pytest.approx([f[-1] for f in per_fold])
    assert_metrics_equal(folds["all"], metrics)
    limited = evaluate(model, str(dataset), "test", batch_size=4, tokenizer=tok, caption_limit=10)  # 2 items
    assert_metrics_equal(limited, as_dict(evaluate_sims(2, sims[:2, :10], caps=5)))
    one = evaluate(model, str(dataset), "test", batch_size=4, tokenizer=tok, caption_limit=5)  # >= 1 item's: allowed
    assert_metrics_equal(one, as_dict(evaluate_sims(1, sims[:1, :5], caps=5)))
    with pytest.raises(ValueError, match="caption_limit 12 is not a multiple of 5"):  # never rounded down
        evaluate(model, str(dataset), "test", tokenizer=tok, caption_limit=12)


def test_gru_model_other_caption_count(dataset, tmp_path):
    vocab = data.Vocabulary.build((dataset / "train_caps.txt").read_text().splitlines(), threshold=1)
    vocab.save(str(tmp_path / "vocab.json"))
    model = build_model(dict(embed_size=16, img_dim=IMG_DIM, text_encoder="gru", vocab_size=len(vocab), word_dim=8),
                        gpo_backend="torch").eval()
    path = save_ours(model, tmp_path / "gru.pth", vocab_file=str(tmp_path / "vocab.json"))
    metrics = main(["--checkpoint", path, "--data_path", str(dataset), "--split", "pairs", "--batch_size", "3"])
    img, cap, caps = encode_split(model, str(dataset), "pairs", vocab)
    assert caps == 2
    sims = compute_sim(img.double().numpy(), cap.double().numpy())
    assert_metrics_equal(metrics, as_dict(evaluate_sims(7, sims, caps=2)))
    # the run directory moved: the vocabulary the checkpoint names is gone, the one beside it is used
    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "gru.pth").rename(moved / "gru.pth")
    (tmp_path / "vocab.json").rename(moved / "vocab.json")
    again = main(["--checkpoint", str(moved / "gru.pth"), "--data_path", str(dataset), "--split", "pairs"])
    assert_metrics_equal(again, metrics)
    enc = Encoder.from_checkpoint(str(moved / "gru.pth"))
    assert enc.tokenize("a red dog") == vocab.encode("a red dog")
    (moved / "vocab.json").unlink()
    with pytest.raises(ValueError, match="vocab.json does not exist .*pass --vocab_file"):
        Encoder.from_checkpoint(str(moved / "gru.pth"))


def test_cli_checkpoint_ensemble_and_json(dataset, tmp_path, capsys):
    models = [bert_model(seed) for seed in (1, 2)]
    paths = [save_ours(m, tmp_path / f"m{i}.pth") for i, m in enumerate(models)]
    out_json = tmp_path / "metrics.json"
    single = main(["--checkpoint", paths[0], "--data_path", str(dataset), "--json", str(out_json)])
    printed, err = capsys.readouterr()
    assert "note: 10 items: text->image R@10 is 100 by construction" in err
    assert "R@1" in printed and f"rsum {single['rsum']:.1f}" in printed
    assert json.loads(out_json.read_text())["rsum"] == pytest.approx(single["rsum"])
    # --json through a link to a file not yet written: the early writability probe leaves the link
    # and creates nothing when the run then fails; a run that succeeds writes through it
    (tmp_path / "out").mkdir()
    link = tmp_path / "m.json"
    link.symlink_to(tmp_path / "out" / "metrics.json")
    with pytest.raises(SystemExit):
        main(["--checkpoint", paths[0], "--data_path", str(dataset), "--json", str(link), "--split", "nope"])
    assert link.is_symlink() and not (tmp_path / "out" / "metrics.json").exists()
    main(["--checkpoint", paths[0], "--data_path", str(dataset), "--json", str(link)])
    assert link.is_symlink() and json.loads((tmp_path / "out" / "metrics.json").read_text())["rsum"] > 0
    tok = data.load_tokenizer(vocab_file=str(dataset / "vocab.txt"))
    embs = [encode_split(m, str(dataset), "test", tok)[:2] for m in models]
    assert_metrics_equal(single, as_dict(evaluate_sims(10, compute_sim(*[e.double().numpy() for e in embs[0]]))))
    both = main(["--checkpoint", paths[0], "--checkpoint", paths[1], "--data_path", str(dataset), "--fold5"])
    pairs = [(i.double().numpy(), c.double().numpy()) for i, c in embs]
    assert_metrics_equal(both["all"], as_dict(evaluate_sims(10, ensemble_sims(pairs))))
    printed, err = capsys.readouterr()
    assert ("note: each of the 5 folds has 2 items: text->image R@5, text->image R@10, image->text R@10 "
            "are 100 by construction") in err
    assert "note: all 10 items: text->image R@10 is 100 by construction" in err
    assert "mean of 5 folds of 2 items\n" in printed and "all 10 items\n" in printed
    assert "COCO" not in printed  # 10 items are not the COCO 1K/5K protocols


def test_an_explicit_text_model_wins_over_the_vocab_file_the_checkpoint_names(dataset, tmp_path):
    """A run copied to another machine: its config names a vocab.txt that is gone; an explicit
    --text_model directory holding the tokenizer is used (and so is an explicit --vocab_file)."""
    model = bert_model(1)
    path = save_ours(model, tmp_path / "m.pth", vocab_file=str(tmp_path / "gone" / "vocab.txt"))
    folder = str(tmp_path / "tokenizer")
    data.load_tokenizer(vocab_file=str(dataset / "vocab.txt")).save_pretrained(folder)
    expected = evaluate(model, str(dataset), "test", tokenizer=data.load_tokenizer(text_model_dir=folder))
    assert_metrics_equal(main(["--checkpoint", path, "--data_path", str(dataset), "--text_model", folder]), expected)
    assert_metrics_equal(main(["--checkpoint", path, "--data_path", str(dataset),
                               "--vocab_file", str(dataset / "vocab.txt")]), expected)
    with pytest.raises(ValueError, match="the checkpoint's vocabulary .*gone.* does not exist"):
        Encoder.from_checkpoint(path, data_path=str(dataset))
    with pytest.raises(ValueError, match="text_model .*no_bert' is not a directory"):  # never another vocab.txt
        Encoder.from_checkpoint(path, data_path=str(dataset), text_model=str(tmp_path / "no_bert"))


def test_a_recorded_bert_directory_that_is_gone_warns_which_vocabulary_replaces_it(dataset, tmp_path):
    model = bert_model(1)
    model.opt["text_model"] = str(tmp_path / "moved_bert")
    path = save_ours(model, tmp_path / "m.pth")
    with pytest.warns(UserWarning, match="moved_bert does not exist .*: its tokenizer is replaced by .*vocab.txt"):
        Encoder.from_checkpoint(path, data_path=str(dataset))


def test_cli_published_checkpoint(dataset, tmp_path):
    bert = transformers.BertModel(bert_config())
    bert.save_pretrained(tmp_path / "bert")
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")  # its tokenizer
    pub = build_published(16, IMG_DIM, bert=bert).eval()
    path = str(tmp_path / "model_best.pth")
    torch.save(published_checkpoint(pub, published_opt(embed_size=16, img_dim=IMG_DIM, vocab_size=len(VOCAB)),
                                    data_parallel=True), path)
    metrics = main(["--checkpoint", path, "--published", "--text_model", str(tmp_path / "bert"),
                    "--data_path", str(dataset), "--split", "pairs"])
    tok = data.load_tokenizer(text_model_dir=str(tmp_path / "bert"))
    ref_img, ref_cap = independent_embeddings(pub, dataset, "pairs", tok)
    model, _ = load_published_checkpoint(path, str(tmp_path / "bert"))
    img, cap, _ = encode_split(model, str(dataset), "pairs", tok)
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cap, ref_cap, atol=1e-5, rtol=1e-5)
    sims = compute_sim(img.double().numpy(), cap.double().numpy())
    assert_metrics_equal(metrics, as_dict(evaluate_sims(7, sims, caps=2)))


@pytest.mark.parametrize("case", ["missing-checkpoint", "missing-data-path", "missing-split", "bad-limit",
                                  "not-a-checkpoint", "limit-not-multiple", "json-dir-missing", "json-is-dir",
                                  "vocab-size", "text-model-missing", "checkpoint-is-dir", "device-meta", "device-cpu1",
                                  "json-unwritable"])
def test_cli_errors_name_the_problem(dataset, tmp_path, capsys, case):
    path = save_ours(bert_model(), tmp_path / "ok.pth")
    (tmp_path / "big_vocab.txt").write_text("\n".join(VOCAB + ["zebra"]) + "\n")
    args = {"missing-checkpoint": ["--checkpoint", str(tmp_path / "nope.pth"), "--data_path", str(dataset)],
            "missing-data-path": ["--checkpoint", path, "--data_path", str(tmp_path / "no_data")],
            "missing-split": ["--checkpoint", path, "--data_path", str(dataset), "--split", "val"],
            "bad-limit": ["--checkpoint", path, "--data_path", str(dataset), "--caption_limit", "many"],
            "not-a-checkpoint": ["--checkpoint", str(dataset / "vocab.txt"), "--data_path", str(dataset)],
            "limit-not-multiple": ["--checkpoint", path, "--data_path", str(dataset), "--caption_limit", "23"],
            "json-dir-missing": ["--checkpoint", path, "--data_path", str(dataset),
                                 "--json", str(tmp_path / "no_dir" / "m.json")],
            "json-is-dir": ["--checkpoint", path, "--data_path", str(dataset), "--json", str(tmp_path)],
            "vocab-size": ["--checkpoint", path, "--data_path", str(dataset),
                           "--vocab_file", str(tmp_path / "big_vocab.txt")],
            "text-model-missing": ["--checkpoint", path, "--data_path", str(dataset),
                                   "--text_model", str(tmp_path / "no_bert")],
            "checkpoint-is-dir": ["--checkpoint", str(tmp_path), "--data_path", str(dataset)],
            "device-meta": ["--checkpoint", path, "--data_path", str(dataset), "--device", "meta"],
            "device-cpu1": ["--checkpoint", path, "--data_path", str(dataset), "--device", "cpu:1"],
            "json-unwritable": ["--checkpoint", path, "--data_path", str(dataset), "--json", "/proc/m.json"]}[case]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    expected = {"missing-checkpoint": "nope.pth", "missing-data-path": "no_data", "missing-split": "val_",
                "bad-limit": "caption_limit", "not-a-checkpoint": "vocab.txt",
                "limit-not-multiple": "caption_limit 23 is not a multiple of 5",
                "json-dir-missing": "no_dir' does not exist", "json-is-dir": "is a directory",
                "vocab-size": f"has {len(VOCAB) + 1} word pieces but the model was trained with "
                              f"vocab_size={len(VOCAB)}",
                "text-model-missing": "no_bert' is not a directory",
                "checkpoint-is-dir": "is a directory, not a checkpoint file",
                "device-meta": "--device 'meta': evaluation runs on cpu or cuda devices",
                "device-cpu1": "--device 'cpu:1': the CPU has no device index but 0",
                "json-unwritable": "--json '/proc/m.json'"}[case]
    assert expected in err and "Traceback" not in err
    if case.startswith("json"):
        assert "encoded" not in err  # refused before the evaluation, not after it


def test_cli_caption_longer_than_bert_positions(dataset, tmp_path, capsys):
    root = tmp_path / "long"
    root.mkdir()
    write_split(root, "test", 2, 2, np.random.default_rng(1))
    lines = (root / "test_caps.txt").read_text().splitlines()
    lines[2] = " ".join(["red"] * bert_config().max_position_embeddings)  # + [CLS] [SEP]: 2 too many
    (root / "test_caps.txt").write_text("\n".join(lines) + "\n")
    path = save_ours(bert_model(), tmp_path / "ok.pth")
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", path, "--data_path", str(root), "--vocab_file", str(dataset / "vocab.txt")])
    assert exc.value.code == 2
    assert "test_caps.txt:3: caption has 34 tokens" in capsys.readouterr().err


def test_cli_nan_features_name_the_items_and_file(dataset, tmp_path, capsys):
    """NaN in an item's valid features: the error names the split's feature file and the item (when the
    item is read), not an anonymous 'ensemble member 0'. NaN in padding beyond the lengths is unused."""
    root = tmp_path / "nan"
    root.mkdir()
    write_split(root, "test", 5, 2, np.random.default_rng(2))
    feats, lens = np.load(root / "test_ims.npy"), np.load(root / "test_lens.npy")
    feats[3, 0, 1] = np.nan
    feats[-1, K - 1, 0] = np.nan  # item 4 has length 1: padding
    np.save(root / "test_ims.npy", feats)
    assert lens[-1] == 1
    path = save_ours(bert_model(), tmp_path / "ok.pth")
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", path, "--data_path", str(root), "--vocab_file", str(dataset / "vocab.txt")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "test_ims.npy: item 3 holds NaN or inf in its valid rows" in err


def test_cli_rows_repeated_per_caption_evaluate_as_one_row_per_item(dataset, tmp_path, capsys):
    """A feature file repeating each item's row once per caption (the published im_div = 1 layout, which
    the published evaluation reads as every 5th image) gives the metrics of one row per item."""
    root = tmp_path / "repeated"
    root.mkdir()
    np.save(root / "test_ims.npy", np.repeat(np.load(dataset / "test_ims.npy"), 5, axis=0))
    np.save(root / "test_lens.npy", np.repeat(np.load(dataset / "test_lens.npy"), 5))
    (root / "test_caps.txt").write_text((dataset / "test_caps.txt").read_text())
    path = save_ours(bert_model(), tmp_path / "ok.pth")
    common = ["--checkpoint", path, "--vocab_file", str(dataset / "vocab.txt")]
    expected = main(common + ["--data_path", str(dataset)])
    capsys.readouterr()
    got = main(common + ["--data_path", str(root)])
    err = capsys.readouterr().err
    assert "encoded test: 10 items, 50 captions" in err and "repeats each item's row once per caption (5 times)" in err
    assert_metrics_equal(got, expected)


def test_cli_fold5_size_checked_before_encoding(dataset, tmp_path, capsys):
    """--fold5 on a split whose item count 5 does not divide fails before any checkpoint is encoded."""
    path = save_ours(bert_model(), tmp_path / "ok.pth")
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", path, "--data_path", str(dataset), "--split", "pairs", "--fold5"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "7 items cannot be split into 5 equal folds" in err and "encoded" not in err


def test_inference_encoder_and_search(dataset, tmp_path):
    model = bert_model(3)
    path = save_ours(model, tmp_path / "m.pth")
    enc = Encoder.from_checkpoint(path, data_path=str(dataset), batch_size=4)
    tok = data.load_tokenizer(vocab_file=str(dataset / "vocab.txt"))
    ref_img, ref_cap, _ = encode_split(model, str(dataset), "test", tok)  # checked against per-item encoding above
    feats, lens = np.load(dataset / "test_ims.npy"), np.load(dataset / "test_lens.npy")
    sets = [f[:n] for f, n in zip(feats, lens)]
    sets[1] = torch.from_numpy(sets[1])  # arrays and tensors mixed
    torch.testing.assert_close(enc.encode_images(sets), ref_img, atol=1e-5, rtol=1e-5)
    # the padded array with its lens (as a split stores them)
    torch.testing.assert_close(enc.encode_images(feats, lengths=lens), ref_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(enc.encode_images(torch.from_numpy(feats), lengths=torch.from_numpy(lens)), ref_img,
                               atol=1e-5, rtol=1e-5)
    # arrays torch.from_numpy rejects: big-endian (as np.load gives for a file written on such a machine),
    # negative strides
    torch.testing.assert_close(enc.encode_images(feats.astype(">f4"), lengths=lens.astype(">i8")), ref_img,
                               atol=1e-5, rtol=1e-5)
    reversed_storage = [np.asarray(x)[::-1].copy()[::-1] for x in sets]  # the same sets, negative strides
    torch.testing.assert_close(enc.encode_images(reversed_storage), ref_img, atol=1e-5, rtol=1e-5)
    bad_lens = lens.copy()
    bad_lens[[2, 4]] = [0, K + 1]
    with pytest.raises(ValueError, match=rf"lengths must be in \[1, {K}\].*sets \[2, 4\] have \[0, {K + 1}\]"):
        enc.encode_images(feats, lengths=bad_lens)
    with pytest.raises(ValueError, match=r"lengths must be \(10,\) integers"):
        enc.encode_images(feats, lengths=lens[:3])
    with pytest.raises(ValueError, match=r"lengths must be \(10,\) integers"):
        enc.encode_images(feats, lengths=lens.astype(np.float32))
    with pytest.raises(ValueError, match="lengths go with one padded"):
        enc.encode_images(sets, lengths=lens)
    captions = (dataset / "test_caps.txt").read_text().splitlines()
    cap_emb = enc.encode_captions(captions)
    torch.testing.assert_close(cap_emb, ref_cap, atol=1e-5, rtol=1e-5)
    for queries, gallery in ((cap_emb, ref_img), (ref_img, cap_emb)):  # both directions
        scores, index = search(queries, gallery, k=3, block=4)
        brute = queries @ gallery.T
        torch.testing.assert_close(scores, brute.sort(dim=1, descending=True).values[:, :3])
        torch.testing.assert_close(brute.gather(1, index), scores)
    flipped = ref_img.numpy()[::-1]
    torch.testing.assert_close(search(cap_emb.numpy().astype(">f4"), flipped, k=3)[0],
                               search(cap_emb, torch.from_numpy(flipped.copy()), k=3)[0])
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 10\]"):
        search(cap_emb, ref_img, k=11)
    with pytest.raises(ValueError, match="embedding sizes differ"):
        search(cap_emb, ref_img[:, :5], k=1)
    with pytest.raises(ValueError, match="feature size 12"):
        enc.encode_images([np.zeros((3, 12), np.float32)])
    with pytest.raises(ValueError, match="feature set 0"):
        enc.encode_images([np.zeros((0, IMG_DIM), np.float32)])
    with pytest.raises(TypeError, match="list of strings"):
        enc.encode_captions("a dog")
    torch.testing.assert_close(Encoder(model.double(), tok).encode_images(sets), ref_img, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        model.float().txt_enc.linear.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"the embeddings of captions \[0, 1\] .* are NaN or inf"):
        Encoder(model, tok).encode_captions(captions[:2])
    for blank in (" ", "\u200b", "\u00ad", "\x00"):
        with pytest.raises(ValueError, match="empty caption"):
            enc.encode_captions([blank])
    with pytest.raises(ValueError, match="the tokenizer keeps none of"):
        enc.encode_captions(["\u0301"])  # a lone combining accent: BERT strips accents
    cut_emoji = json.loads('"a dog \\ud83d"')  # was a TypeError "TextInputSequence must be str" from the tokenizer
    with pytest.raises(ValueError, match=r"caption 1: the caption holds a lone surrogate '\\ud83d' at character 6"):
        enc.encode_captions(["a dog", cut_emoji])
    for unordered in ({"a dog", "a cat"}, {"a dog": 0}):
        with pytest.raises(TypeError, match=f"got a {type(unordered).__name__}, whose order"):
            enc.encode_captions(unordered)


def test_inference_rejects_captions_longer_than_bert_positions(dataset, tmp_path):
    enc = Encoder.from_checkpoint(save_ours(bert_model(), tmp_path / "m.pth"), data_path=str(dataset))
    limit = bert_config().max_position_embeddings
    fits = " ".join(["red"] * (limit - 2))
    assert enc.encode_captions(["a dog", fits]).shape == (2, 16)
    with pytest.raises(ValueError, match=rf"caption 1: caption has {limit + 1} tokens .* {limit} positions"):
        enc.encode_captions(["a dog", fits + " dog"])


def test_gpo_backend_is_chosen_at_load_not_taken_from_training(dataset, tmp_path, monkeypatch):
    """A run trained with gpo_backend='triton' (on a GPU) stores it in its model options; loading the
    checkpoint to evaluate or encode picks the backend here ('auto' unless given), so the same
    checkpoint evaluates on a CPU."""
    model = bert_model(4)
    model.opt["gpo_backend"] = "triton"
    path = save_ours(model, tmp_path / "triton_run.pth", gpo_backend="triton")
    from vse_fast.modules.gpo import GPO

    used = []
    pool = GPO.pool
    monkeypatch.setattr(GPO, "pool", lambda self, *a, backend="auto": used.append(backend) or pool(self, *a,
                                                                                                 backend=backend))
    loaded, _ = load_any_checkpoint(path)
    assert {loaded.img_enc.gpo_backend, loaded.txt_enc.gpo_backend} == {"auto"}
    loaded, _ = load_model_checkpoint(path)
    assert {loaded.img_enc.gpo_backend, loaded.txt_enc.gpo_backend} == {"auto"}
    for backend in ("auto", "torch"):
        enc = Encoder.from_checkpoint(path, data_path=str(dataset), gpo_backend=backend)
        used.clear()
        enc.encode_images([np.ones((3, IMG_DIM), np.float32)])
        enc.encode_captions(["a dog"])
        assert used == [backend, backend]
        used.clear()
        metrics = main(["--checkpoint", path, "--data_path", str(dataset)]
                       + (["--gpo_backend", backend] if backend != "auto" else []))
        assert set(used) == {backend}
        tok = data.load_tokenizer(vocab_file=str(dataset / "vocab.txt"))
        img, cap, _ = encode_split(bert_model(4), str(dataset), "test", tok)
        assert_metrics_equal(metrics, as_dict(evaluate_sims(10, compute_sim(img.double().numpy(),
                                                                            cap.double().numpy()))))


def test_inference_nan_features_raise_naming_the_set(dataset, tmp_path):
    """A feature set holding NaN/inf in its rows gives an error naming the set, not a NaN embedding
    returned for the caller to store or search."""
    enc = Encoder.from_checkpoint(save_ours(bert_model(), tmp_path / "m.pth"), data_path=str(dataset), batch_size=2)
    sets = [np.ones((3, IMG_DIM), np.float32) for _ in range(5)]
    sets[3] = sets[3].copy()
    sets[3][1, 2] = np.inf
    with pytest.raises(ValueError, match=r"feature sets \[3\] \(1 in all\) .*NaN or inf"):
        enc.encode_images(sets)


def test_search_orders_equal_scores_by_index_whatever_k():
    """torch.topk left tied rows in no set order, and which of them filled the last places changed with
    k (3000 equal rows: k=5 began with row 3, k=100 with row 2002)."""
    torch.manual_seed(0)
    assert search(torch.ones(2, 4), torch.ones(3000, 4), k=100)[1][:, :5].tolist() == [[0, 1, 2, 3, 4]] * 2
    for _ in range(100):
        G = int(torch.randint(1, 40, ()))
        gallery = torch.randint(-2, 3, (G, 3)).float()  # many equal scores, -0.0 among them
        queries = torch.randint(-2, 3, (4, 3)).float()
        k = int(torch.randint(1, G + 1, ()))
        scores, indices = search(queries, gallery, k=k, block=3)
        full = queries @ gallery.T
        for row in range(4):
            expected = sorted(range(G), key=lambda j: (-float(full[row, j]), j))[:k]
            assert indices[row].tolist() == expected
            torch.testing.assert_close(scores[row], full[row, expected], rtol=0, atol=0)


def test_search_input_errors():
    queries, gallery = torch.randn(3, 8), torch.randn(5, 8)
    scores, index = search(queries, gallery, k=np.int64(2))  # numpy integers work as k
    torch.testing.assert_close(scores, (queries @ gallery.T).topk(2, dim=1).values)
    assert index.shape == (3, 2)
    for name, bad_query, bad_gallery in (("query_emb row 1", True, False), ("gallery_emb row 3", False, True)):
        q, g = queries.clone(), gallery.clone()
        if bad_query:
            q[1, 4] = float("nan")
        if bad_gallery:
            g[3, 0] = float("inf")
        with pytest.raises(ValueError, match=f"{name} contains NaN or inf"):
            search(q, g, k=2)
    with pytest.raises(ValueError, match="gallery_emb is empty"):
        search(queries, gallery[:0], k=1)


def test_bert_tokenizer_larger_than_the_embedding_table_is_an_error_naming_the_options():
    from vse_fast.eval import _check_bert_vocab

    tokenizer = list(range(30522))  # only len() is read
    assert _check_bert_vocab(tokenizer, {"bert_config_dict": {"vocab_size": 30522}}) is tokenizer
    assert _check_bert_vocab(tokenizer, {"bert_config_dict": {"vocab_size": 30528}}) is tokenizer  # check_tokenizer warns
    with pytest.raises(ValueError, match="vocab_size=30000: pass the model's --vocab_file"):
        _check_bert_vocab(tokenizer, {"bert_config_dict": {"vocab_size": 30000}})


def test_a_bert_tokenizer_smaller_than_the_model_warns_once_and_one_of_special_tokens_only_is_an_error(
        dataset, tmp_path):
    """A model may pad its embedding table past the vocabulary (vocab_size a multiple of 8): fewer word
    pieces than rows is a warning naming both sizes, also for a tokenizer passed in directly (it was
    accepted silently there). A tokenizer of special tokens only (transformers 5 ignores
    BertTokenizer(vocab_file=...)) made every caption [UNK]: an error."""
    import transformers

    model = bert_model()
    small = tmp_path / "small_vocab.txt"
    small.write_text("\n".join(VOCAB[:-1]) + "\n")
    with pytest.warns(UserWarning, match=f"has {len(VOCAB) - 1} word pieces but the model's word-embedding table "
                                         f"has {len(VOCAB)} rows: fine if the model padded") as record:
        Encoder(model, data.load_tokenizer(vocab_file=str(small)))
    assert len([w for w in record if "word pieces" in str(w.message)]) == 1
    if data.tokenizer_reads_vocab_file():  # transformers 4
        (tmp_path / "specials.txt").write_text("\n".join(VOCAB[:5]) + "\n")
        specials = transformers.BertTokenizerFast(vocab_file=str(tmp_path / "specials.txt"))
    else:
        specials = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB[:5])}, unk_token="[UNK]")
    with pytest.raises(ValueError, match="holds its 5 special tokens only, no words"):
        Encoder(model, specials)
    added = data.load_tokenizer(vocab_file=str(small))
    added.add_tokens(["zebra"])  # id len(VOCAB) - 1: the size is len(), added tokens included
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Encoder(model, added)
    added.add_tokens(["okapi"])  # id len(VOCAB): past the table
    with pytest.raises(ValueError, match=f"has {len(VOCAB) + 1} word pieces but the model's word-embedding table"):
        Encoder(model, added)


@pytest.mark.parametrize("n_items, caps, expected", [
    (1, 5, ["text->image R@1", "text->image R@5", "text->image R@10", "image->text R@1", "image->text R@5",
            "image->text R@10"]),
    (3, 2, ["text->image R@5", "text->image R@10", "image->text R@5", "image->text R@10"]),
    (11, 1, []),
    (1000, 5, []),
])
def test_trivial_recall_note_names_the_recalls_fixed_by_the_gallery_size(n_items, caps, expected):
    """The note lists exactly the recalls at 100 by construction: text->image ranks n_items items, so
    R@k is trivial for k >= n_items; image->text ranks a caption among at most (n_items - 1) * caps others."""
    from vse_fast.eval import _trivial_recall_note

    note = _trivial_recall_note(n_items, caps)
    if not expected:
        assert note is None
    else:
        assert note.startswith(f"note: {n_items} items: {', '.join(expected)} ")
    # the claim, at its worst case: every true match scores below every other candidate, so the listed
    # recalls are still 100 and every other recall is 0
    from tests.published.evaluation import evaluate_sims

    rng = np.random.default_rng(n_items * 7 + caps)
    sims = rng.uniform(0.0, 1.0, (n_items, n_items * caps))
    for i in range(n_items):
        sims[i, i * caps:(i + 1) * caps] = -1.0
    metrics = as_dict(evaluate_sims(n_items, sims, caps=caps))
    for direction, name in (("t2i", "text->image"), ("i2t", "image->text")):
        for k in (1, 5, 10):
            assert metrics[f"{direction}_r{k}"] == (100.0 if f"{name} R@{k}" in expected else 0.0), (direction, k)


def test_cli_says_when_it_evaluates_part_of_a_split_and_caption_limit_none_keeps_all_of_dev(
        dataset, tmp_path, capsys, monkeypatch):
    """The training log says when dev is cut; vse_fast.eval said nothing. 'auto' cuts only "dev" (to the
    published first DEV_CAPTION_LIMIT captions, patched to 10 here), so 'none' differs from it on dev only."""
    path = save_ours(bert_model(), tmp_path / "m.pth")
    main(["--checkpoint", path, "--data_path", str(dataset), "--caption_limit", "10"])
    err = capsys.readouterr().err
    assert "note: split test evaluated on its first 2 items (10 of 50 captions), --caption_limit" in err
    main(["--checkpoint", path, "--data_path", str(dataset)])
    assert "evaluated on its first" not in capsys.readouterr().err
    copy = tmp_path / "data"  # the test split as dev
    copy.mkdir()
    for name in ("ims.npy", "lens.npy", "caps.txt"):
        (copy / f"dev_{name}").write_bytes((dataset / f"test_{name}").read_bytes())
    (copy / "vocab.txt").write_bytes((dataset / "vocab.txt").read_bytes())
    monkeypatch.setattr(data, "DEV_CAPTION_LIMIT", 10)
    dev = ["--checkpoint", path, "--data_path", str(copy), "--split", "dev"]
    main(dev)
    assert "note: split dev evaluated on its first 2 items (10 of 50 captions)" in capsys.readouterr().err
    main(dev + ["--caption_limit", "none"])
    err = capsys.readouterr().err
    assert "encoded dev: 10 items, 50 captions" in err and "evaluated on its first" not in err


def test_cli_ensemble_errors_name_the_member(dataset, tmp_path, capsys):
    """--vocab_file applies to every checkpoint of an ensemble: the error of the one it does not fit
    says which checkpoint that is."""
    bert = save_ours(bert_model(), tmp_path / "bert.pth")
    vocab = data.Vocabulary.build((dataset / "train_caps.txt").read_text().splitlines(), threshold=1)
    gru = build_model(dict(embed_size=16, img_dim=IMG_DIM, text_encoder="gru", vocab_size=len(vocab), word_dim=8),
                      gpo_backend="torch").eval()
    gru_path = save_ours(gru, tmp_path / "gru.pth")
    with pytest.raises(SystemExit):
        main(["--checkpoint", bert, "--checkpoint", gru_path, "--data_path", str(dataset), "--vocab_file",
              str(dataset / "vocab.txt")])
    assert f"error: ensemble member {gru_path}: " in capsys.readouterr().err


def test_encoder_takes_a_read_only_memory_map_without_a_warning(dataset, tmp_path):
    """The README's input (a split's features, np.load(..., mmap_mode="r"), and its lengths): torch
    warned that the array is not writable; it is only read (copied into the padded batch)."""
    model = bert_model()
    tok = data.load_tokenizer(vocab_file=str(dataset / "vocab.txt"))
    feats = np.load(dataset / "test_ims.npy", mmap_mode="r")
    enc = Encoder(model, tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_map = enc.encode_images(feats, lengths=[feats.shape[1]] * feats.shape[0])
    torch.testing.assert_close(from_map, enc.encode_images(np.array(feats), lengths=[feats.shape[1]] * feats.shape[0]))


def _gru_model(dataset):
    vocab = data.Vocabulary.build((dataset / "train_caps.txt").read_text().splitlines(), threshold=1)
    model = build_model(dict(embed_size=16, img_dim=IMG_DIM, text_encoder="gru", vocab_size=len(vocab), word_dim=8),
                        gpo_backend="torch").eval()
    return model, vocab


def test_a_tokenizer_passed_in_must_fit_the_model(dataset, tmp_path):
    """A tokenizer given to Encoder or evaluate() directly gets the checks the CLI's does: the wrong kind
    embedded other words silently (a Vocabulary on a BERT model), too many word pieces failed deep in
    torch with an IndexError."""
    bert = bert_model()
    gru, vocab = _gru_model(dataset)
    tok = data.load_tokenizer(vocab_file=str(dataset / "vocab.txt"))
    big = tmp_path / "big_vocab.txt"
    big.write_text("\n".join(VOCAB + ["zebra"]) + "\n")
    smaller_vocab = data.Vocabulary.build(["a red dog"], threshold=1)
    cases = [(bert, vocab, TypeError, "text encoder is BERT but the tokenizer is a BiGRU Vocabulary"),
             (gru, tok, TypeError, "BiGRU, which takes a vse_fast.data.Vocabulary, got BertTokenizer"),
             (bert, data.load_tokenizer(vocab_file=str(big)), ValueError,
              f"has {len(VOCAB) + 1} word pieces but the model's word-embedding table has {len(VOCAB)} rows"),
             (gru, smaller_vocab, ValueError,
              f"has {len(smaller_vocab)} words but the model's word embedding has {len(vocab)}")]
    for model, tokenizer, error, message in cases:
        with pytest.raises(error, match=message):
            Encoder(model, tokenizer)
        with pytest.raises(error, match=message):
            evaluate(model, str(dataset), "test", tokenizer=tokenizer)
    Encoder(bert, tok), Encoder(gru, vocab)  # the right ones pass


def test_the_encoder_encodes_in_eval_mode_and_leaves_the_models_mode_alone(dataset):
    """Encoder once switched the caller's model to eval for good, and encoded in train mode (dropout on)
    once the caller switched it back."""
    model = bert_model(2)
    tok = data.load_tokenizer(vocab_file=str(dataset / "vocab.txt"))
    captions = (dataset / "test_caps.txt").read_text().splitlines()[:6]
    sets = [np.random.default_rng(0).standard_normal((4, IMG_DIM)).astype(np.float32) for _ in range(3)]
    expected = Encoder(model, tok).encode_captions(captions), Encoder(model, tok).encode_images(sets)
    model.train()
    enc = Encoder(model, tok)
    assert model.training
    for _ in range(2):
        torch.testing.assert_close(enc.encode_captions(captions), expected[0])
        torch.testing.assert_close(enc.encode_images(sets), expected[1])
        assert model.training


def test_cli_text_model_that_cannot_apply_is_refused_or_warned(dataset, tmp_path, capsys):
    """--text_model names a BERT tokenizer: with a BiGRU checkpoint it was accepted and ignored; with a
    --vocab_file that differs from it, the vocab file won silently."""
    gru, vocab = _gru_model(dataset)
    vocab.save(str(tmp_path / "vocab.json"))
    gru_path = save_ours(gru, tmp_path / "gru.pth", vocab_file=str(tmp_path / "vocab.json"))
    folder = tmp_path / "tokenizer"
    data.load_tokenizer(vocab_file=str(dataset / "vocab.txt")).save_pretrained(str(folder))
    with pytest.raises(SystemExit):
        main(["--checkpoint", gru_path, "--data_path", str(dataset), "--text_model", str(folder)])
    assert "names a BERT directory, but this model's text encoder is the BiGRU" in capsys.readouterr().err
    with pytest.raises(ValueError, match="text encoder is the BiGRU"):
        Encoder.from_checkpoint(gru_path, text_model=str(folder))
    bert_path = save_ours(bert_model(), tmp_path / "bert.pth")
    with pytest.warns(UserWarning, match=r"--text_model does not apply to ensemble member .*gru.pth"):
        both = main(["--checkpoint", bert_path, "--checkpoint", gru_path, "--data_path", str(dataset),
                     "--text_model", str(folder)])
    assert both["rsum"] > 0
    other = tmp_path / "other_vocab.txt"
    other.write_text("\n".join(VOCAB[:5] + WORDS[::-1] + [".", ","]) + "\n")  # same size, other ids
    with pytest.raises(SystemExit):
        main(["--checkpoint", bert_path, "--data_path", str(dataset), "--text_model", str(folder),
              "--vocab_file", str(other)])
    assert "hold different vocabularies" in capsys.readouterr().err
    same = main(["--checkpoint", bert_path, "--data_path", str(dataset), "--text_model", str(folder),
                 "--vocab_file", str(dataset / "vocab.txt")])  # the same vocabulary twice: fine
    assert same["rsum"] > 0
    recorded = save_ours(bert_model(), tmp_path / "bert_other.pth", vocab_file=str(other))
    with pytest.raises(SystemExit):  # the checkpoint's own vocabulary against an explicit --text_model
        main(["--checkpoint", recorded, "--data_path", str(dataset), "--text_model", str(folder)])
    assert "(the checkpoint's, which the model was trained with) hold different" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["same-checkpoint-twice", "negative-workers"])
def test_cli_refuses_a_repeated_checkpoint_and_negative_workers(dataset, tmp_path, capsys, case):
    path = save_ours(bert_model(), tmp_path / "m.pth")
    args = ["--checkpoint", path, "--data_path", str(dataset)]
    args += {"same-checkpoint-twice": ["--checkpoint", str(tmp_path / "." / "m.pth")],
             "negative-workers": ["--workers", "-1"]}[case]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert {"same-checkpoint-twice": "is the same file as", "negative-workers": "--workers must be >= 0"}[case] in err
    assert "encoded" not in err


def test_search_and_encoder_take_numpy_integers_and_name_float32_overflow(dataset):
    model = bert_model()
    tok = data.load_tokenizer(vocab_file=str(dataset / "vocab.txt"))
    enc = Encoder(model, tok, batch_size=np.int64(2))
    gallery = enc.encode_captions(["a red dog", "a blue cat", "the man"])
    scores, index = search(gallery, gallery, k=np.int64(2), block=np.int32(1))
    assert index[:, 0].tolist() == [0, 1, 2]
    big = np.full((1, gallery.shape[1]), 1e39)  # finite in float64, inf in float32 where it is scored
    with pytest.raises(ValueError, match=r"query_emb row 0 contains NaN or inf \(or values beyond float32's range\)"):
        search(big, gallery.numpy().astype(np.float64), k=1)
