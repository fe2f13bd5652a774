"""SSD (Mamba-2's scan) as Triton kernels, second design: fused sequential state walks and per-head /
per-group backward kernels sized for the register file. The default design (verified on an H100 by
``scripts/gpu_checks/ssd.py``); ``triton.py`` holds the first design (``SSM_SUITE_SSD_TRITON=first``),
the step kernel and the helpers both share.

Same arguments and results as :func:`kernels.ssd.reference.ssd_reference`. Per head and chunk of T
tokens, with a_t = sum_{k<=t} dt_k A inside the chunk, xdt_s = dt_s x_s, H_c the state entering chunk c
and G_c the gradient of the state leaving it:

forward
    1. ``_chunk_cb``   CB = C B^T per (chunk, row, group), float32 [T, T], shared by the group's heads
                       here and in the backward;
    2. ``_fwd_state``  one sequential walk over the chunks per (row, head, [BP, BN] block of the state):
                       dt discretized (bias, softplus, clamp) and a = cumsum(dt A) stored, H_c stored,
                       H_{c+1} = exp(a_end) H_c + (xdt exp(a_end - a))^T B as one matrix product
                       accumulating onto the decayed state (the chunk states never go through memory);
                       initial states at each sequence's first chunk, final states at its last;
    3. ``_fwd_out``    y_t = exp(a_t) C_t H_c + sum_{s<=t} CB_ts exp(a_t - a_s) xdt_s + D x_t, times silu(z_t).
backward (recomputes the intra-chunk products rather than storing them)
    4. ``_bwd_state``  the reverse walk: G_c stored, G_{c-1} = exp(a_end) G_c + (dy exp(a))^T C, the
                       gradient of each chunk's total decay exp(a_end) sum(G_c o H_c) (per block, summed
                       in a fixed order), d initial_state;
    5. ``_bwd_dx``     per (chunk, row, head, block of P): dx, dz, dD, and the block's parts of ddt and dA
                       (every term of d a_t is a sum over p, so the blocks' parts add up);
    6. ``_bwd_dbc``    per (chunk, row, group, split of its heads, block of N): dB and dC from the heads'
                       sums dCB = sum_h (dy_h xdt_h^T) o L_h, sum_h exp(a) dy_h H_h, sum_h exp(a_end - a)
                       xdt_h G_h, in a loop of fixed order (splits to separate buffers, summed after).

Why (docs/kernels/ssd.md): the first design's two backward kernels each held a whole chunk (T x T,
T x N and P x N float32 tiles) and compiled to 255 registers with spills (ptxas, sm_90a), one program
per SM, and ``_bwd_chunk_bc`` re-did two T x T x N products per head; its chunk states went through
memory in float32 about ten times. Here the states are stored in the inputs' dtype for bf16/fp16 (they
are only read as matrix-product operands, which take that dtype anyway; the recurrences carry float32 in
registers), C B^T is computed once per group, and the kernels run 4 warps on tiles that a warpgroup's
matrix instructions fit exactly (T = 64 rows; 8 warps would replicate the chained products' tiles).

No atomics anywhere: every output element is written by one program and sums across programs run in a
fixed order, so the backward is bit-identical on re-run. Offsets: scalar int64 bases per (row, chunk,
head) plus int32 offsets inside a tile (int64 offset tensors would hold two registers an element in
these register-bound kernels); ``_check_grid`` refuses the sizes where that would not hold. Packed
sequences, limits, float64 and the chunk size as in ``triton.py``. Every op is a
``torch.library.custom_op`` (``ssm_suite::ssd_fused_fwd``, ``ssd_fused_bwd``) with a fake
implementation and autograd.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from kernels.host import call_op, cdiv, op_function
from kernels.ssd.triton import _blocks, _discretize, _dot_dtype, _dummy, _empty, run_layout

# Launch shapes (module attributes so a benchmark can sweep them): the sequential state walks take a
# [PASS_BLOCK_P, PASS_BLOCK_N] block of the state a program and pipeline PASS_STAGES chunks of loads;
# ``_bwd_dx`` runs DX_WARPS warps over DX_BLOCK_P columns of P; ``_bwd_dbc`` runs DBC_WARPS warps over
# DBC_BLOCK_N columns of the state and splits the heads of a group until it has about
# DBC_TARGET_PROGRAMS programs.
PASS_BLOCK_P = 64
PASS_BLOCK_N = 64
PASS_STAGES = 2
DX_WARPS = 4
# 64, not 32: with 32-column tiles (4 warps, several chained tl.dot) Triton 3.6's sm_90 build of
# ``_bwd_dx`` faults with an illegal memory access on an H100 (scripts/gpu_checks/ssd.py --bisect,
# 2026-11-25: 32 faults at launch, 64 matches the reference), a compiler fault the interpreter cannot show.
DX_BLOCK_P = 64
DBC_WARPS = 4
DBC_BLOCK_N = 64
DBC_TARGET_PROGRAMS = 1024
# Compiled kernels run their run-time-bounded loops (the state walks over chunks, ``_bwd_dbc``'s heads)
# as ``tl.range`` for loops, which the compiler software-pipelines; False runs them as the while loops
# the interpreter uses (no pipelining): a diagnostic setting (``scripts/gpu_checks/ssd.py --bisect``).
PIPELINED_LOOPS = True


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------
# Addressing: each program forms scalar int64 base pointers (its row, chunk, head) and adds int32
# offsets inside a tile (bounded by T*H*P, T*G*N and P*N, which the wrapper checks against 2^31).
# int64 offset tensors would hold two registers per element, and these kernels are register-bound.

@triton.jit
def _chunk_cb(
    B_ptr, C_ptr, meta_ptr, cb_ptr,
    L, G, N, NC,
    T: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DT: tl.constexpr,
):
    """CB[t, s] = C_t . B_s of one (chunk, row, group), float32 [T, T]; zero rows/columns on padding.
    Shared by the group's heads in the forward output and in both backward kernels."""
    c = tl.program_id(0).to(tl.int64)
    rg = tl.program_id(1).to(tl.int64)
    r = rg // G
    g = rg % G
    t = tl.arange(0, T)
    tmask = t < tl.load(meta_ptr + c * 4)
    base = ((r * L + c * T) * G + g) * N
    acc = tl.zeros([T, T], tl.float32)
    for k0 in tl.static_range(0, BN, BK):  # the state dimension in slices: a bounded tile at N = 256
        n = k0 + tl.arange(0, BK)
        off = t[:, None] * (G * N) + n[None, :]
        m = tmask[:, None] & (n[None, :] < N)
        Cs = tl.load(C_ptr + base + off, mask=m, other=0.0)
        Bs = tl.load(B_ptr + base + off, mask=m, other=0.0)
        acc = tl.dot(Cs.to(DT), tl.trans(Bs.to(DT)), acc)
    tl.store(cb_ptr + (rg * NC + c) * T * T + t[:, None] * T + t[None, :], acc)


