"""Ingest on dirty input: every record ends in docs, duplicates or quarantine with a reason."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

from clustermix import deltalog, tableio
from clustermix.errors import InputError
from clustermix.pipeline import run_stages

from .conftest import make_config


def _doc(i: int, **extra: object) -> str:
    return json.dumps({"id": f"d{i}", "text": f"document number {i} about topic {i % 3}", **extra})


def write_dirty_corpus(folder: Path) -> dict[str, int]:
    """A folder with a BOM+CRLF JSONL file and a gzip JSONL file; returns the expected counts."""
    folder.mkdir(parents=True, exist_ok=True)
    good = [_doc(i, quality=0.5, domain="a") for i in range(20)]
    lines: list[bytes] = [ln.encode() for ln in good]
    bad = {
        "malformed_json": ['{"text": "unterminated"', "{text: 'single'}", "not json at all"],
        "not_an_object": ["[1, 2, 3]", '"just a string"', "42"],
        "missing_text": ['{"id": "m1"}', '{"id": "m2", "text": null}'],
        "text_not_string": ['{"id": "t1", "text": 5}', '{"id": "t2", "text": ["a"]}', '{"text": {"x": 1}}'],
        "blank_text": ['{"id": "b1", "text": "   "}', '{"id": "b2", "text": ""}', '{"id": "b3", "text": "\\n\\t"}'],
        "nul_in_text": ['{"id": "n1", "text": "a\\u0000b"}'],
        "too_long": [json.dumps({"id": "L1", "text": "x" * 501})],
        "quality_not_a_number": [json.dumps({"id": "q1", "text": "fine text", "quality": "high"}),
                                 json.dumps({"id": "q2", "text": "other text", "quality": True})],
        "bad_id": [json.dumps({"id": {"a": 1}, "text": "object id"}), json.dumps({"id": "  ", "text": "blank id"})],
        "duplicate_id": [json.dumps({"id": "d3", "text": "a different text under an id already used"})],
    }
    for items in bad.values():
        lines += [s.encode() for s in items]
    lines.append(b'{"id": "u1", "text": "caf\xe9 latin-1 byte"}')  # invalid UTF-8
    lines.append(b'{"id": "nul", "text": "raw \x00 byte"}')  # a raw NUL is a JSON control char: malformed
    dup_lines = [json.dumps({"id": "x1", "text": "document number 1 about topic 1"}),  # same text as d1
                 _doc(2, quality=0.5, domain="a")]  # same id and text as d2
    lines += [s.encode() for s in dup_lines]
    lines += [b"", b"   "]  # blank lines: not records
    body = b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n"
    (folder / "dirty.jsonl").write_bytes(body)
    gz = [_doc(100 + i, quality=1) for i in range(5)] + ['{"broken": ']
    (folder / "more.jsonl.gz").write_bytes(gzip.compress(("\n".join(gz) + "\n").encode()))
    reasons = {r: len(v) for r, v in bad.items()}
    reasons["invalid_utf8"] = 1
    reasons["malformed_json"] += 2  # the raw NUL line and the broken gzip line
    return {"accepted": 25, "duplicates": 2, "quarantined": sum(reasons.values()), "reasons": reasons}


@pytest.fixture(scope="module")
def dirty(tmp_path_factory, spark):
    root = tmp_path_factory.mktemp("dirty")
    expected = write_dirty_corpus(root / "in")
    cfg = make_config(root / "lake", str(root / "in"), ingest={"max_chars": 500})
    run = run_stages(cfg, ("ingest",), spark=spark)
    return cfg, run, expected


def test_accounting_holds_with_every_reason(dirty):
    _, run, expected = dirty
    c = run.manifest["stages"]["ingest"]["counts"]
    assert c["accepted"] == expected["accepted"]
    assert c["duplicates"] == expected["duplicates"]
    assert c["quarantined_by_reason"] == dict(sorted(expected["reasons"].items()))
    assert c["read"] == c["accepted"] + c["duplicates"] + c["quarantined"]


def test_quarantine_keeps_raw_record_reason_and_file(dirty, spark):
    _, run, _ = dirty
    q = {r["reason"]: r for r in tableio.read(spark, run.lake, "quarantine").collect()}
    assert q["duplicate_id"]["raw"].startswith('{"id": "d3"')
    assert q["invalid_utf8"]["source_file"].endswith("dirty.jsonl")
    assert "\ufffd" in q["invalid_utf8"]["raw"]
    assert any(r["source_file"].endswith("more.jsonl.gz") for r in tableio.read(spark, run.lake, "quarantine").collect())


def test_bom_crlf_and_gzip_records_are_clean_docs(dirty, spark):
    _, run, _ = dirty
    docs = {r["id"]: r for r in tableio.read(spark, run.lake, "docs").collect()}
    assert docs["d0"]["text"] == "document number 0 about topic 0"  # no BOM, no trailing \r
    assert docs["d0"]["quality"] == 0.5 and docs["d0"]["domain"] == "a"
    assert docs["d104"]["quality"] == 1.0
    assert docs["d1"]["n_chars"] == len("document number 1 about topic 1")
    assert len(docs["d1"]["text_hash"]) == 64


def test_duplicates_point_at_the_kept_document(dirty, spark):
    _, run, _ = dirty
    dups = {r["id"]: r["duplicate_of"] for r in tableio.read(spark, run.lake, "duplicates").collect()}
    assert dups == {"x1": "d1", "d2": "d2"}


def test_missing_ids_become_content_hashes(tmp_path, spark):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "alpha"}\n{"text": "beta"}\n{"text": "alpha"}\n')
    run = run_stages(make_config(tmp_path / "lake", str(src)), ("ingest",), spark=spark)
    docs = tableio.read(spark, run.lake, "docs").collect()
    assert len(docs) == 2
    assert all(d["id"] == d["text_hash"][:24] for d in docs)
    assert run.manifest["stages"]["ingest"]["counts"]["duplicates"] == 1


def test_parquet_input_and_missing_text_column(tmp_path, spark):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "good"
    good.mkdir()
    pq.write_table(pa.table({"id": ["p1", "p2", "p3"], "body": ["one", "two", None]}), good / "part-0.parquet")
    cfg = make_config(tmp_path / "lake", str(good), input={"format": "parquet", "text_field": "body"})
    run = run_stages(cfg, ("ingest",), spark=spark)
    c = run.manifest["stages"]["ingest"]["counts"]
    assert (c["accepted"], c["quarantined_by_reason"]) == (2, {"missing_text": 1})
    cfg_bad = make_config(tmp_path / "lake2", str(good), input={"format": "parquet", "text_field": "text"})
    with pytest.raises(InputError) as err:
        run_stages(cfg_bad, ("ingest",), spark=spark)
    assert "part-0.parquet" in str(err.value) and "'text'" in str(err.value)
    assert deltalog.version(str(tmp_path / "lake2" / "docs")) is None


def test_k_above_the_accepted_documents_fails_right_after_ingest(tmp_path, spark):
    from clustermix.errors import DataError

    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"}\n')
    cfg = make_config(tmp_path / "lake", str(src), cluster={"k": 5})
    with pytest.raises(DataError, match=r"cluster.k=5: greater than the 3 accepted documents"):
        run_stages(cfg, spark=spark)
    assert deltalog.version(str(tmp_path / "lake" / "docs")) is not None
    assert deltalog.version(str(tmp_path / "lake" / "embeddings")) is None  # failed before embedding anything


def write_planted_duplicates(folder: Path, seed: int = 3) -> list[tuple[str, str]]:
    """Three files of records with planted duplicates: texts under new ids, ids again with their text
    or another, records without an id, bad lines; returns (file name, line) in file order."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    texts = [f"planted text {i} " + "word " * rng.randrange(1, 20) for i in range(40)]
    out: list[tuple[str, str]] = []
    for f in ("a.jsonl", "b.jsonl", "c.jsonl"):
        lines = []
        for _ in range(150):
            r = rng.random()
            if r < 0.1:
                line = rng.choice(['{"id": "x", "text": ', "not json", '{"id": "m"}', '{"id": "b", "text": " "}'])
            elif r < 0.2:
                line = json.dumps({"text": rng.choice(texts)})  # no id: its content hash
            else:  # few ids and texts: every kind of clash, in every order
                line = json.dumps({"id": f"i{rng.randrange(60)}", "text": rng.choice(texts)})
            lines.append(line)
        # a text first seen as a duplicate_id (quarantined), then under a new id: the new id's record is
        # accepted, as the quarantined repeat names no text (it once made k2 a duplicate of k1, whose
        # accepted text is another: the text was in no docs row)
        lines += [json.dumps({"id": "k1", "text": f"{f} kept"}), json.dumps({"id": "k1", "text": f"{f} clash"}),
                  json.dumps({"id": "k2", "text": f"{f} clash"})]
        (folder / f).write_text("\n".join(lines) + "\n")
        out += [(f, ln) for ln in lines]
    return out


