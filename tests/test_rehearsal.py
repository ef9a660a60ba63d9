"""The cluster deployment rehearsed: ``deploy/rehearse.py`` starts a real Ray cluster (a head and two
worker nodes, no Java on their PATH) and a real Spark standalone cluster (a master and two workers),
submits the stages with the README's commands, runs the nightly refresh against the same clusters,
and the lake it leaves equals the one local mode leaves on the same input and config: the same
docs, the same assignments, the same ``blended`` ids in the same positions.

Local mode runs in this process (the suite's Spark and Ray); the rehearsal in a subprocess that
starts and stops its own clusters.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from clustermix import deltalog
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


def _rehearse(work: Path, corpus: dict[str, Path], lake: str | None, env: dict[str, str], *,
              nightly: bool) -> dict[str, Any]:
    input_dir = work / "input"
    shutil.copytree(corpus["input"], input_dir)
    cmd = [sys.executable, str(ROOT / "deploy" / "rehearse.py"), "--workdir", str(work / "rehearsal"),
           "--input", str(input_dir)] + (["--new-file", str(corpus["new"])] if nightly else []) \
        + (["--lake", lake] if lake else [])
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400, check=False)
    assert proc.returncode == 0, proc.stderr[-6000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    # the README's commands, verbatim, in the README's order
    assert [c.split(" --config")[0] for c in summary["commands"]] == [
        "ray job submit -- python -c <no java on the PATH of a Ray job>",
        "STAGES=ingest deploy/spark-submit.sh", "deploy/ray-job.sh", 'STAGES="stats sample blend" deploy/spark-submit.sh',
        *(["STAGES=refresh deploy/spark-submit.sh"] * 2 if nightly else [])]
    assert summary["processes"] == ["ray-head", "ray-worker-1", "ray-worker-2", "spark-master", "spark-worker-1",
                                    "spark-worker-2"]
    return summary


def _table(uri: str, name: str) -> Any:
    from deltalake import DeltaTable

    return DeltaTable(f"{uri}/{name}", storage_options=deltalog.storage_options(uri)).to_pyarrow_table()


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


def test_rehearsal_on_a_local_lake_equals_local_mode(tmp_path: Path, corpus: dict[str, Path],
                                                     local_lakes: dict[str, str]) -> None:
    """The README's steps, then the two nightly refreshes: the lake equals local mode's after the same."""
    summary = _rehearse(tmp_path, corpus, None, dict(os.environ), nightly=True)
    want = local_lakes["refreshed"]
    assert_same_lake(summary["lake"], want)
    assert deltalog.num_records(f"{summary['lake']}/docs") == deltalog.num_records(f"{want}/docs") > \
        deltalog.num_records(f"{local_lakes['run']}/docs")  # the new file's documents came in


def test_rehearsal_on_an_s3_lake_equals_local_mode(tmp_path: Path, corpus: dict[str, Path], local_lakes: dict[str, str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's steps with the lake on S3. The nightly refresh is rehearsed once, on the local
    lake: on S3 it runs the same code, which tests/test_s3.py runs against an S3 lake in local mode."""
    server = MotoServer(tmp_path / "moto.log")
    try:
        env = env_for(server.endpoint)
        subprocess.run([sys.executable, "-c", f"import boto3; boto3.client('s3', endpoint_url='{server.endpoint}')"
                        f".create_bucket(Bucket='{BUCKET}')"], env=env, check=True, timeout=60)
        lake = f"s3://{BUCKET}/lake"
        summary = _rehearse(tmp_path, corpus, lake, env, nightly=False)
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL"):
            monkeypatch.setenv(key, env[key])  # this process reads the S3 lake back
        assert_same_lake(summary["lake"], local_lakes["run"])
    finally:
        server.stop()
