"""Train VSE-infinity: ``python -m vse_fast.train [options]``.

Without ``--data_path`` it trains a small model on a generated synthetic dataset (about one minute on
two idle CPU cores: 3 epochs of 234 steps; on a GPU in bf16 when one is present, unless --device cpu)
and prints the recall table of the test split. With ``--data_path`` (the SCAN/VSE-infinity precomputed
layout: {split}_ims.npy, {split}_caps.txt, ...) the defaults are the published ones: embed 1024, margin
0.2, batch 128, AdamW lr 5e-4 (BERT 0.1x), weight decay 1e-4, 25 epochs, lr x0.1 at epoch 15,
gradient-norm clip 2, one VSE0 warm-up epoch then hardest negatives (VSE++).

Multi-GPU: ``torchrun --nproc_per_node=N -m vse_fast.train ...`` (DDP; ``--batch_size`` is the global
batch, split over the processes; negatives are gathered from all processes unless
``--local_negatives``). See docs/distributed.md.

Runs write ``train.log``, ``metrics.jsonl``, ``last.pth`` and ``best.pth`` to ``--run_dir`` (and
``vocab.json``, the BiGRU vocabulary, when it is built from the training captions);
``--resume RUN_DIR/last.pth`` continues a stopped run exactly where it stopped, also mid-epoch (under a
different number of processes: the same data order, dropout streams re-seeded).
"""
from __future__ import annotations

import argparse
import filecmp
import json
import logging
import math
import os
import shutil
import sys
import time
from typing import Optional

import torch

from vse_fast import distributed as vdist
from vse_fast import grad_cache
from vse_fast.checks import device_option
from vse_fast.kernels import triton_interpreting

logger = logging.getLogger("vse_fast.train")

# Options the published code trains with: its training commands (train_region.sh / train_grid.sh:
# lr 5e-4, 25 epochs, lr update at 15, one VSE0 warm-up epoch), arguments.py for the rest (its own
# defaults differ: lr 2e-4, 30 epochs, no warm-up).
PUBLISHED_DEFAULTS = dict(
    embed_size=1024, margin=0.2, batch_size=128, learning_rate=5e-4, bert_lr_factor=0.1,
    weight_decay=1e-4, num_epochs=25, lr_update=15, grad_clip=2.0, vse_mean_warmup_epochs=1,
    max_violation=False, precomp_enc_type="basic", text_encoder="bert", no_imgnorm=False,
    no_txtnorm=False, word_dim=300, num_layers=1, gpo_backend="auto", loss_backend="auto", pooling="gpo", pool_k=None,
    precision=None, seed=0, workers=4, log_step=100, save_steps=1000, train_split="train",
    val_split="dev", test_split=None, eval_batch_size=128, local_negatives=False,
    feature_drop=0.2, token_aug=0.2, max_steps=None, text_model=None, bert_config=None,
    vocab_file=None, data_path=None, device="auto", synthetic="image", synthetic_dir=None, compile=False,
    chunk_size=None, dedupe_items=False,
)

# The published BiGRU branch builds AdamW without a weight_decay for precomputed region features
# (lib/vse.py: torch's default, 0.01) and with 1e-4 otherwise; the BERT branch uses 1e-4 throughout.
GRU_REGION_WEIGHT_DECAY = 1e-2

# The no-argument demo: a small model that trains on 2 CPU cores in about one minute. Its tiny BERT is
# randomly initialised, so it learns at the full lr (the published 0.1x is for pretrained BERT). The
# published schedule's shape, VSE0 warm-up then hardest negatives, with two warm-up epochs of three.
# Test rsum measured on the image set: 431.4 with two, 368.7 with one, 395.3 with VSE0 throughout. The
# video set (20 captions per item) stays with VSE0: 385.8, against 382.7 with two warm-up epochs.
SYNTHETIC_DEFAULTS = dict(
    PUBLISHED_DEFAULTS, embed_size=256, batch_size=64, learning_rate=1e-3, bert_lr_factor=1.0, num_epochs=3,
    lr_update=2, vse_mean_warmup_epochs=2, workers=0, log_step=20, save_steps=0, val_split="dev",
    test_split="test", eval_batch_size=256,
)
SYNTHETIC_VIDEO_DEFAULTS = dict(SYNTHETIC_DEFAULTS, vse_mean_warmup_epochs=3)

# Options that fix the model's shape: a resumed run must keep them.
MODEL_KEYS = ("embed_size", "precomp_enc_type", "text_encoder", "no_imgnorm", "no_txtnorm", "word_dim",
              "num_layers", "img_dim", "vocab_size", "text_model", "bert_config", "pooling", "pool_k")
# Options a resumed run may change (run control, not the optimisation it continues).
RUN_KEYS = ("num_epochs", "max_steps", "run_dir", "device", "workers", "log_step", "save_steps",
            "eval_batch_size", "progress", "gpo_backend", "loss_backend", "data_path", "test_split", "compile",
            "chunk_size")

# Options that name files or directories: stored absolute, so a run resumes (and its checkpoints evaluate)
# from any working directory.
PATH_KEYS = ("data_path", "text_model", "bert_config", "vocab_file", "synthetic_dir")

PRECISIONS = ("fp32", "bf16", "fp16")
BACKENDS = ("auto", "triton", "torch")


