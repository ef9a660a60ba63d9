"""Drift of a refresh's new documents from the existing clustering, and the refit decision.

All figures come from K-long vectors (per-cluster counts and score sums), so the driver's work is
O(K) however many documents arrived:

- ``score_drop``: mean cosine of the documents already clustered minus that of the new ones (the
  new ones sit further from their nearest centroid);
- ``share_shift``: total variation distance between the cluster shares before and after adding
  the new documents (half the sum of absolute changes; 0 = same mix, 1 = disjoint);
- ``new_vs_old_shares``: the same distance between the new documents' shares and the old ones
  (how different tonight's arrivals are, whatever their number);
- ``far_fraction``: share of new documents whose best cosine to any centroid is below
  ``refresh.far_score`` (a topic the clustering has no place for).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clustermix.config import RefreshConfig


@dataclass
class Decision:
    """Whether to refit k-means, why, and the figures behind it."""

    refit: bool
    reasons: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"decision": "refit" if self.refit else "keep", "reasons": self.reasons, **self.figures}


def measure(old_n: np.ndarray, old_score_sum: np.ndarray, new_n: np.ndarray, new_score_sum: np.ndarray,
            new_far: np.ndarray) -> dict[str, Any]:
    """Drift figures from per-cluster counts and score sums of the old and the new documents."""
    old_n, new_n = np.asarray(old_n, dtype=np.float64), np.asarray(new_n, dtype=np.float64)
    n_old, n_new = float(old_n.sum()), float(new_n.sum())
    before = old_n / max(n_old, 1.0)
    after = (old_n + new_n) / max(n_old + n_new, 1.0)
    arrivals = new_n / max(n_new, 1.0)
    old_mean = float(np.sum(old_score_sum)) / n_old if n_old else None
    new_mean = float(np.sum(new_score_sum)) / n_new if n_new else None
    delta = after - before
    top = int(np.argmax(np.abs(delta))) if len(delta) else 0
    return {
        "old_docs": int(n_old), "new_docs": int(n_new),
        "old_mean_score": _r(old_mean), "new_mean_score": _r(new_mean),
        "score_drop": _r(old_mean - new_mean) if old_mean is not None and new_mean is not None else None,
        "share_shift": _r(0.5 * float(np.abs(delta).sum())),
        "new_vs_old_shares": _r(0.5 * float(np.abs(arrivals - before).sum())) if n_new else None,
        "far_fraction": _r(float(np.sum(new_far)) / n_new) if n_new else None,
        "largest_share_change": {"cluster_id": top, "before": _r(float(before[top])), "after": _r(float(after[top]))}
        if len(delta) else None,
    }


def decide(figures: dict[str, Any], cfg: RefreshConfig, *, forced: bool = False,
           config_changed: bool = False) -> Decision:
    """Refit when asked, when the clustering config changed, or when a figure passes its threshold
    (only with at least ``refresh.min_new_docs`` new documents: fewer make noisy figures)."""
    reasons = []
    if forced:
        reasons.append("asked (--recluster)")
    if config_changed:
        reasons.append("the cluster config or embedding model differs from the one the centroids were fitted with")
    if figures.get("new_docs", 0) >= cfg.min_new_docs:
        checks = (("score_drop", cfg.max_score_drop), ("share_shift", cfg.max_share_shift),
                  ("far_fraction", cfg.max_far_fraction))
        for name, limit in checks:
            value = figures.get(name)
            if value is not None and value > limit:
                reasons.append(f"{name} {value:.4f} > {limit}")
    return Decision(bool(reasons), reasons, figures)


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 6)
