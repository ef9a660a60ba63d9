"""The type checker runs clean on lib/ (its settings: [tool.mypy] in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT


def test_mypy_finds_no_error_in_lib():
    proc = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary"], cwd=ROOT, capture_output=True,
                          text=True, check=False, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
