"""Delta tables through delta-rs: how the Ray stages (embed, cluster, assign) commit, with no JVM.

A Ray node has no Java, so these stages never open a Spark session. They commit with the same
commit metadata as the Spark stages (``userMetadata``: run id, stage, fingerprint; see
:mod:`clustermix.tableio`), so :func:`clustermix.deltalog.is_current` skips a stage whichever engine
wrote its tables, and Spark stages read the tables as before.

Large outputs never pass through the driver: workers write Parquet files into a folder of the
table (:func:`write_part`, each named by a hash of its ids, so a retried task that writes the same
rows again overwrites its own file instead of adding a copy), and the driver commits the files they
report in one transaction of add actions (:func:`commit_parts`). A file no commit names is not part
of the table (``maintain``'s vacuum removes it).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from clustermix import deltalog
from clustermix import lake as lk

if TYPE_CHECKING:
    import pyarrow as pa

    from clustermix.storage import S3Settings


def arrow_schema(table: str) -> pa.Schema:
    """The Arrow schema a Ray stage writes ``table`` with: every column nullable and lists of nullable
    elements, as Spark declares them, so a table first written by Spark takes appends and MERGEs
    from delta-rs (and back) with the same Delta schema."""
    import pyarrow as pa

    vector = pa.list_(pa.field("element", pa.float32()))
    fields: dict[str, list[tuple[str, pa.DataType]]] = {
        "embeddings": [("id", pa.string()), ("embedding", vector), ("model", pa.string())],
        "centroids": [("cluster_id", pa.int32()), ("centroid", vector), ("k", pa.int32()), ("niter", pa.int32()),
                      ("seed", pa.int64()), ("objective", pa.float64()), ("model", pa.string()),
                      ("fit_meta", pa.string())],
        "assignments": [("id", pa.string()), ("cluster_id", pa.int32()), ("score", pa.float32())],
        "mixtures": [("iteration", pa.int32()), ("mixture_id", pa.string()), ("kind", pa.string()),
                     ("weights", pa.map_(pa.int32(), pa.float64())), ("proxy_score", pa.float64()),
                     ("predicted_score", pa.float64()), ("seed", pa.int64()), ("tokens", pa.int64()),
                     ("max_passes", pa.float64()), ("seconds", pa.float64()), ("is_best", pa.bool_()),
                     ("run_id", pa.string())],
        "evaluations": [("run_id", pa.string()), ("mix", pa.string()), ("seed_index", pa.int32()), ("seed", pa.int64()),
                        ("group_kind", pa.string()), ("group", pa.string()), ("n_docs", pa.int64()),
                        ("bytes", pa.int64()), ("loss_bits_per_byte", pa.float64()), ("train_tokens", pa.int64())],
        "semantic_duplicates": [("id", pa.string()), ("duplicate_of", pa.string()), ("cluster_id", pa.int32()),
                                ("similarity", pa.float32()), ("domain", pa.string()), ("run_id", pa.string())],
    }
    return pa.schema([pa.field(n, t, nullable=True) for n, t in fields[table]])


@dataclass(frozen=True)
class Part:
    """A Parquet file written into a table's folder that no version names yet."""

    path: str  # relative to the table root, as an add action names it
    size: int
    rows: int


def write_part(table: pa.Table, table_uri: str, folder: str, s3: S3Settings | None = None) -> Part | None:
    """Write ``table`` (which has an ``id`` column) as one Parquet file under ``<table_uri>/<folder>/``.

    The name is a hash of the ids it holds: a task retried on the same rows writes the same file
    again, never a second copy. ``s3``: the driver's object-store settings (a Ray worker has none of
    its own). None for an empty table."""
    import pyarrow.parquet as pq

    if table.num_rows == 0:
        return None
    digest = hashlib.sha256("\n".join(table.column("id").to_pylist()).encode()).hexdigest()[:32]
    rel = f"{folder}/part-{digest}.parquet"
    filesystem, base = lk.open_fs(table_uri, s3)
    filesystem.create_dir(f"{base}/{folder}", recursive=True)
    pq.write_table(table, f"{base}/{rel}", filesystem=filesystem)
    return Part(rel, int(filesystem.get_file_info(f"{base}/{rel}").size), table.num_rows)


