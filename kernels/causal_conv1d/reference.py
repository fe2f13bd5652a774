"""Causal depthwise conv1d: the semantics, in plain PyTorch.

Shapes (``W`` the kernel width, ``S`` the number of packed sequences):
    x            [B, D, L]        any float dtype
    weight       [D, W]
    bias         [D] or None
    initial_state [B, D, W-1] (or [S, D, W-1] with cu_seqlens): the W-1 inputs before x[..., 0]
    cu_seqlens   int [S+1] with B == 1: x holds S sequences packed along L
    returns y [B, D, L] in x's dtype, and the final state [B or S, D, W-1] (float32, or float64
    for float64 inputs) when ``return_final_state``.

The output at position t is ``act(bias + sum_k weight[:, k] * x[:, t - (W-1) + k])``, where positions
before 0 read the initial state (zeros when none is given). The computation runs in float32 (float64
for float64 inputs) whatever the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _apply_activation(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return y
    if activation in ("silu", "swish"):
        return F.silu(y)
    raise ValueError(f"unknown activation {activation!r}; use None or 'silu'")


def _conv_one(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
    initial_state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, dim, _ = x.shape
    width = weight.shape[1]
    dtype = compute_dtype(x.dtype)
    if initial_state is None:
        initial_state = x.new_zeros(batch, dim, width - 1, dtype=dtype)
    padded = torch.cat([initial_state.to(dtype), x.to(dtype)], dim=-1)
    if x.shape[-1] == 0:
        # An empty sequence (a repeated cu_seqlens entry): no output, the state passes through.
        # F.conv1d would refuse an input shorter than the kernel.
        return padded[..., :0], padded
    y = F.conv1d(padded, weight.to(dtype).unsqueeze(1), None if bias is None else bias.to(dtype), groups=dim)
    final_state = padded[..., padded.shape[-1] - (width - 1):]
    return _apply_activation(y, activation), final_state


def causal_conv1d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reference causal depthwise conv1d; see the module docstring for shapes."""
    if cu_seqlens is None:
        y, final_state = _conv_one(x, weight, bias, activation, initial_state)
        y = y.to(x.dtype)
        return (y, final_state) if return_final_state else y
    if x.shape[0] != 1:
        raise ValueError(f"with cu_seqlens, x must hold one packed row (batch 1), got batch {x.shape[0]}")
    outputs, finals = [], []
    bounds = cu_seqlens.tolist()
    for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        state = None if initial_state is None else initial_state[index : index + 1]
        y, final_state = _conv_one(x[..., start:end], weight, bias, activation, state)
        outputs.append(y)
        finals.append(final_state)
    y = torch.cat(outputs, dim=-1).to(x.dtype)
    return (y, torch.cat(finals, dim=0)) if return_final_state else y


def causal_conv1d_step_reference(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """One decoding step. x [B, D]; conv_state [B, D, W-1] is updated in place; returns y [B, D].

    Equal to the last output of :func:`causal_conv1d_reference` over (state, x).
    """
    dtype = compute_dtype(x.dtype)
    window = torch.cat([conv_state.to(dtype), x.to(dtype).unsqueeze(-1)], dim=-1)  # [B, D, W]
    y = (window * weight.to(dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(dtype)
    conv_state.copy_(window[..., 1:])
    return _apply_activation(y, activation).to(x.dtype)
