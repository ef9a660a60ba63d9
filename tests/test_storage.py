"""Object-store settings are a value that goes with the data, never process state.

A config's ``storage`` section resolves to :class:`~clustermix.storage.S3Settings`, a
:class:`~clustermix.lake.Lake` carries them (``lake.s3``) and every helper that may open an ``s3://``
URI takes them as ``s3=``: two lakes of one process keep their own, an ``s3://`` URI without settings
is refused with a clear error, and no entry point writes AWS variables into the environment.
(The clients against a real S3 server: tests/test_s3.py.)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from clustermix import deltalog, storage
from clustermix import lake as lk
from clustermix.storage import S3Settings, S3SettingsMissing

from .conftest import make_config

AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ALLOW_HTTP")


def _aws_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


def _endpoint_of(filesystem) -> str:
    """The endpoint a pyarrow S3FileSystem was built with (from its pickled arguments)."""
    args = filesystem.__reduce__()[1][0]
    return f"{args['scheme']}://{args['endpoint_override']}"


def _config(root: str, endpoint: str, region: str, tmp_path: Path):
    return make_config(tmp_path / "unused", "builtin://bbc", lake={"root": root},
                       storage={"endpoint": endpoint, "region": region, "retries": 2})


def test_two_lakes_with_different_endpoints_each_keep_their_own_settings(tmp_path, monkeypatch):
    for key in AWS_VARS:
        monkeypatch.delenv(key, raising=False)
    before = _aws_env()
    cfg_a = _config("s3://bucket-a/lake", "http://127.0.0.1:9001", "eu-a-1", tmp_path)
    cfg_b = _config("s3://bucket-b/lake", "http://127.0.0.1:9002", "eu-b-1", tmp_path)
    a = lk.Lake.from_config(cfg_a)
    seen_a = (a.s3, storage.delta_options(a.table("docs"), a.s3), _endpoint_of(storage.pyarrow_fs(a.s3)))
    assert a.s3 == storage.settings(cfg_a.storage)
    assert (a.s3.endpoint, a.s3.region, a.s3.retries) == ("http://127.0.0.1:9001", "eu-a-1", 2)

    # building the other lake, and everything a run of it builds, changes nothing of the first
    b = lk.Lake.from_config(cfg_b)
    from clustermix.pipeline import Run

    run_b = Run(cfg_b)
    filesystem_b, path_b = lk.open_fs(b.table("docs"), b.s3)
    storage.spark_conf(cfg_b.storage)
    storage.ray_env(cfg_b.storage)

    assert run_b.lake.s3 == b.s3 != a.s3
    assert (b.s3.endpoint, b.s3.region) == ("http://127.0.0.1:9002", "eu-b-1")
    assert _endpoint_of(filesystem_b) == "http://127.0.0.1:9002" and path_b == "bucket-b/lake/docs"
    opts_a, opts_b = storage.delta_options(a.table("docs"), a.s3), storage.delta_options(b.table("docs"), b.s3)
    assert (opts_a["AWS_ENDPOINT_URL"], opts_a["AWS_REGION"]) == ("http://127.0.0.1:9001", "eu-a-1")
    assert (opts_b["AWS_ENDPOINT_URL"], opts_b["AWS_REGION"]) == ("http://127.0.0.1:9002", "eu-b-1")
    assert (a.s3, storage.delta_options(a.table("docs"), a.s3), _endpoint_of(lk.open_fs(a.table("docs"), a.s3)[0])) \
        == seen_a
    assert deltalog.storage_options(a.table("docs"), a.s3) == seen_a[1]
    # and a lake built from the first config again is the first lake's, whatever was built since
    assert lk.Lake.from_config(cfg_a).s3 == a.s3
    assert _aws_env() == before


def test_settings_travel_with_a_lake_to_where_it_goes(tmp_path):
    """A Ray worker or a Spark executor gets the driver's settings as a pickled value."""
    import pickle

    cfg = _config("s3://bucket-a/lake", "http://127.0.0.1:9001", "eu-a-1", tmp_path)
    s3 = lk.Lake.from_config(cfg).s3
    assert isinstance(s3, S3Settings) and pickle.loads(pickle.dumps(s3)) == s3
    filesystem = pickle.loads(pickle.dumps(storage.pyarrow_fs(s3)))
    assert _endpoint_of(filesystem) == "http://127.0.0.1:9001" and filesystem.region == "eu-a-1"