class _Flag(argparse.Action):
    """A store_true flag whose default is None, so an explicit flag can be told from a default."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=None, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vse_fast.train",
        description=__doc__.split("\n\n")[0] + " Defaults in brackets: published / no-argument demo.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )

    def d(key):  # default shown in the help text
        pub, syn = PUBLISHED_DEFAULTS[key], SYNTHETIC_DEFAULTS[key]
        return f"[{pub}]" if pub == syn else f"[{pub} / {syn}]"

    g = p.add_argument_group("data")
    g.add_argument("--data_path", help="directory with {split}_ims.npy, {split}_caps.txt, ... "
                   "[none: generate the synthetic dataset]")
    g.add_argument("--synthetic", choices=("image", "video"),
                   help="flavour of the synthetic dataset used without --data_path [image]")
    g.add_argument("--synthetic_dir", help="cache directory of the synthetic dataset "
                   "[$VSE_FAST_CACHE or ~/.cache/vse_fast/...]")
    g.add_argument("--train_split", help=f"training split {d('train_split')}")
    g.add_argument("--val_split", help=f"split evaluated after each epoch (selects best.pth) {d('val_split')}")
    g.add_argument("--test_split", help=f"split evaluated with best.pth at the end {d('test_split')}")
    g.add_argument("--workers", type=int, help=f"data-loading worker processes per rank {d('workers')}")
    g.add_argument("--feature_drop", type=float, help="training region/frame drop probability "
                   f"{d('feature_drop')}; with --precomp_enc_type backbone the published grid scheme: an item is "
                   "left whole with this probability, else each row is dropped with it times the item's draw")
    g.add_argument("--token_aug", type=float, help=f"training caption-token augmentation probability {d('token_aug')}")

    g = p.add_argument_group("model")
    g.add_argument("--embed_size", type=int, help=f"joint embedding size {d('embed_size')}")
    g.add_argument("--precomp_enc_type", choices=("basic", "backbone", "none"),
                   help="image encoder: basic = fc + residual MLP (regions); backbone/none = fc only "
                   f"{d('precomp_enc_type')}")
    g.add_argument("--no_imgnorm", action=_Flag, help="do not L2-normalise image embeddings")
    g.add_argument("--no_txtnorm", action=_Flag, help="do not L2-normalise caption embeddings")
    g.add_argument("--text_encoder", choices=("bert", "gru"), help=f"text encoder {d('text_encoder')}")
    g.add_argument("--text_model", help="BERT weights: a local directory (save_pretrained layout; offline)")
    g.add_argument("--bert_config", help="BERT config json for a randomly initialised BERT (instead of --text_model)")
    g.add_argument("--vocab_file", help="BERT vocab.txt (default: the tokenizer of --text_model), or the "
                   "GRU vocabulary json")
    g.add_argument("--word_dim", type=int, help=f"GRU word embedding size {d('word_dim')}")
    g.add_argument("--num_layers", type=int, help=f"GRU layers {d('num_layers')}")
    g.add_argument("--pooling", choices=("gpo", "mean", "max", "kmax"),
                   help="set pooling of both encoders: GPO (published), or a fixed baseline of the paper: mean, "
                   f"max, or kmax (mean of the top --pool_k values per dimension) {d('pooling')}")
    g.add_argument("--pool_k", type=int, help="k of --pooling kmax")
    g.add_argument("--gpo_backend", choices=BACKENDS,
                   help=f"GPO sort-and-pool backend; torch keeps the coefficient table on torch too {d('gpo_backend')}")
    g.add_argument("--loss_backend", choices=BACKENDS, help=f"contrastive loss backend {d('loss_backend')}")

    g = p.add_argument_group("optimisation")
    g.add_argument("--margin", type=float, help=f"hinge margin {d('margin')}")
    g.add_argument("--max_violation", action=argparse.BooleanOptionalAction, help="hardest negatives also during the warm-up epochs")
    g.add_argument("--vse_mean_warmup_epochs", type=int,
                   help=f"epochs with the VSE0 (sum) loss before hardest negatives {d('vse_mean_warmup_epochs')}; "
                        f"{SYNTHETIC_VIDEO_DEFAULTS['vse_mean_warmup_epochs']} with --synthetic video")
    g.add_argument("--batch_size", type=int, help=f"GLOBAL batch size (split over processes) {d('batch_size')}")
    g.add_argument("--learning_rate", type=float, help=f"AdamW learning rate {d('learning_rate')}")
    g.add_argument("--bert_lr_factor", type=float, help=f"BERT lr = factor x lr {d('bert_lr_factor')}")
    g.add_argument("--weight_decay", type=float,
                   help=f"AdamW weight decay {d('weight_decay')}; {GRU_REGION_WEIGHT_DECAY} with --text_encoder gru "
                        "and --precomp_enc_type basic (the published BiGRU branch's AdamW default)")
    g.add_argument("--num_epochs", type=int, help=f"epochs {d('num_epochs')}")
    g.add_argument("--lr_update", type=int, help=f"epoch at which every lr is multiplied by 0.1 {d('lr_update')}")
    g.add_argument("--grad_clip", type=float, help=f"gradient-norm clip, <= 0 disables {d('grad_clip')}")
    g.add_argument("--precision", choices=PRECISIONS,
                   help="autocast precision [bf16 on CUDA GPUs that support it, else fp32]; fp16 uses a GradScaler")
    g.add_argument("--local_negatives", action=argparse.BooleanOptionalAction,
                   help="multi-process: each process uses only its own batch as negatives")
    g.add_argument("--dedupe_items", action=argparse.BooleanOptionalAction,
                   help="an item (image, video) whose several captions share a batch enters the loss once, and "
                   "its captions are not negatives of each other (the published loss scores each caption's "
                   "own copy of the image and counts its sibling captions as negatives) [off]")
    g.add_argument("--seed", type=int, help=f"seed of initialisation, data order and augmentation {d('seed')}")
    g.add_argument("--chunk_size", type=int,
                   help="encode each process's batch in chunks of this many pairs (gradient caching: the "
                   "loss and its negatives still span the whole batch; activations of one chunk in memory; "
                   "about one extra forward per step). Dropout masks and BatchNorm statistics are then "
                   "per chunk (see vse_fast/grad_cache.py) [off]")

    g = p.add_argument_group("run")
    g.add_argument("--run_dir", help="output directory [runs/<date-time>]")
    g.add_argument("--resume", help="checkpoint (last.pth) to continue from; its options are reused")
    g.add_argument("--max_steps", type=int,
                   help="stop (and write last.pth) after this many training steps (batches) in total, fp16 steps "
                   "that the GradScaler skipped included")
    g.add_argument("--save_steps", type=int,
                   help=f"also write last.pth every N steps, 0 = only at epoch ends {d('save_steps')}")
    g.add_argument("--log_step", type=int, help=f"log every N steps {d('log_step')}")
    g.add_argument("--eval_batch_size", type=int, help=f"evaluation batch size {d('eval_batch_size')}")
    g.add_argument("--device", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda, cuda:1 [auto]")
    g.add_argument("--compile", action=_Flag,
                   help="compile BERT with torch.compile (dynamic shapes): fewer, fused kernels per step on a GPU; "
                   "the first training step and the first evaluation pay the compilation. Not inherited by "
                   "--resume [off]")
    g.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="progress bar: auto = when stderr is a terminal [auto]")
    return p


# ----------------------------------------------------------------------------- configuration


def resolve_config(args: argparse.Namespace, parser: argparse.ArgumentParser, saved: Optional[dict]) -> dict:
    """Defaults (published with --data_path, else the demo) <- the resumed checkpoint's config <- the
    options given explicitly on the command line. Validates values, naming the bad option."""
    explicit = {k: v for k, v in vars(args).items() if v is not None and k not in ("resume",)}
    text_encoder = explicit.get("text_encoder", (saved or {}).get("text_encoder", "bert"))
    ignored, which = ((("text_model", "bert_config", "bert_lr_factor"), "BERT") if text_encoder == "gru" else
                      (("word_dim", "num_layers"), "BiGRU"))
    for key in ignored:
        if key in explicit:
            this = "the BiGRU (--text_encoder gru)" if text_encoder == "gru" else "BERT (--text_encoder bert)"
            parser.error(f"--{key} configures the {which} text encoder; this run's text encoder is {this}, "
                         "which would ignore it")
    warmup = explicit.get("vse_mean_warmup_epochs")
    if warmup and explicit.get("max_violation", (saved or {}).get("max_violation")):
        if "max_violation" in explicit:
            parser.error(f"--max_violation takes hardest negatives from the first epoch, so --vse_mean_warmup_epochs "
                         f"{warmup} would have no effect: pass one of them")
        parser.error(f"the resumed run was started with --max_violation (hardest negatives from the first epoch), "
                     f"so --vse_mean_warmup_epochs {warmup} would have no effect: add --no-max_violation to warm "
                     "up with VSE0")
    if saved is not None:
        cfg = dict(saved)
        explicit = _absolute_paths(explicit)
        gru = cfg.get("text_encoder") == "gru"
        bert_only = ("text_model", "bert_config") if gru else ()
        beside = os.path.join(os.path.dirname(os.path.abspath(args.resume)), "vocab.json") \
            if getattr(args, "resume", None) else None
        if (gru and "vocab_file" not in explicit and cfg.get("vocab_file")
                and not os.path.exists(cfg["vocab_file"]) and beside and os.path.isfile(beside)):
            cfg["vocab_file"] = beside  # a moved run: the vocabulary training wrote beside it (as vse_fast.eval)
        for key in PATH_KEYS:
            if key not in explicit and key not in bert_only and cfg.get(key) and not os.path.exists(cfg[key]):
                if key != "synthetic_dir":  # a missing synthetic cache is regenerated
                    parser.error(f"the resumed run's --{key} {cfg[key]!r} does not exist (moved, or a relative "
                                 f"path from another working directory?): pass --{key} with its location")
        for key, value in explicit.items():
            if key in PATH_KEYS and cfg.get(key) and (_same_path(cfg[key], value) or not os.path.exists(cfg[key])):
                continue  # the same file, or its new location
            saved_value = cfg.get(key, PUBLISHED_DEFAULTS.get(key))  # absent from older checkpoints: the default
            if key in MODEL_KEYS and (key in cfg or key in PUBLISHED_DEFAULTS) and saved_value != value:
                parser.error(f"--{key} {value!r} differs from the resumed checkpoint's {saved_value!r}: "
                             "a resumed run keeps the model's shape")
        for key in ("max_steps", "device", "compile"):  # not inherited: the earlier run's stop point, device, compile
            cfg[key] = PUBLISHED_DEFAULTS[key]
        # A resumed run writes beside the checkpoint it resumes (which may have been moved or copied),
        # not to the directory recorded when it was written.
        if getattr(args, "resume", None):
            cfg["run_dir"] = os.path.dirname(os.path.abspath(args.resume))
        cfg.update(explicit)
        _check_resumed_vocabulary(saved, cfg, explicit, parser)
        return cfg
    base = PUBLISHED_DEFAULTS if args.data_path else (
        SYNTHETIC_VIDEO_DEFAULTS if args.synthetic == "video" else SYNTHETIC_DEFAULTS)
    cfg = dict(base)
    cfg.update(explicit)
    if "weight_decay" not in explicit and cfg["text_encoder"] == "gru" and cfg["precomp_enc_type"] == "basic":
        cfg["weight_decay"] = GRU_REGION_WEIGHT_DECAY
    _validate(cfg, parser)
    return _absolute_paths(cfg)


def _weights_file_errors() -> tuple:
    """What reading a damaged model.safetensors raises (not an OSError)."""
    try:
        from safetensors import SafetensorError
    except ImportError:
        return ()
    return (SafetensorError,)


def _build_new_model(cfg: dict):
    """``build_model`` from the run options; a BERT directory or config it cannot read is a DataError
    naming the option."""
    from vse_fast.data import DataError
    from vse_fast.model import build_model

    try:
        return build_model(model_options(cfg))
    except (OSError, ValueError, *_weights_file_errors()) as err:  # no weights, a truncated file, bad json
        option = "--text_model" if cfg.get("text_model") else "--bert_config"
        source = cfg.get("text_model") or cfg.get("bert_config")
        if cfg["text_encoder"] != "bert" or not source:
            raise
        what = "" if isinstance(err, (OSError, ValueError)) else f"{type(err).__name__}: "
        raise DataError(f"{option} {source}: {what}{err}") from None


def _out_of_memory(err: RuntimeError) -> bool:
    """Whether an allocation failed: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err)


def _check_resumed_vocabulary(saved: dict, cfg: dict, explicit: dict, parser) -> None:
    """A resumed model's word embeddings are indexed by its run's word ids: --vocab_file may name the
    vocabulary's new location, or a file of the same words and ids, not another vocabulary."""
    import warnings

    from vse_fast.data import DataError

    given, before = explicit.get("vocab_file"), saved.get("vocab_file")
    if not (given and before and os.path.exists(before)) or _same_path(given, before):
        return

    def word_ids(c):
        vocab = load_text_vocab(c, c.get("data_path"))
        return vocab.word2idx if hasattr(vocab, "word2idx") else vocab.get_vocab()

    try:
        with warnings.catch_warnings():  # said again when the run loads it
            warnings.simplefilter("ignore")
            ids_before, ids_after = word_ids(saved), word_ids(cfg)
    except DataError:
        return  # an unreadable vocabulary is reported when the run loads it
    if ids_before != ids_after:
        parser.error(f"--vocab_file {given!r} holds another vocabulary than the resumed run's {before!r}: the "
                     "model's word embeddings are indexed by the run's word ids; pass its vocabulary")


