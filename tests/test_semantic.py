"""Semantic dedup: the greedy walk on tiny arrays, then the Ray stage on a planted lake (groups of
near-identical embeddings inside clusters among distinct ones), and the stages after it seeing only
the kept documents."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clustermix import deltalog, semantic
from clustermix.semdedup import dedup_sorted, member_order
from clustermix.tableio import TableWriter

from .conftest import make_config

D = 16


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_the_walk_keeps_one_of_each_group_whatever_the_block_size() -> None:
    rng = np.random.default_rng(0)
    base = _unit(rng.normal(size=(40, D)))
    copies = _unit(np.repeat(base[:10], 3, axis=0) + rng.normal(scale=0.01, size=(30, D)))
    x = np.concatenate([base, copies])[rng.permutation(70)]
    results = [dedup_sorted(x, 0.95, b) for b in (1, 4, 17, 1000)]
    for r in results[1:]:
        assert (r.dup_of == results[0].dup_of).all() and (r.similarity == results[0].similarity).all()
    r = results[0]
    assert r.kept.sum() == 40  # ten groups of four keep one each; thirty distinct all kept
    dup = np.nonzero(~r.kept)[0]
    assert (r.dup_of[dup] < dup).all() and r.kept[r.dup_of[dup]].all()  # of an earlier, kept document
    assert (r.similarity[dup] >= 0.95).all()


def test_a_chain_keeps_both_ends_when_they_are_far_apart() -> None:
    # b is within the threshold of a and of c, a and c are not: a kept, b dropped, c kept (b is not kept)
    a = np.array([1.0, 0.0, 0.0])
    c = np.array([np.cos(0.6), np.sin(0.6), 0.0])
    b = _unit((a + c) / 2)
    r = dedup_sorted(_unit(np.stack([a, b, c])), float(np.cos(0.35)), 2)
    assert r.dup_of.tolist() == [-1, 0, -1]


def test_member_order_puts_earlier_ingests_then_the_centroid_first() -> None:
    order = member_order(np.array([0.5, 0.9, 0.7, 0.9]), ["d", "c", "b", "a"], np.array([2, 2, 1, 2]))
    assert order.tolist() == [2, 3, 1, 0]
    q = member_order(np.array([0.5, 0.9, 0.7]), ["x", "y", "z"], None, np.array([0.9, np.nan, 0.1]))
    assert q.tolist() == [0, 2, 1]


def planted_lake(root: Path, seed: int = 1) -> dict[str, set[str]]:
    """embeddings, assignments, centroids and docs of 3 clusters; returns {group: member ids} of the
    planted near-identical groups (every other document is distinct)."""
    import pyarrow as pa
    from deltalake import write_deltalake

    from clustermix.models import model_id

    model = model_id("all-MiniLM-L6-v2")
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(3, D)) * 3)
    ids, vecs, clusters, groups = [], [], [], {}
    for c in range(3):
        for i in range(25):
            v = _unit(centres[c] + rng.normal(scale=0.6, size=D))
            ids.append(f"c{c}-d{i:02d}")
            vecs.append(v)
            clusters.append(c)
            if i < 4:  # four documents with two or three near-copies each
                members = {ids[-1]}
                for j in range(2 + i % 2):
                    ids.append(f"c{c}-d{i:02d}-copy{j}")
                    vecs.append(_unit(v + rng.normal(scale=0.02, size=D)))
                    clusters.append(c)
                    members.add(ids[-1])
                groups[f"c{c}-g{i}"] = members
    x = np.stack(vecs)
    score = np.einsum("nd,nd->n", x, centres[clusters]).astype(np.float32)
    vec = pa.list_(pa.field("element", pa.float32()))
    n = len(ids)
    tables = {
        "embeddings": pa.table({"id": ids, "embedding": pa.array(x.tolist(), vec), "model": [model] * n}),
        "assignments": pa.table({"id": ids, "cluster_id": pa.array(clusters, pa.int32()),
                                 "score": pa.array(score, pa.float32())}),
        "centroids": pa.table({"cluster_id": pa.array(range(3), pa.int32()), "centroid": pa.array(centres.tolist(), vec),
                               "k": pa.array([3] * 3, pa.int32()), "niter": pa.array([1] * 3, pa.int32()),
                               "seed": [0] * 3, "objective": [0.0] * 3, "model": [model] * 3,
                               "fit_meta": ["{}"] * 3}),
        "docs": pa.table({"id": ids, "text": [f"text of {i}" for i in ids], "domain": ["a", "b"] * (n // 2) + ["a"] * (n % 2),
                          "quality": rng.random(n), "lang": ["en"] * n, "n_chars": pa.array([10] * n, pa.int64()),
                          "n_tokens": pa.array([3] * n, pa.int64()), "text_hash": ids, "source_file": ["f"] * n,
                          "ingested_at": pa.array([0] * n, pa.timestamp("us", tz="UTC")), "run_id": ["r0"] * n}),
    }
    for name, t in tables.items():
        write_deltalake(f"{root}/{name}", t)
    return groups


def _dups(uri: str) -> dict[str, tuple[str, int]]:
    from deltalake import DeltaTable

    rows = DeltaTable(uri).to_pyarrow_table().to_pylist()
    return {r["id"]: (r["duplicate_of"], r["cluster_id"]) for r in rows}


@pytest.fixture(scope="module")
def lake_root(tmp_path_factory: Any) -> tuple[Path, dict[str, set[str]]]:
    root = tmp_path_factory.mktemp("semantic") / "lake"
    return root, planted_lake(root)


def test_the_stage_finds_the_planted_groups_and_does_not_depend_on_actors_or_blocks(
        lake_root: Any, ray_local: Any) -> None:
    from clustermix.lake import Lake

    root, groups = lake_root
    lake = Lake(str(root))
    inputs = {t: deltalog.version(lake.table(t)) for t in ("embeddings", "assignments", "docs")}
    seen = []
    for actors, block in ((1, 2), (2, 1000)):
        cfg = make_config(root, "builtin://bbc", dedup={"semantic": {
            "enabled": True, "threshold": 0.97, "num_actors": actors, "block_rows": block, "cpus_per_actor": 0.5}})
        writer = TableWriter(lake, {"run_id": "t", "stage": "dedup"})
        counts = semantic.run_semantic(lake, cfg, inputs, "t", writer)
        seen.append(_dups(lake.table("semantic_duplicates")))
        assert counts["members"] == deltars_rows(lake) and counts["duplicates"] == len(seen[-1])
    assert seen[0] == seen[1]
    dups = seen[0]
    for members in groups.values():
        kept = members - set(dups)
        assert len(kept) == 1  # one of each group is kept ...
        assert {dups[m][0] for m in members - kept} == kept  # ... and the others point at it
    assert set(dups) <= set().union(*groups.values())  # no distinct document is dropped
    assert all(dups[i][1] == int(i[1]) for i in dups)  # within its own cluster


def deltars_rows(lake: Any) -> int:
    return deltalog.num_records(lake.table("assignments"))


def test_stats_and_sample_see_only_kept_documents_and_rerun_when_dedup_changes(
        lake_root: Any, spark: Any, ray_local: Any) -> None:
    from clustermix import tableio
    from clustermix.pipeline import run_stages

    root, groups = lake_root
    on = {"semantic": {"enabled": True, "threshold": 0.97, "num_actors": 1, "cpus_per_actor": 0.5}}
    cfg = make_config(root, "builtin://bbc", dedup=on, sample={"budget": 60, "clip": 2})
    run = run_stages(cfg, ("dedup", "stats", "sample"), spark=spark)
    n_dups = run.manifest["stages"]["dedup"]["counts"]["duplicates"]
    assert n_dups == sum(len(m) - 1 for m in groups.values())
    dups = set(_dups(run.lake.table("semantic_duplicates")))
    stats = tableio.read(spark, run.lake, "cluster_stats").select("n_docs").collect()
    assert sum(r["n_docs"] for r in stats) == deltars_rows(run.lake) - n_dups
    planned = {r["id"] for r in tableio.read(spark, run.lake, "sample_plan").select("id").collect()}
    assert planned and not planned & dups
    from clustermix.report import _dedup, _Run

    rep = _dedup(_Run(run.lake, run.manifest), run.manifest["config"])["semantic"]
    assert (rep["enabled"], rep["threshold"], rep["keep"], rep["removed"]) == (True, 0.97, "centroid", n_dups)
    assert sum(rep["per_cluster"].values()) == sum(rep["per_source"].values()) == n_dups
    assert len(rep["examples"]) == 3 and all(e["text"] and e["kept_text"] and e["similarity"] >= 0.97
                                             for e in rep["examples"])
    again = run_stages(cfg, ("dedup", "stats", "sample"), spark=spark)
    assert {s: again.manifest["stages"][s]["status"] for s in ("dedup", "stats", "sample")} == dict.fromkeys(
        ("dedup", "stats", "sample"), "skipped")
    off = run_stages(make_config(root, "builtin://bbc", sample={"budget": 60, "clip": 2}), ("dedup", "stats"), spark=spark)
    assert off.manifest["stages"]["dedup"]["counts"] == {"enabled": False, "duplicates": 0}
    assert off.manifest["stages"]["stats"]["status"] == "ran"  # its input semantic_duplicates changed
    stats = tableio.read(spark, run.lake, "cluster_stats").select("n_docs").collect()
    assert sum(r["n_docs"] for r in stats) == deltars_rows(run.lake)
