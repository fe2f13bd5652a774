"""The LM head of a large-batch decoding step and its greedy pick (semantics:
``reference.lm_head_logits_reference``).

At batch 64 a 130M model's step ended in three kernels after the final norm: cuBLAS's LM head writing
bfloat16 logits (36.7 us on an H100 for 77 MB of weights, 50280 x 768 bf16, that alone take ~25 us to
stream), the float32 copy of the logits (10.6 us) and torch.argmax's greedy pick (13.3 us); see
docs/kernels/mamba_decode.md. Here two kernels do all three:

- ``_head_kernel``: program (v, m) multiplies BM hidden rows into BN vocabulary rows of the weight (a
  tensor-core ``tl.dot`` over K in pipelined BK steps), rounds each logit to the weights' dtype as F.linear
  does and stores it as float32, then reduces its [BM, BN] tile to a per-row (maximum, first index of it)
  partial. The maximum is taken over int32 keys that order like the logits (``_order_key``), every NaN
  above +inf as torch.argmax ranks them: one reduction, no separate search for NaNs. Launched with
  programmatic dependent launch (``kernels/pdl.py``): the first features of the weight tile's rows are
  prefetched into L2 while the final norm finishes.
- ``_pick_kernel``: one program a row reduces the row's partials in vocabulary order to the first
  maximal index (int64), written into the caller's buffer: in a captured decoding step, the next step's
  input ids.

Products are float16 / bfloat16 tensor-core tiles (IEEE float32 for float32 weights, never TF32); offsets
are int64. Any batch works, but a matmul past ~64 rows is cuBLAS's ground: ``core.cuda_graph`` uses this
for batches 5-64 (smaller ones run ``decode_logits``, the norm and a GEMV in one kernel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.host import cdiv, next_power_of_2
from kernels.mamba_decode.triton import _round
from kernels.mamba_decode.triton_splitk import DTYPES, _dot_acc
from kernels.pdl import line_elems, lines_pow2, pdl_enabled, prefetch_rows_l2, wait_for_prior_kernel

# Tile rule of ``head_tiles`` (measured on an H100 at batch 64, 50280 x 768: docs/kernels/mamba_decode.md);
# "prefetch": features of each weight row a program prefetches into L2 before its wait (0: none).
TILES = {"BN": 128, "BK": 64, "stages": 4, "warps": 4, "prefetch": 128}
PICK_BLOCK = 1024  # partials a step of the pick kernel's loop
_NO_INDEX = 2**31 - 1  # larger than any vocabulary index (int32)
_KEY_MIN = -(2**31)  # below every logit's key: columns past the vocabulary


@triton.jit
def _order_key(x):
    """int32 keys of float32 x in the order torch.argmax ranks values: -inf < ... < -0.0 == +0.0 < ... <
    +inf < NaN (every NaN alike). A float's bits read as int32 order the non-negative floats; flipping
    the magnitude bits of the negative ones reverses theirs."""
    bits = x.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = tl.where(x == 0.0, 0, key)  # -0.0 ties +0.0
    return tl.where(x != x, 2147483647, key)


@triton.jit
def _head_kernel(
    h_ptr, w_ptr, out_ptr, pkey_ptr, pidx_ptr,
    M, V, K,
    stride_hm, stride_wn, stride_om, stride_pm,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,
    IEEE: tl.constexpr, PDL: tl.constexpr, LINE: tl.constexpr, LP: tl.constexpr, PK: tl.constexpr,
    GREEDY: tl.constexpr, KEY_MIN: tl.constexpr,
):
    tile = tl.program_id(0).to(tl.int64)
    cols = tile * BN + tl.arange(0, BN)
    rows = tl.program_id(1).to(tl.int64) * BM + tl.arange(0, BM)
    nmask = cols < V
    rmask = rows < M
    if PK > 0:  # the first features of the weight rows (never written)
        prefetch_rows_l2(w_ptr, cols, nmask, stride_wn, tl.minimum(K, PK), LINE, LP, PDL)
    wait_for_prior_kernel(PDL)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES):
        k = k0 + tl.arange(0, BK)
        kmask = k < K
        a = tl.load(h_ptr + rows[:, None] * stride_hm + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_wn + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        acc = _dot_acc(a, w, acc, IEEE)
    logits = _round(acc, w_ptr.dtype.element_ty).to(tl.float32)  # F.linear's output, as float32
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], logits, mask=rmask[:, None] & nmask[None, :])
    if not GREEDY:
        return
    # This tile's greedy partial: the largest key of each row and the first column holding it.
    key = tl.where(nmask[None, :], _order_key(logits), KEY_MIN)
    best, first = tl.max(key, axis=1, return_indices=True, return_indices_tie_break_left=True)
    tl.store(pkey_ptr + rows * stride_pm + tile, best, mask=rmask)
    tl.store(pidx_ptr + rows * stride_pm + tile, (tile * BN + first).to(tl.int32), mask=rmask)


@triton.jit
def _pick_kernel(pkey_ptr, pidx_ptr, out_ptr, T, stride_pm, BT: tl.constexpr, PDL: tl.constexpr,
                 KEY_MIN: tl.constexpr, NO_INDEX: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    wait_for_prior_kernel(PDL)
    best = tl.full([], KEY_MIN, tl.int32)
    best_idx = tl.full([], NO_INDEX, tl.int32)
    # Tiles come in vocabulary order and each partial holds its tile's first maximal index, so the first
    # maximal partial holds the row's: a later block replaces the running pick only when strictly larger.
    # Every logit's key (-inf's included) is above KEY_MIN, so the first block always replaces it.
    for t0 in range(0, T, BT):
        t = t0 + tl.arange(0, BT)
        tmask = t < T
        key = tl.load(pkey_ptr + row * stride_pm + t, mask=tmask, other=KEY_MIN)
        index = tl.load(pidx_ptr + row * stride_pm + t, mask=tmask, other=NO_INDEX)
        block_best = tl.max(key, axis=0)
        block_idx = tl.min(tl.where((key == block_best) & tmask, index, NO_INDEX), axis=0)
        best_idx = tl.where(block_best > best, block_idx, best_idx)
        best = tl.maximum(best, block_best)
    tl.store(out_ptr + row, best_idx.to(tl.int64))


def head_tiles(batch: int) -> dict:
    """BM hidden rows (16-64: the tensor cores' smallest M is 16), BN vocabulary rows, BK features a
    pipelined step, its stages, and the features prefetched before the wait (``TILES``)."""
    return {"BM": max(16, min(64, next_power_of_2(batch))), "BN": TILES["BN"], "BK": TILES["BK"],
            "stages": TILES["stages"], "prefetch": TILES["prefetch"]}


def unsupported(hidden: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why the kernel cannot take this hidden state and LM head weight; None when it can."""
    if weight.dtype not in DTYPES or hidden.dtype != weight.dtype:
        return (f"hidden and lm_head_weight must share one float16 / bfloat16 / float32 dtype, got "
                f"{hidden.dtype} and {weight.dtype}")
    if weight.shape[0] >= _NO_INDEX:
        return f"a vocabulary of {weight.shape[0]} rows (the greedy pick's indices are int32)"
    return None


@torch.library.custom_op("ssm_suite::lm_head_logits", mutates_args=())
def lm_head_logits_op(hidden: torch.Tensor, weight: torch.Tensor, vocab_size: int,
                      greedy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [M, K] @ weight[:vocab_size]^T rounded to the weights' dtype, as float32 logits [M, vocab_size],
    and with ``greedy`` the greedy partials of its vocabulary tiles: the order keys of their maxima
    (``_order_key``) and their first indices, int32 [M, T] each (T = 0 without). hidden and weight have
    unit stride along K."""
    m, k = hidden.shape
    cfg = head_tiles(m)
    tiles = cdiv(vocab_size, cfg["BN"]) if greedy else 0
    logits = torch.empty(m, vocab_size, device=hidden.device, dtype=torch.float32)
    pkey = torch.empty(m, tiles, device=hidden.device, dtype=torch.int32)
    pidx = torch.empty(m, tiles, device=hidden.device, dtype=torch.int32)
    if m == 0:
        return logits, pkey, pidx
    pdl = pdl_enabled(hidden.device)
    line = line_elems(weight)
    prefetch = min(k, cfg["prefetch"])
    _head_kernel[(cdiv(vocab_size, cfg["BN"]), cdiv(m, cfg["BM"]))](
        hidden, weight, logits, pkey, pidx, m, vocab_size, k,
        hidden.stride(0), weight.stride(0), logits.stride(0), pkey.stride(0),
        BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], STAGES=max(1, min(cfg["stages"], cdiv(k, cfg["BK"]))),
        IEEE=weight.dtype == torch.float32, PDL=pdl, LINE=line, LP=lines_pow2(prefetch, line), PK=prefetch,
        GREEDY=greedy, KEY_MIN=_KEY_MIN,
        num_warps=TILES["warps"], launch_pdl=pdl,
    )
    return logits, pkey, pidx


@lm_head_logits_op.register_fake
def _(hidden, weight, vocab_size, greedy):
    m = hidden.shape[0]
    tiles = cdiv(vocab_size, head_tiles(m)["BN"]) if greedy else 0
    return (hidden.new_empty(m, vocab_size, dtype=torch.float32), hidden.new_empty(m, tiles, dtype=torch.int32),
            hidden.new_empty(m, tiles, dtype=torch.int32))


@torch.library.custom_op("ssm_suite::greedy_pick", mutates_args=("out",))
def greedy_pick_op(pkey: torch.Tensor, pidx: torch.Tensor, out: torch.Tensor) -> None:
    """out [M] int64 <- the first maximal index of each row of the partials pkey / pidx [M, T] (contiguous)."""
    m, tiles = pkey.shape
    if m == 0:
        return
    pdl = pdl_enabled(pkey.device)
    _pick_kernel[(m,)](pkey, pidx, out, tiles, pkey.stride(0), BT=min(PICK_BLOCK, next_power_of_2(tiles)),
                       PDL=pdl, KEY_MIN=_KEY_MIN, NO_INDEX=_NO_INDEX, num_warps=4, launch_pdl=pdl)


@greedy_pick_op.register_fake
def _(pkey, pidx, out):
    return None


def lm_head_logits_triton(hidden: torch.Tensor, lm_head_weight: torch.Tensor, vocab_size: int,
                          greedy_out: torch.Tensor | None = None) -> torch.Tensor:
    """The triton backend of ``lm_head_logits`` (the public function has checked the shapes)."""
    reason = unsupported(hidden, lm_head_weight)
    if reason is not None:
        raise ValueError(f"lm_head_logits (triton): {reason}; use the reference backend "
                         "(SSM_SUITE_BACKEND_LM_HEAD_LOGITS=reference)")
    hidden, weight = (t if t.stride(-1) == 1 else t.contiguous() for t in (hidden, lm_head_weight))
    logits, pkey, pidx = lm_head_logits_op(hidden, weight, int(vocab_size), greedy_out is not None)
    if greedy_out is not None:
        if greedy_out.is_contiguous():
            greedy_pick_op(pkey, pidx, greedy_out)
        else:
            picked = torch.empty_like(greedy_out, memory_format=torch.contiguous_format)
            greedy_pick_op(pkey, pidx, picked)
            greedy_out.copy_(picked)
    return logits
