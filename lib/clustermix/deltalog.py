"""Delta tables' metadata, read with delta-rs from the log alone (no Spark, no data scan): versions,
the commit metadata that says whether a stage's output is current, files and row counts."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clustermix.storage import S3Settings


def storage_options(uri: str, s3: S3Settings | None = None) -> dict[str, str] | None:
    """delta-rs storage options for ``uri``: None for a local path; for ``s3://`` the endpoint, region
    and retries of ``s3`` (required there, :mod:`clustermix.storage`; credentials come from the AWS
    default chain)."""
    from clustermix import storage

    return storage.delta_options(uri, s3) or None


def version(uri: str, *, s3: S3Settings | None = None) -> int | None:
    """Latest committed version of the Delta table at ``uri``, or None when there is none."""
    from deltalake import DeltaTable

    opts = storage_options(uri, s3)
    if not DeltaTable.is_deltatable(uri, storage_options=opts):
        return None
    return DeltaTable(uri, storage_options=opts).version()


# the operations of ``clustermix maintain`` (delta-rs compaction and vacuum): they rewrite or delete
# files without changing a table's rows, so they neither make a stage's output stale nor change the
# input versions in the fingerprints of the stages that read it
MAINTENANCE_OPS = frozenset({"OPTIMIZE", "VACUUM START", "VACUUM END"})


def _data_commit(dt: Any) -> tuple[int, dict[str, Any]] | None:
    """The version and history entry of the latest commit of an open ``DeltaTable`` that changed its
    data (anything but :data:`MAINTENANCE_OPS`); None when the history has no such commit."""
    latest, limit = dt.version(), 1  # the latest commit, in the common case: one read of the log
    while True:
        hist = dt.history(limit)  # newest first
        for i, entry in enumerate(hist):
            if entry.get("operation") not in MAINTENANCE_OPS:
                return int(entry.get("version", latest - i)), entry
        if len(hist) < limit:
            return None
        limit *= 8


def data_version(uri: str, *, s3: S3Settings | None = None) -> int | None:
    """The version of the latest commit of ``uri`` that changed its rows (maintenance commits left
    out): what a stage's fingerprint names for an input, so that ``clustermix maintain`` does not make
    the stages that read the table run again. None when there is no table."""
    from deltalake import DeltaTable

    opts = storage_options(uri, s3)
    if not DeltaTable.is_deltatable(uri, storage_options=opts):
        return None
    dt = DeltaTable(uri, storage_options=opts)
    found = _data_commit(dt)
    return found[0] if found is not None else dt.version()


def last_commit_meta(uri: str, *, s3: S3Settings | None = None) -> dict[str, Any] | None:
    """The clustermix metadata of the latest commit of ``uri`` that changed its data (maintenance
    commits are skipped); None if absent or foreign."""
    from deltalake import DeltaTable

    opts = storage_options(uri, s3)
    if not DeltaTable.is_deltatable(uri, storage_options=opts):
        return None
    found = _data_commit(DeltaTable(uri, storage_options=opts))
    if found is None:
        return None
    raw = found[1].get("userMetadata")
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except (TypeError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def is_current(uris: list[str], fp: str, *, s3: S3Settings | None = None) -> bool:
    """True when every output's latest commit (maintenance left out) was written for fingerprint ``fp``."""
    for uri in uris:
        meta = last_commit_meta(uri, s3=s3)
        if meta is None or meta.get("fingerprint") != fp:
            return False
    return True


def num_records(uri: str, at_version: int | None = None, *, s3: S3Settings | None = None) -> int:
    """Row count of the latest (or a pinned) version from the Delta log alone (no data scan)."""
    from deltalake import DeltaTable

    return rows_of(DeltaTable(uri, version=at_version, storage_options=storage_options(uri, s3)))


def file_uris(uri: str, at_version: int | None = None, *, s3: S3Settings | None = None) -> list[str]:
    """The Parquet files of one version of a table, for engines that read files (Ray, pyarrow)."""
    from deltalake import DeltaTable

    files: list[str] = DeltaTable(uri, version=at_version, storage_options=storage_options(uri, s3)).file_uris()
    return files


def rows_of(dt: Any) -> int:
    """Rows of an open ``DeltaTable`` from its log's file statistics; files written without them are
    counted from their footers."""
    import pyarrow as pa

    actions = pa.table(dt.get_add_actions(flatten=True))
    if actions.num_rows == 0:
        return 0
    if "num_records" in actions.column_names and actions.column("num_records").null_count == 0:
        return int(actions.column("num_records").to_numpy().sum())
    return int(dt.to_pyarrow_dataset().count_rows())


def file_counts(uri: str, at_version: int | None = None, *,
                s3: S3Settings | None = None) -> tuple[list[str], list[int | None]]:
    """The Parquet files of one version and each one's row count from the log (None where a file was
    written without statistics)."""
    from deltalake import DeltaTable

    dt = DeltaTable(uri, version=at_version, storage_options=storage_options(uri, s3))
    files = dt.file_uris()
    adds = dt.get_add_actions(flatten=True)
    if "num_records" in adds.schema.names:
        paths, counts = adds.column("path").to_pylist(), adds.column("num_records").to_pylist()
        if len(paths) == len(files) and all(f.endswith("/" + p) for f, p in zip(files, paths, strict=True)):
            return files, list(counts)
    return files, [None] * len(files)


def rows_where(uri: str, at_version: int | None, column: str, value: str, s3: S3Settings | None = None) -> int:
    """Rows of one version whose string ``column`` equals ``value``: from the log's per-file min/max
    where they decide it (a file of one value), else by reading that one column of the file."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from deltalake import DeltaTable

    from clustermix import lake as lk

    dt = DeltaTable(uri, version=at_version, storage_options=storage_options(uri, s3))
    files = dt.file_uris()
    adds = pa.table(dt.get_add_actions(flatten=True)).to_pylist()
    if len(adds) != len(files) or not all(f.endswith("/" + a["path"]) for f, a in zip(files, adds, strict=True)):
        adds = [{} for _ in files]  # no statistics to trust: read the column of every file
    total = 0
    for uri_f, add in zip(files, adds, strict=True):
        lo, hi, rows = add.get(f"min.{column}"), add.get(f"max.{column}"), add.get("num_records")
        if rows is not None and lo is not None and lo == hi and not add.get(f"null_count.{column}"):
            if lo == value:
                total += int(rows)
                continue
            if not value.startswith(lo):  # a truncated statistic is a prefix: read the file then
                continue
        filesystem, path = lk.open_fs(uri_f, s3)
        with filesystem.open_input_file(path) as fh:
            col = pq.read_table(fh, columns=[column]).column(column)
        total += int(pc.sum(pc.equal(col, value)).as_py() or 0)
    return total
