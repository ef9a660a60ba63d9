"""Bad input files in a nightly refresh: skipped (or kept in part) and recorded in the ledger with their
reason, not retried while they do not change, retried when they do; under ``fail`` a refresh stops
before writing and leaves the file untaken. Real refreshes (Spark, Delta, Ray, the embedding model)."""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Any

import pytest

from clustermix import deltalog, runs
from clustermix.badfiles import BadInputFile

from .conftest import make_config


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    """Distinct real BBC articles with fresh ids, to hand out to files."""
    from clustermix.corpus import iter_records

    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for rec in iter_records("bbc"):
        if rec["text"] not in seen:
            seen.add(str(rec["text"]))
            out.append({"id": f"r{len(out)}", "text": rec["text"], "domain": rec["domain"]})
        if len(out) == 120:
            break
    return out


def _jsonl(recs: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in recs).encode()


def _ids(spark: Any, root: Path, table: str = "docs") -> list[str]:
    return [r[0] for r in spark.read.format("delta").load(str(root / table)).select("id").collect()]


def _ledger(root: Path) -> dict[str, tuple[str, str | None]]:
    """The latest status and reason the ledger holds per file name."""
    from deltalake import DeltaTable

    rows = DeltaTable(str(root / runs.LEDGER)).to_pyarrow_table().to_pylist()
    return {Path(r["path"]).name: (r["status"], r["reason"]) for r in sorted(rows, key=lambda r: r["taken_at"])}


def _bad(spark: Any, root: Path) -> dict[str, tuple[str, str]]:
    return {Path(r["path"]).name: (r["reason"], r["status"]) for r in
            spark.read.format("delta").load(str(root / "bad_files")).collect()}


