"""Causal depthwise conv1d in Triton: forward, backward and the one-token step.

Semantics are those of ``reference.py``; shapes:
    x             [B, D, L]   fp16 / bf16 / fp32 / fp64, any strides (contiguous or the channel-last
                              view ``x_bld.transpose(1, 2)`` that Mamba uses)
    weight        [D, W]      2 <= W <= 8
    bias          [D] or None
    initial_state [B, D, W-1] (or [S, D, W-1] with cu_seqlens)
    cu_seqlens    int [S+1], with B == 1: S sequences packed along L
    returns y [B, D, L] (x's dtype; channel-last when x is, so a layer's transposes cost no copy) and,
    when asked, the final state [B or S, D, W-1] (float32, or float64 for float64 inputs).

Two sets of kernels. Without packed sequences the "column" kernels run (``_conv_fwd_cols_kernel`` /
``_conv_bwd_cols_kernel``, see the section below): positions go in groups of 8 held in registers, so
every shift along the length is a compile-time pick of a register, for a contiguous length axis and for
channel-last x alike. The forward also takes an initial state there (a prefill from a cache: on an H100
the general kernel took ~2x as long for a batch-64 prefill); the backward does not. Everything else
(``cu_seqlens``, the backward with an initial state, a length and a channel axis that are both strided)
runs the general kernels described next.

Layout of the work (general kernels). Every position p of x belongs to one sequence s with bounds [start, end): for a
plain batch s = b, start = 0, end = L; for packed sequences s, start, end come from ``cu_seqlens``
through a per-position sequence index. The "padded" input of a sequence reads x inside [start, end)
and the initial state at the W-1 positions before start (zeros without one), so

    y[p] = act(bias + sum_k w[k] * padded(p - (W-1) + k))                             (forward)
    dpadded(q) = sum_k w[k] * dpre(q + (W-1) - k)   (targets inside [start, end))
                 + dfinal[q - (end - (W-1))]          (when q is one of the last W-1)    (backward)

where dpre is the gradient before the activation. dx is dpadded at the positions of x and
d initial_state is dpadded at the W-1 positions before start, so one helper serves both. The backward
recomputes the pre-activation at the W shifted targets rather than storing it (loads hit L1; DRAM
traffic stays x + dy read, dx written). dweight and dbias are reduced without atomics: each program
writes its partial sums over its slice of the length, and one ``torch.sum`` over those rows finishes
the reduction, so gradients are bit-identical across runs.

All offsets are computed in int64 (batch x channels x length may pass 2^31 elements).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.host import call_op, cdiv, next_power_of_2, op_function

MAX_WIDTH = 8


# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _load_padded(x_ptr, init_ptr, offs_d, mask_d, pos, seq, start, end,
                 stride_xd, stride_xl, stride_sb, stride_sd, stride_sk,
                 W: tl.constexpr, HAS_INIT: tl.constexpr, ACC: tl.constexpr):
    """padded(pos) as an [BLOCK_D, BLOCK_L] tile: x inside [start, end), the initial state (or 0)
    in the W-1 positions before start, 0 elsewhere. pos, seq, start, end: int64 [BLOCK_L]."""
    in_x = (pos >= start) & (pos < end)
    value = tl.load(x_ptr + offs_d[:, None] * stride_xd + pos[None, :] * stride_xl,
                    mask=mask_d[:, None] & in_x[None, :], other=0.0).to(ACC)
    if HAS_INIT:
        k = pos - start + (W - 1)
        in_state = (pos < start) & (k >= 0)
        value += tl.load(init_ptr + seq[None, :] * stride_sb + offs_d[:, None] * stride_sd
                         + k[None, :] * stride_sk,
                         mask=mask_d[:, None] & in_state[None, :], other=0.0).to(ACC)
    return value


@triton.jit
def _preact(x_ptr, init_ptr, w_ptr, bias, offs_d, mask_d, t, seq, start, end,
            stride_xd, stride_xl, stride_sb, stride_sd, stride_sk, stride_wd, stride_wk,
            W: tl.constexpr, HAS_INIT: tl.constexpr, ACC: tl.constexpr):
    """bias + sum_k w[k] * padded(t - (W-1) + k): the pre-activation output at positions t."""
    acc = tl.zeros((offs_d.shape[0], t.shape[0]), dtype=ACC) + bias[:, None]
    for k in tl.static_range(W):
        w_k = tl.load(w_ptr + offs_d * stride_wd + k * stride_wk, mask=mask_d, other=0.0).to(ACC)
        acc += w_k[:, None] * _load_padded(x_ptr, init_ptr, offs_d, mask_d, t - (W - 1) + k, seq, start,
                                           end, stride_xd, stride_xl, stride_sb, stride_sd, stride_sk,
                                           W, HAS_INIT, ACC)
    return acc


@triton.jit
def _seq_bounds(cu_ptr, seqidx_ptr, pos, mask_pos, batch, L, IS_VARLEN: tl.constexpr):
    """Sequence index, start and end (int64 [BLOCK]) of each position."""
    if IS_VARLEN:
        seq = tl.load(seqidx_ptr + pos, mask=mask_pos, other=0).to(tl.int64)
        start = tl.load(cu_ptr + seq, mask=mask_pos, other=0).to(tl.int64)
        end = tl.load(cu_ptr + seq + 1, mask=mask_pos, other=0).to(tl.int64)
    else:
        seq = tl.zeros_like(pos) + batch
        start = tl.zeros_like(pos)
        end = tl.zeros_like(pos) + L
    return seq, start, end


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, init_ptr, y_ptr, cu_ptr, seqidx_ptr,
    D, L,
    stride_xb, stride_xd, stride_xl, stride_wd, stride_wk,
    stride_sb, stride_sd, stride_sk, stride_yb, stride_yd, stride_yl,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, IS_VARLEN: tl.constexpr,
    SILU: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_l = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    offs_d = tl.program_id(2).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    pos = pid_l.to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_d = offs_d < D
    mask_l = pos < L
    seq, start, end = _seq_bounds(cu_ptr, seqidx_ptr, pos, mask_l, batch, L, IS_VARLEN)
    x_ptr += batch * stride_xb
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=ACC)
    y = _preact(x_ptr, init_ptr, w_ptr, bias, offs_d, mask_d, pos, seq, start, end,
                stride_xd, stride_xl, stride_sb, stride_sd, stride_sk, stride_wd, stride_wk,
                W, HAS_INIT, ACC)
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + batch * stride_yb + offs_d[:, None] * stride_yd + pos[None, :] * stride_yl,
             y.to(y_ptr.dtype.element_ty), mask=mask_d[:, None] & mask_l[None, :])


@triton.jit
def _final_state_kernel(
    x_ptr, init_ptr, out_ptr, cu_ptr,
    D, L,
    stride_xb, stride_xd, stride_xl, stride_sb, stride_sd, stride_sk, stride_ob, stride_od, stride_ok,
    W: tl.constexpr, HAS_INIT: tl.constexpr, IS_VARLEN: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """final[s, :, j] = padded(end - (W-1) + j): the last W-1 inputs of each sequence."""
    seq_id = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    j = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_d = offs_d < D
    mask_j = j < W - 1
    if IS_VARLEN:
        start = tl.load(cu_ptr + seq_id).to(tl.int64)
        end = tl.load(cu_ptr + seq_id + 1).to(tl.int64)
    else:
        x_ptr += seq_id * stride_xb
        start = 0
        end = L
    seq = tl.zeros_like(j) + seq_id
    start_v = tl.zeros_like(j) + start
    end_v = tl.zeros_like(j) + end
    value = _load_padded(x_ptr, init_ptr, offs_d, mask_d, end_v - (W - 1) + j, seq, start_v, end_v,
                         stride_xd, stride_xl, stride_sb, stride_sd, stride_sk, W, HAS_INIT,
                         out_ptr.dtype.element_ty)
    tl.store(out_ptr + seq_id * stride_ob + offs_d[:, None] * stride_od + j[None, :] * stride_ok, value,
             mask=mask_d[:, None] & mask_j[None, :])


@triton.jit
def _dpadded(x_ptr, init_ptr, w_ptr, bias, dy_ptr, dfinal_ptr, offs_d, mask_d, pos, mask_pos, seq,
             start, end,
             stride_xd, stride_xl, stride_sb, stride_sd, stride_sk, stride_wd, stride_wk,
             stride_dyd, stride_dyl, stride_fb, stride_fd, stride_fk,
             W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DFINAL: tl.constexpr, SILU: tl.constexpr,
             ACC: tl.constexpr):
    """Gradient with respect to padded(pos), and dpre at pos itself (for dweight and dbias).

    x_ptr and dy_ptr already point at this batch row; positions are global along L."""
    grad = tl.zeros((offs_d.shape[0], pos.shape[0]), dtype=ACC)
    dpre_own = tl.zeros((offs_d.shape[0], pos.shape[0]), dtype=ACC)
    for k in tl.static_range(W):
        # Output position t = pos + (W-1) - k reads padded(pos) through tap k.
        t = pos + (W - 1 - k)
        valid = mask_pos & (t >= start) & (t < end)
        dpre = tl.load(dy_ptr + offs_d[:, None] * stride_dyd + t[None, :] * stride_dyl,
                       mask=mask_d[:, None] & valid[None, :], other=0.0).to(ACC)
        if SILU:
            pre = _preact(x_ptr, init_ptr, w_ptr, bias, offs_d, mask_d, t, seq, start, end,
                          stride_xd, stride_xl, stride_sb, stride_sd, stride_sk, stride_wd, stride_wk,
                          W, HAS_INIT, ACC)
            sig = tl.sigmoid(pre)
            dpre = dpre * sig * (1.0 + pre * (1.0 - sig))
        w_k = tl.load(w_ptr + offs_d * stride_wd + k * stride_wk, mask=mask_d, other=0.0).to(ACC)
        grad += w_k[:, None] * dpre
        if k == W - 1:
            dpre_own = dpre
    if HAS_DFINAL:
        j = pos - (end - (W - 1))
        in_final = mask_pos & (j >= 0) & (j < W - 1)
        grad += tl.load(dfinal_ptr + seq[None, :] * stride_fb + offs_d[:, None] * stride_fd
                        + j[None, :] * stride_fk,
                        mask=mask_d[:, None] & in_final[None, :], other=0.0).to(ACC)
    return grad, dpre_own


@triton.jit
def _conv_bwd_kernel(
    x_ptr, w_ptr, b_ptr, init_ptr, dy_ptr, dfinal_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
    cu_ptr, seqidx_ptr,
    D, L, n_chunks,
    stride_xb, stride_xd, stride_xl, stride_wd, stride_wk,
    stride_sb, stride_sd, stride_sk, stride_dyb, stride_dyd, stride_dyl,
    stride_fb, stride_fd, stride_fk, stride_dxb, stride_dxd, stride_dxl,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DFINAL: tl.constexpr,
    IS_VARLEN: tl.constexpr, SILU: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_W: tl.constexpr, CHUNK_ITERS: tl.constexpr,
):
    """dx for a chunk of CHUNK_ITERS * BLOCK_L positions, and that chunk's partial dweight/dbias
    (written to row batch * n_chunks + chunk of the partial buffers, reduced afterwards)."""
    pid_c = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    offs_d = tl.program_id(2).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    x_ptr += batch * stride_xb
    dy_ptr += batch * stride_dyb
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=ACC)
    taps = tl.arange(0, BLOCK_W)
    dw_acc = tl.zeros((BLOCK_D, BLOCK_W), dtype=ACC)
    db_acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for it in range(CHUNK_ITERS):
        pos = (pid_c.to(tl.int64) * CHUNK_ITERS + it) * BLOCK_L + tl.arange(0, BLOCK_L)
        mask_l = pos < L
        seq, start, end = _seq_bounds(cu_ptr, seqidx_ptr, pos, mask_l, batch, L, IS_VARLEN)
        grad, dpre = _dpadded(x_ptr, init_ptr, w_ptr, bias, dy_ptr, dfinal_ptr, offs_d, mask_d, pos,
                              mask_l, seq, start, end,
                              stride_xd, stride_xl, stride_sb, stride_sd, stride_sk, stride_wd, stride_wk,
                              stride_dyd, stride_dyl, stride_fb, stride_fd, stride_fk,
                              W, HAS_INIT, HAS_DFINAL, SILU, ACC)
        tl.store(dx_ptr + batch * stride_dxb + offs_d[:, None] * stride_dxd + pos[None, :] * stride_dxl,
                 grad.to(dx_ptr.dtype.element_ty), mask=mask_d[:, None] & mask_l[None, :])
        db_acc += tl.sum(dpre, axis=1)
        for k in tl.static_range(W):
            src = _load_padded(x_ptr, init_ptr, offs_d, mask_d, pos - (W - 1) + k, seq, start, end,
                               stride_xd, stride_xl, stride_sb, stride_sd, stride_sk, W, HAS_INIT, ACC)
            part = tl.sum(dpre * src, axis=1)
            dw_acc += tl.where(taps[None, :] == k, part[:, None], 0.0)
    row = batch * n_chunks + pid_c
    tl.store(dw_part_ptr + row * D * W + offs_d[:, None] * W + taps[None, :], dw_acc,
             mask=mask_d[:, None] & (taps[None, :] < W))
    if HAS_BIAS:
        tl.store(db_part_ptr + row * D + offs_d, db_acc, mask=mask_d)


@triton.jit
def _conv_dinit_kernel(
    x_ptr, w_ptr, b_ptr, init_ptr, dy_ptr, dfinal_ptr, dinit_ptr, cu_ptr,
    D, L,
    stride_xb, stride_xd, stride_xl, stride_wd, stride_wk,
    stride_sb, stride_sd, stride_sk, stride_dyb, stride_dyd, stride_dyl,
    stride_fb, stride_fd, stride_fk, stride_ib, stride_id, stride_ik,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DFINAL: tl.constexpr,
    IS_VARLEN: tl.constexpr, SILU: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """d initial_state[s, :, i] = dpadded(start - (W-1) + i)."""
    seq_id = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    i = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_i = i < W - 1
    if IS_VARLEN:
        start = tl.load(cu_ptr + seq_id).to(tl.int64)
        end = tl.load(cu_ptr + seq_id + 1).to(tl.int64)
    else:
        x_ptr += seq_id * stride_xb
        dy_ptr += seq_id * stride_dyb
        start = 0
        end = L
    seq = tl.zeros_like(i) + seq_id
    start_v = tl.zeros_like(i) + start
    end_v = tl.zeros_like(i) + end
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=ACC)
    grad, _ = _dpadded(x_ptr, init_ptr, w_ptr, bias, dy_ptr, dfinal_ptr, offs_d, mask_d,
                       start_v - (W - 1) + i, mask_i, seq, start_v, end_v,
                       stride_xd, stride_xl, stride_sb, stride_sd, stride_sk, stride_wd, stride_wk,
                       stride_dyd, stride_dyl, stride_fb, stride_fd, stride_fk,
                       W, HAS_INIT, HAS_DFINAL, SILU, ACC)
    tl.store(dinit_ptr + seq_id * stride_ib + offs_d[:, None] * stride_id + i[None, :] * stride_ik,
             grad.to(dinit_ptr.dtype.element_ty), mask=mask_d[:, None] & mask_i[None, :])


@triton.jit
def _conv_step_kernel(
    x_ptr, state_ptr, w_ptr, b_ptr, y_ptr,
    D,
    stride_xb, stride_xd, stride_sb, stride_sd, stride_sk, stride_wd, stride_wk, stride_yb, stride_yd,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One token. Every value is a 1D [BLOCK_D] vector of one layout, so the thread that reads
    state[b, d, :] is the one that rewrites it: the in-place shift needs no barrier."""
    batch = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs_d < D
    x = tl.load(x_ptr + batch * stride_xb + offs_d * stride_xd, mask=mask, other=0.0).to(ACC)
    state_row = state_ptr + batch * stride_sb + offs_d * stride_sd
    if HAS_BIAS:
        y = tl.load(b_ptr + offs_d, mask=mask, other=0.0).to(ACC)
    else:
        y = tl.zeros((BLOCK_D,), dtype=ACC)
    y += tl.load(w_ptr + offs_d * stride_wd + (W - 1) * stride_wk, mask=mask, other=0.0).to(ACC) * x
    # new_state[j] = old_state[j + 1], new_state[W-2] = x; read each old entry before overwriting it.
    prev = tl.load(state_row, mask=mask, other=0.0)
    y += tl.load(w_ptr + offs_d * stride_wd, mask=mask, other=0.0).to(ACC) * prev.to(ACC)
    for k in tl.static_range(1, W - 1):
        cur = tl.load(state_row + k * stride_sk, mask=mask, other=0.0)
        y += tl.load(w_ptr + offs_d * stride_wd + k * stride_wk, mask=mask, other=0.0).to(ACC) * cur.to(ACC)
        tl.store(state_row + (k - 1) * stride_sk, cur, mask=mask)
    tl.store(state_row + (W - 2) * stride_sk, x.to(state_ptr.dtype.element_ty), mask=mask)
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + batch * stride_yb + offs_d * stride_yd, y.to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# The "column" kernels: no packed sequences (a model's training path, and the forward of a prefill from a
# cached state); the backward takes no initial state either.
#
# The positions are taken in groups of 8: a tile is J groups of BLOCK_D channels, held as 8 "columns"
# [BLOCK_D, J] (column i holds position 8 g + i of every group g). Shifting along the length is then a
# choice of column (and of the neighbouring group's columns at the edges), made at compile time: no
# misaligned loads and no data exchange between threads. With a contiguous length axis a group's 8
# positions are one 16-byte load per thread that ``tl.split`` takes apart in registers; with
# channel-last x each column is one coalesced load along the channels.


