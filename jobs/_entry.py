"""Shared glue for the job entry points: run one stage (or all) through the ``clustermix`` CLI."""

from __future__ import annotations

import sys
from pathlib import Path

# jobs/ is submitted as a working directory (ray job submit --working-dir, spark-submit --py-files):
# make the library importable from a checkout even when the package is not installed.
_LIB = Path(__file__).resolve().parents[1] / "lib"
if _LIB.is_dir() and str(_LIB) not in sys.path:
    sys.path.insert(0, str(_LIB))


def main(command: str) -> None:
    from clustermix.cli import main as cli_main

    sys.exit(cli_main([command, *sys.argv[1:]]))
