"""From an allocation (K numbers) to a per-document plan in Spark: draws, then training order.

Per document: ``base = a_k div n_k`` draws, plus one for the first ``a_k mod n_k`` documents of the
cluster in a seeded-hash (or quality) order. Draw ``d`` of the document ranked ``r`` is the
cluster's ``j = d·n_k + r``-th item, so the items of cluster ``k`` are exactly ``0..a_k-1``.
Positions are a global rank computed without a single-partition window: range-partition by the
order key, sort within partitions, and add each partition's offset (one number per partition).
No Python runs per row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

ORDERS = ("random", "stratified", "g2s", "s2g")


def alloc_frame(spark: SparkSession, cluster_ids: list[int], sizes: list[int], draws: list[int]) -> DataFrame:
    """The K-row allocation table the per-document job joins (broadcast) against."""
    rows = [(int(c), int(n), int(a)) for c, n, a in zip(cluster_ids, sizes, draws, strict=False)]
    return spark.createDataFrame(rows, "cluster_id int, n_k bigint, a_k bigint")


def doc_draws(members: DataFrame, alloc: DataFrame, seed: int, within: str) -> DataFrame:
    """Explode each cluster member into its draws: (id, cluster_id, draw, j, n_k, a_k).

    ``members`` has ``id``, ``cluster_id`` and, for ``within='quality'``, ``quality``.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    tie = F.xxhash64(F.lit(seed), F.col("id"))
    keys: list[Column] = [tie, F.col("id")]
    if within == "quality":
        keys = [F.col("quality").desc_nulls_last(), *keys]
    ranked = members.join(F.broadcast(alloc), "cluster_id").withColumn(
        "r", (F.row_number().over(Window.partitionBy("cluster_id").orderBy(*keys)) - 1).cast("bigint"))
    base = F.floor(F.col("a_k") / F.col("n_k"))
    extra = F.col("a_k") - base * F.col("n_k")
    n_draws = (base + F.when(F.col("r") < extra, 1).otherwise(0)).cast("int")
    return (
        ranked.withColumn("_n", n_draws).where(F.col("_n") > 0)
        .withColumn("draw", F.explode(F.sequence(F.lit(0), F.col("_n") - 1)))
        .withColumn("j", F.col("draw").cast("bigint") * F.col("n_k") + F.col("r"))
        .drop("_n", "r")
    )


def order_key(order: str, seed: int, a_min: int) -> tuple[list[Column], Column]:
    """Sort keys and phase for a training order (see DESIGN.md)."""
    from pyspark.sql import functions as F

    cluster_rank = F.xxhash64(F.lit(seed + 1), F.col("cluster_id"))
    unique = [F.col("id"), F.col("draw")]
    if order == "random":
        return [F.xxhash64(F.lit(seed), F.col("id"), F.col("draw")), *unique], F.lit("random")
    if order == "stratified":
        # item j of cluster k sits at (j + ½)/a_k of the way through: every prefix keeps the mix
        frac = (F.col("j").cast("double") + 0.5) / F.col("a_k").cast("double")
        return [frac, cluster_rank, *unique], F.lit("stratified")
    if order in ("g2s", "s2g"):
        # round-robin: round j holds item j of every cluster that has one; while j < min a_k every
        # cluster is present, so those rounds are cluster-uniform ("general")
        phase = F.when(F.col("j") < a_min, "general").otherwise("specific")
        if order == "g2s":
            return [F.col("j"), cluster_rank, *unique], phase
        return [F.col("j").desc(), cluster_rank.desc(), F.col("id").desc(), F.col("draw").desc()], phase
    raise ValueError(f"unknown order {order!r}; expected one of {ORDERS}")


def global_position(df: DataFrame, keys: list[Column], partitions: int) -> DataFrame:
    """Add ``position`` = 0-based rank of each row by ``keys`` (unique), scalably."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    spark = df.sparkSession
    ranked = (
        df.repartitionByRange(partitions, *keys).sortWithinPartitions(*keys)
        .withColumn("_pid", F.spark_partition_id())
        .withColumn("_mid", F.monotonically_increasing_id())
        .persist(StorageLevel.MEMORY_AND_DISK)
    )
    stats = sorted(
        (r["_pid"], r["n"], r["m0"])
        for r in ranked.groupBy("_pid").agg(F.count("*").alias("n"), F.min("_mid").alias("m0")).collect()
    )
    offsets, running = [], 0
    for pid, n, m0 in stats:  # one row per partition: O(partitions) on the driver
        offsets.append((int(pid), running - int(m0)))
        running += int(n)
    off = spark.createDataFrame(offsets, "_pid int, _off bigint")
    return ranked.join(F.broadcast(off), "_pid").withColumn(
        "position", (F.col("_mid") + F.col("_off")).cast("bigint")).drop("_pid", "_mid", "_off")


def build_plan(members: DataFrame, alloc: DataFrame, *, seed: int, within: str, order: str, a_min: int,
               partitions: int) -> DataFrame:
    """The whole per-document plan: (id, cluster_id, draw, position, phase)."""
    from pyspark.sql import functions as F

    draws = doc_draws(members, alloc, seed, within)
    keys, phase = order_key(order, seed, a_min)
    planned = global_position(draws.withColumn("phase", phase), keys, partitions)
    return planned.select("id", "cluster_id", F.col("draw").cast("int"), "position", "phase")
