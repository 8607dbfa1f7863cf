"""Synthetic image-text (or video-text) retrieval data in the precomputed-feature layout.

The offline default of ``python -m vse_fast.train``: small, generated from a seed in about two
seconds (1.7 s for the image set on a 2-core CPU, 2026-11-29), learnable by a small model on a CPU in minutes without saturating.

A scene holds 2-4 objects, each with a colour, and a setting. Concepts (object, colour, setting
names) own sparse non-negative random patterns in the D-dim feature space. A scene becomes a set:

* image flavour: 1-3 regions per object (object pattern + colour pattern), 1-2 setting regions
  and 3-20 clutter regions (weaker copies of random objects, possibly ones the scene does not
  hold), Gaussian noise on every feature then ReLU, shuffled, 6..36 rows; 5 template captions
  naming SOME of its objects (with or without colour) and sometimes the setting.
* video flavour: 8..32 frames whose attention drifts among the scene's objects (a random walk),
  with clutter and occasional cut-away frames; 20 captions.

Why it is not trivial: every object and colour occurs in many scenes, so only their combination
identifies one; captions omit objects; clutter copies objects at lower strength; the noise is as
large as a pattern's entries. The pooling matters on images: mean pooling confuses "one strong
region" with "a few weak clutter regions" and dilutes objects in large sets, so max-like pooling
retrieves better (a training-free probe in concept space, `_concept_probe` in
tests/test_synthetic.py: test rsum 451.3 with max vs 274.1 with mean on the default seed-0 image
data, 2026-11-29; the test checks max > mean + 60). On videos every frame mixes the objects and the
two are close (435.4 vs 416.6). A small model reaches clearly-above-chance, unsaturated recall in a
few CPU epochs: the README's demo and pooling tables give the trained figures.

Files (as real data, see vse_fast.data): {train,dev,test}_ims.npy (N, K, D) float32 zero-padded,
_lens.npy, _caps.txt, _ids.txt, plus vocab.txt (BERT WordPiece vocabulary, [PAD]=0 [UNK] [CLS]
[SEP] [MASK] then the words), bert_config.json (2-layer, 2-head, hidden 64 BERT), vocab.json (word
vocabulary for the BiGRU, in the published format and, as the published vocab.py builds it,
from the train and dev captions) and manifest.json (all parameters, the format version
and the generator's source fingerprint).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time

import numpy as np

from vse_fast.checks import positive_int

__all__ = ["generate", "ensure_synthetic", "concept_patterns", "default_params", "FORMAT"]

FORMAT = "vse_fast-synthetic/1"


def _source_fingerprint() -> str:
    """16 hex digits of sha256 over the generator's source: this module, vse_fast/data.py (whose
    Vocabulary writes vocab.json) and vse_fast/word_tokenize.py (which splits its words). Part of every dataset's parameters, so a cached dataset written by
    another version of the generator is never reused as if current."""
    digest = hashlib.sha256()
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        for path in (__file__, os.path.join(here, "data.py"), os.path.join(here, "word_tokenize.py")):
            with open(path, "rb") as f:
                digest.update(f.read())
    except OSError:  # no source file (frozen install): fall back to the format version alone
        return "unknown"
    return digest.hexdigest()[:16]


GENERATOR = _source_fingerprint()

COLOURS = ("red", "blue", "green", "yellow", "white", "black", "brown", "orange", "purple", "pink", "gray", "silver")
OBJECTS = (
    "dog", "cat", "car", "bus", "bike", "tree", "bench", "horse", "bird", "boat", "kite", "ball", "chair", "table",
    "clock", "cup", "lamp", "sign", "train", "truck", "sheep", "cow", "plane", "umbrella", "bag", "vase", "hat",
    "bottle", "book", "phone", "bear", "fence",
)
SETTINGS = ("street", "park", "beach", "kitchen", "field", "room")
RELATIONS = ("next to", "near", "behind", "in front of", "beside", "with")
FILLER = ("a", "the", "and", "in", "of", "photo", "there", "is", "picture", "video", "shows", "moving", "on", "at",
          "scene", "clip", "some", "while", "then")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

_DEFAULTS = {
    "image": dict(n_train=3000, n_dev=300, n_test=300, feat_dim=64, max_set=36, caps_per_item=5,
                  noise=0.2, pattern_dims=8),
    "video": dict(n_train=800, n_dev=150, n_test=150, feat_dim=64, max_set=32, caps_per_item=20,
                  noise=0.2, pattern_dims=8),
}


def default_params(flavour="image"):
    if flavour not in _DEFAULTS:
        raise ValueError(f"flavour must be 'image' or 'video', got {flavour!r}")
    return dict(_DEFAULTS[flavour])


def _params(flavour, seed, sizes):
    params = default_params(flavour)
    unknown = sorted(set(sizes) - set(params))
    if unknown:
        raise TypeError(f"unknown synthetic parameter(s) {unknown}; known: {sorted(params)}")
    params.update(sizes)
    for name in ("n_train", "n_dev", "n_test", "feat_dim", "max_set", "caps_per_item", "pattern_dims"):
        positive_int(params[name], name, numpy_ints=False)
    least = MIN_IMAGE_SET if flavour == "image" else 8
    if params["max_set"] < least:
        raise ValueError(f"max_set must be >= {least} for the {flavour} flavour, got {params['max_set']}"
                         + (" (a scene has up to 4 objects of 1-3 regions and 1-2 setting regions; fewer rows would "
                            "cut regions its captions name)" if flavour == "image" else " (the fewest frames of a "
                            "video)"))
    if params["pattern_dims"] > params["feat_dim"]:
        raise ValueError(f"pattern_dims {params['pattern_dims']} > feat_dim {params['feat_dim']}")
    noise = params["noise"]
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise < float("inf"):
        raise ValueError(f"noise must be a finite non-negative number, got {noise!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return dict(format=FORMAT, generator=GENERATOR, flavour=flavour, seed=seed, **params)


def concept_patterns(seed, feat_dim=64, pattern_dims=8):
    """{word: (D,) float32 unit pattern} for every object, colour and setting word of a seed."""
    rng = np.random.default_rng([seed, 7919])
    words = OBJECTS + COLOURS + SETTINGS
    patterns = np.zeros((len(words), feat_dim), dtype=np.float32)
    for i in range(len(words)):
        dims = rng.choice(feat_dim, size=pattern_dims, replace=False)
        patterns[i, dims] = rng.uniform(0.5, 1.0, size=pattern_dims)
    patterns /= np.linalg.norm(patterns, axis=1, keepdims=True)
    return dict(zip(words, patterns))


class _Patterns:
    def __init__(self, seed, feat_dim, pattern_dims):
        table = concept_patterns(seed, feat_dim, pattern_dims)
        self.obj = np.stack([table[w] for w in OBJECTS])
        self.col = np.stack([table[w] for w in COLOURS])
        self.set = np.stack([table[w] for w in SETTINGS])


def _scene(rng):
    n_obj = int(rng.integers(2, 5))
    objects = rng.choice(len(OBJECTS), size=n_obj, replace=False)
    colours = rng.integers(0, len(COLOURS), size=n_obj)
    return objects, colours, int(rng.integers(0, len(SETTINGS)))


MIN_IMAGE_SET = 14  # 4 objects x 3 regions + 2 setting regions: every named region fits


def _image_set(rng, pat, scene, max_set, noise):
    objects, colours, setting = scene
    rows = []
    for o, c in zip(objects, colours):
        for _ in range(int(rng.integers(1, 4))):
            rows.append(rng.uniform(0.8, 1.2) * (pat.obj[o] + 0.6 * pat.col[c]))
    for _ in range(int(rng.integers(1, 3))):
        rows.append(0.8 * pat.set[setting])
    n_clutter = min(int(rng.integers(3, 21)), max_set - len(rows))
    for _ in range(n_clutter):
        clutter = pat.obj[rng.integers(len(OBJECTS))] + 0.6 * pat.col[rng.integers(len(COLOURS))]
        rows.append(rng.uniform(0.3, 0.6) * clutter)
    rows = np.stack(rows[:max_set])
    rows = np.maximum(rows + noise * rng.standard_normal(rows.shape), 0.0)
    return rows[rng.permutation(len(rows))]


def _video_set(rng, pat, scene, max_set, noise):
    objects, colours, setting = scene
    n_frames = int(rng.integers(8, max_set + 1))
    concept = pat.obj[objects] + 0.6 * pat.col[colours]  # (n_obj, D)
    logits = rng.standard_normal(len(objects))
    frames = []
    for _ in range(n_frames):
        logits = logits + 0.7 * rng.standard_normal(len(objects))
        if rng.random() < 0.15:  # cut-away: clutter only
            frame = 0.5 * (pat.obj[rng.integers(len(OBJECTS))] + 0.6 * pat.col[rng.integers(len(COLOURS))])
        else:
            weights = np.exp(2.0 * (logits - logits.max()))
            frame = (weights / weights.sum()) @ concept + 0.4 * pat.set[setting]
            if rng.random() < 0.5:
                frame = frame + 0.3 * pat.obj[rng.integers(len(OBJECTS))]
        frames.append(frame)
    frames = np.stack(frames)
    return np.maximum(frames + noise * rng.standard_normal(frames.shape), 0.0)


def _phrase(rng, obj, col):
    return f"{COLOURS[col]} {OBJECTS[obj]}" if rng.random() < 0.7 else OBJECTS[obj]


def _caption(rng, scene, video):
    objects, colours, setting = scene
    k = int(rng.integers(1, min(3, len(objects)) + 1))
    named = rng.choice(len(objects), size=k, replace=False)
    parts = [_phrase(rng, objects[i], colours[i]) for i in named]
    where = f" in the {SETTINGS[setting]}" if rng.random() < 0.4 else ""
    lead = ("a video of ", "a clip of ", "", "the scene shows ")[int(rng.integers(4))] if video else (
        ("a photo of ", "a picture of ", "", "there is ")[int(rng.integers(4))]
    )
    if k == 1:
        body = f"a {parts[0]}"
    elif k == 2:
        rel = RELATIONS[int(rng.integers(len(RELATIONS)))] if rng.random() < 0.5 else "and"
        verb = " moving" if video and rng.random() < 0.5 else ""
        body = f"a {parts[0]}{verb} {rel} a {parts[1]}"
    else:
        body = f"a {parts[0]} , a {parts[1]} and a {parts[2]}"
    return f"{lead}{body}{where} ."


def _write_split(out_dir, split, n_items, rng, pat, params):
    video = params["flavour"] == "video"
    max_set, dim = params["max_set"], params["feat_dim"]
    feats = np.zeros((n_items, max_set, dim), dtype=np.float32)
    lens = np.zeros(n_items, dtype=np.int64)
    captions = []
    for i in range(n_items):
        scene = _scene(rng)
        rows = (_video_set if video else _image_set)(rng, pat, scene, max_set, params["noise"])
        feats[i, : len(rows)] = rows
        lens[i] = len(rows)
        captions.extend(_caption(rng, scene, video) for _ in range(params["caps_per_item"]))
    np.save(os.path.join(out_dir, f"{split}_ims.npy"), feats)
    np.save(os.path.join(out_dir, f"{split}_lens.npy"), lens)
    with open(os.path.join(out_dir, f"{split}_caps.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(captions) + "\n")
    with open(os.path.join(out_dir, f"{split}_ids.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(str(i) for i in range(n_items)) + "\n")
    return captions


def _bert_vocab():
    words = set(OBJECTS + COLOURS + SETTINGS + FILLER + (",", "."))
    for rel in RELATIONS:
        words.update(rel.split())
    return list(SPECIAL_TOKENS) + sorted(words)


def _bert_config(vocab_size):
    return {
        "model_type": "bert", "architectures": ["BertModel"], "vocab_size": vocab_size, "hidden_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 64,
        "type_vocab_size": 2, "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0,
    }


def generate(out_dir, *, flavour="image", seed=0, **sizes):
    """Write a synthetic dataset into out_dir (created if needed) and return out_dir.

    Args:
        flavour: "image" (5 captions, region sets) or "video" (20 captions, frame sequences).
        seed: everything written is a function of (flavour, seed, sizes).
        sizes: overrides of `default_params(flavour)`: n_train, n_dev, n_test, feat_dim, max_set,
            caps_per_item, noise, pattern_dims.

    Example:
        >>> generate("/tmp/syn", n_train=500)
    """
    from vse_fast.data import Vocabulary

    params = _params(flavour, seed, sizes)
    os.makedirs(out_dir, exist_ok=True)
    pat = _Patterns(seed, params["feat_dim"], params["pattern_dims"])
    captions = {}
    for split_id, split in enumerate(("train", "dev", "test")):
        rng = np.random.default_rng([seed, split_id, 0 if flavour == "image" else 1])
        captions[split] = _write_split(out_dir, split, params[f"n_{split}"], rng, pat, params)
    vocab = _bert_vocab()
    with open(os.path.join(out_dir, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    with open(os.path.join(out_dir, "bert_config.json"), "w", encoding="utf-8") as f:
        json.dump(_bert_config(len(vocab)), f, indent=1)
    Vocabulary.build(captions["train"] + captions["dev"], threshold=4).save(os.path.join(out_dir, "vocab.json"))
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump({**params, "files": _file_digests(out_dir)}, f, indent=1, sort_keys=True)
    return out_dir


def _file_digests(folder, names=None) -> dict:
    """{name: sha256} of the files ``names`` of folder (default: every file but the manifest; about
    0.1 s for the demo's 40 MB); a missing one maps to None."""
    if names is None:
        names = [n for n in sorted(os.listdir(folder)) if n != "manifest.json"
                 and os.path.isfile(os.path.join(folder, n))]
    digests = {}
    for name in names:
        sha = hashlib.sha256()
        try:
            with open(os.path.join(folder, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    sha.update(block)
        except OSError:
            digests[name] = None
            continue
        digests[name] = sha.hexdigest()
    return digests


def _read_manifest(folder):
    """The generation parameters of a cached dataset, or None when it is absent, unreadable, or its
    files are not those it was written with (deleted, edited or truncated). Other files a user put
    beside them (a run directory, results) do not count: a regeneration would delete them."""
    try:
        with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        files = manifest.pop("files")
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return None
    if not isinstance(files, dict):
        return None
    return manifest if _file_digests(folder, list(files)) == files else None


ABANDONED_AFTER_S = 3600


def _remove_abandoned_generations(cache) -> None:
    """Delete the temporary folders of generations killed before they finished (SIGKILL, out of memory:
    their own clean-up never ran), once untouched for an hour; a running generation writes for seconds."""
    now = time.time()
    for name in os.listdir(cache):
        path = os.path.join(cache, name)
        try:
            if name.startswith(".synthetic-") and os.path.isdir(path) and now - os.path.getmtime(path) > ABANDONED_AFTER_S:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:  # removed meanwhile by another process
            pass


def ensure_synthetic(cache_dir=None, *, flavour="image", seed=0, **sizes):
    """Path of a synthetic dataset for these parameters, generated on first use.

    Lives in ``<cache>/synthetic-<flavour>-<hash of the parameters>``, cache = cache_dir, else
    $VSE_FAST_CACHE, else ~/.cache/vse_fast. Reused when its manifest.json equals the parameters
    (which include the generator's source fingerprint, `GENERATOR`: data from another version of
    this module is regenerated, not reused) and its files their recorded sha256 (a deleted, edited
    or truncated file is regenerated, not used);
    otherwise (re)generated into a temporary folder that is renamed into place, so concurrent
    processes (DDP ranks) never see a half-written dataset.
    """
    params = _params(flavour, seed, sizes)
    cache = cache_dir or os.environ.get("VSE_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vse_fast")
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    target = os.path.join(cache, f"synthetic-{flavour}-{digest}")
    if _read_manifest(target) == params:
        return target
    os.makedirs(cache, exist_ok=True)
    _remove_abandoned_generations(cache)
    tmp = tempfile.mkdtemp(prefix=f".synthetic-{flavour}-", dir=cache)
    try:
        generate(tmp, flavour=flavour, seed=seed, **sizes)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the cache from the other users of a shared one
        if os.path.isdir(target):  # stale or broken: replace
            if _read_manifest(target) == params:
                return target
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:  # another process renamed its copy first
            if _read_manifest(target) != params:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
