"""vse_fast.evaluation against the published metric functions (tests/published/evaluation.py)."""
import numpy as np
import pytest
import torch

from tests.conftest import requires_cuda
from tests.published import evaluation as published
from vse_fast import evaluation

DIRECTIONS = ("r1", "r5", "r10", "medr", "meanr")


def _embeddings(n_img, caps, dim=24, noise=1.2, dtype=torch.float64):
    """Correlated image/caption embeddings: recall is neither 0 nor 100, scores tie-free."""
    img = torch.randn(n_img, dim, dtype=torch.float64)
    cap = img.repeat_interleave(caps, 0) + noise * torch.randn(n_img * caps, dim, dtype=torch.float64)
    return img.to(dtype), cap.to(dtype)


def _published_mode(caps):
    return "coco" if caps == 5 else "single"


def _as_tuple(metrics, direction):
    return tuple(metrics[f"{direction}_{k}"] for k in DIRECTIONS)


# ----------------------------------------------------------------------------------------------
# Drop-ins on a similarity matrix
# ----------------------------------------------------------------------------------------------

DROPIN_CASES = [  # (npts, caps, mode passed to ours, caps_per_item passed to ours)
    pytest.param(50, 5, "coco", None, id="N50-coco"),
    pytest.param(61, 1, "f30k", None, id="N61-one-caption"),
    pytest.param(37, 20, "coco", 20, id="N37-C20-msrvtt"),
    pytest.param(1, 5, "coco", None, id="N1-coco"),
]


@pytest.mark.parametrize("npts,caps,mode,caps_per_item", DROPIN_CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("block_elems", [None, 97], ids=["default-block", "block97"])
def test_dropins_match_published(npts, caps, mode, caps_per_item, dtype, block_elems, monkeypatch):
    if block_elems is not None:  # force many blocks whose sizes do not divide the matrix
        monkeypatch.setattr(evaluation, "_NUMPY_BLOCK_ELEMS", block_elems)
    img, cap = _embeddings(npts, caps)
    sims = published.compute_sim(img.numpy(), cap.numpy()).astype(dtype)
    kw = {} if caps_per_item is None else {"caps_per_item": caps_per_item}
    for ours_fn, ref_fn in ((evaluation.i2t, published.i2t), (evaluation.t2i, published.t2i)):
        ours, (ranks, top1) = ours_fn(npts, sims, True, mode, **kw)
        ref, (ref_ranks, ref_top1) = ref_fn(npts, sims, True, _published_mode(caps), caps=caps)
        assert ours == ref  # identical numbers, not approximately
        np.testing.assert_array_equal(ranks, ref_ranks)
        np.testing.assert_array_equal(top1, ref_top1)
        assert ranks.dtype == np.float64 and top1.dtype == np.float64
        assert ours_fn(npts, sims, mode=mode, **kw) == ref  # return_ranks=False: the 5-tuple only


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint16], ids=["i64", "i32", "u16"])
def test_dropins_take_integer_scores_as_published(dtype):
    """The published functions argsort any numeric array: integer scores (a tie-free permutation here)
    give the same numbers; beyond 2**53 float64 would merge scores, which is named."""
    npts, caps = 7, 5
    sims = np.random.default_rng(0).permutation(npts * npts * caps).reshape(npts, npts * caps).astype(dtype)
    for ours_fn, ref_fn in ((evaluation.i2t, published.i2t), (evaluation.t2i, published.t2i)):
        ours, (ranks, top1) = ours_fn(npts, sims, True)
        ref, (ref_ranks, ref_top1) = ref_fn(npts, sims, True, "coco", caps=caps)
        assert ours == ref
        np.testing.assert_array_equal(ranks, ref_ranks)
        np.testing.assert_array_equal(top1, ref_top1)
    with pytest.raises(ValueError, match=r"beyond 2\*\*53"):
        evaluation.i2t(1, np.array([[2**62, 0, 1, 2, 3]], dtype=np.int64))


