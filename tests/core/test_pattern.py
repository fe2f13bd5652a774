"""The pattern grammar, Megatron-LM's hybrid allocator and Jamba's layout."""

from __future__ import annotations

import pytest

from core.pattern import (
    LAYER_TYPES,
    allocate_layers,
    count_layers,
    jamba_pattern,
    validate_pattern,
)

NVIDIA_8B = "M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-"


def megatron_allocate(total: int, attention_ratio: float, mlp_ratio: float) -> str:
    """Megatron-LM's _allocate_auto restated in its own terms (a loop over a running distance), kept
    independent of core.pattern to cross-check it over many shapes."""
    n_attention = round(total * attention_ratio)
    n_mamba = total - n_attention
    section = n_mamba / (n_attention + 1)
    kinds = ["M"] * total
    x = section
    for i in range(total):
        if x < 0.5:
            kinds[i] = "*"
            x += section
        else:
            x -= 1
    n_mlp = round(total * mlp_ratio)
    if n_mlp > 0:
        ratio = (n_mamba - n_mlp) / n_mlp
        x = ratio
        for i in range(total):
            if kinds[i] == "M":
                if x < 0.5:
                    kinds[i] = "-"
                    x += ratio
                else:
                    x -= 1
    return "".join(kinds)


def test_table_is_the_documented_grammar():
    assert list(LAYER_TYPES) == ["M", "*", "-", "E", "S", "H", "L"]


def test_nvidia_hybrid_8b_allocation():
    pattern = allocate_layers(56, 0.08, 0.5)
    assert pattern == NVIDIA_8B
    counts = count_layers(pattern)
    assert (counts["M"], counts["*"], counts["-"]) == (24, 4, 28)
    assert counts["E"] == counts["S"] == counts["H"] == 0


@pytest.mark.parametrize("total", [1, 2, 7, 10, 24, 48, 56, 97])
@pytest.mark.parametrize("attention_ratio, mlp_ratio", [(0.0, 0.0), (0.08, 0.5), (0.1, 0.0), (0.0, 0.3),
                                                        (0.25, 0.25), (0.5, 0.5), (0.3, 0.2), (1.0, 0.0)])
def test_allocation_counts_and_spacing(total, attention_ratio, mlp_ratio):
    n_attention = round(total * attention_ratio)
    n_mlp = round(total * mlp_ratio)
    if n_attention + n_mlp > total:  # both rounded up past the total (e.g. 7 at 0.5 / 0.5)
        with pytest.raises(ValueError, match="exceed"):
            allocate_layers(total, attention_ratio, mlp_ratio)
        return
    pattern = allocate_layers(total, attention_ratio, mlp_ratio)
    assert pattern == megatron_allocate(total, attention_ratio, mlp_ratio)
    assert len(pattern) == total
    assert pattern.count("*") == n_attention
    assert pattern.count("-") == n_mlp
    assert pattern.count("M") == total - n_attention - n_mlp
    if 0 < n_attention < total:
        # Evenly spaced: the Mamba-or-MLP runs between attention blocks differ by at most one.
        runs = [len(run) for run in pattern.split("*")]
        inner = runs[1:-1] or runs
        assert max(inner) - min(inner) <= 1


def test_allocation_rejects_bad_ratios():
    with pytest.raises(ValueError, match="exceeds 1"):
        allocate_layers(10, 0.6, 0.5)
    with pytest.raises(ValueError, match=r"attention_ratio must be in \[0, 1\]"):
        allocate_layers(10, -0.1, 0.5)
    with pytest.raises(ValueError, match="n_layers must be a positive int"):
        allocate_layers(0, 0.1, 0.1)


def test_jamba_layout_matches_hf_jamba_config():
    transformers = pytest.importorskip("transformers")
    config = transformers.JambaConfig(num_hidden_layers=32)
    pattern = jamba_pattern(32)
    assert len(pattern) == 64
    mixers, ffns = pattern[0::2], pattern[1::2]
    assert [("attention" if c == "*" else "mamba") for c in mixers] == config.layers_block_type
    assert [(config.num_experts if c == "E" else 1) for c in ffns] == config.layers_num_experts
    # 1:7 attention to Mamba, attention at offset 4 of each 8-layer block, MoE every other layer.
    assert mixers.count("*") == 4 and mixers.count("S") == 28
    assert [i for i, c in enumerate(mixers) if c == "*"] == [4, 12, 20, 28]
    assert [i for i, c in enumerate(ffns) if c == "E"] == list(range(1, 32, 2))
    assert pattern[:16] == "S-SES-SE*-SES-SE"


def test_jamba_layout_other_periods():
    pattern = jamba_pattern(6, attn_layer_period=3, attn_layer_offset=0, expert_layer_period=3,
                            expert_layer_offset=2, mamba="M")
    assert pattern == "*-M-ME*-M-ME"
    with pytest.raises(ValueError, match="attn_layer_offset"):
        jamba_pattern(8, attn_layer_period=4, attn_layer_offset=4)
    with pytest.raises(ValueError, match="mamba must be"):
        jamba_pattern(8, mamba="*")


def test_validate_pattern_names_char_position_and_table():
    assert validate_pattern("M*-ESH") == "M*-ESH"
    with pytest.raises(ValueError) as info:
        validate_pattern("MM*x-")
    message = str(info.value)
    assert "'x'" in message and "position 3" in message
    for char in LAYER_TYPES:  # the table
        assert repr(char) in message
    assert "Mamba-1" in message and "Hyena" in message


def test_validate_pattern_empty_and_type():
    with pytest.raises(ValueError, match="empty"):
        validate_pattern("")
    with pytest.raises(TypeError, match="string"):
        validate_pattern(["M", "*"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="position 0"):
        validate_pattern(" M")
