"""Selective scan (Mamba-1's S6) in Triton: forward, backward and the one-token step.

Semantics are those of ``reference.py``; shapes (mamba_ssm's ``selective_scan_fn`` layout):
    u, delta, z    [B, D, L]   fp16 / bf16 / fp32 / fp64, any strides
    A              [D, N]      real
    B, C           [B, N, L] (shared) or [B, G, N, L] (G groups of D/G channels)
    D, delta_bias  [D]
    initial_state  [B, D, N] (or [S, D, N] with cu_seqlens)
    cu_seqlens     int [S+1] with B == 1: S sequences packed along L (empty ones allowed)
    returns y [B, D, L] (u's dtype) and, when asked, the final state [B or S, D, N] (float32; float64 for
    float64 inputs).

Layout of the work. One program owns (batch row b, group g, a block of BLOCK_D channels of that group)
and walks the length in tiles of BLOCK_L positions, keeping the state h [BLOCK_D, N] in registers in
fp32. In a tile the recurrence h_t = a_t h_{t-1} + x_t (a_t = exp(dt_t A), x_t = dt_t u_t B_t) is one
``tl.associative_scan`` over the [BLOCK_D, N, BLOCK_L] tile with the combine
(a1, x1), (a2, x2) -> (a1 a2, a2 x1 + x2); the tile's states are then H_t + P_t h_carry, where
(P_t, H_t) is the scan and h_carry the state before the tile. A sequence start t (position 0, or a
``cu_seqlens`` boundary) sets a_t = 0 and adds exp(dt_t A) h0 to x_t: the carry cannot leak across
sequences, and the initial state enters exactly where the reference puts it. The final state of each
sequence is stored from its last position.

For the backward the forward stores the state at every tile start ("checkpoints", [B, L/BLOCK_L, D, N]
fp32, as mamba_ssm's CUDA kernel keeps its per-chunk states); the backward walks the tiles in reverse,
recomputes the tile's states from its checkpoint, and runs the adjoint recurrence
lambda_t = C_t dy_t + a_{t+1} lambda_{t+1} as a reverse ``tl.associative_scan``. That recurrence reads
the decay of the *next* position, so its scan elements carry three values (M, V, a) that compose as
affine maps without shifting the tile: (M1, V1, a1) later in time, (M2, V2, a2) earlier:
(M2 a1 M1, V2 + M2 a1 V1, a2); then lambda_t = V_t + M_t q, with q = a lambda of the tile after.
The terms that need h_{t-1} use a_t h_{t-1} = h_t - x_t (no division, no shifted loads):
    dA[d, n]  += sum_t lambda_t (h_t - x_t) dt_t
    d dt_t    += sum_n lambda_t ((h_t - x_t) A + B_t u_t)
    d h0      =  a_t lambda_t at each sequence start t.

Determinism: nothing uses atomics. dB and dC (summed over the channels of a group) are written as one
fp32 partial row per channel block and reduced with ``torch.sum``; dA, dD and d delta_bias (summed over
batch and length) accumulate in registers over the length and are written as one row per batch row.
All offsets are int64 (B x D x L may pass 2^31 elements).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_DSTATE = 256


# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _combine(a1, x1, a2, x2):
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _combine_adjoint(m1, v1, a1, m2, v2, a2):
    # (m1, v1, a1): the later-in-time segment; (m2, v2, a2): the earlier one (reverse scan order).
    return m2 * a1 * m1, v2 + m2 * a1 * v1, a2


@triton.jit
def _softplus(x):
    # log1p(exp(x)) without overflow and without losing small values (log(1 + e) rounds e < 2^-24
    # away): torch's threshold of 20 above which softplus(x) = x.
    e = tl.exp(-tl.abs(x))
    lp = tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + lp)


@triton.jit
def _positions(cu_ptr, seqidx_ptr, pos, mask_l, batch, L, VARLEN: tl.constexpr):
    """Sequence index (int64 [BLOCK_L]) and whether each position starts / ends its sequence."""
    if VARLEN:
        seq = tl.load(seqidx_ptr + pos, mask=mask_l, other=0).to(tl.int64)
        start = tl.load(cu_ptr + seq, mask=mask_l, other=0).to(tl.int64)
        end = tl.load(cu_ptr + seq + 1, mask=mask_l, other=0).to(tl.int64)
    else:
        seq = tl.zeros_like(pos) + batch
        start = tl.zeros_like(pos)
        end = tl.zeros_like(pos) + L
    is_start = mask_l & (pos == start)
    is_last = mask_l & (pos == end - 1)
    return seq, is_start, is_last


@triton.jit
def _tile_inputs(u_ptr, delta_ptr, bias, A, b_ptr, pos, mask_l, offs_d, mask_d, offs_n, mask_n,
                 stride_ud, stride_ul, stride_dd, stride_dl, stride_bn, stride_bl,
                 HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, ACC: tl.constexpr):
    """u, dt, the raw delta + bias (for the softplus derivative) [BLOCK_D, BLOCK_L], B [N, BLOCK_L],
    the decay a [BLOCK_D, N, BLOCK_L] and the input x = dt u B. Positions past L get dt = 0 (a = 1,
    x = 0), so the state passes through them unchanged."""
    mask_dl = mask_d[:, None] & mask_l[None, :]
    u = tl.load(u_ptr + offs_d[:, None] * stride_ud + pos[None, :] * stride_ul, mask=mask_dl, other=0.0).to(ACC)
    raw = tl.load(delta_ptr + offs_d[:, None] * stride_dd + pos[None, :] * stride_dl,
                  mask=mask_dl, other=0.0).to(ACC)
    if HAS_BIAS:
        raw += bias[:, None]
    if SOFTPLUS:
        dt = _softplus(raw)
    else:
        dt = raw
    dt = tl.where(mask_dl, dt, 0.0)
    Bt = tl.load(b_ptr + offs_n[:, None] * stride_bn + pos[None, :] * stride_bl,
                 mask=mask_n[:, None] & mask_l[None, :], other=0.0).to(ACC)
    a = tl.exp(dt[:, None, :] * A[:, :, None])
    x = (dt * u)[:, None, :] * Bt[None, :, :]
    return u, dt, raw, Bt, a, x


@triton.jit
def _tile_states(a, x, is_start, seq, h0_ptr, carry, offs_d, mask_d, offs_n, mask_n,
                 stride_hs, stride_hd, stride_hn, HAS_INIT: tl.constexpr, VARLEN: tl.constexpr):
    """The tile's states h [BLOCK_D, N, BLOCK_L] from the state before it (carry [BLOCK_D, N]), and
    the decay with sequence starts cut (a_cut). Without cu_seqlens the only start is position 0,
    where the carry is the initial state (or 0) already: nothing to cut, and no [BLOCK_D, N, BLOCK_L]
    gather of initial states (whose 64-bit pointers would cost registers)."""
    a_cut = a
    x_in = x
    if VARLEN:
        start3 = is_start[None, None, :]
        a_cut = tl.where(start3, 0.0, a)
    if HAS_INIT and VARLEN:
        h0 = tl.load(h0_ptr + seq[None, None, :] * stride_hs + offs_d[:, None, None] * stride_hd
                     + offs_n[None, :, None] * stride_hn,
                     mask=start3 & mask_d[:, None, None] & mask_n[None, :, None], other=0.0).to(a.dtype)
        x_in = x + a * h0
    P, H = tl.associative_scan((a_cut, x_in), 2, _combine)
    h = H + P * carry[:, :, None]
    return h, a_cut


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, y_ptr, final_ptr, ckpt_ptr,
    cu_ptr, seqidx_ptr,
    DIM, DG, L, NSTATE, n_tiles,
    stride_ub, stride_ud, stride_ul, stride_db, stride_dd, stride_dl, stride_zb, stride_zd, stride_zl,
    stride_yb, stride_yd, stride_yl, stride_ad, stride_an,
    stride_bb, stride_bg, stride_bn, stride_bl, stride_cb, stride_cg, stride_cn, stride_cl,
    stride_hs, stride_hd, stride_hn, stride_fs, stride_fd, stride_fn,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_INIT: tl.constexpr, VARLEN: tl.constexpr, STORE_FINAL: tl.constexpr, SAVE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    batch = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1).to(tl.int64)
    in_group = tl.program_id(2).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = in_group < DG
    offs_d = group * DG + in_group
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    mask_n = offs_n < NSTATE
    cols = tl.arange(0, BLOCK_L)

    u_ptr += batch * stride_ub
    delta_ptr += batch * stride_db
    if HAS_Z:
        z_ptr += batch * stride_zb
    y_ptr += batch * stride_yb
    b_ptr = B_ptr + batch * stride_bb + group * stride_bg
    c_ptr = C_ptr + batch * stride_cb + group * stride_cg
    A = tl.load(A_ptr + offs_d[:, None] * stride_ad + offs_n[None, :] * stride_an,
                mask=mask_d[:, None] & mask_n[None, :], other=0.0).to(ACC)
    bias = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    Dv = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    mask_dn = mask_d[:, None] & mask_n[None, :]
    # checkpoints: [B, n_tiles, DIM, NSTATE], contiguous
    ckpt_row = ckpt_ptr + batch * n_tiles * DIM * NSTATE + offs_d[:, None] * NSTATE + offs_n[None, :]

    carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
    if HAS_INIT and not VARLEN:
        carry = tl.load(h0_ptr + batch * stride_hs + offs_d[:, None] * stride_hd + offs_n[None, :] * stride_hn,
                        mask=mask_dn, other=0.0).to(ACC)
    # A while loop, not range(n_tiles): the interpreter cannot index with a runtime scalar (numpy 2).
    tile = tl.program_id(0) * 0
    while tile < n_tiles:
        pos = tile.to(tl.int64) * BLOCK_L + cols
        mask_l = pos < L
        if SAVE:
            tl.store(ckpt_row + tile.to(tl.int64) * DIM * NSTATE, carry, mask=mask_dn)
        seq, is_start, is_last = _positions(cu_ptr, seqidx_ptr, pos, mask_l, batch, L, VARLEN)
        u, dt, raw, Bt, a, x = _tile_inputs(u_ptr, delta_ptr, bias, A, b_ptr, pos, mask_l, offs_d, mask_d,
                                            offs_n, mask_n, stride_ud, stride_ul, stride_dd, stride_dl,
                                            stride_bn, stride_bl, HAS_BIAS, SOFTPLUS, ACC)
        h, a_cut = _tile_states(a, x, is_start, seq, h0_ptr, carry, offs_d, mask_d, offs_n, mask_n,
                                stride_hs, stride_hd, stride_hn, HAS_INIT, VARLEN)
        Ct = tl.load(c_ptr + offs_n[:, None] * stride_cn + pos[None, :] * stride_cl,
                     mask=mask_n[:, None] & mask_l[None, :], other=0.0).to(ACC)
        y = tl.sum(h * Ct[None, :, :], axis=1)
        if HAS_D:
            y += Dv[:, None] * u
        mask_dl = mask_d[:, None] & mask_l[None, :]
        if HAS_Z:
            zt = tl.load(z_ptr + offs_d[:, None] * stride_zd + pos[None, :] * stride_zl,
                         mask=mask_dl, other=0.0).to(ACC)
            y = y * zt * tl.sigmoid(zt)
        tl.store(y_ptr + offs_d[:, None] * stride_yd + pos[None, :] * stride_yl,
                 y.to(y_ptr.dtype.element_ty), mask=mask_dl)
        if STORE_FINAL and VARLEN:
            tl.store(final_ptr + seq[None, None, :] * stride_fs + offs_d[:, None, None] * stride_fd
                     + offs_n[None, :, None] * stride_fn, h,
                     mask=is_last[None, None, :] & mask_dn[:, :, None])
        carry = tl.sum(tl.where(cols[None, None, :] == BLOCK_L - 1, h, 0.0), axis=2)
        tile += 1
    if STORE_FINAL and not VARLEN:
        # positions past L keep the state: the last carry is the state after position L-1
        tl.store(final_ptr + batch * stride_fs + offs_d[:, None] * stride_fd + offs_n[None, :] * stride_fn,
                 carry, mask=mask_dn)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, ckpt_ptr, cu_ptr, seqidx_ptr,
    dy_ptr, dfinal_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dh0_ptr, dA_part_ptr, dD_part_ptr, dbias_part_ptr, dB_part_ptr, dC_part_ptr,
    DIM, DG, L, NSTATE, n_tiles, n_blocks,
    stride_ub, stride_ud, stride_ul, stride_db, stride_dd, stride_dl, stride_zb, stride_zd, stride_zl,
    stride_gb, stride_gd, stride_gl, stride_ad, stride_an,
    stride_bb, stride_bg, stride_bn, stride_bl, stride_cb, stride_cg, stride_cn, stride_cl,
    stride_hs, stride_hd, stride_hn, stride_fs, stride_fd, stride_fn,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_INIT: tl.constexpr, HAS_DFINAL: tl.constexpr, VARLEN: tl.constexpr,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Gradients of one (batch row, group, channel block), tiles in reverse. du / ddelta / dz share
    the strides of a contiguous [B, D, L] tensor (stride_g*); dh0 is [S, D, N] contiguous (zeros
    where never written); partial rows: dA, dD, dbias [B, D(, N)]; dB, dC [B, G, n_blocks, N, L]."""
    batch = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1).to(tl.int64)
    block = tl.program_id(2).to(tl.int64)
    in_group = block * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = in_group < DG
    offs_d = group * DG + in_group
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    mask_n = offs_n < NSTATE
    mask_dn = mask_d[:, None] & mask_n[None, :]
    cols = tl.arange(0, BLOCK_L)
    G = tl.num_programs(1)

    u_ptr += batch * stride_ub
    delta_ptr += batch * stride_db
    if HAS_Z:
        z_ptr += batch * stride_zb
    dy_ptr += batch * stride_gb  # dy is contiguous, like the gradients written here
    b_ptr = B_ptr + batch * stride_bb + group * stride_bg
    c_ptr = C_ptr + batch * stride_cb + group * stride_cg
    out_off = batch * stride_gb
    A = tl.load(A_ptr + offs_d[:, None] * stride_ad + offs_n[None, :] * stride_an, mask=mask_dn,
                other=0.0).to(ACC)
    bias = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    Dv = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    ckpt_row = ckpt_ptr + batch * n_tiles * DIM * NSTATE + offs_d[:, None] * NSTATE + offs_n[None, :]
    part_row = ((batch * G + group) * n_blocks + block) * NSTATE * L  # this program's dB / dC row

    q = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)  # a_{t+1} lambda_{t+1} from the tile after
    if HAS_DFINAL and not VARLEN:
        # lambda_{L-1} = C dy + dfinal: dfinal enters as the q after the last position (positions past
        # L have a = 1 and no gradient, so it reaches L-1 unchanged)
        q = tl.load(dfinal_ptr + batch * stride_fs + offs_d[:, None] * stride_fd + offs_n[None, :] * stride_fn,
                    mask=mask_dn, other=0.0).to(ACC)
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
    dD_acc = tl.zeros((BLOCK_D,), dtype=ACC)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=ACC)
    # (a tensor from the start: an int argument equal to 1 is specialized to a constant)
    tile = tl.program_id(0) * 0 + n_tiles - 1
    while tile >= 0:
        pos = tile.to(tl.int64) * BLOCK_L + cols
        mask_l = pos < L
        mask_dl = mask_d[:, None] & mask_l[None, :]
        seq, is_start, is_last = _positions(cu_ptr, seqidx_ptr, pos, mask_l, batch, L, VARLEN)
        u, dt, raw, Bt, a, x = _tile_inputs(u_ptr, delta_ptr, bias, A, b_ptr, pos, mask_l, offs_d, mask_d,
                                            offs_n, mask_n, stride_ud, stride_ul, stride_dd, stride_dl,
                                            stride_bn, stride_bl, HAS_BIAS, SOFTPLUS, ACC)
        carry = tl.load(ckpt_row + tile.to(tl.int64) * DIM * NSTATE, mask=mask_dn, other=0.0)
        h, a_cut = _tile_states(a, x, is_start, seq, h0_ptr, carry, offs_d, mask_d, offs_n, mask_n,
                                stride_hs, stride_hd, stride_hn, HAS_INIT, VARLEN)
        Ct = tl.load(c_ptr + offs_n[:, None] * stride_cn + pos[None, :] * stride_cl,
                     mask=mask_n[:, None] & mask_l[None, :], other=0.0).to(ACC)
        dy = tl.load(dy_ptr + offs_d[:, None] * stride_gd + pos[None, :] * stride_gl,
                     mask=mask_dl, other=0.0).to(ACC)
        if HAS_Z:
            zt = tl.load(z_ptr + offs_d[:, None] * stride_zd + pos[None, :] * stride_zl,
                         mask=mask_dl, other=0.0).to(ACC)
            y = tl.sum(h * Ct[None, :, :], axis=1) + Dv[:, None] * u
            sig = tl.sigmoid(zt)
            dz = dy * y * sig * (1.0 + zt * (1.0 - sig))
            tl.store(dz_ptr + out_off + offs_d[:, None] * stride_gd + pos[None, :] * stride_gl,
                     dz.to(dz_ptr.dtype.element_ty), mask=mask_dl)
            dy = dy * zt * sig
        if HAS_D:
            dD_acc += tl.sum(dy * u, axis=1)
        g = Ct[None, :, :] * dy[:, None, :]
        if HAS_DFINAL and VARLEN:
            g += tl.load(dfinal_ptr + seq[None, None, :] * stride_fs + offs_d[:, None, None] * stride_fd
                         + offs_n[None, :, None] * stride_fn,
                         mask=is_last[None, None, :] & mask_dn[:, :, None], other=0.0).to(ACC)
        M, V, _ = tl.associative_scan((tl.full(g.shape, 1.0, ACC), g, a_cut), 2, _combine_adjoint,
                                      reverse=True)
        lam = V + M * q[:, :, None]
        # a_t h_{t-1} = h_t - x_t (the initial state's term at sequence starts, 0 without one)
        ah = h - x
        dB = tl.sum(lam * (dt * u)[:, None, :], axis=0)
        dC = tl.sum(h * dy[:, None, :], axis=0)
        nl = offs_n[:, None] * L + pos[None, :]
        mask_nl = mask_n[:, None] & mask_l[None, :]
        tl.store(dB_part_ptr + part_row + nl, dB, mask=mask_nl)
        tl.store(dC_part_ptr + part_row + nl, dC, mask=mask_nl)
        lamB = tl.sum(lam * Bt[None, :, :], axis=1)
        du = dt * lamB + Dv[:, None] * dy
        ddt = u * lamB + tl.sum(lam * ah * A[:, :, None], axis=1)
        dA_acc += tl.sum(lam * ah * dt[:, None, :], axis=2)
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(raw)
        ddt = tl.where(mask_dl, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=1)
        tl.store(du_ptr + out_off + offs_d[:, None] * stride_gd + pos[None, :] * stride_gl,
                 du.to(du_ptr.dtype.element_ty), mask=mask_dl)
        tl.store(ddelta_ptr + out_off + offs_d[:, None] * stride_gd + pos[None, :] * stride_gl,
                 ddt.to(ddelta_ptr.dtype.element_ty), mask=mask_dl)
        if HAS_INIT and VARLEN:
            tl.store(dh0_ptr + seq[None, None, :] * DIM * NSTATE + offs_d[:, None, None] * NSTATE
                     + offs_n[None, :, None], a * lam,
                     mask=is_start[None, None, :] & mask_dn[:, :, None])
        q = tl.sum(tl.where(cols[None, None, :] == 0, a_cut * lam, 0.0), axis=2)
        tile -= 1
    if HAS_INIT and not VARLEN:
        # the q left after position 0 is a_0 lambda_0, the initial state's gradient
        tl.store(dh0_ptr + batch * DIM * NSTATE + offs_d[:, None] * NSTATE + offs_n[None, :], q, mask=mask_dn)
    tl.store(dA_part_ptr + batch * DIM * NSTATE + offs_d[:, None] * NSTATE + offs_n[None, :], dA_acc,
             mask=mask_dn)
    if HAS_D:
        tl.store(dD_part_ptr + batch * DIM + offs_d, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_part_ptr + batch * DIM + offs_d, dbias_acc, mask=mask_d)


