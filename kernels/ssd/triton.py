"""SSD (Mamba-2's scan) and its one-token step as Triton kernels: the ``triton`` backend of ``kernels.ssd``.

Same arguments and results as :func:`kernels.ssd.reference.ssd_reference` (shapes and semantics there).
The algorithm is the chunked one of ``chunked.py``, cut into seven forward/backward kernels, over
(chunk, row, head) programs except the two sequential state passes; per head and chunk of T tokens, with a_t = sum_{k<=t} dt_k A inside the
chunk, xdt_s = dt_s x_s and H_c the state entering chunk c:

forward
    1. ``_fwd_chunk_state``  dt discretized (bias, softplus, clamp), a = cumsum(dt A) stored, and the state
                             the chunk leaves from a zero start, S_c = sum_s exp(a_T - a_s) xdt_s B_s^T;
    2. ``_fwd_state_pass``   H_{c+1} = exp(a_T) H_c + S_c over chunks (sequential), restarting at each
                             sequence's first chunk from its initial state; H_c overwrites S_c in place;
    3. ``_fwd_chunk_out``    y_t = exp(a_t) C_t H_c + sum_{s<=t} (C_t.B_s) exp(a_t - a_s) xdt_s + D x_t,
                             times silu(z_t).
backward (recomputes the intra-chunk products rather than storing them)
    4. ``_bwd_chunk_dstate`` dH_c (local) = sum_t exp(a_t) dy_t C_t^T, dy the gradient before the gate;
    5. ``_bwd_state_pass``   the state passing in reverse: the gradient of the state leaving each chunk,
                             d initial_state, and the gradient of each chunk's total decay a_T;
    6. ``_bwd_chunk``        the rest of one (chunk, row, head): dx, ddt (through the clamp, softplus
                             and bias), dz, and per-chunk partial sums of dA and dD (reduced in PyTorch);
    7. ``_bwd_chunk_bc``     dB and dC of one (chunk, row, group), summing the group's heads in a loop;
                             a kernel of its own to keep each one's tiles within shared memory.

No atomics anywhere: every output element is written by one program, and the sums across programs run
in a fixed order (dB/dC over a group's heads in a loop inside ``_bwd_chunk_bc``; dA, dD and ddt_bias over
chunks as PyTorch reductions of per-chunk partials), so the backward is bit-identical on re-run.

Chunk size: the result does not depend on it (``reference.py`` ignores it). The kernels hold a chunk's
T x T tiles in registers, so they run T = ``chunk_size`` rounded up to a power of two and clipped to
[16, ``MAX_CHUNK``] (64): mamba_ssm's usual 256 runs as 64-token chunks.

Packed sequences (``cu_seqlens``) are laid out as in ``chunked.py``: each padded to whole chunks in one
row (a differentiable index_copy), with a small int32 table per chunk (valid tokens, sequence, first,
last) telling the kernels where sequences start and end. float64 inputs go to the chunked backend (the
kernels compute in float32). Matrix products take operands in the inputs' dtype (bf16/fp16 on the tensor
cores, as mamba_ssm; tf32 for float32 inputs) with float32 accumulation; everything else is float32.

Every op is a ``torch.library.custom_op`` (``ssm_suite::ssd_scan_fwd``, ``ssd_scan_bwd``,
``ssd_step``) with a fake implementation and autograd, so the models trace under torch.compile.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from kernels.host import call_op, cdiv, next_power_of_2, op_function

MAX_CHUNK = 64
MAX_HEADDIM = 128
MAX_DSTATE = 256
_PASS_BLOCK = 256  # state elements a program of the state passing carries

# The per-chunk table: valid tokens, sequence index (added to the row), first chunk of its sequence,
# last chunk of its sequence.
_META = 4


# ----------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _discretize(raw, bias, SOFTPLUS: tl.constexpr, dt_min, dt_max):
    """clamp(softplus(raw + bias)) and its derivative d/d raw (0 where clamped); softplus linear above 20."""
    v = raw + bias
    if SOFTPLUS:
        ev = tl.exp(tl.minimum(v, 20.0))
        sp = tl.where(v > 20.0, v, tl.log(1.0 + ev))
        deriv = tl.where(v > 20.0, 1.0, ev / (1.0 + ev))
    else:
        sp = v
        deriv = v * 0.0 + 1.0
    inside = (sp >= dt_min) & (sp <= dt_max)
    return tl.minimum(tl.maximum(sp, dt_min), dt_max), tl.where(inside, deriv, 0.0)


@triton.jit
def _mm(a, b, DT: tl.constexpr):
    """a @ b with operands in DT (the inputs' dtype: bf16/fp16 tensor-core products, as mamba_ssm; tf32
    for float32 inputs) and a float32 accumulator."""
    return tl.dot(a.to(DT), b.to(DT), out_dtype=tl.float32)


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _fwd_chunk_state(
    x_ptr, dt_ptr, A_ptr, B_ptr, bias_ptr, meta_ptr, dtd_ptr, acs_ptr, st_ptr,
    L, H, G, P, N, NC, dt_min, dt_max,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    T: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, DT: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    rh = tl.program_id(1).to(tl.int64)
    pb = tl.program_id(2)
    r = rh // H
    h = rh % H
    g = h // (H // G)
    valid = tl.load(meta_ptr + c * 4)
    t = tl.arange(0, T)
    tmask = t < valid
    pos = r * L + c * T + t  # int64 row-major token index
    raw = tl.load(dt_ptr + pos * H + h, mask=tmask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + h).to(tl.float32) if HAS_BIAS else 0.0
    dtv, _ = _discretize(raw, bias, SOFTPLUS, dt_min, dt_max)
    dtv = tl.where(tmask, dtv, 0.0)  # padding neither decays nor feeds the state
    A = tl.load(A_ptr + h).to(tl.float32)
    a = tl.cumsum(dtv * A, axis=0)
    buf = (r * H + h) * NC * T + c * T + t
    if pb == 0:
        tl.store(dtd_ptr + buf, dtv)
        tl.store(acs_ptr + buf, a)
    a_end = tl.sum(tl.where(t == T - 1, a, 0.0), axis=0)
    w = tl.exp(a_end - a) * dtv

    p = pb * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    xs = tl.load(x_ptr + (pos[:, None] * H + h) * P + p[None, :],
                 mask=tmask[:, None] & (p[None, :] < P), other=0.0).to(tl.float32)
    Bs = tl.load(B_ptr + (pos[:, None] * G + g) * N + n[None, :],
                 mask=tmask[:, None] & (n[None, :] < N), other=0.0).to(tl.float32)
    S = _mm(tl.trans(xs * w[:, None]), Bs, DT)  # [BP, BN]
    out = st_ptr + ((r * NC + c) * H + h) * P * N
    tl.store(out + p[:, None] * N + n[None, :], S, mask=(p[:, None] < P) & (n[None, :] < N))


@triton.jit
def _fwd_state_pass(
    st_ptr, acs_ptr, meta_ptr, init_ptr, final_ptr,
    H, PN, NC,
    HAS_INIT: tl.constexpr, T: tl.constexpr, BLOCK: tl.constexpr,
):
    rh = tl.program_id(0).to(tl.int64)
    r = rh // H
    h = rh % H
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    state = tl.zeros([BLOCK], tl.float32)
    # A while loop, not range(NC): the interpreter cannot index with a runtime scalar under numpy 2.
    c = tl.program_id(0) * 0
    # The loop is latency-bound (one dependent step per chunk): the next chunk's state is loaded one
    # step ahead so two loads are in flight.
    s_next = tl.load(st_ptr + (r * NC * H + h) * PN + offs, mask=mask & (NC > 0), other=0.0)
    while c < NC:
        s = s_next
        s_next = tl.load(st_ptr + ((r * NC + c + 1) * H + h) * PN + offs, mask=mask & (c + 1 < NC), other=0.0)
        seq = r + tl.load(meta_ptr + c * 4 + 1)
        first = tl.load(meta_ptr + c * 4 + 2) != 0
        last = tl.load(meta_ptr + c * 4 + 3) != 0
        if HAS_INIT:
            h0 = tl.load(init_ptr + (seq * H + h) * PN + offs, mask=mask & first, other=0.0).to(tl.float32)
        else:
            h0 = tl.zeros([BLOCK], tl.float32)
        state = tl.where(first, h0, state)
        tl.store(st_ptr + ((r * NC + c) * H + h) * PN + offs, state, mask=mask)  # S_c becomes H_c
        a_end = tl.load(acs_ptr + (r * H + h) * NC * T + c * T + T - 1)
        state = tl.exp(a_end) * state + s
        tl.store(final_ptr + (seq * H + h) * PN + offs, state, mask=mask & last)
        c += 1


@triton.jit
def _fwd_chunk_out(
    x_ptr, z_ptr, B_ptr, C_ptr, D_ptr, meta_ptr, dtd_ptr, acs_ptr, st_ptr, out_ptr,
    L, H, G, P, N, NC,
    HAS_D: tl.constexpr, D_PER_DIM: tl.constexpr, HAS_Z: tl.constexpr,
    T: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, DT: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    rh = tl.program_id(1).to(tl.int64)
    pb = tl.program_id(2)
    r = rh // H
    h = rh % H
    g = h // (H // G)
    valid = tl.load(meta_ptr + c * 4)
    t = tl.arange(0, T)
    tmask = t < valid
    pos = r * L + c * T + t
    buf = (r * H + h) * NC * T + c * T + t
    dtv = tl.load(dtd_ptr + buf)
    a = tl.load(acs_ptr + buf)
    p = pb * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    pmask = p < P
    nmask = n < N
    Cs = tl.load(C_ptr + (pos[:, None] * G + g) * N + n[None, :],
                 mask=tmask[:, None] & nmask[None, :], other=0.0).to(tl.float32)
    Bs = tl.load(B_ptr + (pos[:, None] * G + g) * N + n[None, :],
                 mask=tmask[:, None] & nmask[None, :], other=0.0).to(tl.float32)
    Hc = tl.load(st_ptr + ((r * NC + c) * H + h) * P * N + p[:, None] * N + n[None, :],
                 mask=pmask[:, None] & nmask[None, :], other=0.0)
    y = _mm(Cs, tl.trans(Hc), DT) * tl.exp(a)[:, None]  # the entering state, read at t
    causal = t[:, None] >= t[None, :]
    decay = tl.exp(tl.where(causal, a[:, None] - a[None, :], float("-inf")))
    CB = _mm(Cs, tl.trans(Bs), DT) * decay
    xmask = tmask[:, None] & pmask[None, :]
    xoff = (pos[:, None] * H + h) * P + p[None, :]
    xs = tl.load(x_ptr + xoff, mask=xmask, other=0.0).to(tl.float32)
    y += _mm(CB, xs * dtv[:, None], DT)
    if HAS_D:
        if D_PER_DIM:
            Dv = tl.load(D_ptr + h * P + p, mask=pmask, other=0.0).to(tl.float32)
            y += xs * Dv[None, :]
        else:
            y += xs * tl.load(D_ptr + h).to(tl.float32)
    if HAS_Z:
        zs = tl.load(z_ptr + xoff, mask=xmask, other=0.0).to(tl.float32)
        y = y * zs * tl.sigmoid(zs)
    tl.store(out_ptr + xoff, y.to(out_ptr.dtype.element_ty), mask=xmask)


# ----------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _bwd_chunk_dstate(
    dout_ptr, z_ptr, C_ptr, meta_ptr, acs_ptr, ds_ptr,
    L, H, G, P, N, NC,
    HAS_Z: tl.constexpr, T: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, DT: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    rh = tl.program_id(1).to(tl.int64)
    pb = tl.program_id(2)
    r = rh // H
    h = rh % H
    g = h // (H // G)
    valid = tl.load(meta_ptr + c * 4)
    t = tl.arange(0, T)
    tmask = t < valid
    pos = r * L + c * T + t
    a = tl.load(acs_ptr + (r * H + h) * NC * T + c * T + t)
    p = pb * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    xmask = tmask[:, None] & (p[None, :] < P)
    xoff = (pos[:, None] * H + h) * P + p[None, :]
    dy = tl.load(dout_ptr + xoff, mask=xmask, other=0.0).to(tl.float32)
    if HAS_Z:
        zs = tl.load(z_ptr + xoff, mask=xmask, other=0.0).to(tl.float32)
        dy = dy * zs * tl.sigmoid(zs)
    Cs = tl.load(C_ptr + (pos[:, None] * G + g) * N + n[None, :],
                 mask=tmask[:, None] & (n[None, :] < N), other=0.0).to(tl.float32)
    dH = _mm(tl.trans(dy * tl.exp(a)[:, None]), Cs, DT)
    out = ds_ptr + ((r * NC + c) * H + h) * P * N
    tl.store(out + p[:, None] * N + n[None, :], dH, mask=(p[:, None] < P) & (n[None, :] < N))


@triton.jit
def _bwd_state_pass(
    ds_ptr, st_ptr, acs_ptr, meta_ptr, dfinal_ptr, dinit_ptr, ddaend_ptr,
    H, PN, NC, NBLK,
    HAS_DFINAL: tl.constexpr, T: tl.constexpr, BLOCK: tl.constexpr,
):
    rh = tl.program_id(0).to(tl.int64)
    r = rh // H
    h = rh % H
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    grad = tl.zeros([BLOCK], tl.float32)  # d loss / d (state leaving the chunk)
    c = NC - 1
    at_next = ((r * NC + c) * H + h) * PN + offs
    local_next = tl.load(ds_ptr + at_next, mask=mask & (c >= 0), other=0.0)
    entering_next = tl.load(st_ptr + at_next, mask=mask & (c >= 0), other=0.0)
    while c >= 0:
        local = local_next  # loaded one step ahead, as in the forward pass
        entering = entering_next
        at_prev = ((r * NC + c - 1) * H + h) * PN + offs
        local_next = tl.load(ds_ptr + at_prev, mask=mask & (c > 0), other=0.0)
        entering_next = tl.load(st_ptr + at_prev, mask=mask & (c > 0), other=0.0)
        seq = r + tl.load(meta_ptr + c * 4 + 1)
        first = tl.load(meta_ptr + c * 4 + 2) != 0
        last = tl.load(meta_ptr + c * 4 + 3) != 0
        if HAS_DFINAL:
            gf = tl.load(dfinal_ptr + (seq * H + h) * PN + offs, mask=mask & last, other=0.0).to(tl.float32)
        else:
            gf = tl.zeros([BLOCK], tl.float32)
        grad = tl.where(last, gf, grad)
        decay = tl.exp(tl.load(acs_ptr + (r * H + h) * NC * T + c * T + T - 1))
        tl.store(ddaend_ptr + ((r * H + h) * NC + c) * NBLK + blk, decay * tl.sum(grad * entering, axis=0))
        tl.store(ds_ptr + ((r * NC + c) * H + h) * PN + offs, grad, mask=mask)
        grad = local + decay * grad  # now d loss / d (state entering the chunk)
        tl.store(dinit_ptr + (seq * H + h) * PN + offs, grad, mask=mask & first)
        c -= 1


@triton.jit
def _bwd_chunk(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, meta_ptr,
    dtd_ptr, acs_ptr, st_ptr, ds_ptr, ddaend_ptr,
    dx_ptr, dz_ptr, ddt_ptr, dA_ptr, dD_ptr,
    L, H, G, P, N, NC, dt_min, dt_max,
    HAS_D: tl.constexpr, D_PER_DIM: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, T: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, DT: tl.constexpr,
):
    """dx, dz, ddt and the partial dA, dD of one (chunk, row, head); dB and dC are ``_bwd_chunk_bc``'s."""
    c = tl.program_id(0).to(tl.int64)
    rh = tl.program_id(1).to(tl.int64)
    r = rh // H
    h = rh % H
    g = h // (H // G)
    valid = tl.load(meta_ptr + c * 4)
    t = tl.arange(0, T)
    tmask = t < valid
    pos = r * L + c * T + t
    buf = (r * H + h) * NC * T + c * T + t
    dtv = tl.load(dtd_ptr + buf)
    a = tl.load(acs_ptr + buf)
    a_end = tl.sum(tl.where(t == T - 1, a, 0.0), axis=0)
    A = tl.load(A_ptr + h).to(tl.float32)
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    pmask = p < P
    nmask = n < N
    xmask = tmask[:, None] & pmask[None, :]
    xoff = (pos[:, None] * H + h) * P + p[None, :]
    boff = (pos[:, None] * G + g) * N + n[None, :]
    bmask = tmask[:, None] & nmask[None, :]
    soff = ((r * NC + c) * H + h) * P * N + p[:, None] * N + n[None, :]
    smask = pmask[:, None] & nmask[None, :]

    xs = tl.load(x_ptr + xoff, mask=xmask, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + xoff, mask=xmask, other=0.0).to(tl.float32)
    if HAS_Z:
        zs = tl.load(z_ptr + xoff, mask=xmask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(zs)
        dy = dout * zs * sig
    else:
        dy = dout
    Bs = tl.load(B_ptr + boff, mask=bmask, other=0.0)
    Cs = tl.load(C_ptr + boff, mask=bmask, other=0.0)
    xdt = xs * dtv[:, None]
    e_start = tl.exp(a)
    e_end = tl.exp(a_end - a)

    causal = t[:, None] >= t[None, :]
    decay = tl.exp(tl.where(causal, a[:, None] - a[None, :], float("-inf")))  # [t, s]
    CBL = _mm(Cs, tl.trans(Bs), DT) * decay
    dyx = _mm(dy, tl.trans(xdt), DT)                   # dy_t . xdt_s
    M = CBL * dyx                                      # d loss / d (a_t - a_s) from the intra-chunk term
    Hc = tl.load(st_ptr + soff, mask=smask, other=0.0)   # state entering the chunk
    y_off = _mm(Cs, tl.trans(Hc), DT) * e_start[:, None]
    if HAS_Z:
        ypre = y_off + _mm(CBL, xdt, DT)
        if HAS_D:
            if D_PER_DIM:
                ypre += xs * tl.load(D_ptr + h * P + p, mask=pmask, other=0.0).to(tl.float32)[None, :]
            else:
                ypre += xs * tl.load(D_ptr + h).to(tl.float32)
        dz = dout * ypre * sig * (1.0 + zs * (1.0 - sig))
        tl.store(dz_ptr + xoff, dz.to(dz_ptr.dtype.element_ty), mask=xmask)
    da = tl.sum(M, axis=1) - tl.sum(M, axis=0) + tl.sum(dy * y_off, axis=1)

    Gc = tl.load(ds_ptr + soff, mask=smask, other=0.0)   # gradient of the state leaving the chunk
    BG = _mm(Bs, tl.trans(Gc), DT)                     # [s, P]
    dxdt = _mm(tl.trans(CBL), dy, DT) + e_end[:, None] * BG

    # Gradient of a_t, then of each step's dt_k A (a reverse cumulative sum inside the chunk).
    W = e_end * tl.sum(xdt * BG, axis=1)
    da -= W
    dda_end = tl.load(ddaend_ptr + (r * H + h) * NC + c)
    da += tl.where(t == T - 1, tl.sum(W, axis=0) + dda_end, 0.0)
    dstep = tl.sum(da, axis=0) - tl.cumsum(da, axis=0) + da

    dx = dxdt * dtv[:, None]
    if HAS_D:
        if D_PER_DIM:
            Dv = tl.load(D_ptr + h * P + p, mask=pmask, other=0.0).to(tl.float32)
            dx += dy * Dv[None, :]
        else:
            dx += dy * tl.load(D_ptr + h).to(tl.float32)
        dDp = tl.sum(dy * xs, axis=0)
        tl.store(dD_ptr + ((r * NC + c) * H + h) * P + p, dDp, mask=pmask)
    tl.store(dx_ptr + xoff, dx.to(dx_ptr.dtype.element_ty), mask=xmask)

    ddt = tl.sum(dxdt * xs, axis=1) + A * dstep
    raw = tl.load(dt_ptr + pos * H + h, mask=tmask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + h).to(tl.float32) if HAS_BIAS else 0.0
    _, deriv = _discretize(raw, bias, SOFTPLUS, dt_min, dt_max)
    tl.store(ddt_ptr + pos * H + h, ddt * deriv, mask=tmask)
    tl.store(dA_ptr + (r * NC + c) * H + h, tl.sum(dtv * dstep, axis=0))


@triton.jit
def _bwd_chunk_bc(
    x_ptr, B_ptr, C_ptr, z_ptr, dout_ptr, meta_ptr, dtd_ptr, acs_ptr, st_ptr, ds_ptr, dB_ptr, dC_ptr,
    L, H, G, P, N, NC,
    HAS_Z: tl.constexpr, T: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, DT: tl.constexpr,
):
    """dB and dC of one (chunk, row, group): the sum over the group's heads, in a fixed order."""
    c = tl.program_id(0).to(tl.int64)
    rg = tl.program_id(1).to(tl.int64)
    r = rg // G
    g = rg % G
    HG = H // G
    valid = tl.load(meta_ptr + c * 4)
    t = tl.arange(0, T)
    tmask = t < valid
    pos = r * L + c * T + t
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    pmask = p < P
    nmask = n < N
    xmask = tmask[:, None] & pmask[None, :]
    boff = (pos[:, None] * G + g) * N + n[None, :]
    bmask = tmask[:, None] & nmask[None, :]
    smask = pmask[:, None] & nmask[None, :]
    causal = t[:, None] >= t[None, :]
    Cs = tl.load(C_ptr + boff, mask=bmask, other=0.0)
    Bs = tl.load(B_ptr + boff, mask=bmask, other=0.0)
    dB = tl.zeros([T, BN], tl.float32)
    dC = tl.zeros([T, BN], tl.float32)
    i = tl.program_id(0) * 0  # a runtime zero (HG may be specialized to the constant 1)
    while i < HG:
        h = g * HG + i.to(tl.int64)
        buf = (r * H + h) * NC * T + c * T + t
        dtv = tl.load(dtd_ptr + buf)
        a = tl.load(acs_ptr + buf)
        a_end = tl.sum(tl.where(t == T - 1, a, 0.0), axis=0)
        xoff = (pos[:, None] * H + h) * P + p[None, :]
        soff = ((r * NC + c) * H + h) * P * N + p[:, None] * N + n[None, :]
        xdt = tl.load(x_ptr + xoff, mask=xmask, other=0.0).to(tl.float32) * dtv[:, None]
        dy = tl.load(dout_ptr + xoff, mask=xmask, other=0.0).to(tl.float32)
        if HAS_Z:
            zs = tl.load(z_ptr + xoff, mask=xmask, other=0.0).to(tl.float32)
            dy = dy * zs * tl.sigmoid(zs)
        decay = tl.exp(tl.where(causal, a[:, None] - a[None, :], float("-inf")))
        dyx = _mm(dy, tl.trans(xdt), DT) * decay          # (dy_t . xdt_s) exp(a_t - a_s)
        Gc = tl.load(ds_ptr + soff, mask=smask, other=0.0)
        dB += _mm(tl.trans(dyx), Cs, DT) + tl.exp(a_end - a)[:, None] * _mm(xdt, Gc, DT)
        Hc = tl.load(st_ptr + soff, mask=smask, other=0.0)
        dC += _mm(dyx, Bs, DT) + tl.exp(a)[:, None] * _mm(dy, Hc, DT)
        i += 1
    tl.store(dB_ptr + boff, dB.to(dB_ptr.dtype.element_ty), mask=bmask)
    tl.store(dC_ptr + boff, dC.to(dC_ptr.dtype.element_ty), mask=bmask)


# ----------------------------------------------------------------------------------------------------
# Step (decode)
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _step_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
    H, G, P, N, dt_min, dt_max,
    stride_xb, stride_dtb, stride_bb, stride_cb, stride_zb, stride_yb,
    HAS_D: tl.constexpr, D_PER_DIM: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
):
    # x, dt, B, C, z, y: any stride between batch rows (views into in_proj's output), dense within a row.
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    g = h // (H // G)
    p = tl.program_id(1) * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    pmask = p < P
    nmask = n < N
    raw = tl.load(dt_ptr + b * stride_dtb + h).to(tl.float32)
    bias = tl.load(bias_ptr + h).to(tl.float32) if HAS_BIAS else 0.0
    dtv, _ = _discretize(raw, bias, SOFTPLUS, dt_min, dt_max)
    decay = tl.exp(dtv * tl.load(A_ptr + h).to(tl.float32))
    xs = tl.load(x_ptr + b * stride_xb + h * P + p, mask=pmask, other=0.0).to(tl.float32)
    Bs = tl.load(B_ptr + b * stride_bb + g * N + n, mask=nmask, other=0.0).to(tl.float32)
    Cs = tl.load(C_ptr + b * stride_cb + g * N + n, mask=nmask, other=0.0).to(tl.float32)
    soff = bh * P * N + p[:, None] * N + n[None, :]
    smask = pmask[:, None] & nmask[None, :]
    state = tl.load(state_ptr + soff, mask=smask, other=0.0).to(tl.float32)
    state = decay * state + (dtv * xs)[:, None] * Bs[None, :]
    tl.store(state_ptr + soff, state.to(state_ptr.dtype.element_ty), mask=smask)
    y = tl.sum(state * Cs[None, :], axis=1)
    if HAS_D:
        if D_PER_DIM:
            y += xs * tl.load(D_ptr + h * P + p, mask=pmask, other=0.0).to(tl.float32)
        else:
            y += xs * tl.load(D_ptr + h).to(tl.float32)
    if HAS_Z:
        zs = tl.load(z_ptr + b * stride_zb + h * P + p, mask=pmask, other=0.0).to(tl.float32)
        y = y * zs * tl.sigmoid(zs)
    tl.store(y_ptr + b * stride_yb + h * P + p, y.to(y_ptr.dtype.element_ty), mask=pmask)


