"""ClusterClip allocation: the closed form of the expected outcome, K numbers in and K out.

The one water-filling and the one largest-remainder rounding of the project (the sample, the blend
and the search's mixtures all allocate here), and the share summaries the manifest reports.

Given cluster sizes ``n_k``, target shares ``t_k``, a budget ``B`` and a clip ``c``, find ``λ`` with
``Σ_k min(λ·t_k·B, c·n_k) = B`` (water-filling: clusters that hit their clip hand the rest of
their share to the others) and round to integers that sum to exactly ``B`` (or to the cap
``c·Σ n_k`` when the budget exceeds it; the shortfall is reported, never hidden).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

    from clustermix.config import SampleConfig


@dataclass(frozen=True)
class Allocation:
    """Draws per cluster and how they were reached."""

    draws: np.ndarray  # int64, one per cluster
    lam: float  # the water level λ (inf when every cluster is at its clip)
    budget: int
    cap: int  # the most draws the clip allows over clusters with a positive target
    shortfall: int  # budget - sum(draws), > 0 only when the budget exceeds the cap
    clipped: np.ndarray  # bool, clusters at their clip

    @property
    def total(self) -> int:
        return int(self.draws.sum())


def water_levels(x: np.ndarray, caps: np.ndarray, total: float = 1.0) -> np.ndarray:
    """Per row of ``x`` (non-negative weights): the ``λ`` with ``Σ min(λ·x, caps) = total``; inf where the
    caps over the row's support sum to ``total`` or less. Exact, O(K log K) per row, vectorised over rows.

    >>> water_levels(np.array([[2.0, 1.0, 1.0]]), np.array([1.0, 5.0, 5.0]), 4.0).tolist()
    [1.5]
    """
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    caps = np.broadcast_to(np.asarray(caps, dtype=np.float64), x.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(x > 0, caps / x, np.inf)  # the λ at which each entry reaches its cap
    order = np.argsort(ratio, axis=1, kind="stable")
    xs, cs, rs = (np.take_along_axis(a, order, axis=1) for a in (x, caps, ratio))
    capped_before = np.cumsum(cs, axis=1) - cs  # with entries 0..i-1 at their caps
    rest = np.cumsum(xs[:, ::-1], axis=1)[:, ::-1]  # Σ x over entries i..end
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = np.where(rest > 0, (total - capped_before) / rest, np.inf)
    ok = lam <= rs * (1 + 1e-12)
    levels: np.ndarray = np.where(ok.any(axis=1), lam[np.arange(len(x)), np.argmax(ok, axis=1)], np.inf)
    return levels


def water_level(sizes: np.ndarray, targets: np.ndarray, budget: float, clip: float) -> float:
    """The λ with Σ min(λ·t·B, c·n) = B, for a budget below the cap."""
    t = np.asarray(targets, dtype=np.float64) * budget
    return float(water_levels(t[None, :], clip * np.asarray(sizes, dtype=np.float64), budget)[0])


def round_to_total(real: np.ndarray, total: int, caps: np.ndarray | None = None) -> np.ndarray:
    """Integers near ``real`` summing to ``total``: floors, then one more for the largest remainders
    (ties to the lower index), never past ``caps``. ``real`` must sum to ``total`` (within rounding)."""
    out = np.floor(np.asarray(real, dtype=np.float64) + 1e-9).astype(np.int64)
    room = np.ones(len(out), dtype=bool)
    if caps is not None:
        out = np.minimum(out, caps)
        room = out < caps
    rest = total - int(out.sum())
    if rest > 0:
        frac = np.where(room, real - out, -np.inf)
        order = np.lexsort((np.arange(len(frac)), -frac))
        out[order[:rest]] += 1
    return out


def allocate(sizes: np.ndarray, targets: np.ndarray, budget: int, clip: int) -> Allocation:
    """Integer draws per cluster by ClusterClip water-filling (see module docstring).

    >>> allocate(np.array([100, 2, 10]), np.ones(3) / 3, 30, 2).draws.tolist()
    [13, 4, 13]
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.float64)
    if sizes.shape != targets.shape or sizes.ndim != 1:
        raise ValueError("sizes and targets must be 1-d arrays of the same length")
    if (sizes < 0).any() or (targets < 0).any() or not np.isfinite(targets).all():
        raise ValueError("sizes and targets must be non-negative and finite")
    if budget <= 0 or clip < 1:
        raise ValueError("budget must be > 0 and clip >= 1")
    targets = np.where(sizes > 0, targets, 0.0)
    if targets.sum() <= 0:
        raise ValueError("no cluster with documents has a positive target share")
    targets = targets / targets.sum()
    caps = clip * sizes * (targets > 0)
    cap = int(caps.sum())
    if budget >= cap:
        return Allocation(caps.astype(np.int64), float("inf"), budget, cap, budget - cap, caps > 0)
    lam = water_level(sizes.astype(np.float64), targets, float(budget), float(clip))
    real = np.minimum(lam * targets * budget, caps)
    draws = round_to_total(real, budget, caps)
    return Allocation(draws, lam, budget, cap, 0, draws >= caps)