@triton.jit
def _split8(x):
    """[BLOCK_D, J, 8] -> the 8 columns [BLOCK_D, J] (register picks: the last axis is in the thread)."""
    D0: tl.constexpr = x.shape[0]
    J: tl.constexpr = x.shape[1]
    even, odd = tl.split(tl.reshape(x, (D0, J, 4, 2)))      # positions 0 2 4 6 / 1 3 5 7
    e0, e1 = tl.split(tl.reshape(even, (D0, J, 2, 2)))      # 0 4 / 2 6
    o0, o1 = tl.split(tl.reshape(odd, (D0, J, 2, 2)))       # 1 5 / 3 7
    c0, c4 = tl.split(e0)
    c2, c6 = tl.split(e1)
    c1, c5 = tl.split(o0)
    c3, c7 = tl.split(o1)
    return (c0, c1, c2, c3, c4, c5, c6, c7)


@triton.jit
def _join8(c):
    """The inverse of _split8: 8 columns [BLOCK_D, J] -> [BLOCK_D, J, 8]."""
    D0: tl.constexpr = c[0].shape[0]
    J: tl.constexpr = c[0].shape[1]
    even = tl.reshape(tl.join(tl.join(c[0], c[4]), tl.join(c[2], c[6])), (D0, J, 4))
    odd = tl.reshape(tl.join(tl.join(c[1], c[5]), tl.join(c[3], c[7])), (D0, J, 4))
    return tl.reshape(tl.join(even, odd), (D0, J, 8))