def _absolute_paths(cfg: dict) -> dict:
    """``cfg`` with the PATH_KEYS it sets made absolute (against the current directory)."""
    return {k: os.path.abspath(v) if k in PATH_KEYS and isinstance(v, str) and v else v for k, v in cfg.items()}


def _same_path(a: str, b: str) -> bool:
    a, b = os.path.abspath(a), os.path.abspath(b)
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def _validate(cfg: dict, parser) -> None:
    positive = ("embed_size", "batch_size", "num_epochs", "eval_batch_size", "log_step", "word_dim", "num_layers")
    for key in positive:
        if cfg.get(key) is not None and cfg[key] < 1:
            parser.error(f"--{key} must be >= 1, got {cfg[key]}")
    if cfg.get("pooling") == "kmax" and (cfg.get("pool_k") is None or cfg["pool_k"] < 1):
        parser.error(f"--pooling kmax needs --pool_k >= 1, got {cfg.get('pool_k')}")
    if cfg.get("pooling") != "kmax" and cfg.get("pool_k") is not None:
        parser.error(f"--pool_k is only used with --pooling kmax, not {cfg.get('pooling')}")
    if cfg.get("chunk_size") is not None and cfg["chunk_size"] < 2:
        parser.error(f"--chunk_size must be >= 2, got {cfg['chunk_size']}: a chunk of one pair with a one-row "
                     "set gives the region MLP's BatchNorm a single value per channel")
    for key in ("workers", "save_steps", "vse_mean_warmup_epochs", "lr_update"):
        if cfg.get(key) is not None and cfg[key] < 0:
            parser.error(f"--{key} must be >= 0, got {cfg[key]}")
    for key in ("learning_rate",):
        if not cfg[key] > 0 or not math.isfinite(cfg[key]):
            parser.error(f"--{key} must be a positive number, got {cfg[key]}")
    if cfg["batch_size"] < 2:
        parser.error(f"--batch_size must be >= 2, got {cfg['batch_size']}: the loss takes its negatives from the "
                     "other pairs of the (global) batch, so one pair has none and trains nothing")
    if cfg.get("precomp_enc_type") == "basic" and cfg["embed_size"] < 2:
        parser.error(f"--embed_size must be >= 2 with --precomp_enc_type basic (its MLP's hidden size is "
                     f"embed_size // 2), got {cfg['embed_size']}")
    for key in ("train_split", "val_split"):
        if not cfg.get(key):
            parser.error(f"--{key} must name a split, got {cfg.get(key)!r}")
    if cfg.get("test_split") == "":
        parser.error("--test_split must name a split, got ''")
    for key in ("run_dir", "synthetic_dir"):
        if cfg.get(key) == "":
            parser.error(f"--{key} must name a directory, got ''")
    if math.isnan(cfg["grad_clip"]):
        parser.error("--grad_clip must be a number (<= 0 disables clipping), got nan")
    for key in ("margin", "weight_decay", "bert_lr_factor"):
        if not cfg[key] >= 0 or not math.isfinite(cfg[key]):
            parser.error(f"--{key} must be a non-negative number, got {cfg[key]}")
    for key in ("feature_drop", "token_aug"):
        if not 0 <= cfg[key] < 1:
            parser.error(f"--{key} must be in [0, 1), got {cfg[key]}")
    if cfg.get("device") not in (None, "auto"):
        try:
            device_option(cfg["device"], "training")
        except ValueError as err:
            parser.error(str(err))
    if not 0 <= cfg.get("seed", 0) < 2**32:
        parser.error(f"--seed must be in [0, 2**32), got {cfg['seed']}")
    if cfg.get("max_steps") is not None and cfg["max_steps"] < 0:
        parser.error(f"--max_steps must be >= 0, got {cfg['max_steps']}")
    for key in ("data_path", "text_model", "bert_config", "vocab_file"):
        path = cfg.get(key)
        if path is None:
            continue
        must_be_dir = key in ("data_path", "text_model")
        if not os.path.exists(path):
            parser.error(f"--{key} {path!r} does not exist")
        if must_be_dir and not os.path.isdir(path):
            parser.error(f"--{key} {path!r} is not a directory")
        if key in ("bert_config", "vocab_file") and not os.path.isfile(path):
            parser.error(f"--{key} {path!r} is not a file")
    if cfg.get("text_model") and cfg.get("bert_config"):
        parser.error("give --text_model (pretrained BERT weights) or --bert_config (a randomly initialised "
                     "BERT), not both: with both, the pretrained weights would not be loaded")
    if cfg.get("compile") and cfg["text_encoder"] != "bert":
        parser.error("--compile compiles the BERT text encoder; the GRU text encoder (--text_encoder gru) "
                     "runs one cuDNN GRU and is not compiled")
    if not cfg.get("data_path"):
        return  # the synthetic dataset brings its BERT config and vocabulary
    if cfg["text_encoder"] == "bert" and not (cfg.get("text_model") or cfg.get("bert_config")):
        parser.error("the BERT text encoder needs --text_model (a local BERT directory, e.g. bert-base-uncased "
                     "saved with save_pretrained; nothing is downloaded) or --bert_config (a BertConfig json "
                     "for random initialisation)")
    if cfg["text_encoder"] == "bert" and cfg.get("bert_config") and not cfg.get("text_model") \
            and not cfg.get("vocab_file"):
        parser.error("--bert_config without --text_model needs --vocab_file (the BERT vocab.txt)")


def _choose_precision(cfg: dict, device: torch.device) -> str:
    if cfg.get("precision"):
        precision = cfg["precision"]
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"--precision bf16 is not supported on {torch.cuda.get_device_name(device)}")
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


# ----------------------------------------------------------------------------- building blocks


def _synthetic_path(cfg: dict) -> str:
    from vse_fast.synthetic import ensure_synthetic

    # from the config, so a resumed run keeps its dataset flavour unless --synthetic is given again
    path = ensure_synthetic(cfg.get("synthetic_dir"), flavour=cfg.get("synthetic") or "image", seed=0)
    return os.path.abspath(path)  # its BERT config and vocabulary paths go into the checkpoints (PATH_KEYS)


def load_text_vocab(cfg: dict, data_path: str):
    """The tokenizer (BERT) or Vocabulary (GRU) the captions are encoded with."""
    from vse_fast import data

    if cfg["text_encoder"] == "bert":
        return data.load_tokenizer(text_model_dir=cfg.get("text_model") if not cfg.get("vocab_file") else None,
                                   vocab_file=cfg.get("vocab_file"))
    if cfg.get("vocab_file"):
        return data.Vocabulary.load(cfg["vocab_file"])
    return data.Vocabulary.from_caption_files([data.split_captions_file(data_path, cfg["train_split"])])


def _check_token_ids_fit(vocab, model_opt: dict, cfg: dict) -> None:
    """Every id the tokenizer (or GRU Vocabulary) gives must index the model's word embeddings: found
    here, not as an IndexError inside the embedding at the first batch."""
    from vse_fast.data import DataError, Vocabulary

    if isinstance(vocab, Vocabulary):
        rows, source = model_opt.get("vocab_size"), cfg.get("vocab_file") or f"{cfg['train_split']}_caps.txt"
    else:
        rows = (model_opt.get("bert_config_dict") or {}).get("vocab_size")
        source = cfg.get("vocab_file") or cfg.get("text_model")
    if rows is not None and len(vocab) > rows:
        raise DataError(f"{source}: the vocabulary has {len(vocab)} entries, but the text encoder's word "
                        f"embedding has {rows} rows (vocab_size): use the vocabulary the model was built with")


def model_options(cfg: dict) -> dict:
    """The options ``vse_fast.model.build_model`` takes, filled from the run config."""
    from vse_fast.model import model_defaults

    opt = model_defaults()
    opt.update({k: cfg[k] for k in opt if k in cfg and cfg[k] is not None})
    return opt


def build_optimizer(model, cfg: dict) -> torch.optim.Optimizer:
    groups = model.param_groups(cfg["learning_rate"], bert_lr_factor=cfg["bert_lr_factor"],
                                weight_decay=cfg["weight_decay"])
    for group in groups:
        group["base_lr"] = group["lr"]
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=cfg["learning_rate"], weight_decay=cfg["weight_decay"],
                             **({"fused": True} if on_cuda else {}))


def set_epoch_lr(optimizer, cfg: dict, epoch: int) -> float:
    """Published schedule: every lr x0.1 from epoch ``lr_update`` on. Returns the first group's lr."""
    factor = 0.1 if epoch >= cfg["lr_update"] else 1.0
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]


def max_violation_for_epoch(cfg: dict, epoch: int) -> bool:
    """Published: VSE0 (sum over negatives) for the warm-up epochs unless --max_violation, then VSE++."""
    return bool(cfg["max_violation"]) or epoch >= cfg["vse_mean_warmup_epochs"]


def _to_device(batch: dict, device: torch.device) -> dict:
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}


