"""``clustermix maintain`` on a copy of the shared pipeline's lake: compaction and vacuum leave every
table's rows as they were at its latest version, read by Spark and by delta-rs, a rerun of the
pipeline still skips every stage, and a dry run writes nothing."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_config

EXTRA_RUN_ROWS = 4  # appended to the copy's runs table: a table of many small files, as nights make it


def _rows_delta_rs(uri: str) -> list[str]:
    from deltalake import DeltaTable

    return sorted(json.dumps(r, sort_keys=True, default=str) for r in DeltaTable(uri).to_pyarrow_table().to_pylist())


def _rows_spark(spark: Any, uri: str) -> list[str]:
    rows = spark.read.format("delta").load(uri).collect()
    return sorted(json.dumps(r.asDict(recursive=True), sort_keys=True, default=str) for r in rows)


def _on_disk(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under the lake (the run lock aside): size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "_lock.json"}


@pytest.fixture(scope="module")
def maintained(pipeline, spark, tmp_path_factory):
    """The shared run's lake, copied; extra rows appended to its runs table; every table read by both
    engines; a dry run; ``clustermix maintain`` (retention 0: vacuum deletes all it may); read again."""
    from clustermix import cli, deltalog
    from clustermix.lake import Lake
    from clustermix.maintain import lake_tables
    from clustermix.manifest import read_json
    from clustermix.runs import record_run

    cfg, run = pipeline
    root = tmp_path_factory.mktemp("maintain") / "lake"
    shutil.copytree(run.lake.root, root)
    lake = Lake(str(root))
    manifest = read_json(run.manifest_uri)
    # other tests may have rerun the shared lake before this one: its runs table holds one file per run
    runs_files = len(deltalog.file_uris(lake.table("runs")))
    for i in range(EXTRA_RUN_ROWS):
        record_run(lake, {**manifest, "run_id": f"{run.run_id}-extra{i}"})  # the runner's own writer
    names = lake_tables(lake)
    before = {n: (_rows_spark(spark, lake.table(n)), _rows_delta_rs(lake.table(n))) for n in names}
    versions = {n: deltalog.version(lake.table(n)) for n in names}
    files = {n: len(deltalog.file_uris(lake.table(n))) for n in names}
    argv = ["maintain", "--set", f"lake.root={root}", "--set", "maintain.retention_hours=0"]
    disk = _on_disk(root)
    out: dict[str, Any] = {"cfg": make_config(root, cfg.input.path, dedup={"near": {"enabled": True}}),
                           "lake": lake, "run_id": run.run_id, "names": names, "before": before, "versions": versions, "files": files,
                           "small_runs_files": runs_files + EXTRA_RUN_ROWS}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main([*argv, "--dry-run"]) == 0
    out["dry_stdout"], out["dry_disk"] = buf.getvalue(), _on_disk(root)
    out["dry_versions"] = {n: deltalog.version(lake.table(n)) for n in names}
    out["disk_before"] = disk
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(argv) == 0
    out["stdout"] = buf.getvalue()
    out["after"] = {n: (_rows_spark(spark, lake.table(n)), _rows_delta_rs(lake.table(n))) for n in names}
    out["files_after"] = {n: len(deltalog.file_uris(lake.table(n))) for n in names}
    out["versions_after"] = {n: deltalog.version(lake.table(n)) for n in names}
    return out


def test_a_dry_run_writes_nothing(maintained):
    m = maintained
    assert m["dry_disk"] == m["disk_before"]
    assert m["dry_versions"] == m["versions"]
    runs_line = next(ln for ln in m["dry_stdout"].splitlines() if ln.startswith("runs "))
    assert f"would merge {m['small_runs_files']} small files" in runs_line, m["dry_stdout"]
    assert "dry run: nothing written" in m["dry_stdout"]


def test_maintain_compacts_small_files_and_keeps_every_table_readable(maintained):
    m = maintained
    assert {"docs", "embeddings", "assignments", "cluster_stats", "blended", "runs"} <= set(m["names"])
    assert m["files"]["runs"] == m["small_runs_files"] >= 1 + EXTRA_RUN_ROWS and m["files_after"]["runs"] == 1
    assert all(m["files_after"][n] <= m["files"][n] for n in m["names"])
    # every table, at its latest version, holds the same rows for both engines
    for n in m["names"]:
        assert m["after"][n][0] == m["before"][n][0], f"{n}: Spark reads other rows after maintain"
        assert m["after"][n][1] == m["before"][n][1], f"{n}: delta-rs reads other rows after maintain"
    # the small files are gone from disk (retention 0), their bytes reported
    runs_dir = Path(m["lake"].table("runs"))
    assert len([p for p in runs_dir.glob("*.parquet")]) == 1
    runs_line = next(ln for ln in m["stdout"].splitlines() if ln.startswith("runs "))
    n_small = m["small_runs_files"]
    assert f"{n_small} -> 1 " in runs_line and f"deleted {n_small} files" in runs_line
    # the runs table's folder also holds every run's manifest: vacuum left it there
    assert Path(m["lake"].run_dir(m["run_id"]), "manifest.json").is_file()
    blended = next(ln for ln in m["stdout"].splitlines() if ln.startswith("blended "))
    assert "merged 0 small files" in blended and "training order" in blended


def test_maintain_changes_no_fingerprint_and_a_rerun_skips_every_stage(maintained, spark):
    from clustermix import deltalog
    from clustermix.pipeline import run_stages

    m = maintained
    assert m["versions_after"]["runs"] > m["versions"]["runs"]  # the compaction and the vacuum committed
    # the maintenance commits are not data changes: the data versions are those before maintain
    assert {n: deltalog.data_version(m["lake"].table(n)) for n in m["names"]} == m["versions"]
    rerun = run_stages(m["cfg"], spark=spark)
    statuses = {s: r["status"] for s, r in rerun.manifest["stages"].items()}
    assert statuses and set(statuses.values()) == {"skipped"}, statuses
    assert {n: deltalog.version(m["lake"].table(n)) for n in m["names"] if n != "runs"} == \
        {n: v for n, v in m["versions_after"].items() if n != "runs"}


def test_the_report_of_the_run_still_reads_after_vacuum(maintained):
    from clustermix.report import build_report

    m = maintained
    rep = build_report(m["lake"].root, m["run_id"])
    assert rep["clusters"]["available"] and all(r["exemplars"] for r in rep["clusters"]["rows"] if r["n_docs"])


def test_maintain_config_is_validated():
    from clustermix.config import ConfigError, load_config

    assert load_config(None, []).maintain.retention_hours == 168
    with pytest.raises(ConfigError, match=r"maintain\.retention_hours"):
        load_config(None, ["maintain.retention_hours=-1"])
    with pytest.raises(ConfigError, match=r"maintain\.target_file_bytes"):
        load_config(None, ["maintain.target_file_bytes=10"])


def test_maintenance_commits_leave_a_stage_current(tmp_path):
    """On a bare delta-rs table: after a compaction and a vacuum (three commits) the stage's metadata
    is still the last commit's, and the data version is still the stage's."""
    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    from clustermix import deltalog
    from clustermix.deltars import commit_properties

    uri = str(tmp_path / "t")
    for i in range(3):
        write_deltalake(uri, pa.table({"id": [str(i)]}), mode="append",
                        commit_properties=commit_properties({"fingerprint": f"fp{i}"}))
    assert deltalog.data_version(uri) == 2 and deltalog.is_current([uri], "fp2")
    DeltaTable(uri).optimize.compact(commit_properties=commit_properties({"maintain": True}))
    DeltaTable(uri).vacuum(retention_hours=0, dry_run=False, enforce_retention_duration=False)
    assert deltalog.version(uri) == 5  # OPTIMIZE, VACUUM START, VACUUM END
    assert deltalog.data_version(uri) == 2 and deltalog.is_current([uri], "fp2")
    assert deltalog.last_commit_meta(uri) == {"fingerprint": "fp2"}
    assert sorted(DeltaTable(uri).to_pyarrow_table().column("id").to_pylist()) == ["0", "1", "2"]


def test_maintain_on_s3(tmp_path):
    """The same delta-rs calls, the same storage options and the run lock on an ``s3://`` lake (a real
    S3-compatible server on loopback): three small files of ``runs`` become one, rows unchanged."""
    from deltalake import DeltaTable

    from clustermix import deltalog, storage
    from clustermix.lake import Lake
    from clustermix.maintain import run_maintain
    from clustermix.runs import record_run

    from .s3server import MotoServer, env_for

    server = MotoServer(tmp_path / "moto.log")
    mp = pytest.MonkeyPatch()
    try:
        for key, value in env_for(server.endpoint).items():
            if key.startswith("AWS_"):
                mp.setenv(key, value)
        cfg = make_config(tmp_path, "builtin://bbc", lake={"root": "s3://maintained/lake"},
                          maintain={"retention_hours": 0})
        lake = Lake.from_config(cfg)  # the config's storage section (no endpoint: the env's)
        storage.boto3_client(lake.s3).create_bucket(Bucket="maintained")
        for i in range(3):
            record_run(lake, {"run_id": f"r{i}", "outcome": "succeeded", "stages": {}})
        uri = lake.table("runs")
        opts = deltalog.storage_options(uri, lake.s3)
        before = _sorted_rows(DeltaTable(uri, storage_options=opts))
        (rec,) = run_maintain(cfg, "maintain-s3")
        assert (rec.table, rec.files_before, rec.files_after, rec.compacted_files, rec.vacuumed_files) == \
            ("runs", 3, 1, 3, 3)
        assert _sorted_rows(DeltaTable(uri, storage_options=opts)) == before
        assert deltalog.data_version(uri, s3=lake.s3) == 2
        assert storage.read_json_object(f"{lake.root}/_lock.json", s3=lake.s3) is None  # the lock was released
    finally:
        mp.undo()
        server.stop()


def _sorted_rows(dt: Any) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True, default=str) for r in dt.to_pyarrow_table().to_pylist())
