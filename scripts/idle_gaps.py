"""Where the GPU waits: idle gaps between kernels in a torch.profiler trace, blamed on the host op that
launched the kernel after each gap.

A training step of a 130M model can take longer than the sum of its kernels (docs/benchmarks.md: ~143 ms
against ~111 ms of kernels for mamba1-130m) when the GPU runs out of queued work: the host is slower than
the GPU somewhere, or something synchronizes (a host read of a device value, a copy from pageable host
memory). This reads the Chrome trace that ``torch.profiler`` exports (events of category ``kernel``,
``cuda_runtime`` / ``cuda_driver`` and ``cpu_op``), merges the kernel intervals of all streams, and for
every gap of at least ``min_gap_us`` finds the kernel that ended it, the runtime call that launched it
(same ``correlation``) and the innermost CPU op around that call on its thread. The report sums the idle
time by that op, lists the synchronizing runtime calls, and gives the step's busy / idle split.

    from scripts.idle_gaps import idle_report
    print(idle_report(json.load(open("trace.json"))))

``scripts/bench_training.py --idle`` profiles one optimizer step of each variant and prints this.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from typing import Any

SYNC_CALLS = ("Synchronize", "cudaMemcpy", "cudaStreamWaitEvent", "cudaEventSynchronize")


def _events(trace: dict[str, Any], *categories: str) -> list[dict]:
    return [e for e in trace.get("traceEvents", [])
            if e.get("ph") == "X" and e.get("cat") in categories and "dur" in e]


def idle_gaps(trace: dict[str, Any], min_gap_us: float = 5.0) -> dict[str, Any]:
    """The analysis as data: busy / idle microseconds, gaps blamed by host op, synchronizing calls."""
    kernels = sorted(_events(trace, "kernel", "gpu_memcpy", "gpu_memset"), key=lambda e: e["ts"])
    if not kernels:
        raise ValueError("the trace has no GPU kernel events: profile with ProfilerActivity.CUDA on a GPU")
    runtime = _events(trace, "cuda_runtime", "cuda_driver")
    launches = {e["args"]["correlation"]: e for e in runtime if "correlation" in e.get("args", {})}
    ops_by_thread: dict[Any, list[dict]] = defaultdict(list)
    for op in _events(trace, "cpu_op"):
        ops_by_thread[op["tid"]].append(op)
    starts_by_thread = {}
    for tid, ops in ops_by_thread.items():
        ops.sort(key=lambda e: e["ts"])
        starts_by_thread[tid] = [op["ts"] for op in ops]

    def innermost_op(call: dict) -> str:
        ops, starts = ops_by_thread.get(call["tid"], []), starts_by_thread.get(call["tid"], [])
        # Ops that start before the call, scanned backwards (at most 400): the latest that still contains
        # it is the innermost, since ops nest on one thread.
        last = bisect.bisect_right(starts, call["ts"]) - 1
        for op in (ops[i] for i in range(last, max(-1, last - 400), -1)):
            if op["ts"] + op["dur"] >= call["ts"]:
                return op["name"]
        return "(no enclosing op)"

    busy = 0.0
    idle_by_op: dict[str, list[float]] = defaultdict(list)
    end = kernels[0]["ts"]
    span_start = kernels[0]["ts"]
    for kernel in kernels:
        gap = kernel["ts"] - end
        if gap >= min_gap_us:
            call = launches.get(kernel.get("args", {}).get("correlation"))
            blame = innermost_op(call) if call is not None else "(launch not in trace)"
            idle_by_op[blame].append(gap)
        if kernel["ts"] + kernel["dur"] > end:
            busy += kernel["ts"] + kernel["dur"] - max(end, kernel["ts"])
            end = kernel["ts"] + kernel["dur"]
    span = end - span_start
    syncs: dict[str, list[float]] = defaultdict(list)
    for call in runtime:
        if any(key in call["name"] for key in SYNC_CALLS):
            syncs[call["name"]].append(call["dur"])
    return {"span_us": span, "busy_us": busy, "idle_us": span - busy,
            "gaps": {op: (len(g), sum(g)) for op, g in idle_by_op.items()},
            "syncs": {name: (len(d), sum(d)) for name, d in syncs.items()}}


def idle_report(trace: dict[str, Any], min_gap_us: float = 5.0, top: int = 15) -> str:
    """A markdown report of :func:`idle_gaps`."""
    result = idle_gaps(trace, min_gap_us)
    span, busy, idle = result["span_us"], result["busy_us"], result["idle_us"]
    lines = [f"first kernel to last: {span / 1e3:.2f} ms; GPU busy {busy / 1e3:.2f} ms, idle {idle / 1e3:.2f} ms "
             f"({100 * idle / max(span, 1e-9):.0f} %)", "",
             f"| host op that launched the kernel after a gap >= {min_gap_us:g} us | gaps | idle (ms) |",
             "|---|---|---|"]
    for op, (count, total) in sorted(result["gaps"].items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"| {op} | {count} | {total / 1e3:.3f} |")
    if result["syncs"]:
        lines += ["", "| synchronizing / copy runtime call | calls | host time (ms) |", "|---|---|---|"]
        for name, (count, total) in sorted(result["syncs"].items(), key=lambda kv: -kv[1][1]):
            lines.append(f"| {name} | {count} | {total / 1e3:.3f} |")
    return "\n".join(lines)
