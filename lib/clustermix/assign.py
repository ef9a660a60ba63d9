"""The assign stage: embeddings without an assignment -> ``assignments`` to the existing centroids.

What a nightly refresh runs instead of ``cluster``: new documents are assigned to the centroids
already fitted (a streaming pass), drift between the old and the new documents is measured, and
k-means is refitted on everything only when the drift passes the ``refresh.*`` thresholds (or the
run asks for it: ``clustermix refresh --recluster``). The decision lands in the manifest.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from clustermix import lake as lk
from clustermix import tableio
from clustermix.drift import Decision, decide, measure

if TYPE_CHECKING:
    from clustermix.stage import Context

log = logging.getLogger(__name__)


def stage_inputs(ctx: Context) -> dict[str, Any]:
    """A forced refit (``clustermix refresh --recluster``) is an input of its own."""
    return {"recluster": bool(ctx.options.get("recluster"))}


def run(ctx: Context, inputs: dict[str, Any]) -> dict[str, Any]:
    """Assign new embeddings to the existing centroids, or refit when drift (or the user) says so."""
    from clustermix.kmeans_dist import assign_missing, read_centroids, run_cluster
    from clustermix.models import model_id

    ctx.ray()
    spark, lake, cfg, write = ctx.spark, ctx.lake, ctx.cfg, ctx.write
    model = model_id(cfg.embed.model)
    fitted = tableio.read(spark, lake, "centroids", inputs["centroids"]).select("k", "model").limit(1).collect()
    config_changed = not fitted or fitted[0]["k"] != cfg.cluster.k or fitted[0]["model"] != model
    staging, n_new = None, 0
    if not config_changed:
        centroids = read_centroids(spark, lake, inputs["centroids"])  # the version the stage pinned
        staging, n_new = assign_missing(spark, lake, cfg.cluster, model, inputs["embeddings"], centroids, ctx.run_id)
    decision = decide(_figures(ctx, staging, int(fitted[0]["k"]) if fitted else cfg.cluster.k), cfg.refresh,
                      forced=bool(inputs.get("recluster")), config_changed=config_changed)
    ctx.manifest["drift"] = decision.to_dict()
    log.info("refresh: drift %s -> %s %s", {k: v for k, v in decision.figures.items() if k.endswith(
        ("drop", "shift", "fraction"))}, "refit" if decision.refit else "keep the clustering", decision.reasons)
    try:
        if decision.refit:
            res = run_cluster(spark, lake, cfg.cluster, model, inputs["embeddings"], ctx.run_id, write)
            return {**_summary(decision, n_new), "refit": res}
        _commit_assignments(ctx, model, inputs["embeddings"], staging)
        return _summary(decision, n_new)
    finally:
        if staging:
            lake.remove(staging)


def _summary(decision: Decision, n_new: int) -> dict[str, Any]:
    return {"decision": "refit" if decision.refit else "keep", "reasons": decision.reasons, "assigned": n_new,
            "drift": decision.figures}


def _figures(ctx: Context, staging: str | None, k: int) -> dict[str, Any]:
    """Per-cluster counts and score sums of the old assignments and the new ones (K rows each)."""
    from pyspark.sql import functions as F

    def per_cluster(df: Any, far: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        aggs = [F.count("*").alias("n"), F.sum("score").alias("s"),
                F.sum(F.when(F.col("score") < ctx.cfg.refresh.far_score, 1).otherwise(0)).alias("far")]
        n, s, f = np.zeros(k), np.zeros(k), np.zeros(k)
        for r in df.groupBy("cluster_id").agg(*aggs).collect():
            c = int(r["cluster_id"])
            if 0 <= c < k:
                n[c], s[c], f[c] = r["n"], r["s"] or 0.0, r["far"] if far else 0
        return n, s, f

    old_n, old_s, _ = per_cluster(tableio.read(ctx.spark, ctx.lake, "assignments"), far=False)
    if staging is None:
        new_n, new_s, new_f = np.zeros(k), np.zeros(k), np.zeros(k)
    else:
        new_n, new_s, new_f = per_cluster(ctx.spark.read.parquet(lk.spark_path(staging)), far=True)
    return measure(old_n, old_s, new_n, new_s, new_f)


def _commit_assignments(ctx: Context, model: str, emb_version: int, staging: str | None) -> None:
    """One MERGE: insert the new assignments, drop those of documents that no longer have an embedding."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    spark, lake, write = ctx.spark, ctx.lake, ctx.write
    ids = tableio.read(spark, lake, "embeddings", emb_version).where(F.col("model") == model).select("id")
    stale = tableio.read(spark, lake, "assignments").select("id").join(ids, "id", "left_anti").limit(1).count()
    if staging is None and not stale:
        return  # nothing new, nothing gone: no commit, so a repeated refresh changes nothing
    new = spark.read.parquet(lk.spark_path(staging)).select("id", "cluster_id", "score") if staging else \
        spark.createDataFrame([], "id string, cluster_id int, score float")
    source = ids.join(new, "id", "left")
    target = DeltaTable.forPath(spark, lake.spark_uri("assignments"))

    def merge() -> None:
        (target.alias("t").merge(source.alias("s"), "t.id = s.id")
         .whenNotMatchedInsert(condition="s.cluster_id IS NOT NULL",
                               values={"id": "s.id", "cluster_id": "s.cluster_id", "score": "s.score"})
         .whenNotMatchedBySourceDelete()
         .execute())

    write.merge_commit(spark, "assignments", merge)

