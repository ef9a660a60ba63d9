"""The mixture search space: a size-biased Dirichlet prior with a cap per dimension, and super-clusters.

Plain NumPy. A *mixture* is a weight vector over the search dimensions (clusters, or super-clusters
when close clusters are merged) that sums to 1. Each dimension's weight is capped by the
repetition bound, as ClusterClip's clip: a proxy trained on ``T`` tokens may take at most
``clip · capacity_s`` tokens from dimension ``s``, so ``w_s <= min(1, clip · capacity_s / T)``.
Samples are projected onto that capped simplex by the sample stage's water-filling
(:func:`clustermix.clusterclip.water_levels`): find ``λ`` with ``Σ_s min(λ·x_s, cap_s) = 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clustermix.clusterclip import water_levels
from clustermix.errors import DataError


def cap_project(x: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (non-negative, any scale) -> ``min(λ·x, caps)`` summing to 1, per row.

    Water-filling, vectorised over rows: dimensions that hit their cap hand the rest of their
    share to the others in proportion to ``x``. Needs ``Σ caps >= 1`` over each row's support.

    >>> cap_project(np.array([[0.8, 0.1, 0.1]]), np.array([0.5, 1.0, 1.0])).round(3).tolist()
    [[0.5, 0.25, 0.25]]
    """
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    caps = np.broadcast_to(np.asarray(caps, dtype=np.float64), x.shape)
    if (x < 0).any() or (caps < 0).any():
        raise ValueError("weights and caps must be non-negative")
    support_cap = np.where(x > 0, caps, 0.0).sum(axis=1)
    if (support_cap < 1 - 1e-12).any():
        raise ValueError("the caps over a row's support sum to less than 1: no capped mixture exists")
    lam_row = water_levels(x, caps)
    w = np.minimum(lam_row[:, None] * x, caps)
    return w / w.sum(axis=1, keepdims=True)


def dirichlet_mixtures(rng: np.random.Generator, prior: np.ndarray, strength: float, caps: np.ndarray,
                       n: int) -> np.ndarray:
    """``n`` mixtures from Dirichlet(strength · S · prior), projected onto the capped simplex.

    ``prior`` is the Dirichlet's mean (size-biased); ``strength`` scales its total concentration
    (1 with a uniform prior is the flat Dirichlet; smaller gives sparser mixtures). Dimensions
    with a zero prior get weight 0. A tiny share of the prior is mixed in so every sample has the
    prior's support, which keeps the cap projection feasible.
    """
    prior = np.asarray(prior, dtype=np.float64)
    if prior.ndim != 1 or (prior < 0).any() or prior.sum() <= 0:
        raise ValueError("prior must be a non-negative 1-d array with a positive sum")
    if strength <= 0 or n < 0:
        raise ValueError("strength must be > 0 and n >= 0")
    prior = prior / prior.sum()
    live = prior > 0
    alpha = strength * len(prior) * prior[live]
    x: np.ndarray = np.zeros((n, len(prior)))
    if n:
        x[:, live] = rng.dirichlet(alpha, size=n)
        x = np.nan_to_num(x)  # a degenerate draw (all alphas tiny) becomes the prior below
    x = (1 - 1e-6) * x + 1e-6 * prior
    return cap_project(x, caps) if n else x


@dataclass(frozen=True)
class SearchSpace:
    """Clusters, the search dimensions they map to, and each dimension's prior mean and cap."""

    cluster_ids: np.ndarray  # (K,) int
    capacity: np.ndarray  # (K,) tokens a proxy may draw from each cluster's sample, before repeats
    group: np.ndarray  # (K,) the search dimension of each cluster; -1 for clusters with no data
    prior: np.ndarray  # (S,) Dirichlet mean, biased by size
    caps: np.ndarray  # (S,) the most weight a dimension may get (repetition bound)
    cluster_caps: np.ndarray  # (K,) the same bound per cluster

    @property
    def dims(self) -> int:
        return len(self.prior)

    def to_clusters(self, w: np.ndarray) -> np.ndarray:
        """Mixtures over dimensions ``(n, S)`` -> over clusters ``(n, K)``: a dimension's weight is
        shared by its clusters in proportion to their capacity (so each stays within its bound)."""
        w = np.atleast_2d(w)
        tot = np.bincount(self.group[self.group >= 0], self.capacity[self.group >= 0], minlength=self.dims)
        share = np.where(self.group >= 0, self.capacity / np.where(self.group >= 0, tot[self.group], 1.0), 0.0)
        return np.where(self.group >= 0, w[:, np.maximum(self.group, 0)] * share, 0.0)

    def to_dims(self, wk: np.ndarray) -> np.ndarray:
        """Mixtures over clusters ``(n, K)`` -> over dimensions ``(n, S)`` (sums per dimension)."""
        onehot = np.zeros((len(self.group), self.dims))
        live = self.group >= 0
        onehot[np.flatnonzero(live), self.group[live]] = 1.0
        return np.atleast_2d(wk) @ onehot

    def sample(self, rng: np.random.Generator, strength: float, n: int) -> np.ndarray:
        """``n`` prior mixtures over dimensions (see :func:`dirichlet_mixtures`)."""
        return dirichlet_mixtures(rng, self.prior, strength, self.caps, n)

    def uniform(self) -> np.ndarray:
        """The ClusterClip mixture over clusters: equal shares for clusters with data, capped."""
        x = (self.capacity > 0).astype(np.float64)[None, :]
        return cap_project(x, self.cluster_caps)[0]


