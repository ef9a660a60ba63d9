"""From an allocation (K numbers) to a per-document plan in Spark: draws, then training order.

Per document: ``base = a_k div n_k`` draws, plus one for the first ``a_k mod n_k`` documents of the
cluster in a seeded-hash (or quality) order. Draw ``d`` of the document ranked ``r`` is the
cluster's ``j = d·n_k + r``-th item, so the items of cluster ``k`` are exactly ``0..a_k-1``.

Only documents that can be drawn are ranked. Where a cluster has fewer draws than documents
(``base = 0``, the usual case for large clusters) the drawn ones are the first ``a_k`` in hash
order, so a hash threshold set well above the expected ``a_k``-th hash keeps a prefix of that
order that contains them all; the rest of the cluster never reaches the shuffle. A sentinel row
ranked after each prefix counts it in the same window, and a cluster whose prefix is short fails
the job instead of drawing too few (odds below 1e-15 per cluster: the margin is 8 binomial
standard deviations).

The unit of allocation is a cluster, or with two-level balancing a (cluster, group) cell: the plan
ranks, spreads and orders within whatever ``key`` column names it (``cluster_id``, or ``cell``),
and ``cluster_id`` travels along for the plan's columns.

Positions come from K numbers, never from a global sort. The items before round ``j`` (g2s, s2g)
or before a fraction of the way through (stratified) are a sum over clusters that the driver
computes, so the items are split into groups of known offsets and ranked only within their group;
``random`` maps each item's index in cluster order through a seeded permutation of ``0..B-1``
(swap-or-not) and needs no shuffle at all. No Python runs per row.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

    from clustermix.clusterclip import ClusterSizes
    from clustermix.config import SampleConfig
    from clustermix.levels import CellSizes

ORDERS = ("random", "stratified", "g2s", "s2g")
LONG_MAX = 2**63 - 1
SIGMAS = 8.0  # margin of the candidate threshold above the expected count, in standard deviations
GROUPS_PER_PARTITION = 4  # position groups per shuffle partition: small sorts, balanced tasks
# swap-or-not rounds for the random order: 16 pass the mixing checks in tests/test_plan.py (a crypto-
# strength permutation needs ~6·lg B, which a training order does not); 36 rounds cost 3x as much per
# row as 16 here, likely because the generated code then outgrows what the JVM compiles
PERMUTATION_ROUNDS = 16
ROUNDS_PER_COLUMN = 2  # permutation rounds nested in one column (see permute)


@dataclass(frozen=True)
class Counts:
    """The K numbers of an allocation, in cluster (or cell) order: documents ``n`` and draws ``a``."""

    cluster_id: np.ndarray
    n: np.ndarray
    a: np.ndarray

    @classmethod
    def of(cls, cluster_id: np.ndarray, n: np.ndarray, a: np.ndarray) -> Counts:
        """From K numbers already on the driver, in cluster order."""
        order = np.argsort(np.asarray(cluster_id, dtype=np.int64), kind="stable")
        return cls(*(np.asarray(v, dtype=np.int64)[order] for v in (cluster_id, n, a)))

    @property
    def total(self) -> int:
        return int(self.a.sum())

    def frame(self, spark: SparkSession, within: str, key: str = "cluster_id") -> DataFrame:
        """Per cluster with draws: sizes, ``base``/``extra`` draws, candidate threshold, offset.

        Handed to Spark as an Arrow table, which Spark keeps as a local relation: broadcasting it
        then needs no job (a frame made from Python rows is an RDD, whose broadcast runs a job
        through Python workers: a measurable share of a plan's time; bench/RESULTS.md)."""
        import pyarrow as pa

        off = np.cumsum(self.a) - self.a  # items of earlier clusters: the index of item 0 in cluster order
        keep = (self.n > 0) & (self.a > 0)
        n, a = self.n[keep], self.a[keep]
        base, extra = np.divmod(a, n)
        # quality order has no hash prefix to cut; base > 0 draws every document, all need a rank
        t = [candidate_threshold(int(nk), int(ek)) if within == "uniform" and bk == 0 else LONG_MAX
             for nk, ek, bk in zip(n.tolist(), extra.tolist(), base.tolist(), strict=True)]
        table = pa.table({
            key: pa.array(self.cluster_id[keep], pa.int32()), "n_k": pa.array(n, pa.int64()),
            "a_k": pa.array(a, pa.int64()), "base": pa.array(base, pa.int64()), "extra": pa.array(extra, pa.int64()),
            "t_k": pa.array(t, pa.int64()), "off_k": pa.array(off[keep], pa.int64()),
        })
        return spark.createDataFrame(table)


def candidate_threshold(n: int, extra: int) -> int:
    """The xxhash64 value below which a cluster of ``n`` documents keeps its hash-order prefix:
    ``extra + 8·sqrt(extra + 16) + 64`` documents expected, ``LONG_MAX`` (all) when that is ``n``."""
    want = extra + SIGMAS * math.sqrt(extra + 16) + 64
    if want >= n:
        return LONG_MAX
    return max(int(want / n * 2.0**64) - 2**63, -(2**63))


def doc_draws(members: DataFrame, counts: Counts, seed: int, within: str, key: str = "cluster_id") -> DataFrame:
    """Explode each drawn cluster member into its draws: (id, cluster_id, [key,] draw, j, n_k, a_k, off_k).

    ``members`` has ``id``, ``cluster_id``, ``key`` (when it is another column: the cell) and, for
    ``within='quality'``, ``quality``; ``counts`` is per value of ``key``.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    tie = F.xxhash64(F.lit(seed), F.col("id"))
    keys: list[Column] = [F.col("_h"), F.col("id")]
    if within == "quality":
        keys = [F.col("quality").desc_nulls_last(), *keys]
    alloc = counts.frame(members.sparkSession, within, key)
    # with cells as the key, the cluster travels along for the plan's columns (and the cell for the order)
    carried, cell = ([], []) if key == "cluster_id" else (["cluster_id"], [key])
    # the rank's shuffle carries only what the rank orders by; the cluster's numbers join back after
    # it (a broadcast of K rows): a third fewer bytes shuffled (99.9 -> 65.1 MB at 4M documents).
    # Each DataFrame call is analysed on the driver as it is made (tens of ms), so the steps are
    # folded into as few calls as the plan allows
    quality = ["quality"] if within == "quality" else []
    candidates = (members.join(F.broadcast(alloc.select(key, "t_k")), key)
                  .where(tie <= F.col("t_k"))
                  .select(key, *carried, "id", tie.alias("_h"), F.lit(False).alias("_s"), *quality))
    # one sentinel per cut cluster, after its whole prefix (real hashes there are <= t_k < LONG_MAX):
    # its rank is the prefix's size, so even an empty prefix is caught
    sentinels = alloc.where(F.col("t_k") < LONG_MAX).select(
        key, F.lit(None).cast("string").alias("id"), F.lit(LONG_MAX).alias("_h"), F.lit(True).alias("_s"))
    ranked = candidates.unionByName(sentinels, allowMissingColumns=True).withColumn(
        "r", (F.row_number().over(Window.partitionBy(key).orderBy(*keys)) - 1).cast("bigint")
    ).join(F.broadcast(alloc.drop("t_k")), key)
    n_draws = (F.col("base") + F.when(F.col("r") < F.col("extra"), 1).otherwise(0)).cast("int")
    # one expression, so no rewrite can evaluate the row filter without the check
    keep = F.when(F.col("_s"), F.when(F.col("r") < F.col("extra"), F.raise_error(F.lit(
        "sample: a cluster's hash prefix holds fewer documents than its draws (odds < 1e-15); "
        "rerun with another sample.seed"))).otherwise(F.lit(False))).otherwise(n_draws > 0)
    # draw d of the document ranked r is item j = d·n_k + r: posexplode of that arithmetic sequence
    # yields (d, j) in one generator
    last = F.col("r") + (n_draws.cast("bigint") - 1) * F.col("n_k")
    return ranked.where(keep).select(
        "id", "cluster_id", *cell, F.posexplode(F.sequence(F.col("r"), last, F.col("n_k"))).alias("draw", "j"),
        "n_k", "a_k", "off_k")


def items_before_round(a: np.ndarray, j: np.ndarray) -> np.ndarray:
    """g2s: how many items come before round ``j`` (item ``j`` of each cluster): ``Σ_c min(a_c, j)``."""
    a_sorted = np.sort(a[a > 0])
    prefix = np.concatenate([[0], np.cumsum(a_sorted)])
    m = np.searchsorted(a_sorted, j, side="right")  # clusters exhausted before round j
    return prefix[m] + np.asarray(j, dtype=np.int64) * (len(a_sorted) - m)


def round_bounds(a: np.ndarray, groups: int) -> list[int]:
    """Rounds at which g2s groups start (after group 0), so each group holds about B/groups items."""
    total = int(a.sum())
    target = np.array([total * q // groups for q in range(1, groups)], dtype=np.int64)
    lo: np.ndarray = np.zeros(len(target), dtype=np.int64)
    hi: np.ndarray = np.full(len(target), int(a.max()) if len(a) else 0, dtype=np.int64)
    while (lo < hi).any():  # smallest j with items_before_round(j) >= target, bisected for all targets at once
        mid = (lo + hi) // 2
        ok = items_before_round(a, mid) >= target
        hi, lo = np.where(ok, mid, hi), np.where(ok, lo, mid + 1)
    return [int(v) for v in lo]


def stratified_offsets(a: np.ndarray, groups: int) -> list[int]:
    """Stratified: item j of cluster c is in group ``floor((2j+1)·G / 2a_c)`` (its fraction
    ``(j+½)/a_c`` times G, exactly); the items before group p are those with ``(2j+1)·G < 2p·a_c``."""
    a = a[a > 0].astype(object)  # Python ints: exact for any budget
    return [int(sum(min(max((2 * p * x - 1 - groups) // (2 * groups) + 1, 0), x) for x in a)) for p in range(groups)]


def _bucket(col: Column, bounds: list[int], lo: int = 0, hi: int | None = None) -> Column:
    """How many of the sorted ``bounds`` are <= ``col``: a balanced CASE tree, log2(len) deep."""
    from pyspark.sql import functions as F

    hi = len(bounds) if hi is None else hi
    if lo == hi:
        return F.lit(lo)
    mid = (lo + hi) // 2
    return F.when(col >= F.lit(bounds[mid]), _bucket(col, bounds, mid + 1, hi)).otherwise(_bucket(col, bounds, lo, mid))


def permutation_keys(size: int, seed: int) -> list[int]:
    """Round keys of the swap-or-not permutation of ``0..size-1``: derived from the seed, not drawn."""
    return [int.from_bytes(hashlib.sha256(f"{seed}/{size}/{i}".encode()).digest()[:8], "big") % size
            for i in range(PERMUTATION_ROUNDS)]


def permute(df: DataFrame, start: str, size: int, seed: int, out: str) -> DataFrame:
    """``out`` = a seeded pseudo-random permutation of the SQL expression ``start`` over ``0..size-1``
    (swap-or-not, Hoang, Morris and Rogaway 2012): each round pairs x with ``k - x mod size`` and
    swaps the pair on a hash of the pair, so every round, and the whole, is a bijection for any size.

    A round uses its input four times, so rounds nested in one expression grow fourfold each; a
    column every :data:`ROUNDS_PER_COLUMN` rounds keeps the plan linear (Spark does not inline a
    non-trivial column it would have to repeat), and the repeats within one column are computed once
    (subexpression elimination). Every ``withColumn`` is analysed on the driver as it is made: two
    rounds per column halve that (16 -> 8 calls). Each column is one SQL expression: built from
    Column calls, the 16 rounds took some 1,900 Py4J round trips, over a second of driver time."""
    from pyspark.sql import functions as F

    n = f"CAST({size} AS BIGINT)"
    x = f"CAST(({start}) AS BIGINT)"
    keys = permutation_keys(size, seed)
    for i, k in enumerate(keys):
        partner = f"pmod(CAST({k} AS BIGINT) - ({x}), {n})"
        swap = f"(xxhash64({_int_literal(seed)}, {_int_literal(i)}, greatest({x}, {partner})) & 1) = 1"
        x = f"CASE WHEN {swap} THEN {partner} ELSE {x} END"
        if (i + 1) % ROUNDS_PER_COLUMN == 0 or i + 1 == len(keys):
            df = df.withColumn(out, F.expr(x))
            x = f"`{out}`"
    return df


def _int_literal(v: int) -> str:
    """``v`` as SQL with the type ``F.lit(v)`` gives it (int if it fits, else bigint): hashes depend on it."""
    return f"CAST({v} AS INT)" if -(2**31) <= v < 2**31 else f"CAST({v} AS BIGINT)"


def with_position(items: DataFrame, counts: Counts, order: str, seed: int, a_min: int, partitions: int,
                  key: str = "cluster_id") -> DataFrame:
    """The plan's columns (id, cluster_id, draw, position, phase) for a training order (see DESIGN.md):
    ``position`` is a permutation of 0..B-1. Rounds (g2s, s2g) go over the values of ``key``."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; expected one of {ORDERS}")
    total = counts.total
    if order == "random":
        # index in cluster order (cluster, then j), permuted: no sort, no shuffle
        return _plan_columns(permute(items, "off_k + j", max(total, 1), seed, "position"), F.col("position"),
                             F.lit("random"))
    groups = max(1, partitions) * GROUPS_PER_PARTITION
    cluster_rank = F.xxhash64(F.lit(seed + 1), F.col(key))
    unique = [F.col("id"), F.col("draw")]
    if order == "stratified":
        # item j of cluster k sits at (j + ½)/a_k of the way through: every prefix keeps the mix
        group = F.expr(f"((2 * j + 1) * {groups}) div (2 * a_k)")
        offsets = stratified_offsets(counts.a, groups)
        keys = [(F.col("j").cast("double") + 0.5) / F.col("a_k").cast("double"), cluster_rank, *unique]
        phase = F.lit("stratified")
    else:
        # round-robin: round j holds item j of every cluster that has one; while j < min a_k every
        # cluster is present, so those rounds are cluster-uniform ("general")
        bounds = round_bounds(counts.a, groups)
        group = _bucket(F.col("j"), bounds)
        offsets = [int(v) for v in items_before_round(counts.a, np.array([0, *bounds], dtype=np.int64))]
        keys = [F.col("j"), cluster_rank, *unique]
        phase = F.when(F.col("j") < a_min, "general").otherwise("specific")
    offset = F.element_at(F.array(*[F.lit(o).cast("bigint") for o in offsets]), F.col("_g") + 1)
    ranked = items.withColumn("_g", group.cast("int")).withColumn(
        "position", offset + F.row_number().over(Window.partitionBy("_g").orderBy(*keys)) - 1)
    # s2g is g2s read backwards
    position = F.lit(total - 1).cast("bigint") - F.col("position") if order == "s2g" else F.col("position")
    return _plan_columns(ranked, position, phase)


