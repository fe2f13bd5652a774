"""GPU checks and benchmarks of the Triton causal depthwise conv1d (forward, backward, step).

Checks compare with the reference evaluated in float64 on the GPU (and report the CUDA kernels of the
``causal_conv1d`` package next to it when importable). Benchmarks time ours against
``causal_conv1d.causal_conv1d_fn`` / ``causal_conv1d_update``. Run directly for both tables:
    PYTHONPATH=. python3 scripts/gpu_checks/causal_conv1d.py
"""

from __future__ import annotations

import torch

from kernels.causal_conv1d.reference import causal_conv1d_reference, causal_conv1d_step_reference
from kernels.causal_conv1d.triton import causal_conv1d_step_triton, causal_conv1d_triton
from scripts.gpu_checks import bench_ms, check_row, fwd_bwd, max_rel, nbytes, rel

DEV = "cuda"


def _baseline():
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    except Exception:  # not installed, or its CUDA extension does not load
        return None, None
    return causal_conv1d_fn, causal_conv1d_update


def _make(batch, dim, L, width, dtype, *, states=None, channel_last=False, bias=True):
    if channel_last:
        x = torch.randn(batch, L, dim, device=DEV, dtype=dtype).transpose(1, 2)
    else:
        x = torch.randn(batch, dim, L, device=DEV, dtype=dtype)
    weight = (torch.randn(dim, width, device=DEV) / width**0.5).to(dtype)
    b = torch.randn(dim, device=DEV).to(dtype) if bias else None
    init = None if states is None else torch.randn(states, dim, width - 1, device=DEV).to(dtype)
    return x, weight, b, init


