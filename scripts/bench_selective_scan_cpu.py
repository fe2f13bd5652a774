"""Time the selective scan on CPU: the sequential reference against the chunked form.

Forward alone (under no_grad) and forward + backward (gradients of u, delta, A, B, C, D, z and
delta_bias), with Mamba's usual options: D skip, z gate, delta bias and softplus, shared B and C.
Prints a small table of median times and the chunked form's speed-up.

    python scripts/bench_selective_scan_cpu.py                      # B2 D512 L2048 N16, fp32, 2 threads
    python scripts/bench_selective_scan_cpu.py --seqlen 512 --chunk-sizes 32 64 128
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.selective_scan.chunked import DEFAULT_CHUNK_SIZE, selective_scan_chunked  # noqa: E402
from kernels.selective_scan.reference import selective_scan_reference  # noqa: E402


def make_inputs(batch: int, dim: int, seqlen: int, dstate: int, dtype: torch.dtype) -> dict:
    """Inputs shaped like a Mamba layer's at init: dt = softplus(delta + bias) in [1e-3, 1e-1],
    A = -(1..N)."""
    gen = torch.Generator().manual_seed(0)
    dt = torch.exp(torch.rand(dim, generator=gen) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return {
        "u": torch.randn(batch, dim, seqlen, generator=gen, dtype=dtype),
        "delta": 0.1 * torch.randn(batch, dim, seqlen, generator=gen, dtype=dtype),
        "A": -torch.arange(1, dstate + 1, dtype=torch.float32).repeat(dim, 1),
        "B": torch.randn(batch, dstate, seqlen, generator=gen, dtype=dtype),
        "C": torch.randn(batch, dstate, seqlen, generator=gen, dtype=dtype),
        "D": torch.ones(dim),
        "z": torch.randn(batch, dim, seqlen, generator=gen, dtype=dtype),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),
    }


def median_time(fn: Callable[[], None], repeats: int, warmup: int = 2) -> float:
    """Median wall time in seconds of ``repeats`` calls after ``warmup`` calls: the steady state of a
    training loop, where the allocator already holds the memory that the call needs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_fn(scan: Callable, inputs: dict) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            scan(**inputs, delta_softplus=True)
    return run


def forward_backward_fn(scan: Callable, inputs: dict) -> Callable[[], None]:
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}

    def run() -> None:
        for v in leaves.values():
            v.grad = None
        y = scan(**leaves, delta_softplus=True)
        y.backward(torch.ones_like(y))
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--dstate", type=int, default=16)
    parser.add_argument("--dtype", choices=["float32", "float64", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[DEFAULT_CHUNK_SIZE])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of the chunked form (median)")
    parser.add_argument("--reference-repeats", type=int, default=3, help="timed runs of the reference (median)")
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    inputs = make_inputs(args.batch, args.dim, args.seqlen, args.dstate, dtype)
    print(f"selective scan, B={args.batch} D={args.dim} L={args.seqlen} N={args.dstate} {args.dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    # Same answer first: the timings below compare equal work.
    with torch.no_grad():
        y_chunk = selective_scan_chunked(**inputs, delta_softplus=True, chunk_size=args.chunk_sizes[0])
        if not args.skip_reference:
            y_ref = selective_scan_reference(**inputs, delta_softplus=True)
            err = ((y_chunk.double() - y_ref.double()).norm() / y_ref.double().norm()).item()
            print(f"relative error chunked vs reference: {err:.2e}")

    scans = {} if args.skip_reference else {"reference": selective_scan_reference}
    for chunk in args.chunk_sizes:
        scans[f"chunked c={chunk}"] = functools.partial(selective_scan_chunked, chunk_size=chunk)
    forward, both = {}, {}
    for name, scan in scans.items():
        repeats = args.reference_repeats if name == "reference" else args.repeats
        forward[name] = median_time(forward_fn(scan, inputs), repeats, warmup=1 if name == "reference" else 2)
        both[name] = median_time(forward_backward_fn(scan, inputs), repeats, warmup=1 if name == "reference" else 2)

    print(f"{'backend':<18}{'forward ms':>12}{'fwd+bwd ms':>12}{'fwd speed-up':>14}{'f+b speed-up':>14}")
    for name in scans:
        speed_f = f"{forward['reference'] / forward[name]:.1f}x" if "reference" in scans else "-"
        speed_fb = f"{both['reference'] / both[name]:.1f}x" if "reference" in scans else "-"
        print(f"{name:<18}{forward[name] * 1e3:>12.1f}{both[name] * 1e3:>12.1f}{speed_f:>14}{speed_fb:>14}")


if __name__ == "__main__":
    main()
