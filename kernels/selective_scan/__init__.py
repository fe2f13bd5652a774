"""Selective scan (Mamba-1's S6) and its one-token step.

The public functions check shapes and pick a backend through :mod:`kernels.dispatch`:
``reference.py`` defines the semantics and documents shapes and dtypes; ``chunked.py`` is the fast
CPU form (the default on CPU), differentiable; ``triton.py`` holds the GPU kernels (the default on CUDA).
"""

from __future__ import annotations

import torch

from kernels.dispatch import choose_backend
from kernels.selective_scan.chunked import selective_scan_chunked
from kernels.selective_scan.reference import selective_scan_reference, selective_scan_step_reference

__all__ = ["selective_scan", "selective_scan_step"]

_FORWARD = {"reference": selective_scan_reference, "chunked": selective_scan_chunked}
_STEP = {"reference": selective_scan_step_reference}

try:  # the GPU kernels (also on CPU tensors with TRITON_INTERPRET=1); absent without triton
    from kernels.selective_scan.triton import selective_scan_step_triton, selective_scan_triton
except ImportError:
    pass
else:
    _FORWARD["triton"] = selective_scan_triton
    _STEP["triton"] = selective_scan_step_triton


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_bc(name: str, x: torch.Tensor, batch: int, dim: int, dstate: int, tail: tuple[int, ...]) -> int:
    """B or C: [batch, N, *tail] or [batch, G, N, *tail] with G dividing dim; returns G."""
    if x.dim() == 2 + len(tail) and _shape(x) == (batch, dstate, *tail):
        return 1
    if x.dim() == 3 + len(tail) and x.shape[0] == batch and _shape(x)[2:] == (dstate, *tail):
        groups = x.shape[1]
        if groups < 1 or dim % groups != 0:
            raise ValueError(f"selective_scan: {name} has {groups} groups, which must divide D={dim}")
        return groups
    want = ", ".join(str(s) for s in tail)
    want = f", {want}" if want else ""
    raise ValueError(
        f"selective_scan: {name} must be [{batch}, {dstate}{want}] (shared) or [{batch}, G, {dstate}{want}] "
        f"(G groups dividing D={dim}), got {_shape(x)}"
    )


def _check_vector(name: str, x: torch.Tensor | None, dim: int) -> None:
    if x is not None and _shape(x) != (dim,):
        raise ValueError(f"selective_scan: {name} must be [{dim}] (one per channel), got {_shape(x)}")


def _check_groups(gb: int, gc: int) -> None:
    if gb > 1 and gc > 1 and gb != gc:
        raise ValueError(f"selective_scan: B has {gb} groups and C has {gc}; grouped B and C need the same G")


def _check_scan(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens) -> None:
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be [B, D, L], got {_shape(u)}")
    batch, dim, length = u.shape
    if length < 1:
        raise ValueError("selective_scan: the sequence length L must be at least 1")
    if _shape(delta) != _shape(u):
        raise ValueError(f"selective_scan: delta must have u's shape {_shape(u)}, got {_shape(delta)}")
    if z is not None and _shape(z) != _shape(u):
        raise ValueError(f"selective_scan: z must have u's shape {_shape(u)}, got {_shape(z)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be [D={dim}, N], got {_shape(A)}")
    if A.is_complex():
        raise ValueError("selective_scan: complex A is not supported; pass a real [D, N] A")
    dstate = A.shape[1]
    _check_groups(_check_bc("B", B, batch, dim, dstate, (length,)),
                  _check_bc("C", C, batch, dim, dstate, (length,)))
    _check_vector("D", D, dim)
    _check_vector("delta_bias", delta_bias, dim)
    nseq = batch
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"selective_scan: with cu_seqlens, u must hold one packed row (batch 1), got {batch}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError(f"selective_scan: cu_seqlens must be an integer [S+1] tensor, got {_shape(cu_seqlens)}")
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != length or any(b > e for b, e in zip(bounds[:-1], bounds[1:])):
            raise ValueError(
                f"selective_scan: cu_seqlens must rise from 0 to L={length} without decreasing, got {bounds}")
        nseq = len(bounds) - 1
    if initial_state is not None and _shape(initial_state) != (nseq, dim, dstate):
        rows = "S" if cu_seqlens is not None else "B"
        raise ValueError(
            f"selective_scan: initial_state must be [{rows}={nseq}, {dim}, {dstate}], got {_shape(initial_state)}")


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan over u [B, D, L]; see ``reference.py`` for shapes and semantics.

    Returns y [B, D, L] (u's dtype), and with ``return_final_state`` also the final state
    [B or S, D, N] (float32; float64 for float64 inputs).
    """
    _check_scan(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens)
    backend = choose_backend("selective_scan", tuple(_FORWARD), u.device)
    return _FORWARD[backend](u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                             return_final_state, cu_seqlens)


def selective_scan_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> torch.Tensor:
    """One token: state [B, D, N] updated in place; x, dt, z [B, D]; B, C [B, N] or [B, G, N].
    Returns y [B, D] in x's dtype."""
    if x.dim() != 2:
        raise ValueError(f"selective_scan_step: x must be [B, D], got {_shape(x)}")
    batch, dim = x.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan_step: A must be [D={dim}, N], got {_shape(A)}")
    dstate = A.shape[1]
    if _shape(state) != (batch, dim, dstate):
        raise ValueError(f"selective_scan_step: state must be [{batch}, {dim}, {dstate}], got {_shape(state)}")
    for name, t in (("dt", dt), ("z", z)):
        if t is not None and _shape(t) != (batch, dim):
            raise ValueError(f"selective_scan_step: {name} must be [{batch}, {dim}], got {_shape(t)}")
    _check_groups(_check_bc("B", B, batch, dim, dstate, ()), _check_bc("C", C, batch, dim, dstate, ()))
    _check_vector("D", D, dim)
    _check_vector("dt_bias", dt_bias, dim)
    backend = choose_backend("selective_scan_step", tuple(_STEP), x.device)
    return _STEP[backend](state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