def compute_loss(model, batch: dict, ctx: vdist.DistContext, *, margin: float, max_violation: bool,
                 local_negatives: bool = False, precision: str = "fp32", loss_backend: str = "auto",
                 pairing: Optional[vdist.ItemPairing] = None):
    """Forward one (local) batch and this rank's share of the loss.

    Returns (loss, img_emb, cap_emb): loss is a 0-d fp32 tensor (reduction "sum"; the sum over
    ranks is the global-batch loss); embeddings (B_local, E). Backward ``loss * loss_scale(ctx)``.
    ``pairing``: see ``vse_fast.distributed.global_contrastive_loss`` (``--dedupe_items``).
    """
    img_emb, cap_emb = grad_cache.encode(model, batch, precision)
    loss = vdist.global_contrastive_loss(
        img_emb.float(), cap_emb.float(), ctx, margin=margin, max_violation=max_violation,
        local_negatives=local_negatives, backend=loss_backend, pairing=pairing,
    )
    return loss, img_emb, cap_emb


def train_step(model, batch, optimizer, scaler, ctx: vdist.DistContext, *, margin: float,
               max_violation: bool, grad_clip: float, precision: str = "fp32", local_negatives: bool = False,
               loss_backend: str = "auto", params=None, pairing: Optional[vdist.ItemPairing] = None):
    """One optimizer step on a (local) batch: forward, loss, backward (loss x world size, see
    vse_fast.distributed), gradient-norm clip (published: over all parameters), AdamW step.
    ``batch`` is a dict, or a list of its chunks (``grad_cache.split_batch``: gradient caching).
    Returns (loss, img_emb, cap_emb) as tensors: no host synchronisation here."""
    optimizer.zero_grad(set_to_none=True)
    if isinstance(batch, (list, tuple)):
        loss, img_emb, cap_emb = grad_cache.cached_backward(
            model, batch, scaler, ctx, margin=margin, max_violation=max_violation, local_negatives=local_negatives,
            precision=precision, loss_backend=loss_backend, pairing=pairing)
    else:
        loss, img_emb, cap_emb = compute_loss(model, batch, ctx, margin=margin, max_violation=max_violation,
                                              local_negatives=local_negatives, precision=precision,
                                              loss_backend=loss_backend, pairing=pairing)
        scaler.scale(loss * vdist.loss_scale(ctx)).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss, img_emb, cap_emb


def collapse_expected_loss(global_batch: int, margin: float, max_violation: bool) -> float:
    """Loss when all embeddings coincide: every hinge is ``margin`` (the hardest-negative collapse)."""
    return 2.0 * global_batch * margin * (1 if max_violation else global_batch - 1)


