"""RMSNorm and gated RMSNorm: the semantics, in plain PyTorch.

Shapes: x [..., D] (any float dtype); weight [D]; z (the gate) like x or None.
Computation in float32 (float64 for float64 inputs); the output has x's dtype.

- plain:  y = x / sqrt(mean(x^2) + eps) * weight
- gated (Mamba-2), norm_before_gate=False:  y = rms(x * silu(z)) * weight
- gated, norm_before_gate=True:             y = rms(x) * weight * silu(z)
With ``group_size`` < D the mean runs over contiguous groups of the last dimension (Mamba-2 normalizes
each group of heads that shares B and C separately).

Fused residual add (the pre-norm block pattern), when ``residual`` (like x) or ``residual_out_dtype``
is given: ``residual_out = (x + residual)`` computed in float32 and stored in ``residual_out_dtype``
(default: residual's dtype, or x's without a residual; pass torch.float32 to keep the residual
stream in fp32), then ``out`` is the norm above applied to ``residual_out``; returns
``(out, residual_out)``. Gradients reaching residual_out (through the norm and directly) flow to both
x and residual.
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
    residual: torch.Tensor | None = None,
    residual_out_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reference (gated) RMSNorm, optionally after a residual add; see the module docstring."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if residual is not None or residual_out_dtype is not None:
        if residual is not None and residual.shape != x.shape:
            raise ValueError(f"rms_norm: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual_out_dtype is None:
            residual_out_dtype = residual.dtype
        summed = x.to(dtype) if residual is None else x.to(dtype) + residual.to(dtype)
        residual_out = summed.to(residual_out_dtype)
        out = rms_norm_reference(residual_out.to(dtype), weight, eps, z, group_size, norm_before_gate)
        return out.to(x.dtype), residual_out
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
