"""Fault-injection points: a process that reaches an armed point stops there until it is killed.

The reliability tests kill real processes (a Ray actor mid-fit, the driver mid-stage) and check
that nothing is lost. Waiting for "enough CPU time" races the clock; instead the code calls
:func:`hold` at a few named points (``kmeans.step``, ``embed.batch``, ``stage.<name>``), and a
test arms one with :func:`arm`. The first process to reach it at or past the armed index writes
its pid and waits; the test kills that pid. Every later arrival (the retry) passes straight on.

Disarmed unless ``CLUSTERMIX_FAULT_DIR`` is set in the process's environment (Ray workers inherit
it from the driver); then each call costs one ``stat``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "CLUSTERMIX_FAULT_DIR"
# a held process that nobody kills goes on after this long, so a broken test cannot hang a run forever
HOLD_LIMIT_S = 600.0


def hold(point: str, index: int = 0) -> None:
    """Stop here if ``point`` is armed for an index <= ``index`` and nobody has stopped here yet."""
    root = os.environ.get(ENV)
    if not root:
        return
    armed = Path(root) / f"{point}.arm"
    try:
        at = int(armed.read_text())
    except (OSError, ValueError):
        return
    if index < at:
        return
    tmp = Path(root) / f"{point}.{os.getpid()}.tmp"
    tmp.write_text(str(os.getpid()))
    try:
        os.link(tmp, Path(root) / f"{point}.held")  # atomic: exactly one process holds a point
    except FileExistsError:
        return  # held once already (this is the retry): go on
    finally:
        tmp.unlink(missing_ok=True)
    deadline = time.monotonic() + HOLD_LIMIT_S
    while armed.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def arm(root: str | Path, point: str, index: int = 0) -> None:
    """Arm ``point`` under ``root``: the first process to reach it at ``index`` or later holds there."""
    Path(root).mkdir(parents=True, exist_ok=True)
    (Path(root) / f"{point}.held").unlink(missing_ok=True)
    (Path(root) / f"{point}.arm").write_text(str(index))


def held_pid(root: str | Path, point: str) -> int | None:
    """The pid of the process holding at ``point``, or None while nobody has reached it."""
    try:
        return int((Path(root) / f"{point}.held").read_text())
    except (OSError, ValueError):
        return None


def disarm(root: str | Path, point: str) -> None:
    """Let any process waiting at ``point`` go on, and later arrivals pass."""
    (Path(root) / f"{point}.arm").unlink(missing_ok=True)
