"""The committed measurements (validation/) still agree with the current planner: the goals
of the profiler issue, checked against every stored run, CPU and GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_accuracy_goals_hold_for_committed_measurements():
    result = subprocess.run([sys.executable, str(ROOT / "validation" / "accuracy_table.py"), "--check"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "| ZeRO-3 |" in result.stdout and "max_memory_allocated: median" in result.stdout
