"""Evaluate trained VSE-infinity models: recall@1/5/10, medr, meanr both directions and rsum.

    python -m vse_fast.eval --checkpoint runs/x/best.pth --data_path DATA --split test
    python -m vse_fast.eval --checkpoint A.pth --checkpoint B.pth ...           # ensemble
    python -m vse_fast.eval --checkpoint coco_model.pth --published --text_model bert-base-uncased/ \\
        --data_path data/coco_precomp --split testall --fold5                  # COCO 1K (5 folds) + 5K

``evaluate(model, data_path, split, ...)`` is what training calls every epoch: each image (set of
features) is encoded once, each caption once, metrics come from vse_fast.evaluation (blocked,
never the full similarity matrix). Published protocol: eval mode (BatchNorm running statistics,
no dropout, no augmentation); the COCO "dev" split is cut to its first 5000 captions / 1000
images (``caption_limit="auto"``); ``--fold5`` averages 5 consecutive folds of N/5 items (COCO 1K
on the 5000 images of testall) and also reports all N items (COCO 5K); the printed titles give the
fold size, and name the COCO protocols only when the sizes are COCO's.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import warnings
from typing import Sequence

import torch

from vse_fast.checks import device_option, positive_int
from vse_fast.data import DEV_CAPTION_LIMIT  # published: COCO's dev split on its first 5000 captions
from vse_fast.evaluation import nonfinite_rows


def _autocast(device: torch.device, precision: str):
    """Autocast to bf16/fp16 on the device (CUDA or CPU, as training's --precision); fp32: none."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.inference_mode()
def _encode(loader, encode_fn, count: int, inputs: tuple[str, str], device, precision):
    """Run encode_fn over the loader, placing each row at its dataset index: (count, E) float32 on device."""
    out, filled = None, 0
    for batch in loader:
        x, lengths = batch[inputs[0]].to(device, non_blocking=True), batch[inputs[1]].to(device, non_blocking=True)
        with _autocast(device, precision):
            emb = encode_fn(x, lengths).float()
        if out is None:
            out = torch.zeros(count, emb.shape[1], device=device)
        out[batch["index"].to(device)] = emb
        filled += emb.shape[0]
    if out is None or filled != count:
        raise RuntimeError(f"encoded {filled} rows, expected {count}")
    return out


def _resolve_limit(split: str, caps_per_item: int, caption_limit):
    """Captions evaluated: None (all) or an int >= caps_per_item. "auto" is the published dev cut in whole
    items; an explicit int is never rounded (the datasets reject one below the caption count that is not
    a multiple of caps_per_item)."""
    if caption_limit == "auto":
        from vse_fast.data import published_caption_limit

        return published_caption_limit(split, caps_per_item)
    if caption_limit is None:
        return None
    if isinstance(caption_limit, bool) or not isinstance(caption_limit, int) or caption_limit < caps_per_item:
        raise ValueError(f"caption_limit must be None, 'auto' or an int >= captions per item ({caps_per_item}), "
                         f"got {caption_limit!r}")
    return caption_limit


def _evaluated_items(data_path: str, split: str, info, caption_limit) -> int:
    """Items of ``split`` (its `check_split` info) that `encode_split` evaluates under ``caption_limit``."""
    from vse_fast import data

    limit = _resolve_limit(split, info.caps_per_item, caption_limit)
    return len(data.ImageSetDataset(data_path, split, caption_limit=limit))  # its features open lazily


def caption_position_limit(model):
    """Most tokens (start and end included) a caption may have for the model's text encoder: BERT's
    max_position_embeddings; None for the BiGRU (unbounded)."""
    bert = getattr(getattr(model, "txt_enc", None), "bert", None)
    return getattr(getattr(bert, "config", None), "max_position_embeddings", None)


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode inside the block, then back in the mode it had."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def check_tokenizer(model, tokenizer) -> None:
    """The tokenizer against the model's text encoder: a transformers BERT tokenizer whose word pieces
    fit the BERT word-embedding table, or a vse_fast.data.Vocabulary of the BiGRU embedding's size.
    TypeError for the wrong kind, ValueError for the wrong size: either would index past the table or
    silently embed other words."""
    from vse_fast.data import Vocabulary

    txt_enc = getattr(model, "txt_enc", None)
    bert = getattr(txt_enc, "bert", None)
    embed = getattr(txt_enc, "embed", None)
    if bert is not None:
        if isinstance(tokenizer, Vocabulary):
            raise TypeError("the model's text encoder is BERT but the tokenizer is a BiGRU Vocabulary: pass the "
                            "model's BERT tokenizer (vse_fast.data.load_tokenizer)")
        rows = bert.get_input_embeddings().num_embeddings
        size = len(tokenizer) if hasattr(tokenizer, "__len__") else getattr(tokenizer, "vocab_size", None)
        if isinstance(size, int) and size > rows:  # len(): added tokens included (their ids follow the vocabulary)
            raise ValueError(f"the BERT tokenizer has {size} word pieces but the model's word-embedding table has "
                             f"{rows} rows: it is not the model's tokenizer")
        vocab = tokenizer.get_vocab() if callable(getattr(tokenizer, "get_vocab", None)) else None
        special = set(getattr(tokenizer, "all_special_ids", None) or ())
        if vocab and set(vocab.values()) <= special:
            raise ValueError(f"the BERT tokenizer holds its {len(vocab)} special tokens only, no words: every caption "
                             "would be [UNK]. (transformers 5 ignores BertTokenizer(vocab_file=...); load it with "
                             "vse_fast.data.load_tokenizer)")
        if isinstance(size, int) and size < rows:
            warnings.warn(f"the BERT tokenizer has {size} word pieces but the model's word-embedding table has {rows} "
                          "rows: fine if the model padded its embedding table, wrong if this is another vocabulary "
                          "(check --vocab_file / --text_model)", stacklevel=3)
    elif isinstance(embed, torch.nn.Embedding):
        if not isinstance(tokenizer, Vocabulary):
            raise TypeError(f"the model's text encoder is the BiGRU, which takes a vse_fast.data.Vocabulary, got "
                            f"{type(tokenizer).__name__}")
        if len(tokenizer) != embed.num_embeddings:
            raise ValueError(f"the vocabulary has {len(tokenizer)} words but the model's word embedding has "
                             f"{embed.num_embeddings}: it is not the model's vocabulary")


def _device_index(device: torch.device) -> int:
    """The index a device stands for: "cuda" without one is the current CUDA device."""
    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if device.type == "cuda" and torch.cuda.is_available() else 0


def encode_split(model, data_path: str, split: str, tokenizer, *, batch_size: int = 128, device=None,
                 caption_limit="auto", precision: str = "fp32", num_workers: int = 0):
    """Embeddings of a split: (img_emb (N, E), cap_emb (N*C, E), C), each image/caption encoded once.
    The model is put in eval mode and restored to its previous mode afterwards. A caption longer than
    the model's text encoder takes raises DataError naming its line."""
    from torch.utils.data import DataLoader

    from vse_fast import data

    batch_size = positive_int(batch_size, "batch_size")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    param_device = next(model.parameters()).device
    device = torch.device(device) if device is not None else param_device
    if (device.type, _device_index(device)) != (param_device.type, _device_index(param_device)):
        raise ValueError(f"device {device} differs from the model's device {param_device}: move the model "
                         "there first (model.to(device))")
    check_tokenizer(model, tokenizer)
    info = data.check_split(data_path, split)
    caps = info.caps_per_item
    limit = _resolve_limit(split, caps, caption_limit)
    images = data.ImageSetDataset(data_path, split, caption_limit=limit)
    captions = data.CaptionDataset(data_path, split, tokenizer, caption_limit=limit,
                                   position_limit=caption_position_limit(model))
    n_images = len(images)
    if len(captions) != n_images * caps:
        raise RuntimeError(f"{len(captions)} captions for {n_images} items x {caps}")
    loader_args = dict(shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda")
    with eval_mode(model):  # a batch larger than the split is the whole split (DataLoader: no size > sys.maxsize)
        img_emb = _encode(DataLoader(images, batch_size=min(batch_size, n_images), collate_fn=data.collate_images,
                                     **loader_args), model.encode_images, n_images, ("images", "img_lengths"),
                          device, precision)
        cap_emb = _encode(DataLoader(captions, batch_size=min(batch_size, len(captions)),
                                     collate_fn=data.collate_captions, **loader_args),
                          model.encode_captions, n_images * caps, ("captions", "cap_lengths"), device, precision)
    _check_finite(img_emb, f"{split}: the image embeddings of items",
                  f"non-finite features in {info.paths['ims']}, or a model with non-finite weights")
    _check_finite(cap_emb, f"{split}: the caption embeddings of captions", "a model with non-finite weights")
    return img_emb, cap_emb, caps


def _check_finite(emb: torch.Tensor, what: str, cause: str) -> None:
    """ValueError naming the first rows of emb (count, E) that hold NaN or inf (one host sync per split)."""
    bad = nonfinite_rows(emb)
    if bad.numel():
        raise ValueError(f"{what} {bad[:8].tolist()} ({bad.numel()} in all) are NaN or inf: {cause}")


def _trivial_recall_note(n_items: int, caps_per_item: int, gallery: str | None = None) -> str | None:
    """A note when a gallery of n_items items is so small that some R@1/5/10 is 100 by construction:
    text->image ranks n_items items, image->text finds one of an item's captions among at most
    (n_items - 1) * caps_per_item others. ``gallery`` names it (default "N items")."""
    trivial = [f"text->image R@{k}" for k in (1, 5, 10) if k >= n_items]
    trivial += [f"image->text R@{k}" for k in (1, 5, 10) if k > (n_items - 1) * caps_per_item]
    if not trivial:
        return None
    return (f"note: {gallery or f'{n_items} items'}: {', '.join(trivial)} "
            f"{'is' if len(trivial) == 1 else 'are'} 100 by construction")


def metrics_from_embeddings(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], caps_per_item: int,
                            fold5: bool = False) -> dict:
    """Metrics of one (img_emb, cap_emb) pair or an ensemble (averaged similarities). ``fold5``: top-level
    keys are the mean over 5 folds (COCO 1K, as published --fold5), plus "folds" and "all" (COCO 5K)."""
    from vse_fast.evaluation import coco_5fold, retrieval_metrics

    pairs = list(pairs)
    if not fold5:
        return retrieval_metrics(pairs, None, caps_per_item)
    metrics = coco_5fold(pairs, None, caps_per_item)
    metrics["all"] = retrieval_metrics(pairs, None, caps_per_item)
    return metrics


def evaluate(model, data_path: str, split: str, *, batch_size: int = 128, device=None, fold5: bool = False,
             tokenizer=None, caption_limit="auto", precision: str = "fp32", num_workers: int = 0) -> dict:
    """Recall metrics of ``model`` on ``split`` of ``data_path``.

    Args:
        model: a VSEModel (any mode; evaluated in eval mode, its mode restored afterwards).
        tokenizer: the BERT tokenizer or BiGRU Vocabulary of the model; None: resolved as the CLI does
            (model.opt["text_model"], then ``data_path``/vocab.txt for BERT).
        caption_limit: "auto" (published: "dev" cut to its first 5000 captions), None (all) or an int.
        precision: "fp32", or "bf16"/"fp16" autocast on the device (CUDA or CPU).
    Returns:
        dict of vse_fast.evaluation.METRIC_KEYS (Python floats); with ``fold5`` the 1K fold means plus
        "folds" (per fold) and "all" (every image: COCO 5K).
    """
    if tokenizer is None:
        tokenizer = resolve_tokenizer(model.opt, {}, data_path)
    img_emb, cap_emb, caps = encode_split(model, data_path, split, tokenizer, batch_size=batch_size,
                                          device=device, caption_limit=caption_limit, precision=precision,
                                          num_workers=num_workers)
    return metrics_from_embeddings([(img_emb, cap_emb)], caps, fold5)


def resolve_tokenizer(model_opt: dict, config: dict, data_path: str | None, *, text_model: str | None = None,
                      vocab_file: str | None = None, checkpoint_path: str | None = None):
    """The caption tokenizer of a model: BERT tokenizer (text_model dir or wordpiece vocab.txt) or BiGRU
    Vocabulary (vocab json, else rebuilt from the training captions as vse_fast.train does).
    Explicit arguments first (an explicit ``text_model`` of a BERT model before the vocab_file the
    checkpoint config names), then the checkpoint config, then files in ``data_path``. A BiGRU vocabulary
    the checkpoint names but that is gone (the run directory was moved or copied) is looked for as
    ``vocab.json`` beside ``checkpoint_path``, where training writes it. ValueError when its size
    differs from the model's vocabulary (BERT vocab_size / BiGRU vocab_size)."""
    from vse_fast import data

    bert = model_opt.get("text_encoder", "bert") == "bert"
    if text_model and not bert:
        raise ValueError(f"text_model {text_model!r} names a BERT directory, but this model's text encoder is the "
                         "BiGRU: its vocabulary comes from --vocab_file, the checkpoint, or the data's captions")
    explicit_bert_dir = bool(text_model)
    if explicit_bert_dir and not os.path.isdir(text_model):
        raise ValueError(f"text_model {text_model!r} is not a directory (the BERT directory with its tokenizer)")
    recorded = config.get("vocab_file")
    against = vocab_file or (recorded if recorded and os.path.isfile(recorded) else None)
    if explicit_bert_dir and against:
        whose = "" if vocab_file else "(the checkpoint's, which the model was trained with) "
        remedy = "pass the one the model was trained with" if vocab_file else "pass --vocab_file"
        data.check_same_bert_vocab(text_model, against, f"{whose}hold different vocabularies: {remedy}")
    text_model = text_model or config.get("text_model") or model_opt.get("text_model")
    if not vocab_file and not explicit_bert_dir and config.get("vocab_file"):
        vocab_file = config["vocab_file"]
        if not os.path.exists(vocab_file):
            beside = checkpoint_path and os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), "vocab.json")
            if not (model_opt.get("text_encoder") == "gru" and beside and os.path.isfile(beside)):
                raise ValueError(f"the checkpoint's vocabulary {vocab_file} does not exist (moved with its run "
                                 "directory?): pass --vocab_file with its location")
            vocab_file = beside
    if bert:
        return _check_bert_vocab(_find_bert_tokenizer(data_path, text_model, vocab_file), model_opt)
    if vocab_file:
        vocab = data.Vocabulary.load(vocab_file)
    else:
        split = config.get("train_split", "train")
        caps_file = data.split_captions_file(data_path, split) if data_path and os.path.isdir(data_path) else None
        if not caps_file or not os.path.isfile(caps_file):
            raise ValueError("cannot find the BiGRU vocabulary of this model: pass --vocab_file (vocabulary json)"
                             f" or a --data_path holding {split}_caps.txt to rebuild it from")
        vocab = data.Vocabulary.from_caption_files([caps_file])
    if model_opt.get("vocab_size") not in (None, len(vocab)):
        raise ValueError(f"the vocabulary has {len(vocab)} words but the model was trained with "
                         f"vocab_size={model_opt['vocab_size']}: pass the model's --vocab_file")
    return vocab


