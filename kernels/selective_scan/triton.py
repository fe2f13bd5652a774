"""Selective scan (Mamba-1's S6) in Triton: forward, backward and the one-token step.

Semantics are those of ``reference.py``; shapes (mamba_ssm's ``selective_scan_fn`` layout):
    u, delta, z    [B, D, L]   fp16 / bf16 / fp32 / fp64, any strides: contiguous [B, D, L] or the
                               channel-last view ``x_bld.transpose(1, 2)`` that a Mamba layer has
    A              [D, N]      real
    B, C           [B, N, L] (shared) or [B, G, N, L] (G groups of D/G channels), any strides
    D, delta_bias  [D]
    initial_state  [B, D, N] (or [S, D, N] with cu_seqlens)
    cu_seqlens     int [S+1] with B == 1: S sequences packed along L (empty ones allowed)
    returns y [B, D, L] (u's dtype; channel-last when u is, so a layer's transposes cost no copy) and,
    when asked, the final state [B or S, D, N] (float32; float64 for float64 inputs).

Layout of the work. One program owns (batch row b, group g, a block of BLOCK_D channels of that group)
and walks the length in tiles of T positions, keeping the state h [N, BLOCK_D] in registers in fp32.
A tile is a [T, N, BLOCK_D] register tensor whose time axis (and all or part of the state axis) lives
inside each thread, with the channels over the lanes (32 x warps / BLOCK_D lanes go to N when BLOCK_D is
below that). So the tile's recurrence h_t = a_t h_{t-1} + x_t (a_t = exp(dt_t A), x_t = dt_t u_t B_t), a
``tl.associative_scan`` along the time axis, compiles to a plain sequential chain of one FMA per state
element in each thread (no shuffles), and y_t = sum_n C_t h_t is a sum inside the thread (plus one
shuffle round per N-lane pair). The state before the tile enters as x_0 += a_0 h_carry, and the carry for
the next tile is the tile's last row (a register pick). Each program runs one long chain over L; many
programs (B x D / BLOCK_D) and the N independent chains inside a thread keep the GPU busy, and the loads
of the next tiles are software-pipelined (``tl.range(num_stages=...)``: cp.async into shared memory while
the current tile computes). B and C are converted to fp32 once per call (a small [B, N, L] tensor):
every lane needs a whole [T, N] block of them.

A sequence start t (position 0, or a ``cu_seqlens`` boundary) sets a_t = 0 and adds exp(dt_t A) h0 to
x_t: the carry cannot leak across sequences, and the initial state enters exactly where the reference
puts it. The final state of each sequence is stored from its last position.

Backward. When gradients are needed the forward stores the state at the start of every chunk of
CHUNK positions ("checkpoints" [B, L/CHUNK, D, N] fp32, 64 / CHUNK bytes per element of u at N=16).
The backward walks the chunks in reverse; for each chunk it first replays the forward from the
checkpoint and parks the tile-start states in a small per-program scratch buffer (it stays in L1/L2),
then walks the chunk's tiles in reverse: it recomputes the tile's states from its start state and runs
the adjoint recurrence lambda_t = C_t dy_t + a_{t+1} lambda_{t+1} as a scan over the tile (again a
sequential chain inside each thread; the tile is flipped around a forward scan, because Triton 3.6
lowers ``reverse=True`` with warp shuffles even along an in-thread axis, while ``tl.flip`` of an
in-thread axis compiles to nothing). The adjoint reads the decay of the *next* position, so its scan
elements carry (M, V, a) that compose as affine maps without shifting the tile: (M1, V1, a1) later in
time, (M2, V2, a2) earlier: (M2 a1 M1, V2 + M2 a1 V1, a2); inside a thread that is one FMA per element.
q = a lambda of the tile after enters at the tile's last position. The terms that need h_{t-1} use
a_t h_{t-1} = h_t - x_t (no division, no shifted loads):
    dA[d, n]  += sum_t lambda_t (h_t - x_t) dt_t
    d dt_t    += sum_n lambda_t ((h_t - x_t) A + B_t u_t)
    d h0      =  a_t lambda_t at each sequence start t.

Determinism: nothing uses atomics. dB and dC (summed over the channels of a group) are written as one
fp32 partial row per channel block and reduced with ``torch.sum``; dA, dD and d delta_bias (summed over
batch and length) accumulate in registers over the length and are written as one row per batch row.
All offsets are int64 (B x D x L may pass 2^31 elements).

Numerical range: the decays are exponentiated one by one, exp(dt A) with dt >= 0 and A <= 0 for a stable
scan, never a cumulative sum: large dt or |A| give a = 0 exactly, not inf or NaN (checked on the GPU with
dt up to ~30 and |A| up to 16, and in the tests with |A| up to 30 and dt up to ~40). The softplus of
delta uses the MUFU log2 on the GPU (``_softplus``).

Layouts: u, delta, z, dy may be channel-last views ([B, L, D] memory, as a Mamba layer has them); y and
du / ddelta / dz are then channel-last too, so the layer's ``.transpose(1, 2)`` back to [B, L, D] costs no
copy. Measured speed and the tile choice: docs/kernels/selective_scan.md.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from kernels.host import call_op, cdiv, next_power_of_2, op_function
from kernels.selective_scan import _interpret  # noqa: F401  (interpreter: loops with runtime bounds)

MAX_DSTATE = 256
# MUFU approximations for the softplus on the GPU; the interpreter (no inline PTX) takes the exact path.
_FAST_MATH = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


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
def _log2_approx(x):
    # MUFU.LG2: absolute error ~2^-22 near 1, a few instructions instead of libdevice's ~20
    return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _softplus(x):
    # log1p(exp(x)) without overflow and without losing small values (log(1 + e) rounds e < 2^-24
    # away): torch's threshold of 20 above which softplus(x) = x. It runs once per (position, channel)
    # in every lane that holds that channel's states, so on the GPU (fp32) it takes the MUFU log2
    # above e = 0.01 (relative error < 2e-5 there) and a 3-term series below (error < e^4 / 4).
    if _FAST_MATH and x.dtype == tl.float32:
        e = tl.exp2(-tl.abs(x) * 1.4426950408889634)
        lp = tl.where(e < 1e-2, e * (1.0 - e * (0.5 - e * 0.3333333333333333)),
                      _log2_approx(1.0 + e) * 0.6931471805599453)
    else:
        e = tl.exp(-tl.abs(x))
        lp = tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + lp)


@triton.jit
def _positions(cu_ptr, seqidx_ptr, pos, mask_l, batch, L, VARLEN: tl.constexpr):
    """Sequence index (int64 [T]) and whether each position starts / ends its sequence."""
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
def _load_td(ptr, pos, offs_d, mask_td, stride_l, stride_d, ACC: tl.constexpr):
    """A [T, BLOCK_D] tile of a [D, L] slice (any strides), in the accumulation dtype."""
    return tl.load(ptr + pos[:, None] * stride_l + offs_d[None, :] * stride_d, mask=mask_td, other=0.0).to(ACC)


@triton.jit
def _load_tn(ptr, pos, offs_n, mask_tn, stride_l, stride_n, ACC: tl.constexpr):
    """A [T, BLOCK_N] tile of B or C ([N, L] slice, any strides)."""
    return tl.load(ptr + pos[:, None] * stride_l + offs_n[None, :] * stride_n, mask=mask_tn, other=0.0).to(ACC)


@triton.jit
def _tile_dt(delta_ptr, bias, pos, offs_d, mask_td, stride_dl, stride_dd,
             HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, ACC: tl.constexpr):
    """dt [T, BLOCK_D] (0 outside the sequence and the channel block: the state passes through) and the
    raw delta + bias (for the softplus derivative)."""
    raw = _load_td(delta_ptr, pos, offs_d, mask_td, stride_dl, stride_dd, ACC)
    if HAS_BIAS:
        raw += bias[None, :]
    if SOFTPLUS:
        dt = _softplus(raw)
    else:
        dt = raw
    return tl.where(mask_td, dt, 0.0), raw


@triton.jit
def _tile_states(dt, u, Bt, A2, carry, is_start, seq, h0_ptr, offs_n, mask_n, offs_d, mask_d,
                 stride_hs, stride_hn, stride_hd, HAS_INIT: tl.constexpr, VARLEN: tl.constexpr):
    """The tile's states h [T, N, BLOCK_D] from the state before it (carry [N, BLOCK_D]), with the decay
    a, the decay a_cut (0 at sequence starts) and the input x = dt u B (without the carry or initial
    state).

    dt, u [T, BLOCK_D]; Bt [T, N]; A2 = A log2(e) [N, BLOCK_D]. Without cu_seqlens the only start is
    position 0, where the carry is the initial state (or 0) already: nothing to cut, and no
    [T, N, BLOCK_D] gather of initial states."""
    a = tl.exp2(dt[:, None, :] * A2[None, :, :])
    x = (dt * u)[:, None, :] * Bt[:, :, None]
    rows = tl.arange(0, dt.shape[0])[:, None, None]
    a_cut = a
    if VARLEN:
        a_cut = tl.where(is_start[:, None, None], 0.0, a)
    # The carry enters at the tile's first row (one FMA there; the other rows fold to x).
    x_in = tl.where(rows == 0, x + a_cut * carry[None, :, :], x)
    if HAS_INIT and VARLEN:
        h0 = tl.load(h0_ptr + seq[:, None, None] * stride_hs + offs_n[None, :, None] * stride_hn
                     + offs_d[None, None, :] * stride_hd,
                     mask=is_start[:, None, None] & mask_n[None, :, None] & mask_d[None, None, :],
                     other=0.0).to(a.dtype)
        x_in += a * h0
    _, h = tl.associative_scan((a_cut, x_in), 0, _combine)
    return h, a, a_cut, x


@triton.jit
def _last_row(h):
    """h[T-1] of a [T, ...] tile (the time axis lives in the thread: a register pick)."""
    rows = tl.arange(0, h.shape[0])[:, None, None]
    return tl.sum(tl.where(rows == h.shape[0] - 1, h, 0.0), axis=0)


@triton.jit
def _first_row(h):
    rows = tl.arange(0, h.shape[0])[:, None, None]
    return tl.sum(tl.where(rows == 0, h, 0.0), axis=0)


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, y_ptr, final_ptr, ckpt_ptr,
    cu_ptr, seqidx_ptr,
    DIM, DG, L, NSTATE, n_tiles, n_chunks,
    stride_ub, stride_ud, stride_ul, stride_db, stride_dd, stride_dl, stride_zb, stride_zd, stride_zl,
    stride_yb, stride_yd, stride_yl, stride_ad, stride_an,
    stride_bb, stride_bg, stride_bn, stride_bl, stride_cb, stride_cg, stride_cn, stride_cl,
    stride_hs, stride_hd, stride_hn, stride_fs, stride_fd, stride_fn,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_INIT: tl.constexpr, VARLEN: tl.constexpr, STORE_FINAL: tl.constexpr, SAVE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr, K: tl.constexpr,
    STAGES: tl.constexpr,
):
    """y for one (batch row, group, channel block); checkpoints [B, n_chunks, DIM, NSTATE] at every
    K-th tile start when SAVE."""
    batch = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1).to(tl.int64)
    in_group = tl.program_id(2).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = in_group < DG
    offs_d = group * DG + in_group
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    mask_n = offs_n < NSTATE
    mask_nd = mask_n[:, None] & mask_d[None, :]
    cols = tl.arange(0, T)

    u_ptr += batch * stride_ub
    delta_ptr += batch * stride_db
    if HAS_Z:
        z_ptr += batch * stride_zb
    y_ptr += batch * stride_yb
    b_ptr = B_ptr + batch * stride_bb + group * stride_bg
    c_ptr = C_ptr + batch * stride_cb + group * stride_cg
    A2 = tl.load(A_ptr + offs_d[None, :] * stride_ad + offs_n[:, None] * stride_an, mask=mask_nd,
                 other=0.0).to(ACC) * 1.4426950408889634
    bias = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    Dv = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    # checkpoints: [B, n_chunks, DIM, NSTATE], contiguous
    ckpt_tile = ckpt_ptr + batch * n_chunks * DIM * NSTATE + offs_d[None, :] * NSTATE + offs_n[:, None]

    carry = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    if HAS_INIT and not VARLEN:
        carry = tl.load(h0_ptr + batch * stride_hs + offs_d[None, :] * stride_hd + offs_n[:, None] * stride_hn,
                        mask=mask_nd, other=0.0).to(ACC)
    for tile in tl.range(0, n_tiles, num_stages=STAGES):
        pos = tl.cast(tile, tl.int64) * T + cols
        mask_l = pos < L
        mask_td = mask_l[:, None] & mask_d[None, :]
        mask_tn = mask_l[:, None] & mask_n[None, :]
        if SAVE:
            if tile % K == 0:
                tl.store(ckpt_tile + tl.cast(tile // K, tl.int64) * DIM * NSTATE, carry, mask=mask_nd)
        seq, is_start, is_last = _positions(cu_ptr, seqidx_ptr, pos, mask_l, batch, L, VARLEN)
        u = _load_td(u_ptr, pos, offs_d, mask_td, stride_ul, stride_ud, ACC)
        dt, raw = _tile_dt(delta_ptr, bias, pos, offs_d, mask_td, stride_dl, stride_dd, HAS_BIAS, SOFTPLUS, ACC)
        Bt = _load_tn(b_ptr, pos, offs_n, mask_tn, stride_bl, stride_bn, ACC)
        Ct = _load_tn(c_ptr, pos, offs_n, mask_tn, stride_cl, stride_cn, ACC)
        h, a, a_cut, x = _tile_states(dt, u, Bt, A2, carry, is_start, seq, h0_ptr, offs_n, mask_n, offs_d, mask_d,
                                   stride_hs, stride_hn, stride_hd, HAS_INIT, VARLEN)
        y = tl.sum(h * Ct[:, :, None], axis=1)
        if HAS_D:
            y += Dv[None, :] * u
        if HAS_Z:
            zt = _load_td(z_ptr, pos, offs_d, mask_td, stride_zl, stride_zd, ACC)
            y = y * zt * tl.sigmoid(zt)
        tl.store(y_ptr + pos[:, None] * stride_yl + offs_d[None, :] * stride_yd, y.to(y_ptr.dtype.element_ty),
                 mask=mask_td)
        if STORE_FINAL and VARLEN:
            tl.store(final_ptr + seq[:, None, None] * stride_fs + offs_n[None, :, None] * stride_fn
                     + offs_d[None, None, :] * stride_fd, h,
                     mask=is_last[:, None, None] & mask_nd[None, :, :])
        carry = _last_row(h)
    if STORE_FINAL and not VARLEN:
        # positions past L keep the state: the last carry is the state after position L-1
        tl.store(final_ptr + batch * stride_fs + offs_d[None, :] * stride_fd + offs_n[:, None] * stride_fn,
                 carry, mask=mask_nd)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, ckpt_ptr, cu_ptr, seqidx_ptr,
    dy_ptr, dfinal_ptr, scratch_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dh0_ptr, dA_part_ptr, dD_part_ptr, dbias_part_ptr, dB_part_ptr, dC_part_ptr,
    DIM, DG, L, NSTATE, n_tiles, n_chunks, n_blocks,
    stride_ub, stride_ud, stride_ul, stride_db, stride_dd, stride_dl, stride_zb, stride_zd, stride_zl,
    stride_gb, stride_gd, stride_gl, stride_ob, stride_od, stride_ol, stride_eb, stride_ed, stride_el,
    stride_wb, stride_wd, stride_wl, stride_ad, stride_an,
    stride_bb, stride_bg, stride_bn, stride_bl, stride_cb, stride_cg, stride_cn, stride_cl,
    stride_hs, stride_hd, stride_hn, stride_fs, stride_fd, stride_fn,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_INIT: tl.constexpr, HAS_DFINAL: tl.constexpr, VARLEN: tl.constexpr,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr, K: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Gradients of one (batch row, group, channel block), chunks and tiles in reverse.

    Strides: u, delta, z (inputs), dy (stride_g*), du (stride_o*), ddelta (stride_e*), dz (stride_w*).
    dh0 is [S, D, N] contiguous (zeros where never written); partial rows: dA [B, D, N], dD, dbias [B, D];
    dB, dC [B, G, n_blocks, N, L]. scratch: K tile-start states [N, BLOCK_D] per program."""
    batch = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1).to(tl.int64)
    block = tl.program_id(2).to(tl.int64)
    G = tl.num_programs(1)
    in_group = block * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = in_group < DG
    offs_d = group * DG + in_group
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    mask_n = offs_n < NSTATE
    mask_nd = mask_n[:, None] & mask_d[None, :]
    cols = tl.arange(0, T)
    rows3 = cols[:, None, None]

    u_ptr += batch * stride_ub
    delta_ptr += batch * stride_db
    if HAS_Z:
        z_ptr += batch * stride_zb
        dz_ptr += batch * stride_wb
    dy_ptr += batch * stride_gb
    du_ptr += batch * stride_ob
    ddelta_ptr += batch * stride_eb
    b_ptr = B_ptr + batch * stride_bb + group * stride_bg
    c_ptr = C_ptr + batch * stride_cb + group * stride_cg
    A = tl.load(A_ptr + offs_d[None, :] * stride_ad + offs_n[:, None] * stride_an, mask=mask_nd,
                other=0.0).to(ACC)
    A2 = A * 1.4426950408889634
    bias = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    Dv = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    nd = offs_n[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    ckpt_tile = ckpt_ptr + batch * n_chunks * DIM * NSTATE + offs_d[None, :] * NSTATE + offs_n[:, None]
    program = (batch * G + group) * n_blocks + block
    scratch = scratch_ptr + program * K * BLOCK_N * BLOCK_D + nd
    part_row = program * NSTATE * L  # this program's dB / dC row [N, L]

    q = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)  # a_{t+1} lambda_{t+1} from the tile after
    if HAS_DFINAL and not VARLEN:
        # lambda_{L-1} = C dy + dfinal: dfinal enters as the q after the last position (positions past
        # L have a = 1 and no gradient, so it reaches L-1 unchanged)
        q = tl.load(dfinal_ptr + batch * stride_fs + offs_d[None, :] * stride_fd + offs_n[:, None] * stride_fn,
                    mask=mask_nd, other=0.0).to(ACC)
    dA_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    dD_acc = tl.zeros((BLOCK_D,), dtype=ACC)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for chunk_rev in range(0, n_chunks):
        chunk = n_chunks - 1 - chunk_rev
        first = chunk * K
        count = tl.minimum(n_tiles - first, K)
        # 1. Replay the chunk forward from its checkpoint; park each tile's start state.
        h_start = tl.load(ckpt_tile + tl.cast(chunk, tl.int64) * DIM * NSTATE, mask=mask_nd, other=0.0)
        tl.debug_barrier()  # the scratch of the previous chunk has been read by every thread
        for j in tl.range(0, count - 1, num_stages=STAGES):
            tl.store(scratch + j * BLOCK_N * BLOCK_D, h_start)
            pos = tl.cast(first + j, tl.int64) * T + cols
            mask_l = pos < L
            mask_td = mask_l[:, None] & mask_d[None, :]
            seq, is_start, is_last = _positions(cu_ptr, seqidx_ptr, pos, mask_l, batch, L, VARLEN)
            u = _load_td(u_ptr, pos, offs_d, mask_td, stride_ul, stride_ud, ACC)
            dt, raw = _tile_dt(delta_ptr, bias, pos, offs_d, mask_td, stride_dl, stride_dd, HAS_BIAS, SOFTPLUS, ACC)
            Bt = _load_tn(b_ptr, pos, offs_n, mask_l[:, None] & mask_n[None, :], stride_bl, stride_bn, ACC)
            h, a, a_cut, x = _tile_states(dt, u, Bt, A2, h_start, is_start, seq, h0_ptr, offs_n, mask_n, offs_d, mask_d,
                                       stride_hs, stride_hn, stride_hd, HAS_INIT, VARLEN)
            h_start = _last_row(h)
        tl.store(scratch + (count - 1) * BLOCK_N * BLOCK_D, h_start)
        tl.debug_barrier()
        # 2. The chunk's tiles in reverse: states again from the parked start state, then the adjoint.
        for j_rev in tl.range(0, count, num_stages=STAGES):
            j = count - 1 - j_rev
            h_start = tl.load(scratch + j * BLOCK_N * BLOCK_D)
            pos = tl.cast(first + j, tl.int64) * T + cols
            mask_l = pos < L
            mask_td = mask_l[:, None] & mask_d[None, :]
            mask_tn = mask_l[:, None] & mask_n[None, :]
            seq, is_start, is_last = _positions(cu_ptr, seqidx_ptr, pos, mask_l, batch, L, VARLEN)
            u = _load_td(u_ptr, pos, offs_d, mask_td, stride_ul, stride_ud, ACC)
            dt, raw = _tile_dt(delta_ptr, bias, pos, offs_d, mask_td, stride_dl, stride_dd, HAS_BIAS, SOFTPLUS, ACC)
            Bt = _load_tn(b_ptr, pos, offs_n, mask_tn, stride_bl, stride_bn, ACC)
            Ct = _load_tn(c_ptr, pos, offs_n, mask_tn, stride_cl, stride_cn, ACC)
            dy = _load_td(dy_ptr, pos, offs_d, mask_td, stride_gl, stride_gd, ACC)
            h, a, a_cut, x = _tile_states(dt, u, Bt, A2, h_start, is_start, seq, h0_ptr, offs_n, mask_n, offs_d, mask_d,
                                       stride_hs, stride_hn, stride_hd, HAS_INIT, VARLEN)
            if HAS_Z:
                zt = _load_td(z_ptr, pos, offs_d, mask_td, stride_zl, stride_zd, ACC)
                y = tl.sum(h * Ct[:, :, None], axis=1) + Dv[None, :] * u
                sig = tl.sigmoid(zt)
                dz = dy * y * sig * (1.0 + zt * (1.0 - sig))
                tl.store(dz_ptr + pos[:, None] * stride_wl + offs_d[None, :] * stride_wd,
                         dz.to(dz_ptr.dtype.element_ty), mask=mask_td)
                dy = dy * zt * sig
            if HAS_D:
                dD_acc += tl.sum(dy * u, axis=0)
            g = Ct[:, :, None] * dy[:, None, :]
            if HAS_DFINAL and VARLEN:
                g += tl.load(dfinal_ptr + seq[:, None, None] * stride_fs + offs_n[None, :, None] * stride_fn
                             + offs_d[None, None, :] * stride_fd,
                             mask=is_last[:, None, None] & mask_nd[None, :, :], other=0.0).to(ACC)
            # lambda_{T-1} = g_{T-1} + a_T lambda_T: the tile after enters at the last row
            g = tl.where(rows3 == T - 1, g + q[None, :, :], g)
            # A reverse scan along an axis that lives in the thread still costs warp shuffles in Triton
            # 3.6; flipping the (register) time axis around a forward scan compiles to nothing.
            _, lam, _ = tl.associative_scan((tl.full(g.shape, 1.0, ACC), tl.flip(g, 0), tl.flip(a_cut, 0)), 0,
                                            _combine_adjoint)
            lam = tl.flip(lam, 0)
            # a_t h_{t-1} = h_t - x_t (the initial state's term at sequence starts, 0 without one)
            lam_ah = lam * (h - x)
            dtu = dt * u
            dB = tl.sum(lam * dtu[:, None, :], axis=2)
            dC = tl.sum(h * dy[:, None, :], axis=2)
            nl = offs_n[None, :] * L + pos[:, None]
            tl.store(dB_part_ptr + part_row + nl, dB, mask=mask_tn)
            tl.store(dC_part_ptr + part_row + nl, dC, mask=mask_tn)
            lamB = tl.sum(lam * Bt[:, :, None], axis=1)
            du = dt * lamB + Dv[None, :] * dy
            ddt = u * lamB + tl.sum(lam_ah * A[None, :, :], axis=1)
            dA_acc += tl.sum(lam_ah * dt[:, None, :], axis=0)
            if SOFTPLUS:
                ddt = ddt * tl.sigmoid(raw)
            ddt = tl.where(mask_td, ddt, 0.0)
            dbias_acc += tl.sum(ddt, axis=0)
            tl.store(du_ptr + pos[:, None] * stride_ol + offs_d[None, :] * stride_od,
                     du.to(du_ptr.dtype.element_ty), mask=mask_td)
            tl.store(ddelta_ptr + pos[:, None] * stride_el + offs_d[None, :] * stride_ed,
                     ddt.to(ddelta_ptr.dtype.element_ty), mask=mask_td)
            if HAS_INIT and VARLEN:
                tl.store(dh0_ptr + seq[:, None, None] * DIM * NSTATE + offs_d[None, None, :] * NSTATE
                         + offs_n[None, :, None], a * lam,
                         mask=is_start[:, None, None] & mask_nd[None, :, :])
            q = _first_row(a_cut * lam)
    if HAS_INIT and not VARLEN:
        # the q left after position 0 is a_0 lambda_0, the initial state's gradient
        tl.store(dh0_ptr + batch * DIM * NSTATE + offs_d[None, :] * NSTATE + offs_n[:, None], q, mask=mask_nd)
    tl.store(dA_part_ptr + batch * DIM * NSTATE + offs_d[None, :] * NSTATE + offs_n[:, None], dA_acc,
             mask=mask_nd)
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

