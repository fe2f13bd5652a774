"""Triton causal conv1d (forward, backward, step) against the reference, on CPU through
TRITON_INTERPRET=1 at small shapes: widths, activation, initial/final states and their gradients,
packed sequences (with an empty one), channel-last strides, L=1, dtypes, determinism, torch.library
checks, and the errors for what the kernels cannot take."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

triton = pytest.importorskip("triton")

from kernels.causal_conv1d import causal_conv1d, causal_conv1d_step  # noqa: E402
from kernels.causal_conv1d.reference import causal_conv1d_reference, causal_conv1d_step_reference  # noqa: E402
from kernels.dispatch import forced_backend  # noqa: E402

try:
    from kernels.causal_conv1d import triton as conv_triton  # noqa: E402
except ImportError as error:  # pragma: no cover - triton present but unusable here (a broken kernel module fails)
    pytest.skip(f"triton kernels cannot load: {error}", allow_module_level=True)

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a GPU", allow_module_level=True)

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(batch, dim, L, width, dtype, states, seed=0, channel_last=False, bias=True):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, L, dim) if channel_last else (batch, dim, L)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    x = (x.transpose(1, 2) if channel_last else x).to(DEVICE)
    weight = (torch.randn(dim, width, generator=gen, dtype=torch.float64) / width**0.5).to(dtype).to(DEVICE)
    b = torch.randn(dim, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE) if bias else None
    init = (torch.randn(states, dim, width - 1, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
            if states else None)
    return x, weight, b, init


def run_both(x, weight, bias, init, activation, cu_seqlens=None):
    """Outputs and gradients (x, weight, bias, init) of the triton op and of the float64 reference."""
    results = []
    gen = torch.Generator().manual_seed(1)
    grads_out = None
    for backend in ("triton", "reference"):
        leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, weight, bias, init)]
        leaves[0] = x.detach().requires_grad_()  # x's own strides (clone makes a gapped view contiguous)
        if backend == "reference":
            leaves = [None if t is None else t.detach().double().requires_grad_() for t in leaves]
        with forced_backend(backend, "causal_conv1d"):
            y, final = causal_conv1d(leaves[0], leaves[1], leaves[2], activation, leaves[3], True, cu_seqlens)
        if grads_out is None:
            grads_out = (torch.randn(y.shape, generator=gen, dtype=torch.float64),
                         torch.randn(final.shape, generator=gen, dtype=torch.float64))
        present = [t for t in leaves if t is not None]
        grads = torch.autograd.grad([y, final], present, [grads_out[0].to(y), grads_out[1].to(final)])
        results.append(((y, final), grads))
    return results


TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_matches_reference_with_states(width, activation):
    x, weight, bias, init = make(2, 5, 9, width, torch.float64, states=2)
    (ours, g_ours), (ref, g_ref) = run_both(x, weight, bias, init, activation)
    for a, b in zip(ours, ref):
        assert rel(a, b) < 1e-12
    assert len(g_ours) == 4
    for a, b in zip(g_ours, g_ref):
        assert rel(a, b) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_no_bias_no_state(dtype):
    x, weight, _, _ = make(3, 6, 11, 4, dtype, states=0, bias=False)
    (ours, g_ours), (ref, g_ref) = run_both(x, weight, None, None, "silu")
    assert ours[0].dtype == dtype and ours[1].dtype == torch.float32
    for a, b in zip(ours, ref):
        assert rel(a, b) < TOL[dtype]
    for a, b in zip(g_ours, g_ref):
        assert rel(a, b) < TOL[dtype]


def test_varlen_with_empty_and_short_sequences():
    # lengths 1 and 2 (< W-1) and an empty one: states pass through / partly through
    lengths = [3, 1, 0, 6, 2, 5]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).to(DEVICE)
    x, weight, bias, init = make(1, 4, sum(lengths), 4, torch.float64, states=len(lengths))
    (ours, g_ours), (ref, g_ref) = run_both(x, weight, bias, init, "silu", cu_seqlens=cu)
    for a, b in zip(ours, ref):
        assert rel(a, b) < 1e-12
    for a, b in zip(g_ours, g_ref):
        assert rel(a, b) < 1e-12


def test_varlen_equals_separate_runs_without_state():
    lengths = [4, 7]
    cu = torch.tensor([0, 4, 11], dtype=torch.int64, device=DEVICE)
    x, weight, bias, _ = make(1, 3, 11, 3, torch.float32, states=0)
    with forced_backend("triton", "causal_conv1d"):
        packed = causal_conv1d(x, weight, bias, "silu", cu_seqlens=cu)
        parts = [causal_conv1d(x[..., s:e], weight, bias, "silu") for s, e in ((0, 4), (4, 11))]
    assert rel(packed, torch.cat(parts, -1)) < 1e-6
    assert sum(lengths) == packed.shape[-1]


def test_channel_last_strides_and_length_one():
    x, weight, bias, init = make(2, 5, 7, 4, torch.float64, states=2, channel_last=True)
    assert x.stride(1) == 1
    (ours, g_ours), (ref, g_ref) = run_both(x, weight, bias, init, "silu")
    assert rel(ours[0], ref[0]) < 1e-12 and rel(g_ours[0], g_ref[0]) < 1e-12
    assert g_ours[0].stride() == x.stride()  # dx keeps x's layout
    x1, weight, bias, init = make(3, 4, 1, 4, torch.float64, states=3)
    (ours, g_ours), (ref, g_ref) = run_both(x1, weight, bias, init, None)
    for a, b in list(zip(ours, ref)) + list(zip(g_ours, g_ref)):
        assert rel(a, b) < 1e-12


@pytest.mark.parametrize("sms", [1, 64])
def test_chunked_backward_reduction_and_determinism(monkeypatch, sms):
    # Force several length chunks per row (the partial dweight/dbias rows; with 1 "SM" each program
    # also loops over several blocks), then re-run: bit-identical.
    monkeypatch.setattr(conv_triton, "_num_sms", lambda device: sms)
    monkeypatch.setattr(conv_triton, "_tiles", lambda x: (4, 16, 1))
    x, weight, bias, init = make(2, 5, 70, 4, torch.float32, states=2)
    (ours, g_ours), (ref, g_ref) = run_both(x, weight, bias, init, "silu")
    for a, b in zip(g_ours, g_ref):
        assert rel(a, b) < 1e-5
    (_, g_again), _ = run_both(x, weight, bias, init, "silu")
    assert all(torch.equal(a, b) for a, b in zip(g_ours, g_again))


@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_step_updates_state_in_place(width, dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    state = torch.randn(3, 5, width - 1, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    weight = torch.randn(5, width, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    bias = torch.randn(5, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    ours_state, ref_state = state.clone(), state.clone()
    with forced_backend("triton", "causal_conv1d_step"):
        y = causal_conv1d_step(x, ours_state, weight, bias, "silu")
    y_ref = causal_conv1d_step_reference(x, ref_state, weight, bias, "silu")
    assert rel(y, y_ref) < (1e-12 if dtype == torch.float64 else 1e-2)
    assert torch.equal(ours_state, ref_state)
    # The step continues a sequence: equal to the last output of the full conv.
    full = causal_conv1d_reference(x.unsqueeze(-1).double(), weight.double(), bias.double(), "silu",
                                   state.double())
    assert rel(y, full[..., -1]) < (1e-12 if dtype == torch.float64 else 1e-2)


@pytest.fixture
def small_col_tiles(monkeypatch):
    """Column kernels with 4 channels x 2 groups of 8 positions per program and a few programs per
    "SM": several groups, channel blocks and length chunks (partial dweight rows) in small cases."""
    for key in ("fwd_l", "fwd_cl", "bwd_l", "bwd_cl"):
        monkeypatch.setitem(conv_triton.COL_TILES, key, (4, 2, 1))
    monkeypatch.setattr(conv_triton, "_num_sms", lambda device: 2)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x [B, D, L] re-laid: "l" contiguous, "cl" dense channel-last, "proj" the channel-last half of a
    [B, L, 2D] buffer (a Mamba layer's conv input: neither dense nor contiguous)."""
    if layout == "l":
        return x.contiguous()
    if layout == "cl":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    buf = torch.zeros(x.shape[0], x.shape[2], 2 * x.shape[1], dtype=x.dtype, device=x.device)
    buf[..., : x.shape[1]] = x.transpose(1, 2)
    return buf[..., : x.shape[1]].transpose(1, 2)


