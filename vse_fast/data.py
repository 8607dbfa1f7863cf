"""Precomputed-feature datasets in the SCAN / VSE-infinity layout, validated before training.

A split ``{split}`` of a data directory (files directly in it, or in its ``precomp/`` subfolder as
the published loader expects; directly in it when both hold the split) holds:

* ``{split}_ims.npy``: (N, K, D) floating features, K regions (or frames) per item. Opened
  memory-mapped: COCO train is ~33 GB. A 2-D (N, D) array means one vector per item (K = 1).
* ``{split}_caps.txt``: one caption per line, C = lines / N captions per item (5 COCO/Flickr30K,
  20 MSR-VTT, 10 VATEX); caption j describes item j // C. Lines end where the published loader's
  text-mode reading ends them: at \\n, \\r\\n or a lone \\r.
* optional ``{split}_lens.npy``: (N,) integer count of valid rows per item (1 <= len <= K); without
  it all K rows are used.
* optional ``{split}_ids.txt``: one id per item, or one per caption (each item's id repeated over
  its C captions, or caption ids that all differ); checked, otherwise unused.

Feature rows repeated once per caption (N rows for N captions, in runs of C identical rows: the
"rkiros" layout, which the published loader reads with im_div = 1 and evaluates with every 5th image)
are read as N / C items with C captions each, one row per run (``SplitInfo.row_repeat`` = C); a lens
file then has one entry per row too. The runs are checked on 16 spread over the file, the first
included, not every one (that would read COCO's train features whole).

`check_split` validates all of it and raises `DataError` naming the file (and line). The datasets
return dicts, `collate` pads them into batches. Training augmentation follows the published loader
(lib/datasets/image_caption.py): each region dropped with probability 0.2 (we keep at least one;
grid features of ``--precomp_enc_type backbone`` follow the published EncoderImageFull instead, see
``_SplitData.item_features``);
each caption word touched with probability 0.2, of those 50% -> [MASK] (one per word piece), 10% ->
random vocabulary ids, 40% deleted. Its randomness is a function of (seed, epoch, index) only, so a
resumed run, any number of workers and any DDP layout see the same augmentations.

COCO conventions: "testall" is the 5K test set (5-fold 1K via vse_fast.evaluation.coco_5fold);
"dev" is capped at 5000 captions (1000 images) by the published code: pass
``caption_limit=published_caption_limit(split, check_split(data_path, split).caps_per_item)``.
"""
from __future__ import annotations

import collections
import json
import os
import re
import unicodedata
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from vse_fast.checks import positive_int
from vse_fast.word_tokenize import word_tokenize

__all__ = [
    "DataError", "CaptionTooLongError", "EmptyCaptionError", "SplitInfo", "check_split", "published_caption_limit",
    "DEV_CAPTION_LIMIT", "load_tokenizer", "check_same_bert_vocab", "Vocabulary", "CaptionEncoder", "PrecomputedDataset", "ImageSetDataset", "CaptionDataset",
    "collate", "collate_images", "collate_captions",
]

DEV_CAPTION_LIMIT = 5000  # published: the COCO dev split is evaluated on its first 5000 captions

# Published split of the touched words: [MASK] below 0.5, a random id below 0.6, deleted above.
_MASK_SHARE, _RANDOM_SHARE_END = 0.5, 0.6


class DataError(ValueError):
    """A data file is missing, unreadable or inconsistent; the message names the file (and line)."""


def error_message(err: BaseException) -> str:
    """The message of an error for the command line: a DataLoader worker re-raises a DataError as
    "Caught DataError in DataLoader worker process N. Original Traceback ...", with the message on its
    last line; that line alone, without the exception's name."""
    text = str(err)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        name = f"{type(err).__name__}: "
        return last.split(name, 1)[1] if name in last else last
    return text


class CaptionTooLongError(ValueError):
    """A caption has more tokens than the text encoder has positions (CaptionEncoder position_limit)."""


class EmptyCaptionError(ValueError):
    """A caption the BERT tokenizer keeps no word of (it drops U+FFFD, private-use and other "C*"
    characters, and the uncased one accents), though it is not blank."""


@dataclass
class SplitInfo:
    """What `check_split` found. paths: {"ims", "caps", "lens" (or None), "ids" (or None)}."""

    n_items: int
    caps_per_item: int
    feat_dim: int
    max_set: int
    has_lens: bool
    has_ids: bool
    paths: dict = field(default_factory=dict)
    n_captions: int = 0
    row_repeat: int = 1  # > 1: the feature file repeats each item's row once per caption (item i = row i * C)


def published_caption_limit(split, caps_per_item=1):
    """Caption cap of the published evaluation: for "dev" its first 5000 captions in whole items (5000
    for 5 captions per item, 4998 for 3), None (all) for any other split."""
    positive_int(caps_per_item, "caps_per_item", numpy_ints=False)
    return DEV_CAPTION_LIMIT // caps_per_item * caps_per_item if split == "dev" else None


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _split_dir(data_path, split):
    """The folder a split is read from: ``data_path`` itself when it holds ``{split}_caps.txt`` or
    ``{split}_ims.npy``, else its ``precomp/`` folder when that does (so a split in both places is read
    from ``data_path``), else ``data_path`` (where the missing files are then named)."""
    if not os.path.isdir(data_path):
        raise DataError(f"{data_path}: data directory does not exist")
    for folder in (data_path, os.path.join(data_path, "precomp")):
        if os.path.exists(os.path.join(folder, f"{split}_caps.txt")) or os.path.exists(
            os.path.join(folder, f"{split}_ims.npy")
        ):
            return folder
    return data_path


def split_captions_file(data_path, split):
    """Path of ``{split}_caps.txt`` in ``data_path`` or its ``precomp/`` folder, chosen as the splits are
    read (see ``_split_dir``: ``data_path`` wins when both hold the split)."""
    return os.path.join(_split_dir(data_path, split), f"{split}_caps.txt")


