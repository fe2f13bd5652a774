"""GPU checks and benchmarks of the Triton selective scan (kernels/selective_scan/triton.py).

``run_checks()``: forward and backward at real Mamba-1 shapes against the reference run in float64 on
the GPU (y, final state, and the gradients of u, delta, A, B, C, D, z, delta_bias, initial_state), with
packed sequences (an empty one included), initial/final states, grouped and shared B/C, fp32 / bf16 /
fp16, a large state (N=64), L=1, bit-identical gradients on re-run at the target shape, the one-token
step, and an input past 2^31 elements (64-bit offsets). mamba_ssm's CUDA ``selective_scan_fn`` is
compared with the same reference where importable (in the note).

``run_bench()``: forward and forward+backward at the target shape (B8 D1536 L2048 N16 bf16, z, delta
softplus) against mamba_ssm's ``selective_scan_fn`` (when importable), a sweep over the kernels' tile
sizes (so the best ``TILES`` can be set), and the step against ``selective_state_update``.

Run directly on the GPU machine (prints both tables):
    PYTHONPATH=.:/tmp/site python3 scripts/gpu_checks/selective_scan.py
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from kernels.selective_scan import triton as sst  # noqa: E402
from kernels.selective_scan.reference import selective_scan_reference, selective_scan_step_reference  # noqa: E402
from scripts.gpu_checks import bench_ms, check_row, fwd_bwd, max_rel, nbytes, rel  # noqa: E402

DEV = "cuda"


def _baseline():
    """(selective_scan_fn, selective_state_update) of mamba_ssm, or None for what does not import."""
    scan = update = None
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as scan
    except Exception:  # not installed, or its CUDA extension does not load
        pass
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update as update
    except Exception:
        pass
    return scan, update


def _make(batch, dim, L, dstate, dtype, *, groups=None, z=True, states=None, dt_min=1e-3, seed=0):
    """Mamba-1-like inputs: dt = softplus(delta + delta_bias) spread over [dt_min, 0.1], A = -(1..N),
    as mamba_ssm initializes them. Order: u, delta, A, B, C, D, z, delta_bias, initial_state."""
    gen = torch.Generator(device=DEV).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device=DEV) * scale

    dt = torch.exp(torch.rand(dim, generator=gen, device=DEV) * (math.log(0.1) - math.log(dt_min)) + math.log(dt_min))
    delta_bias = dt + torch.log(-torch.expm1(-dt))  # softplus^-1
    A = -torch.arange(1, dstate + 1, device=DEV, dtype=torch.float32).repeat(dim, 1)
    bc = (batch, dstate, L) if groups is None else (batch, groups, dstate, L)
    return [randn(batch, dim, L).to(dtype), randn(batch, dim, L, scale=0.3).to(dtype), A,
            randn(*bc).to(dtype), randn(*bc).to(dtype), randn(dim), randn(batch, dim, L).to(dtype) if z else None,
            delta_bias, randn(states, dim, dstate) if states else None]


def _compare(name, inputs, tol, cu_seqlens=None, baseline=None, tol_bwd=None) -> dict:
    """Ours vs the float64 reference: y, final state, and every present input's gradient."""
    present = [i for i, t in enumerate(inputs) if t is not None]
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    ref_leaves = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    y, final = sst.selective_scan_triton(*leaves[:8], True, leaves[8], True, cu_seqlens)
    y_ref, final_ref = selective_scan_reference(*ref_leaves[:8], True, ref_leaves[8], True, cu_seqlens)
    gy = torch.randn_like(y_ref)
    gf = torch.randn_like(final_ref)
    grads = torch.autograd.grad([y, final], [leaves[i] for i in present], [gy.to(y.dtype), gf.float()])
    grads_ref = torch.autograd.grad([y_ref, final_ref], [ref_leaves[i] for i in present], [gy, gf])
    err_fwd = max_rel([(y, y_ref), (final, final_ref)])
    per_grad = [rel(a, b) for a, b in zip(grads, grads_ref)]
    err_bwd = max(per_grad)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0")
    worst = names[present[per_grad.index(err_bwd)]]
    note = f"worst grad: d{worst}"
    if baseline is not None and cu_seqlens is None and inputs[8] is None and inputs[3].dim() == 3:
        try:
            base = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
            yb, fb = baseline(*base[:8], delta_softplus=True, return_last_state=True)
            gb = torch.autograd.grad([yb, fb], [base[i] for i in present],
                                     [gy.to(yb.dtype), gf.to(fb.dtype)], allow_unused=True)
            errs = [rel(a, b) for a, b in zip(gb, grads_ref) if a is not None]
            note += f"; mamba_ssm CUDA: fwd {max_rel([(yb, y_ref), (fb, final_ref)]):.1e} bwd {max(errs):.1e}"
        except Exception as error:
            note += f"; mamba_ssm CUDA n/a: {str(error)[:60]}"
    shape = (*inputs[0].shape, inputs[2].shape[1]) + ((inputs[3].shape[1],) if inputs[3].dim() == 4 else ())
    return check_row(name, shape, inputs[0].dtype, err_fwd, err_bwd, tol, tol_bwd, note=note)


