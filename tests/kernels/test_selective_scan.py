"""Selective scan: the chunked form against the sequential reference, varlen, the one-token step."""

from __future__ import annotations

import pytest
import torch

from kernels.dispatch import choose_backend, forced_backend
from kernels.selective_scan import selective_scan, selective_scan_step
from kernels.selective_scan.chunked import selective_scan_chunked
from kernels.selective_scan.reference import selective_scan_reference

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make_inputs(batch=2, dim=6, length=33, dstate=4, groups_b=None, groups_c=None, dtype=torch.float64,
                seed=0, nseq=None, with_z=True, with_D=True, with_bias=True, with_initial=True) -> dict:
    """Inputs in the ranges a Mamba layer sees: dt = softplus(delta + bias) around 0.01-1, A < 0 spread
    over two decades. ``groups_*``: None for shared B / C, else the number of groups."""
    gen = torch.Generator().manual_seed(seed)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def randn(*shape, scale=1.0, to=dtype):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(to)

    def bc(groups):
        return randn(batch, dstate, length) if groups is None else randn(batch, groups, dstate, length)

    return {
        "u": randn(batch, dim, length),
        "delta": randn(batch, dim, length, scale=0.5),
        "A": -torch.exp(randn(dim, dstate, to=torch.float64)).to(state_dtype),
        "B": bc(groups_b),
        "C": bc(groups_c),
        "D": randn(dim) if with_D else None,
        "z": randn(batch, dim, length) if with_z else None,
        "delta_bias": randn(dim, scale=0.5) - 1.0 if with_bias else None,
        "initial_state": randn(nseq or batch, dim, dstate, to=state_dtype) if with_initial else None,
    }


def run(fn, inputs: dict, grads: bool, softplus: bool = True, cu_seqlens=None, **kwargs):
    """Forward (y, final state) and, with ``grads``, the gradients of every tensor input under a fixed
    random projection of both outputs."""
    leaves = {k: (v.detach().clone().requires_grad_(grads) if v is not None else None) for k, v in inputs.items()}
    y, final = fn(**leaves, delta_softplus=softplus, return_final_state=True, cu_seqlens=cu_seqlens, **kwargs)
    if not grads:
        return y, final, {}
    gen = torch.Generator().manual_seed(123)
    wy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    wf = torch.randn(final.shape, generator=gen, dtype=torch.float64).to(final.dtype)
    loss = (y * wy).sum() + (final * wf).sum()
    present = {k: v for k, v in leaves.items() if v is not None}
    values = torch.autograd.grad(loss, list(present.values()))
    return y, final, dict(zip(present, values))


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def compare(inputs: dict, tol: float, chunk_size: int, grads: bool = True, cu_seqlens=None, softplus=True):
    expected = run(selective_scan_reference, inputs, grads, softplus, cu_seqlens)
    actual = run(selective_scan_chunked, inputs, grads, softplus, cu_seqlens, chunk_size=chunk_size)
    assert_close("y", actual[0], expected[0], tol)
    assert_close("final_state", actual[1], expected[1], tol)
    assert set(actual[2]) == set(expected[2])
    for name in expected[2]:
        assert_close(f"grad {name}", actual[2][name], expected[2][name], tol)
    return actual


# --- chunked == reference, float64 ---------------------------------------------------------------------

@pytest.mark.parametrize("length", [1, 7, 65, 130])
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_chunked_matches_reference_all_options(length, chunk_size):
    compare(make_inputs(length=length, seed=length), tol=1e-12, chunk_size=chunk_size)


