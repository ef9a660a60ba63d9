"""The cluster deployment rehearsed: ``deploy/rehearse.py`` starts a real Ray cluster (a head and two
worker nodes, no Java on their PATH) and a real Spark standalone cluster (a master and two workers),
submits the stages with the README's commands, once with the lake on ``s3://`` and once on a local
folder (the same clusters for both), runs the nightly refresh against them, and each lake equals the
one local mode leaves on the same input and config: the same docs, the same assignments, the same
``blended`` ids in the same positions.

Local mode runs in this process (the suite's Spark and Ray); the rehearsal in a subprocess that
starts and stops its own clusters.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from clustermix import deltalog, storage
from clustermix.config import load_config

from .conftest import ROOT
from .s3server import MotoServer, env_for

BUCKET = "rehearsal"
PER_RUN = {"run_id", "ingested_at", "source_file"}  # what differs between any two runs of the same input


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, bbc_slice: Path) -> dict[str, Path]:
    """The input folder (the BBC slice in two files) and the new file the second refresh takes."""
    base = tmp_path_factory.mktemp("rehearsal-corpus")
    lines = bbc_slice.read_text().splitlines(keepends=True)
    new = lines[::7]
    old = [ln for ln in lines if ln not in new]
    (base / "input").mkdir()
    (base / "input" / "part-0.jsonl").write_text("".join(old[: len(old) // 2]))
    (base / "input" / "part-1.jsonl").write_text("".join(old[len(old) // 2 :]))
    (base / "new.jsonl").write_text("".join(new))
    return {"input": base / "input", "new": base / "new.jsonl"}


@pytest.fixture(scope="module")
def local_lakes(tmp_path_factory, corpus: dict[str, Path], spark: Any, ray_local: Any) -> dict[str, str]:
    """Local mode on the rehearsal's config: ``run`` (a copy of the lake then is kept as ``"run"``),
    then a refresh that adopts the lake and a refresh of one new file (``"refreshed"``)."""
    from clustermix.pipeline import run_stages
    from clustermix.refresh import run_refresh

    work = tmp_path_factory.mktemp("local-mode")
    input_dir = work / "input"
    shutil.copytree(corpus["input"], input_dir)
    cfg_path = _rehearsal_config(work, str(work / "lake"), input_dir)
    tree = yaml.safe_load(cfg_path.read_text())
    tree["spark"].update(master="local[2]", delta_jars="local-m2")
    tree["ray"] = {}
    cfg_path.write_text(yaml.safe_dump(tree))
    cfg = load_config(str(cfg_path), [])
    run_stages(cfg, spark=spark)
    shutil.copytree(work / "lake", work / "lake-after-run")
    run_refresh(cfg, spark=spark)
    shutil.copy(corpus["new"], input_dir / corpus["new"].name)
    run_refresh(cfg, spark=spark)
    return {"run": str(work / "lake-after-run"), "refreshed": str(work / "lake")}


def _rehearsal_config(work: Path, lake: str, input_dir: Path) -> Path:
    """The config deploy/rehearse.py gives the jobs (it writes it the same way)."""
    sys.path.insert(0, str(ROOT / "deploy"))
    try:
        import rehearse
    finally:
        sys.path.pop(0)
    return rehearse.rehearsal_config(work / "cluster.yaml", lake, str(input_dir), "jsonl", [])


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory, corpus: dict[str, Path]) -> Any:
    """One rehearsal, one pair of clusters, two lakes: the README's steps with the lake on S3 (a
    local S3 server), then with the lake on a local folder followed by the two nightly refreshes
    (the new file lands in the shared input folder, so the S3 lake goes first). On S3 the refresh
    runs the same code, which tests/test_s3.py runs against an S3 lake in local mode."""
    work = tmp_path_factory.mktemp("rehearsal")
    server = MotoServer(work / "moto.log")
    try:
        env = env_for(server.endpoint)
        subprocess.run([sys.executable, "-c", f"import boto3; boto3.client('s3', endpoint_url='{server.endpoint}')"
                        f".create_bucket(Bucket='{BUCKET}')"], env=env, check=True, timeout=60)
        input_dir = work / "input"
        shutil.copytree(corpus["input"], input_dir)
        lakes = [f"s3://{BUCKET}/lake", str(work / "lake")]
        cmd = [sys.executable, str(ROOT / "deploy" / "rehearse.py"), "--workdir", str(work / "rehearsal"),
               "--input", str(input_dir), "--new-file", str(corpus["new"])] + [a for lk in lakes for a in ("--lake", lk)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400, check=False)
        yield {"proc": proc, "lakes": lakes, "env": env}
    finally:
        server.stop()


def _summary(rehearsal: dict[str, Any]) -> dict[str, Any]:
    proc = rehearsal["proc"]
    assert proc.returncode == 0, proc.stderr[-6000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    steps = ["STAGES=ingest deploy/spark-submit.sh", "deploy/ray-job.sh", 'STAGES="stats sample blend" deploy/spark-submit.sh']
    # the README's commands, verbatim, in the README's order: for each lake, then the nightly twice
    assert [c.split(" --config")[0] for c in summary["commands"]] == [
        "ray job submit -- python -c <no java on the PATH of a Ray job>", *steps, *steps,
        *["STAGES=refresh deploy/spark-submit.sh"] * 2]
    assert summary["processes"] == ["ray-head", "ray-worker-1", "ray-worker-2", "spark-master", "spark-worker-1",
                                    "spark-worker-2"]
    assert summary["lakes"] == rehearsal["lakes"]
    return summary


def _table(uri: str, name: str) -> Any:
    from deltalake import DeltaTable

    return DeltaTable(f"{uri}/{name}", storage_options=deltalog.storage_options(uri, _s3(uri))).to_pyarrow_table()


def _s3(uri: str) -> storage.S3Settings | None:
    """The S3 settings this process reads an ``s3://`` lake back with: those of the AWS env it was
    pointed at (a config with no storage section)."""
    return storage.settings() if storage.is_s3(uri) else None


def assert_same_lake(got: str, want: str) -> None:
    """Every data table holds the same rows, per-run columns aside; vectors to float tolerance."""
    for name in ("docs", "quarantine", "duplicates", "cluster_stats", "sample_plan", "blended"):
        a, b = _table(got, name), _table(want, name)
        cols = sorted(c for c in b.column_names if c not in PER_RUN)
        assert sorted(c for c in a.column_names if c not in PER_RUN) == cols, name
        rows = [sorted(json.dumps(r, sort_keys=True, default=str) for r in t.select(cols).to_pylist()) for t in (a, b)]
        assert rows[0] == rows[1], f"{name} differs from local mode"
    blended = [_table(u, "blended").select(["position", "id"]).sort_by("position").to_pylist() for u in (got, want)]
    assert blended[0] == blended[1] and len(blended[0]) > 0
    assign = [{r["id"]: (r["cluster_id"], r["score"]) for r in _table(u, "assignments").to_pylist()} for u in (got, want)]
    assert assign[0].keys() == assign[1].keys()
    assert all(assign[0][i][0] == assign[1][i][0] and abs(assign[0][i][1] - assign[1][i][1]) < 1e-4 for i in assign[1])
    emb = [{r["id"]: np.asarray(r["embedding"]) for r in _table(u, "embeddings").to_pylist()} for u in (got, want)]
    assert emb[0].keys() == emb[1].keys()
    assert max(float(np.abs(emb[0][i] - emb[1][i]).max()) for i in emb[1]) < 1e-4


def test_rehearsal_on_a_local_lake_equals_local_mode(rehearsal: dict[str, Any], local_lakes: dict[str, str]) -> None:
    """The README's steps, then the two nightly refreshes: the lake equals local mode's after the same."""
    lake = _summary(rehearsal)["lakes"][1]
    want = local_lakes["refreshed"]
    assert_same_lake(lake, want)
    assert deltalog.num_records(f"{lake}/docs", s3=_s3(lake)) == deltalog.num_records(f"{want}/docs") > \
        deltalog.num_records(f"{local_lakes['run']}/docs")  # the new file's documents came in


def test_rehearsal_on_an_s3_lake_equals_local_mode(rehearsal: dict[str, Any], local_lakes: dict[str, str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's steps with the lake on S3: the lake equals local mode's after ``run``."""
    lake = _summary(rehearsal)["lakes"][0]
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.setenv(key, rehearsal["env"][key])  # this process reads the S3 lake back
    assert_same_lake(lake, local_lakes["run"])