@triton.jit
def _fwd_state_chunk(
    state, c, r, h, g, A, bias, p, n, pmask, nmask, soff, writer,
    x_ptr, dt_ptr, B_ptr, meta_ptr, init_ptr, final_ptr, dtd_ptr, acs_ptr, st_ptr,
    L, H, G, P, N, NC, dt_min, dt_max,
    HAS_INIT: tl.constexpr, SOFTPLUS: tl.constexpr, T: tl.constexpr, DT: tl.constexpr,
):
    """One step of ``_fwd_state``: chunk c's entering state stored, then advanced through the chunk."""
    seq = r + tl.load(meta_ptr + c * 4 + 1)
    valid = tl.load(meta_ptr + c * 4)
    first = tl.load(meta_ptr + c * 4 + 2) != 0
    last = tl.load(meta_ptr + c * 4 + 3) != 0
    t = tl.arange(0, T)
    # The big loads are masked by the row's end only (not by the chunk table), so their addresses and
    # masks depend on the loop index alone and the compiler can issue them stages ahead. Padding between
    # packed sequences is zero in memory; its dt is masked below.
    inrow = c * T + t < L
    tok0 = r * L + c * T
    raw = tl.load(dt_ptr + tok0 * H + h + t * H, mask=inrow, other=0.0).to(tl.float32)
    xs = tl.load(x_ptr + (tok0 * H + h) * P + t[:, None] * (H * P) + p[None, :],
                 mask=inrow[:, None] & pmask[None, :], other=0.0)
    Bs = tl.load(B_ptr + (tok0 * G + g) * N + t[:, None] * (G * N) + n[None, :],
                 mask=inrow[:, None] & nmask[None, :], other=0.0)
    dtv, _ = _discretize(raw, bias, SOFTPLUS, dt_min, dt_max)
    dtv = tl.where(t < valid, dtv, 0.0)  # padding neither decays nor feeds the state
    a = tl.cumsum(dtv * A, axis=0)
    buf = (r * H + h) * NC * T + c * T
    tl.store(dtd_ptr + buf + t, dtv, mask=writer & (t < T))
    tl.store(acs_ptr + buf + t, a, mask=writer & (t < T))
    a_end = tl.sum(tl.where(t == T - 1, a, 0.0), axis=0)
    smask = pmask[:, None] & nmask[None, :]
    if HAS_INIT:
        h0 = tl.load(init_ptr + (seq * H + h) * P * N + soff, mask=smask & first, other=0.0).to(tl.float32)
        state = tl.where(first, h0, state)
    else:
        state = tl.where(first, 0.0, state)
    tl.store(st_ptr + ((r * NC + c) * H + h) * P * N + soff, state.to(st_ptr.dtype.element_ty), mask=smask)
    xw = (xs.to(tl.float32) * (tl.exp(a_end - a) * dtv)[:, None]).to(DT)
    # H_{c+1} = exp(a_end) H_c + sum_s exp(a_end - a_s) dt_s x_s B_s^T, the decay folded into the
    # product's accumulator.
    state = tl.dot(tl.trans(xw), Bs.to(DT), state * tl.exp(a_end))
    tl.store(final_ptr + (seq * H + h) * P * N + soff, state, mask=smask & last)
    return state


@triton.jit
def _fwd_state(
    x_ptr, dt_ptr, A_ptr, B_ptr, bias_ptr, meta_ptr, init_ptr, final_ptr, dtd_ptr, acs_ptr, st_ptr,
    L, H, G, P, N, NC, dt_min, dt_max,
    HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SOFTPLUS: tl.constexpr,
    T: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, DT: tl.constexpr,
    USE_FOR: tl.constexpr, STAGES: tl.constexpr,
):
    """The chunk states and their passing in one sequential walk over the chunks of a (row, head), a
    [BP, BN] block of the state a program: H_c (the state entering chunk c) stored in the states'
    dtype, the float32 state carried in registers, final states at each sequence's last chunk."""
    rh = tl.program_id(0).to(tl.int64)
    r = rh // H
    h = rh % H
    g = h // (H // G)
    p = tl.program_id(1) * BP + tl.arange(0, BP)
    n = tl.program_id(2) * BN + tl.arange(0, BN)
    pmask = p < P
    nmask = n < N
    soff = p[:, None] * N + n[None, :]
    writer = (tl.program_id(1) == 0) & (tl.program_id(2) == 0)  # one program stores dt and a
    A = tl.load(A_ptr + h).to(tl.float32)
    bias = tl.load(bias_ptr + h).to(tl.float32) if HAS_BIAS else 0.0
    state = tl.zeros([BP, BN], tl.float32)
    if USE_FOR:  # compiled: a for loop, which the compiler software-pipelines (loads stages ahead)
        for i in tl.range(0, NC, num_stages=STAGES):
            state = _fwd_state_chunk(
                state, i.to(tl.int64), r, h, g, A, bias, p, n, pmask, nmask, soff, writer,
                x_ptr, dt_ptr, B_ptr, meta_ptr, init_ptr, final_ptr, dtd_ptr, acs_ptr, st_ptr,
                L, H, G, P, N, NC, dt_min, dt_max, HAS_INIT, SOFTPLUS, T, DT)
    else:  # Triton's interpreter cannot run a for loop to a run-time bound (numpy 2); same body
        i = tl.program_id(0) * 0
        while i < NC:
            state = _fwd_state_chunk(
                state, i.to(tl.int64), r, h, g, A, bias, p, n, pmask, nmask, soff, writer,
                x_ptr, dt_ptr, B_ptr, meta_ptr, init_ptr, final_ptr, dtd_ptr, acs_ptr, st_ptr,
                L, H, G, P, N, NC, dt_min, dt_max, HAS_INIT, SOFTPLUS, T, DT)
            i += 1


