"""Delta tables through Spark: each stage's writes as one transaction carrying its commit metadata,
pinned reads, and the table state loaded ahead of a write.

Every stage writes its outputs as Delta transactions whose commit metadata (``userMetadata``)
carries the run id, the stage and a fingerprint of its inputs and config
(:func:`clustermix.stage.fingerprint`). A stage whose outputs all carry the fingerprint it would
write again is complete and is skipped (:func:`clustermix.deltalog.is_current`).
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from clustermix.deltalog import storage_options, version
from clustermix.lake import Lake, spark_path

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from threading import Thread

    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import StructType

    from clustermix.storage import S3Settings

log = logging.getLogger(__name__)


def persist_corpus(df: DataFrame) -> DataFrame:
    """Persist a frame with a row per input record (corpus-sized) on the executors' local disks only.

    ``MEMORY_AND_DISK`` first unrolls a whole partition into the heap, and at scale the heap is what
    runs out (an executor at 1M records of 1.8 KB died building the cached batches); on disk the cached
    batches are written one by one, so an executor's memory is bounded by its config, not by the input."""
    from pyspark import StorageLevel

    return df.persist(StorageLevel.DISK_ONLY)


def write(df: DataFrame, lake: Lake, name: str, meta: dict[str, Any], *, partition_by: list[str] | None = None,
          max_records_per_file: int | None = None, replace_where: str | None = None) -> int:
    """Overwrite table ``name`` with ``df`` in one Delta transaction; return the new version.

    With ``replace_where`` (a SQL predicate), only the rows matching it are replaced, atomically,
    and the table is created if it does not exist yet."""
    writer = df.write.format("delta").mode("overwrite").option("userMetadata", json.dumps(meta, sort_keys=True))
    if replace_where and version(lake.table(name), s3=lake.s3) is not None:
        writer = writer.option("replaceWhere", replace_where)
    else:
        writer = writer.option("overwriteSchema", "true")
    if partition_by:
        writer = writer.partitionBy(*partition_by)
    if max_records_per_file:
        writer = writer.option("maxRecordsPerFile", str(max_records_per_file))
    writer.save(lake.spark_uri(name))
    v = version(lake.table(name), s3=lake.s3)
    assert v is not None
    return v


# at most this many files: Spark lists more paths than this with a job (its parallelPartitionDiscovery
# threshold), and a larger table amortises Delta's snapshot jobs over a longer scan anyway
FEW_FILES = 32


def read(spark: SparkSession, lake: Lake, name: str, at_version: int | None = None) -> DataFrame:
    """Read table ``name`` (at a pinned version when given) with Spark.

    A pinned version of a small table (a stage's hand-off: ``sample_plan``, ``cluster_stats``) is
    read as its Parquet files, which delta-rs lists from the log in-process (:func:`pinned_files`):
    delta-spark would rebuild the new version's snapshot with three Spark jobs and plan the scan with
    another, a large part of a small stage's fixed cost on one machine (figures: bench/RESULTS.md).
    Other reads use Delta's reader."""
    if at_version is not None and (files := pinned_files(lake.table(name), at_version, s3=lake.s3)) is not None:
        schema, paths = files
        return spark.read.schema(schema).parquet(*paths)
    reader = spark.read.format("delta")
    if at_version is not None:
        reader = reader.option("versionAsOf", str(at_version))
    return reader.load(lake.spark_uri(name))


def pinned_files(uri: str, at_version: int, *, s3: S3Settings | None = None) -> tuple[StructType, list[str]] | None:
    """The Spark schema and the Parquet files (as Spark spells them) of version ``at_version`` of the
    table at ``uri``, when those files alone are that version: at most :data:`FEW_FILES` files, no
    partition columns (their values live in the log) and reader protocol 1 (no column mapping or
    deletion vectors, which need Delta's reader). Otherwise None."""
    from deltalake import DeltaTable
    from pyspark.sql.types import StructType

    dt = DeltaTable(uri, version=at_version, storage_options=storage_options(uri, s3))
    if dt.protocol().min_reader_version > 1 or dt.metadata().partition_columns:
        return None
    files = dt.file_uris()
    if not files or len(files) > FEW_FILES:
        return None
    return StructType.fromJson(json.loads(dt.schema().to_json())), [spark_path(f) for f in files]