def in_batch_recall(img_emb: torch.Tensor, cap_emb: torch.Tensor, max_rows: int = 256,
                    items: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Image-to-text R@1 inside a batch of pairs (row i of both is pair i): the fraction of the first
    ``min(B, max_rows)`` images whose own caption scores strictly above every other caption of the
    batch (a tie is a miss). Chance is 1/B. ``items`` (B,): the item of each pair; then the other
    captions of an image's own item are not competitors. A 0-d fp32 tensor (no sync)."""
    n = min(img_emb.shape[0], max_rows)
    sims = img_emb[:n].detach().float() @ cap_emb.detach().float().T  # [n, B]
    own = sims.diagonal()  # [n]: image i with its own caption i
    if items is None:
        items = torch.arange(cap_emb.shape[0], device=sims.device)
    rival = items[:n, None] != items[None, :]  # [n, B]
    return (~((sims >= own[:, None]) & rival).any(dim=1)).float().mean()


MIN_COLLAPSE_BATCH = 8
COLLAPSE_TOL_MARGIN = 0.2


def is_collapsed(loss: float, recall: float, local_batch: int, global_batch: int, margin: float,
                 max_violation: bool, *, loss_tol: float = 0.05) -> bool:
    """The hardest-negative collapse: the loss within ``loss_tol`` of its value for identical
    embeddings (``collapse_expected_loss``) and the embeddings no longer telling pairs apart: in-batch
    R@1 (``in_batch_recall``, over each process's ``local_batch`` pairs) at most twice chance.
    A loss near that value alone is no collapse: when a batch's hardest negatives are about as close
    as the positives (near-duplicate captions, early VSE++) a learning model sits there too. Below
    ``MIN_COLLAPSE_BATCH`` local pairs chance is too high to tell, and nothing is reported.

    Each hinge departs from ``margin`` by a negative's score minus its positive's, a cosine difference
    that is 0 at collapse; ``loss_tol`` is relative up to margin ``COLLAPSE_TOL_MARGIN`` and a fixed
    cosine difference above it, since a relative tolerance at margin >= 2 (every hinge active, each off
    by at most 2) would admit any model, a fresh one included."""
    expected = collapse_expected_loss(global_batch, margin, max_violation)
    return (margin > 0 and local_batch >= MIN_COLLAPSE_BATCH and recall <= 2.0 / local_batch
            and abs(loss - expected) <= loss_tol * min(margin, COLLAPSE_TOL_MARGIN) / margin * expected)


# ----------------------------------------------------------------------------- the run


class _Progress:
    """tqdm on the main rank when wanted, else nothing (log lines carry the same numbers)."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False)
            except ImportError:
                pass

    def update(self, n=1, **postfix):
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _setup_logging(run_dir: Optional[str], ctx: vdist.DistContext) -> None:
    # Other ranks print errors only: every warning here is about the run as a whole, which rank 0 says once.
    logger.setLevel(logging.INFO if ctx.is_main else logging.ERROR)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    stream.addFilter(lambda record: not getattr(record, "file_only", False))
    logger.addHandler(stream)
    if run_dir and ctx.is_main:
        fh = logging.FileHandler(os.path.join(run_dir, "train.log"))
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(fh)


class Trainer:
    """Owns the model, optimizer, scaler, data and counters of one run (see ``main``)."""

    def __init__(self, cfg: dict, ctx: vdist.DistContext, data_path: str, saved_state: Optional[dict]):
        from vse_fast import data
        from vse_fast import eval as eval_module
        from vse_fast.eval import caption_position_limit
        from vse_fast.model import build_model

        self.cfg, self.ctx, self.data_path = cfg, ctx, data_path
        self.device = ctx.device
        self.precision = _choose_precision(cfg, self.device)
        cfg["precision_used"] = self.precision

        info = data.check_split(data_path, cfg["train_split"])
        infos = {cfg["train_split"]: info}
        for split in filter(None, (cfg["val_split"], cfg.get("test_split"))):
            split_info = infos[split] = data.check_split(data_path, split)
            if split_info.feat_dim != info.feat_dim:  # found before training, not at the first evaluation
                raise data.DataError(f"{split_info.paths['ims']}: features of dimension {split_info.feat_dim}, but "
                                     f"the training split's {info.paths['ims']} has {info.feat_dim}")
            limit = None
            if split == "dev" and split_info.n_captions > eval_module.DEV_CAPTION_LIMIT:  # cut in whole items
                items = eval_module.DEV_CAPTION_LIMIT // split_info.caps_per_item
                limit = items * split_info.caps_per_item
                logger.info("split %s is evaluated on its first %d items (%d of %d captions), as the published "
                            "code evaluates COCO's dev", split, items, limit, split_info.n_captions)
            data.check_finite_features(data_path, split, limit)  # before training, not after the first epoch
        for split, split_info in infos.items():
            if split_info.row_repeat > 1:
                logger.info("split %s: %s repeats each item's row once per caption; read as %d items with %d "
                            "captions each", split, split_info.paths["ims"], split_info.n_items,
                            split_info.caps_per_item)
        if cfg.get("img_dim") is not None and cfg["img_dim"] != info.feat_dim:
            raise data.DataError(f"{info.paths['ims']}: features of dimension {info.feat_dim}, but the resumed "
                                 f"checkpoint's model takes img_dim {cfg['img_dim']}")
        cfg["img_dim"] = info.feat_dim
        if info.n_items < 2:
            raise data.DataError(f"{info.paths['ims']}: {info.n_items} training item; the loss takes its negatives "
                                 "from other items, so training needs at least 2")
        if info.n_captions < cfg["batch_size"]:
            raise data.DataError(f"{info.paths['caps']}: {info.n_captions} training pairs (captions), fewer than "
                                 f"one batch of {cfg['batch_size']}: lower --batch_size")
        if saved_state is None and cfg["text_encoder"] == "bert" and cfg.get("text_model") and cfg.get("vocab_file"):
            data.check_same_bert_vocab(cfg["text_model"], cfg["vocab_file"],
                                       "hold different vocabularies: the directory's pretrained word embeddings "
                                       "are indexed by its own; pass one of them")
        self.vocab = load_text_vocab(cfg, data_path)
        if cfg["text_encoder"] == "gru":
            cfg["vocab_size"] = len(self.vocab)
            if not cfg.get("vocab_file"):  # built from the training captions: kept with the run, so a resumed
                path = os.path.abspath(os.path.join(cfg["run_dir"], "vocab.json"))  # run and eval use these ids
                if ctx.is_main:
                    self.vocab.save(path)
                cfg["vocab_file"] = path

        torch.manual_seed(cfg["seed"])  # identical initial weights on every rank
        try:
            if saved_state is not None and isinstance(cfg.get("model"), dict):
                # the saved architecture (incl. the BERT config); the weights come from the checkpoint
                self.model = build_model(cfg["model"], load_pretrained=False, gpo_backend=cfg["gpo_backend"])
            else:
                self.model = _build_new_model(cfg)
            self.model.to(self.device)
        except RuntimeError as err:
            if not _out_of_memory(err):
                raise
            raise data.DataError(f"the model does not fit in {self.device} memory (--embed_size "
                                 f"{cfg['embed_size']}, features of dimension {cfg['img_dim']}): "
                                 f"{str(err).strip().splitlines()[-1]}") from None
        _check_token_ids_fit(self.vocab, self.model.opt, cfg)
        if cfg.get("compile"):
            self.model.compile_text_backbone()
        self.train_set = data.PrecomputedDataset(
            data_path, cfg["train_split"], self.vocab, train=True, seed=cfg["seed"],
            feature_drop=cfg["feature_drop"], token_aug=cfg["token_aug"],
            position_limit=caption_position_limit(self.model),
            feature_drop_scheme=data.feature_drop_scheme(cfg["precomp_enc_type"]),
        )
        lens = self.train_set.data.lens
        largest = int(lens.max()) if lens is not None else info.max_set
        if cfg.get("pooling") == "kmax" and cfg["pool_k"] >= largest and ctx.is_main:
            logger.warning("--pool_k %d is not below the largest training set of %s (%d rows): kmax pooling of "
                           "every image/video set is mean pooling (--pooling mean), and of every caption of at "
                           "most %d tokens too", cfg["pool_k"], info.paths["ims"], largest, cfg["pool_k"])
        for split in filter(None, (cfg["val_split"], cfg.get("test_split"))):  # their captions: before training
            limit = eval_module._resolve_limit(split, infos[split].caps_per_item, "auto")
            data.CaptionDataset(data_path, split, self.vocab, caption_limit=limit,
                                position_limit=caption_position_limit(self.model))
        self.sampler = vdist.EpochBatchSampler(len(self.train_set), cfg["batch_size"], rank=ctx.rank,
                                               world_size=ctx.world_size, seed=cfg["seed"])
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.optimizer = build_optimizer(self.model, cfg)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.epoch, self.epoch_step, self.step, self.best_rsum = 0, 0, 0, -math.inf
        self._weights_checked_at = None  # the step whose weights _check_finite_weights found finite
        self._first_bad_step = None  # device int64: the first step since the last logged one whose loss was NaN/inf
        if saved_state is not None:
            self._restore(saved_state)
        else:
            torch.manual_seed(cfg["seed"] * 1000 + ctx.rank + 1)  # per-rank dropout streams
        self._skipped_logged = self._skipped_steps_in_total()
        self.ddp_model = self.model
        if ctx.enabled:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )

    # -- checkpoints

    def state(self) -> dict:
        from vse_fast.checkpoint import capture_rng_state

        rng = vdist.all_gather_object(capture_rng_state(self.device), self.ctx)
        return {
            "format": "vse_fast/1",
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "epoch_step": self.epoch_step,
            "step": self.step,
            "best_rsum": self.best_rsum,
            "train_pairs": len(self.train_set),
            "rng": {"per_rank": rng, "world_size": self.ctx.world_size},
            "config": {**{k: v for k, v in self.cfg.items() if isinstance(v, (int, float, str, bool, type(None)))},
                       "model": self.model.opt},
        }

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        # The learning rate and weight decay come from the (resumed) config, so that --learning_rate and
        # --weight_decay given with --resume take effect; the optimizer state brings the moments and step.
        hyper = [(group["base_lr"], group["weight_decay"]) for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, (base_lr, weight_decay) in zip(self.optimizer.param_groups, hyper):
            group["base_lr"], group["weight_decay"] = base_lr, weight_decay
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.epoch_step, self.step = state["epoch"], state.get("epoch_step", 0), state["step"]
        self.best_rsum = state.get("best_rsum", -math.inf)
        saved_data = state["config"].get("data_path_used")
        if saved_data and os.path.isdir(saved_data) and not _same_path(saved_data, self.data_path):
            # another dataset, not a moved copy of the same one (the old path would be gone)
            logger.warning("--data_path %s: the resumed run trained on %s%s", self.data_path, saved_data,
                           f"; its best rsum {self.best_rsum:.2f} was measured there, so the best checkpoint is "
                           "chosen anew" if math.isfinite(self.best_rsum) else "")
            self.best_rsum = -math.inf
        saved_val = state["config"].get("val_split", PUBLISHED_DEFAULTS["val_split"])
        if saved_val != self.cfg["val_split"] and math.isfinite(self.best_rsum):
            logger.warning("--val_split %s: the resumed run's best rsum %.2f was measured on %s; the best "
                           "checkpoint is chosen anew on %s", self.cfg["val_split"], self.best_rsum, saved_val,
                           self.cfg["val_split"])
            self.best_rsum = -math.inf
        saved_pairs = state.get("train_pairs")  # absent from checkpoints before 2026-11-29
        if self.epoch_step and saved_pairs is not None and saved_pairs != len(self.train_set):
            from vse_fast.data import DataError

            raise DataError(f"{self.train_set.info.paths['caps']}: {len(self.train_set)} training pairs, but the "
                            f"resumed run had {saved_pairs} and stopped inside epoch {self.epoch} (after "
                            f"{self.epoch_step} steps): the epoch's order of pairs would change, so the rest of the "
                            "epoch would repeat or skip pairs. Resume with the same training split, or from the "
                            "last.pth written at the end of an epoch")
        if self.epoch_step > self.steps_per_epoch:
            from vse_fast.data import DataError

            raise DataError(f"{self.train_set.info.paths['caps']}: the checkpoint stopped at step {self.epoch_step} "
                            f"of an epoch, but this training split gives {self.steps_per_epoch} steps per epoch: "
                            "did the training split change?")
        rng = state.get("rng", {})
        per_rank = rng.get("per_rank", [])
        if rng.get("world_size") == self.ctx.world_size and len(per_rank) == self.ctx.world_size:
            from vse_fast.checkpoint import restore_rng_state

            restore_rng_state(per_rank[self.ctx.rank], self.device)
        else:
            # Different process count: data order and augmentation still match exactly (they depend on
            # (seed, epoch, index) only); dropout streams are re-seeded.
            torch.manual_seed(self.cfg["seed"] * 1000 + self.ctx.rank + 1 + 7919 * self.step)
            if self.ctx.is_main:
                logger.warning("resuming with %d process(es) instead of %s: dropout random streams re-seeded",
                               self.ctx.world_size, rng.get("world_size"))

    def _check_finite_weights(self, before: str) -> None:
        """FloatingPointError if a step made the weights NaN/inf (the logged loss precedes the step, so
        a finite one does not rule it out). Rank 0's verdict, on every rank: the parameters are the
        same everywhere, the BatchNorm buffers are rank 0's in the checkpoint (DDP broadcasts them
        at each forward), and no rank may raise alone while the others wait in a collective. Once per
        step: the epoch's evaluation and its checkpoint see the same weights."""
        if self._weights_checked_at == self.step:
            return
        if not self._broadcast(self._weights_finite()):
            raise FloatingPointError(f"the model's weights became NaN or inf by step {self.step} (epoch "
                                     f"{self.epoch}), before {before}: lower --learning_rate")
        self._weights_checked_at = self.step

    def _weights_finite(self) -> bool:
        """Whether every floating parameter and buffer of the model is finite (one host sync)."""
        flags = [torch.isfinite(t).all() for t in (*self.model.parameters(), *self.model.buffers())
                 if t.is_floating_point()]
        return bool(torch.stack(flags).all()) if flags else True

    def save(self, *names: str) -> None:
        """The training state to each of ``names`` in the run directory, in order, each atomically.
        Weights that went non-finite are never saved (FloatingPointError)."""
        from vse_fast.checkpoint import save_checkpoint

        self._check_finite_weights("writing " + " and ".join(names))
        state = self.state()  # collective (RNG states of all ranks): every rank takes part
        if self.ctx.is_main:
            for name in names:
                save_checkpoint(os.path.join(self.cfg["run_dir"], name), state)

    # -- training

    def _loader(self):
        self.train_set.set_epoch(self.epoch)
        self.sampler.set_epoch(self.epoch, self.epoch_step)
        from vse_fast.data import collate

        workers = self.cfg["workers"]
        return torch.utils.data.DataLoader(
            self.train_set, batch_sampler=self.sampler, collate_fn=collate, num_workers=workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            generator=torch.Generator().manual_seed(self.cfg["seed"] + self.epoch),  # keeps the global RNG untouched
        )

    def train_epoch(self, max_violation: bool) -> bool:
        """Train the rest of the current epoch. Returns False if stopped by --max_steps."""
        cfg, ctx = self.cfg, self.ctx
        self.ddp_model.train()
        max_steps, log_step, save_steps = cfg.get("max_steps"), cfg["log_step"], cfg["save_steps"]
        show = ctx.is_main and (cfg.get("progress") == "on" or (cfg.get("progress", "auto") == "auto"
                                                                  and sys.stderr.isatty()))
        bar = _Progress(show, self.steps_per_epoch, self.epoch_step, f"epoch {self.epoch}")
        params = [p for p in self.model.parameters() if p.requires_grad]
        t_last, steps_since = time.time(), 0
        try:
            if max_steps is not None and self.step >= max_steps and self.epoch_step < self.steps_per_epoch:
                return False
            for batch in self._loader():
                pairing = self._item_pairing(batch) if cfg.get("dedupe_items") else None
                items = batch["img_index"]  # (B_local,) on the host
                chunk = cfg.get("chunk_size")
                if chunk and chunk < batch["images"].shape[0]:
                    batch = [_to_device(c, self.device) for c in grad_cache.split_batch(batch, chunk)]
                else:
                    batch = _to_device(batch, self.device)
                loss, img_emb, cap_emb = train_step(
                    self.ddp_model, batch, self.optimizer, self.scaler, ctx, margin=cfg["margin"],
                    max_violation=max_violation, grad_clip=cfg["grad_clip"], precision=self.precision,
                    local_negatives=cfg["local_negatives"], loss_backend=cfg["loss_backend"], params=params,
                    pairing=pairing,
                )
                self.step += 1
                self.epoch_step += 1
                steps_since += 1
                self._note_non_finite(loss)
                saving = bool(save_steps) and self.step % save_steps == 0
                # a checkpointed step (save_steps, the --max_steps stop) is a logged one: its loss is
                # checked before last.pth is replaced
                stopping = max_steps is not None and self.step >= max_steps
                if self.step % log_step == 0 or self.epoch_step == self.steps_per_epoch or saving or stopping:
                    now = time.time()
                    self._log_step(loss, img_emb, cap_emb, items, max_violation,
                                   steps_since / max(now - t_last, 1e-9), bar)
                    t_last, steps_since = now, 0
                else:
                    bar.update()
                if self.epoch_step == self.steps_per_epoch:
                    break  # the epoch's end is checkpointed after evaluation
                if stopping:
                    return False
                if saving:
                    self.save("last.pth")
                    t_last = time.time()  # the next interval's throughput leaves the save out
        finally:
            bar.close()
        return True

    def _item_pairing(self, batch: dict) -> vdist.ItemPairing:
        """``--dedupe_items``: the ItemPairing of the batch the loss sees (global under global negatives,
        read from the sampler's order, so no rank waits for another's item ids), on the device."""
        items = batch["img_index"]
        if self.ctx.enabled and not self.cfg["local_negatives"]:
            global_items = self.train_set.item_of(self.sampler.global_indices(self.epoch_step))
            lo = self.ctx.rank * items.numel()
            if not torch.equal(global_items[lo:lo + items.numel()], items):
                raise RuntimeError(f"rank {self.ctx.rank}: the loader's batch is not the sampler's step "
                                   f"{self.epoch_step} of epoch {self.epoch}")
            items = global_items
        return vdist.item_pairing(items).to(self.device)

    def _note_non_finite(self, loss) -> None:
        """Remember, on the device (no host sync), the first step whose loss is NaN/inf. Checked at the
        next logged step: in fp16 the GradScaler skips such a step, so the weights stay finite and a
        later loss may be too, while the forward has put NaN in the BatchNorm running statistics."""
        if self._first_bad_step is None:
            self._first_bad_step = torch.full((), -1, dtype=torch.int64, device=loss.device)
        fresh = (self._first_bad_step < 0) & ~torch.isfinite(loss.detach())
        self._first_bad_step = torch.where(fresh, self.step, self._first_bad_step)

    def _skipped_steps_in_total(self) -> int:
        """Training steps whose update the fp16 GradScaler skipped (inf/NaN gradients), from the start of
        the run: steps taken minus the optimizer's own count (a host read of a device tensor on CUDA)."""
        if not self.scaler.is_enabled():
            return 0
        applied = next((int(s["step"]) for s in self.optimizer.state.values() if "step" in s), 0)
        return self.step - applied

    def _log_step(self, loss, img_emb, cap_emb, items, max_violation, steps_per_s, bar) -> None:
        """The only host synchronisation of the loop: at the logging cadence."""
        cfg, ctx = self.cfg, self.ctx
        recall = in_batch_recall(img_emb, cap_emb, items=items.to(img_emb.device))
        bad = (self._first_bad_step >= 0).float() if self._first_bad_step is not None else torch.zeros_like(recall)
        stats = vdist.all_reduce_sum(torch.stack([loss.detach().float(), recall, bad.to(recall.device)]), ctx)
        loss_v, recall_v, bad_ranks = stats.tolist()
        recall_v /= ctx.world_size
        local_batch = img_emb.shape[0]
        lr = self.optimizer.param_groups[0]["lr"]
        throughput = steps_per_s * cfg["batch_size"]
        bar.update(1, loss=f"{loss_v:.3f}", lr=f"{lr:.1e}", pairs_s=f"{throughput:.0f}")
        logger.info("epoch %d step %d/%d (total %d) loss %.4f lr %.2e %.0f pairs/s%s", self.epoch,
                    self.epoch_step, self.steps_per_epoch, self.step, loss_v, lr, throughput,
                    "" if self.precision == "fp32" else f" ({self.precision})",
                    extra={"file_only": bar.bar is not None})  # the bar shows these numbers
        skipped_total = self._skipped_steps_in_total()
        if skipped_total > self._skipped_logged:
            logger.info("%d step(s) since the last log skipped by the fp16 GradScaler (inf/NaN gradients; it "
                        "lowers its scale, now %g): %d of %d steps in all", skipped_total - self._skipped_logged,
                        self.scaler.get_scale(), skipped_total, self.step)
        self._skipped_logged = skipped_total
        # Every precision: the loss is computed in fp32 from l2-normalised embeddings, so a NaN/inf loss
        # means a NaN/inf forward (features, or fp16 overflow), which no GradScaler step can undo.
        if bad_ranks > 0 or not math.isfinite(loss_v):
            firsts = [f for f in vdist.all_gather_object(int(self._first_bad_step), ctx) if f >= 0]
            first = min(firsts) if firsts else self.step
            what = f"the loss became {loss_v}" if first == self.step else "the loss became NaN or inf"
            raise FloatingPointError(
                f"{what} at step {first} (epoch {self.epoch}): lower --learning_rate or check the features "
                "for NaN/inf" + (", or train in bf16/fp32 (fp16 overflow in the forward)" if self.precision ==
                                 "fp16" else ""))
        self._first_bad_step = None
        # VSE++ only: under VSE0 a fresh model sits near that loss too, before it has learnt anything
        if max_violation and is_collapsed(loss_v, recall_v, local_batch, cfg["batch_size"], cfg["margin"],
                                          max_violation):
            logger.warning(
                "training has collapsed at step %d: the embeddings no longer tell the pairs apart (in-batch "
                "image-to-text R@1 %.1f%%, chance %.1f%%) and the loss is pinned at 2*B*margin = %.1f. Known "
                "failure of hardest negatives from a poor start: use more VSE0 warm-up epochs "
                "(--vse_mean_warmup_epochs), a lower --learning_rate, or check the data.", self.step,
                100 * recall_v, 100 / local_batch, collapse_expected_loss(cfg["batch_size"], cfg["margin"], max_violation))

    # -- evaluation

    def evaluate(self, split: str) -> Optional[dict]:
        """Recall metrics of the (unwrapped) model on ``split``, on the main rank; None elsewhere. The model
        runs in fp32 whatever the training precision, as the published validation (and vse_fast.eval)."""
        from vse_fast.eval import evaluate

        self._check_finite_weights(f"evaluating {split}")
        metrics = None
        if self.ctx.is_main:
            self.model.eval()
            metrics = evaluate(self.model, self.data_path, split, batch_size=self.cfg["eval_batch_size"],
                               device=self.device, tokenizer=self.vocab, precision="fp32")
            self.model.train()
        vdist.barrier(self.ctx)
        return metrics

    def fit(self) -> dict:
        cfg = self.cfg
        metrics = None
        while self.epoch < cfg["num_epochs"]:
            lr = set_epoch_lr(self.optimizer, cfg, self.epoch)
            max_violation = max_violation_for_epoch(cfg, self.epoch)
            logger.info("epoch %d/%d: lr %.2e, %s loss%s, %d steps of %d pairs", self.epoch, cfg["num_epochs"],
                        lr, "VSE++ (hardest negatives)" if max_violation else "VSE0 (sum)",
                        ", each item once (--dedupe_items)" if cfg.get("dedupe_items") else "",
                        self.steps_per_epoch - self.epoch_step, cfg["batch_size"])
            t0 = time.time()
            if not self.train_epoch(max_violation):
                self.save("last.pth")
                logger.info("stopped at step %d (--max_steps); continue with --resume %s", self.step,
                            os.path.join(cfg["run_dir"], "last.pth"))
                return {"stopped": True, "step": self.step}
            train_s = time.time() - t0
            metrics = self.evaluate(cfg["val_split"])
            is_best = False
            if self.ctx.is_main:
                is_best = metrics["rsum"] > self.best_rsum
                self.best_rsum = max(self.best_rsum, metrics["rsum"])
                logger.info("epoch %d: %s rsum %.2f (best %.2f), train %.0f s", self.epoch, cfg["val_split"],
                            metrics["rsum"], self.best_rsum, train_s)
                with open(os.path.join(cfg["run_dir"], "metrics.jsonl"), "a") as f:
                    f.write(json.dumps({"epoch": self.epoch, "step": self.step, "split": cfg["val_split"],
                                        **{k: float(v) for k, v in metrics.items() if _is_number(v)}}) + "\n")
            self.best_rsum = float(self._broadcast(self.best_rsum))
            is_best = bool(self._broadcast(is_best))
            self.epoch += 1
            self.epoch_step = 0
            # best.pth first, each written atomically: a kill between the two leaves a last.pth that
            # replays this epoch, never one that records a best rsum best.pth does not hold
            if is_best:
                self.save("best.pth", "last.pth")
            else:
                self.save("last.pth")
        return {"stopped": False, "step": self.step, "val": metrics, "best_rsum": self.best_rsum}

    def _broadcast(self, value):
        return vdist.all_gather_object(value, self.ctx)[0]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1)


