"""The Ray stages run where there is no Java: embed, cluster, assign, dedup and search in a process that
cannot reach a JVM commit their tables with delta-rs, with the metadata that makes a rerun skip them, and the Spark
stages read those tables as before."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from clustermix import deltalog, tableio
from clustermix.pipeline import run_stages

from .conftest import ROOT, make_config


def _env_without_java(tmp: Path) -> dict[str, str]:
    """This process's environment with no ``java`` on PATH and no JAVA_HOME: every PATH folder that holds
    a ``java`` is replaced by a folder of links to everything else in it."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAVA_HOME", "SPARK_HOME", "PYSPARK_SUBMIT_ARGS")}
    folders = []
    for i, folder in enumerate(env.get("PATH", "").split(os.pathsep)):
        if not (Path(folder) / "java").exists():
            folders.append(folder)
            continue
        shadow = tmp / f"path{i}"
        shadow.mkdir()
        for entry in Path(folder).iterdir():
            if not entry.name.startswith("java"):
                (shadow / entry.name).symlink_to(entry)
        folders.append(str(shadow))
    env["PATH"] = os.pathsep.join(folders)
    env["PYTHONPATH"] = str(ROOT / "lib")
    assert shutil.which("java", path=env["PATH"]) is None
    return env


def _cli(env: dict[str, str], config: Path, *args: str) -> dict[str, Any]:
    """Run ``clustermix <args>`` in a process without Java; return its run's manifest."""
    proc = subprocess.run([sys.executable, "-m", "clustermix.cli", *args, "--config", str(config), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = next(line for line in proc.stdout.splitlines() if line.startswith("manifest: "))
    return dict(json.loads(Path(manifest.removeprefix("manifest: ")).read_text()))


def test_embed_cluster_and_assign_run_without_a_jvm(tmp_path: Path, spark: Any, bbc_slice: Path) -> None:
    records = [json.loads(x) for x in bbc_slice.read_text().splitlines()]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records[:30]))
    cfg = make_config(tmp_path / "lake", str(src))
    config = tmp_path / "conf.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    env = _env_without_java(tmp_path)
    lake = run_stages(cfg, ("ingest",), spark=spark).lake  # ingest is a Spark stage: here, with Java

    first = _cli(env, config, "embed")
    first = {**first["stages"], **_cli(env, config, "cluster")["stages"]}
    assert first["embed"]["status"] == "ran" and first["embed"]["counts"]["embedded"] == 30
    assert first["cluster"]["status"] == "ran"
    # the Spark stages read what delta-rs wrote: every document has one embedding and one cluster
    ids = sorted(r["id"] for r in records[:30])
    assert sorted(r["id"] for r in tableio.read(spark, lake, "embeddings").collect()) == ids
    assignments = tableio.read(spark, lake, "assignments").collect()
    assert sorted(r["id"] for r in assignments) == ids
    assert {r["cluster_id"] for r in assignments} <= set(range(cfg.cluster.k))
    assert tableio.read(spark, lake, "centroids").count() == cfg.cluster.k

    # the dedup and the search too: the search's pools drawn by Ray Data, its proxies Ray tasks, its mixtures
    # committed by delta-rs
    target = tmp_path / "target.jsonl"
    target.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in records[40:44]))
    searching = tmp_path / "search.yaml"
    searching.write_text(yaml.safe_dump({**cfg.to_dict(), "search": {
        "target_path": str(target), "iterations": [2, 1], "candidates": 50, "top_fraction": 0.5, "proxy_tokens": 3000,
        "vocab_size": 256, "proxy_d_model": 16, "proxy_layers": 1, "proxy_heads": 2, "proxy_context": 16,
        "proxy_batch_size": 8, "target_max_tokens": 1000, "seed": 3}}))
    dedup = _cli(env, config, "dedup")["stages"]["dedup"]  # off by default: an empty table, by delta-rs
    assert dedup["status"] == "ran" and deltalog.num_records(lake.table("semantic_duplicates")) == 0
    searched = _cli(env, searching, "search")["stages"]["search"]
    assert searched["status"] == "ran" and searched["counts"]["target_texts"] == 4
    assert searched["counts"]["proxies_trained"] == 1 + 2 + 1  # the uniform baseline, then 2 and 1
    assert tableio.read(spark, lake, "mixtures").count() == 4

    # a rerun finds both stages current from the commit metadata delta-rs wrote, and writes nothing
    versions = {t: deltalog.version(lake.table(t)) for t in ("embeddings", "centroids", "assignments")}
    again = _cli(env, config, "embed")["stages"]["embed"]
    assert again["status"] == "skipped" and again["written_by_run"] == deltalog.last_commit_meta(
        lake.table("embeddings"))["run_id"]
    assert _cli(env, config, "cluster")["stages"]["cluster"]["status"] == "skipped"
    assert versions == {t: deltalog.version(lake.table(t)) for t in versions}

    # a new night: 5 new documents and 3 gone (Spark ingests them); embed and assign, still without Java,
    # embed only the new ones, assign them to the existing clusters and drop what is gone
    src.write_text("".join(json.dumps(r) + "\n" for r in records[3:35]))
    run_stages(cfg, ("ingest",), spark=spark)
    night = {**_cli(env, config, "embed")["stages"], **_cli(env, config, "assign")["stages"]}
    assert night["embed"]["counts"]["embedded"] == 5 and night["embed"]["counts"]["removed"] == 3
    assert night["assign"]["counts"]["decision"] == "keep" and night["assign"]["counts"]["assigned"] == 5
    now = sorted(r["id"] for r in records[3:35])
    assert sorted(r["id"] for r in tableio.read(spark, lake, "embeddings").collect()) == now
    assert sorted(r["id"] for r in tableio.read(spark, lake, "assignments").collect()) == now
    assert deltalog.last_commit_meta(lake.table("assignments"))["stage"] == "assign"
    assert _cli(env, config, "assign")["stages"]["assign"]["status"] == "skipped"


def test_id_diff_in_bounded_passes_is_the_set_difference(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clustermix.iddiff import IdSide, diff

    docs = [f"d{i}" for i in range(50)]
    have = [f"d{i}" for i in range(10, 60)]  # 10..49 embedded, 50..59 gone from docs
    files = []
    for i, chunk in enumerate((docs[:20], docs[20:])):
        pq.write_table(pa.table({"id": chunk}), tmp_path / f"docs{i}.parquet")
        files.append(str(tmp_path / f"docs{i}.parquet"))
    pq.write_table(pa.table({"id": [*have, "d0"], "model": ["m"] * len(have) + ["other"]}), tmp_path / "emb.parquet")
    left = IdSide(files, [20, 30])
    right = IdSide([str(tmp_path / "emb.parquet")], [None], model="m")  # d0 is embedded by another model only
    for per_pass in (1000, 7):  # one pass, and 9 passes over hash buckets
        d = diff(left, right, per_pass=per_pass)
        assert sorted(d.missing.to_pylist()) == [f"d{i}" for i in range(10)]
        assert d.missing_per_file == [10, 0]
        assert sorted(d.stale.to_pylist()) == sorted(f"d{i}" for i in range(50, 60))