def old_rule(records: list[tuple[str, str]]) -> dict[str, list[tuple[str, ...]]]:
    """The duplicate rule, record by record in file order: an id's first record wins (a later one with
    its text is a duplicate of it, with another text a duplicate_id); a record that is not an id's
    repeat is a duplicate of the id of the first such record with its text, when there is one."""
    import hashlib

    first_hash: dict[str, str] = {}
    first_id: dict[str, str] = {}
    out: dict[str, list[tuple[str, ...]]] = {"docs": [], "duplicates": [], "quarantine": []}
    for f, line in records:
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            out["quarantine"].append((line, "malformed_json" if rec is None else "missing_text", f))
            continue
        if not rec["text"].strip():
            out["quarantine"].append((line, "blank_text", f))
            continue
        h = hashlib.sha256(rec["text"].encode()).hexdigest()
        rid = rec.get("id") or h[:24]
        repeat = rid in first_hash
        if repeat and first_hash[rid] == h:
            out["duplicates"].append((rid, rid, f))
        elif repeat:
            out["quarantine"].append((line, "duplicate_id", f))
        else:
            first_hash[rid] = h
        if h in first_id and not repeat:
            out["duplicates"].append((rid, first_id[h], f))
        elif not repeat:
            out["docs"].append((rid, h, f))
        if not repeat:
            first_id.setdefault(h, rid)
    return {k: sorted(v) for k, v in out.items()}


