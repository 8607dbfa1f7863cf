"""Re-implementation of the published VSE-infinity retrieval metrics (lib/evaluation.py of
woodfrog/vse_infty): one np.argsort per query, a Python loop over queries, float64 rank arrays.
Slow on purpose: it is the parity oracle of tests/test_evaluation.py and the baseline of
bench/bench_eval.py.

mode="coco": 5 captions per image, image i owns columns 5i..5i+4; any other mode: one caption per
image (sims square). `caps` generalises the 5 for the parity tests of other caption counts.
"""
import numpy as np


def compute_sim(images, captions):
    """(N, E) x (M, E) -> (N, M) dot products, as published (np.matmul). The published encode_data
    keeps the embeddings in float64 arrays, so pass float64 for its similarities."""
    return np.matmul(images, captions.T)


def _recalls(ranks):
    n = len(ranks)
    r1 = 100.0 * len(np.where(ranks < 1)[0]) / n
    r5 = 100.0 * len(np.where(ranks < 5)[0]) / n
    r10 = 100.0 * len(np.where(ranks < 10)[0]) / n
    medr = np.floor(np.median(ranks)) + 1
    meanr = ranks.mean() + 1
    return r1, r5, r10, medr, meanr


def i2t(npts, sims, return_ranks=False, mode="coco", caps=None):
    caps = caps if caps is not None else (5 if mode == "coco" else 1)
    ranks = np.zeros(npts)
    top1 = np.zeros(npts)
    for image in range(npts):
        order = np.argsort(sims[image])[::-1]  # best first
        positions = [np.where(order == col)[0][0] for col in range(caps * image, caps * image + caps)]
        ranks[image] = min(positions)
        top1[image] = order[0]
    result = _recalls(ranks)
    return (result, (ranks, top1)) if return_ranks else result


def t2i(npts, sims, return_ranks=False, mode="coco", caps=None):
    caps = caps if caps is not None else (5 if mode == "coco" else 1)
    ranks = np.zeros(caps * npts)
    top1 = np.zeros(caps * npts)
    by_caption = sims.T  # (caps*N, N)
    for image in range(npts):
        for k in range(caps):
            query = caps * image + k
            order = np.argsort(by_caption[query])[::-1]
            ranks[query] = np.where(order == image)[0][0]
            top1[query] = order[0]
    result = _recalls(ranks)
    return (result, (ranks, top1)) if return_ranks else result


def evaluate_sims(npts, sims, caps=5):
    """The 13 published numbers of one evaluation: i2t (5), t2i (5), ar, ari, rsum."""
    mode = "coco" if caps == 5 else "other"
    r = i2t(npts, sims, mode=mode, caps=caps)
    ri = t2i(npts, sims, mode=mode, caps=caps)
    ar = (r[0] + r[1] + r[2]) / 3
    ari = (ri[0] + ri[1] + ri[2]) / 3
    rsum = r[0] + r[1] + r[2] + ri[0] + ri[1] + ri[2]
    return list(r) + list(ri) + [ar, ari, rsum]


def fold5(img_embs, cap_embs, caps=5):
    """Published 5-fold protocol on per-image embeddings (N, E) and captions (caps*N, E): the mean of
    the 13 numbers over 5 consecutive folds, and the per-fold lists. Folds of N/5 items: the published
    evalrank cuts 1000 images / 5000 captions per fold, the same for COCO's N = 5000."""
    size = img_embs.shape[0] // 5
    results = []
    for f in range(5):
        sims = compute_sim(img_embs[f * size:(f + 1) * size], cap_embs[f * size * caps:(f + 1) * size * caps])
        results.append(evaluate_sims(size, sims, caps))
    return tuple(np.array(results).mean(axis=0).flatten()), results


def ensemble_sims(pairs):
    """Published eval_ensemble: the mean of the members' similarity matrices."""
    return np.array([compute_sim(img, cap) for img, cap in pairs]).mean(axis=0)