@triton.jit
def _load_group(ptr, offs_d, mask_d, grp, L, stride_d, stride_l, CHANNEL_LAST: tl.constexpr, ACC: tl.constexpr):
    """ptr[d, 8 g + i] for the J groups g of ``grp`` (int64 [J]) as 8 columns [BLOCK_D, J] in ACC, 0 outside
    [0, L) (a missing initial state reads as zeros)."""
    if CHANNEL_LAST:
        cols = ()
        for i in tl.static_range(8):
            pos = grp * 8 + i
            mask = mask_d[:, None] & ((pos >= 0) & (pos < L))[None, :]
            cols = cols + (tl.load(ptr + offs_d[:, None] * stride_d + pos[None, :] * stride_l, mask=mask,
                                   other=0.0).to(ACC),)
    else:
        pos = grp[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]
        mask = mask_d[:, None, None] & (pos >= 0) & (pos < L)
        cols = _split8(tl.load(ptr + offs_d[:, None, None] * stride_d + pos * stride_l, mask=mask,
                               other=0.0).to(ACC))
    return cols


@triton.jit
def _store_group(ptr, cols, offs_d, mask_d, grp, L, stride_d, stride_l, CHANNEL_LAST: tl.constexpr):
    if CHANNEL_LAST:
        for i in tl.static_range(8):
            pos = grp * 8 + i
            tl.store(ptr + offs_d[:, None] * stride_d + pos[None, :] * stride_l,
                     cols[i].to(ptr.dtype.element_ty), mask=mask_d[:, None] & (pos < L)[None, :])
    else:
        pos = grp[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]
        tl.store(ptr + offs_d[:, None, None] * stride_d + pos * stride_l, _join8(cols).to(ptr.dtype.element_ty),
                 mask=mask_d[:, None, None] & (pos < L))