@triton.jit
def _fwd_out(
    x_ptr, z_ptr, C_ptr, D_ptr, meta_ptr, dtd_ptr, acs_ptr, cb_ptr, st_ptr, out_ptr,
    L, H, G, P, N, NC,
    HAS_D: tl.constexpr, D_PER_DIM: tl.constexpr, HAS_Z: tl.constexpr,
    T: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DT: tl.constexpr,
):
    """y of one (chunk, row, head, block of P): exp(a_t) C_t H_c + sum_{s<=t} CB_ts exp(a_t - a_s) dt_s x_s
    + D x_t, times silu(z_t)."""
    c = tl.program_id(0).to(tl.int64)
    rh = tl.program_id(1).to(tl.int64)
    r = rh // H
    h = rh % H
    g = h // (H // G)
    t = tl.arange(0, T)
    tmask = t < tl.load(meta_ptr + c * 4)
    tok0 = r * L + c * T
    buf = (r * H + h) * NC * T + c * T
    dtv = tl.load(dtd_ptr + buf + t)
    a = tl.load(acs_ptr + buf + t)
    p = tl.program_id(2) * BP + tl.arange(0, BP)
    pmask = p < P
    xmask = tmask[:, None] & pmask[None, :]
    xb = (tok0 * H + h) * P  # scalar int64 base; the tile offsets below are int32
    xoff = t[:, None] * (H * P) + p[None, :]
    xs = tl.load(x_ptr + xb + xoff, mask=xmask, other=0.0).to(tl.float32)
    CB = tl.load(cb_ptr + ((r * G + g) * NC + c) * T * T + (t[:, None] * T + t[None, :]))
    decay = tl.exp(tl.where(t[:, None] >= t[None, :], a[:, None] - a[None, :], float("-inf")))
    y = tl.dot((CB * decay).to(DT), (xs * dtv[:, None]).to(DT))
    y_off = tl.zeros([T, BP], tl.float32)  # the entering state read at t, before its decay exp(a_t)
    cbase = C_ptr + (tok0 * G + g) * N
    sbase = st_ptr + ((r * NC + c) * H + h) * P * N
    for k0 in tl.static_range(0, BN, BK):
        n = k0 + tl.arange(0, BK)
        nmask = n < N
        Cs = tl.load(cbase + (t[:, None] * (G * N) + n[None, :]), mask=tmask[:, None] & nmask[None, :], other=0.0)
        Hk = tl.load(sbase + (p[:, None] * N + n[None, :]), mask=pmask[:, None] & nmask[None, :], other=0.0)
        y_off = tl.dot(Cs.to(DT), tl.trans(Hk.to(DT)), y_off)
    y += y_off * tl.exp(a)[:, None]
    if HAS_D:
        if D_PER_DIM:
            y += xs * tl.load(D_ptr + h * P + p, mask=pmask, other=0.0).to(tl.float32)[None, :]
        else:
            y += xs * tl.load(D_ptr + h).to(tl.float32)
    if HAS_Z:
        zs = tl.load(z_ptr + xb + xoff, mask=xmask, other=0.0).to(tl.float32)
        y = y * zs * tl.sigmoid(zs)
    tl.store(out_ptr + xb + xoff, y.to(out_ptr.dtype.element_ty), mask=xmask)


# ----------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _bwd_state_chunk(
    grad, c, r, h, g, p, n, pmask, nmask, soff, blk, nblk,
    dout_ptr, z_ptr, C_ptr, meta_ptr, acs_ptr, st_ptr, dfinal_ptr, dinit_ptr, gs_ptr, ddaend_ptr,
    L, H, G, P, N, NC,
    HAS_Z: tl.constexpr, HAS_DFINAL: tl.constexpr, T: tl.constexpr, DT: tl.constexpr,
):
    """One step of ``_bwd_state``: the gradient of the state leaving chunk c stored, its share of the
    gradient of the chunk's total decay, then the gradient carried back to the state entering it."""
    seq = r + tl.load(meta_ptr + c * 4 + 1)
    first = tl.load(meta_ptr + c * 4 + 2) != 0
    last = tl.load(meta_ptr + c * 4 + 3) != 0
    t = tl.arange(0, T)
    inrow = c * T + t < L  # as in the forward walk: padding is zero in memory (dout there is zero too)
    tok0 = r * L + c * T
    a = tl.load(acs_ptr + (r * H + h) * NC * T + c * T + t)
    xb = (tok0 * H + h) * P
    xoff = t[:, None] * (H * P) + p[None, :]
    xmask = inrow[:, None] & pmask[None, :]
    dy = tl.load(dout_ptr + xb + xoff, mask=xmask, other=0.0).to(tl.float32)
    if HAS_Z:
        zs = tl.load(z_ptr + xb + xoff, mask=xmask, other=0.0).to(tl.float32)
        dy = dy * zs * tl.sigmoid(zs)  # the gradient of y before the gate
    Cs = tl.load(C_ptr + (tok0 * G + g) * N + (t[:, None] * (G * N) + n[None, :]),
                 mask=inrow[:, None] & nmask[None, :], other=0.0)
    a_end = tl.sum(tl.where(t == T - 1, a, 0.0), axis=0)
    smask = pmask[:, None] & nmask[None, :]
    if HAS_DFINAL:
        gf = tl.load(dfinal_ptr + (seq * H + h) * P * N + soff, mask=smask & last, other=0.0).to(tl.float32)
        grad = tl.where(last, gf, grad)
    else:
        grad = tl.where(last, 0.0, grad)
    at = ((r * NC + c) * H + h) * P * N
    tl.store(gs_ptr + at + soff, grad.to(gs_ptr.dtype.element_ty), mask=smask)
    # H_{c+1} = exp(a_end) H_c + ...: d loss / d a_end = exp(a_end) sum(G_c o H_c), this block's part.
    entering = tl.load(st_ptr + at + soff, mask=smask, other=0.0).to(tl.float32)
    tl.store(ddaend_ptr + ((r * H + h) * NC + c) * nblk + blk,
             tl.exp(a_end) * tl.sum(tl.sum(grad * entering, axis=1), axis=0))
    # d/d H_c = exp(a_end) d/d H_{c+1} + sum_t exp(a_t) dy_t C_t^T (the chunk's outputs read H_c).
    dyw = (dy * tl.exp(a)[:, None]).to(DT)
    grad = tl.dot(tl.trans(dyw), Cs.to(DT), grad * tl.exp(a_end))
    tl.store(dinit_ptr + (seq * H + h) * P * N + soff, grad, mask=smask & first)
    return grad


