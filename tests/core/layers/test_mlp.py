"""MLP: SwiGLU and GELU against their formulas written out, the hidden-size rule, Llama's MLP."""

from __future__ import annotations

import math

import pytest
import torch

from core.config import MLPConfig, MoEConfig
from core.layers.mlp import MLP, mlp_hidden_size


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def formula(m: MLP, x: torch.Tensor) -> torch.Tensor:
    def linear(layer, t):
        return t @ layer.weight.T + (0 if layer.bias is None else layer.bias)

    up = linear(m.up_proj, x)
    if m.activation == "swiglu":
        gate = linear(m.gate_proj, x)
        hidden = gate / (1 + torch.exp(-gate)) * up
    else:
        hidden = 0.5 * up * (1 + torch.erf(up / math.sqrt(2)))  # exact GELU
    return linear(m.down_proj, hidden)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_grads_match_formula(activation, bias):
    torch.manual_seed(0)
    m = MLP(24, MLPConfig(activation=activation, bias=bias, multiple_of=16), dtype=torch.float64)
    x = torch.randn(2, 5, 24, dtype=torch.float64, requires_grad=True)
    y, ref = m(x), formula(m, x)
    assert y.shape == x.shape and rel_err(y, ref) < 1e-13
    w = torch.randn_like(y)
    params = [x, m.up_proj.weight, m.down_proj.weight]
    got = torch.autograd.grad((y * w).sum(), params)
    expected = torch.autograd.grad((ref * w).sum(), params)
    for g, e in zip(got, expected):
        assert rel_err(g, e) < 1e-13
    assert hasattr(m, "gate_proj") == (activation == "swiglu")
    assert (m.up_proj.bias is not None) == bias
    assert m.allocate_cache(2, 8, None, None) is None
    assert torch.equal(m(x, cache=None, padding_mask=torch.zeros(2, 5, dtype=torch.bool)), y)


def test_gelu_is_the_exact_form_not_tanh():
    torch.manual_seed(0)
    m = MLP(16, MLPConfig(activation="gelu", hidden_size=32), dtype=torch.float64)
    x = torch.randn(3, 16, dtype=torch.float64) * 3
    up = m.up_proj(x)
    tanh_form = m.down_proj(torch.nn.functional.gelu(up, approximate="tanh"))
    assert rel_err(m(x), formula(m, x)) < 1e-13
    assert rel_err(m(x), tanh_form) > 1e-6


def test_hidden_size_rule():
    swiglu = MLPConfig(activation="swiglu", multiple_of=64)
    assert mlp_hidden_size(64, swiglu) == 192  # int(170.67) = 170, up to 192
    assert mlp_hidden_size(96, swiglu) == 256  # exactly 8/3 * 96
    assert mlp_hidden_size(4096, MLPConfig(multiple_of=256)) == 11008  # Llama-7B
    assert mlp_hidden_size(48, MLPConfig(activation="gelu", multiple_of=64)) == 192
    assert mlp_hidden_size(40, MLPConfig(activation="gelu", multiple_of=64)) == 192  # 160 up to 192
    assert mlp_hidden_size(64, MLPConfig(hidden_size=100)) == 100  # explicit sizes are kept
    assert mlp_hidden_size(64, MoEConfig(multiple_of=32)) == 192  # the MoE experts share the rule
    assert MLP(64, swiglu).gate_proj.weight.shape == (192, 64)
    with pytest.raises(ValueError, match="activation"):
        mlp_hidden_size(64, MLPConfig(activation="relu"))
    with pytest.raises(ValueError, match="activation"):
        MLP(64, MLPConfig(activation="geglu"))


def test_llama_mlp_cross_check():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=96, hidden_act="silu")
    torch.manual_seed(0)
    theirs = LlamaMLP(config).float()
    ours = MLP(32, MLPConfig(hidden_size=96))
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 7, 32)
    assert rel_err(ours(x), theirs(x)) <= 1e-6
