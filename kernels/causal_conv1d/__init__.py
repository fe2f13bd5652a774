"""Causal depthwise conv1d (the short convolution of Mamba and Hyena) and its one-token step.

The public functions pick a backend through :mod:`kernels.dispatch`; ``reference.py`` defines the
semantics and documents shapes and dtypes.
"""

from __future__ import annotations

import torch

from kernels.causal_conv1d.reference import causal_conv1d_reference, causal_conv1d_step_reference
from kernels.dispatch import choose_backend

__all__ = ["causal_conv1d", "causal_conv1d_step"]

_FORWARD = {"reference": causal_conv1d_reference}
_STEP = {"reference": causal_conv1d_step_reference}

try:  # The Triton kernels need triton importable (a GPU, or TRITON_INTERPRET=1 on CPU).
    from kernels.causal_conv1d.triton import causal_conv1d_step_triton, causal_conv1d_triton
except ImportError:  # pragma: no cover - machines without triton keep the reference backend
    pass
else:
    _FORWARD["triton"] = causal_conv1d_triton
    _STEP["triton"] = causal_conv1d_step_triton


def _check(x: torch.Tensor, weight: torch.Tensor, initial_state: torch.Tensor | None) -> None:
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d expects x of shape [B, D, L], got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(
            f"causal_conv1d expects weight [D, W] with D={x.shape[1]}, got {tuple(weight.shape)}"
        )
    if initial_state is not None and tuple(initial_state.shape[1:]) != (x.shape[1], weight.shape[1] - 1):
        raise ValueError(
            f"initial_state must be [B, {x.shape[1]}, {weight.shape[1] - 1}], got {tuple(initial_state.shape)}"
        )


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv1d over x [B, D, L] with weight [D, W]; see ``reference.py``."""
    _check(x, weight, initial_state)
    backend = choose_backend("causal_conv1d", tuple(_FORWARD), x.device)
    return _FORWARD[backend](x, weight, bias, activation, initial_state, return_final_state, cu_seqlens)


def causal_conv1d_step(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """One token: x [B, D], conv_state [B, D, W-1] updated in place; returns y [B, D]."""
    backend = choose_backend("causal_conv1d_step", tuple(_STEP), x.device)
    return _STEP[backend](x, conv_state, weight, bias, activation)
