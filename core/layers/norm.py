"""RMSNorm, plain and gated (Mamba-2's norm before out_proj), as modules over ``kernels.norm``."""

from __future__ import annotations

import torch
from torch import nn

from kernels.norm import rms_norm


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight over the last dimension. x [..., dim], any float dtype; y like x."""

    def __init__(self, dim: int, eps: float = 1e-5, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GatedRMSNorm(nn.Module):
    """Gated RMSNorm: ``rms(x * silu(z)) * weight`` (or ``rms(x) * weight * silu(z)`` with
    ``norm_before_gate``), normalized over groups of ``group_size`` features.

    x, z [..., dim]; y like x.
    """

    def __init__(self, dim: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = False, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        group_size = dim if group_size is None else group_size
        if dim % group_size != 0:
            raise ValueError(f"GatedRMSNorm: group_size {group_size} must divide dim {dim}")
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, z=z, group_size=self.group_size,
                        norm_before_gate=self.norm_before_gate)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[0]}, eps={self.eps}, group_size={self.group_size}, "
                f"norm_before_gate={self.norm_before_gate}")
