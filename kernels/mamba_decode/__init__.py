"""Fused decoding steps: one token through a whole Mamba-1 block in three kernels instead of seven
(``mamba1_decode_block``), or through a whole Mamba-2 block in three instead of six
(``mamba2_decode_block``, ``triton_mamba2.py``). On an H100 both are faster than the op-by-op step at
small batches and slower at batch 64, so ``core.cuda_graph`` uses them for at most 4 rows. The step's
end, final norm + LM head + float32 logits, is one kernel too (``decode_logits``, ``triton_logits.py``).
Past 4 rows the Mamba-1 step runs op by op with its matmuls as split-K partial products
(``linear_partials``) that the conv step (``conv_step_partials``), the scan step (``mamba1_scan_step``) and
the next block's norm (``add_norm_partials``) sum: ``triton_splitk.py``. Its LM head writes float32 logits
and per-tile greedy partials that a second kernel reduces to the greedy token (``lm_head_logits``,
``triton_head.py``).

``mamba1_decode_block`` checks shapes and picks a backend through :mod:`kernels.dispatch`:
``reference`` (``reference.py``: the op-by-op composition of the existing ops, which defines the
semantics; the default off CUDA) or ``triton`` (``triton.py``; the default on CUDA). Inference only:
the op has no autograd. ``core.cuda_graph.decode_step`` uses it for the blocks it can take
(:func:`mamba1_decode_unsupported`), only where the triton backend is chosen
(:func:`mamba1_decode_backend`), and runs the others op by op.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable

import torch

from kernels.dispatch import choose_backend
from kernels.mamba_decode.reference import (STATE_DTYPES, add_norm_partials_reference, conv_step_partials_reference,
                                             decode_logits_reference, linear_partials_reference,
                                             lm_head_logits_reference,
                                             mamba1_decode_block_reference, mamba1_scan_step_reference,
                                             mamba2_decode_block_reference)

__all__ = ["add_norm_partials", "conv_step_partials", "decode_logits", "decode_logits_backend", "decode_logits_unsupported",
           "linear_partials", "linear_partials_backend", "linear_partials_splits", "lm_head_logits",
           "lm_head_logits_backend", "lm_head_logits_unsupported",
           "mamba1_decode_block", "mamba1_decode_backend", "mamba1_decode_unsupported", "mamba1_scan_step",
           "mamba1_scan_step_backend", "mamba1_scan_step_unsupported", "mamba2_decode_block", "mamba2_decode_backend",
           "mamba2_decode_unsupported"]

OP = "mamba1_decode_block"
_HAVE_TRITON = importlib.util.find_spec("triton") is not None  # without it, the reference backends only


def _backends(reference: Callable, module: str, name: str) -> dict[str, Callable]:
    """An op's backends: ``reference``, and ``triton`` (``module.name``) where triton is installed. The
    Triton module is imported on first use: triton.jit decides between compiling and interpreting
    (TRITON_INTERPRET=1) when the kernels are defined, so a test session may turn the interpreter on after
    this import."""
    backends = {"reference": reference}
    if _HAVE_TRITON:
        def run_triton(*args):
            return getattr(importlib.import_module(module), name)(*args)
        backends["triton"] = run_triton
    return backends


_BLOCK = _backends(mamba1_decode_block_reference, "kernels.mamba_decode.triton", "mamba1_decode_block_triton")


def mamba1_decode_backend(device: torch.device | str) -> str:
    """The backend :func:`mamba1_decode_block` runs for tensors on ``device`` (``triton`` on CUDA by
    default; forced by ``SSM_SUITE_BACKEND_MAMBA1_DECODE_BLOCK`` or ``forced_backend``)."""
    return choose_backend(OP, tuple(_BLOCK), torch.device(device))


def mamba1_decode_unsupported(d_model: int, d_inner: int, d_state: int, dt_rank: int, d_conv: int,
                              dtype: torch.dtype) -> str | None:
    """Why the fused kernels cannot take a Mamba-1 block of this shape and weight dtype; None when they
    can (the reference backend takes every block)."""
    if "triton" not in _BLOCK:
        return "triton is not installed"
    from kernels.mamba_decode.triton import unsupported
    return unsupported(d_model, d_inner, d_state, dt_rank, d_conv, dtype)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_stream_and_weights(op: str, batch: int, x: torch.Tensor | None, residual_sumsq: torch.Tensor | None,
                              weights: dict[str, torch.Tensor], others: tuple[torch.Tensor | None, ...]) -> None:
    """The checks both fused block steps share: the carried sum of squares, one dtype for the weights,
    one device for every tensor."""
    if residual_sumsq is not None:
        if (residual_sumsq.dim() != 2 or residual_sumsq.shape[1] != batch
                or residual_sumsq.dtype not in (torch.float32, torch.float64)):
            raise ValueError(f"{op}: residual_sumsq must be float32 [P, B={batch}] (the previous call's sumsq), "
                             f"got {residual_sumsq.dtype} {list(_shape(residual_sumsq))}")
        if x is not None:
            raise ValueError(f"{op}: residual_sumsq describes `residual` alone; with x given the stream is "
                             "x + residual, so pass residual_sumsq=None")
    if len({w.dtype for w in weights.values()}) != 1:
        raise ValueError(f"{op}: {', '.join(weights)} weights must share one dtype, got "
                         f"{[str(w.dtype) for w in weights.values()]}")
    _check_one_device(op, *others, residual_sumsq, *weights.values())


def _check_one_device(op: str, *tensors: torch.Tensor | None) -> None:
    devices = {str(t.device) for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(devices)}")


def _check(conv_state, ssm_state, x, residual, norm_weight, in_proj_weight, conv_weight, conv_bias,
           x_proj_weight, dt_proj_weight, dt_bias, A, D, out_proj_weight, residual_sumsq) -> None:
    def need(name: str, t: torch.Tensor | None, shape: tuple[int, ...]) -> None:
        if t is not None and _shape(t) != shape:
            raise ValueError(f"mamba1_decode_block: {name} must be {list(shape)}, got {list(_shape(t))}")

    if x is None and residual is None:
        raise ValueError("mamba1_decode_block: give x (the previous block's output), residual, or both")
    if conv_state.dim() != 3 or conv_weight.dim() != 2 or A.dim() != 2:
        raise ValueError(f"mamba1_decode_block: conv_state must be [B, d_inner, d_conv - 1], conv_weight "
                         f"[d_inner, d_conv] and A [d_inner, d_state]; got {list(_shape(conv_state))}, "
                         f"{list(_shape(conv_weight))}, {list(_shape(A))}")
    batch = conv_state.shape[0]
    d_inner, width = conv_weight.shape
    d_state = A.shape[1]
    d_model = norm_weight.shape[0]
    if dt_proj_weight.dim() != 2:
        raise ValueError(f"mamba1_decode_block: dt_proj_weight must be [d_inner, dt_rank], got "
                         f"{list(_shape(dt_proj_weight))}")
    dt_rank = dt_proj_weight.shape[1]
    need("x", x, (batch, d_model))
    need("residual", residual, (batch, d_model))
    need("norm_weight", norm_weight, (d_model,))
    need("in_proj_weight", in_proj_weight, (2 * d_inner, d_model))
    need("conv_state", conv_state, (batch, d_inner, width - 1))
    need("conv_bias", conv_bias, (d_inner,))
    need("x_proj_weight", x_proj_weight, (dt_rank + 2 * d_state, d_inner))
    need("dt_proj_weight", dt_proj_weight, (d_inner, dt_rank))
    need("dt_bias", dt_bias, (d_inner,))
    need("A", A, (d_inner, d_state))
    need("D", D, (d_inner,))
    need("out_proj_weight", out_proj_weight, (d_model, d_inner))
    need("ssm_state", ssm_state, (batch, d_inner, d_state))
    _check_stream_and_weights(
        "mamba1_decode_block", batch, x, residual_sumsq,
        {"in_proj": in_proj_weight, "conv": conv_weight, "x_proj": x_proj_weight, "dt_proj": dt_proj_weight,
         "out_proj": out_proj_weight},
        (conv_state, ssm_state, x, residual, norm_weight, conv_bias, dt_bias, A, D))


@torch.no_grad()
def mamba1_decode_block(
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
    residual_dtype: torch.dtype | None = None,
    residual_sumsq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step of a pre-norm Mamba-1 block (``residual + Mamba1(RMSNorm(residual))``) for one
    token per row; see ``reference.py`` for the semantics and shapes.

    x: the previous block's output [B, d_model] not yet added to the stream (None when ``residual``
    already holds it); residual: the stream [B, d_model] (None for the first block). conv_state
    [B, d_inner, d_conv - 1] and ssm_state [B, d_inner, d_state] (float32; or bfloat16 / float16, updated
    in float32 and stored rounded) are updated in place.
    residual_dtype: the stream's dtype (default: residual's, else x's). residual_sumsq: the previous
    call's ``sumsq`` when x is None (lets the fused kernels skip a pass over the row).

    Returns (residual_out [B, d_model] in residual_dtype, sumsq [P, B] float32: summed over P, the
    squares of residual_out's rows).
    """
    _check(conv_state, ssm_state, x, residual, norm_weight, in_proj_weight, conv_weight, conv_bias,
           x_proj_weight, dt_proj_weight, dt_bias, A, D, out_proj_weight, residual_sumsq)
    if residual_dtype is None:
        residual_dtype = residual.dtype if residual is not None else x.dtype
    backend = mamba1_decode_backend(conv_state.device)
    return _BLOCK[backend](conv_state, ssm_state, x, residual, norm_weight, norm_eps, in_proj_weight, conv_weight,
                           conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D, out_proj_weight, residual_dtype,
                           residual_sumsq)


