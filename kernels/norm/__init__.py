"""RMSNorm, plain and gated; the public function picks a backend through :mod:`kernels.dispatch`."""

from __future__ import annotations

import torch

from kernels.dispatch import choose_backend
from kernels.norm.reference import rms_norm_reference

__all__ = ["rms_norm"]

_FORWARD = {"reference": rms_norm_reference}


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    z: torch.Tensor | None = None,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """(Gated) RMSNorm over the last dimension of x [..., D]; see ``reference.py``."""
    if weight.shape[-1] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight has {weight.shape[-1]} features, x has {x.shape[-1]}")
    backend = choose_backend("rms_norm", tuple(_FORWARD), x.device)
    return _FORWARD[backend](x, weight, eps, z, group_size, norm_before_gate)
