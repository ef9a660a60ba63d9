"""Which ids one table has and another lacks, from their ``id`` columns alone (no Spark, no shuffle).

The incremental passes (embed what has no embedding, assign what has no assignment) need the ids of
``left`` missing from ``right`` and the ids of ``right`` no longer in ``left``. Both are found by
streaming the id columns of the tables' Parquet files (Parquet reads only that column) in passes
over hash buckets of the ids, each pass holding at most :data:`IDS_PER_PASS` ids of each side, so
memory stays bounded whatever the corpus size; only the differences (new and removed documents:
O(new input) on a nightly refresh) are kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from clustermix import lake as lk

if TYPE_CHECKING:
    import pyarrow as pa

    from clustermix.storage import S3Settings

# ids of one side held at once: about 100 bytes each in an Arrow array and its hash set
IDS_PER_PASS = 4_000_000


@dataclass(frozen=True)
class IdSide:
    """The Parquet files of one version of a table, their row counts (None: unknown), and the model
    whose rows count (the ``embeddings`` table holds rows of several models)."""

    files: list[str]
    rows: list[int | None]
    model: str | None = None


@dataclass(frozen=True)
class IdDiff:
    missing: pa.Array  # ids of left that right lacks
    missing_per_file: list[int]  # how many of them each left file holds
    stale: pa.Array  # ids of right that left lacks


def diff(left: IdSide, right: IdSide, s3: S3Settings | None = None, per_pass: int = IDS_PER_PASS) -> IdDiff:
    """The ids of ``left`` missing from ``right`` and those of ``right`` missing from ``left``."""
    import pyarrow.compute as pc

    n = max(_rows(left, s3), _rows(right, s3))
    passes = max(1, -(-n // per_pass))
    missing: list[pa.Array] = []
    stale: list[pa.Array] = []
    per_file = [0] * len(left.files)
    for b in range(passes):
        have = _concat([a for f in right.files for a in _ids(f, right.model, b, passes, s3)])
        seen = []
        for i, f in enumerate(left.files):
            ids = _concat(list(_ids(f, left.model, b, passes, s3)))
            gone = ids.filter(pc.invert(pc.is_in(ids, value_set=have)))
            per_file[i] += len(gone)
            missing.append(gone)
            seen.append(ids)
        seen_all = _concat(seen)
        stale.append(have.filter(pc.invert(pc.is_in(have, value_set=seen_all))))
    return IdDiff(_concat(missing), per_file, _concat(stale))


def _rows(side: IdSide, s3: S3Settings | None) -> int:
    """Rows of one side (from the log; from the footers of files written without statistics)."""
    unknown = [f for f, n in zip(side.files, side.rows, strict=True) if n is None]
    return sum(n or 0 for n in side.rows) + sum(n or 0 for n in lk.parquet_rows(unknown, s3=s3))


def _ids(uri: str, model: str | None, bucket: int, buckets: int, s3: S3Settings | None) -> Iterator[pa.Array]:
    """The ids of one Parquet file (of ``model``'s rows, when given) that fall in hash ``bucket``."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    columns = ["id"] if model is None else ["id", "model"]
    filesystem, path = lk.open_fs(uri, s3)
    with filesystem.open_input_file(path) as fh:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=65536, columns=columns):
            ids = batch.column("id")
            if model is not None:
                ids = ids.filter(pc.equal(batch.column("model"), model))
            if buckets > 1:
                h = pd.util.hash_array(np.asarray(ids.to_pylist(), dtype=object), categorize=False)
                ids = ids.filter(pa.array((h % np.uint64(buckets)) == bucket))
            yield ids.cast(pa.string())


def _concat(arrays: list[pa.Array]) -> pa.Array:
    import pyarrow as pa

    return pa.concat_arrays(arrays) if arrays else pa.array([], pa.string())