@pytest.mark.parametrize("caps", [1, 5, 20])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int64], ids=["f64", "f32", "i64"])
@pytest.mark.parametrize("block_elems", [None, 97], ids=["default-block", "block97"])
def test_dropins_follow_the_published_tie_order(caps, dtype, block_elems, monkeypatch):
    """Scores drawn from a few levels tie everywhere (at the positive, among the positives, at the top
    score): ranks and top1 are the published argsort's, not the count of strictly higher scores."""
    if block_elems is not None:
        monkeypatch.setattr(evaluation, "_NUMPY_BLOCK_ELEMS", block_elems)
    rng = np.random.default_rng(torch.initial_seed())  # the test's seed: VSE_TEST_SEED replays it
    npts = 23
    mode = "coco" if caps == 5 else "other"
    for levels in (1, 2, 4, 50):
        sims = rng.integers(0, levels, size=(npts, caps * npts)).astype(dtype)
        for ours_fn, ref_fn in ((evaluation.i2t, published.i2t), (evaluation.t2i, published.t2i)):
            ours, (ranks, top1) = ours_fn(npts, sims, True, mode, caps_per_item=caps)
            ref, (ref_ranks, ref_top1) = ref_fn(npts, sims, True, mode, caps=caps)
            np.testing.assert_array_equal(ranks, ref_ranks)
            np.testing.assert_array_equal(top1, ref_top1)
            assert ours == ref
            assert ours_fn(npts, sims, False, mode, caps_per_item=caps) == ref  # no top1: fewer argsorts
    sims = np.zeros((3, 15))  # every score ties: the positive does not rank first as a strict count has it
    assert evaluation.i2t(3, sims, True)[1][0].tolist() == published.i2t(3, sims, True)[1][0].tolist() != [0, 0, 0]


def test_only_tied_queries_are_argsorted(monkeypatch):
    """The blocked counts rank every query; np.argsort runs for exactly the queries whose best positive
    ties with another item, or whose top score ties."""
    calls = []
    argsort_rank = evaluation._argsort_rank
    monkeypatch.setattr(evaluation, "_argsort_rank", lambda scores, pos: calls.append(pos) or argsort_rank(scores, pos))
    rng = np.random.default_rng(torch.initial_seed())  # the test's seed: VSE_TEST_SEED replays it
    sims = rng.permutation(8 * 40).reshape(8, 40).astype(np.float64)  # tie-free
    evaluation.i2t(8, sims), evaluation.t2i(8, sims)
    assert calls == []
    sims[3, 0] = sims[3, 15:20].max()  # image 3's best caption ties with caption 0 (image 0's)
    evaluation.i2t(8, sims)
    assert [list(p) for p in calls] == [[15, 16, 17, 18, 19]]
    calls.clear()
    sims[6, 9] = sims[1, 9]  # caption 9's positive image 1 ties with image 6
    evaluation.t2i(8, sims)
    assert calls == [1]
    calls.clear()
    sims[5, 2] = sims.max() + 1  # caption 2's top score, above every other score: images 5 ...
    sims[7, 2] = sims[5, 2]  # ... and 7 (neither its positive)
    assert evaluation.t2i(8, sims, True)[1][1][2] == published.t2i(8, sims, True)[1][1][2]
    assert calls == [0, 1]  # caption 9 still, and caption 2 for its top1
    calls.clear()
    evaluation.t2i(8, sims)
    assert calls == [1]  # without return_ranks no top1 is returned: caption 9 only
    sims[2, 30] = sims[2].max() + 1  # image 2's top score: captions 30 ...
    sims[2, 31] = sims[2, 30]  # ... and 31
    calls.clear()
    assert evaluation.i2t(8, sims, True)[1][1][2] == published.i2t(8, sims, True)[1][1][2]
    assert [list(p) for p in calls] == [[10, 11, 12, 13, 14], [15, 16, 17, 18, 19]]  # image 2 for its top1, image 3
    calls.clear()
    evaluation.i2t(8, sims)
    assert [list(p) for p in calls] == [[15, 16, 17, 18, 19]]