def _find_bert_tokenizer(data_path, text_model, vocab_file):
    """The BERT tokenizer from vocab_file, else the text_model directory, else data_path/vocab.txt."""
    from vse_fast import data

    if vocab_file:
        return data.load_tokenizer(vocab_file=vocab_file)
    if text_model and os.path.isdir(text_model):
        return data.load_tokenizer(text_model_dir=text_model)
    if data_path and os.path.isfile(os.path.join(data_path, "vocab.txt")):
        if text_model:
            warnings.warn(f"the model's BERT directory {text_model} does not exist (moved?): its tokenizer is "
                          f"replaced by {os.path.join(data_path, 'vocab.txt')}; pass --text_model or --vocab_file "
                          "if that is not the vocabulary the model was trained with", stacklevel=3)
        return data.load_tokenizer(vocab_file=os.path.join(data_path, "vocab.txt"))
    raise ValueError("cannot find the BERT tokenizer of this model: pass --text_model DIR (the BERT "
                     "directory) or --vocab_file vocab.txt" + (f" (text_model {text_model!r} is not a directory)"
                                                                if text_model else ""))


def _check_bert_vocab(tokenizer, model_opt: dict):
    """The tokenizer against the model's word-embedding rows (BERT config vocab_size): more word pieces
    than rows is an error (ids past the table), naming the CLI options. Fewer is warned about by
    check_tokenizer, which every encoding runs (some checkpoints pad the table, e.g. to a multiple of
    8, while a different vocabulary, cased for uncased, is also smaller)."""
    vocab_size = (model_opt.get("bert_config_dict") or {}).get("vocab_size")
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ValueError(f"the BERT tokenizer has {len(tokenizer)} word pieces but the model was trained with "
                         f"vocab_size={vocab_size}: pass the model's --vocab_file or --text_model")
    return tokenizer


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vse_fast.eval", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, metavar="PATH",
                   help="checkpoint to evaluate; repeat for an ensemble (similarities averaged)")
    p.add_argument("--data_path", required=True, help="directory with {split}_ims.npy, {split}_caps.txt, ...")
    p.add_argument("--split", default="test", help="split to evaluate (default: test; COCO 5K: testall)")
    p.add_argument("--fold5", action="store_true",
                   help="mean over 5 folds of N/5 items (COCO 1K on the 5000 testall images) and all N (COCO 5K)")
    p.add_argument("--published", action="store_true",
                   help="the checkpoints are published VSE-infinity ones (default: detected from the file)")
    p.add_argument("--text_model", help="local BERT directory (tokenizer; the config of published checkpoints)")
    p.add_argument("--vocab_file", help="BERT vocab.txt or BiGRU vocabulary json of the model")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast dtype, on CUDA or the CPU as in training (default fp32)")
    p.add_argument("--caption_limit", default="auto",
                   help="'auto' (published: dev cut to its first 5000 captions, in whole items), 'none', or a number of captions")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--gpo_backend", choices=("auto", "triton", "torch"), default="auto",
                   help="GPO backend for encoding (default: auto, Triton on CUDA; not the one the run trained with)")
    p.add_argument("--json", metavar="PATH", help="also write the metrics to this json file")
    return p


