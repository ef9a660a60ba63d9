"""Spherical k-means math, apart from any engine: assignment with FAISS, sums, the update.

The distributed fit (:mod:`clustermix.kmeans_dist`) calls :func:`partial_stats` on every shard and
:func:`update` on the reduced sums, so the math is tested here on tiny arrays; the fit sample's
hashes and thresholds (:func:`id_hashes`, :func:`read_threshold`) are plain functions too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


def _label_block(xs: np.ndarray, c: np.ndarray, index: object | None, exact_scores: bool) -> tuple[np.ndarray, np.ndarray]:
    """Labels (int32) and scores (float32) of one block of rows: see :func:`assign`."""
    k, d = c.shape
    top = _top2(xs, c, index)
    lab, sc = top[0].astype(np.int32), top[1].astype(np.float32)
    if k > 1:
        near = np.flatnonzero(top[1] - top[3] < 2.0 * d * 2.0**-24)
        if len(near):
            first, second = top[0][near], top[2][near]
            s0, s1 = rowdot(xs[near], c[first]), rowdot(xs[near], c[second])
            pick_second = (s1 > s0) | ((s1 == s0) & (second < first))
            lab[near] = np.where(pick_second, second, first)
            sc[near] = np.where(pick_second, s1, s0)
    if exact_scores:
        sc = rowdot(xs, c[lab]).astype(np.float32)
    return lab, sc


def _blocks(n: int, k: int, chunk: int) -> list[range]:
    """Row blocks of at most ``chunk`` rows (and a rows × k float32 block of at most 64 MiB)."""
    step = max(256, min(chunk, 2**24 // max(k, 1)))
    return [range(s, min(s + step, n)) for s in range(0, n, step)]


def _run(work: Any, groups: list[Any]) -> list[Any]:
    """``work`` over ``groups``, on one thread per group when there are several."""
    if len(groups) <= 1:
        return [work(g) for g in groups]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(groups)) as pool:
        return list(pool.map(work, groups))


def assign(x: np.ndarray, centroids: np.ndarray, use_gpu: bool = False, chunk: int = 65536,
           exact_scores: bool = False, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by cosine (inner product of unit vectors): labels int32, scores float32.

    Float32 products of a row differ in the last bits with the batch's size and the row's place in
    it, so where the two best centroids are closer than that rounding can tell apart (below d·2^-24
    each, for unit vectors) they are rescored in float64: a label does not depend on how the points
    were batched or sharded. ``exact_scores``: every score from :func:`rowdot` too (what the
    ``assignments`` table stores). ``threads``: blocks of rows run on that many threads (numpy and
    BLAS release the GIL; see :func:`set_threads`)."""
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    index = make_index(c, use_gpu) if use_gpu else None
    labels = np.empty(len(x), dtype=np.int32)
    scores = np.empty(len(x), dtype=np.float32)
    if index is None and threads > 1:
        chunk = min(chunk, max(256, -(-len(x) // (4 * threads))))  # several blocks per thread
    blocks = _blocks(len(x), len(c), chunk)

    def work(group: list[range]) -> None:
        for r in group:
            xs = np.ascontiguousarray(x[r.start : r.stop], dtype=np.float32)
            labels[r.start : r.stop], scores[r.start : r.stop] = _label_block(xs, c, index, exact_scores)

    n_workers = threads if index is None else 1
    _run(work, [blocks[i::n_workers] for i in range(min(n_workers, len(blocks)))])
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


def add_segment_sums(out: np.ndarray, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``out[c] += Σ x[labels == c]`` in float64 (exact for quantized points: see :func:`quantize`),
    and the counts per label: one pass of scipy's CSR kernel with the block's one-hot label matrix
    (rows sorted by label), written straight into ``out``."""
    from scipy.sparse import _sparsetools  # the kernel behind csr_matrix @ dense, without its copies

    k, d = out.shape
    counts = np.bincount(labels, minlength=k)
    indptr = np.concatenate(([0], np.cumsum(counts)))
    order = np.argsort(labels, kind="stable")
    xs = np.ascontiguousarray(x, dtype=np.float64)
    _sparsetools.csr_matvecs(k, len(xs), d, indptr, order, np.ones(len(xs)), xs.ravel(), out.ravel())
    return counts


def segment_sums(x: np.ndarray, labels: np.ndarray, k: int, threads: int = 1, chunk: int = 2048) -> np.ndarray:
    """Per-cluster sums of the rows of ``x`` (``labels`` in [0, k)) as a (k, d) float64 array: the same
    bits whatever the chunking, thread count or sharding, for quantized points."""
    d = x.shape[1]
    starts = list(range(0, len(x), chunk))

    def work(group: list[int]) -> np.ndarray:
        out = np.zeros((k, d), dtype=np.float64)
        for s in group:
            add_segment_sums(out, x[s : s + chunk], labels[s : s + chunk])
        return out

    total = np.zeros((k, d), dtype=np.float64)
    for part in _run(work, [starts[i::threads] for i in range(min(threads, len(starts)))]):
        total += part
    return total


def partial_stats(x: np.ndarray, centroids: np.ndarray, use_gpu: bool = False, chunk: int = 2048,
                  threads: int = 1) -> Partial:
    """Assign ``x`` to ``centroids`` and return per-cluster sums and counts: one pass over ``x`` in
    blocks of ``chunk`` rows, each labelled (:func:`assign`'s rule) and summed while it is in cache,
    the blocks dealt to ``threads`` threads with a sum of their own.

    Pass quantized points (:func:`quantize`) for sums that are exact whatever the chunking."""
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    k, d = c.shape
    index = make_index(c, use_gpu) if use_gpu else None
    blocks = _blocks(len(x), k, chunk)
    n_workers = threads if index is None else 1

    def work(group: list[range]) -> tuple[np.ndarray, np.ndarray]:
        sums, counts = np.zeros((k, d), dtype=np.float64), np.zeros(k, dtype=np.int64)
        for r in group:
            xs = np.ascontiguousarray(x[r.start : r.stop], dtype=np.float32)
            labels, _ = _label_block(xs, c, index, False)
            counts += add_segment_sums(sums, xs, labels)
        return sums, counts

    sums, counts = np.zeros((k, d), dtype=np.float64), np.zeros(k, dtype=np.int64)
    for s_, c_ in _run(work, [blocks[i::n_workers] for i in range(min(n_workers, len(blocks)))]):
        sums += s_
        counts += c_
    return Partial(sums, counts, len(x))


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
    """Run this process's k-means work on ``threads`` threads: FAISS's (a GPU index, k-means++), and
    :func:`assign`'s and :func:`segment_sums`' blocks on Python threads, each with a one-thread BLAS
    (one BLAS of many threads per block would oversubscribe the CPUs)."""
    import faiss
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency

    faiss.omp_set_num_threads(threads)
    threadpool_limits(limits=1, user_api="blas")
