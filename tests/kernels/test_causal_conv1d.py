"""Causal depthwise conv1d and its step: against the formula written out, states, packed sequences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.causal_conv1d import causal_conv1d, causal_conv1d_step


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(batch=2, dim=3, L=9, width=4, dtype=torch.float64, seed=0, states=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, L, generator=gen, dtype=torch.float64).to(dtype)
    weight = torch.randn(dim, width, generator=gen, dtype=torch.float64).to(dtype)
    bias = torch.randn(dim, generator=gen, dtype=torch.float64).to(dtype)
    state = torch.randn(batch if states is None else states, dim, width - 1, generator=gen,
                        dtype=torch.float64).to(dtype)
    return x, weight, bias, state


def direct(x, weight, bias, activation, state):
    """y[b, d, t] = act(bias[d] + sum_k weight[d, k] * u[b, d, t - (W-1) + k]), u reading the state
    before position 0, written with explicit loops over time and taps."""
    batch, dim, L = x.shape
    width = weight.shape[1]
    y = torch.zeros(batch, dim, L, dtype=torch.float64)
    for t in range(L):
        acc = torch.zeros(batch, dim, dtype=torch.float64) if bias is None else bias.double().expand(batch, dim).clone()
        for k in range(width):
            src = t - (width - 1) + k
            if src >= 0:
                value = x[..., src].double()
            elif state is not None:
                value = state[..., width - 1 + src].double()
            else:
                value = torch.zeros(batch, dim, dtype=torch.float64)
            acc = acc + weight[:, k].double() * value
        y[..., t] = F.silu(acc) if activation == "silu" else acc
    return y


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("L", [1, 2, 9])
def test_matches_formula_with_and_without_state(L, width, use_bias, activation):
    x, weight, bias, state = make(L=L, width=width, seed=L * 10 + width)
    bias = bias if use_bias else None
    y = causal_conv1d(x, weight, bias, activation)
    assert rel(y, direct(x, weight, bias, activation, None)) < 1e-14
    y, final = causal_conv1d(x, weight, bias, activation, initial_state=state, return_final_state=True)
    assert rel(y, direct(x, weight, bias, activation, state)) < 1e-14
    # The final state is the last W-1 inputs, reaching into the initial state when L < W-1.
    assert torch.equal(final, torch.cat([state, x], dim=-1)[..., -(width - 1):])


@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("split", [1, 2, 7])
def test_state_passing_split_equals_full(width, split):
    x, weight, bias, state = make(L=10, width=width, seed=split)
    y_full, final_full = causal_conv1d(x, weight, bias, "silu", initial_state=state, return_final_state=True)
    y1, mid = causal_conv1d(x[..., :split], weight, bias, "silu", initial_state=state, return_final_state=True)
    y2, final = causal_conv1d(x[..., split:], weight, bias, "silu", initial_state=mid, return_final_state=True)
    assert rel(torch.cat([y1, y2], dim=-1), y_full) < 1e-15
    assert torch.equal(final, final_full)


@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("width", [2, 3, 4])
def test_cu_seqlens_equals_separate_runs(width, with_state):
    lengths = [4, 1, 0, 7, 2]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    x, weight, bias, states = make(batch=1, L=sum(lengths), width=width, states=len(lengths), seed=width)
    states = states if with_state else None
    y, finals = causal_conv1d(x, weight, bias, "silu", initial_state=states, return_final_state=True,
                              cu_seqlens=cu)
    assert finals.shape == (len(lengths), 3, width - 1)
    for s in range(len(lengths)):
        part = slice(cu[s].item(), cu[s + 1].item())
        state = None if states is None else states[s : s + 1]
        y_s, final_s = causal_conv1d(x[..., part], weight, bias, "silu", initial_state=state,
                                     return_final_state=True)
        assert torch.allclose(y[..., part], y_s, rtol=0, atol=1e-15)
        assert torch.equal(finals[s : s + 1], final_s.to(finals.dtype))


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("width", [2, 3, 4])
def test_step_matches_full(width, activation):
    x, weight, bias, state = make(L=6, width=width, seed=width + 20)
    y_full, final = causal_conv1d(x, weight, bias, activation, initial_state=state, return_final_state=True)
    conv_state = state.clone()
    storage = conv_state.data_ptr()
    ys = [causal_conv1d_step(x[..., t], conv_state, weight, bias, activation) for t in range(x.shape[-1])]
    assert conv_state.data_ptr() == storage  # updated in place
    assert rel(torch.stack(ys, dim=-1), y_full) < 1e-15
    assert torch.equal(conv_state, final)


def test_gradcheck_with_state():
    x, weight, bias, state = make(batch=1, dim=2, L=5, width=3, seed=30)
    inputs = tuple(t.requires_grad_(True) for t in (x, weight, bias, state))

    def fn(x, weight, bias, state):
        return causal_conv1d(x, weight, bias, "silu", initial_state=state, return_final_state=True)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_packed_backward_matches_separate():
    lengths = [3, 5]
    cu = torch.tensor([0, 3, 8])
    x, weight, bias, states = make(batch=1, L=8, width=4, states=2, seed=31)
    packed = [t.clone().requires_grad_(True) for t in (x, weight, bias, states)]
    y, finals = causal_conv1d(packed[0], packed[1], packed[2], "silu", initial_state=packed[3],
                              return_final_state=True, cu_seqlens=cu)
    (y.square().sum() + finals.square().sum()).backward()
    separate = [t.clone().requires_grad_(True) for t in (x, weight, bias, states)]
    loss = 0
    for s in range(len(lengths)):
        part = slice(cu[s].item(), cu[s + 1].item())
        y_s, f_s = causal_conv1d(separate[0][..., part], separate[1], separate[2], "silu",
                                 initial_state=separate[3][s : s + 1], return_final_state=True)
        loss = loss + y_s.square().sum() + f_s.square().sum()
    loss.backward()
    for a, b in zip(packed, separate):
        assert rel(a.grad, b.grad) < 1e-14


def test_low_precision_dtypes():
    x, weight, bias, state = make(L=7, width=4, seed=32)
    y64 = causal_conv1d(x, weight, bias, "silu", initial_state=state)
    y, final = causal_conv1d(x.bfloat16(), weight.bfloat16(), bias.bfloat16(), "silu",
                             initial_state=state.bfloat16(), return_final_state=True)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    assert rel(y, y64) < 2e-2
    step_state = state.bfloat16()
    out = causal_conv1d_step(x[..., 0].bfloat16(), step_state, weight.bfloat16(), bias.bfloat16(), "silu")
    assert out.dtype == torch.bfloat16 and step_state.dtype == torch.bfloat16


def test_clear_errors():
    x, weight, bias, state = make()
    with pytest.raises(ValueError, match=r"\[B, D, L\]"):
        causal_conv1d(x[0], weight)
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d(x, weight[:2])
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d(x, weight, initial_state=state[..., :1])
    with pytest.raises(ValueError, match="batch 1"):
        causal_conv1d(x, weight, cu_seqlens=torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, weight, activation="relu")