def _caption_limit(value: str, parser: argparse.ArgumentParser):
    if value in ("auto", "none", "None"):
        return None if value.lower() == "none" else "auto"
    try:
        return int(value)
    except ValueError:
        parser.error(f"--caption_limit must be 'auto', 'none' or an integer, got {value!r}")


def _encode_checkpoint(path, args, device, limit):
    """(img_emb, cap_emb, caps) of the CLI's split with the checkpoint at ``path``."""
    from vse_fast.checkpoint import load_any_checkpoint

    model, config = load_any_checkpoint(path, published=True if args.published else None,
                                        text_model=args.text_model, map_location="cpu",
                                        gpo_backend=args.gpo_backend)
    model.to(device)
    text_model = args.text_model
    if text_model and model.opt.get("text_encoder", "bert") != "bert" and len(args.checkpoint) > 1:
        warnings.warn(f"--text_model does not apply to ensemble member {path}: its text encoder is the BiGRU",
                      stacklevel=2)
        text_model = None  # it names the BERT members' tokenizer
    tokenizer = resolve_tokenizer(model.opt, config, args.data_path, text_model=text_model,
                                  vocab_file=args.vocab_file, checkpoint_path=path)
    return encode_split(model, args.data_path, args.split, tokenizer, batch_size=args.batch_size, device=device,
                        caption_limit=limit, precision=args.precision, num_workers=args.workers)


