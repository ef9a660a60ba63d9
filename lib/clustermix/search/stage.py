"""The search stage (Spark + Ray): CLIMB over the clusters -> ``mixtures`` and the best mixture file.

Spark pre-draws, once, everything the proxies read (see :mod:`.climb`): the target texts (a JSONL
file, or a domain of the corpus held out from training; at most ``search.target_max_docs``) and a
per-cluster sample of the trainable documents, at most ``pool_tokens_per_cluster`` estimated proxy
tokens per cluster in a seeded-hash order, as Parquet folders under ``_staging/`` that are
removed afterwards. Only K numbers (tokens per cluster) and the K centroids reach the driver.
Ray trains the proxies; the driver writes the ``mixtures`` table (one row per trained proxy) and
``<lake.root>/search/best_mixture.json``, which ``blend.mode: mixture`` reads.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clustermix import kept, tableio
from clustermix import lake as lk
from clustermix.errors import ConfigError, DataError
from clustermix.manifest import write_json
from clustermix.search.climb import Proxy, ray_evaluate, run_climb
from clustermix.search.mixtures import build_space, merge_clusters
from clustermix.search.predictor import spearman
from clustermix.search.proxy import WORD_PATTERN, ProxySpec

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

    from clustermix.config import Config, SearchConfig
    from clustermix.lake import Lake
    from clustermix.stage import Context
    from clustermix.tableio import TableWriter

log = logging.getLogger(__name__)

MIXTURES_SCHEMA = (
    "iteration int, mixture_id string, kind string, weights map<int,double>, proxy_score double, "
    "predicted_score double, seed bigint, tokens bigint, max_passes double, seconds double, is_best boolean, "
    "run_id string"
)


def best_mixture_uri(lake: Lake) -> str:
    """Where the best mixture goes: what ``blend.mixture_path`` should point at."""
    return lake.best_mixture_uri()


def proxy_spec(scfg: SearchConfig) -> ProxySpec:
    """The proxy settings of ``search.*``, as the picklable spec each task gets."""
    return ProxySpec(scfg.tokenizer, scfg.vocab_size, scfg.proxy_d_model, scfg.proxy_layers, scfg.proxy_heads,
                     scfg.proxy_context, scfg.proxy_batch_size, scfg.proxy_tokens, scfg.proxy_lr,
                     scfg.target_max_tokens, scfg.device, scfg.torch_threads, scfg.seed)


def token_estimate(text: Column, tokenizer: str) -> Column:
    """Proxy tokens of a text, computed by Spark (exact for bytes; the word tokenizer's pattern)."""
    from pyspark.sql import functions as F

    if tokenizer == "bytes":
        return F.octet_length(text).cast("bigint")
    return F.regexp_count(F.lower(text), F.lit(WORD_PATTERN)).cast("bigint")


def target_fingerprint(scfg: SearchConfig) -> dict[str, Any]:
    """What the search depends on besides tables and config: the target file's content (pass it
    as the stage's extra inputs, as the blend does for its mixture file)."""
    import hashlib

    from clustermix.lake import open_fs

    p = scfg.target_path
    if p is None:
        return {}
    check_target(scfg)
    filesystem, path = open_fs(p)
    digest = hashlib.sha256()
    with filesystem.open_input_stream(path) as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return {"target_sha256": digest.hexdigest()[:16]}


def check_target(scfg: SearchConfig) -> None:
    """The search needs a target set; fail before any work when none is configured."""
    if scfg.target_path is None and scfg.target_domain is None:
        raise ConfigError("search.target_path", None, "the search needs a target set: set search.target_path "
                          "(JSONL with a text field) or search.target_domain (a domain held out from training)")
    p = scfg.target_path
    if p is not None and "://" not in p and not Path(p).is_file():
        raise ConfigError("search.target_path", p, "file not found")


def target_frame(spark: SparkSession, docs: DataFrame, scfg: SearchConfig) -> DataFrame:
    """The target texts, at most ``target_max_docs`` in a seeded order: ``rank`` (a seeded hash; the
    order is by ``rank``, then ``text_hash``), ``text``, ``text_hash``."""
    from pyspark.sql import functions as F

    check_target(scfg)
    if scfg.target_domain is not None:
        src = docs.where(F.col("domain") == scfg.target_domain).select("text", "text_hash")
    else:
        src = spark.read.json(lk.spark_path(scfg.target_path or ""))
        if scfg.target_text_field not in src.columns:
            raise ConfigError("search.target_text_field", scfg.target_text_field,
                              f"no such field in {scfg.target_path} (fields: {sorted(src.columns)})")
        text = F.col(scfg.target_text_field).cast("string")
        src = src.where(text.isNotNull() & (F.length(text) > 0)).select(text.alias("text"))
        src = src.withColumn("text_hash", F.sha2("text", 256))
    key = F.xxhash64(F.lit(scfg.seed), F.col("text_hash"))
    # top-N per partition, then merged: no single-partition sort of the whole source
    return src.orderBy(key, "text_hash").limit(scfg.target_max_docs).select(key.alias("rank"), "text", "text_hash")


def trainable(assignments: DataFrame, docs: DataFrame, target: DataFrame, scfg: SearchConfig) -> DataFrame:
    """Cluster members a proxy may train on: not in the held-out domain, not a target text."""
    from pyspark.sql import functions as F

    d = docs.select("id", "text", "domain", "text_hash")
    if scfg.target_domain is not None:
        d = d.where(F.col("domain").isNull() | (F.col("domain") != scfg.target_domain))
    d = d.join(F.broadcast(target.select("text_hash")), "text_hash", "left_anti")
    return assignments.select("id", "cluster_id").join(d.select("id", "text"), "id") \
        .withColumn("ptokens", token_estimate(F.col("text"), scfg.tokenizer)).drop("text")


def pool_frame(members: DataFrame, docs: DataFrame, pool_tokens: int, seed: int) -> DataFrame:
    """Per cluster, documents in a seeded-hash order while the tokens before them are under
    ``pool_tokens``: (cluster_id, rank, before, ptokens, text)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    w = Window.partitionBy("cluster_id").orderBy(F.xxhash64(F.lit(seed), F.col("id")), "id")
    ranked = members.withColumn("rank", F.row_number().over(w) - 1) \
        .withColumn("before", F.sum("ptokens").over(w.rowsBetween(Window.unboundedPreceding, 0)) - F.col("ptokens"))
    kept = ranked.where(F.col("before") < pool_tokens)
    return kept.join(docs.select("id", "text"), "id").select("cluster_id", "rank", "before", "ptokens", "text")


def run_search(spark: SparkSession, lake: Lake, cfg: Config, inputs: dict[str, int], run_id: str,
               write: TableWriter) -> dict[str, Any]:
    """CLIMB over the clusters of ``assignments``; writes ``mixtures`` and the best mixture file.

    ``inputs`` pins the versions of ``docs``, ``assignments`` and ``centroids``. Returns the
    manifest's counts: iterations, proxies trained, best and uniform-baseline scores, seconds.
    """
    from pyspark.sql import functions as F

    t0 = time.time()
    scfg = cfg.search
    check_target(scfg)
    clip = scfg.clip or cfg.sample.clip
    pool_tokens = scfg.pool_tokens_per_cluster or scfg.proxy_tokens
    docs = tableio.read(spark, lake, "docs", inputs.get("docs"))
    assignments = kept.assignments(spark, lake, inputs)  # without the semantic duplicates
    cents = tableio.read(spark, lake, "centroids", inputs.get("centroids")).select("cluster_id", "centroid") \
        .orderBy("cluster_id").collect()  # K rows
    cluster_ids = np.array([r["cluster_id"] for r in cents], dtype=np.int64)
    target_uri, pool_uri = lake.staging("search_target", run_id), lake.staging("search_pool", run_id)
    members = None
    try:
        target = target_frame(spark, docs, scfg)
        target.select("rank", "text", "text_hash").coalesce(1).write.mode("overwrite").parquet(lk.spark_path(target_uri))
        n_target = _count_rows(target_uri)
        if n_target == 0:
            where = f"domain {scfg.target_domain!r}" if scfg.target_domain else scfg.target_path
            raise DataError(f"search: the target set ({where}) has no texts")
        members = trainable(assignments, docs, spark.read.parquet(lk.spark_path(target_uri)), scfg).persist()
        per = {int(r["cluster_id"]): int(r["t"] or 0)
               for r in members.groupBy("cluster_id").agg(F.sum("ptokens").alias("t")).collect()}  # K rows
        tokens = np.array([per.get(int(c), 0) for c in cluster_ids], dtype=np.int64)
        pool_frame(members, docs, pool_tokens, scfg.seed).repartition(cfg.spark.shuffle_partitions, "cluster_id") \
            .sortWithinPartitions("cluster_id", "rank").write.mode("overwrite").partitionBy("cluster_id") \
            .parquet(lk.spark_path(pool_uri))
        groups = None
        if scfg.merge_threshold is not None or scfg.merge_to is not None:
            groups = merge_clusters(np.array([r["centroid"] for r in cents], dtype=np.float64), tokens,
                                    scfg.merge_threshold, scfg.merge_to)
        space = build_space(cluster_ids, tokens, scfg.proxy_tokens, clip, pool_tokens, scfg.size_power, groups)
        log.info("search: %d clusters (%d search dimensions), %d target texts", len(cluster_ids), space.dims, n_target)
        evaluate = ray_evaluate(pool_uri, target_uri, cluster_ids, proxy_spec(scfg), scfg.cpus_per_proxy,
                                scfg.gpus_per_proxy)
        records = run_climb(space, scfg, evaluate)
    finally:
        if members is not None:
            members.unpersist()
        lake.remove(pool_uri)
        lake.remove(target_uri)
    best = min(records, key=lambda r: (r.score, r.iteration, r.mixture_id))
    write("mixtures", mixtures_frame(spark, records, cluster_ids, best, run_id).coalesce(1))
    uniform = next((r for r in records if r.kind == "uniform"), None)
    doc = best_document(best, cluster_ids, uniform, run_id, scfg, clip)
    write_json(best_mixture_uri(lake), doc)
    later = [r for r in records if r.predicted is not None]
    return {
        "iterations": len(scfg.iterations), "proxies_trained": len(records),
        "proxies_per_iteration": [sum(r.iteration == i for r in records) for i in range(1, len(scfg.iterations) + 1)],
        "best_score": best.score, "best_mixture_id": best.mixture_id,
        "uniform_score": uniform.score if uniform else None,
        "predicted_vs_proxy_spearman": spearman(np.array([r.predicted for r in later]),
                                                np.array([r.score for r in later])),
        "clusters": len(cluster_ids), "search_dims": space.dims, "target_texts": n_target,
        "trainable_tokens": int(tokens.sum()), "best_mixture_path": best_mixture_uri(lake),
        "seconds": round(time.time() - t0, 2),
    }


def _count_rows(uri: str) -> int:
    return sum(n or 0 for n in lk.parquet_rows(lk.list_parquet(uri)))


def mixtures_frame(spark: SparkSession, records: list[Proxy], cluster_ids: np.ndarray, best: Proxy,
                   run_id: str) -> DataFrame:
    """One row per trained proxy (weights as a map cluster_id -> weight)."""
    rows = [(r.iteration, r.mixture_id, r.kind, {int(c): float(w) for c, w in zip(cluster_ids, r.weights, strict=True)},
             r.score, r.predicted, r.seed, int(r.info.get("tokens", 0)), float(r.info.get("max_passes", 0.0)),
             float(r.info.get("seconds", 0.0)), r is best, run_id) for r in records]
    return spark.createDataFrame(rows, MIXTURES_SCHEMA)


def best_document(best: Proxy, cluster_ids: np.ndarray, uniform: Proxy | None, run_id: str, scfg: SearchConfig,
                  clip: int) -> dict[str, Any]:
    """The JSON ``blend.mode: mixture`` reads (``weights``), with how it was found."""
    return {
        "weights": {str(int(c)): round(float(w), 8) for c, w in zip(cluster_ids, best.weights, strict=True)},
        "score": best.score, "uniform_score": uniform.score if uniform else None,
        "mixture_id": best.mixture_id, "iteration": best.iteration, "seed": best.seed, "run_id": run_id,
        "score_is": "proxy cross-entropy on the target set, nats per token (lower is better)",
        "target": {"path": scfg.target_path, "domain": scfg.target_domain},
        "proxy": {"tokenizer": scfg.tokenizer, "tokens": scfg.proxy_tokens, "d_model": scfg.proxy_d_model,
                  "layers": scfg.proxy_layers, "clip": clip},
    }


def stage_inputs(ctx: Context) -> dict[str, Any]:
    return target_fingerprint(ctx.cfg.search)


def run(ctx: Context, inputs: dict[str, Any]) -> dict[str, Any]:
    """The search stage: CLIMB on the pinned inputs (proxies trained as Ray tasks)."""
    ctx.ray()
    return run_search(ctx.spark, ctx.lake, ctx.cfg, inputs, ctx.run_id, ctx.write)
