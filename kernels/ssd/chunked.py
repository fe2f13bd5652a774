"""SSD, chunked: the Mamba-2 paper's block decomposition in plain PyTorch (the CPU path).

Same arguments and results as :func:`kernels.ssd.reference.ssd_reference` (see its module for shapes
and semantics). The sequence is cut into chunks of ``chunk_size`` tokens; the L x L matrix of the
quadratic form then splits into diagonal blocks (within a chunk) and off-diagonal blocks (across chunks),
and the off-diagonal blocks factor through the state at chunk boundaries:

1. intra-chunk:   Y_diag = (L_c o C B^T) (dt x) inside each chunk, the quadratic form on T tokens;
2. chunk states:  the state each chunk leaves when started from zero, sum_s decay(s -> end) dt_s x_s B_s^T;
3. state passing: h_c = exp(sum of dt A over chunk c) h_{c-1} + state_c, a recurrence over chunks that
                  starts each sequence from its initial state;
4. state output:  Y_off = C_t h_{c-1} exp(sum_{k<=t} dt_k A), the state entering the chunk read at t.

Time O(L T (N + P)) and memory O(L T) per head, instead of O(L^2). Every exponent is a sum of
dt A <= 0 over a contiguous range, formed by cumulative sums within a chunk (never the difference of
two long cumulative sums), so nothing overflows and nothing cancels; the result is differentiable
through autograd.

A length that is not a multiple of ``chunk_size`` is padded at the end with dt = 0 and x = 0: a token
with dt = 0 neither decays nor feeds the state, so the final state is that after the last real token.
Packed sequences (``cu_seqlens``) are each padded to whole chunks and laid end to end, so no chunk
straddles two sequences; the state passing then restarts at each sequence's first chunk. All chunks of
all sequences still go through steps 1, 2 and 4 in one batch; the padding costs at most
``chunk_size - 1`` tokens a sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.ssd.reference import compute_dtype, discretize_dt, segsum, skip_term


def _scan_chunks(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    segments: list[tuple[int, int]],
    initial_states: list[torch.Tensor],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The four steps on inputs already padded to whole chunks, all in the compute dtype.

    x [R, c*T, H, P]; dt [R, c*T, H] (discretized, 0 on padding); A [H]; B, C [R, c*T, G, N].
    ``segments``: (first chunk, end chunk) of each sequence along the chunk axis, in order and covering
    it; ``initial_states``: one [R, H, P, N] state per segment. Returns y [R, c*T, H, P] (before the
    skip and the gate) and one final state [R, H, P, N] per segment.
    """
    rows, padded_len, nheads, headdim = x.shape
    ngroups, dstate = B.shape[-2:]
    per_group = nheads // ngroups
    T = chunk_size
    nchunks = padded_len // T
    # Heads split as (group g, head-in-group h) so B and C are never copied per head.
    x = x.reshape(rows, nchunks, T, ngroups, per_group, headdim)
    dt = dt.reshape(rows, nchunks, T, ngroups, per_group)
    B = B.reshape(rows, nchunks, T, ngroups, dstate)
    C = C.reshape(rows, nchunks, T, ngroups, dstate)

    dA = (dt * A.reshape(ngroups, per_group)).permute(0, 1, 3, 4, 2)  # [R, c, G, h, T]
    dA_cumsum = dA.cumsum(dim=-1)  # sum_{k<=t} within the chunk
    decay = torch.exp(segsum(dA))  # [R, c, G, h, T(t), T(s)], zero above the diagonal
    xdt = x * dt[..., None]  # [R, c, T, G, h, P]

    # 1. Intra-chunk outputs: the quadratic form restricted to each chunk.
    scores = torch.einsum("bctgn,bcsgn->bcgts", C, B).unsqueeze(3) * decay  # [R, c, G, h, T, T]
    y = torch.einsum("bcghts,bcsghp->bctghp", scores, xdt)

    # 2. The state each chunk leaves from a zero start. The last row of the decay mask is the decay of
    #    every position to the end of its chunk.
    to_end = decay[..., -1, :].permute(0, 1, 4, 2, 3)  # [R, c, T, G, h]
    chunk_states = torch.einsum("bcsgn,bcsghp->bcghpn", B, xdt * to_end[..., None])

    # 3. State passing across chunks, restarting at each sequence's first chunk. A loop over chunks:
    #    linear in their number, where the closed form over all chunk pairs is quadratic.
    chunk_decay = torch.exp(dA_cumsum[..., -1])[..., None, None]  # [R, c, G, h, 1, 1]
    entering, finals = [], []
    for (first, end), h0 in zip(segments, initial_states):
        h = h0.reshape(rows, ngroups, per_group, headdim, dstate)
        for c in range(first, end):
            entering.append(h)
            h = chunk_decay[:, c] * h + chunk_states[:, c]
        finals.append(h.reshape(rows, nheads, headdim, dstate))
    entering_states = torch.stack(entering, dim=1)  # [R, c, G, h, P, N]

    # 4. The state entering each chunk, decayed to position t and read by C_t.
    from_start = torch.exp(dA_cumsum).permute(0, 1, 4, 2, 3)  # [R, c, T, G, h]
    y = y + torch.einsum("bctgn,bcghpn->bctghp", C, entering_states) * from_start[..., None]
    return y.reshape(rows, padded_len, nheads, headdim), finals


