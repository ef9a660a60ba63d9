"""Blend: the join that brings the documents to the plan, and the ordered ``blended`` table."""

from __future__ import annotations

import contextlib
import io
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from clustermix import deltalog, tableio
from clustermix import lake as lk
from clustermix.blend import (
    MIN_ROWS_PER_RANGE,
    broadcast_join,
    by_position_range,
    join_docs,
    join_strategy,
    position_ranges,
    range_keys,
    run_blend,
    spark_hash_int,
)
from clustermix.clusterclip import allocate
from clustermix.config import BlendConfig, SampleConfig
from clustermix.plan import Counts, build_plan

SIZES = [40, 25, 10, 5]


@pytest.fixture(scope="module")
def tables(spark):
    members, docs = [], []
    for k, n in enumerate(SIZES):
        for i in range(n):
            members.append((f"c{k}-{i}", k))
            docs.append((f"c{k}-{i}", f"text {k} {i}", ["web", "code"][i % 2], i / n, 10 + i))
    members_df = spark.createDataFrame(members, "id string, cluster_id int")
    docs_df = spark.createDataFrame(docs, "id string, text string, domain string, quality double, n_tokens bigint")
    return members_df, docs_df


def _plan(spark, members, budget):
    a = allocate(np.array(SIZES), np.ones(len(SIZES)), budget, 4)
    alloc = Counts.of(np.arange(len(SIZES)), np.array(SIZES), a.draws)
    active = a.draws[a.draws > 0]
    return build_plan(members, alloc, seed=3, within="uniform", order="stratified", a_min=int(active.min()),
                      partitions=2)


def _small_plan(spark):
    rows = [(f"c0-{i}", 0, 0, i, "stratified") for i in range(30)]
    return spark.createDataFrame(rows, "id string, cluster_id int, draw int, position bigint, phase string")


def test_position_ranges_keep_every_core_busy_without_tiny_files():
    per = MIN_ROWS_PER_RANGE
    assert position_ranges(120, 50, 2) == 3  # small blend: one range per file
    assert position_ranges(1_000_000, 250_000, 8) == 8  # 4 files' worth, spread over 8 write tasks
    assert position_ranges(1_000_000, 250_000, 2) == 4  # never fewer than the files
    assert position_ranges(3 * per, 250_000, 8) == 3  # ranges keep MIN_ROWS_PER_RANGE rows
    assert position_ranges(per - 1, 250_000, 8) == 1
    assert position_ranges(0, 250_000, 8) == 1


def _physical(df) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        df.explain()
    return buf.getvalue()


def test_join_strategy_is_the_row_bound():
    assert join_strategy(1_000, 1_000) == "broadcast"
    assert join_strategy(1_001, 1_000) == "shuffle"
    assert join_strategy(1, 0) == "shuffle"  # 0: never broadcast
    assert BlendConfig().broadcast_max_rows > 0


def test_below_the_bound_docs_are_streamed_past_a_broadcast_plan_not_shuffled(spark, tables):
    _, docs = tables
    text = _physical(join_docs(_small_plan(spark), docs, "broadcast"))
    assert "BroadcastHashJoin" in text and "SortMergeJoin" not in text
    assert "Exchange hashpartitioning" not in text  # neither side is shuffled by id


def test_the_broadcast_is_keyed_by_a_long_and_the_ids_are_compared(spark, tables):
    _, docs = tables
    text = _physical(join_docs(_small_plan(spark), docs, "broadcast"))
    assert re.search(r"HashedRelationBroadcastMode\(List\(input\[\d+, bigint, false\]\)", text)  # not the id string
    assert "(_plan_id" in text and "= id" in text  # the ids checked after the probe


def test_a_colliding_key_never_pairs_a_document_with_anothers_draws(spark, tables):
    from pyspark.sql import functions as F

    _, docs = tables
    plan = _small_plan(spark)
    cols = docs.select("id", "text", "domain", "quality", "n_tokens")
    # two key values for all ids: almost every probe meets rows of other documents
    got = broadcast_join(plan, cols, lambda c: F.pmod(F.xxhash64(c), F.lit(2))).select("id", "text", "position")
    want = plan.join(cols, "id").select("id", "text", "position")
    rows = sorted(tuple(r) for r in got.collect())
    assert rows == sorted(tuple(r) for r in want.collect())
    assert rows and all(text.split()[1:] == ident.removeprefix("c").split("-") for ident, text, _ in rows)


def test_above_the_bound_both_sides_are_shuffled_by_id_even_when_spark_would_broadcast(spark, tables):
    _, docs = tables
    # a few KB: Spark's own size threshold would broadcast it
    text = _physical(join_docs(_small_plan(spark), docs, "shuffle"))
    assert "SortMergeJoin" in text and "BroadcastHashJoin" not in text
    assert text.count("Exchange hashpartitioning(id") == 2


