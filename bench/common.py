"""Helpers shared by the benchmarks: timing, peak memory (this process, and every process of its tree
by role), and a results line format."""

from __future__ import annotations

import json
import os
import re
import resource
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

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


def role(p: psutil.Process, driver: int) -> str:
    """A stable name for a process of the tree: the driver, Spark's JVM, a Ray actor or worker by its
    title (``ray::KMeansShard``), or Ray's system processes by their executable."""
    if p.pid == driver:
        return "driver"
    try:
        name, cmd = p.name(), p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "?"
    if name == "java" or (cmd and cmd[0].endswith("java")):
        return "spark-jvm"
    title = cmd[0] if cmd else name
    if title.startswith("ray::"):
        # ray::KMeansShard.fit -> ray::KMeansShard; ray::MapWorker(MapBatches(PartWriter)).submit -> without .submit
        return re.sub(r"\.[A-Za-z_]+$", "", title.split()[0])
    return name


class Peaks(threading.Thread):
    """Peak RSS per process role of this process's tree, sampled every ``every`` seconds."""

    def __init__(self, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.every, self.me = every, psutil.Process()
        self.peaks: dict[str, int] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.every)

    def sample(self) -> None:
        try:
            procs = [self.me, *self.me.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                rss = p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            key = role(p, self.me.pid)
            self.peaks[key] = max(self.peaks.get(key, 0), rss)

    def take(self) -> dict[str, float]:
        """The peaks since the last take, in MiB, and start over."""
        self.sample()
        out = {k: round(v / 2**20, 1) for k, v in sorted(self.peaks.items())}
        self.peaks = {}
        return out

    def stop(self) -> None:
        self._halt.set()
