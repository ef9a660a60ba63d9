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


def assign(x: np.ndarray, centroids: np.ndarray, use_gpu: bool = False, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by cosine (inner product of unit vectors): labels int32, scores float32."""
    index = make_index(centroids, use_gpu)
    labels = np.empty(len(x), dtype=np.int32)
    scores = np.empty(len(x), dtype=np.float32)
    for s in range(0, len(x), chunk):
        d, i = index.search(np.ascontiguousarray(x[s : s + chunk], dtype=np.float32), 1)
        labels[s : s + chunk], scores[s : s + chunk] = i[:, 0], d[:, 0]
    return labels, scores


# Determinism whatever the sharding: points are snapped to multiples of 2^-QUANTUM_BITS when a
# shard loads them (:func:`quantize`), so every float64 sum of them is exact (53-bit mantissa: up
# to 2^(52-QUANTUM_BITS) unit vectors per cluster) and the order of addition cannot change a bit.
# The snap moves a component by at most 2^-21, far below what the embedding model resolves.
QUANTUM_BITS = 20
_Q = float(2**QUANTUM_BITS)
SCORE_SCALE = float(2**32)  # scores are summed in fixed point for the same reason


def quantize(x: np.ndarray) -> np.ndarray:
    """Snap ``x`` (|x| <= 1) to multiples of 2^-QUANTUM_BITS, as float32 (exactly representable)."""
    return (np.rint(np.asarray(x, dtype=np.float32) * _Q) / _Q).astype(np.float32)


@dataclass
class Partial:
    """One shard's contribution to a Lloyd step: O(k·d), whatever the shard's size."""

    sums: np.ndarray  # (k, d) float64, exact for quantized points
    counts: np.ndarray  # (k,) int64
    qscore: int  # summed cosine, fixed point
    n: int

    @property
    def score_sum(self) -> float:
        return self.qscore / SCORE_SCALE

    def __add__(self, other: Partial) -> Partial:
        return Partial(self.sums + other.sums, self.counts + other.counts, self.qscore + other.qscore,
                       self.n + other.n)


def partial_stats(x: np.ndarray, centroids: np.ndarray, use_gpu: bool = False, chunk: int = 65536) -> Partial:
    """Assign ``x`` to ``centroids`` and return per-cluster sums, counts and the summed cosine.

    Pass quantized points (:func:`quantize`) for sums that are exact whatever the chunking."""
    k, d = centroids.shape
    sums = np.zeros((k, d), dtype=np.float64)
    counts = np.zeros(k, dtype=np.int64)
    labels, scores = assign(x, centroids, use_gpu)
    for s in range(0, len(x), chunk):
        lab = labels[s : s + chunk]
        order = np.argsort(lab, kind="stable")
        lab_sorted = lab[order]
        starts = np.flatnonzero(np.r_[True, lab_sorted[1:] != lab_sorted[:-1]])
        sums[lab_sorted[starts]] += np.add.reduceat(x[s : s + chunk][order], starts, axis=0, dtype=np.float64)
        counts += np.bincount(lab, minlength=k)
    qscore = int(np.rint(scores.astype(np.float64) * SCORE_SCALE).astype(np.int64).sum())
    return Partial(sums, counts, qscore, len(x))


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
