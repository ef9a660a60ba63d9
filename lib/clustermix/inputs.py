"""Where the raw corpus is: ``input.path`` resolved (builtin corpora materialised) and its files listed.

The listing (every file's size and modification time, or a Delta table's version) is what ingest's
fingerprint and the refresh's ledger of taken files are made of.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from clustermix.config import BUILTIN_PREFIX
from clustermix.errors import InputError
from clustermix.lake import is_hidden, open_fs

if TYPE_CHECKING:
    from clustermix.config import Config


@dataclass(frozen=True)
class InputSpec:
    """Where the raw corpus is, resolved (builtin corpora materialised), with its listing."""

    path: str
    format: str
    listing: dict[str, Any]
    # set by a refresh: only these files (as Spark spells them) are read, not everything under path
    files: tuple[str, ...] | None = None

    def spark_files(self) -> list[str]:
        """Every listed file as Spark spells it (local path, or s3a://bucket/key)."""
        from clustermix.lake import spark_path

        scheme = self.path.split("://", 1)[0] + "://" if "://" in self.path and not self.path.startswith(
            "file://") else ""
        return [spark_path(scheme + p) for p in sorted(self.listing.get("files", {}))]


def resolve_input(cfg: Config, lake_root: str) -> InputSpec:
    """Resolve ``input.path`` and list its files (their sizes and times make the fingerprint). An input
    (or a lake) on ``s3://`` is reached with the settings of the config's ``storage`` section."""
    from pyarrow import fs as pafs

    from clustermix import storage

    s3 = storage.settings(cfg.storage)
    path, fmt = cfg.input.path, cfg.input.format
    if path.startswith(BUILTIN_PREFIX):
        from clustermix.corpus import materialize

        path, fmt = materialize(path[len(BUILTIN_PREFIX) :], lake_root, s3=s3), "jsonl"
    if fmt == "delta":
        from clustermix.deltalog import version

        v = version(path, s3=s3)
        if v is None:
            raise InputError(f"input.path {path!r} is not a Delta table")
        return InputSpec(path, fmt, {"delta_version": v})
    try:
        filesystem, base = open_fs(path, s3)
        info = filesystem.get_file_info(base)
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"input.path {path!r} does not exist")
        infos = [info] if info.type == pafs.FileType.File else filesystem.get_file_info(
            pafs.FileSelector(base, recursive=True))
    except OSError as exc:
        raise InputError(f"input.path {path!r} cannot be listed: {exc}") from None
    files = {i.path: [i.size, i.mtime_ns] for i in infos if i.type == pafs.FileType.File and not is_hidden(i.path)}
    if not files:
        raise InputError(f"input.path {path!r} holds no files")
    return InputSpec(path, fmt, {"files": files})
