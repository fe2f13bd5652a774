"""Experiment: the fused Mamba-1 block step at batch 64 with re-tuned tl.dot tiles, against the op-by-op step.

For each TILES["large"] override: 16 teacher-forced steps against the op-by-op step (logits rel. err and
greedy agreement), then the replayed step time.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels.mamba_decode.triton as mdt  # noqa: E402
from scripts.gpu_checks import rel  # noqa: E402
from scripts.gpu_checks import mamba_decode as gm  # noqa: E402

BASE = {"BK1": 128, "warps1": 4, "stages1": 5, "BN": 16, "BB3": 64, "BK3": 128, "warps3": 4, "stages3": 5}
PROFILE = [{**BASE, "BC": 16, "xsplit": 8}, {**BASE, "BC": 16, "xsplit": 8, "BB2": 32, "BD": 16}]
BEST = {**BASE, "BC": 16, "xsplit": 8, "pdl": True}
SETTINGS = [
    BEST,
    {**BEST, "BB2": 32, "BD": 16},
    {**BEST, "BB2": 8, "BD": 32},
    {**BEST, "BB1": 32},
    {**BEST, "warps1": 8},
]


def kernel_profile(label: str, runner) -> None:
    """Per kernel name: launches and microseconds per replayed step (no PDL: each kernel's own time)."""
    graph, replays = runner.runner.graph, 20
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    rows = [(e.key, e.count / replays, getattr(e, "self_device_time_total", 0) / e.count)
            for e in prof.key_averages() if str(getattr(e, "device_type", "")).endswith("CUDA") and e.count > 0]
    rows.sort(key=lambda r: -r[1] * r[2])
    print(f"## {label}: busy {sum(n * us for _, n, us in rows):.1f} us a step")
    for name, n, us in rows[:12]:
        print(f"  {n:5.0f} x {us:6.2f} us  {name[:90]}")


def main() -> None:
    batch, steps = 64, 16
    model = gm.build_model()
    plain = gm._runner(model, batch, 16 + steps + 2, False)
    logits = gm._prefill(model, plain, batch)
    tokens = []
    for _ in range(steps):
        tokens.append(logits.argmax(-1))
        logits = plain.step(tokens[-1]).clone()
    gm._prefill(model, plain, batch)
    want = [plain.step(t).clone() for t in tokens]
    print(f"op-by-op step: {gm._time_replays(plain):.4f} ms", flush=True)
    kernel_profile("op by op", plain)
    del plain
    default = dict(mdt.TILES)
    for override in PROFILE:
        mdt.TILES = {**default, "large": {**default["large"], **override}}
        try:
            fused = gm._runner(model, batch, 16 + steps + 2, True, pdl=False)
            gm._prefill(model, fused, batch)
            print(f"{gm._time_replays(fused):.4f} ms {override}")
            kernel_profile(f"fused {override}", fused)
            del fused
        finally:
            mdt.TILES = default
    for override in SETTINGS:
        mdt.TILES = {**default, "large": {**default["large"], **override}}
        try:
            fused = gm._runner(model, batch, 16 + steps + 2, True)
            gm._prefill(model, fused, batch)
            got = [fused.step(t).clone() for t in tokens]
            err = max(rel(a, b) for a, b in zip(got, want))
            agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(got, want))
            ms = gm._time_replays(fused)
            del fused
            print(f"{ms:.4f} ms  err {err:.1e} argmax {agree}/{batch * steps}  {override}", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"FAILED {override}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        finally:
            mdt.TILES = default


if __name__ == "__main__":
    main()
