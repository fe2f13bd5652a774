"""Inference caches: what each mixer carries from one token to the next.

One :class:`InferenceCache` holds a per-layer cache for every block (``None`` for blocks without
state, MLP and MoE). Each mixer allocates its own (``mixer.allocate_cache``) and reads and updates it in
its ``forward``: a forward with a cache continues from the cached state and leaves the state after the
given tokens in it, so a prefill over the prompt and then one-token steps reproduce a forward over the
whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ConvSSMCache:
    """Mamba-1 / Mamba-2 state.

    conv_state: [B, conv_dim, d_conv - 1], the last inputs of the short convolution (model dtype).
    ssm_state:  Mamba-1 [B, d_inner, d_state]; Mamba-2 [B, nheads, headdim, d_state]; float32.
    """

    conv_state: torch.Tensor
    ssm_state: torch.Tensor


@dataclass
class KVCache:
    """Attention keys and values, preallocated to ``max_seqlen``.

    key, value: [B, n_kv_heads, max_seqlen, head_dim] (model dtype).
    valid:      bool [B, max_seqlen]: which filled positions are real tokens (False for left padding).
    length:     how many positions are filled.
    """

    key: torch.Tensor
    value: torch.Tensor
    valid: torch.Tensor
    length: int = 0


@dataclass
class HyenaCache:
    """Hyena's state: the short-conv inputs and the history of every long-convolution input.

    short_state: [B, (order + 1) * d_model, short_filter_order - 1].
    history:     one [B, d_model, max_seqlen] buffer per long convolution (``order - 1`` of them).
    length:      how many positions are filled.
    """

    short_state: torch.Tensor
    history: list[torch.Tensor]
    length: int = 0


LayerCache = ConvSSMCache | KVCache | HyenaCache


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
        total = 0
        for layer in self.layers:
            if layer is None:
                continue
            for value in vars(layer).values():
                tensors = value if isinstance(value, list) else [value]
                total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
        return total