def per_doc(draws: int, size: int) -> tuple[int, int]:
    """How ``draws`` spread over ``size`` documents: (base draws each, documents with one more)."""
    if size <= 0:
        return 0, 0
    return draws // size, draws % size


@dataclass(frozen=True)
class ClusterSizes:
    """The K numbers the allocation needs, read from ``cluster_stats``."""

    cluster_id: np.ndarray
    n_docs: np.ndarray
    n_tokens: np.ndarray
    quality: np.ndarray  # mean quality per cluster, NaN where unknown
    domains: list[dict[str, int]]

    @classmethod
    def from_stats(cls, stats: DataFrame) -> ClusterSizes:
        # K rows, sorted here: orderBy would run a range-partition sampling job for them
        rows = sorted(stats.select("cluster_id", "n_docs", "n_tokens", "quality_mean", "domains").collect(),
                      key=lambda r: r["cluster_id"])
        return cls(
            np.array([r["cluster_id"] for r in rows], dtype=np.int64),
            np.array([r["n_docs"] for r in rows], dtype=np.int64),
            np.array([r["n_tokens"] for r in rows], dtype=np.int64),
            np.array([np.nan if r["quality_mean"] is None else r["quality_mean"] for r in rows], dtype=np.float64),
            [dict(r["domains"] or {}) for r in rows],
        )