def _determinism(shape=(8, 1536, 2048, 16)) -> dict:
    inputs = _make(*shape, torch.bfloat16, states=shape[0])
    leaves = [t.requires_grad_() for t in inputs]
    gy = torch.randn_like(inputs[0])

    def run():
        y, final = sst.selective_scan_triton(*leaves[:8], True, leaves[8], True)
        return torch.autograd.grad([y, final], leaves, [gy, torch.ones_like(final)])

    first, second = run(), run()
    same = all(torch.equal(a, b) for a, b in zip(first, second))
    return check_row("bwd bit-identical on re-run", shape, torch.bfloat16, None,
                     0.0 if same else 1.0, 0.0)


def _large_offsets(dim: int = 1024, L: int = (1 << 21) + 4099, window: int = 8192) -> dict:
    """B*D*L past 2^31 elements (the last channels' offsets need int64): the tail of the output, the
    final state and du at the tail against the reference over a window long enough (dt >= 0.01, so
    8192 steps forget the state before it by e^-80) that its zero start state does not matter."""
    batch, dstate, tail = 1, 16, 64
    u, delta, A, B, C, D, _, bias, _ = _make(batch, dim, L, dstate, torch.bfloat16, z=False, dt_min=1e-2)
    d = slice(dim - 16, dim)
    w = slice(L - window, L)
    with torch.no_grad():
        y, final = sst.selective_scan_triton(u, delta, A, B, C, D, None, bias, True, None, True)
        y_ref, final_ref = selective_scan_reference(
            u[:, d, w].double(), delta[:, d, w].double(), A[d].double(), B[..., w].double(), C[..., w].double(),
            D[d].double(), None, bias[d].double(), True, None, True)
    err_fwd = max(rel(y[:, d, -tail:], y_ref[..., -tail:]), rel(final[:, d], final_ref))
    del y
    note = f"{batch * dim * L / 2**31:.3f} x 2^31 elements"
    err_bwd = None
    try:
        u.requires_grad_()
        y = sst.selective_scan_triton(u, delta, A, B, C, D, None, bias, True)
        dy = torch.zeros_like(y)
        dy[..., -tail:] = torch.randn(batch, dim, tail, device=DEV).to(dy.dtype)
        (du,) = torch.autograd.grad(y, [u], dy)
        del y
        uw = u.detach()[:, d, w].double().requires_grad_()
        y_w = selective_scan_reference(uw, delta[:, d, w].double(), A[d].double(), B[..., w].double(),
                                       C[..., w].double(), D[d].double(), None, bias[d].double(), True)
        (du_ref,) = torch.autograd.grad(y_w, [uw], dy[:, d, w].double())
        err_bwd = rel(du[:, d, -tail:], du_ref[..., -tail:])
    except torch.OutOfMemoryError:
        note += "; backward skipped: out of memory (dB/dC partial rows)"
    del u, delta
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return check_row("int64 offsets (tail)", (batch, dim, L, dstate), torch.bfloat16, err_fwd, err_bwd, 1e-2,
                     2e-2, note=note)