_SYNTHETIC_WITH_DATA_PATH = ("--synthetic and --synthetic_dir select the generated dataset: they cannot be "
                             "combined with --data_path")


def main(argv=None) -> dict:
    """Run the CLI; returns {"stopped", "step", "val", "best_rsum", "test"} (metrics on the main rank)."""
    from vse_fast.checkpoint import CheckpointError
    from vse_fast.data import DataError, error_message

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data_path and (args.synthetic or args.synthetic_dir):
        parser.error(_SYNTHETIC_WITH_DATA_PATH)
    saved_state = None
    if args.resume:
        from vse_fast.checkpoint import load_checkpoint

        if not os.path.isfile(args.resume):
            parser.error(f"--resume {args.resume!r} does not exist or is not a file")
        try:
            saved_state = load_checkpoint(args.resume, map_location="cpu")
        except CheckpointError as err:
            parser.error(f"--resume: {err}")
        if not isinstance(saved_state, dict) or saved_state.get("format") != "vse_fast/1":
            parser.error(f"--resume {args.resume!r} is not a vse_fast training checkpoint (format vse_fast/1)")
    cfg = resolve_config(args, parser, saved_state["config"] if saved_state else None)
    if saved_state is not None:
        _validate(cfg, parser)
        _check_resume(cfg, saved_state, parser)
    if cfg.get("data_path") and (args.synthetic or args.synthetic_dir):  # a resumed --data_path run
        parser.error(_SYNTHETIC_WITH_DATA_PATH)
    try:
        ctx = vdist.init_distributed(cfg.get("device", "auto"))
    except ValueError as err:  # a --device that does not exist here, or a bad torchrun environment
        parser.error(str(err))
    try:
        result = _run(cfg, args, ctx, saved_state, parser)
        vdist.barrier(ctx)  # every rank done (rank 0's checkpoint written) before the group is torn down
        return result
    except (DataError, CheckpointError, FloatingPointError) as err:  # they say what and where: no traceback
        log_file = os.path.join(cfg["run_dir"], "train.log") if cfg.get("run_dir") else None
        if any(getattr(h, "baseFilename", None) == log_file for h in logger.handlers):  # this run's train.log
            logger.error("%s", error_message(err), extra={"file_only": True})
        parser.exit(2, f"{parser.prog}: error: {error_message(err)}\n")
    finally:
        vdist.cleanup_distributed(ctx)


