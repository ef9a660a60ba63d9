"""Deployment files: every spec parses for its tool, and the images pin what pyproject.toml pins."""

from __future__ import annotations

import os
import py_compile
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

from clustermix.config import build_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [*sorted((ROOT / "deploy").glob("*.sh")), ROOT / ".ci" / "run"]


def _pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = [*project["dependencies"], *project["optional-dependencies"]["spark"]]
    out = {}
    for d in deps:
        name, version = d.split("==")
        out[re.sub(r"\[.*\]", "", name).lower()] = version
    return out


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", ["local.yaml", "cluster.yaml", "nightly.yaml"])
def test_shipped_configs_are_valid(name):
    cfg = build_config(yaml.safe_load((ROOT / "conf" / name).read_text()))
    assert cfg.sample.budget > 0


def test_kuberay_manifest_parses_and_runs_the_jobs():
    doc = yaml.safe_load((ROOT / "deploy" / "kuberay-rayjob.yaml").read_text())
    assert doc["kind"] == "RayJob" and doc["apiVersion"].startswith("ray.io/")
    from clustermix.cli import build_parser

    entry = doc["spec"]["entrypoint"].split("python ", 1)[1].split()
    assert entry[0] == "jobs/pipeline.py" and (ROOT / entry[0]).exists()
    assert build_parser().parse_args(["run", *entry[1:]]).stages == ("embed", "cluster", "dedup")


def test_airflow_dag_and_jobs_compile():
    for f in [ROOT / "deploy" / "airflow" / "clustermix_dag.py", *sorted((ROOT / "jobs").glob("*.py"))]:
        py_compile.compile(str(f), doraise=True)


def test_images_pin_the_versions_of_pyproject():
    pins = _pins()
    ray_df = (ROOT / "docker" / "ray-gpu.Dockerfile").read_text()
    spark_df = (ROOT / "docker" / "spark.Dockerfile").read_text()
    assert f"rayproject/ray:{pins['ray']}-" in ray_df
    assert f"apache/spark:{pins['pyspark']}-" in spark_df
    # the pins themselves: the Ray image installs the project without its spark extra, the Spark image with it
    assert re.search(r"^RUN pip install --no-cache-dir \. ", ray_df, re.MULTILINE)
    assert '/opt/venv/bin/pip install --no-cache-dir ".[spark]"' in spark_df
    # deploy/spark-submit.sh takes its --packages from the CLI: Delta always, hadoop-aws for s3://
    local = _cli("spark-packages", "-q", "--set", "lake.root=/tmp/lake")
    s3 = _cli("spark-packages", "-q", "--set", "lake.root=s3://b/lake")
    assert local.stdout.strip() == f"io.delta:delta-spark_2.13:{pins['delta-spark']}"
    assert s3.stdout.strip().split(",") == [local.stdout.strip(), f"org.apache.hadoop:hadoop-aws:{_hadoop()}"]


def _hadoop() -> str:
    from clustermix.runtime import hadoop_version

    return hadoop_version()


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "clustermix.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False, env={k: v for k, v in os.environ.items()
                                                             if k not in ("PYSPARK_GATEWAY_PORT", "RAY_ADDRESS")})


def _one_line_naming(proc: subprocess.CompletedProcess[str], key: str) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"clustermix: config error: {key}="), proc.stderr[-2000:]
    return lines[0]


def test_spark_that_would_run_in_the_driver_against_a_remote_lake_fails_fast(tmp_path):
    """spark.master unset outside spark-submit means a local Spark in this one process: against an S3
    lake that is a cluster job run on one pod. Refused before the lock, the log or any work."""
    proc = _cli("run", "--set", "lake.root=s3://nowhere/lake", "--set", "spark.master=null",
                "--set", "storage.endpoint=http://127.0.0.1:9", timeout=60)
    assert "deploy/spark-submit.sh" in _one_line_naming(proc, "spark.master")
    # a local lake with a local Spark is local mode, and a Ray stage needs no Spark at all
    assert "spark.master" not in _cli("embed", "--set", "lake.root=s3://nowhere/lake", "--set", "spark.master=null",
                                      "--set", "ray.address=127.0.0.1:9", timeout=60).stderr


def test_an_unreachable_ray_address_fails_fast(tmp_path):
    port = _closed_port()
    proc = _cli("embed", "--set", f"lake.root={tmp_path / 'lake'}", "--set", f"ray.address=127.0.0.1:{port}",
                timeout=60)
    assert f"nothing answers at 127.0.0.1:{port}" in _one_line_naming(proc, "ray.address")
    assert not (tmp_path / "lake").exists()
    # Spark stages do not need Ray: the same address does not stop them from being checked further
    assert "ray.address" not in _cli("show-config", "--set", f"ray.address=127.0.0.1:{port}").stderr


def test_a_missing_delta_jar_fails_fast_naming_the_key(tmp_path):
    """delta_jars: none promises the jars are on the classpath already; when they are not, Spark only
    warns and the first Delta call would fail deep inside ingest."""
    proc = _cli("ingest", "--set", f"lake.root={tmp_path / 'lake'}", "--set", "spark.delta_jars=none",
                "--set", "spark.master=local[1]")
    assert "the Delta jar" in _one_line_naming(proc, "spark.delta_jars")
    # no data table was written; the failed run is recorded in the runs table
    assert [p.parent.name for p in (tmp_path / "lake").glob("*/_delta_log")] == ["runs"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_s3_session_without_hadoop_aws_pom_fails_at_once_naming_the_fix(tmp_path):
    """Without hadoop-aws's POM, Ivy resolves hadoop-aws alone and s3a fails deep in the first write
    (no AWS SDK class); the session must refuse to start, naming the file and the setup step."""
    from clustermix.errors import ClustermixError
    from clustermix.runtime import hadoop_version, spark_session

    repo = tmp_path / "m2"
    hv = hadoop_version()
    (repo / "io" / "delta" / "delta-spark_2.13").mkdir(parents=True)
    aws = repo / "org" / "apache" / "hadoop" / "hadoop-aws" / hv
    aws.mkdir(parents=True)
    (aws / f"hadoop-aws-{hv}.jar").write_bytes(b"")  # the jar alone, as `dependency:get -Dtransitive=false` leaves it
    cfg = build_config({"input": {"path": "builtin://bbc"}, "lake": {"root": "s3://bucket/lake"},
                        "sample": {"budget": 1}, "spark": {"maven_repo": str(repo)}})
    with pytest.raises(ClustermixError, match=rf"hadoop-aws-{re.escape(hv)}\.pom not found; run `make setup`"):
        spark_session(cfg)


def test_run_stages_takes_registry_stages_in_pipeline_order(capsys):
    """The cluster scripts submit one job for several stages: ``clustermix run --stages a,b,c``."""
    from clustermix.cli import build_parser

    args = build_parser().parse_args(["run", "--stages", "blend,stats sample"])
    assert args.stages == ("stats", "sample", "blend")
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["run", "--stages", "stats,bogus"])
    assert exc.value.code == 2 and "bogus: not a stage" in capsys.readouterr().err