def _step(batch, dim, dstate, dtype, groups=None, baseline_update=None) -> dict:
    gen = torch.Generator(device=DEV).manual_seed(5)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=DEV)

    x, dt, z = randn(batch, dim).to(dtype), (randn(batch, dim) - 3).to(dtype), randn(batch, dim).to(dtype)
    A = -torch.arange(1, dstate + 1, device=DEV, dtype=torch.float32).repeat(dim, 1)
    bshape = (batch, dstate) if groups is None else (batch, groups, dstate)
    B, C = randn(*bshape).to(dtype), randn(*bshape).to(dtype)
    D, dt_bias = randn(dim), randn(dim) * 0.1
    state = randn(batch, dim, dstate)
    ours_state, ref_state = state.clone(), state.double()
    y = sst.selective_scan_step_triton(ours_state, x, dt, A, B, C, D, z, dt_bias, True)
    y_ref = selective_scan_step_reference(ref_state, x.double(), dt.double(), A.double(), B.double(), C.double(),
                                          D.double(), z.double(), dt_bias.double(), True)
    note = ""
    if baseline_update is not None and groups is None:
        base_state = state.clone()
        yb = baseline_update(base_state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=True)
        note = f"selective_state_update: y {rel(yb, y_ref):.1e}, state {rel(base_state, ref_state):.1e}"
    shape = (batch, dim, dstate) + ((groups,) if groups else ())
    return check_row("step (in-place state)", shape, dtype, max(rel(y, y_ref), rel(ours_state, ref_state)),
                     None, 1e-2 if dtype != torch.float32 else 1e-5, note=note)


def run_checks() -> list[dict]:
    torch.manual_seed(0)
    scan_fn, update_fn = _baseline()
    rows = []
    checks = [
        ("Mamba-1 (2 of B8), z, softplus", lambda: _make(2, 1536, 2048, 16, torch.bfloat16), dict(tol=1e-2, tol_bwd=2e-2, baseline=scan_fn)),
        ("states in/out, z, softplus", lambda: _make(2, 1536, 2048, 16, torch.bfloat16, states=2), dict(tol=1e-2, tol_bwd=2e-2)),
        ("fp32, odd L, no z", lambda: _make(3, 768, 1001, 16, torch.float32, z=False, states=3), dict(tol=1e-4, baseline=scan_fn)),
        ("grouped B/C (G=4), fp32", lambda: _make(2, 1024, 777, 16, torch.float32, groups=4, states=2), dict(tol=1e-4)),
        ("N=64, fp16", lambda: _make(2, 256, 513, 64, torch.float16, states=2), dict(tol=4e-3, tol_bwd=1e-2)),
        ("L=1", lambda: _make(5, 512, 1, 16, torch.bfloat16, states=5), dict(tol=1e-2, tol_bwd=2e-2)),
    ]
    for name, make, kw in checks:
        try:
            rows.append(_compare(name, make(), **kw))
        except Exception as error:  # a failure is a row, never a stop
            rows.append(check_row(name, "-", "-", math.inf, math.inf, 0.0, note=f"raised {error!r}"[:120]))
    lengths = [1, 7, 1000, 3, 2048, 0, 45]
    cu = torch.tensor([0] + lengths, device=DEV).cumsum(0).to(torch.int32)
    try:
        rows.append(_compare("varlen (7 seqs, one empty)", _make(1, 768, int(cu[-1]), 16, torch.bfloat16,
                                                                 states=len(lengths)), 1e-2, cu, tol_bwd=2e-2))
    except Exception as error:
        rows.append(check_row("varlen", "-", "-", math.inf, math.inf, 0.0, note=f"raised {error!r}"[:120]))
    for fn in (_determinism, lambda: _step(64, 3072, 16, torch.bfloat16, baseline_update=update_fn),
               lambda: _step(7, 1536, 16, torch.float32, groups=3), _large_offsets):
        try:
            rows.append(fn())
        except Exception as error:
            rows.append(check_row(getattr(fn, "__name__", "check"), "-", "-", math.inf, math.inf, 0.0,
                                  note=f"raised {error!r}"[:120]))
        torch.cuda.empty_cache()
    return rows


