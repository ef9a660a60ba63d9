"""Helpers shared by the benchmarks: timing, peak memory, and a results line format."""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "out"


@contextmanager
def timed(label: str, into: dict[str, float]) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    into[label] = time.perf_counter() - t0
    print(f"  {label:<40} {into[label]:8.2f} s", flush=True)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save(name: str, result: dict[str, Any]) -> Path:
    OUT.mkdir(exist_ok=True)
    result = {"machine": f"{os.cpu_count()} cores", **result}
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"results: {path}")
    return path
