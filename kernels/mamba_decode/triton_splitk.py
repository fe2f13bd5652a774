"""The large-batch decoding step's matmuls as split-K partial products (semantics: ``reference.py``,
``linear_partials_reference`` and ``add_norm_partials_reference``).

At batch 64 a 130M Mamba-1 step spends ~14 us a layer in three cuBLAS calls at M = 64 (x_proj, out_proj
and in_proj, 4-5 us each) whose weights take 0.1-1.6 us to stream: each call is one long chain of
dependent loads over K. Splitting K over more programs shortens the chain, and the reduction that a
split-K matmul needs is left to the consumer, which reads its input once anyway:

- ``_partials_kernel``: program (n, m, s) multiplies the K slice s (``reference.split_bounds``) of a
  [BM, K] row tile into a [BN, K] weight tile and stores the float32 partial product [S, M, N]. It is
  launched with programmatic dependent launch (``kernels/pdl.py``): the weight tile's lines are
  prefetched into L2 before waiting for the previous kernel, which wrote x.
- ``_add_norm_kernel``: a block's output as out_proj partials, summed in order and rounded to the
  weights' dtype (F.linear's output), added to the residual stream, RMS-normalized: the next block's
  pre-norm (and the final norm) in one kernel, one program a row.
- x_proj's partials go to the scan step, whose kernel sums partials already
  (``triton.mamba1_scan_step_op``).

On an H100 at M = 64 (docs/kernels/mamba_decode.md, "Split-K"): out_proj 1536 -> 768 in 4 slices 2.6 us
(cuBLAS 5.3), x_proj 1536 -> 80 in 8 slices 1.4 us (cuBLAS 4.1); out_proj + the next add + norm 4.6 us
against 7.2 with cuBLAS and ``kernels.norm``. Products are tensor-core ``tl.dot`` tiles of float16 /
bfloat16 operands, IEEE float32 for float32 ones (never TF32); offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.host import cdiv, next_power_of_2
from kernels.mamba_decode.reference import split_size
from kernels.mamba_decode.triton import _INTERPRET, _round
from kernels.pdl import line_elems, lines_pow2, pdl_enabled, prefetch_rows_l2, wait_for_prior_kernel

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_D_MODEL = 16384  # add_norm: a whole row lives in registers
MAX_WIDTH = 8  # conv_step_partials: the conv window is unrolled
CONV_BLOCK = 128  # conv_step_partials: columns a program (one a lane)
# Tile rule of ``partials_tiles`` (measured on an H100 at M = 64: docs/kernels/mamba_decode.md): K slices
# of at least "min_slice" features, about "programs" programs, "BK" features a pipelined step.
TILES = {"programs": 96, "min_slice": 384, "BK": 64, "max_stages": 6, "warps": 4}


@triton.jit
def _dot_acc(a, w, acc, IEEE: tl.constexpr):
    """acc + a [BM, BK] @ w [BN, BK]^T in float32 (the interpreter's bfloat16 tl.dot is wrong: float32
    copies there, exact for 16-bit inputs)."""
    if _INTERPRET:
        out = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    elif IEEE:
        out = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
    else:
        out = tl.dot(a, tl.trans(w), acc)
    return out


@triton.jit
def _partials_kernel(
    x_ptr, w_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_os, stride_om,
    KS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,
    IEEE: tl.constexpr, PDL: tl.constexpr, LINE: tl.constexpr, LP: tl.constexpr,
):
    cols = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    rows = tl.program_id(1).to(tl.int64) * BM + tl.arange(0, BM)
    split = tl.program_id(2).to(tl.int64)
    nmask = cols < N
    rmask = rows < M
    lo = split * KS
    hi = tl.minimum(lo + KS, K)
    # This program's weight lines into L2 while the previous kernel (which wrote x) finishes.
    prefetch_rows_l2(w_ptr + lo, cols, nmask, stride_wn, hi - lo, LINE, LP, PDL)
    wait_for_prior_kernel(PDL)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in tl.range(0, KS, BK, num_stages=STAGES):
        k = lo + k0 + tl.arange(0, BK)
        kmask = k < hi
        a = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_wn + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        acc = _dot_acc(a, w, acc, IEEE)
    tl.store(out_ptr + split * stride_os + rows[:, None] * stride_om + cols[None, :], acc,
             mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _add_norm_kernel(
    p_ptr, res_ptr, nw_ptr, out_ptr, res_out_ptr,
    eps,
    stride_ps, stride_pm, stride_rm, stride_om, stride_qm,
    D: tl.constexpr, S: tl.constexpr, BD: tl.constexpr, HAS_RES: tl.constexpr, PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BD)
    mask = cols < D
    nw = tl.load(nw_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # never written: before the wait
    wait_for_prior_kernel(PDL)
    total = tl.load(p_ptr + row * stride_pm + cols, mask=mask, other=0.0)
    for s in tl.static_range(1, S):
        total += tl.load(p_ptr + s * stride_ps + row * stride_pm + cols, mask=mask, other=0.0)
    h = _round(total, out_ptr.dtype.element_ty).to(tl.float32)  # the linear map's output
    if HAS_RES:
        h += tl.load(res_ptr + row * stride_rm + cols, mask=mask, other=0.0).to(tl.float32)
    # The norm reads the stored (rounded) stream, as kernels.norm does.
    h = _round(h, res_out_ptr.dtype.element_ty)
    tl.store(res_out_ptr + row * stride_qm + cols, h, mask=mask)
    h = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / D + eps)
    tl.store(out_ptr + row * stride_om + cols, _round(h * rstd * nw, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_kernel(
    p_ptr, state_ptr, w_ptr, b_ptr, x_ptr, z_ptr,
    DI,
    stride_ps, stride_pb, stride_sb, stride_sd, stride_sk, stride_wd, stride_wk, stride_xb, stride_zb,
    S: tl.constexpr, W: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    """One row's BLOCK columns of in_proj's output (x half: channels < DI, z half above), from S partials.
    Each lane owns one column, so the lane that reads a channel's conv window rewrites it: no barrier."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    xmask = c < DI
    zmask = (c >= DI) & (c < 2 * DI)
    # Never written, or last written by this kernel at the previous token (kernels/pdl.py): before the wait.
    if HAS_BIAS:
        y = tl.load(b_ptr + c, mask=xmask, other=0.0).to(tl.float32)
    else:
        y = tl.zeros([BLOCK], dtype=tl.float32)
    window = state_ptr + row * stride_sb + c * stride_sd
    prev = tl.load(window, mask=xmask, other=0.0)
    y += tl.load(w_ptr + c * stride_wd, mask=xmask, other=0.0).to(tl.float32) * prev.to(tl.float32)
    w_last = tl.load(w_ptr + c * stride_wd + (W - 1) * stride_wk, mask=xmask, other=0.0).to(tl.float32)
    wait_for_prior_kernel(PDL)
    total = tl.load(p_ptr + row * stride_pb + c, mask=xmask | zmask, other=0.0)
    for s in tl.static_range(1, S):
        total += tl.load(p_ptr + s * stride_ps + row * stride_pb + c, mask=xmask | zmask, other=0.0)
    xz = _round(total, x_ptr.dtype.element_ty)  # in_proj's output
    tl.store(z_ptr + row * stride_zb + (c - DI), xz, mask=zmask)
    # new window[j] = old window[j + 1], new window[W - 2] = x: each old entry is read before it is rewritten.
    for k in tl.static_range(1, W - 1):
        cur = tl.load(window + k * stride_sk, mask=xmask, other=0.0)
        y += tl.load(w_ptr + c * stride_wd + k * stride_wk, mask=xmask, other=0.0).to(tl.float32) * cur.to(tl.float32)
        tl.store(window + (k - 1) * stride_sk, cur, mask=xmask)
    tl.store(window + (W - 2) * stride_sk, xz.to(state_ptr.dtype.element_ty), mask=xmask)
    y += w_last * xz.to(tl.float32)
    y = y * tl.sigmoid(y)
    tl.store(x_ptr + row * stride_xb + c, _round(y, x_ptr.dtype.element_ty), mask=xmask)


