"""scripts/bench_training.py's code path on CPU (--device cpu, tiny presets): every variant is timed in
every round, Mamba-2 presets once per SSD design in the same process, and the environment is restored."""

from __future__ import annotations

import os

import pytest

from scripts import bench_training


def test_rounds_and_ssd_designs_on_cpu(capsys, monkeypatch):
    monkeypatch.delenv("SSM_SUITE_SSD_TRITON", raising=False)
    calls = []
    real = bench_training.time_steps

    def recording_time_steps(model, *args):
        calls.append((type(model).__name__, os.environ.get("SSM_SUITE_SSD_TRITON")))
        return real(model, *args)

    monkeypatch.setattr(bench_training, "time_steps", recording_time_steps)
    bench_training.main(["--device", "cpu", "--presets", "mamba2-tiny", "mamba1-tiny", "--batch", "1",
                         "--seq-len", "32", "--steps", "1", "--warmup", "0", "--rounds", "2",
                         "--ssd-designs", "first,fused"])
    out = capsys.readouterr().out
    # mamba2-tiny: first, fused, first, fused (interleaved rounds); mamba1-tiny has no SSD: one variant.
    assert [d for _, d in calls[:4]] == ["first", "fused", "first", "fused"]
    assert [d for _, d in calls[4:]] == [None, None]
    assert "SSM_SUITE_SSD_TRITON" not in os.environ
    rows = [line for line in out.splitlines() if line.startswith("| mamba")]
    assert [row.split("|")[2].strip() for row in rows] == ["ours (first SSD)", "ours (fused SSD)", "ours"]
    for row in rows:
        median = float(row.split("|")[3].replace(",", ""))
        low, high = (float(v.replace(",", "")) for v in row.split("|")[4].split("-"))
        assert 0 < low <= median <= high


def test_compiled_variant_on_cpu(capsys):
    bench_training.main(["--device", "cpu", "--presets", "mamba1-tiny", "--batch", "1", "--seq-len", "16",
                         "--steps", "1", "--warmup", "1", "--compile", "--compile-backend", "aot_eager"])
    rows = [line.split("|")[2].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("| mamba")]
    assert rows == ["ours", "ours, compiled"]


def test_profile_needs_cuda():
    with pytest.raises(SystemExit):
        bench_training.main(["--device", "cpu", "--presets", "mamba2-tiny", "--profile"])
