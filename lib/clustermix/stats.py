"""Stats (Spark): ``docs`` ⋈ ``assignments`` (+ ``centroids``) -> ``cluster_stats``, one row per cluster,
and ``cell_stats``, one row per (cluster, group) cell with documents (the group: ``sample.group_column``),
which two-level sampling allocates over and the report shows per level.

Also the corpus summary for the manifest (clusters below threshold, entropy and Gini of shares:
:func:`clustermix.clusterclip.share_summary`), computed from the K rows only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from clustermix import contracts
from clustermix.contracts import NO_DOMAIN, group_value
from clustermix.errors import DataError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

    from clustermix.stage import Context

# characters of each exemplar's text stored in cluster_stats.exemplar_snippets (what the report shows)
EXEMPLAR_CHARS = 320


def cluster_stats(docs: DataFrame, assignments: DataFrame, centroids: DataFrame, min_share: float,
                  n_exemplars: int) -> DataFrame:
    """Per cluster: sizes, shares, quality summary, domain histogram, exemplars nearest the centroid
    (``exemplar_ids`` and, in the same order, the first :data:`EXEMPLAR_CHARS` characters of their
    text, ``exemplar_snippets``)."""
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
        # sorted by domain: collect_list's order is the shuffle's, so the same counts would be stored
        # in a different order by another run or cluster
        .groupBy("cluster_id").agg(F.map_from_entries(F.array_sort(F.collect_list(F.struct("d", "count"))))
                                   .alias("domains"))
    )
    w = Window.partitionBy("cluster_id").orderBy(F.col("score").desc(), F.col("id"))
    picked = assignments.withColumn("_r", F.row_number().over(w)).where(F.col("_r") <= n_exemplars)
    # the exemplars' first characters, stored with their ids so the report never scans docs' text for
    # them: K × n_exemplars rows, broadcast to a join that streams docs once without shuffling it
    text = docs.select("id", F.substring("text", 1, EXEMPLAR_CHARS).alias("_snippet"))
    ex = (
        F.broadcast(picked.select("cluster_id", "_r", "id")).join(text, "id", "left")
        .groupBy("cluster_id")
        .agg(F.sort_array(F.collect_list(F.struct("_r", "id", "_snippet"))).alias("_ex"))
        .select("cluster_id", F.col("_ex.id").alias("exemplar_ids"),
                F.transform("_ex", lambda e: F.coalesce(e["_snippet"], F.lit(""))).alias("exemplar_snippets"))
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


def cell_stats(docs: DataFrame, assignments: DataFrame, group_column: str) -> DataFrame:
    """Per (cluster, group) cell: documents and tokens. A Spark aggregate: C rows, never documents."""
    from pyspark.sql import functions as F

    if group_column not in docs.columns:
        raise DataError(f"config error: sample.group_column={group_column!r}: docs has no such column "
                        f"(columns: {sorted(docs.columns)})")
    joined = assignments.select("id", "cluster_id").join(
        docs.select("id", "n_tokens", group_value(group_column).alias("group")), "id")
    out = joined.groupBy("cluster_id", "group").agg(
        F.count("*").cast("bigint").alias("n_docs"), F.sum("n_tokens").cast("bigint").alias("n_tokens"),
    ).withColumn("group_column", F.lit(group_column))  # what the groups are values of: checked by the sample
    return contracts.check(out.fillna({"n_tokens": 0}), "cell_stats")


def run(ctx: Context, inputs: dict[str, Any]) -> dict[str, Any]:
    """The stats stage: ``cluster_stats`` on the pinned inputs, and the share summary (K numbers)."""
    from clustermix import holdout, kept, tableio
    from clustermix.clusterclip import share_summary

    s, lake, c = ctx.spark, ctx.lake, ctx.cfg.stats
    docs = tableio.read(s, lake, "docs", inputs["docs"])
    assignments = kept.assignments(s, lake, inputs, holdout.of(ctx.cfg))
    df = cluster_stats(docs, assignments, tableio.read(s, lake, "centroids", inputs["centroids"]), c.min_share,
                       c.n_exemplars)
    cells = cell_stats(docs, assignments, ctx.cfg.sample.group_column)  # checks the column before any write
    version = ctx.write("cluster_stats", df)
    ctx.write("cell_stats", cells)
    sizes = [r["n_docs"] for r in tableio.read(s, lake, "cluster_stats", version).select("n_docs").collect()]  # K rows
    return {"summary": share_summary(np.array(sizes), c.min_share)}