OP_SCAN = "mamba1_scan_step"
_SCAN = _backends(mamba1_scan_step_reference, "kernels.mamba_decode.triton", "mamba1_scan_step_triton")


def mamba1_scan_step_backend(device: torch.device | str) -> str:
    """The backend :func:`mamba1_scan_step` runs on ``device`` (``triton`` on CUDA by default; forced by
    ``SSM_SUITE_BACKEND_MAMBA1_SCAN_STEP`` or ``forced_backend``)."""
    return choose_backend(OP_SCAN, tuple(_SCAN), torch.device(device))


def mamba1_scan_step(ssm_state: torch.Tensor, x: torch.Tensor, z: torch.Tensor, x_dbl: torch.Tensor,
                     dt_proj_weight: torch.Tensor, dt_bias: torch.Tensor, A: torch.Tensor,
                     D: torch.Tensor | None) -> torch.Tensor:
    """A Mamba-1 layer's decoding step from x_proj's output to the gated scan output: y = the selective
    state update with dt = softplus(dt_proj(x_dbl[:, :dt_rank]) + dt_bias), B and C from x_dbl, D skip and
    the z gate (``reference.mamba1_scan_step_reference``). x, z [B, d_inner] in the weights' dtype, x_dbl
    [B, dt_rank + 2 d_state], or x_proj's float32 partial products [S, B, dt_rank + 2 d_state]
    (:func:`linear_partials`, summed here), ssm_state [B, d_inner, d_state] float32 / bfloat16 / float16
    (updated in place, in float32, stored rounded). Returns y
    [B, d_inner]. The triton backend takes dt_proj inside the scan kernel: one kernel instead of two."""
    if x.dim() != 2 or A.dim() != 2 or dt_proj_weight.dim() != 2:
        raise ValueError(f"mamba1_scan_step: x [B, d_inner], A [d_inner, d_state], dt_proj_weight "
                         f"[d_inner, dt_rank] expected; got {list(_shape(x))}, {list(_shape(A))}, "
                         f"{list(_shape(dt_proj_weight))}")
    batch, d_inner = x.shape
    d_state, dt_rank = A.shape[1], dt_proj_weight.shape[1]
    xproj = (batch, dt_rank + 2 * d_state)
    if x_dbl.dim() == 3:  # x_proj's partial products (linear_partials)
        xproj = (x_dbl.shape[0], *xproj)
        if x_dbl.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"mamba1_scan_step: x_dbl as partial products [S, B, J] must be float32 (from "
                             f"linear_partials), got {x_dbl.dtype}")
    for name, t, shape in (("z", z, (batch, d_inner)), ("x_dbl", x_dbl, xproj),
                           ("dt_proj_weight", dt_proj_weight, (d_inner, dt_rank)), ("dt_bias", dt_bias, (d_inner,)),
                           ("A", A, (d_inner, d_state)), ("D", D, (d_inner,)),
                           ("ssm_state", ssm_state, (batch, d_inner, d_state))):
        if t is not None and _shape(t) != shape:
            raise ValueError(f"mamba1_scan_step: {name} must be {list(shape)}, got {list(_shape(t))}")
    backend = mamba1_scan_step_backend(x.device)
    if backend == "triton":
        reason = mamba1_scan_step_unsupported(x, z, x_dbl, dt_proj_weight, ssm_state, d_state)
        if reason is not None:
            raise ValueError(f"mamba1_scan_step (triton): {reason}; use the reference backend "
                             "(SSM_SUITE_BACKEND_MAMBA1_SCAN_STEP=reference)")
    return _SCAN[backend](ssm_state, x, z, x_dbl, dt_proj_weight, dt_bias, A, D)