@triton.jit
def _scan_step_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
    DG, NSTATE,
    stride_sb, stride_sd, stride_sn, stride_xb, stride_xd, stride_tb, stride_td, stride_zb, stride_zd,
    stride_yb, stride_yd, stride_ad, stride_an, stride_bb, stride_bg, stride_bn, stride_cb, stride_cg,
    stride_cn,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One token for (batch row, group, channel block). The state tile is read and rewritten with one
    layout by one program, so the in-place update needs no barrier."""
    batch = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1).to(tl.int64)
    in_group = tl.program_id(2).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = in_group < DG
    offs_d = group * DG + in_group
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    mask_n = offs_n < NSTATE
    mask_dn = mask_d[:, None] & mask_n[None, :]
    x = tl.load(x_ptr + batch * stride_xb + offs_d * stride_xd, mask=mask_d, other=0.0).to(ACC)
    dt = tl.load(dt_ptr + batch * stride_tb + offs_d * stride_td, mask=mask_d, other=0.0).to(ACC)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    if SOFTPLUS:
        dt = _softplus(dt)
    A = tl.load(A_ptr + offs_d[:, None] * stride_ad + offs_n[None, :] * stride_an, mask=mask_dn,
                other=0.0).to(ACC)
    Bv = tl.load(B_ptr + batch * stride_bb + group * stride_bg + offs_n * stride_bn, mask=mask_n,
                 other=0.0).to(ACC)
    Cv = tl.load(C_ptr + batch * stride_cb + group * stride_cg + offs_n * stride_cn, mask=mask_n,
                 other=0.0).to(ACC)
    state_tile = state_ptr + batch * stride_sb + offs_d[:, None] * stride_sd + offs_n[None, :] * stride_sn
    h = tl.load(state_tile, mask=mask_dn, other=0.0).to(ACC)
    h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * Bv[None, :]
    tl.store(state_tile, h.to(state_ptr.dtype.element_ty), mask=mask_dn)
    y = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        y += tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(ACC) * x
    if HAS_Z:
        z = tl.load(z_ptr + batch * stride_zb + offs_d * stride_zd, mask=mask_d, other=0.0).to(ACC)
        y = y * z * tl.sigmoid(z)
    tl.store(y_ptr + batch * stride_yb + offs_d * stride_yd, y.to(y_ptr.dtype.element_ty), mask=mask_d)


# ----------------------------------------------------------------------------------------------
# Launch helpers

# Tile sizes (BLOCK_D channels x BLOCK_L positions, warps) for the scan kernels. BLOCK_L is also the
# checkpoint interval, so forward and backward must agree on it. A benchmark may override this.
# Defaults not yet timed on a GPU (see docs/kernels/selective_scan.md); chosen from ptxas's sm_90
# register counts at N=16: the forward at (4, 32, 4) takes 128 registers and no spills; the backward
# keeps about twice as many [BLOCK_D, N, BLOCK_L] tiles live, and at (8, 32, 8) takes 252 registers
# and no spills (at (8, 32, 4) it spills).
TILES = {"fwd": (4, 32, 4), "bwd": (8, 32, 8)}


def _tiles(kind: str, dstate: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_L, warps) for ``kind`` ("fwd" / "bwd"): TILES, with fewer channels per program
    for a state larger than 16 so that the [BLOCK_D, N, BLOCK_L] tiles keep their size in registers.
    BLOCK_L is never changed (it is the checkpoint interval)."""
    block_d, block_l, warps = TILES[kind]
    while block_d > 1 and block_d * _block_n(dstate) > 16 * TILES[kind][0]:
        block_d //= 2
    return block_d, block_l, warps


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _strides(t: torch.Tensor | None, n: int) -> tuple[int, ...]:
    return (0,) * n if t is None else tuple(t.stride())


