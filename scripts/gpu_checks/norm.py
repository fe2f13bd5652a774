"""GPU checks and benchmarks of the Triton (gated) RMSNorm with fused residual add.

Checks compare with the reference evaluated in float64 on the GPU (mamba_ssm's Triton norms are
reported next to it when importable). Benchmarks time ours against ``mamba_ssm.ops.triton.layer_norm.
rms_norm_fn`` (plain, and with residual + prenorm + residual_in_fp32) and ``mamba_ssm.ops.triton.
layernorm_gated.rmsnorm_fn`` (gated). Run directly for both tables:
    PYTHONPATH=. python3 scripts/gpu_checks/norm.py
"""

from __future__ import annotations

import torch

from kernels.norm.reference import rms_norm_reference
from kernels.norm.triton import rms_norm_triton
from scripts.gpu_checks import bench_ms, check_row, fwd_bwd, max_rel, nbytes, rel

DEV = "cuda"
EPS = 1e-5


def _baseline():
    try:
        from mamba_ssm.ops.triton.layer_norm import rms_norm_fn
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn as gated_rmsnorm_fn
    except Exception:  # not importable here
        return None, None
    return rms_norm_fn, gated_rmsnorm_fn


def _make(rows, dim, dtype, gate=False, residual_dtype=None):
    x = torch.randn(rows, dim, device=DEV, dtype=dtype)
    weight = (1 + 0.2 * torch.randn(dim, device=DEV)).to(dtype)
    z = torch.randn(rows, dim, device=DEV, dtype=dtype) if gate else None
    residual = torch.randn(rows, dim, device=DEV, dtype=residual_dtype) if residual_dtype is not None else None
    return x, weight, z, residual


def _compare(name, x, weight, z, residual, group_size=None, norm_before_gate=False, residual_out_dtype=None,
             tol=1e-2, baseline=None):
    """Ours vs the float64 reference: out (and residual_out), dx, dweight, dz, dresidual."""
    present = [t for t in (x, weight, z, residual) if t is not None]
    ours_in = [t.detach().clone().requires_grad_() for t in present]
    ref_in = [t.detach().double().requires_grad_() for t in present]

    def call(fn, leaves, double=False):
        it = iter(leaves)
        xx, ww, zz, rr = [next(it) if t is not None else None for t in (x, weight, z, residual)]
        kwargs = {}
        if residual is not None or residual_out_dtype is not None:
            kwargs = {"residual": rr, "residual_out_dtype": torch.float64 if double else residual_out_dtype}
        out = fn(xx, ww, EPS, zz, group_size, norm_before_gate, **kwargs)
        return out if isinstance(out, tuple) else (out,)

    outs = call(rms_norm_triton, ours_in)
    refs = call(rms_norm_reference, ref_in, double=True)
    grads_out = [torch.randn_like(r) for r in refs]
    grads = torch.autograd.grad(outs, ours_in, [g.to(o.dtype) for g, o in zip(grads_out, outs)])
    grads_ref = torch.autograd.grad(refs, ref_in, grads_out)
    err_fwd = max_rel(zip(outs, refs))
    err_bwd = max_rel(zip(grads, grads_ref))
    note = ""
    if baseline is not None:
        try:
            note = baseline(ours_in, refs, grads_out, grads_ref)
        except Exception as error:  # the baseline's own limits are not our failure
            note = f"baseline n/a: {type(error).__name__}"
    return check_row(name, tuple(x.shape) + ((f"G{group_size}",) if group_size else ()), x.dtype, err_fwd,
                     err_bwd, tol, note=note)


def _mamba_plain(rms_norm_fn, prenorm):
    def run(leaves, refs, grads_out, grads_ref):
        leaves = [t.detach().clone().requires_grad_() for t in leaves]
        if prenorm:
            xx, ww, rr = leaves
            out, res = rms_norm_fn(xx, ww, None, residual=rr, eps=EPS, prenorm=True, residual_in_fp32=True)
            outs = (out, res)
        else:
            xx, ww = leaves
            outs = (rms_norm_fn(xx, ww, None, eps=EPS),)
        grads = torch.autograd.grad(outs, leaves, [g.to(o.dtype) for g, o in zip(grads_out, outs)])
        return f"mamba_ssm: fwd {max_rel(zip(outs, refs)):.1e} bwd {max_rel(zip(grads, grads_ref)):.1e}"

    return run


