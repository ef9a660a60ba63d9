"""Nightly refresh: three "nights" split from the real BBC corpus, a repeated refresh, two crashes.

Night 1 holds business, sport and politics articles; night 2 more of the same topics plus
duplicates and bad records; night 3 brings two topics the clustering has never seen (tech,
entertainment), which must trip the drift thresholds and refit k-means.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clustermix import deltalog, runs
from clustermix import lake as lk
from clustermix.config import RefreshConfig
from clustermix.drift import decide, measure

from .conftest import make_config

DATA_TABLES = ("docs", "quarantine", "duplicates", "embeddings", "centroids", "assignments", "cluster_stats",
               "sample_plan", "blended")


# --- the pure parts ------------------------------------------------------------------------------


def test_new_files_are_unseen_or_changed() -> None:
    taken = {"/in/a.jsonl": (10, 1), "/in/b.jsonl": (20, 2)}
    listing = {"/in/a.jsonl": [10, 1], "/in/b.jsonl": [25, 3], "/in/c.jsonl": [5, 4]}
    assert runs.new_files(listing, taken) == {"/in/b.jsonl": [25, 3], "/in/c.jsonl": [5, 4]}
    assert runs.new_files({"/in/a.jsonl": [10, 1]}, taken) == {}


def test_drift_figures_on_hand_checked_counts() -> None:
    # old: 60/40 over two clusters with mean score 0.8; new: 20 docs all in cluster 1, mean 0.5, 5 far
    f = measure(np.array([60, 40, 0]), np.array([48.0, 32.0, 0.0]), np.array([0, 20, 0]),
                np.array([0.0, 10.0, 0.0]), np.array([0, 5, 0]))
    assert f["old_docs"] == 100 and f["new_docs"] == 20
    assert f["score_drop"] == pytest.approx(0.3)
    # after = 60/120, 60/120: shares moved by 0.1 each way -> total variation 0.1
    assert f["share_shift"] == pytest.approx(0.1)
    assert f["new_vs_old_shares"] == pytest.approx(0.6)
    assert f["far_fraction"] == pytest.approx(0.25)
    assert f["largest_share_change"]["cluster_id"] in (0, 1)


def test_drift_decision_thresholds() -> None:
    cfg = RefreshConfig(max_score_drop=0.05, max_share_shift=0.5, max_far_fraction=0.2, min_new_docs=10)
    calm = {"new_docs": 50, "score_drop": 0.01, "share_shift": 0.02, "far_fraction": 0.0}
    assert not decide(calm, cfg).refit
    d = decide({**calm, "far_fraction": 0.3}, cfg)
    assert d.refit and d.reasons == ["far_fraction 0.3000 > 0.2"]
    assert not decide({**calm, "new_docs": 9, "score_drop": 0.9}, cfg).refit  # too few to judge
    assert decide(calm, cfg, forced=True).refit
    assert decide({"new_docs": 0}, cfg, config_changed=True).refit
    assert decide(calm, cfg).to_dict()["decision"] == "keep"


# --- three nights, end to end ---------------------------------------------------------------------


def _night_files(folder: Path) -> dict[int, list[str]]:
    """Write three nights of JSONL from disjoint slices of the BBC corpus; return each night's lines."""
    from clustermix.corpus import iter_records

    by_topic: dict[str, list[dict[str, Any]]] = {}
    seen: set[str] = set()
    for rec in iter_records("bbc"):
        if rec["text"] not in seen:  # the BBC set repeats a few articles: keep the counts exact
            seen.add(str(rec["text"]))
            by_topic.setdefault(str(rec["domain"]), []).append(rec)
    n1 = by_topic["business"][:25] + by_topic["sports"][:25] + by_topic["politics"][:20]
    n2 = by_topic["business"][25:35] + by_topic["sports"][25:35] + by_topic["politics"][20:25]
    n3 = by_topic["tech"][:25] + by_topic["entertainment"][:25]
    lines = {1: [json.dumps(r) for r in n1], 3: [json.dumps(r) for r in n3]}
    # night 2 also brings back two night-1 texts under new ids, a night-1 id with other text, and a broken line
    extra = [json.dumps({**n1[0], "id": "again-1"}), json.dumps({**n1[1], "id": "again-2"}),
             json.dumps({"id": n1[2]["id"], "text": "Completely different words under an old id."}),
             '{"id": "broken", "text": ']
    lines[2] = [json.dumps(r) for r in n2] + extra
    return lines


def _land(folder: Path, night: int, lines: list[str]) -> None:
    (folder / f"night-{night}.jsonl").write_text("\n".join(lines) + "\n")


def _versions(root: Path) -> dict[str, int | None]:
    return {t: deltalog.version(str(root / t)) for t in DATA_TABLES}


