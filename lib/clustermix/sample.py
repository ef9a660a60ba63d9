"""Sample (Spark): ClusterClip over ``cluster_stats`` -> ``sample_plan``.

``sample.balance: clusters`` allocates the budget across clusters; ``groups_then_clusters`` across
the groups of ``sample.group_column`` first, then across the clusters inside each group, over the
(cluster, group) cells of ``cell_stats`` (:mod:`clustermix.levels`). Only the K rows of
``cluster_stats`` (or the C rows of ``cell_stats``) reach the driver; the per-document part is
:mod:`plan`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clustermix import contracts
from clustermix.clusterclip import ClusterSizes, allocate_docs, draws_histogram, share_summary, uniform_targets
from clustermix.errors import ConfigError
from clustermix.levels import CellSizes, allocate_cells, group_targets
from clustermix.plan import cell_members, make_plan, members_frame, plan_for

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from clustermix.config import SampleConfig
    from clustermix.stage import Context


def run_sample(spark: SparkSession, stats: DataFrame, assignments: DataFrame, docs: DataFrame,
               scfg: SampleConfig, min_share: float, partitions: int, write: Any,
               cells: DataFrame | None = None) -> dict[str, Any]:
    """ClusterClip with uniform targets (per cluster, or per group then cluster); writes ``sample_plan``.
    ``cells``: ``cell_stats``, needed by ``balance: groups_then_clusters``."""
    if scfg.balance == "groups_then_clusters":
        if cells is None:
            raise ValueError("balance 'groups_then_clusters' needs cell_stats")
        return _run_two_level(spark, cells, assignments, docs, scfg, min_share, partitions, write)
    sizes = ClusterSizes.from_stats(stats)
    draws, info = allocate_docs(sizes, uniform_targets(sizes), scfg)
    df = make_plan(spark, members_frame(assignments, docs, scfg.within), sizes, draws, scfg, partitions)
    write("sample_plan", contracts.check(df, "sample_plan"))
    info["balance"] = scfg.balance
    info["order"] = scfg.order
    info["draws_per_doc_histogram"] = draws_histogram(sizes.n_docs, draws)
    info["shares_before"] = share_summary(sizes.n_docs, min_share)
    info["shares_after"] = share_summary(draws, min_share)
    info["draws_per_cluster"] = {int(c): int(a) for c, a in zip(sizes.cluster_id, draws, strict=False)}
    return info


def _run_two_level(spark: SparkSession, cell_stats: DataFrame, assignments: DataFrame, docs: DataFrame,
                   scfg: SampleConfig, min_share: float, partitions: int, write: Any) -> dict[str, Any]:
    """Groups first, then the clusters inside each group: per-cell draws, a plan ranked per cell."""
    cells = CellSizes.from_stats(cell_stats, scfg.group_column)  # C rows
    if not cells.group:
        raise ConfigError("sample.balance", scfg.balance, "cell_stats holds no documents")
    targets = group_targets(cells.groups, scfg.group_weights)
    if not (targets * (cells.per_group(cells.n_docs) > 0)).any():
        raise ConfigError("sample.group_weights", scfg.group_weights, f"every group has weight 0 (groups: {cells.groups})")
    draws, info = allocate_cells(cells, targets, scfg)
    members = cell_members(spark, assignments, docs, cells, scfg.group_column, scfg.within)
    df = plan_for(members, cells.cell, cells.n_docs, draws, scfg, partitions, key="cell")
    write("sample_plan", contracts.check(df, "sample_plan"))
    cluster_ids, cluster_docs = cells.per_cluster(cells.n_docs)
    _, cluster_draws = cells.per_cluster(draws)
    group_docs, group_draws = cells.per_group(cells.n_docs), cells.per_group(draws)
    info.update({
        "balance": scfg.balance, "group_column": scfg.group_column, "order": scfg.order,
        "clusters_at_clip": int((cluster_draws >= scfg.clip * cluster_docs).sum()),
        # the cells spread their draws evenly over their documents, so the histogram is exact per cell
        "draws_per_doc_histogram": draws_histogram(cells.n_docs, draws),
        "shares_before": share_summary(cluster_docs, min_share), "shares_after": share_summary(cluster_draws, min_share),
        "group_shares_before": share_summary(group_docs, min_share),
        "group_shares_after": share_summary(group_draws, min_share),
        "draws_per_cluster": {int(c): int(a) for c, a in zip(cluster_ids, cluster_draws, strict=True)},
        "draws_per_group": {g: int(a) for g, a in zip(cells.groups, group_draws, strict=True)},
        "group_targets": {g: float(t) for g, t in zip(cells.groups, targets / targets.sum(), strict=True)},
    })
    return info


def run(ctx: Context, inputs: dict[str, Any]) -> dict[str, Any]:
    """The sample stage, on the versions of its inputs the runner pinned."""
    from clustermix import holdout, kept, tableio

    s, lake, cfg = ctx.spark, ctx.lake, ctx.cfg
    cells = (tableio.read(s, lake, "cell_stats", inputs["cell_stats"])
             if cfg.sample.balance == "groups_then_clusters" else None)
    return run_sample(s, tableio.read(s, lake, "cluster_stats", inputs["cluster_stats"]),
                      kept.assignments(s, lake, inputs, holdout.of(cfg)), tableio.read(s, lake, "docs", inputs["docs"]),
                      cfg.sample, cfg.stats.min_share, cfg.spark.shuffle_partitions, ctx.write, cells)
