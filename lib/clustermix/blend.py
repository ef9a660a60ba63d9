"""Blend (Spark): a plan for the configured target shares, joined with the documents -> ``blended``.

Modes: ``clusterclip`` reuses ``sample_plan``; ``proportional`` spreads configured domain weights
over the clusters that hold each domain; ``quality`` scales uniform shares by mean cluster quality
to the power ``quality_alpha``; ``mixture`` takes weights per cluster from a file (JSON or YAML:
``{cluster_id: weight}``, or ``{"weights": {...}}`` as the search stage writes it) and, with
``mixture_fit: exact``, realises them as token shares (:func:`clustermix.clusterclip.realise_mixture`);
the stage's counts carry the searched weights and the blend's realised token shares per cluster.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

from clustermix import contracts
from clustermix.clusterclip import ClusterSizes, allocate_docs, realise_mixture, total_variation, uniform_targets
from clustermix.contracts import NO_DOMAIN
from clustermix.errors import ConfigError, DataError
from clustermix.plan import make_plan, members_frame

if TYPE_CHECKING:
    from collections.abc import Callable

    from pyspark.sql import Column, DataFrame, SparkSession

    from clustermix.config import BlendConfig, Config, SampleConfig
    from clustermix.lake import Lake
    from clustermix.stage import Context
    from clustermix.storage import S3Settings


def proportional_targets(sizes: ClusterSizes, weights: dict[str, float]) -> np.ndarray:
    """Domain d's weight w_d spread over clusters in proportion to d's documents there."""
    total_w = sum(weights.values())
    if total_w <= 0:
        raise ConfigError("blend.domain_weights", weights, "weights must not all be zero")
    per_domain: dict[str, int] = {}
    for hist in sizes.domains:
        for d, c in hist.items():
            per_domain[d] = per_domain.get(d, 0) + c
    missing = [d for d in weights if d not in per_domain]
    if len(missing) == len(weights):
        raise DataError(f"config error: blend.domain_weights: none of {sorted(weights)} is a domain of the corpus "
                        f"(domains: {sorted(per_domain)})")
    t = np.zeros(len(sizes.cluster_id))
    for i, hist in enumerate(sizes.domains):
        for d, c in hist.items():
            w = weights.get(d, 0.0)
            if w and per_domain[d]:
                t[i] += (w / total_w) * c / per_domain[d]
    return t


def quality_targets(sizes: ClusterSizes, alpha: float) -> np.ndarray:
    """Uniform shares scaled by (mean cluster quality)^alpha; unknown quality counts as the mean."""
    q = sizes.quality.copy()
    known = np.isfinite(q)
    if not known.any():
        raise DataError("config error: blend.mode='quality': no document has a quality value")
    q[~known] = np.nanmean(q)
    q = np.clip(q, 1e-9, None)
    return uniform_targets(sizes) * q**alpha


def mixture_targets(sizes: ClusterSizes, path: str, *, s3: S3Settings | None = None) -> np.ndarray:
    """Weights per cluster from a JSON/YAML file (``s3``: its object store's settings when it is on
    ``s3://``); clusters it does not name get weight 0."""
    import yaml

    from clustermix.lake import open_fs

    filesystem, p = open_fs(path, s3)
    with filesystem.open_input_stream(p) as fh:
        raw = fh.read().decode()
    doc = json.loads(raw) if path.endswith(".json") else yaml.safe_load(raw)
    weights = doc.get("weights", doc) if isinstance(doc, dict) else None
    if not isinstance(weights, dict) or not weights:
        raise ConfigError("blend.mixture_path", path, "expected a mapping of cluster_id to weight")
    t = np.zeros(len(sizes.cluster_id))
    index = {int(c): i for i, c in enumerate(sizes.cluster_id)}
    for key, raw_w in weights.items():
        try:
            c, w = int(key), float(raw_w)
        except (TypeError, ValueError):
            raise ConfigError("blend.mixture_path", path, f"bad entry {key!r}: {raw_w!r}") from None
        if c not in index or w < 0:
            raise ConfigError("blend.mixture_path", path, f"cluster {c} unknown or weight {w} negative")
        t[index[c]] = w
    return t


def targets_for(bcfg: BlendConfig, sizes: ClusterSizes, *, s3: S3Settings | None = None) -> np.ndarray:
    if bcfg.mode == "proportional":
        return proportional_targets(sizes, bcfg.domain_weights)
    if bcfg.mode == "quality":
        return quality_targets(sizes, bcfg.quality_alpha)
    if bcfg.mode == "mixture":
        assert bcfg.mixture_path is not None
        return mixture_targets(sizes, bcfg.mixture_path, s3=s3)
    return uniform_targets(sizes)


def run_blend(spark: SparkSession, stats: DataFrame, assignments: DataFrame, docs: DataFrame, sample_plan: DataFrame,
              bcfg: BlendConfig, scfg: SampleConfig, partitions: int, write: Any, plan_rows: int,
              s3: S3Settings | None = None) -> dict[str, Any]:
    """Write ``blended``: the plan for the blend mode, with what a trainer needs, ordered by position.
    ``plan_rows``: the rows of ``sample_plan`` (from its Delta log: no read of the plan); ``s3``: the
    object-store settings of a mixture file on ``s3://``."""
    info: dict[str, Any]
    if bcfg.mode == "clusterclip":
        planned, info = sample_plan, {"from": "sample_plan"}
        n_rows = plan_rows
    else:
        sizes = ClusterSizes.from_stats(stats)  # a Spark job: only the modes that allocate anew read it
        targets = targets_for(bcfg, sizes, s3=s3)
        if bcfg.mode == "mixture" and bcfg.mixture_fit == "exact":
            draws, fit = realise_mixture(sizes, targets, scfg)
            info = {"mixture": fit}
        else:
            draws, info = allocate_docs(sizes, targets, scfg)
            if bcfg.mode == "mixture":
                info["mixture"] = {"fit": "fill"}
        if bcfg.mode == "mixture":
            info["mixture"]["searched"] = per_cluster(sizes.cluster_id, targets / targets.sum())
        planned = make_plan(spark, members_frame(assignments, docs, scfg.within), sizes, draws, scfg, partitions)
        n_rows = int(draws.sum())
    info["join"] = join_strategy(n_rows, bcfg.broadcast_max_rows)
    out = join_docs(planned, docs, info["join"])
    n_ranges = position_ranges(n_rows, bcfg.target_rows_per_file, partitions)
    out = by_position_range(out, n_ranges, n_rows)
    write("blended", contracts.check(out, "blended"), max_records_per_file=bcfg.target_rows_per_file)
    info["mode"] = bcfg.mode
    return info


def by_position_range(df: DataFrame, n_ranges: int, n_rows: int) -> DataFrame:
    """``df`` in ``n_ranges`` partitions, partition ``i`` holding exactly the positions of range ``i``
    (``floor(position · n_ranges / n_rows)``), each sorted by position: so every file written is one
    contiguous run and the files in order of their first position are the training order.

    Positions are exactly ``0..B-1``, so the ranges need no sampling pass (``repartitionByRange`` would
    run one over the whole join). ``repartition(n, col)`` sends a row to ``pmod(hash(col), n)``, which
    would put two ranges in one partition; each range is therefore keyed by a number that Spark's hash
    sends to that range's own partition (:func:`range_keys`). AQE may merge neighbouring partitions,
    which keeps each one a contiguous run."""
    from pyspark.sql import functions as F

    keys = F.array(*[F.lit(k) for k in range_keys(n_ranges)])
    rng = F.floor(F.col("position") * n_ranges / max(n_rows, 1)).cast("int")
    return (df.withColumn("_range_key", F.element_at(keys, rng + 1)).repartition(n_ranges, "_range_key")
            .drop("_range_key").sortWithinPartitions("position"))


def range_keys(n: int) -> list[int]:
    """Ints ``k_0..k_{n-1}`` with ``pmod(hash(k_i), n) == i``: the partition Spark's hash partitioning
    gives ``k_i`` among ``n``. Spark's ``hash`` of an int is Murmur3 (x86, 32 bits, seed 42) of its
    four bytes (:func:`spark_hash_int`), so the keys are found here, on the driver, without a Spark
    job; the tests check them against Spark's partitioner. About ``n·ln n`` ints are tried."""
    found: dict[int, int] = {}
    k = 0
    while len(found) < n:
        found.setdefault(spark_hash_int(k) % n, k)  # Python's % is pmod: never negative
        k += 1
    return [found[i] for i in range(n)]


_M32 = 0xFFFFFFFF


def _rotl32(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _M32


def spark_hash_int(value: int, seed: int = 42) -> int:
    """Spark's ``hash()`` of an int column (``Murmur3_x86_32.hashInt``), as a signed 32-bit int."""
    k1 = _rotl32((value & _M32) * 0xCC9E2D51 & _M32, 15) * 0x1B873593 & _M32
    h1 = (_rotl32((seed & _M32) ^ k1, 13) * 5 + 0xE6546B64) & _M32
    h1 ^= 4  # the input's length in bytes
    h1 = (h1 ^ (h1 >> 16)) * 0x85EBCA6B & _M32
    h1 = (h1 ^ (h1 >> 13)) * 0xC2B2AE35 & _M32
    h1 ^= h1 >> 16
    return h1 - (1 << 32) if h1 >= 1 << 31 else h1


MIN_ROWS_PER_RANGE = 10_000  # below this a range's file is smaller than the task that writes it is worth


def position_ranges(n_rows: int, target_rows_per_file: int, partitions: int) -> int:
    """How many contiguous position ranges ``blended`` is shuffled into (one write task each).

    At least one per ``target_rows_per_file`` rows (the write splits a larger range into several
    files), and at least ``partitions`` while each range keeps ``MIN_ROWS_PER_RANGE`` rows, so that a
    blend of a few files is still sorted and written by every core, not by one task."""
    by_file = max(1, -(-n_rows // target_rows_per_file))
    by_cores = min(max(1, partitions), max(1, n_rows // MIN_ROWS_PER_RANGE))
    return max(by_file, by_cores)


def join_strategy(n_rows: int, broadcast_max_rows: int) -> str:
    """``broadcast`` when the plan's rows fit under the bound, else ``shuffle``."""
    return "broadcast" if n_rows <= broadcast_max_rows else "shuffle"


def join_docs(planned: DataFrame, docs: DataFrame, strategy: str) -> DataFrame:
    """The plan with each drawn document's columns, in the columns of ``blended``.

    ``broadcast``: every executor holds the plan (B rows) and streams ``docs`` past it, so the
    documents (their text: the whole corpus) are read once and never shuffled; only the B drawn
    rows move, once, into their position ranges. ``shuffle``: a sort-merge join that shuffles both
    sides by id, for plans too large to hold in memory. The choice is made here, on the row count,
    not left to Spark's estimate from file sizes (``spark.sql.autoBroadcastJoinThreshold``: 10 MB
    of Parquet, under a million plan rows), which would shuffle the corpus for any larger plan.
    """
    from pyspark.sql import functions as F

    cols = docs.select("id", "text", "domain", "quality", "n_tokens")
    if strategy == "broadcast":
        joined = broadcast_join(planned, cols, F.xxhash64)
    else:
        joined = planned.hint("shuffle_merge").join(cols, "id")
    return joined.select("id", "text", "cluster_id", "domain", "quality", "n_tokens", "draw", "position", "phase")


def broadcast_join(planned: DataFrame, cols: DataFrame, key: Callable[[Column], Column]) -> DataFrame:
    """``planned`` joined to ``cols`` on ``id`` through a broadcast keyed by ``key(id)``, a 64-bit hash.

    On a long key Spark builds a ``LongHashedRelation``, faster to build and to probe, for every row
    of the corpus, than a map keyed by the id strings (figures: bench/RESULTS.md). The ids are then compared as a condition of the join (a CASE, which
    the optimizer cannot turn back into a join key), so a hash collision cannot pair a document
    with another's draws."""
    from pyspark.sql import functions as F

    plan = planned.withColumnRenamed("id", "_plan_id").withColumn("_key", key(F.col("_plan_id")))
    same = F.when(F.col("_plan_id") == F.col("id"), True).otherwise(False)
    return cols.withColumn("_key", key(F.col("id"))).join(F.broadcast(plan), "_key").where(same).drop(
        "_key", "_plan_id")


def per_cluster(cluster_ids: np.ndarray, values: np.ndarray) -> dict[str, float]:
    """K numbers as the manifest keeps them: cluster id -> value, rounded to 8 digits."""
    return {str(int(c)): round(float(v), 8) for c, v in zip(cluster_ids, values, strict=True)}


def cluster_tokens(blended: DataFrame) -> dict[str, int]:
    """Tokens per cluster of a written blend (K rows to the driver)."""
    from pyspark.sql import functions as F

    rows = blended.groupBy("cluster_id").agg(F.sum("n_tokens").alias("tokens")).collect()
    return {str(int(r["cluster_id"])): int(r["tokens"] or 0) for r in sorted(rows, key=lambda r: r["cluster_id"])}


def mixture_realised(searched: dict[str, float], tokens: dict[str, int]) -> dict[str, Any]:
    """The searched weights against the blend's token shares per cluster, and their total variation."""
    total = sum(tokens.values())
    realised = {c: round(tokens.get(c, 0) / total, 8) if total else 0.0 for c in searched}
    keys = sorted(searched, key=int)
    tv = total_variation(np.array([searched[c] for c in keys]), np.array([tokens.get(c, 0) for c in keys]))
    return {"realised": realised, "total_variation": round(tv, 6)}


def domain_mix(blended: DataFrame) -> dict[str, dict[str, int]]:
    """Draws and tokens per domain of a written blend (D rows to the driver)."""
    from pyspark.sql import functions as F

    rows = blended.groupBy("domain").agg(F.count("*").alias("draws"), F.sum("n_tokens").alias("tokens")).collect()
    return dict(sorted(((r["domain"] or NO_DOMAIN), {"draws": int(r["draws"]), "tokens": int(r["tokens"] or 0)})
                       for r in rows))


def mixture_file(cfg: Config, lake: Lake) -> str | None:
    """The blend's mixture file: ``blend.mixture_path``, where ``search`` names the search's output."""
    p = cfg.blend.mixture_path
    return lake.best_mixture_uri() if p == "search" else p


def stage_inputs(ctx: Context) -> dict[str, Any]:
    """A mixture blend depends on the mixture file's content, not just its name."""
    import hashlib

    from clustermix.lake import open_fs

    p = mixture_file(ctx.cfg, ctx.lake)
    if ctx.cfg.blend.mode != "mixture" or not p:
        return {}
    filesystem, path = open_fs(p, ctx.lake.s3)
    with filesystem.open_input_stream(path) as fh:
        return {"mixture_sha256": hashlib.sha256(fh.read()).hexdigest()[:16]}


def run(ctx: Context, inputs: dict[str, Any]) -> dict[str, Any]:
    """The blend stage, on the versions of its inputs the runner pinned; also the draws per domain."""
    from clustermix import deltalog, holdout, kept, tableio

    s, lake, cfg = ctx.spark, ctx.lake, ctx.cfg
    bcfg = cfg.blend.model_copy(update={"mixture_path": mixture_file(cfg, lake)})
    info = run_blend(s, tableio.read(s, lake, "cluster_stats", inputs["cluster_stats"]),
                     kept.assignments(s, lake, inputs, holdout.of(cfg)), tableio.read(s, lake, "docs", inputs["docs"]),
                     tableio.read(s, lake, "sample_plan", inputs["sample_plan"]), bcfg, cfg.sample,
                     cfg.spark.shuffle_partitions, ctx.write,
                     plan_rows=deltalog.num_records(lake.table("sample_plan"), inputs["sample_plan"], s3=lake.s3),
                     s3=lake.s3)
    blended = tableio.read(s, lake, "blended", ctx.write.versions["blended"])
    info["draws_by_domain"] = domain_mix(blended)
    if "mixture" in info:
        info["mixture"].update(mixture_realised(info["mixture"]["searched"], cluster_tokens(blended)))
    return info
