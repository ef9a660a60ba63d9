"""``clustermix refresh``: the nightly run over a corpus that grows.

Takes only the input files that are new (or changed) since the last refresh, ingests them into the
existing tables, embeds only documents without an embedding, assigns them to the existing
centroids, measures drift, and refits k-means on everything only when the drift passes the
configured thresholds (or ``--recluster``). Statistics, sampling and blend then rerun on the
result. Every step is skipped when its inputs did not change, so a refresh with nothing new
writes no data table, and one that died half-way is completed by the next: ingest replaces the
rows of the files it takes (never doubles them) and the ledger of taken files is written only
after those rows are committed. A bad file skipped under ``ingest.on_bad_file: skip`` is taken
too, with its reason: it is tried again when it changes, not every night while it does not.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from clustermix import lake as lk
from clustermix import runs
from clustermix.config import Config
from clustermix.drift import Decision, decide, measure
from clustermix.errors import InputError
from clustermix.pipeline import Run, default_stages, run_one, session

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


def run_refresh(cfg: Config, *, recluster: bool = False, run_id: str | None = None,
                spark: SparkSession | None = None) -> Run:
    """One refresh of the lake at ``cfg.lake.root`` from ``cfg.input.path`` (see the module doc)."""
    from clustermix.badfiles import bad_in
    from clustermix.ingest import InputSpec, resolve_input

    if cfg.input.format == "delta":
        raise InputError("refresh takes new files of a jsonl or parquet input; for a Delta input table use "
                         "`clustermix run`")
    stages = default_stages(cfg)
    with session(cfg, run_id, spark, mode="refresh") as run:
        spec = resolve_input(cfg, run.lake.root)
        taken = runs.taken_files(run.lake)
        if taken is None or lk.version(run.lake.table("centroids")) is None:
            # the first night: everything there is, with a fit of its own
            run.manifest["mode"] = "bootstrap"
            log.info("refresh: no earlier refresh on %s: running every stage over all input", run.lake.root)
            for stage in stages:
                run_one(run, stage, stages)
            assert run.input_spec is not None
            files = run.input_spec.listing["files"]
            run.manifest["inputs_taken"] = sorted(files)
            runs.record_taken(run.lake, files, run.run_id, bad_in(run.lake, list(files)))
        else:
            new = runs.new_files(spec.listing["files"], taken)
            run.manifest["inputs_taken"] = sorted(new)
            log.info("refresh: %d new or changed input files of %d", len(new), len(spec.listing["files"]))
            if new:
                inc = InputSpec(spec.path, spec.format, {"files": new})
                run.input_spec = InputSpec(spec.path, spec.format, inc.listing, files=tuple(inc.spark_files()))
                run.run_stage("ingest", _ingest_increment, {"input": {"files": new}, "path": spec.path,
                                                            "mode": "increment"}, then="embed")
                runs.record_taken(run.lake, new, run.run_id, bad_in(run.lake, list(new)))
            else:
                run.manifest["stages"]["ingest"] = {"status": "skipped", "reason": "no new input files"}
            run_one(run, "embed", stages, then="assign")
            run.run_stage("assign", _assign, {"recluster": recluster}, then="stats")
            for stage in stages:
                if stage not in ("ingest", "embed", "cluster"):
                    run_one(run, stage, stages)
    return run


def _ingest_increment(run: Run, write: lk.TableWriter, inputs: dict[str, Any]) -> dict[str, Any]:
    from clustermix.ingest import run_ingest_increment

    assert run.input_spec is not None
    return run_ingest_increment(run.spark, run.cfg, run.input_spec, run.run_id, write, run.lake)


def _assign(run: Run, write: lk.TableWriter, inputs: dict[str, Any]) -> dict[str, Any]:
    """Assign new embeddings to the existing centroids, or refit when drift (or the user) says so."""
    from clustermix.cluster import assign_missing, read_centroids, run_cluster
    from clustermix.models import model_id

    run.ray()
    spark, lake, cfg = run.spark, run.lake, run.cfg
    model = model_id(cfg.embed.model)
    fitted = lk.read(spark, lake, "centroids", inputs["centroids"]).select("k", "model").limit(1).collect()
    config_changed = not fitted or fitted[0]["k"] != cfg.cluster.k or fitted[0]["model"] != model
    staging, n_new = None, 0
    if not config_changed:
        centroids = read_centroids(spark, lake, inputs["centroids"])  # the version the stage pinned
        staging, n_new = assign_missing(spark, lake, cfg.cluster, model, inputs["embeddings"], centroids, run.run_id)
    decision = decide(_figures(run, staging, int(fitted[0]["k"]) if fitted else cfg.cluster.k), cfg.refresh,
                      forced=bool(inputs.get("recluster")), config_changed=config_changed)
    run.manifest["drift"] = decision.to_dict()
    log.info("refresh: drift %s -> %s %s", {k: v for k, v in decision.figures.items() if k.endswith(
        ("drop", "shift", "fraction"))}, "refit" if decision.refit else "keep the clustering", decision.reasons)
    try:
        if decision.refit:
            res = run_cluster(spark, lake, cfg.cluster, model, inputs["embeddings"], run.run_id, write)
            return {**_summary(decision, n_new), "refit": res}
        _commit_assignments(run, write, model, inputs["embeddings"], staging)
        return _summary(decision, n_new)
    finally:
        if staging:
            lake.remove(staging)


def _summary(decision: Decision, n_new: int) -> dict[str, Any]:
    return {"decision": "refit" if decision.refit else "keep", "reasons": decision.reasons, "assigned": n_new,
            "drift": decision.figures}


def _figures(run: Run, staging: str | None, k: int) -> dict[str, Any]:
    """Per-cluster counts and score sums of the old assignments and the new ones (K rows each)."""
    from pyspark.sql import functions as F

    def per_cluster(df: Any, far: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        aggs = [F.count("*").alias("n"), F.sum("score").alias("s"),
                F.sum(F.when(F.col("score") < run.cfg.refresh.far_score, 1).otherwise(0)).alias("far")]
        n, s, f = np.zeros(k), np.zeros(k), np.zeros(k)
        for r in df.groupBy("cluster_id").agg(*aggs).collect():
            c = int(r["cluster_id"])
            if 0 <= c < k:
                n[c], s[c], f[c] = r["n"], r["s"] or 0.0, r["far"] if far else 0
        return n, s, f

    old_n, old_s, _ = per_cluster(lk.read(run.spark, run.lake, "assignments"), far=False)
    if staging is None:
        new_n, new_s, new_f = np.zeros(k), np.zeros(k), np.zeros(k)
    else:
        new_n, new_s, new_f = per_cluster(run.spark.read.parquet(lk.spark_path(staging)), far=True)
    return measure(old_n, old_s, new_n, new_s, new_f)


def _commit_assignments(run: Run, write: lk.TableWriter, model: str, emb_version: int, staging: str | None) -> None:
    """One MERGE: insert the new assignments, drop those of documents that no longer have an embedding."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    spark, lake = run.spark, run.lake
    ids = lk.read(spark, lake, "embeddings", emb_version).where(F.col("model") == model).select("id")
    stale = lk.read(spark, lake, "assignments").select("id").join(ids, "id", "left_anti").limit(1).count()
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

