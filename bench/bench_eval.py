"""COCO-5K-sized evaluation: 5000 images x 25000 captions, 1024-dim embeddings.

Ours next to the published metric functions (tests/published/evaluation.py, argsort per query):

* group eval-5k-sims: i2t + t2i on the same (5000, 25000) float64 similarity matrix (the published
  pipeline keeps float64 embeddings), ours = the vectorised drop-ins;
* group eval-5k-embeddings: from embeddings, published = compute_sim + i2t + t2i, ours =
  retrieval_metrics (blocked, never the full matrix) in float64 and in float32.

Every run asserts that ours returns the published numbers (float64; float32 only approximately:
rounding moves near-ties). Run: pytest bench/bench_eval.py --benchmark-only
Sizes: VSE_BENCH_EVAL_N (images, default 5000), VSE_BENCH_EVAL_DIM (default 1024).
"""
import os

import numpy as np
import pytest
import torch

from tests.published import evaluation as published
from vse_fast import evaluation

N_IMAGES = int(os.environ.get("VSE_BENCH_EVAL_N", 5000))
DIM = int(os.environ.get("VSE_BENCH_EVAL_DIM", 1024))
CAPS = 5
_PUBLISHED_NUMBERS = {}  # filled by the first published run, reused to check ours


@pytest.fixture(scope="module")
def embeddings():
    gen = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(N_IMAGES, DIM, generator=gen, dtype=torch.float64), dim=1)
    noise = torch.randn(N_IMAGES * CAPS, DIM, generator=gen, dtype=torch.float64)
    cap = torch.nn.functional.normalize(img.repeat_interleave(CAPS, 0) + 1.6 * noise / DIM**0.5, dim=1)
    return img, cap


@pytest.fixture(scope="module")
def sims(embeddings):
    img, cap = embeddings
    return published.compute_sim(img.numpy(), cap.numpy())  # (N, 5N) float64, as published


def _published_eval(sims):
    return published.i2t(N_IMAGES, sims) + published.t2i(N_IMAGES, sims)


def _reference(sims):
    if "numbers" not in _PUBLISHED_NUMBERS:
        _PUBLISHED_NUMBERS["numbers"] = _published_eval(sims)
    return _PUBLISHED_NUMBERS["numbers"]


def _as_numbers(metrics):
    return tuple(metrics[f"{d}_{m}"] for d in ("i2t", "t2i") for m in ("r1", "r5", "r10", "medr", "meanr"))


def _extra():
    return dict(n_images=N_IMAGES, n_captions=N_IMAGES * CAPS, dim=DIM)


def test_eval_sims_published(run_bench, sims):
    numbers = run_bench(lambda: _published_eval(sims), group="eval-5k-sims", impl="published", rounds=1, **_extra())
    _PUBLISHED_NUMBERS.setdefault("numbers", numbers)


def test_eval_sims_ours(run_bench, sims):
    numbers = run_bench(lambda: evaluation.i2t(N_IMAGES, sims) + evaluation.t2i(N_IMAGES, sims),
                        group="eval-5k-sims", impl="ours", **_extra())
    assert numbers == _reference(sims)


def test_eval_embeddings_published(run_bench, embeddings, sims):
    img, cap = embeddings
    numbers = run_bench(lambda: _published_eval(published.compute_sim(img.numpy(), cap.numpy())),
                        group="eval-5k-embeddings", impl="published", rounds=1, **_extra())
    assert numbers == _reference(sims)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_eval_embeddings_ours(run_bench, embeddings, sims, bench_device, dtype):
    img, cap = (x.to(bench_device, dtype) for x in embeddings)
    metrics = run_bench(lambda: evaluation.retrieval_metrics(img, cap, CAPS, dtype=dtype), group="eval-5k-embeddings",
                        impl=f"ours-{str(dtype).split('.')[-1]}", rounds=3 if bench_device.type == "cpu" else None,
                        **_extra())
    reference = _reference(sims)
    if dtype == torch.float64:
        assert _as_numbers(metrics) == reference
    else:  # float32 rounding can swap near-tied scores: recalls within a few queries, same medr
        np.testing.assert_allclose(_as_numbers(metrics), reference, atol=0.2, rtol=1e-3)
