"""GPU checks and benchmarks of SSD's Triton backend, both designs: ``first`` (kernels/ssd/triton.py,
the default) and ``fused`` (kernels/ssd/triton_fused.py, opt-in until this module's checks pass for it
on a GPU; then it can become the default).

``run_checks()``: each design's forward and backward at real shapes against the chunked PyTorch form run
in float64 on the GPU (itself tested against the sequential reference on CPU): y, the final state and
every gradient (x, dt, A, B, C, D, z, dt_bias, initial_state), with packed sequences (an empty one
included), initial/final states, fp32 / bf16 / fp16, the limit sizes (P=128, N=256), L=1, the Mamba-2
layer's call (no z), the long-L benchmark shape at an odd length, bit-identical gradients on re-run, an
input past 2^31 elements (64-bit offsets, forward and backward), and the one-token step.

``run_bench()``: forward and forward+backward of each design against mamba_ssm's
``mamba_chunk_scan_combined`` (when importable) at the target shapes, with the fewest bytes each pass
must move. ``run_sweep()`` times the launch settings of the fused design (module attributes of
triton_fused.py) one at a time, each checked against the default settings' outputs and gradients at the
same inputs. ``profile()`` prints the per-kernel times.

Run directly on the GPU machine (kernels compiled in parallel up front, mamba_ssm's autotuned ones too):
    PYTHONPATH=.:/tmp/site python3 scripts/gpu_checks/ssd.py [--sweep] [--profile] [--budget SECONDS]
and on a CPU through the Triton interpreter at tiny shapes (the same code paths, before a GPU call):
    PYTHONPATH=. python3 scripts/gpu_checks/ssd.py --cpu-smoke

``--bisect`` finds which launch of the fused design faults (a CUDA fault is reported at some later call):
one check case (``--bisect-case``, default the "layer call, z" check) run in one process per variant of
``BISECT_VARIANTS`` (each changes one suspect), every launch synchronized before and after, with
CUDA_LAUNCH_BLOCKING=1; ``--sanitize`` runs them under compute-sanitizer's memcheck (use a small
``--bisect-shape``). With ``--cpu-smoke`` the children run under the interpreter's bounds checker
(tests/kernels/triton_bounds.py), and a plain ``--cpu-smoke`` run tries two variants.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[2])  # the repository root
    if "--cpu-smoke" in sys.argv:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

from kernels.ssd import triton as sst  # noqa: E402
from kernels.ssd import triton_fused as ssf  # noqa: E402
from kernels.ssd.chunked import ssd_chunked  # noqa: E402
from kernels.ssd.reference import ssd_step_reference  # noqa: E402
from scripts.gpu_checks import bench_ms, nbytes, rel  # noqa: E402

DEV = "cuda"
SMOKE = False  # --cpu-smoke: CPU tensors, tiny shapes, the interpreter
NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")
DESIGNS = {"fused": ssf.ssd_triton_fused, "first": sst.ssd_triton}

# (batch, L, H, P, G, N): the real shapes and the --cpu-smoke stand-ins (same code paths). Every
# distinct dtype / option set / divisibility of the sizes is one more compilation of six kernels (seconds
# each on a cold machine), so the checks share the benchmark's where they can.
SHAPES = {
    "fp32_groups": ((2, 1000, 8, 64, 2, 128), (2, 40, 4, 16, 2, 32)),
    "limits": ((1, 4097, 4, 128, 4, 256), (1, 33, 4, 32, 4, 64)),
    "l1": ((2, 1, 4, 64, 1, 64), (2, 1, 2, 16, 1, 16)),
    "varlen": ((1, 2560, 24, 64, 1, 128), (1, 60, 4, 16, 1, 16)),
    "layer": ((8, 2048, 24, 64, 1, 128), (2, 48, 4, 16, 1, 16)),
    "long": ((2, 16384, 32, 64, 1, 128), (1, 80, 4, 16, 1, 16)),
    "long_odd": ((2, 16383, 32, 64, 1, 128), (1, 77, 4, 16, 1, 16)),
    "large": ((5, 262144, 32, 64, 1, 64), (3, 40, 2, 16, 1, 16)),
}
VARLEN_CU = ([0, 100, 100, 1100, 1101, 2047, 2560], [0, 7, 7, 30, 31, 45, 60])  # an empty sequence too
BENCH = [("mamba2 130m shape, z", "layer", True), ("long L, z", "long", True),
         ("Mamba-2 layer call (no z)", "layer", False)]


def _shape(key: str) -> tuple:
    return SHAPES[key][1 if SMOKE else 0]


def _inputs(batch, L, H, P, G, N, dtype, states=None, init=True, D_per_dim=False, z=True, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=DEV) * scale).to(dtype)

    return dict(
        x=randn(batch, L, H, P), dt=randn(batch, L, H) - 2.0,  # dt ~ softplus(N(-2, 1)): Mamba-2-like steps
        A=-(torch.rand(H, generator=gen, device=DEV) * 15 + 1),
        B=randn(batch, L, G, N), C=randn(batch, L, G, N),
        D=randn(H, P) if D_per_dim else randn(H).float(), z=randn(batch, L, H, P) if z else None,
        dt_bias=randn(H, scale=0.5).float(),
        initial_state=randn(batch if states is None else states, H, P, N).float() if init else None,
    )


def _call(fn, i, chunk=256, **kw):
    return fn(i["x"], i["dt"], i["A"], i["B"], i["C"], chunk, D=i["D"], z=i["z"], dt_bias=i["dt_bias"],
              dt_softplus=True, initial_state=i["initial_state"], return_final_state=True, **kw)


def _fwd_bwd(fn, i, names, gy, gf, **kw):
    y, f = _call(fn, i, **kw)
    grads = torch.autograd.grad((y * gy.to(y.dtype)).sum() + (f * gf.to(f.dtype)).sum(), [i[k] for k in names])
    return y, f, grads


# ----------------------------------------------------------------------------------------------------
# Checks


def _check_scan(design, name, key, dtype, cu=None, states=None, D_per_dim=False, z=True, init=True, tol=None):
    batch, L, H, P, G, N = _shape(key)
    i = _inputs(batch, L, H, P, G, N, dtype, states=states, D_per_dim=D_per_dim, z=z, init=init)
    names = [k for k in NAMES if i[k] is not None]
    for k in names:
        i[k].requires_grad_(True)
    ref = {k: None if i[k] is None else i[k].detach().double().requires_grad_(True) for k in NAMES}
    y_ref, f_ref = _call(ssd_chunked, ref, chunk=64, cu_seqlens=cu)
    gy, gf = torch.randn_like(y_ref), torch.randn_like(f_ref)
    grads_ref = torch.autograd.grad((y_ref * gy).sum() + (f_ref * gf).sum(), [ref[k] for k in names])
    y, f, grads = _fwd_bwd(DESIGNS[design], i, names, gy, gf, cu_seqlens=cu)
    _, _, grads2 = _fwd_bwd(DESIGNS[design], i, names, gy, gf, cu_seqlens=cu)
    err_fwd = max(rel(y, y_ref), rel(f, f_ref))
    bwd = {k: rel(g, r) for k, g, r in zip(names, grads, grads_ref)}
    worst = max(bwd, key=bwd.get)
    deterministic = all(torch.equal(a, b) for a, b in zip(grads, grads2))
    tol = tol or (5e-3 if dtype == torch.float32 else 2e-2)  # float32: tf32 matrix products
    if SMOKE:
        tol = 1e-4 if dtype == torch.float32 else tol
    ok = err_fwd <= tol and bwd[worst] <= tol and deterministic  # rel() is inf on NaN/Inf
    shape = str(_shape(key)) + (f" cu={cu.tolist()}" if cu is not None else "")
    return dict(name=f"[{design}] {name}", shape=shape,
                dtype=str(dtype).replace("torch.", ""), err_fwd=err_fwd, err_bwd=bwd[worst], **{"pass": ok},
                note=f"worst grad {worst}; " + ("bit-identical re-run" if deterministic else "NOT DETERMINISTIC"))


def _check_large_offsets(design: str):
    """x with more than 2^31 elements (forward and backward): the last row must equal that row run alone
    (whose offsets are small). z, D and dt_bias left out to keep the memory near 30 GB."""
    batch, L, H, P, G, N = _shape("large")
    i = _inputs(batch, L, H, P, G, N, torch.bfloat16, init=False, z=False, seed=1)
    i.update(D=None, dt_bias=None)
    names = ["x", "dt", "B", "C"]
    for k in names:
        i[k].requires_grad_(True)
    gy = torch.randn(1, L, H, P, device=DEV, dtype=torch.bfloat16)
    y, f = _call(DESIGNS[design], i)
    dx, ddt, dB, dC = torch.autograd.grad(y[-1:], [i[k] for k in names], gy)
    last = {k: None if v is None or k not in names else v[-1:].detach().clone().requires_grad_(True)
            for k, v in i.items()}
    last["A"] = i["A"]
    y1, f1 = _call(DESIGNS[design], last)
    grads1 = torch.autograd.grad(y1, [last[k] for k in names], gy)
    err_fwd = max(rel(y[-1:], y1), rel(f[-1:], f1))
    err_bwd = max(rel(g[-1:], g1) for g, g1 in zip((dx, ddt, dB, dC), grads1))
    del i, y, f, dx, ddt, dB, dC
    if DEV == "cuda":
        torch.cuda.empty_cache()
    # The forward runs the same arithmetic for the row either way; the backward's dB/dC partial sums
    # may split the heads differently at another batch size (rounding-level differences).
    return dict(name=f"[{design}] 64-bit offsets (last row vs alone)", shape=str((batch, L, H, P, G, N)),
                dtype="bfloat16", err_fwd=err_fwd, err_bwd=err_bwd, **{"pass": err_fwd <= 1e-6 and err_bwd <= 1e-2},
                note=f"x has {batch * L * H * P:.2e} elements")


def _check_step():
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        batch, H, P, G, N = (16, 32, 64, 2, 128) if not SMOKE else (2, 4, 16, 2, 16)
        x, z = (torch.randn(batch, H, P, device=DEV).to(dtype) for _ in range(2))
        dt = torch.randn(batch, H, device=DEV).to(dtype)
        B, C = (torch.randn(batch, G, N, device=DEV).to(dtype) for _ in range(2))
        A, D, bias = -torch.rand(H, device=DEV) * 8, torch.randn(H, device=DEV), torch.randn(H, device=DEV)
        state = torch.randn(batch, H, P, N, device=DEV)
        state_ref = state.double()
        y = sst.ssd_step_triton(state, x, dt, A, B, C, D, z, bias, True)
        y_ref = ssd_step_reference(state_ref, x.double(), dt.double(), A.double(), B.double(), C.double(),
                                   D.double(), z.double(), bias.double(), True)
        err = max(rel(y, y_ref), rel(state, state_ref))
        rows.append(dict(name="ssd_step", shape=str((batch, H, P, G, N)), dtype=str(dtype).replace("torch.", ""),
                         err_fwd=err, err_bwd=None, **{"pass": err <= (1e-4 if dtype == torch.float32 else 1e-2)},
                         note=""))
    rows.append(_check_step_views())
    return rows


def _check_step_views() -> dict:
    """ssd_step on row-strided views of one wide projection, as Mamba2's op-by-op step calls it
    (mamba2-130m's shape at batch 64): bit-identical to the same values made contiguous, and close to
    the float64 reference."""
    batch, H, P, G, N = (64, 24, 64, 1, 128) if not SMOKE else (3, 4, 16, 2, 16)
    widths = [H * P, H, G * N, G * N, H * P]
    wide = torch.randn(batch, sum(widths) + 7, device=DEV).to(torch.bfloat16)
    x, dt, B, C, z = wide[:, 7:].split(widths, dim=-1)
    x, z, B, C = x.view(batch, H, P), z.view(batch, H, P), B.view(batch, G, N), C.view(batch, G, N)
    A, D, bias = -torch.rand(H, device=DEV) * 8, torch.randn(H, device=DEV), torch.randn(H, device=DEV)
    state = torch.randn(batch, H, P, N, device=DEV)
    s_view, s_copy, s_ref = state.clone(), state.clone(), state.double()
    y_view = sst.ssd_step_triton(s_view, x, dt, A, B, C, D, z, bias, True)
    y_copy = sst.ssd_step_triton(s_copy, x.contiguous(), dt.contiguous(), A, B.contiguous(), C.contiguous(), D,
                                 z.contiguous(), bias, True)
    y_ref = ssd_step_reference(s_ref, x.double(), dt.double(), A.double(), B.double(), C.double(), D.double(),
                               z.double(), bias.double(), True)
    same = torch.equal(y_view, y_copy) and torch.equal(s_view, s_copy)
    err = max(rel(y_view, y_ref), rel(s_view, s_ref))
    return dict(name="ssd_step on row-strided views", shape=str((batch, H, P, G, N)), dtype="bfloat16",
                err_fwd=err, err_bwd=None, **{"pass": err <= 1e-2 and same},
                note=f"bit-identical to contiguous inputs: {same}")


def _check_cases(gpu_short: bool = False):
    """(name, shape key, dtype, options). ``gpu_short``: the set for a short GPU lease (L = 1 and the
    odd-length / group cases it drops stay covered by the CPU tests)."""
    cu = torch.tensor(VARLEN_CU[1 if SMOKE else 0], device=DEV)
    cases = [
        ("layer call, z", "layer", torch.bfloat16, {"init": False}),
        ("layer call (no z)", "layer", torch.bfloat16, {"z": False, "init": False}),
        ("long L, odd length, initial states", "long_odd", torch.bfloat16, {}),
        ("varlen (an empty sequence), initial states", "varlen", torch.bfloat16, {"cu": cu, "states": cu.numel() - 1}),
        ("D [H, P], 2 groups", "fp32_groups", torch.float32, {"D_per_dim": True}),
        ("limit sizes", "limits", torch.float16, {}),
    ]
    if not gpu_short:
        cases.append(("L = 1", "l1", torch.float32, {}))
    return cases


def run_checks(large: bool = True, gpu_short: bool = False, on_row=None, designs: tuple[str, ...] = ("fused", "first"),
               large_designs: tuple[str, ...] = ("fused",)) -> list[dict]:
    """The check rows; ``on_row(row)`` is called as each one completes (a cut-off run still reports).
    The >2^31-element check (about 30 GB) runs for ``large_designs`` (the first design passed it on an
    H100 before the second existed)."""
    rows = []

    def add(row):
        rows.append(row)
        if on_row is not None:
            on_row(row)

    for design in designs:
        for name, key, dtype, kw in _check_cases(gpu_short):
            add(_check_scan(design, name, key, dtype, **kw))
    for row in _check_step():
        add(row)
    if large and (SMOKE or torch.cuda.get_device_properties(0).total_memory > 60e9):
        for design in large_designs:
            add(_check_large_offsets(design))
    return rows


# ----------------------------------------------------------------------------------------------------
# Benchmarks


def _time(fn) -> float:
    if SMOKE:  # one call: the number means nothing, the code path is what is tested
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return bench_ms(fn)


def _mamba_scan():
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError:
        return None
    return mamba_chunk_scan_combined


def _bench_inputs(key, z):
    batch, L, H, P, G, N = _shape(key)
    i = _inputs(batch, L, H, P, G, N, torch.bfloat16, init=False, z=z)
    names = [k for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias") if i[k] is not None]
    for k in names:
        i[k].requires_grad_(True)
    return i, names, torch.randn(batch, L, H, P, device=DEV, dtype=torch.bfloat16)


def _timings(fn, i, names, gy) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of fn, bf16, chunk_size 256."""
    def fwd():
        return fn(i["x"], i["dt"], i["A"], i["B"], i["C"], 256, D=i["D"], z=i["z"], dt_bias=i["dt_bias"],
                  dt_softplus=True)

    def fwd_bwd():
        return torch.autograd.grad(fwd(), [i[k] for k in names], gy)

    with torch.no_grad():
        f = _time(fwd)
    return f, _time(fwd_bwd)


def run_bench(designs: tuple[str, ...] = ("fused", "first"), mamba: bool = True) -> list[dict]:
    """One row per design and shape (``ours_*`` that design's times); mamba_ssm's times, measured once a
    shape, repeated in each of its rows. With ``designs=()``: mamba_ssm alone."""
    rows = []
    theirs = _mamba_scan() if mamba else None
    for label, key, z in BENCH:
        i, names, gy = _bench_inputs(key, z)
        # The fewest bytes: x, z, dt, B, C read and y written (fwd); then dy, x, z, dt, B, C read again
        # and dx, dz, ddt, dB, dC written (bwd).
        inputs = nbytes(i["x"], i["z"], i["dt"], i["B"], i["C"])
        common = dict(shape=str(_shape(key)), bytes_fwd=inputs + nbytes(i["x"]),
                      bytes_fwdbwd=3 * inputs + 2 * nbytes(i["x"]), mamba_ssm_fwd_ms=None, mamba_ssm_fwdbwd_ms=None)
        if theirs is not None:
            common["mamba_ssm_fwd_ms"], common["mamba_ssm_fwdbwd_ms"] = _timings(theirs, i, names, gy)
        for design in designs or (None,):
            row = dict(kernel=f"ssd[{design or 'mamba_ssm'}] {label}", **common)
            if design is not None:
                f, fb = _timings(DESIGNS[design], i, names, gy)
                row.update(ours_fwd_ms=f, ours_fwdbwd_ms=fb, fwd_GBps=row["bytes_fwd"] / f / 1e6,
                           fwdbwd_GBps=row["bytes_fwdbwd"] / fb / 1e6)
                if row["mamba_ssm_fwd_ms"]:
                    row.update(ratio_fwd=f / row["mamba_ssm_fwd_ms"], ratio_fwdbwd=fb / row["mamba_ssm_fwdbwd_ms"])
                    with torch.no_grad():
                        row["rel_vs_mamba_ssm"] = rel(
                            _call(DESIGNS[design], {**i, "initial_state": None})[0],
                            theirs(i["x"], i["dt"], i["A"], i["B"], i["C"], 256, D=i["D"], z=i["z"],
                                   dt_bias=i["dt_bias"], dt_softplus=True))
            rows.append(row)
        del i, gy
    return rows


@contextlib.contextmanager
def _settings(**values):
    """Temporarily set launch settings of kernels/ssd/triton_fused.py (its module attributes)."""
    saved = {k: getattr(ssf, k) for k in values}
    for k, v in values.items():
        setattr(ssf, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(ssf, k, v)


SWEEP = [dict(PASS_BLOCK_N=32), dict(PASS_BLOCK_P=32), dict(PASS_STAGES=3), dict(PASS_STAGES=1),
         dict(DBC_BLOCK_N=32), dict(DBC_TARGET_PROGRAMS=4096),
         dict(DBC_WARPS=8), dict(MAX_CHUNK=128, DX_WARPS=8, DBC_WARPS=8)]


def run_sweep(keys=("long", "layer"), deadline: float | None = None) -> list[dict]:
    """fwd+bwd ms of each SWEEP setting against the default, at each shape; each setting's outputs and
    gradients are compared with the default's at the same inputs (rel = worst relative difference)."""
    rows = []
    for key in keys:
        i, names, gy = _bench_inputs(key, True)
        i["initial_state"] = None
        ref = _fwd_bwd(ssf.ssd_triton_fused, i, names, gy, torch.zeros((), device=DEV))
        base = _timings(ssf.ssd_triton_fused, i, names, gy)[1]
        rows.append(dict(setting="default", shape=str(_shape(key)), fwdbwd_ms=base, vs_default=0.0))
        for setting in SWEEP:
            if deadline is not None and time.time() > deadline:
                break
            with _settings(**setting):
                try:
                    out = _fwd_bwd(ssf.ssd_triton_fused, i, names, gy, torch.zeros((), device=DEV))
                    diff = max(rel(a, b) for a, b in zip([out[0], out[1], *out[2]], [ref[0], ref[1], *ref[2]]))
                    ms = _timings(ssf.ssd_triton_fused, i, names, gy)[1]
                except Exception as error:  # noqa: BLE001  (a setting that cannot compile is a row, not a stop)
                    diff, ms = math.inf, math.nan
                    print(f"  {setting}: {type(error).__name__}: {error}", flush=True)
            rows.append(dict(setting=str(setting), shape=str(_shape(key)), fwdbwd_ms=ms, vs_default=diff))
            print(f"  sweep {key} {setting}: {ms:.3f} ms (default {base:.3f}), rel vs default {diff:.1e}", flush=True)
        del i, gy
    return rows


def profile(key: str = "long", z: bool = True, design: str = "fused") -> None:
    """Per-kernel CUDA time of one forward+backward (printed: what bounds the total)."""
    i, names, gy = _bench_inputs(key, z)

    def run():
        y = DESIGNS[design](i["x"], i["dt"], i["A"], i["B"], i["C"], 256, D=i["D"], z=i["z"],
                            dt_bias=i["dt_bias"], dt_softplus=True)
        return torch.autograd.grad(y, [i[k] for k in names], gy)

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            run()
        torch.cuda.synchronize()
    print(f"per-kernel CUDA time, [{design}] {key} {_shape(key)} z={z}, 5 fwd+bwd:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16), flush=True)


# ----------------------------------------------------------------------------------------------------
# Running it directly. A cold GPU machine otherwise spends most of a short lease compiling: these
# kernels take seconds each in ptxas, mamba_ssm autotunes ~100 configs, and Triton's compilation holds
# the GIL (threads do not help). So worker processes compile everything first into Triton's disk cache,
# each a share of the launches (compile only, nothing runs), and the real calls then load from it.


@contextlib.contextmanager
def _compile_only(part: int = 0, parts: int = 1):
    """Inside, every Triton launch only compiles (same arguments, so the same specializations); an
    autotuned kernel compiles its configs number part, part + parts, ... and picks one of those."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction, KernelInterface

    saved = JITFunction.__getitem__, KernelInterface.__getitem__, Autotuner._bench

    def getitem(self, grid):
        return lambda *args, **kwargs: self.run(*args, grid=grid, warmup=True, **kwargs)

    def bench(self, *args, config, **meta):
        index = self.configs.index(config)
        if index % parts != part:
            return [1.0, 1.0, 1.0]
        self.fn.run(*args, **dict(meta, **config.all_kwargs()))
        return [0.0, 0.0, 0.0]

    JITFunction.__getitem__ = KernelInterface.__getitem__ = getitem
    Autotuner._bench = bench
    try:
        yield
    finally:
        JITFunction.__getitem__, KernelInterface.__getitem__, Autotuner._bench = saved


def _warm_calls(checks: bool, gpu_short: bool, designs: tuple[str, ...], sweep: bool) -> list:
    """The launches of a run, as closures (the same list in every process, so parts can share it)."""
    def scan(fn, key, dtype, cu=None, states=None, D_per_dim=False, z=True, init=True):
        batch, L, H, P, G, N = _shape(key)
        i = _inputs(batch, L, H, P, G, N, dtype, states=states, D_per_dim=D_per_dim, z=z, init=init)
        names = [k for k in NAMES if i[k] is not None]
        for k in names:
            i[k].requires_grad_(True)
        y, f = _call(fn, i, cu_seqlens=cu)
        torch.autograd.grad(y.float().sum() + f.sum(), [i[k] for k in names])

    def large(fn):  # the large-offset check's specializations at a small size (no int argument equal to 1)
        batch, L, H, P, G, N = _shape("large")
        i = _inputs(2, 2048 if not SMOKE else L, H, P, G, N, torch.bfloat16, init=False, z=False)
        i.update(D=None, dt_bias=None)
        names = ["x", "dt", "B", "C"]
        for k in names:
            i[k].requires_grad_(True)
        y, _ = _call(fn, i)
        torch.autograd.grad(y, [i[k] for k in names], torch.randn_like(y))

    def bench(fn, key, z):
        i, names, gy = _bench_inputs(key, z)
        y = fn(i["x"], i["dt"], i["A"], i["B"], i["C"], 256, D=i["D"], z=i["z"], dt_bias=i["dt_bias"],
               dt_softplus=True)
        torch.autograd.grad(y, [i[k] for k in names], gy)

    def swept(setting):
        with _settings(**setting):
            for key in ("long", "layer"):
                bench(ssf.ssd_triton_fused, key, True)

    calls = []
    for design in designs:
        fn = DESIGNS[design]
        if checks:
            calls += [lambda fn=fn, kw=kw, key=key, dtype=dtype: scan(fn, key, dtype, **kw)
                      for _, key, dtype, kw in _check_cases(gpu_short)]
            if design == "fused":
                calls.append(lambda fn=fn: large(fn))
        shapes = dict.fromkeys((key, z) for _, key, z in BENCH)
        calls += [lambda fn=fn, key=key, z=z: bench(fn, key, z) for key, z in shapes]
    if checks:
        calls.append(_check_step)
    if sweep:
        calls += [lambda setting=setting: swept(setting) for setting in SWEEP]
    return calls


# ----------------------------------------------------------------------------------------------------
# Bisect: which launch of the fused design faults


FUSED_KERNELS = ("_chunk_cb", "_fwd_state", "_fwd_out", "_bwd_state", "_bwd_dx", "_bwd_dbc")
# Each variant changes one suspect of a GPU fault (module attributes of triton_fused.py); each runs in
# its own process, since a CUDA fault leaves the process's context unusable.
BISECT_VARIANTS = {
    "default": {},
    "dx_block_p_32": dict(DX_BLOCK_P=32),  # _bwd_dx with [T, 32] wgmma tiles: faulted on the H100 (triton-lang/triton#11366)
    "pass_stages_1": dict(PASS_STAGES=1),  # the state walks not software-pipelined
    "while_loops": dict(PIPELINED_LOOPS=False),  # no pipelined loops at all (the interpreter's while loops)
    "dbc_one_split": dict(DBC_TARGET_PROGRAMS=1),  # _bwd_dbc over all heads of a group, dB/dC in x's dtype
}


class _SyncedLaunch:
    """Stands in for one kernel of triton_fused.py: each launch synchronizes the device before (a fault
    of the torch ops since the last launch is told apart) and after it, and reports the launch."""

    def __init__(self, kernel, name: str, log: list):
        self.kernel, self.name, self.log = kernel, name, log

    def _sync(self, where: str) -> None:
        if DEV != "cuda":
            return
        try:
            torch.cuda.synchronize()
        except Exception as err:  # noqa: BLE001  (reported, then the child stops)
            print(f"FAULT {where}: {type(err).__name__}: {err}", flush=True)
            raise SystemExit(3) from err

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self._sync(f"before {self.name} (in the torch ops since the previous launch)")
            start = time.perf_counter()
            try:
                self.kernel[grid](*args, **kwargs)
            except SystemExit:
                raise
            except Exception as err:  # noqa: BLE001  (the bounds checker, or a launch-time CUDA error)
                print(f"FAULT in {self.name} grid={tuple(grid)} (at launch): {type(err).__name__}: {err}", flush=True)
                raise SystemExit(3) from err
            self._sync(f"in {self.name} grid={tuple(grid)}")
            self.log.append(self.name)
            settings = {k: v for k, v in kwargs.items() if k.isupper() or k == "num_warps"}
            print(f"  launch {len(self.log)}: {self.name} grid={tuple(grid)} ok "
                  f"({(time.perf_counter() - start) * 1e3:.1f} ms) {settings}", flush=True)
        return launch


def _bisect_case(case: str):
    matches = [c for c in _check_cases() if case.lower() in c[0].lower()]
    if not matches:
        raise SystemExit(f"--bisect-case {case!r} matches none of {[c[0] for c in _check_cases()]}")
    return matches[0]


def _bisect_child(variant: str, case: str, shape: str | None) -> None:
    """One variant: the fused design's forward and backward of ``case`` (a check of ``_check_cases``),
    every launch synchronized; on the CPU (--cpu-smoke) under the interpreter's bounds checker too.
    Prints each launch, then the check's row, or the launch that faulted (exit status 3)."""
    name, key, dtype, kw = _bisect_case(case)
    if shape:
        dims = tuple(int(v) for v in shape.split(","))
        SHAPES[key] = (dims, dims)
    log: list[str] = []
    for kernel in FUSED_KERNELS:
        setattr(ssf, kernel, _SyncedLaunch(getattr(ssf, kernel), kernel, log))
    checker = contextlib.nullcontext()
    if SMOKE:  # the interpreter: every masked address checked against the launch's tensors
        sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "kernels"))
        from triton_bounds import bounds_checked

        checker = bounds_checked()
    print(f"variant {variant} {BISECT_VARIANTS[variant]}: {name}, shape {_shape(key)}, {dtype}", flush=True)
    with _settings(**BISECT_VARIANTS[variant]), checker:
        row = _check_scan("fused", name, key, dtype, **kw)
    print(f"RESULT {'PASS' if row['pass'] else 'FAIL'} fwd {row['err_fwd']:.2e} bwd {row['err_bwd']:.2e} "
          f"({row['note']}); launches {len(log)}", flush=True)


def run_bisect(case: str, variants: list[str], shape: str | None, timeout: float, sanitize: bool) -> list[dict]:
    """Each variant in a child process (``--bisect-child``); returns one row a variant: which launch
    faulted, or the check's verdict. ``sanitize``: children under compute-sanitizer's memcheck (names
    the faulting instruction, address and memory space; slow: use a small ``shape``)."""
    import shutil
    import subprocess

    prefix = []
    if sanitize:
        tool = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
        prefix = [tool, "--tool", "memcheck", "--print-limit", "5"]
    env = dict(os.environ)
    if not SMOKE:
        env["CUDA_LAUNCH_BLOCKING"] = "1"  # launches synchronous as well: the fault is reported at its launch
    rows = []
    for variant in variants:
        cmd = [*prefix, sys.executable, __file__, "--bisect-child", variant, "--bisect-case", case]
        cmd += (["--bisect-shape", shape] if shape else []) + (["--cpu-smoke"] if SMOKE else [])
        start = time.time()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            out, code = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as err:
            out, code = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or ""), None
        lines = out.splitlines()
        print(f"--- {variant} (exit {code}, {time.time() - start:.0f} s)", flush=True)
        shown = [ln for ln in lines if ln.startswith(("  launch", "FAULT", "RESULT", "variant", "========="))]
        print("\n".join(shown[-60:]) if shown else "\n".join(lines[-30:]), flush=True)
        fault = next((ln for ln in lines if ln.startswith("FAULT")), None)
        result = next((ln for ln in lines if ln.startswith("RESULT")), None)
        verdict = fault or result or ("timed out" if code is None else f"exit {code}: " + " | ".join(lines[-3:]))
        rows.append(dict(variant=variant, settings=str(BISECT_VARIANTS[variant]), verdict=verdict))
    return rows


