"""The CLIMB predictor: a LightGBM regressor from mixture weights to proxy score, and candidate ranking.

Plain NumPy + LightGBM, deterministic (one thread, fixed seed). Scores are losses: lower is
better, so ranking is ascending.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class PredictorSettings:
    """LightGBM settings (from ``search.predictor_*``). ``min_child_samples`` is small because a
    search fits on tens of points; ``reg_lambda`` keeps that from overfitting."""

    n_estimators: int = 200
    learning_rate: float = 0.05
    num_leaves: int = 8
    min_child_samples: int = 2
    reg_lambda: float = 1.0
    seed: int = 0


def fit_predictor(x: np.ndarray, y: np.ndarray, settings: PredictorSettings) -> Any:
    """Fit a LightGBM regressor (a ``lightgbm.Booster``) on mixtures ``x (n, S)`` and scores ``y (n,)``."""
    import lightgbm

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or len(x) != len(y) or len(y) < 2:
        raise ValueError("need at least 2 mixtures, as an (n, S) array with n scores")
    if not np.isfinite(y).all():
        raise ValueError("scores must be finite")
    params = {
        "objective": "regression", "learning_rate": settings.learning_rate, "num_leaves": settings.num_leaves,
        "min_data_in_leaf": settings.min_child_samples, "lambda_l2": settings.reg_lambda, "seed": settings.seed,
        "min_data_in_bin": 1, "num_threads": 1, "deterministic": True, "force_row_wise": True, "verbosity": -1,
    }
    data = lightgbm.Dataset(x, y, params={"min_data_in_bin": 1, "verbosity": -1})
    return lightgbm.train(params, data, num_boost_round=settings.n_estimators)


def predict(model: Any, x: np.ndarray) -> np.ndarray:
    """Predicted scores for mixtures ``x (n, S)``."""
    return np.asarray(model.predict(np.asarray(x, dtype=np.float64)), dtype=np.float64)


def rank(pred: np.ndarray) -> np.ndarray:
    """Indices of candidates, best (lowest predicted loss) first; ties keep candidate order."""
    return np.argsort(np.asarray(pred), kind="stable")


def choose(pred: np.ndarray, n: int, top_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Which candidates get a proxy: the best-ranked one, plus ``n - 1`` drawn at random from the
    best ``top_fraction`` of the ranking (at least ``n``): the predictor prunes, the draw keeps
    some exploration. Returned best-predicted first."""
    order = rank(pred)
    if n <= 0:
        return order[:0]
    if n >= len(order):
        return order
    pool = order[: max(n, math.ceil(top_fraction * len(order)))]
    rest = rng.choice(len(pool) - 1, size=n - 1, replace=False) + 1
    return pool[np.sort(np.concatenate([[0], rest]))]


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rank correlation of two score vectors, tied values sharing their average rank
    (the predictor often gives several candidates the same score); None when undefined: fewer
    than 3 or constant."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b)[0])
