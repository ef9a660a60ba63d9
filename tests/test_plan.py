"""The per-document plan in Spark: exact draws, the clip, positions, and the four training orders."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from clustermix.clusterclip import allocate
from clustermix.config import SampleConfig
from clustermix.plan import Counts, build_plan

SIZES = [200, 50, 10, 3, 1]


@pytest.fixture(scope="module")
def members(spark):
    rows = []
    for k, n in enumerate(SIZES):
        rows += [(f"c{k}-{i}", k, float((i * 7) % 11)) for i in range(n)]
    return spark.createDataFrame(rows, "id string, cluster_id int, quality double")


def _plan(spark, members, budget, clip, order, within="uniform", seed=7):
    a = allocate(np.array(SIZES), np.ones(len(SIZES)), budget, clip)
    alloc = Counts.of(np.arange(len(SIZES)), np.array(SIZES), a.draws)
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


@pytest.fixture(scope="module")
def big_members(spark):
    """One large cluster (the hash-prefix path ranks only a prefix of it) and two small ones."""
    from pyspark.sql import functions as F

    sizes = {0: 20_000, 1: 300, 2: 40}
    return spark.range(sum(sizes.values())).select(
        F.format_string("d%06d", "id").alias("id"),
        F.when(F.col("id") < sizes[0], 0).when(F.col("id") < sizes[0] + sizes[1], 1).otherwise(2).alias("cluster_id"),
    ), sizes


def _big_plan(spark, big, budget, order, seed=7, partitions=3):
    members, sizes = big
    a = allocate(np.array(list(sizes.values())), np.ones(len(sizes)), budget, 4)
    alloc = Counts.of(np.array(list(sizes)), np.array(list(sizes.values())), a.draws)
    active = a.draws[a.draws > 0]
    return a, build_plan(members, alloc, seed=seed, within="uniform", order=order, a_min=int(active.min()),
                         partitions=partitions)


def test_hash_prefix_draws_exactly_the_documents_a_full_rank_would(spark, big_members):
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from clustermix.plan import candidate_threshold

    a, df = _big_plan(spark, big_members, 900, "random")
    members, sizes = big_members
    assert a.draws[0] < sizes[0]  # cluster 0 has base 0 draws: only its prefix is ranked
    assert candidate_threshold(sizes[0], int(a.draws[0])) < 2**63 - 1
    rows = df.collect()
    assert len(rows) == 900 and sorted(r["position"] for r in rows) == list(range(900))
    # the reference: rank the whole cluster by the same seeded hash, keep the first a_0
    w = Window.partitionBy("cluster_id").orderBy(F.xxhash64(F.lit(7), "id"), "id")
    ref = members.where("cluster_id = 0").withColumn("r", F.row_number().over(w) - 1).where(f"r < {a.draws[0]}")
    assert {r["id"] for r in ref.collect()} == {r["id"] for r in rows if r["cluster_id"] == 0}
    assert Counter(r["cluster_id"] for r in rows) == dict(enumerate(a.draws.tolist()))


def test_a_short_hash_prefix_fails_the_job_instead_of_drawing_too_few(spark, big_members, monkeypatch):
    from clustermix import plan

    monkeypatch.setattr(plan, "SIGMAS", -60.0)  # a threshold far below the a_0-th hash
    _, df = _big_plan(spark, big_members, 900, "random")
    with pytest.raises(Exception, match="hash prefix holds fewer documents"):
        df.collect()


@pytest.mark.parametrize("order", ["random", "stratified", "g2s", "s2g"])
def test_positions_do_not_depend_on_the_number_of_partitions(spark, big_members, order):
    key = lambda df: sorted((r["position"], r["id"], r["draw"], r["phase"]) for r in df.collect())  # noqa: E731
    _, one = _big_plan(spark, big_members, 2000, order, partitions=1)
    _, seven = _big_plan(spark, big_members, 2000, order, partitions=7)
    got = key(one)
    assert got == key(seven)
    assert [p for p, *_ in got] == list(range(2000))


def test_random_order_is_well_mixed(spark, big_members):
    a, df = _big_plan(spark, big_members, 6000, "random")
    rows = sorted(df.collect(), key=lambda r: r["position"])
    # every tenth of the order holds each cluster's share within 5 binomial standard deviations
    share = a.draws / a.draws.sum()
    for t in range(10):
        part = Counter(r["cluster_id"] for r in rows[t * 600:(t + 1) * 600])
        for k, s in enumerate(share):
            assert abs(part[k] - 600 * s) <= 5 * np.sqrt(600 * s * (1 - s)) + 1
    # repeats of a document are not bunched: gaps between its draws look like those of a shuffle
    pos: dict[str, list[int]] = {}
    for r in rows:
        pos.setdefault(r["id"], []).append(r["position"])
    gaps = [b - a_ for p in pos.values() for a_, b in zip(sorted(p), sorted(p)[1:], strict=False)]
    assert np.median(gaps) > 6000 / 10


def test_permutation_is_a_bijection_for_any_size(spark):
    from clustermix.plan import permute

    for size in (1, 2, 7, 1000, 4099):
        got = [r["p"] for r in permute(spark.range(size), "id", size, seed=3, out="p").collect()]
        assert sorted(got) == list(range(size))
        if size >= 1000:
            # no trace of the input order: neighbours land far apart, as in a shuffle
            assert abs(np.corrcoef(np.arange(size), got)[0, 1]) < 0.1
            assert (np.abs(np.diff(got)) < 10).sum() < 50  # a shuffle: about 19


def _exchanges(df) -> int:
    import contextlib
    import io
    import re

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        df.explain()
    return len(re.findall(r"Exchange (?:hashpartitioning|rangepartitioning|SinglePartition|RoundRobin)", buf.getvalue()))


@pytest.mark.parametrize(("order", "shuffles"), [("random", 1), ("stratified", 2), ("g2s", 2), ("s2g", 2)])
def test_the_plan_shuffles_only_for_the_within_cluster_rank_and_the_groups(spark, big_members, order, shuffles):
    """No global sort: one shuffle ranks the candidates; non-random orders add one to rank within groups."""
    _, df = _big_plan(spark, big_members, 900, order)
    assert _exchanges(df) == shuffles