def _warm_part(part: int, parts: int, checks: bool, gpu_short: bool, designs: tuple[str, ...], sweep: bool,
               mamba: bool) -> None:
    """One worker's share: calls number part, part + parts, ... (or a share of mamba_ssm's configs)."""
    if mamba:
        theirs = _mamba_scan()
        with _compile_only(part, parts):
            for _, key, z in BENCH:
                i, names, gy = _bench_inputs(key, z)
                y = theirs(i["x"], i["dt"], i["A"], i["B"], i["C"], 256, D=i["D"], z=i["z"], dt_bias=i["dt_bias"],
                           dt_softplus=True)
                torch.autograd.grad(y, [i[k] for k in names], gy)
        return
    calls = _warm_calls(checks, gpu_short, designs, sweep)
    with _compile_only():
        for call in calls[part::parts]:
            try:
                call()
            except Exception as error:  # noqa: BLE001  (the real call will report it)
                print(f"warm-up call failed: {type(error).__name__}: {error}", flush=True)


def _spawn(parts: int, extra: list[str]) -> list:
    import subprocess

    return [subprocess.Popen([sys.executable, __file__, "--warm-part", str(k), "--warm-parts", str(parts), *extra])
            for k in range(parts)]


def _wait(procs: list, deadline: float) -> str:
    done = 0
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.time()))
            done += proc.returncode == 0
        except Exception:  # noqa: BLE001  (past the deadline: the real calls compile what is missing)
            proc.kill()
    return f"{done}/{len(procs)} workers done"


