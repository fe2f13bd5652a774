"""Model configuration: plain dataclasses, one per mixer, and the model that names them.

A config describes a model; it computes nothing beyond filling documented defaults. It round-trips
through JSON (``to_dict`` / ``from_dict``), which is what an export's ``config.json`` holds, and it is
what the Hydra ``model/`` configs fill. Unknown keys are errors that name the key and the known ones,
so a typo in a config never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Mamba1Config:
    """Mamba-1 (S6) mixer, as in the Mamba paper and ``mamba_ssm.modules.mamba_simple.Mamba``."""

    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # None: ceil(d_model / 16), the reference's "auto"
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init: str = "random"  # "random" or "constant"
    dt_scale: float = 1.0
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    bias: bool = False  # in_proj / out_proj bias
    inner_norms: bool = False  # Jamba: RMSNorm on dt, B and C after x_proj

    def resolved_dt_rank(self, d_model: int) -> int:
        return math.ceil(d_model / 16) if self.dt_rank is None else self.dt_rank


@dataclass
class Mamba2Config:
    """Mamba-2 (SSD) mixer, as ``mamba_ssm.modules.mamba2.Mamba2``."""

    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    A_init_min: float = 1.0
    A_init_max: float = 16.0
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit_min: float = 0.0
    dt_limit_max: float = math.inf
    conv_bias: bool = True
    bias: bool = False
    norm_before_gate: bool = False
    D_has_hdim: bool = False  # D per (head, headdim) instead of per head


@dataclass
class AttentionConfig:
    """Multi-head / grouped-query softmax attention."""

    n_heads: int = 8
    n_kv_heads: int | None = None  # None: n_heads (MHA); fewer: GQA
    head_dim: int | None = None  # None: d_model // n_heads
    rope: bool = False  # the seeds' hybrids use no positional encoding at all
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    out_bias: bool = False


@dataclass
class MLPConfig:
    """Feed-forward block: SwiGLU (Llama, Transformer++) or GELU (GPT-style baselines)."""

    hidden_size: int | None = None  # None: 8/3 d_model (SwiGLU) or 4 d_model (GELU), up to multiple_of
    activation: str = "swiglu"  # "swiglu" or "gelu"
    multiple_of: int = 64
    bias: bool = False


@dataclass
class MoEConfig:
    """Mixture of experts replacing an MLP: softmax router, top-k, dropless by default."""

    n_experts: int = 16
    top_k: int = 2
    hidden_size: int | None = None  # per expert; None as in MLPConfig
    activation: str = "swiglu"
    multiple_of: int = 64
    renormalize: bool = False  # Mixtral renormalizes the top-k weights; Jamba does not
    capacity_factor: float | None = None  # None: dropless; else tokens per expert capped
    load_balancing_coef: float = 0.01
    z_loss_coef: float = 0.001


@dataclass
class HyenaConfig:
    """Hyena operator as in safari / HyenaDNA: order-2 gating, implicit long filter, FFT conv."""

    order: int = 2
    short_filter_order: int = 3
    filter_emb_dim: int = 5  # positional features: 1 (time) + 2 * bands
    filter_order: int = 64  # width of the filter MLP
    filter_layers: int = 2  # hidden layers of the filter MLP (sine activations)
    sine_freq: float = 1.0
    max_seqlen: int = 1024  # the filter is defined over positions 0..max_seqlen-1
    modulate: bool = True  # exponential decay window
    fast_decay_pct: float = 0.3
    slow_decay_pct: float = 1.5
    target_decay: float = 1e-2
    filter_bias: bool = True


@dataclass
class S4DConfig:
    """S4D (Gu et al. 2022), the linear time-invariant SSM of SaShiMi's blocks: diagonal state with fixed
    (input-independent) dynamics, an FFT convolution of its kernel in training, a recurrence in decoding.
    See :mod:`core.layers.s4d`."""

    d_state: int = 32  # modes per channel (complex modes with mode="complex": S4D-Lin, else S4D-Real)
    mode: str = "complex"  # "complex" (S4D-Lin init) or "real" (S4D-Real init)
    dt_min: float = 0.001
    dt_max: float = 0.1
    glu: bool = True  # SaShiMi's post-activation: out_proj to 2 d_model, then a GLU


@dataclass
class ModelConfig:
    """A sequence model: a pattern of blocks over a shared width, with an embedding and a head.

    ``pattern`` has one character per block; see :mod:`core.pattern` for the table.
    """

    d_model: int
    pattern: str
    vocab_size: int
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    mamba1: Mamba1Config = field(default_factory=Mamba1Config)
    mamba2: Mamba2Config = field(default_factory=Mamba2Config)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    hyena: HyenaConfig = field(default_factory=HyenaConfig)
    s4d: S4DConfig = field(default_factory=S4DConfig)
    name: str = ""
    domain: str = "lm"
    # How the LM loss is computed, not a shape: > 0 runs the head + cross-entropy of a forward with
    # labels over chunks of this many positions (core/chunked_loss.py), so the [B, L, vocab] logits
    # never exist and CausalLM returns logits=None there; None: all logits at once.
    loss_chunk_size: int | None = None

    @property
    def n_layers(self) -> int:
        return len(self.pattern)

    @property
    def padded_vocab_size(self) -> int:
        multiple = self.pad_vocab_size_multiple
        return self.vocab_size if multiple <= 1 else multiple * math.ceil(self.vocab_size / multiple)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict; the fields of :data:`OMITTED_AT_DEFAULT` are left out when they
        have their default, so the ``config.json`` and checkpoints of every model written before such a
        field existed, and the sweep keys hashed from them, stay what they were (``from_dict`` fills the
        default back)."""
        data = dataclasses.asdict(self)
        for name in OMITTED_AT_DEFAULT:
            if data[name] is None:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, data, "model")


# Settings of how a model is run (not of its shape) whose default is None: see ModelConfig.to_dict.
OMITTED_AT_DEFAULT = ("loss_chunk_size",)


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise TypeError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {unknown} for {cls.__name__}; known keys: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        sub = _SUBCONFIGS.get(name) if cls is ModelConfig else None
        if sub is not None and not isinstance(value, sub):
            value = _from_dict(sub, dict(value), f"{where}.{name}")
        kwargs[name] = value
    return cls(**kwargs)


_SUBCONFIGS: dict[str, type] = {
    "mamba1": Mamba1Config,
    "mamba2": Mamba2Config,
    "attention": AttentionConfig,
    "mlp": MLPConfig,
    "moe": MoEConfig,
    "hyena": HyenaConfig,
    "s4d": S4DConfig,
}
