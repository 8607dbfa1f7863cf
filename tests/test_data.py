"""vse_fast.data: validation (DataError), datasets, published augmentation, collate."""
import os
import pickle
import re
import warnings

import numpy as np
import pytest
import torch

from vse_fast import data
from vse_fast.data import DataError

WORDS = ["a", "red", "dog", "blue", "cat", "near", "the", "tree", "runs", "green", "bird", "sits"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", "."] + WORDS + ["jump", "##ing"]


def _write_split(folder, split="train", n=6, k=5, d=4, caps=5, lens=True, ids=True, rng=None):
    """A valid split with padding rows set to NaN (so any use of them shows)."""
    rng = rng or np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    feats = rng.standard_normal((n, k, d)).astype(np.float32)
    set_sizes = rng.integers(1, k + 1, size=n)
    set_sizes[0] = k
    if lens:
        for i, size in enumerate(set_sizes):
            feats[i, size:] = np.nan
        np.save(os.path.join(folder, f"{split}_lens.npy"), set_sizes)
    np.save(os.path.join(folder, f"{split}_ims.npy"), feats)
    captions = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 9)))) for _ in range(n * caps)]
    with open(os.path.join(folder, f"{split}_caps.txt"), "w") as f:
        f.write("\n".join(captions) + "\n")
    if ids:
        with open(os.path.join(folder, f"{split}_ids.txt"), "w") as f:
            f.write("\n".join(str(100 + i) for i in range(n)) + "\n")
    return feats, (set_sizes if lens else np.full(n, k)), captions