@contextlib.contextmanager
def _naming_member(path, members):
    """In an ensemble, an error of one member's checkpoint, tokenizer or encoding names that checkpoint."""
    from vse_fast.checkpoint import CheckpointError
    from vse_fast.data import DataError, error_message

    try:
        yield
    except (CheckpointError, DataError, ValueError, FileNotFoundError) as err:
        if members > 1 and path not in str(err):
            raise type(err)(f"ensemble member {path}: {error_message(err)}") from err
        raise


def main(argv: Sequence[str] | None = None) -> dict:
    from vse_fast.checkpoint import CheckpointError
    from vse_fast.data import DataError, check_split, error_message
    from vse_fast.evaluation import format_table

    parser = _parser()
    args = parser.parse_args(argv)
    limit = _caption_limit(args.caption_limit, parser)
    if not os.path.isdir(args.data_path):
        parser.error(f"--data_path {args.data_path!r} is not a directory")
    if args.text_model and not os.path.isdir(args.text_model):
        parser.error(f"--text_model {args.text_model!r} is not a directory (the BERT directory)")
    if args.json:  # checked before the evaluation, not after it
        json_dir = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json):
            parser.error(f"--json {args.json!r} is a directory")
        if not os.path.isdir(json_dir):
            parser.error(f"--json {args.json!r}: directory {json_dir!r} does not exist")
        target = os.path.realpath(args.json)  # where the end of the run writes (through a symlink)
        try:  # tried, not inferred from permission bits (which do not bind root; /proc and the like)
            if os.path.exists(target):
                open(target, "a").close()
            else:
                tempfile.TemporaryFile(dir=os.path.dirname(target)).close()
        except OSError as err:
            parser.error(f"--json {args.json!r} cannot be written: {err.strerror or err}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0 (data loader worker processes), got {args.workers}")
    seen = {}
    for path in args.checkpoint:
        if os.path.realpath(path) in seen:
            parser.error(f"--checkpoint {path!r} is the same file as {seen[os.path.realpath(path)]!r}: an ensemble "
                         "of one model twice is that model")
        seen[os.path.realpath(path)] = path
        if os.path.isdir(path):
            parser.error(f"--checkpoint {path!r} is a directory, not a checkpoint file")
        if not os.path.isfile(path):
            parser.error(f"--checkpoint {path!r} does not exist")
    try:
        device = device_option(args.device or ("cuda" if torch.cuda.is_available() else "cpu"), "evaluation")
    except ValueError as err:
        parser.error(str(err))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device!r} requested but CUDA is not available")
    try:
        info = check_split(args.data_path, args.split)
        if args.fold5:  # checked before encoding anything
            n_items = _evaluated_items(args.data_path, args.split, info, limit)
            if n_items % 5:
                raise ValueError(f"--fold5: {n_items} items cannot be split into 5 equal folds")
        pairs, caps = [], None
        for path in args.checkpoint:
            with _naming_member(path, len(args.checkpoint)):
                img_emb, cap_emb, caps = _encode_checkpoint(path, args, device, limit)
            pairs.append((img_emb, cap_emb))
            print(f"encoded {args.split}: {img_emb.shape[0]} items, {cap_emb.shape[0]} captions with {path}",
                  file=sys.stderr)
        if cap_emb.shape[0] < info.n_captions:
            why = ("as the published code evaluates COCO's dev; --caption_limit none evaluates all"
                   if args.caption_limit == "auto" else "--caption_limit")
            print(f"note: split {args.split} evaluated on its first {img_emb.shape[0]} items ({cap_emb.shape[0]} of "
                  f"{info.n_captions} captions), {why}", file=sys.stderr)
        if info.row_repeat > 1:
            print(f"note: {info.paths['ims']} repeats each item's row once per caption ({info.row_repeat} times): "
                  "one row per item was used", file=sys.stderr)
        metrics = metrics_from_embeddings(pairs, caps, args.fold5)
        n_items = pairs[0][0].shape[0]
        if args.fold5:
            notes = [_trivial_recall_note(n_items // 5, caps, f"each of the 5 folds has {n_items // 5} items"),
                     _trivial_recall_note(n_items, caps, f"all {n_items} items")]
        else:
            notes = [_trivial_recall_note(n_items, caps)]
        for note in filter(None, notes):
            print(note, file=sys.stderr)
    except (CheckpointError, DataError, ValueError, FileNotFoundError) as err:
        print(f"error: {error_message(err)}", file=sys.stderr)
        raise SystemExit(2)
    source = f"ensemble of {len(pairs)}" if len(pairs) > 1 else os.path.basename(args.checkpoint[0])
    title = f"{args.split} ({source})"
    if args.fold5:
        n_items = pairs[0][0].shape[0]
        coco = n_items == 5000 and caps == 5
        print(format_table(metrics, title=f"{title}: mean of 5 folds of {n_items // 5} items"
                                          + (" (COCO 1K protocol)" if coco else "")))
        print(format_table(metrics["all"], title=f"{title}: all {n_items} items"
                                                 + (" (COCO 5K protocol)" if coco else "")))
    else:
        print(format_table(metrics, title=title))
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(metrics, f, indent=2)
        except OSError as err:
            print(f"error: --json {args.json!r}: {err.strerror or err}", file=sys.stderr)
            raise SystemExit(2)
    return metrics


if __name__ == "__main__":
    main()
