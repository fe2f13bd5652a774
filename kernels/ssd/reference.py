"""SSD (Mamba-2's structured state space duality): the semantics, in plain PyTorch, in two forms.

Shapes (H heads of P channels, G groups of the B/C projections, N the state size, S packed sequences):
    x             [B, L, H, P]   any float dtype
    dt            [B, L, H]
    A             [H]            negative (Mamba-2 keeps A = -exp(A_log))
    B, C          [B, L, G, N]   G divides H; head h reads group h // (H // G)
    D             [H] or [H, P] or None
    z             [B, L, H, P] or None
    dt_bias       [H] or None
    initial_state [B, H, P, N] (or [S, H, P, N] with cu_seqlens)
    cu_seqlens    int [S+1] with B == 1: x holds S sequences packed along L, each starting from its own
                  initial state (zeros when none is given)
    returns y [B, L, H, P] in x's dtype and, with ``return_final_state``, the final state
    [B or S, H, P, N] in the compute dtype (float32, float64 for float64 inputs).

Per head, with the time step ``dt_t = clamp(softplus(dt_t + dt_bias), *dt_limit)`` (the softplus only
with ``dt_softplus``; the clamp always, as mamba_ssm does, so that the default (0, inf) also zeroes a
negative raw dt), and the state h [P, N]:

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T
    y_t = h_t C_t + D x_t
    y_t = y_t * silu(z_t)        when z is given

Two forms live here and must agree: :func:`ssd_reference` runs that recurrence one token at a time (the
definition; :func:`ssd_step_reference` is its single step), and :func:`ssd_quadratic` is the dual
"attention" form over the whole sequence,

    y = (L o C B^T) (dt x) + (C h_0) exp(cumsum(dt A)) + D x,    L[t, s] = exp(sum_{k=s+1..t} dt_k A)

(L the causal decay mask, zero above the diagonal), which costs O(L^2) and is what the chunked
algorithm applies inside each chunk. Both compute in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def discretize_dt(
    dt: torch.Tensor,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    dtype: torch.dtype,
) -> torch.Tensor:
    """The time step the recurrence uses: clamp(softplus(dt + dt_bias), *dt_limit), in ``dtype``.

    dt [..., H], dt_bias [H]. F.softplus is linear above 20, exactly as mamba_ssm's kernels.
    """
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    return dt.clamp(min=dt_limit[0], max=dt_limit[1])


def expand_groups(t: torch.Tensor, nheads: int) -> torch.Tensor:
    """[..., G, N] -> [..., H, N]: head h reads group h // (H // G) (mamba_ssm's convention)."""
    return t.repeat_interleave(nheads // t.shape[-2], dim=-2)


def skip_term(x: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """D x for x [..., H, P] and D [H] or [H, P]."""
    return x * (D[:, None] if D.dim() == 1 else D)


def segsum(a: torch.Tensor) -> torch.Tensor:
    """Segment sums of a [..., T]: out[..., t, s] = sum_{k=s+1..t} a_k for s <= t, -inf for s > t.

    Built as a masked cumulative sum rather than ``cumsum[t] - cumsum[s]``: the difference of two
    large cumulative sums loses the small decays to cancellation, and the entries above the diagonal
    would be exp'd positive sums. exp(segsum) is the causal decay mask L, zero above the diagonal.
    """
    T = a.shape[-1]
    lower = torch.ones(T, T, dtype=torch.bool, device=a.device).tril()
    strictly_lower = lower.tril(-1)
    # cols[..., k, s] = a_k where k > s: summing down column s from row s+1 to row t.
    cols = a.unsqueeze(-1).expand(*a.shape, T).masked_fill(~strictly_lower, 0.0)
    return cols.cumsum(dim=-2).masked_fill(~lower, -math.inf)


def _per_sequence(
    form: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    x: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``form`` (one unpacked batch -> (y, final_state)) once, or once per packed sequence."""
    if cu_seqlens is None:
        return form(x, dt, B, C, initial_state)
    outputs, finals = [], []
    bounds = cu_seqlens.tolist()
    for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        state = None if initial_state is None else initial_state[index : index + 1]
        part = slice(start, end)
        y, final = form(x[:, part], dt[:, part], B[:, part], C[:, part], state)
        outputs.append(y)
        finals.append(final)
    return torch.cat(outputs, dim=1), torch.cat(finals, dim=0)


def _prepare(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, initial_state):
    """Everything in the compute dtype, dt discretized."""
    dtype = compute_dtype(x.dtype)
    cast = (lambda t: None if t is None else t.to(dtype))
    dt = discretize_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)
    return cast(x), dt, cast(A), cast(B), cast(C), cast(D), cast(z), cast(initial_state)


def _finish(y, x, D, z, out_dtype):
    if D is not None:
        y = y + skip_term(x, D)
    if z is not None:
        y = y * F.silu(z)
    return y.to(out_dtype)


def _step(
    h: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence, before the skip and the gate.

    h [B, H, P, N]; x [B, H, P]; dt [B, H] (discretized); A [H]; B, C [B, G, N]. Returns (h_new, y).
    """
    nheads = x.shape[1]
    decay = torch.exp(dt * A)[..., None, None]  # [B, H, 1, 1]
    h = decay * h + (dt[..., None] * x)[..., None] * expand_groups(B, nheads)[:, :, None, :]
    y = (h * expand_groups(C, nheads)[:, :, None, :]).sum(-1)
    return h, y


def ssd_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int | None = None,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The sequential recurrence, token by token (``chunk_size`` is accepted and ignored)."""
    out_dtype = x.dtype
    x, dt, A, B, C, D, z, initial_state = _prepare(
        x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, initial_state)

    def scan(x, dt, B, C, h):
        batch, length, nheads, headdim = x.shape
        if h is None:
            h = x.new_zeros(batch, nheads, headdim, B.shape[-1])
        ys = []
        for t in range(length):
            h, y = _step(h, x[:, t], dt[:, t], A, B[:, t], C[:, t])
            ys.append(y)
        y = torch.stack(ys, dim=1) if ys else x.new_zeros(x.shape)
        return y, h

    y, final_state = _per_sequence(scan, x, dt, B, C, initial_state, cu_seqlens)
    y = _finish(y, x, D, z, out_dtype)
    return (y, final_state) if return_final_state else y


def ssd_quadratic(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int | None = None,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The dual (masked attention) form over the whole sequence: O(L^2) time and memory.

    Same arguments and results as :func:`ssd_reference` (``chunk_size`` ignored).
    """
    out_dtype = x.dtype
    x, dt, A, B, C, D, z, initial_state = _prepare(
        x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, initial_state)

    def dual(x, dt, B, C, h0):
        batch, length, nheads, headdim = x.shape
        if h0 is None:
            h0 = x.new_zeros(batch, nheads, headdim, B.shape[-1])
        if length == 0:
            return x.new_zeros(x.shape), h0
        B, C = expand_groups(B, nheads), expand_groups(C, nheads)  # [B, L, H, N]
        dA = (dt * A).transpose(1, 2)  # [B, H, L]
        decay = torch.exp(segsum(dA))  # [B, H, t, s]
        scores = torch.einsum("bthn,bshn->bhts", C, B) * decay
        xdt = x * dt[..., None]
        y = torch.einsum("bhts,bshp->bthp", scores, xdt)
        # The initial state decays by exp(sum_{k<=t} dt_k A) before it is read at t.
        from_start = torch.exp(torch.cumsum(dA, dim=-1))  # [B, H, L]
        y = y + torch.einsum("bthn,bhpn->bthp", C, h0) * from_start.transpose(1, 2)[..., None]
        # The final state: the last row of the decay mask weighs every input by its decay to the end.
        to_end = decay[..., -1, :]  # [B, H, s]
        final = torch.einsum("bsh,bshn,bshp->bhpn", to_end.transpose(1, 2), B, xdt)
        final = final + h0 * from_start[..., -1, None, None]
        return y, final

    y, final_state = _per_sequence(dual, x, dt, B, C, initial_state, cu_seqlens)
    y = _finish(y, x, D, z, out_dtype)
    return (y, final_state) if return_final_state else y


def ssd_step_reference(
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
    """One decoding step. state [B, H, P, N] is updated in place; x, z [B, H, P]; dt [B, H]; A [H];
    B, C [B, G, N]; D [H] or [H, P]. Returns y [B, H, P] in x's dtype.

    Equal to the last output of :func:`ssd_reference` over the token, started from ``state``.
    """
    out_dtype = x.dtype
    x, dt, A, B, C, D, z, h = _prepare(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, state)
    h, y = _step(h, x, dt, A, B, C)
    state.copy_(h)
    return _finish(y, x, D, z, out_dtype)
