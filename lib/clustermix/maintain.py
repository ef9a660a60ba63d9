"""``clustermix maintain``: table upkeep. Compacts the small files of every table of the lake and
vacuums the files no version within the retention needs, with delta-rs (no JVM, local folders and
``s3://`` alike, through the same storage options as every other delta-rs call).

- **Compaction** (delta-rs ``optimize.compact``) bin-packs files smaller than
  ``maintain.target_file_bytes`` into files of about that size, in one commit that changes no row
  (``dataChange: false``). Its commits (and the vacuum's) are maintenance
  (:data:`clustermix.deltalog.MAINTENANCE_OPS`): a stage's output stays current and the stages that
  read it are still skipped, since fingerprints name the inputs' last data-changing versions.
  ``blended`` is not compacted: its files are its training order (each one a contiguous, sorted run
  of positions), which a trainer may read file by file.
- **Vacuum** (delta-rs ``vacuum``, full mode) deletes the files that versions older than
  ``maintain.retention_hours`` stopped using, and files no commit names (a crashed write's parts)
  older than that; ``runs``, whose folder also holds the runs' manifests and reports, loses only
  the files its own commits removed. The latest version's files are never deleted; older versions that needed the
  deleted files can no longer be read (the report then reads the latest version, with a note).

It takes the lake's run lock, so it never runs while a run writes. ``dry_run`` writes nothing: it
shows which small files compaction would merge and which files vacuum would delete.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from clustermix import __version__, deltalog, registry
from clustermix.lake import Lake, open_fs
from clustermix.lock import LakeLock
from clustermix.runs import LEDGER, RUNS

if TYPE_CHECKING:
    from clustermix.config import Config
    from clustermix.storage import S3Settings

log = logging.getLogger(__name__)

# tables whose file layout is part of what they hold: vacuumed, never compacted
KEEP_LAYOUT = frozenset({"blended"})
# tables whose folder holds more than the table: ``runs/`` also holds every run's manifest, log and
# report, which a full vacuum (every file no commit names) would delete. These are vacuumed only of
# the files their own commits removed.
SHARED_FOLDER = frozenset({RUNS})


@dataclass
class TableUpkeep:
    """What maintain did (or, on a dry run, would do) to one table."""

    table: str
    version_before: int
    version_after: int
    files_before: int
    files_after: int
    bytes_before: int
    bytes_after: int
    compacted_files: int = 0  # small files merged (would be merged, on a dry run)
    vacuumed_files: int = 0  # files deleted (would be deleted)
    vacuumed_bytes: int = 0
    notes: list[str] = field(default_factory=list)


def lake_tables(lake: Lake) -> list[str]:
    """Every Delta table of the lake: the stages' tables in pipeline order, then ``runs`` and the
    refresh's ledger; only those that exist."""
    names = [*registry.tables(), RUNS, LEDGER]
    return [n for n in names if deltalog.version(lake.table(n), s3=lake.s3) is not None]


def _files(dt: Any) -> tuple[int, int]:
    """Files and bytes of an open table's version, from its log."""
    import pyarrow as pa

    adds = pa.table(dt.get_add_actions(flatten=True))
    return adds.num_rows, int(sum(adds.column("size_bytes").to_pylist())) if adds.num_rows else 0


def _small_files(dt: Any, target: int) -> int:
    """Files compaction would merge: those under ``target`` bytes, where a partition has two or more."""
    import pyarrow as pa

    adds = pa.table(dt.get_add_actions(flatten=True)).to_pylist()
    parts = dt.metadata().partition_columns
    per: dict[str, int] = {}
    for a in adds:
        if a["size_bytes"] < target:
            key = json.dumps([a.get(f"partition.{c}") for c in parts], default=str)
            per[key] = per.get(key, 0) + 1
    return sum(n for n in per.values() if n > 1)


def _sizes(paths: list[str], table_uri: str, s3: S3Settings | None) -> int:
    """Bytes of the files ``paths`` (relative to the table or absolute) that still exist."""
    filesystem, base = open_fs(table_uri, s3)
    total = 0
    for p in paths:
        full = p if p.startswith("/") or "://" in p else f"{base}/{p}"
        if "://" in full:
            full = open_fs(full, s3)[1]
        info = filesystem.get_file_info(full)
        total += int(info.size or 0) if info.is_file else 0
    return total


