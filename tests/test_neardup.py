"""MinHash near-duplicates at ingest, on planted near-copies: a changed date, a swapped sentence, added
boilerplate are found at the threshold; distinct documents and half-overlapping ones are kept; groups
are connected, deterministic and independent of partitioning; a refresh meets old documents."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from clustermix import deltalog, minhash, tableio
from clustermix.inputs import InputSpec, resolve_input
from clustermix.pipeline import run_stages, session

from .conftest import make_config

NEAR_ON = {"near": {"enabled": True}}  # the product's default; tests/conftest.py turns it off elsewhere
BOILERPLATE = ("Subscribe to our newsletter for daily updates. We use cookies to deliver our services and "
               "to show you relevant ads. All rights reserved.")


def _sentences(rng: random.Random, vocab: list[str], n: int) -> list[str]:
    return [" ".join(rng.choice(vocab) for _ in range(15)).capitalize() + "." for _ in range(n)]


def planted(folder: Path, n_base: int = 12, seed: int = 3) -> dict[str, str]:
    """Write ``n_base`` distinct documents and planted near-copies of some; return {copy id: base id}."""
    rng = random.Random(seed)
    vocab = [f"w{i}{rng.choice('abcdefgh')}" for i in range(3000)]
    folder.mkdir(parents=True, exist_ok=True)
    docs, truth = [], {}
    for i in range(n_base):
        body = _sentences(rng, vocab, 12)
        base = f"doc-{i:03d}"
        docs.append({"id": base, "text": f"Published 2021-03-{i + 1:02d}. " + " ".join(body)})
        if i % 3 == 0:  # three edits of the same document: one group of four, all linked to the base
            docs.append({"id": f"{base}-date", "text": f"Published 2024-11-{i + 2:02d}. " + " ".join(body)})
            swapped = [*body[:4], body[5], body[4], *body[6:]]
            docs.append({"id": f"{base}-swap", "text": f"Published 2021-03-{i + 1:02d}. " + " ".join(swapped)})
            docs.append({"id": f"{base}-boiler", "text": f"Published 2021-03-{i + 1:02d}. " + " ".join(body)
                         + " " + BOILERPLATE})
            truth.update({f"{base}-date": base, f"{base}-swap": base, f"{base}-boiler": base})
        if i % 3 == 1:  # half the sentences shared: Jaccard about 0.3, not a near-copy
            docs.append({"id": f"{base}-half", "text": " ".join(body[:6] + _sentences(rng, vocab, 6))})
    rng.shuffle(docs)
    half = len(docs) // 2
    for name, part in (("a.jsonl", docs[:half]), ("b.jsonl", docs[half:])):
        (folder / name).write_text("".join(json.dumps(d) + "\n" for d in part))
    return truth


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: Any, spark: Any) -> tuple[Any, Any, dict[str, str]]:
    root = tmp_path_factory.mktemp("near")
    truth = planted(root / "in")
    cfg = make_config(root / "lake", str(root / "in"), dedup=NEAR_ON)
    run = run_stages(cfg, ("ingest",), spark=spark)
    # the groups' rounds were checkpointed reliably under the run's staging folder, removed after it
    assert spark.conf.get("spark.clustermix.checkpointDirSet", "").startswith(f"{root / 'lake'}/_staging/checkpoints/")
    assert spark.conf.get(minhash.CHECKPOINT_DIR_CONF, None) is None
    assert not [p for p in (root / "lake" / "_staging").rglob("*") if p.is_file()]
    return cfg, run, truth


def test_planted_near_copies_are_found_and_distinct_documents_kept(ingested: Any, spark: Any) -> None:
    cfg, run, truth = ingested
    near = {r["id"]: (r["duplicate_of"], r["jaccard"]) for r in tableio.read(spark, run.lake, "near_duplicates").collect()}
    assert {i: d for i, (d, _) in near.items()} == truth
    assert all(j >= cfg.dedup.near.threshold for _, j in near.values())
    docs = {r["id"] for r in tableio.read(spark, run.lake, "docs").select("id").collect()}
    assert not docs & set(truth)
    assert set(truth.values()) <= docs and {"doc-001-half", "doc-004-half"} <= docs
    sigs = tableio.read(spark, run.lake, "minhash_signatures")
    assert {r["id"] for r in sigs.select("id").collect()} == docs  # kept documents only


def test_accounting_includes_near_duplicates(ingested: Any) -> None:
    _, run, truth = ingested
    c = run.manifest["stages"]["ingest"]["counts"]
    assert c["near_duplicates"] == len(truth)
    assert c["read"] == c["accepted"] + c["duplicates"] + c["near_duplicates"] + c["quarantined"]
    held = {t: deltalog.num_records(run.lake.table(t)) for t in ("docs", "duplicates", "near_duplicates", "quarantine")}
    assert sum(held.values()) == c["read"] and held["near_duplicates"] == len(truth)
    assert sum(f["near_duplicates"] for f in c["per_file"].values()) == len(truth)


def test_the_report_counts_them_and_shows_pairs(ingested: Any) -> None:
    from clustermix.report import _dedup, _Run

    cfg, run, truth = ingested
    near = _dedup(_Run(run.lake, run.manifest), run.manifest["config"])["near"]
    assert (near["enabled"], near["threshold"], near["removed"]) == (True, cfg.dedup.near.threshold, len(truth))
    assert near["per_source"] == {"(none)": len(truth)}
    ex = near["examples"]
    assert len(ex) == 3 and all(truth[e["id"]] == e["kept"] and e["text"] and e["kept_text"] for e in ex)
    assert [e["similarity"] for e in ex] == sorted(e["similarity"] for e in ex)


def test_a_rerun_is_skipped(ingested: Any, spark: Any) -> None:
    cfg, _run, _ = ingested
    again = run_stages(cfg, ("ingest",), spark=spark)
    assert again.manifest["stages"]["ingest"]["status"] == "skipped"


def test_groups_do_not_depend_on_partitioning(ingested: Any, spark: Any) -> None:
    cfg, run, truth = ingested
    from pyspark.sql import functions as F

    texts = spark.read.json(str(Path(run.cfg.input.path) / "*.jsonl"))
    results = []
    for parts in (1, 5):
        sigs = minhash.signatures(texts.repartition(parts), cfg.dedup.near).withColumn("key", F.col("id"))
        results.append(sorted(tuple(r) for r in minhash.near_duplicates(sigs, cfg.dedup.near).collect()))
    assert results[0] == results[1]
    assert {r[0]: r[1] for r in results[0]} == truth


def _shingles_reference(text: str | None, words: int) -> list[str]:
    """Word n-grams as the docstring of ``minhash.with_shingles`` says, in plain Python: lower-cased,
    every run of characters that are neither letters nor digits a break."""
    folded = "".join(c if c.isalpha() or c.isnumeric() else " " for c in (text or "").lower())
    tokens = folded.split()
    if not tokens:
        return []
    grams = [" ".join(tokens[i:i + words]) for i in range(max(len(tokens) - words + 1, 1))]
    return sorted(set(grams))


def test_shingles_match_a_plain_python_reference(spark: Any) -> None:
    texts = ["The quick brown fox -- jumps over the lazy dog, again and again!",
             "  Café déjà-vu: naïve Ärger über 42 Größen; ΑΒΓ δέλτα 3½  ",
             "two words", "", None, "...!!!", "a,b;c d\te\nf g_h 2024-01-05 x2y",
             " ".join(f"w{i % 7}" for i in range(40))]
    df = spark.createDataFrame(list(enumerate(texts)), "i int, text string")
    got = {r["i"]: sorted(r["_sh"]) for r in minhash.with_shingles(df, "text", 3).collect()}
    assert got == {i: _shingles_reference(t, 3) for i, t in enumerate(texts)}


def test_components_join_chains_and_keep_the_least_key(spark: Any) -> None:
    edges = spark.createDataFrame([("b", "c"), ("c", "d"), ("a", "d"), ("x", "y"), ("e", "f"), ("f", "g")], "a string, b string")
    labels = {r["key"]: r["label"] for r in minhash.components(edges, 10).collect()}
    assert labels == {"a": "a", "b": "a", "c": "a", "d": "a", "x": "x", "y": "x", "e": "e", "f": "e", "g": "e"}
    with pytest.raises(Exception, match="did not settle"):
        long_chain = spark.createDataFrame([(f"n{i:02d}", f"n{i + 1:02d}") for i in range(40)], "a string, b string")
        minhash.components(long_chain, 1)


def test_a_refresh_sends_a_near_copy_of_an_old_document_to_near_duplicates(tmp_path: Path, spark: Any) -> None:
    from clustermix import runs

    folder = tmp_path / "in"
    truth = planted(folder, n_base=4, seed=5)
    cfg = make_config(tmp_path / "lake", str(folder), dedup=NEAR_ON)
    run_stages(cfg, ("ingest",), spark=spark)
    old = json.loads((folder / "a.jsonl").read_text().splitlines()[0])
    (folder / "c.jsonl").write_text(json.dumps({"id": "late-copy", "text": old["text"] + " " + BOILERPLATE}) + "\n"
                                    + json.dumps({"id": "late-new", "text": "an unrelated new document"}) + "\n")
    with session(cfg, spark=spark, mode="refresh") as run:
        spec = resolve_input(cfg, run.lake.root)
        new = runs.new_files(spec.listing["files"], {k: tuple(v) for k, v in spec.listing["files"].items()
                                                      if not k.endswith("c.jsonl")})
        inc = InputSpec(spec.path, spec.format, {"files": new})
        run.input_spec = InputSpec(spec.path, spec.format, inc.listing, files=tuple(inc.spark_files()))
        run.run_stage("ingest")
    counts = run.manifest["stages"]["ingest"]["counts"]
    assert (counts["read"], counts["accepted"], counts["near_duplicates"]) == (2, 1, 1)
    near = {r["id"]: r["duplicate_of"] for r in tableio.read(spark, run.lake, "near_duplicates").collect()}
    kept_of_old = truth.get(old["id"], old["id"])
    assert near == {**truth, "late-copy": kept_of_old}
    docs = {r["id"] for r in tableio.read(spark, run.lake, "docs").select("id").collect()}
    assert "late-copy" not in docs and "late-new" in docs and kept_of_old in docs
