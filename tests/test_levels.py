"""Two-level balancing (groups, then clusters): the allocation against an independent water-filling at
each level, and the sample stage in real Spark on a planted corpus where one source spans many clusters."""

from __future__ import annotations

import doctest
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clustermix import levels
from clustermix.clusterclip import allocate
from clustermix.config import SampleConfig
from clustermix.contracts import NO_DOMAIN
from clustermix.errors import ConfigError, DataError
from clustermix.levels import CellSizes, allocate_cells, allocate_two_level, group_targets


def reference_fill(sizes: list[int], weights: list[int], budget: int, clip: int) -> list[Fraction]:
    """Water-filling by the textbook iteration, in exact fractions: spread what is left over the
    entries not yet at their cap in proportion to their weights; any entry pushed past its cap is
    fixed at the cap; repeat until none is. Shares no code with :mod:`clustermix.clusterclip`."""
    w = [Fraction(x) if n > 0 else Fraction(0) for x, n in zip(weights, sizes, strict=True)]
    caps = [Fraction(clip * n) if wi > 0 else Fraction(0) for n, wi in zip(sizes, w, strict=True)]
    if budget >= sum(caps):
        return caps
    active = {i for i, wi in enumerate(w) if wi > 0}
    fixed: set[int] = set()
    while True:
        left = budget - sum(caps[i] for i in fixed)
        total_w = sum(w[i] for i in active)
        over = {i for i in active if left * w[i] / total_w > caps[i]}
        if not over:
            break
        active -= over
        fixed |= over
    return [caps[i] if i in fixed else (left * w[i] / total_w if i in active else Fraction(0))
            for i in range(len(sizes))]


def assert_rounds(draws: np.ndarray, real: list[Fraction]) -> None:
    """Integers within one of the exact real allocation (floor or ceiling of it)."""
    for d, r in zip(draws.tolist(), real, strict=True):
        assert r - 1 < d < r + 1, (draws.tolist(), [float(x) for x in real])


# a corpus of cells: per group, documents in each of a few clusters (many cells empty)
cells_st = st.integers(1, 6).flatmap(lambda g: st.tuples(
    st.lists(st.lists(st.integers(0, 60) | st.just(0), min_size=1, max_size=8), min_size=g, max_size=g),
    st.lists(st.integers(0, 4), min_size=g, max_size=g)))


@settings(max_examples=300, deadline=None)
@given(cells=cells_st, budget=st.integers(1, 3000), clip=st.integers(1, 5))
def test_two_level_equals_a_water_filling_at_each_level(cells, budget, clip):
    matrix, weights = cells
    cell_group = np.array([g for g, row in enumerate(matrix) for n in row if n > 0], dtype=np.int64)
    sizes = np.array([n for row in matrix for n in row if n > 0], dtype=np.int64)
    group_sizes = [sum(row) for row in matrix]
    if not any(w > 0 and n > 0 for w, n in zip(weights, group_sizes, strict=True)):
        with pytest.raises(ValueError, match="positive target"):
            allocate_two_level(cell_group, sizes, np.array(weights, dtype=float), budget, clip)
        return
    top, draws = allocate_two_level(cell_group, sizes, np.array(weights, dtype=float), budget, clip)
    # level 1: group totals are the water-filling of the budget over the group sizes, under the clip
    ref = reference_fill(group_sizes, weights, budget, clip)
    assert_rounds(top.draws, ref)
    per_group = np.bincount(cell_group, weights=draws, minlength=len(matrix)).astype(np.int64)
    assert per_group.tolist() == top.draws.tolist(), "a group's cells must sum to its allotment exactly"
    # the sum is exact: the budget, or every document of a weighted group at its clip
    cap = sum(clip * n for n, w in zip(group_sizes, weights, strict=True) if w > 0)
    assert int(draws.sum()) == min(budget, cap)
    # level 2: inside each group, the cells are the water-filling of the group's allotment, uniform
    for g in range(len(matrix)):
        idx = np.flatnonzero(cell_group == g)
        if len(idx):
            assert_rounds(draws[idx], reference_fill(sizes[idx].tolist(), [1] * len(idx), int(top.draws[g]), clip))
    assert (draws >= 0).all() and (draws <= clip * sizes).all(), "a cell exceeds its clip"


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(1, 300), min_size=1, max_size=30), budget=st.integers(1, 4000),
       clip=st.integers(1, 5))
def test_one_group_is_cluster_clip_and_singleton_groups_are_the_group_level(sizes, budget, clip):
    n = np.array(sizes)
    _, one_group = allocate_two_level(np.zeros(len(n), dtype=np.int64), n, np.ones(1), budget, clip)
    assert one_group.tolist() == allocate(n, np.ones(len(n)), budget, clip).draws.tolist()
    _, singletons = allocate_two_level(np.arange(len(n)), n, np.ones(len(n)), budget, clip)
    assert singletons.tolist() == allocate(n, np.ones(len(n)), budget, clip).draws.tolist()