def maintain_table(lake: Lake, name: str, cfg: Config, run_id: str, dry_run: bool = False) -> TableUpkeep:
    """Compact (unless the table keeps its layout) and vacuum table ``name``; see the module doc."""
    from deltalake import DeltaTable

    from clustermix.deltars import commit_properties

    uri = lake.table(name)
    opts = deltalog.storage_options(uri, lake.s3)
    dt = DeltaTable(uri, storage_options=opts)
    files, size = _files(dt)
    rec = TableUpkeep(name, dt.version(), dt.version(), files, files, size, size)
    meta = {"run_id": run_id, "maintain": True, "clustermix_version": __version__}
    mc = cfg.maintain
    if name in KEEP_LAYOUT:
        rec.notes.append("not compacted: its files are its training order")
    elif dry_run:
        rec.compacted_files = _small_files(dt, mc.target_file_bytes)
    else:
        metrics = dt.optimize.compact(target_size=mc.target_file_bytes,
                                      commit_properties=commit_properties({**meta, "operation": "compact"}))
        rec.compacted_files = int(metrics.get("numFilesRemoved", 0))
        dt = DeltaTable(uri, storage_options=opts)
    # enforce_retention_duration off: the configured retention is the rule, whatever the table's
    # own delta.deletedFileRetentionDuration says (the run lock keeps the pipeline's writes away)
    full = name not in SHARED_FOLDER
    gone = dt.vacuum(retention_hours=mc.retention_hours, dry_run=True, enforce_retention_duration=False, full=full)
    rec.vacuumed_files, rec.vacuumed_bytes = len(gone), _sizes(gone, uri, lake.s3)
    if gone and not dry_run:
        dt.vacuum(retention_hours=mc.retention_hours, dry_run=False, enforce_retention_duration=False, full=full,
                  commit_properties=commit_properties({**meta, "operation": "vacuum"}))
    if not dry_run:
        dt = DeltaTable(uri, storage_options=opts)
        rec.version_after = dt.version()
        rec.files_after, rec.bytes_after = _files(dt)
    return rec


def run_maintain(cfg: Config, run_id: str, dry_run: bool = False, tables: list[str] | None = None,
                 ) -> list[TableUpkeep]:
    """Maintain every table of the lake (or ``tables``) under the lake's run lock."""
    lake = Lake.from_config(cfg)
    lock = LakeLock(lake, run_id, cfg.lake.lock_stale_seconds)
    lock.acquire()
    try:
        out = []
        for name in tables if tables is not None else lake_tables(lake):
            log.info("maintain: %s%s", name, " (dry run)" if dry_run else "")
            out.append(maintain_table(lake, name, cfg, run_id, dry_run))
        return out
    finally:
        lock.release()


def summary_lines(recs: list[TableUpkeep], dry_run: bool) -> list[str]:
    """One line per table: files and bytes before and after, what compaction and vacuum did."""
    mib = 1024 * 1024
    verb = ("would merge", "would delete") if dry_run else ("merged", "deleted")
    lines = [f"{'table':<20} {'files':>13} {'MiB':>17}  compaction / vacuum" + ("  (dry run: nothing written)"
                                                                                 if dry_run else "")]
    for r in recs:
        lines.append(f"{r.table:<20} {r.files_before:>5} -> {r.files_after:<5} "
                     f"{r.bytes_before / mib:>7.2f} -> {r.bytes_after / mib:<7.2f}  "
                     f"{verb[0]} {r.compacted_files} small files; {verb[1]} {r.vacuumed_files} files "
                     f"({r.vacuumed_bytes / mib:.2f} MiB)" + (f"; {'; '.join(r.notes)}" if r.notes else ""))
    return lines


def as_dicts(recs: list[TableUpkeep]) -> list[dict[str, Any]]:
    return [asdict(r) for r in recs]
