"""vse_fast.synthetic: deterministic, valid layout, cached, and structured so that pooling matters."""
import hashlib
import json
import os
import time

import numpy as np
import pytest
import torch

from vse_fast import data, evaluation, synthetic

SMALL = dict(n_train=40, n_dev=12, n_test=10)


def _digest(folder):
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        h.update(name.encode())
        with open(os.path.join(folder, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def default_image(tmp_path_factory):
    """The default-size image dataset (what `python -m vse_fast.train` uses)."""
    return synthetic.generate(str(tmp_path_factory.mktemp("syn") / "image"))


@pytest.mark.parametrize("flavour", ["image", "video"])
def test_generation_is_deterministic(tmp_path, flavour):
    a = synthetic.generate(str(tmp_path / "a"), flavour=flavour, seed=3, **SMALL)
    b = synthetic.generate(str(tmp_path / "b"), flavour=flavour, seed=3, **SMALL)
    c = synthetic.generate(str(tmp_path / "c"), flavour=flavour, seed=4, **SMALL)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


@pytest.mark.parametrize("flavour,caps,max_set", [("image", 5, 36), ("video", 20, 32)])
def test_layout_is_valid_real_data(tmp_path, flavour, caps, max_set):
    folder = synthetic.generate(str(tmp_path), flavour=flavour, **SMALL)
    for split in ("train", "dev", "test"):
        info = data.check_split(folder, split)
        assert info.n_items == SMALL[f"n_{split}"] and info.caps_per_item == caps
        assert info.max_set == max_set and info.feat_dim == 64 and info.has_lens and info.has_ids
        lens = np.load(os.path.join(folder, f"{split}_lens.npy"))
        assert lens.min() >= 1 and len(set(lens.tolist())) > 1  # sets of varying size
        feats = np.load(os.path.join(folder, f"{split}_ims.npy"))
        assert feats.dtype == np.float32 and np.isfinite(feats).all()
        assert (feats >= 0).all()  # the noise is followed by a ReLU, as the module doc says
        padding = np.arange(max_set)[None, :] >= lens[:, None]
        assert not feats[padding].any()
    tokenizer = data.load_tokenizer(vocab_file=os.path.join(folder, "vocab.txt"))
    assert tokenizer.pad_token_id == 0
    captions = open(os.path.join(folder, "train_caps.txt")).read().splitlines()
    unk = tokenizer.unk_token_id
    assert all(unk not in tokenizer(c)["input_ids"] for c in captions)  # the vocabulary covers every word
    from transformers import BertConfig

    config = BertConfig.from_json_file(os.path.join(folder, "bert_config.json"))
    assert config.vocab_size == tokenizer.vocab_size and config.hidden_size == 64
    vocab = data.Vocabulary.load(os.path.join(folder, "vocab.json"))
    assert vocab("<mask>") == len(vocab) - 1 and vocab("dog") != vocab("<unk>")
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    assert manifest["format"] == synthetic.FORMAT and manifest["flavour"] == flavour


def test_bad_parameters_are_named(tmp_path):
    with pytest.raises(TypeError, match="n_trian"):
        synthetic.generate(str(tmp_path), n_trian=10)
    with pytest.raises(ValueError, match="flavour"):
        synthetic.generate(str(tmp_path), flavour="audio")
    with pytest.raises(ValueError, match="n_dev"):
        synthetic.generate(str(tmp_path), n_dev=0)
    with pytest.raises(ValueError, match="seed"):
        synthetic.generate(str(tmp_path), seed=-2)
    with pytest.raises(ValueError, match="pattern_dims must be a positive int, got 0"):
        synthetic.generate(str(tmp_path), pattern_dims=0)  # zero patterns: NaN features after normalising
    with pytest.raises(ValueError, match="max_set must be >= 14 for the image flavour, got 13"):
        synthetic.generate(str(tmp_path), max_set=13)  # would cut regions the captions name
    with pytest.raises(ValueError, match="max_set must be >= 8 for the video flavour, got 7"):
        synthetic.generate(str(tmp_path), flavour="video", max_set=7)
    for noise in (float("nan"), float("inf"), -0.1, True, "0.2"):
        with pytest.raises(ValueError, match="noise must be a finite non-negative number"):
            synthetic.generate(str(tmp_path), noise=noise)


def test_fingerprint_covers_the_generator_and_the_vocabulary_writers(monkeypatch, tmp_path):
    import shutil

    assert synthetic._source_fingerprint() == synthetic.GENERATOR
    from vse_fast import word_tokenize

    package = os.path.dirname(synthetic.__file__)  # before __file__ is patched below
    for module in (synthetic, data, word_tokenize):  # a copy of the package with one byte more in one file
        copy = tmp_path / module.__name__
        shutil.copytree(package, copy)
        with open(copy / os.path.basename(module.__file__), "a") as f:
            f.write("\n")
        monkeypatch.setattr(synthetic, "__file__", str(copy / "synthetic.py"))
        assert synthetic._source_fingerprint() != synthetic.GENERATOR


def test_data_of_another_generator_version_is_regenerated(tmp_path, monkeypatch):
    """A cache folder written by another version of the generator (same parameters otherwise) is not
    reused: its manifest records that version's source fingerprint."""
    first = synthetic.ensure_synthetic(str(tmp_path), seed=1, **SMALL)
    assert json.load(open(os.path.join(first, "manifest.json")))["generator"] == synthetic.GENERATOR
    monkeypatch.setattr(synthetic, "GENERATOR", "another-version")
    second = synthetic.ensure_synthetic(str(tmp_path), seed=1, **SMALL)
    assert second != first and json.load(open(os.path.join(second, "manifest.json")))["generator"] == "another-version"


def test_ensure_synthetic_caches_by_parameters(tmp_path, monkeypatch):
    first = synthetic.ensure_synthetic(str(tmp_path), seed=1, **SMALL)
    assert os.path.basename(first).startswith("synthetic-image-")
    stamp = os.path.getmtime(os.path.join(first, "train_ims.npy"))
    assert synthetic.ensure_synthetic(str(tmp_path), seed=1, **SMALL) == first
    assert os.path.getmtime(os.path.join(first, "train_ims.npy")) == stamp  # reused, not rewritten
    other = synthetic.ensure_synthetic(str(tmp_path), seed=2, **SMALL)
    assert other != first
    with open(os.path.join(first, "manifest.json"), "w") as f:
        f.write("{}")  # damaged: regenerated in place
    assert synthetic.ensure_synthetic(str(tmp_path), seed=1, **SMALL) == first
    assert json.load(open(os.path.join(first, "manifest.json")))["seed"] == 1
    manifest = json.load(open(os.path.join(first, "manifest.json")))
    with open(os.path.join(first, "manifest.json"), "w") as f:
        json.dump({**manifest, "noise": 0.9}, f)  # files intact, other parameters: regenerated too
    assert synthetic.ensure_synthetic(str(tmp_path), seed=1, **SMALL) == first
    assert json.load(open(os.path.join(first, "manifest.json")))["noise"] == synthetic.default_params()["noise"]
    monkeypatch.setenv("VSE_FAST_CACHE", str(tmp_path / "env"))
    from_env = synthetic.ensure_synthetic(seed=1, **SMALL)
    assert from_env.startswith(str(tmp_path / "env")) and _digest(from_env) == _digest(first)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".synthetic")]  # no temporary left over