def partials_tiles(m: int, n: int, k: int) -> dict:
    """Tiles and the default number of K slices for an [m, k] @ [n, k]^T product (``TILES``): BM rows
    (16-64), BN = 16 / 32 / 64 output features for n <= 128 / 1024 / more, and S slices chosen for about
    TILES["programs"] programs with slices of at least TILES["min_slice"] features."""
    bm = max(16, min(64, next_power_of_2(m)))
    bn = 16 if n <= 128 else 32 if n <= 1024 else 64
    tiles = cdiv(n, bn) * cdiv(m, bm)
    splits = max(1, min(TILES["programs"] // tiles, k // TILES["min_slice"], 16))
    return {"BM": bm, "BN": bn, "BK": TILES["BK"], "S": splits}


def _stages(slice_len: int, bk: int) -> int:
    return max(2, min(TILES["max_stages"], cdiv(slice_len, bk)))


def unsupported(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why ``linear_partials``' kernel cannot take x and weight; None when it can."""
    if x.dtype not in DTYPES or weight.dtype != x.dtype:
        return f"x and weight must share one float16 / bfloat16 / float32 dtype, got {x.dtype} and {weight.dtype}"
    return None


@torch.library.custom_op("ssm_suite::linear_partials", mutates_args=())
def linear_partials_op(x: torch.Tensor, weight: torch.Tensor, splits: int) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T as float32 partial products over ``splits`` K slices: [S, M, N]. x and
    weight have unit stride along K."""
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty(splits, m, n, device=x.device, dtype=torch.float32)
    if m == 0 or n == 0:
        return out
    cfg = partials_tiles(m, n, k)
    slice_len = split_size(k, splits)
    pdl = pdl_enabled(x.device)
    line = line_elems(weight)
    _partials_kernel[(cdiv(n, cfg["BN"]), cdiv(m, cfg["BM"]), splits)](
        x, weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0), out.stride(1),
        KS=slice_len, BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], STAGES=_stages(slice_len, cfg["BK"]),
        IEEE=x.dtype == torch.float32, PDL=pdl, LINE=line, LP=lines_pow2(slice_len, line),
        num_warps=TILES["warps"], launch_pdl=pdl,
    )
    return out


@linear_partials_op.register_fake
def _(x, weight, splits):
    return x.new_empty(splits, x.shape[0], weight.shape[0], dtype=torch.float32)


@torch.library.custom_op("ssm_suite::add_norm_partials", mutates_args=())
def add_norm_partials_op(partials: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                         norm_eps: float, out_dtype: torch.dtype,
                         residual_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.add_norm_partials_reference``: partials [S, B, D] float32 (unit stride along D),
    residual [B, D] or None -> (h [B, D] out_dtype, residual_out [B, D] residual_dtype)."""
    splits, batch, dim = partials.shape
    h = torch.empty(batch, dim, device=partials.device, dtype=out_dtype)
    res_out = torch.empty(batch, dim, device=partials.device, dtype=residual_dtype)
    if batch == 0:
        return h, res_out
    pdl = pdl_enabled(partials.device)
    block = next_power_of_2(dim)
    _add_norm_kernel[(batch,)](
        partials, residual, norm_weight, h, res_out, float(norm_eps),
        partials.stride(0), partials.stride(1), 0 if residual is None else residual.stride(0), h.stride(0),
        res_out.stride(0), D=dim, S=splits, BD=block, HAS_RES=residual is not None, PDL=pdl,
        num_warps=max(1, min(16, block // 256)), launch_pdl=pdl,
    )
    return h, res_out


@add_norm_partials_op.register_fake
def _(partials, residual, norm_weight, norm_eps, out_dtype, residual_dtype):
    shape = partials.shape[1:]
    return partials.new_empty(shape, dtype=out_dtype), partials.new_empty(shape, dtype=residual_dtype)


@torch.library.custom_op("ssm_suite::conv_step_partials", mutates_args=("conv_state",))
def conv_step_partials_op(partials: torch.Tensor, conv_state: torch.Tensor, conv_weight: torch.Tensor,
                          conv_bias: torch.Tensor | None,
                          out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.conv_step_partials_reference``: partials [S, B, 2 DI] float32 (unit column stride),
    conv_state [B, DI, W - 1] updated in place -> (xc [B, DI], z [B, DI]) in out_dtype."""
    splits, batch, cols = partials.shape
    d_inner, width = conv_weight.shape
    xc = torch.empty(batch, d_inner, device=partials.device, dtype=out_dtype)
    z = torch.empty(batch, d_inner, device=partials.device, dtype=out_dtype)
    if batch == 0:
        return xc, z
    pdl = pdl_enabled(partials.device)
    _conv_kernel[(batch, cdiv(cols, CONV_BLOCK))](
        partials, conv_state, conv_weight, conv_bias, xc, z, d_inner, partials.stride(0), partials.stride(1),
        *conv_state.stride(), *conv_weight.stride(), xc.stride(0), z.stride(0),
        S=splits, W=width, HAS_BIAS=conv_bias is not None, BLOCK=CONV_BLOCK, PDL=pdl,
        num_warps=CONV_BLOCK // 32, launch_pdl=pdl,
    )
    return xc, z


@conv_step_partials_op.register_fake
def _(partials, conv_state, conv_weight, conv_bias, out_dtype):
    shape = (partials.shape[1], conv_weight.shape[0])
    return partials.new_empty(shape, dtype=out_dtype), partials.new_empty(shape, dtype=out_dtype)


# ----------------------------------------------------------------------------------------------
# Backend entry points (the signatures of reference.py)


def linear_partials_triton(x: torch.Tensor, weight: torch.Tensor, splits: int) -> torch.Tensor:
    """The triton backend of ``linear_partials`` (the public function has checked the shapes)."""
    reason = unsupported(x, weight)
    if reason is not None:
        raise ValueError(f"linear_partials (triton): {reason}; use the reference backend "
                         "(SSM_SUITE_BACKEND_LINEAR_PARTIALS=reference)")
    rows = [t if t.stride(-1) == 1 else t.contiguous() for t in (x, weight)]
    return linear_partials_op(*rows, int(splits))


def add_norm_partials_triton(partials: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                             norm_eps: float, out_dtype: torch.dtype,
                             residual_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The triton backend of ``add_norm_partials`` (the public function has checked the shapes)."""
    if partials.shape[-1] > MAX_D_MODEL:
        raise ValueError(f"add_norm_partials (triton): rows of {partials.shape[-1]} features exceed "
                         f"{MAX_D_MODEL} (a row lives in registers); use the reference backend "
                         "(SSM_SUITE_BACKEND_ADD_NORM_PARTIALS=reference)")
    for name, dtype in (("out_dtype", out_dtype), ("residual_dtype", residual_dtype)):
        if dtype not in DTYPES:
            raise ValueError(f"add_norm_partials (triton): {name} {dtype} is not float16 / bfloat16 / float32")
    partials = partials if partials.stride(-1) == 1 else partials.contiguous()
    residual = residual if residual is None or residual.stride(-1) == 1 else residual.contiguous()
    return add_norm_partials_op(partials, residual, norm_weight, float(norm_eps), out_dtype, residual_dtype)


def conv_step_partials_triton(partials: torch.Tensor, conv_state: torch.Tensor, conv_weight: torch.Tensor,
                              conv_bias: torch.Tensor | None,
                              out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The triton backend of ``conv_step_partials`` (the public function has checked the shapes)."""
    if not 2 <= conv_weight.shape[1] <= MAX_WIDTH:
        raise ValueError(f"conv_step_partials (triton): conv width {conv_weight.shape[1]} is outside 2..{MAX_WIDTH}; "
                         "use the reference backend (SSM_SUITE_BACKEND_CONV_STEP_PARTIALS=reference)")
    if out_dtype not in DTYPES:
        raise ValueError(f"conv_step_partials (triton): out_dtype {out_dtype} is not float16 / bfloat16 / float32")
    partials = partials if partials.stride(-1) == 1 else partials.contiguous()
    return conv_step_partials_op(partials, conv_state, conv_weight, conv_bias, out_dtype)
