"""One decoding step of a whole Mamba-2 block in three Triton kernels (semantics:
``reference.mamba2_decode_block_reference``).

The op-by-op Mamba-2 block step is 6 kernels (add + norm, in_proj, conv, ssd_step, gated norm,
out_proj) plus the copies that reshape in_proj's split output at batch > 1. This is 3, for any batch:

1. ``_in_conv_kernel``: residual add + RMSNorm + in_proj + conv step + SiLU. Program (c, b): BC rows of
   in_proj (the z | xBC | dt output, d_inner + conv_dim + H rows; a block may straddle the parts) for a
   tile of BB batch rows. 1 / rms comes from the previous fused block's partial sums of squares or from
   one pass over the row; the row is then streamed in BK chunks, normalized, rounded to the weights'
   dtype and multiplied into the weight tile. Rows of the xBC part go through the depthwise conv (the
   conv window is read whole, then written shifted after a barrier) and SiLU. The kernel stores one
   [B, d_inner + conv_dim + H] buffer: z, conv'd xBC, raw dt, each rounded as the op-by-op step rounds it.
2. ``_scan_kernel``: ssd_step for one (row, head) and BP of its headdim channels: dt discretized (bias,
   softplus, clamp; the ssd step kernel's ``_discretize``), the [BP, N] state updated in float32 (read
   whole, written after a barrier), y = C.h + D x rounded to the weights' dtype (ssd_step's output), and
   the partial sum over those channels of (y * silu(z))^2 for the gated norm: ``part`` [H * NPB, B].
3. ``_out_kernel``: gated RMSNorm + out_proj + residual add. Program (n, b): BN output features for BB
   rows. Per norm group it sums that group's partials (a contiguous run of ``part``, fixed order: no
   atomics, bit-identical re-runs), then streams the group's y and z, applies the norm and rounds to the
   weights' dtype (the norm's output), and multiplies into out_proj. The rounded output is added to the
   stream, stored in a fresh buffer (never in place: small tiles are replicated over threads) together
   with the partial sums of squares [DM / BN, B] that the next fused block's norm reads.

Products use ``kernels.mamba_decode.triton._mm`` (register GEMV tiles up to ``TILES["small_batch"]``
rows, tl.dot above) and its interpreter-safe rounding. Offsets are int64. Float64 models are not taken
(the caller checks :func:`unsupported`).

At small batches (``PRE1`` / ``PRE2`` / ``PRE3``, as in the Mamba-1 kernels) each kernel loads its whole
weight rows and its layer's state before waiting for the previous kernel (programmatic dependent launch,
``kernels/pdl.py``: nothing it loads there is written by that kernel) and then issues its remaining loads
together. On an H100 that took mamba2-130m's batch-1 step from 0.40 to 0.28 ms
(docs/kernels/mamba_decode.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.host import cdiv
from kernels.mamba_decode.reference import STATE_DTYPES
from kernels.pdl import line_elems, lines_pow2, pdl_enabled, prefetch_l2, prefetch_rows_l2, wait_for_prior_kernel
from kernels.mamba_decode.triton import (MAX_ROWS, MAX_WIDTH, _acc_add, _acc_sum, _acc_zeros, _clamp,
                                         _conv_inputs, _norm_in_proj, _norm_rows_product, _pick, _pow2, _round,
                                         _rows, _store_residual, _whole_rows, whole_row_tiles)
from kernels.ssd.triton import _discretize  # the ssd step's dt (bias, softplus, clamp), for equal dt

MAX_DSTATE = 256
MAX_HEADDIM = 256

# Tiles: batches up to "small_batch" rows take register GEMV products, larger ones tl.dot. "elems": the
# register elements of one broadcast product [BB, BC, BK]; "state": elements of kernel 2's state tile;
# "pre" (GEMV only): kernels that load whole rows and their state before waiting for the previous kernel
# (the Mamba-1 kernels' scheme, ``triton.TILES``), where a whole-row product stays within
# "pre_elems_per_warp" register elements a warp at up to "pre_max_warps" warps (kernel 3: one norm group).
TILES = {
    "small_batch": 4,
    "small": {"BC": 16, "BN": 4, "elems": 4096, "warps": 4, "pre": True, "pre_elems_per_warp": 8192,
              "pre_max_warps": 8},
    "large": {"BB1": 64, "BC": 32, "BK1": 64, "BB3": 32, "BN": 32, "BK3": 64, "warps1": 8, "warps3": 4},
    "state": 4096,
}


# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _in_conv_kernel(
    x_ptr, res_ptr, ssq_ptr, nw_ptr, win_ptr, cw_ptr, cb_ptr, cs_ptr,
    stream_ptr, out_ptr,
    batch, eps,
    stride_xb, stride_rb, stride_qp, stride_sb,
    stride_wi0, stride_wi1, stride_cw0, stride_cw1, stride_csb, stride_csd, stride_csk, stride_ob,
    DM: tl.constexpr, DI: tl.constexpr, CD: tl.constexpr, NR: tl.constexpr, W: tl.constexpr, NQ: tl.constexpr,
    HAS_X: tl.constexpr, HAS_RES: tl.constexpr, HAS_SSQ: tl.constexpr, HAS_CB: tl.constexpr,
    DOT: tl.constexpr, IEEE: tl.constexpr,
    BB: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BQ: tl.constexpr, BW: tl.constexpr, BWW: tl.constexpr,
    PRE: tl.constexpr, PDL: tl.constexpr, LINE: tl.constexpr, LPD: tl.constexpr,
):
    pid_c = tl.program_id(0)
    rows = tl.program_id(1).to(tl.int64) * BB + tl.arange(0, BB)
    rmask = rows < batch
    wdt = win_ptr.dtype.element_ty

    # This program's in_proj rows: z (< DI), xBC (the conv channels), dt (the last H rows).
    orow = pid_c.to(tl.int64) * BC + tl.arange(0, BC)
    omask = orow < NR
    is_conv = (orow >= DI) & (orow < DI + CD)
    chan = tl.where(is_conv, orow - DI, 0)
    mask = rmask[:, None] & omask[None, :]
    cmask = mask & is_conv[None, :]
    kk = tl.arange(0, BW)
    kmask3 = cmask[:, :, None] & (kk[None, None, :] < W - 1)
    win = (cs_ptr + rows[:, None, None] * stride_csb + chan[None, :, None] * stride_csd
           + kk[None, None, :] * stride_csk)

    if PRE:
        # What the previous kernel does not write, before waiting for it (the Mamba-1 kernel 1's scheme,
        # kernels/mamba_decode/triton.py): the whole in_proj rows, the norm weight, the conv weights and
        # this layer's conv window. After the wait only the stream's row is read.
        w_in, nw = _whole_rows(win_ptr, orow, omask, stride_wi0, stride_wi1, nw_ptr, DM, BK)
        old, cwt, bias, _ = _conv_inputs(win, kmask3, cw_ptr, cb_ptr, cw_ptr, chan, is_conv, stride_cw0, stride_cw1,
                                         0, 0, 1, W, HAS_CB, False, 1, BWW)
        wait_for_prior_kernel(PDL)
        v = _round(_norm_rows_product(x_ptr, res_ptr, stream_ptr, w_in, nw, rows, rmask, pid_c == 0, eps, stride_xb,
                                      stride_rb, stride_sb, DM, HAS_X, HAS_RES, HAS_X, wdt, BK), wdt)
    else:
        # This program's weights and conv window into L2 while the previous kernel finishes (kernels/pdl.py).
        prefetch_rows_l2(win_ptr, orow, omask, stride_wi0, DM, LINE, LPD, PDL)
        lcol = tl.arange(0, LPD) * LINE
        prefetch_l2(nw_ptr + lcol, lcol < DM, nw_ptr, PDL)
        prefetch_l2(cw_ptr + chan * stride_cw0, is_conv, cw_ptr, PDL)
        prefetch_l2(cs_ptr + rows[:, None] * stride_csb + chan[None, :] * stride_csd,
                    rmask[:, None] & is_conv[None, :], cs_ptr, PDL)
        wait_for_prior_kernel(PDL)
        v = _norm_in_proj(x_ptr, res_ptr, ssq_ptr, stream_ptr, nw_ptr, win_ptr, rows, rmask, orow, omask, pid_c == 0,
                          eps, stride_xb, stride_rb, stride_qp, stride_sb, stride_wi0, stride_wi1, DM, NQ, HAS_X,
                          HAS_RES, HAS_SSQ, DOT, IEEE, BB, BC, BK, BQ)
        old, cwt, bias, _ = _conv_inputs(win, kmask3, cw_ptr, cb_ptr, cw_ptr, chan, is_conv, stride_cw0, stride_cw1,
                                         0, 0, 1, W, HAS_CB, False, 1, BWW)

    # Depthwise causal conv + SiLU over the xBC rows (masked elsewhere), adding in the order of the
    # op-by-op conv step. The window is read whole and rewritten shifted only after a barrier: a small
    # tile is replicated over threads, and no replica may overwrite an entry another has yet to read.
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
             v.to(cs_ptr.dtype.element_ty), mask=cmask)
    xc = _round(y * tl.sigmoid(y), wdt)
    tl.store(out_ptr + rows[:, None] * stride_ob + orow[None, :], tl.where(is_conv[None, :], xc, v), mask=mask)


@triton.jit
def _head_params(dtb_ptr, A_ptr, D_ptr, h, p, pmask, P: tl.constexpr, HAS_D: tl.constexpr, D_PER_DIM: tl.constexpr):
    """Kernel 2's constants of head h: dt_bias, A (float32 scalars) and D (per channel p, or the head's
    scalar; 0 without D)."""
    dtb = tl.load(dtb_ptr + h).to(tl.float32)
    Ah = tl.load(A_ptr + h).to(tl.float32)
    Dv = 0.0
    if HAS_D:
        if D_PER_DIM:
            Dv = tl.load(D_ptr + h * P + p, mask=pmask, other=0.0).to(tl.float32)
        else:
            Dv = tl.load(D_ptr + h).to(tl.float32)
    return dtb, Ah, Dv


@triton.jit
def _scan_kernel(
    zxd_ptr, dtb_ptr, A_ptr, D_ptr, st_ptr, y_ptr, part_ptr,
    dt_min, dt_max,
    stride_zb, stride_sb, stride_sh, stride_sp, stride_sn, stride_yb, stride_pp,
    H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr, DI: tl.constexpr, CD: tl.constexpr,
    NPB: tl.constexpr, HAS_D: tl.constexpr, D_PER_DIM: tl.constexpr,
    BP: tl.constexpr, BN: tl.constexpr, PRE: tl.constexpr, PDL: tl.constexpr, LINE: tl.constexpr,
    LPN: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    pb = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = h // (H // G)
    p = pb * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    pmask = p < P
    nmask = n < N
    wdt = y_ptr.dtype.element_ty
    row = zxd_ptr + b * stride_zb  # z | x | B | C | dt of this batch row (kernel 1's output)
    st = st_ptr + b * stride_sb + h * stride_sh + p[:, None] * stride_sp + n[None, :] * stride_sn
    smask = pmask[:, None] & nmask[None, :]
    if PRE:
        # This head's state (last written by this kernel one token earlier) and constants before the
        # wait (kernels/pdl.py); after it, kernel 1's outputs in one round trip.
        state = tl.load(st, mask=smask, other=0.0).to(tl.float32)
        dtb, Ah, Dv = _head_params(dtb_ptr, A_ptr, D_ptr, h, p, pmask, P, HAS_D, D_PER_DIM)
    else:
        # This head's state rows and constants into L2 while the previous kernel finishes (kernels/pdl.py).
        prefetch_rows_l2(st_ptr + b * stride_sb + h * stride_sh, p, pmask, stride_sp, N, LINE, LPN, PDL)
        prefetch_l2(A_ptr + h + tl.arange(0, 1), tl.full([1], True, tl.int1), A_ptr, PDL)
        prefetch_l2(dtb_ptr + h + tl.arange(0, 1), tl.full([1], True, tl.int1), dtb_ptr, PDL)
    wait_for_prior_kernel(PDL)

    raw = tl.load(row + DI + CD + h).to(tl.float32)
    xs = tl.load(row + DI + h * P + p, mask=pmask, other=0.0).to(tl.float32)
    Bs = tl.load(row + 2 * DI + g * N + n, mask=nmask, other=0.0).to(tl.float32)
    Cs = tl.load(row + 2 * DI + G * N + g * N + n, mask=nmask, other=0.0).to(tl.float32)
    z = tl.load(row + h * P + p, mask=pmask, other=0.0).to(tl.float32)
    if not PRE:
        state = tl.load(st, mask=smask, other=0.0).to(tl.float32)
        dtb, Ah, Dv = _head_params(dtb_ptr, A_ptr, D_ptr, h, p, pmask, P, HAS_D, D_PER_DIM)
    dtv, _ = _discretize(raw, dtb, True, dt_min, dt_max)
    decay = tl.exp(dtv * Ah)
    state = decay * state + (dtv * xs)[:, None] * Bs[None, :]
    tl.debug_barrier()  # every replica of a state entry has read it before any rewrites it
    tl.store(st, state.to(st_ptr.dtype.element_ty), mask=smask)
    y = tl.sum(state * Cs[None, :], axis=1)
    if HAS_D:
        y += xs * Dv
    y = _round(y, wdt)  # ssd_step's output, in the weights' dtype
    tl.store(y_ptr + b * stride_yb + h * P + p, y, mask=pmask)
    # The gated norm's share of this program: sum over its channels of (y * silu(z))^2.
    gated = tl.where(pmask, y.to(tl.float32) * z * tl.sigmoid(z), 0.0)
    tl.store(part_ptr + (h * NPB + pb) * stride_pp + b, tl.sum(gated * gated, axis=0))


@triton.jit
def _out_kernel(
    y_ptr, zxd_ptr, part_ptr, gw_ptr, wo_ptr, res_in_ptr, res_out_ptr, ssq_ptr,
    batch, eps,
    stride_yb, stride_zb, stride_pp, stride_w0, stride_w1, stride_rib, stride_rob, stride_qp,
    DM: tl.constexpr, G: tl.constexpr, GS: tl.constexpr, NPG: tl.constexpr, DOT: tl.constexpr,
    IEEE: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BQ: tl.constexpr,
    PRE: tl.constexpr, PDL: tl.constexpr, LINE: tl.constexpr, LPI: tl.constexpr,
):
    pid_n = tl.program_id(0)
    rows = tl.program_id(1).to(tl.int64) * BB + tl.arange(0, BB)
    rmask = rows < batch
    cols = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
    nmask = cols < DM
    wdt = wo_ptr.dtype.element_ty
    if PRE:
        # One norm group (G = 1) as whole rows (BK >= GS, BQ >= NPG). Before the wait: the out_proj rows,
        # the gate norm's weight and the residual (written two or more kernels back: kernels/pdl.py);
        # after it the partials, y and z in one round trip.
        k = tl.arange(0, BK)
        kmask = k < GS
        w = tl.load(wo_ptr + cols[:, None] * stride_w0 + k[None, :] * stride_w1, mask=nmask[:, None] & kmask[None, :],
                    other=0.0)
        gw = tl.load(gw_ptr + k, mask=kmask, other=0.0).to(tl.float32)
        res = tl.load(res_in_ptr + rows[:, None] * stride_rib + cols[None, :], mask=rmask[:, None] & nmask[None, :],
                      other=0.0)
        wait_for_prior_kernel(PDL)
        q = tl.arange(0, BQ)
        ps = tl.load(part_ptr + q[:, None].to(tl.int64) * stride_pp + rows[None, :],
                     mask=(q[:, None] < NPG) & rmask[None, :], other=0.0)
        m2 = rmask[:, None] & kmask[None, :]
        yv = tl.load(y_ptr + rows[:, None] * stride_yb + k[None, :], mask=m2, other=0.0).to(tl.float32)
        zv = tl.load(zxd_ptr + rows[:, None] * stride_zb + k[None, :], mask=m2, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(ps, axis=0) / GS + eps)
        hn = _round(yv * zv * tl.sigmoid(zv) * rstd[:, None] * gw[None, :], wdt)  # the norm's output
        acc = tl.sum(hn.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        _store_residual(acc, wo_ptr, res_in_ptr, stride_rib, res_out_ptr, stride_rob, ssq_ptr, stride_qp, pid_n,
                        rows, cols, rmask, nmask, res, True)
    else:
        _out_chunked(y_ptr, zxd_ptr, part_ptr, gw_ptr, wo_ptr, res_in_ptr, res_out_ptr, ssq_ptr, eps, stride_yb,
                     stride_zb, stride_pp, stride_w0, stride_w1, stride_rib, stride_rob, stride_qp, pid_n, rows,
                     rmask, cols, nmask, G, GS, NPG, DOT, IEEE, BB, BN, BK, BQ, PDL, LINE, LPI)


@triton.jit
def _out_chunked(y_ptr, zxd_ptr, part_ptr, gw_ptr, wo_ptr, res_in_ptr, res_out_ptr, ssq_ptr, eps, stride_yb,
                 stride_zb, stride_pp, stride_w0, stride_w1, stride_rib, stride_rob, stride_qp, pid_n, rows, rmask,
                 cols, nmask, G: tl.constexpr, GS: tl.constexpr, NPG: tl.constexpr, DOT: tl.constexpr,
                 IEEE: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BQ: tl.constexpr,
                 PDL: tl.constexpr, LINE: tl.constexpr, LPI: tl.constexpr):
    """Kernel 3 over any number of norm groups, in chunks of BK features after the wait."""
    # out_proj rows and the gate norm's weight into L2 while the previous kernel finishes (kernels/pdl.py).
    prefetch_rows_l2(wo_ptr, cols, nmask, stride_w0, G * GS, LINE, LPI, PDL)
    lcol = tl.arange(0, LPI) * LINE
    prefetch_l2(gw_ptr + lcol, lcol < G * GS, gw_ptr, PDL)
    wait_for_prior_kernel(PDL)
    wdt = wo_ptr.dtype.element_ty
    acc = _acc_zeros(BB, BN, BK, DOT)
    for g in range(0, G):
        # 1 / rms of group g of y * silu(z): its NPG partials are contiguous in `part`.
        ss = tl.zeros([BB], dtype=tl.float32)
        for q0 in range(0, NPG, BQ):
            q = q0 + tl.arange(0, BQ)
            ps = tl.load(part_ptr + (g * NPG + q[:, None]).to(tl.int64) * stride_pp + rows[None, :],
                         mask=(q[:, None] < NPG) & rmask[None, :], other=0.0)
            ss += tl.sum(ps, axis=0)
        rstd = 1.0 / tl.sqrt(ss / GS + eps)
        for k0 in range(0, GS, BK):
            kk = k0 + tl.arange(0, BK)
            kmask = kk < GS
            k = g * GS + kk.to(tl.int64)
            m2 = rmask[:, None] & kmask[None, :]
            yv = tl.load(y_ptr + rows[:, None] * stride_yb + k[None, :], mask=m2, other=0.0).to(tl.float32)
            zv = tl.load(zxd_ptr + rows[:, None] * stride_zb + k[None, :], mask=m2, other=0.0).to(tl.float32)
            gw = tl.load(gw_ptr + k, mask=kmask, other=0.0).to(tl.float32)
            hn = _round(yv * zv * tl.sigmoid(zv) * rstd[:, None] * gw[None, :], wdt)  # the norm's output
            w = tl.load(wo_ptr + cols[:, None] * stride_w0 + k[None, :] * stride_w1,
                        mask=nmask[:, None] & kmask[None, :], other=0.0)
            acc = _acc_add(acc, hn, w, DOT, IEEE)
    _store_residual(_acc_sum(acc, DOT), wo_ptr, res_in_ptr, stride_rib, res_out_ptr, stride_rob, ssq_ptr, stride_qp, pid_n, rows,
                    cols, rmask, nmask, 0.0, False)


# ----------------------------------------------------------------------------------------------
# Launch helpers


def tiles(batch: int, d_model: int, d_inner: int, nheads: int, headdim: int, d_state: int, ngroups: int) -> dict:
    """Block sizes of the three kernels for a batch and a layer's shape (``TILES``); NQ = ceil(d_model /
    BN) partial sums of squares come out of kernel 3."""
    group_size = d_inner // ngroups
    if batch <= TILES["small_batch"]:
        t = TILES["small"]
        bb, elems = _pow2(batch), t["elems"]
        cfg = dict(DOT=False, BB1=bb, BC=t["BC"], BK1=_clamp(elems // (bb * t["BC"]), 16, _pow2(d_model)),
                   BB3=bb, BN=t["BN"], BK3=_clamp(elems // (bb * t["BN"]), 16, _pow2(group_size)),
                   warps1=t["warps"], warps3=t["warps"])
    else:
        t = TILES["large"]
        bb1 = min(t["BB1"], max(16, _pow2(batch)))
        cfg = dict(DOT=True, BB1=bb1, BC=t["BC"], BK1=t["BK1"], BB3=min(t["BB3"], bb1), BN=t["BN"],
                   BK3=t["BK3"], warps1=t["warps1"], warps3=t["warps3"])
    bn = _pow2(d_state)
    cfg["BNS"] = bn
    cfg["BP"] = _clamp(TILES["state"] // bn, 1, _pow2(headdim))
    cfg["NPB"] = cdiv(headdim, cfg["BP"])
    cfg["NPG"] = (nheads // ngroups) * cfg["NPB"]
    cfg["NQ"] = cdiv(d_model, cfg["BN"])
    # Whole-row kernels (GEMV only; kernel 3 for one norm group): kernel 1 over all of d_model, kernel 3
    # over all of d_inner, kernel 2 with its state loaded before the wait.
    whole_row_tiles(cfg, TILES["small"], d_model, group_size, allow3=ngroups == 1)
    return cfg


def unsupported(d_model: int, d_inner: int, nheads: int, headdim: int, d_state: int, ngroups: int, d_conv: int,
                dtype: torch.dtype) -> str | None:
    """Why these kernels cannot run a Mamba-2 block of this shape and weight dtype; None when they can."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"weights in {dtype} (the fused step takes float16 / bfloat16 / float32)"
    if d_state > MAX_DSTATE:
        return f"d_state {d_state} > {MAX_DSTATE} (the state tile lives in registers)"
    if headdim > MAX_HEADDIM:
        return f"headdim {headdim} > {MAX_HEADDIM}"
    if not 2 <= d_conv <= MAX_WIDTH:
        return f"conv width {d_conv} outside 2..{MAX_WIDTH}"
    if nheads * headdim != d_inner or ngroups < 1 or nheads % ngroups:
        return f"nheads {nheads} x headdim {headdim} != d_inner {d_inner}, or ngroups {ngroups} does not divide nheads"
    return None


