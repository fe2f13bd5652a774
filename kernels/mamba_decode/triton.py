"""One decoding step of a whole Mamba-1 block in three Triton kernels (semantics: ``reference.py``).

At batch 1 a 130M model's decoding step is bound by the number of kernels, not by bytes: every kernel
of a CUDA graph costs a few microseconds however little it does, while the block's weights (7.4 MB in
bf16 at d_model 768) take ~3 us to read. The op-by-op block is 7 kernels (add + norm, in_proj, conv,
x_proj, dt_proj, scan, out_proj); this is 3, each reading its weights once, for any batch size:

1. ``_in_conv_kernel``: residual add + RMSNorm + in_proj + conv step + SiLU (+ the x_proj partials).
   Program (c, b): a block of BC channels of the x half (c < DI / BC) or of the z half of in_proj, for a
   tile of BB rows. It first gets each row's 1 / rms: from the previous block's partial sums of squares
   (``residual_sumsq``, [P, B]) when the residual already holds that block's output, else from one
   pass over the row (x + residual). It then streams the row in chunks of BK features, normalizes and
   rounds each chunk to the weights' dtype (as the op-by-op norm's output is) and multiplies it into
   its [BC, BK] weight tile. x-half programs apply the depthwise conv to their channels (shifting
   conv_state in place: each state entry is read and rewritten by the program that owns its channel)
   and SiLU; z-half programs store z. At small batch the x-half programs also multiply their channels
   into x_proj: x_dbl partials [DI / BC, B, J] (J = dt_rank + 2 d_state), so x_proj costs no kernel
   of its own and its weight is read once. At large batch the partials would be re-read too often by
   the next kernel (once per channel block and batch tile), so x_proj is one matmul there.
2. ``_scan_kernel``: x_proj reduction + dt_proj + softplus + selective state update + C.h + D x + the
   gate. Program (d, b): BD channels for BB rows. It sums the x_dbl partials in a fixed order (no
   atomics: the same result every run), rounds dt_low, B and C to the weights' dtype (x_proj's output),
   computes dt = dt_low @ dt_proj[d]^T (rounded, then + dt_bias, softplus), updates its [BB, BD, N]
   states in place in float32 and stores y.
3. ``_out_kernel``: out_proj + residual add. Program (n, b): BN output features for BB rows; it adds the
   rounded out_proj output to the residual, stores the new residual and the partial sum of squares of
   its BN features per row: the [DM / BN, B] ``sumsq`` that the next block's kernel 1 sums.

Products: ``_mm`` is a tensor-core ``tl.dot`` when the batch tile has >= 16 rows (padded rows are
masked: the weight tile is what costs) and a broadcast multiply-sum in registers for tiny batches
(GEMV), where a 16-row padding would waste the tensor cores' registers; float32 models use IEEE
float32 dots (never TF32). Accumulation is float32; float64 models take the op-by-op path (the caller
checks :func:`unsupported`). Every intermediate that the op-by-op step rounds (norm output, in_proj,
conv, x_proj, dt_proj, scan and out_proj outputs) is rounded at the same place, so the two differ only
in the order of additions. Offsets are int64. State updated in place (conv window, SSM state) is read
whole and rewritten after a barrier: a small tile is replicated over a program's threads, and one
replica must not overwrite an entry that another has yet to read (the interpreter cannot show this race;
the first H100 run did).

On sm_90+ the GEMV-tile kernels are launched with programmatic dependent launch (``kernels/pdl.py``).
Where a whole row fits in registers (``PRE``: mamba1-130m at batch 1-4) each kernel loads its weights and
its layer's state before waiting for its predecessor (neither is written by it), and after the wait
issues its remaining loads together: one round trip to memory a kernel instead of 3-7. Elsewhere the
kernels prefetch their weights into L2 and load in chunks after the wait.

Measured on an H100 (docs/kernels/mamba_decode.md): a mamba1-130m block step at batch 1 takes 8.1 us
against 27 us op by op, the whole decoding step 0.28 ms against 0.59 ms; at batch 64 the
tl.dot tiles lose to the op-by-op step's cuBLAS matmuls (1.11 vs 0.75 ms a step), so ``core.cuda_graph``
runs this step only for small batches (``FUSED_MAMBA1_MAX_BATCH``). Kernel 2 also runs alone on x_proj's
output (``mamba1_scan_step_op``): dt_proj inside the scan, for the op-by-op step at larger batches.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.host import cdiv, next_power_of_2
from kernels.mamba_decode.reference import STATE_DTYPES
from kernels.pdl import line_elems, lines_pow2, pdl_enabled, prefetch_l2, prefetch_rows_l2, wait_for_prior_kernel
from kernels.selective_scan.triton import _softplus  # the scan step's softplus, for equal dt

MAX_DSTATE = 256
MAX_XPROJ = 1024  # dt_rank + 2 d_state: one register row of the x_proj partials
MAX_WIDTH = 8  # conv width (the conv window is unrolled)
MAX_ROWS = 65535 * 16  # rows: the batch tiles are the grid's second axis (65535 at most)
# Triton 3.6's CPU interpreter computes bfloat16 tl.dot wrongly and rounds float32 -> bfloat16 by
# truncation; there the dots run on float32 copies of the operands (exact for 16-bit inputs, the same
# products the tensor cores form) and ``_round`` rounds to nearest even by hand, as the GPU does.
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")

# Tiles. Batches up to "small_batch" rows take the register GEMV path ("small"), larger ones tl.dot
# ("large"). "elems": register elements of one broadcast product [BB, BC, BK]; "part": x_proj through
# kernel 1's partials (None: where the rule in ``tiles`` says so); "pre": GEMV kernels that load whole
# weight rows before waiting for the previous kernel, where the product over a whole row stays within
# "pre_elems_per_warp" register elements a warp at up to "pre_max_warps" warps (``tiles``: PRE1, PRE2,
# PRE3). Tests and benchmarks may override.
TILES = {
    "small_batch": 4,
    "small": {"BC": 16, "BD": 32, "BN": 4, "elems": 4096, "warps1": 4, "warps3": 4, "part": None, "pre": True,
              "pre_elems_per_warp": 8192, "pre_max_warps": 8},
    "large": {"BB1": 64, "BC": 32, "BK1": 64, "BB2": 16, "BD": 32, "BB3": 32, "BN": 32, "BK3": 64,
              "warps1": 8, "warps3": 4},
}


# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _mm(a, b, DOT: tl.constexpr, IEEE: tl.constexpr):
    """a [M, K] @ b [N, K]^T -> [M, N] float32."""
    if DOT:
        if _INTERPRET:
            out = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
        elif IEEE:
            out = tl.dot(a, tl.trans(b), input_precision="ieee")
        else:
            out = tl.dot(a, tl.trans(b))
    else:
        out = tl.sum(a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :], axis=2)
    return out


@triton.jit
def _acc_zeros(BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr):
    """The accumulator of a product a [BB, BK] @ w [BN, BK]^T taken in chunks of BK (``_acc_add``):
    [BB, BN] for tl.dot tiles; for GEMV tiles per-lane partial products [BB, BN, BK], reduced once after
    the loop (``_acc_sum``: no shuffles per chunk)."""
    if DOT:
        acc = tl.zeros([BB, BN], dtype=tl.float32)
    else:
        acc = tl.zeros([BB, BN, BK], dtype=tl.float32)
    return acc


@triton.jit
def _acc_add(acc, a, w, DOT: tl.constexpr, IEEE: tl.constexpr):
    """acc (``_acc_zeros``) plus one chunk's a [BB, BK] @ w [BN, BK]^T."""
    if DOT:
        acc += _mm(a, w, DOT, IEEE)
    else:
        acc += a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    return acc


