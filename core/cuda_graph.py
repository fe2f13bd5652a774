"""Decoding with CUDA graphs: the one-token step captured once per (batch size, cache shape), replayed
per token.

A decoding step of a small model is hundreds of tiny kernels; launched one by one from Python, the GPU
waits on the CPU. A CUDA graph records the launches once and replays them with one call. A replay
re-runs the same kernels on the same memory, so the step must be *capture safe*:

- everything that changes per token is device data read by the kernels: the recurrent states (updated in
  place by the fused step ops ``ssm_suite::selective_scan_step``, ``ssm_suite::ssd_step``,
  ``ssm_suite::causal_conv1d_step``), and the KV / Hyena write slot and row positions
  (:class:`core.cache.KVCache` ``counters``, :class:`core.cache.HyenaCache` ``index``), which the step
  reads and increments in place;
- no ``.item()``, no Python branch on tensor values, no shape that depends on the data (the MoE routes a
  one-position input with fixed shapes, attention attends over the whole preallocated buffer with a mask);
- the cache, the input ids and the derived constants (``core.cache.decode_memo``) are allocated before the
  capture and only updated in place afterwards.

Pieces:

- :func:`decode_step`: the step itself, token ids [B] -> logits [B, vocab] float32. For a standard
  :class:`~core.backbone.CausalLM` it walks the blocks with the fused residual-add + RMSNorm kernel
  (one kernel a block instead of four; the same arithmetic as ``Block.forward``), else it calls the model.
  Where the ``mamba1_decode_block`` op runs its Triton backend (CUDA by default) and the batch has at
  most ``FUSED_MAMBA1_MAX_BATCH`` rows, every Mamba-1 block it can take
  (:meth:`~core.layers.mamba1.Mamba1.fused_step_unsupported`) runs as one fused block step, 3 kernels
  instead of 7 (:mod:`kernels.mamba_decode`); the other blocks run op by op (:func:`decode_step_path`
  says which ran). Mamba-2 blocks likewise run as one fused block step (``mamba2_decode_block``, 3
  kernels instead of 6) for at most ``FUSED_MAMBA2_MAX_BATCH`` rows, unless
  ``SSM_SUITE_FUSED_MAMBA2_DECODE=0``. Past those limits, up to ``PARTIALS_MAMBA1_MAX_BATCH`` rows,
  Mamba-1 blocks run op by op with in_proj, x_proj and out_proj as split-K partial products that the
  next op sums (:meth:`~core.layers.mamba1.Mamba1.step_partials`). The step ends with the final norm, LM
  head and float32 logits in one kernel up to 4 rows (:func:`fused_logits`), and past them, up to
  ``HEAD_KERNEL_MAX_BATCH`` rows, with an LM head kernel that also leaves per-tile greedy partials and a
  kernel that picks the greedy token (:func:`head_kernel`). From ``ROW_GROUPS_MIN_BATCH`` rows, when every
  block takes the split-K step and the SSM states are 16-bit, the blocks run on ``ROW_GROUPS`` row groups
  concurrently (side streams; parallel branches of a captured graph; :func:`decode_row_groups`): each
  group's chain of small kernels is latency-bound, and two of them overlap; the LM head then runs once on
  all rows. ``generate`` uses it with and without graphs, so both produce identical tokens.
- :class:`CUDAGraphRunner`: one captured step with its static cache, input ids and logits. The warm-up
  runs on a side stream (it compiles the Triton kernels, sets up cuBLAS and fills the memos), then the
  step is captured in its own memory pool and the cache is cleared. ``capture=False`` runs the same
  static-buffer step eagerly: the CPU tests drive the whole graph code path with it.
  :meth:`CUDAGraphRunner.prefill` captures the prompt's forward too, for a prompt length seen a second
  time: at batch 1 a 512-token prefill of mamba1-130m is ~15 ms of Python and launches around ~2.4 ms of
  GPU work (docs/generation.md). Only prompts without padding, of at most ``PREFILL_GRAPH_MAX_TOKENS``
  tokens (batch x length; each graph's memory pool holds the forward's peak activations), for models made
  of Mamba-1, Mamba-2, attention and MLP blocks; ``PREFILL_GRAPHS`` lengths per runner, least recently
  used dropped.
- :class:`CUDAGraphDecoder`: the runners of one model keyed by (batch size, the shapes of the cache), so
  repeated ``generate`` calls of the same shape reuse a graph (a Mamba-only model's cache does not depend
  on the sequence length, so one graph serves every length; length-dependent caches are allocated to a
  multiple of ``length_bucket`` positions, 128 by default, so that nearby lengths share one graph at the
  cost of attending over at most 127 masked slots). Least recently used runners are dropped
  past ``max_graphs`` (each holds a cache); all are dropped when a parameter changes (storage or version
  counter), since a graph would keep stale derived constants. :func:`graph_decoder` keeps one per model.
"""

from __future__ import annotations

import os
import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from core.backbone import Backbone, Block, CausalLM, upcast_residual_dtype
from core.cache import ConvSSMCache, InferenceCache
from core.layers.mamba1 import Mamba1
from core.layers.mamba2 import Mamba2
from core.layers.norm import RMSNorm
from kernels.mamba_decode import (add_norm_partials, decode_logits, decode_logits_backend, decode_logits_unsupported,
                                  linear_partials_backend, lm_head_logits, lm_head_logits_backend,
                                  lm_head_logits_unsupported, mamba1_decode_backend, mamba1_decode_block,
                                  mamba2_decode_backend, mamba2_decode_block)