def _bench_row(kernel, inputs, scan_fn, tiles=None) -> dict:
    """One timing row at the given TILES (fwd, bwd), restored afterwards."""
    saved = dict(sst.TILES)
    if tiles is not None:
        sst.TILES.update(tiles)
    try:
        u, delta, A, B, C, D, z, bias, _ = inputs
        leaves = [u, delta, A, B, C, D, z, bias]
        for t in leaves:
            t.requires_grad_(False)
        with torch.no_grad():
            fwd_ms = bench_ms(lambda: sst.selective_scan_triton(u, delta, A, B, C, D, z, bias, True))
        grad_leaves = [t.requires_grad_() for t in leaves]
        dy = torch.randn_like(u)
        ours = lambda: sst.selective_scan_triton(*grad_leaves, True)  # noqa: E731
        fb_ms = bench_ms(fwd_bwd(ours, grad_leaves, [dy]))
    finally:
        sst.TILES.clear()
        sst.TILES.update(saved)
    row = {"kernel": kernel, "shape": f"B{u.shape[0]} D{u.shape[1]} L{u.shape[2]} N{A.shape[1]} bf16 z softplus",
           "ours_fwd_ms": fwd_ms, "ours_fwdbwd_ms": fb_ms, "mamba_ssm_fwd_ms": None, "mamba_ssm_fwdbwd_ms": None,
           # the fewest bytes: the forward reads u, delta, z, B, C and writes y; the backward reads them
           # again with dy and writes du, ddelta, dz, dB, dC (as large as the inputs)
           "bytes_fwd": nbytes(u, delta, z, B, C) + nbytes(u),
           "bytes_fwdbwd": 3 * nbytes(u, delta, z, B, C) + 2 * nbytes(u)}
    if scan_fn is not None:
        with torch.no_grad():
            row["mamba_ssm_fwd_ms"] = bench_ms(lambda: scan_fn(u, delta, A, B, C, D, z, bias, True))
        theirs = lambda: scan_fn(*grad_leaves, True)  # noqa: E731
        row["mamba_ssm_fwdbwd_ms"] = bench_ms(fwd_bwd(theirs, grad_leaves, [dy]))
    return row


def run_bench() -> list[dict]:
    torch.manual_seed(0)
    scan_fn, update_fn = _baseline()
    inputs = _make(8, 1536, 2048, 16, torch.bfloat16)
    rows = [_bench_row("selective_scan", inputs, scan_fn)]
    # Tile sweep: (BLOCK_D, BLOCK_L, warps) of the forward alone and of the backward (whose BLOCK_L is
    # also the forward's checkpoint interval in training). Only ours is timed here.
    for fwd, bwd in (((8, 32, 4), (8, 16, 4)), ((8, 16, 4), (16, 16, 8)), ((16, 16, 8), (4, 32, 4)),
                     ((4, 16, 2), (8, 32, 4)), ((8, 32, 8), (16, 32, 8))):
        try:
            row = _bench_row(f"selective_scan tiles fwd{fwd} bwd{bwd}", inputs, None, {"fwd": fwd, "bwd": bwd})
        except Exception as error:  # a tile that does not compile (registers / shared memory)
            row = {"kernel": f"tiles fwd{fwd} bwd{bwd}: {type(error).__name__}", "shape": "-"}
        rows.append(row)
    batch, dim, dstate = 64, 3072, 16
    x = torch.randn(batch, dim, device=DEV, dtype=torch.bfloat16)
    dt = torch.randn(batch, dim, device=DEV, dtype=torch.bfloat16)
    z = torch.randn(batch, dim, device=DEV, dtype=torch.bfloat16)
    A = -torch.rand(dim, dstate, device=DEV)
    B = torch.randn(batch, dstate, device=DEV, dtype=torch.bfloat16)
    C = torch.randn(batch, dstate, device=DEV, dtype=torch.bfloat16)
    D, dt_bias = torch.randn(dim, device=DEV), torch.randn(dim, device=DEV)
    state = torch.randn(batch, dim, dstate, device=DEV)
    row = {"kernel": "selective_scan_step", "shape": f"B{batch} D{dim} N{dstate} bf16, fp32 state",
           "ours_fwd_ms": bench_ms(lambda: sst.selective_scan_step_triton(state, x, dt, A, B, C, D, z, dt_bias, True)),
           "ours_fwdbwd_ms": None, "mamba_ssm_fwd_ms": None, "mamba_ssm_fwdbwd_ms": None,
           "bytes_fwd": 2 * nbytes(state) + 4 * nbytes(x), "bytes_fwdbwd": None}
    if update_fn is not None:
        row["mamba_ssm_fwd_ms"] = bench_ms(lambda: update_fn(state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias,
                                                             dt_softplus=True))
    rows.append(row)
    return rows


if __name__ == "__main__":
    sys.argv = [sys.argv[0], "--ops", "selective_scan"]
    from scripts.gpu_check import main as check_main

    try:
        check_main()
    except SystemExit:
        pass
    from scripts.bench_kernels import main as bench_main

    bench_main()