@pytest.mark.parametrize("layout", ["l", "cl", "proj"])
@pytest.mark.parametrize("width, L, activation", [(4, 37, "silu"), (2, 16, None), (8, 5, "silu"), (3, 1, None)])
def test_column_kernels_match_reference(small_col_tiles, layout, width, L, activation):
    # No initial state and no packed sequences: the column kernels (both layouts), with the final state
    # and its gradient, ragged last groups, L < 8 and L < W-1.
    x, weight, bias, _ = make(2, 6, L, width, torch.float64, states=0, bias=width != 2)
    x = _layout(x, layout)
    kind = conv_triton._column_form(x, None, None)
    assert kind == ("cl" if layout != "l" and L > 1 else "l")
    (ours, g_ours), (ref, g_ref) = run_both(x, weight, bias, None, activation)
    for a, b in list(zip(ours, ref)) + list(zip(g_ours, g_ref)):
        assert rel(a, b) < 1e-12
    if kind == "cl":  # y and dx come back channel-last (the layer's transposes are free)
        assert ours[0].stride(1) == 1 and g_ours[0].stride(1) == 1


@pytest.mark.parametrize("layout", ["l", "cl", "proj"])
@pytest.mark.parametrize("width, L", [(4, 37), (2, 16), (8, 5), (3, 1), (8, 20)])
def test_column_forward_takes_an_initial_state(small_col_tiles, layout, width, L):
    # A prefill from a cached state: the forward column kernel reads positions -(W-1)..-1 from the
    # initial state (L < W-1 and L < 8 included); the backward still runs the general kernels.
    x, weight, bias, init = make(2, 6, L, width, torch.float64, states=2, bias=width != 2)
    x = _layout(x, layout)
    assert conv_triton._column_form(x, init, None, forward=True) is not None
    assert conv_triton._column_form(x, init, None) is None
    (ours, g_ours), (ref, g_ref) = run_both(x, weight, bias, init, "silu")
    for a, b in list(zip(ours, ref)) + list(zip(g_ours, g_ref)):
        assert rel(a, b) < 1e-12
    with torch.no_grad(), forced_backend("triton", "causal_conv1d"):
        y, final = causal_conv1d(x.to(torch.bfloat16), weight.to(torch.bfloat16), None, "silu",
                                 init.to(torch.bfloat16), True)
    with forced_backend("reference", "causal_conv1d"):
        y_ref, final_ref = causal_conv1d(x, weight, None, "silu", init, True)
    assert rel(y, y_ref) < TOL[torch.bfloat16] and rel(final, final_ref) < TOL[torch.bfloat16]