@triton.jit
def _bwd_state(
    dout_ptr, z_ptr, C_ptr, meta_ptr, acs_ptr, st_ptr, dfinal_ptr, dinit_ptr, gs_ptr, ddaend_ptr,
    L, H, G, P, N, NC,
    HAS_Z: tl.constexpr, HAS_DFINAL: tl.constexpr, T: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    DT: tl.constexpr, USE_FOR: tl.constexpr, STAGES: tl.constexpr,
):
    """The reverse of ``_fwd_state``: one walk from the last chunk to the first, a [BP, BN] block of the
    state a program, storing the gradient of each chunk's leaving state (in the states' dtype), this
    block's part of the gradient of each chunk's total decay, and d initial_state at each sequence's
    first chunk."""
    rh = tl.program_id(0).to(tl.int64)
    r = rh // H
    h = rh % H
    g = h // (H // G)
    p = tl.program_id(1) * BP + tl.arange(0, BP)
    n = tl.program_id(2) * BN + tl.arange(0, BN)
    pmask = p < P
    nmask = n < N
    soff = p[:, None] * N + n[None, :]
    blk = tl.program_id(1) * tl.num_programs(2) + tl.program_id(2)
    nblk = tl.num_programs(1) * tl.num_programs(2)
    grad = tl.zeros([BP, BN], tl.float32)
    if USE_FOR:
        for i in tl.range(0, NC, num_stages=STAGES):
            grad = _bwd_state_chunk(
                grad, (NC - 1 - i).to(tl.int64), r, h, g, p, n, pmask, nmask, soff, blk, nblk,
                dout_ptr, z_ptr, C_ptr, meta_ptr, acs_ptr, st_ptr, dfinal_ptr, dinit_ptr, gs_ptr, ddaend_ptr,
                L, H, G, P, N, NC, HAS_Z, HAS_DFINAL, T, DT)
    else:
        i = tl.program_id(0) * 0
        while i < NC:
            grad = _bwd_state_chunk(
                grad, (NC - 1 - i).to(tl.int64), r, h, g, p, n, pmask, nmask, soff, blk, nblk,
                dout_ptr, z_ptr, C_ptr, meta_ptr, acs_ptr, st_ptr, dfinal_ptr, dinit_ptr, gs_ptr, ddaend_ptr,
                L, H, G, P, N, NC, HAS_Z, HAS_DFINAL, T, DT)
            i += 1