def _no_settings_calls(tmp_path: Path) -> dict[str, object]:
    from clustermix.console import RunLog
    from clustermix.lock import LakeLock
    from clustermix.manifest import read_json, write_json

    uri = "s3://some-bucket/lake"
    return {
        "open_fs": lambda: lk.open_fs(f"{uri}/docs"),
        "list_parquet": lambda: lk.list_parquet(f"{uri}/_staging/x"),
        "write_atomic": lambda: lk.write_atomic(f"{uri}/x.json", b"{}"),
        "parquet_rows": lambda: lk.parquet_rows([f"{uri}/docs/part-0.parquet"], skip_unfinished=True),
        "lake.remove": lambda: lk.Lake(uri).remove(f"{uri}/_staging/x"),
        "pyarrow_fs": lambda: storage.pyarrow_fs(None, uri),
        "delta_options": lambda: storage.delta_options(f"{uri}/docs", None),
        "deltalog.version": lambda: deltalog.version(f"{uri}/docs"),
        "deltalog.num_records": lambda: deltalog.num_records(f"{uri}/docs"),
        "deltalog.file_counts": lambda: deltalog.file_counts(f"{uri}/docs"),
        "boto3_client": lambda: storage.boto3_client(None),
        "read_json_object": lambda: storage.read_json_object(f"{uri}/_lock.json", s3=None),
        "put_json_if": lambda: storage.put_json_if(f"{uri}/_lock.json", {}, s3=None),
        "LakeLock": lambda: LakeLock(lk.Lake(uri), "run", 60),
        "RunLog": lambda: RunLog(f"{uri}/runs/r/run.log"),
        "read_json": lambda: read_json(f"{uri}/runs/r/manifest.json"),
        "write_json": lambda: write_json(f"{uri}/runs/r/manifest.json", {}),
    }


@pytest.mark.parametrize("call", sorted(_no_settings_calls(Path("/tmp")).keys()))
def test_an_s3_uri_without_settings_is_refused_with_a_clear_error(call, tmp_path, monkeypatch):
    """No fallback to settings of the process or to the environment alone: the caller forgot ``s3=``."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # would be enough for a client on its own
    with pytest.raises(S3SettingsMissing, match=r"s3://.*no S3 settings were passed"):
        _no_settings_calls(tmp_path)[call]()


def test_local_paths_need_no_settings(tmp_path):
    lake = lk.Lake(str(tmp_path / "lake"))
    assert lake.s3 is None
    lk.write_atomic(lake.table("x.json"), b"{}")
    filesystem, path = lk.open_fs(lake.table("x.json"))
    assert filesystem.get_file_info(path).is_file
    assert deltalog.version(lake.table("docs")) is None and lk.list_parquet(lake.root) == []


def test_entry_points_leave_the_aws_environment_alone(tmp_path, monkeypatch, capsys):
    """The CLI, a run, maintain: the storage section reaches every client as a value; none of them
    writes AWS_* (before, the entry points exported the endpoint and region into os.environ)."""
    from clustermix import cli
    from clustermix.maintain import run_maintain
    from clustermix.pipeline import Run

    for key in AWS_VARS:
        monkeypatch.delenv(key, raising=False)
    before = _aws_env()
    cfg = make_config(tmp_path / "lake", "builtin://bbc",
                      storage={"endpoint": "http://127.0.0.1:9", "region": "eu-x-1"})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert cli.main(["show-config", "--config", str(path)]) == 0
    assert cli.main(["runs", "--config", str(path)]) == 0
    assert "no runs under" in capsys.readouterr().out
    assert Run(cfg).lake.s3 == storage.settings(cfg.storage)
    assert run_maintain(cfg, "maintain-env") == []
    assert _aws_env() == before


@pytest.mark.slow
def test_a_stage_run_leaves_the_aws_environment_alone(tmp_path, monkeypatch, spark, bbc_slice):
    """A whole stage (ingest, under the lake lock, recorded in the runs table) with an endpoint and
    region configured: os.environ's AWS variables are as they were."""
    from clustermix.pipeline import run_stages

    for key in AWS_VARS:
        monkeypatch.delenv(key, raising=False)
    before = _aws_env()
    cfg = make_config(tmp_path / "lake", str(bbc_slice), storage={"endpoint": "http://127.0.0.1:9",
                                                                  "region": "eu-x-1"})
    run = run_stages(cfg, ("ingest",), spark=spark)
    assert run.manifest["outcome"] == "succeeded" and run.manifest["stages"]["ingest"]["status"] == "ran"
    assert run.lake.s3 is not None and run.lake.s3.endpoint == "http://127.0.0.1:9"
    assert _aws_env() == before
