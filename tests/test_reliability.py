"""Reliability: fuzzed input, a busy lake, a driver killed mid-run, Ray actors killed mid-stage."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from clustermix import deltalog, faults, tableio
from clustermix import lake as lk
from clustermix.config import load_config
from clustermix.errors import LakeBusyError
from clustermix.lock import LakeLock
from clustermix.pipeline import run_stages

from .conftest import make_config

# the stages of `clustermix run` without a search target
STAGES = ("ingest", "embed", "cluster", "stats", "sample", "blend")

ROOT = Path(__file__).resolve().parents[1]


def _mutate(line: str, rng: random.Random) -> bytes:
    """One random corruption of a valid JSON line (bytes, since some are not valid UTF-8)."""
    b = bytearray(line.encode())
    op = rng.randrange(8)
    if op == 0 and b:
        del b[rng.randrange(len(b)) :]  # truncate
    elif op == 1:
        b.insert(rng.randrange(len(b) + 1), rng.randrange(256))  # a random byte anywhere
    elif op == 2 and b:
        b[rng.randrange(len(b))] = rng.choice(b'{}[]":,\\\x00\xff')  # a structural character
    elif op == 3:
        b = bytearray(line.replace('"text"', rng.choice(['"txt"', '"text"', '"TEXT"'])).encode())
    elif op == 4:
        b = bytearray(json.dumps(rng.choice([None, 1, "s", [], {"text": None}, {"text": 3.5}])).encode())
    elif op == 5:
        b = bytearray(line.replace('"quality": 0.5', rng.choice(['"quality": "x"', '"quality": null', '"quality": 1e309'])).encode())
    elif op == 6:
        b = b"\xef\xbb\xbf" + b + b"\r"
    else:
        b = b + rng.choice([b"", b" ", b"\t"])
    return bytes(b)


# Unicode White_Space, which Java's (?U)\s matches (Python's str.isspace also accepts \x1c-\x1f)
_WS = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*")


def _blank(line: bytes) -> bool:
    """What ingest treats as a blank line (not a record): valid UTF-8, only whitespace after BOM/CR."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    text = text.removeprefix("\ufeff").removesuffix("\r")
    return _WS.fullmatch(text) is not None


def test_fuzzed_input_never_crashes_and_every_record_is_accounted(tmp_path, spark):
    rng = random.Random(20261123)
    base = [json.dumps({"id": f"f{i}", "text": f"fuzz text {i} " * rng.randint(1, 5), "quality": 0.5})
            for i in range(60)]
    lines = [_mutate(rng.choice(base), rng) for _ in range(400)] + [b.encode() for b in base]
    src = tmp_path / "fuzz.jsonl"
    src.write_bytes(b"\n".join(ln.replace(b"\n", b" ") for ln in lines) + b"\n")
    non_blank = sum(1 for ln in src.read_bytes().split(b"\n")[:-1] if not _blank(ln))
    run = run_stages(make_config(tmp_path / "lake", str(src)), ("ingest",), spark=spark)
    c = run.manifest["stages"]["ingest"]["counts"]
    assert c["read"] == c["accepted"] + c["duplicates"] + c["quarantined"]
    assert c["read"] == non_blank
    assert c["accepted"] >= 60 and c["quarantined"] > 50
    reasons = tableio.read(spark, run.lake, "quarantine").select("reason").distinct().collect()
    assert {r["reason"] for r in reasons} <= {
        "invalid_utf8", "malformed_json", "not_an_object", "missing_text", "text_not_string", "blank_text",
        "nul_in_text", "too_long", "bad_id", "quality_not_a_number", "duplicate_id"}


def test_a_second_run_on_a_busy_lake_refuses_and_writes_nothing(tmp_path, spark):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "one"}\n{"text": "two"}\n')
    cfg = make_config(tmp_path / "lake", str(src))
    holder = LakeLock(lk.Lake(cfg.lake.root), "other-run", 3600)
    holder.acquire()  # held by this (live) process under another run id
    try:
        with pytest.raises(LakeBusyError, match="in use by run other-run"):
            run_stages(cfg, ("ingest",), spark=spark)
        assert deltalog.version(str(tmp_path / "lake" / "docs")) is None
    finally:
        holder.release()
    # a lock left by a dead process is stale: the next run takes it over
    (tmp_path / "lake" / "_lock.json").write_text(json.dumps(
        {"run_id": "dead", "pid": 2**22 + 12345, "host": os.uname().nodename, "time": time.time()}))
    run = run_stages(cfg, ("ingest",), spark=spark)
    assert run.manifest["outcome"] == "succeeded"
    assert not (tmp_path / "lake" / "_lock.json").exists()


def _kill_tree(proc: psutil.Process) -> None:
    procs = [proc, *proc.children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)