@triton.jit
def _pick(prv, cur, nxt, m: tl.constexpr):
    """The column of relative position m in [-8, 16) (m < 0: the group before, m >= 8: the group after)."""
    if m < 0:
        col = prv[m + 8]
    elif m < 8:
        col = cur[m]
    else:
        col = nxt[m - 8]
    return col


@triton.jit
def _weights(w_ptr, offs_d, mask_d, stride_wd, stride_wk, W: tl.constexpr, ACC: tl.constexpr):
    ws = ()
    for k in tl.static_range(W):
        ws = ws + (tl.load(w_ptr + offs_d * stride_wd + k * stride_wk, mask=mask_d, other=0.0).to(ACC),)
    return ws


@triton.jit
def _conv_fwd_cols_kernel(
    x_ptr, w_ptr, b_ptr, init_ptr, y_ptr,
    D, L,
    stride_xb, stride_xd, stride_xl, stride_wd, stride_wk, stride_ib, stride_id, stride_ik,
    stride_yb, stride_yd, stride_yl,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
    CHANNEL_LAST: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr, J: tl.constexpr,
):
    batch = tl.program_id(1).to(tl.int64)
    offs_d = tl.program_id(2).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    grp = tl.program_id(0).to(tl.int64) * J + tl.arange(0, J)
    x_ptr += batch * stride_xb
    cur = _load_group(x_ptr, offs_d, mask_d, grp, L, stride_xd, stride_xl, CHANNEL_LAST, ACC)
    prv = _load_group(x_ptr, offs_d, mask_d, grp - 1, L, stride_xd, stride_xl, CHANNEL_LAST, ACC)
    if HAS_INIT:
        # Positions -(W-1)..-1 (read as zeros above) come from the initial state, column W-1+pos.
        with_init = ()
        for i in tl.static_range(8):
            pos = (grp - 1) * 8 + i
            mask = mask_d[:, None] & ((pos >= 1 - W) & (pos < 0))[None, :]
            ptrs = init_ptr + batch * stride_ib + offs_d[:, None] * stride_id + (W - 1 + pos)[None, :] * stride_ik
            with_init = with_init + (prv[i] + tl.load(ptrs, mask=mask, other=0.0).to(ACC),)
        prv = with_init
    ws = _weights(w_ptr, offs_d, mask_d, stride_wd, stride_wk, W, ACC)
    bias = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    out = ()
    for i in tl.static_range(8):
        acc = tl.zeros((BLOCK_D, J), dtype=ACC) + bias[:, None]
        for k in tl.static_range(W):
            acc += ws[k][:, None] * _pick(prv, cur, cur, i - (W - 1) + k)
        if SILU:
            acc = acc * tl.sigmoid(acc)
        out = out + (acc,)
    _store_group(y_ptr + batch * stride_yb, out, offs_d, mask_d, grp, L, stride_yd, stride_yl, CHANNEL_LAST)


