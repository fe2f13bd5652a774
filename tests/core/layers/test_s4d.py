"""S4D: the FFT-convolution forward against a float64 sequential recurrence (outputs and gradients,
initial state included), forward == prefill + steps, left padding, chunked kernels, the pattern char."""

from __future__ import annotations

import pytest
import torch

import core.layers.s4d as s4d_module
from core.backbone import CausalLM
from core.config import ModelConfig, S4DConfig
from core.generate import generate
from core.layers.s4d import S4D


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-30))


def reference(layer: S4D, x: torch.Tensor, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence written out from the parameters, one sample at a time, in float64."""
    p = {k: v.double() for k, v in layer.named_parameters() if v is not None}
    a_re = -torch.exp(p["A_log"])
    A = torch.complex(a_re, p["A_imag"]) if layer.complex else torch.complex(a_re, torch.zeros_like(a_re))
    C = torch.complex(p["C"][..., 0], p["C"][..., 1]) if layer.complex else torch.complex(p["C"], torch.zeros_like(a_re))
    dt = torch.exp(p["log_dt"])[:, None]
    dA = torch.exp(dt * A)
    dB = (dA - 1) / A
    scale = 2.0 if layer.complex else 1.0
    batch, length, h = x.shape
    state = torch.zeros(batch, h, layer.d_state, dtype=torch.complex128) if h0 is None else h0
    ys = []
    for t in range(length):
        u = x[:, t].double()
        state = dA * state + dB * u[..., None]
        ys.append(scale * (C * state).sum(-1).real + p["D"] * u)
    y = torch.stack(ys, 1)
    out = torch.nn.functional.linear(torch.nn.functional.gelu(y), p["out_proj.weight"], p["out_proj.bias"])
    return (torch.nn.functional.glu(out, -1) if layer.glu else out), state


@pytest.mark.parametrize("mode", ["complex", "real"])
@pytest.mark.parametrize("length", [1, 2, 17])
def test_forward_and_backward_match_the_recurrence(mode: str, length: int):
    torch.manual_seed(0)
    layer = S4D(6, S4DConfig(d_state=5, mode=mode, glu=mode == "complex")).double()
    x = torch.randn(2, length, 6, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    y_ref, _ = reference(layer, x)
    assert rel(y, y_ref) < 1e-12
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *layer.parameters()], grad)
    want = torch.autograd.grad(y_ref, [x, *layer.parameters()], grad)
    for g, w in zip(got, want):
        assert rel(g, w) < 1e-10


def test_float32_forward_and_initial_state_gradient():
    torch.manual_seed(1)
    layer = S4D(8, S4DConfig(d_state=4))
    x = torch.randn(3, 33, 8)
    h0 = torch.randn(3, 8, 4, dtype=torch.complex64) * 0.3
    y_ref, state_ref = reference(layer, x, h0.to(torch.complex128))
    cache = layer.allocate_cache(3, 33)
    cache.state.copy_(h0)
    assert rel(layer(x, cache=cache), y_ref.float()) < 1e-5
    assert rel(cache.state, state_ref.to(torch.complex64)) < 1e-5

    # Gradients with respect to the initial state, float64 against the sequential reference.
    layer = layer.double()
    x = x.double()
    h0 = h0.to(torch.complex128).requires_grad_()
    cache = layer.allocate_cache(3, 33, dtype=torch.float64)
    cache.state = h0.clone()
    y = layer(x, cache=cache)
    h0_ref = h0.detach().clone().requires_grad_()
    y_ref, state_ref = reference(layer, x, h0_ref)
    grad = torch.randn_like(y)
    loss = (y * grad).sum() + (cache.state.real * 0.3 + cache.state.imag).sum()
    loss_ref = (y_ref * grad).sum() + (state_ref.real * 0.3 + state_ref.imag).sum()
    (g,) = torch.autograd.grad(loss, [h0])
    (g_ref,) = torch.autograd.grad(loss_ref, [h0_ref])
    assert rel(g, g_ref) < 1e-10


@pytest.mark.parametrize("mode", ["complex", "real"])
def test_forward_equals_prefill_then_steps(mode: str, monkeypatch):
    monkeypatch.setattr(s4d_module, "CHUNK", 4)  # several kernel / state chunks at small lengths
    torch.manual_seed(2)
    layer = S4D(8, S4DConfig(d_state=6, mode=mode))
    x = torch.randn(2, 23, 8)
    full = layer(x)
    cache = layer.allocate_cache(2, 23)
    parts = [layer(x[:, :9], cache=cache)]
    parts += [layer(x[:, t:t + 1], cache=cache) for t in range(9, 15)]
    parts.append(layer(x[:, 15:], cache=cache))  # a second prefill from a non-zero state
    assert rel(torch.cat(parts, 1), full) < 1e-5


def test_left_padding_gives_the_unpadded_outputs():
    torch.manual_seed(3)
    layer = S4D(4, S4DConfig(d_state=3))
    x = torch.randn(1, 7, 4)
    padded = torch.cat([torch.randn(1, 3, 4), x], 1)
    mask = torch.tensor([[False] * 3 + [True] * 7])
    assert rel(layer(padded, padding_mask=mask)[:, 3:], layer(x)) < 1e-5


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="s4d.mode"):
        S4D(4, S4DConfig(mode="hurwitz"))
    with pytest.raises(ValueError, match="s4d.dt_min"):
        S4D(4, S4DConfig(dt_min=0.2, dt_max=0.1))


def test_pattern_char_builds_and_generates_as_the_full_forward():
    torch.manual_seed(4)
    config = ModelConfig(d_model=16, pattern="L-L", vocab_size=32, s4d=S4DConfig(d_state=4))
    model = CausalLM(config).eval()
    prompt = torch.randint(0, 32, (2, 5))
    out = generate(model, prompt, max_new_tokens=6, temperature=0)
    whole = torch.cat([prompt, out.tokens], 1)
    greedy = model(whole[:, :-1]).logits[:, 4:].argmax(-1)
    assert torch.equal(greedy, out.tokens)


@pytest.mark.parametrize("mode,glu", [("complex", True), ("real", False)])
def test_accounting_counts_the_built_parameters(mode: str, glu: bool):
    from core.accounting import count_parameters, training_flops_per_token

    config = ModelConfig(d_model=12, pattern="L-L", vocab_size=32, s4d=S4DConfig(d_state=5, mode=mode, glu=glu))
    model = CausalLM(config)
    assert count_parameters(config).total == sum(p.numel() for p in model.parameters())
    assert training_flops_per_token(config, 64) > 0