from kernels.mamba_decode.reference import sum_partials
from kernels.norm import rms_norm

LENGTH_BUCKET = 128  # caches that grow with the sequence are allocated to a multiple of this
# Batches up to this many rows take the fused Mamba-1 block step (None: every batch). On an H100 (bf16,
# mamba1-130m, docs/kernels/mamba_decode.md) it made a step 1.24x faster at batch 1 and 1.5x slower at
# batch 64, where cuBLAS's matmuls in the op-by-op step win.
FUSED_MAMBA1_MAX_BATCH: int | None = 4
# The same for the fused Mamba-2 block step. On an H100 (bf16, mamba2-130m's 24 blocks, graph-replayed;
# docs/kernels/mamba_decode.md) it made a step 1.17x faster at batch 1 and 1.37x slower at batch 64.
# SSM_SUITE_FUSED_MAMBA2_DECODE=0 turns it off (every batch op by op).
FUSED_MAMBA2_ENV = "SSM_SUITE_FUSED_MAMBA2_DECODE"
FUSED_MAMBA2_MAX_BATCH: int | None = 4
# Larger batches, up to this many rows, run Mamba-1 blocks op by op with in_proj, x_proj and out_proj as
# split-K partial products (Mamba1.step_partials, kernels.mamba_decode.linear_partials) where that op runs its
# Triton backend (CUDA by default): measured on an H100 at batch 64 (docs/kernels/mamba_decode.md,
# "Split-K"); beyond it cuBLAS's matmuls take over again.
PARTIALS_MAMBA1_MAX_BATCH: int | None = 64
# Batches past the one-kernel logits (decode_logits, at most 4 rows) and up to this many rows end the step
# with lm_head_logits' Triton kernels where that op runs its Triton backend: the LM head writing float32
# logits and the greedy pick, 2 kernels instead of cuBLAS, a float32 copy and torch.argmax (measured on
# an H100 at batch 64: docs/kernels/mamba_decode.md, "LM head"). Larger batches are cuBLAS's matmuls.
HEAD_KERNEL_MAX_BATCH: int | None = 64
# Batches of at least this many rows whose blocks all take the split-K step, with 16-bit SSM states, run
# the blocks as ROW_GROUPS row groups concurrently (decode_row_groups; None: never). Measured on an H100
# (docs/kernels/mamba_decode.md, "Row groups"): faster at 48 and 64 rows, slower at 32 and with float32
# states.
ROW_GROUPS = 2
ROW_GROUPS_MIN_BATCH: int | None = 48
# Prefill graphs (CUDAGraphRunner.prefill): prompts of at most this many tokens (batch x length), and
# this many prompt lengths kept per runner. Each holds the forward's peak activations in its own memory
# pool (~1 GB for 64 x 512 tokens of mamba1-130m). On an H100 that prompt's eager prefill was host-bound
# on some machines (30-32 ms against 24.8 replayed; docs/generation.md).
PREFILL_GRAPH_MAX_TOKENS = 32768
PREFILL_GRAPHS = 4


# --------------------------------------------------------------------------------------------------
# Which models can be captured
# --------------------------------------------------------------------------------------------------

def _stateless_or_safe(mixer: nn.Module) -> bool:
    # Mixers declare ``cuda_graph_safe``; the MLP (stateless, fixed shapes) and S4D (a fixed-size state
    # updated with elementwise ops) are capture safe without declaring it.
    if getattr(mixer, "cuda_graph_safe", False):
        return True
    from core.layers.mlp import MLP
    from core.layers.s4d import S4D
    return isinstance(mixer, (MLP, S4D))


def graph_unsafe_reason(model: nn.Module) -> str | None:
    """Why ``model``'s decoding step cannot be captured in a CUDA graph; None when it can."""
    if not isinstance(model, CausalLM):
        return (f"{type(model).__name__} is not a core.backbone.CausalLM (its cached forward may branch on "
                "host-side counters); decode it with cuda_graph=False")
    for block in model.backbone.layers:
        mixer = getattr(block, "mixer", None)
        if mixer is None or not _stateless_or_safe(mixer):
            return (f"block {getattr(block, 'layer_idx', '?')} ({type(mixer).__name__}) has no capture-safe "
                    "decoding step (no cuda_graph_safe attribute); decode with cuda_graph=False")
    return None


def prefill_graph_unsafe_reason(model: nn.Module) -> str | None:
    """Why ``model``'s prefill (a forward over a prompt from a cleared cache) is not captured; None when it
    can be: every block's mixer is a Mamba-1, Mamba-2, attention or MLP layer, whose cached forward from
    position 0 reads no host-side state that changes between calls."""
    from core.layers.attention import Attention
    from core.layers.mlp import MLP
    reason = graph_unsafe_reason(model)
    if reason is not None:
        return reason
    for block in model.backbone.layers:
        if not isinstance(getattr(block, "mixer", None), (Mamba1, Mamba2, Attention, MLP)):
            return f"block {block.layer_idx} ({type(block.mixer).__name__}) has no captured prefill"
    return None