def mamba1_scan_step_unsupported(x: torch.Tensor, z: torch.Tensor, x_dbl: torch.Tensor,
                                 dt_proj_weight: torch.Tensor, ssm_state: torch.Tensor, d_state: int) -> str | None:
    """Why the triton backend of :func:`mamba1_scan_step` cannot take these tensors; None when it can."""
    if "triton" not in _SCAN:
        return "triton is not installed"
    dtypes = {x.dtype, z.dtype, dt_proj_weight.dtype} | ({x_dbl.dtype} if x_dbl.dim() == 2 else set())
    if len(dtypes) != 1 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"x, z, x_dbl and dt_proj_weight must share one float16 / bfloat16 / float32 dtype, got {dtypes}"
    if x_dbl.dim() == 3 and x_dbl.dtype != torch.float32:
        return f"x_dbl's partial products must be float32, got {x_dbl.dtype}"
    if ssm_state.dtype not in STATE_DTYPES:
        return f"ssm_state must be float32, bfloat16 or float16, got {ssm_state.dtype}"
    if d_state > 256:
        return f"d_state {d_state} > 256 (the state tile lives in registers)"
    return None


# ----------------------------------------------------------------------------------------------
# The large-batch step's split-K pieces (triton_splitk.py)

OP_PARTIALS = "linear_partials"
OP_ADD_NORM = "add_norm_partials"
OP_CONV = "conv_step_partials"
_PARTIALS = _backends(linear_partials_reference, "kernels.mamba_decode.triton_splitk", "linear_partials_triton")
_ADD_NORM = _backends(add_norm_partials_reference, "kernels.mamba_decode.triton_splitk", "add_norm_partials_triton")
_CONV = _backends(conv_step_partials_reference, "kernels.mamba_decode.triton_splitk", "conv_step_partials_triton")