def _written(uri: str, after: int | None) -> tuple[int, int]:
    """Rows added and data files removed by the commits of the table at ``uri`` after version
    ``after``, read from its Delta log: what a refresh wrote, and what of the old it rewrote."""
    first = -1 if after is None else after
    added = removed = 0
    for f in sorted(Path(uri, "_delta_log").glob("*.json")):
        if int(f.stem) <= first:
            continue
        for line in f.read_text().splitlines():
            action = json.loads(line)
            if "add" in action and action["add"].get("dataChange", True):
                added += json.loads(action["add"]["stats"])["numRecords"]
            if "remove" in action and action["remove"].get("dataChange", True):
                removed += 1
    return added, removed


def _ids(spark: Any, root: Path, table: str) -> list[str]:
    return [r[0] for r in spark.read.format("delta").load(str(root / table)).select("id").collect()]


def test_three_nights(tmp_path: Path, spark: Any, ray_local: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from clustermix import embed, ingest
    from clustermix.refresh import run_refresh

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    root = tmp_path / "lake"
    cfg = make_config(root, str(incoming), cluster={"k": 3}, sample={"budget": 120, "clip": 3},
                      refresh={"min_new_docs": 10})
    nights = _night_files(incoming)

    # night 1: no earlier refresh -> every stage over everything
    _land(incoming, 1, nights[1])
    r1 = run_refresh(cfg, spark=spark)
    assert r1.manifest["mode"] == "bootstrap" and r1.manifest["outcome"] == "succeeded"
    assert deltalog.num_records(str(root / "docs")) == 70
    v1 = _versions(root)
    night1_assign = {r["id"]: (r["cluster_id"], r["score"]) for r in
                     spark.read.format("delta").load(str(root / "assignments")).collect()}

    # night 2: only the new file, new docs assigned to the old centroids, duplicates/bad records accounted
    _land(incoming, 2, nights[2])
    r2 = run_refresh(cfg, spark=spark)
    m2 = r2.manifest
    assert m2["mode"] == "refresh" and [Path(p).name for p in m2["inputs_taken"]] == ["night-2.jsonl"]
    ing = m2["stages"]["ingest"]["counts"]
    assert (ing["read"], ing["accepted"], ing["duplicates"], ing["quarantined"]) == (29, 25, 2, 2)
    assert ing["quarantined_by_reason"] == {"duplicate_id": 1, "malformed_json": 1}
    assert m2["stages"]["embed"]["counts"]["embedded"] == 25
    print("night 2 drift:", m2["drift"])
    assert m2["drift"]["new_docs"] == 25 and m2["drift"]["decision"] == "keep", m2["drift"]
    v2 = _versions(root)
    assert v2["centroids"] == v1["centroids"]  # no refit
    # the refresh costs O(new input): each table took the new file's rows and rewrote none of the old
    new_rows = {"docs": 25, "embeddings": 25, "assignments": 25, "duplicates": 2, "quarantine": 2}
    assert {t: _written(str(root / t), v1[t]) for t in new_rows} == {t: (n, 0) for t, n in new_rows.items()}
    assert all(v2[t] > v1[t] for t in ("docs", "embeddings", "assignments", "blended"))
    docs = _ids(spark, root, "docs")
    assert len(docs) == len(set(docs)) == 95
    assert sorted(_ids(spark, root, "embeddings")) == sorted(docs) == sorted(_ids(spark, root, "assignments"))
    now = {r["id"]: (r["cluster_id"], r["score"]) for r in
           spark.read.format("delta").load(str(root / "assignments")).collect()}
    assert {i: now[i] for i in night1_assign} == night1_assign  # old documents keep their clusters
    dups = {r["id"]: r["duplicate_of"] for r in spark.read.format("delta").load(str(root / "duplicates")).collect()}
    assert dups == {"again-1": json.loads(nights[1][0])["id"], "again-2": json.loads(nights[1][1])["id"]}

    # the same refresh again: nothing new, no data table changes; the run is still recorded
    r2b = run_refresh(cfg, spark=spark)
    assert r2b.manifest["inputs_taken"] == [] and _versions(root) == v2
    assert r2b.manifest["stages"]["assign"]["status"] == "skipped"

    # night 3, crash 1: dies inside ingest after docs and quarantine are committed, before duplicates
    _land(incoming, 3, nights[3])
    real_check = ingest.contracts.check

    def check_or_die(df: Any, table: str) -> Any:
        if table == "duplicates":
            raise RuntimeError("injected: killed during ingest")
        return real_check(df, table)

    monkeypatch.setattr(ingest.contracts, "check", check_or_die)
    with pytest.raises(RuntimeError, match="injected"):
        run_refresh(cfg, spark=spark)
    monkeypatch.setattr(ingest.contracts, "check", real_check)
    assert deltalog.num_records(str(root / "docs")) == 145  # night 3's rows are in, the ledger does not have the file

    # crash 2: the redo replaces night 3's rows (no doubling), then dies in embed
    def embed_dies(*_: Any) -> dict[str, Any]:
        raise RuntimeError("injected: killed during embed")

    monkeypatch.setattr(embed, "run", embed_dies)
    with pytest.raises(RuntimeError, match="injected"):
        run_refresh(cfg, spark=spark)
    monkeypatch.undo()
    docs = _ids(spark, root, "docs")
    assert len(docs) == len(set(docs)) == 145

    # the next refresh completes it: nothing new to ingest, 50 docs to embed, two unseen topics -> refit
    r3 = run_refresh(cfg, spark=spark)
    m3 = r3.manifest
    assert m3["outcome"] == "succeeded" and m3["inputs_taken"] == []
    assert m3["stages"]["embed"]["counts"]["embedded"] == 50
    print("night 3 drift:", m3["drift"])
    assert m3["drift"]["new_docs"] == 50 and m3["drift"]["decision"] == "refit", m3["drift"]
    v3 = _versions(root)
    assert v3["centroids"] > v2["centroids"]
    docs = _ids(spark, root, "docs")
    assert len(docs) == len(set(docs)) == 145
    assert sorted(_ids(spark, root, "embeddings")) == sorted(docs) == sorted(_ids(spark, root, "assignments"))
    assert deltalog.num_records(str(root / "blended")) == 120

    # the runs table has every run, failures included, with what each took and decided
    recorded = runs.read_runs(runs_lake(root))
    assert [(r["mode"], r["outcome"], r["files_taken"]) for r in recorded] == [
        ("bootstrap", "succeeded", 1), ("refresh", "succeeded", 1), ("refresh", "succeeded", 0),
        ("refresh", "failed", 1), ("refresh", "failed", 1), ("refresh", "succeeded", 0)]
    assert recorded[1]["decision"] == "keep" and recorded[-1]["decision"] == "refit"
    assert "injected" in recorded[3]["error"]
    assert json.loads(recorded[-1]["versions_written"])["centroids"] == v3["centroids"]

    from clustermix.report import write_report

    _, html = write_report(str(root), r3.run_id)
    assert "decision <b>refit</b>" in Path(html).read_text()


def runs_lake(root: Path) -> lk.Lake:
    return lk.Lake(str(root))


def test_a_refresh_applies_semantic_dedup_against_documents_already_accepted(
        tmp_path: Path, spark: Any, ray_local: Any) -> None:
    """Night 2 brings a semantic copy of a night-1 article (its lead under a new id, then other text:
    the embedding sees only the lead, MinHash would see two different texts). The refresh puts it in
    ``semantic_duplicates`` pointing at the old article, keeps every document night 1 kept (earlier
    ingests come first in the walk, so a refresh never demotes one), and no plan draws it."""
    from deltalake import DeltaTable

    from clustermix.corpus import iter_records
    from clustermix.refresh import run_refresh

    recs: list[dict[str, Any]] = []
    seen: set[str] = set()
    for rec in iter_records("bbc"):
        if rec["text"] not in seen and rec["domain"] in ("business", "sports") and len(str(rec["text"]).split()) > 150:
            seen.add(str(rec["text"]))
            recs.append(rec)
    night1, night2 = recs[:40], recs[40:45]
    original = night1[3]
    lead = " ".join(str(original["text"]).split()[:120])
    tail = " ".join(str(recs[50]["text"]).split()[60:300])
    copy = {**original, "id": "semantic-copy", "text": f"{lead} {tail}"}
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    root = tmp_path / "lake"
    cfg = make_config(root, str(incoming), cluster={"k": 2}, sample={"budget": 60, "clip": 2},
                      refresh={"min_new_docs": 100}, embed={"max_seq_length": 64},
                      dedup={"semantic": {"enabled": True, "threshold": 0.99, "num_actors": 1, "cpus_per_actor": 0.5}})

    def dups() -> dict[str, str]:
        rows = DeltaTable(str(root / "semantic_duplicates")).to_pyarrow_table(columns=["id", "duplicate_of"])
        return dict(zip(rows.column("id").to_pylist(), rows.column("duplicate_of").to_pylist(), strict=True))

    _land(incoming, 1, [json.dumps(r) for r in night1])
    assert run_refresh(cfg, spark=spark).manifest["outcome"] == "succeeded"
    before = dups()
    _land(incoming, 2, [json.dumps(r) for r in [*night2, copy]])
    m2 = run_refresh(cfg, spark=spark).manifest
    assert m2["mode"] == "refresh" and m2["stages"]["ingest"]["counts"]["accepted"] == 6
    after = dups()
    assert after["semantic-copy"] == original["id"]
    assert {i: after.get(i) for i in before} == before  # night 1's decisions stand
    night2_ids = {str(r["id"]) for r in night2} | {"semantic-copy"}
    assert set(after) - set(before) <= night2_ids  # only new documents became duplicates
    assert m2["stages"]["dedup"]["counts"]["duplicates"] == len(after)
    stats = spark.read.format("delta").load(str(root / "cluster_stats")).select("n_docs").collect()
    assert sum(r["n_docs"] for r in stats) == deltalog.num_records(str(root / "docs")) - len(after) == 46 - len(after)
    drawn = {r["id"] for r in spark.read.format("delta").load(str(root / "blended")).select("id").collect()}
    assert drawn and not drawn & set(after)
