"""Named model presets: published architectures as :class:`~core.config.ModelConfig` data.

``get_preset("mamba1-130m")`` returns a fresh config; keyword overrides replace fields, and a dict
merges into a sub-config (``get_preset("hybrid-8b", vocab_size=32000, mamba2={"chunk_size": 256})``).
Every family has a ``-tiny`` size (d_model 64, 2-4 sequence mixers, vocab 256) that trains in seconds
on a CPU, for tests and smoke runs.

Parameter counts are those of :mod:`core.accounting` (equal to the built module's, which tests check).
The GPT-NeoX tokenizer has 50277 tokens; mamba_ssm pads its embedding to a multiple of 8 (Mamba-1:
50280 rows) or 16 (Mamba-2: 50288 rows).

=======================  =======  ======  ========================================================
preset                   d_model  blocks  source
=======================  =======  ======  ========================================================
mamba1-130m .. -2.8b     768..    24..64  Mamba paper (Gu & Dao 2023) Table 12 and the released
                         2560     ``S``   ``state-spaces/mamba-*`` configs: RMSNorm, residual in fp32,
                                          tied embeddings, no MLP, d_state 16, expand 2, d_conv 4.
                                          mamba1-130m has 129,135,360 parameters (as mamba_ssm).
mamba2-130m .. -2.7b     768..    24..64  Mamba-2 paper (Dao & Gu 2024) and ``state-spaces/mamba2-*``:
                         2560     ``M``   headdim 64, d_state 128, ngroups 1, chunk 256, vocab padded
                                          to 16, tied, no MLP.
transformer++-125m..2.7b 768..    12..32  Mamba paper's Transformer++ baseline (RoPE, SwiGLU, RMSNorm,
                         2560     ``*-``  no biases) at the GPT-3 sizes of the Mamba paper's Table 12
                                          (layers x d_model x heads: 12x768x12, 24x1024x16,
                                          24x1536x16, 24x2048x32, 32x2560x32); SwiGLU hidden 8/3 d.
hyena-153m               864      18 x    Hyena paper's 153M Pile model, safari
                                  ``H-``  ``configs/experiment/pile/hyena.yaml``: GELU MLP 2 d, filter
                                          MLP width 64, 33 positional features, sine freq 14, short
                                          filter 3, l_max 2048, GPT-2 vocab 50257. (safari uses
                                          LayerNorm; the backbone here uses RMSNorm.)
hybrid-8b                4096     56      NVIDIA Mamba-2-Hybrid 8B (Waleffe et al. 2024; Megatron-LM
                                          ``examples/mamba``): ``allocate_layers(56, 0.08, 0.5)`` = 24 M,
                                          4 *, 28 -; 32 heads, 8 KV heads (GQA), no positional
                                          encoding; Mamba-2 headdim 64, d_state 128, 8 groups, chunk
                                          128; MLP Megatron's default (GELU, 4 d = 16384, no bias);
                                          256K SentencePiece vocab, untied.
hybrid-800m              1024     48      the same recipe at Megatron-LM ``examples/mamba/train.sh``'s
                                          800M scale: 48 layers, 16 heads, 8 KV heads.
hybrid-130m              768      24      ours: the recipe scaled to the 130M grid (12 heads, 4 KV
                                          heads, GPT-NeoX vocab, tied) for comparisons with the
                                          130M Mamba presets.
jamba-v0.1               4096     32 x 2  Jamba (Lieber et al. 2024) / HF ``ai21labs/Jamba-v0.1``:
                                          Mamba-1 : attention 7 : 1 (attention at offset 4 of each 8
                                          layers), MoE every other layer (period 2, offset 1), 16
                                          experts top-2, SwiGLU hidden 14336, Mamba-1 with inner
                                          norms, d_state 16, 32 heads, 8 KV heads, no positional
                                          encoding, vocab 65536, untied, RMSNorm eps 1e-6, router
                                          aux coefficient 0.001 and no z-loss.
<family>-tiny            64       4..8    ours: each family's recipe at d_model 64, vocab 256, with
                                          2-4 sequence mixers (and the family's MLP / MoE blocks).
=======================  =======  ======  ========================================================

Fidelity notes: the hybrid MLP is Megatron-LM's default (GELU, 4 d, no bias), which is what
``examples/mamba/train.sh`` trains (no ``--swiglu`` / ``--squared-relu``); Jamba's router has no z-loss
(``z_loss_coef=0``) and does not renormalize its top-2 weights, as HF's Jamba; hyena-153m normalizes
with RMSNorm where safari uses LayerNorm (so it has no norm biases, 37 x 864 parameters fewer); the
``-130m`` hybrid is our scaling, not a released model. The parameter counts of mamba1-130m, mamba2-130m,
transformer++-125m and jamba-v0.1 equal those of transformers' Mamba / Mamba2 / Llama / Jamba models
built with the same shapes (a test checks this).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from core.config import (
    _SUBCONFIGS,
    AttentionConfig,
    HyenaConfig,
    Mamba1Config,
    Mamba2Config,
    MLPConfig,
    ModelConfig,
    MoEConfig,
)
from core.pattern import allocate_layers, jamba_pattern

GPT_NEOX_VOCAB = 50277  # the Pile tokenizer used by the Mamba / Mamba-2 / Transformer++ runs
GPT2_VOCAB = 50257
TINY_VOCAB = 256
TINY_D_MODEL = 64


# --------------------------------------------------------------------------------------------------
# Mamba-1
# --------------------------------------------------------------------------------------------------

def _mamba1(name: str, d_model: int, n_layers: int, vocab_size: int = GPT_NEOX_VOCAB) -> ModelConfig:
    return ModelConfig(
        name=name,
        d_model=d_model,
        pattern="S" * n_layers,
        vocab_size=vocab_size,
        pad_vocab_size_multiple=8,
        tie_embeddings=True,
        mamba1=Mamba1Config(d_state=16, d_conv=4, expand=2),
    )


def mamba1_tiny() -> ModelConfig:
    return _mamba1("mamba1-tiny", TINY_D_MODEL, 4, TINY_VOCAB)


def mamba1_130m() -> ModelConfig:
    return _mamba1("mamba1-130m", 768, 24)


def mamba1_370m() -> ModelConfig:
    return _mamba1("mamba1-370m", 1024, 48)


def mamba1_790m() -> ModelConfig:
    return _mamba1("mamba1-790m", 1536, 48)


def mamba1_1_4b() -> ModelConfig:
    return _mamba1("mamba1-1.4b", 2048, 48)


def mamba1_2_8b() -> ModelConfig:
    return _mamba1("mamba1-2.8b", 2560, 64)


# --------------------------------------------------------------------------------------------------
# Mamba-2
# --------------------------------------------------------------------------------------------------

def _mamba2(name: str, d_model: int, n_layers: int, vocab_size: int = GPT_NEOX_VOCAB,
            mamba2: Mamba2Config | None = None) -> ModelConfig:
    return ModelConfig(
        name=name,
        d_model=d_model,
        pattern="M" * n_layers,
        vocab_size=vocab_size,
        pad_vocab_size_multiple=16,
        tie_embeddings=True,
        mamba2=mamba2 or Mamba2Config(d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256),
    )


def mamba2_tiny() -> ModelConfig:
    # headdim 16 -> 8 heads over d_inner 128; chunk 16 so that short test sequences span several chunks.
    return _mamba2("mamba2-tiny", TINY_D_MODEL, 4, TINY_VOCAB,
                   Mamba2Config(d_state=16, d_conv=4, expand=2, headdim=16, ngroups=1, chunk_size=16))


def mamba2_130m() -> ModelConfig:
    return _mamba2("mamba2-130m", 768, 24)


def mamba2_370m() -> ModelConfig:
    return _mamba2("mamba2-370m", 1024, 48)


def mamba2_780m() -> ModelConfig:
    return _mamba2("mamba2-780m", 1536, 48)


def mamba2_1_3b() -> ModelConfig:
    return _mamba2("mamba2-1.3b", 2048, 48)


def mamba2_2_7b() -> ModelConfig:
    return _mamba2("mamba2-2.7b", 2560, 64)


# --------------------------------------------------------------------------------------------------
# Transformer++
# --------------------------------------------------------------------------------------------------

def _transformer(name: str, d_model: int, n_layers: int, n_heads: int,
                 vocab_size: int = GPT_NEOX_VOCAB) -> ModelConfig:
    return ModelConfig(
        name=name,
        d_model=d_model,
        pattern="*-" * n_layers,
        vocab_size=vocab_size,
        pad_vocab_size_multiple=8,
        tie_embeddings=True,
        attention=AttentionConfig(n_heads=n_heads, rope=True, rope_theta=10000.0),
        mlp=MLPConfig(activation="swiglu", multiple_of=64),
    )


def transformer_tiny() -> ModelConfig:
    return _transformer("transformer++-tiny", TINY_D_MODEL, 2, 4, TINY_VOCAB)


def transformer_125m() -> ModelConfig:
    return _transformer("transformer++-125m", 768, 12, 12)


def transformer_350m() -> ModelConfig:
    return _transformer("transformer++-350m", 1024, 24, 16)


def transformer_760m() -> ModelConfig:
    return _transformer("transformer++-760m", 1536, 24, 16)


def transformer_1_3b() -> ModelConfig:
    return _transformer("transformer++-1.3b", 2048, 24, 32)


def transformer_2_7b() -> ModelConfig:
    return _transformer("transformer++-2.7b", 2560, 32, 32)


# --------------------------------------------------------------------------------------------------
# Hyena
# --------------------------------------------------------------------------------------------------

def hyena_tiny() -> ModelConfig:
    return ModelConfig(
        name="hyena-tiny",
        d_model=TINY_D_MODEL,
        pattern="H-" * 2,
        vocab_size=TINY_VOCAB,
        pad_vocab_size_multiple=8,
        tie_embeddings=True,
        hyena=HyenaConfig(order=2, short_filter_order=3, filter_emb_dim=5, filter_order=16, filter_layers=2,
                          sine_freq=1.0, max_seqlen=128),
        mlp=MLPConfig(activation="gelu", hidden_size=2 * TINY_D_MODEL),
    )


def hyena_153m() -> ModelConfig:
    return ModelConfig(
        name="hyena-153m",
        d_model=864,
        pattern="H-" * 18,
        vocab_size=GPT2_VOCAB,
        pad_vocab_size_multiple=8,
        tie_embeddings=True,
        hyena=HyenaConfig(order=2, short_filter_order=3, filter_emb_dim=33, filter_order=64, filter_layers=2,
                          sine_freq=14.0, max_seqlen=2048, modulate=True),
        mlp=MLPConfig(activation="gelu", hidden_size=2 * 864),
    )


# --------------------------------------------------------------------------------------------------
# NVIDIA Mamba-2-Hybrid
# --------------------------------------------------------------------------------------------------

HYBRID_ATTENTION_RATIO = 0.08
HYBRID_MLP_RATIO = 0.5
MEGATRON_SENTENCEPIECE_VOCAB = 256000


def _hybrid(name: str, d_model: int, pattern: str, n_heads: int, n_kv_heads: int,
            vocab_size: int = MEGATRON_SENTENCEPIECE_VOCAB, tie_embeddings: bool = False,
            pad_vocab_size_multiple: int = 128, mamba2: Mamba2Config | None = None,
            mlp: MLPConfig | None = None) -> ModelConfig:
    return ModelConfig(
        name=name,
        d_model=d_model,
        pattern=pattern,
        vocab_size=vocab_size,
        pad_vocab_size_multiple=pad_vocab_size_multiple,  # Megatron's make-vocab-size-divisible-by
        tie_embeddings=tie_embeddings,
        attention=AttentionConfig(n_heads=n_heads, n_kv_heads=n_kv_heads, rope=False),
        mamba2=mamba2 or Mamba2Config(d_state=128, d_conv=4, expand=2, headdim=64, ngroups=8, chunk_size=128),
        # Megatron's default MLP: GELU, ffn_hidden_size = 4 * hidden_size, --disable-bias-linear.
        mlp=mlp or MLPConfig(activation="gelu", hidden_size=4 * d_model, bias=False),
    )


def hybrid_tiny() -> ModelConfig:
    # allocate_layers(6, 0.2, 0.5): 2 M, 1 *, 3 - (the 8B's ratios give no attention at 6 blocks).
    return _hybrid("hybrid-tiny", TINY_D_MODEL, allocate_layers(6, 0.2, 0.5), n_heads=4, n_kv_heads=2,
                   vocab_size=TINY_VOCAB, tie_embeddings=False, pad_vocab_size_multiple=8,
                   mamba2=Mamba2Config(d_state=16, d_conv=4, expand=2, headdim=16, ngroups=2, chunk_size=16))


def hybrid_130m() -> ModelConfig:
    return _hybrid("hybrid-130m", 768, allocate_layers(24, HYBRID_ATTENTION_RATIO, HYBRID_MLP_RATIO),
                   n_heads=12, n_kv_heads=4, vocab_size=GPT_NEOX_VOCAB, tie_embeddings=True,
                   pad_vocab_size_multiple=16)


def hybrid_800m() -> ModelConfig:
    return _hybrid("hybrid-800m", 1024, allocate_layers(48, HYBRID_ATTENTION_RATIO, HYBRID_MLP_RATIO),
                   n_heads=16, n_kv_heads=8)


def hybrid_8b() -> ModelConfig:
    return _hybrid("hybrid-8b", 4096, allocate_layers(56, HYBRID_ATTENTION_RATIO, HYBRID_MLP_RATIO),
                   n_heads=32, n_kv_heads=8)


# --------------------------------------------------------------------------------------------------
# Jamba
# --------------------------------------------------------------------------------------------------

def _jamba(name: str, d_model: int, pattern: str, n_heads: int, n_kv_heads: int, ffn_hidden: int,
           n_experts: int, top_k: int, vocab_size: int) -> ModelConfig:
    return ModelConfig(
        name=name,
        d_model=d_model,
        pattern=pattern,
        vocab_size=vocab_size,
        pad_vocab_size_multiple=1,
        tie_embeddings=False,
        norm_eps=1e-6,
        mamba1=Mamba1Config(d_state=16, d_conv=4, expand=2, conv_bias=True, bias=False, inner_norms=True),
        attention=AttentionConfig(n_heads=n_heads, n_kv_heads=n_kv_heads, rope=False),
        mlp=MLPConfig(activation="swiglu", hidden_size=ffn_hidden),
        moe=MoEConfig(n_experts=n_experts, top_k=top_k, hidden_size=ffn_hidden, activation="swiglu",
                      renormalize=False, load_balancing_coef=0.001, z_loss_coef=0.0),
    )


def jamba_tiny() -> ModelConfig:
    # 4 Jamba layers with attention at offset 2 of 4: 'S-SE*-SE' (3 Mamba-1, 1 attention, 2 MoE).
    return _jamba("jamba-tiny", TINY_D_MODEL, jamba_pattern(4, attn_layer_period=4, attn_layer_offset=2),
                  n_heads=4, n_kv_heads=2, ffn_hidden=128, n_experts=4, top_k=2, vocab_size=TINY_VOCAB)


def jamba_v0_1() -> ModelConfig:
    return _jamba("jamba-v0.1", 4096, jamba_pattern(32), n_heads=32, n_kv_heads=8, ffn_hidden=14336,
                  n_experts=16, top_k=2, vocab_size=65536)


# --------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------

PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "mamba1-tiny": mamba1_tiny,
    "mamba1-130m": mamba1_130m,
    "mamba1-370m": mamba1_370m,
    "mamba1-790m": mamba1_790m,
    "mamba1-1.4b": mamba1_1_4b,
    "mamba1-2.8b": mamba1_2_8b,
    "mamba2-tiny": mamba2_tiny,
    "mamba2-130m": mamba2_130m,
    "mamba2-370m": mamba2_370m,
    "mamba2-780m": mamba2_780m,
    "mamba2-1.3b": mamba2_1_3b,
    "mamba2-2.7b": mamba2_2_7b,
    "transformer++-tiny": transformer_tiny,
    "transformer++-125m": transformer_125m,
    "transformer++-350m": transformer_350m,
    "transformer++-760m": transformer_760m,
    "transformer++-1.3b": transformer_1_3b,
    "transformer++-2.7b": transformer_2_7b,
    "hyena-tiny": hyena_tiny,
    "hyena-153m": hyena_153m,
    "hybrid-tiny": hybrid_tiny,
    "hybrid-130m": hybrid_130m,
    "hybrid-800m": hybrid_800m,
    "hybrid-8b": hybrid_8b,
    "jamba-tiny": jamba_tiny,
    "jamba-v0.1": jamba_v0_1,
}

FAMILIES = ("mamba1", "mamba2", "transformer++", "hyena", "hybrid", "jamba")


def list_presets(family: str | None = None) -> list[str]:
    """Preset names, all or those of one family (the part before the size, e.g. ``"mamba2"``)."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown preset family {family!r}; families: {list(FAMILIES)}")
    return [name for name in PRESETS if family is None or name.rsplit("-", 1)[0] == family]