@triton.jit
def _conv_bwd_cols_kernel(
    x_ptr, w_ptr, b_ptr, dy_ptr, dfinal_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
    D, L, n_chunks,
    stride_xb, stride_xd, stride_xl, stride_wd, stride_wk, stride_dyb, stride_dyd, stride_dyl,
    stride_fb, stride_fd, stride_fk, stride_dxb, stride_dxd, stride_dxl,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DFINAL: tl.constexpr, SILU: tl.constexpr,
    CHANNEL_LAST: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr, J: tl.constexpr,
    BLOCK_W: tl.constexpr, CHUNK_ITERS: tl.constexpr, SUM_EACH_TILE: tl.constexpr,
):
    """dx for CHUNK_ITERS tiles of 8 J positions, and their partial dweight / dbias (row
    batch * n_chunks + chunk of the partial buffers, summed afterwards). The gradient before the
    activation, dpre, is needed at the tile's positions and the W-1 after them; dx_t = sum_k w_k
    dpre_{t+W-1-k}, dw_k = sum_t dpre_t x_{t-(W-1)+k}."""
    pid_c = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    offs_d = tl.program_id(2).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    x_ptr += batch * stride_xb
    dy_ptr += batch * stride_dyb
    dx_ptr += batch * stride_dxb
    ws = _weights(w_ptr, offs_d, mask_d, stride_wd, stride_wk, W, ACC)
    bias = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    # dweight / dbias: partial sums [BLOCK_D, J] (one per tap, and dbias last) summed over the groups
    # once at the end (SUM_EACH_TILE=False), or summed over the groups every tile into [BLOCK_D, W]
    # (that sum crosses warps: shared memory and a barrier per tap and tile).
    parts = ()
    for k in tl.static_range(W + 1):
        parts = parts + (tl.zeros((BLOCK_D, J), dtype=ACC),)
    taps = tl.arange(0, BLOCK_W)
    dw_acc = tl.zeros((BLOCK_D, BLOCK_W), dtype=ACC)
    db_acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for it in range(CHUNK_ITERS):
        grp = (tl.cast(pid_c, tl.int64) * CHUNK_ITERS + it) * J + tl.arange(0, J)
        prv = _load_group(x_ptr, offs_d, mask_d, grp - 1, L, stride_xd, stride_xl, CHANNEL_LAST, ACC)
        cur = _load_group(x_ptr, offs_d, mask_d, grp, L, stride_xd, stride_xl, CHANNEL_LAST, ACC)
        nxt = _load_group(x_ptr, offs_d, mask_d, grp + 1, L, stride_xd, stride_xl, CHANNEL_LAST, ACC)
        dyc = _load_group(dy_ptr, offs_d, mask_d, grp, L, stride_dyd, stride_dyl, CHANNEL_LAST, ACC)
        dyn = _load_group(dy_ptr, offs_d, mask_d, grp + 1, L, stride_dyd, stride_dyl, CHANNEL_LAST, ACC)
        # dpre at relative positions 0 .. 8 + W - 2 (0 past L: dy reads 0 there)
        dpre = ()
        for i in tl.static_range(8 + W - 1):
            g = _pick(dyc, dyc, dyn, i)
            if SILU:
                pre = tl.zeros((BLOCK_D, J), dtype=ACC) + bias[:, None]
                for k in tl.static_range(W):
                    pre += ws[k][:, None] * _pick(prv, cur, nxt, i - (W - 1) + k)
                sig = tl.sigmoid(pre)
                g = g * sig * (1.0 + pre * (1.0 - sig))
            dpre = dpre + (g,)
        dx = ()
        for i in tl.static_range(8):
            acc = tl.zeros((BLOCK_D, J), dtype=ACC)
            for k in tl.static_range(W):
                acc += ws[k][:, None] * dpre[i + (W - 1) - k]
            if HAS_DFINAL:
                # the final state holds x at the last W-1 positions: its gradient flows straight back
                fj = grp * 8 + i - (L - (W - 1))
                acc += tl.load(dfinal_ptr + batch * stride_fb + offs_d[:, None] * stride_fd + fj[None, :] * stride_fk,
                               mask=mask_d[:, None] & ((fj >= 0) & (fj < W - 1))[None, :], other=0.0).to(ACC)
            dx = dx + (acc,)
        _store_group(dx_ptr, dx, offs_d, mask_d, grp, L, stride_dxd, stride_dxl, CHANNEL_LAST)
        new_parts = ()
        for k in tl.static_range(W):
            part = parts[k]
            if SUM_EACH_TILE:
                part = tl.zeros((BLOCK_D, J), dtype=ACC)
            for i in tl.static_range(8):
                part += dpre[i] * _pick(prv, cur, nxt, i - (W - 1) + k)
            if SUM_EACH_TILE:
                dw_acc += tl.where(taps[None, :] == k, tl.sum(part, axis=1)[:, None], 0.0)
            new_parts = new_parts + (part,)
        dsum = parts[W]
        if SUM_EACH_TILE:
            dsum = tl.zeros((BLOCK_D, J), dtype=ACC)
        if HAS_BIAS:
            for i in tl.static_range(8):
                dsum += dpre[i]
            if SUM_EACH_TILE:
                db_acc += tl.sum(dsum, axis=1)
        parts = new_parts + (dsum,)
    if not SUM_EACH_TILE:
        for k in tl.static_range(W):
            dw_acc += tl.where(taps[None, :] == k, tl.sum(parts[k], axis=1)[:, None], 0.0)
        db_acc = tl.sum(parts[W], axis=1)
    row = batch * n_chunks + pid_c
    tl.store(dw_part_ptr + row * D * W + offs_d[:, None] * W + taps[None, :], dw_acc,
             mask=mask_d[:, None] & (taps[None, :] < W))
    if HAS_BIAS:
        tl.store(db_part_ptr + row * D + offs_d, db_acc, mask=mask_d)


