"""The whole pipeline on a small real slice of the default corpus, against real Spark, Ray, FAISS, Delta."""

from __future__ import annotations

import numpy as np
import pytest

from clustermix import deltalog, tableio
from clustermix import lake as lk
from clustermix.pipeline import run_stages

from .conftest import make_config

# the stages of `clustermix run` without a search target
STAGES = ("ingest", "embed", "cluster", "stats", "sample", "blend")

pytestmark = pytest.mark.slow


def test_every_stage_ran_and_the_manifest_adds_up(pipeline):
    _, run = pipeline
    m = run.manifest
    assert m["outcome"] == "succeeded"
    assert [s for s in STAGES if m["stages"][s]["status"] == "ran"] == list(STAGES)
    ing = m["stages"]["ingest"]["counts"]
    assert ing["read"] == 70
    assert ing["read"] == ing["accepted"] + ing["duplicates"] + ing["near_duplicates"] + ing["quarantined"]
    from clustermix.manifest import read_json

    on_disk = read_json(run.manifest_uri)
    assert on_disk["stages"]["blend"]["versions"] == {"blended": 0}
    assert on_disk["tables"]["blended"] == 0


def test_contracts_every_doc_has_one_embedding_and_one_cluster(pipeline, spark):
    cfg, run = pipeline
    lake = run.lake
    docs = tableio.read(spark, lake, "docs")
    emb = tableio.read(spark, lake, "embeddings")
    asg = tableio.read(spark, lake, "assignments")
    n = docs.count()
    assert emb.count() == n and emb.select("id").distinct().count() == n
    assert asg.count() == n and asg.join(docs, "id").count() == n
    assert {r["cluster_id"] for r in asg.select("cluster_id").distinct().collect()} <= set(range(cfg.cluster.k))
    # embeddings are unit-length float32 vectors of the model's width
    vecs = np.array([r["embedding"] for r in emb.limit(10).collect()], dtype=np.float32)
    assert vecs.shape[1] == 384
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)


def test_sample_respects_budget_clip_and_positions(pipeline, spark):
    cfg, run = pipeline
    plan = tableio.read(spark, run.lake, "sample_plan")
    rows = plan.collect()  # a test-sized table
    assert len(rows) == cfg.sample.budget
    per_doc: dict[str, int] = {}
    for r in rows:
        per_doc[r["id"]] = per_doc.get(r["id"], 0) + 1
    assert max(per_doc.values()) <= cfg.sample.clip
    assert sorted(r["position"] for r in rows) == list(range(cfg.sample.budget))
    # g2s: the first K positions cover K distinct clusters
    first = sorted(rows, key=lambda r: r["position"])[: cfg.cluster.k]
    assert len({r["cluster_id"] for r in first}) == cfg.cluster.k


def test_blended_reads_back_through_delta_rs_and_spark(pipeline, spark):
    from deltalake import DeltaTable

    cfg, run = pipeline
    uri = run.lake.table("blended")
    t = DeltaTable(uri).to_pyarrow_table()
    assert t.num_rows == cfg.sample.budget
    assert {"id", "text", "cluster_id", "domain", "draw", "position", "phase"} <= set(t.column_names)
    assert tableio.read(spark, run.lake, "blended").count() == t.num_rows
    meta = deltalog.last_commit_meta(uri)
    assert meta is not None and meta["run_id"] == run.run_id and "sample_plan" in meta["inputs"]


def test_balancing_flattens_the_cluster_mix(pipeline, spark):
    _, run = pipeline
    sample = run.manifest["stages"]["sample"]["counts"]
    assert sample["shares_after"]["gini"] < sample["shares_before"]["gini"]
    sizes = {r["cluster_id"]: r["n_docs"] for r in tableio.read(spark, run.lake, "cluster_stats").collect()}
    draws = {int(k): v for k, v in sample["draws_per_cluster"].items()}
    big, small = max(sizes, key=sizes.get), min(sizes, key=sizes.get)
    n, b = sum(sizes.values()), sum(draws.values())
    assert draws[big] / b < sizes[big] / n, "the largest cluster must lose share"
    assert draws[small] / b > sizes[small] / n, "the smallest cluster must gain share"
    mix = run.manifest["stages"]["blend"]["counts"]["draws_by_domain"]
    assert sum(v["draws"] for v in mix.values()) == b


