"""The per-document plan in Spark: exact draws, the clip, positions, and the four training orders."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from clustermix.clusterclip import allocate
from clustermix.config import SampleConfig
from clustermix.plan import alloc_frame, build_plan

SIZES = [200, 50, 10, 3, 1]


@pytest.fixture(scope="module")
def members(spark):
    rows = []
    for k, n in enumerate(SIZES):
        rows += [(f"c{k}-{i}", k, float((i * 7) % 11)) for i in range(n)]
    return spark.createDataFrame(rows, "id string, cluster_id int, quality double")


def _plan(spark, members, budget, clip, order, within="uniform", seed=7):
    a = allocate(np.array(SIZES), np.ones(len(SIZES)), budget, clip)
    alloc = alloc_frame(spark, list(range(len(SIZES))), SIZES, a.draws.tolist())
    active = a.draws[a.draws > 0]
    df = build_plan(members, alloc, seed=seed, within=within, order=order, a_min=int(active.min()), partitions=3)
    return a, df.collect()


@pytest.mark.parametrize("order", ["random", "stratified", "g2s", "s2g"])
def test_invariants_hold_for_every_order(spark, members, order):
    budget, clip = 300, 4
    a, rows = _plan(spark, members, budget, clip, order)
    assert len(rows) == budget
    assert sorted(r["position"] for r in rows) == list(range(budget))
    per_doc = Counter(r["id"] for r in rows)
    assert max(per_doc.values()) <= clip
    per_cluster = Counter(r["cluster_id"] for r in rows)
    assert [per_cluster[k] for k in range(len(SIZES))] == a.draws.tolist()
    # clusters at their clip get exactly clip·n_k; the others are equal within one draw
    for k, n in enumerate(SIZES):
        if a.clipped[k]:
            assert per_cluster[k] == clip * n
    free = [per_cluster[k] for k in range(len(SIZES)) if not a.clipped[k]]
    assert max(free) - min(free) <= 1
    # within a cluster every document is drawn floor or ceil of a_k / n_k times
    for k, n in enumerate(SIZES):
        counts = [per_doc.get(f"c{k}-{i}", 0) for i in range(n)]
        assert max(counts) - min(counts) <= 1
    # draw indices of a document are 0..d-1
    draws: dict[str, list[int]] = {}
    for r in rows:
        draws.setdefault(r["id"], []).append(r["draw"])
    assert all(sorted(v) == list(range(len(v))) for v in draws.values())


def test_g2s_starts_with_every_cluster_and_s2g_ends_with_them(spark, members):
    _, rows = _plan(spark, members, 300, 4, "g2s")
    first = [r for r in sorted(rows, key=lambda r: r["position"])][: len(SIZES)]
    assert {r["cluster_id"] for r in first} == set(range(len(SIZES)))
    assert first[0]["phase"] == "general"
    _, rev = _plan(spark, members, 300, 4, "s2g")
    last = sorted(rev, key=lambda r: r["position"])[-len(SIZES):]
    assert {r["cluster_id"] for r in last} == set(range(len(SIZES)))


def test_stratified_prefixes_keep_the_mix(spark, members):
    a, rows = _plan(spark, members, 300, 4, "stratified")
    ordered = sorted(rows, key=lambda r: r["position"])
    share = a.draws / a.draws.sum()
    for p in (30, 100, 200):
        c = Counter(r["cluster_id"] for r in ordered[:p])
        got = np.array([c[k] for k in range(len(SIZES))])
        assert np.abs(got - share * p).max() <= 1.0 + 1e-9


def test_quality_within_prefers_better_documents(spark, members):
    _, rows = _plan(spark, members, 100, 4, "random", within="quality")
    c0 = [r for r in rows if r["cluster_id"] == 0]  # cluster 0: 200 docs, ~35 draws
    q = {f"c0-{i}": float((i * 7) % 11) for i in range(200)}
    drawn = {r["id"] for r in c0}
    assert min(q[i] for i in drawn) >= max(q[i] for i in q if i not in drawn)


def test_same_seed_same_plan_other_seed_other_plan(spark, members):
    _, a = _plan(spark, members, 200, 4, "random", seed=1)
    _, b = _plan(spark, members, 200, 4, "random", seed=1)
    _, c = _plan(spark, members, 200, 4, "random", seed=2)
    key = lambda rows: sorted((r["position"], r["id"], r["draw"]) for r in rows)  # noqa: E731
    assert key(a) == key(b)
    assert key(a) != key(c)


def test_sample_config_defaults():
    s = SampleConfig(budget=10)
    assert (s.unit, s.clip, s.order, s.within) == ("docs", 4, "stratified", "uniform")
