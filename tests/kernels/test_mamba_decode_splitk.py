"""The large-batch decoding step's split-K pieces (kernels/mamba_decode/triton_splitk.py; Triton on CPU
through TRITON_INTERPRET=1 at small shapes) against their references: ``linear_partials`` (each partial
product, odd shapes, empty slices, float32 / bfloat16 / float16), ``add_norm_partials`` (with and without
a residual, 16-bit outputs and streams), ``conv_step_partials`` (widths 2-4, bias or not, the conv window
updated in place), the scan step on x_proj's partials; the references against the ops they stand for
(F.linear, rms_norm, causal_conv1d_step); torch.library checks; errors. Step-level equality with the
cuBLAS path is in tests/core/test_decode_step.py; races only a GPU shows: scripts/gpu_checks/mamba_decode.py
(--split-k)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernels.causal_conv1d import causal_conv1d_step
from kernels.dispatch import forced_backend
from kernels.mamba_decode import (add_norm_partials, conv_step_partials, linear_partials, linear_partials_splits,
                                  mamba1_scan_step)
from kernels.mamba_decode.reference import split_bounds, sum_partials
from kernels.norm import rms_norm

# The shared helpers beside this file (pytest imports tests with --import-mode=importlib).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_block import rel, rnd, triton_kernels  # noqa: E402

triton_splitk = triton_kernels("kernels.mamba_decode.triton_splitk")


def both(op: str, fn, *args):
    """fn(*args) on the triton and on the reference backend of ``op``."""
    out = []
    for backend in ("triton", "reference"):
        with forced_backend(backend, op):
            out.append(fn(*args))
    return out


def test_split_bounds():
    assert split_bounds(1536, 4) == [(0, 384), (384, 768), (768, 1152), (1152, 1536)]
    assert split_bounds(100, 3) == [(0, 48), (48, 96), (96, 100)]  # aligned starts, a short last slice
    assert split_bounds(10, 3) == [(0, 10), (10, 10), (10, 10)]  # empty slices are zero partials
    with pytest.raises(ValueError, match="splits"):
        split_bounds(10, 0)


@pytest.mark.parametrize("m,n,k,splits", [(5, 33, 70, 1), (5, 33, 70, 2), (17, 80, 150, 3), (64, 24, 96, 4),
                                          (3, 7, 10, 3)])
def test_linear_partials_matches_reference(m, n, k, splits):
    x, w = rnd(m, k, seed=1), rnd(n, k, seed=2) / k**0.5
    got, want = both("linear_partials", linear_partials, x, w, splits)
    assert got.shape == (splits, m, n) and got.dtype == torch.float32
    for s, (lo, hi) in enumerate(split_bounds(k, splits)):
        assert rel(got[s], want[s]) < 1e-6 if hi > lo else torch.equal(got[s], torch.zeros_like(got[s]))
    assert rel(sum_partials(got, torch.float32), F.linear(x, w)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_partials_sixteen_bit_inputs(dtype):
    x, w = rnd(9, 100, seed=3, dtype=dtype), (rnd(40, 100, seed=4) / 10).to(dtype)
    got, want = both("linear_partials", linear_partials, x, w, 2)
    assert rel(got, want) < 1e-6  # products of 16-bit values are exact in float32
    total = sum_partials(got, dtype)
    assert total.dtype == dtype and rel(total, F.linear(x.double(), w.double())) < 1e-2


def test_linear_partials_takes_strided_rows():
    x = rnd(6, 2 * 50, seed=5)[:, ::2]  # feature stride 2: copied to unit stride
    w = rnd(20, 50, seed=6)
    got, want = both("linear_partials", linear_partials, x, w, 2)
    assert rel(got, want) < 1e-6


@pytest.mark.parametrize("out_dtype,residual_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                      (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_norm_partials_matches_reference(out_dtype, residual_dtype, with_residual):
    parts = rnd(3, 5, 48, seed=7)
    residual = (2 * rnd(5, 48, seed=8)).to(residual_dtype) if with_residual else None
    weight = (1 + 0.2 * rnd(48, seed=9)).to(out_dtype)
    (h, r), (h_ref, r_ref) = both("add_norm_partials", add_norm_partials, parts, residual, weight, 1e-5, out_dtype,
                                  residual_dtype)
    assert h.dtype == out_dtype and r.dtype == residual_dtype
    tol = 1e-6 if out_dtype == residual_dtype == torch.float32 else 1e-2
    assert rel(h, h_ref) < tol and rel(r, r_ref) < tol
    # The reference is the op-by-op norm of the summed, rounded partials.
    x = sum_partials(parts, out_dtype)
    h_op, r_op = rms_norm(x, weight, 1e-5, residual=residual, residual_out_dtype=residual_dtype)
    assert torch.equal(h_ref, h_op) and torch.equal(r_ref, r_op)


@pytest.mark.parametrize("width,bias", [(2, True), (3, False), (4, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_step_partials_matches_reference(width, bias, dtype):
    batch, d_inner = 3, 150  # 2 d_inner = 300 columns: a partial last program, x and z in one program
    parts = rnd(2, batch, 2 * d_inner, seed=10)
    state = rnd(batch, d_inner, width - 1, seed=11, dtype=dtype)
    weight = (rnd(d_inner, width, seed=12) / 2).to(dtype)
    b = (0.1 * rnd(d_inner, seed=13)).to(dtype) if bias else None
    states = [state.clone(), state.clone()]
    out = []
    for backend, st in zip(("triton", "reference"), states):
        with forced_backend(backend, "conv_step_partials"):
            out.append(conv_step_partials(parts, st, weight, b, dtype))
    (xc, z), (xc_ref, z_ref) = out
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert xc.dtype == dtype and rel(xc, xc_ref) < tol and torch.equal(z, z_ref)
    assert torch.equal(states[0], states[1])  # the shifted window holds rounded in_proj outputs
    # The reference: in_proj's rounded output through the conv step op.
    x, z_op = sum_partials(parts, dtype).chunk(2, dim=-1)
    st = state.clone()
    assert torch.equal(xc_ref, causal_conv1d_step(x, st, weight, b, "silu")) and torch.equal(z_ref, z_op)


@pytest.mark.parametrize("batch", [3, 17])  # GEMV and tl.dot tiles of the scan kernel
def test_scan_step_sums_x_proj_partials(batch):
    d_inner, d_state, dt_rank = 64, 8, 4
    x, z = rnd(batch, d_inner, seed=14), rnd(batch, d_inner, seed=15)
    x_proj = rnd(dt_rank + 2 * d_state, d_inner, seed=16) / 8
    parts = linear_partials(x, x_proj, 3)
    args = dict(dt_proj_weight=rnd(d_inner, dt_rank, seed=17) / 2, dt_bias=0.5 * rnd(d_inner, seed=18) - 2,
                A=-torch.exp(0.5 * rnd(d_inner, d_state, seed=19)), D=rnd(d_inner, seed=20))
    state0 = rnd(batch, d_inner, d_state, seed=21)
    results = []
    for backend in ("triton", "reference"):
        for x_dbl in (parts, sum_partials(parts, torch.float32)):
            state = state0.clone()
            with forced_backend(backend, "mamba1_scan_step"):
                results.append((mamba1_scan_step(state, x, z, x_dbl, **args), state))
    y_ref, state_ref = results[3]  # the reference on the summed x_dbl
    for y, state in results[:3]:
        assert rel(y, y_ref) < 2e-5 and rel(state, state_ref) < 2e-5
    with pytest.raises(ValueError, match="float32"):
        mamba1_scan_step(state0.clone(), x, z, parts.to(torch.bfloat16), **args)


def test_splits_rule():
    # mamba1-130m at batch 64: in_proj 2 slices, x_proj and out_proj 4 (docs/kernels/mamba_decode.md).
    assert [linear_partials_splits(64, n, k) for n, k in ((3072, 768), (80, 1536), (768, 1536))] == [2, 4, 4]
    assert linear_partials_splits(64, 64, 100) == 1  # too short to split
    assert triton_splitk.partials_tiles(5, 80, 1536)["BM"] == 16


def test_library_op_checks():
    x, w = rnd(5, 40, seed=22), rnd(24, 40, seed=23)
    torch.library.opcheck(triton_splitk.linear_partials_op, (x, w, 2),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    parts, res, weight = rnd(2, 5, 24, seed=24), rnd(5, 24, seed=25), rnd(24, seed=26)
    torch.library.opcheck(triton_splitk.add_norm_partials_op, (parts, res, weight, 1e-5, torch.float32, torch.float32),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    torch.library.opcheck(triton_splitk.conv_step_partials_op,
                          (rnd(2, 5, 48, seed=27), rnd(5, 24, 3, seed=28), rnd(24, 4, seed=29), None, torch.float32),
                          test_utils=("test_schema", "test_faketensor"))


def test_errors():
    x, w = rnd(4, 16), rnd(8, 16)
    with pytest.raises(ValueError, match=r"x must be \[M, K\]"):
        linear_partials(x, w[:, :-1], 2)
    with pytest.raises(ValueError, match="splits must be"):
        linear_partials(x, w, 0)
    with forced_backend("triton", "linear_partials"), pytest.raises(ValueError, match="share one"):
        linear_partials(x, w.double(), 2)
    parts = rnd(2, 4, 16)
    with pytest.raises(ValueError, match="float32"):
        add_norm_partials(parts.half(), None, rnd(16), 1e-5, torch.float32)
    with pytest.raises(ValueError, match="residual must be"):
        add_norm_partials(parts, rnd(4, 15), rnd(16), 1e-5, torch.float32)
    with pytest.raises(ValueError, match="norm_weight must be"):
        add_norm_partials(parts, None, rnd(15), 1e-5, torch.float32)
    with pytest.raises(ValueError, match="conv_state must be"):
        conv_step_partials(rnd(2, 4, 16), rnd(4, 8, 2), rnd(8, 4), None, torch.float32)
    with pytest.raises(ValueError, match="partials must be"):
        conv_step_partials(rnd(2, 4, 15), rnd(4, 8, 3), rnd(8, 4), None, torch.float32)
    with forced_backend("triton", "conv_step_partials"), pytest.raises(ValueError, match="width 9"):
        conv_step_partials(rnd(2, 4, 16), rnd(4, 8, 8), rnd(8, 9), None, torch.float32)
