"""Deployment files: every spec parses for its tool, and the images pin what pyproject.toml pins."""

from __future__ import annotations

import py_compile
import re
import subprocess
from pathlib import Path

import pytest
import tomllib
import yaml

from clustermix.config import build_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [*sorted((ROOT / "deploy").glob("*.sh")), ROOT / ".ci" / "run"]


def _pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
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
    assert "jobs/embed.py" in doc["spec"]["entrypoint"] and "jobs/cluster.py" in doc["spec"]["entrypoint"]


def test_airflow_dag_and_jobs_compile():
    for f in [ROOT / "deploy" / "airflow" / "clustermix_dag.py", *sorted((ROOT / "jobs").glob("*.py"))]:
        py_compile.compile(str(f), doraise=True)


def test_images_pin_the_versions_of_pyproject():
    pins = _pins()
    ray_df = (ROOT / "docker" / "ray-gpu.Dockerfile").read_text()
    spark_df = (ROOT / "docker" / "spark.Dockerfile").read_text()
    assert f"rayproject/ray:{pins['ray']}-" in ray_df
    assert f"apache/spark:{pins['pyspark']}-" in spark_df
    assert f"DELTA_VERSION={pins['delta-spark']}" in spark_df
    spark_submit = (ROOT / "deploy" / "spark-submit.sh").read_text()
    assert f"delta-spark_2.13:{pins['delta-spark']}" in spark_submit


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