def _compare(name, x, weight, bias, init, activation, cu_seqlens=None, tol=1e-2, baseline=None):
    """Ours vs the float64 reference: y, final state, dx, dweight, dbias, dinit."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias, init) if t is not None]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]

    def unpack(ts):
        it = iter(ts)
        return [next(it) if t is not None else None for t in (x, weight, bias, init)]

    xo, wo, bo, io = unpack(leaves)
    xr, wr, br, ir = unpack(ref_leaves)
    y, final = causal_conv1d_triton(xo, wo, bo, activation, io, True, cu_seqlens)
    y_ref, final_ref = causal_conv1d_reference(xr, wr, br, activation, ir, True, cu_seqlens)
    gy = torch.randn_like(y_ref)
    gf = torch.randn_like(final_ref)
    grads = torch.autograd.grad([y, final], leaves, [gy.to(y.dtype), gf.float()])
    grads_ref = torch.autograd.grad([y_ref, final_ref], ref_leaves, [gy, gf])
    err_fwd = max_rel([(y, y_ref), (final, final_ref)])
    err_bwd = max_rel(zip(grads, grads_ref))
    note = ""
    if baseline is not None and cu_seqlens is None:
        try:
            base_leaves = [t.detach().clone().requires_grad_() for t in leaves]
            xb, wb, bb, ib = unpack(base_leaves)
            yb, fb = baseline(xb, wb, bb, initial_states=ib, return_final_states=True, activation=activation)
            gb = torch.autograd.grad([yb, fb], base_leaves, [gy.to(yb.dtype), gf.to(fb.dtype)])
            note = (f"causal_conv1d CUDA: fwd {max_rel([(yb, y_ref), (fb, final_ref)]):.1e} "
                    f"bwd {max_rel(zip(gb, grads_ref)):.1e}")
        except Exception as error:  # its own layout limits (states need channel-last x)
            note = f"causal_conv1d CUDA n/a: {str(error)[:60]}"
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


def _determinism() -> dict:
    x, weight, bias, init = _make(8, 1792, 2048, 4, torch.bfloat16, states=8)
    leaves = [t.requires_grad_() for t in (x, weight, bias, init)]
    gy = torch.randn_like(x)
    runs = [torch.autograd.grad(causal_conv1d_triton(*leaves[:3], "silu", leaves[3]), leaves, gy)
            for _ in range(2)]
    same = all(torch.equal(a, b) for a, b in zip(*runs))
    row = check_row("bwd bit-identical on re-run", tuple(x.shape) + (4,), x.dtype, None, 0.0 if same else 1.0, 0.0)
    return row


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


def run_checks() -> list[dict]:
    torch.manual_seed(0)
    base_fn, base_update = _baseline()
    rows = []
    for dim in (3072, 1792):
        rows.append(_compare("silu, bias, init/final state", *_make(8, dim, 2048, 4, torch.bfloat16, states=8),
                             "silu", baseline=base_fn))
    rows.append(_compare("channel-last x, odd L", *_make(4, 1792, 1001, 4, torch.bfloat16, states=4,
                                                         channel_last=True), "silu", baseline=base_fn))
    lengths = [1, 7, 1000, 3, 2048, 0, 45]
    cu = torch.tensor([0] + lengths, device=DEV).cumsum(0).to(torch.int32)
    rows.append(_compare("varlen (7 seqs, one empty)", *_make(1, 1792, int(cu[-1]), 4, torch.float16,
                                                              states=len(lengths)), "silu", cu_seqlens=cu))
    for width in (2, 3):
        rows.append(_compare(f"W={width}, no bias/act", *_make(3, 700, 777, width, torch.float32, states=3,
                                                               bias=False), None, tol=1e-5))
    rows.append(_compare("L=1", *_make(5, 256, 1, 4, torch.bfloat16, states=5), "silu"))
    rows.append(_determinism())
    rows.append(_step(64, 3072, 4, torch.bfloat16, base_update))
    rows.append(_step(7, 1792, 3, torch.float32, None))
    rows.append(_large_offsets())
    return rows


def run_bench() -> list[dict]:
    torch.manual_seed(0)
    base_fn, base_update = _baseline()
    rows = []
    for dim, channel_last in ((3072, False), (1792, False), (1792, True)):
        batch, L, width = 8, 2048, 4
        x, weight, bias, _ = _make(batch, dim, L, width, torch.bfloat16, channel_last=channel_last)
        x.requires_grad_()
        weight.requires_grad_()
        bias.requires_grad_()
        dy = torch.randn_like(x)
        ours = lambda: causal_conv1d_triton(x, weight, bias, "silu")  # noqa: E731
        row = {"kernel": "causal_conv1d" + (" (channel-last x)" if channel_last else ""),
               "shape": f"B{batch} D{dim} L{L} W{width} bf16 silu",
               "ours_fwd_ms": bench_ms(ours),
               "ours_fwdbwd_ms": bench_ms(fwd_bwd(ours, [x, weight, bias], [dy])),
               "mamba_ssm_fwd_ms": None, "mamba_ssm_fwdbwd_ms": None,
               "bytes_fwd": 2 * nbytes(x), "bytes_fwdbwd": 5 * nbytes(x)}
        if base_fn is not None:
            theirs = lambda: base_fn(x, weight, bias, activation="silu")  # noqa: E731
            row["mamba_ssm_fwd_ms"] = bench_ms(theirs)
            row["mamba_ssm_fwdbwd_ms"] = bench_ms(fwd_bwd(theirs, [x, weight, bias], [dy]))
        rows.append(row)
    batch, dim, width = 64, 3072, 4
    x = torch.randn(batch, dim, device=DEV, dtype=torch.bfloat16)
    state = torch.randn(batch, dim, width - 1, device=DEV, dtype=torch.bfloat16)
    weight = torch.randn(dim, width, device=DEV, dtype=torch.bfloat16)
    bias = torch.randn(dim, device=DEV, dtype=torch.bfloat16)
    row = {"kernel": "causal_conv1d_step", "shape": f"B{batch} D{dim} W{width} bf16",
           "ours_fwd_ms": bench_ms(lambda: causal_conv1d_step_triton(x, state, weight, bias, "silu")),
           "ours_fwdbwd_ms": None, "mamba_ssm_fwd_ms": None, "mamba_ssm_fwdbwd_ms": None,
           "bytes_fwd": 2 * nbytes(x) + 2 * nbytes(state), "bytes_fwdbwd": None}
    if base_update is not None:
        row["mamba_ssm_fwd_ms"] = bench_ms(lambda: base_update(x, state, weight, bias, "silu"))
    rows.append(row)
    return rows


if __name__ == "__main__":
    import sys

    sys.argv = [sys.argv[0], "--ops", "causal_conv1d"]
    from scripts.gpu_check import main

    main()