@pytest.mark.parametrize(
    "options",
    [
        dict(with_z=False, with_D=False, with_bias=False, with_initial=False),
        dict(with_z=False, with_D=True, with_bias=True, with_initial=False),
        dict(with_z=True, with_D=False, with_bias=False, with_initial=True),
    ],
    ids=["bare", "D+bias", "z+initial"],
)
@pytest.mark.parametrize("softplus", [True, False])
def test_chunked_matches_reference_option_subsets(options, softplus):
    inputs = make_inputs(length=41, seed=1, **options)
    if not softplus:  # dt = delta + bias must stay positive without the softplus
        inputs["delta"] = inputs["delta"].abs() + 0.05
        if inputs["delta_bias"] is not None:
            inputs["delta_bias"] = inputs["delta_bias"].abs()
    compare(inputs, tol=1e-12, chunk_size=8, softplus=softplus)


@pytest.mark.parametrize("groups_b,groups_c", [(2, 2), (3, 3), (3, None), (None, 6)])
@pytest.mark.parametrize("length", [1, 37])
def test_chunked_matches_reference_grouped_bc(groups_b, groups_c, length):
    inputs = make_inputs(dim=6, length=length, groups_b=groups_b, groups_c=groups_c, seed=2)
    compare(inputs, tol=1e-12, chunk_size=16)


def test_channel_blocks_straddling_groups(monkeypatch):
    """Small work buffers force several channel blocks per group, and blocks of several whole groups."""
    import kernels.selective_scan.chunked as chunked

    per_channel = 16 * 6 * 4  # chunk 16 x rows (2 batch rows x 3 chunks of L=33) x N=4
    for block_elements, expect_m in ((1, 1), (3 * 9 * per_channel, 3)):
        monkeypatch.setattr(chunked, "_BLOCK_ELEMENTS", block_elements)
        blocks = chunked._channel_blocks(12, 4, per_channel, buffers=3)
        assert max(m for *_, m in blocks) == expect_m and blocks[-1][1] == 12
        compare(make_inputs(dim=12, length=33, groups_b=4, groups_c=4, seed=3), tol=1e-12, chunk_size=16)
        compare(make_inputs(dim=12, length=33, seed=3), tol=1e-12, chunk_size=16)


def test_only_final_state_used():
    """A loss on the final state alone: y's gradient is zero, the state's flows back to every input."""
    inputs = make_inputs(length=50, seed=4)
    grads = []
    for fn, kwargs in ((selective_scan_reference, {}), (selective_scan_chunked, {"chunk_size": 16})):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        _, final = fn(**leaves, delta_softplus=True, return_final_state=True, **kwargs)
        wrt = [leaves[k] for k in ("u", "delta", "A", "B", "initial_state")]
        grads.append(torch.autograd.grad(final.pow(2).sum(), wrt))
    for actual, expected in zip(grads[1], grads[0]):
        assert_close("grad", actual, expected, 1e-12)


def test_strong_decay_stays_finite():
    """Large dt * |A| (decays far below float range within a chunk) must neither overflow nor lose the
    recent inputs: the chunked form never exponentiates a positive cumulative sum."""
    inputs = make_inputs(length=200, seed=5, with_bias=False)
    inputs["A"] = -torch.full_like(inputs["A"], 500.0)
    inputs["delta"] = torch.full_like(inputs["delta"], 5.0)
    for dtype in (torch.float64, torch.float32):
        cast = {k: (v.to(dtype) if v is not None and k != "A" else v) for k, v in inputs.items()}
        y, final, grads = run(selective_scan_chunked, cast, grads=True, chunk_size=64)
        assert torch.isfinite(y).all() and torch.isfinite(final).all()
        assert all(torch.isfinite(g).all() for g in grads.values())
    compare(inputs, tol=1e-12, chunk_size=64)


# --- lower precision -------------------------------------------------------------------------------------

def _as_double(inputs: dict) -> dict:
    return {k: (v.double() if v is not None else None) for k, v in inputs.items()}


def test_float32_against_float64_reference():
    inputs = make_inputs(length=130, groups_b=2, groups_c=2, dtype=torch.float32, seed=6)
    y64, final64, grads64 = run(selective_scan_reference, _as_double(inputs), grads=True)
    y, final, grads = run(selective_scan_chunked, inputs, grads=True, chunk_size=32)
    assert y.dtype == torch.float32 and final.dtype == torch.float32
    assert_close("y", y, y64, 1e-5)
    assert_close("final_state", final, final64, 1e-5)
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype
        assert_close(f"grad {name}", grad, grads64[name], 1e-4)