def test_column_kernels_dtypes_and_determinism(small_col_tiles):
    x, weight, bias, _ = make(2, 10, 29, 4, torch.bfloat16, states=0)
    x = _layout(x, "proj")
    (ours, g_ours), (ref, g_ref) = run_both(x, weight, bias, None, "silu")
    for a, b in list(zip(ours, ref)) + list(zip(g_ours, g_ref)):
        assert rel(a, b) < TOL[torch.bfloat16]
    # the same gradients again, bit for bit (partial dweight rows, no atomics)
    leaves = [x.detach().requires_grad_(), weight.detach().clone().requires_grad_(),
              bias.detach().clone().requires_grad_()]
    with forced_backend("triton", "causal_conv1d"):
        y, final = causal_conv1d(*leaves, "silu", None, True)
    gen = torch.Generator().manual_seed(1)
    grads_out = (torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y),
                 torch.randn(final.shape, generator=gen, dtype=torch.float64).to(final))
    again = torch.autograd.grad([y, final], leaves, grads_out)
    assert all(torch.equal(a, b) for a, b in zip(g_ours, again))


def test_errors_name_the_limit():
    x, weight, bias, _ = make(1, 3, 5, 9, torch.float32, states=0)
    with forced_backend("triton", "causal_conv1d"), pytest.raises(ValueError, match="width 9"):
        causal_conv1d(x, weight, bias)
    x, weight, bias, _ = make(2, 3, 5, 4, torch.float32, states=0)
    cu = torch.tensor([0, 5], device=DEVICE)
    with forced_backend("triton", "causal_conv1d"), pytest.raises(ValueError, match="batch 1"):
        causal_conv1d(x, weight, bias, cu_seqlens=cu)
    with forced_backend("triton", "causal_conv1d"), pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, weight, bias, activation="relu")


def test_library_opcheck_and_fake():
    x, weight, bias, init = make(2, 3, 6, 4, torch.float32, states=2)
    torch.library.opcheck(torch.ops.ssm_suite.causal_conv1d_fwd.default,
                          (x, weight, bias, True, init, True, None),
                          test_utils=("test_schema", "test_faketensor"))
    # the column kernels, on a channel-last view: the fake impl's strides match the real output's
    xv = x.transpose(1, 2).contiguous().transpose(1, 2)
    for args in ((xv, weight, bias, True, None, True, None), (x, weight, None, False, None, False, None)):
        torch.library.opcheck(torch.ops.ssm_suite.causal_conv1d_fwd.default, args,
                              test_utils=("test_schema", "test_faketensor"))
    state = torch.randn(2, 3, 3, device=DEVICE)
    torch.library.opcheck(torch.ops.ssm_suite.causal_conv1d_step.default,
                          (x[..., 0].contiguous(), state, weight, bias, False),
                          test_utils=("test_schema", "test_faketensor"))