def allocate_docs(sizes: ClusterSizes, targets: np.ndarray, scfg: SampleConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Draws per cluster (in documents) for ``targets``, with the budget counted in ``scfg.unit``."""
    alloc = allocate(sizes.n_docs if scfg.unit == "docs" else sizes.n_tokens, targets, scfg.budget, scfg.clip)
    draws = to_doc_draws(alloc.draws, sizes.n_docs, sizes.n_tokens, scfg.unit, scfg.clip)
    info = {
        "unit": scfg.unit, "budget": scfg.budget, "clip": scfg.clip, "cap": alloc.cap,
        "allocated": alloc.total, "shortfall": alloc.shortfall, "lambda": None if np.isinf(alloc.lam) else alloc.lam,
        "clusters_at_clip": int(alloc.clipped.sum()), "draws": int(draws.sum()),
    }
    return draws, info


def realise_mixture(sizes: ClusterSizes, weights: np.ndarray, scfg: SampleConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Draws per cluster (in documents) whose expected token shares are ``weights``: a searched
    mixture as the proxies scored it, not re-balanced by the clip.

    Cluster ``k`` gets ``w_k·T / m_k`` draws, ``m_k`` its mean document length in tokens, for the
    largest total ``T`` that both fits the budget (counted in ``scfg.unit``) and keeps every cluster
    within ``clip`` draws per document. Where the clip binds (a heavy weight on a small cluster), the
    whole mixture shrinks below the budget rather than moving the weight elsewhere; ``info`` says how
    far and which cluster limited it. Clusters with a weight but no documents cannot be realised:
    they are named in ``info`` and the other weights are renormalised."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != sizes.n_docs.shape or (w < 0).any() or not np.isfinite(w).all():
        raise ValueError("weights must be one finite non-negative value per cluster")
    live = (sizes.n_docs > 0) & (sizes.n_tokens > 0)
    unrealisable = [int(c) for c in sizes.cluster_id[(w > 0) & ~live]]
    w = np.where(live, w, 0.0)
    if w.sum() <= 0:
        raise ValueError("no cluster with documents has a positive weight in the mixture")
    w = w / w.sum()
    n_docs, n_tokens = sizes.n_docs.astype(np.float64), sizes.n_tokens.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        docs_per_token = np.where(live, w * n_docs / n_tokens, 0.0)  # draws of cluster k per token of the mix
        tokens_at_clip = np.where(w > 0, scfg.clip * n_tokens / w, np.inf)  # the mix's size at k's clip
    by_budget = scfg.budget / docs_per_token.sum() if scfg.unit == "docs" else float(scfg.budget)
    limit = int(np.argmin(tokens_at_clip))
    limited = float(tokens_at_clip[limit]) < by_budget * (1 - 1e-9)  # a tie is the budget's, not the clip's
    size = float(tokens_at_clip[limit]) if limited else by_budget
    real = docs_per_token * size
    caps = scfg.clip * sizes.n_docs
    draws = round_to_total(real, int(np.floor(real.sum() + 1e-9)), caps)
    planned = draws * np.where(live, n_tokens / np.maximum(n_docs, 1), 0.0)
    info = {
        "fit": "exact", "unit": scfg.unit, "budget": scfg.budget, "clip": scfg.clip, "draws": int(draws.sum()),
        "scale": round(size / by_budget, 6) if by_budget > 0 else None,
        "limited_by_cluster": int(sizes.cluster_id[limit]) if limited else None,
        "unrealisable_clusters": unrealisable,
        "planned_total_variation": round(total_variation(w, planned), 6),
    }
    return draws, info


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Half the L1 distance between two non-negative vectors, each normalised to sum to one (0: the
    same shares, 1: disjoint)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        return 1.0
    return float(0.5 * np.abs(p / p.sum() - q / q.sum()).sum())


def to_doc_draws(draws: np.ndarray, n_docs: np.ndarray, n_tokens: np.ndarray, unit: str, clip: int) -> np.ndarray:
    """Draws counted in ``unit`` as document draws: token draws become document draws at the mean
    document length of their cluster (or cell), never past the clip."""
    if unit == "docs":
        return np.asarray(draws, dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        docs = np.where(n_tokens > 0, np.rint(draws / n_tokens * n_docs), 0)
    return np.minimum(docs.astype(np.int64), clip * n_docs)


def draws_histogram(n_docs: np.ndarray, draws: np.ndarray) -> dict[str, int]:
    """How many documents are drawn 0, 1, ..., clip times: exact from the K numbers, since each
    cluster's documents get ``a_k div n_k`` draws and ``a_k mod n_k`` of them one more."""
    hist: dict[int, int] = {}
    for n, a in zip(n_docs.tolist(), draws.tolist(), strict=True):
        if n <= 0:
            continue
        base, extra = per_doc(int(a), int(n))
        hist[base] = hist.get(base, 0) + n - extra
        if extra:
            hist[base + 1] = hist.get(base + 1, 0) + extra
    top = max((k for k, v in hist.items() if v), default=0)
    return {str(k): hist.get(k, 0) for k in range(top + 1)}


def uniform_targets(sizes: ClusterSizes) -> np.ndarray:
    return (sizes.n_docs > 0).astype(np.float64)


def share_summary(counts: np.ndarray, min_share: float) -> dict[str, Any]:
    """Entropy (nats, and normalised to [0, 1]), Gini, extremes and clusters under ``min_share``."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return {"clusters": len(counts), "total": 0}
    p = counts / total
    nz = p[p > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    srt = np.sort(p)
    n = len(p)
    gini = float((2 * np.arange(1, n + 1) - n - 1).dot(srt) / (n * srt.sum())) if n > 1 else 0.0
    return {
        "clusters": n,
        "total": int(total),
        "entropy": round(entropy, 6),
        "entropy_normalised": round(entropy / math.log(n), 6) if n > 1 else 1.0,
        "gini": round(gini, 6),
        "largest_share": round(float(p.max()), 6),
        "smallest_share": round(float(p.min()), 6),
        "below_threshold": int((p < min_share).sum()),
    }
