"""The ClusterClip allocation on hand-checked cases and with property-based tests."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clustermix.clusterclip import allocate, per_doc, water_level


def test_uniform_when_the_clip_does_not_bind():
    a = allocate(np.array([100, 50, 10]), np.ones(3), 30, clip=4)
    assert a.draws.tolist() == [10, 10, 10]
    assert a.shortfall == 0 and not a.clipped.any()


def test_clipped_cluster_hands_its_share_to_the_others():
    # uniform 10 each, but cluster 1 (2 docs, clip 2) stops at 4: the other two share 26
    a = allocate(np.array([100, 2, 10]), np.ones(3), 30, clip=2)
    assert a.draws.tolist() == [13, 4, 13]
    assert a.clipped.tolist() == [False, True, False]
    assert a.lam == pytest.approx(1.3)


def test_cascade_of_clips():
    # caps 2, 6, 1000: uniform share 100 each; both small clusters clip, the large one takes the rest
    a = allocate(np.array([1, 3, 500]), np.ones(3), 300, clip=2)
    assert a.draws.tolist() == [2, 6, 292]


def test_budget_beyond_the_cap_is_capped_and_reported():
    a = allocate(np.array([3, 1]), np.ones(2), 100, clip=2)
    assert a.draws.tolist() == [6, 2]
    assert a.cap == 8 and a.shortfall == 92


def test_remainder_goes_to_largest_fractions_deterministically():
    a = allocate(np.array([10, 10, 10]), np.ones(3), 10, clip=5)
    assert a.draws.tolist() == [4, 3, 3]  # ties go to the lower index
    b = allocate(np.array([10, 10, 10]), np.array([0.5, 0.3, 0.2]), 10, clip=5)
    assert b.draws.tolist() == [5, 3, 2]


def test_zero_target_and_empty_clusters_get_nothing():
    a = allocate(np.array([5, 0, 5]), np.array([1.0, 1.0, 0.0]), 4, clip=3)
    assert a.draws.tolist() == [4, 0, 0]


def test_bad_arguments_are_rejected_with_reasons():
    with pytest.raises(ValueError, match="budget"):
        allocate(np.array([1]), np.ones(1), 0, 1)
    with pytest.raises(ValueError, match="same length"):
        allocate(np.array([1, 2]), np.ones(3), 5, 1)
    with pytest.raises(ValueError, match="positive target"):
        allocate(np.array([0, 0]), np.ones(2), 5, 1)


def test_per_doc_spread():
    assert per_doc(23, 10) == (2, 3)
    assert per_doc(0, 4) == (0, 0)


sizes_st = st.lists(st.integers(min_value=0, max_value=400), min_size=1, max_size=40).filter(lambda s: sum(s) > 0)


@settings(max_examples=300, deadline=None)
@given(sizes=sizes_st, clip=st.integers(1, 6), budget=st.integers(1, 5000), seed=st.integers(0, 2**16))
def test_allocation_properties(sizes, clip, budget, seed):
    n = np.array(sizes)
    rng = np.random.default_rng(seed)
    t = rng.random(len(n)) + 0.01
    a = allocate(n, t, budget, clip)
    caps = clip * n
    assert (a.draws >= 0).all()
    assert (a.draws <= caps).all(), "a cluster exceeds its clip"
    assert a.total == min(budget, int(caps.sum())), "draws must sum to the budget or the cap"
    assert a.shortfall == max(0, budget - int(caps.sum()))
    if budget < caps.sum():
        # water-filling: unclipped clusters sit at λ·t·B within rounding, clipped ones at their cap
        tn = np.where(n > 0, t, 0) / np.where(n > 0, t, 0).sum()
        ideal = np.minimum(a.lam * tn * budget, caps)
        assert np.abs(a.draws - ideal).max() < 1.0 + 1e-6
        assert abs(sum(np.minimum(a.lam * tn * budget, caps)) - budget) < 1e-6 * budget + 1e-6


@settings(max_examples=200, deadline=None)
@given(sizes=sizes_st, clip=st.integers(1, 6), budget=st.integers(1, 5000))
def test_uniform_targets_give_equal_draws_plus_minus_one(sizes, clip, budget):
    n = np.array(sizes)
    a = allocate(n, np.ones(len(n)), budget, clip)
    free = (n > 0) & ~a.clipped
    if free.sum() > 1:
        assert a.draws[free].max() - a.draws[free].min() <= 1
    # no unclipped cluster gets fewer draws than a clipped one could have wanted
    if free.any() and a.clipped.any():
        assert a.draws[free].min() >= a.draws[a.clipped].max() - 1


def test_water_level_matches_a_brute_force_bisection():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = rng.integers(1, 100, size=12).astype(float)
        t = rng.random(12)
        t /= t.sum()
        clip, budget = 2.0, float(rng.integers(10, int(2 * n.sum())))
        lam = water_level(n, t, budget, clip)
        lo, hi = 0.0, 1e6
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if np.minimum(mid * t * budget, clip * n).sum() < budget else (lo, mid)
        assert lam == pytest.approx(lo, rel=1e-6)


def test_draws_histogram_from_the_allocation():
    from clustermix.clusterclip import draws_histogram

    # cluster 0: 10 docs, 23 draws -> 7 docs twice, 3 docs three times; cluster 1: 4 docs, 2 draws
    hist = draws_histogram(np.array([10, 4, 0]), np.array([23, 2, 0]))
    assert hist == {"0": 2, "1": 2, "2": 7, "3": 3}
    assert sum(int(k) * v for k, v in hist.items()) == 25


def _sizes(n_docs: np.ndarray, mean_len: np.ndarray):
    from clustermix.clusterclip import ClusterSizes

    n_docs = np.asarray(n_docs, dtype=np.int64)
    return ClusterSizes(np.arange(len(n_docs), dtype=np.int64), n_docs,
                        np.rint(n_docs * np.asarray(mean_len, dtype=np.float64)).astype(np.int64),
                        np.full(len(n_docs), np.nan), [{} for _ in n_docs])


@settings(max_examples=300, deadline=None)
@given(sizes=sizes_st, clip=st.integers(1, 6), budget=st.integers(1, 20000), seed=st.integers(0, 2**16),
       unit=st.sampled_from(["docs", "tokens"]))
def test_a_searched_mixture_is_realised_as_token_shares_or_scaled_down_whole(sizes, clip, budget, seed, unit):
    """blend.mixture_fit=exact: every cluster's draws are its weight of the blend's tokens at its mean
    length, for the largest blend that fits both the budget and every cluster's clip (an independent
    bisection finds that size); the weights are never moved from one cluster to another."""
    from clustermix.clusterclip import realise_mixture
    from clustermix.config import SampleConfig

    rng = np.random.default_rng(seed)
    n = np.array(sizes)
    sz = _sizes(n, rng.integers(20, 2000, size=len(n)))
    w = rng.random(len(n)) * (rng.random(len(n)) < 0.8)
    live = (sz.n_docs > 0) & (sz.n_tokens > 0)
    if not (w * live).sum():
        with pytest.raises(ValueError, match="no cluster with documents"):
            realise_mixture(sz, w, SampleConfig(budget=budget, clip=clip, unit=unit))
        return
    draws, info = realise_mixture(sz, w, SampleConfig(budget=budget, clip=clip, unit=unit))
    assert (draws >= 0).all() and (draws <= clip * n).all(), "a cluster exceeds its clip"
    assert info["unrealisable_clusters"] == [int(k) for k in np.flatnonzero((w > 0) & ~live)]
    wn = np.where(live, w, 0) / np.where(live, w, 0).sum()
    mean = np.where(live, sz.n_tokens / np.maximum(n, 1), 1.0)
    per_token = wn / mean  # draws of each cluster per token of the blend

    def fits(size: float) -> bool:
        within_budget = (per_token.sum() * size if unit == "docs" else size) <= budget * (1 + 1e-12)
        return within_budget and bool((per_token * size <= clip * n * (1 + 1e-12)).all())

    lo, hi = 0.0, 1e12
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    ideal = per_token * lo
    assert np.abs(draws - ideal).max() < 1.0 + 1e-6, "draws are the weights' token shares, up to rounding"
    assert abs(draws.sum() - ideal.sum()) < 1 + 1e-6
    if unit == "docs":
        assert draws.sum() <= budget
    if info["limited_by_cluster"] is None:
        assert info["scale"] == pytest.approx(1.0)
        if unit == "docs":
            assert draws.sum() == budget
    else:
        k = info["limited_by_cluster"]
        assert info["scale"] < 1 and draws[k] >= clip * n[k] - 1  # the cluster that limits it is at its clip


def test_realised_mixture_keeps_the_searched_shares_where_fill_would_move_them():
    from clustermix.clusterclip import allocate_docs, realise_mixture, total_variation
    from clustermix.config import SampleConfig

    sz = _sizes(np.array([1000, 1000, 50, 1000]), np.array([100, 400, 200, 100]))
    w = np.array([0.4, 0.2, 0.3, 0.1])  # cluster 2 is small: 0.3 of a 3,000-doc blend would need 4+ draws each
    scfg = SampleConfig(budget=3000, clip=4, unit="docs")
    draws, info = realise_mixture(sz, w, scfg)
    tokens = draws * sz.n_tokens / sz.n_docs
    assert total_variation(w, tokens) < 0.002 and info["planned_total_variation"] < 0.002
    assert info["limited_by_cluster"] == 2 and draws[2] == 200 and draws.sum() < 3000
    filled, _ = allocate_docs(sz, w, scfg)  # the old behaviour: the budget is filled, the shares move
    assert filled.sum() == 3000 and total_variation(w, filled * sz.n_tokens / sz.n_docs) > 0.1
    sz_empty = _sizes(np.array([0, 10]), np.array([1, 100]))
    d, i = realise_mixture(sz_empty, np.array([0.5, 0.5]), SampleConfig(budget=10, clip=4, unit="docs"))
    assert i["unrealisable_clusters"] == [0] and d.tolist() == [0, 10]
