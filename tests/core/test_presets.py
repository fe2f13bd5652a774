"""Named presets: every one is a valid config, every tiny size trains on CPU, the lookup errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from core.accounting import count_parameters
from core.backbone import CausalLM, config_problems
from core.config import Mamba2Config, ModelConfig
from core.pattern import count_layers
from core.presets import FAMILIES, PRESETS, get_preset, list_presets

MIXER_MODULES = {"M": "mamba2", "*": "attention", "-": "mlp", "E": "moe", "S": "mamba1", "H": "hyena"}
TINY = [f"{family}-tiny" for family in FAMILIES]


def skip_unless_built(config: ModelConfig) -> None:
    missing = sorted({MIXER_MODULES[c] for c in set(config.pattern)
                      if importlib.util.find_spec(f"core.layers.{MIXER_MODULES[c]}") is None})
    if missing:
        pytest.skip(f"mixer module(s) {missing} not written yet")


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_valid_and_named(name):
    config = get_preset(name)
    assert isinstance(config, ModelConfig)
    assert config.name == name
    assert config_problems(config) == []
    assert ModelConfig.from_dict(config.to_dict()) == config  # JSON round trip
    assert get_preset(name) is not config  # a fresh object every call


def test_every_family_has_a_tiny_size():
    for family in FAMILIES:
        assert f"{family}-tiny" in PRESETS
        assert f"{family}-tiny" in list_presets(family)
    assert sorted(sum((list_presets(f) for f in FAMILIES), [])) == sorted(PRESETS)


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_are_tiny(name):
    config = get_preset(name)
    mixers = sum(1 for c in config.pattern if c in "M*SH")
    assert 64 <= config.d_model <= 128
    assert 2 <= mixers <= 4
    assert config.vocab_size <= 512
    assert count_parameters(config).total < 500_000


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_train_on_cpu(name):
    config = get_preset(name)
    skip_unless_built(config)
    torch.manual_seed(0)
    model = CausalLM(config)
    # A fixed batch of 2 sequences of odd length 33; a few Adam steps must fit it.
    ids = torch.randint(0, config.vocab_size, (2, 33))
    inputs, labels = ids[:, :-1], ids[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        out = model(inputs, labels=labels)
        assert out.logits.shape == (2, 32, config.vocab_size)
        assert torch.isfinite(out.loss)
        optimizer.zero_grad()
        out.loss.backward()
        for param_name, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), param_name
        optimizer.step()
        losses.append(out.ce_loss.item())
    # Starts near log(vocab) and goes down.
    assert abs(losses[0] - torch.log(torch.tensor(float(config.vocab_size))).item()) < 0.5
    assert losses[-1] < losses[0] - 0.3, losses


def test_mamba1_130m_is_mamba_ssm_count():
    config = get_preset("mamba1-130m")
    assert (config.d_model, config.pattern, config.padded_vocab_size) == (768, "S" * 24, 50280)
    assert config.tie_embeddings and "-" not in config.pattern
    assert count_parameters(config).total == 129_135_360


def test_published_shapes():
    hybrid = get_preset("hybrid-8b")
    assert hybrid.pattern == "M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-"
    assert (hybrid.d_model, hybrid.attention.n_heads, hybrid.attention.n_kv_heads) == (4096, 32, 8)
    assert not hybrid.attention.rope and not hybrid.tie_embeddings
    m2 = hybrid.mamba2
    assert (m2.d_state, m2.headdim, m2.ngroups, m2.chunk_size) == (128, 64, 8, 128)
    assert 8.5e9 < count_parameters(hybrid).total < 8.8e9  # "8B"

    jamba = get_preset("jamba-v0.1")
    counts = count_layers(jamba.pattern)
    assert (counts["S"], counts["*"], counts["E"], counts["-"]) == (28, 4, 16, 16)
    assert jamba.pattern[8] == "*" and jamba.pattern[3] == "E"  # layer 4 attention, layer 1 MoE
    assert (jamba.moe.n_experts, jamba.moe.top_k, jamba.moe.hidden_size) == (16, 2, 14336)
    assert jamba.mamba1.inner_norms and jamba.mamba1.d_state == 16 and jamba.vocab_size == 65536
    params = count_parameters(jamba)
    assert 51e9 < params.total < 52.5e9 and 11.5e9 < params.active < 12.5e9  # "52B total, 12B active"

    t = get_preset("transformer++-125m")
    assert t.pattern == "*-" * 12 and t.attention.rope and t.mlp.activation == "swiglu"
    assert 120e6 < count_parameters(t).total < 130e6

    m = get_preset("mamba2-2.7b")
    assert (m.d_model, len(m.pattern), m.mamba2.headdim, m.mamba2.d_state) == (2560, 64, 64, 128)


def test_get_preset_typo_lists_names():
    with pytest.raises(KeyError) as info:
        get_preset("mamba2-130M")
    message = str(info.value)
    assert "mamba2-130m" in message  # the suggestion
    for name in PRESETS:
        assert name in message


def test_overrides():
    config = get_preset("mamba2-tiny", vocab_size=512, mamba2={"chunk_size": 8}, name="mine")
    assert config.vocab_size == 512 and config.name == "mine"
    assert config.mamba2.chunk_size == 8 and config.mamba2.headdim == 16  # merged, not replaced
    assert get_preset("mamba2-tiny").mamba2.chunk_size == 16  # the preset itself is untouched
    replaced = get_preset("mamba2-tiny", mamba2=Mamba2Config(headdim=32))
    assert replaced.mamba2.headdim == 32 and replaced.mamba2.chunk_size == 256
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        get_preset("mamba2-tiny", d_modle=32)
    with pytest.raises(ValueError, match=r"unknown mamba2 field\(s\) \['head_dim'\]"):
        get_preset("mamba2-tiny", mamba2={"head_dim": 32})
    with pytest.raises(ValueError, match="unknown preset family"):
        list_presets("gpt")
