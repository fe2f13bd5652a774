"""CPU timings of the SSD forms: chunked (the default), quadratic and sequential, forward and backward.

    python scripts/bench_ssd_cpu.py [--length 1024] [--chunk-size 64] [--threads 1]

Prints milliseconds a call (median of a few runs) and the chunked form's relative error against the
sequential one. Small on purpose: it answers "which form should the CPU path use", not "how fast is
Mamba-2".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without installing the repo

from kernels.ssd.chunked import ssd_chunked
from kernels.ssd.reference import ssd_quadratic, ssd_reference


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--headdim", type=int, default=64)
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--dstate", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    b, L, H, P, G, N = args.batch, args.length, args.heads, args.headdim, args.groups, args.dstate
    x = torch.randn(b, L, H, P, requires_grad=True)
    dt = torch.randn(b, L, H, requires_grad=True)
    A = -torch.rand(H).add(0.5).requires_grad_(True)
    B = torch.randn(b, L, G, N, requires_grad=True)
    C = torch.randn(b, L, G, N, requires_grad=True)
    D = torch.ones(H, requires_grad=True)
    dt_bias = torch.zeros(H, requires_grad=True)
    kwargs = dict(D=D, dt_bias=dt_bias, dt_softplus=True)
    print(f"B={b} L={L} H={H} P={P} G={G} N={N} chunk={args.chunk_size} threads={args.threads}")

    forms = {"chunked": ssd_chunked, "quadratic": ssd_quadratic, "sequential": ssd_reference}
    outputs = {}
    for name, form in forms.items():
        def forward():
            with torch.no_grad():
                return form(x, dt, A, B, C, args.chunk_size, **kwargs)

        def forward_backward():
            form(x, dt, A, B, C, args.chunk_size, **kwargs).square().sum().backward()

        outputs[name] = forward()
        fwd = timed(forward, args.repeats)
        bwd = timed(forward_backward, args.repeats)
        print(f"{name:>10}: forward {fwd:9.1f} ms   forward+backward {bwd:9.1f} ms")
    err = (outputs["chunked"] - outputs["sequential"]).norm() / outputs["sequential"].norm()
    print(f"chunked vs sequential relative error (float32): {err.item():.2e}")


if __name__ == "__main__":
    main()
