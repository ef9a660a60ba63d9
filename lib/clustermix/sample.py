"""Sample (Spark): ClusterClip over ``cluster_stats`` -> ``sample_plan``.

Only the K rows of ``cluster_stats`` reach the driver (:mod:`clusterclip` allocates); the
per-document part is :mod:`plan`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clustermix import contracts
from clustermix.clusterclip import ClusterSizes, allocate_docs, draws_histogram, share_summary, uniform_targets
from clustermix.plan import make_plan, members_frame

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from clustermix.config import SampleConfig
    from clustermix.stage import Context


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


def run(ctx: Context, inputs: dict[str, Any]) -> dict[str, Any]:
    """The sample stage, on the versions of its inputs the runner pinned."""
    from clustermix import tableio

    s, lake, cfg = ctx.spark, ctx.lake, ctx.cfg
    return run_sample(s, tableio.read(s, lake, "cluster_stats", inputs["cluster_stats"]),
                      tableio.read(s, lake, "assignments", inputs["assignments"]), tableio.read(s, lake, "docs", inputs["docs"]),
                      cfg.sample, cfg.stats.min_share, cfg.spark.shuffle_partitions, ctx.write)
