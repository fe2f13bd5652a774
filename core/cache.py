"""Inference caches: what each mixer carries from one token to the next.

One :class:`InferenceCache` holds a per-layer cache for every block (``None`` for blocks without
state, MLP and MoE). Each mixer allocates its own (``mixer.allocate_cache``) and reads and updates it in
its ``forward``: a forward with a cache continues from the cached state and leaves the state after the
given tokens in it, so a prefill over the prompt and then one-token steps reproduce a forward over the
whole sequence.

CUDA graphs. A captured decoding step replays the same kernels on the same memory, so everything that
changes from one token to the next must be *device* data that the kernels read, never a Python number
baked into the launch: the recurrent states (updated in place), and for the caches that grow with the
sequence the write index and the per-row positions (``KVCache.counters``, ``HyenaCache.index``, int64
tensors that the one-token step reads and increments in place). The Python ints (``length``,
``InferenceCache.seqlen_offset``) are host-side bookkeeping for prefills and bound checks; a graph
replay does not advance them, so whoever replays a graph sets them afterwards
(:meth:`InferenceCache.set_seqlen`). Every cache can be cleared in place (:meth:`InferenceCache.reset`)
so that a captured graph's cache serves one generation after another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn

from kernels.mamba_decode.reference import STATE_DTYPES

T = TypeVar("T")

# The state dtypes a cache may hold: the ones the decoding-step kernels take (float32, bfloat16, float16).
SSM_STATE_DTYPES = STATE_DTYPES


def ssm_state_dtype_for(cache_dtype: torch.dtype, ssm_state_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of a Mamba layer's recurrent state: float32 by default (float64 for a float64 cache, so
    that a float64 decode loses nothing), or ``ssm_state_dtype`` (float32 / bfloat16 / float16). In 16
    bits the state is updated in float32 and rounded once a token, as mamba_ssm keeps it in the model
    dtype: half the state memory and traffic, at the price of that rounding."""
    if ssm_state_dtype is None:
        return torch.float64 if cache_dtype == torch.float64 else torch.float32
    if ssm_state_dtype not in SSM_STATE_DTYPES:
        raise ValueError(f"ssm_state_dtype must be one of {[str(d).removeprefix('torch.') for d in SSM_STATE_DTYPES]} "
                         f"(or None: float32), got {ssm_state_dtype}")
    return ssm_state_dtype


@dataclass
class ConvSSMCache:
    """Mamba-1 / Mamba-2 state.

    conv_state: [B, conv_dim, d_conv - 1], the last inputs of the short convolution (model dtype).
    ssm_state:  Mamba-1 [B, d_inner, d_state]; Mamba-2 [B, nheads, headdim, d_state]; float32 unless
                allocated with another ``ssm_state_dtype`` (:func:`ssm_state_dtype_for`).
    """

    conv_state: torch.Tensor
    ssm_state: torch.Tensor

    def reset(self) -> None:
        self.conv_state.zero_()
        self.ssm_state.zero_()


@dataclass
class KVCache:
    """Attention keys and values, preallocated to ``max_seqlen``.

    key, value: [B, n_kv_heads, max_seqlen, head_dim] (model dtype).
    valid:      bool [B, max_seqlen]: which filled positions are real tokens (False for left padding and
                for positions not written yet).
    counters:   int64 [B + 1] on the cache's device: ``counters[:B]`` the rotary position of each row's
                next token (its real tokens so far), ``counters[B]`` the next slot to write (= length).
                The one-token step reads and increments them in place (CUDA-graph safe).
    length:     how many positions are filled (host-side copy of ``counters[B]``).
    has_padding: whether any prefill wrote pad positions (host side; without pads a chunked prefill can
                use the fused lower-right causal attention instead of a materialized mask).
    """

    key: torch.Tensor
    value: torch.Tensor
    valid: torch.Tensor
    length: int = 0
    counters: torch.Tensor | None = None
    has_padding: bool = False

    def __post_init__(self) -> None:
        if self.counters is None:
            self.counters = torch.zeros(self.key.shape[0] + 1, dtype=torch.long, device=self.key.device)
            self.counters[-1] = self.length

    @property
    def positions(self) -> torch.Tensor:
        """int64 [B]: the rotary position of each row's next token (a view of ``counters``)."""
        return self.counters[:-1]

    @property
    def fill(self) -> torch.Tensor:
        """int64 [1]: the slot the next token is written to (a view of ``counters``)."""
        return self.counters[-1:]

    def reset(self) -> None:
        # The buffers are zeroed too, not only the mask: a masked slot holding a stale inf / NaN would
        # still turn 0 * v into NaN in the attention's weighted sum.
        self.key.zero_()
        self.value.zero_()
        self.valid.zero_()
        self.counters.zero_()
        self.length = 0
        self.has_padding = False


