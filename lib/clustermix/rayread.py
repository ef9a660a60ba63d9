"""A Ray Data source over Parquet files whose row counts are known up front (from the Delta log or
from an id diff), optionally keeping only some ids: what the embed and assign passes read.

``read_parquet`` would first run sampling tasks (to estimate the in-memory size) and block the
driver until they finish, so an actor pool, and its model load, would start only after a worker
process was spawned for them. Here nothing runs before execution: the read tasks and the actors
start together, and the row counts give the progress bar its total.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from clustermix import lake as lk

if TYPE_CHECKING:
    import pyarrow as pa

    from clustermix.storage import S3Settings


@dataclass(frozen=True)
class Filter:
    """Rows a read keeps: those whose ``id`` is in the Arrow array behind the Ray object ``ids`` (every
    row when None) and whose ``model`` is ``model`` (any when None)."""

    ids: Any = None  # a Ray ObjectRef: put once, shared by every read task
    model: str | None = None


def read_file(uri: str, columns: list[str], block_rows: int, keep: Filter, s3: S3Settings | None) -> Iterator[pa.Table]:
    """One read task: ``columns`` of one Parquet file, the rows ``keep`` keeps, in blocks of ``block_rows``."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    ids = None
    if keep.ids is not None:
        import ray

        ids = ray.get(keep.ids)
    read = list(dict.fromkeys(columns + (["model"] if keep.model is not None else [])))
    filesystem, path = lk.open_fs(uri, s3)
    with filesystem.open_input_file(path) as fh:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=block_rows, columns=read):
            table = pa.Table.from_batches([batch])
            if keep.model is not None:
                table = table.filter(pc.equal(table.column("model"), keep.model))
            if ids is not None:
                table = table.filter(pc.is_in(table.column("id"), value_set=ids))
            if table.num_rows:
                yield table.select(columns)


def files_source(files: list[str], rows: list[int | None], columns: list[str], block_rows: int,
                 keep: Filter | None = None, s3: S3Settings | None = None) -> Any:
    """A Ray Data datasource reading ``columns`` of ``files`` (``rows``: the rows each one yields after
    ``keep``; a file with 0 is not read)."""
    from functools import partial

    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    rows_kept = keep or Filter()

    class ParquetFiles(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, **_: Any) -> list[ReadTask]:
            return [ReadTask(partial(read_file, f, columns, block_rows, rows_kept, s3),
                             BlockMetadata(num_rows=n, size_bytes=None, exec_stats=None, input_files=[f]))
                    for f, n in zip(files, rows, strict=True) if n != 0]

    return ParquetFiles()


def kept_members(assignments: tuple[str, int | None], duplicates: tuple[str, int | None] | None,
                 block_rows: int, partitions: int, s3: S3Settings | None) -> Any:
    """``(id, cluster_id)`` of ``assignments`` at its pinned version less the ids of the semantic
    ``duplicates`` table at its pinned version (no join when it has none), as a Ray dataset: the Ray
    side of :func:`clustermix.kept.assignments`."""
    import ray.data

    from clustermix import deltalog

    asg_files, asg_rows = deltalog.file_counts(*assignments, s3=s3)
    members = ray.data.read_datasource(files_source(asg_files, asg_rows, ["id", "cluster_id"], block_rows, s3=s3))
    if duplicates is not None and deltalog.num_records(*duplicates, s3=s3):
        dup_files, dup_rows = deltalog.file_counts(*duplicates, s3=s3)
        dups = ray.data.read_datasource(files_source(dup_files, dup_rows, ["id"], block_rows, s3=s3))
        members = members.join(dups, join_type="left_anti", num_partitions=partitions, on=("id",))
    return members
