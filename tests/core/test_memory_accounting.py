"""Inference-cache accounting (core.accounting.cache_bytes) against caches that CausalLM.allocate_cache
actually allocates, tensor by tensor, and the Jamba paper's KV-cache table."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from core.accounting import (
    CACHE_KINDS,
    REFERENCE_CONFIGS,
    cache_bytes,
    count_parameters,
)
from core.backbone import CausalLM
from core.config import ModelConfig, S4DConfig
from core.presets import PRESETS, get_preset

GiB = 2**30

# The cache fields of core/cache.py (and S4D's) by kind. A field not named here (bookkeeping a cache may
# gain, e.g. per-row lengths for CUDA-graph decoding) is "other" and must stay tiny.
FIELD_KINDS = {"key": "kv", "value": "kv", "valid": "kv_mask", "conv_state": "conv_state",
               "short_state": "conv_state", "ssm_state": "ssm_state", "state": "ssm_state",
               "history": "hyena_history"}
BOOKKEEPING_LIMIT = 1024  # bytes per sequence over the whole cache


def _tensors(value: object) -> list[torch.Tensor]:
    items = value if isinstance(value, (list, tuple)) else [value]
    return [t for t in items if isinstance(t, torch.Tensor)]


def measured_by_kind(cache) -> tuple[list[dict[str, int]], int]:
    """Per layer {kind: bytes} of an allocated InferenceCache, and the bytes of unknown fields."""
    per_layer, other = [], 0
    for layer in cache.layers:
        found: dict[str, int] = {}
        if layer is not None:
            for name, value in vars(layer).items():
                n = sum(t.numel() * t.element_size() for t in _tensors(value))
                if not n:
                    continue
                if name in FIELD_KINDS:
                    found[FIELD_KINDS[name]] = found.get(FIELD_KINDS[name], 0) + n
                else:
                    other += n
        per_layer.append(found)
    return per_layer, other


def check_against_allocation(config: ModelConfig, seqlen: int, batch: int, dtype: torch.dtype,
                             device: str, ssm_state_dtype: torch.dtype | None = None) -> None:
    model = CausalLM(config, device=device, dtype=dtype if device == "cpu" else None)
    cache = model.allocate_cache(batch, seqlen, device=device, dtype=dtype, ssm_state_dtype=ssm_state_dtype)
    expected = cache_bytes(config, seqlen=seqlen, batch=batch, dtype=dtype, ssm_state_dtype=ssm_state_dtype)
    per_layer, other = measured_by_kind(cache)
    assert len(per_layer) == len(expected.per_layer) == len(config.pattern)
    for i, (got, want) in enumerate(zip(per_layer, expected.per_layer)):
        assert got == {k: v for k, v in want.items() if v}, f"block {i} ({config.pattern[i]!r})"
    assert other <= BOOKKEEPING_LIMIT * batch, f"{other} bytes of unknown cache fields"
    # nbytes() (the cache's own count) sees the same tensors, bookkeeping aside.
    assert 0 <= cache.nbytes() - expected.total <= BOOKKEEPING_LIMIT * batch
    assert sum(expected.by_kind.values()) == expected.total and set(expected.by_kind) == set(CACHE_KINDS)


def s4d_config() -> ModelConfig:
    return ModelConfig(d_model=32, pattern="L-L", vocab_size=64, s4d=S4DConfig(d_state=8, mode="complex"))


@pytest.mark.parametrize("name", [n for n in PRESETS if n.endswith("-tiny")] + ["s4d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_formula_equals_an_allocated_cache_on_cpu(name, dtype):
    config = s4d_config() if name == "s4d" else get_preset(name)
    check_against_allocation(config, seqlen=40, batch=3, dtype=dtype, device="cpu")


@pytest.mark.parametrize("name", ["mamba1-tiny", "mamba2-tiny", "jamba-tiny", "s4d"])
def test_sixteen_bit_ssm_states_halve_the_state(name):
    config = s4d_config() if name == "s4d" else get_preset(name)
    check_against_allocation(config, seqlen=40, batch=3, dtype=torch.bfloat16, device="cpu",
                             ssm_state_dtype=torch.bfloat16)
    full = cache_bytes(config, seqlen=40, batch=3)
    half = cache_bytes(config, seqlen=40, batch=3, ssm_state_dtype=torch.float16)
    if name == "s4d":  # S4D's complex state is not a Mamba state
        assert half.by_kind == full.by_kind
    else:
        assert 2 * half.by_kind["ssm_state"] == full.by_kind["ssm_state"] > 0
        assert {k: v for k, v in half.by_kind.items() if k != "ssm_state"} == \
            {k: v for k, v in full.by_kind.items() if k != "ssm_state"}
    with pytest.raises(ValueError, match="ssm_state_dtype"):
        cache_bytes(config, seqlen=40, ssm_state_dtype=torch.int8)


@pytest.mark.parametrize("name", [n for n in PRESETS if not n.endswith("-tiny")])
def test_formula_equals_every_preset_cache_at_full_size_on_meta(name):
    # The meta device allocates shapes without memory: a 256K cache of an 8B model costs nothing.
    config = get_preset(name)
    seqlen = 262144 if "H" not in config.pattern else config.hyena.max_seqlen  # Hyena stops at its filter
    check_against_allocation(config, seqlen=seqlen, batch=2, dtype=torch.bfloat16, device="meta")


def test_by_hand():
    # hybrid-130m: 24 blocks; allocate_layers(24, 0.08, 0.5) gives 2 attention and 10 Mamba-2 blocks.
    config = get_preset("hybrid-130m")
    assert config.pattern.count("*") == 2 and config.pattern.count("M") == 10
    got = cache_bytes(config, seqlen=4096, batch=1, dtype=torch.bfloat16)
    head_dim, n_kv = 768 // 12, 4
    assert got.by_kind["kv"] == 2 * 2 * n_kv * 4096 * head_dim * 2
    assert got.by_kind["kv_mask"] == 2 * 4096
    d_inner = 2 * 768
    conv_dim, nheads = d_inner + 2 * 8 * 128, d_inner // 64  # ngroups 8, d_state 128, headdim 64
    assert got.by_kind["conv_state"] == 10 * conv_dim * 3 * 2
    assert got.by_kind["ssm_state"] == 10 * nheads * 64 * 128 * 4  # float32 whatever the cache dtype
    assert got.state == got.by_kind["conv_state"] + got.by_kind["ssm_state"]
    # The state does not grow with the length; the KV cache grows linearly.
    longer = cache_bytes(config, seqlen=8192, batch=1, dtype=torch.bfloat16)
    assert longer.state == got.state and longer.kv == 2 * got.kv
    assert cache_bytes(config, seqlen=4096, batch=4).total == 4 * got.total


def test_jamba_paper_kv_cache_table():
    """Jamba (Lieber et al. 2024) Table 1: KV cache at 256K tokens in 16-bit (their GB are GiB)."""
    paper = {"llama-2-7b": (6.7e9, 128), "mistral-7b": (7.2e9, 32), "mixtral-8x7b": (46.7e9, 32),
             "jamba-v0.1": (52e9, 4)}
    for name, (params, gib) in paper.items():
        config = get_preset(name) if name in PRESETS else REFERENCE_CONFIGS[name]()
        assert count_parameters(config).total == pytest.approx(params, rel=0.01), name
        got = cache_bytes(config, seqlen=256 * 1024, batch=1, dtype=torch.bfloat16)
        assert got.kv == gib * GiB, name
    # Jamba's Mamba states add 16 MiB to the 4 GiB of its 4 attention layers: 4.0 either way.
    jamba = cache_bytes(get_preset("jamba-v0.1"), seqlen=256 * 1024)
    assert 0 < jamba.total - jamba.kv < 0.02 * GiB and round(jamba.total / GiB) == 4
    # Active parameters as the paper gives them: Mixtral 12.9B, Jamba 12B.
    assert count_parameters(REFERENCE_CONFIGS["mixtral-8x7b"]()).active == pytest.approx(12.9e9, rel=0.01)
    assert count_parameters(get_preset("jamba-v0.1")).active == pytest.approx(12e9, rel=0.02)


def test_reference_shapes_equal_transformers_models():
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                  tie_word_embeddings=False)
    cases = {
        "llama-2-7b": transformers.LlamaConfig(intermediate_size=11008, num_key_value_heads=32, **common),
        "mistral-7b": transformers.MistralConfig(intermediate_size=14336, num_key_value_heads=8, **common),
        "mixtral-8x7b": transformers.MixtralConfig(intermediate_size=14336, num_key_value_heads=8,
                                                   num_local_experts=8, num_experts_per_tok=2, **common),
    }
    for name, hf_config in cases.items():
        with torch.device("meta"):
            hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
        assert count_parameters(REFERENCE_CONFIGS[name]()).total == sum(p.numel() for p in hf_model.parameters())
        # transformers' cache per token: 2 (K, V) x layers x KV heads x head dim x 2 bytes.
        per_token = 2 * hf_config.num_hidden_layers * hf_config.num_key_value_heads * 128 * 2
        assert cache_bytes(REFERENCE_CONFIGS[name](), seqlen=1000).kv == 1000 * per_token


def test_bad_arguments():
    config = get_preset("mamba2-tiny")
    with pytest.raises(ValueError, match="seqlen >= 1"):
        cache_bytes(config, seqlen=0)
    with pytest.raises(TypeError, match="torch.dtype"):
        cache_bytes(config, seqlen=8, dtype="bf16")
    with pytest.raises(TypeError):
        cache_bytes(config, 8)  # seqlen is keyword-only: cache_bytes(config, seqlen=..., batch=...)
    assert dataclasses.is_dataclass(cache_bytes(config, seqlen=8))