# ----------------------------------------------------------------------------------------------
# Launch helpers


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tiles(x: torch.Tensor) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_L, num_warps): long tiles along whichever of D and L is contiguous, so loads
    are coalesced in both the [B, D, L]-contiguous and the channel-last layouts."""
    L = x.shape[-1]
    if x.stride(1) == 1 and x.stride(2) != 1:
        return 64, min(32, max(16, next_power_of_2(L))), 4
    return 32, min(128, max(16, next_power_of_2(L))), 4


# Tiles of the column kernels, (BLOCK_D channels, J groups of 8 positions, warps), per direction and
# layout ("l": contiguous length axis, "cl": channel-last x); "bwd_sum": where the backward sums its
# dweight / dbias partials over the groups ("end": once per program; "tile": every tile). Chosen by
# timing on an H100 (docs/kernels/causal_conv1d.md); a benchmark may override them. "fwd_cl" (128, 4, 4): at
# B64 D1536 L512 (a batch-64 Mamba-1 prefill) 79.7 us against 99.5 with (32, 8, 2), at B8 D3072 L2048 76.0
# against 88.2; from batch 1 to 16 within 1.2 us of it.
COL_TILES = {"fwd_l": (16, 16, 4), "fwd_cl": (128, 4, 4), "bwd_l": (16, 16, 4), "bwd_cl": (64, 4, 4),
             "bwd_sum": "end"}


def _channel_last(x: torch.Tensor) -> bool:
    """Whether [B, D, L] x is the channel-last view of a [B, L, D] tensor (its channels contiguous)."""
    return x.shape[1] > 1 and x.shape[2] > 1 and x.stride(1) == 1 and x.stride(2) != 1


def _new_like(x: torch.Tensor) -> torch.Tensor:
    """An uninitialized [B, D, L] tensor in x's layout: channel-last when x is (a layer's
    ``.transpose(1, 2)`` back to [B, L, D] is then free), else contiguous."""
    batch, dim, length = x.shape
    if _channel_last(x):
        return torch.empty(batch, length, dim, device=x.device, dtype=x.dtype).transpose(1, 2)
    return torch.empty(batch, dim, length, device=x.device, dtype=x.dtype)


def _column_form(x: torch.Tensor, initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                 forward: bool = False) -> str | None:
    """Which column kernel serves this call ("l" / "cl"), or None for the general kernels (packed
    sequences, an initial state in the backward, or a length axis and a channel axis that are both
    strided)."""
    if (initial_state is not None and not forward) or cu_seqlens is not None:
        return None
    if _channel_last(x):
        return "cl"
    if x.stride(2) == 1 or x.shape[2] == 1:
        return "l"
    return None


def _chunking(n_lblocks: int, batch: int, n_dblocks: int, device: torch.device) -> tuple[int, int]:
    """(chunk_iters, n_chunks): enough programs to fill the GPU (about 8 per SM); the rest of the length
    is looped over inside a program, which keeps the partial-sum rows (and their reduction) small.
    chunk_iters is a power of two (a compile-time constant: few variants get compiled)."""
    want_chunks = max(1, (8 * _num_sms(device)) // max(1, batch * n_dblocks))
    chunk_iters = next_power_of_2(cdiv(n_lblocks, min(n_lblocks, want_chunks)))
    return chunk_iters, cdiv(n_lblocks, chunk_iters)


def _strides3(t: torch.Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if t is None else tuple(t.stride())


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _seq_index(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """int32 [total]: the sequence of each packed position (no host sync: output_size is known)."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    ids = torch.arange(lengths.numel(), device=cu_seqlens.device, dtype=torch.int32)
    return torch.repeat_interleave(ids, lengths, output_size=total)