# ----------------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------------

def _blocks(P: int, N: int) -> tuple[int, int]:
    return max(16, next_power_of_2(P)), max(16, next_power_of_2(N))


def _dot_dtype(x: torch.Tensor):
    """The matrix products' operand dtype: the inputs'. Triton's CPU interpreter mis-multiplies bf16
    operands (it treats their bits as integers), so there bf16 products run in float32."""
    if x.dtype == torch.float16:
        return tl.float16
    if x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") != "1":
        return tl.bfloat16
    return tl.float32


def _dummy(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like if t is None else t


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


# ----------------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------------

@torch.library.custom_op("ssm_suite::ssd_scan_fwd", mutates_args=())
def ssd_scan_fwd(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None, z: torch.Tensor | None, dt_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None, meta: torch.Tensor, chunk: int, nseq: int,
    dt_softplus: bool, dt_min: float, dt_max: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward on contiguous inputs laid out in whole chunks (see ``_layout``).

    x, z [R, L, H, P]; dt [R, L, H]; B, C [R, L, G, N]; meta int32 [NC, 4]. Returns y [R, L, H, P]
    (x's dtype), the final states [nseq, H, P, N] float32, and for the backward the discretized dt and
    the in-chunk cumulative decays [R, H, NC*T] float32 and the entering states [R, NC, H, P, N] float32.
    """
    R, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    NC = meta.shape[0]
    T = chunk
    dev = x.device
    dtd = torch.empty(R, H, NC * T, device=dev, dtype=torch.float32)
    acs = torch.empty_like(dtd)
    states = torch.empty(R, NC, H, P, N, device=dev, dtype=torch.float32)
    final = (initial_state.to(torch.float32).clone() if initial_state is not None
             else torch.zeros(nseq, H, P, N, device=dev, dtype=torch.float32))
    out = torch.empty_like(x)
    if NC == 0:
        return out, final, dtd, acs, states
    BP, BN = _blocks(P, N)
    BPs = min(BP, 64)
    grid = (NC, R * H, cdiv(P, BPs))
    _fwd_chunk_state[grid](
        x, dt, A, B, _dummy(dt_bias, A), meta, dtd, acs, states,
        L, H, G, P, N, NC, dt_min, dt_max,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, T=T, BP=BPs, BN=BN, DT=_dot_dtype(x), num_warps=4)
    _fwd_state_pass[(R * H, cdiv(P * N, _PASS_BLOCK))](
        states, acs, meta, _dummy(initial_state, states), final, H, P * N, NC,
        HAS_INIT=initial_state is not None, T=T, BLOCK=_PASS_BLOCK, num_warps=2)
    _fwd_chunk_out[grid](
        x, _dummy(z, x), B, C, _dummy(D, A), meta, dtd, acs, states, out,
        L, H, G, P, N, NC,
        HAS_D=D is not None, D_PER_DIM=D is not None and D.dim() == 2, HAS_Z=z is not None,
        T=T, BP=BPs, BN=BN, DT=_dot_dtype(x), num_warps=4)
    return out, final, dtd, acs, states


@ssd_scan_fwd.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, initial_state, meta, chunk, nseq, dt_softplus, dt_min, dt_max):
    R, L, H, P = x.shape
    N = B.shape[3]
    NC = meta.shape[0]
    return (torch.empty_like(x), x.new_empty(nseq, H, P, N, dtype=torch.float32),
            x.new_empty(R, H, NC * chunk, dtype=torch.float32), x.new_empty(R, H, NC * chunk, dtype=torch.float32),
            x.new_empty(R, NC, H, P, N, dtype=torch.float32))


@torch.library.custom_op("ssm_suite::ssd_scan_bwd", mutates_args=())
def ssd_scan_bwd(
    dout: torch.Tensor, dfinal: torch.Tensor | None,
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None, z: torch.Tensor | None, dt_bias: torch.Tensor | None,
    meta: torch.Tensor, dtd: torch.Tensor, acs: torch.Tensor, states: torch.Tensor,
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
    dinit = (dfinal.to(f32).clone() if dfinal is not None
             else torch.zeros(nseq, H, P, N, device=dev, dtype=f32))
    # Every element the caller reads is written by the kernels (padding between packed sequences is
    # never gathered back), so no buffer needs zero-filling.
    dx = torch.empty_like(x)
    dz = torch.empty_like(x) if z is not None else None
    ddt = torch.zeros(R, L, H, device=dev, dtype=f32)  # zeros: summed whole into ddt_bias, padding too
    dB = torch.empty_like(B)
    dC = torch.empty_like(C)
    dA_part = torch.empty(R, NC, H, device=dev, dtype=f32)
    dD_part = torch.empty(R, NC, H, P, device=dev, dtype=f32) if D is not None else None
    if NC > 0:
        BP, BN = _blocks(P, N)
        BPs = min(BP, 64)
        ds = torch.empty(R, NC, H, P, N, device=dev, dtype=f32)
        _bwd_chunk_dstate[(NC, R * H, cdiv(P, BPs))](
            dout, _dummy(z, x), C, meta, acs, ds, L, H, G, P, N, NC,
            HAS_Z=z is not None, T=T, BP=BPs, BN=BN, DT=_dot_dtype(x), num_warps=4)
        nblk = cdiv(P * N, _PASS_BLOCK)
        ddaend = torch.empty(R, H, NC, nblk, device=dev, dtype=f32)
        _bwd_state_pass[(R * H, nblk)](
            ds, states, acs, meta, _dummy(dfinal, ds), dinit, ddaend, H, P * N, NC, nblk,
            HAS_DFINAL=dfinal is not None, T=T, BLOCK=_PASS_BLOCK, num_warps=2)
        ddaend = ddaend.sum(-1).contiguous()
        _bwd_chunk[(NC, R * H)](
            x, dt, A, B, C, _dummy(D, A), _dummy(z, x), _dummy(dt_bias, A), dout, meta,
            dtd, acs, states, ds, ddaend,
            dx, _dummy(dz, dx), ddt, dA_part, _dummy(dD_part, dA_part),
            L, H, G, P, N, NC, dt_min, dt_max,
            HAS_D=D is not None, D_PER_DIM=D is not None and D.dim() == 2, HAS_Z=z is not None,
            HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, T=T, BP=BP, BN=BN, DT=_dot_dtype(x), num_warps=8)
        _bwd_chunk_bc[(NC, R * G)](
            x, B, C, _dummy(z, x), dout, meta, dtd, acs, states, ds, dB, dC, L, H, G, P, N, NC,
            HAS_Z=z is not None, T=T, BP=BP, BN=BN, DT=_dot_dtype(x), num_warps=8)
    else:  # no chunks: the sequences are empty
        dB.zero_()
        dC.zero_()
        dA_part.zero_()
        if dD_part is not None:
            dD_part.zero_()
    dA = dA_part.sum((0, 1)).to(A.dtype)
    if D is None:
        dD = _empty(x)
    else:
        dD = dD_part.sum((0, 1))
        dD = (dD if D.dim() == 2 else dD.sum(-1)).to(D.dtype)
    ddt_bias = _empty(x) if dt_bias is None else ddt.sum((0, 1)).to(dt_bias.dtype)
    return (dx, ddt.to(dt.dtype), dA, dB, dC, dD, _empty(x) if dz is None else dz, ddt_bias, dinit)


@ssd_scan_bwd.register_fake
def _(dout, dfinal, x, dt, A, B, C, D, z, dt_bias, meta, dtd, acs, states, chunk, nseq, dt_softplus,
      dt_min, dt_max):
    H, P, N = x.shape[2], x.shape[3], B.shape[3]
    return (torch.empty_like(x), torch.empty_like(dt), torch.empty_like(A), torch.empty_like(B),
            torch.empty_like(C), _empty(x) if D is None else torch.empty_like(D),
            _empty(x) if z is None else torch.empty_like(z),
            _empty(x) if dt_bias is None else torch.empty_like(dt_bias),
            x.new_empty(nseq, H, P, N, dtype=torch.float32))


def _fwd_setup(ctx, inputs, output):
    x, dt, A, B, C, D, z, dt_bias, initial_state, meta, chunk, nseq, dt_softplus, dt_min, dt_max = inputs
    _, _, dtd, acs, states = output
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, meta, dtd, acs, states)
    ctx.args = (chunk, nseq, dt_softplus, dt_min, dt_max)
    ctx.has_init = initial_state is not None
    ctx.init_dtype = None if initial_state is None else initial_state.dtype


def _fwd_backward(ctx, dout, dfinal, _ddtd, _dacs, _dstates):
    x, dt, A, B, C, D, z, dt_bias, meta, dtd, acs, states = ctx.saved_tensors
    dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit = call_op(
        ssd_scan_bwd,
        dout, dfinal, x, dt, A, B, C, D, z, dt_bias, meta, dtd, acs, states, *ctx.args)
    return (dx, ddt, dA, dB, dC,
            None if D is None else dD, None if z is None else dz, None if dt_bias is None else ddt_bias,
            dinit.to(ctx.init_dtype) if ctx.has_init else None,
            None, None, None, None, None, None)


torch.library.register_autograd("ssm_suite::ssd_scan_fwd", _fwd_backward, setup_context=_fwd_setup)
# The training path's autograd: the registered one, without torch.library's per-call wrapper (kernels/host.py).
_SSDFunction = op_function(ssd_scan_fwd, _fwd_setup, _fwd_backward, differentiable_outputs=2)


@torch.library.custom_op("ssm_suite::ssd_step", mutates_args=("state",))
def ssd_step_op(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
    C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None, dt_bias: torch.Tensor | None,
    dt_softplus: bool, dt_min: float, dt_max: float,
) -> torch.Tensor:
    """One token, state [B, H, P, N] updated in place (contiguous); x, dt, B, C, z dense within a batch row,
    any stride between rows; returns y [B, H, P] (contiguous)."""
    batch, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    y = x.new_empty(batch, H, P)
    BP, BN = _blocks(P, N)
    BP = min(BP, max(16, 4096 // BN))  # keep the state tile near 4K elements a program
    _step_kernel[(batch * H, cdiv(P, BP))](
        state, x, dt, A, B, C, _dummy(D, A), _dummy(z, x), _dummy(dt_bias, A), y,
        H, G, P, N, dt_min, dt_max,
        x.stride(0), dt.stride(0), B.stride(0), C.stride(0), z.stride(0) if z is not None else 0, y.stride(0),
        HAS_D=D is not None, D_PER_DIM=D is not None and D.dim() == 2, HAS_Z=z is not None,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, BP=BP, BN=BN, num_warps=4)
    return y


@ssd_step_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_min, dt_max):
    return x.new_empty(x.shape)


# ----------------------------------------------------------------------------------------------------
# Public entry points (called by kernels.ssd after its shape checks)
# ----------------------------------------------------------------------------------------------------

def chunk_len(chunk_size: int) -> int:
    """The chunk the kernels run: chunk_size rounded up to a power of two, clipped to [16, MAX_CHUNK]."""
    return min(MAX_CHUNK, max(16, next_power_of_2(chunk_size)))


def _check_limits(where: str, P: int, N: int) -> None:
    if P > MAX_HEADDIM:
        raise ValueError(f"{where} (triton): headdim P={P} exceeds the kernels' limit {MAX_HEADDIM}; use "
                         f"more heads of a smaller headdim, or the chunked backend (SSM_SUITE_BACKEND_SSD=chunked)")
    if N > MAX_DSTATE:
        raise ValueError(f"{where} (triton): state size N={N} exceeds the kernels' limit {MAX_DSTATE}; use "
                         f"the chunked backend (SSM_SUITE_BACKEND_SSD=chunked)")


_UNPACKED_META: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def _unpacked_meta(seqlen: int, T: int, device: torch.device) -> torch.Tensor:
    """The chunk table of unpacked rows of ``seqlen`` tokens, built once per (length, chunk, device): a
    host-to-device copy per call would cost a synchronizing transfer and cannot be captured in a CUDA
    graph (``core.cuda_graph`` captures prefills). Read-only for every kernel."""
    key = (seqlen, T, device)
    meta = _UNPACKED_META.get(key)
    if meta is None:
        if len(_UNPACKED_META) >= 256:
            _UNPACKED_META.clear()
        nc = -(-seqlen // T)
        table = [[min(T, seqlen - c * T), 0, int(c == 0), int(c == nc - 1)] for c in range(nc)]
        with torch.inference_mode(False):  # an ordinary tensor, usable by training after generation
            meta = torch.tensor(table, dtype=torch.int32).reshape(-1, _META).to(device)
        _UNPACKED_META[key] = meta
    return meta


def _layout(seqlen: int, T: int, rows: int, cu_seqlens: torch.Tensor | None, device: torch.device):
    """(meta int32 [NC, 4], destination index of each token in the padded row or None, padded length)."""
    if cu_seqlens is None:
        return _unpacked_meta(seqlen, T, device), None, seqlen
    bounds = cu_seqlens.tolist()
    meta, firsts, lengths = [], [], []
    for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        n = end - start
        k = -(-n // T)
        firsts.append(len(meta))
        lengths.append(n)
        meta += [[min(T, n - c * T), s, int(c == 0), int(c == k - 1)] for c in range(k)]
    nc = len(meta)
    dest = torch.cat([torch.arange(n, device=device) + f * T for f, n in zip(firsts, lengths)]) \
        if lengths else torch.zeros(0, dtype=torch.long, device=device)
    padded = nc * T
    meta_t = torch.tensor(meta, dtype=torch.int32).reshape(-1, _META).to(device)
    return meta_t, dest, padded


def ssd_triton(
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
    """SSD through the Triton kernels; arguments and results as :func:`kernels.ssd.reference.ssd_reference`."""
    return run_layout(ssd_scan_fwd, x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit,
                      initial_state, return_final_state, cu_seqlens, forward_function=_SSDFunction)


def run_layout(forward_op, x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_state,
               return_final_state, cu_seqlens, check_grid=None, forward_function=None):
    """What both Triton designs do around their forward custom op: float64 to the exact chunked path,
    the limit checks, packed sequences laid out chunk-aligned (``_layout``) and the outputs put back.
    ``forward_op(x, dt, A, B, C, D, z, dt_bias, initial_state, meta, T, nseq, dt_softplus, dt_min,
    dt_max)`` returns ``(y, final, *saved)``; ``check_grid(batch, H, G, T, P, N)`` adds a design's limits;
    ``forward_function`` (:func:`kernels.host.op_function` of the op) runs it where gradients are needed."""
    if x.dtype == torch.float64:  # the kernels compute in float32; float64 keeps its exact path
        from kernels.ssd.chunked import ssd_chunked
        return ssd_chunked(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_state,
                           return_final_state, cu_seqlens)
    batch, seqlen, H, P = x.shape
    _check_limits("ssd", P, B.shape[3])
    T = chunk_len(chunk_size)
    if check_grid is not None:
        check_grid(batch, H, B.shape[2], T, P, B.shape[3])
    nseq = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    meta, dest, padded = _layout(seqlen, T, batch, cu_seqlens, x.device)

    def lay(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        if dest is not None:
            t = t.new_zeros(1, padded, *t.shape[2:]).index_copy(1, dest, t)
        return t.contiguous()

    c = (lambda t: None if t is None else t.contiguous())
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                            for t in (x, dt, A, B, C, D, z, dt_bias, initial_state))
    if grads and forward_function is not None:
        run = forward_function.apply
    else:
        def run(*args):
            return call_op(forward_op, *args)
    y, final, *_ = run(
        lay(x), lay(dt), c(A), lay(B), lay(C), c(D), lay(z), c(dt_bias), c(initial_state), meta, T, nseq,
        dt_softplus, float(dt_limit[0]), float(dt_limit[1]))
    if dest is not None:
        y = y.index_select(1, dest)
    return (y, final) if return_final_state else y


def ssd_step_triton(
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
    dt_limit: tuple[float, float] = (0.0, math.inf),
) -> torch.Tensor:
    """One decoding step through one Triton kernel; as :func:`kernels.ssd.reference.ssd_step_reference`."""
    if x.dtype == torch.float64 or state.dtype == torch.float64:
        from kernels.ssd.reference import ssd_step_reference
        return ssd_step_reference(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit)
    _check_limits("ssd_step", x.shape[2], B.shape[2])
    if not state.is_contiguous():
        raise ValueError("ssd_step (triton): state must be contiguous (it is updated in place); pass "
                         "state.contiguous() and keep that tensor as the cache")
    c = (lambda t: None if t is None else t.contiguous())
    # The per-token tensors may stay views into in_proj's output (a copy kernel each saved per layer):
    # the kernel takes any stride between batch rows, as long as each row is dense.
    r = (lambda t: None if t is None else t if _dense_rows(t) else t.contiguous())
    return ssd_step_op(state, r(x), r(dt), c(A), r(B), r(C), c(D), r(z), c(dt_bias), dt_softplus,
                       float(dt_limit[0]), float(dt_limit[1]))


def _dense_rows(t: torch.Tensor) -> bool:
    """Whether every row t[b] is a dense row-major block (the batch stride is free)."""
    expected, step = [], 1
    for size in reversed(t.shape[1:]):
        expected.append(step)
        step *= size
    return all(st == e or size == 1 for st, e, size in zip(reversed(t.stride()[1:]), expected, reversed(t.shape[1:])))