def _check_resume(cfg: dict, saved_state: dict, parser) -> None:
    """What a resumed run cannot change: the batch size or the seed in the middle of an epoch (the epoch's
    sample order, a function of the seed, is cut into batches of the saved size, so another size or
    order would repeat or skip pairs)."""
    saved_batch, epoch_step = saved_state["config"].get("batch_size"), saved_state.get("epoch_step", 0)
    saved_seed = saved_state["config"].get("seed")
    saved_epoch = saved_state.get("epoch", 0)
    if cfg.get("max_steps") is not None and cfg["max_steps"] < saved_state.get("step", 0):
        parser.error(f"--max_steps {cfg['max_steps']}: the resumed run has made {saved_state.get('step', 0)} steps "
                     "already; pass a larger --max_steps (a total count of steps) to continue it")
    if cfg["num_epochs"] < saved_epoch or (cfg["num_epochs"] == saved_epoch and epoch_step):
        parser.error(f"--num_epochs {cfg['num_epochs']}: the resumed run is at epoch {saved_epoch}"
                     + (f" (after {epoch_step} steps of it)" if epoch_step else "")
                     + f"; pass --num_epochs {saved_epoch + 1} or more to continue it")
    if epoch_step and cfg["seed"] != saved_seed:
        parser.error(f"--seed {cfg['seed']} differs from the resumed run's {saved_seed}, and that run stopped inside "
                     f"epoch {saved_state.get('epoch')} (after {epoch_step} steps): the seed draws the epoch's order "
                     f"of pairs, so the rest of the epoch would repeat or skip training pairs. Resume with --seed "
                     f"{saved_seed}, or change it at an epoch boundary (the last.pth written at the end of an epoch)")
    if epoch_step and cfg["batch_size"] != saved_batch:
        parser.error(f"--batch_size {cfg['batch_size']} differs from the resumed run's {saved_batch}, and that run "
                     f"stopped inside epoch {saved_state.get('epoch')} (after {epoch_step} steps): the rest of the "
                     f"epoch would repeat or skip training pairs. Resume with --batch_size {saved_batch}, or "
                     "change it at an epoch boundary (the last.pth written at the end of an epoch)")


def _new_default_run_dir() -> str:
    """runs/<date>-<time>, created here, with -2, -3, ... when a run started in the same second has it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    os.makedirs("runs", exist_ok=True)
    for n in range(1, 1000):
        path = os.path.join("runs", stamp if n == 1 else f"{stamp}-{n}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"runs/{stamp}-* are all taken")


def _claim_run_dir(run_dir: str, saved_state: Optional[dict], resume: Optional[str]) -> tuple:
    """Create run_dir for this run (rank 0). Returns (whether the run continues the last.pth there, the
    error message or None): a directory that cannot be created, or another run's last.pth in it."""
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as err:
        return False, f"--run_dir {run_dir!r} cannot be created: {err.strerror or err}"
    last = os.path.join(run_dir, "last.pth")
    continues = saved_state is not None and os.path.exists(last) and os.path.samefile(last, resume)
    if not continues and os.path.exists(last):
        why = (f"resuming {resume!r} there would overwrite it with an earlier state"
               if saved_state is not None and _same_path(run_dir, os.path.dirname(os.path.abspath(resume)))
               else "it belongs to another run")
        return False, (f"--run_dir {run_dir!r} already holds last.pth ({why}): continue it with --resume "
                       f"{last} or choose another --run_dir")
    records = [name for name in ("best.pth", "metrics.jsonl") if os.path.exists(os.path.join(run_dir, name))]
    if not continues and records:  # a run's records without its last.pth: they would mix with this run's
        return False, (f"--run_dir {run_dir!r} holds {' and '.join(records)} of another run (and no last.pth to "
                       "continue it): this run's best checkpoint and metrics would mix with them; choose another "
                       "--run_dir, or remove them")
    return continues, None


def _tidy_run_dir(run_dir: str, resumed_epoch: Optional[int]) -> None:
    """Remove what a run killed mid-save left in run_dir: temporary checkpoint files, and, when the run
    continues from this directory's last.pth at ``resumed_epoch``, the metrics.jsonl lines of epochs the
    checkpoint does not hold (appended before the kill; the resumed run evaluates them again) and
    lines that are not a JSON record of an epoch (one cut off mid-write)."""
    from vse_fast.checkpoint import remove_stale_temporaries

    for name in ("last.pth", "best.pth"):
        for path in remove_stale_temporaries(os.path.join(run_dir, name)):
            logger.info("removed %s, left by a save of %s that was interrupted", path, name)
    path = os.path.join(run_dir, "metrics.jsonl")
    if resumed_epoch is None or not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        epoch = entry.get("epoch") if isinstance(entry, dict) else None
        if isinstance(epoch, int) and epoch < resumed_epoch:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) < len(lines):
        logger.info("metrics.jsonl: dropped %d line(s) past the resumed checkpoint (epoch %d) or cut off",
                    len(lines) - len(kept), resumed_epoch)
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


def _carry_best_checkpoint(resume: str, run_dir: str, saved_state: dict) -> None:
    """A run resumed into a directory without best.pth (``--run_dir NEW``, or a copied last.pth) gets the
    resumed run's best.pth, found beside the resumed checkpoint and checked to hold the same best rsum:
    otherwise the end-of-run test evaluation, which reads best.pth, would find none unless a later epoch
    beats the saved best."""
    best_rsum = saved_state.get("best_rsum", -math.inf)
    target = os.path.join(run_dir, "best.pth")
    if os.path.exists(target) or not math.isfinite(best_rsum):
        return
    source = os.path.join(os.path.dirname(os.path.abspath(resume)), "best.pth")
    if os.path.exists(source):
        from vse_fast.checkpoint import CheckpointError, copy_checkpoint, load_checkpoint

        try:
            found = load_checkpoint(source, map_location="cpu").get("best_rsum")
        except CheckpointError:
            found = None
        if found == best_rsum:
            copy_checkpoint(source, target)
            logger.info("copied the resumed run's best.pth (rsum %.2f) from %s", best_rsum, source)
            return
    logger.warning("%s holds no best.pth, and no best.pth with the resumed run's best rsum %.2f lies beside %s: "
                   "best.pth is written (and --test_split evaluated) only if a later epoch beats %.2f",
                   run_dir, best_rsum, resume, best_rsum)


