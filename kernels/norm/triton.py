"""Fused (gated) RMSNorm with an optional residual add, in Triton: forward and backward.

Semantics are those of ``reference.py``. Shapes: x, z, residual [..., D] (fp16 / bf16 / fp32 / fp64);
weight [D]; ``group_size`` G divides D. Rows are processed as an [NG, G] tile (NG = D / G groups), so
one program normalizes a whole row, every group at once. D and G are compile-time constants: with a
run-time G the compiler cannot prove the column offsets aligned and falls back to 2-byte loads.

    h   = x                     or, with a residual, residual_out = (x + residual) in
                                residual_out_dtype and h = residual_out (the pre-norm block pattern)
    h  *= silu(z)               (gated, norm_before_gate=False)
    out = h * rstd(h) * weight  (rstd per group: 1 / sqrt(mean(h^2) + eps))
    out *= silu(z)              (gated, norm_before_gate=True)

Backward (per row, n = h * rstd, dn the gradient reaching n):
    dh = rstd * (dn - n * mean_group(dn * n));  dweight = sum_rows dy * n (* silu(z))
and the chain rule through the gate. With a residual, the gradient reaching residual_out (from the
norm, plus the incoming gradient of the returned residual_out) is both dx and dresidual.

dweight is reduced without atomics: each program accumulates its rows' contributions in fp32
registers, writes one partial row, and ``torch.sum`` over the partial rows finishes it, so gradients
are bit-identical across runs. Row offsets are int64.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.host import call_op, cdiv, next_power_of_2, op_function

MAX_ROW = 65536  # features per row held in registers by one program


@triton.jit
def _rms_fwd_kernel(
    x_ptr, res_ptr, z_ptr, w_ptr, out_ptr, res_out_ptr, rstd_ptr,
    M, eps,
    stride_x, stride_r, stride_z, stride_o, stride_ro,
    D: tl.constexpr, G: tl.constexpr, HAS_RES: tl.constexpr, STORE_RES: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    groups = tl.arange(0, BLOCK_G)
    cols = groups[:, None] * G + tl.arange(0, BLOCK_N)[None, :]
    col_mask = (groups[:, None] < D // G) & (tl.arange(0, BLOCK_N)[None, :] < G)
    weight = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    for r in range(ROWS):
        row = tl.program_id(0).to(tl.int64) * ROWS + r
        mask = col_mask & (row < M)
        h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(ACC)
        if HAS_RES:
            h += tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(ACC)
        if STORE_RES:
            # The norm reads the stored (rounded) residual, as the backward will.
            rounded = h.to(res_out_ptr.dtype.element_ty)
            tl.store(res_out_ptr + row * stride_ro + cols, rounded, mask=mask)
            h = rounded.to(ACC)
        if HAS_Z:
            z = tl.load(z_ptr + row * stride_z + cols, mask=mask, other=0.0).to(ACC)
            silu_z = z * tl.sigmoid(z)
            if not NORM_BEFORE_GATE:
                h = h * silu_z
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) / G + eps)
        out = h * rstd[:, None] * weight
        if HAS_Z:
            if NORM_BEFORE_GATE:
                out = out * silu_z
        tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + row * (D // G) + groups, rstd, mask=(groups < D // G) & (row < M))


@triton.jit
def _rms_bwd_kernel(
    h_ptr, z_ptr, w_ptr, rstd_ptr, dy_ptr, dres_out_ptr, dx_ptr, dres_ptr, dz_ptr, dw_part_ptr,
    M,
    stride_h, stride_z, stride_dy, stride_dro, stride_dx, stride_dr, stride_dz,
    D: tl.constexpr, G: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, HAS_DRES_OUT: tl.constexpr,
    STORE_DRES: tl.constexpr, ACC: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    """Rows [pid * ROWS, (pid + 1) * ROWS); h is x (or residual_out) before the gate."""
    pid = tl.program_id(0)
    groups = tl.arange(0, BLOCK_G)
    cols = groups[:, None] * G + tl.arange(0, BLOCK_N)[None, :]
    col_mask = (groups[:, None] < D // G) & (tl.arange(0, BLOCK_N)[None, :] < G)
    weight = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    dw_acc = tl.zeros((BLOCK_G, BLOCK_N), dtype=ACC)
    for r in range(ROWS):
        row = pid.to(tl.int64) * ROWS + r
        mask = col_mask & (row < M)
        x = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(ACC)
        rstd = tl.load(rstd_ptr + row * (D // G) + groups, mask=(groups < D // G) & (row < M), other=0.0)
        h = x
        if HAS_Z:
            z = tl.load(z_ptr + row * stride_z + cols, mask=mask, other=0.0).to(ACC)
            sig = tl.sigmoid(z)
            silu_z = z * sig
            dsilu_z = sig * (1.0 + z * (1.0 - sig))
            if not NORM_BEFORE_GATE:
                h = x * silu_z
        n = h * rstd[:, None]
        if HAS_Z and NORM_BEFORE_GATE:
            dn = dy * weight * silu_z
            dw_acc += dy * n * silu_z
            dz = dy * n * weight * dsilu_z
        else:
            dn = dy * weight
            dw_acc += dy * n
        dh = rstd[:, None] * (dn - n * (tl.sum(dn * n, axis=1) / G)[:, None])
        if HAS_Z and not NORM_BEFORE_GATE:
            dz = dh * x * dsilu_z
            dh = dh * silu_z
        if HAS_DRES_OUT:
            dh += tl.load(dres_out_ptr + row * stride_dro + cols, mask=mask, other=0.0).to(ACC)
        tl.store(dx_ptr + row * stride_dx + cols, dh.to(dx_ptr.dtype.element_ty), mask=mask)
        if STORE_DRES:
            tl.store(dres_ptr + row * stride_dr + cols, dh.to(dres_ptr.dtype.element_ty), mask=mask)
        if HAS_Z:
            tl.store(dz_ptr + row * stride_dz + cols, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_part_ptr + pid.to(tl.int64) * D + cols, dw_acc, mask=col_mask)


# ----------------------------------------------------------------------------------------------
# Launch helpers


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _blocks(dim: int, group_size: int) -> tuple[int, int, int]:
    """(BLOCK_G, BLOCK_N, num_warps) for a row of ``dim`` features in groups of ``group_size``."""
    block_g = next_power_of_2(dim // group_size)
    block_n = next_power_of_2(group_size)
    warps = min(16, max(1, block_g * block_n // 256))
    return block_g, block_n, warps


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[..., dim] -> [M, dim] with unit feature stride (a copy only when needed)."""
    t = t.reshape(-1, dim)
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("ssm_suite::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, eps: float, z: torch.Tensor | None, group_size: int,
    norm_before_gate: bool, residual: torch.Tensor | None, residual_out_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, z, residual [M, D] (unit feature stride). Returns (out [M, D] in x's dtype,
    residual_out [M, D] in residual_out_dtype (or an empty tensor), rstd [M, D / G] fp32)."""
    rows, dim = x.shape
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.empty_like(x)
    store_res = residual_out_dtype is not None
    res_out = torch.empty(rows, dim, device=x.device, dtype=residual_out_dtype) if store_res else x.new_empty(0)
    rstd = torch.empty(rows, dim // group_size, device=x.device, dtype=acc_dtype)
    block_g, block_n, warps = _blocks(dim, group_size)
    rows_per_prog = 1 if rows <= 16 * _num_sms(x.device) else 4
    if rows > 0:
        _rms_fwd_kernel[(cdiv(rows, rows_per_prog),)](
            x, residual, z, weight, out, res_out, rstd, rows, eps,
            x.stride(0), 0 if residual is None else residual.stride(0), 0 if z is None else z.stride(0),
            out.stride(0), res_out.stride(0) if store_res else 0, D=dim, G=group_size,
            HAS_RES=residual is not None, STORE_RES=store_res, HAS_Z=z is not None,
            NORM_BEFORE_GATE=norm_before_gate, ACC=_acc(x.dtype),
            BLOCK_G=block_g, BLOCK_N=block_n, ROWS=rows_per_prog, num_warps=warps,
        )
    return out, res_out, rstd


@rms_norm_fwd.register_fake
def _(x, weight, eps, z, group_size, norm_before_gate, residual, residual_out_dtype):
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    res_out = (x.new_empty(x.shape, dtype=residual_out_dtype) if residual_out_dtype is not None
               else x.new_empty(0))
    return torch.empty_like(x), res_out, x.new_empty(x.shape[0], x.shape[1] // group_size, dtype=acc_dtype)


@torch.library.custom_op("ssm_suite::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(
    h: torch.Tensor, weight: torch.Tensor, z: torch.Tensor | None, rstd: torch.Tensor, group_size: int,
    norm_before_gate: bool, dy: torch.Tensor, dres_out: torch.Tensor | None, x_dtype: torch.dtype,
    residual_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """h: the normalized input before the gate (x, or residual_out). Returns (dx [M, D] in x_dtype,
    dweight [D], dz (or empty), dresidual in residual_dtype (or empty))."""
    rows, dim = h.shape
    acc_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    dx = torch.empty(rows, dim, device=h.device, dtype=x_dtype)
    dres = (torch.empty(rows, dim, device=h.device, dtype=residual_dtype) if residual_dtype is not None
            else h.new_empty(0))
    dz = torch.empty_like(z) if z is not None else h.new_empty(0)
    block_g, block_n, warps = _blocks(dim, group_size)
    # About 4 programs per SM, each over a contiguous run of rows (a power of two, so few variants
    # compile); the partial dweight rows are then few.
    rows_per_prog = next_power_of_2(max(1, cdiv(rows, 4 * _num_sms(h.device))))
    n_prog = max(1, cdiv(rows, rows_per_prog))
    dw_part = torch.empty(n_prog, dim, device=h.device, dtype=acc_dtype)
    if rows > 0:
        _rms_bwd_kernel[(n_prog,)](
            h, z, weight, rstd, dy, dres_out, dx, dres, dz, dw_part, rows,
            h.stride(0), 0 if z is None else z.stride(0), dy.stride(0),
            0 if dres_out is None else dres_out.stride(0), dx.stride(0),
            dres.stride(0) if residual_dtype is not None else 0, dz.stride(0) if z is not None else 0,
            D=dim, G=group_size, HAS_Z=z is not None, NORM_BEFORE_GATE=norm_before_gate, HAS_DRES_OUT=dres_out is not None,
            STORE_DRES=residual_dtype is not None, ACC=_acc(h.dtype),
            BLOCK_G=block_g, BLOCK_N=block_n, ROWS=rows_per_prog, num_warps=warps,
        )
        dweight = dw_part.sum(0).to(weight.dtype)
    else:
        dweight = torch.zeros_like(weight)
    return dx, dweight, dz, dres


@rms_norm_bwd.register_fake
def _(h, weight, z, rstd, group_size, norm_before_gate, dy, dres_out, x_dtype, residual_dtype):
    dres = h.new_empty(h.shape, dtype=residual_dtype) if residual_dtype is not None else h.new_empty(0)
    dz = torch.empty_like(z) if z is not None else h.new_empty(0)
    return h.new_empty(h.shape, dtype=x_dtype), torch.empty_like(weight), dz, dres


def _setup_context(ctx, inputs, output) -> None:
    x, weight, eps, z, group_size, norm_before_gate, residual, residual_out_dtype = inputs
    _, res_out, rstd = output
    ctx.save_for_backward(res_out if residual_out_dtype is not None else x, weight, z, rstd)
    ctx.group_size = group_size
    ctx.norm_before_gate = norm_before_gate
    ctx.x_dtype = x.dtype
    ctx.residual_dtype = None if residual is None else residual.dtype
    ctx.prenorm = residual_out_dtype is not None


def _backward(ctx, dout, dres_out, drstd):
    h, weight, z, rstd = ctx.saved_tensors
    # Without the residual output the autograd engine may still hand us a (meaningless) empty grad.
    dres_out = dres_out if ctx.prenorm else None
    if dout is None:
        dout = torch.zeros(h.shape, device=h.device, dtype=ctx.x_dtype)
    dx, dweight, dz, dres = call_op(rms_norm_bwd, h, weight, z, rstd, ctx.group_size, ctx.norm_before_gate,
                                         dout, dres_out, ctx.x_dtype, ctx.residual_dtype)
    return (dx, dweight, None, dz if z is not None else None, None, None,
            dres if ctx.residual_dtype is not None else None, None)


rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


# The training path's autograd: the registered one, without torch.library's per-call wrapper (kernels/host.py).
_RMSNormFunction = op_function(rms_norm_fwd, _setup_context, _backward, differentiable_outputs=2)


def rms_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    z: torch.Tensor | None = None,
    group_size: int | None = None,
    norm_before_gate: bool = False,
    residual: torch.Tensor | None = None,
    residual_out_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton (gated) RMSNorm with an optional fused residual add; the contract of
    ``rms_norm_reference`` (returns (out, residual_out) when residual or residual_out_dtype is given)."""
    dim = x.shape[-1]
    group_size = dim if group_size is None else group_size
    if group_size <= 0 or dim % group_size != 0:
        raise ValueError(f"rms_norm: group_size {group_size} does not divide the last dimension {dim}")
    if dim > MAX_ROW:
        raise ValueError(f"rms_norm (triton): {dim} features exceed the {MAX_ROW} one program holds; "
                         "use the reference backend (SSM_SUITE_BACKEND_RMS_NORM=reference)")
    for name, t in (("z", z), ("residual", residual)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"rms_norm: {name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
        if t is not None and t.device != x.device:
            raise ValueError(f"rms_norm: {name} is on {t.device}, x on {x.device}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"rms_norm (triton): unsupported dtype {x.dtype}")
    prenorm = residual is not None or residual_out_dtype is not None
    if prenorm and residual_out_dtype is None:
        residual_out_dtype = residual.dtype
    args = (_rows(x, dim), weight, float(eps), None if z is None else _rows(z, dim), group_size,
            norm_before_gate, None if residual is None else _rows(residual, dim), residual_out_dtype)
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, z, residual))
    out, res_out, _ = _RMSNormFunction.apply(*args) if grads else call_op(rms_norm_fwd, *args)
    out = out.reshape(x.shape)
    return (out, res_out.reshape(x.shape)) if prenorm else out
