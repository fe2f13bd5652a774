"""GPU checks and benchmarks of the Triton selective scan (kernels/selective_scan/triton.py).

``run_checks()``: forward and backward at real Mamba-1 shapes against the reference run in float64 on
the GPU (y, final state, and the gradients of u, delta, A, B, C, D, z, delta_bias, initial_state), with
packed sequences (an empty one included), initial/final states, grouped and shared B/C, fp32 / bf16 /
fp16, a large state (N=64), L=1, the channel-last inputs a Mamba layer passes (views of its
projections), adversarial decays (dt up to ~30, |A| up to 16: a = exp(dt A) underflows to 0),
bit-identical gradients on re-run at the target shape, the one-token step, and an input past 2^31
elements (64-bit offsets). mamba_ssm's CUDA ``selective_scan_fn`` is compared with the same reference
where importable (in the note).

``run_bench()``: forward and forward+backward at the target shape (B8 D1536 L2048 N16 bf16, z, delta
softplus) against mamba_ssm's ``selective_scan_fn`` (when importable), the same with the channel-last
inputs of a Mamba layer, and the step against ``selective_state_update``. ``run_bench(sweep=True)``
also times other tile settings (``TILES``); each of those rows is first checked against the default
tiles' outputs and gradients at the same inputs (the default itself is checked against float64 by
``run_checks``), so that a faster setting can be made the default on evidence.

Run directly on the GPU machine (checks, then benchmarks; kernels compiled in parallel up front):
    PYTHONPATH=.:/tmp/site python3 scripts/gpu_checks/selective_scan.py [--sweep] [--budget SECONDS]
and on a CPU, through the Triton interpreter at tiny shapes (the same code paths, to catch mistakes
before a GPU call):
    PYTHONPATH=. python3 scripts/gpu_checks/selective_scan.py --cpu-smoke
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    # the repository root instead of this script's folder, whose causal_conv1d.py would shadow the
    # causal_conv1d package (the baseline)
    sys.path[0] = str(Path(__file__).resolve().parents[2])
    if "--cpu-smoke" in sys.argv:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

from kernels.selective_scan import triton as sst  # noqa: E402
from kernels.selective_scan.reference import selective_scan_reference, selective_scan_step_reference  # noqa: E402
from scripts.gpu_checks import (  # noqa: E402
    check_row,
    compile_only_launches,
    fwd_bwd,
    graph_ms,
    max_rel,
    nbytes,
    rel,
    time_ms,
)

DEV = "cuda"
SMOKE = False  # --cpu-smoke: CPU tensors, tiny shapes, the interpreter

# Shapes: the real ones, and the --cpu-smoke stand-ins (same code paths, a few hundred elements).
SHAPES = {
    "mamba": (2, 1536, 2048, 16), "bench": (8, 1536, 2048, 16), "odd": (3, 768, 1001, 16),
    "grouped": (2, 1024, 777, 16, 4), "n64": (2, 256, 513, 64), "l1": (5, 512, 1, 16),
    "varlen_dim": 768, "stability": (2, 512, 1024, 16), "layer": (2, 1536, 2048, 16),
    "large": (1024, (1 << 21) + 4099), "step": (64, 3072, 16), "step_grouped": (7, 1536, 16, 3),
    "prefill": (1, 1536, 512, 16),
}
SMOKE_SHAPES = {
    "mamba": (1, 8, 37, 4), "bench": (1, 8, 64, 4), "odd": (1, 8, 13, 4), "grouped": (1, 8, 11, 4, 2),
    "n64": (1, 4, 9, 32), "l1": (2, 8, 1, 4), "varlen_dim": 8, "stability": (1, 8, 21, 4),
    "layer": (1, 8, 19, 4), "large": None, "step": (2, 8, 4), "step_grouped": (2, 6, 4, 3),
    "prefill": (1, 8, 21, 4),
}
VARLEN_LENGTHS = [1, 7, 1000, 3, 2048, 0, 45]
SMOKE_VARLEN_LENGTHS = [1, 5, 0, 9]

# Tile settings the sweep times (only ours), each with the inputs' layout ("bdl": contiguous [B, D, L];
# "cl": the channel-last views of a Mamba layer). Keys: "fwd" / "bwd" (BLOCK_D, T, warps), "chunk",
# "stages_fwd" / "stages_bwd" (software-pipelining depth of the loads), "maxnreg_fwd" / "maxnreg_bwd" (a
# register cap: more resident warps, some spills).
SWEEP = [
    ({"stages_fwd": 2}, "bdl"), ({"fwd": (8, 8, 1)}, "bdl"),
    ({"bwd": (16, 4, 2), "maxnreg_bwd": 168}, "bdl"), ({"fwd": (8, 8, 1)}, "cl"), ({"bwd": (8, 4, 1)}, "cl"),
]


def _shape(name):
    return (SMOKE_SHAPES if SMOKE else SHAPES)[name]


def _baseline():
    """(selective_scan_fn, selective_state_update) of mamba_ssm, or None for what does not import."""
    scan = update = None
    if SMOKE:
        return scan, update
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as scan
    except Exception:  # not installed, or its CUDA extension does not load
        pass
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update as update
    except Exception:
        pass
    return scan, update


def _make(batch, dim, L, dstate, dtype, *, groups=None, z=True, states=None, dt_min=1e-3, dt_max=0.1,
          channel_last=False, seed=0):
    """Mamba-1-like inputs: dt = softplus(delta + delta_bias) spread over [dt_min, dt_max], A = -(1..N),
    as mamba_ssm initializes them. Order: u, delta, A, B, C, D, z, delta_bias, initial_state.

    channel_last: u, delta, z are [B, L, D] tensors seen as [B, D, L] and B, C are slices of one
    [B, L, R + 2N] projection (as a Mamba layer passes them)."""
    gen = torch.Generator(device=DEV).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device=DEV) * scale

    def bdl(scale=1.0):
        if channel_last:
            return randn(batch, L, dim, scale=scale).to(dtype).transpose(1, 2)
        return randn(batch, dim, L, scale=scale).to(dtype)

    dt = torch.exp(torch.rand(dim, generator=gen, device=DEV) * (math.log(dt_max) - math.log(dt_min))
                   + math.log(dt_min))
    delta_bias = dt + torch.log(-torch.expm1(-dt))  # softplus^-1
    A = -torch.arange(1, dstate + 1, device=DEV, dtype=torch.float32).repeat(dim, 1)
    if channel_last and groups is None:
        proj = randn(batch, L, 48 + 2 * dstate).to(dtype)  # [dt_rank | B | C]
        Bm, Cm = proj[..., 48:48 + dstate].transpose(1, 2), proj[..., 48 + dstate:].transpose(1, 2)
    else:
        bc = (batch, dstate, L) if groups is None else (batch, groups, dstate, L)
        Bm, Cm = randn(*bc).to(dtype), randn(*bc).to(dtype)
    return [bdl(), bdl(0.3), A, Bm, Cm, randn(dim), bdl() if z else None, delta_bias,
            randn(states, dim, dstate) if states else None]


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


def _layer_layout() -> dict:
    """The channel-last views a Mamba layer passes; y and du / ddelta / dz come back channel-last too
    (so the layer's transposes back to [B, L, D] are free)."""
    inputs = _make(*_shape("layer"), torch.bfloat16, channel_last=True)
    row = _compare("channel-last views (Mamba layer)", inputs, 1e-2, tol_bwd=2e-2)
    u = inputs[0].detach().clone().requires_grad_()
    y = sst.selective_scan_triton(u, *inputs[1:8], True)
    (du,) = torch.autograd.grad(y, [u], torch.ones_like(y))
    if not (y.stride(1) == 1 and du.stride(1) == 1):
        row["pass"] = False
        row["note"] += f"; expected channel-last y / du, got strides {y.stride()} / {du.stride()}"
    return row


def _stability() -> dict:
    """Adversarial decays: dt = softplus(delta + bias) up to ~30 and tiny, A = -(1..N) up to 16, so that
    exp(dt A) spans 1 down to exactly 0 (underflow). Outputs and gradients must be finite and match."""
    batch, dim, L, dstate = _shape("stability")
    inputs = _make(batch, dim, L, dstate, torch.float32, states=batch, dt_min=1e-4, dt_max=30.0, seed=3)
    gen = torch.Generator(device=DEV).manual_seed(4)
    inputs[1] = torch.randn(batch, dim, L, generator=gen, device=DEV) * 4.0  # delta spread wide around the bias
    return _compare("stability: dt up to ~30, |A| up to 16", inputs, 1e-4)


def _determinism(shape=None) -> dict:
    shape = shape or _shape("bench")
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


def _large_offsets(window: int = 8192) -> dict:
    """B*D*L past 2^31 elements (the last channels' offsets need int64): the tail of the output, the
    final state and du at the tail against the reference over a window long enough (dt >= 0.01, so
    8192 steps forget the state before it by e^-80) that its zero start state does not matter."""
    dim, L = _shape("large")
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


def _guarded(name, fn) -> dict:
    """A failure is a row, never a stop."""
    try:
        return fn()
    except Exception as error:
        return check_row(name, "-", "-", math.inf, math.inf, 0.0, note=f"raised {error!r}"[:160])
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


SKIP_LARGE = False  # --skip-large: leave out the >2^31-element check (slow, memory-hungry)


def run_checks() -> list[dict]:
    torch.manual_seed(0)
    scan_fn, update_fn = _baseline()
    lengths = SMOKE_VARLEN_LENGTHS if SMOKE else VARLEN_LENGTHS
    cu = torch.tensor([0] + lengths, device=DEV).cumsum(0).to(torch.int32)
    checks = [
        ("Mamba-1 (2 of B8), z, softplus",
         lambda: _compare("Mamba-1 (2 of B8), z, softplus", _make(*_shape("mamba"), torch.bfloat16), 1e-2,
                          baseline=scan_fn, tol_bwd=2e-2)),
        ("states in/out, z, softplus",
         lambda: _compare("states in/out, z, softplus", _make(*_shape("mamba"), torch.bfloat16,
                                                              states=_shape("mamba")[0]), 1e-2, tol_bwd=2e-2)),
        # A 512-token prompt at batch 1: the forward's small-grid rule narrows its channel blocks (to 4).
        ("prefill at batch 1, narrow channel blocks",
         lambda: _compare("prefill at batch 1 (narrow channel blocks), z, softplus",
                          _make(*_shape("prefill"), torch.bfloat16), 1e-2, baseline=scan_fn, tol_bwd=2e-2)),
        ("fp32, odd L, no z",
         lambda: _compare("fp32, odd L, no z", _make(*_shape("odd"), torch.float32, z=False, states=_shape("odd")[0]),
                          1e-4, baseline=scan_fn)),
        ("grouped B/C, fp32",
         lambda: _compare("grouped B/C, fp32", _make(*_shape("grouped")[:4], torch.float32,
                                                     groups=_shape("grouped")[4], states=_shape("grouped")[0]), 1e-4)),
        ("N=64, fp16",
         lambda: _compare("large N, fp16", _make(*_shape("n64"), torch.float16, states=_shape("n64")[0]), 4e-3,
                          tol_bwd=1e-2)),
        ("L=1", lambda: _compare("L=1", _make(*_shape("l1"), torch.bfloat16, states=_shape("l1")[0]), 1e-2,
                                 tol_bwd=2e-2)),
        ("varlen", lambda: _compare(f"varlen ({len(lengths)} seqs, one empty)",
                                    _make(1, _shape("varlen_dim"), int(cu[-1]), _shape("mamba")[3], torch.bfloat16,
                                          states=len(lengths)), 1e-2, cu, tol_bwd=2e-2)),
        ("channel-last", _layer_layout),
        ("stability", _stability),
        ("determinism", _determinism),
        ("step", lambda: _step(*_shape("step"), torch.bfloat16, baseline_update=update_fn)),
        ("step grouped", lambda: _step(*_shape("step_grouped")[:3], torch.float32, groups=_shape("step_grouped")[3])),
    ]
    if _shape("large") is not None and not SKIP_LARGE:
        checks.append(("int64 offsets", _large_offsets))
    return [_guarded(name, fn) for name, fn in checks]


# ----------------------------------------------------------------------------------------------
# Benchmarks


def _with_tiles(tiles: dict | None, fn):
    """fn() with TILES updated by ``tiles``, restored afterwards."""
    saved = dict(sst.TILES)
    if tiles:
        sst.TILES.update(tiles)
    try:
        return fn()
    finally:
        sst.TILES.clear()
        sst.TILES.update(saved)


def _outputs(inputs, dy):
    """y and every input's gradient (fp32 copies), for comparing tile settings."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs[:8]]
    y = sst.selective_scan_triton(*leaves, True)
    grads = torch.autograd.grad(y, leaves, dy)
    return [y.float()] + [g.float() for g in grads]


def _bench_row(kernel, inputs, scan_fn, tiles=None, reference=None, graphs=False) -> dict:
    """One timing row at the given TILES (restored afterwards). With ``reference`` (the default tiles'
    outputs at the same inputs), the row is first checked against it."""
    u, delta, A, B, C, D, z, bias, _ = inputs
    leaves = [u, delta, A, B, C, D, z, bias]
    dy = torch.randn(u.shape, device=u.device, generator=torch.Generator(device=u.device).manual_seed(9)).to(u.dtype)
    if u.stride(1) == 1:  # the gradient a layer hands back is channel-last like its input
        dy = dy.transpose(1, 2).contiguous().transpose(1, 2)
    row = {"kernel": kernel, "shape": "B{} D{} L{} N{} {} z softplus{}".format(
        *u.shape, A.shape[1], str(u.dtype).replace("torch.", "").replace("bfloat16", "bf16"),
        ", channel-last" if u.stride(1) == 1 else ""),
        "ours_fwd_ms": None, "ours_fwdbwd_ms": None, "mamba_ssm_fwd_ms": None, "mamba_ssm_fwdbwd_ms": None,
        # the fewest bytes: the forward reads u, delta, z, B, C and writes y; the backward reads them
        # again with dy and writes du, ddelta, dz, dB, dC (as large as the inputs)
        "bytes_fwd": nbytes(u, delta, z, B, C) + nbytes(u),
        "bytes_fwdbwd": 3 * nbytes(u, delta, z, B, C) + 2 * nbytes(u)}

    def measure():
        if reference is not None:
            outs = _outputs(inputs, dy)
            err = max(rel(a, b) for a, b in zip(outs, reference))
            row["vs_default"] = err
            if not err <= 2e-2:
                row["kernel"] += f" [MISMATCH vs default tiles: {err:.1e}]"
                return
        with torch.no_grad():
            row["ours_fwd_ms"] = _time_ms(lambda: sst.selective_scan_triton(u, delta, A, B, C, D, z, bias, True))
        grad_leaves = [t.detach().requires_grad_() for t in leaves]
        ours = lambda: sst.selective_scan_triton(*grad_leaves, True)  # noqa: E731
        row["ours_fwdbwd_ms"] = _time_ms(fwd_bwd(ours, grad_leaves, [dy]))
        if graphs:
            with torch.no_grad():
                row["ours_fwd_graph_ms"] = _time_graph_ms(
                    lambda: sst.selective_scan_triton(u, delta, A, B, C, D, z, bias, True))
            row["ours_fwdbwd_graph_ms"] = _time_graph_ms(fwd_bwd(ours, grad_leaves, [dy]))

    _with_tiles(tiles, measure)
    if scan_fn is not None:
        base = [t.detach().contiguous() if t.dim() == 3 else t.detach() for t in leaves]
        with torch.no_grad():
            row["mamba_ssm_fwd_ms"] = _time_ms(lambda: scan_fn(*base, True))
        grad_base = [t.requires_grad_() for t in base]
        theirs = lambda: scan_fn(*grad_base, True)  # noqa: E731
        row["mamba_ssm_fwdbwd_ms"] = _time_ms(fwd_bwd(theirs, grad_base, [dy.contiguous()]))
        if graphs:
            with torch.no_grad():
                row["mamba_ssm_fwd_graph_ms"] = _time_graph_ms(lambda: scan_fn(*base, True))
            row["mamba_ssm_fwdbwd_graph_ms"] = _time_graph_ms(fwd_bwd(theirs, grad_base, [dy.contiguous()]))
    return row


def _time_ms(fn) -> float:
    return time_ms(fn, smoke=SMOKE)


def _time_graph_ms(fn) -> float | None:
    return graph_ms(fn, smoke=SMOKE)


def _deadline_passed(deadline: float | None) -> bool:
    return deadline is not None and time.time() > deadline


def run_bench(sweep: bool = False, deadline: float | None = None, verbose: bool = False) -> list[dict]:
    torch.manual_seed(0)
    scan_fn, update_fn = _baseline()
    inputs = _make(*_shape("bench"), torch.bfloat16)
    rows = [_bench_row("selective_scan", inputs, scan_fn, graphs=True)]
    if verbose:
        print(_fmt_bench(rows[-1]), flush=True)
    layer_inputs = _make(*_shape("bench"), torch.bfloat16, channel_last=True)
    rows.append(_bench_row("selective_scan (layer views)", layer_inputs, scan_fn, graphs=True))
    if verbose:
        print(_fmt_bench(rows[-1]), flush=True)
    if sweep:
        references = {}
        for layout, data in (("bdl", inputs), ("cl", layer_inputs)):
            dy = torch.randn(data[0].shape, device=data[0].device,
                             generator=torch.Generator(device=data[0].device).manual_seed(9)).to(data[0].dtype)
            references[layout] = _outputs(data, dy)
        for tiles, layout in SWEEP:
            data = inputs if layout == "bdl" else layer_inputs
            if _deadline_passed(deadline):
                rows.append({"kernel": f"tiles {tiles} ({layout}): skipped (time budget)", "shape": "-"})
                continue
            try:
                row = _bench_row(f"selective_scan tiles {tiles}", data, None, tiles, references[layout])
            except Exception as error:  # a tile that does not compile (registers / shared memory)
                row = {"kernel": f"tiles {tiles}: {type(error).__name__}: {str(error)[:80]}", "shape": "-"}
            rows.append(row)
            if verbose:
                print(_fmt_bench(row), flush=True)
    batch, dim, dstate = _shape("step")
    x = torch.randn(batch, dim, device=DEV, dtype=torch.bfloat16)
    dt = torch.randn(batch, dim, device=DEV, dtype=torch.bfloat16)
    z = torch.randn(batch, dim, device=DEV, dtype=torch.bfloat16)
    A = -torch.rand(dim, dstate, device=DEV)
    B = torch.randn(batch, dstate, device=DEV, dtype=torch.bfloat16)
    C = torch.randn(batch, dstate, device=DEV, dtype=torch.bfloat16)
    D, dt_bias = torch.randn(dim, device=DEV), torch.randn(dim, device=DEV)
    state = torch.randn(batch, dim, dstate, device=DEV)
    row = {"kernel": "selective_scan_step", "shape": f"B{batch} D{dim} N{dstate} bf16, fp32 state",
           "ours_fwd_ms": _time_ms(lambda: sst.selective_scan_step_triton(state, x, dt, A, B, C, D, z, dt_bias, True)),
           "ours_fwdbwd_ms": None, "mamba_ssm_fwd_ms": None, "mamba_ssm_fwdbwd_ms": None,
           "bytes_fwd": 2 * nbytes(state) + 4 * nbytes(x), "bytes_fwdbwd": None}
    if update_fn is not None:
        row["mamba_ssm_fwd_ms"] = _time_ms(lambda: update_fn(state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias,
                                                             dt_softplus=True))
    rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Running it directly: compile everything in parallel first (a cold GPU machine spends most of its
# time in Triton compilation otherwise), then the two tables.


def precompile(sweep: bool, checks: bool = True) -> float:
    """Compile the kernels the checks and benchmarks will launch, in parallel threads: every launch
    inside becomes a compile-only warm-up (same shapes, dtypes and options as the real calls, so the
    same specializations). Returns the seconds spent."""
    start = time.time()

    def calls(tiles=None, only_bench=False, channel_last=False):
        def go():
            def both(inputs, cu=None, final=True, save=True):
                u, delta, A, B, C, D, z, bias, h0 = inputs
                y, fin, ck = sst.selective_scan_fwd(u, delta, A, B, C, D, z, bias, True, h0, final, cu, save)
                if save:
                    sst.selective_scan_bwd(u, delta, A, B, C, D, z, bias, True, h0, cu, ck, torch.empty_like(u),
                                           torch.empty_like(fin) if final else None)

            bench = _make(*_shape("bench"), torch.bfloat16, channel_last=channel_last)
            both(bench, final=False)
            both(bench, final=False, save=False)
            if tiles is not None:
                return
            both(_make(*_shape("bench"), torch.bfloat16, channel_last=True), final=False)
            both(_make(*_shape("bench"), torch.bfloat16, channel_last=True), final=False, save=False)
            if only_bench:
                return
            both(_make(*_shape("mamba"), torch.bfloat16))
            both(_make(*_shape("mamba"), torch.bfloat16, states=_shape("mamba")[0]))
            both(_make(*_shape("odd"), torch.float32, z=False, states=_shape("odd")[0]))
            g = _shape("grouped")
            both(_make(*g[:4], torch.float32, groups=g[4], states=g[0]))
            both(_make(*_shape("n64"), torch.float16, states=_shape("n64")[0]))
            both(_make(*_shape("l1"), torch.bfloat16, states=_shape("l1")[0]))
            lengths = VARLEN_LENGTHS
            cu = torch.tensor([0] + lengths, device=DEV).cumsum(0).to(torch.int32)
            both(_make(1, _shape("varlen_dim"), int(cu[-1]), 16, torch.bfloat16, states=len(lengths)), cu)
            both(_make(*_shape("layer"), torch.bfloat16, channel_last=True), final=False)
            both(_make(*_shape("stability"), torch.float32, states=_shape("stability")[0]))
            both(_make(*_shape("bench"), torch.bfloat16, states=_shape("bench")[0]))
        return lambda: _with_tiles(tiles, go)

    with compile_only_launches():
        calls(only_bench=not checks)()
        if sweep:
            for tiles, layout in SWEEP:
                calls(tiles, only_bench=True, channel_last=layout == "cl")()
    return time.time() - start


def _fmt_bench(row: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{v:.3f}"

    ratio = ""
    if row.get("ours_fwd_ms") and row.get("mamba_ssm_fwd_ms"):
        ratio = f"fwd {row['ours_fwd_ms'] / row['mamba_ssm_fwd_ms']:.2f}x"
    if row.get("ours_fwdbwd_ms") and row.get("mamba_ssm_fwdbwd_ms"):
        ratio += f", f+b {row['ours_fwdbwd_ms'] / row['mamba_ssm_fwdbwd_ms']:.2f}x"
    extra = f" (vs default {row['vs_default']:.1e})" if "vs_default" in row else ""
    graph = ""
    if row.get("ours_fwdbwd_graph_ms") is not None:
        graph = (f" | graphs: ours {ms(row.get('ours_fwd_graph_ms'))} / {ms(row.get('ours_fwdbwd_graph_ms'))}, "
                 f"mamba_ssm {ms(row.get('mamba_ssm_fwd_graph_ms'))} / {ms(row.get('mamba_ssm_fwdbwd_graph_ms'))}")
    return (f"| {row.get('kernel')}{extra} | {row.get('shape')} | {ms(row.get('ours_fwd_ms'))} | "
            f"{ms(row.get('ours_fwdbwd_ms'))} | {ms(row.get('mamba_ssm_fwd_ms'))} | "
            f"{ms(row.get('mamba_ssm_fwdbwd_ms'))} | {ratio}{graph} |")


def _prefill_rows() -> list[str]:
    """The forward at the batch-1 prefill shape (mamba1-130m, 512 tokens) with the channel block the
    small-grid rule picks, beside the block of TILES["fwd"] (the rule off), and how far their outputs
    are apart. Graph-replayed device time (``graph_ms``)."""
    u, delta, A, B, C, D, z, bias, _ = _make(*_shape("prefill"), torch.bfloat16)

    def fwd():
        return sst.selective_scan_triton(u, delta, A, B, C, D, z, bias, True)

    rows, outs = [], {}
    for label, setting in (("small-grid rule (default)", None), ("TILES['fwd'] block (rule off)", 0)):
        old = sst.TILES.get("fwd_min_programs")
        sst.TILES["fwd_min_programs"] = setting
        try:
            outs[label] = fwd()
            ms = graph_ms(fwd, smoke=SMOKE) if not SMOKE else None
        finally:
            sst.TILES["fwd_min_programs"] = old
        rows.append((label, ms))
    a, b = outs.values()
    err = rel(a, b)  # the sum over the state runs over other lanes: equal up to the order of additions
    return [f"| {label} | {_shape('prefill')} | {'-' if ms is None else f'{ms * 1e3:.1f} us'} | "
            f"outputs differ by {err:.1e} |" for label, ms in rows]


def main() -> None:
    import argparse

    global DEV, SMOKE, SKIP_LARGE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time (and verify) the tile settings in SWEEP")
    parser.add_argument("--budget", type=float, default=None, help="seconds; skip the remaining sweep rows after it")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--skip-large", action="store_true", help="leave out the >2^31-element check")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--cpu-smoke", action="store_true", help="CPU + Triton interpreter at tiny shapes")
    parser.add_argument("--prefill", action="store_true",
                        help="only the forward at the batch-1 prefill shape, with and without the small-grid rule")
    args = parser.parse_args()
    start = time.time()
    deadline = None if args.budget is None else start + args.budget
    SKIP_LARGE = args.skip_large
    if args.cpu_smoke:
        DEV, SMOKE = "cpu", True
    print(f"torch {torch.__version__}, device: "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() and not SMOKE else 'cpu (interpreter)'}",
          flush=True)
    if args.prefill:
        print("| forward setting | shape | device time | note |\n|---|---|---|---|")
        print("\n".join(_prefill_rows()), flush=True)
        return
    if not SMOKE:
        print(f"precompiled in {precompile(args.sweep, not args.skip_checks):.1f} s", flush=True)
    if not args.skip_checks:
        print("| case | shape | dtype | rel err fwd | rel err bwd | result | note |\n|---|---|---|---|---|---|---|")
        failed = 0
        for row in run_checks():
            failed += not row["pass"]
            fmt = lambda e: "-" if e is None else f"{e:.2e}"  # noqa: E731
            print(f"| {row['name']} | {row['shape']} | {row['dtype']} | {fmt(row['err_fwd'])} | "
                  f"{fmt(row['err_bwd'])} | {'PASS' if row['pass'] else 'FAIL'} | {row['note']} |", flush=True)
        print(f"checks: {failed} failed ({time.time() - start:.0f} s)", flush=True)
    if not args.skip_bench:
        print("\n| kernel | shape | ours fwd ms | ours fwd+bwd ms | mamba_ssm fwd ms | mamba_ssm fwd+bwd ms | "
              "ours / mamba_ssm |\n|---|---|---|---|---|---|---|", flush=True)
        rows = run_bench(args.sweep, deadline, verbose=True)
        print(_fmt_bench(rows[-1]))
        print(f"bench done ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
