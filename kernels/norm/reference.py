"""RMSNorm and gated RMSNorm: the semantics, in plain PyTorch.

Shapes: x [..., D] (any float dtype); weight [D]; z (the gate) like x or None.
Computation in float32 (float64 for float64 inputs); the output has x's dtype.

- plain:  y = x / sqrt(mean(x^2) + eps) * weight
- gated (Mamba-2), norm_before_gate=False:  y = rms(x * silu(z)) * weight
- gated, norm_before_gate=True:             y = rms(x) * weight * silu(z)
With ``group_size`` < D the mean runs over contiguous groups of the last dimension (Mamba-2 normalizes
each group of heads that shares B and C separately).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    z: torch.Tensor | None = None,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """Reference (gated) RMSNorm; see the module docstring."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    hidden = x.to(dtype)
    if z is not None and not norm_before_gate:
        hidden = hidden * F.silu(z.to(dtype))
    dim = hidden.shape[-1]
    group_size = dim if group_size is None else group_size
    if dim % group_size != 0:
        raise ValueError(f"rms_norm: group_size {group_size} does not divide the last dimension {dim}")
    grouped = hidden.reshape(*hidden.shape[:-1], dim // group_size, group_size)
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    out = grouped.reshape(hidden.shape) * weight.to(dtype)
    if z is not None and norm_before_gate:
        out = out * F.silu(z.to(dtype))
    return out.to(x.dtype)
