"""Spherical k-means math, apart from any engine: assignment with FAISS, sums, the update.

The distributed fit (``cluster.py``) calls :func:`partial_stats` on every shard and
:func:`update` on the reduced sums, so the math is tested here on tiny arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), as float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def make_index(centroids: np.ndarray, use_gpu: bool = False):  # noqa: ANN201 - faiss types
    """An inner-product index over the centroids (a GPU index when asked and available)."""
    import faiss

    c = np.ascontiguousarray(centroids, dtype=np.float32)
    index = faiss.IndexFlatIP(c.shape[1])
    if use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(c)
    return index


def rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise inner products in float64: the same bits for a row whatever rows come with it (FAISS's
    batched float32 products differ in the last bits with the batch's size and a row's place in it)."""
    return (np.asarray(a, dtype=np.float64) * np.asarray(b, dtype=np.float64)).sum(axis=1)


def _top2(xs: np.ndarray, c: np.ndarray, index: object | None) -> tuple[np.ndarray, ...]:
    """The two most similar centroids of each row and their float32 scores (one when k = 1).

    On CPU a BLAS product and two argmax passes: FAISS's own top-2 (a heap per row) costs twice its
    top-1, while the argmax passes cost a few percent of the product. On GPU, FAISS's search."""
    if index is not None:
        dist, idx = index.search(xs, min(2, len(c)))  # type: ignore[attr-defined]
        return (idx[:, 0], dist[:, 0], idx[:, 1], dist[:, 1]) if len(c) > 1 else (idx[:, 0], dist[:, 0])
    sims = xs @ c.T
    rows = np.arange(len(xs))
    i1 = sims.argmax(axis=1)
    s1 = sims[rows, i1]
    if len(c) == 1:
        return i1, s1
    sims[rows, i1] = -np.inf
    i2 = sims.argmax(axis=1)
    return i1, s1, i2, sims[rows, i2]


