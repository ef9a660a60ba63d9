"""The evaluation's hold-out: documents no plan may draw, decided by a pure function of the id.

A document is held out when the first 16 hex digits of ``sha256("clustermix-holdout:<seed>:" + id)``
are below ``fraction · 16^16``. Spark computes the same digits with built-in functions (``sha2``,
no Python UDF: :func:`clustermix.kept.held_out`) as Python does here, so stats, sample and blend (Spark), the search's pools (Ray
Data) and ``evaluate`` agree on the set without a table join, and a document keeps its verdict
across runs and refreshes. ``None`` (``evaluate.enabled`` off) holds nothing out.

>>> Holdout(0.25, 27).threshold
'4000000000000000'
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

    import numpy as np

    from clustermix.config import Config

DIGITS = 16  # hex digits compared: 64 bits


@dataclass(frozen=True)
class Holdout:
    fraction: float
    seed: int

    @property
    def prefix(self) -> str:
        return f"clustermix-holdout:{self.seed}:"

    @property
    def threshold(self) -> str:
        """The hex key below which a document is held out (fixed width, so strings order as numbers)."""
        t = int(self.fraction * 16**DIGITS)
        return "g" * DIGITS if t >= 16**DIGITS else f"{t:0{DIGITS}x}"

    def key(self, doc_id: str) -> str:
        return hashlib.sha256((self.prefix + doc_id).encode("utf-8")).hexdigest()[:DIGITS]

    def is_held(self, doc_id: str) -> bool:
        return self.key(doc_id) < self.threshold

    def mask(self, ids: Iterable[str | None]) -> np.ndarray:
        """Held out or not, per id (a null id is never held out)."""
        import numpy as np

        t = self.threshold
        return np.array([i is not None and self.key(i) < t for i in ids], dtype=bool)


def of(cfg: Config) -> Holdout | None:
    """The hold-out of this config: none unless ``evaluate.enabled``."""
    e = cfg.evaluate
    return Holdout(e.holdout_fraction, e.holdout_seed) if e.enabled else None


# the config keys that decide the hold-out: in the fingerprint of every stage whose output it changes
FINGERPRINT = ("evaluate.enabled", "evaluate.holdout_fraction", "evaluate.holdout_seed")