def build_space(cluster_ids: np.ndarray, tokens: np.ndarray, budget: int, clip: int,
                pool_tokens: int | None = None, size_power: float = 1.0,
                groups: np.ndarray | None = None) -> SearchSpace:
    """The search space for clusters with ``tokens`` trainable tokens each and a proxy budget.

    ``capacity_k = min(tokens_k, pool_tokens)`` (the pre-drawn sample holds at most
    ``pool_tokens`` per cluster); the cap of a dimension is ``min(1, clip · Σ capacity / budget)``;
    the prior mean is ``(Σ tokens)^size_power``, normalised. ``groups`` maps clusters to
    super-clusters (default: one dimension per cluster).
    """
    cluster_ids = np.asarray(cluster_ids, dtype=np.int64)
    tokens = np.asarray(tokens, dtype=np.float64)
    if budget <= 0 or clip < 1:
        raise ValueError("budget must be > 0 and clip >= 1")
    capacity = np.minimum(tokens, pool_tokens) if pool_tokens else tokens.copy()
    raw = np.arange(len(tokens)) if groups is None else np.asarray(groups, dtype=np.int64)
    raw = np.where(capacity > 0, raw, -1)
    live = np.unique(raw[raw >= 0])
    group = np.where(raw >= 0, np.searchsorted(live, raw), -1)
    dim_tokens = np.bincount(group[group >= 0], tokens[group >= 0], minlength=len(live))
    dim_cap = np.bincount(group[group >= 0], capacity[group >= 0], minlength=len(live))
    if clip * dim_cap.sum() < budget:
        raise DataError(f"search: the proxy budget of {budget} tokens exceeds what the clip allows "
                        f"({clip} x {int(dim_cap.sum())} trainable tokens); lower search.proxy_tokens")
    prior = dim_tokens**size_power
    return SearchSpace(cluster_ids, capacity, group, prior / prior.sum(), np.minimum(1.0, clip * dim_cap / budget),
                       np.minimum(1.0, clip * capacity / budget))


def merge_clusters(centroids: np.ndarray, sizes: np.ndarray, threshold: float | None = None,
                   n_groups: int | None = None) -> np.ndarray:
    """Super-cluster labels ``(K,)``: agglomerate clusters whose centroids are close.

    Centroid linkage on cosine similarity: repeatedly merge the most similar pair (their centroid
    becomes the size-weighted mean, renormalised) while that similarity is at least ``threshold``,
    or until ``n_groups`` remain. Deterministic; labels are numbered by their smallest cluster.

    >>> merge_clusters(np.array([[1, 0], [0.99, 0.14], [0, 1]]), np.ones(3), threshold=0.9).tolist()
    [0, 0, 1]
    """
    if (threshold is None) == (n_groups is None):
        raise ValueError("give exactly one of threshold and n_groups")
    c = np.asarray(centroids, dtype=np.float64)
    c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    size = np.asarray(sizes, dtype=np.float64).copy()
    k = len(c)
    label = np.arange(k)
    alive = np.ones(k, dtype=bool)
    sim = c @ c.T
    np.fill_diagonal(sim, -np.inf)
    while alive.sum() > 1:
        if n_groups is not None and alive.sum() <= n_groups:
            break
        i, j = sorted(np.unravel_index(int(np.argmax(sim)), sim.shape))
        if threshold is not None and sim[i, j] < threshold:
            break
        merged = max(size[i], 1e-12) * c[i] + max(size[j], 1e-12) * c[j]
        c[i] = merged / max(np.linalg.norm(merged), 1e-12)
        size[i] += size[j]
        label[label == j] = i  # a group is named by its smallest cluster
        alive[j] = False
        row = np.where(alive, c @ c[i], -np.inf)
        row[i] = -np.inf
        sim[j, :] = sim[:, j] = -np.inf
        sim[i, :] = sim[:, i] = row
    return np.searchsorted(np.unique(label), label)