def test_blended_is_the_same_whichever_join(spark, tables, tmp_path):
    members, docs = tables
    lake = lk.Lake(str(tmp_path / "lake"))
    budget = 120
    scfg = SampleConfig(budget=budget, order="stratified")
    writer = tableio.TableWriter(lake, {"test": True})
    writer("sample_plan", _plan(spark, members, budget))
    results = {}
    for bound in (budget, budget - 1):
        bcfg = BlendConfig(broadcast_max_rows=bound, target_rows_per_file=50)
        info = run_blend(spark, None, members, docs, writer.read("sample_plan"), bcfg, scfg, 2, writer,
                         plan_rows=deltalog.num_records(lake.table("sample_plan")))
        rows = writer.read("blended").collect()
        results[info["join"]] = [tuple(r) for r in sorted(rows, key=lambda r: r["position"])]
        assert [r["position"] for r in sorted(rows, key=lambda r: r["position"])] == list(range(budget))
        files = deltalog.file_uris(lake.table("blended"))
        assert len(files) == 3  # ceil(120 / 50) position ranges
        # each file: one contiguous, sorted run of positions, so a trainer streams files in order
        runs = sorted(pq.read_table(f.removeprefix("file://"), columns=["position"])["position"].to_pylist()
                      for f in files)
        assert [p for run in runs for p in run] == list(range(budget))
    assert set(results) == {"broadcast", "shuffle"}
    assert results["broadcast"] == results["shuffle"]


def test_local_session_uses_one_delta_state_task_per_core_and_no_shuffle_or_broadcast_compression(spark):
    # the test session runs local[2]: Delta's default of 50 tasks per new table version would apply otherwise
    assert spark.conf.get("spark.databricks.delta.snapshotPartitions") == "2"
    assert spark.conf.get("spark.shuffle.compress") == "false"  # shuffle files stay on this machine
    assert spark.conf.get("spark.broadcast.compress") == "false"


def test_session_builds_columns_without_capturing_python_call_sites(spark):
    from pyspark.errors.utils import is_debugging_enabled

    assert spark.conf.get("spark.python.sql.dataFrameDebugging.enabled") == "false"
    assert not is_debugging_enabled()  # what PySpark's Column calls consult


def test_spark_hash_int_is_sparks_hash_of_an_int(spark):
    from pyspark.sql import functions as F

    values = [0, 1, -1, 7, 42, 1000, 2**31 - 1, -(2**31), 123_456_789, -987_654_321]
    rows = spark.createDataFrame([(v,) for v in values], "v int").select("v", F.hash("v").alias("h")).collect()
    assert [spark_hash_int(r["v"]) for r in rows] == [r["h"] for r in rows]


@pytest.mark.parametrize("n", [1, 3, 8, 37, 200])
def test_range_keys_land_each_range_in_its_own_shuffle_partition(spark, n):
    from pyspark.sql import functions as F

    keys = range_keys(n)
    assert len(set(keys)) == n
    frame = spark.createDataFrame([(i, k) for i, k in enumerate(keys)], "i int, k int")
    spark.conf.set("spark.sql.adaptive.enabled", "false")  # the partitioner itself, no coalescing
    try:
        placed = frame.repartition(n, "k").select("i", F.spark_partition_id().alias("p")).collect()
    finally:
        spark.conf.unset("spark.sql.adaptive.enabled")
    assert sorted((r["i"], r["p"]) for r in placed) == [(i, i) for i in range(n)]


def test_by_position_range_gives_contiguous_sorted_partitions(spark):
    from pyspark.sql import functions as F

    n_rows, n_ranges = 1_000, 12
    # positions arrive scrambled, as after the join
    df = spark.range(n_rows).select(((F.col("id") * 7919) % n_rows).alias("position"))
    parts = by_position_range(df, n_ranges, n_rows).rdd.glom().map(lambda rows: [r["position"] for r in rows]).collect()
    runs = [p for p in parts if p]
    assert all(run == list(range(run[0], run[0] + len(run))) for run in runs)  # each one sorted, contiguous
    assert sorted(p for run in runs for p in run) == list(range(n_rows))


def test_mixture_blend_realises_the_searched_token_shares(spark, tables, tmp_path):
    """blend.mode=mixture, mixture_fit=exact: the blend's token shares per cluster are the file's
    weights although one weight is more than the clip lets a small cluster give at this budget; the
    old fill moves that weight to the other clusters. Both record searched against realised."""
    import json

    from pyspark.sql import functions as F

    from clustermix.blend import cluster_tokens, mixture_realised

    members, docs = tables
    stats = (members.join(docs, "id").groupBy("cluster_id")
             .agg(F.count("*").alias("n_docs"), F.sum("n_tokens").alias("n_tokens"),
                  F.lit(None).cast("double").alias("quality_mean"),
                  F.lit(None).cast("map<string,bigint>").alias("domains")))
    path = tmp_path / "mixture.json"
    path.write_text(json.dumps({"weights": {"0": 0.3, "1": 0.2, "2": 0.1, "3": 0.4}}))
    scfg = SampleConfig(budget=100, clip=4, order="stratified")
    lake = lk.Lake(str(tmp_path / "lake"))
    writer = tableio.TableWriter(lake, {"test": True})
    out = {}
    for fit in ("exact", "fill"):
        bcfg = BlendConfig(mode="mixture", mixture_path=str(path), mixture_fit=fit)
        info = run_blend(spark, stats, members, docs, None, bcfg, scfg, 2, writer, plan_rows=0)
        m = info["mixture"]
        m.update(mixture_realised(m["searched"], cluster_tokens(writer.read("blended"))))
        out[fit] = (m, writer.read("blended").groupBy("cluster_id").count().collect())
        assert m["searched"] == {"0": 0.3, "1": 0.2, "2": 0.1, "3": 0.4} and m["fit"] == fit
    exact, fill = out["exact"][0], out["fill"][0]
    assert exact["limited_by_cluster"] == 3 and exact["scale"] < 1
    assert {r["cluster_id"]: r["count"] for r in out["exact"][1]}[3] == 4 * 5  # cluster 3 at its clip
    assert exact["total_variation"] < 0.03, exact
    assert fill["total_variation"] > 0.15, fill  # clipped cluster 3's weight went elsewhere