def test_video_lengths_run_from_8_to_max_set_frames(tmp_path):
    """The module doc's 8..max_set frames, the largest included (an off-by-one never gave a video
    max_set frames, which the layout test, reading max_set from the array's shape, did not see)."""
    folder = synthetic.generate(str(tmp_path), flavour="video", seed=0, max_set=9, n_train=40, n_dev=2, n_test=2,
                                caps_per_item=2)
    lens = np.load(os.path.join(folder, "train_lens.npy"))
    assert (lens.min(), lens.max()) == (8, 9)


def test_dev_and_test_items_are_not_copies_of_training_items(tmp_path):
    """Each split draws its own scenes: from one shared random stream, dev and test were copies of the
    first training items, and the demo's recall measured memorisation."""
    folder = synthetic.generate(str(tmp_path), seed=0, **SMALL)
    train = np.load(os.path.join(folder, "train_ims.npy"))
    for split in ("dev", "test"):
        held_out = np.load(os.path.join(folder, f"{split}_ims.npy"))
        assert not any(np.array_equal(item, seen) for item in held_out for seen in train), split


def test_no_temporary_folder_is_left_when_generation_fails_or_another_process_wins(tmp_path, monkeypatch):
    """The temporary folder is removed off the happy path too: when the generation raises (disk full),
    and when another process (a DDP rank) renamed its copy into place first; each left a dataset-sized
    .synthetic-* folder behind for an hour."""
    import shutil

    real_generate = synthetic.generate
    winner = synthetic.ensure_synthetic(str(tmp_path / "other"), seed=1, **SMALL)
    target = os.path.join(str(tmp_path), os.path.basename(winner))

    def failing(out_dir, **kw):
        real_generate(out_dir, **kw)
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "generate", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        synthetic.ensure_synthetic(str(tmp_path), seed=1, **SMALL)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".synthetic")]

    def racing(out_dir, **kw):  # another rank's complete copy appears at the target meanwhile
        real_generate(out_dir, **kw)
        shutil.copytree(winner, target)

    monkeypatch.setattr(synthetic, "generate", racing)
    assert synthetic.ensure_synthetic(str(tmp_path), seed=1, **SMALL) == target
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".synthetic")]