def get_preset(name: str, /, **overrides: Any) -> ModelConfig:
    """A fresh :class:`ModelConfig` for preset ``name``, with ``overrides`` applied.

    An override of a top-level field replaces it; a dict for a sub-config (``mamba1``, ``mamba2``,
    ``attention``, ``mlp``, ``moe``, ``hyena``) replaces only the fields it names; a sub-config
    instance replaces the whole sub-config. Unknown names and fields are errors that list the known
    ones.
    """
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise KeyError(f"unknown preset {name!r}.{hint} Known presets: {', '.join(PRESETS)}")
    config = PRESETS[name]()
    return apply_overrides(config, **overrides) if overrides else config


def apply_overrides(config: ModelConfig, /, **overrides: Any) -> ModelConfig:
    """``config`` with fields replaced (see :func:`get_preset`); the input is not modified."""
    known = {f.name for f in dataclasses.fields(ModelConfig)} - {"n_layers"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {unknown}; known fields: {sorted(known)}")
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        sub_cls = _SUBCONFIGS.get(key)
        if sub_cls is not None and isinstance(value, dict):
            sub_fields = {f.name for f in dataclasses.fields(sub_cls)}
            bad = sorted(set(value) - sub_fields)
            if bad:
                raise ValueError(f"unknown {key} field(s) {bad}; known {sub_cls.__name__} fields: {sorted(sub_fields)}")
            value = dataclasses.replace(getattr(config, key), **value)
        changes[key] = value
    return dataclasses.replace(config, **changes)