def test_a_wide_source_no_longer_takes_the_mix():
    # source w spans 8 clusters of 100, a and b one cluster each, r hides 10 documents in w's clusters
    rows = [(k, "w", 100, 0) for k in range(8)] + [(8, "a", 100, 0), (9, "b", 60, 0), (0, "r", 5, 0), (3, "r", 5, 0)]
    cells = CellSizes.of(rows)
    scfg = SampleConfig(budget=600, clip=3, balance="groups_then_clusters")
    draws, info = allocate_cells(cells, group_targets(cells.groups, {}), scfg)
    # uniform 150 each; r stops at its clip (30), then b (180): a and w share the rest
    assert dict(zip(cells.groups, cells.per_group(draws).tolist(), strict=True)) == {"a": 195, "b": 180, "r": 30,
                                                                                      "w": 195}
    assert info["draws"] == 600 and info["shortfall"] == 0 and info["groups_at_clip"] == 2
    # inside w, its 195 draws are spread evenly over its 8 clusters
    w = [int(d) for d, g in zip(draws, cells.group, strict=True) if g == "w"]
    assert sum(w) == 195 and max(w) - min(w) <= 1


def test_configured_group_weights_and_unnamed_groups():
    assert group_targets(["a", "b", "c"], {"a": 2.0, "c": 0.0}).tolist() == [2.0, 1.0, 0.0]
    cells = CellSizes.of([(0, "a", 100, 0), (1, "b", 100, 0), (2, "c", 100, 0)])
    draws, _ = allocate_cells(cells, group_targets(cells.groups, {"a": 2.0, "c": 0.0}), SampleConfig(budget=90))
    assert draws.tolist() == [60, 30, 0]


def test_tokens_unit_converts_each_cell_at_its_own_document_length():
    cells = CellSizes.of([(0, "a", 10, 1000), (1, "a", 10, 100), (0, "b", 10, 500)])
    scfg = SampleConfig(budget=600, unit="tokens", clip=4)
    draws, info = allocate_cells(cells, np.ones(2), scfg)
    # group a and b get 300 tokens each; a's clusters 150 each: 1.5 and 15 docs; b 300 tokens = 6 docs
    assert draws.tolist() == [2, 6, 15]
    assert info["allocated"] == 600


def test_sample_config_rejects_bad_balance_keys():
    with pytest.raises(ValueError, match="balance"):
        SampleConfig(budget=10, balance="sources")
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        SampleConfig(budget=10, group_weights={"a": -1.0})
    with pytest.raises(ValueError, match="column"):
        SampleConfig(budget=10, group_column=" ")


def test_new_sample_keys_are_in_the_fingerprints():
    from clustermix.registry import config_hash

    from .conftest import make_config

    base = make_config("/tmp/x", "builtin://bbc")
    for key, value in (("balance", "groups_then_clusters"), ("group_column", "lang"), ("group_weights", {"a": 2})):
        other = make_config("/tmp/x", "builtin://bbc", sample={key: value})
        assert config_hash(other, "sample") != config_hash(base, "sample"), key
        assert config_hash(other, "blend") != config_hash(base, "blend"), key
    # the stats' cells are per value of the group column: only that key reruns them
    assert config_hash(make_config("/tmp/x", "builtin://bbc", sample={"group_column": "lang"}), "stats") != \
        config_hash(base, "stats")
    assert config_hash(make_config("/tmp/x", "builtin://bbc", sample={"balance": "groups_then_clusters"}), "stats") == \
        config_hash(base, "stats")


def test_doctests():
    assert doctest.testmod(levels).failed == 0


# --- the sample stage in Spark ---------------------------------------------------------------------

PLANTED = ([(k, "wide", 100) for k in range(8)] + [(8, "alpha", 100), (9, "beta", 60)]
           + [(0, "rare", 5), (3, "rare", 5), (9, None, 10)])


@pytest.fixture(scope="module")
def planted(spark):
    """docs, assignments, cluster_stats and cell_stats of a corpus where source ``wide`` spans 8 of the
    10 clusters, ``rare`` hides inside two of them and 10 documents have no domain."""
    from clustermix.stats import cell_stats, cluster_stats

    docs, asg = [], []
    for k, dom, n in PLANTED:
        for i in range(n):
            doc_id = f"{dom}-{k}-{i}"
            docs.append((doc_id, f"text of {doc_id}", dom, 10 + i % 7, None, "en" if i % 2 else "de"))
            asg.append((doc_id, k, 0.5))
    docs_df = spark.createDataFrame(docs, "id string, text string, domain string, n_tokens bigint, quality double, lang string")
    asg_df = spark.createDataFrame(asg, "id string, cluster_id int, score float")
    centroids = spark.createDataFrame([(k,) for k in range(10)], "cluster_id int")
    stats = cluster_stats(docs_df, asg_df, centroids, 0.007, 1).cache()
    cells = cell_stats(docs_df, asg_df, "domain").cache()
    return docs_df, asg_df, stats, cells