@dataclass
class HyenaCache:
    """Hyena's state: the short-conv inputs and the history of every long-convolution input.

    short_state: [B, (order + 1) * d_model, short_filter_order - 1].
    history:     one [B, d_model, max_seqlen] buffer per long convolution (``order - 1`` of them).
    length:      how many positions are filled (host side).
    index:       int64 [1] on the cache's device: the next position to write (the device copy of
                 ``length`` that the one-token step reads and increments).
    """

    short_state: torch.Tensor
    history: list[torch.Tensor]
    length: int = 0
    index: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.index is None:
            self.index = torch.full((1,), self.length, dtype=torch.long, device=self.short_state.device)

    def reset(self) -> None:
        self.short_state.zero_()
        for buffer in self.history:
            buffer.zero_()
        self.index.zero_()
        self.length = 0


LayerCache = ConvSSMCache | KVCache | HyenaCache


def _layer_tensors(layer: object) -> Iterable[torch.Tensor]:
    for value in vars(layer).values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, torch.Tensor):
                yield item


@dataclass
class InferenceCache:
    """The whole model's cache: one entry a block, and how many tokens it has seen."""

    layers: list[LayerCache | None]
    batch_size: int
    max_seqlen: int
    seqlen_offset: int = 0
    extra: dict = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes held by every tensor of the cache (its memory footprint)."""
        return sum(t.numel() * t.element_size() for layer in self.layers if layer is not None
                   for t in _layer_tensors(layer))

    def reset(self) -> None:
        """Clear every layer in place (states, buffers and counters to zero): the cache is as allocated,
        and every tensor keeps its storage (what a captured CUDA graph points at)."""
        # A layer cache's state is its tensors plus its host-side ``length`` / ``has_padding``: what each
        # layer class's own reset() clears. Here one multi-tensor zeroing does the whole cache (a
        # 24-layer model has ~70 tensors: one kernel launch and ~20 us of host time each otherwise).
        tensors = [t for layer in self.layers if layer is not None for t in _layer_tensors(layer)]
        if tensors:
            torch._foreach_zero_(tensors)
        for layer in self.layers:
            if isinstance(getattr(layer, "length", None), int):
                layer.length = 0
            if getattr(layer, "has_padding", False):
                layer.has_padding = False
        self.seqlen_offset = 0

    def set_seqlen(self, seqlen: int) -> None:
        """Set the host-side token counts (``seqlen_offset`` and every layer's ``length``) to ``seqlen``.

        For a decoder that advanced the cache through CUDA-graph replays: the device counters moved, the
        Python ints did not. Every layer has seen every token, so one number sets them all.
        """
        if not 0 <= seqlen <= self.max_seqlen:
            raise ValueError(f"set_seqlen({seqlen}) is outside [0, max_seqlen={self.max_seqlen}]")
        self.seqlen_offset = seqlen
        for layer in self.layers:
            if layer is not None and isinstance(getattr(layer, "length", None), int):
                layer.length = seqlen

    def shape_key(self) -> tuple:
        """The type, shape and dtype of every tensor, layer by layer: what a captured decoding step
        depends on (two caches with equal keys can share a CUDA graph's launch configuration)."""
        return tuple(
            None if layer is None else
            (type(layer).__name__, tuple((tuple(t.shape), t.dtype) for t in _layer_tensors(layer)))
            for layer in self.layers
        )


# --------------------------------------------------------------------------------------------------
# Derived decoding constants
# --------------------------------------------------------------------------------------------------

def decode_memo(module: nn.Module, name: str, sources: Iterable[torch.Tensor], compute: Callable[[], T],
                extra: tuple = ()) -> T:
    """A value derived from parameters (e.g. ``A = -exp(A_log)``, concatenated q/k/v weights), computed
    once and reused until one of ``sources`` changes (its storage, version counter, dtype or device) or
    ``extra`` (other things it depends on, e.g. a length) differs. One entry per ``name`` and module.

    For inference only (computed without autograd: the result carries no graph). A decoding step
    captured in a CUDA graph then reads the stored tensor instead of recomputing it every token; the
    graph decoder re-captures when a parameter changes (``core.cuda_graph``), so no graph keeps a stale
    copy.
    """
    key = (extra,) + tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
    memo = module.__dict__.setdefault("_decode_memo", {})
    hit = memo.get(name)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = (key, compute())
        memo[name] = hit
    return hit[1]