def _mamba_gated(gated_fn, group_size, norm_before_gate):
    def run(leaves, refs, grads_out, grads_ref):
        leaves = [t.detach().clone().requires_grad_() for t in leaves]
        xx, ww, zz = leaves
        out = gated_fn(xx, ww, None, z=zz, eps=EPS, group_size=group_size, norm_before_gate=norm_before_gate)
        grads = torch.autograd.grad(out, leaves, grads_out[0].to(out.dtype))
        return f"mamba_ssm: fwd {rel(out, refs[0]):.1e} bwd {max_rel(zip(grads, grads_ref)):.1e}"

    return run


def _determinism() -> dict:
    x, weight, z, _ = _make(16384, 2048, torch.bfloat16, gate=True)
    leaves = [t.requires_grad_() for t in (x, weight, z)]
    gy = torch.randn_like(x)
    runs = [torch.autograd.grad(rms_norm_triton(x, weight, EPS, z, 256, False), leaves, gy) for _ in range(2)]
    same = all(torch.equal(a, b) for a, b in zip(*runs))
    return check_row("bwd bit-identical on re-run", (16384, 2048, "G256"), x.dtype, None, 0.0 if same else 1.0, 0.0)


def _large_offsets() -> dict:
    """rows x D past 2^31 elements: check the last rows against the reference."""
    rows, dim = (1 << 20) + 1, 2048
    x, weight, _, residual = _make(rows, dim, torch.bfloat16, residual_dtype=torch.bfloat16)
    x.requires_grad_()
    out, res_out = rms_norm_triton(x, weight, EPS, residual=residual)
    dy = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, [x], dy)
    tail = slice(rows - 64, rows)
    xt = x.detach()[tail].double().requires_grad_()
    out_ref, res_ref = rms_norm_reference(xt, weight.double(), EPS, residual=residual[tail].double())
    (dx_ref,) = torch.autograd.grad(out_ref, [xt], dy[tail].double())
    err_fwd = max(rel(out[tail], out_ref), rel(res_out[tail], res_ref))
    err_bwd = rel(dx[tail], dx_ref)
    del x, out, res_out, dy, dx, residual
    torch.cuda.empty_cache()
    return check_row("int64 offsets (tail rows)", (rows, dim), torch.bfloat16, err_fwd, err_bwd, 1e-2,
                     note=f"{rows * dim / 2**31:.3f} x 2^31 elements")


def run_checks() -> list[dict]:
    torch.manual_seed(0)
    plain_fn, gated_fn = _baseline()
    rows = []
    for dim in (768, 2048):
        rows.append(_compare("residual (fp32 stream) + rms", *_make(16384, dim, torch.bfloat16,
                                                                    residual_dtype=torch.float32),
                             residual_out_dtype=torch.float32,
                             baseline=plain_fn and _mamba_plain(plain_fn, True)))
        rows.append(_compare("rms", *_make(16384, dim, torch.bfloat16),
                             baseline=plain_fn and _mamba_plain(plain_fn, False)))
    rows.append(_compare("gated, gate before norm", *_make(16384, 1536, torch.bfloat16, gate=True),
                         baseline=gated_fn and _mamba_gated(gated_fn, None, False)))
    rows.append(_compare("gated, groups, norm before gate", *_make(16384, 2048, torch.bfloat16, gate=True),
                         group_size=256, norm_before_gate=True,
                         baseline=gated_fn and _mamba_gated(gated_fn, 256, True)))
    rows.append(_compare("gated + residual, odd D, fp32", *_make(999, 1000, torch.float32, gate=True,
                                                                 residual_dtype=torch.float32),
                         group_size=200, tol=1e-5))
    rows.append(_compare("residual_out_dtype only (first block)", *_make(333, 768, torch.float16),
                         residual_out_dtype=torch.float32))
    rows.append(_determinism())
    rows.append(_large_offsets())
    return rows