def linear_partials_backend(device: torch.device | str) -> str:
    """The backend :func:`linear_partials` runs on ``device`` (``triton`` on CUDA by default; forced by
    ``SSM_SUITE_BACKEND_LINEAR_PARTIALS`` or ``forced_backend``)."""
    return choose_backend(OP_PARTIALS, tuple(_PARTIALS), torch.device(device))


def linear_partials_splits(rows: int, out_features: int, in_features: int) -> int:
    """The number of K slices the triton kernel is tuned for at this shape (1 without triton)."""
    if "triton" not in _PARTIALS:
        return 1
    from kernels.mamba_decode.triton_splitk import partials_tiles
    return partials_tiles(rows, out_features, in_features)["S"]


@torch.no_grad()
def linear_partials(x: torch.Tensor, weight: torch.Tensor, splits: int) -> torch.Tensor:
    """``F.linear(x, weight)`` (no bias) left as float32 partial products over ``splits`` slices of the
    input features (``reference.linear_partials_reference``, ``reference.split_bounds``): x [M, K], weight
    [N, K] -> [splits, M, N]. Their consumer sums them in order and rounds to the weights' dtype
    (:func:`add_norm_partials`, :func:`mamba1_scan_step`): a split-K matmul whose reduction costs no
    kernel of its own. Inference only."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_partials: x must be [M, K] and weight [N, K], got {list(_shape(x))} and "
                         f"{list(_shape(weight))}")
    if not isinstance(splits, int) or splits < 1:
        raise ValueError(f"linear_partials: splits must be an int >= 1, got {splits!r}")
    _check_one_device("linear_partials", x, weight)
    return _PARTIALS[linear_partials_backend(x.device)](x, weight, splits)


@torch.no_grad()
def add_norm_partials(partials: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                      norm_eps: float, out_dtype: torch.dtype,
                      residual_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm block's residual add + RMSNorm when the previous block's output is a linear map's
    partial products (:func:`linear_partials`): x = partials [S, B, D] summed in order and rounded to
    ``out_dtype``; residual_out = x + residual in ``residual_dtype`` (default residual's dtype, else
    out_dtype); h = rms_norm(residual_out) * norm_weight in out_dtype. Returns (h [B, D], residual_out
    [B, D]), as ``kernels.norm.rms_norm(x, ..., residual=residual)`` does. Inference only."""
    if partials.dim() != 3 or partials.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"add_norm_partials: partials must be float32 [S, B, D] (from linear_partials), got "
                         f"{partials.dtype} {list(_shape(partials))}")
    shape = tuple(partials.shape[1:])
    if residual is not None and _shape(residual) != shape:
        raise ValueError(f"add_norm_partials: residual must be {list(shape)}, got {list(_shape(residual))}")
    if _shape(norm_weight) != shape[1:]:
        raise ValueError(f"add_norm_partials: norm_weight must be [{shape[1]}], got {list(_shape(norm_weight))}")
    _check_one_device("add_norm_partials", partials, residual, norm_weight)
    if residual_dtype is None:
        residual_dtype = residual.dtype if residual is not None else out_dtype
    backend = choose_backend(OP_ADD_NORM, tuple(_ADD_NORM), partials.device)
    return _ADD_NORM[backend](partials, residual, norm_weight, norm_eps, out_dtype, residual_dtype)