def _carry_vocabulary(resume: str, run_dir: str, cfg: dict) -> Optional[str]:
    """A BiGRU run resumed into another directory gets a copy of the vocabulary the resumed run built
    (its run directory's vocab.json), as it has its best.pth: the new run's checkpoints then name a file
    of their own directory. Returns the copy's path, or None (nothing to carry)."""
    source = cfg.get("vocab_file")
    old_dir = os.path.dirname(os.path.abspath(resume))
    if cfg.get("text_encoder") != "gru" or not source or _same_path(run_dir, old_dir):
        return None
    if os.path.basename(source) != "vocab.json" or not _same_path(os.path.dirname(source), old_dir):
        return None  # a vocabulary of the user's (--vocab_file), referenced where it is
    target = os.path.abspath(os.path.join(run_dir, "vocab.json"))
    if os.path.exists(target):
        if filecmp.cmp(source, target, shallow=False):
            return target
        logger.warning("%s holds another vocab.json: the resumed run's vocabulary stays at %s", run_dir, source)
        return None
    shutil.copyfile(source, target)
    logger.info("copied the resumed run's vocabulary from %s", source)
    return target


def _run(cfg, args, ctx, saved_state, parser) -> dict:
    for key in ("gpo_backend", "loss_backend"):
        if cfg[key] == "triton" and ctx.device.type != "cuda" and not triton_interpreting():
            parser.error(f"--{key} triton needs a CUDA device (training on {ctx.device}): use auto or torch")
    if cfg.get("data_path"):
        data_path = cfg["data_path"]
    else:
        data_path, error = None, None
        if ctx.is_main:  # rank 0 generates, the others reuse; an error reaches every rank
            try:
                data_path = _synthetic_path(cfg)
            except OSError as err:
                error = (f"the synthetic dataset cannot be written to {err.filename or 'its cache'}: "
                         f"{err.strerror or err} (choose its cache with --synthetic_dir or $VSE_FAST_CACHE)")
        data_path, error = vdist.all_gather_object((data_path, error), ctx)[0]
        if error:
            parser.error(error)
        cfg.setdefault("bert_config", None)
        if cfg["text_encoder"] == "bert" and not cfg.get("text_model"):
            cfg["bert_config"] = cfg.get("bert_config") or os.path.join(data_path, "bert_config.json")
            cfg["vocab_file"] = cfg.get("vocab_file") or os.path.join(data_path, "vocab.txt")
        elif cfg["text_encoder"] == "gru":
            cfg["vocab_file"] = cfg.get("vocab_file") or os.path.join(data_path, "vocab.json")
    cfg["data_path_used"] = data_path
    if not cfg.get("run_dir"):
        run_dir, error = None, None
        if ctx.is_main:
            try:
                run_dir = _new_default_run_dir()
            except OSError as err:
                error = f"the run directory cannot be created under runs/: {err.strerror or err} (pass --run_dir)"
        run_dir, error = vdist.all_gather_object((run_dir, error), ctx)[0]
        if error:
            parser.error(error)
        cfg["run_dir"] = run_dir
    run_dir = cfg["run_dir"]
    continues, error = False, None
    if ctx.is_main:
        continues, error = _claim_run_dir(run_dir, saved_state, args.resume)
    error = vdist.all_gather_object(error, ctx)[0]  # every rank exits with rank 0's message
    if error:
        parser.error(error)
    _setup_logging(run_dir, ctx)
    if ctx.is_main:
        _tidy_run_dir(run_dir, saved_state["epoch"] if continues else None)
        if saved_state is not None:
            _carry_best_checkpoint(args.resume, run_dir, saved_state)
    if saved_state is not None:  # gathered: the copy is made before any rank reads the vocabulary
        vocab_copy = _carry_vocabulary(args.resume, run_dir, cfg) if ctx.is_main else None
        vocab_copy = vdist.all_gather_object(vocab_copy, ctx)[0]
        if vocab_copy:
            cfg["vocab_file"] = vocab_copy
    if saved_state is not None:  # logged here, so that train.log keeps them too
        saved = saved_state["config"]
        # a key absent from an older checkpoint: that run had the default
        derived = {key for key in cfg if key.endswith("_used")}  # recorded, not options: no "--data_path_used"
        for key in sorted(set(cfg) & (set(saved) | set(PUBLISHED_DEFAULTS)) - set(RUN_KEYS) - set(MODEL_KEYS) - derived):
            before = saved.get(key, PUBLISHED_DEFAULTS.get(key))
            moved = key in PATH_KEYS and cfg[key] and before and _same_path(cfg[key], before)
            if cfg[key] != before and not moved:
                logger.warning("--%s %r overrides the resumed run's %r", key, cfg[key], before)
    if ctx.world_size > 1 and cfg["batch_size"] % ctx.world_size:
        parser.error(f"--batch_size {cfg['batch_size']} is the global batch: it must be divisible by the "
                     f"{ctx.world_size} processes")
    if cfg["precomp_enc_type"] == "basic" and cfg["batch_size"] // ctx.world_size < 2:
        parser.error(f"--batch_size {cfg['batch_size']} over {ctx.world_size} processes leaves one pair per "
                     "process: a one-row set would give the region MLP's BatchNorm a single value per channel "
                     "(use at least 2 pairs per process, or --precomp_enc_type backbone)")
    if ctx.world_size > 1 and cfg.get("local_negatives") and cfg["batch_size"] // ctx.world_size < 2:
        parser.error(f"--batch_size {cfg['batch_size']} over {ctx.world_size} processes leaves one pair per "
                     "process: with --local_negatives a process's own pairs are its only negatives, so it would "
                     "train nothing (use at least 2 pairs per process, or global negatives)")
    trainer = Trainer(cfg, ctx, data_path, saved_state)
    unused = len(trainer.train_set) - trainer.steps_per_epoch * cfg["batch_size"]
    logger.info("data %s; %d training pairs, %d steps/epoch%s; %d process(es) on %s, %s; run dir %s",
                data_path, len(trainer.train_set), trainer.steps_per_epoch,
                f" ({unused} pairs per epoch left out: the batches are full, the order new each epoch)"
                if unused else "", ctx.world_size, ctx.device, trainer.precision, run_dir)
    if saved_state is not None:
        logger.info("resumed %s at epoch %d, step %d of the epoch (total %d)", args.resume, trainer.epoch,
                    trainer.epoch_step, trainer.step)
        if trainer.epoch >= cfg["num_epochs"]:
            logger.info("the resumed run has trained its %d epochs: nothing to train (raise --num_epochs to "
                        "continue it)", cfg["num_epochs"])
    if not cfg["max_violation"] and cfg["vse_mean_warmup_epochs"] >= cfg["num_epochs"] \
            and args.vse_mean_warmup_epochs is not None:
        logger.warning("--vse_mean_warmup_epochs %d is not below --num_epochs %d: every epoch trains VSE0 (no "
                       "hardest negatives)", cfg["vse_mean_warmup_epochs"], cfg["num_epochs"])
    if cfg.get("local_negatives") and ctx.world_size == 1:
        logger.warning("--local_negatives has no effect in a single process: its batch is the whole batch")
    if cfg.get("chunk_size") and cfg["chunk_size"] >= cfg["batch_size"] // ctx.world_size - 1:
        logger.warning("--chunk_size %d leaves the per-process batch of %d pairs in one piece (a last chunk of one "
                       "pair joins the one before): it is encoded as without it", cfg["chunk_size"],
                       cfg["batch_size"] // ctx.world_size)
    if cfg["lr_update"] >= cfg["num_epochs"]:
        logger.warning("--lr_update %d is not below --num_epochs %d: the learning rate is never decayed",
                       cfg["lr_update"], cfg["num_epochs"])
    elif cfg["lr_update"] == 0:
        logger.warning("--lr_update 0: every epoch runs at 0.1 x --learning_rate")
    for key in ("val_split", "test_split"):
        if cfg.get(key) == cfg["train_split"]:
            logger.warning("--%s %s is the training split: its recall is measured on the training pairs",
                           key, cfg[key])
    result = trainer.fit()
    if result["stopped"]:
        return result
    split, metrics, which = cfg["val_split"], result["val"], "last epoch"
    test_split = cfg.get("test_split")
    best_path = os.path.join(run_dir, "best.pth")
    if test_split and trainer._broadcast(os.path.exists(best_path)):
        if ctx.is_main:
            from vse_fast.checkpoint import load_checkpoint

            trainer.model.load_state_dict(load_checkpoint(best_path)["model"])
        split, which = test_split, "best.pth"
        metrics = result["test"] = trainer.evaluate(test_split)
    elif test_split and ctx.is_main:
        logger.warning("--test_split %s was not evaluated: %s holds no best.pth (no epoch evaluated here beat the "
                       "best %s rsum %.2f); evaluate the best checkpoint with python -m vse_fast.eval",
                       test_split, run_dir, split, result["best_rsum"])
    if ctx.is_main and metrics is not None:
        from vse_fast.evaluation import format_table

        print(f"\n{split} split ({which}):")
        print(format_table(metrics))
    return result


if __name__ == "__main__":
    main()
