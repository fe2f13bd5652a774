"""Feed-forward mixer: SwiGLU (Llama, Transformer++) or GELU (GPT-style baselines).

    SwiGLU: y = down_proj(silu(gate_proj(x)) * up_proj(x))
    GELU:   y = down_proj(gelu(up_proj(x)))

The GELU is the exact (erf) form, ``torch.nn.functional.gelu(x)``. GPT-2 uses the tanh approximation;
the two differ by at most about 1e-3 per activation, so a GPT-2 checkpoint loaded here gives slightly
different (not wrong) outputs. We pick the exact form because it is the definition and the default of
every framework, and it costs the same.

The hidden-size rule lives in :func:`mlp_hidden_size`, shared with the MoE experts and the parameter /
FLOP accounting, so the three never disagree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.config import MLPConfig, MoEConfig

ACTIVATIONS = ("swiglu", "gelu")


def check_activation(activation: str) -> None:
    """Raise a clear error for an activation the MLP / MoE does not implement."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown MLP activation {activation!r}; choose one of {ACTIVATIONS}")


def mlp_hidden_size(d_model: int, config: MLPConfig | MoEConfig) -> int:
    """The hidden width of an MLP (or of one MoE expert) of width ``d_model``.

    ``config.hidden_size`` when it is set; else 8/3 * d_model for SwiGLU (Llama's rule, which keeps the
    parameter count of a 4 * d_model GELU MLP with three matrices instead of two) or 4 * d_model for
    GELU, rounded up to a multiple of ``config.multiple_of`` (kernels and tensor-parallel splits like
    round widths).
    """
    check_activation(config.activation)
    if config.hidden_size is not None:
        if config.hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {config.hidden_size}")
        return config.hidden_size
    if config.multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {config.multiple_of}")
    hidden = int(8 * d_model / 3) if config.activation == "swiglu" else 4 * d_model
    multiple = config.multiple_of
    return multiple * ((hidden + multiple - 1) // multiple)


class MLP(nn.Module):
    """SwiGLU or GELU feed-forward block (see the module docstring).

    x [B, L, d_model] of any float dtype -> y [B, L, d_model] of the same dtype. Stateless: it keeps no
    cache and ignores ``cache`` and ``padding_mask`` (every position is computed on its own).
    """

    def __init__(
        self,
        d_model: int,
        config: MLPConfig,
        layer_idx: int = 0,
        norm_eps: float = 1e-5,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.layer_idx = layer_idx
        self.activation = config.activation
        self.hidden_size = mlp_hidden_size(d_model, config)
        if self.activation == "swiglu":
            self.gate_proj = nn.Linear(d_model, self.hidden_size, bias=config.bias, **factory)
        self.up_proj = nn.Linear(d_model, self.hidden_size, bias=config.bias, **factory)
        self.down_proj = nn.Linear(self.hidden_size, d_model, bias=config.bias, **factory)

    def forward(
        self, x: torch.Tensor, cache: None = None, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"MLP expects x [..., {self.d_model}], got {tuple(x.shape)}")
        if self.activation == "swiglu":
            hidden = F.silu(self.gate_proj(x)) * self.up_proj(x)
        else:
            hidden = F.gelu(self.up_proj(x))
        return self.down_proj(hidden)

    def allocate_cache(
        self, batch_size: int, max_seqlen: int, device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        return None

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, hidden_size={self.hidden_size}, activation={self.activation}"