# Tiles: (BLOCK_D channels, T positions, warps) per program; "chunk": positions per checkpoint (a
# multiple of the backward's T); "stages_*": the software-pipelining depth of each kernel's loads;
# optional "maxnreg_fwd" / "maxnreg_bwd": a register cap. With BLOCK_D = 32 x warps every lane owns one
# channel and the whole [T, N] block of its states; smaller BLOCK_D puts 32 x warps / BLOCK_D lanes on N.
# Chosen by timing on an H100 (docs/kernels/selective_scan.md); a benchmark may override them.
# "fwd_wide": the forward's tiles for large grids of channel-last inputs (``_wide_forward``), where a
# program of 32 channels loads 64 coalesced bytes a position instead of 32.
TILES = {"fwd": (16, 8, 1), "bwd": (16, 4, 1), "chunk": 64, "stages_fwd": 3, "stages_bwd": 2,
         "fwd_min_programs": None, "fwd_min_block_d": 8, "fwd_wide": (32, 4, 1), "fwd_wide_min_programs": None}


def _fwd_min_programs(device: torch.device) -> int:
    """The forward's grid should have at least this many programs (``TILES["fwd_min_programs"]``; by
    default 2 per SM on CUDA, none elsewhere)."""
    if TILES.get("fwd_min_programs") is not None:
        return int(TILES["fwd_min_programs"])
    if device.type != "cuda" or _interpreting():
        return 0
    return 2 * _sms(device)


