"""Reading the lake: a pinned small table through its files, everything else through Delta's reader."""

from __future__ import annotations

from clustermix import deltalog, tableio
from clustermix import lake as lk


def scanned_by(df) -> str:
    """The file index of the (single) scan Spark plans for ``df``."""
    plan = df._jdf.queryExecution().executedPlan().toString()
    return "files" if "InMemoryFileIndex" in plan else "delta" if "DeltaFileIndex" in plan else plan


def delta_at(spark, lake: lk.Lake, name: str, at_version: int):
    return spark.read.format("delta").option("versionAsOf", str(at_version)).load(lake.spark_uri(name))


def test_a_pinned_small_table_is_read_from_its_files_as_delta_reads_that_version(spark, tmp_path):
    lake = lk.Lake(str(tmp_path))
    frame = "id, cast(id * 3 as string) as s, cast(id as int) as k, current_timestamp() as t"
    v0 = tableio.write(spark.range(10).repartition(3).selectExpr(*frame.split(", ")), lake, "t", {})
    v1 = tableio.write(spark.range(20, 25).selectExpr(*frame.split(", ")), lake, "t", {})
    for v in (v0, v1):
        got = tableio.read(spark, lake, "t", v)
        assert scanned_by(got) == "files"
        want = delta_at(spark, lake, "t", v)
        assert got.schema == want.schema
        assert sorted(got.collect()) == sorted(want.collect())
    assert sorted(r["id"] for r in tableio.read(spark, lake, "t", v0).collect()) == list(range(10))


def test_tables_whose_files_alone_are_not_the_table_are_read_by_delta(spark, tmp_path):
    lake = lk.Lake(str(tmp_path))
    rows = spark.range(tableio.FEW_FILES + 8).selectExpr("id", "cast(id % 2 as int) as part")
    v = tableio.write(rows, lake, "parted", {}, partition_by=["part"])
    parted = tableio.read(spark, lake, "parted", v)
    assert scanned_by(parted) == "delta"  # partition values live in the log, not in the files
    assert sorted(parted.collect()) == sorted(delta_at(spark, lake, "parted", v).collect())

    v = tableio.write(rows, lake, "many", {}, max_records_per_file=1)  # one file per row
    assert tableio.pinned_files(lake.table("many"), v) is None
    assert scanned_by(tableio.read(spark, lake, "many", v)) == "delta"

    assert scanned_by(tableio.read(spark, lake, "parted")) == "delta"  # the latest version: Delta's reader


def jobs_run_by(spark, group: str, action) -> int:
    """How many Spark jobs ``action()`` runs (in this thread)."""
    sc = spark.sparkContext
    sc.setJobGroup(group, group)
    try:
        action()
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
    return len(sc.statusTracker().getJobIdsForGroup(group))


def test_a_write_finds_the_state_loaded_ahead_of_it(spark, tmp_path):
    lake = lk.Lake(str(tmp_path))
    rows = spark.range(100).selectExpr("id", "cast(id as string) as s")
    for _ in range(2):  # an overwrite after our own commit: the state of that new version is not loaded
        tableio.write(rows, lake, "t", {})
    plain = jobs_run_by(spark, "plain", lambda: tableio.write(rows, lake, "t", {}))
    jobs_run_by(spark, "load", lambda: tableio.load_state(spark, lake.table("t")))
    ahead = jobs_run_by(spark, "ahead", lambda: tableio.write(rows, lake, "t", {}))
    assert ahead < plain, (ahead, plain)
    assert tableio.read(spark, lake, "t").count() == 100


def test_prefetch_in_the_background_leaves_writes_as_they_were(spark, tmp_path):
    lake = lk.Lake(str(tmp_path))
    tableio.write(spark.range(5).selectExpr("id"), lake, "t", {})
    writer = tableio.TableWriter(lake, {"stage": "test"})
    writer.prefetch(spark, ["t", "new"])  # "new" does not exist yet: nothing to load
    assert writer("t", spark.range(10, 13).selectExpr("id")) == 1
    assert writer("new", spark.range(2).selectExpr("id")) == 0
    assert sorted(r["id"] for r in writer.read("t").collect()) == [10, 11, 12]
    assert sorted(r["id"] for r in writer.read("new").collect()) == [0, 1]
    assert deltalog.last_commit_meta(lake.table("t")) == {"stage": "test"}
    assert not writer._loading  # every background load was reaped by its write
    writer.prefetch(spark, ["t"])
    writer.settle()  # a load no write reaped
    assert not writer._loading

    tableio.load_state(spark, str(tmp_path / "absent"))  # no table: a no-op, not an error


def test_the_next_stage_finds_the_state_the_stage_before_loaded_for_it(spark, tmp_path):
    lake = lk.Lake(str(tmp_path))
    rows = spark.range(100).selectExpr("id", "cast(id as string) as s")
    for _ in range(2):  # the newest version is our own commit: its state is not loaded
        tableio.write(rows, lake, "next", {})
    plain = jobs_run_by(spark, "plain", lambda: tableio.write(rows, lake, "next", {}))

    first = tableio.TableWriter(lake, {"stage": "first"})
    first.prefetch(spark, ["t"])
    ahead = first.prefetch_next(spark, ["next", "absent"])  # "absent" has no table yet: nothing to load
    assert set(ahead) == {"next", "absent"}
    assert first("t", rows) == 0
    assert set(first._loading) == set()  # the next stage's loads are not this writer's to reap
    second = tableio.TableWriter(lake, {"stage": "second"}, loading=ahead)
    ahead["next"].join()  # as when the first stage's own work outlasts the load
    loaded = jobs_run_by(spark, "loaded", lambda: second("next", rows.where("id < 10")))
    assert loaded < plain, (loaded, plain)
    assert second("absent", rows) == 0
    assert not second._loading
    assert tableio.read(spark, lake, "next").count() == 10
    assert deltalog.last_commit_meta(lake.table("next")) == {"stage": "second"}
