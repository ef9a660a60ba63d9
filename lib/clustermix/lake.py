"""The lake: table locations, Delta writes with commit metadata, versions, staging, and skipping.

Every stage writes its outputs as Delta transactions whose commit metadata (``userMetadata``)
carries the run id, the stage and a fingerprint of its inputs and config. A stage whose outputs
all carry the fingerprint it would write again is complete and is skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from threading import Thread

    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import StructType

log = logging.getLogger(__name__)


class Lake:
    """Paths under one lake root (a local folder or an object-store URI)."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/") if "://" in root else str(Path(root).expanduser().resolve())

    @property
    def is_local(self) -> bool:
        return "://" not in self.root or self.root.startswith("file://")

    def table(self, name: str) -> str:
        """URI of table ``name`` as delta-rs and pyarrow spell it."""
        return f"{self.root}/{name}"

    def spark_uri(self, name: str) -> str:
        """URI of table ``name`` as Spark's Hadoop filesystems spell it (s3:// -> s3a://)."""
        return spark_path(self.table(name))

    def staging(self, name: str, run_id: str) -> str:
        """A fresh folder for files a Ray stage writes before Spark commits them."""
        return f"{self.root}/_staging/{name}/{run_id}-{uuid.uuid4().hex[:8]}"

    def run_dir(self, run_id: str) -> str:
        return f"{self.root}/runs/{run_id}"

    def remove(self, uri: str) -> None:
        """Remove a staging folder (best effort: a leftover is harmless and never read)."""
        if self.is_local:
            shutil.rmtree(uri, ignore_errors=True)
        else:
            filesystem, path = open_fs(uri)
            with contextlib.suppress(OSError):
                filesystem.delete_dir(path)


def open_fs(uri: str) -> tuple[Any, str]:
    """The pyarrow filesystem and path for a local path (``~`` and relative allowed) or a URI."""
    from pyarrow import fs as pafs

    from clustermix import storage

    if storage.is_s3(uri):  # the configured endpoint, region and retries (clustermix.storage)
        return storage.pyarrow_fs(), uri.split("://", 1)[1].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri.removeprefix("file://")).expanduser().resolve())


def storage_options(uri: str) -> dict[str, str] | None:
    """delta-rs storage options for ``uri``: None for a local path; for ``s3://`` the endpoint, region
    and retries of :mod:`clustermix.storage` (credentials come from the AWS default chain)."""
    from clustermix import storage

    return storage.delta_options(uri) or None


def spark_path(uri: str) -> str:
    """The same location as Spark's Hadoop filesystems spell it (s3:// -> s3a://)."""
    return "s3a://" + uri[len("s3://") :] if uri.startswith("s3://") else uri


def list_parquet(uri: str) -> list[str]:
    """Non-empty Parquet files under a folder (a staging folder written by Ray or Spark)."""
    from pyarrow import fs as pafs

    filesystem, base = open_fs(uri)
    infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    prefix = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    return sorted(prefix + i.path for i in infos if i.path.endswith(".parquet") and i.size and not is_hidden(i.path))


def is_hidden(path: str) -> bool:
    """Files Spark and Delta treat as not data (``_delta_log``, ``.crc``, ``_SUCCESS``)."""
    return path.rsplit("/", 1)[-1].startswith((".", "_"))


