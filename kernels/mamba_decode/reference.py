"""One decoding step of a whole Mamba-1 block (and, at the end, of a Mamba-2 block), composed from the
existing ops: the semantics that the fused kernels (``triton.py``, ``triton_mamba2.py``) reproduce.

A pre-norm residual block ``residual + mixer(norm(residual))`` for one token per row, as
``core.cuda_graph.decode_step`` runs it op by op:

    r   = x + residual            (the previous block's output added to the stream, in residual_dtype;
                                   x alone for the first block, residual alone when the previous
                                   block's output is already in it)
    h   = rms_norm(r) * norm_weight, rounded to the weights' dtype
    x|z = in_proj(h)                                   [B, 2 d_inner]
    x   = silu(causal_conv1d_step(x, conv_state))      conv_state updated in place
    dt|B|C = x_proj(x)                                 [B, dt_rank + 2 d_state]
    dt  = dt_proj(dt)      (weight only: its bias is the scan's dt_bias)
    y   = selective_scan_step(ssm_state, x, dt, A, B, C, D, z, dt_bias, softplus)   ssm_state in place
    out = out_proj(y)
    residual_out = r + out        (in residual_dtype)

Every linear map rounds its output to the weights' dtype (as ``F.linear`` does), the conv and the scan
compute in float32 (float64 for float64 inputs) and round their outputs likewise, and the residual stream
keeps ``residual_dtype`` (float32 with ``residual_in_fp32``). Shapes: x, residual [B, d_model]; weights
as ``core.layers.mamba1.Mamba1`` holds them (in_proj [2 d_inner, d_model], conv [d_inner, d_conv],
x_proj [dt_rank + 2 d_state, d_inner], dt_proj [d_inner, dt_rank], out_proj [d_model, d_inner]); A
[d_inner, d_state] (= -exp(A_log)); D, dt_bias, conv_bias [d_inner]; conv_state [B, d_inner, d_conv - 1];
ssm_state [B, d_inner, d_state].

Besides ``residual_out`` [B, d_model] the step returns ``sumsq`` [P, B] float32, whose sum over its first
axis is the sum of squares of each row of ``residual_out``: the next block's RMSNorm needs exactly that,
and the fused kernels hand it over in P partial sums so that the next block does not re-read the row to
get it. Here P = 1. A caller passes it on as the next call's ``residual_sumsq`` (this reference ignores
it and recomputes the norm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.causal_conv1d import causal_conv1d_step
from kernels.norm import rms_norm
from kernels.selective_scan import selective_scan_step
from kernels.ssd import ssd_step

# The recurrent state's dtypes the Triton steps take. The state is updated in float32 and stored rounded
# to its dtype, as the reference steps (selective_scan_step, ssd_step) do; y uses the unrounded update.
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def add_residual(x: torch.Tensor | None, residual: torch.Tensor | None,
                 residual_dtype: torch.dtype) -> torch.Tensor:
    """r = x + residual in residual_dtype (either may be None, not both), added in float32 (float64)."""
    if x is None and residual is None:
        raise ValueError("mamba1_decode_block: give x (the previous block's output), residual, or both")
    if residual is None:
        return x.to(residual_dtype)
    if x is None:
        return residual.to(residual_dtype)
    acc = _acc(torch.promote_types(x.dtype, residual.dtype))
    return (x.to(acc) + residual.to(acc)).to(residual_dtype)


def mamba1_decode_block_reference(
    conv_state: torch.Tensor,
    ssm_state: torch.Tensor,
    x: torch.Tensor | None,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    norm_eps: float,
    in_proj_weight: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    x_proj_weight: torch.Tensor,
    dt_proj_weight: torch.Tensor,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor | None,
    out_proj_weight: torch.Tensor,
    residual_dtype: torch.dtype,
    residual_sumsq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Mamba-1 block for one token per row (module docstring). conv_state and ssm_state are updated
    in place. Returns (residual_out [B, d_model] residual_dtype, sumsq [1, B] float32 or float64)."""
    del residual_sumsq  # an optimization of the fused kernels; the norm is recomputed here
    r = add_residual(x, residual, residual_dtype)
    h = rms_norm(r, norm_weight, norm_eps).to(in_proj_weight.dtype)
    xs, z = F.linear(h, in_proj_weight).chunk(2, dim=-1)
    xs = causal_conv1d_step(xs, conv_state, conv_weight, conv_bias, "silu")
    y = mamba1_scan_step_reference(ssm_state, xs, z, F.linear(xs, x_proj_weight), dt_proj_weight, dt_bias, A, D)
    out = F.linear(y, out_proj_weight)
    residual_out = add_residual(out, r, residual_dtype)
    acc = _acc(residual_dtype)
    return residual_out, residual_out.to(acc).square().sum(-1)[None]