def _print_table(rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = (lambda v: f"{v:.3g}" if isinstance(v, float) else str(v))
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |", flush=True)


def main() -> None:
    import argparse

    global DEV, SMOKE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--designs", default="fused,first", help="which designs to check and time")
    parser.add_argument("--sweep", action="store_true", help="time (and verify) the fused design's SWEEP settings")
    parser.add_argument("--profile", action="store_true", help="per-kernel times at the long-L and layer shapes")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds: the phases after it are skipped (checks, bench, profile, mamba_ssm, sweep)")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--skip-large", action="store_true", help="leave out the >2^31-element check")
    parser.add_argument("--short", action="store_true", help="the GPU check set for a short lease")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--no-mamba", action="store_true", help="leave out mamba_ssm's timings")
    parser.add_argument("--jobs", type=int, default=8, help="compile worker processes (0: compile on first use)")
    parser.add_argument("--cpu-smoke", action="store_true", help="CPU + Triton interpreter at tiny shapes")
    parser.add_argument("--bisect", action="store_true",
                        help="run the fused design's fwd+bwd of one check case launch by launch, synchronized after "
                             "each, one process per variant (BISECT_VARIANTS), and say which kernel faults")
    parser.add_argument("--bisect-case", default="layer call, z", help="--bisect: a check name (substring)")
    parser.add_argument("--bisect-shape", default=None, help="--bisect: batch,L,H,P,G,N instead of the case's")
    parser.add_argument("--bisect-variants", default=",".join(BISECT_VARIANTS), help="--bisect: which variants")
    parser.add_argument("--bisect-timeout", type=float, default=150.0, help="--bisect: seconds a variant")
    parser.add_argument("--sanitize", action="store_true", help="--bisect: children under compute-sanitizer memcheck")
    parser.add_argument("--bisect-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warm-part", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warm-parts", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--warm-mamba", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    start = time.time()
    deadline = start + (args.budget if args.budget is not None else 1e9)
    designs = tuple(d for d in args.designs.split(",") if d)
    unknown = [d for d in designs if d not in DESIGNS]
    if unknown:
        parser.error(f"unknown design(s) {unknown}; choose from {list(DESIGNS)}")
    if args.cpu_smoke:
        DEV, SMOKE = "cpu", True
    if args.bisect_child is not None:
        _bisect_child(args.bisect_child, args.bisect_case, args.bisect_shape)
        return
    if args.bisect:
        variants = [v for v in args.bisect_variants.split(",") if v]
        unknown = [v for v in variants if v not in BISECT_VARIANTS]
        if unknown:
            parser.error(f"unknown variant(s) {unknown}; choose from {list(BISECT_VARIANTS)}")
        print(f"torch {torch.__version__}, device: "
              f"{torch.cuda.get_device_name() if not SMOKE else 'cpu (interpreter, bounds-checked)'}", flush=True)
        _print_table(run_bisect(args.bisect_case, variants, args.bisect_shape, args.bisect_timeout, args.sanitize))
        return
    if args.warm_part is not None:
        _warm_part(args.warm_part, args.warm_parts, not args.skip_checks, args.short, designs, args.sweep,
                   args.warm_mamba)
        return
    print(f"torch {torch.__version__}, device: "
          f"{torch.cuda.get_device_name() if not SMOKE else 'cpu (interpreter)'}", flush=True)
    mamba = not args.no_mamba and not args.skip_bench and _mamba_scan() is not None
    mamba_workers = []
    if not SMOKE and args.jobs > 0:
        common = ["--designs", args.designs] + (["--skip-checks"] if args.skip_checks else []) + \
                 (["--short"] if args.short else []) + (["--sweep"] if args.sweep else [])
        mamba_workers = _spawn(max(1, args.jobs // 2), common + ["--warm-mamba"]) if mamba else []
        ours = _spawn(args.jobs, common)
        print(f"compiled: {_wait(ours, start + 0.4 * (deadline - start))} ({time.time() - start:.0f} s)", flush=True)
    if not args.skip_checks:
        fmt = (lambda v: "-" if v is None else f"{v:.2e}")
        print("| check | shape | dtype | rel err fwd | rel err bwd | pass | note |\n|---|---|---|---|---|---|---|")
        rows = run_checks(large=not args.skip_large, gpu_short=args.short, designs=designs,
                          large_designs=tuple(d for d in designs if d == "fused"), on_row=lambda r: print(
                              f"| {r['name']} | {r['shape']} | {r['dtype']} | {fmt(r['err_fwd'])} | "
                              f"{fmt(r['err_bwd'])} | {'PASS' if r['pass'] else 'FAIL'} | {r['note']} |", flush=True))
        print(f"checks: {sum(not r['pass'] for r in rows)} failed ({time.time() - start:.0f} s)", flush=True)
    if SMOKE and "fused" in designs:  # keeps --bisect's code path tried: two variants, bounds-checked
        _print_table(run_bisect("layer call, z", ["default", "dx_block_p_32"], None, 300.0, False))
    if not args.skip_bench and time.time() < deadline:
        _print_table(run_bench(designs, mamba=False))
        print(f"bench done ({time.time() - start:.0f} s)", flush=True)
    if args.profile and not SMOKE and time.time() < deadline:
        for design in designs:
            profile("long", design=design)
        profile("layer", z=False, design=designs[0])
    if mamba and time.time() < deadline:
        if mamba_workers:
            print(f"mamba_ssm compiled: {_wait(mamba_workers, deadline)} ({time.time() - start:.0f} s)", flush=True)
        _print_table(run_bench((), mamba=True))
        print(f"mamba_ssm bench done ({time.time() - start:.0f} s)", flush=True)
    if args.sweep and time.time() < deadline:
        _print_table(run_sweep(deadline=deadline))
        print(f"sweep done ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