def commit_properties(meta: dict[str, Any]) -> Any:
    """delta-rs commit properties that put ``meta`` where delta-spark puts ``userMetadata``."""
    from deltalake import CommitProperties

    return CommitProperties(custom_metadata={"userMetadata": json.dumps(meta, sort_keys=True)})


def commit_parts(uri: str, schema: pa.Schema, parts: list[Part], meta: dict[str, Any],
                 mode: Literal["append", "overwrite"], *, s3: S3Settings | None = None) -> int:
    """One transaction adding ``parts`` to the table at ``uri`` (``overwrite``: they become the whole
    table; the table is created when absent). Commits even with no parts, so that the version carries
    this run's metadata. Returns the new version."""
    from deltalake import DeltaTable, Schema
    from deltalake.transaction import AddAction, create_table_with_add_actions

    now = int(time.time() * 1000)
    adds = [AddAction(p.path, p.size, {}, now, True, json.dumps({"numRecords": p.rows})) for p in parts]
    opts = deltalog.storage_options(uri, s3)
    if deltalog.version(uri, s3=s3) is None:
        create_table_with_add_actions(uri, Schema.from_arrow(schema), adds, mode="overwrite", storage_options=opts,
                                      commit_properties=commit_properties(meta))
    else:
        DeltaTable(uri, storage_options=opts).create_write_transaction(
            adds, mode=mode, schema=schema, commit_properties=commit_properties(meta))
    return _version(uri, s3)


def overwrite(uri: str, table: pa.Table, meta: dict[str, Any], *, s3: S3Settings | None = None) -> int:
    """Replace the table at ``uri`` with a small in-memory ``table`` (K rows: the centroids)."""
    from deltalake import write_deltalake

    write_deltalake(uri, table, mode="overwrite", schema_mode="overwrite", storage_options=deltalog.storage_options(uri, s3),
                    commit_properties=commit_properties(meta))
    return _version(uri, s3)


def delete_ids(uri: str, ids: pa.Array, meta: dict[str, Any], model: str | None = None, *,
               s3: S3Settings | None = None) -> int:
    """Delete the rows whose ``id`` is in ``ids`` (and whose ``model`` is ``model``, when given) in one
    transaction."""
    from deltalake import DeltaTable

    pred = f"id IN ({', '.join(sql_str(i) for i in ids.to_pylist())})"
    if model is not None:
        pred = f"model = {sql_str(model)} AND {pred}"
    DeltaTable(uri, storage_options=deltalog.storage_options(uri, s3)).delete(pred, commit_properties=commit_properties(meta))
    return _version(uri, s3)


def merge_by_id(uri: str, source: Any, columns: list[str], meta: dict[str, Any], *,
                s3: S3Settings | None = None) -> int:
    """One MERGE on ``id``: a source row with ``_delete`` true deletes the target row of its id; any
    other inserts itself when the id is not there yet (``columns``: what it inserts). ``source`` is an
    Arrow stream, consumed as it goes."""
    from deltalake import DeltaTable

    dt = DeltaTable(uri, storage_options=deltalog.storage_options(uri, s3))
    (dt.merge(source, "t.id = s.id", source_alias="s", target_alias="t", commit_properties=commit_properties(meta))
     .when_matched_delete(predicate="s._delete")
     .when_not_matched_insert(updates={c: f"s.{c}" for c in columns}, predicate="NOT s._delete")
     .execute())
    return _version(uri, s3)


def read_small(uri: str, at_version: int | None, columns: list[str], *, s3: S3Settings | None = None) -> pa.Table:
    """A small table (K rows: the centroids) at a pinned version, read by delta-rs into memory."""
    from deltalake import DeltaTable

    dt = DeltaTable(uri, version=at_version, storage_options=deltalog.storage_options(uri, s3))
    return dt.to_pyarrow_table(columns=columns)


def sql_str(value: str) -> str:
    """A SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def _version(uri: str, s3: S3Settings | None) -> int:
    v = deltalog.version(uri, s3=s3)
    assert v is not None
    return v