@triton.jit
def _acc_sum(acc, DOT: tl.constexpr):
    """The product [BB, BN] float32 from its accumulator (``_acc_zeros``)."""
    if DOT:
        out = acc
    else:
        out = tl.sum(acc, axis=2)
    return out


@triton.jit
def _round(x, dtype: tl.constexpr):
    """float32 x rounded to ``dtype`` (to nearest even)."""
    if _INTERPRET:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _store_residual(acc, wo_ptr, res_in_ptr, stride_rib, res_out_ptr, stride_rob, ssq_ptr, stride_qp, pid_n, rows,
                    cols, rmask, nmask, res_tile, RES_TILE: tl.constexpr):
    """The end of a block step (both mixers' kernel 3): residual_out = round(out_proj's acc) + residual_in
    (rounded as F.linear rounds it, then added in the norm's order), stored, and this program's partial
    sums of squares of the rows, which the next block's norm reads instead of the rows. With RES_TILE the
    caller has loaded residual_in's [BB, BN] tile already (``res_tile``)."""
    mask = rmask[:, None] & nmask[None, :]
    h = _round(acc, wo_ptr.dtype.element_ty).to(tl.float32)
    if RES_TILE:
        h += res_tile.to(tl.float32)
    else:
        h += tl.load(res_in_ptr + rows[:, None] * stride_rib + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h = _round(h, res_out_ptr.dtype.element_ty)
    tl.store(res_out_ptr + rows[:, None] * stride_rob + cols[None, :], h, mask=mask)
    h = tl.where(mask, h.to(tl.float32), 0.0)
    tl.store(ssq_ptr + pid_n.to(tl.int64) * stride_qp + rows, tl.sum(h * h, axis=1), mask=rmask)


@triton.jit
def _load_stream(x_ptr, res_ptr, stream_ptr, rows, cols, mask, stride_xb, stride_rb,
                 HAS_X: tl.constexpr, HAS_RES: tl.constexpr):
    """r = x + residual for a [BB, BK] tile, rounded to the stream's dtype, as float32."""
    if HAS_X:
        h = tl.load(x_ptr + rows[:, None] * stride_xb + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            h += tl.load(res_ptr + rows[:, None] * stride_rb + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = _round(h, stream_ptr.dtype.element_ty).to(tl.float32)
    else:
        h = tl.load(res_ptr + rows[:, None] * stride_rb + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return h


@triton.jit
def _norm_in_proj(x_ptr, res_ptr, ssq_ptr, stream_ptr, nw_ptr, win_ptr, rows, rmask, wrow, wmask, write_stream,
                  eps, stride_xb, stride_rb, stride_qp, stride_sb, stride_wi0, stride_wi1,
                  DM: tl.constexpr, NQ: tl.constexpr, HAS_X: tl.constexpr, HAS_RES: tl.constexpr,
                  HAS_SSQ: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr,
                  BB: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BQ: tl.constexpr):
    """The start of a block step (both mixers' kernel 1): r = x + residual, RMSNorm(r) * norm weight
    (1 / rms from the previous block's partial sums of squares when HAS_SSQ), times the in_proj rows
    ``wrow`` (masked by ``wmask``): [BB, BC] float32, rounded to the weights' dtype as F.linear rounds.
    The program with ``write_stream`` also stores r (out_proj's residual add reads it)."""
    wdt = win_ptr.dtype.element_ty
    ss = tl.zeros([BB], dtype=tl.float32)
    if HAS_SSQ:
        for q0 in range(0, NQ, BQ):
            q = q0 + tl.arange(0, BQ)
            part = tl.load(ssq_ptr + q[:, None] * stride_qp + rows[None, :],
                           mask=(q[:, None] < NQ) & rmask[None, :], other=0.0)
            ss += tl.sum(part, axis=0)
    else:
        for k0 in range(0, DM, BK):
            cols = k0 + tl.arange(0, BK)
            mask = rmask[:, None] & (cols[None, :] < DM)
            h = _load_stream(x_ptr, res_ptr, stream_ptr, rows, cols, mask, stride_xb, stride_rb, HAS_X, HAS_RES)
            ss += tl.sum(h * h, axis=1)
    rstd = 1.0 / tl.sqrt(ss / DM + eps)
    acc = _acc_zeros(BB, BC, BK, DOT)
    for k0 in range(0, DM, BK):
        cols = k0 + tl.arange(0, BK)
        kmask = cols < DM
        mask = rmask[:, None] & kmask[None, :]
        h = _load_stream(x_ptr, res_ptr, stream_ptr, rows, cols, mask, stride_xb, stride_rb, HAS_X, HAS_RES)
        if HAS_X:
            if write_stream:  # one program writes the stream (r) for out_proj's residual add
                tl.store(stream_ptr + rows[:, None] * stride_sb + cols[None, :],
                         h.to(stream_ptr.dtype.element_ty), mask=mask)
        nw = tl.load(nw_ptr + cols, mask=kmask, other=0.0).to(tl.float32)
        hn = _round(h * rstd[:, None] * nw[None, :], wdt)
        w = tl.load(win_ptr + wrow[:, None] * stride_wi0 + cols[None, :] * stride_wi1,
                    mask=wmask[:, None] & kmask[None, :], other=0.0)
        acc = _acc_add(acc, hn, w, DOT, IEEE)
    return _round(_acc_sum(acc, DOT), wdt)


@triton.jit
def _whole_rows(w_ptr, wrow, wmask, stride_w0, stride_w1, nw_ptr, DM: tl.constexpr, BK: tl.constexpr):
    """Whole-row kernels, before the wait: the weight rows ``wrow`` [BC, BK] (masked by ``wmask``) and the
    norm weight [BK] as float32, over d_model padded to BK. No kernel writes either (kernels/pdl.py)."""
    kc = tl.arange(0, BK)
    kcmask = kc < DM
    w = tl.load(w_ptr + wrow[:, None] * stride_w0 + kc[None, :] * stride_w1, mask=wmask[:, None] & kcmask[None, :],
                other=0.0)
    nw = tl.load(nw_ptr + kc, mask=kcmask, other=0.0).to(tl.float32)
    return w, nw


@triton.jit
def _norm_rows_product(x_ptr, res_ptr, stream_ptr, w, nw, rows, rmask, write_stream, eps, stride_xb, stride_rb,
                       stride_sb, DM: tl.constexpr, HAS_X: tl.constexpr, HAS_RES: tl.constexpr,
                       STORE: tl.constexpr, wdt: tl.constexpr, BK: tl.constexpr):
    """Whole-row kernels, after the wait (one round trip to memory): r = x + residual over whole rows (with
    STORE, the program with ``write_stream`` stores r), RMSNorm(r) * nw with 1 / rms from the row itself,
    rounded to ``wdt`` as the op-by-op norm's output is cast, times the rows ``w`` (``_whole_rows``):
    [BB, BC] float32, not yet rounded."""
    kc = tl.arange(0, BK)
    mask = rmask[:, None] & (kc[None, :] < DM)
    h = _load_stream(x_ptr, res_ptr, stream_ptr, rows, kc, mask, stride_xb, stride_rb, HAS_X, HAS_RES)
    if STORE:
        if write_stream:  # one program writes the stream (r) for out_proj's residual add
            tl.store(stream_ptr + rows[:, None] * stride_sb + kc[None, :], h.to(stream_ptr.dtype.element_ty),
                     mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) / DM + eps)
    hn = _round(h * rstd[:, None] * nw[None, :], wdt)
    return tl.sum(hn.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)


@triton.jit
def _pick(tile, k_range, k):
    """Column k of a [BC, BW] tile as float32 [BC] (an exact pick: one nonzero term per row)."""
    return tl.sum(tl.where(k_range[None, :] == k, tile.to(tl.float32), 0.0), axis=1)


@triton.jit
def _conv_inputs(win, kmask3, cw_ptr, cb_ptr, wx_ptr, chan, cmask, stride_cw0, stride_cw1, stride_wx0, stride_wx1,
                 J: tl.constexpr, W: tl.constexpr, HAS_CB: tl.constexpr, HAS_PART: tl.constexpr, BJ: tl.constexpr,
                 BWW: tl.constexpr):
    """Kernel 1's loads for the conv and x_proj (masked off for z-half programs by ``cmask``): the state
    window [BB, BC, BW], the conv weights [BC, BWW], the conv bias [BC] (0 without one) and the x_proj
    columns of these channels [BJ, BC] (0 without partials)."""
    old = tl.load(win, mask=kmask3, other=0.0)
    kw = tl.arange(0, BWW)
    cwt = tl.load(cw_ptr + chan[:, None] * stride_cw0 + kw[None, :] * stride_cw1,
                  mask=cmask[:, None] & (kw[None, :] < W), other=0.0)
    bias = 0.0
    if HAS_CB:
        bias = tl.load(cb_ptr + chan, mask=cmask, other=0.0).to(tl.float32)
    wx = 0.0
    if HAS_PART:
        jj = tl.arange(0, BJ)
        wx = tl.load(wx_ptr + jj[:, None] * stride_wx0 + chan[None, :] * stride_wx1,
                     mask=(jj[:, None] < J) & cmask[None, :], other=0.0)
    return old, cwt, bias, wx


@triton.jit
def _in_conv_kernel(
    x_ptr, res_ptr, ssq_ptr, nw_ptr, win_ptr, cw_ptr, cb_ptr, cs_ptr, wx_ptr,
    stream_ptr, xc_ptr, z_ptr, part_ptr,
    batch, eps,
    stride_xb, stride_rb, stride_qp, stride_sb,
    stride_wi0, stride_wi1, stride_cw0, stride_cw1, stride_csb, stride_csd, stride_csk, stride_wx0, stride_wx1,
    stride_xcb, stride_zb, stride_pp, stride_pb,
    DM: tl.constexpr, DI: tl.constexpr, J: tl.constexpr, W: tl.constexpr, NQ: tl.constexpr,
    HAS_X: tl.constexpr, HAS_RES: tl.constexpr, HAS_SSQ: tl.constexpr, HAS_CB: tl.constexpr,
    HAS_PART: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr,
    BB: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BJ: tl.constexpr, BQ: tl.constexpr, BW: tl.constexpr,
    BWW: tl.constexpr, PRE: tl.constexpr, PDL: tl.constexpr, LINE: tl.constexpr, LPD: tl.constexpr,
):
    pid_c = tl.program_id(0)
    rows = tl.program_id(1).to(tl.int64) * BB + tl.arange(0, BB)
    rmask = rows < batch
    wdt = win_ptr.dtype.element_ty

    # in_proj rows of this program: channels of the x half, or of the z half (offset by DI).
    NXB: tl.constexpr = (DI + BC - 1) // BC
    is_x = pid_c < NXB
    chan0 = tl.where(is_x, pid_c, pid_c - NXB).to(tl.int64) * BC
    chan = chan0 + tl.arange(0, BC)
    cmask = chan < DI
    wrow = tl.where(is_x, chan, chan + DI)

    mask = rmask[:, None] & cmask[None, :]
    kk = tl.arange(0, BW)
    kmask3 = mask[:, :, None] & (kk[None, None, :] < W - 1) & is_x
    win = (cs_ptr + rows[:, None, None] * stride_csb + chan[None, :, None] * stride_csd
           + kk[None, None, :] * stride_csk)
    if PRE:
        # Everything that the previous kernel does not write is loaded before waiting for it: the weights,
        # and this layer's conv window (last written by this kernel at the previous token: kernels/pdl.py).
        # After the wait only the stream's row remains to be read.
        w_in, nw = _whole_rows(win_ptr, wrow, cmask, stride_wi0, stride_wi1, nw_ptr, DM, BK)
        old, cwt, bias, wx = _conv_inputs(win, kmask3, cw_ptr, cb_ptr, wx_ptr, chan, cmask & is_x, stride_cw0,
                                          stride_cw1, stride_wx0, stride_wx1, J, W, HAS_CB, HAS_PART, BJ, BWW)
    else:
        # This program's weights and conv window into L2 while the previous kernel finishes (kernels/pdl.py).
        prefetch_rows_l2(win_ptr, wrow, cmask, stride_wi0, DM, LINE, LPD, PDL)
        lcol = tl.arange(0, LPD) * LINE
        prefetch_l2(nw_ptr + lcol, lcol < DM, nw_ptr, PDL)
        prefetch_l2(cw_ptr + chan * stride_cw0, cmask & is_x, cw_ptr, PDL)
        prefetch_l2(cs_ptr + rows[:, None] * stride_csb + chan[None, :] * stride_csd,
                    rmask[:, None] & cmask[None, :] & is_x, cs_ptr, PDL)
        if HAS_PART:
            jp = tl.arange(0, BJ)
            prefetch_l2(wx_ptr + jp * stride_wx0 + chan0 * stride_wx1, (jp < J) & is_x, wx_ptr, PDL)
    wait_for_prior_kernel(PDL)
    if PRE:
        v = _round(_norm_rows_product(x_ptr, res_ptr, stream_ptr, w_in, nw, rows, rmask, pid_c == 0, eps, stride_xb,
                                      stride_rb, stride_sb, DM, HAS_X, HAS_RES, HAS_X, wdt, BK), wdt)
    else:
        v = _norm_in_proj(x_ptr, res_ptr, ssq_ptr, stream_ptr, nw_ptr, win_ptr, rows, rmask, wrow, cmask,
                          pid_c == 0, eps, stride_xb, stride_rb, stride_qp, stride_sb, stride_wi0, stride_wi1, DM,
                          NQ, HAS_X, HAS_RES, HAS_SSQ, DOT, IEEE, BB, BC, BK, BQ)
        old, cwt, bias, wx = _conv_inputs(win, kmask3, cw_ptr, cb_ptr, wx_ptr, chan, cmask & is_x, stride_cw0,
                                          stride_cw1, stride_wx0, stride_wx1, J, W, HAS_CB, HAS_PART, BJ, BWW)

    if is_x:
        # Depthwise causal conv over (conv_state, v), adding in the order of the op-by-op conv step kernel.
        # The state window is read whole, then (after a barrier: small tiles are replicated over threads,
        # and a replica must not overwrite an entry another has yet to read) stored shifted by one.
        kw = tl.arange(0, BWW)
        y = tl.zeros([BB, BC], dtype=tl.float32)
        if HAS_CB:
            y += bias[None, :]
        y += _pick(cwt, kw, W - 1)[None, :] * v.to(tl.float32)
        for k in tl.static_range(0, W - 1):
            col = tl.sum(tl.where(kk[None, None, :] == k, old.to(tl.float32), 0.0), axis=2)  # exact pick
            y += _pick(cwt, kw, k)[None, :] * col
        tl.debug_barrier()
        tl.store(win - stride_csk, old, mask=kmask3 & (kk[None, None, :] >= 1))
        tl.store(cs_ptr + rows[:, None] * stride_csb + chan[None, :] * stride_csd + (W - 2) * stride_csk,
                 v.to(cs_ptr.dtype.element_ty), mask=mask)
        xc = _round(y * tl.sigmoid(y), wdt)
        tl.store(xc_ptr + rows[:, None] * stride_xcb + chan[None, :], xc, mask=mask)
        if HAS_PART:
            # This block's share of x_proj: x_dbl partial [BB, J] = xc[:, block] @ x_proj[:, block]^T.
            jj = tl.arange(0, BJ)
            xd = _mm(xc, wx, DOT, IEEE)
            tl.store(part_ptr + pid_c.to(tl.int64) * stride_pp + rows[:, None] * stride_pb + jj[None, :], xd,
                     mask=rmask[:, None] & (jj[None, :] < J))
    else:
        tl.store(z_ptr + rows[:, None] * stride_zb + chan[None, :], v, mask=mask)


@triton.jit
def _scan_params(wdt_ptr, dtb_ptr, A_ptr, D_ptr, d, dmask, r, n, stride_w0, stride_w1, stride_a0, stride_a1,
                 R: tl.constexpr, N: tl.constexpr, HAS_D: tl.constexpr):
    """Kernel 2's parameters for channels ``d``: dt_proj rows [BD, BR], dt_bias [BD], A [BD, BN] and D [BD]
    (float32; 0 without D)."""
    wd = tl.load(wdt_ptr + d[:, None] * stride_w0 + r[None, :] * stride_w1, mask=dmask[:, None] & (r[None, :] < R),
                 other=0.0)
    dtb = tl.load(dtb_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + d[:, None] * stride_a0 + n[None, :] * stride_a1, mask=dmask[:, None] & (n[None, :] < N),
                other=0.0).to(tl.float32)
    Dv = 0.0
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    return wd, dtb, A, Dv


@triton.jit
def _scan_kernel(
    part_ptr, wdt_ptr, dtb_ptr, A_ptr, D_ptr, xc_ptr, z_ptr, st_ptr, y_ptr,
    batch,
    stride_pp, stride_pb, stride_pj, stride_w0, stride_w1, stride_a0, stride_a1,
    stride_xcb, stride_zb, stride_sb, stride_sd, stride_sn, stride_yb,
    DI: tl.constexpr, R: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
    HAS_D: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr,
    BB: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
    PRE: tl.constexpr, PDL: tl.constexpr,
):
    rows = tl.program_id(1).to(tl.int64) * BB + tl.arange(0, BB)
    rmask = rows < batch
    d = tl.program_id(0).to(tl.int64) * BD + tl.arange(0, BD)
    dmask = d < DI
    wdt = y_ptr.dtype.element_ty
    r = tl.arange(0, BR)
    n = tl.arange(0, BN)
    mask = rmask[:, None] & dmask[None, :]
    mask3 = mask[:, :, None] & (n[None, None, :] < N)
    st = st_ptr + rows[:, None, None] * stride_sb + d[None, :, None] * stride_sd + n[None, None, :] * stride_sn
    if PRE:
        # What the previous kernel does not write, loaded before waiting for it: the weights, and this
        # layer's state (last written by this kernel at the previous token: kernels/pdl.py).
        wd, dtb, A, Dv = _scan_params(wdt_ptr, dtb_ptr, A_ptr, D_ptr, d, dmask, r, n, stride_w0, stride_w1,
                                      stride_a0, stride_a1, R, N, HAS_D)
        h = tl.load(st, mask=mask3, other=0.0).to(tl.float32)
    else:
        # Weights and this layer's state rows into L2 while the previous kernel finishes (kernels/pdl.py).
        prefetch_l2(wdt_ptr + d * stride_w0, dmask, wdt_ptr, PDL)
        prefetch_l2(A_ptr + d * stride_a0, dmask, A_ptr, PDL)
        prefetch_l2(dtb_ptr + d, dmask, dtb_ptr, PDL)
        if HAS_D:
            prefetch_l2(D_ptr + d, dmask, D_ptr, PDL)
        prefetch_l2(st_ptr + rows[:, None] * stride_sb + d[None, :] * stride_sd, rmask[:, None] & dmask[None, :],
                    st_ptr, PDL)
    wait_for_prior_kernel(PDL)
    # The conv output and the gate first: their loads are in flight with the partials'.
    x = tl.load(xc_ptr + rows[:, None] * stride_xcb + d[None, :], mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + rows[:, None] * stride_zb + d[None, :], mask=mask, other=0.0).to(tl.float32)

    # x_dbl = the sum of the partials, in a fixed order, rounded as x_proj's output.
    dtl = tl.zeros([BB, BR], dtype=tl.float32)
    Bv = tl.zeros([BB, BN], dtype=tl.float32)
    Cv = tl.zeros([BB, BN], dtype=tl.float32)
    for p0 in range(0, NP, BP):
        p = p0 + tl.arange(0, BP)
        base = part_ptr + p[:, None, None].to(tl.int64) * stride_pp + rows[None, :, None] * stride_pb
        pm = (p[:, None, None] < NP) & rmask[None, :, None]
        dtl += tl.sum(tl.load(base + r[None, None, :] * stride_pj, mask=pm & (r[None, None, :] < R),
                              other=0.0).to(tl.float32), axis=0)
        Bv += tl.sum(tl.load(base + (R + n[None, None, :]) * stride_pj, mask=pm & (n[None, None, :] < N),
                             other=0.0).to(tl.float32), axis=0)
        Cv += tl.sum(tl.load(base + (R + N + n[None, None, :]) * stride_pj, mask=pm & (n[None, None, :] < N),
                             other=0.0).to(tl.float32), axis=0)
    Bv = _round(Bv, wdt).to(tl.float32)
    Cv = _round(Cv, wdt).to(tl.float32)

    if not PRE:
        wd, dtb, A, Dv = _scan_params(wdt_ptr, dtb_ptr, A_ptr, D_ptr, d, dmask, r, n, stride_w0, stride_w1,
                                      stride_a0, stride_a1, R, N, HAS_D)
        h = tl.load(st, mask=mask3, other=0.0).to(tl.float32)
    # dt = softplus(dt_proj(dt_low) + dt_bias), dt_proj's output rounded as F.linear rounds it.
    dt = _round(_mm(_round(dtl, wdt), wd, DOT, IEEE), wdt).to(tl.float32)
    dt = _softplus(dt + dtb[None, :])
    h = tl.exp(dt[:, :, None] * A[None, :, :]) * h + (dt * x)[:, :, None] * Bv[:, None, :]
    tl.debug_barrier()  # every replica of a state entry has read it before any rewrites it
    tl.store(st, h.to(st_ptr.dtype.element_ty), mask=mask3)
    y = tl.sum(h * Cv[:, None, :], axis=2)
    if HAS_D:
        y += Dv[None, :] * x
    y = y * z * tl.sigmoid(z)
    tl.store(y_ptr + rows[:, None] * stride_yb + d[None, :], _round(y, wdt), mask=mask)


@triton.jit
def _out_kernel(
    y_ptr, wo_ptr, res_in_ptr, res_out_ptr, ssq_ptr,
    batch,
    stride_yb, stride_w0, stride_w1, stride_rib, stride_rob, stride_qp,
    DM: tl.constexpr, DI: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr,
    BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRE: tl.constexpr, PDL: tl.constexpr,
    LINE: tl.constexpr, LPI: tl.constexpr,
):
    pid_n = tl.program_id(0)
    rows = tl.program_id(1).to(tl.int64) * BB + tl.arange(0, BB)
    rmask = rows < batch
    cols = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
    nmask = cols < DM
    if PRE:
        # The weights and the residual (written two or more kernels back: kernel 1 or the previous block's
        # kernel 3; kernels/pdl.py) before the wait; after it only y is read, whole rows at once (BK >= DI).
        k = tl.arange(0, BK)
        kmask = k < DI
        w = tl.load(wo_ptr + cols[:, None] * stride_w0 + k[None, :] * stride_w1,
                    mask=nmask[:, None] & kmask[None, :], other=0.0)
        res = tl.load(res_in_ptr + rows[:, None] * stride_rib + cols[None, :], mask=rmask[:, None] & nmask[None, :],
                      other=0.0)
        wait_for_prior_kernel(PDL)
        yv = tl.load(y_ptr + rows[:, None] * stride_yb + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        acc = tl.sum(yv.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        _store_residual(acc, wo_ptr, res_in_ptr, stride_rib, res_out_ptr, stride_rob, ssq_ptr, stride_qp, pid_n,
                        rows, cols, rmask, nmask, res, True)
    else:
        prefetch_rows_l2(wo_ptr, cols, nmask, stride_w0, DI, LINE, LPI, PDL)  # kernels/pdl.py
        wait_for_prior_kernel(PDL)
        acc = _acc_zeros(BB, BN, BK, DOT)
        for k0 in range(0, DI, BK):
            k = k0 + tl.arange(0, BK)
            kmask = k < DI
            yv = tl.load(y_ptr + rows[:, None] * stride_yb + k[None, :], mask=rmask[:, None] & kmask[None, :],
                         other=0.0)
            w = tl.load(wo_ptr + cols[:, None] * stride_w0 + k[None, :] * stride_w1,
                        mask=nmask[:, None] & kmask[None, :], other=0.0)
            acc = _acc_add(acc, yv, w, DOT, IEEE)
        _store_residual(_acc_sum(acc, DOT), wo_ptr, res_in_ptr, stride_rib, res_out_ptr, stride_rob, ssq_ptr, stride_qp, pid_n, rows,
                        cols, rmask, nmask, 0.0, False)


# ----------------------------------------------------------------------------------------------
# Launch helpers


def _pow2(n: int) -> int:
    return next_power_of_2(max(1, int(n)))


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def tiles(batch: int, d_model: int, d_inner: int, d_state: int, dt_rank: int, itemsize: int = 2) -> dict:
    """The tile choice for a batch and a layer's shape (``TILES``): block sizes of the three kernels,
    whether they use tl.dot (DOT), whether x_proj goes through kernel 1's partials (PART) and how many
    partial sums of squares kernel 3 writes (NQ = ceil(d_model / BN))."""
    xproj = dt_rank + 2 * d_state
    bns, br = _pow2(d_state), _pow2(dt_rank)
    if batch <= TILES["small_batch"]:
        t = TILES["small"]
        bb, elems = _pow2(batch), t["elems"]
        bc = t["BC"]
        bd = _clamp(2 * elems // (bb * max(bns, br)), 1, t["BD"])
        cfg = dict(DOT=False, BB1=bb, BC=bc, BK1=_clamp(elems // (bb * bc), 16, _pow2(d_model)), BJ=_pow2(xproj),
                   BB2=bb, BD=bd, DOT2=False, BB3=bb, BN=t["BN"],
                   BK3=_clamp(elems // (bb * t["BN"]), 16, _pow2(d_inner)), warps1=t["warps1"], warps3=t["warps3"])
    else:
        t = TILES["large"]
        bb1 = min(t["BB1"], max(16, _pow2(batch)))
        # The scan's [BB2, BD, N] state tile stays near 8K registers' worth; tl.dot for dt_proj needs
        # BB2 and BD >= 16, so large states fall back to the register product for dt.
        bb2, bd = t["BB2"], t["BD"]
        while bb2 * bd * bns > 8192 and bd > 16:
            bd //= 2
        while bb2 * bd * bns > 8192 and bb2 > 1:
            bb2 //= 2
        cfg = dict(DOT=True, BB1=bb1, BC=t["BC"], BK1=t["BK1"], BJ=max(16, _pow2(xproj)),
                   BB2=bb2, BD=bd, DOT2=bb2 >= 16, BB3=min(t["BB3"], bb1), BN=t["BN"], BK3=t["BK3"],
                   warps1=t["warps1"], warps3=t["warps3"])
    cfg["BR"] = max(16, br) if cfg["DOT2"] else br
    cfg["BNS"] = bns
    cfg["warps2"] = TILES["small"].get("warps2") or (8 if cfg["BB2"] * cfg["BD"] * bns > 4096 else 4)
    if cfg["DOT"]:
        cfg["warps2"] = 8 if cfg["BB2"] * cfg["BD"] * bns > 4096 else 4
    cfg["NP"] = cdiv(d_inner, cfg["BC"])
    # x_proj through kernel 1's partials only while the scan kernel's re-reading of them (every channel
    # block and batch tile reads all of its rows' partials) stays well under in_proj's weight bytes, and
    # the partial product fits in registers.
    rereads = cfg["NP"] * xproj * 4 * _pow2(batch) * cdiv(d_inner, cfg["BD"])
    cfg["PART"] = (not cfg["DOT"] and rereads <= d_model * d_inner * itemsize
                   and cfg["BB1"] * cfg["BJ"] * cfg["BC"] <= 16384)
    if not cfg["DOT"] and TILES["small"].get("part") is not None:
        cfg["PART"] = bool(TILES["small"]["part"])
    np_rows = cfg["NP"] if cfg["PART"] else 1
    cfg["BP"] = _clamp(4096 // (cfg["BB2"] * max(cfg["BR"], bns)), 1, _pow2(np_rows))
    cfg["NQ"] = cdiv(d_model, cfg["BN"])
    # Whole-row kernels (GEMV only): kernel 1 over all of d_model, kernel 3 over all of d_inner, kernel 2
    # with its loads before the wait and all partials in one tile.
    # Measured on an H100 (docs/kernels/mamba_decode.md): mamba1-130m's step at batch 1 went from 0.43 to
    # 0.28 ms; more warps pay only once a product passes 4 warps' worth (batch 4).
    whole_row_tiles(cfg, TILES["small"], d_model, d_inner)
    if cfg["PRE2"]:
        per_warp = TILES["small"]["pre_elems_per_warp"]
        cfg["BP"] = _clamp(4 * per_warp // (cfg["BB2"] * max(cfg["BR"], bns)), cfg["BP"], _pow2(np_rows))
    return cfg


def whole_row_tiles(cfg: dict, small: dict, row1: int, row3: int, allow3: bool = True) -> None:
    """Both block steps' choice of whole-row kernels (GEMV tiles only), in place: kernel 1 (PRE1) over a
    row of ``row1`` features and kernel 3 (PRE3, where ``allow3``) over ``row3`` take whole rows where the
    product stays within ``small``'s "pre_elems_per_warp" elements a warp at up to "pre_max_warps" warps
    (then BK1 / BK3 span the row and the warps grow with the product); kernel 2 (PRE2) wherever the
    GEMV tiles run with "pre" on."""
    pre = not cfg["DOT"] and small["pre"]
    per_warp, max_warps = small["pre_elems_per_warp"], small["pre_max_warps"]
    rows = {"1": (row1, cfg["BB1"] * cfg["BC"]), "3": (row3, cfg["BB3"] * cfg["BN"])}
    for k, (row, tile) in rows.items():
        elems = tile * _pow2(row)
        cfg[f"PRE{k}"] = pre and elems <= per_warp * max_warps and (k == "1" or allow3)
        if cfg[f"PRE{k}"]:
            cfg[f"warps{k}"] = _clamp(elems // per_warp, cfg[f"warps{k}"], max_warps)
            cfg[f"BK{k}"] = _pow2(row)
    cfg["PRE2"] = pre


def unsupported(d_model: int, d_inner: int, d_state: int, dt_rank: int, d_conv: int,
                dtype: torch.dtype) -> str | None:
    """Why these kernels cannot run a Mamba-1 block of this shape and dtype; None when they can."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"weights in {dtype} (the fused step takes float16 / bfloat16 / float32)"
    if d_state > MAX_DSTATE:
        return f"d_state {d_state} > {MAX_DSTATE} (the state tile lives in registers)"
    if dt_rank + 2 * d_state > MAX_XPROJ:
        return f"dt_rank + 2 d_state = {dt_rank + 2 * d_state} > {MAX_XPROJ} (one register row)"
    if not 2 <= d_conv <= MAX_WIDTH:
        return f"conv width {d_conv} outside 2..{MAX_WIDTH}"
    return None


def _empty_outputs(batch: int, d_model: int, like: torch.Tensor, residual_dtype: torch.dtype,
                   nq: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (like.new_empty(batch, d_model, dtype=residual_dtype),
            like.new_empty(nq, batch, dtype=torch.float32))


@torch.library.custom_op("ssm_suite::mamba1_decode_block", mutates_args=("conv_state", "ssm_state"))
def mamba1_decode_block_op(
    conv_state: torch.Tensor, ssm_state: torch.Tensor, x: torch.Tensor | None, residual: torch.Tensor | None,
    norm_weight: torch.Tensor, norm_eps: float, in_proj_weight: torch.Tensor, conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None, x_proj_weight: torch.Tensor, dt_proj_weight: torch.Tensor,
    dt_bias: torch.Tensor, A: torch.Tensor, D: torch.Tensor | None, out_proj_weight: torch.Tensor,
    residual_dtype: torch.dtype, residual_sumsq: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Mamba-1 block for one token per row; conv_state, ssm_state updated in place. x, residual
    [B, d_model] with unit feature stride. Returns (residual_out [B, d_model] residual_dtype,
    sumsq [NQ, B] float32)."""
    batch, d_inner, width = conv_state.shape[0], conv_state.shape[1], conv_state.shape[2] + 1
    d_model, d_state, dt_rank = norm_weight.shape[0], A.shape[1], dt_proj_weight.shape[1]
    xproj = dt_rank + 2 * d_state
    wdt = in_proj_weight.dtype
    cfg = tiles(batch, d_model, d_inner, d_state, dt_rank, in_proj_weight.element_size())
    res_out, ssq = _empty_outputs(batch, d_model, norm_weight, residual_dtype, cfg["NQ"])
    if batch == 0:
        return res_out, ssq
    dev = conv_state.device
    ieee = wdt == torch.float32
    # PDL only for the register (GEMV) tiles: with the tl.dot tiles (batch > 4) the early-launched programs
    # hold registers while they wait, and an H100 ran the batch-64 step 1.37x slower with PDL than without.
    pdl, line = pdl_enabled(dev) and not cfg["DOT"], line_elems(in_proj_weight)
    xc = torch.empty(batch, d_inner, device=dev, dtype=wdt)
    z = torch.empty(batch, d_inner, device=dev, dtype=wdt)
    part = torch.empty(cfg["NP"] if cfg["PART"] else 0, batch, xproj, device=dev, dtype=torch.float32)
    # Kernel 1 writes the stream r = x + residual into res_mid, which kernel 3 reads; with the stream
    # already in `residual`, kernel 3 reads it from there. (Not in place: small tiles are replicated
    # over threads, and one replica could add twice.)
    res_mid = torch.empty_like(res_out) if x is not None else residual
    nq_in = residual_sumsq.shape[0] if residual_sumsq is not None else 1
    bq = _clamp(4096 // cfg["BB1"], 1, _pow2(nq_in))
    _in_conv_kernel[(2 * cfg["NP"], cdiv(batch, cfg["BB1"]))](
        x, residual, residual_sumsq, norm_weight, in_proj_weight, conv_weight, conv_bias, conv_state, x_proj_weight,
        res_mid if x is not None else res_out, xc, z, part, batch, float(norm_eps),
        x.stride(0) if x is not None else 0, residual.stride(0) if residual is not None else 0,
        residual_sumsq.stride(0) if residual_sumsq is not None else 0, res_out.stride(0),
        *in_proj_weight.stride(), *conv_weight.stride(), *conv_state.stride(), *x_proj_weight.stride(),
        xc.stride(0), z.stride(0), part.stride(0), part.stride(1),
        DM=d_model, DI=d_inner, J=xproj, W=width, NQ=nq_in,
        HAS_X=x is not None, HAS_RES=residual is not None, HAS_SSQ=x is None and residual_sumsq is not None,
        HAS_CB=conv_bias is not None, HAS_PART=cfg["PART"], DOT=cfg["DOT"], IEEE=ieee,
        BB=cfg["BB1"], BC=cfg["BC"], BK=cfg["BK1"], BJ=cfg["BJ"], BQ=bq, BW=_pow2(width - 1), BWW=_pow2(width),
        PRE=cfg["PRE1"], PDL=pdl, LINE=line, LPD=lines_pow2(d_model, line), num_warps=cfg["warps1"], launch_pdl=pdl,
    )
    if cfg["PART"]:
        xdbl, n_part, strides = part, cfg["NP"], part.stride()
    else:  # one matmul (rounded to the weights' dtype, as the op-by-op x_proj)
        xdbl = torch.nn.functional.linear(xc, x_proj_weight)
        n_part, strides = 1, (0, *xdbl.stride())
    y = torch.empty(batch, d_inner, device=dev, dtype=wdt)
    _scan_kernel[(cdiv(d_inner, cfg["BD"]), cdiv(batch, cfg["BB2"]))](
        xdbl, dt_proj_weight, dt_bias, A, D, xc, z, ssm_state, y, batch,
        *strides, *dt_proj_weight.stride(), *A.stride(), xc.stride(0), z.stride(0), *ssm_state.stride(),
        y.stride(0),
        DI=d_inner, R=dt_rank, N=d_state, NP=n_part, HAS_D=D is not None, DOT=cfg["DOT2"], IEEE=ieee,
        BB=cfg["BB2"], BD=cfg["BD"], BR=cfg["BR"], BN=cfg["BNS"], BP=cfg["BP"], PRE=cfg["PRE2"], PDL=pdl,
        num_warps=cfg["warps2"], launch_pdl=pdl,
    )
    _out_kernel[(cfg["NQ"], cdiv(batch, cfg["BB3"]))](
        y, out_proj_weight, res_mid, res_out, ssq, batch,
        y.stride(0), *out_proj_weight.stride(), res_mid.stride(0), res_out.stride(0), ssq.stride(0),
        DM=d_model, DI=d_inner, DOT=cfg["DOT"], IEEE=ieee, BB=cfg["BB3"], BN=cfg["BN"], BK=cfg["BK3"],
        PRE=cfg["PRE3"], PDL=pdl, LINE=line, LPI=lines_pow2(d_inner, line), num_warps=cfg["warps3"], launch_pdl=pdl,
    )
    return res_out, ssq


@mamba1_decode_block_op.register_fake
def _(conv_state, ssm_state, x, residual, norm_weight, norm_eps, in_proj_weight, conv_weight, conv_bias,
      x_proj_weight, dt_proj_weight, dt_bias, A, D, out_proj_weight, residual_dtype, residual_sumsq):
    batch, d_inner = conv_state.shape[0], conv_state.shape[1]
    d_model = norm_weight.shape[0]
    cfg = tiles(batch, d_model, d_inner, A.shape[1], dt_proj_weight.shape[1], in_proj_weight.element_size())
    return _empty_outputs(batch, d_model, norm_weight, residual_dtype, cfg["NQ"])


# ----------------------------------------------------------------------------------------------
# Backend entry point (the signature of reference.py)


def _rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """[B, D] with unit feature stride (a copy only when needed)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def mamba1_decode_block_triton(
    conv_state: torch.Tensor,
    ssm_state: torch.Tensor,
    x: torch.Tensor | None,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    norm_eps: float,
    in_proj_weight: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    x_proj_weight: torch.Tensor,
    dt_proj_weight: torch.Tensor,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor | None,
    out_proj_weight: torch.Tensor,
    residual_dtype: torch.dtype,
    residual_sumsq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused Mamba-1 block step; the contract of ``mamba1_decode_block_reference`` (the public
    function has checked the shapes)."""
    d_inner, width = conv_weight.shape
    reason = unsupported(norm_weight.shape[0], d_inner, A.shape[1], dt_proj_weight.shape[1], width,
                         in_proj_weight.dtype)
    if reason is not None:
        raise ValueError(f"mamba1_decode_block (triton): {reason}; use the op-by-op step "
                         "(SSM_SUITE_BACKEND_MAMBA1_DECODE_BLOCK=reference)")
    if ssm_state.dtype not in STATE_DTYPES:
        raise ValueError(f"mamba1_decode_block (triton): ssm_state must be float32, bfloat16 or float16, got "
                         f"{ssm_state.dtype}")
    if conv_state.shape[0] > MAX_ROWS:
        raise ValueError(f"mamba1_decode_block (triton): batch {conv_state.shape[0]} exceeds {MAX_ROWS}; "
                         "split the batch")
    if residual_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"mamba1_decode_block (triton): residual_dtype {residual_dtype} is not "
                         "float16 / bfloat16 / float32")
    return mamba1_decode_block_op(
        conv_state, ssm_state, _rows(x), _rows(residual), norm_weight, float(norm_eps), in_proj_weight,
        conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D, out_proj_weight, residual_dtype,
        residual_sumsq if x is None else None)


# ----------------------------------------------------------------------------------------------
# dt_proj + scan step alone (the op-by-op step at large batch)


@torch.library.custom_op("ssm_suite::mamba1_scan_step", mutates_args=("ssm_state",))
def mamba1_scan_step_op(ssm_state: torch.Tensor, x: torch.Tensor, z: torch.Tensor, x_dbl: torch.Tensor,
                        dt_proj_weight: torch.Tensor, dt_bias: torch.Tensor, A: torch.Tensor,
                        D: torch.Tensor | None) -> torch.Tensor:
    """``reference.mamba1_scan_step_reference`` as kernel 2 of the fused block (``_scan_kernel``) on
    x_proj's output: dt_proj is a product inside the scan instead of a separate matmul, rounded where
    F.linear rounds it. At batch 64 a 130M model's dt_proj matmul is a ~4.5 us kernel in every layer
    (docs/kernels/mamba_decode.md). x_dbl [B, J], or x_proj's float32 partial products [S, B, J]
    (``linear_partials``), which the kernel sums in order as it sums the fused block's partials.
    ssm_state float32 / bfloat16 / float16, updated in place (in float32, stored rounded); returns
    y [B, d_inner]. Launched with programmatic dependent launch (``kernels/pdl.py``): the weights and this
    layer's state rows are prefetched into L2 before the wait."""
    parts = x_dbl if x_dbl.dim() == 3 else x_dbl[None]
    batch, d_inner = x.shape
    d_state, dt_rank = A.shape[1], dt_proj_weight.shape[1]
    wdt = dt_proj_weight.dtype
    if ssm_state.dtype not in STATE_DTYPES:
        raise ValueError(f"mamba1_scan_step (triton): ssm_state must be float32, bfloat16 or float16, got "
                         f"{ssm_state.dtype}")
    if batch > MAX_ROWS:
        raise ValueError(f"mamba1_scan_step (triton): batch {batch} exceeds {MAX_ROWS}; split the batch")
    cfg = tiles(batch, 1, d_inner, d_state, dt_rank, dt_proj_weight.element_size())  # kernel 2's tiles
    y = torch.empty(batch, d_inner, device=x.device, dtype=wdt)
    if batch == 0:
        return y
    splits = parts.shape[0]
    block_parts = _clamp(4096 // (cfg["BB2"] * max(cfg["BR"], cfg["BNS"])), 1, _pow2(splits))
    pdl = pdl_enabled(x.device)
    _scan_kernel[(cdiv(d_inner, cfg["BD"]), cdiv(batch, cfg["BB2"]))](
        parts, dt_proj_weight, dt_bias, A, D, x, z, ssm_state, y, batch,
        *parts.stride(), *dt_proj_weight.stride(), *A.stride(), x.stride(0), z.stride(0),
        *ssm_state.stride(), y.stride(0),
        DI=d_inner, R=dt_rank, N=d_state, NP=splits, HAS_D=D is not None, DOT=cfg["DOT2"],
        IEEE=wdt == torch.float32, BB=cfg["BB2"], BD=cfg["BD"], BR=cfg["BR"], BN=cfg["BNS"], BP=block_parts,
        PRE=False, PDL=pdl, num_warps=cfg["warps2"], launch_pdl=pdl,
    )
    return y


@mamba1_scan_step_op.register_fake
def _(ssm_state, x, z, x_dbl, dt_proj_weight, dt_bias, A, D):
    return x.new_empty(x.shape, dtype=dt_proj_weight.dtype)


def mamba1_scan_step_triton(ssm_state: torch.Tensor, x: torch.Tensor, z: torch.Tensor, x_dbl: torch.Tensor,
                            dt_proj_weight: torch.Tensor, dt_bias: torch.Tensor, A: torch.Tensor,
                            D: torch.Tensor | None) -> torch.Tensor:
    """The triton backend of ``mamba1_scan_step`` (the custom op ``ssm_suite::mamba1_scan_step``)."""
    x_dbl = x_dbl if x_dbl.stride(-1) == 1 else x_dbl.contiguous()
    return mamba1_scan_step_op(ssm_state, _rows(x), _rows(z), x_dbl, dt_proj_weight, dt_bias, A, D)