def _open_features(path):
    """Memory-map the feature array; 2-D (N, D) becomes an (N, 1, D) view."""
    try:
        features = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{path}: unreadable feature array ({err})") from None
    if not isinstance(features, np.ndarray):
        raise DataError(f"{path}: expected one .npy array, got {type(features).__name__}")
    extra = os.path.getsize(path) - (features.offset + features.nbytes)
    if extra:  # np.load reads the first array only: the rest would be ignored silently
        raise DataError(f"{path}: {extra} bytes after the array of shape {features.shape} (several arrays "
                        "appended with np.save?): save one (N, K, D) array")
    if features.ndim == 2:
        features = features[:, None, :]
    if features.ndim != 3:
        raise DataError(f"{path}: features must be (N, K, D) or (N, D), got shape {features.shape}")
    if not np.issubdtype(features.dtype, np.floating):
        raise DataError(f"{path}: features must be floating point, got dtype {features.dtype}")
    if min(features.shape) == 0:
        raise DataError(f"{path}: empty feature array, shape {features.shape}")
    return features


_LINE_END = re.compile(rb"\r\n|\r|\n")
_LETTER_OR_DIGIT = re.compile(r"[^\W_]")  # str.isalnum() characters


def _text_lines(path):
    """(line number, bytes) of each line of a text file, split where Python's text mode (the published
    loader's ``for line in open(path)``) splits: at \\n, \\r\\n and a lone \\r; no empty line after a
    final line end."""
    with open(path, "rb") as f:
        lines = _LINE_END.split(f.read())
    if lines[-1] == b"":
        lines.pop()
    return enumerate(lines, start=1)


def _decode_line(path, number, raw):
    """A line as text. A UTF-8 byte-order mark opening the file (Windows editors write one) is dropped;
    one anywhere else (files joined with their marks) and invalid UTF-8 raise DataError naming the line."""
    try:
        line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}:{number}: not valid UTF-8 ({err.reason})") from None
    if "\ufeff" in line:
        raise DataError(f"{path}:{number}: a byte-order mark (U+FEFF) inside the file (files joined with "
                        "their marks?): remove it")
    if "\x00" in line:  # UTF-16 text without its mark decodes as UTF-8 with a NUL after each ASCII letter
        raise DataError(f"{path}:{number}: a NUL byte (UTF-16 text?): save the file as UTF-8")
    return line