def test_refresh_jsonl_skips_keeps_retries(tmp_path: Path, spark: Any, ray_local: Any,
                                           records: list[dict[str, Any]]) -> None:
    from clustermix.refresh import run_refresh

    incoming, root = tmp_path / "incoming", tmp_path / "lake"
    incoming.mkdir()
    cfg = make_config(root, str(incoming), cluster={"k": 2}, sample={"budget": 60, "clip": 2},
                      refresh={"min_new_docs": 1000})
    good, cut_recs, junk_recs = records[:20], records[20:60], records[60:65]
    (incoming / "a.jsonl").write_bytes(_jsonl(good))
    whole = gzip.compress(_jsonl(cut_recs))
    cut = whole[: len(whole) // 2]
    (incoming / "b-cut.jsonl.gz").write_bytes(cut)
    kept = zlib.decompressobj(wbits=31).decompress(cut).count(b"\n")
    assert 0 < kept < len(cut_recs)
    (incoming / "c-junk.jsonl.gz").write_bytes(_jsonl(junk_recs))  # plain text under a .gz name

    # night 1 (bootstrap): the good file, the complete records before the cut; the junk is skipped
    r1 = run_refresh(cfg, spark=spark)
    assert r1.manifest["outcome"] == "succeeded" and r1.manifest["mode"] == "bootstrap"
    expected = {r["id"] for r in good + cut_recs[:kept]}
    assert sorted(_ids(spark, root)) == sorted(expected)
    c1 = r1.manifest["stages"]["ingest"]["counts"]
    assert (c1["files_seen"], c1["files_ingested"], c1["files_skipped"], c1["files_partial"]) == (3, 2, 1, 1)
    assert _bad(spark, root) == {"b-cut.jsonl.gz": ("truncated", "partial"), "c-junk.jsonl.gz": ("wrong_format",
                                                                                                "skipped")}
    assert _ledger(root) == {"a.jsonl": ("ingested", None), "b-cut.jsonl.gz": ("partial", "truncated"),
                             "c-junk.jsonl.gz": ("skipped", "wrong_format")}

    # night 2, nothing changed: the bad files are not tried again
    v = {t: deltalog.version(str(root / t)) for t in ("docs", "bad_files", "blended")}
    r2 = run_refresh(cfg, spark=spark)
    assert r2.manifest["inputs_taken"] == [] and r2.manifest["stages"]["ingest"]["status"] == "skipped"
    assert {t: deltalog.version(str(root / t)) for t in v} == v

    # night 3: the upload completed, the junk replaced by real gzip: both taken again, rows replaced
    (incoming / "b-cut.jsonl.gz").write_bytes(whole)
    (incoming / "c-junk.jsonl.gz").write_bytes(gzip.compress(_jsonl(junk_recs)))
    r3 = run_refresh(cfg, spark=spark)
    assert [Path(p).name for p in r3.manifest["inputs_taken"]] == ["b-cut.jsonl.gz", "c-junk.jsonl.gz"]
    c3 = r3.manifest["stages"]["ingest"]["counts"]
    assert (c3["files_seen"], c3["files_skipped"], c3["read"]) == (2, 0, len(cut_recs) + len(junk_recs))
    assert c3["duplicates"] == 0  # the kept part of the cut file was replaced, not met again as duplicates
    docs = _ids(spark, root)
    assert len(docs) == len(set(docs)) and set(docs) == {r["id"] for r in good + cut_recs + junk_recs}
    assert _bad(spark, root) == {}
    assert _ledger(root)["b-cut.jsonl.gz"] == ("ingested", None)
    assert sorted(_ids(spark, root, "embeddings")) == sorted(docs)

    # night 4 under fail: a bad new file stops the refresh before anything is written, and stays untaken
    (incoming / "d-junk.jsonl.gz").write_bytes(b"not gzip")
    v = {t: deltalog.version(str(root / t)) for t in ("docs", "quarantine", "bad_files", runs.LEDGER)}
    fail = cfg.model_copy(update={"ingest": cfg.ingest.model_copy(update={"on_bad_file": "fail"})})
    with pytest.raises(BadInputFile, match=r"d-junk\.jsonl\.gz: wrong_format: not gzip data"):
        run_refresh(fail, spark=spark)
    assert {t: deltalog.version(str(root / t)) for t in v} == v
    assert "d-junk.jsonl.gz" not in _ledger(root)


def test_refresh_parquet_casts_skips_and_retries(tmp_path: Path, spark: Any, ray_local: Any,
                                                 records: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clustermix.refresh import run_refresh

    incoming, root = tmp_path / "incoming", tmp_path / "lake"
    incoming.mkdir()
    cfg = make_config(root, str(incoming), input={"format": "parquet"}, cluster={"k": 2},
                      sample={"budget": 60, "clip": 2}, refresh={"min_new_docs": 1000})

    def table(recs: list[dict[str, Any]], int_ids: bool = False) -> Any:
        ids = [int(r["id"][1:]) for r in recs] if int_ids else [r["id"] for r in recs]
        return pa.table({"id": ids, "text": [r["text"] for r in recs], "domain": [r["domain"] for r in recs]})

    pq.write_table(table(records[:20]), incoming / "n1.parquet")
    assert run_refresh(cfg, spark=spark).manifest["mode"] == "bootstrap"

    # night 2: a file with integer ids (a safe cast), one that is not Parquet, one without a text column
    pq.write_table(table(records[20:30], int_ids=True), incoming / "n2-int-ids.parquet")
    (incoming / "n2-not.parquet").write_bytes(_jsonl(records[30:35]))
    pq.write_table(table(records[35:40]).rename_columns(["id", "body", "domain"]), incoming / "n2-no-text.parquet")
    r2 = run_refresh(cfg, spark=spark)
    c2 = r2.manifest["stages"]["ingest"]["counts"]
    assert c2["casts"] == {"id: int64 -> string": 1}
    assert (c2["files_seen"], c2["files_ingested"], c2["files_skipped"], c2["read"]) == (3, 1, 2, 10)
    assert set(_ids(spark, root)) == {r["id"] for r in records[:20]} | {str(i) for i in range(20, 30)}
    assert _bad(spark, root) == {"n2-not.parquet": ("wrong_format", "skipped"),
                                 "n2-no-text.parquet": ("missing_text_column", "skipped")}
    assert _ledger(root)["n2-no-text.parquet"] == ("skipped", "missing_text_column")

    # night 3: the broken file replaced by real Parquet: only it is taken again; its bad_files row goes
    pq.write_table(table(records[30:35]), incoming / "n2-not.parquet")
    r3 = run_refresh(cfg, spark=spark)
    assert [Path(p).name for p in r3.manifest["inputs_taken"]] == ["n2-not.parquet"]
    assert _bad(spark, root) == {"n2-no-text.parquet": ("missing_text_column", "skipped")}
    assert {r["id"] for r in records[30:35]} <= set(_ids(spark, root))
    assert _ledger(root)["n2-not.parquet"] == ("ingested", None)