def _sample(spark, planted, **sample):
    from clustermix.sample import run_sample

    docs, asg, stats, cells = planted
    scfg = SampleConfig(budget=600, clip=3, **sample)
    out = {}
    info = run_sample(spark, stats, asg, docs, scfg, 0.007, 2, lambda name, df: out.setdefault(name, df), cells)
    rows = out["sample_plan"].join(docs.select("id", "domain"), "id").collect()
    return info, rows


@pytest.mark.parametrize("order", ["stratified", "g2s", "random"])
def test_two_level_sample_lifts_the_rare_sources(spark, planted, order):
    flat_info, flat = _sample(spark, planted, order=order)
    info, rows = _sample(spark, planted, order=order, balance="groups_then_clusters")
    assert len(rows) == 600 and sorted(r["position"] for r in rows) == list(range(600))
    assert max(Counter(r["id"] for r in rows).values()) <= 3
    # every row keeps its document's own cluster
    assert all(r["id"].split("-")[1] == str(r["cluster_id"]) for r in rows)
    by_group = Counter(r["domain"] or NO_DOMAIN for r in rows)
    assert dict(by_group) == info["draws_per_group"] == {"alpha": 180, "beta": 180, "rare": 30, NO_DOMAIN: 30,
                                                          "wide": 180}
    assert info["draws_per_cluster"] == {int(k): v for k, v in Counter(r["cluster_id"] for r in rows).items()}
    flat_by_group = Counter(r["domain"] or NO_DOMAIN for r in flat)
    assert sum(flat_by_group.values()) == 600
    for source in ("alpha", "beta", "rare", NO_DOMAIN):
        assert by_group[source] > flat_by_group[source], source
    assert by_group["wide"] < flat_by_group["wide"]
    # the cells spread draws evenly: inside one cell every document is drawn floor or ceil times
    per_doc = Counter(r["id"] for r in rows)
    for k, dom, n in PLANTED:
        counts = [per_doc.get(f"{dom}-{k}-{i}", 0) for i in range(n)]
        assert max(counts) - min(counts) <= 1
    assert info["balance"] == "groups_then_clusters" and flat_info["balance"] == "clusters"
    assert info["group_shares_after"]["entropy"] > info["group_shares_before"]["entropy"]
    from clustermix.cli import summary_lines

    manifest = {"run_id": "r", "lake_root": "/l", "outcome": "succeeded", "stages": {"sample": {"status": "ran", "seconds": 1.0, "counts": info}}}
    groups = [x for x in summary_lines(manifest) if x.startswith("groups (domain): 5 groups")]
    gb, ga = info["group_shares_before"], info["group_shares_after"]
    assert groups == [f"groups (domain): 5 groups, share gini {gb['gini']} -> {ga['gini']}, smallest share "
                      f"{gb['smallest_share']} -> {ga['smallest_share']}"] and ga["gini"] < gb["gini"]
    flat_manifest = {**manifest, "stages": {"sample": {"status": "ran", "seconds": 1.0, "counts": flat_info}}}
    assert not [x for x in summary_lines(flat_manifest) if x.startswith("groups")]  # cluster mode: no group line


def test_two_level_sample_with_quality_within(spark, planted):
    info, rows = _sample(spark, planted, balance="groups_then_clusters", within="quality")
    assert len(rows) == 600 and info["draws"] == 600


def test_group_column_mismatch_and_missing_column_are_named(spark, planted):
    from clustermix.stats import cell_stats

    docs, asg, _, _ = planted
    with pytest.raises(DataError, match="rerun the stats stage"):
        _sample(spark, planted, balance="groups_then_clusters", group_column="lang")
    with pytest.raises(DataError, match=r"sample\.group_column='source'"):
        cell_stats(docs, asg, "source")
    with pytest.raises(ConfigError, match="every group has weight 0"):
        _sample(spark, planted, balance="groups_then_clusters",
                group_weights={g: 0.0 for g in ("wide", "alpha", "beta", "rare", NO_DOMAIN)})


def test_another_group_column(spark, planted):
    from clustermix.sample import run_sample
    from clustermix.stats import cell_stats

    docs, asg, stats, _ = planted
    cells = cell_stats(docs, asg, "lang")
    scfg = SampleConfig(budget=300, clip=3, balance="groups_then_clusters", group_column="lang")
    out = {}
    info = run_sample(spark, stats, asg, docs, scfg, 0.007, 2, lambda name, df: out.setdefault(name, df), cells)
    assert info["draws_per_group"] == {"de": 150, "en": 150}
    assert out["sample_plan"].count() == 300