def test_bfloat16_forward():
    inputs = make_inputs(length=65, dtype=torch.bfloat16, seed=7)
    y64, final64, _ = run(selective_scan_reference, _as_double(inputs), grads=False)
    for fn, kwargs in ((selective_scan_chunked, {"chunk_size": 16}), (selective_scan_reference, {})):
        y, final, _ = run(fn, inputs, grads=False, **kwargs)
        assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
        assert_close("y", y, y64, 2e-2)  # bf16 output rounding; the computation itself runs in float32
        assert_close("final_state", final, final64, 1e-5)


# --- packed sequences ------------------------------------------------------------------------------------

def _pack(inputs: dict, lengths: list[int]) -> tuple[dict, torch.Tensor]:
    """Per-sequence inputs [S, ...] of length max(lengths) -> one packed row and cu_seqlens."""
    packed = {}
    for name, value in inputs.items():
        if value is None or name in ("A", "D", "delta_bias", "initial_state"):
            packed[name] = value
        else:
            packed[name] = torch.cat([value[s : s + 1, ..., :n] for s, n in enumerate(lengths)], dim=-1)
    cu = torch.tensor([0] + lengths).cumsum(0)
    return packed, cu


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("grouped", [False, True])
def test_varlen_equals_separate_sequences(backend, grouped):
    lengths = [5, 1, 37, 16, 0, 20]
    groups = 3 if grouped else None
    inputs = make_inputs(batch=len(lengths), length=max(lengths), groups_b=groups, groups_c=groups, seed=8)
    packed, cu = _pack(inputs, lengths)
    fn = selective_scan_reference if backend == "reference" else selective_scan_chunked
    kwargs = {} if backend == "reference" else {"chunk_size": 16}
    y, final, grads = run(fn, packed, grads=True, cu_seqlens=cu, **kwargs)
    ys = []
    for s, n in enumerate(lengths):
        one = {k: (v if v is None or k in ("A", "D", "delta_bias") else
                   v[s : s + 1] if k == "initial_state" else v[s : s + 1, ..., :n]) for k, v in inputs.items()}
        if n == 0:
            assert_close(f"final state {s}", final[s], inputs["initial_state"][s], 0.0)
            continue
        y_s, final_s, _ = run(fn, one, grads=False, **kwargs)
        ys.append(y_s)
        assert_close(f"final state {s}", final[s : s + 1], final_s, 1e-13)
    assert_close("y", y, torch.cat(ys, dim=-1), 1e-13)
    if backend == "chunked":  # and the gradients agree with the reference's, per sequence
        _, _, grads_ref = run(selective_scan_reference, packed, grads=True, cu_seqlens=cu)
        for name in grads_ref:
            assert_close(f"grad {name}", grads[name], grads_ref[name], 1e-12)


def test_varlen_without_initial_state():
    lengths = [9, 30, 3]
    inputs = make_inputs(batch=3, length=30, seed=9, with_initial=False)
    packed, cu = _pack(inputs, lengths)
    compare(packed, tol=1e-12, chunk_size=8, cu_seqlens=cu)


# --- one-token step --------------------------------------------------------------------------------------

@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_steps_equal_full_scan(groups, dtype):
    inputs = make_inputs(length=12, groups_b=groups, groups_c=groups, dtype=dtype, seed=10)
    y_full, final_full = selective_scan(**inputs, delta_softplus=True, return_final_state=True)
    state = inputs["initial_state"].clone()
    ys = []
    for t in range(inputs["u"].shape[-1]):
        ys.append(selective_scan_step(
            state, inputs["u"][..., t], inputs["delta"][..., t], inputs["A"], inputs["B"][..., t],
            inputs["C"][..., t], inputs["D"], inputs["z"][..., t], inputs["delta_bias"], True))
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    assert_close("y", torch.stack(ys, dim=-1), y_full, tol)
    assert_close("state", state, final_full, tol)
    assert ys[0].dtype == dtype and state.dtype == inputs["initial_state"].dtype


