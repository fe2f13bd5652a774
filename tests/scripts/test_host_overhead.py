"""scripts/host_overhead.py on CPU: the model's Triton path runs with every launch stubbed and counted.
A subprocess, because the script forces TRITON_INTERPRET and the triton backend for its whole process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_phases_report_time_and_launches():
    result = subprocess.run(
        [sys.executable, "scripts/host_overhead.py", "--preset", "mamba1-tiny", "--d-model", "32",
         "--seq-len", "8", "--repeats", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = {line.split("|")[1].strip(): line.split("|")[2:5] for line in result.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| phase")}
    assert set(rows) == {"train", "forward", "prefill"}
    launches = {phase: int(cells[2]) for phase, cells in rows.items()}
    # The backward launches kernels of its own; a prefill also writes the cache (final states).
    assert 0 < launches["forward"] < launches["train"]
    assert launches["forward"] <= launches["prefill"]
    assert all(float(cells[0]) > 0 for cells in rows.values())