@torch.library.custom_op("ssm_suite::mamba2_decode_block", mutates_args=("conv_state", "ssm_state"))
def mamba2_decode_block_op(
    conv_state: torch.Tensor, ssm_state: torch.Tensor, x: torch.Tensor | None, residual: torch.Tensor | None,
    norm_weight: torch.Tensor, norm_eps: float, in_proj_weight: torch.Tensor, conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None, dt_bias: torch.Tensor, A: torch.Tensor, D: torch.Tensor | None,
    dt_min: float, dt_max: float, gate_norm_weight: torch.Tensor, gate_norm_eps: float,
    out_proj_weight: torch.Tensor, residual_dtype: torch.dtype, residual_sumsq: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Mamba-2 block for one token per row; conv_state, ssm_state updated in place. x, residual
    [B, d_model] with unit feature stride; D, A, dt_bias contiguous. Returns (residual_out [B, d_model]
    residual_dtype, sumsq [NQ, B] float32)."""
    batch, conv_dim, width = conv_state.shape[0], conv_state.shape[1], conv_state.shape[2] + 1
    nheads, headdim, d_state = ssm_state.shape[1:]
    d_model, d_inner = norm_weight.shape[0], gate_norm_weight.shape[0]
    ngroups = (conv_dim - d_inner) // (2 * d_state)
    n_rows = d_inner + conv_dim + nheads
    wdt = in_proj_weight.dtype
    cfg = tiles(batch, d_model, d_inner, nheads, headdim, d_state, ngroups)
    res_out = norm_weight.new_empty(batch, d_model, dtype=residual_dtype)
    ssq = norm_weight.new_empty(cfg["NQ"], batch, dtype=torch.float32)
    if batch == 0:
        return res_out, ssq
    dev = conv_state.device
    ieee = wdt == torch.float32
    # PDL only for the register (GEMV) tiles: with the tl.dot tiles (batch > 4) the early-launched programs
    # hold registers while they wait, and an H100 ran the batch-64 step 1.37x slower with PDL than without.
    pdl, line = pdl_enabled(dev) and not cfg["DOT"], line_elems(in_proj_weight)
    zxd = torch.empty(batch, n_rows, device=dev, dtype=wdt)  # z | conv'd xBC | raw dt
    y = torch.empty(batch, d_inner, device=dev, dtype=wdt)
    part = torch.empty(nheads * cfg["NPB"], batch, device=dev, dtype=torch.float32)
    # Kernel 1 writes the stream r = x + residual into a fresh buffer that kernel 3 reads (not in place:
    # small tiles are replicated over threads, and one replica could add twice).
    res_mid = torch.empty_like(res_out) if x is not None else residual
    nq_in = residual_sumsq.shape[0] if residual_sumsq is not None else 1
    _in_conv_kernel[(cdiv(n_rows, cfg["BC"]), cdiv(batch, cfg["BB1"]))](
        x, residual, residual_sumsq, norm_weight, in_proj_weight, conv_weight, conv_bias, conv_state,
        res_mid if x is not None else res_out, zxd, batch, float(norm_eps),
        x.stride(0) if x is not None else 0, residual.stride(0) if residual is not None else 0,
        residual_sumsq.stride(0) if residual_sumsq is not None else 0, res_out.stride(0),
        *in_proj_weight.stride(), *conv_weight.stride(), *conv_state.stride(), zxd.stride(0),
        DM=d_model, DI=d_inner, CD=conv_dim, NR=n_rows, W=width, NQ=nq_in,
        HAS_X=x is not None, HAS_RES=residual is not None, HAS_SSQ=x is None and residual_sumsq is not None,
        HAS_CB=conv_bias is not None, DOT=cfg["DOT"], IEEE=ieee,
        BB=cfg["BB1"], BC=cfg["BC"], BK=cfg["BK1"], BQ=_clamp(4096 // cfg["BB1"], 1, _pow2(nq_in)),
        BW=_pow2(width - 1), BWW=_pow2(width), PRE=cfg["PRE1"], PDL=pdl, LINE=line, LPD=lines_pow2(d_model, line),
        num_warps=cfg["warps1"],
        launch_pdl=pdl,
    )
    _scan_kernel[(batch * nheads, cfg["NPB"])](
        zxd, dt_bias, A, D, ssm_state, y, part, float(dt_min), float(dt_max),
        zxd.stride(0), *ssm_state.stride(), y.stride(0), part.stride(0),
        H=nheads, G=ngroups, P=headdim, N=d_state, DI=d_inner, CD=conv_dim, NPB=cfg["NPB"],
        HAS_D=D is not None, D_PER_DIM=D is not None and D.dim() == 2, BP=cfg["BP"], BN=cfg["BNS"],
        PRE=cfg["PRE2"], PDL=pdl, LINE=line_elems(ssm_state), LPN=lines_pow2(d_state, line_elems(ssm_state)),
        num_warps=8 if cfg["BP"] * cfg["BNS"] > 2048 else 4, launch_pdl=pdl,
    )
    _out_kernel[(cfg["NQ"], cdiv(batch, cfg["BB3"]))](
        y, zxd, part, gate_norm_weight, out_proj_weight, res_mid, res_out, ssq, batch, float(gate_norm_eps),
        y.stride(0), zxd.stride(0), part.stride(0), *out_proj_weight.stride(), res_mid.stride(0),
        res_out.stride(0), ssq.stride(0),
        DM=d_model, G=ngroups, GS=d_inner // ngroups, NPG=cfg["NPG"], DOT=cfg["DOT"], IEEE=ieee,
        BB=cfg["BB3"], BN=cfg["BN"], BK=cfg["BK3"], BQ=_pow2(cfg["NPG"]), PRE=cfg["PRE3"], PDL=pdl, LINE=line,
        LPI=lines_pow2(d_inner, line), num_warps=cfg["warps3"], launch_pdl=pdl,
    )
    return res_out, ssq


@mamba2_decode_block_op.register_fake
def _(conv_state, ssm_state, x, residual, norm_weight, norm_eps, in_proj_weight, conv_weight, conv_bias, dt_bias,
      A, D, dt_min, dt_max, gate_norm_weight, gate_norm_eps, out_proj_weight, residual_dtype, residual_sumsq):
    batch, conv_dim = conv_state.shape[0], conv_state.shape[1]
    nheads, headdim, d_state = ssm_state.shape[1:]
    d_model, d_inner = norm_weight.shape[0], gate_norm_weight.shape[0]
    cfg = tiles(batch, d_model, d_inner, nheads, headdim, d_state, (conv_dim - d_inner) // (2 * d_state))
    return (norm_weight.new_empty(batch, d_model, dtype=residual_dtype),
            norm_weight.new_empty(cfg["NQ"], batch, dtype=torch.float32))


# ----------------------------------------------------------------------------------------------
# Backend entry point (the signature of reference.mamba2_decode_block_reference)


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.is_contiguous() else t.contiguous()


def mamba2_decode_block_triton(
    conv_state: torch.Tensor,
    ssm_state: torch.Tensor,
    x: torch.Tensor | None,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    norm_eps: float,
    in_proj_weight: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor | None,
    dt_min: float,
    dt_max: float,
    gate_norm_weight: torch.Tensor,
    gate_norm_eps: float,
    out_proj_weight: torch.Tensor,
    residual_dtype: torch.dtype,
    residual_sumsq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused Mamba-2 block step; the contract of ``mamba2_decode_block_reference`` (the public
    function has checked the shapes)."""
    batch, nheads, headdim, d_state = ssm_state.shape
    d_inner = gate_norm_weight.shape[0]
    ngroups = (conv_weight.shape[0] - d_inner) // (2 * d_state)
    reason = unsupported(norm_weight.shape[0], d_inner, nheads, headdim, d_state, ngroups, conv_weight.shape[1],
                         in_proj_weight.dtype)
    if reason is not None:
        raise ValueError(f"mamba2_decode_block (triton): {reason}; use the op-by-op step "
                         "(SSM_SUITE_BACKEND_MAMBA2_DECODE_BLOCK=reference)")
    if ssm_state.dtype not in STATE_DTYPES:
        raise ValueError(f"mamba2_decode_block (triton): ssm_state must be float32, bfloat16 or float16, got "
                         f"{ssm_state.dtype}")
    if batch * nheads > 2**31 - 1 or cdiv(batch, 16) > 65535:
        raise ValueError(f"mamba2_decode_block (triton): batch {batch} exceeds the launch grid ({MAX_ROWS} rows "
                         f"and batch x nheads < 2^31); split the batch")
    if residual_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"mamba2_decode_block (triton): residual_dtype {residual_dtype} is not "
                         "float16 / bfloat16 / float32")
    return mamba2_decode_block_op(
        conv_state, ssm_state, _rows(x), _rows(residual), norm_weight, float(norm_eps), in_proj_weight,
        conv_weight, conv_bias, _flat(dt_bias), _flat(A), _flat(D), float(dt_min), float(dt_max),
        _flat(gate_norm_weight), float(gate_norm_eps), out_proj_weight, residual_dtype,
        residual_sumsq if x is None else None)