def test_step_after_prefill_bf16_state_stays_float32():
    inputs = make_inputs(batch=1, length=9, dtype=torch.bfloat16, seed=11)
    y_full, _ = selective_scan(**inputs, delta_softplus=True, return_final_state=True)
    prefix = {k: (v[..., :8] if k in ("u", "delta", "B", "C", "z") else v) for k, v in inputs.items()}
    _, state = selective_scan(**prefix, delta_softplus=True, return_final_state=True)
    assert state.dtype == torch.float32
    y_step = selective_scan_step(state, inputs["u"][..., 8], inputs["delta"][..., 8], inputs["A"],
                                 inputs["B"][..., 8], inputs["C"][..., 8], inputs["D"], inputs["z"][..., 8],
                                 inputs["delta_bias"], True)
    assert y_step.dtype == torch.bfloat16
    assert_close("y", y_step, y_full[..., 8], 1e-2)


# --- dispatch and validation -----------------------------------------------------------------------------

def test_dispatch_defaults_to_chunked_on_cpu():
    import kernels.selective_scan as op

    assert choose_backend("selective_scan", tuple(op._FORWARD), torch.device("cpu")) == "chunked"
    inputs = make_inputs(length=20, seed=12)
    y_default = selective_scan(**inputs, delta_softplus=True)
    with forced_backend("reference", "selective_scan"):
        y_ref = selective_scan(**inputs, delta_softplus=True)
    assert_close("y", y_default, y_ref, 1e-12)
    assert not torch.equal(y_default, y_ref)  # two different computations, equal to rounding


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(u=torch.zeros(2, 6)), "u must be"),
        (dict(delta=torch.zeros(2, 6, 5)), "delta must"),
        (dict(A=torch.zeros(5, 4)), "A must be"),
        (dict(B=torch.zeros(2, 3, 20)), "B must be"),
        (dict(C=torch.zeros(2, 4, 4, 20)), "groups, which must divide"),
        (dict(B=torch.zeros(2, 2, 4, 20), C=torch.zeros(2, 3, 4, 20)), "same G"),
        (dict(D=torch.zeros(5)), "D must be"),
        (dict(delta_bias=torch.zeros(6, 1)), "delta_bias must be"),
        (dict(z=torch.zeros(2, 6, 19)), "z must have"),
        (dict(initial_state=torch.zeros(2, 6, 5)), "initial_state must be"),
    ],
)
def test_invalid_shapes_raise(change, message):
    inputs = make_inputs(length=20, seed=13)
    inputs.update(change)
    with pytest.raises(ValueError, match=message):
        selective_scan(**inputs, delta_softplus=True)


def test_invalid_cu_seqlens_raise():
    inputs = make_inputs(batch=1, length=10, seed=14, with_initial=False)
    with pytest.raises(ValueError, match="batch 1"):
        selective_scan(**make_inputs(length=10, with_initial=False), cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="rise from 0"):
        selective_scan(**inputs, cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="initial_state must be"):
        selective_scan(**{**inputs, "initial_state": torch.zeros(1, 6, 4, dtype=torch.float64)},
                       cu_seqlens=torch.tensor([0, 4, 10]))


def test_step_invalid_shapes_raise():
    state = torch.zeros(2, 6, 4)
    x = torch.zeros(2, 6)
    with pytest.raises(ValueError, match="state must be"):
        selective_scan_step(torch.zeros(2, 6, 3), x, x, torch.zeros(6, 4), torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="B must be"):
        selective_scan_step(state, x, x, torch.zeros(6, 4), torch.zeros(2, 5), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="dt must be"):
        selective_scan_step(state, x, torch.zeros(2, 5), torch.zeros(6, 4), torch.zeros(2, 4), torch.zeros(2, 4))