def _fusable(model: nn.Module) -> bool:
    """Whether :func:`decode_step` may run the blocks itself (the standard backbone, unmodified)."""
    if not isinstance(model, CausalLM) or type(model.backbone) is not Backbone:
        return False
    backbone = model.backbone
    return isinstance(backbone.norm_f, RMSNorm) and all(
        type(block) is Block and isinstance(block.norm, RMSNorm) for block in backbone.layers)


def _bias_free_head(model: nn.Module) -> bool:
    """A standard model (:func:`_fusable`) whose LM head has no bias: what the step's end kernels take."""
    return _fusable(model) and getattr(model.lm_head, "bias", None) is None


def _device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """``device``, or the model's when None."""
    return next(model.parameters()).device if device is None else torch.device(device)


# --------------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------------

def fused_mamba1_blocks(model: nn.Module, batch_size: int = 1,
                        device: torch.device | str | None = None) -> list[bool]:
    """Per block of a standard :class:`CausalLM`: whether :func:`decode_step` runs it as one fused Mamba-1
    block step at this batch size (a Mamba-1 block the fused kernels take, on a device where
    ``mamba1_decode_block`` picks its Triton backend, for at most ``FUSED_MAMBA1_MAX_BATCH`` rows).
    Empty for models that decode through their own forward."""
    if not _fusable(model):
        return []
    layers = model.backbone.layers
    device = _device(model, device)
    too_large = FUSED_MAMBA1_MAX_BATCH is not None and batch_size > FUSED_MAMBA1_MAX_BATCH
    if too_large or mamba1_decode_backend(device) != "triton":
        return [False] * len(layers)
    return [isinstance(block.mixer, Mamba1) and block.mixer.fused_step_unsupported() is None for block in layers]


def partials_mamba1_blocks(model: nn.Module, batch_size: int = 1,
                           device: torch.device | str | None = None) -> list[bool]:
    """Per block of a standard :class:`CausalLM`: whether :func:`decode_step` runs it op by op with its
    in_proj, x_proj and out_proj as split-K partial products (:meth:`~core.layers.mamba1.Mamba1.step_partials`): a
    Mamba-1 block that takes it, at a batch too large for the fused block step (past
    ``FUSED_MAMBA1_MAX_BATCH``) and at most ``PARTIALS_MAMBA1_MAX_BATCH`` rows, where ``linear_partials``
    runs its Triton backend. Empty for models that decode through their own forward."""
    if not _fusable(model):
        return []
    layers = model.backbone.layers
    device = _device(model, device)
    small = FUSED_MAMBA1_MAX_BATCH is None or batch_size <= FUSED_MAMBA1_MAX_BATCH
    large = PARTIALS_MAMBA1_MAX_BATCH is not None and batch_size > PARTIALS_MAMBA1_MAX_BATCH
    if small or large or linear_partials_backend(device) != "triton":
        return [False] * len(layers)
    return [isinstance(block.mixer, Mamba1) and block.mixer.partials_step_unsupported() is None for block in layers]


def fused_logits(model: nn.Module, batch_size: int = 1, device: torch.device | str | None = None) -> bool:
    """Whether :func:`decode_step` ends with the one-kernel final norm + LM head + float32 logits
    (``kernels.mamba_decode.decode_logits``): a standard :class:`CausalLM` with a bias-free LM head, on a
    device where that op picks its Triton backend, for batches the kernel takes (at most 4 rows)."""
    if not _bias_free_head(model):
        return False
    device = _device(model, device)
    if decode_logits_backend(device) != "triton":
        return False
    return decode_logits_unsupported(batch_size, model.config.d_model, model.lm_head.weight.dtype) is None


def head_kernel(model: nn.Module, batch_size: int = 1, device: torch.device | str | None = None) -> bool:
    """Whether :func:`decode_step` ends with ``kernels.mamba_decode.lm_head_logits``' Triton kernels (the LM
    head writing float32 logits, and the greedy pick in-kernel): a standard :class:`CausalLM` with a
    bias-free LM head, past :func:`fused_logits`' batches and up to ``HEAD_KERNEL_MAX_BATCH`` rows, on a
    device where that op picks its Triton backend."""
    if not _bias_free_head(model):
        return False
    if fused_logits(model, batch_size, device):
        return False
    if HEAD_KERNEL_MAX_BATCH is not None and batch_size > HEAD_KERNEL_MAX_BATCH:
        return False
    device = _device(model, device)
    weight = model.lm_head.weight
    if lm_head_logits_backend(device) != "triton":
        return False
    return lm_head_logits_unsupported(weight[:0], weight) is None  # (a [0, d_model] view: hidden's dtype)


