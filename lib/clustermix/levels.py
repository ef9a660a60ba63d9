"""ClusterClip over a two-level tree: water-fill the budget across groups (a source column such as
``domain``), then across the clusters inside each group. Cells in, cells out: only the (cluster,
group) cells with documents ever reach the driver.

Balancing clusters alone can leave sources less balanced: a topically diverse source spans many
clusters, so equal shares per cluster hand it more of the mix. Here group ``g`` first gets
``B_g = min(λ·t_g·B, c·n_g)`` (``n_g`` its documents, the integers summing to ``B`` exactly, as
:func:`clustermix.clusterclip.allocate` rounds them), then its clusters share ``B_g`` uniformly under
their own caps ``c·n_gk``. Since ``B_g <= c·n_g = Σ_k c·n_gk``, the second level never falls short:
the sum is exact at both levels and no cell passes its clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from clustermix.clusterclip import Allocation, allocate, to_doc_draws
from clustermix.errors import DataError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

    from clustermix.config import SampleConfig


@dataclass(frozen=True)
class CellSizes:
    """The (cluster, group) cells of ``cell_stats`` with documents, sorted by (cluster, group).

    ``cell`` numbers them 0..C-1 in that order: the key the per-document plan ranks within."""

    cluster_id: np.ndarray  # int64 per cell
    group: list[str]  # group value per cell
    n_docs: np.ndarray
    n_tokens: np.ndarray

    @classmethod
    def from_stats(cls, cell_stats: DataFrame, group_column: str) -> CellSizes:
        """The cells of ``cell_stats`` (C rows to the driver), which must group by ``group_column``."""
        rows = cell_stats.where("n_docs > 0").select("cluster_id", "group_column", "group", "n_docs",
                                                    "n_tokens").collect()
        other = {r["group_column"] for r in rows} - {group_column}
        if other:
            # the stats grouped by another column: its cells would not match the documents' groups
            raise DataError(f"cell_stats groups by {sorted(other)}, not sample.group_column={group_column!r}: "
                            "rerun the stats stage")
        return cls.of([(int(r["cluster_id"]), str(r["group"]), int(r["n_docs"]), int(r["n_tokens"] or 0))
                       for r in rows])

    @classmethod
    def of(cls, rows: list[tuple[int, str, int, int]]) -> CellSizes:
        """From (cluster_id, group, n_docs, n_tokens) tuples in any order (C rows on the driver)."""
        rows = sorted(rows)
        return cls(np.array([r[0] for r in rows], dtype=np.int64), [r[1] for r in rows],
                   np.array([r[2] for r in rows], dtype=np.int64), np.array([r[3] for r in rows], dtype=np.int64))

    @property
    def cell(self) -> np.ndarray:
        return np.arange(len(self.group), dtype=np.int64)

    @property
    def groups(self) -> list[str]:
        """The group names, sorted: the order of every per-group array."""
        return sorted(set(self.group))

    @property
    def group_index(self) -> np.ndarray:
        index = {g: i for i, g in enumerate(self.groups)}
        return np.array([index[g] for g in self.group], dtype=np.int64)

    def per_group(self, values: np.ndarray) -> np.ndarray:
        """Sum a per-cell array per group."""
        return np.bincount(self.group_index, weights=values, minlength=len(self.groups)).astype(np.int64)

    def per_cluster(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cluster ids, sums of a per-cell array per cluster)."""
        ids, inverse = np.unique(self.cluster_id, return_inverse=True)
        return ids, np.bincount(inverse, weights=values, minlength=len(ids)).astype(np.int64)


def group_targets(groups: list[str], weights: dict[str, float]) -> np.ndarray:
    """Target share per group: uniform, or ``weights[g]`` where configured (1 for a group not named,
    so a source that appears later is balanced like the others instead of silently dropped)."""
    return np.array([float(weights.get(g, 1.0)) for g in groups], dtype=np.float64)


def allocate_two_level(cell_group: np.ndarray, sizes: np.ndarray, targets: np.ndarray, budget: int,
                       clip: int) -> tuple[Allocation, np.ndarray]:
    """Integer draws per cell: the groups' allocation (level 1), and per cell the ClusterClip
    allocation of its group's allotment over the group's cells (level 2).

    ``cell_group``: the group index (into ``targets``) of every cell; ``sizes``: per cell.

    >>> top, cells = allocate_two_level(np.array([0, 0, 0, 1]), np.array([40, 40, 40, 5]), np.ones(2), 40, 2)
    >>> top.draws.tolist(), cells.tolist()
    ([30, 10], [10, 10, 10, 10])
    """
    cell_group = np.asarray(cell_group, dtype=np.int64)
    sizes = np.asarray(sizes, dtype=np.int64)
    if cell_group.shape != sizes.shape or sizes.ndim != 1:
        raise ValueError("cell_group and sizes must be 1-d arrays of the same length")
    if len(sizes) and (cell_group.min() < 0 or cell_group.max() >= len(targets)):
        raise ValueError("every cell's group must index targets")
    group_sizes = np.bincount(cell_group, weights=sizes, minlength=len(targets)).astype(np.int64)
    top = allocate(group_sizes, np.asarray(targets, dtype=np.float64), budget, clip)
    draws = np.zeros(len(sizes), dtype=np.int64)
    # cells grouped by group with one stable sort: O(C log C), not a pass over the cells per group
    order = np.argsort(cell_group, kind="stable")
    bounds = np.searchsorted(cell_group[order], np.arange(len(targets) + 1))
    for g, b_g in enumerate(top.draws.tolist()):
        if b_g > 0:
            idx = order[bounds[g]:bounds[g + 1]]
            draws[idx] = allocate(sizes[idx], np.ones(len(idx)), int(b_g), clip).draws
    return top, draws


def allocate_cells(cells: CellSizes, targets: np.ndarray, scfg: SampleConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Draws per cell (in documents) for group ``targets``, the budget counted in ``scfg.unit``."""
    sizes = cells.n_docs if scfg.unit == "docs" else cells.n_tokens
    top, alloc = allocate_two_level(cells.group_index, sizes, targets, scfg.budget, scfg.clip)
    draws = to_doc_draws(alloc, cells.n_docs, cells.n_tokens, scfg.unit, scfg.clip)
    info = {
        "unit": scfg.unit, "budget": scfg.budget, "clip": scfg.clip, "cap": top.cap, "allocated": int(alloc.sum()),
        "shortfall": top.shortfall, "lambda": None if np.isinf(top.lam) else top.lam,
        "groups_at_clip": int(top.clipped.sum()), "cells": len(cells.group),
        "cells_at_clip": int(((draws >= scfg.clip * cells.n_docs) & (cells.n_docs > 0)).sum()),
        "draws": int(draws.sum()),
    }
    return draws, info