def fingerprint(stage: str, config_hash: str, inputs: dict[str, Any]) -> str:
    """What makes a stage's output what it is: its config and the versions of what it read."""
    payload = json.dumps({"stage": stage, "config": config_hash, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def version(uri: str) -> int | None:
    """Latest committed version of the Delta table at ``uri``, or None when there is none."""
    from deltalake import DeltaTable

    opts = storage_options(uri)
    if not DeltaTable.is_deltatable(uri, storage_options=opts):
        return None
    return DeltaTable(uri, storage_options=opts).version()


def last_commit_meta(uri: str) -> dict[str, Any] | None:
    """The clustermix metadata of the latest commit of ``uri`` (None if absent or foreign)."""
    from deltalake import DeltaTable

    opts = storage_options(uri)
    if not DeltaTable.is_deltatable(uri, storage_options=opts):
        return None
    hist = DeltaTable(uri, storage_options=opts).history(1)
    if not hist:
        return None
    raw = hist[0].get("userMetadata")
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except (TypeError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def is_current(uris: list[str], fp: str) -> bool:
    """True when every output's latest commit was written for fingerprint ``fp``."""
    for uri in uris:
        meta = last_commit_meta(uri)
        if meta is None or meta.get("fingerprint") != fp:
            return False
    return True


def write(df: DataFrame, lake: Lake, name: str, meta: dict[str, Any], *, partition_by: list[str] | None = None,
          max_records_per_file: int | None = None, replace_where: str | None = None) -> int:
    """Overwrite table ``name`` with ``df`` in one Delta transaction; return the new version.

    With ``replace_where`` (a SQL predicate), only the rows matching it are replaced, atomically,
    and the table is created if it does not exist yet."""
    writer = df.write.format("delta").mode("overwrite").option("userMetadata", json.dumps(meta, sort_keys=True))
    if replace_where and version(lake.table(name)) is not None:
        writer = writer.option("replaceWhere", replace_where)
    else:
        writer = writer.option("overwriteSchema", "true")
    if partition_by:
        writer = writer.partitionBy(*partition_by)
    if max_records_per_file:
        writer = writer.option("maxRecordsPerFile", str(max_records_per_file))
    writer.save(lake.spark_uri(name))
    v = version(lake.table(name))
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
    another, ~1 s of a blend's fixed cost on one machine. Other reads use Delta's reader."""
    if at_version is not None and (files := pinned_files(lake.table(name), at_version)) is not None:
        schema, paths = files
        return spark.read.schema(schema).parquet(*paths)
    reader = spark.read.format("delta")
    if at_version is not None:
        reader = reader.option("versionAsOf", str(at_version))
    return reader.load(lake.spark_uri(name))


def pinned_files(uri: str, at_version: int) -> tuple[StructType, list[str]] | None:
    """The Spark schema and the Parquet files (as Spark spells them) of version ``at_version`` of the
    table at ``uri``, when those files alone are that version: at most :data:`FEW_FILES` files, no
    partition columns (their values live in the log) and reader protocol 1 (no column mapping or
    deletion vectors, which need Delta's reader). Otherwise None."""
    from deltalake import DeltaTable
    from pyspark.sql.types import StructType

    dt = DeltaTable(uri, version=at_version, storage_options=storage_options(uri))
    if dt.protocol().min_reader_version > 1 or dt.metadata().partition_columns:
        return None
    files = dt.file_uris()
    if not files or len(files) > FEW_FILES:
        return None
    return StructType.fromJson(json.loads(dt.schema().to_json())), [spark_path(f) for f in files]


def num_records(uri: str) -> int:
    """Row count of the latest version from the Delta log alone (no data scan)."""
    from deltalake import DeltaTable

    dt = DeltaTable(uri, storage_options=storage_options(uri))
    actions = dt.get_add_actions(flatten=True)
    if actions.num_rows == 0:
        return 0
    if "num_records" in actions.schema.names:
        counts = actions.column("num_records").to_pylist()
        if all(v is not None for v in counts):
            return int(sum(counts))
    return dt.to_pyarrow_dataset().count_rows()  # files written without statistics


def file_uris(uri: str, at_version: int | None = None) -> list[str]:
    """The Parquet files of one version of a table, for engines that read files (Ray, pyarrow)."""
    from deltalake import DeltaTable

    return DeltaTable(uri, version=at_version, storage_options=storage_options(uri)).file_uris()


class LakeLock:
    """One run at a time per lake; a lock older than ``stale_seconds``, or whose process is gone
    (same host), is taken over.

    A local lake's lock is a file created with O_EXCL; an ``s3://`` lake's is the object
    ``<root>/_lock.json`` created with an S3 conditional write (``If-None-Match: *``) and taken over
    with ``If-Match`` on the stale lock's ETag, so two runs racing for it cannot both win. On S3 this
    is what makes Delta commits safe: delta-spark's S3 LogStore is safe within one driver only.
    Taking the lock is also the run's first request to the object store: a wrong bucket or missing
    credentials fail there, at once, as a :class:`~clustermix.errors.StorageError`. Other object
    stores (gs://, abfs://) get no lock."""

    def __init__(self, lake: Lake, run_id: str, stale_seconds: int) -> None:
        from clustermix import storage

        self.uri = f"{lake.root}/_lock.json"
        self.path = Path(lake.root) / "_lock.json" if lake.is_local else None
        self.remote = storage.is_s3(lake.root)
        self.run_id, self.stale_seconds = run_id, stale_seconds
        self.enabled = lake.is_local or self.remote

    def _stale(self, info: dict[str, Any]) -> bool:
        import socket
        import time

        if time.time() - float(info.get("time", 0)) > self.stale_seconds:
            return True
        if info.get("host") == socket.gethostname():
            try:
                os.kill(int(info.get("pid", -1)), 0)
            except (OSError, ValueError):
                return True
        return False

    def _body(self) -> dict[str, Any]:
        import socket
        import time

        return {"run_id": self.run_id, "pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}

    def _busy(self, info: dict[str, Any]) -> Exception:
        from clustermix.errors import LakeBusyError

        return LakeBusyError(
            f"lake {self.uri.rsplit('/', 1)[0]} is in use by run {info.get('run_id')} (pid {info.get('pid')} on "
            f"{info.get('host')}); wait for it, or remove {self.uri} if that run is dead"
        )

    def acquire(self) -> None:
        from clustermix.errors import LakeBusyError

        if not self.enabled:
            return
        if self.remote:
            self._acquire_s3()
            return
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps(self._body())
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    info = json.loads(self.path.read_text() or "{}")
                except (OSError, ValueError):
                    info = {}
                if self._stale(info):
                    self.path.unlink(missing_ok=True)
                    continue
                raise self._busy(info) from None
            with os.fdopen(fd, "w") as fh:
                fh.write(body)
            return
        raise LakeBusyError(f"could not take the lock {self.path}")

    def _acquire_s3(self) -> None:
        from clustermix import storage
        from clustermix.errors import LakeBusyError

        for _ in range(3):
            if storage.put_json_if(self.uri, self._body(), absent=True):
                return
            held = storage.read_json_object(self.uri)
            if held is None:
                continue  # released between our two requests: try again
            info, etag = held
            if not self._stale(info):
                raise self._busy(info)
            # replace the stale lock only if it is still the one we judged stale
            if storage.put_json_if(self.uri, self._body(), etag=etag):
                return
        raise LakeBusyError(f"could not take the lock {self.uri}: other runs keep taking it")

    def release(self) -> None:
        if not self.enabled:
            return
        if self.remote:
            from clustermix import storage
            from clustermix.errors import StorageError

            try:
                held = storage.read_json_object(self.uri)
                if held is not None and held[0].get("run_id") == self.run_id:
                    storage.delete_object(self.uri)
            except (StorageError, OSError):
                pass  # a lock left behind is taken over once stale
            return
        assert self.path is not None
        try:
            if json.loads(self.path.read_text()).get("run_id") == self.run_id:
                self.path.unlink()
        except (OSError, ValueError):
            pass


def load_state(spark: SparkSession, uri: str) -> None:
    """Have delta-spark compute the state (file list, sizes, domain metadata) of the latest version
    of the table at ``uri``, and keep it cached with that version's snapshot; a no-op when there is
    no table yet.

    Every overwrite, replaceWhere and MERGE needs that state, and delta-spark 4.0 rebuilds it from
    the log with three Spark jobs before the write's own work can start, even for a table of a few
    files (``WriteIntoDelta`` reads the snapshot's domain metadata). Computed ahead, the write finds
    it cached: a 1,000-row overwrite runs 2 jobs instead of 5."""
    from delta.tables import DeltaTable

    if version(uri) is not None:
        DeltaTable.forPath(spark, spark_path(uri)).detail().collect()


def _load_state_quietly(spark: SparkSession, uri: str) -> None:
    try:
        load_state(spark, uri)
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
                thread = InheritableThread(target=_load_state_quietly, args=(spark, self.lake.table(name)),
                                           name=f"load-state-{name}", daemon=True)
                thread.start()
                self._loading[name] = thread

    def prefetch_next(self, spark: SparkSession, names: Iterable[str]) -> dict[str, Thread]:
        """Start loading the state of tables the *next* stage will write, one after another, once
        this writer's own loads are done, so that they never delay this stage's writes. They run
        while this stage's long Spark jobs keep the driver idle, instead of at the start of the next
        stage, where its write would wait for them (the blend stage at 1M documents: ~0.6 s of ~7;
        bench/RESULTS.md). Hand the result to the next stage's writer (``loading``), which
        reaps it."""
        from pyspark import InheritableThread

        own = list(self._loading.values())
        uris = [self.lake.table(name) for name in names]

        def load_after_own() -> None:
            for thread in own:
                thread.join()
            for uri in uris:
                _load_state_quietly(spark, uri)

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
        v = version(self.lake.table(name))
        assert v is not None
        self.versions[name] = v
        return v