def _pad_to_chunks(t: torch.Tensor, padded_len: int) -> torch.Tensor:
    """Zero-pad dim 1 of t [R, L, ...] to ``padded_len``."""
    pad = padded_len - t.shape[1]
    if pad == 0:
        return t
    return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))


def ssd_chunked(
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
    """Chunked SSD; see the module docstring and :mod:`kernels.ssd.reference` for shapes."""
    out_dtype = x.dtype
    dtype = compute_dtype(x.dtype)
    batch, seqlen, nheads, headdim = x.shape
    dstate = B.shape[-1]
    T = chunk_size
    dt = discretize_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)
    xs, Bs, Cs, A = x.to(dtype), B.to(dtype), C.to(dtype), A.to(dtype)

    if cu_seqlens is None:
        nchunks = -(-seqlen // T)
        segments = [(0, nchunks)]
        h0 = initial_state.to(dtype) if initial_state is not None else \
            xs.new_zeros(batch, nheads, headdim, dstate)
        initial_states = [h0]
        padded = [_pad_to_chunks(t, nchunks * T) for t in (xs, dt, Bs, Cs)]
    else:
        # Each sequence padded to whole chunks, laid end to end in one row: position i of sequence s
        # goes to (its first chunk) * T + i.
        bounds = cu_seqlens.tolist()
        lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
        chunk_counts = [-(-n // T) for n in lengths]
        firsts = [sum(chunk_counts[:s]) for s in range(len(lengths))]
        nchunks = sum(chunk_counts)
        segments = [(f, f + n) for f, n in zip(firsts, chunk_counts)]
        if initial_state is None:
            initial_state = xs.new_zeros(len(lengths), nheads, headdim, dstate)
        initial_states = [initial_state[s : s + 1].to(dtype) for s in range(len(lengths))]
        dest = torch.cat([torch.arange(n, device=x.device) + f * T for f, n in zip(firsts, lengths)])

        def scatter(t: torch.Tensor) -> torch.Tensor:
            return t.new_zeros(1, nchunks * T, *t.shape[2:]).index_copy(1, dest, t)

        padded = [scatter(t) for t in (xs, dt, Bs, Cs)]

    if nchunks == 0:  # empty sequences: no output, the state is the initial one
        y, finals = xs.new_zeros(xs.shape), initial_states
    else:
        px, pdt, pB, pC = padded
        y, finals = _scan_chunks(px, pdt, A, pB, pC, T, segments, initial_states)
        y = y[:, :seqlen] if cu_seqlens is None else y.index_select(1, dest)

    if D is not None:
        y = y + skip_term(xs, D.to(dtype))
    if z is not None:
        y = y * F.silu(z.to(dtype))
    y = y.to(out_dtype)
    return (y, torch.cat(finals, dim=0)) if return_final_state else y