@triton.jit
def _bwd_dx(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, meta_ptr,
    dtd_ptr, acs_ptr, cb_ptr, st_ptr, gs_ptr, ddaend_ptr,
    dx_ptr, dz_ptr, ddt_ptr, dA_ptr, dD_ptr,
    L, H, G, P, N, NC, dt_min, dt_max, ddt_stride,
    HAS_D: tl.constexpr, D_PER_DIM: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, T: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    DT: tl.constexpr,
):
    """dx, dz, the partials of ddt, dA and dD of one (chunk, row, head, block of P); dB and dC, which sum
    over a group's heads, are ``_bwd_dbc``'s. Every term of the gradient of a_t (so of ddt and dA) is a
    sum over p, so each block of P contributes its part, and the caller sums them in a fixed order."""
    c = tl.program_id(0).to(tl.int64)
    rh = tl.program_id(1).to(tl.int64)
    pb = tl.program_id(2)
    r = rh // H
    h = rh % H
    g = h // (H // G)
    t = tl.arange(0, T)
    tmask = t < tl.load(meta_ptr + c * 4)
    tok0 = r * L + c * T
    buf = (r * H + h) * NC * T + c * T
    dtv = tl.load(dtd_ptr + buf + t)
    a = tl.load(acs_ptr + buf + t)
    a_end = tl.sum(tl.where(t == T - 1, a, 0.0), axis=0)
    p = pb * BP + tl.arange(0, BP)
    pmask = p < P
    xmask = tmask[:, None] & pmask[None, :]
    xb = (tok0 * H + h) * P  # scalar int64 bases; the tile offsets are int32
    xoff = t[:, None] * (H * P) + p[None, :]
    bbase = (tok0 * G + g) * N
    sbase = ((r * NC + c) * H + h) * P * N

    # The entering state read at t: y_off = exp(a_t) C_t H_c^T, summed over slices of N.
    y_off = tl.zeros([T, BP], tl.float32)
    for k0 in tl.static_range(0, BN, BK):
        n = k0 + tl.arange(0, BK)
        nmask = n < N
        Cs = tl.load(C_ptr + bbase + (t[:, None] * (G * N) + n[None, :]), mask=tmask[:, None] & nmask[None, :],
                     other=0.0)
        Hk = tl.load(st_ptr + sbase + (p[:, None] * N + n[None, :]), mask=pmask[:, None] & nmask[None, :], other=0.0)
        y_off = tl.dot(Cs.to(DT), tl.trans(Hk.to(DT)), y_off)
    y_off = y_off * tl.exp(a)[:, None]

    xs = tl.load(x_ptr + xb + xoff, mask=xmask, other=0.0).to(tl.float32)
    xdt = xs * dtv[:, None]
    CB = tl.load(cb_ptr + ((r * G + g) * NC + c) * T * T + (t[:, None] * T + t[None, :]))
    CBL = CB * tl.exp(tl.where(t[:, None] >= t[None, :], a[:, None] - a[None, :], float("-inf")))
    dout = tl.load(dout_ptr + xb + xoff, mask=xmask, other=0.0).to(tl.float32)
    if HAS_Z:
        zs = tl.load(z_ptr + xb + xoff, mask=xmask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(zs)
        ypre = tl.dot(CBL.to(DT), xdt.to(DT), y_off)  # y before the gate, recomputed
        if HAS_D:
            if D_PER_DIM:
                ypre += xs * tl.load(D_ptr + h * P + p, mask=pmask, other=0.0).to(tl.float32)[None, :]
            else:
                ypre += xs * tl.load(D_ptr + h).to(tl.float32)
        dz = dout * ypre * sig * (1.0 + zs * (1.0 - sig))
        tl.store(dz_ptr + xb + xoff, dz.to(dz_ptr.dtype.element_ty), mask=xmask)
        dy = dout * zs * sig
    else:
        dy = dout

    # Gradient of a_t (a_t enters as exp(a_t - a_s) inside the chunk, exp(a_t) on the entering state
    # and exp(a_end - a_t) on the chunk state), then of each step's dt_k A by a reverse cumsum.
    da = tl.sum(dy * y_off, axis=1)
    M = CBL * tl.dot(dy.to(DT), tl.trans(xdt.to(DT)))  # d loss / d (a_t - a_s) of the intra-chunk term
    da += tl.sum(M, axis=1) - tl.sum(M, axis=0)
    dxdt = tl.dot(tl.trans(CBL.to(DT)), dy.to(DT))

    # The chunk state's share: B_s G_c^T, G_c the gradient of the state leaving the chunk.
    BG = tl.zeros([T, BP], tl.float32)
    for k0 in tl.static_range(0, BN, BK):
        n = k0 + tl.arange(0, BK)
        nmask = n < N
        Bs = tl.load(B_ptr + bbase + (t[:, None] * (G * N) + n[None, :]), mask=tmask[:, None] & nmask[None, :],
                     other=0.0)
        Gk = tl.load(gs_ptr + sbase + (p[:, None] * N + n[None, :]), mask=pmask[:, None] & nmask[None, :], other=0.0)
        BG = tl.dot(Bs.to(DT), tl.trans(Gk.to(DT)), BG)
    e_end = tl.exp(a_end - a)
    dxdt += e_end[:, None] * BG
    W = e_end * tl.sum(xdt * BG, axis=1)
    da -= W
    dda_end = tl.load(ddaend_ptr + (r * H + h) * NC + c) * (pb == 0)  # not a sum over p: block 0's
    da += tl.where(t == T - 1, tl.sum(W, axis=0) + dda_end, 0.0)
    dstep = tl.sum(da, axis=0) - tl.cumsum(da, axis=0) + da

    dx = dxdt * dtv[:, None]
    if HAS_D:
        if D_PER_DIM:
            dx += dy * tl.load(D_ptr + h * P + p, mask=pmask, other=0.0).to(tl.float32)[None, :]
        else:
            dx += dy * tl.load(D_ptr + h).to(tl.float32)
        tl.store(dD_ptr + ((r * NC + c) * H + h) * P + p, tl.sum(dy * xs, axis=0), mask=pmask)
    tl.store(dx_ptr + xb + xoff, dx.to(dx_ptr.dtype.element_ty), mask=xmask)

    ddt = tl.sum(dxdt * xs, axis=1) + tl.load(A_ptr + h).to(tl.float32) * dstep
    raw = tl.load(dt_ptr + tok0 * H + h + t * H, mask=tmask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + h).to(tl.float32) if HAS_BIAS else 0.0
    _, deriv = _discretize(raw, bias, SOFTPLUS, dt_min, dt_max)
    tl.store(ddt_ptr + pb.to(tl.int64) * ddt_stride + tok0 * H + h + t * H, ddt * deriv, mask=tmask)
    tl.store(dA_ptr + ((r * NC + c) * H + h) * tl.num_programs(2) + pb, tl.sum(dtv * dstep, axis=0))


@triton.jit
def _bwd_dbc_head(
    dCB, dC, dB, h, c, r, t, tmask, p, pmask, n, nmask, tok0,
    x_ptr, z_ptr, dout_ptr, dtd_ptr, acs_ptr, st_ptr, gs_ptr,
    H, P, N, NC,
    HAS_Z: tl.constexpr, T: tl.constexpr, DT: tl.constexpr,
):
    """One head's share of ``_bwd_dbc``'s three sums."""
    buf = (r * H + h) * NC * T + c * T
    dtv = tl.load(dtd_ptr + buf + t)
    a = tl.load(acs_ptr + buf + t)
    a_end = tl.sum(tl.where(t == T - 1, a, 0.0), axis=0)
    xb = (tok0 * H + h) * P
    xoff = t[:, None] * (H * P) + p[None, :]
    xmask = tmask[:, None] & pmask[None, :]
    xdt = tl.load(x_ptr + xb + xoff, mask=xmask, other=0.0).to(tl.float32) * dtv[:, None]
    dy = tl.load(dout_ptr + xb + xoff, mask=xmask, other=0.0).to(tl.float32)
    if HAS_Z:
        zs = tl.load(z_ptr + xb + xoff, mask=xmask, other=0.0).to(tl.float32)
        dy = dy * zs * tl.sigmoid(zs)
    sb = ((r * NC + c) * H + h) * P * N
    soff = p[:, None] * N + n[None, :]
    smask = pmask[:, None] & nmask[None, :]
    Hk = tl.load(st_ptr + sb + soff, mask=smask, other=0.0)
    Gk = tl.load(gs_ptr + sb + soff, mask=smask, other=0.0)
    dC = tl.dot((dy * tl.exp(a)[:, None]).to(DT), Hk.to(DT), dC)
    dB = tl.dot((xdt * tl.exp(a_end - a)[:, None]).to(DT), Gk.to(DT), dB)
    decay = tl.exp(tl.where(t[:, None] >= t[None, :], a[:, None] - a[None, :], float("-inf")))
    dCB += tl.dot(dy.to(DT), tl.trans(xdt.to(DT))) * decay  # (dy_t . xdt_s) exp(a_t - a_s)
    return dCB, dC, dB


@triton.jit
def _bwd_dbc(
    x_ptr, B_ptr, C_ptr, z_ptr, dout_ptr, meta_ptr, dtd_ptr, acs_ptr, st_ptr, gs_ptr, dB_ptr, dC_ptr,
    L, H, G, P, N, NC, HS, split_stride,
    HAS_Z: tl.constexpr, T: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, DT: tl.constexpr,
    USE_FOR: tl.constexpr,
):
    """dB and dC of one (chunk, row, group, split of its heads, block of N): the heads' sums
    dCB = sum_h (dy_h xdt_h^T) o L_h, sum_h exp(a) dy_h H_h and sum_h exp(a_end - a) xdt_h G_h in a loop
    of fixed order, then dC = dCB B + ..., dB = dCB^T C + ... Splits (when several) go to separate
    buffers that the caller sums in a fixed order."""
    c = tl.program_id(0).to(tl.int64)
    rgs = tl.program_id(1).to(tl.int64)
    nsplit = (H // G) // HS
    r = rgs // (G * nsplit)
    g = (rgs // nsplit) % G
    s = rgs % nsplit
    t = tl.arange(0, T)
    tmask = t < tl.load(meta_ptr + c * 4)
    tok0 = r * L + c * T
    p = tl.arange(0, BP)
    pmask = p < P
    n = tl.program_id(2) * BN + tl.arange(0, BN)
    nmask = n < N
    dCB = tl.zeros([T, T], tl.float32)
    dC = tl.zeros([T, BN], tl.float32)
    dB = tl.zeros([T, BN], tl.float32)
    h0 = g * (H // G) + s * HS
    if USE_FOR:
        for i in tl.range(0, HS):
            dCB, dC, dB = _bwd_dbc_head(
                dCB, dC, dB, h0 + i, c, r, t, tmask, p, pmask, n, nmask, tok0,
                x_ptr, z_ptr, dout_ptr, dtd_ptr, acs_ptr, st_ptr, gs_ptr, H, P, N, NC, HAS_Z, T, DT)
    else:
        i = tl.program_id(0) * 0
        while i < HS:
            dCB, dC, dB = _bwd_dbc_head(
                dCB, dC, dB, h0 + i, c, r, t, tmask, p, pmask, n, nmask, tok0,
                x_ptr, z_ptr, dout_ptr, dtd_ptr, acs_ptr, st_ptr, gs_ptr, H, P, N, NC, HAS_Z, T, DT)
            i += 1
    bb = (tok0 * G + g) * N
    boff = t[:, None] * (G * N) + n[None, :]
    bmask = tmask[:, None] & nmask[None, :]
    Bs = tl.load(B_ptr + bb + boff, mask=bmask, other=0.0)
    dC = tl.dot(dCB.to(DT), Bs.to(DT), dC)
    Cs = tl.load(C_ptr + bb + boff, mask=bmask, other=0.0)
    dB = tl.dot(tl.trans(dCB.to(DT)), Cs.to(DT), dB)
    tl.store(dB_ptr + (s * split_stride + bb) + boff, dB.to(dB_ptr.dtype.element_ty), mask=bmask)
    tl.store(dC_ptr + (s * split_stride + bb) + boff, dC.to(dC_ptr.dtype.element_ty), mask=bmask)


# ----------------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _use_for() -> bool:
    """Whether the kernels' run-time-bounded loops are ``tl.range`` for loops (compiled, pipelined) or
    while loops (the interpreter cannot run a for loop to a run-time bound; ``PIPELINED_LOOPS=False``)."""
    return PIPELINED_LOOPS and not _interpreting()


def _state_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the per-chunk states are stored in: the inputs' for bf16/fp16 (they are only ever read
    as matrix-product operands, which take that dtype anyway), float32 otherwise."""
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32


def _head_splits(heads_per_group: int, programs: int) -> int:
    """How many parts ``_bwd_dbc`` cuts a group's heads into: a divisor of the heads a group, doubled
    while the launch has fewer than ``DBC_TARGET_PROGRAMS`` programs (each part costs one more [L, N]
    float32 partial of dB and dC to sum, so no more than the machine needs)."""
    splits = 1
    while (programs * splits < DBC_TARGET_PROGRAMS and heads_per_group % (splits * 2) == 0):
        splits *= 2
    return splits


# ----------------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------------

@torch.library.custom_op("ssm_suite::ssd_fused_fwd", mutates_args=())
def ssd_fused_fwd(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None, z: torch.Tensor | None, dt_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None, meta: torch.Tensor, chunk: int, nseq: int,
    dt_softplus: bool, dt_min: float, dt_max: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward on contiguous inputs laid out in whole chunks (see ``_layout``).

    x, z [R, L, H, P]; dt [R, L, H]; B, C [R, L, G, N]; meta int32 [NC, 4]. Returns y [R, L, H, P]
    (x's dtype), the final states [nseq, H, P, N] float32, and for the backward the discretized dt and
    the in-chunk cumulative decays [R, H, NC*T] float32, the entering states [R, NC, H, P, N] (bf16/fp16
    for such inputs, else float32) and C B^T per chunk [R*G, NC, T, T] float32.
    """
    R, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    NC = meta.shape[0]
    T = chunk
    dev = x.device
    dtd = torch.empty(R, H, NC * T, device=dev, dtype=torch.float32)
    acs = torch.empty_like(dtd)
    states = torch.empty(R, NC, H, P, N, device=dev, dtype=_state_dtype(x))
    cb = torch.empty(R * G, NC, T, T, device=dev, dtype=torch.float32)
    final = (initial_state.to(torch.float32).clone() if initial_state is not None
             else torch.zeros(nseq, H, P, N, device=dev, dtype=torch.float32))
    out = torch.empty_like(x)
    if NC == 0:
        return out, final, dtd, acs, states, cb
    BP, BN = _blocks(P, N)
    BK = min(BN, 64)
    DT = _dot_dtype(x)
    _chunk_cb[(NC, R * G)](B, C, meta, cb, L, G, N, NC, T=T, BN=BN, BK=BK, DT=DT, num_warps=4)
    sp, sn = min(BP, PASS_BLOCK_P), min(BN, PASS_BLOCK_N)
    _fwd_state[(R * H, cdiv(P, sp), cdiv(N, sn))](
        x, dt, A, B, _dummy(dt_bias, A), meta, _dummy(initial_state, final), final, dtd, acs, states,
        L, H, G, P, N, NC, dt_min, dt_max,
        HAS_BIAS=dt_bias is not None, HAS_INIT=initial_state is not None, SOFTPLUS=dt_softplus,
        T=T, BP=sp, BN=sn, DT=DT, USE_FOR=_use_for(), STAGES=PASS_STAGES, num_warps=4)
    op = min(BP, 64)
    _fwd_out[(NC, R * H, cdiv(P, op))](
        x, _dummy(z, x), C, _dummy(D, A), meta, dtd, acs, cb, states, out,
        L, H, G, P, N, NC,
        HAS_D=D is not None, D_PER_DIM=D is not None and D.dim() == 2, HAS_Z=z is not None,
        T=T, BP=op, BN=BN, BK=BK, DT=DT, num_warps=4)
    return out, final, dtd, acs, states, cb


@ssd_fused_fwd.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, initial_state, meta, chunk, nseq, dt_softplus, dt_min, dt_max):
    R, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    NC = meta.shape[0]
    return (torch.empty_like(x), x.new_empty(nseq, H, P, N, dtype=torch.float32),
            x.new_empty(R, H, NC * chunk, dtype=torch.float32), x.new_empty(R, H, NC * chunk, dtype=torch.float32),
            x.new_empty(R, NC, H, P, N, dtype=_state_dtype(x)),
            x.new_empty(R * G, NC, chunk, chunk, dtype=torch.float32))


@torch.library.custom_op("ssm_suite::ssd_fused_bwd", mutates_args=())
def ssd_fused_bwd(
    dout: torch.Tensor, dfinal: torch.Tensor | None,
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None, z: torch.Tensor | None, dt_bias: torch.Tensor | None,
    meta: torch.Tensor, dtd: torch.Tensor, acs: torch.Tensor, states: torch.Tensor, cb: torch.Tensor,
    chunk: int, nseq: int, dt_softplus: bool, dt_min: float, dt_max: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """Gradients (dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_state), each in its input's dtype
    (dinitial_state float32); an absent optional input gets an empty tensor."""
    R, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    NC = meta.shape[0]
    T = chunk
    dev = x.device
    f32 = torch.float32
    dout = dout.contiguous()  # autograd may hand in expanded (stride 0) gradients
    dfinal = None if dfinal is None else dfinal.to(f32).contiguous()
    # An empty sequence passes its initial state through unchanged: dinit starts as dfinal, and the
    # kernels overwrite it for every sequence that has chunks.
    dinit = (dfinal.clone() if dfinal is not None else torch.zeros(nseq, H, P, N, device=dev, dtype=f32))
    # Every element the caller reads is written by the kernels (padding between packed sequences is
    # never gathered back), so no buffer needs zero-filling.
    dx = torch.empty_like(x)
    dz = torch.empty_like(x) if z is not None else None
    BP, BN = _blocks(P, N)
    dxp = min(BP, DX_BLOCK_P)
    npb = cdiv(P, dxp)
    # ddt and dA: one partial a block of P (summed below); zeros where no token writes (padding),
    # since ddt is summed whole into ddt_bias.
    ddt = torch.zeros(npb, R, L, H, device=dev, dtype=f32)
    dA_part = torch.empty(R, NC, H, npb, device=dev, dtype=f32)
    dD_part = torch.empty(R, NC, H, P, device=dev, dtype=f32) if D is not None else None
    if NC > 0:
        BK = min(BN, 64)
        DT = _dot_dtype(x)
        use_for = _use_for()
        gs = torch.empty_like(states)  # gradient of the state leaving each chunk
        sp, sn = min(BP, PASS_BLOCK_P), min(BN, PASS_BLOCK_N)
        grid = (R * H, cdiv(P, sp), cdiv(N, sn))
        ddaend = torch.empty(R, H, NC, grid[1] * grid[2], device=dev, dtype=f32)
        _bwd_state[grid](
            dout, _dummy(z, x), C, meta, acs, states, _dummy(dfinal, dinit), dinit, gs, ddaend,
            L, H, G, P, N, NC,
            HAS_Z=z is not None, HAS_DFINAL=dfinal is not None, T=T, BP=sp, BN=sn, DT=DT,
            USE_FOR=use_for, STAGES=PASS_STAGES, num_warps=4)
        ddaend = ddaend.sum(-1)  # fixed order: deterministic
        _bwd_dx[(NC, R * H, npb)](
            x, dt, A, B, C, _dummy(D, A), _dummy(z, x), _dummy(dt_bias, A), dout, meta,
            dtd, acs, cb, states, gs, ddaend,
            dx, _dummy(dz, dx), ddt, dA_part, _dummy(dD_part, dA_part),
            L, H, G, P, N, NC, dt_min, dt_max, R * L * H,
            HAS_D=D is not None, D_PER_DIM=D is not None and D.dim() == 2, HAS_Z=z is not None,
            HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, T=T, BP=dxp, BN=BN, BK=BK, DT=DT,
            num_warps=DX_WARPS)
        bn = min(BN, DBC_BLOCK_N)
        nblk = cdiv(N, bn)
        splits = _head_splits(H // G, NC * R * G * nblk)
        if splits == 1:
            dB, dC = torch.empty_like(B), torch.empty_like(C)
        else:  # one float32 partial a split, summed below in a fixed order
            dB = torch.empty(splits, R, L, G, N, device=dev, dtype=f32)
            dC = torch.empty_like(dB)
        _bwd_dbc[(NC, R * G * splits, nblk)](
            x, B, C, _dummy(z, x), dout, meta, dtd, acs, states, gs, dB, dC,
            L, H, G, P, N, NC, H // G // splits, R * L * G * N,
            HAS_Z=z is not None, T=T, BP=BP, BN=bn, DT=DT, USE_FOR=use_for, num_warps=DBC_WARPS)
        if splits > 1:
            dB, dC = dB.sum(0).to(B.dtype), dC.sum(0).to(C.dtype)
    else:  # no chunks: the sequences are empty
        dB, dC = torch.zeros_like(B), torch.zeros_like(C)
        dA_part.zero_()
        if dD_part is not None:
            dD_part.zero_()
    ddt = ddt.sum(0) if npb > 1 else ddt[0]
    dA = dA_part.sum((0, 1, 3)).to(A.dtype)
    if D is None:
        dD = _empty(x)
    else:
        dD = dD_part.sum((0, 1))
        dD = (dD if D.dim() == 2 else dD.sum(-1)).to(D.dtype)
    ddt_bias = _empty(x) if dt_bias is None else ddt.sum((0, 1)).to(dt_bias.dtype)
    return (dx, ddt.to(dt.dtype), dA, dB, dC, dD, _empty(x) if dz is None else dz, ddt_bias, dinit)


@ssd_fused_bwd.register_fake
def _(dout, dfinal, x, dt, A, B, C, D, z, dt_bias, meta, dtd, acs, states, cb, chunk, nseq, dt_softplus,
      dt_min, dt_max):
    H, P, N = x.shape[2], x.shape[3], B.shape[3]
    return (torch.empty_like(x), torch.empty_like(dt), torch.empty_like(A), torch.empty_like(B),
            torch.empty_like(C), _empty(x) if D is None else torch.empty_like(D),
            _empty(x) if z is None else torch.empty_like(z),
            _empty(x) if dt_bias is None else torch.empty_like(dt_bias),
            x.new_empty(nseq, H, P, N, dtype=torch.float32))


def _fwd_setup(ctx, inputs, output):
    x, dt, A, B, C, D, z, dt_bias, initial_state, meta, chunk, nseq, dt_softplus, dt_min, dt_max = inputs
    _, _, dtd, acs, states, cb = output
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, meta, dtd, acs, states, cb)
    ctx.args = (chunk, nseq, dt_softplus, dt_min, dt_max)
    ctx.has_init = initial_state is not None
    ctx.init_dtype = None if initial_state is None else initial_state.dtype


def _fwd_backward(ctx, dout, dfinal, _ddtd, _dacs, _dstates, _dcb):
    x, dt, A, B, C, D, z, dt_bias, meta, dtd, acs, states, cb = ctx.saved_tensors
    dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit = call_op(
        ssd_fused_bwd,
        dout, dfinal, x, dt, A, B, C, D, z, dt_bias, meta, dtd, acs, states, cb, *ctx.args)
    return (dx, ddt, dA, dB, dC,
            None if D is None else dD, None if z is None else dz, None if dt_bias is None else ddt_bias,
            dinit.to(ctx.init_dtype) if ctx.has_init else None,
            None, None, None, None, None, None)


torch.library.register_autograd("ssm_suite::ssd_fused_fwd", _fwd_backward, setup_context=_fwd_setup)
# The training path's autograd: the registered one, without torch.library's per-call wrapper (kernels/host.py).
_SSDFusedFunction = op_function(ssd_fused_fwd, _fwd_setup, _fwd_backward, differentiable_outputs=2)


# ----------------------------------------------------------------------------------------------------
# Public entry point (called by kernels.ssd after its shape checks)
# ----------------------------------------------------------------------------------------------------

def _check_grid(rows: int, H: int, G: int, T: int, P: int, N: int) -> None:
    """Launch-shape limits: CUDA caps a grid's second dimension at 65535 programs (rows x heads there),
    and offsets inside one chunk's tiles are int32 (T x H x P and T x G x N elements)."""
    if rows * H > 65535:
        raise ValueError(f"ssd (triton): batch x nheads = {rows} x {H} = {rows * H} exceeds the kernels' grid limit "
                         f"65535; run the batch in parts of at most {65535 // H} rows")
    if T * H * P >= 2**31 or T * G * N >= 2**31:
        raise ValueError(f"ssd (triton): one chunk of x ({T} x {H} x {P}) or of B ({T} x {G} x {N}) has 2^31 "
                         f"elements or more, past the kernels' int32 tile offsets; use the chunked backend "
                         f"(SSM_SUITE_BACKEND_SSD=chunked)")


def ssd_triton_fused(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """SSD through the fused Triton kernels; arguments and results as
    :func:`kernels.ssd.reference.ssd_reference`."""
    return run_layout(ssd_fused_fwd, x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit,
                      initial_state, return_final_state, cu_seqlens, check_grid=_check_grid,
                      forward_function=_SSDFusedFunction)
