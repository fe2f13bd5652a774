"""Chunked selective scan: the fast CPU form, forward and backward (a ``torch.autograd.Function``).

Same shapes and semantics as ``reference.py``. Per batch row, channel d and state n the scan is the
linear recurrence ``h_t = a_t h_{t-1} + x_t`` with ``a_t = exp(dt_t A[d, n])`` and
``x_t = dt_t u_t B_t[n]``. It is cut into chunks of ``chunk_size`` positions and every chunk of every
sequence advances together:

1. each chunk's last state from a zero start: ``chunk_size`` steps, each one op over all chunks;
2. the recurrence across chunks, ``H_k = P_k H_{k-1} + end_k`` with ``P_k = exp(A * sum dt)`` the
   chunk's total decay, gives every chunk its true start state (a log-depth scan over the chunks);
3. the in-chunk recurrence again from those start states, written in place over the inputs ``x``, so
   the chunk's whole state history is at hand for the outputs ``y_t = C_t . h_t``.

Only ``exp(dt * A)`` and ``exp(A * sum dt)`` are ever exponentiated: never a positive cumulative sum, so
nothing overflows whatever dt and A (A <= 0).

The backward recomputes the states from the chunk start states that the forward saves, and runs the
adjoint recurrence ``lambda_t = C_t gy_t + a_{t+1} lambda_{t+1}`` the same way, backwards over chunks.

Why this shape on a CPU: the state history is [B, D, L, N] (33.5M floats at B=2, D=512, L=2048,
N=16). Materialized op by op it costs a fresh allocation (page faults) and a trip to DRAM per
elementwise op. So channels go in blocks whose work buffers (about ``_BLOCK_ELEMENTS`` each, allocated
once per call) stay in cache, and every op writes into them in place. The buffers are
[position in chunk, N, channels, chunks]: the chunks (of all batch rows) are the innermost, contiguous
axis, so every broadcast product (dt * A, dt u * B, h * C) and every reduction runs long vectorized
inner loops, and a step of the recurrence is one contiguous [N, channels, chunks] slab. Each decay is
exponentiated once per pass, with exp2 (torch runs it ~2.5x faster than exp), and each block's slice
of u, dt and the outputs is transposed to and from that order in cache. With chunks of 16 and blocks
of ~1M elements, forward and backward at B=2, D=512, L=2048, N=16 are ~6,500 ops, and the time is split
between those ops' fixed cost and memory traffic. SSD's masked ``exp(segsum)`` matrices would not pay
here: Mamba-1's decay depends on both d and n, so they are [B, D, N, L, chunk] work, ``chunk`` times
the recurrence itself.

Packed sequences (cu_seqlens) are laid out so that every chunk belongs to one sequence: each sequence
is padded to whole chunks with dt = 0 and u = 0 (which leave the state unchanged), and the recurrence
across chunks restarts at each sequence's first chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.selective_scan.reference import compute_dtype, discretize_dt, finish_output, grouped_bc

DEFAULT_CHUNK_SIZE = 16  # measured best at B2 D512 L2048 N16 on 2 cores (scripts/bench_selective_scan_cpu.py)
# Elements of all [chunk, N, channels, rows] work buffers together (two in the forward, three in the
# backward): they should stay in the last-level cache.
_BLOCK_ELEMENTS = 3 << 20
_LOG2E = 1.0 / math.log(2.0)


@dataclass
class _Layout:
    """Where each position goes in the chunked layout: position i of chunk k of lane r.

    Without cu_seqlens the lanes are the batch rows (R = Bt, K = ceil(L / c)); with cu_seqlens there
    is one lane of K chunks, each sequence starting on a fresh chunk. Chunk k of lane r is row r * K + k
    of the flattened [R * K] "rows" axis; ``first_rows`` / ``last_rows`` are each sequence's first and
    last chunk there, for the sequences ``seqs`` (all but the empty ones).
    """

    chunk: int
    lanes: int
    chunks: int
    batch: int
    length: int
    nseq: int
    seqs: torch.Tensor
    first_rows: torch.Tensor
    last_rows: torch.Tensor
    empty: list[int]  # sequences of length 0: their final state is their initial state
    gather: torch.Tensor | None = None  # varlen: [c * K] source positions, in (i, k) order; L = pad
    scatter: torch.Tensor | None = None  # varlen: [L] index of each position in that order

    @property
    def rows(self) -> int:
        return self.lanes * self.chunks

    def time_major(self, x: torch.Tensor) -> torch.Tensor:
        """[Bt, F, L] -> a view [c, F, R, K] (strided; zeros past each sequence's end)."""
        c, features = self.chunk, x.shape[1]
        if self.gather is None:
            if self.chunks * c != self.length:
                x = F.pad(x, (0, self.chunks * c - self.length))
            return x.reshape(self.batch, features, self.chunks, c).permute(3, 1, 0, 2)
        x = F.pad(x, (0, 1)).index_select(-1, self.gather)  # column L is the zero pad
        return x.view(1, features, c, self.chunks).permute(2, 1, 0, 3)

    def new_output(self, features: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An output buffer and its [c, F, R, K] view; :meth:`finish` turns it into [Bt, F, L]."""
        c = self.chunk
        if self.gather is None:
            storage = like.new_empty(self.batch, features, self.chunks * c)
            return storage, storage.view(self.batch, features, self.chunks, c).permute(3, 1, 0, 2)
        storage = like.new_empty(1, features, c * self.chunks)
        return storage, storage.view(1, features, c, self.chunks).permute(2, 1, 0, 3)

    def finish(self, storage: torch.Tensor) -> torch.Tensor:
        if self.gather is None:
            return storage if storage.shape[-1] == self.length else storage[..., : self.length].contiguous()
        return storage.index_select(-1, self.scatter)

    def chunked(self, x: torch.Tensor) -> torch.Tensor:
        """[Bt, F, L] -> contiguous [c, F, R * K] (for the narrow B and C)."""
        return self.time_major(x).reshape(self.chunk, x.shape[1], self.rows)

    def unchunked(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`chunked`: [c, F, R * K] -> [Bt, F, L]."""
        storage, view = self.new_output(x.shape[1], x)
        view.copy_(x.view(self.chunk, -1, self.lanes, self.chunks))
        return self.finish(storage)


def _make_layout(batch: int, length: int, chunk_size: int, cu_seqlens: torch.Tensor | None,
                 device: torch.device) -> _Layout:
    def index(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    if cu_seqlens is None:
        c = max(1, min(chunk_size, length))
        chunks = math.ceil(length / c)
        lanes = list(range(batch))
        return _Layout(c, batch, chunks, batch, length, batch, index(lanes), index([r * chunks for r in lanes]),
                       index([r * chunks + chunks - 1 for r in lanes]), [])
    bounds = [int(b) for b in cu_seqlens.tolist()]
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    c = max(1, min(chunk_size, max(lengths)))
    seqs, first_rows, last_rows, empty, gather = [], [], [], [], []
    first = 0  # the sequence's first chunk
    for seq, (start, seqlen) in enumerate(zip(bounds[:-1], lengths)):
        if seqlen == 0:
            empty.append(seq)
            continue
        nchunks = math.ceil(seqlen / c)
        seqs.append(seq)
        first_rows.append(first)
        last_rows.append(first + nchunks - 1)
        positions = torch.full((nchunks * c,), length, dtype=torch.long)
        positions[:seqlen] = torch.arange(start, start + seqlen)
        gather.append(positions.view(nchunks, c))
        first += nchunks
    gather_index = torch.cat(gather).t().reshape(-1)  # index i * K + k: position i of chunk k
    scatter_index = torch.empty(length, dtype=torch.long)
    valid = gather_index < length
    scatter_index[gather_index[valid]] = torch.arange(gather_index.numel())[valid]
    return _Layout(c, 1, first, batch, length, len(lengths), index(seqs), index(first_rows), index(last_rows),
                   empty, gather_index.to(device), scatter_index.to(device))


def _channel_blocks(dim: int, groups: int, per_channel: int, buffers: int) -> list[tuple[int, int, int, int]]:
    """Channel blocks (d0, d1, g0, m): inside one group (m = 1) or m whole groups from g0 on, sized so
    that ``buffers`` buffers [c, N, d1 - d0, rows] hold about ``_BLOCK_ELEMENTS`` elements together."""
    width = max(1, _BLOCK_ELEMENTS // (buffers * per_channel))
    group_dim = dim // groups
    blocks = []
    if width >= group_dim:
        per_block = width // group_dim
        for g0 in range(0, groups, per_block):
            m = min(per_block, groups - g0)
            blocks.append((g0 * group_dim, (g0 + m) * group_dim, g0, m))
    else:
        for g in range(groups):
            for d0 in range(g * group_dim, (g + 1) * group_dim, width):
                blocks.append((d0, min(d0 + width, (g + 1) * group_dim), g, 1))
    return blocks


class _Workspace:
    """Flat buffers reused by every channel block, so that the block loop allocates nothing big. Views
    (and their per-step slices) are cached by shape: every block but the last has the same one, and
    creating thousands of views is a visible cost next to ops this small."""

    def __init__(self, sizes: list[int], like: torch.Tensor) -> None:
        self.flat = [like.new_empty(size) for size in sizes]
        self.views: dict[tuple, tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = {}

    def _view(self, index: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        key = (index, shape)
        if key not in self.views:
            view = self.flat[index][: math.prod(shape)].view(shape)
            self.views[key] = (view, view.unbind(0))
        return self.views[key]

    def get(self, index: int, *shape: int) -> torch.Tensor:
        return self._view(index, shape)[0]

    def steps(self, index: int, *shape: int) -> tuple[torch.Tensor, ...]:
        """The buffer's slices along its first (chunk position) axis."""
        return self._view(index, shape)[1]


Steps = tuple[torch.Tensor, ...]  # a [c, N, w, rows] buffer as c slabs [N, w, rows]


def _chunk_end_states(a: Steps, x: Steps, out: torch.Tensor) -> torch.Tensor:
    """Each chunk's last state from a zero start: h_i = a_i h_{i-1} + x_i. out [N, w, rows]."""
    out.copy_(x[0])
    for i in range(1, len(a)):
        torch.addcmul(x[i], a[i], out, out=out)
    return out


def _scan_in_place(a: Steps, x: Steps, start: torch.Tensor) -> None:
    """x becomes the state history: x[i] += a[i] * x[i - 1], with x[-1] = start [N, w, rows]."""
    x[0].addcmul_(a[0], start)
    for i in range(1, len(a)):
        x[i].addcmul_(a[i], x[i - 1])


def _adjoint_chunk_start(a: Steps, g: Steps, out: torch.Tensor) -> torch.Tensor:
    """What each chunk's own outputs send back to the state before the chunk (a zero adjoint after it),
    with g = C gy. out [N, w, rows]."""
    last = len(a) - 1
    out.copy_(g[last])
    for i in range(last - 1, -1, -1):
        torch.addcmul(g[i], a[i + 1], out, out=out)
    return out.mul_(a[0])


def _adjoint_in_place(a: Steps, g: Steps, end: torch.Tensor) -> None:
    """g becomes the adjoint history: g[i] += a[i + 1] * g[i + 1], with ``end`` [N, w, rows] (the adjoint
    arriving from later chunks) added at the chunk's last position."""
    last = len(a) - 1
    g[last].add_(end)
    for i in range(last - 1, -1, -1):
        g[i].addcmul_(a[i + 1], g[i + 1])


def _linear_scan(decay: torch.Tensor, x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """x_k <- decay_k * x_{k-1} + x_k along the last dim (x_{k+1} with ``reverse``), in place on both: a
    log-depth (Hillis-Steele) scan, each level one op over all chunks. decay ends as running products,
    which stay in [0, 1]: nothing overflows."""
    count, shift = x.shape[-1], 1
    while shift < count:
        now, before = slice(shift, None), slice(None, -shift)
        if reverse:
            now, before = before, now
        x[..., now] = torch.addcmul(x[..., now], decay[..., now], x[..., before])
        if 2 * shift < count:
            decay[..., now] = decay[..., now] * decay[..., before]
        shift *= 2
    return x


def _across_chunks(layout: _Layout, end: torch.Tensor, decay: torch.Tensor, starts: torch.Tensor,
                   initial: torch.Tensor | None, final: torch.Tensor) -> None:
    """H_k = decay_k * H_{k-1} + end_k over the chunks of each sequence, from its initial state.

    end, decay [N, w, rows]: each chunk's last state from a zero start, and its total decay. Writes
    ``starts`` [N, w, rows] (each chunk's state before its first position) and ``final`` [N, w, S];
    initial [N, w, S] or None (zeros).
    """
    first, last, seqs = layout.first_rows, layout.last_rows, layout.seqs
    carry = decay.clone()
    carry[..., first] = 0.0  # a sequence's first chunk continues from its initial state, not the previous chunk
    states = end.clone()
    if initial is not None:
        states[..., first] += decay[..., first] * initial[..., seqs]
    _linear_scan(carry, states)  # states[..., k]: the state after chunk k
    starts[..., 1:] = states[..., :-1]
    starts[..., first] = 0.0 if initial is None else initial[..., seqs]
    final[..., seqs] = states[..., last]


def _across_chunks_backward(layout: _Layout, start_adjoint: torch.Tensor, decay: torch.Tensor,
                            end_adjoint: torch.Tensor, grad_final: torch.Tensor | None,
                            grad_initial: torch.Tensor) -> None:
    """The adjoint of :func:`_across_chunks`, backwards over the chunks.

    start_adjoint [N, w, rows]: what each chunk's outputs send to the state before it. Writes
    ``end_adjoint`` [N, w, rows] (the adjoint of each chunk's last state from later chunks) and
    ``grad_initial`` [N, w, S].
    """
    first, last, seqs = layout.first_rows, layout.last_rows, layout.seqs
    carry = torch.zeros_like(decay)
    carry[..., :-1] = decay[..., 1:]
    carry[..., last] = 0.0  # nothing flows back into a sequence from the next one
    end_adjoint[..., -1] = 0.0
    end_adjoint[..., :-1] = start_adjoint[..., 1:]
    end_adjoint[..., last] = 0.0 if grad_final is None else grad_final[..., seqs]
    _linear_scan(carry, end_adjoint, reverse=True)
    grad_initial[..., seqs] = torch.addcmul(start_adjoint[..., first], decay[..., first], end_adjoint[..., first])


class _ChunkedScan(torch.autograd.Function):
    """The scan without D and z. u, dt [Bt, D, L]; A [D, N]; B, C [Bt, G, N, L]; initial [S, D, N] or
    None; all in the compute dtype. Returns y [Bt, D, L] and the final state [S, D, N].

    Inside, a block of w channels lives in buffers [c, N, w, rows] (``grouped``: the w channels split as
    [m groups, w / m]), B and C in [c, N, G, rows], dt and u in [c, D, rows], states in [N, D, rows].
    """

    @staticmethod
    def forward(ctx, u, dt, A, B, C, initial, layout: _Layout):
        c, lanes, chunks, rows = layout.chunk, layout.lanes, layout.chunks, layout.rows
        dim, dstate = A.shape
        groups = B.shape[1]
        u_tm, dt_tm = layout.time_major(u), layout.time_major(dt)  # [c, D, R, K] views
        Bc = layout.chunked(B.transpose(1, 2).reshape(layout.batch, dstate * groups, -1))
        Cc = layout.chunked(C.transpose(1, 2).reshape(layout.batch, dstate * groups, -1))
        Bc, Cc = Bc.view(c, dstate, groups, rows), Cc.view(c, dstate, groups, rows)
        A2t = (A.t() * _LOG2E).contiguous()  # [N, D]; exp(dt A) = exp2(dt A log2 e)
        initial_t = None if initial is None else initial.permute(2, 1, 0)  # [N, D, S]

        # dt and u in the chunked order, filled block by block and kept for the backward.
        dt_c, u_c = u.new_empty(c, dim, rows), u.new_empty(c, dim, rows)
        y_storage, y_tm = layout.new_output(dim, u)
        starts = u.new_empty(dstate, dim, rows)
        final = u.new_empty(dstate, dim, layout.nseq)
        blocks = _channel_blocks(dim, groups, c * rows * dstate, buffers=2)
        widest = max(d1 - d0 for d0, d1, _, _ in blocks)
        work = _Workspace([c * dstate * widest * rows] * 2 + [c * widest * rows, dstate * widest * rows], u)
        for d0, d1, g0, m in blocks:
            width = d1 - d0
            shape, grouped = (c, dstate, width, rows), (c, dstate, m, width // m, rows)
            a, x = work.get(0, *shape), work.get(1, *shape)
            a_steps, x_steps = work.steps(0, *shape), work.steps(1, *shape)
            dt_b, u_b, dtu_b = dt_c[:, d0:d1], u_c[:, d0:d1], work.get(2, c, width, rows)
            dt_b.unflatten(-1, (lanes, chunks)).copy_(dt_tm[:, d0:d1])
            u_b.unflatten(-1, (lanes, chunks)).copy_(u_tm[:, d0:d1])
            torch.mul(dt_b, u_b, out=dtu_b)
            torch.mul(dt_b[:, None], A2t[:, d0:d1, None], out=a).exp2_()
            torch.mul(dtu_b.view(c, 1, m, width // m, rows), Bc[:, :, g0 : g0 + m, None], out=x.view(grouped))
            end = _chunk_end_states(a_steps, x_steps, work.get(3, dstate, width, rows))
            decay = torch.exp2(dt_b.sum(0) * A2t[:, d0:d1, None])
            _across_chunks(layout, end, decay, starts[:, d0:d1],
                           None if initial_t is None else initial_t[:, d0:d1], final[:, d0:d1])
            _scan_in_place(a_steps, x_steps, starts[:, d0:d1])
            y_b = torch.mul(x.view(grouped), Cc[:, :, g0 : g0 + m, None], out=a.view(grouped)).sum(1)
            y_tm[:, d0:d1] = y_b.view(c, width, lanes, chunks)
        for seq in layout.empty:
            final[..., seq] = 0.0 if initial_t is None else initial_t[..., seq]

        ctx.layout = layout
        ctx.has_initial = initial is not None
        ctx.save_for_backward(u_c, dt_c, A, Bc, Cc, starts)
        return layout.finish(y_storage), final.permute(2, 1, 0).contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_final):
        layout: _Layout = ctx.layout
        u_c, dt_c, A, Bc, Cc, starts = ctx.saved_tensors
        c, lanes, chunks, rows = layout.chunk, layout.lanes, layout.chunks, layout.rows
        dim, dstate = A.shape
        groups = Bc.shape[2]
        gy_tm = layout.time_major(grad_y.to(u_c.dtype))
        grad_final_t = None if grad_final is None else grad_final.to(u_c.dtype).permute(2, 1, 0)  # [N, D, S]
        At = A.t().contiguous()
        A2t = At * _LOG2E

        du_storage, du_tm = layout.new_output(dim, u_c)
        ddt_storage, ddt_tm = layout.new_output(dim, u_c)
        grad_At = u_c.new_empty(dstate, dim)
        grad_Bc = u_c.new_zeros(c, dstate, groups, rows)
        grad_Cc = u_c.new_zeros(c, dstate, groups, rows)
        grad_initial = u_c.new_zeros(dstate, dim, layout.nseq)
        blocks = _channel_blocks(dim, groups, c * rows * dstate, buffers=3)
        widest = max(d1 - d0 for d0, d1, _, _ in blocks)
        big, narrow, state = c * dstate * widest * rows, c * widest * rows, dstate * widest * rows
        work = _Workspace([big] * 3 + [narrow] * 2 + [state] * 2, u_c)
        for d0, d1, g0, m in blocks:
            width = d1 - d0
            shape, grouped = (c, dstate, width, rows), (c, dstate, m, width // m, rows)
            a, h, lam = (work.get(i, *shape) for i in range(3))
            a_steps, h_steps, lam_steps = (work.steps(i, *shape) for i in range(3))
            dt_b, u_b = dt_c[:, d0:d1], u_c[:, d0:d1]
            dtu_b, gy_b = work.get(3, c, width, rows), work.get(4, c, width, rows)
            gy_b.unflatten(-1, (lanes, chunks)).copy_(gy_tm[:, d0:d1])
            torch.mul(dt_b, u_b, out=dtu_b)
            B_blk, C_blk = Bc[:, :, g0 : g0 + m, None], Cc[:, :, g0 : g0 + m, None]  # [c, N, m, 1, rows]
            start = starts[:, d0:d1]
            # The state history again, from the saved chunk start states.
            torch.mul(dt_b[:, None], A2t[:, d0:d1, None], out=a).exp2_()
            torch.mul(dtu_b.view(c, 1, m, width // m, rows), B_blk, out=h.view(grouped))
            _scan_in_place(a_steps, h_steps, start)
            grad_Cc[:, :, g0 : g0 + m] += torch.mul(h, gy_b[:, None], out=lam).view(grouped).sum(3)
            # The adjoint history lambda_i = C_i gy_i + a_{i+1} lambda_{i+1}, across chunks as forward.
            torch.mul(gy_b.view(c, 1, m, width // m, rows), C_blk, out=lam.view(grouped))
            start_adjoint = _adjoint_chunk_start(a_steps, lam_steps, work.get(5, dstate, width, rows))
            decay = torch.exp2(dt_b.sum(0) * A2t[:, d0:d1, None])
            end_adjoint = work.get(6, dstate, width, rows)
            _across_chunks_backward(layout, start_adjoint, decay, end_adjoint,
                                    None if grad_final_t is None else grad_final_t[:, d0:d1],
                                    grad_initial[:, d0:d1])
            _adjoint_in_place(a_steps, lam_steps, end_adjoint)
            # lambda_i * a_i * h_{i-1}, the gradient through the decay (for dt and A), in place of a.
            a[1:].mul_(h[:-1])
            a[0].mul_(start)
            grad_decay = a.mul_(lam)
            grad_dt_b = torch.mul(grad_decay, At[:, d0:d1, None], out=h).sum(1)
            grad_At[:, d0:d1] = torch.mul(grad_decay, dt_b[:, None], out=h).sum((0, 3))
            # Through x = dt u B: sum_n lambda B is the gradient of dt * u.
            grad_dtu = torch.mul(lam.view(grouped), B_blk, out=h.view(grouped)).sum(1).view(c, width, rows)
            grad_Bc[:, :, g0 : g0 + m] += torch.mul(lam, dtu_b[:, None], out=h).view(grouped).sum(3)
            du_tm[:, d0:d1] = (grad_dtu * dt_b).view(c, width, lanes, chunks)
            ddt_tm[:, d0:d1] = grad_dt_b.addcmul_(grad_dtu, u_b).view(c, width, lanes, chunks)

        if grad_final_t is not None:
            for seq in layout.empty:  # their final state is their initial state
                grad_initial[..., seq] = grad_final_t[..., seq]

        def grad_bc(grad: torch.Tensor) -> torch.Tensor:
            flat = layout.unchunked(grad.view(c, dstate * groups, rows))  # [Bt, N * G, L]
            return flat.view(layout.batch, dstate, groups, -1).transpose(1, 2)

        grad_init = grad_initial.permute(2, 1, 0) if ctx.has_initial else None
        return (layout.finish(du_storage), layout.finish(ddt_storage), grad_At.t(), grad_bc(grad_Bc),
                grad_bc(grad_Cc), grad_init, None)


# Run eagerly under torch.compile (a graph break on each side): traced, this Function's in-place work
# buffers and layout views came out of AOT autograd's backward with strides its graph did not expect
# (a view error in the compiled backward of a Mamba-1 block, tests/core/test_parallel.py). It is the CPU
# form; on a GPU the Triton kernels are custom ops, which compile as single nodes.
@torch.compiler.disable
def selective_scan_chunked(
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
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked selective scan; shapes and semantics as :func:`reference.selective_scan_reference`.

    ``chunk_size`` trades steps inside a chunk against steps across chunks; it changes rounding only.
    The softplus of dt, the D skip and the z gate are plain autograd ops around the scan.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = compute_dtype(u.dtype)
    uc = u.to(dtype)
    dt = discretize_dt(delta, delta_bias, delta_softplus, dtype)
    Bg, Cg = grouped_bc(B.to(dtype), C.to(dtype))
    initial = None if initial_state is None else initial_state.to(dtype)
    layout = _make_layout(u.shape[0], u.shape[2], chunk_size, cu_seqlens, u.device)
    y, final_state = _ChunkedScan.apply(uc.contiguous(), dt.contiguous(), A.to(dtype), Bg, Cg, initial, layout)
    y = finish_output(y, uc, D, z).to(u.dtype)
    return (y, final_state) if return_final_state else y