@pytest.mark.slow
def test_driver_killed_mid_stage_then_rerun_finishes_with_identical_tables(tmp_path, spark, ray_local, pipeline):
    cfg, reference = pipeline
    lake_root = tmp_path / "lake"
    conf = cfg.to_dict()
    conf["lake"]["root"] = str(lake_root)
    cfg_path = tmp_path / "conf.yaml"
    cfg_path.write_text(yaml.safe_dump(conf))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "lib")}
    root = os.environ[faults.ENV]
    faults.arm(root, "stage.stats")  # the driver stops once stats is marked running, until killed
    proc = subprocess.Popen([sys.executable, "-m", "clustermix.cli", "run", "--config", str(cfg_path), "-q"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ps = psutil.Process(proc.pid)
    killed_during, pid = None, None
    try:
        deadline = time.monotonic() + 900  # a safety net against a hung run, not a race
        while proc.poll() is None and time.monotonic() < deadline and (
                pid := faults.held_pid(root, "stage.stats")) is None:
            time.sleep(0.1)
        if proc.poll() is None and pid == proc.pid:
            manifest = json.loads(next((lake_root / "runs").glob("*/manifest.json")).read_text())
            if manifest["stages"].get("stats", {}).get("status") == "running":
                killed_during = "stats"
            _kill_tree(ps)
    finally:
        if proc.poll() is None:
            _kill_tree(ps)
        faults.disarm(root, "stage.stats")
    assert killed_during == "stats", "the driver was not caught mid-run"
    # the interrupted stage's table was never committed; the finished ones were
    assert deltalog.version(str(lake_root / "cluster_stats")) is None
    versions = {t: deltalog.version(str(lake_root / t)) for t in ("docs", "embeddings", "assignments")}
    assert None not in versions.values()
    # the killed run's own config (the shared pipeline's: MinHash on), so a stage is skipped only when current;
    # the stale lock is taken over
    again = run_stages(load_config(str(cfg_path), []), spark=spark)
    status = {s: again.manifest["stages"][s]["status"] for s in STAGES}
    assert status == {"ingest": "skipped", "embed": "skipped", "cluster": "skipped",
                      "stats": "ran", "sample": "ran", "blend": "ran"}
    assert {t: deltalog.version(str(lake_root / t)) for t in versions} == versions

    def content(root: str) -> list[tuple]:
        rows = tableio.read(spark, lk.Lake(root), "blended").select("id", "cluster_id", "draw", "position").collect()
        return sorted(tuple(r) for r in rows)

    assert content(str(lake_root)) == content(reference.lake.root)


def _cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def _kill_at(point: str, index: int, marker: str, out: dict) -> threading.Thread:
    """Arm fault point ``point`` at ``index``; when a process holds there, kill -9 it (it must be a
    Ray worker whose title contains ``marker``), then disarm so the retry passes. The kill lands at
    that step on any machine, however fast: the process waits there until it is killed."""
    root = os.environ[faults.ENV]
    faults.arm(root, point, index)

    def watch() -> None:
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and (pid := faults.held_pid(root, point)) is None:
                time.sleep(0.05)
            if pid is None:
                return
            out["title"] = _cmdline(pid)
            if marker in out["title"]:
                os.kill(pid, signal.SIGKILL)
                out["pid"] = pid
        finally:
            faults.disarm(root, point)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


@pytest.mark.slow
def test_embed_actor_killed_mid_run_loses_and_duplicates_nothing(tmp_path, spark, ray_local, bbc_slice):
    records = [json.loads(x) for x in bbc_slice.read_text().splitlines()][:40]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = make_config(tmp_path / "lake", str(src), embed={"batch_size": 4})
    out: dict = {}
    watcher = _kill_at("embed.batch", 2, "Embedder", out)  # mid-embed: one batch done, two to go
    try:
        run = run_stages(cfg, ("ingest", "embed"), spark=spark)
    finally:
        faults.disarm(os.environ[faults.ENV], "embed.batch")
    watcher.join(timeout=5)
    assert "pid" in out, f"no embedding actor was killed (held by: {out.get('title')!r})"
    assert run.manifest["stages"]["embed"]["counts"]["embedded"] == len(records)
    rows = tableio.read(spark, run.lake, "embeddings").collect()
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in records)
    from sentence_transformers import SentenceTransformer

    from clustermix.models import resolve_model

    ref = SentenceTransformer(resolve_model("all-MiniLM-L6-v2"), device="cpu").encode(
        [r["text"] for r in records[:5]], normalize_embeddings=True)
    got = {r["id"]: np.array(r["embedding"]) for r in rows}
    for rec, v in zip(records[:5], ref, strict=False):
        assert float(got[rec["id"]] @ v) >= 0.999


def test_kmeans_actor_killed_mid_fit_gives_the_same_result(ray_local):
    from clustermix.config import ClusterConfig
    from clustermix.kmeans_dist import distributed_kmeans

    from .test_kmeans import _dataset, blobs

    x = blobs(20000, 64, 10, seed=9)
    cfg = ClusterConfig(k=10, niter=60, tol=0.0, seed=3, num_shards=2, cpus_per_shard=0.25)
    clean = distributed_kmeans(_dataset(x), cfg)
    out: dict = {}
    watcher = _kill_at("kmeans.step", 5, "ShardActor", out)  # mid-fit: at the fifth of 60 iterations
    try:
        hit = distributed_kmeans(_dataset(x), cfg)
    finally:
        faults.disarm(os.environ[faults.ENV], "kmeans.step")
    watcher.join(timeout=5)
    assert "pid" in out, f"no shard actor was killed (held by: {out.get('title')!r})"
    assert hit.attempts == 2
    assert np.array_equal(clean.fit.centroids, hit.fit.centroids)