@torch.no_grad()
def conv_step_partials(partials: torch.Tensor, conv_state: torch.Tensor, conv_weight: torch.Tensor,
                       conv_bias: torch.Tensor | None, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A Mamba-1 decoding step's in_proj output given as :func:`linear_partials` [S, B, 2 d_inner]: summed in
    order and rounded to ``out_dtype`` (in_proj's output), split into x | z, and x through the causal conv
    step + SiLU (conv_state [B, d_inner, d_conv - 1] updated in place; conv_weight [d_inner, d_conv]).
    Returns (xc, z), each [B, d_inner] in out_dtype (``reference.conv_step_partials_reference``)."""
    if partials.dim() != 3 or partials.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"conv_step_partials: partials must be float32 [S, B, 2 d_inner] (from linear_partials), "
                         f"got {partials.dtype} {list(_shape(partials))}")
    if conv_weight.dim() != 2:
        raise ValueError(f"conv_step_partials: conv_weight must be [d_inner, d_conv], got {list(_shape(conv_weight))}")
    d_inner, width = conv_weight.shape
    batch = partials.shape[1]
    for name, t, shape in (("partials", partials, (partials.shape[0], batch, 2 * d_inner)),
                           ("conv_state", conv_state, (batch, d_inner, width - 1)), ("conv_bias", conv_bias, (d_inner,))):
        if t is not None and _shape(t) != shape:
            raise ValueError(f"conv_step_partials: {name} must be {list(shape)}, got {list(_shape(t))}")
    _check_one_device("conv_step_partials", partials, conv_state, conv_weight, conv_bias)
    backend = choose_backend(OP_CONV, tuple(_CONV), partials.device)
    return _CONV[backend](partials, conv_state, conv_weight, conv_bias, out_dtype)


# ----------------------------------------------------------------------------------------------
# Mamba-2

OP2 = "mamba2_decode_block"
_BLOCK2 = _backends(mamba2_decode_block_reference, "kernels.mamba_decode.triton_mamba2", "mamba2_decode_block_triton")


def mamba2_decode_backend(device: torch.device | str) -> str:
    """The backend :func:`mamba2_decode_block` runs for tensors on ``device`` (``triton`` on CUDA by
    default; forced by ``SSM_SUITE_BACKEND_MAMBA2_DECODE_BLOCK`` or ``forced_backend``)."""
    return choose_backend(OP2, tuple(_BLOCK2), torch.device(device))


def mamba2_decode_unsupported(d_model: int, d_inner: int, nheads: int, headdim: int, d_state: int, ngroups: int,
                              d_conv: int, dtype: torch.dtype) -> str | None:
    """Why the fused kernels cannot take a Mamba-2 block of this shape and weight dtype; None when they
    can (the reference backend takes every block)."""
    if "triton" not in _BLOCK2:
        return "triton is not installed"
    from kernels.mamba_decode.triton_mamba2 import unsupported
    return unsupported(d_model, d_inner, nheads, headdim, d_state, ngroups, d_conv, dtype)


def _check2(conv_state, ssm_state, x, residual, norm_weight, in_proj_weight, conv_weight, conv_bias, dt_bias, A,
            D, gate_norm_weight, out_proj_weight, residual_sumsq) -> None:
    def need(name: str, t: torch.Tensor | None, shape: tuple[int, ...]) -> None:
        if t is not None and _shape(t) != shape:
            raise ValueError(f"mamba2_decode_block: {name} must be {list(shape)}, got {list(_shape(t))}")

    if x is None and residual is None:
        raise ValueError("mamba2_decode_block: give x (the previous block's output), residual, or both")
    if ssm_state.dim() != 4 or conv_state.dim() != 3 or conv_weight.dim() != 2 or gate_norm_weight.dim() != 1:
        raise ValueError(f"mamba2_decode_block: ssm_state must be [B, H, P, N], conv_state [B, conv_dim, d_conv - 1], "
                         f"conv_weight [conv_dim, d_conv] and gate_norm_weight [d_inner]; got "
                         f"{list(_shape(ssm_state))}, {list(_shape(conv_state))}, {list(_shape(conv_weight))}, "
                         f"{list(_shape(gate_norm_weight))}")
    batch, nheads, headdim, d_state = ssm_state.shape
    conv_dim, width = conv_weight.shape
    d_inner = gate_norm_weight.shape[0]
    d_model = norm_weight.shape[0]
    if nheads * headdim != d_inner:
        raise ValueError(f"mamba2_decode_block: ssm_state's H x P = {nheads} x {headdim} must equal d_inner "
                         f"{d_inner} (gate_norm_weight's length)")
    bc = conv_dim - d_inner
    ngroups = bc // (2 * d_state) if d_state else 0
    if bc <= 0 or ngroups < 1 or bc != 2 * ngroups * d_state or nheads % ngroups:
        raise ValueError(f"mamba2_decode_block: conv_dim {conv_dim} must be d_inner {d_inner} + 2 G N (N = "
                         f"{d_state}) with G dividing nheads {nheads}")
    need("x", x, (batch, d_model))
    need("residual", residual, (batch, d_model))
    need("in_proj_weight", in_proj_weight, (d_inner + conv_dim + nheads, d_model))
    need("conv_state", conv_state, (batch, conv_dim, width - 1))
    need("conv_bias", conv_bias, (conv_dim,))
    need("dt_bias", dt_bias, (nheads,))
    need("A", A, (nheads,))
    if D is not None and _shape(D) not in ((nheads,), (nheads, headdim)):
        raise ValueError(f"mamba2_decode_block: D must be [H={nheads}] or [H, P] = {[nheads, headdim]}, "
                         f"got {list(_shape(D))}")
    need("out_proj_weight", out_proj_weight, (d_model, d_inner))
    _check_stream_and_weights(
        "mamba2_decode_block", batch, x, residual_sumsq,
        {"in_proj": in_proj_weight, "conv": conv_weight, "out_proj": out_proj_weight},
        (conv_state, ssm_state, x, residual, norm_weight, conv_bias, dt_bias, A, D, gate_norm_weight))


@torch.no_grad()
def mamba2_decode_block(
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
    dt_limit: tuple[float, float],
    gate_norm_weight: torch.Tensor,
    gate_norm_eps: float,
    out_proj_weight: torch.Tensor,
    residual_dtype: torch.dtype | None = None,
    residual_sumsq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step of a pre-norm Mamba-2 block (``residual + Mamba2(RMSNorm(residual))``, no
    in/out_proj bias, gate applied before the grouped norm) for one token per row; see
    ``reference.mamba2_decode_block_reference`` for the semantics and shapes.

    x / residual / residual_dtype / residual_sumsq as in :func:`mamba1_decode_block`. conv_state
    [B, conv_dim, d_conv - 1] and ssm_state [B, H, P, N] (float32, or bfloat16 / float16 stored rounded) are
    updated in place. dt_limit: the
    clamp of the discretized dt, (min, max). Returns (residual_out [B, d_model] in residual_dtype,
    sumsq [P, B] float32: summed over P, the squares of residual_out's rows).
    """
    _check2(conv_state, ssm_state, x, residual, norm_weight, in_proj_weight, conv_weight, conv_bias, dt_bias, A, D,
            gate_norm_weight, out_proj_weight, residual_sumsq)
    if residual_dtype is None:
        residual_dtype = residual.dtype if residual is not None else x.dtype
    backend = mamba2_decode_backend(conv_state.device)
    return _BLOCK2[backend](conv_state, ssm_state, x, residual, norm_weight, norm_eps, in_proj_weight, conv_weight,
                            conv_bias, dt_bias, A, D, float(dt_limit[0]), float(dt_limit[1]), gate_norm_weight,
                            gate_norm_eps, out_proj_weight, residual_dtype, residual_sumsq)


# ----------------------------------------------------------------------------------------------
# The step's end: final norm + LM head + float32 logits

OP_LOGITS = "decode_logits"
_LOGITS = _backends(decode_logits_reference, "kernels.mamba_decode.triton_logits", "decode_logits_triton")


def decode_logits_backend(device: torch.device | str) -> str:
    """The backend :func:`decode_logits` runs on ``device`` (``triton`` on CUDA by default; forced by
    ``SSM_SUITE_BACKEND_DECODE_LOGITS`` or ``forced_backend``)."""
    return choose_backend(OP_LOGITS, tuple(_LOGITS), torch.device(device))


def decode_logits_unsupported(batch: int, d_model: int, dtype: torch.dtype) -> str | None:
    """Why the triton backend of :func:`decode_logits` cannot take this batch, width and LM head dtype;
    None when it can (the reference backend takes every one)."""
    if "triton" not in _LOGITS:
        return "triton is not installed"
    from kernels.mamba_decode.triton_logits import unsupported
    return unsupported(batch, d_model, dtype)


@torch.no_grad()
def decode_logits(x: torch.Tensor | None, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                  norm_eps: float, lm_head_weight: torch.Tensor, vocab_size: int,
                  residual_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The end of a decoding step (``reference.decode_logits_reference``): x (the last block's output,
    not yet added; None when ``residual`` holds it) + residual, the final RMSNorm, the LM head
    (lm_head_weight [padded vocab, d_model]) and the first ``vocab_size`` logits, float32 [B, vocab_size].
    residual_dtype: the stream's dtype (default: residual's, else x's)."""
    if x is None and residual is None:
        raise ValueError("decode_logits: give x (the last block's output), residual, or both")
    like = residual if residual is not None else x
    if like.dim() != 2 or (x is not None and residual is not None and x.shape != residual.shape):
        raise ValueError(f"decode_logits: x and residual must be [B, d_model] alike, got "
                         f"{None if x is None else list(_shape(x))} and "
                         f"{None if residual is None else list(_shape(residual))}")
    d_model = like.shape[1]
    if norm_weight.shape != (d_model,) or lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != d_model:
        raise ValueError(f"decode_logits: norm_weight must be [{d_model}] and lm_head_weight [V, {d_model}], got "
                         f"{list(_shape(norm_weight))} and {list(_shape(lm_head_weight))}")
    if not 0 < vocab_size <= lm_head_weight.shape[0]:
        raise ValueError(f"decode_logits: vocab_size {vocab_size} must be in 1..{lm_head_weight.shape[0]} "
                         "(the LM head's rows)")
    if residual_dtype is None:
        residual_dtype = like.dtype
    return _LOGITS[decode_logits_backend(like.device)](x, residual, norm_weight, norm_eps, lm_head_weight,
                                                       vocab_size, residual_dtype)


# ----------------------------------------------------------------------------------------------
# The large-batch step's LM head and greedy pick (triton_head.py)

OP_HEAD = "lm_head_logits"
_HEAD = _backends(lm_head_logits_reference, "kernels.mamba_decode.triton_head", "lm_head_logits_triton")


def lm_head_logits_backend(device: torch.device | str) -> str:
    """The backend :func:`lm_head_logits` runs on ``device`` (``triton`` on CUDA by default; forced by
    ``SSM_SUITE_BACKEND_LM_HEAD_LOGITS`` or ``forced_backend``)."""
    return choose_backend(OP_HEAD, tuple(_HEAD), torch.device(device))


def lm_head_logits_unsupported(hidden: torch.Tensor, lm_head_weight: torch.Tensor) -> str | None:
    """Why the triton backend of :func:`lm_head_logits` cannot take these tensors; None when it can (the
    reference backend takes every one)."""
    if "triton" not in _HEAD:
        return "triton is not installed"
    from kernels.mamba_decode.triton_head import unsupported
    return unsupported(hidden, lm_head_weight)


@torch.no_grad()
def lm_head_logits(hidden: torch.Tensor, lm_head_weight: torch.Tensor, vocab_size: int,
                   greedy_out: torch.Tensor | None = None) -> torch.Tensor:
    """A decoding step's LM head after its final norm (``reference.lm_head_logits_reference``): hidden
    [B, d_model] in the weights' dtype, lm_head_weight [padded vocab, d_model] -> the first ``vocab_size``
    logits, float32 [B, vocab_size], rounded to the weights' dtype first as F.linear's are. With
    ``greedy_out`` (int64 [B]) their argmax goes there too (torch.argmax's: the first maximal index, a NaN
    counting as the maximum): a captured step feeds its own greedy pick to the next. Inference only."""
    if hidden.dim() != 2 or lm_head_weight.dim() != 2 or hidden.shape[1] != lm_head_weight.shape[1]:
        raise ValueError(f"lm_head_logits: hidden must be [B, d_model] and lm_head_weight [V, d_model], got "
                         f"{list(_shape(hidden))} and {list(_shape(lm_head_weight))}")
    if not 0 < vocab_size <= lm_head_weight.shape[0]:
        raise ValueError(f"lm_head_logits: vocab_size {vocab_size} must be in 1..{lm_head_weight.shape[0]} "
                         "(the LM head's rows)")
    if greedy_out is not None and (_shape(greedy_out) != (hidden.shape[0],) or greedy_out.dtype != torch.long):
        raise ValueError(f"lm_head_logits: greedy_out must be int64 [{hidden.shape[0]}], got {greedy_out.dtype} "
                         f"{list(_shape(greedy_out))}")
    _check_one_device("lm_head_logits", hidden, lm_head_weight, greedy_out)
    return _HEAD[lm_head_logits_backend(hidden.device)](hidden, lm_head_weight, vocab_size, greedy_out)