def _bc4(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, N, L] or [B, G', N, L] -> a [B, groups, N, L] view (shared ones broadcast, stride 0)."""
    x = x if x.dim() == 4 else x.unsqueeze(1)
    return x if x.shape[1] == groups else x.expand(x.shape[0], groups, *x.shape[2:])


def _groups(B: torch.Tensor, C: torch.Tensor, full_ndim: int) -> int:
    gb = B.shape[1] if B.dim() == full_ndim else 1
    gc = C.shape[1] if C.dim() == full_ndim else 1
    return max(gb, gc)


def _seq_index(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """int32 [total]: the sequence of each packed position (no host sync: output_size is known)."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    ids = torch.arange(lengths.numel(), device=cu_seqlens.device, dtype=torch.int32)
    return torch.repeat_interleave(ids, lengths, output_size=total)


def _block_n(dstate: int) -> int:
    return max(2, triton.next_power_of_2(dstate))


def check_inputs(u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 cu_seqlens: torch.Tensor | None, tensors: list[torch.Tensor | None]) -> None:
    """Clear errors for what these kernels cannot take (beyond the public function's shape checks)."""
    if u.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"selective_scan (triton): unsupported dtype {u.dtype}; use fp16/bf16/fp32/fp64")
    if A.is_complex():
        raise ValueError("selective_scan (triton): complex A is not supported; pass a real [D, N] A")
    if any(t is not None and t.device != u.device for t in tensors):
        raise ValueError("selective_scan (triton): all tensors must be on u's device")
    dim, dstate = A.shape
    if dstate > MAX_DSTATE:
        raise ValueError(f"selective_scan (triton): state size N={dstate} exceeds {MAX_DSTATE} "
                         "(the state tile lives in registers); use the chunked backend")
    groups = _groups(B, C, u.dim() + 1)
    if groups > 65535 or triton.cdiv(dim // groups, min(_tiles(k, dstate)[0] for k in TILES)) > 65535:
        raise ValueError(f"selective_scan (triton): G={groups} groups of D/G={dim // groups} channels exceed "
                         "the grid limits (65535 groups, 65535 channel blocks per group); split the channels")
    if cu_seqlens is not None and cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError("selective_scan (triton): cu_seqlens must be an int32/int64 tensor [S+1]")


# ----------------------------------------------------------------------------------------------
# Custom ops (torch.compile sees them as single nodes)


@torch.library.custom_op("ssm_suite::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None, delta_softplus: bool,
    initial_state: torch.Tensor | None, return_final_state: bool, cu_seqlens: torch.Tensor | None,
    save_for_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y [B, D, L] in u's dtype, the final state [B or S, D, N] fp32 or an empty tensor, the
    checkpoints [B, L/BLOCK_L, D, N] fp32 for the backward or an empty tensor)."""
    batch, dim, L = u.shape
    dstate = A.shape[1]
    groups = _groups(B, C, 4)
    dg = dim // groups
    Bv, Cv = _bc4(B, groups), _bc4(C, groups)
    state_dtype = _state_dtype(u.dtype)
    block_d, block_l, warps = _tiles("fwd", dstate)
    if save_for_backward:
        block_l = TILES["bwd"][1]  # the checkpoint interval is the backward's tile
    n_tiles = triton.cdiv(L, block_l)
    y = torch.empty(batch, dim, L, device=u.device, dtype=u.dtype)
    rows = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    final = (torch.zeros(rows, dim, dstate, device=u.device, dtype=state_dtype) if return_final_state
             else u.new_empty(0, dtype=state_dtype))
    ckpt = (torch.empty(batch, n_tiles, dim, dstate, device=u.device, dtype=state_dtype) if save_for_backward
            else u.new_empty(0, dtype=state_dtype))
    seqidx = None if cu_seqlens is None else _seq_index(cu_seqlens, L)
    if u.numel() > 0:
        _scan_fwd_kernel[(batch, groups, triton.cdiv(dg, block_d))](
            u, delta, A, Bv, Cv, D, z, delta_bias, initial_state, y, final, ckpt, cu_seqlens, seqidx,
            dim, dg, L, dstate, n_tiles,
            *u.stride(), *delta.stride(), *_strides(z, 3), *y.stride(), *A.stride(), *Bv.stride(),
            *Cv.stride(), *_strides(initial_state, 3), *_strides(final if return_final_state else None, 3),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=delta_softplus, HAS_INIT=initial_state is not None, VARLEN=cu_seqlens is not None,
            STORE_FINAL=return_final_state, SAVE=save_for_backward, ACC=_acc(u.dtype),
            BLOCK_D=block_d, BLOCK_N=_block_n(dstate), BLOCK_L=block_l, num_warps=warps,
        )
    if return_final_state and cu_seqlens is not None:
        # Empty sequences have no last position: their final state is their initial state (or 0).
        empty = (cu_seqlens[1:] == cu_seqlens[:-1])[:, None, None]
        start = initial_state.to(state_dtype) if initial_state is not None else torch.zeros_like(final)
        final = torch.where(empty, start, final)
    return y, final, ckpt


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state, cu_seqlens,
      save_for_backward):
    state_dtype = _state_dtype(u.dtype)
    batch, dim, L = u.shape
    dstate = A.shape[1]
    rows = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
    final = (u.new_empty(rows, dim, dstate, dtype=state_dtype) if return_final_state
             else u.new_empty(0, dtype=state_dtype))
    n_tiles = triton.cdiv(L, TILES["bwd"][1])
    ckpt = (u.new_empty(batch, n_tiles, dim, dstate, dtype=state_dtype) if save_for_backward
            else u.new_empty(0, dtype=state_dtype))
    return torch.empty_like(u, memory_format=torch.contiguous_format), final, ckpt


@torch.library.custom_op("ssm_suite::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None, delta_softplus: bool,
    initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None, checkpoints: torch.Tensor,
    dy: torch.Tensor, dfinal: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state); an empty tensor stands for
    the gradient of an input that is None."""
    batch, dim, L = u.shape
    dstate = A.shape[1]
    groups = _groups(B, C, 4)
    dg = dim // groups
    Bv, Cv = _bc4(B, groups), _bc4(C, groups)
    acc_dtype = _state_dtype(u.dtype)
    block_d, block_l, warps = _tiles("bwd", dstate)
    n_tiles = triton.cdiv(L, block_l)
    if checkpoints.shape != (batch, n_tiles, dim, dstate):
        raise ValueError(f"selective_scan_bwd: checkpoints {tuple(checkpoints.shape)} do not match the tile "
                         f"length {block_l}; forward and backward must use the same TILES['bwd']")
    n_blocks = triton.cdiv(dg, block_d)
    dy = dy.contiguous()
    du = torch.empty(batch, dim, L, device=u.device, dtype=u.dtype)
    ddelta = torch.empty(batch, dim, L, device=u.device, dtype=delta.dtype)
    dz = torch.empty(batch, dim, L, device=u.device, dtype=z.dtype) if z is not None else u.new_empty(0)
    rows = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    dh0 = (torch.zeros(rows, dim, dstate, device=u.device, dtype=acc_dtype) if initial_state is not None
           else u.new_empty(0))
    dA_part = torch.empty(batch, dim, dstate, device=u.device, dtype=acc_dtype)
    dD_part = torch.empty(batch, dim, device=u.device, dtype=acc_dtype) if D is not None else None
    dbias_part = torch.empty(batch, dim, device=u.device, dtype=acc_dtype) if delta_bias is not None else None
    dB_part = torch.empty(batch, groups, n_blocks, dstate, L, device=u.device, dtype=acc_dtype)
    dC_part = torch.empty(batch, groups, n_blocks, dstate, L, device=u.device, dtype=acc_dtype)
    seqidx = None if cu_seqlens is None else _seq_index(cu_seqlens, L)
    if dfinal is not None:
        dfinal = dfinal.contiguous()
    if u.numel() > 0:
        _scan_bwd_kernel[(batch, groups, n_blocks)](
            u, delta, A, Bv, Cv, D, z, delta_bias, initial_state, checkpoints, cu_seqlens, seqidx, dy, dfinal,
            du, ddelta, dz, dh0, dA_part, dD_part, dbias_part, dB_part, dC_part,
            dim, dg, L, dstate, n_tiles, n_blocks,
            *u.stride(), *delta.stride(), *_strides(z, 3), *du.stride(), *A.stride(), *Bv.stride(),
            *Cv.stride(), *_strides(initial_state, 3), *_strides(dfinal, 3),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=delta_softplus, HAS_INIT=initial_state is not None, HAS_DFINAL=dfinal is not None,
            VARLEN=cu_seqlens is not None, ACC=_acc(u.dtype),
            BLOCK_D=block_d, BLOCK_N=_block_n(dstate), BLOCK_L=block_l, num_warps=warps,
        )
        dA = dA_part.sum(0)
        dD = dD_part.sum(0) if D is not None else None
        dbias = dbias_part.sum(0) if delta_bias is not None else None
        dBg = dB_part.sum(2) if n_blocks > 1 else dB_part[:, :, 0]
        dCg = dC_part.sum(2) if n_blocks > 1 else dC_part[:, :, 0]
    else:
        dA = torch.zeros(dim, dstate, device=u.device, dtype=acc_dtype)
        dD = torch.zeros(dim, device=u.device, dtype=acc_dtype) if D is not None else None
        dbias = torch.zeros(dim, device=u.device, dtype=acc_dtype) if delta_bias is not None else None
        dBg = torch.zeros(batch, groups, dstate, L, device=u.device, dtype=acc_dtype)
        dCg = torch.zeros_like(dBg)
        du.zero_()
        ddelta.zero_()
        dz.zero_()

    def ungroup(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # A shared [B, N, L] B/C was broadcast over the groups: its gradient sums over them.
        return (grad.sum(1) if like.dim() == 3 else grad).to(like.dtype)

    if initial_state is not None:
        if cu_seqlens is not None:
            # An empty sequence passes its initial state straight to its final state.
            empty = (cu_seqlens[1:] == cu_seqlens[:-1])[:, None, None]
            dh0 = torch.where(empty, dfinal.to(dh0.dtype) if dfinal is not None else torch.zeros_like(dh0), dh0)
        dh0 = dh0.to(initial_state.dtype)
    return (du, ddelta, dA.to(A.dtype), ungroup(dBg, B), ungroup(dCg, C),
            dD.to(D.dtype) if D is not None else u.new_empty(0), dz,
            dbias.to(delta_bias.dtype) if delta_bias is not None else u.new_empty(0), dh0)


@selective_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens, checkpoints, dy, dfinal):
    contiguous = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
    return (contiguous(u), contiguous(delta), torch.empty_like(A), contiguous(B), contiguous(C),
            torch.empty_like(D) if D is not None else u.new_empty(0),
            contiguous(z) if z is not None else u.new_empty(0),
            torch.empty_like(delta_bias) if delta_bias is not None else u.new_empty(0),
            contiguous(initial_state) if initial_state is not None else u.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    (u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state, cu_seqlens,
     save_for_backward) = inputs
    if not save_for_backward:
        ctx.checkpoints_missing = True
        return
    ctx.checkpoints_missing = False
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, output[2])
    ctx.delta_softplus = delta_softplus
    ctx.return_final_state = return_final_state


def _backward(ctx, dy, dfinal, _dckpt):
    if ctx.checkpoints_missing:
        raise RuntimeError("selective_scan (triton): the forward ran with save_for_backward=False; call it "
                           "through selective_scan_triton, which saves the checkpoints when grads are needed")
    u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, ckpt = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(u)
    dfinal = dfinal if (ctx.return_final_state and dfinal is not None) else None
    du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = selective_scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, initial_state, cu_seqlens, ckpt, dy, dfinal)
    return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
            dbias if delta_bias is not None else None, None,
            dh0 if initial_state is not None else None, None, None, None)


selective_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("ssm_suite::selective_scan_step", mutates_args=("state",))
def selective_scan_step_op(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None, z: torch.Tensor | None, dt_bias: torch.Tensor | None, dt_softplus: bool,
) -> torch.Tensor:
    """One token; state [B, D, N] updated in place; returns y [B, D] in x's dtype."""
    batch, dim = x.shape
    dstate = A.shape[1]
    groups = _groups(B, C, 3)
    dg = dim // groups
    Bv = B if B.dim() == 3 else B.unsqueeze(1)
    Cv = C if C.dim() == 3 else C.unsqueeze(1)
    Bv = Bv if Bv.shape[1] == groups else Bv.expand(batch, groups, dstate)
    Cv = Cv if Cv.shape[1] == groups else Cv.expand(batch, groups, dstate)
    y = torch.empty(batch, dim, device=x.device, dtype=x.dtype)
    block_d = 32 if dstate <= 32 else 8
    if x.numel() > 0:
        _scan_step_kernel[(batch, groups, triton.cdiv(dg, block_d))](
            state, x, dt, A, Bv, Cv, D, z, dt_bias, y, dg, dstate,
            *state.stride(), *x.stride(), *dt.stride(), *_strides(z, 2), *y.stride(), *A.stride(),
            *Bv.stride(), *Cv.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
            ACC=_acc(x.dtype), BLOCK_D=block_d, BLOCK_N=_block_n(dstate), num_warps=4,
        )
    return y


@selective_scan_step_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------------------------
# Backend entry points (the signatures of reference.py)


def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton selective scan; same contract as ``selective_scan_reference``."""
    check_inputs(u, A, B, C, cu_seqlens, [delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens])
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    y, final, _ = selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                     return_final_state, cu_seqlens, save)
    return (y, final) if return_final_state else y


def selective_scan_step_triton(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> torch.Tensor:
    """One token: state [B, D, N] updated in place; x, dt, z [B, D]; B, C [B, N] or [B, G, N]."""
    check_inputs(x.unsqueeze(-1), A, B, C, None, [state, dt, A, B, C, D, z, dt_bias])
    return selective_scan_step_op(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
