"""The lake on object storage: every engine against a real S3 server (moto in server mode) on loopback.

Endpoint, region and credentials reach the code only through the standard AWS environment variables,
as they would on a cluster; in this process, the settings resolved from them are passed explicitly
(``S3``, as a lake carries them: ``lake.s3``). Spark runs in subprocesses (the ``clustermix`` CLI, a writer script):
its s3a jars and settings are fixed when its JVM starts, and the session-wide ``spark`` fixture has none.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from clustermix import deltalog, storage
from clustermix import lake as lk
from clustermix.lock import LakeLock

from .conftest import ROOT, make_config
from .s3server import FlakyProxy, MotoServer, env_for

BUCKET = "clustermix-lake"
CLI = [sys.executable, "-m", "clustermix.cli"]
# requests a run sends before it stops on a missing bucket
MAX_REQUESTS_BEFORE_A_PERMANENT_ERROR = 2  # one measured; storage.retries (5) retrying would send 6+


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server with one bucket; the AWS variables point this process at it meanwhile, and
    ``server.settings`` are the S3 settings resolved from them (what a lake of this config carries)."""
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    mp = pytest.MonkeyPatch()
    for key, value in env_for(server.endpoint).items():
        if key.startswith("AWS_"):
            mp.setenv(key, value)
    server.settings = storage.settings(make_config(Path("/tmp/unused"), "builtin://bbc").storage)  # no config endpoint: env
    storage.boto3_client(server.settings).create_bucket(Bucket=BUCKET)
    yield server
    mp.undo()
    server.stop()


def _delta_log(uri: str, s3: storage.S3Settings) -> list[dict]:
    """Every commit file of a table's log, parsed (a corrupt one fails the JSON parse)."""
    from pyarrow import fs as pafs

    filesystem, base = lk.open_fs(f"{uri}/_delta_log", s3)
    infos = filesystem.get_file_info(pafs.FileSelector(base))
    commits = sorted(i.path for i in infos if i.path.endswith(".json"))
    out = []
    for path in commits:
        with filesystem.open_input_stream(path) as fh:
            actions = [json.loads(line) for line in fh.read().decode().splitlines() if line.strip()]
        out.append({"version": int(path.rsplit("/", 1)[1].split(".")[0]), "actions": actions})
    return out


def test_concurrent_delta_rs_writers_lose_no_commit(s3):
    """Two writers appending to one table at once: every append is a version, versions are
    contiguous, the log parses, and the data has every row (S3 conditional writes, If-None-Match)."""
    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    uri = f"s3://{BUCKET}/concurrency/delta_rs"
    opts = deltalog.storage_options(uri, s3.settings)
    write_deltalake(uri, pa.table({"writer": [-1], "i": [-1]}), mode="append", storage_options=opts)
    n, errors = 6, []

    def writer(w: int) -> None:
        for i in range(n):
            try:
                write_deltalake(uri, pa.table({"writer": [w], "i": [i]}), mode="append", storage_options=opts)
            except Exception as exc:  # collected: a lost commit must show as a failure below
                errors.append(repr(exc))

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    dt = DeltaTable(uri, storage_options=opts)
    assert dt.version() == 2 * n
    log = _delta_log(uri, s3.settings)
    assert [c["version"] for c in log] == list(range(2 * n + 1))
    assert all(any("commitInfo" in a for a in c["actions"]) for c in log)
    rows = dt.to_pyarrow_table().to_pylist()
    assert sorted((r["writer"], r["i"]) for r in rows if r["writer"] >= 0) == [(w, i) for w in range(2) for i in range(n)]