@pytest.mark.parametrize("fn", [evaluation.i2t, evaluation.t2i], ids=["i2t", "t2i"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_dropins_accept_half_precision_tensors(fn, dtype):
    sims = torch.randn(4, 20).to(dtype)
    ours, (ranks, top1) = fn(4, sims, True)
    ref, (ref_ranks, ref_top1) = fn(4, sims.float().numpy(), True)
    assert ours == ref
    np.testing.assert_array_equal(ranks, ref_ranks)
    np.testing.assert_array_equal(top1, ref_top1)


@pytest.mark.parametrize("fn", [evaluation.i2t, evaluation.t2i], ids=["i2t", "t2i"])
def test_dropins_read_a_tensor_that_requires_grad(fn):
    """Similarities computed from model outputs still in the autograd graph are read detached: without
    the detach, Tensor.numpy() raised on a tensor that requires grad."""
    img, cap = torch.randn(4, 8, requires_grad=True), torch.randn(20, 8)
    sims = img @ cap.T
    assert sims.requires_grad
    ours, (ranks, top1) = fn(4, sims, True)
    ref, (ref_ranks, ref_top1) = fn(4, sims.detach().numpy(), True)
    assert ours == ref
    np.testing.assert_array_equal(ranks, ref_ranks)
    np.testing.assert_array_equal(top1, ref_top1)


def test_no_captions_is_named_as_such():
    """Zero captions used to be inferred as caps_per_item=0 and blamed on an argument never passed."""
    for fn in (lambda: evaluation.retrieval_metrics(torch.randn(3, 4), torch.randn(0, 4)),
               lambda: evaluation.coco_5fold(torch.randn(5, 4), torch.randn(0, 4))):
        with pytest.raises(ValueError, match=r"no captions to evaluate \(cap_emb has 0 rows\)"):
            fn()


@pytest.mark.parametrize("fn", [evaluation.i2t, evaluation.t2i], ids=["i2t", "t2i"])
def test_dropins_reject_bad_input(fn):
    sims = np.random.default_rng(0).standard_normal((4, 20))
    with pytest.raises(ValueError, match=r"\(4, 20\).*\(4, 4\) \(1 captions per item\? pass caps_per_item=1"):
        fn(4, sims[:, :4])  # coco mode expects 5 captions per image
    with pytest.raises(ValueError, match=r"pass caps_per_item=5; mode 'coco' means 5, any other mode 1"):
        fn(4, sims, mode="msrvtt")
    with pytest.raises(ValueError, match="npts"):
        fn(0, sims)
    with pytest.raises(TypeError, match="floating-point or integer"):
        fn(4, sims.astype(np.complex128))
    with pytest.raises(TypeError, match="floating-point or integer"):
        fn(4, sims > 0)
    with pytest.raises(ValueError, match="caps_per_item"):
        fn(4, sims, caps_per_item=0)
    with pytest.raises(ValueError, match="caps_per_item must be a positive int, got True"):
        fn(4, sims[:, :4], caps_per_item=True)  # a bool is an int to Python, refused as npts=True is
    for where in [(1, 3), (2, 12)]:  # a negative and a positive entry
        bad = sims.copy()
        bad[where] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            fn(4, bad)


# ----------------------------------------------------------------------------------------------
# From embeddings
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_img,caps,block", [(53, 5, 7), (53, 5, 1024), (29, 1, 4), (11, 20, 3), (1, 5, 2)],
                         ids=["N53-C5-B7", "N53-C5-B1024", "N29-C1-B4", "N11-C20-B3", "N1-C5"])
def test_retrieval_metrics_matches_dropins(n_img, caps, block):
    img, cap = _embeddings(n_img, caps)
    sims = published.compute_sim(img.numpy(), cap.numpy())
    metrics, ranks = evaluation.retrieval_metrics(img, cap, caps, block=block, return_ranks=True)
    ref_i2t, (ref_ranks_i2t, _) = published.i2t(n_img, sims, True, _published_mode(caps), caps=caps)
    ref_t2i, (ref_ranks_t2i, _) = published.t2i(n_img, sims, True, _published_mode(caps), caps=caps)
    assert _as_tuple(metrics, "i2t") == ref_i2t
    assert _as_tuple(metrics, "t2i") == ref_t2i
    np.testing.assert_array_equal(ranks["i2t"], ref_ranks_i2t)
    np.testing.assert_array_equal(ranks["t2i"], ref_ranks_t2i)
    assert metrics["rsum"] == pytest.approx(sum(ref_i2t[:3]) + sum(ref_t2i[:3]), abs=1e-9)
    assert set(metrics) == set(evaluation.METRIC_KEYS)
    assert evaluation.retrieval_metrics(img, cap, block=block) == metrics  # caps_per_item inferred


def _block_product(img, cap, block):
    """The similarity matrix retrieval_metrics scores: img[a:b] @ cap.T, one image block at a time."""
    return torch.cat([img[a:a + block] @ cap.T for a in range(0, img.shape[0], block)]).numpy()


def test_retrieval_metrics_duplicated_image_ties_as_published():
    x = torch.nn.functional.normalize(torch.randn(1, 64), dim=1)
    img = torch.cat([x, x])  # image 1 duplicates image 0
    cap = torch.nn.functional.normalize(torch.randn(2, 64), dim=1)
    _, ranks = evaluation.retrieval_metrics(img, cap, 1, return_ranks=True)
    sims = (img @ cap.T).double().numpy()
    assert (sims[0] == sims[1]).all()  # the duplicate ties: the argsort order puts one caption's image second
    np.testing.assert_array_equal(ranks["t2i"], published.t2i(2, sims, True, "single", caps=1)[1][0])
    np.testing.assert_array_equal(ranks["i2t"], published.i2t(2, sims, True, "single", caps=1)[1][0])
    assert ranks["t2i"].tolist() != [0, 0]  # not both first, as a count of strictly higher scores had it


@pytest.mark.parametrize("block", [40, 7], ids=["one-block", "block7"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_retrieval_metrics_ranks_equal_dropins_with_duplicates(block, dtype):
    """Duplicated images and captions (exact ties): the ranks are the drop-ins' on the same scores."""
    img = torch.nn.functional.normalize(torch.randn(40, 64, dtype=dtype), dim=1)
    img[1::2] = img[0::2]
    cap = torch.nn.functional.normalize(torch.randn(200, 64, dtype=dtype), dim=1)
    cap[5::10] = cap[0::10]  # caption 0 of image 2k+1 repeats caption 0 of image 2k
    sims = _block_product(img, cap, block)
    _, ranks = evaluation.retrieval_metrics(img, cap, 5, block=block, return_ranks=True, dtype=dtype)
    np.testing.assert_array_equal(ranks["i2t"], evaluation.i2t(40, sims, True)[1][0])
    np.testing.assert_array_equal(ranks["t2i"], evaluation.t2i(40, sims, True)[1][0])
    np.testing.assert_array_equal(ranks["i2t"], published.i2t(40, sims, True)[1][0])
    np.testing.assert_array_equal(ranks["t2i"], published.t2i(40, sims, True)[1][0])
    if block >= 40:  # one block is the plain product
        np.testing.assert_array_equal(sims, (img @ cap.T).numpy())


@pytest.mark.parametrize("budget,extra_passes", [(1 << 25, 1), (240, 3), (100, 3)], ids=["default", "240", "100"])
def test_retrieval_metrics_gathers_tied_columns_within_a_memory_budget(monkeypatch, budget, extra_passes):
    """Every image alike (a collapsed image encoder): every caption's column ties. Its ranks are the
    published ones, and the tied columns are gathered in as few extra passes as the budget of
    max(_TIED_COLUMN_ELEMS, block * C*N) scores allows: one by default, not one per block's worth."""
    monkeypatch.setattr(evaluation, "_TIED_COLUMN_ELEMS", budget)
    n_img, caps, block = 12, 5, 4
    img = torch.nn.functional.normalize(torch.randn(1, 16, dtype=torch.float64), dim=1).expand(n_img, 16)
    cap = torch.randn(n_img * caps, 16, dtype=torch.float64)
    sims = _block_product(img, cap, block)
    products = []
    block_sims = evaluation._block_sims
    monkeypatch.setattr(evaluation, "_block_sims", lambda *a: products.append(a[1:]) or block_sims(*a))
    _, ranks = evaluation.retrieval_metrics(img, cap, caps, block=block, return_ranks=True)
    np.testing.assert_array_equal(ranks["t2i"], published.t2i(n_img, sims, True)[1][0])
    np.testing.assert_array_equal(ranks["i2t"], published.i2t(n_img, sims, True)[1][0])
    # 2 passes of 3 blocks, then the 60 tied columns: all at once by default; 240 / 12 = 20 per pass
    # for a budget of 240 scores, and as many for 100 (the block's 4 * 60 scores are the floor)
    assert len(products) == (2 + extra_passes) * 3 and products[:3] == [(0, 4), (4, 8), (8, 12)]


def test_retrieval_metrics_accepts_numpy_and_low_precision():
    img, cap = _embeddings(40, 5, dtype=torch.float32)
    ref = evaluation.retrieval_metrics(img, cap, 5)
    assert evaluation.retrieval_metrics(img.numpy(), cap.numpy(), 5) == ref
    # big-endian (np.load of a file written on such a machine) and negative strides: torch.from_numpy rejects both
    assert evaluation.retrieval_metrics(img.numpy().astype(">f4"), cap.numpy()[::-1].copy()[::-1], 5) == ref
    half_img, half_cap = img.to(torch.bfloat16), cap.to(torch.bfloat16)
    # computed in float64 from the bf16 values
    assert evaluation.retrieval_metrics(half_img, half_cap, 5) == evaluation.retrieval_metrics(
        half_img.float(), half_cap.float(), 5)


def _near_ties():
    """60 float64 images and their 300 captions within ~3e-7 of one direction: their scores are
    near-ties, which float32 and float64 scoring rank differently."""
    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(48, generator=g, dtype=torch.float64), dim=0)
    img = base + 3e-7 * torch.randn(60, 48, generator=g, dtype=torch.float64)
    cap = img.repeat_interleave(5, 0) + 1.5e-7 * torch.randn(300, 48, generator=g, dtype=torch.float64)
    return img, cap


def test_float32_embeddings_are_scored_in_float64_as_published():
    """The published evaluation keeps float32 model outputs in float64 arrays and scores them in
    float64: the default gives its numbers bit for bit; dtype=torch.float32 scores in float32.
    Near-ties (embeddings within ~3e-7 of one direction) make the two precisions rank differently."""
    img, cap = _near_ties()
    img, cap = img.float(), cap.float()
    sims64 = published.compute_sim(img.numpy().astype(np.float64), cap.numpy().astype(np.float64))
    exact = evaluation.retrieval_metrics(img, cap, 5)
    assert _as_tuple(exact, "i2t") == published.i2t(60, sims64)
    assert _as_tuple(exact, "t2i") == published.t2i(60, sims64)
    sims32 = _block_product(img, cap, 1024)
    fast = evaluation.retrieval_metrics(img, cap, 5, dtype=torch.float32)
    assert _as_tuple(fast, "i2t") == evaluation.i2t(60, sims32)
    assert _as_tuple(fast, "t2i") == evaluation.t2i(60, sims32)
    assert _as_tuple(fast, "t2i") != _as_tuple(exact, "t2i")  # the default is float64, not float32 relabelled
    with pytest.raises(ValueError, match="dtype"):
        evaluation.retrieval_metrics(img, cap, 5, dtype=torch.float16)


def test_float64_embeddings_are_scored_in_float64_even_with_dtype_float32():
    """dtype is promoted with the embeddings' dtype, as documented: float64 embeddings are scored in
    float64 whatever dtype says. Without the promotion dtype=torch.float32 rounded them to float32
    and ranked their near-ties differently."""
    img, cap = _near_ties()
    exact = evaluation.retrieval_metrics(img, cap, 5)
    assert evaluation.retrieval_metrics(img, cap, 5, dtype=torch.float32) == exact
    assert evaluation.retrieval_metrics(img.float(), cap.float(), 5, dtype=torch.float32) != exact  # float32 shows


def test_ensemble_averages_similarities():
    n_img, caps = 43, 5
    pairs = [_embeddings(n_img, caps, dim=dim) for dim in (16, 24, 8)]
    sims = published.ensemble_sims([(i.numpy(), c.numpy()) for i, c in pairs])
    metrics = evaluation.retrieval_metrics(pairs, None, caps, block=10)
    assert _as_tuple(metrics, "i2t") == published.i2t(n_img, sims)
    assert _as_tuple(metrics, "t2i") == published.t2i(n_img, sims)
    single = evaluation.retrieval_metrics(*pairs[0], caps)
    assert evaluation.retrieval_metrics([pairs[0]], None, caps) == single


def test_coco_5fold_matches_published():
    n_img, caps = 5 * 23, 5
    img, cap = _embeddings(n_img, caps)
    mean, folds = published.fold5(img.numpy(), cap.numpy(), caps)
    ours = evaluation.coco_5fold(img, cap, caps, block=9)
    assert len(ours["folds"]) == 5
    for f, fold in enumerate(folds):  # per fold: the 10 numbers and rsum (index 12)
        assert _as_tuple(ours["folds"][f], "i2t") + _as_tuple(ours["folds"][f], "t2i") == tuple(fold[:10])
        assert ours["folds"][f]["rsum"] == pytest.approx(fold[12], abs=1e-9)
    for k, key in enumerate(f"{d}_{m}" for d in ("i2t", "t2i") for m in DIRECTIONS):
        assert ours[key] == pytest.approx(mean[k], rel=1e-12)
    assert ours["rsum"] == pytest.approx(mean[12], rel=1e-12)
    ensemble = evaluation.coco_5fold([(img, cap), (img, cap)], None, caps)
    assert ensemble["rsum"] == ours["rsum"]
    # an ensemble of different members: each fold averages every member's similarities (the CLI test
    # compares only an ensemble's 5K "all" entry)
    members = [(img, cap), _embeddings(n_img, caps, dim=16)]
    ensemble = evaluation.coco_5fold(members, None, caps, block=9)
    size = n_img // 5
    for f in range(5):
        fold = [(i[f * size:(f + 1) * size], c[f * size * caps:(f + 1) * size * caps]) for i, c in members]
        assert ensemble["folds"][f] == evaluation.retrieval_metrics(fold, None, caps)
    assert [f["rsum"] for f in ensemble["folds"]] != [f["rsum"] for f in ours["folds"]]  # the members differ


def test_coco_5fold_checks_the_caption_count():
    img, cap = _embeddings(50, 10)  # 10 captions per image (VATEX-like)
    with pytest.raises(ValueError, match=r"expected caps_per_item \* images = 5 \* 50 captions, got 500"):
        evaluation.coco_5fold(img, cap, 5)
    assert evaluation.coco_5fold(img, cap) == evaluation.coco_5fold(img, cap, 10)  # inferred from the counts
    folds = evaluation.coco_5fold(img, cap, 10)["folds"]
    assert folds[2] == evaluation.retrieval_metrics(img[20:30], cap[200:300], 10)
    with pytest.raises(ValueError, match="not a multiple of 50 images"):
        evaluation.coco_5fold(img, cap[:-3])


def test_retrieval_metrics_rejects_bad_input():
    img, cap = _embeddings(6, 5, dtype=torch.float32)
    with pytest.raises(ValueError, match="expected caps_per_item"):
        evaluation.retrieval_metrics(img, cap, 4)
    with pytest.raises(ValueError, match="caps_per_item must be a positive int, got True"):
        evaluation.retrieval_metrics(img, cap[:6], True)
    with pytest.raises(ValueError, match="not a multiple"):
        evaluation.retrieval_metrics(img, cap[:-1])
    with pytest.raises(ValueError, match="dim"):
        evaluation.retrieval_metrics(img, cap[:, :-1], 5)
    with pytest.raises(ValueError, match="2-D"):
        evaluation.retrieval_metrics(img[0], cap, 5)
    with pytest.raises(TypeError, match="floating"):
        evaluation.retrieval_metrics(img.long(), cap, 5)
    with pytest.raises(TypeError, match="cap_emb is required"):
        evaluation.retrieval_metrics(img)
    with pytest.raises(ValueError, match="block"):
        evaluation.retrieval_metrics(img, cap, 5, block=0)
    with pytest.raises(ValueError, match="member 1"):
        evaluation.retrieval_metrics([(img, cap), (img[:5], cap[:25])], None, 5)
    bad = cap.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        evaluation.retrieval_metrics(img, bad, 5)
    with pytest.raises(ValueError, match="folds"):
        evaluation.coco_5fold(img, cap, 5)  # 6 images do not split into 5 folds
    for n_folds in (0, True, 3.0, np.float64(3), np.bool_(True), "3"):
        with pytest.raises(ValueError, match="n_folds must be a positive int"):
            evaluation.coco_5fold(img, cap, 5, n_folds=n_folds)


def test_integer_arguments_take_numpy_integers():
    """npts, caps_per_item, block and n_folds take numpy integers (an np.int64 from shape arithmetic)
    as the ints they equal. n_folds was checked with isinstance(n_folds, int) alone and refused
    np.int64(5) with a "must be a positive int" error that the other three accepted."""
    img, cap = _embeddings(10, 5)
    sims = published.compute_sim(img.numpy(), cap.numpy())
    for fn in (evaluation.i2t, evaluation.t2i):
        assert fn(np.int64(10), sims, caps_per_item=np.int32(5)) == fn(10, sims, caps_per_item=5)
    assert (evaluation.retrieval_metrics(img, cap, np.int64(5), block=np.int64(3))
            == evaluation.retrieval_metrics(img, cap, 5, block=3))
    folded = evaluation.coco_5fold(img, cap, np.int64(5), n_folds=np.int64(5), block=np.uint8(3))
    assert folded == evaluation.coco_5fold(img, cap, 5, n_folds=5, block=3)
    assert len(folded["folds"]) == 5


def test_nan_embeddings_are_named_by_array_and_row():
    """The NaN error names img_emb / cap_emb and the rows (whole-array rows under coco_5fold), and an
    ensemble member only for an ensemble."""
    img, cap = _embeddings(10, 5, dtype=torch.float32)
    bad = cap.clone()
    bad[[33, 47], 1] = float("nan")
    with pytest.raises(ValueError, match=r"^cap_emb rows \[33, 47\] \(2 in all\) contain NaN or inf$"):
        evaluation.retrieval_metrics(img, bad, 5)
    with pytest.raises(ValueError, match=r"^cap_emb rows \[33, 47\] \(2 in all\)"):
        evaluation.coco_5fold(img, bad, 5)
    bad_img = img.clone()
    bad_img[7, 0] = float("inf")
    with pytest.raises(ValueError, match=r"^img_emb of ensemble member 1 rows \[7\] \(1 in all\)"):
        evaluation.retrieval_metrics([(img, cap), (bad_img, cap)], None, 5)


def test_format_table_shows_every_number():
    img, cap = _embeddings(30, 5)
    metrics = evaluation.retrieval_metrics(img, cap, 5)
    table = evaluation.format_table(metrics, title="test")
    assert table.splitlines()[0] == "test"
    for key in evaluation.METRIC_KEYS:
        assert f"{metrics[key]:.1f}" in table
    folded = evaluation.format_table(evaluation.coco_5fold(img, cap, 5))
    assert "mean of 5 folds" in folded
    with pytest.raises(ValueError, match="rsum"):
        evaluation.format_table({k: 0.0 for k in evaluation.METRIC_KEYS if k != "rsum"})


@requires_cuda
def test_retrieval_metrics_on_cuda_matches_cpu():
    img, cap = _embeddings(300, 5)
    cpu = evaluation.retrieval_metrics(img, cap, 5, block=128)
    assert evaluation.retrieval_metrics(img.cuda(), cap.cuda(), 5, block=128) == cpu
