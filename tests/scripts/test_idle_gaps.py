"""scripts/idle_gaps.py on a hand-made trace: busy / idle time, each gap blamed on the innermost host op
around the launch of the kernel that ended it, synchronizing calls listed."""

from __future__ import annotations

import pytest

from scripts.idle_gaps import idle_gaps, idle_report


def _x(cat, name, ts, dur, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "args": args}


TRACE = {"traceEvents": [
    _x("cpu_op", "aten::linear", 0, 30),
    _x("cpu_op", "aten::mm", 5, 20),                        # innermost around the first launch
    _x("cuda_runtime", "cudaLaunchKernel", 10, 3, correlation=1),
    _x("cpu_op", "ssm_suite::selective_scan_fwd", 40, 100),
    _x("cuda_runtime", "cuLaunchKernelEx", 120, 3, correlation=2),
    _x("cuda_runtime", "cudaStreamSynchronize", 130, 50),
    _x("cpu_op", "autograd::engine::evaluate_function: X", 200, 50, tid=2),
    _x("cuda_runtime", "cudaLaunchKernel", 210, 3, tid=2, correlation=3),
    _x("kernel", "gemm", 20, 40, correlation=1),           # busy 20..60
    _x("kernel", "scan", 125, 50, correlation=2),          # gap 65 us, then busy 125..175
    _x("kernel", "overlap", 150, 10, correlation=99),      # inside the scan: no gap, no extra busy
    _x("kernel", "bwd", 215, 5, correlation=3),            # gap 40 us, busy 215..220
    _x("kernel", "tiny_gap", 222, 3, correlation=98),      # gap 2 us < min_gap_us: not counted as a gap
]}


def test_gaps_are_blamed_on_the_launching_op():
    result = idle_gaps(TRACE, min_gap_us=5)
    assert result["span_us"] == 225 - 20
    assert result["busy_us"] == 40 + 50 + 5 + 3
    assert result["idle_us"] == result["span_us"] - result["busy_us"]
    assert result["gaps"] == {"ssm_suite::selective_scan_fwd": (1, 65),
                              "autograd::engine::evaluate_function: X": (1, 40)}
    assert result["syncs"] == {"cudaStreamSynchronize": (1, 50)}
    report = idle_report(TRACE)
    assert "| ssm_suite::selective_scan_fwd | 1 | 0.065 |" in report
    assert "cudaStreamSynchronize" in report


def test_a_trace_without_kernels_is_refused():
    with pytest.raises(ValueError, match="no GPU kernel events"):
        idle_gaps({"traceEvents": [_x("cpu_op", "aten::mm", 0, 5)]})