def check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 activation: str | None, initial_state: torch.Tensor | None,
                 cu_seqlens: torch.Tensor | None) -> None:
    """Clear errors for what these kernels cannot take (beyond the public function's checks)."""
    width = weight.shape[1]
    if not 2 <= width <= MAX_WIDTH:
        raise ValueError(f"causal_conv1d (triton): kernel width {width} is outside 2..{MAX_WIDTH}; "
                         "use the reference backend (SSM_SUITE_BACKEND_CAUSAL_CONV1D=reference)")
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"unknown activation {activation!r}; use None or 'silu'")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"causal_conv1d (triton): unsupported dtype {x.dtype}")
    tensors = [t for t in (weight, bias, initial_state, cu_seqlens) if t is not None]
    if any(t.device != x.device for t in tensors):
        raise ValueError("causal_conv1d (triton): all tensors must be on x's device")
    if bias is not None and tuple(bias.shape) != (x.shape[1],):
        raise ValueError(f"bias must be [{x.shape[1]}], got {tuple(bias.shape)}")
    if cu_seqlens is not None:
        if x.shape[0] != 1:
            raise ValueError(f"with cu_seqlens, x must hold one packed row (batch 1), got batch {x.shape[0]}")
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError("cu_seqlens must be a 1D int32/int64 tensor [S+1]")
    rows = x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape[0] != rows:
        raise ValueError(f"initial_state must have {rows} rows (one per sequence), got {initial_state.shape[0]}")
    if x.shape[1] > 65535 * 64:
        raise ValueError(f"causal_conv1d (triton): D={x.shape[1]} exceeds the grid limit 65535*64")
    if cu_seqlens is None and x.shape[0] > 65535:
        raise ValueError(f"causal_conv1d (triton): batch {x.shape[0]} exceeds 65535; split the batch")


# ----------------------------------------------------------------------------------------------
# Custom ops (torch.compile sees them as single nodes)


@torch.library.custom_op("ssm_suite::causal_conv1d_fwd", mutates_args=())
def causal_conv1d_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool,
    initial_state: torch.Tensor | None, return_final_state: bool, cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (y [B, D, L] in x's dtype and layout, final state [B or S, D, W-1] fp32, or an empty
    tensor)."""
    batch, dim, L = x.shape
    width = weight.shape[1]
    y = _new_like(x)
    acc = _acc(x.dtype)
    form = _column_form(x, initial_state, cu_seqlens, forward=True)
    if x.numel() > 0 and form is not None:
        block_d, groups, warps = COL_TILES["fwd_" + form]
        grid = (cdiv(L, 8 * groups), batch, cdiv(dim, block_d))
        _conv_fwd_cols_kernel[grid](
            x, weight, bias, initial_state, y, dim, L, *x.stride(), *weight.stride(), *_strides3(initial_state),
            *y.stride(), W=width, HAS_BIAS=bias is not None, HAS_INIT=initial_state is not None, SILU=silu,
            CHANNEL_LAST=form == "cl", ACC=acc, BLOCK_D=block_d, J=groups, num_warps=warps,
        )
    elif x.numel() > 0:
        seqidx = None if cu_seqlens is None else _seq_index(cu_seqlens, L)
        block_d, block_l, warps = _tiles(x)
        grid = (cdiv(L, block_l), batch, cdiv(dim, block_d))
        _conv_fwd_kernel[grid](
            x, weight, bias, initial_state, y, cu_seqlens, seqidx,
            dim, L, *x.stride(), *weight.stride(), *_strides3(initial_state), *y.stride(),
            W=width, HAS_BIAS=bias is not None, HAS_INIT=initial_state is not None,
            IS_VARLEN=cu_seqlens is not None, SILU=silu, ACC=acc,
            BLOCK_D=block_d, BLOCK_L=block_l, num_warps=warps,
        )
    if not return_final_state:
        return y, x.new_empty(0, dtype=_state_dtype(x.dtype))
    rows = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    final = torch.empty(rows, dim, width - 1, device=x.device, dtype=_state_dtype(x.dtype))
    if final.numel() > 0:
        _final_state_kernel[(rows, cdiv(dim, 64))](
            x, initial_state, final, cu_seqlens, dim, L, *x.stride(), *_strides3(initial_state),
            *final.stride(), W=width, HAS_INIT=initial_state is not None,
            IS_VARLEN=cu_seqlens is not None, BLOCK_D=64, BLOCK_K=max(2, next_power_of_2(width - 1)),
        )
    return y, final


@causal_conv1d_fwd.register_fake
def _(x, weight, bias, silu, initial_state, return_final_state, cu_seqlens):
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if not return_final_state:
        return _new_like(x), x.new_empty(0, dtype=dtype)
    rows = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return _new_like(x), x.new_empty(rows, x.shape[1], weight.shape[1] - 1, dtype=dtype)


@torch.library.custom_op("ssm_suite::causal_conv1d_bwd", mutates_args=())
def causal_conv1d_bwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool,
    initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None, dy: torch.Tensor,
    dfinal: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx in x's layout, dweight, dbias or empty, dinitial_state or empty)."""
    batch, dim, L = x.shape
    width = weight.shape[1]
    acc_dtype = _state_dtype(x.dtype)
    dx = _new_like(x)
    form = _column_form(x, initial_state, cu_seqlens)
    if form is not None:
        block_d, groups, warps = COL_TILES["bwd_" + form]
        block_l = 8 * groups
    else:
        block_d, block_l, warps = _tiles(x)
    n_dblocks = cdiv(dim, block_d)
    chunk_iters, n_chunks = _chunking(max(1, cdiv(L, block_l)), batch, n_dblocks, x.device)
    dw_part = torch.empty(batch * n_chunks, dim, width, device=x.device, dtype=acc_dtype)
    db_part = torch.empty(batch * n_chunks, dim, device=x.device, dtype=acc_dtype) if bias is not None else None
    common = dict(W=width, HAS_BIAS=bias is not None, HAS_INIT=initial_state is not None,
                  HAS_DFINAL=dfinal is not None, IS_VARLEN=cu_seqlens is not None, SILU=silu,
                  ACC=_acc(x.dtype))
    if x.numel() > 0:
        if form is not None:
            _conv_bwd_cols_kernel[(n_chunks, batch, n_dblocks)](
                x, weight, bias, dy, dfinal, dx, dw_part, db_part, dim, L, n_chunks,
                *x.stride(), *weight.stride(), *dy.stride(), *_strides3(dfinal), *dx.stride(),
                W=width, HAS_BIAS=bias is not None, HAS_DFINAL=dfinal is not None, SILU=silu,
                CHANNEL_LAST=form == "cl", ACC=_acc(x.dtype), BLOCK_D=block_d, J=groups,
                BLOCK_W=next_power_of_2(width), CHUNK_ITERS=chunk_iters,
                SUM_EACH_TILE=COL_TILES["bwd_sum"] == "tile", num_warps=warps,
            )
        else:
            seqidx = None if cu_seqlens is None else _seq_index(cu_seqlens, L)
            _conv_bwd_kernel[(n_chunks, batch, n_dblocks)](
                x, weight, bias, initial_state, dy, dfinal, dx, dw_part, db_part, cu_seqlens, seqidx,
                dim, L, n_chunks, *x.stride(), *weight.stride(), *_strides3(initial_state), *dy.stride(),
                *_strides3(dfinal), *dx.stride(),
                BLOCK_D=block_d, BLOCK_L=block_l, BLOCK_W=next_power_of_2(width),
                CHUNK_ITERS=chunk_iters, num_warps=warps, **common,
            )
        dweight = dw_part.sum(0).to(weight.dtype)
        dbias = db_part.sum(0).to(bias.dtype) if bias is not None else x.new_empty(0)
    else:
        dweight = torch.zeros_like(weight)
        dbias = torch.zeros_like(bias) if bias is not None else x.new_empty(0)
    if initial_state is None:
        return dx, dweight, dbias, x.new_empty(0)
    dinit = torch.empty_like(initial_state)
    _conv_dinit_kernel[(initial_state.shape[0], cdiv(dim, 64))](
        x, weight, bias, initial_state, dy, dfinal, dinit, cu_seqlens, dim, L,
        *x.stride(), *weight.stride(), *_strides3(initial_state), *dy.stride(), *_strides3(dfinal),
        *dinit.stride(), BLOCK_D=64, BLOCK_K=max(2, next_power_of_2(width - 1)), **common,
    )
    return dx, dweight, dbias, dinit


