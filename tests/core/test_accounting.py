"""Parameter and FLOP accounting against built modules, transformers' models and FlopCounterMode."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from core.accounting import (
    count_parameters,
    flops_breakdown,
    forward_flops_per_token,
    layer_flops,
    layer_parameters,
    training_flops_per_token,
)
from core.backbone import CausalLM
from core.config import ModelConfig
from core.presets import FAMILIES, PRESETS, get_preset
from kernels.dispatch import forced_backend

MIXER_MODULES = {"M": "mamba2", "*": "attention", "-": "mlp", "E": "moe", "S": "mamba1", "H": "hyena"}
TINY = [f"{family}-tiny" for family in FAMILIES]
LINEAR_COMPONENTS = {"in_proj", "x_proj", "dt_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj",
                     "gate_proj", "up_proj", "down_proj"}


def skip_unless_built(config: ModelConfig) -> None:
    missing = sorted({MIXER_MODULES[c] for c in set(config.pattern)
                      if importlib.util.find_spec(f"core.layers.{MIXER_MODULES[c]}") is None})
    if missing:
        pytest.skip(f"mixer module(s) {missing} not written yet")


def module_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY + ["mamba1-130m"])
def test_parameter_counts_equal_the_module_by_component(name):
    config = get_preset(name)
    skip_unless_built(config)
    device = "meta" if name == "mamba1-130m" else "cpu"
    model = CausalLM(config, device=device)
    counts = count_parameters(config)
    assert counts.total == module_count(model)
    assert counts.embedding == model.backbone.embedding.weight.numel() + (
        0 if config.tie_embeddings else model.lm_head.weight.numel())
    assert counts.non_embedding == model.num_parameters(exclude_embedding=True)
    for block, expected in zip(model.backbone.layers, counts.per_layer):
        params = dict(block.named_parameters())
        for component, n in expected.items():
            got = sum(p.numel() for key, p in params.items() if key == component or key.startswith(component + "."))
            assert got == n, f"layer {block.layer_idx} ({block.char}) {component}: module {got}, analytic {n}"
        assert sum(expected.values()) == module_count(block), f"layer {block.layer_idx}: uncounted parameters"
    if name == "mamba1-130m":
        assert counts.total == 129_135_360


@pytest.mark.parametrize("name", [n for n in PRESETS if not n.endswith("-tiny")])
def test_every_preset_count_equals_its_module_on_meta(name):
    config = get_preset(name)
    skip_unless_built(config)
    model = CausalLM(config, device="meta")  # no memory: an 8B or 52B model builds in milliseconds
    assert count_parameters(config).total == module_count(model)


def test_counts_equal_transformers_models():
    """Independent implementations of the same architectures, built on the meta device."""
    transformers = pytest.importorskip("transformers")
    cases = [
        ("mamba1-130m", transformers.MambaForCausalLM, transformers.MambaConfig(
            vocab_size=50280, hidden_size=768, num_hidden_layers=24, state_size=16, expand=2, conv_kernel=4,
            use_bias=False, use_conv_bias=True, tie_word_embeddings=True)),
        ("mamba2-130m", transformers.Mamba2ForCausalLM, transformers.Mamba2Config(
            vocab_size=50288, hidden_size=768, num_hidden_layers=24, state_size=128, expand=2, head_dim=64,
            num_heads=24, n_groups=1, conv_kernel=4, use_bias=False, use_conv_bias=True,
            tie_word_embeddings=True)),
        ("transformer++-125m", transformers.LlamaForCausalLM, transformers.LlamaConfig(
            vocab_size=50280, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
            num_attention_heads=12, tie_word_embeddings=True)),
        ("jamba-v0.1", transformers.JambaForCausalLM, transformers.JambaConfig()),
    ]
    for name, cls, hf_config in cases:
        with torch.device("meta"):
            hf_model = cls(hf_config)
        assert count_parameters(get_preset(name)).total == module_count(hf_model), name


def test_active_parameters_count_top_k_experts():
    config = get_preset("jamba-tiny")
    counts = count_parameters(config)
    n_moe = config.pattern.count("E")
    expert = 3 * config.d_model * config.moe.hidden_size  # SwiGLU: gate, up, down
    idle = n_moe * (config.moe.n_experts - config.moe.top_k) * expert
    assert counts.active == counts.total - idle
    dense = get_preset("mamba2-tiny")
    assert count_parameters(dense).active == count_parameters(dense).total


def test_layer_parameters_names():
    config = get_preset("jamba-tiny")
    assert set(layer_parameters("S", config)) == {
        "norm", "mixer.in_proj", "mixer.conv1d", "mixer.x_proj", "mixer.dt_proj", "mixer.A_log", "mixer.D",
        "mixer.out_proj", "mixer.dt_layernorm", "mixer.b_layernorm", "mixer.c_layernorm"}
    assert set(layer_parameters("E", config)) == {"norm", "mixer.router", "mixer.experts"}


# --------------------------------------------------------------------------------------------------
# FLOPs: closed forms
# --------------------------------------------------------------------------------------------------

def test_transformer_125m_training_flops_by_hand():
    config = get_preset("transformer++-125m")
    d, L, layers, vocab_rows, hidden = 768, 2048, 12, 50280, 2048
    per_layer = 2 * 4 * d * d + 2 * 2 * d * L + 2 * 3 * d * hidden  # qkvo, QK^T and PV, SwiGLU
    forward = layers * per_layer + 2 * d * vocab_rows
    assert forward_flops_per_token(config, L) == forward == 322_596_864
    assert training_flops_per_token(config, L) == 3 * forward


def test_matmul_flops_are_twice_the_matrix_parameters():
    """Without the sequence-length terms, forward FLOPs per token are 2 N (Kaplan's 2N), N the matrix
    parameters that a token multiplies (the head included, the embedding lookup excluded)."""
    config = get_preset("transformer++-tiny", tie_embeddings=False)
    params = count_parameters(config)
    breakdown = flops_breakdown(config, seq_len=1)
    attention_terms = sum(layer["attention"] for layer in breakdown.per_layer if "attention" in layer)
    matrices = params.total - params.embedding + model_head(config) - sum(
        layer["norm"] for layer in params.per_layer) - params.norm_f
    assert breakdown.forward - attention_terms == 2 * matrices


def model_head(config: ModelConfig) -> int:
    return config.d_model * config.padded_vocab_size


def test_seq_len_dependence():
    attention = get_preset("transformer++-tiny")
    grow = [layer_flops("*", attention, L)["attention"] for L in (64, 128)]
    assert grow[1] == 2 * grow[0]
    mamba1 = get_preset("jamba-tiny")
    assert layer_flops("S", mamba1, 64) == layer_flops("S", mamba1, 4096)
    mamba2 = get_preset("mamba2-tiny")  # chunk 16: the SSD cost stops growing at one chunk
    ssd = [layer_flops("M", mamba2, L)["ssd"] for L in (4, 16, 1024)]
    assert ssd[0] < ssd[1] and abs(ssd[2] - ssd[1]) / ssd[1] < 1e-12
    moe = get_preset("jamba-tiny")
    dense_equivalent = layer_flops("-", moe, 8)
    assert layer_flops("E", moe, 8)["experts"] == moe.moe.top_k * sum(dense_equivalent.values())


def test_flops_reject_bad_lengths():
    with pytest.raises(ValueError, match="seq_len >= 1"):
        layer_flops("*", get_preset("transformer++-tiny"), 0)


# --------------------------------------------------------------------------------------------------
# FLOPs: against torch's counter
# --------------------------------------------------------------------------------------------------

MATMUL_OPS = ("aten.mm", "aten.addmm", "aten.bmm")


def op_counts(model: nn.Module, ids: torch.Tensor, backward: bool = False) -> dict[str, dict[str, int]]:
    """FlopCounterMode counts per module FQN ("CausalLM.backbone.layers.0.mixer.in_proj", ...) and op.

    Attention runs the math SDPA backend (on CPU the fused kernel is invisible to the counter), the
    causal conv and the selective scan their references (an F.conv1d the counter sees; no matmul).
    """
    with sdpa_kernel([SDPBackend.MATH]), forced_backend("reference", "causal_conv1d"), \
            forced_backend("reference", "selective_scan"), FlopCounterMode(display=False) as counter:
        out = model(ids, labels=ids)
        if backward:
            out.loss.backward()
    return {name: {str(op): n for op, n in ops.items()} for name, ops in counter.get_flop_counts().items()}


@pytest.mark.parametrize("name", TINY)
def test_forward_flops_match_flop_counter(name):
    config = get_preset(name)
    skip_unless_built(config)
    torch.manual_seed(0)
    model = CausalLM(config)
    batch, seq_len = 2, 13
    tokens = batch * seq_len
    ids = torch.randint(0, config.vocab_size, (batch, seq_len))
    counted = op_counts(model, ids)
    total = {k: sum(v.values()) for k, v in counted.items()}
    breakdown = flops_breakdown(config, seq_len, batch_size=batch)
    assert total["CausalLM.lm_head"] == tokens * breakdown.lm_head
    for i, (char, analytic) in enumerate(zip(config.pattern, breakdown.per_layer)):
        prefix = f"CausalLM.backbone.layers.{i}.mixer"
        children = functional = 0
        for component, flops in analytic.items():
            if component not in LINEAR_COMPONENTS:
                continue
            if f"{prefix}.{component}" in total:  # called as a module: attributed to it, exactly
                assert total[f"{prefix}.{component}"] == tokens * flops, (i, component)
                children += tokens * flops
            else:  # applied functionally (F.linear on its weight): counted in the mixer's own matmuls
                functional += tokens * flops
        own = counted[prefix]
        own_matmul = sum(own.get(op, 0) for op in MATMUL_OPS) - children
        if char == "*":  # Q K^T and P V as two bmm over the full L x L
            assert own_matmul == functional + tokens * analytic["attention"]
        elif char == "E":  # router (F.linear inside the mixer) and top_k experts, dropless
            assert total[prefix] == tokens * (analytic["router"] + analytic["experts"])
        elif char == "S":  # the scan has no matmul: the rest is the functional projections (dt_proj)
            assert own_matmul == functional
            assert own["aten.convolution"] == tokens * analytic["conv1d"]
        elif char == "M":  # the depthwise conv, exactly as the counter's aten.convolution
            assert own["aten.convolution"] == tokens * analytic["conv1d"]
        elif char == "H":
            assert own["aten.convolution"] == tokens * analytic["short_filter"]
            # The filter MLP runs once per forward over the positions, whatever the batch.
            assert total[f"{prefix}.filter_fn"] == round(tokens * analytic["filter_fn"])
        elif char == "-":
            assert total[prefix] == children and functional == 0


@pytest.mark.parametrize("name, pattern", [("transformer++-tiny", None), ("jamba-tiny", "*-E-*E")])
def test_backward_matmuls_are_twice_forward(name, pattern):
    """Training = 3x forward holds exactly for the matmul blocks (attention, MLP, MoE) and the head:
    the whole model's counted FLOPs, forward + backward, are 3x the analytic forward."""
    config = get_preset(name) if pattern is None else get_preset(name, pattern=pattern)
    skip_unless_built(config)
    torch.manual_seed(0)
    model = CausalLM(config)
    batch, seq_len = 2, 9
    ids = torch.randint(0, config.vocab_size, (batch, seq_len))
    forward = op_counts(model, ids)["Global"]
    both = op_counts(model, ids, backward=True)["Global"]
    analytic = training_flops_per_token(config, seq_len, batch_size=batch)
    assert sum(forward.values()) * 3 == sum(both.values()) == batch * seq_len * analytic


def test_ssm_estimates_are_the_documented_formulas():
    config = get_preset("hybrid-tiny")  # Mamba-2: d_inner 128, N 16, G 2, chunk 16
    ssd = layer_flops("M", config, 64)["ssd"]
    q, n, g, d_inner = 16, 16, 2, 128
    assert math.isclose(ssd, 2 * q * n * g + 2 * q * d_inner + 4 * n * d_inner + 2 * n * d_inner / q + 2 * d_inner)
    mamba1 = get_preset("jamba-tiny")  # d_inner 128, N 16
    assert layer_flops("S", mamba1, 64)["scan"] == 9 * 128 * 16 + 2 * 128