def assign(x: np.ndarray, centroids: np.ndarray, use_gpu: bool = False, chunk: int = 65536,
           exact_scores: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by cosine (inner product of unit vectors): labels int32, scores float32.

    Float32 products of a row differ in the last bits with the batch's size and the row's place in
    it, so where the two best centroids are closer than that rounding can tell apart (below d·2^-24
    each, for unit vectors) they are rescored in float64: a label does not depend on how the points
    were batched or sharded. ``exact_scores``: every score from :func:`rowdot` too (what the
    ``assignments`` table stores)."""
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    k, d = c.shape
    index = make_index(c, use_gpu) if use_gpu else None
    tie_gap = 2.0 * d * 2.0**-24
    step = max(256, min(chunk, 2**24 // max(k, 1)))  # a (rows × k) float32 block of at most 64 MiB
    labels = np.empty(len(x), dtype=np.int32)
    scores = np.empty(len(x), dtype=np.float32)
    for s in range(0, len(x), step):
        xs = np.ascontiguousarray(x[s : s + step], dtype=np.float32)
        top = _top2(xs, c, index)
        lab, sc = top[0].astype(np.int32), top[1].astype(np.float32)
        if k > 1:
            near = np.flatnonzero(top[1] - top[3] < tie_gap)
            if len(near):
                first, second = top[0][near], top[2][near]
                s0, s1 = rowdot(xs[near], c[first]), rowdot(xs[near], c[second])
                pick_second = (s1 > s0) | ((s1 == s0) & (second < first))
                lab[near] = np.where(pick_second, second, first)
                sc[near] = np.where(pick_second, s1, s0)
        if exact_scores:
            sc = rowdot(xs, c[lab]).astype(np.float32)
        labels[s : s + step], scores[s : s + step] = lab, sc
    return labels, scores


# Determinism whatever the sharding: points are snapped to multiples of 2^-QUANTUM_BITS when a
# shard loads them (:func:`quantize`), so every float64 sum of them is exact (53-bit mantissa: up
# to 2^(52-QUANTUM_BITS) unit vectors per cluster) and the order of addition cannot change a bit.
# The snap moves a component by at most 2^-21, far below what the embedding model resolves.
QUANTUM_BITS = 20
_Q = float(2**QUANTUM_BITS)
SCORE_SCALE = float(2**32)  # scores of many files are summed in fixed point for the same reason


def quantize(x: np.ndarray) -> np.ndarray:
    """Snap ``x`` (|x| <= 1) to multiples of 2^-QUANTUM_BITS, as float32 (exactly representable)."""
    return (np.rint(np.asarray(x, dtype=np.float32) * _Q) / _Q).astype(np.float32)


@dataclass
class Partial:
    """One shard's contribution to a Lloyd step: O(k·d), whatever the shard's size."""

    sums: np.ndarray  # (k, d) float64, exact for quantized points
    counts: np.ndarray  # (k,) int64
    n: int

    def objective(self, centroids: np.ndarray) -> float:
        """Mean cosine of the points to the centroids they were assigned to: Σ_c sums_c·c / n, from the
        exact sums, so it is the same bits however the points were sharded."""
        c = np.asarray(centroids, dtype=np.float64)
        return float(rowdot(self.sums, c).sum()) / max(self.n, 1)

    def __add__(self, other: Partial) -> Partial:
        return Partial(self.sums + other.sums, self.counts + other.counts, self.n + other.n)


def segment_sums(x: np.ndarray, labels: np.ndarray, k: int, threads: int = 1, chunk: int = 4096) -> np.ndarray:
    """Per-cluster sums of the rows of ``x`` (``labels`` in [0, k)) as a (k, d) float64 array.

    Each chunk of rows is multiplied by its sparse one-hot label matrix (scipy's CSR kernel, which
    releases the GIL, so ``threads`` chunks run at once); the chunks' sums are then added. For
    quantized points (:func:`quantize`) every partial sum is an exact float64, so the result is the
    same bits whatever the chunking, thread count or sharding."""
    import scipy.sparse as sp

    x = np.asarray(x)
    labels = np.asarray(labels)
    d = x.shape[1] if x.ndim == 2 else 0
    starts = list(range(0, len(x), chunk))

    def one(s: int) -> np.ndarray:
        lab = labels[s : s + chunk]
        onehot = sp.csr_matrix((np.ones(len(lab)), (lab, np.arange(len(lab)))), shape=(k, len(lab)))
        return np.asarray(onehot @ x[s : s + chunk], dtype=np.float64)

    total = np.zeros((k, d), dtype=np.float64)
    if threads <= 1 or len(starts) <= 1:
        for s in starts:
            total += one(s)
        return total
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        for part in pool.map(one, starts):
            total += part
    return total


def partial_stats(x: np.ndarray, centroids: np.ndarray, use_gpu: bool = False, chunk: int = 4096,
                  threads: int = 1) -> Partial:
    """Assign ``x`` to ``centroids`` and return per-cluster sums and counts (``chunk``: rows per sparse
    product of :func:`segment_sums`).

    Pass quantized points (:func:`quantize`) for sums that are exact whatever the chunking."""
    k = centroids.shape[0]
    labels, _ = assign(x, centroids, use_gpu)
    return Partial(segment_sums(x, labels, k, threads, chunk), np.bincount(labels, minlength=k).astype(np.int64),
                   len(x))


def update(total: Partial, old: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """New unit centroids from reduced sums. An empty cluster re-seeds by splitting the largest
    (its centroid is nudged two ways), as FAISS does. Returns (centroids, number re-seeded)."""
    new = old.astype(np.float64).copy()
    nonempty = total.counts > 0
    new[nonempty] = total.sums[nonempty]
    new = normalize(new).astype(np.float64)
    empty = np.flatnonzero(~nonempty)
    counts = total.counts.astype(np.float64).copy()
    for e in empty:
        big = int(np.argmax(counts))
        noise = rng.standard_normal(new.shape[1]) * 1e-3
        new[e] = new[big] + noise
        new[big] = new[big] - noise
        counts[e] = counts[big] / 2
        counts[big] = counts[big] / 2
    return normalize(new), len(empty)


def init_plusplus(sample: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means++ seeds (scikit-learn's implementation) on a sample, as unit vectors."""
    from sklearn.cluster import kmeans_plusplus

    if len(sample) < k:
        raise ValueError(f"cannot seed {k} centroids from {len(sample)} points")
    centers, _ = kmeans_plusplus(np.asarray(sample, dtype=np.float32), n_clusters=k, random_state=seed)
    return normalize(centers)


def init_random(points: np.ndarray, k: int) -> np.ndarray:
    """FAISS's seeding: ``k`` sample points as the first centroids (the caller picks them by a seeded
    hash, so the choice does not depend on the sharding). Costs O(k·d), whatever k."""
    if len(points) < k:
        raise ValueError(f"cannot seed {k} centroids from {len(points)} points")
    return normalize(points[:k])


# The fit sample: a point is in it when a seeded 64-bit hash of its id is below a threshold, so the
# sample is one set of documents whatever the block order or the number of shards.
HASH_RANGE = 2**64


def id_hashes(ids: np.ndarray, seed: int) -> np.ndarray:
    """A seeded 64-bit hash per document id (an object array of str), as uint64."""
    import pandas as pd

    key = f"{seed & 0xFFFFFFFFFFFF:016x}"[-16:]
    return pd.util.hash_array(np.asarray(ids, dtype=object), hash_key=key, categorize=False).astype(np.uint64)


def remix(h: np.ndarray, seed: int) -> np.ndarray:
    """Another seeded order of the same points (splitmix64 of hash ^ seed): the seeding of each redo."""
    with np.errstate(over="ignore"):
        z = np.asarray(h, dtype=np.uint64) ^ np.uint64((seed * 0x9E3779B97F4A7C15) % HASH_RANGE)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_size(n: int, k: int, max_points_per_centroid: int) -> int:
    """Points the fit keeps: ``k·max_points_per_centroid`` (FAISS's cap), or every point when fewer."""
    return min(n, k * max_points_per_centroid)


def read_threshold(n: int, m: int) -> int:
    """The hash under which (inclusive) a shard keeps a point while reading, for a sample of ``m`` of
    ``n`` points: a little above m/n of the hash range (six standard deviations and 64 points), so
    that at least ``m`` points are kept but for a one-in-a-billion draw; the driver then cuts the
    union to exactly the ``m`` smallest hashes."""
    want = m + 6.0 * float(np.sqrt(m)) + 64
    if m >= n or want >= n:
        return HASH_RANGE - 1
    return int(want / n * HASH_RANGE)


def set_threads(threads: int) -> None:
    """Threads of this process's BLAS (the products of :func:`assign`) and of FAISS."""
    import faiss
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(threads)
    threadpool_limits(limits=threads, user_api="blas")