def _plan_columns(df: DataFrame, position: Column, phase: Column) -> DataFrame:
    """The plan's columns, in the contract's types, in one call."""
    from pyspark.sql import functions as F

    return df.select("id", "cluster_id", F.col("draw").cast("int"), position.cast("bigint").alias("position"),
                     phase.alias("phase"))


def build_plan(members: DataFrame, counts: Counts, *, seed: int, within: str, order: str, a_min: int,
               partitions: int, key: str = "cluster_id") -> DataFrame:
    """The whole per-document plan: (id, cluster_id, draw, position, phase) for the K numbers ``counts``
    (one per value of ``key``)."""
    return with_position(doc_draws(members, counts, seed, within, key), counts, order, seed, a_min, partitions, key)


def make_plan(spark: SparkSession, members: DataFrame, sizes: ClusterSizes, draws: np.ndarray,
              scfg: SampleConfig, partitions: int) -> DataFrame:
    """The per-document plan for a K-vector of draws."""
    return plan_for(members, sizes.cluster_id, sizes.n_docs, draws, scfg, partitions)


def plan_for(members: DataFrame, keys: np.ndarray, n_docs: np.ndarray, draws: np.ndarray, scfg: SampleConfig,
             partitions: int, key: str = "cluster_id") -> DataFrame:
    """The per-document plan for draws per value of ``key`` (clusters, or cells), with ``n_docs`` each."""
    counts = Counts.of(keys, n_docs, draws)
    active = draws[draws > 0]
    a_min = int(active.min()) if len(active) else 0
    return build_plan(members, counts, seed=scfg.seed, within=scfg.within, order=scfg.order, a_min=a_min,
                      partitions=partitions, key=key)