def fused_mamba2_blocks(model: nn.Module, batch_size: int = 1,
                        device: torch.device | str | None = None) -> list[bool]:
    """Per block of a standard :class:`CausalLM`: whether :func:`decode_step` runs it as one fused Mamba-2
    block step at this batch size: for a Mamba-2 block the fused kernels take, on a device where
    ``mamba2_decode_block`` picks its Triton backend, for at most ``FUSED_MAMBA2_MAX_BATCH`` rows, unless
    ``SSM_SUITE_FUSED_MAMBA2_DECODE=0``. Empty for models that decode through their own forward."""
    if not _fusable(model):
        return []
    layers = model.backbone.layers
    device = _device(model, device)
    too_large = FUSED_MAMBA2_MAX_BATCH is not None and batch_size > FUSED_MAMBA2_MAX_BATCH
    if os.environ.get(FUSED_MAMBA2_ENV) == "0" or too_large or mamba2_decode_backend(device) != "triton":
        return [False] * len(layers)
    return [isinstance(block.mixer, Mamba2) and block.mixer.fused_step_unsupported() is None for block in layers]


def decode_step_path(model: nn.Module, batch_size: int = 1, ssm_state_dtype: torch.dtype | None = None) -> str:
    """Which step :func:`decode_step` runs for ``model`` on its device at this batch size and SSM state
    dtype (None: float32), in words (benchmarks print it)."""
    if not _fusable(model):
        return "the model's own forward"
    groups = decode_row_groups(model, batch_size, ssm_state_dtype=ssm_state_dtype)
    path = _blocks_path(model, batch_size // groups)
    if groups > 1:
        path = f"{groups} row groups of {batch_size // groups} concurrently, each {path}"
    if fused_logits(model, batch_size):
        return f"{path}; logits in one kernel"
    return f"{path}; LM head + greedy pick kernels" if head_kernel(model, batch_size) else path


def _blocks_path(model: nn.Module, batch_size: int) -> str:
    fused1 = fused_mamba1_blocks(model, batch_size)
    fused2 = fused_mamba2_blocks(model, batch_size)
    n1, n2, total = sum(fused1), sum(fused2), len(fused1)
    split = sum(partials_mamba1_blocks(model, batch_size))
    split_k = f"split-K in_proj / x_proj / out_proj in {split}/{total} blocks" if split else ""
    if n1 + n2 == 0:
        return f"op by op (fused add+norm; {split_k})" if split else "op by op (fused add+norm)"
    others = "" if n1 + n2 == total else f"; others op by op{', ' + split_k if split else ''}"
    parts = [f"Mamba-{k} {n}/{total}" for k, n in ((1, n1), (2, n2)) if n]
    if n2 == 0:
        return f"fused Mamba-1 step ({n1}/{total} blocks{others})"
    return f"fused block steps ({', '.join(parts)} blocks{others})"


@torch.no_grad()
def decode_step(model: nn.Module, input_ids: torch.Tensor, cache: InferenceCache,
                greedy_out: torch.Tensor | None = None) -> torch.Tensor:
    """One decoding step: input_ids int64 [B] (one token per row) -> logits float32 [B, vocab_size]; with
    ``greedy_out`` (int64 [B], which may be input_ids itself) their argmax is written there as well
    (torch.argmax's pick: inside the LM head's kernels where :func:`head_kernel` says so).

    Continues from ``cache`` and leaves the state after the token in it (device state and host counters).
    For a standard :class:`CausalLM` the residual add of each block is fused with the next block's
    RMSNorm (``kernels.norm.rms_norm(..., residual=...)``): the same float32 arithmetic as
    ``Block.forward`` in fewer kernels. Mamba-1 blocks that :func:`fused_mamba1_blocks` marks run as one
    fused block step (add + norm + mixer + the residual add of their own output, in 3 kernels), equal to
    the op-by-op step up to the order of floating-point additions; so do the Mamba-2 blocks that
    :func:`fused_mamba2_blocks` marks (opt-in). Where :func:`decode_row_groups` says so, the blocks run on
    row groups concurrently (side CUDA streams; branches of a captured graph) and the LM head on all rows.
    Other models run their own forward.
    """
    if not _fusable(model):
        return _pick(model(input_ids[:, None], cache=cache, num_last_tokens=1).logits[:, -1], greedy_out)
    backbone = model.backbone
    batch, device = input_ids.shape[0], input_ids.device
    groups = decode_row_groups(model, batch, device, _ssm_state_dtype(cache))
    if groups > 1:
        bounds = [(g * batch // groups, (g + 1) * batch // groups) for g in range(groups)]
        hidden = torch.cat(_concurrently([
            lambda lo=lo, hi=hi: _final_hidden(model, *_blocks_step(model, input_ids[lo:hi], _row_view(cache, lo, hi)))
            for lo, hi in bounds], device))
        cache.seqlen_offset += 1
    else:
        out, residual, partials, stream_dtype = _blocks_step(model, input_ids, cache)
        cache.seqlen_offset += 1
        if fused_logits(model, batch, device):
            return _pick(decode_logits(None if out is None else out[:, 0], None if residual is None else residual[:, 0],
                                       backbone.norm_f.weight, backbone.norm_f.eps, model.lm_head.weight,
                                       model.config.vocab_size, stream_dtype), greedy_out)
        hidden = _final_hidden(model, out, residual, partials, stream_dtype)
    if head_kernel(model, batch, device):
        return lm_head_logits(hidden, model.lm_head.weight, model.config.vocab_size, greedy_out)
    return _pick(model.lm_head(hidden)[..., : model.config.vocab_size].float(), greedy_out)


def _blocks_step(model: nn.Module, input_ids: torch.Tensor, cache: InferenceCache) -> tuple:
    """The embedding and every block of :func:`decode_step` (cache's host counters unmoved). Returns the
    stream as (out, residual, partials, stream_dtype): the residual stream [B, 1, D] plus the last block's
    output not yet added (``out`` [B, 1, D], or out_proj's split-K ``partials`` with their dtype; None
    when the block added its own)."""
    backbone = model.backbone
    out = backbone.embedding(input_ids[:, None])  # [B, 1, d_model]
    # The residual stream's dtype, as Backbone / Block keep it.
    stream_dtype = upcast_residual_dtype(out.dtype) if backbone.residual_in_fp32 else out.dtype
    fused1 = fused_mamba1_blocks(model, input_ids.shape[0], out.device)
    fused2 = fused_mamba2_blocks(model, input_ids.shape[0], out.device)
    split = partials_mamba1_blocks(model, input_ids.shape[0], out.device)
    # The stream is `residual` + `out` (the previous block's output, not yet added; None once a fused
    # block has added its own). `sumsq`: a fused block's partial sums of squares of the stream, which the
    # next fused block's norm reads instead of the row. `partials`: the previous block's output as
    # out_proj's split-K partial products [S, B, d_model] and out_proj's dtype (then `out` is None),
    # summed by the next norm.
    residual = sumsq = partials = None
    for block, layer_cache, use_fused1, use_fused2, use_split in zip(backbone.layers, cache.layers, fused1, fused2,
                                                                    split):
        if partials is not None and (use_fused1 or use_fused2):
            out, partials = sum_partials(*partials)[:, None], None
        if use_fused1 or use_fused2:
            step = mamba1_decode_block if use_fused1 else mamba2_decode_block
            stream, sumsq = step(
                layer_cache.conv_state, layer_cache.ssm_state, None if out is None else out[:, 0],
                None if residual is None else residual[:, 0], block.norm.weight, block.norm.eps,
                **block.mixer.fused_step_weights(), residual_dtype=stream_dtype,
                residual_sumsq=sumsq if out is None else None)
            residual, out = stream[:, None], None
            continue
        h, residual = _add_and_norm(block.norm, out, residual, partials, stream_dtype)
        sumsq = partials = None
        if use_split:
            out = None
            partials = (block.mixer.step_partials(h[:, 0].to(block.norm.weight.dtype), layer_cache),
                        block.mixer.out_proj.weight.dtype)
            continue
        out = block.mixer(h.to(block.norm.weight.dtype), cache=layer_cache)
        if isinstance(out, tuple):  # the MoE's (y, aux)
            out = out[0]
    return out, residual, partials, stream_dtype


def _final_hidden(model: nn.Module, out: torch.Tensor | None, residual: torch.Tensor | None,
                  partials: tuple[torch.Tensor, torch.dtype] | None, stream_dtype: torch.dtype) -> torch.Tensor:
    """The final norm of :func:`_blocks_step`'s stream: the LM head's input [B, D] in its weights' dtype."""
    hidden, _ = _add_and_norm(model.backbone.norm_f, out, residual, partials, stream_dtype)
    return hidden[:, 0].to(model.lm_head.weight.dtype)


def decode_row_groups(model: nn.Module, batch_size: int = 1, device: torch.device | str | None = None,
                      ssm_state_dtype: torch.dtype | None = None) -> int:
    """How many row groups :func:`decode_step` runs its blocks on, concurrently: ``ROW_GROUPS`` where every
    block takes the split-K step (:func:`partials_mamba1_blocks`: Mamba-1 blocks only, whose caches are
    per row), the batch has at least ``ROW_GROUPS_MIN_BATCH`` rows and the SSM states are 16-bit
    (``ssm_state_dtype``; None: float32, generate's default), else 1. Each group's kernels are
    latency-bound chains; two of them fill the GPU's idle time. With float32 states, twice the scan
    step's bytes, two groups were slower (docs/kernels/mamba_decode.md, "Row groups")."""
    if ROW_GROUPS < 2 or ROW_GROUPS_MIN_BATCH is None or batch_size < max(ROW_GROUPS_MIN_BATCH, ROW_GROUPS):
        return 1
    if ssm_state_dtype is None or ssm_state_dtype.itemsize > 2:
        return 1
    split = partials_mamba1_blocks(model, batch_size, device)
    if not split or not all(split):
        return 1
    # Each group must still take the split-K step.
    return ROW_GROUPS if all(partials_mamba1_blocks(model, batch_size // ROW_GROUPS, device)) else 1


def _ssm_state_dtype(cache: InferenceCache) -> torch.dtype | None:
    """The widest dtype of the cache's SSM states (None without any)."""
    dtypes = [layer.ssm_state.dtype for layer in cache.layers if isinstance(layer, ConvSSMCache)]
    return max(dtypes, key=lambda dtype: dtype.itemsize, default=None)


def _row_view(cache: InferenceCache, lo: int, hi: int) -> InferenceCache:
    """Rows [lo, hi) of a cache of per-row Mamba-1 states: views, so that in-place updates reach ``cache``."""
    layers = [ConvSSMCache(conv_state=layer.conv_state[lo:hi], ssm_state=layer.ssm_state[lo:hi])
              for layer in cache.layers]
    return InferenceCache(layers=layers, batch_size=hi - lo, max_seqlen=cache.max_seqlen,
                          seqlen_offset=cache.seqlen_offset)


_SIDE_STREAMS: dict[torch.device, list[torch.cuda.Stream]] = {}


def _concurrently(fns: list[Callable[[], torch.Tensor]], device: torch.device) -> list[torch.Tensor]:
    """Run ``fns`` (each enqueueing GPU work and returning one tensor) concurrently: the first on the
    current stream, the others on side streams that fork from it and join it again (inside a graph
    capture, parallel branches of the graph). Elsewhere than on CUDA, one after another."""
    if device.type != "cuda":
        return [fn() for fn in fns]
    main = torch.cuda.current_stream(device)
    sides = _SIDE_STREAMS.setdefault(device, [])
    while len(sides) < len(fns) - 1:
        sides.append(torch.cuda.Stream(device=device))
    results = [None] * len(fns)
    for index, side in enumerate(sides[: len(fns) - 1], start=1):
        side.wait_stream(main)
        with torch.cuda.stream(side):
            results[index] = fns[index]()
    results[0] = fns[0]()
    for index, side in enumerate(sides[: len(fns) - 1], start=1):
        main.wait_stream(side)
        results[index].record_stream(main)  # made on the side stream, read on this one
    return results


def _pick(logits: torch.Tensor, greedy_out: torch.Tensor | None) -> torch.Tensor:
    """logits, after writing their argmax into greedy_out (when given)."""
    if greedy_out is not None:
        torch.argmax(logits, dim=-1, out=greedy_out)
    return logits


def _add_and_norm(norm: RMSNorm, out: torch.Tensor | None, residual: torch.Tensor | None,
                  partials: tuple[torch.Tensor, torch.dtype] | None,
                  stream_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's pre-norm in :func:`decode_step`: the stream is ``residual`` [B, 1, D] plus the previous
    block's output, given as ``out`` [B, 1, D], as split-K ``partials`` ([S, B, D] and the dtype their sum
    rounds to), or already in the stream (both None). Returns (norm(stream) [B, 1, D], the stream
    [B, 1, D]), the add and the norm in one kernel."""
    if partials is not None:
        h, residual = add_norm_partials(partials[0], None if residual is None else residual[:, 0], norm.weight,
                                        norm.eps, partials[1], stream_dtype)
        return h[:, None], residual[:, None]
    if out is None:
        return rms_norm(residual, norm.weight, norm.eps), residual
    # residual <- residual + out (the previous block's output), h <- norm(residual).
    return rms_norm(out, norm.weight, norm.eps, residual=residual, residual_out_dtype=stream_dtype)


# --------------------------------------------------------------------------------------------------
# One captured step
# --------------------------------------------------------------------------------------------------

def allocate_decode_cache(model: nn.Module, batch_size: int, max_seqlen: int, device: torch.device,
                          ssm_state_dtype: torch.dtype | None = None) -> InferenceCache:
    """``model.allocate_cache`` on ``device``, passing ``ssm_state_dtype`` only when one is asked for (not
    every model's allocate_cache takes it: generate checks that first)."""
    if ssm_state_dtype is None:
        return model.allocate_cache(batch_size, max_seqlen, device=device)
    return model.allocate_cache(batch_size, max_seqlen, device=device, ssm_state_dtype=ssm_state_dtype)


class CUDAGraphRunner:
    """A decoding step for one batch size and cache shape: static cache, input ids and logits, and the
    CUDA graph that runs :func:`decode_step` on them (or, with ``capture=False``, the same step run
    eagerly on the same buffers).

    Use: :meth:`begin` (clears the cache), a prefill with ``model(..., cache=runner.cache)``, then
    :meth:`step` per token. The host counters of the cache are kept right after every step.
    """

    def __init__(self, model: nn.Module, batch_size: int, max_seqlen: int, capture: bool,
                 warmup_steps: int = 2, ssm_state_dtype: torch.dtype | None = None) -> None:
        device = next(model.parameters()).device
        if capture and device.type != "cuda":
            raise ValueError(f"a CUDA graph needs the model on a CUDA device, it is on {device}")
        self._model = weakref.ref(model)
        self.batch_size = batch_size
        # Ordinary tensors even when called under torch.inference_mode: the cache is updated in place
        # by later calls, which inference tensors would refuse outside that mode.
        with torch.inference_mode(False):
            self.cache = allocate_decode_cache(model, batch_size, max_seqlen, device, ssm_state_dtype)
            self.input_ids = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture = capture
        # Prompt length -> (static ids [B, L], last-position logits [B, V], graph or None without capture).
        self.prefills: OrderedDict[int, tuple[torch.Tensor, torch.Tensor, torch.cuda.CUDAGraph | None]] = OrderedDict()
        self._prompt_lengths_seen: set[int] = set()
        self._prefill_unsafe = prefill_graph_unsafe_reason(model)
        self._counted = [layer for layer in self.cache.layers
                         if layer is not None and isinstance(getattr(layer, "length", None), int)]
        if capture:
            with torch.inference_mode(False):
                self._capture(model, warmup_steps)

    @torch.no_grad()
    def _capture(self, model: nn.Module, warmup_steps: int) -> None:
        device = self.input_ids.device
        # Warm-up on a side stream (the PyTorch recipe): compiles the Triton kernels for these shapes,
        # initializes cuBLAS, computes the memoized constants, all outside the capture.
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(max(1, warmup_steps)):
                self.cache.reset()  # each warm-up step writes slot 0: no overflow whatever max_seqlen
                decode_step(model, self.input_ids, self.cache, greedy_out=self.input_ids)
            self.input_ids.zero_()
        torch.cuda.current_stream(device).wait_stream(side)
        self.cache.reset()
        graph = torch.cuda.CUDAGraph()
        # Capture records the kernels without running them; the logits tensor lives in the graph's
        # private memory pool and is rewritten by every replay.
        with torch.cuda.graph(graph):
            # The greedy pick becomes the next input: greedy decoding feeds nothing from the host.
            self.logits = decode_step(model, self.input_ids, self.cache, greedy_out=self.input_ids)
        self.graph = graph
        self.cache.reset()  # the host counters moved during capture

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def begin(self, max_seqlen: int) -> InferenceCache:
        """Clear the cache for a new sequence of up to ``max_seqlen`` tokens; returns it."""
        self.cache.reset()
        # Equal cache shapes (the decoder's key) mean the tensors fit this length too (a Mamba-only
        # cache has none that depends on it).
        self.cache.max_seqlen = max_seqlen
        return self.cache

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed the prompts ids int64 [B, L] (no padding) into the cleared cache; returns the last position's
        logits float32 [B, vocab_size]. From the second prompt of a length on, a captured graph of the
        forward (see the module docstring); the first runs eagerly, so a one-off length costs no capture.
        The result may be a static buffer, overwritten by the next prefill of that length."""
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this CUDAGraphRunner was garbage collected")
        if self.cache.seqlen_offset != 0:
            raise ValueError("prefill() starts from a cleared cache (begin()); this one holds "
                             f"{self.cache.seqlen_offset} tokens")
        length = ids.shape[1]
        entry = self.prefills.get(length)
        if entry is None:
            eligible = (self._prefill_unsafe is None and ids.shape[0] == self.batch_size
                        and self.batch_size * length <= PREFILL_GRAPH_MAX_TOKENS)
            if not eligible or length not in self._prompt_lengths_seen:
                if len(self._prompt_lengths_seen) >= 4096:  # a long-running server's one-off lengths
                    self._prompt_lengths_seen.clear()
                self._prompt_lengths_seen.add(length)
                return model(ids, cache=self.cache, num_last_tokens=1).logits[:, -1]
            while len(self.prefills) >= PREFILL_GRAPHS:
                self.prefills.popitem(last=False)
            with torch.inference_mode(False):
                entry = self.prefills[length] = self._capture_prefill(model, ids)
        self.prefills.move_to_end(length)
        static_ids, logits, graph = entry
        static_ids.copy_(ids)
        if graph is None:  # capture=False: the same static-buffer forward, eagerly
            logits.copy_(model(static_ids, cache=self.cache, num_last_tokens=1).logits[:, -1])
        else:
            graph.replay()
            self.cache.set_seqlen(length)  # a replay moves the device state only
        return logits

    # Its caller enters torch.inference_mode(False), which turns grad mode back on: without no_grad the
    # captured forward recorded autograd and saved its activations for a backward (the scan's checkpoints
    # too), 32 GB for a 64 x 512 prompt of mamba1-130m on an H100 against ~1 GB, and replayed slower.
    @torch.no_grad()
    def _capture_prefill(self, model: nn.Module, ids: torch.Tensor) -> tuple:
        static_ids = ids.detach().clone()
        if not self.capture:
            return static_ids, torch.empty(ids.shape[0], model.config.vocab_size, device=ids.device), None
        device = static_ids.device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # compiles the kernels for this length, outside the capture
            model(static_ids, cache=self.cache, num_last_tokens=1)
        torch.cuda.current_stream(device).wait_stream(side)
        self.cache.reset()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = model(static_ids, cache=self.cache, num_last_tokens=1).logits[:, -1]
        self.cache.reset()  # the capture ran no kernel, but the forward moved the host counters
        return static_ids, logits, graph

    @property
    def greedy_token(self) -> torch.Tensor:
        """int64 [B]: the argmax of the last step's logits (a static buffer: the next step's input unless
        a token is fed; read or copy it before calling :meth:`step` again)."""
        return self.input_ids

    @torch.no_grad()
    def step(self, token: torch.Tensor | None) -> torch.Tensor:
        """Feed token int64 [B], or None to feed :attr:`greedy_token` (the argmax of the previous step's
        logits: greedy decoding); returns the next logits float32 [B, vocab_size] (a static buffer,
        overwritten by the next step: read or copy it before calling again)."""
        seen = self.cache.seqlen_offset
        if seen >= self.cache.max_seqlen:
            # Checked on the host: past the buffers, a replay would write out of bounds.
            raise ValueError(f"the decoding cache is full ({seen} of max_seqlen={self.cache.max_seqlen} "
                             "tokens); allocate a longer one")
        if token is not None:
            self.input_ids.copy_(token)
        if self.graph is not None:
            self.graph.replay()
        else:
            model = self._model()
            if model is None:
                raise RuntimeError("the model of this CUDAGraphRunner was garbage collected")
            self.logits = decode_step(model, self.input_ids, self.cache, greedy_out=self.input_ids)
        # A replay advances the device counters only; the host counters follow here.
        self.cache.seqlen_offset = seen + 1
        for layer in self._counted:
            layer.length = seen + 1
        return self.logits


# --------------------------------------------------------------------------------------------------
# The runners of one model
# --------------------------------------------------------------------------------------------------

def _weights_key(model: nn.Module) -> tuple:
    return tuple((t.data_ptr(), t._version, t.dtype, t.device)
                 for t in list(model.parameters()) + list(model.buffers()))


class CUDAGraphDecoder:
    """Captured decoding steps of one model, keyed by (batch size, cache shapes); see the module docstring.

    capture: True captures CUDA graphs (the model must be on CUDA), False runs the same static-buffer
        step eagerly (CPU tests, debugging), None (default) captures on CUDA only.
    max_graphs: runners kept at once (each holds a cache); the least recently used goes first.
    length_bucket: caches are allocated to a multiple of this many positions (1: exactly the length asked).
    """

    def __init__(self, model: nn.Module, max_graphs: int = 2, capture: bool | None = None,
                 warmup_steps: int = 2, length_bucket: int = LENGTH_BUCKET) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        if length_bucket < 1:
            raise ValueError(f"length_bucket must be >= 1, got {length_bucket}")
        reason = graph_unsafe_reason(model)
        if reason is not None:
            raise ValueError(reason)
        self._model = weakref.ref(model)
        self.max_graphs = max_graphs
        self.capture = capture
        self.warmup_steps = warmup_steps
        self.length_bucket = length_bucket
        self._shape_keys: dict[tuple[int, int], tuple[int, tuple]] = {}
        self.runners: OrderedDict[tuple, CUDAGraphRunner] = OrderedDict()
        self._weights: tuple | None = None
        self.captures = 0  # how many runners were built (tests and benchmarks read it)

    @property
    def model(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this CUDAGraphDecoder was garbage collected")
        return model

    def clear(self) -> None:
        """Drop every runner (their graphs, caches and memory pools)."""
        self.runners.clear()
        self._shape_keys.clear()

    def runner(self, batch_size: int, max_seqlen: int, ssm_state_dtype: torch.dtype | None = None) -> CUDAGraphRunner:
        """The runner for this batch size and a cache of ``max_seqlen`` (captured on first use), with its
        cache cleared (:meth:`CUDAGraphRunner.begin`). ssm_state_dtype: the Mamba layers' state dtype
        (``CausalLM.allocate_cache``; None: float32)."""
        model = self.model
        weights = _weights_key(model)
        if weights != self._weights:  # new weights: derived constants baked into the graphs are stale
            self.clear()
            self._weights = weights
        device = next(model.parameters()).device
        capture = device.type == "cuda" if self.capture is None else self.capture
        length, shapes = self._cache_length(model, batch_size, max_seqlen)
        key = (batch_size, shapes, capture, ssm_state_dtype)
        runner = self.runners.pop(key, None)
        if runner is None:
            while len(self.runners) >= self.max_graphs:
                self.runners.popitem(last=False)  # frees its cache before the new one is allocated
            runner = CUDAGraphRunner(model, batch_size, length, capture, self.warmup_steps, ssm_state_dtype)
            self.captures += 1
        self.runners[key] = runner
        runner.begin(max_seqlen)
        return runner

    def _cache_length(self, model: nn.Module, batch_size: int, max_seqlen: int) -> tuple[int, tuple]:
        known = self._shape_keys.get((batch_size, max_seqlen))
        if known is None:
            known = bucketed_cache_length(model, batch_size, max_seqlen, self.length_bucket)
            if len(self._shape_keys) > 256:
                self._shape_keys.clear()
            self._shape_keys[(batch_size, max_seqlen)] = known
        return known


def bucketed_cache_length(model: nn.Module, batch_size: int, max_seqlen: int,
                          bucket: int = LENGTH_BUCKET) -> tuple[int, tuple]:
    """The cache length to allocate for ``max_seqlen`` tokens and the cache's shape key.

    The length is ``max_seqlen`` rounded up to a multiple of ``bucket`` (exact where the model refuses
    the rounded one, e.g. past a Hyena filter's length); the key comes from a meta-device allocation (no
    memory). Eager decoding allocates the same length as the graph decoder, so that both attend over
    equal buffers and add in the same order: their tokens are bitwise equal.
    """
    bucketed = -(-max_seqlen // bucket) * bucket
    if bucketed != max_seqlen:
        try:
            return bucketed, model.allocate_cache(batch_size, bucketed, device="meta").shape_key()
        except ValueError:
            pass
    return max_seqlen, model.allocate_cache(batch_size, max_seqlen, device="meta").shape_key()


_DECODERS: weakref.WeakKeyDictionary[nn.Module, CUDAGraphDecoder] = weakref.WeakKeyDictionary()


def graph_decoder(model: nn.Module) -> CUDAGraphDecoder:
    """The model's :class:`CUDAGraphDecoder`, created on first use and kept as long as the model lives."""
    decoder = _DECODERS.get(model)
    if decoder is None:
        decoder = _DECODERS[model] = CUDAGraphDecoder(model)
    return decoder
