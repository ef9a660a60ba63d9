"""The lake's layout and its files: where tables, staging folders and runs live, and the file-system
helpers every engine's files go through (pyarrow filesystems for local folders and object stores).

Its Delta tables are read and written elsewhere: :mod:`clustermix.deltalog` (delta-rs metadata),
:mod:`clustermix.tableio` (Spark reads and writes), :mod:`clustermix.deltars` (the Ray stages' commits,
no JVM), :mod:`clustermix.lock` (one run at a time).
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clustermix.config import Config
    from clustermix.storage import S3Settings


class Lake:
    """Paths under one lake root (a local folder or an object-store URI), and the object-store
    settings ``s3`` every client reaching it (and the run's inputs) uses. A lake on ``s3://`` needs
    them; a local one may have none (then its helpers refuse any ``s3://`` URI)."""

    def __init__(self, root: str, s3: S3Settings | None = None) -> None:
        self.root = root.rstrip("/") if "://" in root else str(Path(root).expanduser().resolve())
        self.s3 = s3

    @classmethod
    def from_config(cls, cfg: Config) -> Lake:
        """The lake of ``cfg`` with the settings of its ``storage`` section (resolved once, here)."""
        from clustermix import storage

        return cls(cfg.lake.root, storage.settings(cfg.storage))

    def __repr__(self) -> str:
        return f"Lake({self.root!r}, s3={self.s3!r})"

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
        """A fresh folder for files a stage writes before it reads them back or commits them elsewhere."""
        return f"{self.root}/_staging/{name}/{run_id}-{uuid.uuid4().hex[:8]}"

    def run_dir(self, run_id: str) -> str:
        return f"{self.root}/runs/{run_id}"

    def best_mixture_uri(self) -> str:
        """Where the search writes its best mixture, which ``blend.mixture_path: search`` reads."""
        return f"{self.root}/search/best_mixture.json"

    def remove(self, uri: str) -> None:
        """Remove a staging folder (best effort: a leftover is harmless and never read)."""
        if self.is_local:
            shutil.rmtree(uri, ignore_errors=True)
        else:
            filesystem, path = open_fs(uri, self.s3)
            with contextlib.suppress(OSError):
                filesystem.delete_dir(path)


def open_fs(uri: str, s3: S3Settings | None = None) -> tuple[Any, str]:
    """The pyarrow filesystem and path for a local path (``~`` and relative allowed) or a URI.

    ``s3``: the object-store settings, required for an ``s3://`` URI (``lake.s3``; code on a Ray
    worker is handed the driver's). A local path needs none."""
    from pyarrow import fs as pafs

    from clustermix import storage

    if storage.is_s3(uri):  # the given endpoint, region and retries (clustermix.storage)
        return storage.pyarrow_fs(s3, uri), uri.split("://", 1)[1].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri.removeprefix("file://")).expanduser().resolve())


def spark_path(uri: str) -> str:
    """The same location as Spark's Hadoop filesystems spell it (s3:// -> s3a://)."""
    return "s3a://" + uri[len("s3://") :] if uri.startswith("s3://") else uri


def list_parquet(uri: str, *, s3: S3Settings | None = None) -> list[str]:
    """Non-empty Parquet files under a folder (a staging folder written by Ray or Spark)."""
    from pyarrow import fs as pafs

    filesystem, base = open_fs(uri, s3)
    infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    prefix = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    return sorted(prefix + i.path for i in infos if i.path.endswith(".parquet") and i.size and not is_hidden(i.path))


def is_hidden(path: str) -> bool:
    """Files Spark and Delta treat as not data (``_delta_log``, ``.crc``, ``_SUCCESS``)."""
    return path.rsplit("/", 1)[-1].startswith((".", "_"))


def write_atomic(uri: str, body: bytes, *, s3: S3Settings | None = None) -> None:
    """Write a whole file so that a reader sees the old content or the new, never a part: a local
    file is written beside and renamed; an object store's PUT is atomic by itself."""
    filesystem, path = open_fs(uri, s3)
    parent = path.rsplit("/", 1)[0]
    if parent:
        filesystem.create_dir(parent, recursive=True)
    if "://" in uri and not uri.startswith("file://"):
        with filesystem.open_output_stream(path) as fh:
            fh.write(body)
        return
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with filesystem.open_output_stream(tmp) as fh:
        fh.write(body)
    filesystem.move(tmp, path)


def parquet_rows(files: list[str], *, skip_unfinished: bool = False, s3: S3Settings | None = None) -> list[int | None]:
    """Row counts of Parquet files from their footers (no data read). ``skip_unfinished``: a file still
    being written (no footer yet) counts as None instead of failing."""
    import pyarrow.parquet as pq

    out: list[int | None] = []
    for f in files:
        try:
            filesystem, path = open_fs(f, s3)
            with filesystem.open_input_file(path) as fh:
                out.append(pq.read_metadata(fh).num_rows)
        except (OSError, ValueError):
            if not skip_unfinished:
                raise
            out.append(None)
    return out
