"""SemDeDup inside one cluster (Abbas et al. 2023), as plain NumPy/FAISS: greedy, in bounded blocks.

The members come in a fixed order (:func:`member_order`). Walking that order, a document is a
duplicate when its cosine similarity to a document already *kept* is at least the threshold (of
the most similar such document; ties: the earliest); otherwise it is kept. Each document's fate
depends only on the documents before it, so cutting the walk into blocks of any size gives the same
result: a block is searched against the kept set of the earlier blocks (a FAISS inner-product
index, GPU where asked) and against its own earlier rows (a block x block product), never an
n x n matrix. FAISS and the block product only propose candidates (at ``threshold - SLACK``);
every decision is made on the similarity recomputed in float64 for that pair, so it does not depend
on how a BLAS kernel blocked a product either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

SLACK = 1e-3  # candidates are searched this far below the threshold; float32 products err by ~1e-6
FIRST_K = 8  # kept neighbours asked of FAISS per row at first (doubled while the last still qualifies)


@dataclass(frozen=True)
class Result:
    """Per member in the walk's order: ``dup_of`` (position of the kept document it duplicates, -1 when
    kept) and ``similarity`` (to that document; 0 when kept)."""

    dup_of: np.ndarray
    similarity: np.ndarray

    @property
    def kept(self) -> np.ndarray:
        return self.dup_of < 0


def member_order(score: np.ndarray, ids: list[str], ingested_at: np.ndarray | None = None,
                 quality: np.ndarray | None = None) -> np.ndarray:
    """The walk's order: earlier ingests first (a refresh never demotes a document already in the mix),
    then highest ``quality`` (when given; unknown last), then closest to the centroid, then id."""
    keys: list[Any] = [np.asarray(ids, dtype=object), -np.asarray(score, dtype=np.float64)]
    if quality is not None:
        q = np.asarray(quality, dtype=np.float64)
        keys.append(np.where(np.isnan(q), np.inf, -q))
    if ingested_at is not None:
        keys.append(np.asarray(ingested_at))
    # np.lexsort cannot compare object arrays with others: rank the ids first
    ids_rank = np.argsort(np.argsort(keys[0], kind="stable"), kind="stable")
    return np.lexsort([ids_rank, *keys[1:]])


def _exact(x: np.ndarray, i: int, js: np.ndarray) -> np.ndarray:
    return x[js].astype(np.float64) @ x[i].astype(np.float64)


def _pick(best_j: int, best_s: float, js: np.ndarray, sims: np.ndarray, threshold: float) -> tuple[int, float]:
    """The most similar qualifying candidate so far (ties: the earliest position)."""
    for j, s in zip(js.tolist(), sims.tolist(), strict=True):
        if s >= threshold and (s > best_s or (s == best_s and j < best_j)):
            best_j, best_s = j, s
    return best_j, best_s


def dedup_sorted(x: np.ndarray, threshold: float, block_rows: int, make_index: Any = None) -> Result:
    """Greedy semantic dedup of the rows of ``x`` (L2-normalised, already in the walk's order).

    ``make_index(d)``: a FAISS inner-product index for the kept set (default ``IndexFlatIP``; a GPU
    one on a GPU actor). Memory: the kept set, one block and a block x block product."""
    import faiss

    n, d = x.shape
    x = np.ascontiguousarray(x, dtype=np.float32)
    dup_of = np.full(n, -1, dtype=np.int64)
    sim = np.zeros(n, dtype=np.float64)
    index = make_index(d) if make_index else faiss.IndexFlatIP(d)
    kept_pos: list[int] = []  # the index's row i is member kept_pos[i]
    low = threshold - SLACK
    for start in range(0, n, block_rows):
        blk = x[start:start + block_rows]
        m = len(blk)
        best_j = np.full(m, -1, dtype=np.int64)
        best_s = np.full(m, -np.inf)
        if index.ntotal:
            kept_arr = np.asarray(kept_pos, dtype=np.int64)
            k = min(FIRST_K, index.ntotal)
            while True:
                scores, rows = index.search(blk, k)
                if k >= index.ntotal or not (scores[:, -1] >= low).any():
                    break
                k = min(2 * k, index.ntotal)
            for r in np.nonzero((scores >= low).any(axis=1))[0].tolist():
                js = kept_arr[rows[r][(scores[r] >= low) & (rows[r] >= 0)]]
                best_j[r], best_s[r] = _pick(-1, -np.inf, js, _exact(x, start + r, js), threshold)
        near: np.ndarray = np.tril(blk @ blk.T >= low, k=-1)  # candidates among the block's earlier rows only
        has = np.asarray(near.any(axis=1))
        kept_here = np.ones(m, dtype=bool)
        for r in range(m):
            if has[r]:
                qs = np.nonzero(near[r, :r] & kept_here[:r])[0]
                if len(qs):
                    js = start + qs
                    best_j[r], best_s[r] = _pick(int(best_j[r]), float(best_s[r]), js, _exact(x, start + r, js),
                                                 threshold)
            if best_j[r] >= 0:
                kept_here[r] = False
                dup_of[start + r], sim[start + r] = best_j[r], best_s[r]
        new = np.nonzero(kept_here)[0]
        if len(new):
            index.add(blk[new])
            kept_pos.extend((start + new).tolist())
    return Result(dup_of, sim)


def gpu_index_factory() -> Any:
    """A ``make_index`` for :func:`dedup_sorted` that keeps the kept set on the first GPU."""
    import faiss

    res = faiss.StandardGpuResources()

    def make(d: int) -> Any:
        return faiss.GpuIndexFlatIP(res, d)

    return make
