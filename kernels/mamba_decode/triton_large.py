"""Large-batch pieces of the Mamba-1 decoding step (experimental: measured against cuBLAS first)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.host import cdiv, next_power_of_2
from kernels.mamba_decode.triton import _INTERPRET, _mm, _pick, _round
from kernels.pdl import line_elems, lines_pow2, prefetch_rows_l2, wait_for_prior_kernel


@triton.jit
def _in_proj_conv_kernel(
    h_ptr, win_ptr, cw_ptr, cb_ptr, cs_ptr, xc_ptr, z_ptr,
    batch, stride_hb, stride_wi0, stride_cw0, stride_cw1, stride_csb, stride_csd, stride_csk, stride_xcb, stride_zb,
    DM: tl.constexpr, DI: tl.constexpr, W: tl.constexpr, HAS_CB: tl.constexpr,
    BB: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BW: tl.constexpr, BWW: tl.constexpr,
    STAGES: tl.constexpr, PDL: tl.constexpr, LINE: tl.constexpr, LPD: tl.constexpr,
):
    pid_c = tl.program_id(0)
    rows = tl.program_id(1).to(tl.int64) * BB + tl.arange(0, BB)
    rmask = rows < batch
    NXB: tl.constexpr = (DI + BC - 1) // BC
    is_x = pid_c < NXB
    chan = tl.where(is_x, pid_c, pid_c - NXB).to(tl.int64) * BC + tl.arange(0, BC)
    cmask = chan < DI
    wrow = tl.where(is_x, chan, chan + DI)
    prefetch_rows_l2(win_ptr, wrow, cmask, stride_wi0, DM, LINE, LPD, PDL)
    wait_for_prior_kernel(PDL)
    acc = tl.zeros([BB, BC], dtype=tl.float32)
    for k0 in tl.range(0, DM, BK, num_stages=STAGES):
        k = k0 + tl.arange(0, BK)
        kmask = k < DM
        a = tl.load(h_ptr + rows[:, None] * stride_hb + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(win_ptr + wrow[:, None] * stride_wi0 + k[None, :], mask=cmask[:, None] & kmask[None, :],
                    other=0.0)
        acc += _mm(a, w, True, False)
    wdt = win_ptr.dtype.element_ty
    v = _round(acc, wdt)
    mask = rmask[:, None] & cmask[None, :]
    if is_x:
        kk = tl.arange(0, BW)
        kmask3 = mask[:, :, None] & (kk[None, None, :] < W - 1)
        win = cs_ptr + rows[:, None, None] * stride_csb + chan[None, :, None] * stride_csd + kk[None, None, :] * stride_csk
        old = tl.load(win, mask=kmask3, other=0.0)
        kw = tl.arange(0, BWW)
        cwt = tl.load(cw_ptr + chan[:, None] * stride_cw0 + kw[None, :] * stride_cw1,
                      mask=cmask[:, None] & (kw[None, :] < W), other=0.0)
        y = tl.zeros([BB, BC], dtype=tl.float32)
        if HAS_CB:
            y += tl.load(cb_ptr + chan, mask=cmask, other=0.0).to(tl.float32)[None, :]
        y += _pick(cwt, kw, W - 1)[None, :] * v.to(tl.float32)
        for k in tl.static_range(0, W - 1):
            col = tl.sum(tl.where(kk[None, None, :] == k, old.to(tl.float32), 0.0), axis=2)
            y += _pick(cwt, kw, k)[None, :] * col
        tl.debug_barrier()
        tl.store(win - stride_csk, old, mask=kmask3 & (kk[None, None, :] >= 1))
        tl.store(cs_ptr + rows[:, None] * stride_csb + chan[None, :] * stride_csd + (W - 2) * stride_csk,
                 v.to(cs_ptr.dtype.element_ty), mask=mask)
        tl.store(xc_ptr + rows[:, None] * stride_xcb + chan[None, :], _round(y * tl.sigmoid(y), wdt), mask=mask)
    else:
        tl.store(z_ptr + rows[:, None] * stride_zb + chan[None, :], v, mask=mask)


def in_proj_conv(h: torch.Tensor, in_proj_weight: torch.Tensor, conv_weight: torch.Tensor,
                 conv_bias: torch.Tensor | None, conv_state: torch.Tensor, cfg: dict, pdl: bool = False):
    batch, d_model = h.shape
    d_inner, width = conv_weight.shape
    xc = torch.empty(batch, d_inner, device=h.device, dtype=h.dtype)
    z = torch.empty(batch, d_inner, device=h.device, dtype=h.dtype)
    bb, bc = cfg["BB"], cfg["BC"]
    line = line_elems(in_proj_weight)
    _in_proj_conv_kernel[(2 * cdiv(d_inner, bc), cdiv(batch, bb))](
        h, in_proj_weight, conv_weight, conv_bias, conv_state, xc, z, batch, h.stride(0), in_proj_weight.stride(0),
        *conv_weight.stride(), *conv_state.stride(), xc.stride(0), z.stride(0),
        DM=d_model, DI=d_inner, W=width, HAS_CB=conv_bias is not None, BB=bb, BC=bc, BK=cfg["BK"],
        BW=next_power_of_2(width - 1), BWW=next_power_of_2(width), STAGES=cfg["STAGES"], PDL=pdl, LINE=line,
        LPD=lines_pow2(d_model, line), num_warps=cfg["WARPS"], launch_pdl=pdl)
    return xc, z


@triton.jit
def _fence_gpu(PDL: tl.constexpr):
    if not _INTERPRET:
        tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False,
                                  pack=1)


@triton.jit
def _xproj_kernel(x_ptr, w_ptr, part_ptr, cnt_ptr, out_ptr, batch, stride_xb, stride_w0, stride_pp, stride_pb,
                  stride_ob, J: tl.constexpr, DI: tl.constexpr, SPLIT: tl.constexpr, BB: tl.constexpr,
                  BJ: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr, LINE: tl.constexpr, LP: tl.constexpr):
    pid_j, pid_b, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = pid_j * BJ + tl.arange(0, BJ)
    rows = pid_b.to(tl.int64) * BB + tl.arange(0, BB)
    KS: tl.constexpr = (DI + SPLIT - 1) // SPLIT
    k_lo = pid_s * KS
    rmask = rows < batch
    jmask = cols < J
    prefetch_rows_l2(w_ptr + k_lo, cols, jmask, stride_w0, KS, LINE, LP, PDL)
    wait_for_prior_kernel(PDL)
    acc = tl.zeros([BB, BJ], dtype=tl.float32)
    for k0 in range(0, KS, BK):
        k = k_lo + k0 + tl.arange(0, BK)
        kmask = (k0 + tl.arange(0, BK) < KS) & (k < DI)
        a = tl.load(x_ptr + rows[:, None] * stride_xb + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_w0 + k[None, :], mask=jmask[:, None] & kmask[None, :], other=0.0)
        acc += _mm(a, w, True, False)
    mask = rmask[:, None] & jmask[None, :]
    tile = part_ptr + rows[:, None] * stride_pb + cols[None, :]
    tl.store(tile + pid_s * stride_pp, acc, mask=mask)
    # The last program of this output tile to finish sums the SPLIT partials in a fixed order.
    _fence_gpu(PDL)
    tl.debug_barrier()
    counter = cnt_ptr + pid_b * tl.num_programs(0) + pid_j
    done = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
    if done == SPLIT - 1:
        _fence_gpu(PDL)
        total = tl.zeros([BB, BJ], dtype=tl.float32)
        for s in tl.static_range(0, SPLIT):
            total += tl.load(tile + s * stride_pp, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(out_ptr + rows[:, None] * stride_ob + cols[None, :], _round(total, out_ptr.dtype.element_ty),
                 mask=mask)
        tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def xproj(x: torch.Tensor, w: torch.Tensor, cfg: dict, pdl: bool = False) -> torch.Tensor:
    batch, d_inner = x.shape
    J = w.shape[0]
    split, bb, bj = cfg["SPLIT"], cfg["BB"], cfg["BJ"]
    grid = (cdiv(J, bj), cdiv(batch, bb), split)
    cnt = _COUNTERS.get(x.device)
    if cnt is None or cnt.numel() < grid[0] * grid[1]:
        cnt = _COUNTERS[x.device] = torch.zeros(max(4096, grid[0] * grid[1]), device=x.device, dtype=torch.int32)
    part = torch.empty(split, batch, J, device=x.device, dtype=torch.float32)
    out = torch.empty(batch, J, device=x.device, dtype=x.dtype)
    line = line_elems(w)
    _xproj_kernel[grid](x, w, part, cnt, out, batch, x.stride(0), w.stride(0), part.stride(0), part.stride(1),
                        out.stride(0), J=J, DI=d_inner, SPLIT=split, BB=bb, BJ=bj, BK=cfg["BK"], PDL=pdl, LINE=line,
                        LP=lines_pow2(cdiv(d_inner, split), line), num_warps=cfg["WARPS"], num_stages=3,
                        launch_pdl=pdl)
    return out