def is_blank_caption(caption: str) -> bool:
    """No visible text: only whitespace, control (Cc) and format (Cf: zero-width space, soft hyphen)
    characters, which tokenizers drop, leaving a caption of no words."""
    return all(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf") for ch in caption)


def _read_captions(path):
    """Captions, stripped as published; empty or non-UTF-8 lines raise DataError naming the line (see
    _decode_line for byte-order marks)."""
    captions = []
    for number, raw in _text_lines(path):
        caption = _decode_line(path, number, raw).strip()
        if is_blank_caption(caption):
            raise DataError(f"{path}:{number}: empty caption{'' if not caption else ' (invisible characters only)'}")
        captions.append(caption)
    if not captions:
        raise DataError(f"{path}: no captions")
    return captions


def _read_lens(path, n_items, max_set, ims_path=None):
    try:
        with open(path, "rb") as f:
            lens = np.load(f, allow_pickle=False)
            extra = f.read(1) if isinstance(lens, np.ndarray) else b""
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{path}: unreadable lengths array ({err})") from None
    if not isinstance(lens, np.ndarray):
        raise DataError(f"{path}: expected one .npy array, got {type(lens).__name__}")
    if extra:
        raise DataError(f"{path}: data after the array of shape {lens.shape} (several arrays appended with "
                        "np.save?): save one array of lengths")
    if lens.shape != (n_items,):
        raise DataError(f"{path}: lengths must have shape ({n_items},) (one per row of the features), "
                        f"got {lens.shape}")
    if not np.issubdtype(lens.dtype, np.integer):
        raise DataError(f"{path}: lengths must be integers, got dtype {lens.dtype}")
    bad = np.flatnonzero((lens < 1) | (lens > max_set))
    if bad.size:
        single = (f": {ims_path} holds one row per item (2-D, or K = 1), so every length is 1; remove this "
                  "file, or save the features as (N, K, D)" if max_set == 1 and ims_path else "")
        raise DataError(
            f"{path}: length {int(lens[bad[0]])} of item {int(bad[0])} is outside 1..{max_set} "
            f"({bad.size} bad entries){single}"
        )
    return lens.astype(np.int64)


def _check_ids(path, n_items, n_captions):
    """One id per line (lines split and decoded as captions are); empty lines raise DataError. With
    one id per caption, the ids must either repeat one item id over each run of C = captions per item
    lines (caption j describes item j // C) or all differ (caption ids); ids repeated across those
    runs contradict the pairing and raise DataError, as do two items (per-item ids, or the ids of
    two runs) with one id."""
    count, ids = 0, []
    for count, raw in _text_lines(path):
        line = _decode_line(path, count, raw)
        if not line.strip():
            raise DataError(f"{path}:{count}: empty id")
        ids.append(line.strip())
    if count not in (n_items, n_captions):
        raise DataError(f"{path}: {count} ids, expected {n_items} (one per item) or {n_captions} (per caption)")
    caps = n_captions // n_items
    if count == n_captions and caps > 1 and len(set(ids)) < count and len(set(ids[:caps])) == caps:
        first_line = {}  # the first run differs throughout: caption ids, which must all differ
        for j, caption_id in enumerate(ids):
            earlier = first_line.setdefault(caption_id, j)
            if earlier != j:
                raise DataError(f"{path}:{j + 1}: id {caption_id!r} repeats line {earlier + 1}: the ids of the "
                                f"first item's {caps} captions all differ, so these are caption ids, which must "
                                "all differ (or repeat their item's id over each run of captions)")
    if count == n_captions and caps > 1 and len(set(ids)) < count:
        for j, item_id in enumerate(ids):
            if item_id != ids[j - j % caps]:
                raise DataError(
                    f"{path}:{j + 1}: id {item_id!r} differs from {ids[j - j % caps]!r} on line {j - j % caps + 1}, "
                    f"though caption {j + 1} belongs to the same item ({caps} captions per item, in runs); "
                    "per-caption ids must repeat their item's id over its run, or all differ")
    step = caps if count == n_captions and len(set(ids)) < count else 1  # item ids: one per run, or per line
    first_line = {}
    for line in range(0, count, step):
        earlier = first_line.setdefault(ids[line], line)
        if earlier != line:
            raise DataError(f"{path}:{line + 1}: id {ids[line]!r} of item {line // step} is also item "
                            f"{earlier // step}'s (line {earlier + 1}): items need distinct ids")


def _load_split(data_path, split):
    """Validate a split; returns (SplitInfo, captions, lens or None)."""
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string, got {split!r}")
    folder = _split_dir(os.fspath(data_path), split)
    paths = {name: os.path.join(folder, f"{split}_{name}{ext}")
             for name, ext in (("ims", ".npy"), ("caps", ".txt"), ("lens", ".npy"), ("ids", ".txt"))}
    for name in ("ims", "caps"):
        if not os.path.isfile(paths[name]):
            raise DataError(f"{paths[name]}: missing (split {split!r} needs {split}_ims.npy and {split}_caps.txt)")
    for name in ("lens", "ids"):  # optional, but a path that is there must be a file, not silently skipped
        if os.path.lexists(paths[name]) and not os.path.isfile(paths[name]):
            what = "a broken link" if os.path.islink(paths[name]) and not os.path.exists(paths[name]) else "not a file"
            raise DataError(f"{paths[name]}: {what} (remove it, or fix it to point at the split's {name} file)")
    features = _open_features(paths["ims"])
    n_items, max_set, feat_dim = features.shape
    captions = _read_captions(paths["caps"])
    if len(captions) % n_items:
        raise DataError(
            f"{paths['caps']}: {len(captions)} captions for {n_items} items in {paths['ims']}: "
            f"not a whole number of captions per item"
        )
    lens = _read_lens(paths["lens"], n_items, max_set, paths["ims"]) if os.path.isfile(paths["lens"]) else None
    repeat = _row_repeat(features, lens) if len(captions) == n_items else 1
    if repeat > 1:
        n_items //= repeat
        lens = None if lens is None else lens[::repeat]
    if os.path.isfile(paths["ids"]):
        _check_ids(paths["ids"], n_items, len(captions))
    info = SplitInfo(
        n_items=n_items, caps_per_item=len(captions) // n_items, feat_dim=feat_dim, max_set=max_set,
        has_lens=lens is not None, has_ids=os.path.isfile(paths["ids"]),
        paths={k: (v if k in ("ims", "caps") or os.path.isfile(v) else None) for k, v in paths.items()},
        n_captions=len(captions), row_repeat=repeat,
    )
    return info, captions, lens


def _row_repeat(features, lens) -> int:
    """C > 1 when the N rows of ``features`` (and of ``lens``) come in runs of C byte-identical rows, one
    run per item, at least two items; 1 otherwise (distinct rows, or one value everywhere). C divides
    the length L of the first run of identical rows (L = 2C when the first two items have equal
    features): the largest such C whose runs are identical rows at 16 items spread over the array,
    the first included, wins. With lens, rows compare by their lengths and valid rows only (the
    padding past lens is never read, and may differ between copies)."""
    def same(i, j):
        if lens is not None and lens[i] != lens[j]:
            return False
        k = features.shape[1] if lens is None else int(lens[i])
        return np.array_equal(np.ascontiguousarray(features[i, :k]).view(np.uint8),
                              np.ascontiguousarray(features[j, :k]).view(np.uint8))

    n = features.shape[0]
    first_run = 1
    while first_run < n and same(first_run, 0):
        first_run += 1
    if first_run == 1 or first_run == n:
        return 1
    for repeat in range(first_run, 1, -1):
        if first_run % repeat or n % repeat or n // repeat < 2:
            continue
        starts = np.unique(np.linspace(0, n // repeat - 1, 16).astype(np.int64)) * repeat
        if all(all(same(start + i, start) for i in range(1, repeat))
               and (lens is None or not (lens[start:start + repeat] != lens[start]).any()) for start in starts):
            return repeat
    return 1


def check_split(data_path, split):
    """Validate ``{split}_*`` files of ``data_path`` (see the module docstring); raises DataError.

    Example:
        >>> info = check_split("data/coco", "train")   # SplitInfo(n_items=113287, caps_per_item=5, ...)
    """
    return _load_split(data_path, split)[0]


# ----------------------------------------------------------------------------------------------
# Text: BERT word pieces or a word vocabulary (BiGRU)
# ----------------------------------------------------------------------------------------------


def _check_pad_id(source: str, pad_id: int) -> None:
    """The text encoder pads captions with id 0 and masks id 0 from BERT's attention (as published):
    a word at id 0 would be hidden as padding."""
    if pad_id != 0:
        raise DataError(f"{source}: [PAD] has id {pad_id}, not 0: captions are padded with id 0 and BERT's "
                        "attention leaves id 0 out, so the word at id 0 would be hidden as padding")


def load_tokenizer(text_model_dir=None, vocab_file=None):
    """A transformers BERT tokenizer (fast, tokenizers-backed), offline, from a local BERT directory
    (``text_model_dir``, as saved by save_pretrained) or from a WordPiece ``vocab.txt`` (lowercasing,
    as bert-base-uncased, unless the vocabulary holds capital letters: a cased one keeps the case)."""
    from transformers import BertTokenizerFast

    if (text_model_dir is None) == (vocab_file is None):
        raise ValueError("pass exactly one of text_model_dir or vocab_file")
    if text_model_dir is not None:
        if not os.path.isdir(text_model_dir):
            raise DataError(f"{text_model_dir}: BERT directory does not exist")
        # Without these, transformers builds a tokenizer of the special tokens alone: every word [UNK].
        if not any(os.path.isfile(os.path.join(text_model_dir, name)) for name in ("tokenizer.json", "vocab.txt")):
            raise DataError(f"{text_model_dir}: no tokenizer in the BERT directory (tokenizer.json or vocab.txt): "
                            "save the tokenizer there with save_pretrained, or pass its vocab.txt (--vocab_file)")
        try:
            tok = BertTokenizerFast.from_pretrained(text_model_dir, local_files_only=True)
        except Exception as err:  # a truncated tokenizer.json, a vocab.txt that is not UTF-8, ...
            raise DataError(f"{text_model_dir}: unreadable tokenizer files ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''})") from err
        missing = [token for token in BERT_SPECIAL_TOKENS if not _in_vocabulary(tok, token)]
        if missing:  # transformers appends an absent special token past the vocabulary: no embedding row
            raise DataError(f"{text_model_dir}: the tokenizer's vocabulary lacks the special token(s) "
                            f"{', '.join(missing)}")
        _check_pad_id(text_model_dir, tok.convert_tokens_to_ids("[PAD]"))
        return tok
    if not os.path.isfile(vocab_file):
        raise DataError(f"{vocab_file}: vocabulary file does not exist")
    vocab, bom = _read_wordpiece_vocab(vocab_file)
    for token in BERT_SPECIAL_TOKENS:
        if token not in vocab:
            raise DataError(f"{vocab_file}: vocabulary lacks the special token {token}")
    _check_pad_id(vocab_file, vocab["[PAD]"])
    # A cased vocabulary (bert-base-cased: "The", "A") keeps the case; lowercasing, the default, would
    # turn its capitalised words into [UNK] or other ids. Uncased vocabularies hold no capital letters.
    lower = not any(_ASCII_CAPITAL.search(t) for t in vocab if not (t.startswith("[") and t.endswith("]")))
    if tokenizer_reads_vocab_file():  # transformers 4.x
        if bom:  # it reads the file itself, the mark included
            raise DataError(f"{vocab_file}:1: a byte-order mark (U+FEFF) opens the file: remove it")
        return BertTokenizerFast(vocab_file=vocab_file, do_lower_case=lower)
    return BertTokenizerFast(vocab=vocab, do_lower_case=lower)


_ASCII_CAPITAL = re.compile("[A-Z]")


def tokenizer_reads_vocab_file() -> bool:
    """Whether BertTokenizerFast takes a vocab_file and reads it itself (transformers 4), rather than
    a vocab dict (transformers 5, which ignores vocab_file)."""
    import inspect

    from transformers import BertTokenizerFast

    return "vocab_file" in inspect.signature(BertTokenizerFast.__init__).parameters


BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def check_same_bert_vocab(text_model_dir, vocab_file, what="hold different vocabularies: pass one of them"):
    """DataError when a BERT directory's tokenizer and a vocab.txt differ. Both name the tokenizer and
    the vocab file is the one used, so a different one would index the directory's pretrained word
    embeddings by other words. A directory without a readable tokenizer (the BERT config only, or
    tokenizer files this transformers cannot read) passes: the vocab file is its tokenizer."""
    try:
        in_dir = load_tokenizer(text_model_dir=text_model_dir)
    except DataError:
        return
    if in_dir.get_vocab() != load_tokenizer(vocab_file=vocab_file).get_vocab():
        raise DataError(f"the BERT directory {text_model_dir} and the vocabulary {vocab_file} {what}")


def _read_wordpiece_vocab(vocab_file):
    """({token: line - 1}, whether a byte-order mark opens the file). A repeated token is a DataError:
    the tokenizer would keep its last line, so ids would pass its vocabulary size (the word-embedding
    rows) while some line numbers had no token."""
    vocab, first_line, bom = {}, {}, False
    for number, raw in _text_lines(vocab_file):
        bom |= number == 1 and raw.startswith(b"\xef\xbb\xbf")
        token = _decode_line(vocab_file, number, raw)
        if token in first_line:
            raise DataError(f"{vocab_file}:{number}: the token {token!r} repeats line {first_line[token]}: "
                            "each line of a WordPiece vocabulary must be a distinct token")
        first_line[token] = number
        vocab[token] = number - 1
    return vocab, bom


def _in_vocabulary(tok, token) -> bool:
    """Whether ``token`` is a line of the tokenizer's vocabulary (not a token added past its end)."""
    token_id = tok.convert_tokens_to_ids(token)
    return token_id is not None and 0 <= token_id < tok.vocab_size and tok.convert_ids_to_tokens(token_id) == token


def _looks_like_wordpiece_vocab(path) -> bool:
    """Whether the file's first lines read as a BERT vocab.txt: one token per line, [PAD] among them."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = [f.readline().strip() for _ in range(200)]
    except OSError:
        return False
    return "[PAD]" in head and all(" " not in line for line in head)


class Vocabulary:
    """Word <-> index map for the BiGRU text encoder, as the published lib/vocab.py (plus '<mask>',
    which the published train.py appends).

    Words come from ``word_tokenize(caption.lower())`` (vse_fast.word_tokenize: nltk 3.5's
    word_tokenize, as published, without the nltk dependency: "don't" -> "do", "n't").
    ``encode(caption)`` = [<start>] + word ids (<unk> when unknown) + [<end>].
    """

    SPECIALS = ("<pad>", "<start>", "<end>", "<unk>")
    TOKENIZER = "nltk 3.5 word_tokenize(caption.lower())"  # recorded in saved json files

    def __init__(self):
        self.word2idx, self.idx2word = {}, {}
        for word in self.SPECIALS:
            self.add_word(word)

    def add_word(self, word):
        if word not in self.word2idx:
            self.idx2word[len(self.word2idx)] = word
            self.word2idx[word] = len(self.word2idx)

    def __call__(self, word):
        return self.word2idx.get(word, self.word2idx["<unk>"])

    def __len__(self):
        return len(self.word2idx)

    @staticmethod
    def tokenize(caption):
        return word_tokenize(caption.lower())

    def encode(self, caption):
        return [self.word2idx["<start>"], *(self(w) for w in self.tokenize(caption)), self.word2idx["<end>"]]

    @classmethod
    def build(cls, captions, threshold=4):
        """From an iterable of caption strings: words seen >= threshold times (published: 4), in
        first-seen order, then '<mask>'."""
        counter = collections.Counter()
        for caption in captions:
            counter.update(cls.tokenize(caption))
        vocab = cls()
        for word, count in counter.items():
            if count >= threshold:
                vocab.add_word(word)
        vocab.add_word("<mask>")
        return vocab

    @classmethod
    def from_caption_files(cls, paths, threshold=4):
        captions = []
        for path in paths:
            captions.extend(_read_captions(path))
        return cls.build(captions, threshold)

    @classmethod
    def load(cls, path):
        """From a published-format json ({"word2idx", "idx2word", "idx"}); adds '<mask>' if absent.
        DataError when the file is not one: word2idx not an object of integer ids 0..N-1 (each once),
        a repeated word, special words missing, or idx2word / idx that contradict word2idx."""
        content = _read_vocabulary_json(path)
        word2idx = _checked_word_ids(path, content, cls.SPECIALS)
        tokenizer = content.get("tokenizer")
        if tokenizer not in (None, cls.TOKENIZER):
            warnings.warn(f"{path}: vocabulary built with the tokenizer {tokenizer!r}, but captions are tokenized "
                          f"with {cls.TOKENIZER}: words may map to <unk>", stacklevel=2)
        elif tokenizer is None:
            _warn_if_not_nltk_words(path, word2idx)
        vocab = cls.__new__(cls)
        vocab.word2idx = word2idx
        vocab.idx2word = {i: w for w, i in word2idx.items()}
        vocab.add_word("<mask>")
        return vocab

    def save(self, path):
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"word2idx": self.word2idx, "idx2word": self.idx2word, "idx": len(self),
                       "tokenizer": self.TOKENIZER}, f)


def _read_vocabulary_json(path) -> dict:
    """The json object of a vocabulary file, with a "word2idx" object; DataError naming what it is not."""
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f, object_pairs_hook=_pairs_without_repeats)
    except _RepeatedKey as err:
        raise DataError(f"{path}: {err}") from None
    except (OSError, ValueError) as err:
        hint = ""
        if isinstance(err, json.JSONDecodeError) and _looks_like_wordpiece_vocab(path):
            hint = ("; it looks like a BERT WordPiece vocab.txt (one token per line): the BiGRU text encoder "
                    "takes a word vocabulary json (Vocabulary.save, or built from the training captions)")
        raise DataError(f"{path}: unreadable vocabulary json ({err!r}){hint}") from None
    if isinstance(content, dict) and isinstance(content.get("word2idx"), dict):
        return content
    if not isinstance(content, dict):
        got = f"a {type(content).__name__} at the top"
    elif "word2idx" not in content:
        got = f"no such key (keys: {sorted(content)[:5]})"
    else:
        got = f"word2idx is a {type(content['word2idx']).__name__}"
    raise DataError(f'{path}: a vocabulary json holds an object with "word2idx" (an object word -> index), as '
                    f"the published vocabulary files; {got}")


def _checked_word_ids(path, content: dict, specials) -> dict:
    """content["word2idx"] once its ids are 0..N-1, each once, the special words are in it, and the
    file's idx2word and idx (which the published Vocabulary reads) agree with it."""
    word2idx = content["word2idx"]
    not_ints = [(w, i) for w, i in word2idx.items() if type(i) is not int]
    if not_ints:
        raise DataError(f"{path}: word indices must be integers, got {not_ints[:3]}")
    if sorted(word2idx.values()) != list(range(len(word2idx))):
        raise DataError(f"{path}: word indices must be 0..{len(word2idx) - 1}, each once")
    missing = [word for word in specials if word not in word2idx]
    if missing:
        raise DataError(f"{path}: vocabulary lacks the special words {missing} (needs all of {list(specials)})")
    idx2word = {str(i): w for w, i in word2idx.items()}
    given = content.get("idx2word", idx2word)
    if given != idx2word:
        wrong = next((k for k in idx2word if given.get(k) != idx2word[k]), None) if isinstance(given, dict) else None
        raise DataError(f"{path}: idx2word disagrees with word2idx" + (
            f" (index {wrong}: {given.get(wrong)!r} against {idx2word[wrong]!r})" if wrong else ""))
    if content.get("idx", len(word2idx)) != len(word2idx):
        raise DataError(f"{path}: idx is {content['idx']!r} but word2idx holds {len(word2idx)} words (the "
                        "published Vocabulary gives the next word the id idx)")
    return word2idx


class _RepeatedKey(ValueError):
    pass


def _pairs_without_repeats(pairs):
    """json object hook: a key given twice is an error (json.load keeps the last silently)."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _RepeatedKey(f"the key {key!r} appears twice in one object")
        seen.add(key)
    return dict(pairs)


def _warn_if_not_nltk_words(path, word2idx):
    """Warn when a vocabulary json without a "tokenizer" key (published SCAN files, and vse_fast's before
    it used nltk's rules) holds contractions nltk's word_tokenize splits ("man's", "don't"): such a
    vocabulary was built by another tokenizer, and those words would now never be looked up."""
    split = [w for w in word2idx if re.fullmatch(r"\w+'\w+", w) and word_tokenize(w) != [w]]
    if split:
        example = split[0]
        warnings.warn(f"{path}: {len(split)} vocabulary words (e.g. {split[:3]}) are split by nltk's word_tokenize, "
                      f"which tokenizes captions here ({example!r} -> {word_tokenize(example)}): the vocabulary "
                      "was built by another tokenizer (vse_fast's earlier regex tokenizer kept contractions whole), "
                      "so these words map to <unk>; rebuild it from the training captions or retrain", stacklevel=3)


class CaptionEncoder:
    """Caption string -> LongTensor of ids ([CLS] word pieces [SEP] for BERT, <start> words <end>
    for a Vocabulary), optionally with the published training augmentation (see ``__call__``).

    max_tokens truncates, keeping the last token (the end token, unless the BiGRU augmentation
    changed it); position_limit (the text encoder's positions, BERT max_position_embeddings; None:
    unbounded) rejects a caption that would still be longer with CaptionTooLongError, whatever the
    augmentation would delete.

    Example:
        >>> CaptionEncoder(load_tokenizer(vocab_file="vocab.txt"))("a red dog")  # tensor([2, 9, 27, 13, 3])
    """

    def __init__(self, tokenizer_or_vocab, max_tokens=None, position_limit=None):
        for name, value in (("max_caption_tokens", max_tokens), ("position_limit", position_limit)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
                raise ValueError(f"{name} must be an int >= 2 or None, got {value!r}")
        self.max_tokens = max_tokens
        self.position_limit = position_limit
        self.source = tokenizer_or_vocab
        if isinstance(tokenizer_or_vocab, Vocabulary):
            vocab = tokenizer_or_vocab
            self.kind = "vocab"
            self.start, self.end = vocab.word2idx["<start>"], vocab.word2idx["<end>"]
            self.mask = vocab.word2idx.get("<mask>")
            self.vocab_size = len(vocab)
            return
        tok = tokenizer_or_vocab
        if getattr(tok, "backend_tokenizer", None) is not None:
            self.kind = "bert_fast"
            # A copy without the padding and truncation that a tokenizer keeps from its last call with
            # padding=/truncation= (and saves into tokenizer.json): they would put [PAD] inside a caption
            # or cut it short, silently. And without its added tokens: the published loader runs BERT's
            # basic tokenizer and WordPiece on the vocabulary alone, so "[MASK]" written in a caption is
            # the three words "[", "mask", "]", never the mask token (nor "[PAD]" a padding id).
            from tokenizers import Tokenizer

            spec = json.loads(tok.backend_tokenizer.to_str())
            spec["added_tokens"] = []
            self.backend = Tokenizer.from_str(json.dumps(spec))
            self.backend.no_padding()
            self.backend.no_truncation()
        elif hasattr(tok, "basic_tokenizer") and hasattr(tok, "wordpiece_tokenizer"):
            self.kind = "bert_slow"
        else:
            raise TypeError(
                f"expected a vse_fast.data.Vocabulary or a transformers BERT tokenizer, got {type(tok).__name__}"
            )
        self.start, self.end, self.mask = tok.cls_token_id, tok.sep_token_id, tok.mask_token_id
        self.vocab_size = tok.vocab_size
        if any(i is None or not 0 <= i < self.vocab_size for i in (self.start, self.end, self.mask)):
            raise ValueError(f"the BERT tokenizer needs [CLS], [SEP] and [MASK] tokens in its vocabulary of "
                             f"{self.vocab_size}, got ids {self.start}, {self.end}, {self.mask} (a token added "
                             "past the vocabulary has no embedding row)")

    def words(self, caption):
        """Ids grouped per word (a word may be several BERT word pieces), without start/end."""
        if self.kind == "vocab":
            return [[self.source(w)] for w in Vocabulary.tokenize(caption)]
        if self.kind == "bert_fast":
            enc = self.backend.encode(caption, add_special_tokens=False)
            groups, last = [], None
            for token_id, word in zip(enc.ids, enc.word_ids):
                if word is None or word != last:
                    groups.append([])
                    last = word
                groups[-1].append(token_id)
            return groups
        tok = self.source
        return [tok.convert_tokens_to_ids(tok.wordpiece_tokenizer.tokenize(word))
                for word in tok.basic_tokenizer.tokenize(caption)]

    def __call__(self, caption, rng=None, touch_prob=0.0):
        """Ids [start, ..., end]; with an rng, each word is touched with touch_prob and then masked
        (50%), replaced by random ids (10%) or deleted (40%), as published. BERT: the words only;
        a Vocabulary (the published BiGRU branch): <start> and <end> too, and if every token is
        deleted the one with the largest draw stays (the published code would yield an empty caption)."""
        if self.kind == "vocab":
            return self._vocab_ids(caption, rng, touch_prob)
        words = self.words(caption)
        if not words:
            raise EmptyCaptionError(f"the tokenizer keeps none of the characters of the caption {caption!r}")
        self._check_positions(2 + sum(len(pieces) for pieces in words))
        ids = [self.start]
        if rng is not None and touch_prob > 0 and words:
            draws = rng.random(len(words))
            for pieces, u in zip(words, draws):
                if u >= touch_prob:
                    ids.extend(pieces)
                    continue
                share = u / touch_prob
                if share < _MASK_SHARE:
                    ids.extend([self.mask] * len(pieces))
                elif share < _RANDOM_SHARE_END:
                    ids.extend(rng.integers(0, self.vocab_size, len(pieces)).tolist())
        else:
            for pieces in words:
                ids.extend(pieces)
        if self.max_tokens is not None and len(ids) + 1 > self.max_tokens:
            ids = ids[: self.max_tokens - 1]
        ids.append(self.end)
        return torch.tensor(ids, dtype=torch.int64)

    def first_unusable(self, captions):
        """(index, error) of the first caption that ``__call__`` would refuse (EmptyCaptionError,
        CaptionTooLongError), or None. Tokenizes only the captions that can fail, so a dataset is
        checked in about a second before training rather than failing mid-epoch:

        - empty (BERT only): a caption without a letter or digit (BERT keeps every letter or digit,
          as a word piece or [UNK]; it drops control characters, U+FFFD and, uncased, accents);
        - too long: more characters than the positions after lowercasing and NFD (each token takes at
          least one character of the normalized text; NFD splits a Hangul syllable into 2-3 jamo)."""
        limit = self.position_limit
        can_be_empty = self.kind != "vocab"  # a word vocabulary maps any word, <unk> at worst
        if not can_be_empty and limit is None:
            return None

        def can_fail(caption):
            if can_be_empty and not _LETTER_OR_DIGIT.search(caption):
                return True
            if limit is None:
                return False
            if caption.isascii():
                return 2 + len(caption) > limit
            return 2 + len(unicodedata.normalize("NFD", caption.lower())) > limit

        suspects = [index for index, caption in enumerate(captions) if can_fail(caption)]
        if self.kind == "bert_fast":  # batched (parallel) encoding; only the captions that fail go on
            failing = []
            for lo in range(0, len(suspects), 8192):
                part = suspects[lo:lo + 8192]
                for index, enc in zip(part, self.backend.encode_batch([captions[i] for i in part],
                                                                      add_special_tokens=False)):
                    n_tokens = 2 + len(enc.ids)
                    if not enc.ids or (limit is not None and min(n_tokens, self.max_tokens or n_tokens) > limit):
                        failing.append(index)
            suspects = failing
        for index in suspects:
            try:
                self(captions[index])
            except (CaptionTooLongError, EmptyCaptionError) as err:
                return index, err
        return None

    def _check_positions(self, n_tokens):
        """CaptionTooLongError if a caption of n_tokens (start and end included) stays longer than
        position_limit after the max_tokens truncation."""
        if self.position_limit is not None and min(n_tokens, self.max_tokens or n_tokens) > self.position_limit:
            raise CaptionTooLongError(
                f"caption has {n_tokens} tokens (start and end included), more than the text encoder's "
                f"{self.position_limit} positions (position_limit; BERT's max_position_embeddings); shorten it")

    def _vocab_ids(self, caption, rng, touch_prob):
        tokens = [self.start, *(pieces[0] for pieces in self.words(caption)), self.end]
        self._check_positions(len(tokens))
        if rng is not None and touch_prob > 0:
            if self.mask is None:
                raise ValueError("caption augmentation needs a '<mask>' word in the Vocabulary (build/load add it)")
            draws = rng.random(len(tokens))
            ids = []
            for token, u in zip(tokens, draws):
                share = u / touch_prob
                if u >= touch_prob:
                    ids.append(token)
                elif share < _MASK_SHARE:
                    ids.append(self.mask)
                elif share < _RANDOM_SHARE_END:
                    ids.append(int(rng.integers(0, self.vocab_size)))
            tokens = ids or [tokens[int(np.argmax(draws))]]
        if self.max_tokens is not None and len(tokens) > self.max_tokens:
            tokens = tokens[: self.max_tokens - 1] + tokens[-1:]
        return torch.tensor(tokens, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


_TextEncoder = CaptionEncoder  # former private name


FEATURE_DROP_SCHEMES = ("row", "grid")


def feature_drop_scheme(precomp_enc_type):
    """The published size augmentation of an image encoder type: "grid" for the grid features of
    EncoderImageFull ("backbone"), "row" (each region or frame on its own) otherwise."""
    return "grid" if precomp_enc_type == "backbone" else "row"


class _SplitData:
    """Validated split: captions in memory, features memory-mapped lazily (per process)."""

    def __init__(self, data_path, split, caption_limit=None):
        self.info, self.captions, self.lens = _load_split(data_path, split)
        caps = self.info.caps_per_item
        self.n_captions = self.info.n_captions
        if caption_limit is not None:
            if isinstance(caption_limit, bool) or not isinstance(caption_limit, int) or caption_limit < 1:
                raise ValueError(f"caption_limit must be a positive int or None, got {caption_limit!r}")
            if caption_limit < self.n_captions and caption_limit % caps:
                raise ValueError(f"caption_limit {caption_limit} is not a multiple of {caps} captions per item")
            self.n_captions = min(caption_limit, self.n_captions)
        self.n_items = self.n_captions // caps
        self._features = None

    def __getstate__(self):  # never pickle the memory map into DataLoader workers
        state = self.__dict__.copy()
        state["_features"] = None
        return state

    @property
    def features(self):
        if self._features is None:
            self._features = _open_features(self.info.paths["ims"])[:: self.info.row_repeat]  # one row per item
        return self._features

    def check_captions(self, text):
        """DataError naming the file and line of the first caption ``text`` (a CaptionEncoder) cannot
        encode: one too long for the text encoder, or one the tokenizer keeps nothing of."""
        found = text.first_unusable(self.captions[: self.n_captions])
        if found is not None:
            index, err = found
            raise DataError(f"{self.info.paths['caps']}:{index + 1}: {err}")

    def caption_tokens(self, text, index, rng=None, touch_prob=0.0):
        """Token ids of caption ``index`` by ``text`` (a CaptionEncoder); a caption too long for the text
        encoder, or one the tokenizer keeps nothing of, raises DataError naming its file and line."""
        try:
            return text(self.captions[index], rng, touch_prob)
        except (CaptionTooLongError, EmptyCaptionError) as err:
            raise DataError(f"{self.info.paths['caps']}:{index + 1}: {err}") from None

    def set_size(self, item):
        return int(self.lens[item]) if self.lens is not None else self.info.max_set

    def item_features(self, item, rng=None, drop_prob=0.0, scheme="row"):
        """(k, D) float32 tensor of the valid rows of an item. With an rng, rows are dropped, keeping at
        least the row with the largest draw:

        - scheme "row" (published PrecompRegionDataset, regions and frames): each row with drop_prob
          (kept when its draw > drop_prob; the published value is 0.2);
        - scheme "grid" (published EncoderImageFull, grid features): the item draws u; when u >
          drop_prob each row is dropped with probability drop_prob * u, otherwise none is."""
        if scheme not in FEATURE_DROP_SCHEMES:
            raise ValueError(f"feature drop scheme must be one of {FEATURE_DROP_SCHEMES}, got {scheme!r}")
        rows = self.features[item, : self.set_size(item)]
        if rng is not None and drop_prob > 0:
            if scheme == "grid":
                item_draw = rng.random()
                if item_draw <= drop_prob:
                    return self._as_float32(rows, item)
                drop_prob = drop_prob * item_draw
            draws = rng.random(rows.shape[0])
            keep = draws > drop_prob
            if not keep.any():
                keep[int(np.argmax(draws))] = True
            rows = rows[keep]
        return self._as_float32(rows, item)

    def _as_float32(self, rows, item):
        """float32 tensor of an item's valid rows; NaN or inf raises DataError naming the item (else a
        training run stopped at the next logged step, naming neither file nor item), as does a float64
        value beyond float32's range (which would become inf)."""
        with np.errstate(over="ignore"):
            out = np.array(rows, dtype=np.float32)
        if not np.isfinite(out).all():
            if rows.dtype.itemsize > 4 and np.isfinite(rows[~np.isfinite(out)]).any():
                raise DataError(f"{self.info.paths['ims']}: item {item} holds values beyond float32's range "
                                f"(+-{np.finfo(np.float32).max:.3g}), which the model takes")
            raise DataError(f"{self.info.paths['ims']}: item {item} holds NaN or inf in its valid rows")
        return torch.from_numpy(out)


def check_finite_features(data_path, split, caption_limit=None, chunk_items=256):
    """DataError naming the items whose valid feature rows (the first ``lens`` rows; padding is not
    read) hold NaN or inf (float64: or values beyond float32's range, which become inf in the float32
    the datasets read), among the items evaluated with ``caption_limit``. The values are tested after
    the float32 cast the datasets apply, so an item passes here exactly when it loads (a float64 value
    within half a float32 step of float32's largest rounds to it, finite). Reads the features in
    chunks of items (COCO's 5000 x 36 x 2048 dev features: about 1.5 GB, once)."""
    split_data = _SplitData(data_path, split, caption_limit)
    features, lens = split_data.features, split_data.lens
    bad = []
    n = split_data.n_items
    for lo in range(0, n, chunk_items):
        hi = min(lo + chunk_items, n)
        with np.errstate(over="ignore"):  # float64 beyond float32's range: inf, as _as_float32 casts it
            block = np.asarray(features[lo:hi], dtype=np.float32)
        valid = np.isfinite(block)
        if lens is not None:
            valid |= np.arange(block.shape[1])[None, :, None] >= lens[lo:hi, None, None]
        bad.extend((lo + np.flatnonzero(~valid.all(axis=(1, 2)))).tolist())
    if bad:
        beyond = " (or, float64, values beyond float32's range)" if features.dtype.itemsize > 4 else ""
        raise DataError(f"{split_data.info.paths['ims']}: the features of items {bad[:8]} ({len(bad)} in all) "
                        f"hold NaN or inf{beyond}")


def _check_index(index, length):
    if not -length <= index < length:
        raise IndexError(f"index {index} out of range for a dataset of {length}")
    return index % length


class PrecomputedDataset(torch.utils.data.Dataset):
    """One item per caption: caption i with the feature set of item i // caps_per_item.

    Args:
        data_path, split: see the module docstring; validated by check_split on construction.
        tokenizer_or_vocab: a BERT tokenizer (load_tokenizer) or a Vocabulary (BiGRU).
        train: apply the published augmentation (feature drop, word mask/replace/delete).
        seed: augmentation seed; the draws of item i in epoch e depend on (seed, e, i) only.
        feature_drop: probability to drop each region/frame (published 0.2); 0 disables.
        feature_drop_scheme: "row" (regions, frames: each row with feature_drop) or "grid" (the
            published grid-feature scheme, see ``_SplitData.item_features``); see feature_drop_scheme().
        token_aug: probability to touch each word (published 0.2); 0 disables.
        max_caption_tokens: cap on the token count including start/end (None: no cap).
        caption_limit: use only the first captions (COCO dev: 5000), a multiple of caps_per_item.
        position_limit: the text encoder's positions (BERT max_position_embeddings, see
            vse_fast.eval.caption_position_limit); a longer caption raises DataError naming its line.

    ``dataset[i]`` -> dict(features (k, D) float32, tokens (t,) int64, img_index int, cap_index int).
    """

    def __init__(self, data_path, split, tokenizer_or_vocab, train, seed=0, feature_drop=0.2, token_aug=0.2,
                 max_caption_tokens=None, caption_limit=None, position_limit=None, feature_drop_scheme="row"):
        if feature_drop_scheme not in FEATURE_DROP_SCHEMES:
            raise ValueError(f"feature_drop_scheme must be one of {FEATURE_DROP_SCHEMES}, got {feature_drop_scheme!r}")
        for name, value in (("feature_drop", feature_drop), ("token_aug", token_aug)):
            if not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.data = _SplitData(data_path, split, caption_limit)
        self.text = CaptionEncoder(tokenizer_or_vocab, max_caption_tokens, position_limit)
        self.data.check_captions(self.text)
        if train and token_aug > 0 and self.text.mask is None:
            raise ValueError("token augmentation needs a '<mask>' word in the Vocabulary (Vocabulary.build adds it)")
        self.split, self.train, self.seed = split, bool(train), seed
        self.feature_drop, self.token_aug = float(feature_drop), float(token_aug)
        self.feature_drop_scheme = feature_drop_scheme
        self.epoch = 0

    @property
    def info(self):
        return self.data.info

    @property
    def caps_per_item(self):
        return self.data.info.caps_per_item

    def item_of(self, index):
        """The item (row of features) of each caption index: ``index // caps_per_item``."""
        return torch.as_tensor(index) // self.caps_per_item

    def set_epoch(self, epoch):
        """Select the augmentation draws of this epoch (call before each epoch, every rank)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch = epoch

    def __len__(self):
        return self.data.n_captions

    def __getitem__(self, index):
        index = _check_index(index, len(self))
        item = index // self.caps_per_item
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.train else None
        features = self.data.item_features(item, rng, self.feature_drop, self.feature_drop_scheme)
        tokens = self.data.caption_tokens(self.text, index, rng, self.token_aug)
        return {"features": features, "tokens": tokens, "img_index": item, "cap_index": index}


class ImageSetDataset(torch.utils.data.Dataset):
    """One item per image/video, for evaluation: dict(features (k, D) float32, index int)."""

    def __init__(self, data_path, split, caption_limit=None):
        self.data = _SplitData(data_path, split, caption_limit)

    @property
    def info(self):
        return self.data.info

    def __len__(self):
        return self.data.n_items

    def __getitem__(self, index):
        index = _check_index(index, len(self))
        return {"features": self.data.item_features(index), "index": index}


class CaptionDataset(torch.utils.data.Dataset):
    """One item per caption, for evaluation: dict(tokens (t,) int64, index int); no augmentation.
    Arguments as PrecomputedDataset."""

    def __init__(self, data_path, split, tokenizer_or_vocab, caption_limit=None, max_caption_tokens=None,
                 position_limit=None):
        self.data = _SplitData(data_path, split, caption_limit)
        self.text = CaptionEncoder(tokenizer_or_vocab, max_caption_tokens, position_limit)
        self.data.check_captions(self.text)

    @property
    def info(self):
        return self.data.info

    def __len__(self):
        return self.data.n_captions

    def __getitem__(self, index):
        index = _check_index(index, len(self))
        return {"tokens": self.data.caption_tokens(self.text, index), "index": index}


# ----------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------


def _pad(tensors):
    lengths = torch.tensor([t.shape[0] for t in tensors], dtype=torch.int64)
    return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=0), lengths


def collate(batch):
    """Pad a list of dataset items into a batch (keys present only when the items have them):

    images (B, Kmax, D) float32 zero-padded, img_lengths (B,) int64,
    captions (B, Tmax) int64 padded with 0, cap_lengths (B,) int64,
    img_index / cap_index / index (B,) int64.
    (The published collate_fn pads the same way with zeros but returns img_lengths as a float tensor
    and caption lengths as a list; here every length is an int64 tensor, ready for the device.)
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    out = {}
    first = batch[0]
    if "features" in first:
        out["images"], out["img_lengths"] = _pad([b["features"] for b in batch])
    if "tokens" in first:
        out["captions"], out["cap_lengths"] = _pad([b["tokens"] for b in batch])
    for key in ("img_index", "cap_index", "index"):
        if key in first:
            out[key] = torch.tensor([b[key] for b in batch], dtype=torch.int64)
    return out


def collate_images(batch):
    """`collate` for ImageSetDataset: images, img_lengths, index."""
    return collate(batch)


def collate_captions(batch):
    """`collate` for CaptionDataset: captions, cap_lengths, index."""
    return collate(batch)