def test_rerun_skips_every_stage_and_changes_no_table(pipeline, spark):
    cfg, run = pipeline
    before = {t: deltalog.version(run.lake.table(t)) for t in ("docs", "embeddings", "assignments", "blended")}
    again = run_stages(cfg, spark=spark)
    assert {s: again.manifest["stages"][s]["status"] for s in STAGES} == dict.fromkeys(STAGES, "skipped")
    assert {t: deltalog.version(run.lake.table(t)) for t in before} == before


def test_changed_sample_config_reruns_only_sample_and_blend(pipeline, spark, tmp_path):
    import shutil

    cfg, run = pipeline
    root = tmp_path / "copy"
    shutil.copytree(run.lake.root, root)  # the shared lake stays as the other tests expect it
    cfg2 = make_config(root, cfg.input.path, sample={"budget": 120, "order": "random"}, dedup={"near": {"enabled": True}})
    again = run_stages(cfg2, spark=spark)
    status = {s: again.manifest["stages"][s]["status"] for s in STAGES}
    assert status == {"ingest": "skipped", "embed": "skipped", "cluster": "skipped", "stats": "skipped",
                      "sample": "ran", "blend": "ran"}
    assert tableio.read(spark, again.lake, "blended").count() == 120
    hist = again.manifest["stages"]["sample"]["counts"]["draws_per_doc_histogram"]
    assert sum(int(d) * n for d, n in hist.items()) == 120
    assert sum(hist.values()) == deltalog.num_records(again.lake.table("docs"))


def test_same_inputs_config_and_seed_give_an_identical_blend(pipeline, spark, tmp_path):
    import shutil

    cfg, run = pipeline
    root = tmp_path / "again"
    shutil.copytree(run.lake.root, root)
    for t in ("sample_plan", "blended"):
        shutil.rmtree(root / t)
    again = run_stages(make_config(root, cfg.input.path), ("sample", "blend"), spark=spark)
    assert again.manifest["stages"]["blend"]["status"] == "ran"
    assert not again._ahead  # the blend's state, loaded during the sample stage, was reaped by its write

    def content(lake: lk.Lake) -> list[tuple]:
        cols = ("id", "cluster_id", "draw", "position", "phase", "text")
        return sorted(tuple(r) for r in tableio.read(spark, lake, "blended").select(*cols).collect())

    assert content(again.lake) == content(run.lake)


def test_two_level_balance_reruns_sample_and_blend_and_lifts_the_small_topics(pipeline, spark, tmp_path):
    import shutil

    from clustermix.report import build_report

    cfg, run = pipeline
    root = tmp_path / "levels"
    shutil.copytree(run.lake.root, root)
    again = run_stages(make_config(root, cfg.input.path, sample={"balance": "groups_then_clusters"},
                                   dedup={"near": {"enabled": True}}), spark=spark)
    status = {s: again.manifest["stages"][s]["status"] for s in STAGES}
    assert status["stats"] == "skipped" and status["sample"] == "ran" and status["blend"] == "ran"
    counts = again.manifest["stages"]["sample"]["counts"]
    mix = {d: v["draws"] for d, v in again.manifest["stages"]["blend"]["counts"]["draws_by_domain"].items()}
    assert mix == counts["draws_per_group"] and sum(mix.values()) == cfg.sample.budget
    flat = {d: v["draws"] for d, v in run.manifest["stages"]["blend"]["counts"]["draws_by_domain"].items()}
    for topic in ("politics", "tech", "entertainment"):  # the three smallest topics of the slice
        assert mix[topic] > flat[topic], (topic, mix, flat)
    rows = tableio.read(spark, again.lake, "blended").collect()
    assert sorted(r["position"] for r in rows) == list(range(cfg.sample.budget))
    per_doc: dict[str, int] = {}
    for r in rows:
        per_doc[r["id"]] = per_doc.get(r["id"], 0) + 1
    assert max(per_doc.values()) <= cfg.sample.clip
    lv = build_report(str(root), again.run_id)["levels"]
    assert lv["balance"] == "groups_then_clusters" and lv["groups"]["draws_from"] == "the allocation (exact)"
    assert set(lv["groups"]["lost_share"]) <= {"business", "sports"}
