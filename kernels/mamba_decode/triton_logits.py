"""The end of a decoding step in one Triton kernel (semantics: ``reference.decode_logits_reference``):
the final residual add + RMSNorm, the LM head and the float32 logits.

At batch 1 a 130M model's step runs this part as three kernels (the final norm, the LM head's GEMV,
the float32 copy of the logits), and the GEMV streams 77 MB of weights (50280 x 768 bf16) at ~2.5 TB/s
on an H100 (docs/kernels/mamba_decode.md). Here one kernel does all three: program (v, b) takes BV
vocabulary rows for BB batch rows. It loads its weight rows and the norm weight before waiting for the
previous kernel (programmatic dependent launch, ``kernels/pdl.py``: weights are never written), then the
stream row, normalizes it (rounded to the weights' dtype, as the op-by-op norm's output is cast before
the LM head), multiplies it into its rows, rounds each logit to the weights' dtype as F.linear does, and
stores it as float32. Offsets are int64. For batches of at most ``MAX_BATCH`` rows (GEMV tiles; larger
batches are a matmul, where cuBLAS is the better tool) and d_model <= ``MAX_D_MODEL`` (the whole row
lives in registers).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.host import cdiv, next_power_of_2
from kernels.mamba_decode.triton import _norm_rows_product, _round, _whole_rows
from kernels.pdl import pdl_enabled, wait_for_prior_kernel

MAX_BATCH = 4
MAX_D_MODEL = 8192
# Register elements of one program's [BB, BV, d_model (padded to a power of two)] product, and warps.
TILES = {"elems": 8192, "warps": 4}


@triton.jit
def _logits_kernel(
    x_ptr, res_ptr, stream_ptr, nw_ptr, w_ptr, out_ptr,
    batch, vocab, eps,
    stride_xb, stride_rb, stride_w0, stride_w1, stride_ob,
    DM: tl.constexpr, HAS_X: tl.constexpr, HAS_RES: tl.constexpr,
    BB: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr,
):
    rows = tl.program_id(1).to(tl.int64) * BB + tl.arange(0, BB)
    rmask = rows < batch
    v = tl.program_id(0).to(tl.int64) * BV + tl.arange(0, BV)
    vmask = v < vocab
    wdt = w_ptr.dtype.element_ty
    w, nw = _whole_rows(w_ptr, v, vmask, stride_w0, stride_w1, nw_ptr, DM, BK)  # before the wait
    wait_for_prior_kernel(PDL)
    acc = _norm_rows_product(x_ptr, res_ptr, stream_ptr, w, nw, rows, rmask, False, eps, stride_xb, stride_rb, 0,
                             DM, HAS_X, HAS_RES, False, wdt, BK)
    logits = _round(acc, wdt).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_ob + v[None, :], logits, mask=rmask[:, None] & vmask[None, :])


def tiles(batch: int, d_model: int) -> dict:
    """BB (batch rows a program), BV (vocabulary rows a program), BK (d_model padded to a power of two)."""
    bb = next_power_of_2(max(1, batch))
    bk = next_power_of_2(d_model)
    return {"BB": bb, "BV": max(1, min(64, TILES["elems"] // (bb * bk))), "BK": bk}  # all powers of two


def unsupported(batch: int, d_model: int, dtype: torch.dtype) -> str | None:
    """Why this kernel cannot take these logits; None when it can."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"LM head weights in {dtype} (the kernel takes float16 / bfloat16 / float32)"
    if batch > MAX_BATCH:
        return f"batch {batch} > {MAX_BATCH} (a matmul: the LM head's own cuBLAS call is faster there)"
    if d_model > MAX_D_MODEL:
        return f"d_model {d_model} > {MAX_D_MODEL} (a whole row lives in registers)"
    return None


@torch.library.custom_op("ssm_suite::decode_logits", mutates_args=())
def decode_logits_op(x: torch.Tensor | None, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                     norm_eps: float, lm_head_weight: torch.Tensor, vocab_size: int,
                     residual_dtype: torch.dtype) -> torch.Tensor:
    """float32 logits [B, vocab_size] of RMSNorm(x + residual) through the LM head; x, residual [B, d_model]
    with unit feature stride (either may be None, not both)."""
    like = residual if residual is not None else x
    batch, d_model = like.shape
    out = torch.empty(batch, vocab_size, device=like.device, dtype=torch.float32)
    if batch == 0 or vocab_size == 0:
        return out
    cfg = tiles(batch, d_model)
    pdl = pdl_enabled(like.device)
    # The stream's dtype for the rounding of x + residual (a tensor of residual_dtype; never written).
    stream = residual if residual is not None and residual.dtype == residual_dtype else like.new_empty(
        1, dtype=residual_dtype)
    _logits_kernel[(cdiv(vocab_size, cfg["BV"]), cdiv(batch, cfg["BB"]))](
        x, residual, stream, norm_weight, lm_head_weight, out, batch, vocab_size, float(norm_eps),
        x.stride(0) if x is not None else 0, residual.stride(0) if residual is not None else 0,
        *lm_head_weight.stride(), out.stride(0),
        DM=d_model, HAS_X=x is not None, HAS_RES=residual is not None,
        BB=cfg["BB"], BV=cfg["BV"], BK=cfg["BK"], PDL=pdl, num_warps=TILES["warps"], launch_pdl=pdl,
    )
    return out


@decode_logits_op.register_fake
def _(x, residual, norm_weight, norm_eps, lm_head_weight, vocab_size, residual_dtype):
    like = residual if residual is not None else x
    return like.new_empty(like.shape[0], vocab_size, dtype=torch.float32)


def decode_logits_triton(x: torch.Tensor | None, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                         norm_eps: float, lm_head_weight: torch.Tensor, vocab_size: int,
                         residual_dtype: torch.dtype) -> torch.Tensor:
    """The triton backend of ``decode_logits`` (the public function has checked the shapes)."""
    like = residual if residual is not None else x
    reason = unsupported(like.shape[0], like.shape[1], lm_head_weight.dtype)
    if reason is not None:
        raise ValueError(f"decode_logits (triton): {reason}; use the reference backend "
                         "(SSM_SUITE_BACKEND_DECODE_LOGITS=reference)")
    rows = [t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (x, residual)]
    return decode_logits_op(*rows, norm_weight, float(norm_eps), lm_head_weight, int(vocab_size), residual_dtype)