def members_frame(assignments: DataFrame, docs: DataFrame, within: str) -> DataFrame:
    """The cluster members the plan ranks (quality only when the within-cluster choice needs it)."""
    if within == "quality":
        return assignments.select("id", "cluster_id").join(docs.select("id", "quality"), "id")
    return assignments.select("id", "cluster_id")


def cell_members(spark: SparkSession, assignments: DataFrame, docs: DataFrame, cells: CellSizes, group_column: str,
                 within: str) -> DataFrame:
    """The members of each (cluster, group) cell: (id, cluster_id, cell[, quality]). Each document's
    group comes from the same expression the stats used for the cells' sizes; the C cells reach the
    join as a broadcast Arrow table."""
    import pyarrow as pa
    from pyspark.sql import functions as F

    from clustermix.contracts import group_value

    table = pa.table({"cluster_id": pa.array(cells.cluster_id, pa.int32()), "group": pa.array(cells.group, pa.string()),
                      "cell": pa.array(cells.cell, pa.int32())})
    quality = ["quality"] if within == "quality" else []
    grouped = docs.select("id", group_value(group_column).alias("group"), *quality)
    return (assignments.select("id", "cluster_id").join(grouped, "id")
            .join(F.broadcast(spark.createDataFrame(table)), ["cluster_id", "group"])
            .select("id", "cluster_id", "cell", *quality))
