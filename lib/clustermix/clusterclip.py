"""ClusterClip allocation: the closed form of the expected outcome, K numbers in and K out.

Given cluster sizes ``n_k``, target shares ``t_k``, a budget ``B`` and a clip ``c``, find ``λ`` with
``Σ_k min(λ·t_k·B, c·n_k) = B`` (water-filling: clusters that hit their clip hand the rest of
their share to the others) and round to integers that sum to exactly ``B`` (or to the cap
``c·Σ n_k`` when the budget exceeds it; the shortfall is reported, never hidden).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Allocation:
    """Draws per cluster and how they were reached."""

    draws: np.ndarray  # int64, one per cluster
    lam: float  # the water level λ (inf when every cluster is at its clip)
    budget: int
    cap: int  # the most draws the clip allows over clusters with a positive target
    shortfall: int  # budget - sum(draws), > 0 only when the budget exceeds the cap
    clipped: np.ndarray  # bool, clusters at their clip

    @property
    def total(self) -> int:
        return int(self.draws.sum())


def water_level(sizes: np.ndarray, targets: np.ndarray, budget: float, clip: float) -> float:
    """The λ with Σ min(λ·t·B, c·n) = B, for a budget below the cap (exact, O(K log K))."""
    t = targets * budget
    caps = clip * sizes
    pos = t > 0
    ratios = np.sort(caps[pos] / t[pos])  # λ at which each cluster reaches its clip
    t_sorted = t[pos][np.argsort(caps[pos] / t[pos])]
    caps_sorted = caps[pos][np.argsort(caps[pos] / t[pos])]
    # With clusters 0..i-1 clipped: Σcaps[:i] + λ·Σt[i:] = B
    cum_caps = np.concatenate([[0.0], np.cumsum(caps_sorted)])
    rest_t = np.concatenate([np.cumsum(t_sorted[::-1])[::-1], [0.0]])
    for i in range(len(ratios)):
        lam = (budget - cum_caps[i]) / rest_t[i]
        if lam <= ratios[i]:
            return float(lam)
    return float("inf")


def allocate(sizes: np.ndarray, targets: np.ndarray, budget: int, clip: int) -> Allocation:
    """Integer draws per cluster by ClusterClip water-filling (see module docstring).

    >>> allocate(np.array([100, 2, 10]), np.ones(3) / 3, 30, 2).draws.tolist()
    [13, 4, 13]
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.float64)
    if sizes.shape != targets.shape or sizes.ndim != 1:
        raise ValueError("sizes and targets must be 1-d arrays of the same length")
    if (sizes < 0).any() or (targets < 0).any() or not np.isfinite(targets).all():
        raise ValueError("sizes and targets must be non-negative and finite")
    if budget <= 0 or clip < 1:
        raise ValueError("budget must be > 0 and clip >= 1")
    targets = np.where(sizes > 0, targets, 0.0)
    if targets.sum() <= 0:
        raise ValueError("no cluster with documents has a positive target share")
    targets = targets / targets.sum()
    caps = clip * sizes * (targets > 0)
    cap = int(caps.sum())
    if budget >= cap:
        return Allocation(caps.astype(np.int64), float("inf"), budget, cap, budget - cap, caps > 0)
    lam = water_level(sizes.astype(np.float64), targets, float(budget), float(clip))
    real = np.minimum(lam * targets * budget, caps)
    draws = np.floor(real + 1e-9).astype(np.int64)
    draws = np.minimum(draws, caps)
    rest = budget - int(draws.sum())
    if rest > 0:
        # largest remainders first; ties go to the lower cluster index, so the result is stable
        room = draws < caps
        frac = np.where(room, real - draws, -np.inf)
        order = np.lexsort((np.arange(len(frac)), -frac))
        draws[order[:rest]] += 1
    return Allocation(draws, lam, budget, cap, 0, draws >= caps)


def per_doc(draws: int, size: int) -> tuple[int, int]:
    """How ``draws`` spread over ``size`` documents: (base draws each, documents with one more)."""
    if size <= 0:
        return 0, 0
    return draws // size, draws % size