@causal_conv1d_bwd.register_fake
def _(x, weight, bias, silu, initial_state, cu_seqlens, dy, dfinal):
    return (_new_like(x), torch.empty_like(weight),
            torch.empty_like(bias) if bias is not None else x.new_empty(0),
            torch.empty_like(initial_state) if initial_state is not None else x.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, silu, initial_state, return_final_state, cu_seqlens = inputs
    ctx.save_for_backward(x, weight, bias, initial_state, cu_seqlens)
    ctx.silu = silu
    ctx.return_final_state = return_final_state


def _backward(ctx, dy, dfinal):
    x, weight, bias, initial_state, cu_seqlens = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    dfinal = dfinal if (ctx.return_final_state and dfinal is not None) else None
    dx, dweight, dbias, dinit = call_op(causal_conv1d_bwd, x, weight, bias, ctx.silu, initial_state, cu_seqlens,
                                                  dy, dfinal)
    return (dx, dweight, dbias if bias is not None else None, None,
            dinit if initial_state is not None else None, None, None)


causal_conv1d_fwd.register_autograd(_backward, setup_context=_setup_context)


# The training path's autograd: the registered one, without torch.library's per-call wrapper (kernels/host.py).
_CausalConv1dFunction = op_function(causal_conv1d_fwd, _setup_context, _backward, differentiable_outputs=2)


@torch.library.custom_op("ssm_suite::causal_conv1d_step", mutates_args=("conv_state",))
def causal_conv1d_step_op(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool,
) -> torch.Tensor:
    batch, dim = x.shape
    width = weight.shape[1]
    y = torch.empty_like(x)
    if x.numel() > 0:
        _conv_step_kernel[(batch, cdiv(dim, 128))](
            x, conv_state, weight, bias, y, dim, *x.stride(), *conv_state.stride(), *weight.stride(),
            *y.stride(), W=width, HAS_BIAS=bias is not None, SILU=silu, ACC=_acc(x.dtype), BLOCK_D=128,
        )
    return y


@causal_conv1d_step_op.register_fake
def _(x, conv_state, weight, bias, silu):
    return torch.empty_like(x)


# ----------------------------------------------------------------------------------------------
# Backend entry points (the signatures of reference.py)


def causal_conv1d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton causal depthwise conv1d; same contract as ``causal_conv1d_reference``."""
    check_inputs(x, weight, bias, activation, initial_state, cu_seqlens)
    args = (x, weight, bias, activation is not None, initial_state, return_final_state, cu_seqlens)
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, initial_state))
    y, final = _CausalConv1dFunction.apply(*args) if grads else call_op(causal_conv1d_fwd, *args)
    return (y, final) if return_final_state else y


def causal_conv1d_step_triton(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """One token: x [B, D]; conv_state [B, D, W-1] updated in place; returns y [B, D]."""
    width = weight.shape[1]
    if not 2 <= width <= MAX_WIDTH:
        raise ValueError(f"causal_conv1d_step (triton): kernel width {width} is outside 2..{MAX_WIDTH}; "
                         "use the reference backend")
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"unknown activation {activation!r}; use None or 'silu'")
    if x.dim() != 2 or tuple(conv_state.shape) != (x.shape[0], x.shape[1], width - 1):
        raise ValueError(f"causal_conv1d_step: x must be [B, D] and conv_state [B, D, {width - 1}], "
                         f"got {tuple(x.shape)} and {tuple(conv_state.shape)}")
    if x.shape[0] > 65535:
        raise ValueError(f"causal_conv1d_step (triton): batch {x.shape[0]} exceeds 65535; split the batch")
    return causal_conv1d_step_op(x, conv_state, weight, bias, activation is not None)
