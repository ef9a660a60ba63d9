"""Measure the README's main command: wall time and peak memory of the whole process tree
(the Python driver, Spark's JVM, Ray's processes and workers), sampled every 0.2 s.

    .venv/bin/python bench/run_local.py -- .venv/bin/clustermix run --set lake.root=/tmp/lake-bench
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def main() -> None:
    cmd = sys.argv[sys.argv.index("--") + 1 :] if "--" in sys.argv else [".venv/bin/clustermix", "run"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, tree_rss(ps))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    print(f"command: {' '.join(cmd)}\nexit code {proc.returncode}, wall {wall:.1f} s, "
          f"peak memory of the process tree {peak / 2**30:.2f} GiB")
    save("run_local", {"command": cmd, "exit_code": proc.returncode, "wall_s": wall, "peak_tree_rss_gib": peak / 2**30})
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
