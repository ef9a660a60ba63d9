"""Bad input files: every kind gets its own reason; ``fail`` stops before anything is written with one
line naming the file, ``skip`` ingests every record of the good files (and of the intact part of a
file cut short) and records the bad ones in ``bad_files``. Real files, real Spark and Delta."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
from pyarrow import fs as pafs

from clustermix import deltalog, filecheck, tableio
from clustermix import lake as lk
from clustermix.badfiles import BadInputFile, balance
from clustermix.config import InputConfig
from clustermix.pipeline import run_stages

from .conftest import make_config


def _lines(prefix: str, n: int, **extra: Any) -> bytes:
    return "".join(json.dumps({"id": f"{prefix}{i}", "text": f"{prefix} document {i} " * 8, **extra}) + "\n"
                   for i in range(n)).encode()


def _cut_gzip(path: Path, body: bytes, keep: float = 0.5) -> int:
    """Write ``body`` gzipped and cut short; return how many complete lines survive the cut (counted here
    with zlib's own partial decompression, independently of the code under test)."""
    data = gzip.compress(body)
    cut = data[: int(len(data) * keep)]
    path.write_bytes(cut)
    prefix = zlib.decompressobj(wbits=31).decompress(cut)
    assert 0 < prefix.count(b"\n") < body.count(b"\n")
    return prefix.count(b"\n")


def _parquet(path: Path, **columns: list[Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)


def _check(path: Path, fmt: str = "jsonl", icfg: InputConfig | None = None, stage: Path | None = None
           ) -> filecheck.Verdict:
    stage_to = (lambda p: str(stage / (Path(p).name + ".staged"))) if stage else None
    return filecheck.check_file(pafs.LocalFileSystem(), str(path), path.stat().st_size if path.exists() else 0,
                                fmt, icfg or InputConfig(), stage_to)


def _ids(spark: Any, lake: lk.Lake, table: str = "docs") -> set[str]:
    return {r["id"] for r in tableio.read(spark, lake, table).select("id").collect()}


# --- one file at a time, no Spark ------------------------------------------------------------------


def test_each_kind_of_bad_file_has_its_own_reason(tmp_path: Path) -> None:
    good = _lines("g", 50)
    (tmp_path / "ok.jsonl.gz").write_bytes(gzip.compress(good))
    (tmp_path / "two-members.jsonl.gz").write_bytes(gzip.compress(good[:300]) + gzip.compress(good[300:]))
    _cut_gzip(tmp_path / "cut.jsonl.gz", good)
    (tmp_path / "not-gzip.jsonl.gz").write_bytes(good)
    broken = bytearray(gzip.compress(good))
    broken[len(broken) // 2] ^= 0xFF
    (tmp_path / "broken.jsonl.gz").write_bytes(bytes(broken))
    (tmp_path / "gzip-named-plain.jsonl").write_bytes(gzip.compress(good))
    (tmp_path / "plain.jsonl").write_bytes(good)
    _parquet(tmp_path / "ok.parquet", id=["a"], text=["x"])
    (tmp_path / "not.parquet").write_bytes(good)
    whole = (tmp_path / "ok.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(whole[: len(whole) // 2])
    _parquet(tmp_path / "no-text.parquet", id=["a"], body=["x"])
    _parquet(tmp_path / "float-id.parquet", id=[1.5], text=["x"])
    _parquet(tmp_path / "int-text.parquet", id=["a"], text=[7])
    _parquet(tmp_path / "str-quality.parquet", text=["x"], quality=["high"])
    expected = {
        "ok.jsonl.gz": None, "two-members.jsonl.gz": None, "plain.jsonl": None, "ok.parquet": None,
        "cut.jsonl.gz": "truncated", "not-gzip.jsonl.gz": "wrong_format", "broken.jsonl.gz": "corrupt",
        "gzip-named-plain.jsonl": "wrong_format", "not.parquet": "wrong_format", "cut.parquet": "truncated",
        "no-text.parquet": "missing_text_column", "float-id.parquet": "unsafe_type",
        "int-text.parquet": "unsafe_type", "str-quality.parquet": "unsafe_type", "gone.jsonl": "unreadable",
    }
    got = {name: _check(tmp_path / name, "parquet" if name.endswith(".parquet") else "jsonl").reason
           for name in expected}
    assert got == expected
    assert "'text'" in _check(tmp_path / "no-text.parquet", "parquet").detail
    assert "'id'" in _check(tmp_path / "float-id.parquet", "parquet").detail
    assert _check(tmp_path / "cut.parquet", "parquet").status == "skipped"  # nothing before a footer


def test_a_file_without_read_permission_is_unreadable(tmp_path: Path) -> None:
    f = tmp_path / "locked.jsonl"
    f.write_bytes(_lines("l", 3))
    f.chmod(0)
    if os.geteuid() != 0:
        v = _check(f)
        reason, status, detail = v.reason, v.status, v.detail
    else:
        # root reads any file: the check runs as an unprivileged user, as a real executor would
        tmp_path.chmod(0o755)
        for parent in tmp_path.parents:
            if parent.stat().st_mode & 0o005 != 0o005:
                parent.chmod(parent.stat().st_mode | 0o005)
        code = ("import json, sys; from pyarrow import fs; from clustermix import filecheck; "
                "from clustermix.config import InputConfig; p = sys.argv[1]; "
                "v = filecheck.check_file(fs.LocalFileSystem(), p, 0, 'jsonl', InputConfig(), lambda s: s); "
                "print(json.dumps([v.reason, v.status, v.detail]))")
        out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                              code, str(f)], capture_output=True, text=True, check=True, timeout=120)
        reason, status, detail = json.loads(out.stdout.strip().splitlines()[-1])
    assert (reason, status) == ("unreadable", "skipped") and "permission denied" in detail


def test_a_gzip_cut_short_keeps_exactly_its_complete_lines(tmp_path: Path) -> None:
    body = _lines("c", 400)
    n = _cut_gzip(tmp_path / "cut.jsonl.gz", body, keep=0.6)
    without = _check(tmp_path / "cut.jsonl.gz")  # under fail: judged, nothing staged
    assert (without.reason, without.kept_lines, without.staged) == ("truncated", n, None)
    stage = tmp_path / "stage"
    v = _check(tmp_path / "cut.jsonl.gz", stage=stage)
    assert (v.reason, v.status, v.kept_lines) == ("truncated", "partial", n)
    staged = Path(str(v.staged)).read_bytes()
    assert staged == b"".join(body.splitlines(keepends=True)[:n])  # every complete line, nothing after
    assert f"{n:,} complete lines" in v.detail


def test_decompression_memory_is_bounded(tmp_path: Path) -> None:
    f = tmp_path / "big.jsonl.gz"
    f.write_bytes(gzip.compress(b"\n" * (64 << 20), compresslevel=1))  # 64 MiB from ~64 KiB
    with f.open("rb") as fh:
        sizes = [len(c) for c in filecheck.inflate(fh.read, "gzip")]
    assert sum(sizes) == 64 << 20 and max(sizes) <= filecheck.OUT


def test_safe_casts_are_named_and_unsafe_ones_are_not_cast() -> None:
    import pyarrow as pa

    icfg = InputConfig()
    schema = pa.schema([("id", pa.int64()), ("text", pa.binary()), ("quality", pa.decimal128(5, 2)),
                        ("domain", pa.dictionary(pa.int32(), pa.string())), ("lang", pa.null())])
    assert filecheck.check_columns(schema, icfg) == (
        "text: binary -> string (UTF-8 checked per record)", "id: int64 -> string",
        "quality: decimal128(5, 2) -> double")
    assert filecheck.check_columns(pa.schema([("text", pa.string()), ("quality", pa.float64())]), icfg) == ()
    with pytest.raises(filecheck._Bad) as bad:
        filecheck.check_columns(pa.schema([("text", pa.string()), ("id", pa.timestamp("s"))]), icfg)
    assert bad.value.reason == "unsafe_type"


def test_files_are_spread_over_tasks_by_size() -> None:
    items = [(f"f{i}", s) for i, s in enumerate([100, 90, 10, 10, 10, 5, 5, 1])]
    bins = balance(items, 3)
    assert sorted(p for b in bins for p, _ in b) == sorted(p for p, _ in items)
    assert sorted(sum(s for _, s in b) for b in bins) == [41, 90, 100]
    assert balance(items[:2], 5) == [[("f0", 100)], [("f1", 90)]]


# --- a full run: JSONL and .jsonl.gz ---------------------------------------------------------------


def _jsonl_folder(folder: Path) -> dict[str, Any]:
    folder.mkdir(parents=True)
    (folder / "a.jsonl").write_bytes(_lines("a", 12) + b'{"text": broken\n')
    (folder / "b.jsonl.gz").write_bytes(gzip.compress(_lines("b", 8)))
    kept = _cut_gzip(folder / "c-cut.jsonl.gz", _lines("c", 120))
    (folder / "d-fake.jsonl.gz").write_bytes(_lines("d", 5))  # named .gz, plain text
    (folder / "e-gzip.jsonl").write_bytes(gzip.compress(_lines("e", 5)))  # gzip under a plain name
    (folder / "_temporary").mkdir()  # an uploader's folder, which Spark does not read: not input at all
    (folder / "_temporary" / "f-upload.jsonl.gz").write_bytes(b"half an upload")
    return {"kept": kept, "good": {f"a{i}" for i in range(12)} | {f"b{i}" for i in range(8)}}


def test_jsonl_skip_ingests_every_good_record_and_the_intact_part(tmp_path: Path, spark: Any) -> None:
    exp = _jsonl_folder(tmp_path / "in")
    run = run_stages(make_config(tmp_path / "lake", str(tmp_path / "in")), ("ingest",), spark=spark)
    c = run.manifest["stages"]["ingest"]["counts"]
    assert _ids(spark, run.lake) == exp["good"] | {f"c{i}" for i in range(exp["kept"])}
    assert (c["files_seen"], c["files_ingested"], c["files_skipped"], c["files_partial"]) == (5, 3, 2, 1)
    assert c["files_by_reason"] == {"truncated": 1, "wrong_format": 2}
    per = {Path(p).name: f for p, f in c["per_file"].items()}
    assert per["c-cut.jsonl.gz"]["read"] == per["c-cut.jsonl.gz"]["accepted"] == exp["kept"]
    assert per["a.jsonl"] == {"read": 13, "accepted": 12, "duplicates": 0, "near_duplicates": 0, "quarantined": 1,
                              "status": "ingested"}
    assert per["d-fake.jsonl.gz"]["read"] == 0 and per["d-fake.jsonl.gz"]["status"] == "skipped"
    assert c["read"] == c["accepted"] + c["duplicates"] + c["quarantined"] == 12 + 1 + 8 + exp["kept"]
    bad = {Path(r["path"]).name: r for r in tableio.read(spark, run.lake, "bad_files").collect()}
    assert {n: (r["reason"], r["status"], r["records"]) for n, r in bad.items()} == {
        "c-cut.jsonl.gz": ("truncated", "partial", exp["kept"]), "d-fake.jsonl.gz": ("wrong_format", "skipped", 0),
        "e-gzip.jsonl": ("wrong_format", "skipped", 0)}
    assert bad["d-fake.jsonl.gz"]["size"] == (tmp_path / "in" / "d-fake.jsonl.gz").stat().st_size
    assert all(r["run_id"] == run.run_id for r in bad.values())
    # the intact part is recorded as coming from the file itself, and its staging copy is gone
    sources = {r["source_file"] for r in tableio.read(spark, run.lake, "docs").where("id = 'c0'").collect()}
    assert sources == {bad["c-cut.jsonl.gz"]["source_file"]} and sources.pop().endswith("/in/c-cut.jsonl.gz")
    assert not list((tmp_path / "lake").glob("_staging/ingest/*/*"))


def test_jsonl_fail_stops_before_writing_with_one_line(tmp_path: Path, spark: Any) -> None:
    _jsonl_folder(tmp_path / "in")
    cfg = make_config(tmp_path / "lake", str(tmp_path / "in"), ingest={"on_bad_file": "fail"})
    with pytest.raises(BadInputFile) as err:
        run_stages(cfg, ("ingest",), spark=spark)
    msg = str(err.value)
    assert "\n" not in msg and err.value.exit_code == 2
    assert f"{tmp_path}/in/c-cut.jsonl.gz: truncated: gzip stream cut short" in msg  # the first, by path
    assert "and 2 more bad input files" in msg
    assert all(deltalog.version(str(tmp_path / "lake" / t)) is None for t in ("docs", "quarantine", "bad_files"))
    assert not (tmp_path / "lake" / "_staging").exists()


# --- a full run: Parquet ---------------------------------------------------------------------------


def _parquet_folder(folder: Path) -> None:
    folder.mkdir(parents=True)
    _parquet(folder / "p1.parquet", id=["s1", "s2"], text=["string ids one", "string ids two"], quality=[0.5, 0.7])
    _parquet(folder / "p2-int-id.parquet", id=[7, 8, 9], text=["int id seven", "int id eight", "int id nine"],
             quality=[1, 2, 3])
    (folder / "p3-not.parquet").write_bytes(b"id,text\n1,comma separated\n")
    _parquet(folder / "p4-float-id.parquet", id=[1.5], text=["a float id"])
    _parquet(folder / "p5-no-text.parquet", id=["n1"], body=["text under another name"])


def test_parquet_skip_casts_integer_ids_and_skips_the_rest(tmp_path: Path, spark: Any) -> None:
    _parquet_folder(tmp_path / "in")
    run = run_stages(make_config(tmp_path / "lake", str(tmp_path / "in"), input={"format": "parquet"}),
                     ("ingest",), spark=spark)
    c = run.manifest["stages"]["ingest"]["counts"]
    docs = {r["id"]: r for r in tableio.read(spark, run.lake, "docs").collect()}
    assert set(docs) == {"s1", "s2", "7", "8", "9"}
    assert docs["8"]["text"] == "int id eight" and docs["8"]["quality"] == 2.0
    assert c["casts"] == {"id: int64 -> string": 1, "quality: int64 -> double": 1}
    assert (c["files_seen"], c["files_ingested"], c["files_skipped"]) == (5, 2, 3)
    assert c["files_by_reason"] == {"missing_text_column": 1, "unsafe_type": 1, "wrong_format": 1}
    bad = {Path(r["path"]).name: r["reason"] for r in tableio.read(spark, run.lake, "bad_files").collect()}
    assert bad == {"p3-not.parquet": "wrong_format", "p4-float-id.parquet": "unsafe_type",
                   "p5-no-text.parquet": "missing_text_column"}


def test_parquet_fail_names_the_file(tmp_path: Path, spark: Any) -> None:
    _parquet_folder(tmp_path / "in")
    (tmp_path / "in" / "p4-float-id.parquet").unlink()
    (tmp_path / "in" / "p5-no-text.parquet").unlink()
    cfg = make_config(tmp_path / "lake", str(tmp_path / "in"), input={"format": "parquet"},
                      ingest={"on_bad_file": "fail"})
    with pytest.raises(BadInputFile, match=r"p3-not\.parquet: wrong_format: not Parquet") as err:
        run_stages(cfg, ("ingest",), spark=spark)
    assert "more bad input files" not in str(err.value)  # an integer id is a safe cast, not a bad file
    assert deltalog.version(str(tmp_path / "lake" / "docs")) is None
    (tmp_path / "in" / "p3-not.parquet").unlink()
    run = run_stages(cfg, ("ingest",), spark=spark)  # the mixed id types alone: read, not failed
    assert _ids(spark, run.lake) == {"s1", "s2", "7", "8", "9"}
    assert run.manifest["stages"]["ingest"]["counts"]["files_skipped"] == 0


def test_every_file_bad_is_an_input_error_even_under_skip(tmp_path: Path, spark: Any) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.parquet").write_bytes(b"nope")
    with pytest.raises(BadInputFile, match=r"no input file can be read: all 1 are bad, the first .*x\.parquet"):
        run_stages(make_config(tmp_path / "lake", str(tmp_path / "in"), input={"format": "parquet"}),
                   ("ingest",), spark=spark)


def test_a_file_spark_cannot_read_past_a_sound_footer_is_caught_too(tmp_path: Path, spark: Any) -> None:
    """The checks read footers, not data pages: a page corrupted behind a sound footer is found by Spark's
    read, which becomes the same answer (one line under fail; under skip, read again without it)."""
    folder = tmp_path / "in"
    folder.mkdir()
    _parquet(folder / "a-pages.parquet", id=[f"p{i}" for i in range(2000)], text=[f"text {i} " * 20 for i in range(2000)])
    raw = bytearray((folder / "a-pages.parquet").read_bytes())
    for i in range(200, 20000, 7):  # the column chunks; the footer at the end stays intact
        raw[i] ^= 0x5A
    (folder / "a-pages.parquet").write_bytes(bytes(raw))
    _parquet(folder / "b.parquet", id=["b1", "b2"], text=["good one", "good two"])
    assert _check(folder / "a-pages.parquet", "parquet").reason is None  # the footer check cannot see it
    cfg = make_config(tmp_path / "lake", str(folder), input={"format": "parquet"}, ingest={"on_bad_file": "fail"})
    with pytest.raises(BadInputFile, match=r"bad input file .*a-pages\.parquet: corrupt: Spark cannot read it") as e:
        run_stages(cfg, ("ingest",), spark=spark)
    assert "\n" not in str(e.value) and deltalog.version(str(tmp_path / "lake" / "docs")) is None
    run = run_stages(make_config(tmp_path / "lake", str(folder), input={"format": "parquet"}), ("ingest",),
                     spark=spark)
    c = run.manifest["stages"]["ingest"]["counts"]
    assert _ids(spark, run.lake) == {"b1", "b2"}
    assert (c["files_seen"], c["files_skipped"], c["files_by_reason"]) == (2, 1, {"corrupt": 1})
    assert [(Path(r["path"]).name, r["reason"]) for r in tableio.read(spark, run.lake, "bad_files").collect()] == [
        ("a-pages.parquet", "corrupt")]


# --- a full run: a Delta table ---------------------------------------------------------------------


def _delta(path: Path, *batches: dict[str, list[Any]]) -> list[Path]:
    """A Delta table written one data file per batch (delta-rs); returns its data files in write order."""
    import pyarrow as pa
    from deltalake import write_deltalake

    files: list[Path] = []
    for b in batches:
        write_deltalake(str(path), pa.table(b), mode="append")
        files += [f for f in path.glob("*.parquet") if f not in files]
    return files


def test_delta_input_casts_ids_and_skips_a_broken_data_file(tmp_path: Path, spark: Any) -> None:
    files = _delta(tmp_path / "t", {"id": [1, 2], "text": ["delta one", "delta two"]},
                   {"id": [3], "text": ["delta three"]}, {"id": [4, 5], "text": ["delta four", "delta five"]})
    files[1].write_bytes(b"overwritten by something that is not Parquet")
    cfg = make_config(tmp_path / "lake", str(tmp_path / "t"), input={"format": "delta"})
    with pytest.raises(BadInputFile, match=rf"bad input file .*{files[1].name}: wrong_format") as err:
        run_stages(make_config(tmp_path / "lake", str(tmp_path / "t"), input={"format": "delta"},
                               ingest={"on_bad_file": "fail"}), ("ingest",), spark=spark)
    assert "\n" not in str(err.value) and deltalog.version(str(tmp_path / "lake" / "docs")) is None
    run = run_stages(cfg, ("ingest",), spark=spark)
    c = run.manifest["stages"]["ingest"]["counts"]
    assert _ids(spark, run.lake) == {"1", "2", "4", "5"}
    assert (c["files_seen"], c["files_skipped"], c["casts"]) == (3, 1, {"id: int64 -> string": 2})
    assert [Path(r["path"]).name for r in tableio.read(spark, run.lake, "bad_files").collect()] == [files[1].name]


def test_delta_input_without_text_column_is_bad_as_a_whole(tmp_path: Path, spark: Any) -> None:
    _delta(tmp_path / "t", {"id": ["a"], "body": ["text under another name"]})
    with pytest.raises(BadInputFile, match=r"bad input table .*/t: missing_text_column: no column 'text'"):
        run_stages(make_config(tmp_path / "lake", str(tmp_path / "t"), input={"format": "delta"}), ("ingest",),
                   spark=spark)
    assert deltalog.version(str(tmp_path / "lake" / "docs")) is None


def test_report_names_bad_files_and_casts(tmp_path: Path, spark: Any) -> None:
    from clustermix.report import build_report
    from clustermix.report_html import render

    _parquet_folder(tmp_path / "in")
    run = run_stages(make_config(tmp_path / "lake", str(tmp_path / "in"), input={"format": "parquet"}),
                     ("ingest",), spark=spark)
    rep = build_report(str(tmp_path / "lake"), run.run_id)
    files = rep["accounting"]["files"]
    assert (files["files_seen"], files["files_skipped"], files["balanced"]) == (5, 3, True)
    assert sorted((Path(b["path"]).name, b["reason"], b["run_id"]) for b in files["bad_files"]) == [
        ("p3-not.parquet", "wrong_format", run.run_id), ("p4-float-id.parquet", "unsafe_type", run.run_id),
        ("p5-no-text.parquet", "missing_text_column", run.run_id)]
    html = render(rep, {})
    assert "p4-float-id.parquet" in html and "unsafe_type" in html and "id: int64 -&gt; string" in html
    assert "5 seen = 2 ingested" in html


# --- the console, through the real command ---------------------------------------------------------

TRACE = re.compile(r"Traceback|^\s+at [\w.$]+\(|Py4JJavaError|SparkException|Caused by:", re.MULTILINE)


def _cli(tmp_path: Path, folder: Path, fmt: str, mode: str) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / f"{mode}.yaml"
    cfg.write_text(json.dumps({  # JSON is YAML
        "lake": {"root": str(tmp_path / f"lake-{mode}")}, "input": {"path": str(folder), "format": fmt},
        "ingest": {"on_bad_file": mode}, "sample": {"budget": 10},
        "spark": {"master": "local[2]", "shuffle_partitions": 2, "driver_memory": "1g"}}))
    return subprocess.run([sys.executable, "-m", "clustermix.cli", "ingest", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=900, check=False)


def test_console_gets_one_line_and_no_stack_trace(tmp_path: Path) -> None:
    """The issue's Parquet cases through ``clustermix ingest``: under fail, exit code 2 and one line
    naming the file; under skip, a successful run; neither prints a trace."""
    folder = tmp_path / "in"
    _parquet_folder(folder)
    (folder / "p4-float-id.parquet").unlink()
    (folder / "p5-no-text.parquet").unlink()
    failed = _cli(tmp_path, folder, "parquet", "fail")
    out = failed.stdout + failed.stderr
    assert failed.returncode == 2, out[-3000:]
    said = [ln for ln in out.splitlines() if ln.startswith("clustermix:")]
    assert len(said) == 1 and said[0].startswith(f"clustermix: bad input file {folder}/p3-not.parquet: wrong_format")
    assert not TRACE.search(out), out[-3000:]
    skipped = _cli(tmp_path, folder, "parquet", "skip")
    out = skipped.stdout + skipped.stderr
    assert skipped.returncode == 0, out[-3000:]
    assert f"skipped input file {folder}/p3-not.parquet: wrong_format" in out
    assert "docs: read 5, accepted 5" in out
    assert not TRACE.search(out), out[-3000:]
