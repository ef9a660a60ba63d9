"""The fault-injection points the reliability tests use: a held process waits, a retry passes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from clustermix import faults

from .conftest import ROOT

HOLD = "from clustermix import faults; faults.hold('unit.point', int(__import__('sys').argv[1])); print('passed')"


def _start(root, index: int) -> subprocess.Popen:
    env = {**os.environ, faults.ENV: str(root), "PYTHONPATH": str(ROOT / "lib")}
    return subprocess.Popen([sys.executable, "-c", HOLD, str(index)], env=env, stdout=subprocess.PIPE, text=True)


def test_the_first_process_at_an_armed_point_holds_and_later_ones_pass(tmp_path):
    faults.arm(tmp_path, "unit.point", 3)
    early = _start(tmp_path, 2)  # before the armed index: passes
    assert early.wait(60) == 0 and early.stdout.read().strip() == "passed"
    assert faults.held_pid(tmp_path, "unit.point") is None
    first = _start(tmp_path, 3)
    while faults.held_pid(tmp_path, "unit.point") is None:
        assert first.poll() is None, "the first arrival went on instead of holding"
        time.sleep(0.05)
    assert faults.held_pid(tmp_path, "unit.point") == first.pid
    retry = _start(tmp_path, 7)  # a later arrival (the retry of the killed one) is not held
    assert retry.wait(60) == 0 and retry.stdout.read().strip() == "passed"
    assert first.poll() is None  # still holding: only a kill or a disarm ends the wait
    faults.disarm(tmp_path, "unit.point")
    assert first.wait(60) == 0 and first.stdout.read().strip() == "passed"


def test_points_are_inert_without_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.arm(tmp_path, "unit.point", 0)
    faults.hold("unit.point", 5)  # returns at once: nothing points the process at tmp_path
    assert faults.held_pid(tmp_path, "unit.point") is None
