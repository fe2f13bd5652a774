"""Bidirectional and reverse-complement-equivariant wrappers around causal backbones.

A causal :class:`~core.backbone.Backbone` f sees only the past. Two ways to see both sides, each keeping
the per-position features [B, L, d_model]:

- :class:`BidirectionalBackbone`: ``y = f(x) + flip(g(flip(x)))`` with g a second backbone (or f itself,
  ``share=True``): position t gets f's summary of x[..t] and g's of x[t..].
- :class:`RCEquivariantBackbone` (DNA; Caduceus-style parameter sharing): ``y = f(x) + flip(f(rc(x)))``
  with ``rc(x) = rc_map[x].flip(-1)`` the reverse complement in token space. One set of weights reads
  both strands, and the features are RC-equivariant by construction:

      y(rc(x)) = f(rc(x)) + flip(f(x)) = flip(y(x))

  so any position-symmetric pooling (mean) of y is RC-invariant, exactly. Caduceus gets equivariance
  by splitting channels inside every layer (BiMamba + RCPS); this wrapper gets it for any block type
  (Mamba, attention, Hyena) at the cost of two passes, and is also bidirectional: flip(f(rc(x)))
  at t summarises x[t..] read on the other strand.

Both return, besides y, the per-direction last-position summaries (``summary``): f(x)[:, -1] and the
other pass's last position, whose sum is what a "last" pooling uses (invariant too: swapping strands
swaps the two terms).
"""

from __future__ import annotations

import torch
from torch import nn

from core.backbone import Backbone
from core.config import ModelConfig


def reverse_complement(input_ids: torch.Tensor, rc_map: torch.Tensor) -> torch.Tensor:
    """input_ids int64 [B, L] -> the reverse complement [B, L]: ``rc_map[input_ids].flip(-1)``.

    rc_map: int64 [vocab]: each token's complement (an involution: rc_map[rc_map] == identity).
    """
    return rc_map[input_ids].flip(-1)


def check_rc_map(rc_map: torch.Tensor, vocab_size: int) -> torch.Tensor:
    rc_map = torch.as_tensor(rc_map, dtype=torch.int64)
    if rc_map.shape != (vocab_size,):
        raise ValueError(f"rc_map must be int64 [vocab_size={vocab_size}], got shape {tuple(rc_map.shape)}")
    if not torch.equal(rc_map[rc_map], torch.arange(vocab_size)):
        raise ValueError("rc_map must be an involution (the complement of the complement is the token itself)")
    return rc_map


class BidirectionalBackbone(nn.Module):
    """``y = f(x) + flip(g(flip(x)))``; ``forward(input_ids [B, L]) -> (y [B, L, d], summary [B, d], aux)``.

    ``backbone`` is f (named like :class:`CausalLM`'s ``backbone`` so pretrained weights load
    by name); ``backward_backbone`` is g, or absent when ``share``.
    """

    def __init__(self, config: ModelConfig, share: bool = False, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.share = share
        self.backbone = Backbone(config, device=device, dtype=dtype)
        self.backward_backbone = None if share else Backbone(config, device=device, dtype=dtype)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        g = self.backbone if self.backward_backbone is None else self.backward_backbone
        h_f, aux_f = self.backbone(input_ids)
        h_b, aux_b = g(input_ids.flip(-1))
        aux = {k: aux_f.get(k, 0) + aux_b.get(k, 0) for k in set(aux_f) | set(aux_b)}
        return h_f + h_b.flip(1), h_f[:, -1] + h_b[:, -1], aux


class RCEquivariantBackbone(nn.Module):
    """``y = f(x) + flip(f(rc(x)))``: RC-equivariant features from one backbone (see the module docstring).

    forward(input_ids [B, L]) -> (y [B, L, d] with y(rc(x)) == flip(y(x)), summary [B, d] RC-invariant, aux).
    """

    def __init__(self, config: ModelConfig, rc_map: torch.Tensor, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.backbone = Backbone(config, device=device, dtype=dtype)
        self.register_buffer("rc_map", check_rc_map(rc_map, config.vocab_size), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        # One batched pass over both strands: the same weights, twice the batch.
        both = torch.cat([input_ids, reverse_complement(input_ids, self.rc_map)], dim=0)
        h, aux = self.backbone(both)
        h_f, h_r = h.chunk(2, dim=0)
        return h_f + h_r.flip(1), h_f[:, -1] + h_r[:, -1], aux
