"""DNA model presets: the Mamba paper's DNA shapes, HyenaDNA and a Transformer++ baseline, over a
10-token character vocabulary (5 specials + A C G T N, see ``domains.dna.tokenizer``).

They live beside :mod:`core.presets` (whose ``PRESETS`` are the language-model grid) and
:func:`get_dna_preset` falls back to it, so ``model.preset`` in configs/dna/ may name either.

=======================  =======  ======  ========================================================
name                     d_model  layers  source / notes
=======================  =======  ======  ========================================================
mamba1-dna-1.4m          128      12 S    Mamba paper, Sec. 4.3 (DNA): the ~1.4M-parameter Mamba of
                                          the Great Apes classification (d_state 16, expand 2)
mamba1-dna-7m            256      16 S    the same, at the ~7M scale of that figure
hyena-dna-1.4m           128      6 H-    HyenaDNA's recipe (order 2, filter MLP width 64, emb dim
                                          5, sine freq 10, GELU MLP 4 d) at ~1.4M parameters
transformer++-dna-1.4m   128      7 *-    Llama-style (RoPE, SwiGLU) at ~1.4M parameters
<family>-dna-cpu         64       4       the three recipes at a size that trains in minutes on CPU
=======================  =======  ======  ========================================================

Hyena's filter is defined over ``hyena.max_seqlen`` positions: the DNA commands set it to the
longest window they use (a model cannot later read longer windows).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from core.config import AttentionConfig, HyenaConfig, Mamba1Config, MLPConfig, ModelConfig
from core.presets import PRESETS, apply_overrides, get_preset

DNA_VOCAB = 10


def _mamba1(name: str, d_model: int, n_layers: int) -> ModelConfig:
    return ModelConfig(name=name, d_model=d_model, pattern="S" * n_layers, vocab_size=DNA_VOCAB,
                       pad_vocab_size_multiple=8, tie_embeddings=True, domain="dna",
                       mamba1=Mamba1Config(d_state=16, d_conv=4, expand=2))


def _hyena(name: str, d_model: int, n_pairs: int, max_seqlen: int = 1024) -> ModelConfig:
    return ModelConfig(name=name, d_model=d_model, pattern="H-" * n_pairs, vocab_size=DNA_VOCAB,
                       pad_vocab_size_multiple=8, tie_embeddings=True, domain="dna",
                       hyena=HyenaConfig(order=2, short_filter_order=3, filter_emb_dim=5, filter_order=64,
                                         filter_layers=2, sine_freq=10.0, max_seqlen=max_seqlen),
                       mlp=MLPConfig(activation="gelu", hidden_size=4 * d_model))


def _transformer(name: str, d_model: int, n_layers: int, n_heads: int) -> ModelConfig:
    return ModelConfig(name=name, d_model=d_model, pattern="*-" * n_layers, vocab_size=DNA_VOCAB,
                       pad_vocab_size_multiple=8, tie_embeddings=True, domain="dna",
                       attention=AttentionConfig(n_heads=n_heads, rope=True, rope_theta=10000.0),
                       mlp=MLPConfig(activation="swiglu", multiple_of=64))


DNA_PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "mamba1-dna-1.4m": lambda: _mamba1("mamba1-dna-1.4m", 128, 12),
    "mamba1-dna-7m": lambda: _mamba1("mamba1-dna-7m", 256, 16),
    "hyena-dna-1.4m": lambda: _hyena("hyena-dna-1.4m", 128, 6),
    "transformer++-dna-1.4m": lambda: _transformer("transformer++-dna-1.4m", 128, 7, 4),
    "mamba1-dna-cpu": lambda: _mamba1("mamba1-dna-cpu", 64, 4),
    "hyena-dna-cpu": lambda: _hyena("hyena-dna-cpu", 64, 2),
    "transformer++-dna-cpu": lambda: _transformer("transformer++-dna-cpu", 64, 2, 4),
}


def get_dna_preset(name: str, /, **overrides: Any) -> ModelConfig:
    """A DNA preset (or, failing that, a :mod:`core.presets` one) with ``overrides`` applied."""
    if name in DNA_PRESETS:
        config = DNA_PRESETS[name]()
        return apply_overrides(config, **overrides) if overrides else config
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; DNA presets: {', '.join(DNA_PRESETS)}; "
                       f"others: {', '.join(PRESETS)}")
    return get_preset(name, **overrides)
