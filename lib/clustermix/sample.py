"""Sample (Spark): ClusterClip over ``cluster_stats`` -> ``sample_plan``.

Only the K rows of ``cluster_stats`` reach the driver; the per-document part is :mod:`plan`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from clustermix import clusterclip, contracts, plan
from clustermix.config import SampleConfig
from clustermix.stats import share_summary

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession


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
    if scfg.unit == "docs":
        alloc = clusterclip.allocate(sizes.n_docs, targets, scfg.budget, scfg.clip)
        draws = alloc.draws
    else:
        alloc = clusterclip.allocate(sizes.n_tokens, targets, scfg.budget, scfg.clip)
        # a cluster's token draws become document draws at the cluster's mean document length
        with np.errstate(divide="ignore", invalid="ignore"):
            draws = np.where(sizes.n_tokens > 0, np.rint(alloc.draws / sizes.n_tokens * sizes.n_docs), 0)
        draws = np.minimum(draws.astype(np.int64), scfg.clip * sizes.n_docs)
    info = {
        "unit": scfg.unit, "budget": scfg.budget, "clip": scfg.clip, "cap": alloc.cap,
        "allocated": alloc.total, "shortfall": alloc.shortfall, "lambda": None if np.isinf(alloc.lam) else alloc.lam,
        "clusters_at_clip": int(alloc.clipped.sum()), "draws": int(draws.sum()),
    }
    return draws, info


def make_plan(spark: SparkSession, members: DataFrame, sizes: ClusterSizes, draws: np.ndarray,
              scfg: SampleConfig, partitions: int) -> DataFrame:
    """The per-document plan for a K-vector of draws."""
    counts = plan.Counts.of(sizes.cluster_id, sizes.n_docs, draws)
    active = draws[draws > 0]
    a_min = int(active.min()) if len(active) else 0
    return plan.build_plan(members, counts, seed=scfg.seed, within=scfg.within, order=scfg.order, a_min=a_min,
                           partitions=partitions)


def draws_histogram(n_docs: np.ndarray, draws: np.ndarray) -> dict[str, int]:
    """How many documents are drawn 0, 1, ..., clip times: exact from the K numbers, since each
    cluster's documents get ``a_k div n_k`` draws and ``a_k mod n_k`` of them one more."""
    hist: dict[int, int] = {}
    for n, a in zip(n_docs.tolist(), draws.tolist(), strict=True):
        if n <= 0:
            continue
        base, extra = clusterclip.per_doc(int(a), int(n))
        hist[base] = hist.get(base, 0) + n - extra
        if extra:
            hist[base + 1] = hist.get(base + 1, 0) + extra
    top = max((k for k, v in hist.items() if v), default=0)
    return {str(k): hist.get(k, 0) for k in range(top + 1)}


def uniform_targets(sizes: ClusterSizes) -> np.ndarray:
    return (sizes.n_docs > 0).astype(np.float64)


def members_frame(assignments: DataFrame, docs: DataFrame, within: str) -> DataFrame:
    """The cluster members the plan ranks (quality only when the within-cluster choice needs it)."""
    if within == "quality":
        return assignments.select("id", "cluster_id").join(docs.select("id", "quality"), "id")
    return assignments.select("id", "cluster_id")


def run_sample(spark: SparkSession, stats: DataFrame, assignments: DataFrame, docs: DataFrame,
               scfg: SampleConfig, min_share: float, partitions: int, write: Any) -> dict[str, Any]:
    """ClusterClip with uniform targets; writes ``sample_plan``."""
    sizes = ClusterSizes.from_stats(stats)
    draws, info = allocate_docs(sizes, uniform_targets(sizes), scfg)
    df = make_plan(spark, members_frame(assignments, docs, scfg.within), sizes, draws, scfg, partitions)
    write("sample_plan", contracts.check(df, "sample_plan"))
    info["order"] = scfg.order
    info["draws_per_doc_histogram"] = draws_histogram(sizes.n_docs, draws)
    info["shares_before"] = share_summary(sizes.n_docs, min_share)
    info["shares_after"] = share_summary(draws, min_share)
    info["draws_per_cluster"] = {int(c): int(a) for c, a in zip(sizes.cluster_id, draws, strict=False)}
    return info
