"""GPU correctness checks and benchmarks, one module per op (``scripts/gpu_checks/<op>.py``).

Each module exposes
    run_checks() -> list[dict]   rows: name, shape, dtype, err_fwd, err_bwd (max relative errors,
                                 ||a - b|| / ||b||; None where not applicable), pass (bool), note (opt.)
    run_bench()  -> list[dict]   rows: kernel, shape, ours_fwd_ms, ours_fwdbwd_ms, mamba_ssm_fwd_ms,
                                 mamba_ssm_fwdbwd_ms (None when mamba_ssm / causal_conv1d is not
                                 importable), bytes_fwd, bytes_fwdbwd (the fewest bytes the pass must
                                 move), from which the drivers derive ratios and GB/s.
``scripts/gpu_check.py`` and ``scripts/bench_kernels.py`` import every module here and print one table.
The helpers below are shared by the modules (imports: torch and triton only).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator

import torch


def rel(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """||a - b|| / ||b|| in float64; NaN/Inf anywhere gives inf (a check must never pass on NaN)."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else math.inf
    a, b = a.double(), b.double()
    if not bool(torch.isfinite(a).all()):
        return math.inf
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def max_rel(pairs) -> float:
    """The largest relative error over (ours, reference) pairs."""
    return max((rel(a, b) for a, b in pairs), default=0.0)


def bench_ms(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median milliseconds of ``fn`` (CUDA events through triton.testing.do_bench)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def time_ms(fn: Callable[[], object], smoke: bool = False) -> float:
    """:func:`bench_ms`; under ``smoke`` (a CPU run through the Triton interpreter) one timed call, whose
    number means nothing but runs the same code path."""
    if not smoke:
        return bench_ms(fn)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def graph_ms(fn: Callable[[], object], smoke: bool = False) -> float | None:
    """Median milliseconds of ``fn`` replayed from a CUDA graph: device time without the host's launch
    overhead, a large share of a sub-millisecond kernel call. None under ``smoke`` and where the capture
    fails (a benchmark column, not a check: some calls cannot be captured)."""
    if smoke:
        return None
    import triton.testing

    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))
    except Exception:  # noqa: BLE001  (capture refused: the column stays empty)
        return None


@contextlib.contextmanager
def compile_only_launches() -> Iterator[None]:
    """Inside, every Triton kernel launch only compiles (same shapes, dtypes and options as the real call,
    so the same specializations), in a pool of threads: running the real calls once inside compiles every
    kernel a check or benchmark will launch, in parallel, instead of one after another on first use."""
    from concurrent.futures import ThreadPoolExecutor

    from triton.runtime._async_compile import AsyncCompileMode
    from triton.runtime.jit import JITFunction

    original = JITFunction.__getitem__

    def warmup_only(self, grid):
        return lambda *args, **kwargs: self.run(*args, grid=grid, warmup=True, **kwargs)

    JITFunction.__getitem__ = warmup_only
    try:
        with AsyncCompileMode(ThreadPoolExecutor(max(2, min(16, os.cpu_count() or 2)))):
            yield
    finally:
        JITFunction.__getitem__ = original
    torch.cuda.synchronize()


def copy_bandwidth_gbps(device: torch.device | str = "cuda", nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + bytes written per second, in GB/s): the ceiling
    the memory-bound kernels are measured against."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def fwd_bwd(fn: Callable[[], object], inputs: list[torch.Tensor], grads) -> Callable[[], object]:
    """A closure running forward then backward (torch.autograd.grad, so nothing accumulates)."""

    def run():
        out = fn()
        outs = out if isinstance(out, (tuple, list)) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
        return torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs])

    return run


def check_row(name: str, shape, dtype, err_fwd: float | None, err_bwd: float | None, tol_fwd: float,
              tol_bwd: float | None = None, note: str = "") -> dict:
    """A check row; passes when every given error is finite and within its tolerance."""
    tol_bwd = tol_fwd if tol_bwd is None else tol_bwd
    ok = all(e is None or (math.isfinite(e) and e <= t) for e, t in ((err_fwd, tol_fwd), (err_bwd, tol_bwd)))
    return {"name": name, "shape": str(tuple(shape)) if not isinstance(shape, str) else shape,
            "dtype": str(dtype).replace("torch.", ""), "err_fwd": err_fwd, "err_bwd": err_bwd,
            "pass": bool(ok), "note": note}