@pytest.fixture
def tokenizer(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n")
    return data.load_tokenizer(vocab_file=str(path))


@pytest.fixture
def split(tmp_path):
    folder = tmp_path / "data"
    feats, lens, captions = _write_split(str(folder))
    return str(folder), feats, lens, captions


# ----------------------------------------------------------------------------------------------
# check_split
# ----------------------------------------------------------------------------------------------


def test_check_split_reports_the_layout(split):
    folder, feats, lens, captions = split
    info = data.check_split(folder, "train")
    assert (info.n_items, info.caps_per_item, info.max_set, info.feat_dim) == (6, 5, 5, 4)
    assert info.has_lens and info.has_ids and info.n_captions == 30
    assert info.paths["ims"] == os.path.join(folder, "train_ims.npy")


def test_check_split_finds_the_published_precomp_folder(tmp_path):
    _write_split(str(tmp_path / "coco" / "precomp"), "testall", n=10, caps=5, lens=False, ids=False)
    info = data.check_split(str(tmp_path / "coco"), "testall")
    assert info.n_items == 10 and not info.has_lens and not info.has_ids


def test_a_split_directly_in_the_data_dir_wins_over_its_precomp_copy(tmp_path):
    """With the split in both places, the files directly in the data directory are read, and
    split_captions_file names the same captions file (else the captions checked were not those read)."""
    folder = str(tmp_path / "coco")
    _write_split(folder, "train", n=2, caps=5, lens=False, ids=False)
    _write_split(os.path.join(folder, "precomp"), "train", n=3, caps=5, lens=False, ids=False)
    info = data.check_split(folder, "train")
    assert info.n_items == 2 and info.paths["caps"] == os.path.join(folder, "train_caps.txt")
    assert data.split_captions_file(folder, "train") == info.paths["caps"]


def test_check_split_accepts_one_vector_per_item(tmp_path):
    folder = str(tmp_path)
    _write_split(folder, n=4, caps=20, lens=False, ids=False)
    flat = np.random.default_rng(1).standard_normal((4, 7)).astype(np.float32)
    np.save(os.path.join(folder, "train_ims.npy"), flat)
    info = data.check_split(folder, "train")
    assert (info.max_set, info.feat_dim, info.caps_per_item) == (1, 7, 20)
    item = data.ImageSetDataset(folder, "train")[2]
    torch.testing.assert_close(item["features"], torch.from_numpy(flat[2:3]))


@pytest.mark.parametrize("missing", ["ims.npy", "caps.txt"])
def test_missing_file_is_named(split, missing):
    folder = split[0]
    os.remove(os.path.join(folder, f"train_{missing}"))
    with pytest.raises(DataError, match=re.escape(f"train_{missing}: missing")):
        data.check_split(folder, "train")
    with pytest.raises(DataError, match="does not exist"):
        data.check_split(os.path.join(folder, "nope"), "train")


@pytest.mark.parametrize("content", ["garbage", "truncated", "pickled", "integer", "4-D", "empty"])
def test_unreadable_or_ill_shaped_features_are_named(split, content):
    folder = split[0]
    path = os.path.join(folder, "train_ims.npy")
    if content == "garbage":
        with open(path, "wb") as f:
            f.write(b"this is not a numpy file")
    elif content == "truncated":
        raw = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write(raw[: len(raw) // 2])
    elif content == "pickled":
        np.save(path, np.array([{"a": 1}] * 6, dtype=object), allow_pickle=True)
    elif content == "integer":
        np.save(path, np.zeros((6, 5, 4), dtype=np.int32))
    elif content == "4-D":
        np.save(path, np.zeros((6, 5, 4, 1), dtype=np.float32))
    else:
        np.save(path, np.zeros((6, 0, 4), dtype=np.float32))
    with pytest.raises(DataError, match=r"train_ims\.npy"):
        data.check_split(folder, "train")


def test_caption_count_mismatch_is_named(split):
    folder = split[0]
    with open(os.path.join(folder, "train_caps.txt"), "a") as f:
        f.write("one caption too many\n")
    with pytest.raises(DataError, match=r"train_caps\.txt: 31 captions for 6 items"):
        data.check_split(folder, "train")


def test_empty_caption_names_its_line(split):
    folder, _, _, captions = split
    captions = list(captions)
    captions[2] = "   "
    with open(os.path.join(folder, "train_caps.txt"), "w") as f:
        f.write("\n".join(captions) + "\n")
    with pytest.raises(DataError, match=r"train_caps\.txt:3: empty caption"):
        data.check_split(folder, "train")
    captions[2] = "\u200b \u00ad\x7f"  # zero-width space, soft hyphen, DEL: tokenizers keep no word
    with open(os.path.join(folder, "train_caps.txt"), "w") as f:
        f.write("\n".join(captions) + "\n")
    with pytest.raises(DataError, match=r"train_caps\.txt:3: empty caption \(invisible characters only\)"):
        data.check_split(folder, "train")


def test_a_byte_order_mark_is_not_part_of_the_first_caption_or_id(split):
    """Windows editors open UTF-8 files with a byte-order mark; it is no word of the first caption
    (the BiGRU vocabulary would count it as one) and no id. One inside the file is an error."""
    folder, _, _, captions = split
    with open(os.path.join(folder, "train_caps.txt"), "w", encoding="utf-8-sig", newline="\r\n") as f:
        f.write("\n".join(captions) + "\n")
    with open(os.path.join(folder, "train_ids.txt"), "w", encoding="utf-8") as f:
        f.write("\ufeff\n" + "".join(f"{100 + i}\n" for i in range(1, 6)))  # the id line is only the mark: empty
    with pytest.raises(DataError, match=r"train_ids\.txt:1: empty id"):
        data.check_split(folder, "train")
    os.remove(os.path.join(folder, "train_ids.txt"))
    dataset = data.CaptionDataset(folder, "train", data.Vocabulary.build(captions, threshold=1))
    assert dataset.data.captions == captions
    assert "\ufeff" not in data.Vocabulary.from_caption_files([os.path.join(folder, "train_caps.txt")], 1).word2idx
    joined = "\n".join(captions[:15]) + "\n\ufeff" + "\n".join(captions[15:]) + "\n"  # two files, two marks
    with open(os.path.join(folder, "train_caps.txt"), "w", encoding="utf-8-sig") as f:
        f.write(joined)
    with pytest.raises(DataError, match=r"train_caps\.txt:16: a byte-order mark \(U\+FEFF\) inside the file"):
        data.check_split(folder, "train")


@pytest.mark.parametrize("newline", ["\r\n", "\r"], ids=["crlf", "cr"])
def test_lines_split_as_python_text_mode_splits_them(split, newline):
    """The published loader reads captions in text mode, which ends a line at \\n, \\r\\n or a lone \\r
    (old Mac files): every such file reads as its \\n twin, ids too."""
    folder, _, _, captions = split
    with open(os.path.join(folder, "train_caps.txt"), "w", encoding="utf-8", newline=newline) as f:
        f.write("\n".join(captions))  # no final line end either
    with open(os.path.join(folder, "train_ids.txt"), "w", encoding="utf-8", newline=newline) as f:
        f.write("".join(f"{100 + i}\n" for i in range(len(captions))))
    data.check_split(folder, "train")
    assert data.CaptionDataset(folder, "train", data.Vocabulary.build(captions, threshold=1)).data.captions == captions


def test_invalid_utf8_names_its_line(split):
    folder = split[0]
    raw = open(os.path.join(folder, "train_caps.txt"), "rb").read().split(b"\n")
    raw[4] = b"caf\xe9"
    with open(os.path.join(folder, "train_caps.txt"), "wb") as f:
        f.write(b"\n".join(raw))
    with pytest.raises(DataError, match=r"train_caps\.txt:5: not valid UTF-8"):
        data.check_split(folder, "train")


@pytest.mark.parametrize("name", ["lens.npy", "ids.txt"])
@pytest.mark.parametrize("kind", ["broken-link", "directory"])
def test_optional_files_that_are_no_file_are_named(split, name, kind):
    """A broken lens link was skipped silently: every set taken at full size, padding included."""
    folder = split[0]
    path = os.path.join(folder, f"train_{name}")
    os.remove(path)
    if kind == "broken-link":
        os.symlink(os.path.join(folder, "gone.npy"), path)
    else:
        os.mkdir(path)
    with pytest.raises(DataError, match=f"train_{name}: " + ("a broken link" if kind == "broken-link" else "not a file")):
        data.check_split(folder, "train")


def test_arrays_appended_into_one_file_are_named(split):
    """np.load reads the first of several arrays appended with np.save: the rest of the items were
    ignored and the captions paired with the wrong items, silently."""
    folder, feats, lens, _ = split
    for name, arrays in (("ims", (feats[:3], feats[3:])), ("lens", (lens[:3], lens[3:]))):
        np.save(os.path.join(folder, f"train_{name}.npy"), np.concatenate(arrays))
        with open(os.path.join(folder, f"train_{name}.npy"), "ab") as f:
            np.save(f, arrays[1])
        with pytest.raises(DataError, match=rf"train_{name}\.npy: .*after the array.*several arrays appended"):
            data.check_split(folder, "train")
        np.save(os.path.join(folder, f"train_{name}.npy"), np.concatenate(arrays))
    data.check_split(folder, "train")


def test_utf16_text_without_its_mark_is_named(split):
    """UTF-16 without a byte-order mark decodes as UTF-8 with a NUL after each ASCII letter: the file
    passed, and a BiGRU vocabulary mapped almost every word to <unk>."""
    folder, _, _, captions = split
    with open(os.path.join(folder, "train_caps.txt"), "wb") as f:
        f.write("\n".join(captions).encode("utf-16-le"))
    with pytest.raises(DataError, match=r"train_caps\.txt:1: a NUL byte \(UTF-16 text\?\): save the file as UTF-8"):
        data.check_split(folder, "train")


def test_lens_archive_instead_of_array_is_named(split):
    folder = split[0]
    with open(os.path.join(folder, "train_lens.npy"), "wb") as f:
        np.savez(f, lens=np.full(6, 2))
    with pytest.raises(DataError, match=r"train_lens\.npy: expected one \.npy array, got NpzFile"):
        data.check_split(folder, "train")


@pytest.mark.parametrize("lens,match", [
    (np.array([5, 1, 1, 1, 1]), r"shape \(6,\)"),
    (np.array([5, 1, 0, 1, 1, 1]), "length 0 of item 2 is outside 1..5"),
    (np.array([5, 1, 1, 6, 1, 1]), "length 6 of item 3 is outside 1..5"),
    (np.array([5.0, 1, 1, 1, 1, 1]), "integers"),
], ids=["wrong-count", "zero", "too-long", "float"])
def test_bad_lens_are_named(split, lens, match):
    folder = split[0]
    np.save(os.path.join(folder, "train_lens.npy"), lens)
    with pytest.raises(DataError, match=rf"train_lens\.npy: .*{match}"):
        data.check_split(folder, "train")


def test_bad_ids_are_named(split):
    folder = split[0]
    with open(os.path.join(folder, "train_ids.txt"), "w") as f:
        f.write("1\n2\n3\n")
    with pytest.raises(DataError, match=r"train_ids\.txt: 3 ids, expected 6"):
        data.check_split(folder, "train")


def test_per_caption_ids_must_follow_the_caption_grouping(split):
    """6 items x 5 captions: per-caption ids repeating each item's id over its 5 lines, or 30 distinct
    caption ids, pass; an item id that strays into another item's run is named by line, and so is an
    id that two items share (per caption or per item)."""
    folder = split[0]
    path = os.path.join(folder, "train_ids.txt")
    item_ids = [str(100 + i // 5) for i in range(30)]
    for ids in (item_ids, [str(i) for i in range(30)]):
        with open(path, "w") as f:
            f.write("\n".join(ids) + "\n")
        assert data.check_split(folder, "train").has_ids
    shifted = item_ids[1:] + item_ids[:1]  # off by one line: line 5 holds item 1's id
    with open(path, "w") as f:
        f.write("\n".join(shifted) + "\n")
    with pytest.raises(DataError, match=r"train_ids\.txt:5: id '101' differs from '100' on line 1"):
        data.check_split(folder, "train")
    shared = [str(100 + i // 10) for i in range(30)]  # runs of 10: the ids say 3 items of 10 captions
    twice = [str(100 + i // 5 % 3) for i in range(30)]  # items 3..5 repeat the ids of items 0..2
    per_item = ["7", "8", "9", "8", "10", "11"]
    for ids, match in ((shared, r":6: id '100' of item 1 is also item 0's \(line 1\)"),
                       (twice, r":16: id '100' of item 3 is also item 0's \(line 1\)"),
                       (per_item, r":4: id '8' of item 3 is also item 1's \(line 2\)")):
        with open(path, "w") as f:
            f.write("\n".join(ids) + "\n")
        with pytest.raises(DataError, match=r"train_ids\.txt" + match + ": items need distinct ids"):
            data.check_split(folder, "train")


def test_a_repeated_caption_id_names_both_lines(split):
    """30 caption ids of which the last repeats the first: the error named line 2 ('c1' differs from
    'c0'), which is right; the repeat is on line 30."""
    folder = split[0]
    with open(os.path.join(folder, "train_ids.txt"), "w") as f:
        f.write("\n".join([f"c{i}" for i in range(29)] + ["c0"]) + "\n")
    with pytest.raises(DataError, match=r"train_ids\.txt:30: id 'c0' repeats line 1: .* caption ids, which must "
                                        "all differ"):
        data.check_split(folder, "train")


@pytest.mark.parametrize("content,match", [
    (b"1\n2\n3\xe9\n4\n5\n6\n", r"train_ids\.txt:3: not valid UTF-8"),
    ("1\n2\n3\x0c4\n5\n6\n".encode(), r"train_ids\.txt: 5 ids, expected 6"),  # \x0c is no line break
    ("1\n2\n3\u20284\n5\n6\n".encode(), r"train_ids\.txt: 5 ids, expected 6"),  # nor is U+2028
    (b"1\n2\n\n4\n5\n6\n", r"train_ids\.txt:3: empty id"),
], ids=["latin1", "form-feed", "line-separator", "empty"])
def test_ids_are_lines_of_utf8_as_captions(split, content, match):
    folder = split[0]
    with open(os.path.join(folder, "train_ids.txt"), "wb") as f:
        f.write(content)
    with pytest.raises(DataError, match=match):
        data.check_split(folder, "train")


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


def test_features_are_memory_mapped_and_only_valid_rows_used(split, tokenizer):
    folder, feats, lens, _ = split
    images = data.ImageSetDataset(folder, "train")
    assert len(images) == 6
    for i in range(6):
        item = images[i]
        assert item["index"] == i
        torch.testing.assert_close(item["features"], torch.from_numpy(feats[i, : lens[i]]))  # no NaN padding
    assert isinstance(images.data.features, np.memmap)
    pairs = data.PrecomputedDataset(folder, "train", tokenizer, train=False)
    assert isinstance(pairs.data.features, np.memmap)
    assert pickle.loads(pickle.dumps(pairs)).data._features is None  # workers reopen the map


def test_non_finite_features_are_named_and_padding_is_not_read(split):
    """check_finite_features: NaN padding beyond an item's length passes; NaN or inf in a valid row
    names the item, within the items a caption limit keeps (chunks smaller than the split)."""
    folder, feats, lens, _ = split
    assert np.isnan(feats[lens < feats.shape[1]]).any()  # the fixture pads with NaN
    data.check_finite_features(folder, "train", chunk_items=4)
    feats = feats.copy()
    feats[1, lens[1] - 1, 2] = np.inf
    feats[5, 0, 0] = np.nan
    np.save(os.path.join(folder, "train_ims.npy"), feats)
    for chunk in (1, 4, 256):
        with pytest.raises(data.DataError, match=r"train_ims.npy: the features of items \[1, 5\] \(2 in all\) hold"):
            data.check_finite_features(folder, "train", chunk_items=chunk)
    with pytest.raises(data.DataError, match=r"items \[1\] \(1 in all\)"):
        data.check_finite_features(folder, "train", caption_limit=25)  # items 0..4
    data.check_finite_features(folder, "train", caption_limit=5)  # item 0 only


def test_rows_repeated_once_per_caption_are_read_as_one_row_per_item(tmp_path, tokenizer):
    """The layout the published loader reads with im_div = 1 (N feature rows for N captions, each item's
    row repeated once per caption; it evaluates every 5th image): read as N / C items of C captions, with
    the per-row lens and per-caption ids of that layout. Rows that merely share values stay items."""
    folder = str(tmp_path / "repeated")
    feats, lens, captions = _write_split(folder, "test", n=7, k=5, caps=5, ids=False)  # NaN padding rows
    np.save(os.path.join(folder, "test_ims.npy"), np.repeat(feats, 5, axis=0))
    np.save(os.path.join(folder, "test_lens.npy"), np.repeat(lens, 5))
    with open(os.path.join(folder, "test_ids.txt"), "w") as f:
        f.write("".join(f"{100 + j // 5}\n" for j in range(35)))
    info = data.check_split(folder, "test")
    assert (info.n_items, info.caps_per_item, info.row_repeat, info.n_captions) == (7, 5, 5, 35)
    images = data.ImageSetDataset(folder, "test")
    assert len(images) == 7
    for i in range(7):
        torch.testing.assert_close(images[i]["features"], torch.from_numpy(feats[i, : lens[i]]))
    pairs = data.PrecomputedDataset(folder, "test", tokenizer, train=False)
    assert len(pairs) == 35 and pairs[13]["img_index"] == 2
    torch.testing.assert_close(pairs[13]["features"], torch.from_numpy(feats[2, : lens[2]]))

    # the copies' padding past lens differs (never read): still one row per item
    noisy = np.repeat(feats, 5, axis=0)
    rows_lens = np.repeat(lens, 5)
    pad = np.arange(5)[None, :] >= rows_lens[:, None]
    noisy[pad] = np.random.default_rng(1).standard_normal((int(pad.sum()), noisy.shape[2]))
    np.save(os.path.join(folder, "test_ims.npy"), noisy)
    info = data.check_split(folder, "test")
    assert (info.n_items, info.caps_per_item, info.row_repeat) == (7, 5, 5)
    np.save(os.path.join(folder, "test_ims.npy"), np.repeat(feats, 5, axis=0))

    # one caption per item: distinct rows, a constant array, runs whose lens differ, and runs of equal rows
    # at both ends but distinct rows inside (the runs are checked inside the file, not at its ends only:
    # read as 7 items of 5 captions, captions were paired with other items' features) stay as they are
    inside = np.repeat(feats, 5, axis=0)
    inside[15:20] = np.random.default_rng(2).standard_normal((5, 5, 4))
    for name, rows, row_lens in (("distinct", feats, lens), ("constant", np.zeros((10, 5, 4), np.float32), None),
                                 ("lens differ", np.repeat(feats, 5, axis=0), np.arange(35) % 5 + 1),
                                 ("distinct inside", inside, None)):
        other = str(tmp_path / name.replace(" ", "_"))
        _write_split(other, "test", n=len(rows), k=5, caps=1, lens=False, ids=False)
        np.save(os.path.join(other, "test_ims.npy"), rows)
        if row_lens is not None:
            np.save(os.path.join(other, "test_lens.npy"), row_lens)
        info = data.check_split(other, "test")
        assert (info.n_items, info.caps_per_item, info.row_repeat) == (len(rows), 1, 1), name
    # more captions per item than any dataset in use (MSR-VTT's 20): still one row per item
    many = str(tmp_path / "many")
    _write_split(many, "test", n=75, k=5, caps=1, lens=False, ids=False)
    np.save(os.path.join(many, "test_ims.npy"), np.repeat(feats[:3], 25, axis=0))
    info = data.check_split(many, "test")
    assert (info.n_items, info.caps_per_item, info.row_repeat) == (3, 25, 25)
    # the first two items with equal features (a duplicate image): a first run of 2C rows, still C
    duplicated = feats.copy()
    duplicated[1] = duplicated[0]
    np.save(os.path.join(folder, "test_ims.npy"), np.repeat(duplicated, 5, axis=0))
    np.save(os.path.join(folder, "test_lens.npy"), np.repeat(np.r_[lens[0], lens[0], lens[2:]], 5))
    info = data.check_split(folder, "test")
    assert (info.n_items, info.caps_per_item, info.row_repeat) == (7, 5, 5)


def test_pairs_and_eval_tokens(split, tokenizer):
    folder, feats, lens, captions = split
    pairs = data.PrecomputedDataset(folder, "train", tokenizer, train=False)
    texts = data.CaptionDataset(folder, "train", tokenizer)
    assert len(pairs) == len(texts) == 30
    for i in (0, 7, 29, -1):
        item = pairs[i]
        j = i % 30
        assert item["img_index"] == j // 5 and item["cap_index"] == j
        torch.testing.assert_close(item["features"], torch.from_numpy(feats[j // 5, : lens[j // 5]]))
        expected = torch.tensor(tokenizer(captions[j])["input_ids"])  # [CLS] pieces [SEP]
        assert torch.equal(item["tokens"], expected) and torch.equal(texts[i]["tokens"], expected)
        assert texts[i]["index"] == j
    assert pairs[-30]["cap_index"] == texts[-30]["index"] == 0  # -len is the first item, as for a list
    with pytest.raises(IndexError):
        pairs[30]
    with pytest.raises(IndexError):
        texts[-31]


def test_word_pieces_follow_basic_then_wordpiece_tokenization(tmp_path, tokenizer):
    folder = str(tmp_path)
    _write_split(folder, n=1, caps=1, lens=False, ids=False)
    with open(os.path.join(folder, "train_caps.txt"), "w") as f:
        f.write("A RED dog, jumping zebra.\n")
    text = data.PrecomputedDataset(folder, "train", tokenizer, train=False).text
    ids = {t: i for i, t in enumerate(VOCAB)}
    assert text.words("A RED dog, jumping zebra.") == [
        [ids["a"]], [ids["red"]], [ids["dog"]], [ids[","]], [ids["jump"], ids["##ing"]], [ids["[UNK]"]], [ids["."]]]


def test_caption_limit_caps_dev_as_published(tmp_path, tokenizer):
    folder = str(tmp_path)
    _write_split(folder, "dev", n=1200, k=2, d=2, caps=5, lens=False, ids=False)
    limit = data.published_caption_limit("dev")
    assert limit == 5000 and data.published_caption_limit("test") is None
    assert len(data.CaptionDataset(folder, "dev", tokenizer, caption_limit=limit)) == 5000
    assert len(data.ImageSetDataset(folder, "dev", caption_limit=limit)) == 1000
    assert len(data.ImageSetDataset(folder, "dev", caption_limit=10**6)) == 1200  # a cap, not a demand
    with pytest.raises(ValueError, match="multiple of 5"):
        data.ImageSetDataset(folder, "dev", caption_limit=4999)
    _write_split(folder, "dev", n=1700, k=2, d=2, caps=3, lens=False, ids=False)  # 3 captions per item
    limit = data.published_caption_limit("dev", data.check_split(folder, "dev").caps_per_item)
    assert limit == 4998 and len(data.ImageSetDataset(folder, "dev", caption_limit=limit)) == 1666
    with pytest.raises(ValueError, match="caps_per_item must be a positive int, got 0"):
        data.published_caption_limit("dev", 0)  # not a ZeroDivisionError


def test_augmentation_is_a_function_of_seed_epoch_index(split, tokenizer):
    folder = split[0]
    make = lambda seed=0: data.PrecomputedDataset(folder, "train", tokenizer, train=True, seed=seed)  # noqa: E731
    first, second = make(), make()
    forward = [first[i] for i in range(30)]
    backward = [second[i] for i in reversed(range(30))][::-1]  # other access order, other object
    worker_copy = pickle.loads(pickle.dumps(first))  # as a DataLoader worker gets it
    for a, b, c in zip(forward, backward, (worker_copy[i] for i in range(30))):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["features"], b["features"])
        assert torch.equal(a["tokens"], c["tokens"]) and torch.equal(a["features"], c["features"])

    def signature(dataset):
        return [(tuple(dataset[i]["tokens"].tolist()), dataset[i]["features"].shape[0]) for i in range(30)]

    base = signature(first)
    first.set_epoch(1)
    assert signature(first) != base
    first.set_epoch(0)
    assert signature(first) == base
    assert signature(make(seed=1)) != base
    with pytest.raises(ValueError, match="epoch"):
        first.set_epoch(-1)


def test_augmentation_statistics_match_published(tmp_path, tokenizer):
    """Words touched with p=0.2: half masked, a tenth random, the rest deleted; regions kept with p=0.8."""
    folder = str(tmp_path)
    n_items, k = 400, 30
    rng = np.random.default_rng(0)
    _write_split(folder, n=n_items, k=k, d=2, caps=5, lens=False, ids=False, rng=rng)
    single_piece = [w for w in WORDS]  # every word is one piece: counts are per word
    captions = [" ".join(rng.choice(single_piece, size=10)) for _ in range(n_items * 5)]
    with open(os.path.join(folder, "train_caps.txt"), "w") as f:
        f.write("\n".join(captions) + "\n")
    dataset = data.PrecomputedDataset(folder, "train", tokenizer, train=True, seed=3)
    mask_id = tokenizer.mask_token_id
    n_words, n_kept_rows, masked, out_tokens = 0, 0, 0, 0
    for i in range(len(dataset)):
        item = dataset[i]
        inner = item["tokens"][1:-1]
        assert item["tokens"][0] == tokenizer.cls_token_id and item["tokens"][-1] == tokenizer.sep_token_id
        n_words += 10
        out_tokens += len(inner)
        masked += int((inner == mask_id).sum())
        n_kept_rows += item["features"].shape[0]
    deleted = n_words - out_tokens
    sd = np.sqrt(0.2 * 0.8 / n_words)
    assert abs(masked / n_words - 0.10) < 5 * sd
    assert abs(deleted / n_words - 0.08) < 5 * sd
    n_rows = len(dataset) * k
    assert abs(n_kept_rows / n_rows - 0.8) < 5 * np.sqrt(0.16 / n_rows)
    no_aug = data.PrecomputedDataset(folder, "train", tokenizer, train=True, feature_drop=0, token_aug=0)
    assert torch.equal(no_aug[5]["tokens"], torch.tensor(tokenizer(captions[5])["input_ids"]))
    assert no_aug[5]["features"].shape[0] == k


class ScriptedRng:
    """A numpy Generator stand-in with scripted draws: ``random()`` returns ``item_draw``, ``random(n)`` the
    n row or token ``draws``; ``integers(low, high[, n])`` returns ``random_id`` (n of them) after checking
    that (low, high) is ``id_range``."""

    def __init__(self, draws, item_draw=None, random_id=None, id_range=None):
        self.draws, self.item_draw = np.asarray(draws), item_draw
        self.random_id, self.id_range = random_id, id_range

    def random(self, n=None):
        if n is None:
            assert self.item_draw is not None, "an item draw the test did not script"
            return self.item_draw
        assert n == len(self.draws)
        return self.draws

    def integers(self, low, high, n=None):
        assert self.id_range is not None and (low, high) == self.id_range
        return self.random_id if n is None else np.full(n, self.random_id)


def test_token_augmentation_shares_are_the_published_ones(tokenizer):
    """A touched word (draw u < 0.2) is masked for u/0.2 < 0.5, replaced by random ids for
    u/0.2 < 0.6, deleted otherwise (published process_caption); untouched words are kept.
    A scripted rng sets the draws and the random id."""
    text = data.CaptionEncoder(tokenizer)
    words = list(WORDS[:7])
    pieces = [tokenizer.convert_tokens_to_ids(w) for w in words]
    draws = [0.0, 0.099, 0.101, 0.119, 0.121, 0.199, 0.2]  # mask, mask, random, random, delete, delete, keep
    rng = ScriptedRng(draws, random_id=7, id_range=(0, tokenizer.vocab_size))
    ids = text(" ".join(words), rng, 0.2).tolist()
    mask = tokenizer.mask_token_id
    assert ids == [tokenizer.cls_token_id, mask, mask, 7, 7, pieces[6], tokenizer.sep_token_id]


def test_caption_ids_ignore_the_padding_and_truncation_a_tokenizer_keeps(tmp_path, tokenizer):
    """A transformers tokenizer keeps padding/truncation from its last call with them (and saves it into
    tokenizer.json); the caption encoder's ids are those of a plain call, before and after, and on reload."""
    long_caption = " ".join(WORDS * 2)
    expected = [tokenizer(c)["input_ids"] for c in ("a red dog", long_caption)]
    before = data.CaptionEncoder(tokenizer)
    tokenizer(["a red dog", "a"], padding="max_length", max_length=10, truncation=True)
    assert tokenizer.backend_tokenizer.padding is not None and tokenizer.backend_tokenizer.truncation is not None
    tokenizer.save_pretrained(str(tmp_path / "saved"))
    reloaded = data.load_tokenizer(text_model_dir=str(tmp_path / "saved"))
    for text in (before, data.CaptionEncoder(tokenizer), data.CaptionEncoder(reloaded)):
        assert [text(c).tolist() for c in ("a red dog", long_caption)] == expected


def test_grid_feature_drop_follows_the_published_grid_scheme(tmp_path, tokenizer):
    """Scheme "grid" (published EncoderImageFull): the item draws u; u <= 0.2 keeps every row, else a
    row is dropped when its draw is <= 0.2 * u. Scripted draws, then the statistics over many items:
    20% of items whole, a row dropped with probability 0.8 * 0.2 * E[u | u > 0.2] = 0.096."""
    folder = str(tmp_path)
    _write_split(folder, n=400, k=30, d=2, caps=1, lens=False, ids=False)
    split_data = data._SplitData(folder, "train")

    rows = np.array(split_data.features[0])
    draws = np.linspace(0.0, 1.0, 30)
    kept = split_data.item_features(0, ScriptedRng(draws, item_draw=0.5), 0.2, "grid")
    torch.testing.assert_close(kept, torch.from_numpy(rows[draws > 0.1]))
    whole = split_data.item_features(0, ScriptedRng(draws, item_draw=0.2), 0.2, "grid")
    torch.testing.assert_close(whole, torch.from_numpy(rows))
    with pytest.raises(ValueError, match="scheme"):
        split_data.item_features(0, ScriptedRng(draws, item_draw=0.5), 0.2, "cells")

    dataset = data.PrecomputedDataset(folder, "train", tokenizer, train=True, feature_drop_scheme="grid")
    kept_rows = np.array([dataset[i]["features"].shape[0] for i in range(len(dataset))])
    n_rows = kept_rows.size * 30
    dropped = 1 - kept_rows.sum() / n_rows
    assert abs(dropped - 0.096) < 0.015  # about 4 standard deviations over 400 items
    # whole: u <= 0.2, or no row dropped: 0.2 + integral over (0.2, 1] of (1 - 0.2u)^30 du = 0.245
    assert abs(np.mean(kept_rows == 30) - 0.245) < 0.086  # 4 standard deviations of a 400-item share
    assert data.feature_drop_scheme("backbone") == "grid"
    assert data.feature_drop_scheme("basic") == data.feature_drop_scheme("none") == "row"
    with pytest.raises(ValueError, match="feature_drop_scheme"):
        data.PrecomputedDataset(folder, "train", tokenizer, train=True, feature_drop_scheme="cells")


def test_row_feature_drop_keeps_the_rows_drawn_above_the_probability_else_the_largest_draw(tmp_path):
    """Scheme "row" (published PrecompRegionDataset): a row is kept when its draw > 0.2, so a draw of
    exactly 0.2 drops it; when every row is dropped, the row with the largest draw stays (not another)."""
    folder = str(tmp_path)
    feats, _, _ = _write_split(folder, n=2, k=4, d=3, caps=1, lens=False, ids=False)
    split_data = data._SplitData(folder, "train")

    kept = split_data.item_features(1, ScriptedRng([0.2, 0.3, 0.1, 0.21]), 0.2, "row")
    torch.testing.assert_close(kept, torch.from_numpy(feats[1, [1, 3]]))
    kept = split_data.item_features(1, ScriptedRng([0.05, 0.15, 0.01, 0.10]), 0.2, "row")  # all dropped
    torch.testing.assert_close(kept, torch.from_numpy(feats[1, 1:2]))


def test_feature_drop_keeps_at_least_one_region(split, tokenizer):
    folder = split[0]
    dataset = data.PrecomputedDataset(folder, "train", tokenizer, train=True, feature_drop=0.99)
    assert all(dataset[i]["features"].shape[0] >= 1 for i in range(30))
    assert not any(torch.isnan(dataset[i]["features"]).any() for i in range(30))


def test_max_caption_tokens_keeps_the_end_token(split, tokenizer):
    folder = split[0]
    dataset = data.CaptionDataset(folder, "train", tokenizer, max_caption_tokens=3)
    tokens = dataset[0]["tokens"]
    assert len(tokens) == 3 and tokens[0] == tokenizer.cls_token_id and tokens[-1] == tokenizer.sep_token_id
    with pytest.raises(ValueError, match="max_caption_tokens"):
        data.CaptionDataset(folder, "train", tokenizer, max_caption_tokens=1)


@pytest.mark.parametrize("dataset", ["eval", "train"])
def test_caption_longer_than_the_positions_names_its_line(split, tokenizer, dataset, monkeypatch):
    folder, _, _, captions = split
    captions = list(captions)
    captions[7] = " ".join(["red"] * 20)  # 22 tokens with [CLS] and [SEP]
    with open(os.path.join(folder, "train_caps.txt"), "w") as f:
        f.write("\n".join(captions) + "\n")
    if dataset == "eval":
        make = lambda limit: data.CaptionDataset(folder, "train", tokenizer, position_limit=limit)  # noqa: E731
    else:
        make = lambda limit: data.PrecomputedDataset(folder, "train", tokenizer, train=True,  # noqa: E731
                                                     position_limit=limit)
    assert len(make(22)[7]["tokens"]) <= 22  # exactly at the limit fits
    with pytest.raises(DataError, match=r"train_caps\.txt:8: caption has 22 tokens .* 21 positions"):
        make(21)  # on construction, before any training step
    with pytest.raises(ValueError, match="position_limit"):
        make(1)
    with monkeypatch.context() as patch:  # the check when loaded stays, and names the line too
        patch.setattr(data._SplitData, "check_captions", lambda self, text: None)
        too_short = make(21)
        too_short[6]
        with pytest.raises(DataError, match=r"train_caps\.txt:8: caption has 22 tokens .* 21 positions"):
            too_short[7]


@pytest.mark.parametrize("dataset", ["train", "eval"])
@pytest.mark.parametrize("caption", ["\ufffd\ufffd", "\ue000 \U000f0000", "\u0301\u0302"],
                         ids=["replacement", "private-use", "accents"])
def test_a_caption_bert_keeps_nothing_of_names_its_line(split, tokenizer, dataset, caption, monkeypatch):
    """Not blank, yet BERT's cleaning drops every character (U+FFFD, private use; the uncased tokenizer
    strips accents): it was encoded as [CLS] [SEP] alone, silently. Named on construction (it was
    found only when loaded: mid-epoch), and when loaded."""
    folder, _, _, captions = split
    captions = list(captions)
    captions[4] = caption
    with open(os.path.join(folder, "train_caps.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(captions) + "\n")
    make = lambda: (data.CaptionDataset(folder, "train", tokenizer) if dataset == "eval"  # noqa: E731
                    else data.PrecomputedDataset(folder, "train", tokenizer, train=True))
    with pytest.raises(DataError, match=r"train_caps\.txt:5: the tokenizer keeps none of the characters"):
        make()
    monkeypatch.setattr(data._SplitData, "check_captions", lambda self, text: None)
    made = make()
    made[3]
    with pytest.raises(DataError, match=r"train_caps\.txt:5: the tokenizer keeps none of the characters"):
        made[4]


def test_vocabulary_captions_are_checked_against_the_positions_too():
    """position_limit binds the BiGRU vocabulary path as it does BERT's, augmentation or not."""
    vocab = data.Vocabulary.build(["a red dog"], threshold=1)
    caption = "a red dog a red"  # 7 tokens with <start> and <end>
    assert len(data.CaptionEncoder(vocab, position_limit=7)(caption)) == 7
    too_short = data.CaptionEncoder(vocab, position_limit=6)
    for rng in (None, np.random.default_rng(0)):
        with pytest.raises(data.CaptionTooLongError, match="caption has 7 tokens .* 6 positions"):
            too_short(caption, rng, 0.2)
    assert len(data.CaptionEncoder(vocab, max_tokens=6, position_limit=6)(caption)) == 6


def test_max_caption_tokens_within_the_positions_is_accepted(split, tokenizer):
    folder = split[0]
    dataset = data.CaptionDataset(folder, "train", tokenizer, max_caption_tokens=4, position_limit=4)
    assert all(len(dataset[i]["tokens"]) <= 4 for i in range(30))  # explicit truncation, not an error


def test_dataset_argument_errors(split, tokenizer):
    folder = split[0]
    with pytest.raises(ValueError, match="feature_drop"):
        data.PrecomputedDataset(folder, "train", tokenizer, train=True, feature_drop=1.0)
    with pytest.raises(ValueError, match="seed"):
        data.PrecomputedDataset(folder, "train", tokenizer, train=True, seed=-1)
    with pytest.raises(TypeError, match="Vocabulary or a transformers BERT tokenizer"):
        data.PrecomputedDataset(folder, "train", object(), train=False)


def test_collate_pads_and_reports_lengths(split, tokenizer):
    folder = split[0]
    pairs = data.PrecomputedDataset(folder, "train", tokenizer, train=True)
    items = [pairs[i] for i in (0, 6, 13, 29)]
    batch = data.collate(items)
    kmax = max(it["features"].shape[0] for it in items)
    tmax = max(len(it["tokens"]) for it in items)
    assert batch["images"].shape == (4, kmax, 4) and batch["images"].dtype == torch.float32
    assert batch["captions"].shape == (4, tmax) and batch["captions"].dtype == torch.int64
    for b, it in enumerate(items):
        k, t = it["features"].shape[0], len(it["tokens"])
        assert batch["img_lengths"][b] == k and batch["cap_lengths"][b] == t
        assert torch.equal(batch["images"][b, :k], it["features"]) and not batch["images"][b, k:].any()
        assert torch.equal(batch["captions"][b, :t], it["tokens"]) and not batch["captions"][b, t:].any()
    assert batch["img_index"].tolist() == [0, 1, 2, 5] and batch["cap_index"].tolist() == [0, 6, 13, 29]
    assert all(batch[key].dtype == torch.int64 for key in ("img_lengths", "cap_lengths", "img_index", "cap_index"))
    images = data.collate_images([data.ImageSetDataset(folder, "train")[i] for i in range(3)])
    assert set(images) == {"images", "img_lengths", "index"}
    texts = data.collate_captions([data.CaptionDataset(folder, "train", tokenizer)[i] for i in range(3)])
    assert set(texts) == {"captions", "cap_lengths", "index"}
    with pytest.raises(ValueError, match="empty"):
        data.collate([])


def test_dataloader_workers_see_the_same_items(split, tokenizer):
    folder = split[0]
    dataset = data.PrecomputedDataset(folder, "train", tokenizer, train=True, seed=5)
    dataset.set_epoch(2)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=2, collate_fn=data.collate)
    in_process = [data.collate([dataset[i] for i in range(s, min(s + 8, 30))]) for s in range(0, 30, 8)]
    for got, expected in zip(loader, in_process):
        for key in expected:
            assert torch.equal(got[key], expected[key]), key


# ----------------------------------------------------------------------------------------------
# Tokenizers and the word vocabulary
# ----------------------------------------------------------------------------------------------


def test_load_tokenizer_from_vocab_and_directory(tmp_path, tokenizer):
    assert tokenizer.vocab_size == len(VOCAB) and tokenizer.mask_token_id == 4
    tokenizer.save_pretrained(str(tmp_path / "bert"))
    again = data.load_tokenizer(text_model_dir=str(tmp_path / "bert"))
    assert again("a red dog")["input_ids"] == tokenizer("a red dog")["input_ids"]
    with pytest.raises(ValueError, match="exactly one"):
        data.load_tokenizer()
    with pytest.raises(DataError, match="does not exist"):
        data.load_tokenizer(vocab_file=str(tmp_path / "missing.txt"))
    (tmp_path / "bad.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match=r"\[PAD\]"):
        data.load_tokenizer(vocab_file=str(tmp_path / "bad.txt"))


def test_tokenizer_files_that_cannot_be_read_are_named(tmp_path, tokenizer):
    bom = tmp_path / "bom.txt"  # a Windows editor's byte-order mark before [PAD]
    bom.write_bytes(b"\xef\xbb\xbf" + "\n".join(VOCAB).encode() + b"\n")
    if data.tokenizer_reads_vocab_file():  # transformers 4
        with pytest.raises(DataError, match=re.escape(f"{bom}:1: a byte-order mark (U+FEFF) opens the file")):
            data.load_tokenizer(vocab_file=str(bom))  # its tokenizer reads the file itself, mark included
    else:
        assert data.load_tokenizer(vocab_file=str(bom))("a red dog")["input_ids"] == tokenizer("a red dog")["input_ids"]
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("\n".join(VOCAB + ["caf\u00e9"]).encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=re.escape(f"{latin1}:{len(VOCAB) + 1}: not valid UTF-8")):
        data.load_tokenizer(vocab_file=str(latin1))
    folder = tmp_path / "bert"
    tokenizer.save_pretrained(str(folder))
    with open(folder / "tokenizer.json", "r+b") as f:  # a partial download
        f.truncate(20)
    with pytest.raises(DataError, match=re.escape(f"{folder}: unreadable tokenizer files")):
        data.load_tokenizer(text_model_dir=str(folder))
    repeated = tmp_path / "repeated.txt"  # the tokenizer kept the last line: ids past its vocabulary size
    words = [v for v in VOCAB if v != "[MASK]"]
    repeated.write_text("\n".join(words[:6] + [words[5]] + words[6:] + ["[MASK]"]) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{repeated}:7: the token {words[5]!r} repeats line 6")):
        data.load_tokenizer(vocab_file=str(repeated))


def test_a_bert_directory_whose_vocabulary_lacks_mask_is_named(tmp_path):
    """transformers appends a special token absent from vocab.txt past the vocabulary (an id with no
    embedding row); masking would then write that id."""
    folder = tmp_path / "bert_nomask"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(v for v in VOCAB if v != "[MASK]") + "\n")
    with pytest.raises(DataError, match=re.escape(f"{folder}: the tokenizer's vocabulary lacks the special "
                                                  "token(s) [MASK]")):
        data.load_tokenizer(text_model_dir=str(folder))
    from transformers import BertTokenizerFast

    added = BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    assert added.mask_token_id >= added.vocab_size  # what the check guards against
    with pytest.raises(ValueError, match=r"\[MASK\] tokens in its vocabulary"):
        data.CaptionEncoder(added)


def test_a_vocabulary_whose_pad_is_not_id_0_is_an_error(tmp_path):
    """Captions are padded with id 0 and BERT's attention leaves id 0 out: with [PAD] elsewhere, the word
    on the first line ("a red dog" -> [CLS] 0 ...) was hidden from BERT as padding."""
    words = [v for v in VOCAB if v != "[PAD]"]
    moved = tmp_path / "vocab.txt"
    moved.write_text("\n".join(words[5:6] + words[:5] + ["[PAD]"] + words[6:]) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{moved}: [PAD] has id 6, not 0")):
        data.load_tokenizer(vocab_file=str(moved))
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}: [PAD] has id 6, not 0")):
        data.load_tokenizer(text_model_dir=str(tmp_path))


def test_a_bert_directory_without_a_tokenizer_is_named(tmp_path, tokenizer):
    """transformers builds a tokenizer of the special tokens alone from a directory holding only the
    model (config.json and weights): every caption word would become [UNK]."""
    import transformers

    folder = tmp_path / "bert_weights_only"
    transformers.BertModel(transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=8, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=8)).save_pretrained(folder)
    with pytest.raises(DataError, match="no tokenizer in the BERT directory"):
        data.load_tokenizer(text_model_dir=str(folder))
    tokenizer.save_pretrained(str(folder))
    assert data.load_tokenizer(text_model_dir=str(folder))("a red dog")["input_ids"] == \
        tokenizer("a red dog")["input_ids"]


def test_vocabulary_build_encode_roundtrip(tmp_path):
    vocab = data.Vocabulary.build(["A dog runs.", "a dog sits", "the dog"], threshold=2)
    assert list(vocab.word2idx)[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert "dog" in vocab.word2idx and "a" in vocab.word2idx and "runs" not in vocab.word2idx
    assert list(vocab.word2idx)[-1] == "<mask>"
    unk = vocab("<unk>")
    assert vocab.encode("A dog flies") == [vocab("<start>"), vocab("a"), vocab("dog"), unk, vocab("<end>")]
    vocab.save(str(tmp_path / "vocab.json"))
    loaded = data.Vocabulary.load(str(tmp_path / "vocab.json"))
    assert loaded.word2idx == vocab.word2idx and len(loaded) == len(vocab)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(DataError, match="broken.json"):
        data.Vocabulary.load(str(tmp_path / "broken.json"))


def test_a_vocabulary_from_another_tokenizer_is_warned_about(tmp_path):
    """Saved vocabularies name their tokenizer; one without the name (published SCAN files, older
    vse_fast runs) is checked for contractions nltk splits, which would silently become <unk>."""
    import json
    import warnings

    vocab = data.Vocabulary.build(["a man's dog doesn't run"], threshold=1)
    assert "'s" in vocab.word2idx and "n't" in vocab.word2idx
    vocab.save(str(tmp_path / "vocab.json"))
    saved = json.loads((tmp_path / "vocab.json").read_text())
    assert saved["tokenizer"] == data.Vocabulary.TOKENIZER
    published = {k: saved[k] for k in ("word2idx", "idx2word", "idx")}  # the published format, nltk words
    (tmp_path / "published.json").write_text(json.dumps(published))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.Vocabulary.load(str(tmp_path / "vocab.json"))
        data.Vocabulary.load(str(tmp_path / "published.json"))
    regex_words = dict(published["word2idx"], **{"man's": len(vocab), "doesn't": len(vocab) + 1})
    (tmp_path / "regex.json").write_text(json.dumps({"word2idx": regex_words}))
    with pytest.warns(UserWarning, match=r"regex.json: 2 vocabulary words .*\"man's\" -> \['man', \"'s\"\]"):
        old = data.Vocabulary.load(str(tmp_path / "regex.json"))
    assert old.encode("a man's dog")[2:4] == [old("man"), old("'s")]  # never the whole "man's"
    (tmp_path / "other.json").write_text(json.dumps(dict(published, tokenizer="str.split")))
    with pytest.warns(UserWarning, match="tokenizer 'str.split'"):
        data.Vocabulary.load(str(tmp_path / "other.json"))


def test_vocabulary_load_requires_the_special_words(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text('{"word2idx": {"<unk>": 0, "dog": 1, "<pad>": 2}, "idx2word": {}, "idx": 3}')
    with pytest.raises(DataError, match=re.escape(f"{path}: vocabulary lacks the special words ['<start>', '<end>']")):
        data.Vocabulary.load(str(path))
    path.write_text('{"word2idx": {"<unk>": 0, "dog": 2}, "idx2word": {}, "idx": 2}')
    with pytest.raises(DataError, match=r"word indices must be 0\.\.1"):
        data.Vocabulary.load(str(path))


@pytest.mark.parametrize("text, message", [
    ('[["<pad>", 0]]', r'holds an object with "word2idx" .*; a list at the top'),
    ('{"words": {}}', r"no such key \(keys: \['words'\]\)"),
    ('{"word2idx": ["<pad>"]}', "word2idx is a list"),
    ('{"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "dog": 4.7}}',
     r"word indices must be integers, got \[\('dog', 4\.7\)\]"),
    ('{"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "dog": true}}', "must be integers"),
    ('{"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "dog": "4"}}', "must be integers"),
    ('{"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "dog": 4, "dog": 5}}',
     "the key 'dog' appears twice in one object"),
    ('{"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "dog": 4}, '
     '"idx2word": {"0": "<pad>", "1": "<start>", "2": "<end>", "3": "<unk>", "4": "cat"}}',
     r"idx2word disagrees with word2idx \(index 4: 'cat' against 'dog'\)"),
    ('{"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "dog": 4}, "idx": 11353}',
     "idx is 11353 but word2idx holds 5 words"),
], ids=["list", "no-word2idx", "word2idx-list", "float-id", "bool-id", "str-id", "repeated-word", "idx2word",
        "idx"])
def test_vocabulary_load_names_what_is_wrong_with_the_file(tmp_path, text, message):
    """Each would otherwise load as something else: 4.7 truncated to 4, the first of two ids dropped,
    or ids that the file's own idx2word/idx (which the published Vocabulary uses) contradict."""
    path = tmp_path / "vocab.json"
    path.write_text(text)
    with pytest.raises(DataError, match=re.escape(str(path)) + ": .*" + message):
        data.Vocabulary.load(str(path))
    path.write_text('{"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "dog": 4}, '
                    '"idx2word": {"0": "<pad>", "1": "<start>", "2": "<end>", "3": "<unk>", "4": "dog"}, "idx": 5}')
    assert len(data.Vocabulary.load(str(path))) == 6  # the published layout, '<mask>' appended


def test_vocabulary_words_are_nltk_word_tokenize_of_the_lowercased_caption():
    """As the published BiGRU pipeline (nltk.word_tokenize(caption.lower())): clitics split off,
    decimals kept, double quotes as `` and '', a sentence-final period split off."""
    assert data.Vocabulary.tokenize('A man\'s hat, don\'t. He said "3.5 km" (ok).') == [
        "a", "man", "'s", "hat", ",", "do", "n't", ".", "he", "said", "``", "3.5", "km", "''", "(", "ok", ")", "."]


def test_vocabulary_augmentation_touches_start_and_end_as_published(split):
    """The published BiGRU process_caption draws over [<start>, words..., <end>]: every token, the
    start and end included, is masked / replaced / deleted with the BERT shares. A scripted rng sets
    the draws; a caption whose every token is deleted keeps the one with the largest draw."""
    folder, _, _, captions = split
    vocab = data.Vocabulary.build(captions, threshold=1)
    text = data.CaptionEncoder(vocab)
    words = data.Vocabulary.tokenize(captions[0])[:4]
    caption = " ".join(words)
    start, end, mask = vocab("<start>"), vocab("<end>"), vocab("<mask>")
    ids = [vocab(w) for w in words]
    random_id_5 = dict(random_id=5, id_range=(0, len(vocab)))
    # <start> masked, word 0 kept, word 1 random, word 2 deleted, word 3 kept, <end> deleted
    got = text(caption, ScriptedRng([0.05, 0.5, 0.11, 0.15, 0.2, 0.19], **random_id_5), 0.2).tolist()
    assert got == [mask, ids[0], 5, ids[3]]
    # every token deleted: the largest draw (word 1) stays
    got = text(caption, ScriptedRng([0.13, 0.14, 0.19, 0.15, 0.16, 0.17], **random_id_5), 0.2).tolist()
    assert got == [ids[1]]
    assert text(caption).tolist() == [start, *ids, end] == vocab.encode(caption)
    assert data.CaptionEncoder(vocab, max_tokens=3)(caption).tolist() == [start, ids[0], end]
    bare = data.CaptionEncoder(data.Vocabulary())
    with pytest.raises(ValueError, match="<mask>"):
        bare(caption, np.random.default_rng(0), 0.2)

    plain = data.CaptionDataset(folder, "train", vocab)
    assert plain[3]["tokens"].tolist() == vocab.encode(captions[3])
    train = data.PrecomputedDataset(folder, "train", vocab, train=True, token_aug=0.5)
    firsts = [train[i]["tokens"].tolist()[0] for i in range(len(train))]
    assert start in firsts and any(first != start for first in firsts)


def test_the_construction_check_tokenizes_only_captions_that_can_fail(tokenizer, monkeypatch):
    """BERT keeps every letter or digit, and a token takes at least one character of the lowercased,
    NFD-normalized caption: only captions without a letter or digit, or longer than the positions
    after normalization, are tokenized, in one batch (fast tokenizer), and only those found empty or
    too long go through the caption encoder."""
    text = data.CaptionEncoder(tokenizer, position_limit=24)

    class RecordingBackend:
        def __init__(self, backend):
            self.backend, self.batches = backend, []

        def encode_batch(self, texts, **kw):
            self.batches.append(list(texts))
            return self.backend.encode_batch(texts, **kw)

        def __getattr__(self, name):
            return getattr(self.backend, name)

    text.backend = RecordingBackend(text.backend)
    called = []
    real = data.CaptionEncoder.__call__
    monkeypatch.setattr(data.CaptionEncoder, "__call__", lambda self, c, *a, **k: called.append(c) or real(self, c, *a, **k))
    long_ascii = "a red dog on a red dog on a"  # 27 characters: 29 > 24 positions possible, 12 tokens
    hangul = "\ud55c\uad6d\uc5b4" * 3  # 9 syllables, 24 jamo after NFD: 26 > 24 possible
    captions = ["a red dog", "\u00e9\u00e8", long_ascii, "\u4e00\u4e2a", "\ue000", hangul, "2"]
    found = text.first_unusable(captions)
    assert text.backend.batches == [[long_ascii, "\ue000", hangul]] and called == ["\ue000"]
    assert found[0] == 4 and isinstance(found[1], data.EmptyCaptionError)
    too_long = data.CaptionEncoder(tokenizer, position_limit=4).first_unusable(["a red dog"])
    assert too_long[0] == 0 and isinstance(too_long[1], data.CaptionTooLongError)
    assert data.CaptionEncoder(tokenizer, position_limit=5).first_unusable(["a red dog"]) is None  # exactly fits
    # "a,a,a,a": 7 characters, 7 tokens, 9 with [CLS] and [SEP]: the quick filter counts those two as well
    # (else it was skipped, passed the construction check and failed mid-epoch)
    short = data.CaptionEncoder(tokenizer, position_limit=8).first_unusable(["a dog", "a,a,a,a"])
    assert short[0] == 1 and isinstance(short[1], data.CaptionTooLongError)
    vocab = data.Vocabulary.build(["a red dog"], threshold=1)
    assert data.CaptionEncoder(vocab).first_unusable(["\ue000", "a"]) is None  # the BiGRU vocabulary: <unk>
    assert data.CaptionEncoder(vocab, position_limit=4).first_unusable(["a", "a red dog"])[0] == 1


@pytest.mark.parametrize("with_added_token", [False, True], ids=["vocab", "added-token"])
def test_special_token_text_in_a_caption_is_plain_words_as_published(tmp_path, tokenizer, with_added_token):
    """The published loader runs BERT's basic tokenizer and WordPiece on the vocabulary: "[MASK]" in a
    caption is the words "[", "mask", "]" (here [UNK] each). The fast tokenizer matched its special
    and added tokens in the text: a real mask id, or a padding id (0) that BERT's attention mask drops."""
    if with_added_token:
        tokenizer.add_tokens(["zebra dog"])
    text = data.CaptionEncoder(tokenizer)
    ids = {t: i for i, t in enumerate(VOCAB)}
    unk = ids["[UNK]"]
    assert text.words("a [MASK] dog [PAD]") == [[ids["a"]], [unk], [unk], [unk], [ids["dog"]], [unk], [unk], [unk]]
    assert text("zebra dog [SEP]").tolist() == [ids["[CLS]"], unk, ids["dog"], unk, unk, unk, ids["[SEP]"]]


def test_a_lens_file_beside_2d_features_says_why_it_does_not_fit(tmp_path):
    """(N, D) features are one row per item: a lens file left from an (N, K, D) layout is named as such."""
    folder = str(tmp_path)
    feats, _, _ = _write_split(folder, n=4, k=3, caps=1, lens=True, ids=False)
    np.save(os.path.join(folder, "train_ims.npy"), np.nan_to_num(feats[:, 0]))  # (N, D)
    np.save(os.path.join(folder, "train_lens.npy"), np.array([3, 1, 2, 1]))
    with pytest.raises(DataError, match=r"outside 1\.\.1 \(2 bad entries\): .*train_ims\.npy holds one row per item "
                                        r"\(2-D, or K = 1\), so every length is 1; remove this file"):
        data.check_split(folder, "train")


def test_a_training_item_with_nan_in_its_valid_rows_is_named_when_read(split):
    """Training splits are not scanned before training (check_finite_features is for the evaluated
    splits): a NaN stopped the run at the next logged step, naming neither the file nor the item."""
    folder, feats, lens, _ = split
    feats = feats.copy()
    feats[3, lens[3] - 1, 0] = np.nan
    np.save(os.path.join(folder, "train_ims.npy"), feats)
    images = data.ImageSetDataset(folder, "train")
    images[2]  # NaN padding (the fixture's) is never read
    with pytest.raises(DataError, match=r"train_ims\.npy: item 3 holds NaN or inf in its valid rows"):
        images[3]


def test_float64_features_beyond_the_float32_range_are_named(tmp_path):
    """The model takes float32: 1e300 became inf silently (a numpy overflow warning, then an error
    blaming non-finite features in a file that has none)."""
    folder = str(tmp_path)
    feats, lens, _ = _write_split(folder, n=4, k=3, caps=1, lens=True, ids=False)
    big = np.nan_to_num(feats).astype(np.float64)
    big[2, 0, 1] = 1e300
    np.save(os.path.join(folder, "train_ims.npy"), big)
    with pytest.raises(DataError, match=r"items \[2\] \(1 in all\) hold NaN or inf \(or, float64, values beyond "
                                        r"float32's range\)"):
        data.check_finite_features(folder, "train")
    images = data.ImageSetDataset(folder, "train")
    assert images[1]["features"].dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy overflow warning on the way
        with pytest.raises(DataError, match=r"train_ims\.npy: item 2 holds values beyond float32's range"):
            images[2]



def test_float64_features_that_round_to_the_float32_maximum_pass_the_finite_check(tmp_path):
    """A float64 value just above float32's largest rounds to it (finite) in the float32 the datasets
    read, yet check_finite_features compared the float64 value and refused the split before training."""
    folder = str(tmp_path)
    feats, _, _ = _write_split(folder, n=4, k=3, caps=1, lens=True, ids=False)
    edge = np.nan_to_num(feats).astype(np.float64)
    top = float(np.finfo(np.float32).max)
    edge[1, 0, 0] = top * (1 + 2**-26)  # a quarter float32 step above the largest: rounds down to it
    edge[2, 0, 1] = -top * (1 + 2**-26)
    np.save(os.path.join(folder, "train_ims.npy"), edge)
    assert edge[1, 0, 0] > top
    data.check_finite_features(folder, "train")
    images = data.ImageSetDataset(folder, "train")
    assert images[1]["features"][0, 0].item() == top and images[2]["features"][0, 1].item() == -top
    edge[3, 0, 2] = top * (1 + 2**-23)  # a whole float32 step above: inf as float32
    np.save(os.path.join(folder, "train_ims.npy"), edge)
    with pytest.raises(DataError, match=r"items \[3\] \(1 in all\) hold NaN or inf \(or, float64, values beyond "
                                        r"float32's range\)"):
        data.check_finite_features(folder, "train", chunk_items=2)

def test_a_wordpiece_vocab_given_as_the_bigru_vocabulary_is_named(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n")
    with pytest.raises(DataError, match=r"unreadable vocabulary json .*looks like a BERT WordPiece vocab\.txt"):
        data.Vocabulary.load(str(path))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match=r"unreadable vocabulary json") as err:
        data.Vocabulary.load(str(tmp_path / "bad.json"))
    assert "WordPiece" not in str(err.value)


def test_a_cased_wordpiece_vocabulary_keeps_the_case(tmp_path):
    """A bert-base-cased vocab.txt given as --vocab_file was lowercased as an uncased one: "A Dog" became
    "a [UNK]". An uncased vocabulary (no capital letters) still lowercases, as bert-base-uncased does."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    cased, uncased = tmp_path / "cased.txt", tmp_path / "uncased.txt"
    cased.write_text("\n".join(specials + ["A", "a", "Dog", "dog", "runs", "."]) + "\n")
    uncased.write_text("\n".join(specials + ["a", "dog", "runs", "."]) + "\n")
    tok = data.load_tokenizer(vocab_file=str(cased))
    assert data.CaptionEncoder(tok)("A Dog runs.").tolist() == [2, 5, 7, 9, 10, 3]
    assert data.CaptionEncoder(tok)("a dog runs.").tolist() == [2, 6, 8, 9, 10, 3]
    tok = data.load_tokenizer(vocab_file=str(uncased))
    assert data.CaptionEncoder(tok)("A Dog runs.").tolist() == [2, 5, 6, 7, 8, 3]


def test_check_same_bert_vocab_compares_a_directory_tokenizer_with_a_vocab_file(tmp_path):
    """The vocab file is the tokenizer when both are given: another vocabulary in the directory is an
    error; a directory without a readable tokenizer (config only, or files this transformers cannot
    read) leaves the vocab file to stand alone, as before the check existed."""
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    same, other, config_only, unreadable = (tmp_path / name for name in ("same", "other", "config", "unreadable"))
    for folder in (same, other, config_only, unreadable):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    (same / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (other / "vocab.txt").write_text("\n".join(VOCAB[:7] + VOCAB[7:][::-1]) + "\n")
    (unreadable / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    for folder in (same, config_only, unreadable):
        data.check_same_bert_vocab(str(folder), str(vocab))
    with pytest.raises(DataError, match=re.escape(f"the BERT directory {other} and the vocabulary {vocab} hold "
                                                  "different vocabularies")):
        data.check_same_bert_vocab(str(other), str(vocab))
