"""SSD, Mamba-2's scan (mamba_ssm's ``mamba_chunk_scan_combined`` layout), and its one-token step.

The public functions check shapes and pick a backend through :mod:`kernels.dispatch`:
``reference`` (the sequential recurrence, ``reference.py``, which documents the semantics) or
``chunked`` (the SSD block decomposition, ``chunked.py``; the default on CPU) or ``triton`` (the GPU
kernels, ``triton.py``; the default on CUDA). ``reference.py`` also
holds the quadratic (attention-like) form, ``ssd_quadratic``, used by the tests.

The ``triton`` backend has two designs, both verified on an H100 (``scripts/gpu_checks/ssd.py``):
``triton_fused.py`` (fused state walks, lighter backward kernels; the default, faster alone and inside
the 130M model at 2K and 16K tokens, docs/benchmarks.md) and ``triton.py`` (the first design, chosen
with the environment variable ``SSM_SUITE_SSD_TRITON=first``; it also holds the one-token step).
"""

from __future__ import annotations

import importlib.util
import math
import os
from numbers import Real

import torch

from kernels.dispatch import choose_backend
from kernels.ssd.chunked import ssd_chunked
from kernels.ssd.reference import ssd_quadratic, ssd_reference, ssd_step_reference

__all__ = ["ssd", "ssd_step", "ssd_quadratic"]

_FORWARD = {"reference": ssd_reference, "chunked": ssd_chunked}
_STEP = {"reference": ssd_step_reference}


_TRITON_DESIGNS = ("", "first", "fused")  # SSM_SUITE_SSD_TRITON: "" (unset) and "fused" run triton_fused.py


def _ssd_triton(*args):
    # Imported on first use, not with this package: triton.jit decides between compiling and
    # interpreting (TRITON_INTERPRET=1) when the kernels are defined, so defining them late lets a
    # test session turn the interpreter on after this package was imported.
    design = os.environ.get("SSM_SUITE_SSD_TRITON", "")
    if design not in _TRITON_DESIGNS:
        raise ValueError(f"SSM_SUITE_SSD_TRITON is {design!r}; choose one of {_TRITON_DESIGNS[1:]} "
                         f"(or leave it unset)")
    if design == "first":
        from kernels.ssd.triton import ssd_triton
        return ssd_triton(*args)
    from kernels.ssd.triton_fused import ssd_triton_fused
    return ssd_triton_fused(*args)


def _ssd_step_triton(*args):
    from kernels.ssd.triton import ssd_step_triton
    return ssd_step_triton(*args)


if importlib.util.find_spec("triton") is not None:  # the Triton kernels (``triton.py``)
    _FORWARD["triton"] = _ssd_triton
    _STEP["triton"] = _ssd_step_triton


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_params(
    where: str, nheads: int, headdim: int, ngroups: int, A: torch.Tensor, D: torch.Tensor | None,
    dt_bias: torch.Tensor | None, dt_limit: tuple[float, float],
) -> None:
    """Checks shared by the scan and the step: the per-head parameters and the group layout."""
    if nheads % ngroups != 0:
        raise ValueError(
            f"{where}: ngroups G={ngroups} (dim 2 of B and C) must divide nheads H={nheads}: each group "
            f"of B/C is shared by H/G consecutive heads"
        )
    if _shape(A) != (nheads,):
        raise ValueError(f"{where}: A must be [H] = [{nheads}] (one negative scalar a head), got {_shape(A)}")
    if D is not None and _shape(D) not in ((nheads,), (nheads, headdim)):
        raise ValueError(f"{where}: D must be [H] = [{nheads}] or [H, P] = [{nheads}, {headdim}], got {_shape(D)}")
    if dt_bias is not None and _shape(dt_bias) != (nheads,):
        raise ValueError(f"{where}: dt_bias must be [H] = [{nheads}], got {_shape(dt_bias)}")
    if (len(dt_limit) != 2 or not all(isinstance(v, Real) for v in dt_limit)
            or not dt_limit[0] <= dt_limit[1]):
        raise ValueError(f"{where}: dt_limit must be (min, max) numbers with min <= max, got {dt_limit!r}")


