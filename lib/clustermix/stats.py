"""Stats (Spark): ``docs`` ⋈ ``assignments`` (+ ``centroids``) -> ``cluster_stats``, one row per cluster.

Also the corpus summary for the manifest (clusters below threshold, entropy and Gini of shares),
computed from the K rows only.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from clustermix import contracts

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

NO_DOMAIN = "(none)"


def cluster_stats(docs: DataFrame, assignments: DataFrame, centroids: DataFrame, min_share: float,
                  n_exemplars: int) -> DataFrame:
    """Per cluster: sizes, shares, quality summary, domain histogram, exemplars nearest the centroid."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    joined = assignments.join(docs.select("id", "n_tokens", "quality", "domain"), "id")
    base = joined.groupBy("cluster_id").agg(
        F.count("*").alias("n_docs"),
        F.sum("n_tokens").alias("n_tokens"),
        F.avg("quality").alias("quality_mean"),
        F.percentile_approx("quality", [0.1, 0.5, 0.9], 1000).alias("quality_q10_50_90"),
        F.count("quality").alias("n_with_quality"),
        F.avg("score").alias("score_mean"),
    )
    hist = (
        joined.groupBy("cluster_id", F.coalesce("domain", F.lit(NO_DOMAIN)).alias("d")).count()
        .groupBy("cluster_id").agg(F.map_from_entries(F.collect_list(F.struct("d", "count"))).alias("domains"))
    )
    w = Window.partitionBy("cluster_id").orderBy(F.col("score").desc(), F.col("id"))
    ex = (
        assignments.withColumn("_r", F.row_number().over(w)).where(F.col("_r") <= n_exemplars)
        .groupBy("cluster_id")
        .agg(F.sort_array(F.collect_list(F.struct("_r", "id"))).alias("_ex"))
        .select("cluster_id", F.col("_ex.id").alias("exemplar_ids"))
    )
    all_k = centroids.select("cluster_id")
    out = (
        all_k.join(base, "cluster_id", "left").join(hist, "cluster_id", "left").join(ex, "cluster_id", "left")
        .fillna({"n_docs": 0, "n_tokens": 0, "n_with_quality": 0})
    )
    total = Window.partitionBy()
    out = (
        out.withColumn("share", F.col("n_docs") / F.sum("n_docs").over(total))
        .withColumn("token_share", F.col("n_tokens") / F.sum("n_tokens").over(total))
        .withColumn("below_threshold", F.col("share") < F.lit(min_share))
        .withColumn("n_docs", F.col("n_docs").cast("bigint"))
        .withColumn("n_tokens", F.col("n_tokens").cast("bigint"))
        .orderBy("cluster_id")
    )
    return contracts.check(out, "cluster_stats")


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