def run_bench() -> list[dict]:
    torch.manual_seed(0)
    plain_fn, gated_fn = _baseline()
    rows_n = 16384
    out = []
    for dim in (768, 2048):
        # Pre-norm block: bf16 x, fp32 residual stream (mamba_ssm's residual_in_fp32=True).
        x, weight, _, residual = _make(rows_n, dim, torch.bfloat16, residual_dtype=torch.float32)
        leaves = [t.requires_grad_() for t in (x, weight, residual)]
        grads = [torch.randn_like(x), torch.randn_like(residual)]
        ours = lambda: rms_norm_triton(x, weight, EPS, residual=residual, residual_out_dtype=torch.float32)  # noqa: E731
        row = {"kernel": "rms_norm + residual (fp32)", "shape": f"{rows_n}x{dim} bf16",
               "ours_fwd_ms": bench_ms(ours), "ours_fwdbwd_ms": bench_ms(fwd_bwd(ours, leaves, grads)),
               "mamba_ssm_fwd_ms": None, "mamba_ssm_fwdbwd_ms": None,
               "bytes_fwd": 2 * nbytes(x) + 2 * nbytes(residual),
               "bytes_fwdbwd": 2 * nbytes(x) + 2 * nbytes(residual) + 2 * nbytes(x) + 3 * nbytes(residual)}
        if plain_fn is not None:
            theirs = lambda: plain_fn(x, weight, None, residual=residual, eps=EPS, prenorm=True,  # noqa: E731
                                      residual_in_fp32=True)
            row["mamba_ssm_fwd_ms"] = bench_ms(theirs)
            row["mamba_ssm_fwdbwd_ms"] = bench_ms(fwd_bwd(theirs, leaves, grads))
        out.append(row)

        x, weight, _, _ = _make(rows_n, dim, torch.bfloat16)
        leaves = [t.requires_grad_() for t in (x, weight)]
        grads = [torch.randn_like(x)]
        ours = lambda: rms_norm_triton(x, weight, EPS)  # noqa: E731
        row = {"kernel": "rms_norm", "shape": f"{rows_n}x{dim} bf16",
               "ours_fwd_ms": bench_ms(ours), "ours_fwdbwd_ms": bench_ms(fwd_bwd(ours, leaves, grads)),
               "mamba_ssm_fwd_ms": None, "mamba_ssm_fwdbwd_ms": None,
               "bytes_fwd": 2 * nbytes(x), "bytes_fwdbwd": 5 * nbytes(x)}
        if plain_fn is not None:
            theirs = lambda: plain_fn(x, weight, None, eps=EPS)  # noqa: E731
            row["mamba_ssm_fwd_ms"] = bench_ms(theirs)
            row["mamba_ssm_fwdbwd_ms"] = bench_ms(fwd_bwd(theirs, leaves, grads))
        out.append(row)
    for dim, group_size in ((1536, None), (4096, None), (4096, 512)):
        x, weight, z, _ = _make(rows_n, dim, torch.bfloat16, gate=True)
        leaves = [t.requires_grad_() for t in (x, weight, z)]
        grads = [torch.randn_like(x)]
        ours = lambda: rms_norm_triton(x, weight, EPS, z, group_size, False)  # noqa: E731
        row = {"kernel": "gated rms_norm", "shape": f"{rows_n}x{dim}" + (f" G{group_size}" if group_size else "") + " bf16",
               "ours_fwd_ms": bench_ms(ours), "ours_fwdbwd_ms": bench_ms(fwd_bwd(ours, leaves, grads)),
               "mamba_ssm_fwd_ms": None, "mamba_ssm_fwdbwd_ms": None,
               "bytes_fwd": 3 * nbytes(x), "bytes_fwdbwd": 8 * nbytes(x)}
        if gated_fn is not None:
            theirs = lambda: gated_fn(x, weight, None, z=z, eps=EPS, group_size=group_size,  # noqa: E731
                                      norm_before_gate=False)
            row["mamba_ssm_fwd_ms"] = bench_ms(theirs)
            row["mamba_ssm_fwdbwd_ms"] = bench_ms(fwd_bwd(theirs, leaves, grads))
        out.append(row)
    return out


if __name__ == "__main__":
    import sys

    sys.argv = [sys.argv[0], "--ops", "norm"]
    from scripts.gpu_check import main

    main()