def _check_ssd(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_limit, initial_state, cu_seqlens) -> None:
    if x.dim() != 4:
        raise ValueError(f"ssd expects x of shape [B, L, H, P] (batch, length, heads, headdim), got {_shape(x)}")
    batch, seqlen, nheads, headdim = x.shape
    if _shape(dt) != (batch, seqlen, nheads):
        raise ValueError(f"ssd: dt must be [B, L, H] = {[batch, seqlen, nheads]}, got {_shape(dt)}")
    if B.dim() != 4 or _shape(B)[:2] != (batch, seqlen):
        raise ValueError(f"ssd: B must be [B, L, G, N] with B={batch}, L={seqlen}, got {_shape(B)}")
    if _shape(C) != _shape(B):
        raise ValueError(f"ssd: C must have B's shape {_shape(B)}, got {_shape(C)}")
    ngroups, dstate = B.shape[2], B.shape[3]
    _check_params("ssd", nheads, headdim, ngroups, A, D, dt_bias, dt_limit)
    if z is not None and _shape(z) != _shape(x):
        raise ValueError(f"ssd: z must have x's shape {_shape(x)}, got {_shape(z)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"ssd: chunk_size must be a positive int, got {chunk_size!r}")
    rows = batch
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"ssd: with cu_seqlens, x must hold one packed row (batch 1), got batch {batch}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError(
                f"ssd: cu_seqlens must be an int tensor [S+1], got {cu_seqlens.dtype} {_shape(cu_seqlens)}"
            )
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != seqlen or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
            raise ValueError(f"ssd: cu_seqlens must rise from 0 to L={seqlen}, got {bounds}")
        rows = len(bounds) - 1
    if initial_state is not None and _shape(initial_state) != (rows, nheads, headdim, dstate):
        what = "S (sequences)" if cu_seqlens is not None else "B"
        raise ValueError(
            f"ssd: initial_state must be [{what}, H, P, N] = {[rows, nheads, headdim, dstate]}, "
            f"got {_shape(initial_state)}"
        )


def ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2's SSD scan. x [B, L, H, P], dt [B, L, H], A [H], B and C [B, L, G, N], D [H] or [H, P],
    z like x, dt_bias [H], states [B (or S), H, P, N]. Returns y [B, L, H, P] (x's dtype), and the final
    state (float32, float64 for float64 inputs) with ``return_final_state``. See ``reference.py``.
    """
    _check_ssd(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_limit, initial_state, cu_seqlens)
    backend = choose_backend("ssd", tuple(_FORWARD), x.device)
    return _FORWARD[backend](x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit,
                             initial_state, return_final_state, cu_seqlens)


def ssd_step(
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
    dt_limit: tuple[float, float] = (0.0, math.inf),
) -> torch.Tensor:
    """One token: state [B, H, P, N] updated in place; x, z [B, H, P]; dt [B, H]; B, C [B, G, N].

    Returns y [B, H, P] in x's dtype.
    """
    if x.dim() != 3:
        raise ValueError(f"ssd_step expects x of shape [B, H, P], got {_shape(x)}")
    batch, nheads, headdim = x.shape
    if B.dim() != 3 or B.shape[0] != batch:
        raise ValueError(f"ssd_step: B must be [B, G, N] with B={batch}, got {_shape(B)}")
    if _shape(C) != _shape(B):
        raise ValueError(f"ssd_step: C must have B's shape {_shape(B)}, got {_shape(C)}")
    if _shape(state) != (batch, nheads, headdim, B.shape[2]):
        raise ValueError(f"ssd_step: state must be [B, H, P, N] = {[batch, nheads, headdim, B.shape[2]]}, "
                         f"got {_shape(state)}")
    if _shape(dt) != (batch, nheads):
        raise ValueError(f"ssd_step: dt must be [B, H] = {[batch, nheads]}, got {_shape(dt)}")
    if z is not None and _shape(z) != _shape(x):
        raise ValueError(f"ssd_step: z must have x's shape {_shape(x)}, got {_shape(z)}")
    _check_params("ssd_step", nheads, headdim, B.shape[1], A, D, dt_bias, dt_limit)
    backend = choose_backend("ssd_step", tuple(_STEP), x.device)
    return _STEP[backend](state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit)