def _sms(device: torch.device) -> int:
    """The SM count of a CUDA device."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _narrow_for_small_grid(block_d: int, rows: int, dg: int, min_programs: int) -> int:
    """A narrower channel block where the grid would leave SMs idle. The forward runs one program per
    (row, group, channel block) through the whole sequence, so a short prefill at batch 1 (mamba1-130m:
    96 programs of one warp on 132 SMs) is bound by one warp's instructions per position; half the
    channels per program halves them. Not below ``TILES["fwd_min_block_d"]``: with 4 channels the sum
    over the state needs more lane shuffles, and an H100 measured it slower (docs/kernels/selective_scan.md)."""
    while block_d > TILES["fwd_min_block_d"] and rows * cdiv(dg, block_d) < min_programs:
        block_d //= 2
    return block_d


def _wide_forward(rows: int, dg: int, dstate: int, u: torch.Tensor) -> bool:
    """Whether the forward takes ``TILES["fwd_wide"]``: for channel-last u (a Mamba layer's view), N <= 16,
    and a grid of at least ``TILES["fwd_wide_min_programs"]`` programs at that width (by default 16 per
    SM on CUDA; never elsewhere). On an H100 (docs/kernels/selective_scan.md) mamba1-130m's prefill at
    batch 64 x 512 (3072 programs of 32 channels) took 415 us a layer against 522 with TILES["fwd"], and
    batch 8 x 2048 (384 programs) 372 against 339: a large grid hides the wider tile's latency."""
    threshold = TILES.get("fwd_wide_min_programs")
    if threshold is None:
        if u.device.type != "cuda" or _interpreting():
            return False
        threshold = 16 * _sms(u.device)
    if _block_n(dstate) > 16 or u.stride(1) != 1 or TILES["chunk"] % TILES["fwd_wide"][1]:
        return False
    return rows * cdiv(dg, TILES["fwd_wide"][0]) >= threshold


def _tiles(kind: str, dstate: int) -> tuple[int, int, int]:
    """(BLOCK_D, T, warps) for ``kind`` ("fwd" / "bwd") at state size ``dstate``: TILES for N <= 16.
    Larger states spread N over more lanes and warps so that a thread keeps about as many state
    elements as at N = 16 (the [T, N, BLOCK_D] tiles live in registers)."""
    block_d, t, warps = TILES[kind]
    block_n = _block_n(dstate)
    if block_n <= 16:
        return block_d, t, warps
    lanes_d = min(block_d, 32 * warps)
    per_thread = block_n * lanes_d // (32 * warps)  # state elements per thread and position
    while per_thread > 16 and block_d > 4:
        block_d //= 2
        lanes_d = min(block_d, 32 * warps)
        per_thread = block_n * lanes_d // (32 * warps)
    while per_thread > 16 and warps < 8:
        warps *= 2
        per_thread = block_n * lanes_d // (32 * warps)
    return block_d, t, warps


def _reg_cap(kind: str) -> dict:
    """A register cap for the kernel (``TILES["maxnreg_fwd"]`` / ``["maxnreg_bwd"]``), as a launch option;
    none by default. Capping trades spills for more resident warps (better latency hiding)."""
    cap = TILES.get(f"maxnreg_{kind}")
    return {"maxnreg": cap} if cap and not _interpreting() else {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _chunk_tiles() -> int:
    """K: tiles of the backward per checkpoint."""
    t_bwd = TILES["bwd"][1]
    chunk = TILES["chunk"]
    if chunk % t_bwd != 0:
        raise ValueError(f"selective_scan (triton): TILES['chunk']={chunk} must be a multiple of the backward's "
                         f"tile length {t_bwd}")
    return chunk // t_bwd


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _strides(t: torch.Tensor | None, n: int) -> tuple[int, ...]:
    return (0,) * n if t is None else tuple(t.stride())


def _channel_last(t: torch.Tensor) -> bool:
    """Whether a [B, D, L] tensor is the channel-last view of a [B, L, D] one (D contiguous)."""
    return t.shape[1] > 1 and t.shape[2] > 1 and t.stride(1) == 1 and t.stride(2) != 1


def _new_bdl(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialized [B, D, L] tensor laid out like ``like``: channel-last when it is (so that the
    layer's ``.transpose(1, 2)`` back to [B, L, D] is free), else contiguous."""
    batch, dim, length = like.shape
    dtype = like.dtype if dtype is None else dtype
    if _channel_last(like):
        return torch.empty(batch, length, dim, device=like.device, dtype=dtype).transpose(1, 2)
    return torch.empty(batch, dim, length, device=like.device, dtype=dtype)


def _acc_copy(x: torch.Tensor) -> torch.Tensor:
    """B or C in the accumulation dtype. Every lane of a program needs all of a tile's B_t and C_t (they
    are shared by the channels), so converting them once here (a small [B, N, L] tensor) saves each
    lane two conversions per state element.

    A Mamba-1 layer passes B and C as [B, N, L] views of its x_proj output [B, L, dt_rank + 2N]: N is
    the contiguous dimension and L strides by dt_rank + 2N. The copy runs along N (rows of N contiguous
    elements, the order the data is in) and the kernels take the [B, L, N]-ordered result through its
    strides. (An H100 profile of a mamba1-130m step showed the same 98 strided copies before and after
    this change: those are not these conversions, which are small, [B, N, L] float32.)"""
    if x.dtype in (torch.float32, torch.float64):
        return x
    if x.stride(-2) == 1 and x.stride(-1) != 1:
        return x.transpose(-1, -2).float().transpose(-1, -2)
    return x.float()


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
    return max(2, next_power_of_2(dstate))


def _n_chunks(L: int) -> int:
    return cdiv(L, TILES["chunk"])


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
    if groups > 65535 or cdiv(dim // groups, min(_tiles(k, dstate)[0] for k in ("fwd", "bwd"))) > 65535:
        raise ValueError(f"selective_scan (triton): G={groups} groups of D/G={dim // groups} channels exceed "
                         "the grid limits (65535 groups, 65535 channel blocks per group); split the channels")
    if u.shape[0] > 2**31 - 1:
        raise ValueError(f"selective_scan (triton): batch {u.shape[0]} exceeds the grid limit 2^31-1")
    if cu_seqlens is not None and cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError("selective_scan (triton): cu_seqlens must be an int32/int64 tensor [S+1]")
    _chunk_tiles()


# ----------------------------------------------------------------------------------------------
# Custom ops (torch.compile sees them as single nodes)


@torch.library.custom_op("ssm_suite::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None, delta_softplus: bool,
    initial_state: torch.Tensor | None, return_final_state: bool, cu_seqlens: torch.Tensor | None,
    save_for_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y [B, D, L] in u's dtype and layout, the final state [B or S, D, N] fp32 or an empty
    tensor, the checkpoints [B, L/CHUNK, D, N] fp32 for the backward or an empty tensor)."""
    batch, dim, L = u.shape
    dstate = A.shape[1]
    groups = _groups(B, C, 4)
    dg = dim // groups
    Bv, Cv = _bc4(_acc_copy(B), groups), _bc4(_acc_copy(C), groups)
    state_dtype = _state_dtype(u.dtype)
    if _wide_forward(batch * groups, dg, dstate, u):
        block_d, t, warps = TILES["fwd_wide"]
    else:
        block_d, t, warps = _tiles("fwd", dstate)
        block_d = _narrow_for_small_grid(block_d, batch * groups, dg, _fwd_min_programs(u.device))
    if save_for_backward and TILES["chunk"] % t:
        t = TILES["bwd"][1]  # the checkpoints sit every CHUNK positions: a whole number of tiles
    k = max(1, TILES["chunk"] // t)
    n_tiles = cdiv(L, t)
    n_chunks = _n_chunks(L)
    y = _new_bdl(u)
    rows = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    final = (torch.zeros(rows, dim, dstate, device=u.device, dtype=state_dtype) if return_final_state
             else u.new_empty(0, dtype=state_dtype))
    ckpt = (torch.empty(batch, n_chunks, dim, dstate, device=u.device, dtype=state_dtype) if save_for_backward
            else u.new_empty(0, dtype=state_dtype))
    seqidx = None if cu_seqlens is None else _seq_index(cu_seqlens, L)
    if u.numel() > 0:
        _scan_fwd_kernel[(batch, groups, cdiv(dg, block_d))](
            u, delta, A, Bv, Cv, D, z, delta_bias, initial_state, y, final, ckpt, cu_seqlens, seqidx,
            dim, dg, L, dstate, n_tiles, n_chunks,
            *u.stride(), *delta.stride(), *_strides(z, 3), *y.stride(), *A.stride(), *Bv.stride(),
            *Cv.stride(), *_strides(initial_state, 3), *_strides(final if return_final_state else None, 3),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=delta_softplus, HAS_INIT=initial_state is not None, VARLEN=cu_seqlens is not None,
            STORE_FINAL=return_final_state, SAVE=save_for_backward, ACC=_acc(u.dtype),
            BLOCK_D=block_d, BLOCK_N=_block_n(dstate), T=t, K=k, STAGES=TILES["stages_fwd"], num_warps=warps,
            **_reg_cap("fwd"),
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
    ckpt = (u.new_empty(batch, _n_chunks(L), dim, dstate, dtype=state_dtype) if save_for_backward
            else u.new_empty(0, dtype=state_dtype))
    return _new_bdl(u), final, ckpt


@torch.library.custom_op("ssm_suite::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None, delta_softplus: bool,
    initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None, checkpoints: torch.Tensor,
    dy: torch.Tensor, dfinal: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state); an empty tensor stands for
    the gradient of an input that is None. du, ddelta, dz are laid out like u, delta, z."""
    batch, dim, L = u.shape
    dstate = A.shape[1]
    groups = _groups(B, C, 4)
    dg = dim // groups
    Bv, Cv = _bc4(_acc_copy(B), groups), _bc4(_acc_copy(C), groups)
    acc_dtype = _state_dtype(u.dtype)
    block_d, t, warps = _tiles("bwd", dstate)
    k = _chunk_tiles()
    n_tiles = cdiv(L, t)
    n_chunks = _n_chunks(L)
    if checkpoints.shape != (batch, n_chunks, dim, dstate):
        raise ValueError(f"selective_scan_bwd: checkpoints {tuple(checkpoints.shape)} do not match the chunk "
                         f"length {TILES['chunk']}; forward and backward must use the same TILES['chunk']")
    n_blocks = cdiv(dg, block_d)
    block_n = _block_n(dstate)
    du = _new_bdl(u)
    ddelta = _new_bdl(delta)
    dz = _new_bdl(z) if z is not None else u.new_empty(0)
    rows = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    dh0 = (torch.zeros(rows, dim, dstate, device=u.device, dtype=acc_dtype) if initial_state is not None
           else u.new_empty(0))
    dA_part = torch.empty(batch, dim, dstate, device=u.device, dtype=acc_dtype)
    dD_part = torch.empty(batch, dim, device=u.device, dtype=acc_dtype) if D is not None else None
    dbias_part = torch.empty(batch, dim, device=u.device, dtype=acc_dtype) if delta_bias is not None else None
    dB_part = torch.empty(batch, groups, n_blocks, dstate, L, device=u.device, dtype=acc_dtype)
    dC_part = torch.empty(batch, groups, n_blocks, dstate, L, device=u.device, dtype=acc_dtype)
    scratch = torch.empty(batch * groups * n_blocks, k, block_n, block_d, device=u.device, dtype=acc_dtype)
    seqidx = None if cu_seqlens is None else _seq_index(cu_seqlens, L)
    if u.numel() > 0:
        _scan_bwd_kernel[(batch, groups, n_blocks)](
            u, delta, A, Bv, Cv, D, z, delta_bias, initial_state, checkpoints, cu_seqlens, seqidx, dy, dfinal,
            scratch, du, ddelta, dz, dh0, dA_part, dD_part, dbias_part, dB_part, dC_part,
            dim, dg, L, dstate, n_tiles, n_chunks, n_blocks,
            *u.stride(), *delta.stride(), *_strides(z, 3), *dy.stride(), *du.stride(), *ddelta.stride(),
            *_strides(dz if z is not None else None, 3), *A.stride(), *Bv.stride(),
            *Cv.stride(), *_strides(initial_state, 3), *_strides(dfinal, 3),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=delta_softplus, HAS_INIT=initial_state is not None, HAS_DFINAL=dfinal is not None,
            VARLEN=cu_seqlens is not None, ACC=_acc(u.dtype),
            BLOCK_D=block_d, BLOCK_N=block_n, T=t, K=k, STAGES=TILES["stages_bwd"], num_warps=warps,
            **_reg_cap("bwd"),
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
        # A shared [B, N, L] B/C was broadcast over the groups: its gradient sums over them (one group,
        # Mamba-1's case: the group's own gradient, without a reduction kernel over a size-1 dimension).
        if like.dim() == 3:
            grad = grad[:, 0] if grad.shape[1] == 1 else grad.sum(1)
        return grad.to(like.dtype)

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
    return (_new_bdl(u), _new_bdl(delta), torch.empty_like(A), contiguous(B), contiguous(C),
            torch.empty_like(D) if D is not None else u.new_empty(0),
            _new_bdl(z) if z is not None else u.new_empty(0),
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
    du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = call_op(
        selective_scan_bwd,
        u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, initial_state, cu_seqlens, ckpt, dy, dfinal)
    return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
            dbias if delta_bias is not None else None, None,
            dh0 if initial_state is not None else None, None, None, None)


selective_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


# The training path's autograd: the registered one, without torch.library's per-call wrapper (kernels/host.py).
_SelectiveScanFunction = op_function(selective_scan_fwd, _setup_context, _backward, differentiable_outputs=2)


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
        _scan_step_kernel[(batch, groups, cdiv(dg, block_d))](
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
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state, cu_seqlens, save)
    y, final, _ = _SelectiveScanFunction.apply(*args) if save else call_op(selective_scan_fwd, *args)
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
