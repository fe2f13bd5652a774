"""RMSNorm, plain and gated; the public function picks a backend through :mod:`kernels.dispatch`."""

from __future__ import annotations

import torch

from kernels.dispatch import choose_backend
from kernels.norm.reference import rms_norm_reference

__all__ = ["rms_norm"]

_FORWARD = {"reference": rms_norm_reference}

try:  # The Triton kernels need triton importable (a GPU, or TRITON_INTERPRET=1 on CPU).
    from kernels.norm.triton import rms_norm_triton
except ImportError:  # pragma: no cover - machines without triton keep the reference backend
    pass
else:
    _FORWARD["triton"] = rms_norm_triton


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    z: torch.Tensor | None = None,
    group_size: int | None = None,
    norm_before_gate: bool = False,
    residual: torch.Tensor | None = None,
    residual_out_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(Gated) RMSNorm over the last dimension of x [..., D]; see ``reference.py``.

    With ``residual`` (like x) or ``residual_out_dtype`` given, first ``residual_out = x + residual``
    (stored in ``residual_out_dtype``, default residual's dtype) and returns ``(rms_norm(residual_out),
    residual_out)``: the fused pre-norm block pattern.
    """
    if weight.shape[-1] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight has {weight.shape[-1]} features, x has {x.shape[-1]}")
    backend = choose_backend("rms_norm", tuple(_FORWARD), x.device)
    if residual is None and residual_out_dtype is None:
        return _FORWARD[backend](x, weight, eps, z, group_size, norm_before_gate)
    return _FORWARD[backend](x, weight, eps, z, group_size, norm_before_gate,
                             residual=residual, residual_out_dtype=residual_out_dtype)
