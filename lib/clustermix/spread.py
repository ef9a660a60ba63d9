"""Seed spreads and verdicts for ``clustermix evaluate``: plain Python, no engine.

Each mix is trained once per seed; a figure (macro or worst held-out loss) is then a list of values,
one per seed. Its summary is the mean and the spread (min to max across seeds). A mix is ``better``
than a baseline only when its worst seed beats the baseline's best seed (lower loss), ``worse`` in
the mirror case, and ``no difference`` whenever the two seed ranges overlap: a difference inside
the seed spread is not reported as one.

>>> verdict([1.0, 1.1], [1.2, 1.3])
'better'
>>> verdict([1.0, 1.25], [1.2, 1.3])
'no difference'
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

METRICS = ("macro_source", "worst_source", "macro_cluster", "worst_cluster", "all")


def summary(values: Sequence[float]) -> dict[str, float]:
    """Mean, min, max, spread (max - min) and sample standard deviation of one figure across seeds."""
    if not values:
        raise ValueError("no values")
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "min": min(values), "max": max(values), "spread": max(values) - min(values), "std": std,
            "seeds": n}


def verdict(mix: Sequence[float], baseline: Sequence[float]) -> str:
    """``better`` (lower loss than the baseline on every pair of seeds), ``worse``, or ``no difference``
    (the seed ranges overlap)."""
    if not mix or not baseline:
        raise ValueError("no values")
    if max(mix) < min(baseline):
        return "better"
    if min(mix) > max(baseline):
        return "worse"
    return "no difference"


def group_figures(rows: Iterable[dict[str, Any]]) -> dict[str, float]:
    """One proxy's per-group rows (``group_kind``, ``group``, ``loss_bits_per_byte``) -> its figures:
    macro (mean over groups) and worst (max over groups) per kind, and the pooled ``all``."""
    by: dict[str, list[float]] = {}
    out: dict[str, float] = {}
    for r in rows:
        if r["group_kind"] == "all":
            out["all"] = float(r["loss_bits_per_byte"])
        elif r["group_kind"] in ("source", "cluster"):
            by.setdefault(r["group_kind"], []).append(float(r["loss_bits_per_byte"]))
    for kind, vals in by.items():
        out[f"macro_{kind}"] = sum(vals) / len(vals)
        out[f"worst_{kind}"] = max(vals)
    return out


def compare(rows: Iterable[dict[str, Any]], mix: str = "blended") -> dict[str, Any]:
    """Rows of the ``evaluations`` table (per mix, seed and group) -> per mix and metric the summary
    across seeds, and per baseline and metric the verdict of ``mix`` against it."""
    per: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for r in rows:
        if r["group_kind"] in ("source", "cluster", "all"):
            per.setdefault(r["mix"], {}).setdefault(int(r["seed"]), []).append(r)
    figures: dict[str, dict[str, list[float]]] = {}
    for m, seeds in per.items():
        for s in sorted(seeds):
            for metric, v in group_figures(seeds[s]).items():
                figures.setdefault(m, {}).setdefault(metric, []).append(v)
    summaries = {m: {k: summary(v) for k, v in f.items()} for m, f in figures.items()}
    verdicts: dict[str, dict[str, str]] = {}
    if mix in figures:
        for base, f in figures.items():
            if base != mix:
                verdicts[base] = {k: verdict(figures[mix][k], v) for k, v in f.items() if k in figures[mix]}
    return {"mix": mix, "summaries": summaries, "verdicts": verdicts}
