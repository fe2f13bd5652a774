"""GPU checks and benchmarks of the Triton causal depthwise conv1d (forward, backward, step).

Checks compare with the reference evaluated in float64 on the GPU (and report the CUDA kernels of the
``causal_conv1d`` package next to it when importable): the column kernels (no packed sequences, no
initial state: a model's training path) on a contiguous length axis and on channel-last x (the view
of a Mamba layer's input projection), widths 2..8, odd lengths, the final state and its gradient;
the general kernels with initial/final states and packed sequences; bit-identical gradients on
re-run; the step; an input past 2^31 elements. Benchmarks time ours against
``causal_conv1d.causal_conv1d_fn`` / ``causal_conv1d_update``; ``run_bench(sweep=True)`` also times
other column tiles (``COL_TILES``), each first checked against the default tiles' outputs.

Run directly (checks, then benchmarks; kernels compiled in parallel up front):
    PYTHONPATH=.:/tmp/site python3 scripts/gpu_checks/causal_conv1d.py [--sweep]
and on a CPU through the Triton interpreter at tiny shapes:
    PYTHONPATH=. python3 scripts/gpu_checks/causal_conv1d.py --cpu-smoke
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

from kernels.causal_conv1d import triton as ct  # noqa: E402
from kernels.causal_conv1d.reference import causal_conv1d_reference, causal_conv1d_step_reference  # noqa: E402
from kernels.causal_conv1d.triton import causal_conv1d_step_triton, causal_conv1d_triton  # noqa: E402
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

SHAPES = {"big": (8, 3072, 2048), "mid": (8, 1792, 2048), "odd": (4, 1792, 1001), "small": (3, 700, 777),
          "l1": (5, 256, 1), "varlen_dim": 1792, "step": (64, 3072), "step2": (7, 1792)}
SMOKE_SHAPES = {"big": (2, 16, 40), "mid": (2, 8, 24), "odd": (2, 8, 13), "small": (2, 6, 11),
                "l1": (2, 4, 1), "varlen_dim": 8, "step": (2, 8), "step2": (2, 6)}
VARLEN_LENGTHS = [1, 7, 1000, 3, 2048, 0, 45]
SMOKE_VARLEN_LENGTHS = [1, 5, 0, 9]
SWEEP = [{"bwd_sum": "tile"}, {"bwd_sum": "tile", "cl": True}, {"fwd_cl": (32, 16, 4)}, {"bwd_l": (16, 16, 4)}]


def _shape(name):
    return (SMOKE_SHAPES if SMOKE else SHAPES)[name]


BASELINE_ERROR = ""


def _baseline():
    """(causal_conv1d_fn, causal_conv1d_update) of the causal_conv1d package, or (None, None); why it did
    not import is kept in BASELINE_ERROR (printed by main)."""
    global BASELINE_ERROR
    if SMOKE:
        return None, None
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    except Exception as error:  # not installed, or its CUDA extension does not load
        BASELINE_ERROR = f"{type(error).__name__}: {error}"
        return None, None
    return causal_conv1d_fn, causal_conv1d_update


def _make(batch, dim, L, width, dtype, *, states=None, layout="l", bias=True):
    """layout: "l" contiguous [B, D, L]; "cl" a dense channel-last [B, L, D] seen as [B, D, L]; "proj" the
    channel-last half of a [B, L, 2D] projection (a Mamba layer's x: not dense)."""
    if layout == "cl":
        x = torch.randn(batch, L, dim, device=DEV, dtype=dtype).transpose(1, 2)
    elif layout == "proj":
        x = torch.randn(batch, L, 2 * dim, device=DEV, dtype=dtype)[..., :dim].transpose(1, 2)
    else:
        x = torch.randn(batch, dim, L, device=DEV, dtype=dtype)
    weight = (torch.randn(dim, width, device=DEV) / width**0.5).to(dtype)
    b = torch.randn(dim, device=DEV).to(dtype) if bias else None
    init = None if states is None else torch.randn(states, dim, width - 1, device=DEV).to(dtype)
    return x, weight, b, init


def _compare(name, x, weight, bias, init, activation, cu_seqlens=None, tol=1e-2, baseline=None) -> dict:
    """Ours vs the float64 reference: y, final state, dx, dweight, dbias, dinit."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias, init) if t is not None]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]

    def unpack(ts):
        it = iter(ts)
        return [next(it) if t is not None else None for t in (x, weight, bias, init)]

    xo, wo, bo, io = unpack(leaves)
    if x.stride(1) == 1 and x.stride(2) != 1:  # keep x's own (channel-last, maybe gapped) strides
        xo = leaves[0] = x.detach().requires_grad_()
    xr, wr, br, ir = unpack(ref_leaves)
    y, final = causal_conv1d_triton(xo, wo, bo, activation, io, True, cu_seqlens)
    y_ref, final_ref = causal_conv1d_reference(xr, wr, br, activation, ir, True, cu_seqlens)
    gy = torch.randn_like(y_ref)
    gf = torch.randn_like(final_ref)
    grads = torch.autograd.grad([y, final], leaves, [gy.to(y.dtype), gf.float()])
    grads_ref = torch.autograd.grad([y_ref, final_ref], ref_leaves, [gy, gf])
    err_fwd = max_rel([(y, y_ref), (final, final_ref)])
    err_bwd = max_rel(zip(grads, grads_ref))
    fwd_form = ct._column_form(x, init, cu_seqlens, forward=True)
    bwd_form = ct._column_form(x, init, cu_seqlens)
    note = (f"{fwd_form or 'general'} kernels" if fwd_form == bwd_form else
            f"{fwd_form or 'general'} forward, {bwd_form or 'general'} backward kernels")
    if baseline is not None and cu_seqlens is None:
        try:
            base_leaves = [t.detach().clone().requires_grad_() for t in leaves]
            xb, wb, bb, ib = unpack(base_leaves)
            yb, fb = baseline(xb, wb, bb, initial_states=ib, return_final_states=True, activation=activation)
            gb = torch.autograd.grad([yb, fb], base_leaves, [gy.to(yb.dtype), gf.to(fb.dtype)])
            note += (f"; causal_conv1d CUDA: fwd {max_rel([(yb, y_ref), (fb, final_ref)]):.1e} "
                     f"bwd {max_rel(zip(gb, grads_ref)):.1e}")
        except Exception as error:  # its own layout limits (states need channel-last x)
            note += f"; causal_conv1d CUDA n/a: {str(error)[:50]}"
    if x.stride(1) == 1 and x.stride(2) != 1 and not (y.stride(1) == 1 and grads[0].stride(1) == 1):
        err_fwd = math.inf
        note += f"; expected channel-last y and dx, got {y.stride()} / {grads[0].stride()}"
    return check_row(name, tuple(x.shape) + (weight.shape[1],), x.dtype, err_fwd, err_bwd, tol, note=note)


def _large_offsets() -> dict:
    """B*D*L past 2^31 elements: check the tail (whose offsets need int64) against the reference."""
    batch, dim, L, width = 1, 1024, (1 << 21) + 3, 4
    x, weight, bias, _ = _make(batch, dim, L, width, torch.bfloat16)
    x.requires_grad_()
    y = causal_conv1d_triton(x, weight, bias, "silu")
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, [x], dy)
    t0, d = L - 70, slice(dim - 16, dim)
    window = x.detach()[:, d, t0 - (width - 1):].double().requires_grad_()
    y_ref = causal_conv1d_reference(window[..., width - 1:], weight[d].double(), bias[d].double(), "silu",
                                    window[..., : width - 1])
    (dwin,) = torch.autograd.grad(y_ref, [window], dy[:, d, t0:].double())
    err_fwd = rel(y[:, d, t0:], y_ref)
    err_bwd = rel(dx[:, d, t0:], dwin[..., width - 1:])
    del x, y, dy, dx
    torch.cuda.empty_cache()
    return check_row("int64 offsets (tail)", (batch, dim, L, width), torch.bfloat16, err_fwd, err_bwd, 1e-2,
                     note=f"{batch * dim * L / 2**31:.3f} x 2^31 elements")


def _determinism(layout="l", states=True) -> dict:
    batch, dim, L = _shape("mid")
    x, weight, bias, init = _make(batch, dim, L, 4, torch.bfloat16, states=batch if states else None, layout=layout)
    leaves = [t.requires_grad_() for t in (x, weight, bias, init) if t is not None]
    gy = torch.randn_like(x)
    runs = [torch.autograd.grad(causal_conv1d_triton(x, weight, bias, "silu", init), leaves, gy) for _ in range(2)]
    same = all(torch.equal(a, b) for a, b in zip(*runs))
    kind = ct._column_form(x, init, None) or "general"
    return check_row(f"bwd bit-identical on re-run ({kind})", tuple(x.shape) + (4,), x.dtype, None,
                     0.0 if same else 1.0, 0.0)


def _step(batch, dim, width, dtype, baseline_update) -> dict:
    x = torch.randn(batch, dim, device=DEV, dtype=dtype)
    state = torch.randn(batch, dim, width - 1, device=DEV, dtype=dtype)
    weight = (torch.randn(dim, width, device=DEV) / width**0.5).to(dtype)
    bias = torch.randn(dim, device=DEV).to(dtype)
    ours_state, ref_state = state.clone(), state.double()
    y = causal_conv1d_step_triton(x, ours_state, weight, bias, "silu")
    y_ref = causal_conv1d_step_reference(x.double(), ref_state, weight.double(), bias.double(), "silu")
    note = ""
    if baseline_update is not None:
        base_state = state.clone()
        yb = baseline_update(x, base_state, weight, bias, "silu")
        note = f"causal_conv1d_update: {rel(yb, y_ref):.1e}; state equal: {torch.equal(base_state, ours_state)}"
    return check_row("step (in-place state)", (batch, dim, width), dtype,
                     max(rel(y, y_ref), rel(ours_state, ref_state)), None, 1e-2, note=note)


def _guarded(name, fn) -> dict:
    try:
        return fn()
    except Exception as error:  # a failure is a row, never a stop
        return check_row(name, "-", "-", math.inf, math.inf, 0.0, note=f"raised {error!r}"[:160])
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


SKIP_LARGE = False  # --skip-large: leave out the >2^31-element check (slow, memory-hungry)


def run_checks() -> list[dict]:
    torch.manual_seed(0)
    base_fn, base_update = _baseline()
    lengths = SMOKE_VARLEN_LENGTHS if SMOKE else VARLEN_LENGTHS
    cu = torch.tensor([0] + lengths, device=DEV).cumsum(0).to(torch.int32)
    big, mid, odd, small = _shape("big"), _shape("mid"), _shape("odd"), _shape("small")
    bf16, fp32 = torch.bfloat16, torch.float32
    checks = [
        ("columns, contiguous L", lambda: _compare("columns: silu, bias, final state", *_make(*big, 4, bf16), "silu",
                                                   baseline=base_fn)),
        ("columns, layer view", lambda: _compare("columns: channel-last view of a projection",
                                                 *_make(*mid, 4, bf16, layout="proj"), "silu", baseline=base_fn)),
        ("columns, channel-last odd L", lambda: _compare("columns: channel-last, odd L",
                                                         *_make(*odd, 4, bf16, layout="cl"), "silu")),
        ("columns, contiguous odd L", lambda: _compare("columns: odd L", *_make(*odd, 4, bf16), "silu")),
    ] + [
        (f"columns W={w}", lambda w=w, lay=lay: _compare(
            f"columns: W={w}, {lay}, no act", *_make(*small, w, fp32, layout=lay, bias=w != 3), None, tol=1e-5))
        for w, lay in ((2, "l"), (3, "cl"), (8, "l"), (8, "cl"))
    ] + [
        ("states", lambda: _compare("init/final state, silu, bias", *_make(*big, 4, bf16, states=big[0]),
                                    "silu", baseline=base_fn)),
        ("states cl", lambda: _compare("init/final state, channel-last x",
                                       *_make(*odd, 4, bf16, states=odd[0], layout="cl"), "silu", baseline=base_fn)),
        ("varlen", lambda: _compare(f"general: varlen ({len(lengths)} seqs, one empty)",
                                    *_make(1, _shape("varlen_dim"), int(cu[-1]), 4, torch.float16, states=len(lengths)),
                                    "silu", cu_seqlens=cu)),
        ("W=3 states", lambda: _compare("init/final state, W=3, no bias/act", *_make(*small, 3, fp32, states=small[0],
                                                                           bias=False), None, tol=1e-5)),
        ("L=1", lambda: _compare("L=1", *_make(*_shape("l1"), 4, bf16, states=_shape("l1")[0]), "silu")),
        ("det", lambda: _determinism("l", False)),
        ("det cl", lambda: _determinism("proj", False)),
        ("det states", lambda: _determinism("l", True)),
        ("step", lambda: _step(*_shape("step"), 4, bf16, base_update)),
        ("step2", lambda: _step(*_shape("step2"), 3, fp32, None)),
    ]
    if not SMOKE and not SKIP_LARGE:
        checks.append(("int64 offsets", _large_offsets))
    return [_guarded(name, fn) for name, fn in checks]


# ----------------------------------------------------------------------------------------------
# Benchmarks


def _time_ms(fn) -> float:
    return time_ms(fn, smoke=SMOKE)


def _time_graph_ms(fn) -> float | None:
    return graph_ms(fn, smoke=SMOKE)


def _with_tiles(tiles: dict | None, fn):
    saved = dict(ct.COL_TILES)
    if tiles:
        ct.COL_TILES.update(tiles)
    try:
        return fn()
    finally:
        ct.COL_TILES.clear()
        ct.COL_TILES.update(saved)


def _outputs(x, weight, bias, dy):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    if x.stride(1) == 1:
        leaves[0] = x.detach().requires_grad_()
    y = causal_conv1d_triton(*leaves, "silu")
    return [y.float()] + [g.float() for g in torch.autograd.grad(y, leaves, dy)]


def _bench_row(kernel, layout, dim, base_fn, tiles=None, reference=None) -> dict:
    batch, _, L = _shape("big")
    width = 4
    torch.manual_seed(1)
    x, weight, bias, _ = _make(batch, dim, L, width, torch.bfloat16, layout=layout)
    dy = _like_layout(torch.randn(batch, dim, L, device=DEV, dtype=torch.bfloat16), x)
    leaves = [x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()]
    row = {"kernel": kernel, "shape": f"B{batch} D{dim} L{L} W{width} bf16 silu, {layout}",
           "ours_fwd_ms": None, "ours_fwdbwd_ms": None, "mamba_ssm_fwd_ms": None, "mamba_ssm_fwdbwd_ms": None,
           "bytes_fwd": 2 * nbytes(x), "bytes_fwdbwd": 5 * nbytes(x)}

    def measure():
        if reference is not None:
            err = max(rel(a, b) for a, b in zip(_outputs(x, weight, bias, dy), reference))
            row["vs_default"] = err
            if not err <= 1e-2:
                row["kernel"] += f" [MISMATCH vs default tiles: {err:.1e}]"
                return
        ours = lambda: causal_conv1d_triton(x, weight, bias, "silu")  # noqa: E731
        row["ours_fwd_ms"] = _time_ms(ours)
        row["ours_fwdbwd_ms"] = _time_ms(fwd_bwd(ours, leaves, [dy]))
        row["ours_fwd_graph_ms"] = _time_graph_ms(ours)
        row["ours_fwdbwd_graph_ms"] = _time_graph_ms(fwd_bwd(ours, leaves, [dy]))

    _with_tiles(tiles, measure)
    if base_fn is not None and tiles is None:
        theirs = lambda: base_fn(x, weight, bias, activation="silu")  # noqa: E731
        try:
            row["mamba_ssm_fwd_ms"] = _time_ms(theirs)
            row["mamba_ssm_fwdbwd_ms"] = _time_ms(fwd_bwd(theirs, leaves, [dy]))
            row["mamba_ssm_fwd_graph_ms"] = _time_graph_ms(theirs)
            row["mamba_ssm_fwdbwd_graph_ms"] = _time_graph_ms(fwd_bwd(theirs, leaves, [dy]))
        except Exception as error:  # e.g. a layout the CUDA kernel does not take
            row["kernel"] += f" (causal_conv1d n/a: {str(error)[:40]})"
    return row, (x, weight, bias, dy)


def _prefill_row(base_fn) -> dict:
    """A Mamba-1 prefill's conv from a cached state (no autograd): the column kernel with the initial state
    against the general kernel it replaced and causal_conv1d's CUDA kernel, on the layer's channel-last view."""
    batch, dim, L = (2, 16, 37) if SMOKE else (64, 1536, 512)
    x, weight, bias, init = _make(batch, dim, L, 4, torch.bfloat16, states=batch, layout="proj")
    ours = lambda: causal_conv1d_triton(x, weight, bias, "silu", init, True)  # noqa: E731
    general_form = ct._column_form
    with torch.no_grad():
        want = causal_conv1d_reference(x.double(), weight.double(), bias.double(), "silu", init.double(), True)
        got = ours()
        row = {"kernel": "causal_conv1d prefill from a state (column fwd; baseline column = general kernel)",
               "shape": f"B{batch} D{dim} L{L} W4 bf16 silu, proj", "ours_fwd_ms": _time_graph_ms(ours),
               "ours_fwdbwd_ms": None, "mamba_ssm_fwd_ms": None, "mamba_ssm_fwdbwd_ms": None,
               "bytes_fwd": 2 * nbytes(x), "bytes_fwdbwd": None,
               "note": f"rel err y {rel(got[0], want[0]):.1e}, final {rel(got[1], want[1]):.1e}"}
        ct._column_form = lambda *args, **kwargs: None
        try:
            row["general_fwd_ms"] = _time_graph_ms(ours)
        finally:
            ct._column_form = general_form
        if base_fn is not None:
            # causal_conv1d takes states only with channel-last x: a dense channel-last copy, made outside.
            xb = x.transpose(1, 2).contiguous().transpose(1, 2)
            try:
                row["mamba_ssm_fwd_ms"] = _time_graph_ms(
                    lambda: base_fn(xb, weight, bias, initial_states=init, return_final_states=True, activation="silu"))
            except Exception as error:  # noqa: BLE001
                row["note"] += f"; causal_conv1d n/a: {str(error)[:60]}"
    return row


def _like_layout(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2).contiguous().transpose(1, 2) if x.stride(1) == 1 else t.contiguous()


def run_bench(sweep: bool = False, verbose: bool = False) -> list[dict]:
    base_fn, base_update = _baseline()
    rows = []
    cases = [("causal_conv1d", "l", _shape("big")[1]), ("causal_conv1d", "l", _shape("mid")[1]),
             ("causal_conv1d (channel-last)", "cl", _shape("big")[1]),
             ("causal_conv1d (layer view)", "proj", _shape("mid")[1])]
    references = {}
    for kernel, layout, dim in cases:
        row, data = _bench_row(kernel, layout, dim, base_fn)
        rows.append(row)
        if verbose:
            print(_fmt_bench(row), flush=True)
        if layout in ("l", "cl") and layout not in references:
            references[layout] = (dim, _outputs(*data))
    if sweep:
        for tiles in SWEEP:
            layout = "cl" if any(k.endswith("_cl") for k in tiles) or tiles.get("cl") else "l"
            tiles = {k: v for k, v in tiles.items() if k != "cl"}
            dim, reference = references[layout]
            try:
                row, _ = _bench_row(f"causal_conv1d tiles {tiles}", layout, dim, None, tiles, reference)
            except Exception as error:
                row = {"kernel": f"tiles {tiles}: {type(error).__name__}: {str(error)[:80]}", "shape": "-"}
            rows.append(row)
            if verbose:
                print(_fmt_bench(row), flush=True)
    row = _prefill_row(base_fn)
    rows.append(row)
    if verbose:
        print(_fmt_bench(row) + f" general kernel: {row.get('general_fwd_ms')} ms; {row['note']}", flush=True)
    batch, dim = _shape("step")
    width = 4
    x = torch.randn(batch, dim, device=DEV, dtype=torch.bfloat16)
    state = torch.randn(batch, dim, width - 1, device=DEV, dtype=torch.bfloat16)
    weight = torch.randn(dim, width, device=DEV, dtype=torch.bfloat16)
    bias = torch.randn(dim, device=DEV, dtype=torch.bfloat16)
    row = {"kernel": "causal_conv1d_step", "shape": f"B{batch} D{dim} W{width} bf16",
           "ours_fwd_ms": _time_ms(lambda: causal_conv1d_step_triton(x, state, weight, bias, "silu")),
           "ours_fwdbwd_ms": None, "mamba_ssm_fwd_ms": None, "mamba_ssm_fwdbwd_ms": None,
           "bytes_fwd": 2 * nbytes(x) + 2 * nbytes(state), "bytes_fwdbwd": None}
    if base_update is not None:
        row["mamba_ssm_fwd_ms"] = _time_ms(lambda: base_update(x, state, weight, bias, "silu"))
    rows.append(row)
    if verbose:
        print(_fmt_bench(row), flush=True)
    return rows


def precompile(sweep: bool, checks: bool = True) -> float:
    """Compile the column and general kernels the checks and benchmarks launch, in parallel threads
    (every launch inside becomes a compile-only warm-up with the real shapes)."""
    start = time.time()

    def both(x, weight, bias, init, silu=True, cu=None):
        y, final = ct.causal_conv1d_fwd(x, weight, bias, silu, init, True, cu)
        ct.causal_conv1d_bwd(x, weight, bias, silu, init, cu, torch.empty_like(y), torch.empty_like(final))
        ct.causal_conv1d_fwd(x, weight, bias, silu, init, False, cu)
        ct.causal_conv1d_bwd(x, weight, bias, silu, init, cu, torch.empty_like(y), None)

    def calls(only_bench=False):
        big, mid = _shape("big"), _shape("mid")
        for layout, dim in (("l", big[1]), ("l", mid[1]), ("cl", big[1]), ("proj", mid[1])):
            both(*_make(big[0], dim, big[2], 4, torch.bfloat16, layout=layout))
        if only_bench:
            return
        odd, small = _shape("odd"), _shape("small")
        both(*_make(*odd, 4, torch.bfloat16, layout="cl"))
        both(*_make(*odd, 4, torch.bfloat16))
        for w, lay in ((2, "l"), (3, "cl"), (8, "l"), (8, "cl")):
            both(*_make(*small, w, torch.float32, layout=lay, bias=w != 3), silu=False)
        both(*_make(*big, 4, torch.bfloat16, states=big[0]))
        both(*_make(*mid, 4, torch.bfloat16, states=mid[0]))
        both(*_make(*odd, 4, torch.bfloat16, states=odd[0], layout="cl"))
        cu = torch.tensor([0] + VARLEN_LENGTHS, device=DEV).cumsum(0).to(torch.int32)
        both(*_make(1, _shape("varlen_dim"), int(cu[-1]), 4, torch.float16, states=len(VARLEN_LENGTHS)), cu=cu)
        both(*_make(*small, 3, torch.float32, states=small[0], bias=False), silu=False)

    with compile_only_launches():
        calls(only_bench=not checks)
        if sweep:
            for tiles in SWEEP:
                _with_tiles({k: v for k, v in tiles.items() if k != "cl"}, lambda: calls(only_bench=True))
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
    if row.get("ours_fwdbwd_graph_ms") is not None:
        extra += (f" [graphs: ours {ms(row.get('ours_fwd_graph_ms'))} / {ms(row.get('ours_fwdbwd_graph_ms'))}, "
                  f"base {ms(row.get('mamba_ssm_fwd_graph_ms'))} / {ms(row.get('mamba_ssm_fwdbwd_graph_ms'))}]")
    gbs = ""
    if row.get("ours_fwd_ms") and row.get("bytes_fwd"):
        gbs = f"{row['bytes_fwd'] / row['ours_fwd_ms'] / 1e6:.0f}"
    if row.get("ours_fwdbwd_ms") and row.get("bytes_fwdbwd"):
        gbs += f" / {row['bytes_fwdbwd'] / row['ours_fwdbwd_ms'] / 1e6:.0f}"
    return (f"| {row.get('kernel')}{extra} | {row.get('shape')} | {ms(row.get('ours_fwd_ms'))} | "
            f"{ms(row.get('ours_fwdbwd_ms'))} | {ms(row.get('mamba_ssm_fwd_ms'))} | "
            f"{ms(row.get('mamba_ssm_fwdbwd_ms'))} | {ratio} | {gbs} |")


def main() -> None:
    import argparse

    global DEV, SMOKE, SKIP_LARGE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time (and verify) the tile settings in SWEEP")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--skip-large", action="store_true", help="leave out the >2^31-element check")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--cpu-smoke", action="store_true", help="CPU + Triton interpreter at tiny shapes")
    args = parser.parse_args()
    start = time.time()
    SKIP_LARGE = args.skip_large
    if args.cpu_smoke:
        DEV, SMOKE = "cpu", True
    print(f"torch {torch.__version__}, device: "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() and not SMOKE else 'cpu (interpreter)'}",
          flush=True)
    if not SMOKE:
        print(f"precompiled in {precompile(args.sweep, not args.skip_checks):.1f} s", flush=True)
        if _baseline()[0] is None:
            print(f"causal_conv1d baseline not importable: {BASELINE_ERROR}", flush=True)
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
        print("\n| kernel | shape | ours fwd ms | ours fwd+bwd ms | causal_conv1d fwd ms | causal_conv1d fwd+bwd ms | "
              "ours / causal_conv1d | ours GB/s fwd / f+b |\n|---|---|---|---|---|---|---|---|", flush=True)
        run_bench(args.sweep, verbose=True)
        print(f"bench done ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