def mamba1_scan_step_reference(
    ssm_state: torch.Tensor,
    x: torch.Tensor,
    z: torch.Tensor,
    x_dbl: torch.Tensor,
    dt_proj_weight: torch.Tensor,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor | None,
) -> torch.Tensor:
    """The part of the block step between x_proj and out_proj (module docstring): dt_proj of x_dbl's dt
    columns, then the selective state update with softplus(dt + dt_bias) and the z gate. x, z [B, d_inner]
    (the conv output and the gate), x_dbl [B, dt_rank + 2 d_state] (x_proj's output), or x_proj's partial
    products [S, B, dt_rank + 2 d_state] (``linear_partials_reference``: summed, then rounded to the
    weights' dtype as x_proj's output); ssm_state updated in place. Returns y [B, d_inner] in x's dtype."""
    if x_dbl.dim() == 3:
        x_dbl = sum_partials(x_dbl, dt_proj_weight.dtype)
    d_state, dt_rank = A.shape[1], dt_proj_weight.shape[1]
    dt, B, C = x_dbl.split([dt_rank, d_state, d_state], dim=-1)
    dt = F.linear(dt, dt_proj_weight)
    return selective_scan_step(ssm_state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)


def mamba2_decode_block_reference(
    conv_state: torch.Tensor,
    ssm_state: torch.Tensor,
    x: torch.Tensor | None,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    norm_eps: float,
    in_proj_weight: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor | None,
    dt_min: float,
    dt_max: float,
    gate_norm_weight: torch.Tensor,
    gate_norm_eps: float,
    out_proj_weight: torch.Tensor,
    residual_dtype: torch.dtype,
    residual_sumsq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pre-norm Mamba-2 block (``core.layers.mamba2.Mamba2``, no in/out_proj bias,
    ``norm_before_gate=False``) for one token per row, as ``decode_step`` runs it op by op:

        r          = x + residual                      (as in mamba1_decode_block_reference)
        h          = rms_norm(r) * norm_weight, rounded to the weights' dtype
        z|xBC|dt   = in_proj(h)                        [B, d_inner | conv_dim | H]
        xBC        = silu(causal_conv1d_step(xBC, conv_state))        conv_state updated in place
        x|B|C      = xBC                               [B, d_inner | G N | G N]
        y          = ssd_step(ssm_state, x [B, H, P], dt, A, B [B, G, N], C, D, dt_bias, softplus,
                              clamp to [dt_min, dt_max])             ssm_state updated in place
        y          = gated_rms_norm(y, z) over groups of d_inner / G features (y * silu(z) normed)
        residual_out = r + out_proj(y)

    Shapes: conv_state [B, conv_dim, d_conv - 1] (conv_dim = d_inner + 2 G N); ssm_state [B, H, P, N]
    float32; in_proj [d_inner + conv_dim + H, d_model]; conv [conv_dim, d_conv]; conv_bias [conv_dim];
    dt_bias, A [H] float32; D [H] or [H, P]; gate_norm_weight [d_inner]; out_proj [d_model, d_inner].
    G = (conv_dim - d_inner) / (2 N). Returns (residual_out [B, d_model] residual_dtype, sumsq [1, B]).
    """
    del residual_sumsq  # an optimization of the fused kernels; the norm is recomputed here
    batch = conv_state.shape[0]
    nheads, headdim, d_state = ssm_state.shape[1:]
    d_inner = gate_norm_weight.shape[0]
    conv_dim = conv_weight.shape[0]
    ngroups = (conv_dim - d_inner) // (2 * d_state)
    r = add_residual(x, residual, residual_dtype)
    h = rms_norm(r, norm_weight, norm_eps).to(in_proj_weight.dtype)
    z, xBC, dt = F.linear(h, in_proj_weight).split([d_inner, conv_dim, nheads], dim=-1)
    xBC = causal_conv1d_step(xBC, conv_state, conv_weight, conv_bias, "silu")
    xs, B, C = xBC.split([d_inner, ngroups * d_state, ngroups * d_state], dim=-1)
    y = ssd_step(ssm_state, xs.reshape(batch, nheads, headdim), dt, A,
                 B.reshape(batch, ngroups, d_state), C.reshape(batch, ngroups, d_state),
                 D=D, dt_bias=dt_bias, dt_softplus=True, dt_limit=(dt_min, dt_max))
    y = rms_norm(y.reshape(batch, d_inner), gate_norm_weight, gate_norm_eps, z=z,
                 group_size=d_inner // ngroups, norm_before_gate=False)
    out = F.linear(y, out_proj_weight)
    residual_out = add_residual(out, r, residual_dtype)
    acc = _acc(residual_dtype)
    return residual_out, residual_out.to(acc).square().sum(-1)[None]


def decode_logits_reference(
    x: torch.Tensor | None,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    norm_eps: float,
    lm_head_weight: torch.Tensor,
    vocab_size: int,
    residual_dtype: torch.dtype,
) -> torch.Tensor:
    """The end of a decoding step, as ``core.cuda_graph.decode_step`` runs it op by op: the last block's
    output x added to the stream (when given), the final RMSNorm, its output cast to the LM head's dtype,
    the LM head, and the first ``vocab_size`` logits as float32. x, residual [B, d_model] (either may be
    None, not both); lm_head_weight [padded vocab, d_model]. Returns float32 [B, vocab_size]."""
    if x is None and residual is None:
        raise ValueError("decode_logits: give x (the last block's output), residual, or both")
    if x is None:
        hidden = rms_norm(residual, norm_weight, norm_eps)
    else:
        hidden, _ = rms_norm(x, norm_weight, norm_eps, residual=residual, residual_out_dtype=residual_dtype)
    logits = F.linear(hidden.to(lm_head_weight.dtype), lm_head_weight)
    return logits[..., :vocab_size].float()



def lm_head_logits_reference(hidden: torch.Tensor, lm_head_weight: torch.Tensor, vocab_size: int,
                             greedy_out: torch.Tensor | None = None) -> torch.Tensor:
    """The LM head of a decoding step whose final norm has run: hidden [B, d_model] (the LM head's dtype),
    lm_head_weight [padded vocab, d_model] -> the first ``vocab_size`` logits, F.linear's output (rounded
    to the weights' dtype) as float32 [B, vocab_size]. With ``greedy_out`` (int64 [B]) their argmax is
    written there too: the first maximal index of a row, a NaN counting as the maximum (torch.argmax)."""
    logits = F.linear(hidden, lm_head_weight)[..., :vocab_size].float()
    if greedy_out is not None:
        torch.argmax(logits, dim=-1, out=greedy_out)
    return logits

# --------------------------------------------------------------------------------------------------
# The large-batch step's pieces (``triton_splitk.py``): a linear map as partial products over slices of
# its input features, and the residual add + RMSNorm that sums them.

SPLIT_ALIGN = 16  # linear_partials' input slices start at multiples of this many features


def split_size(in_features: int, splits: int) -> int:
    """Features in each of :func:`split_bounds`' slices: ceil(in_features / splits) rounded up to a
    multiple of ``SPLIT_ALIGN`` (aligned loads)."""
    if splits < 1:
        raise ValueError(f"linear_partials: splits must be >= 1, got {splits}")
    per_split = -(-in_features // splits)
    return -(-per_split // SPLIT_ALIGN) * SPLIT_ALIGN


def split_bounds(in_features: int, splits: int) -> list[tuple[int, int]]:
    """The input-feature slices [lo, hi) of :func:`linear_partials_reference`: ``splits`` slices of
    :func:`split_size` features; the last slices may be shorter, or empty."""
    size = split_size(in_features, splits)
    return [(min(s * size, in_features), min((s + 1) * size, in_features)) for s in range(splits)]


def linear_partials_reference(x: torch.Tensor, weight: torch.Tensor, splits: int) -> torch.Tensor:
    """F.linear(x, weight) before its sum over the input features is finished: x [M, K], weight [N, K] ->
    float32 [S, M, N] (float64 for float64 inputs), partial s = x[:, lo:hi] @ weight[:, lo:hi]^T over the
    slice :func:`split_bounds` gives it, products and sums in float32. Consumers sum the partials in order
    and round to the weights' dtype (:func:`sum_partials`): F.linear's output up to the order of the
    additions."""
    acc = _acc(torch.promote_types(x.dtype, weight.dtype))
    return torch.stack([x[:, lo:hi].to(acc) @ weight[:, lo:hi].to(acc).T
                        for lo, hi in split_bounds(x.shape[-1], splits)])


def sum_partials(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """partials [S, ...] summed in order (partial 0 first, as the kernels add them), rounded to dtype."""
    total = partials[0].clone()
    for part in partials[1:]:
        total += part
    return total.to(dtype)


def add_norm_partials_reference(partials: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                                norm_eps: float, out_dtype: torch.dtype,
                                residual_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-norm residual add of a block whose output comes as partial products: x = the partials
    [S, B, D] summed and rounded to ``out_dtype`` (the linear map's output), residual_out = x + residual in
    residual_dtype (x alone without a residual), h = rms_norm(residual_out) * norm_weight in out_dtype.
    Returns (h [B, D], residual_out [B, D]), as ``rms_norm(x, ..., residual=residual)`` does."""
    x = sum_partials(partials, out_dtype)
    return rms_norm(x, norm_weight, norm_eps, residual=residual, residual_out_dtype=residual_dtype)


def conv_step_partials_reference(partials: torch.Tensor, conv_state: torch.Tensor, conv_weight: torch.Tensor,
                                 conv_bias: torch.Tensor | None,
                                 out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A Mamba-1 step's in_proj output given as partial products [S, B, 2 d_inner]: summed and rounded to
    ``out_dtype`` (in_proj's output), split into x | z; x through the conv step + SiLU (conv_state
    [B, d_inner, d_conv - 1] updated in place). Returns (xc [B, d_inner], z [B, d_inner]) in out_dtype."""
    x, z = sum_partials(partials, out_dtype).chunk(2, dim=-1)
    return causal_conv1d_step(x, conv_state, conv_weight, conv_bias, "silu"), z