def load_state(spark: SparkSession, uri: str, *, s3: S3Settings | None = None) -> None:
    """Have delta-spark compute the state (file list, sizes, domain metadata) of the latest version
    of the table at ``uri``, and keep it cached with that version's snapshot; a no-op when there is
    no table yet.

    Every overwrite, replaceWhere and MERGE needs that state, and delta-spark 4.0 rebuilds it from
    the log with three Spark jobs before the write's own work can start, even for a table of a few
    files (``WriteIntoDelta`` reads the snapshot's domain metadata). Computed ahead, the write finds
    it cached: a 1,000-row overwrite runs 2 jobs instead of 5."""
    from delta.tables import DeltaTable

    if version(uri, s3=s3) is not None:
        DeltaTable.forPath(spark, spark_path(uri)).detail().collect()


def _load_state_quietly(spark: SparkSession, uri: str, s3: S3Settings | None = None) -> None:
    try:
        load_state(spark, uri, s3=s3)
    except Exception as exc:  # only a head start: the write itself will meet any real problem
        log.debug("loading the state of %s ahead of its write failed: %s", uri, exc)


class TableWriter:
    """Writes a stage's tables with the stage's commit metadata; remembers the versions written."""

    def __init__(self, lake: Lake, meta: dict[str, Any], loading: Mapping[str, Thread] | None = None) -> None:
        """``loading``: background loads of this writer's tables that an earlier stage started
        (:meth:`prefetch_next`); this writer reaps them like its own."""
        self.lake, self.meta = lake, meta
        self.versions: dict[str, int] = {}
        self._loading: dict[str, Thread] = dict(loading or {})

    def prefetch(self, spark: SparkSession, names: Iterable[str]) -> None:
        """Start loading the current state of the tables this writer will write (:func:`load_state`)
        in the background, so that it overlaps the stage's reads and planning instead of delaying
        its writes."""
        from pyspark import InheritableThread  # carries the caller's job group and local properties

        for name in names:
            if name not in self._loading:
                thread = InheritableThread(target=_load_state_quietly, args=(spark, self.lake.table(name), self.lake.s3),
                                           name=f"load-state-{name}", daemon=True)
                thread.start()
                self._loading[name] = thread

    def prefetch_next(self, spark: SparkSession, names: Iterable[str]) -> dict[str, Thread]:
        """Start loading the state of tables the *next* stage will write, one after another, once
        this writer's own loads are done, so that they never delay this stage's writes. They run
        while this stage's long Spark jobs keep the driver idle, instead of at the start of the next
        stage, where its write would wait for them (figures: bench/RESULTS.md). Hand the result to the next stage's writer (``loading``), which
        reaps it."""
        from pyspark import InheritableThread

        own = list(self._loading.values())
        uris = [self.lake.table(name) for name in names]
        s3 = self.lake.s3

        def load_after_own() -> None:
            for thread in own:
                thread.join()
            for uri in uris:
                _load_state_quietly(spark, uri, s3)

        thread = InheritableThread(target=load_after_own, name="load-state-next", daemon=True)
        thread.start()
        return {name: thread for name in names}

    def __call__(self, name: str, df: DataFrame, **kwargs: Any) -> int:
        # a write whose table state is still loading waits for it inside delta-spark (the snapshot's
        # state is computed once, under its lock); the thread is reaped after the write
        try:
            v = write(df, self.lake, name, self.meta, **kwargs)
        finally:
            self._reap(name)
        self.versions[name] = v
        return v

    def record(self, name: str, v: int) -> None:
        """Note version ``v`` of ``name``, committed by the stage itself with delta-rs under :attr:`meta`
        (the Ray stages, which have no Spark session)."""
        self._reap(name)
        self.versions[name] = v

    def settle(self) -> None:
        """Wait for the background loads that no write reaped (a stage that failed, or wrote fewer
        tables than it might have)."""
        for name in list(self._loading):
            self._reap(name)

    def _reap(self, name: str) -> None:
        if (thread := self._loading.pop(name, None)) is not None:
            thread.join()

    def read(self, name: str) -> DataFrame:
        """Read back the version of ``name`` this writer committed."""
        from pyspark.sql import SparkSession

        spark = SparkSession.getActiveSession()
        assert spark is not None
        return read(spark, self.lake, name, self.versions[name])

    def merge_commit(self, spark: SparkSession, name: str, action: Any) -> int:
        """Run ``action()`` (a Delta MERGE/DELETE on table ``name``) with this stage's commit metadata."""
        key = "spark.databricks.delta.commitInfo.userMetadata"
        spark.conf.set(key, json.dumps(self.meta, sort_keys=True))
        try:
            action()
        finally:
            spark.conf.unset(key)
            self._reap(name)
        v = version(self.lake.table(name), s3=self.lake.s3)
        assert v is not None
        self.versions[name] = v
        return v
