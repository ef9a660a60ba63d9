"""Two small append-only Delta tables kept with delta-rs (no JVM needed to write them):

- ``runs``: one row per run (``run``, ``refresh``, a stage command), whatever its outcome: what it
  took, what it counted, which table versions it left, and the refresh's drift decision.
- ``input_files``: the ledger of input files a refresh has taken (path, size, mtime, and whether it
  was ingested, kept in part or skipped as a bad file, with the reason), so the next refresh takes
  only files that are new or changed since.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

    from clustermix.lake import Lake
    from clustermix.storage import S3Settings

RUNS, LEDGER = "runs", "input_files"


def _append(uri: str, table: pa.Table, s3: S3Settings | None) -> None:
    from deltalake import write_deltalake

    from clustermix.deltalog import storage_options

    # merge: a ledger written before it had the status and reason columns takes them on
    write_deltalake(uri, table, mode="append", schema_mode="merge", storage_options=storage_options(uri, s3))


def _ts(iso: str | None) -> datetime | None:
    return datetime.fromisoformat(iso) if iso else None


def record_run(lake: Lake, manifest: dict[str, Any]) -> None:
    """Append one row describing the finished (or failed) run of ``manifest``."""
    import pyarrow as pa

    stages = manifest.get("stages", {})
    taken = manifest.get("inputs_taken") or []
    counts = {name: rec.get("counts") for name, rec in stages.items() if rec.get("counts") is not None}
    written = {t: v for name, rec in stages.items() if rec.get("status") == "ran"
               for t, v in (rec.get("versions") or {}).items()}
    row = {
        "run_id": manifest["run_id"], "mode": manifest.get("mode", "run"), "outcome": manifest.get("outcome"),
        "error": manifest.get("error"), "started_at": _ts(manifest.get("started_at")),
        "finished_at": _ts(manifest.get("finished_at")), "files_taken": len(taken),
        "inputs_taken": json.dumps(taken), "stages": json.dumps({n: r.get("status") for n, r in stages.items()}),
        "counts": json.dumps(counts, default=str), "versions_written": json.dumps(written, sort_keys=True),
        "tables": json.dumps(manifest.get("tables", {}), sort_keys=True),
        "drift": json.dumps(manifest.get("drift")) if manifest.get("drift") is not None else None,
        "decision": (manifest.get("drift") or {}).get("decision"),
        # microseconds: runs that start within one second (a no-op refresh and the next) keep their order
        "recorded_at": datetime.now(timezone.utc),
    }
    schema = pa.schema([
        ("run_id", pa.string()), ("mode", pa.string()), ("outcome", pa.string()), ("error", pa.string()),
        ("started_at", pa.timestamp("us", tz="UTC")), ("finished_at", pa.timestamp("us", tz="UTC")),
        ("files_taken", pa.int64()), ("inputs_taken", pa.string()), ("stages", pa.string()), ("counts", pa.string()),
        ("versions_written", pa.string()), ("tables", pa.string()), ("drift", pa.string()), ("decision", pa.string()),
        ("recorded_at", pa.timestamp("us", tz="UTC")),
    ])
    _append(lake.table(RUNS), pa.Table.from_pylist([row], schema=schema), lake.s3)


def taken_files(lake: Lake) -> dict[str, tuple[int, int]] | None:
    """Every input file a refresh has ingested, as path -> (size, mtime_ns) of its latest taking;
    None when no refresh has run on this lake yet."""
    from clustermix.deltalog import version

    uri = lake.table(LEDGER)
    if version(uri, s3=lake.s3) is None:
        return None
    from deltalake import DeltaTable

    from clustermix.deltalog import storage_options

    t = DeltaTable(uri, storage_options=storage_options(uri, lake.s3)).to_pyarrow_table(
        columns=["path", "size", "mtime_ns", "taken_at"])
    out: dict[str, tuple[int, int]] = {}
    for row in sorted(t.to_pylist(), key=lambda r: r["taken_at"]):
        out[row["path"]] = (row["size"], row["mtime_ns"])
    return out


def record_taken(lake: Lake, files: dict[str, list[int]], run_id: str,
                 bad: dict[str, tuple[str, str]] | None = None) -> None:
    """Append the files a refresh has just ingested (after their rows are committed). ``bad``: path ->
    (status, reason) of those that were skipped or kept in part: taken all the same, so that such a
    file is tried again when it changes, and not every night while it does not."""
    import pyarrow as pa

    if not files:
        return
    now = datetime.now(timezone.utc)
    paths, bad = sorted(files), bad or {}
    table = pa.table({
        "path": pa.array(paths, pa.string()),
        "size": pa.array([files[p][0] for p in paths], pa.int64()),
        "mtime_ns": pa.array([files[p][1] for p in paths], pa.int64()),
        "run_id": pa.array([run_id] * len(files), pa.string()),
        "taken_at": pa.array([now] * len(files), pa.timestamp("us", tz="UTC")),
        "status": pa.array([bad.get(p, ("ingested", None))[0] for p in paths], pa.string()),
        "reason": pa.array([bad.get(p, ("ingested", None))[1] for p in paths], pa.string()),
    })
    _append(lake.table(LEDGER), table, lake.s3)


def new_files(listing: dict[str, list[int]], taken: dict[str, tuple[int, int]]) -> dict[str, list[int]]:
    """Files not taken yet, or changed (size or mtime) since they were."""
    return {p: v for p, v in listing.items() if tuple(v) != taken.get(p)}


def read_runs(lake: Lake) -> list[dict[str, Any]]:
    """Every recorded run, in the order they were recorded (an empty list when none)."""
    from deltalake import DeltaTable

    from clustermix.deltalog import storage_options, version

    uri = lake.table(RUNS)
    if version(uri, s3=lake.s3) is None:
        return []
    rows = DeltaTable(uri, storage_options=storage_options(uri, lake.s3)).to_pyarrow_table().to_pylist()
    return sorted(rows, key=lambda r: r["recorded_at"])