@pytest.mark.parametrize("damage", ["deleted-lens", "edited-caption", "truncated-features"])
def test_a_damaged_cache_is_regenerated_not_used(tmp_path, damage):
    """The cache was reused on its manifest alone: without train_lens.npy every item counted its zero
    padding as regions, and an edited caption was trained on, silently."""
    folder = synthetic.ensure_synthetic(str(tmp_path), seed=1, **SMALL)
    clean = _digest(folder)
    if damage == "deleted-lens":
        os.remove(os.path.join(folder, "train_lens.npy"))
    elif damage == "edited-caption":
        path = os.path.join(folder, "train_caps.txt")
        text = open(path).read()
        open(path, "w").write("x" + text)
    else:
        path = os.path.join(folder, "train_ims.npy")
        os.truncate(path, os.path.getsize(path) - 4)
    assert synthetic.ensure_synthetic(str(tmp_path), seed=1, **SMALL) == folder
    assert _digest(folder) == clean


def test_files_a_user_adds_beside_the_cache_are_kept(tmp_path):
    """Only the files the manifest records are checked: an added file made the cache look damaged, and
    its regeneration deleted the user's run directory along with the folder."""
    folder = synthetic.ensure_synthetic(str(tmp_path), seed=1, **SMALL)
    os.makedirs(os.path.join(folder, "my_run"))
    open(os.path.join(folder, "my_run", "last.pth"), "w").write("weights")
    open(os.path.join(folder, "results.json"), "w").write("{}")
    assert synthetic.ensure_synthetic(str(tmp_path), seed=1, **SMALL) == folder
    assert os.path.isfile(os.path.join(folder, "my_run", "last.pth"))
    assert os.path.isfile(os.path.join(folder, "results.json"))


def test_an_abandoned_generation_is_cleared_and_the_cache_is_not_private(tmp_path):
    """A generation killed before its clean-up (SIGKILL, out of memory) left its temporary folder for
    good; mkdtemp's mode 0700 hid a shared cache from its other users."""
    abandoned, recent = tmp_path / ".synthetic-image-killed", tmp_path / ".synthetic-image-running"
    abandoned.mkdir(), recent.mkdir()
    old = time.time() - synthetic.ABANDONED_AFTER_S - 10
    os.utime(abandoned, (old, old))
    folder = synthetic.ensure_synthetic(str(tmp_path), seed=1, **SMALL)
    assert not abandoned.exists() and recent.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(folder).st_mode & 0o777 == 0o777 & ~umask


def _concept_probe(folder, split="test"):
    """Training-free retrieval: each region scored against every concept pattern (what a linear
    layer can learn), scores pooled over the set by max or by mean, matched against the caption's
    bag of concept words. Returns {"max": metrics, "mean": metrics}."""
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    patterns = synthetic.concept_patterns(manifest["seed"], manifest["feat_dim"], manifest["pattern_dims"])
    words = list(patterns)
    feats = np.load(os.path.join(folder, f"{split}_ims.npy"))
    lens = np.load(os.path.join(folder, f"{split}_lens.npy"))
    captions = open(os.path.join(folder, f"{split}_caps.txt")).read().splitlines()
    bags = np.stack([np.isin(words, c.split()) for c in captions]).astype(np.float64)
    scores = feats.astype(np.float64) @ np.stack([patterns[w] for w in words]).T  # (N, K, concepts)
    valid = (np.arange(feats.shape[1])[None, :] < lens[:, None])[..., None]
    pooled = {"max": np.where(valid, scores, -np.inf).max(1), "mean": (scores * valid).sum(1) / lens[:, None]}
    out = {}
    for name, p in pooled.items():
        p = p - p.mean(0)
        out[name] = evaluation.retrieval_metrics(torch.from_numpy(p), torch.from_numpy(bags), manifest["caps_per_item"])
    return out


def test_image_retrieval_is_structured_and_pooling_matters(default_image):
    probe = _concept_probe(default_image)
    n_test = synthetic.default_params("image")["n_test"]
    chance_rsum = 2 * 100.0 * (1 + 5 + 10) / n_test  # ~ chance in both directions
    assert probe["max"]["rsum"] > 10 * chance_rsum  # the structure is there ...
    assert probe["max"]["t2i_r1"] < 80  # ... but captions omit objects: not solvable by lookup
    # Max pooling keeps "one strong region"; the mean mixes it with clutter and set size.
    assert probe["max"]["rsum"] > probe["mean"]["rsum"] + 60