def test_two_runs_racing_for_an_s3_lake_one_wins(s3):
    """The run lock on S3 is a conditional write: of runs starting at once, exactly one gets the lake."""
    from clustermix.errors import LakeBusyError

    lake = lk.Lake(f"s3://{BUCKET}/race", s3.settings)
    locks = [LakeLock(lake, f"run-{i}", 3600) for i in range(4)]
    won, busy = [], []
    barrier = threading.Barrier(len(locks))

    def take(lock: LakeLock) -> None:
        barrier.wait()
        try:
            lock.acquire()
            won.append(lock.run_id)
        except LakeBusyError:
            busy.append(lock.run_id)

    threads = [threading.Thread(target=take, args=(lock,)) for lock in locks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(busy) == 3
    winner = next(lock for lock in locks if lock.run_id == won[0])
    winner.release()
    again = LakeLock(lake, "run-later", 3600)
    again.acquire()  # released: free again
    # a stale lock (its run died long ago) is taken over
    storage.put_json_if(again.uri, {"run_id": "dead", "pid": -1, "host": "elsewhere", "time": 0}, s3=s3.settings,
                        absent=False)
    LakeLock(lake, "run-after-crash", 3600).acquire()


def test_wrong_bucket_fails_fast_with_one_line_naming_the_path(s3, tmp_path):
    """A permanent object-store error is not retried: exit 2 and one line that names the path. The
    requests are counted through a proxy that fails none: a retried error would show as repeats."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({**make_config(Path("/tmp/unused"), "builtin://bbc").to_dict(),
                                   "lake": {"root": "s3://no-such-bucket-here/lake"}}))
    proxy = FlakyProxy(s3.port, every=2**62)
    try:
        proc = subprocess.run([*CLI, "run", "--config", str(cfg)], check=False, env=env_for(proxy.endpoint),
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
        stats = proxy.stats()
    finally:
        proxy.stop()
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("clustermix:")]
    assert len(errors) == 1 and "s3://no-such-bucket-here/lake" in errors[0] and "NoSuchBucket" in errors[0]
    assert stats["failed"] == 0 and 1 <= stats["forwarded"] <= MAX_REQUESTS_BEFORE_A_PERMANENT_ERROR, stats


def test_two_lakes_on_two_stores_in_one_process_each_reach_their_own(s3, tmp_path):
    """One lake on the env's server, another on a second server named by its config's storage
    section: each one's tables, files and lock land on its own store, whichever was used last."""
    import pyarrow as pa

    from clustermix import deltars
    from clustermix.manifest import read_json, write_json

    other = MotoServer(tmp_path / "moto-b.log")
    try:
        a = lk.Lake(f"s3://{BUCKET}/two", s3.settings)
        b = lk.Lake.from_config(make_config(Path("/tmp/unused"), "builtin://bbc",
                                            lake={"root": f"s3://{BUCKET}/two"}, storage={"endpoint": other.endpoint}))
        assert a.root == b.root and (a.s3.endpoint, b.s3.endpoint) == (s3.endpoint, other.endpoint)
        storage.boto3_client(b.s3).create_bucket(Bucket=BUCKET)
        for lake, rows in ((a, [1, 2, 3]), (b, [10, 20]), (a, [4, 5, 6, 7])):
            deltars.overwrite(lake.table("t"), pa.table({"x": rows}), {"run_id": "two"}, s3=lake.s3)
            write_json(f"{lake.run_dir('two')}/manifest.json", {"rows": len(rows)}, s3=lake.s3)
            lock = LakeLock(lake, "two", 3600)
            lock.acquire()
            lock.release()
        assert deltalog.version(a.table("t"), s3=a.s3) == 1 and deltalog.num_records(a.table("t"), s3=a.s3) == 4
        assert deltalog.version(b.table("t"), s3=b.s3) == 0 and deltalog.num_records(b.table("t"), s3=b.s3) == 2
        assert read_json(f"{a.run_dir('two')}/manifest.json", s3=a.s3) == {"rows": 4}
        assert read_json(f"{b.run_dir('two')}/manifest.json", s3=b.s3) == {"rows": 2}
    finally:
        other.stop()


def test_transient_errors_are_retried_by_every_python_engine(s3):
    """Through a proxy that fails every third request once with a 503, pyarrow, delta-rs and the
    lock (boto3) still succeed: each retries with the settings of clustermix.storage (resolved from
    the env that points at the proxy, and passed explicitly)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from deltalake import DeltaTable, write_deltalake

    proxy = FlakyProxy(s3.port, every=3)
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    try:
        flaky = storage.settings(make_config(Path("/tmp/unused"), "builtin://bbc").storage)
        assert flaky.endpoint == proxy.endpoint
        base = f"s3://{BUCKET}/flaky"
        filesystem, path = lk.open_fs(f"{base}/files/a.parquet", flaky)
        for _ in range(3):
            pq.write_table(pa.table({"x": list(range(100))}), path, filesystem=filesystem)
            assert pq.read_table(path, filesystem=filesystem).num_rows == 100
        uri = f"{base}/table"
        for i in range(3):
            write_deltalake(uri, pa.table({"i": [i]}), mode="append",
                            storage_options=deltalog.storage_options(uri, flaky))
        assert deltalog.version(uri, s3=flaky) == 2 and deltalog.num_records(uri, s3=flaky) == 3
        assert DeltaTable(uri, storage_options=deltalog.storage_options(uri, flaky)).to_pyarrow_table().num_rows == 3
        lock = LakeLock(lk.Lake(base, flaky), "flaky-run", 3600)
        lock.acquire()
        lock.release()
        stats = proxy.stats()
        assert stats["failed"] >= 5, stats
    finally:
        mp.undo()
        proxy.stop()


SPARK_WRITERS = """
import sys, threading, yaml
from clustermix.config import build_config
from clustermix.runtime import spark_session
from clustermix import deltalog
from clustermix import lake as lk
cfg = build_config(yaml.safe_load(open(sys.argv[1])))
spark = spark_session(cfg)
lake = lk.Lake.from_config(cfg)
spark.range(1).selectExpr("-1 AS writer", "-1 AS i").write.format("delta").save(lake.spark_uri("spark_appends"))
def writer(w):
    for i in range(int(sys.argv[2])):
        spark.createDataFrame([(w, i)], "writer int, i int").write.format("delta").mode("append").save(
            lake.spark_uri("spark_appends"))
threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
[t.start() for t in threads]
[t.join() for t in threads]
print("versions", deltalog.version(lake.table("spark_appends"), s3=lake.s3))
"""


@pytest.mark.slow
def test_concurrent_spark_writers_in_one_driver_lose_no_commit(s3, tmp_path):
    """Two threads of one Spark driver appending to one s3a table: S3SingleDriverLogStore serialises
    their commits, so versions are contiguous and every append is there."""
    from deltalake import DeltaTable

    n = 4
    root = f"s3://{BUCKET}/spark_writers"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(make_config(root, "builtin://bbc").to_dict()))
    proc = subprocess.run([sys.executable, "-c", SPARK_WRITERS, str(cfg), str(n)], check=False, env=env_for(s3.endpoint),
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    uri = f"{root}/spark_appends"
    log = _delta_log(uri, s3.settings)
    assert [c["version"] for c in log] == list(range(2 * n + 1))
    rows = DeltaTable(uri, storage_options=deltalog.storage_options(uri, s3.settings)).to_pyarrow_table().to_pylist()
    assert sorted((r["writer"], r["i"]) for r in rows if r["writer"] >= 0) == [(w, i) for w in range(2) for i in range(n)]


@pytest.mark.slow
def test_whole_pipeline_with_input_and_lake_on_s3(s3, tmp_path, bbc_slice):
    """ingest -> embed -> cluster -> stats -> sample -> blend, input and lake on s3://, via the CLI."""
    from deltalake import DeltaTable

    from clustermix.manifest import read_json

    S3 = s3.settings
    src = f"s3://{BUCKET}/raw/bbc/part-0.jsonl"
    filesystem, path = lk.open_fs(src, S3)
    with filesystem.open_output_stream(path) as fh:
        fh.write(bbc_slice.read_bytes())
    root = f"s3://{BUCKET}/lake"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(make_config(root, f"s3://{BUCKET}/raw/bbc/").to_dict()))
    t0 = time.time()
    proc = subprocess.run([*CLI, "run", "--config", str(cfg)], check=False, env={**env_for(s3.endpoint), "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    seconds = time.time() - t0
    blended = f"{root}/blended"
    assert DeltaTable(blended, storage_options=deltalog.storage_options(blended, S3)).to_pyarrow_table().num_rows == 150
    manifest_line = next(line for line in proc.stdout.splitlines() if line.startswith("manifest: "))
    manifest = read_json(manifest_line.removeprefix("manifest: "), s3=S3)
    assert manifest["outcome"] == "succeeded" and manifest["lake_root"] == root
    assert manifest["stages"]["ingest"]["counts"]["read"] == 70
    assert all(manifest["stages"][s]["status"] == "ran" for s in ("ingest", "embed", "cluster", "stats",
                                                                  "sample", "blend"))
    assert deltalog.num_records(f"{root}/docs", s3=S3) == manifest["stages"]["ingest"]["counts"]["accepted"]
    assert storage.read_json_object(f"{root}/_lock.json", s3=S3) is None  # the run released the lake
    print(f"pipeline on s3: {seconds:.0f} s")
    # the console of a successful run: progress and the summary, no traceback, no engine's warning;
    # the engines' output is in the run's log, copied into the lake
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    foreign = [ln for ln in proc.stderr.splitlines() if ln.strip() and " clustermix." not in ln]
    assert foreign == [], foreign[:20]
    log_line = next(line for line in proc.stdout.splitlines() if line.startswith("log: "))
    log_uri = log_line.removeprefix("log: ")
    assert log_uri == f"{root}/runs/{manifest['run_id']}/run.log"
    log_fs, log_path = lk.open_fs(log_uri, S3)
    with log_fs.open_input_stream(log_path) as fh:
        log_text = fh.read().decode()
    assert "clustermix.pipeline: blend: running" in log_text
    assert " py4j" in log_text or " ray" in log_text  # the engines' records went there, not to the console

    # the nightly path on s3://: the first refresh adopts the lake (every stage current, nothing rerun),
    # the second takes only the file that landed since and assigns its documents to the same clusters
    env = {**env_for(s3.endpoint), "HF_HUB_OFFLINE": "1"}
    from clustermix.corpus import iter_records

    accepted0 = manifest["stages"]["ingest"]["counts"]["accepted"]
    seen = {json.loads(line)["text"] for line in bbc_slice.read_text().splitlines()}
    fresh = list({r["text"]: r for r in iter_records("bbc")
                  if r["text"] not in seen and r["domain"] == "business"}.values())[:12]
    for night, body in ((1, None), (2, "".join(json.dumps(r) + "\n" for r in fresh))):
        if body:
            with filesystem.open_output_stream(f"{BUCKET}/raw/bbc/part-{night}.jsonl") as fh:
                fh.write(body.encode())
        proc = subprocess.run([*CLI, "refresh", "--config", str(cfg)], check=False, env=env, capture_output=True,
                              text=True, timeout=1500, cwd=ROOT)
        assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    manifest = read_json(next(line for line in proc.stdout.splitlines()
                              if line.startswith("manifest: ")).removeprefix("manifest: "), s3=S3)
    assert manifest["mode"] == "refresh" and [p.rsplit("/", 1)[-1] for p in manifest["inputs_taken"]] == [
        "part-2.jsonl"]
    assert manifest["stages"]["ingest"]["counts"]["accepted"] == 12
    assert manifest["drift"]["new_docs"] == 12
    assert deltalog.num_records(f"{root}/docs", s3=S3) == deltalog.num_records(f"{root}/assignments", s3=S3) == \
        accepted0 + 12
    from clustermix import runs

    recorded = runs.read_runs(lk.Lake(root, S3))
    assert [(r["mode"], r["outcome"]) for r in recorded] == [("run", "succeeded"), ("bootstrap", "succeeded"),
                                                              ("refresh", "succeeded")]


@pytest.mark.slow
def test_bad_input_files_on_s3_are_checked_by_executors_and_skipped(s3, tmp_path):
    """Input and lake on s3://: the executors check each file through the configured endpoint, a gzip
    cut short keeps its complete records (staged under the lake on S3), a file that is not gzip is
    skipped and recorded; the console shows one line per bad file and no trace."""
    import gzip
    import zlib

    from clustermix.manifest import read_json

    body = "".join(json.dumps({"id": f"c{i}", "text": f"cut document {i} " * 10}) + "\n" for i in range(80))
    whole = gzip.compress(body.encode())
    cut = whole[: len(whole) // 2]
    kept = zlib.decompressobj(wbits=31).decompress(cut).count(b"\n")
    S3 = s3.settings
    filesystem, _ = lk.open_fs(f"s3://{BUCKET}", S3)
    files = {"a.jsonl": "".join(json.dumps({"id": f"a{i}", "text": f"whole document {i}"}) + "\n"
                                for i in range(6)).encode(), "b-cut.jsonl.gz": cut, "c-fake.jsonl.gz": b"plain"}
    for name, data in files.items():
        with filesystem.open_output_stream(f"{BUCKET}/raw/bad/{name}", compression=None) as fh:  # bytes as given
            fh.write(data)
    root = f"s3://{BUCKET}/lake-bad"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(make_config(root, f"s3://{BUCKET}/raw/bad/").to_dict()))
    proc = subprocess.run([*CLI, "ingest", "--config", str(cfg)], check=False, env={**env_for(s3.endpoint),
                          "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=1500, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out and "Py4JJavaError" not in out
    assert f"skipped input file s3://{BUCKET}/raw/bad/c-fake.jsonl.gz: wrong_format" in out, out[-6000:]
    manifest = read_json(next(ln for ln in proc.stdout.splitlines() if ln.startswith("manifest: ")).removeprefix(
        "manifest: "), s3=S3)
    c = manifest["stages"]["ingest"]["counts"]
    assert (c["accepted"], c["files_seen"], c["files_ingested"], c["files_skipped"]) == (6 + kept, 3, 2, 1)
    assert c["per_file"][f"{BUCKET}/raw/bad/b-cut.jsonl.gz"]["read"] == kept
    from deltalake import DeltaTable

    bad = DeltaTable(f"{root}/bad_files", storage_options=deltalog.storage_options(root, S3)).to_pyarrow_table().to_pylist()
    assert sorted((r["path"], r["reason"], r["status"]) for r in bad) == [
        (f"s3://{BUCKET}/raw/bad/b-cut.jsonl.gz", "truncated", "partial"),
        (f"s3://{BUCKET}/raw/bad/c-fake.jsonl.gz", "wrong_format", "skipped")]
    sources = {r["source_file"] for r in DeltaTable(f"{root}/docs", storage_options=deltalog.storage_options(root, S3))
               .to_pyarrow_table(columns=["source_file"]).to_pylist()}
    assert sources == {f"s3a://{BUCKET}/raw/bad/a.jsonl", f"s3a://{BUCKET}/raw/bad/b-cut.jsonl.gz"}
    from pyarrow import fs as pafs

    staged = filesystem.get_file_info(pafs.FileSelector(f"{BUCKET}/lake-bad/_staging", recursive=True,
                                                        allow_not_found=True))
    assert [i.path for i in staged if i.type == pafs.FileType.File] == []  # the staging copy is gone
