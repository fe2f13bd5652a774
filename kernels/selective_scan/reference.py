"""Selective scan (Mamba-1's S6): the semantics, as a plain sequential recurrence over time.

Shapes (mamba_ssm's ``selective_scan_fn`` layout; ``G`` groups of channels share B and C, ``S`` packed
sequences):
    u, delta, z    [B, D, L]                any float dtype
    A              [D, N]                   real (negative for a stable scan)
    B, C           [B, N, L] (shared by all channels) or [B, G, N, L] (channel d uses group d // (D/G))
    D, delta_bias  [D]
    initial_state  [B, D, N] (or [S, D, N] with cu_seqlens): the state before position 0
    cu_seqlens     int [S+1] with B == 1: the L axis holds S sequences packed end to end; the state
                   restarts at each sequence start (from initial_state[s], or zeros)
    returns y [B, D, L] in u's dtype, and the final state [B or S, D, N] when ``return_final_state``.

Per channel d, state n and position t, with ``dt = softplus(delta + delta_bias)`` when
``delta_softplus`` (else ``delta + delta_bias``):

    h_t = exp(dt_t * A[d, n]) * h_{t-1} + dt_t * B_t[n] * u_t
    y_t = sum_n C_t[n] * h_t + D[d] * u_t,  then  y_t *= silu(z_t)  when z is given.

Computation and states are float32 (float64 for float64 inputs) whatever the input dtype. Gradients come
from autograd through the loop, which makes this the yardstick for ``chunked.py``, not a fast path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def discretize_dt(
    delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool, dtype: torch.dtype
) -> torch.Tensor:
    """dt [B, D, L] = (softplus)(delta + delta_bias[:, None]) in ``dtype``."""
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    return F.softplus(dt) if delta_softplus else dt


def grouped_bc(B: torch.Tensor, C: torch.Tensor, full_ndim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """B and C with an explicit group axis and the same group count.

    Scan layout (``full_ndim=4``): [B, N, L] or [B, G, N, L] -> [B, G, N, L]; step layout
    (``full_ndim=3``): [B, N] or [B, G, N] -> [B, G, N]. A shared one is expanded (a view) to the
    other's groups.
    """
    B = B if B.dim() == full_ndim else B.unsqueeze(1)
    C = C if C.dim() == full_ndim else C.unsqueeze(1)
    groups = max(B.shape[1], C.shape[1])

    def expand(x: torch.Tensor) -> torch.Tensor:
        return x if x.shape[1] == groups else x.expand(x.shape[0], groups, *x.shape[2:])

    return expand(B), expand(C)


def finish_output(
    y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None
) -> torch.Tensor:
    """y + D u, gated by silu(z); everything in y's dtype. u, z [B, D, L]."""
    if D is not None:
        y = y + D.to(y.dtype)[:, None] * u.to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _scan_one(
    u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    initial_state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence for one batch of sequences: u, dt [Bt, D, L]; B, C [Bt, G, N, L]; A [D, N].

    Returns the scan output without D and z, [Bt, D, L], and the final state [Bt, D, N].
    """
    batch, dim, length = u.shape
    groups, dstate = B.shape[1], B.shape[2]
    dtype = u.dtype
    # Channels viewed as [G, D/G] so that each group meets its own B_t and C_t by broadcasting.
    A = A.view(groups, dim // groups, dstate)
    dt4 = dt.view(batch, groups, dim // groups, length)
    dtu = (dt * u).view(batch, groups, dim // groups, length)
    if initial_state is None:
        h = u.new_zeros(batch, groups, dim // groups, dstate)
    else:
        h = initial_state.to(dtype).reshape(batch, groups, dim // groups, dstate)
    ys = []
    for t in range(length):
        h = torch.exp(dt4[..., t, None] * A) * h + dtu[..., t, None] * B[:, :, None, :, t]
        ys.append((h * C[:, :, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1).reshape(batch, dim, length) if ys else u.new_zeros(batch, dim, 0)
    return y, h.reshape(batch, dim, dstate)


def selective_scan_reference(
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
    """Reference selective scan; see the module docstring for shapes and semantics."""
    dtype = compute_dtype(u.dtype)
    uc = u.to(dtype)
    dt = discretize_dt(delta, delta_bias, delta_softplus, dtype)
    Bc, Cc = grouped_bc(B.to(dtype), C.to(dtype))
    Ac = A.to(dtype)
    if cu_seqlens is None:
        y, final_state = _scan_one(uc, dt, Ac, Bc, Cc, initial_state)
    else:
        outputs, finals = [], []
        bounds = cu_seqlens.tolist()
        for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            state = None if initial_state is None else initial_state[index : index + 1]
            y_seq, final_seq = _scan_one(
                uc[..., start:end], dt[..., start:end], Ac, Bc[..., start:end], Cc[..., start:end], state
            )
            outputs.append(y_seq)
            finals.append(final_seq)
        y, final_state = torch.cat(outputs, dim=-1), torch.cat(finals, dim=0)
    y = finish_output(y, uc, D, z).to(u.dtype)
    return (y, final_state) if return_final_state else y


def selective_scan_step_reference(
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
    """One decoding step. state [Bt, D, N] (updated in place); x, dt, z [Bt, D]; B, C [Bt, N] or
    [Bt, G, N]; returns y [Bt, D] in x's dtype.

    Equal to the last output of :func:`selective_scan_reference` over the token with ``initial_state``.
    """
    batch, dim = x.shape
    dstate = A.shape[1]
    dtype = compute_dtype(x.dtype)
    dt = discretize_dt(dt.unsqueeze(-1), dt_bias, dt_softplus, dtype).squeeze(-1)  # [Bt, D]
    Bg, Cg = grouped_bc(B.to(dtype), C.to(dtype), full_ndim=3)  # [Bt, G, N]
    groups = Bg.shape[1]
    shape = (batch, groups, dim // groups, dstate)
    xc = x.to(dtype)
    decay = torch.exp(dt.unsqueeze(-1) * A.to(dtype)).view(shape)
    h = decay * state.to(dtype).view(shape) + (dt * xc).view(*shape[:3], 1) * Bg.unsqueeze(2)
    state.copy_(h.view(batch, dim, dstate))
    y = (h * Cg.unsqueeze(2)).sum(-1).reshape(batch, dim)
    y = finish_output(y.unsqueeze(-1), xc.unsqueeze(-1), D, None if z is None else z.unsqueeze(-1))
    return y.squeeze(-1).to(x.dtype)