def _tables(spark, lake) -> dict[str, list[tuple[str, ...]]]:
    cols = {"docs": ("id", "text_hash", "source_file"), "duplicates": ("id", "duplicate_of", "source_file"),
            "quarantine": ("raw", "reason", "source_file")}
    return {name: sorted(tuple(Path(v).name if c == "source_file" else v for c, v in zip(cs, r, strict=True))
                         for r in tableio.read(spark, lake, name).select(*cs).collect())
            for name, cs in cols.items()}


@pytest.mark.parametrize("partitions, split_bytes", [(1, None), (3, 2048), (16, 700)])
def test_duplicates_follow_the_rule_at_any_partition_count(tmp_path, spark, monkeypatch, partitions, split_bytes):
    """The same docs, duplicates and quarantine whatever the number of shuffle partitions and of input
    splits (a file read in many blocks): those of the rule applied record by record in file order."""
    from clustermix import ingest

    records = write_planted_duplicates(tmp_path / "in")
    monkeypatch.setattr(ingest, "partitions_for", lambda *a: partitions)
    key, before = "spark.sql.files.maxPartitionBytes", spark.conf.get("spark.sql.files.maxPartitionBytes")
    if split_bytes:
        spark.conf.set(key, str(split_bytes))
    try:
        run = run_stages(make_config(tmp_path / "lake", str(tmp_path / "in")), ("ingest",), spark=spark)
    finally:
        spark.conf.set(key, before)
    expected = old_rule(records)
    reasons = {r[1] for r in expected["quarantine"]}
    assert reasons == {"malformed_json", "missing_text", "blank_text", "duplicate_id"}
    assert {d for d in expected["duplicates"] if d[0] == d[1]} and {d for d in expected["duplicates"] if d[0] != d[1]}
    clash = hashlib.sha256(b"a.jsonl clash").hexdigest()
    assert ("k2", clash, "a.jsonl") in expected["docs"]
    assert _tables(spark, run.lake) == expected


def _plan_nodes(node):  # a JVM SparkPlan and every node under it, in the plans of the caches it reads too
    if node.nodeName() == "AdaptiveSparkPlan":
        node = node.inputPlan()
    yield node
    if node.nodeName() == "InMemoryTableScan":
        yield from _plan_nodes(node.relation().cachedPlan())
    children = node.children()
    for i in range(children.size()):
        yield from _plan_nodes(children.apply(i))


def test_dedup_windows_see_neither_text_nor_raw_line(tmp_path, spark):
    """The windows that find duplicates run over narrow rows: no column of theirs is the text or the raw
    line; neither do the quarantined records (null id and hash) reach them."""
    from clustermix import readers
    from clustermix.ingest import classify
    from clustermix.inputs import resolve_input

    write_planted_duplicates(tmp_path / "in")
    cfg = make_config(tmp_path / "lake", str(tmp_path / "in"))
    cached: list = []
    df = classify(readers.candidates(spark, resolve_input(cfg, str(tmp_path / "lake")), cfg.input), 500, 4.0, cached)
    try:
        plan = df._jdf.queryExecution().executedPlan()
        windows = list({n.toString(): n for n in _plan_nodes(plan) if n.nodeName() == "Window"}.values())
        # the id window and the text-hash window (the verdicts' plan is read in more than one place)
        assert {w.partitionSpec().apply(0).toString().split("#")[0] for w in windows} == {"id", "text_hash"}
        for w in windows:
            cols = {w.output().apply(i).name() for i in range(w.output().size())}
            assert {"id", "text_hash", "source_file"} <= cols
            assert not cols & {"raw", "_text", "_line", "domain"}, cols
            filters = [n.condition().toString() for n in _plan_nodes(w.child()) if n.nodeName() == "Filter"]
            assert any("isnull(reason" in f for f in filters), filters
        assert df.where("outcome = 'accepted' AND raw IS NOT NULL").count() == 0
        assert df.where("outcome = 'quarantined' AND raw IS NULL").count() == 0
    finally:
        for c in cached:
            c.unpersist()
